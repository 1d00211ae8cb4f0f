// Direct 2-D convolution in the "batch-last" layout, for LeNet-sized layers on a CPU.
//
// Tensors are stored as [channels][rows][cols][batch]: the batch is the innermost, contiguous
// dimension, and the batch is a multiple of 16. Every multiply-add of a convolution then works on
// 16 examples at once (one AVX-512 register, or two AVX2 ones), whatever the layer's shape: no
// im2col copies, no padding of 6 channels up to a SIMD width, no 28-wide rows split across
// registers. That is what makes LeNet's small layers fast here (see docs/speed-notes.md).
//
//   out[co][y][x][b] = bias[co] + sum_{ci,ky,kx} w[co][ci][ky][kx] * in[ci][y+ky-pad][x+kx][b]
//
// Columns are padded physically by the caller; rows are padded virtually (rows outside the input
// are skipped), so `pad` below is the row padding only. Weights use PyTorch's [co][ci][ky][kx].
// The input gradient of a convolution is a forward convolution of the (padded) output gradient
// with the flipped, transposed kernel, so two kernels cover training: forward and weight gradient.
//
// A LeNet "block" is pool(act(conv(x) + b)). The block kernels below work through the batch 16
// examples (one chunk) at a time, each thread on its own chunks, with the chunk's activation and
// gradient maps in a small per-thread scratch buffer that stays in the core's L2 cache. A first
// layer's activation is not kept for the backward pass but recomputed there: for LeNet's first
// block that is 4.8 MB per batch of 256 that never goes to memory and back, which is what bounded
// the unfused kernels (memory traffic, not arithmetic: see docs/speed-notes.md). Later blocks
// (6x the multiply-adds per output) keep theirs, chunk by chunk (`kept`), when the caller asks.
//
// Built at first use by lenet/kernels/ops.py with `g++ -O3 -march=native -fopenmp`; plain C ABI.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vec __attribute__((vector_size(64)));             // 16 floats
typedef float uvec __attribute__((vector_size(64), aligned(4)));  // the same, any alignment

static inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
static inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
// A broadcast (from memory: one load folded into the FMA). Not `vec{} + s`: that is a scalar add of
// 0 (which must turn -0 into +0) and a shuffle per weight (speed-notes.md section 13).
static inline vec splat(float s) { return vec{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
static const int V = 16;

// Threads split the batch: thread t of T works on lanes [lo, hi) of every tensor, in every kernel.
// A thread then reads what it (not the other core) wrote in the previous kernel, which keeps the
// data in its own core's cache: splitting by channels or rows instead made the memory-bound
// kernels 3x slower inside a training step than in isolation.
static inline void my_lanes(int B, int& lo, int& hi) {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int t = 0, T = 1;
#endif
    const int nb = B / V;
    lo = nb * t / T * V;
    hi = nb * (t + 1) / T * V;
}

// exp for 16 floats (Cephes' expf: range reduction to [-ln2/2, ln2/2], degree-6 polynomial,
// scaling by 2^n); relative error ~1e-7 over the clamped range. With AVX-512, rounding and the
// scaling are single instructions (roundscale, scalef) and 1/x is rcp14 plus a Newton step.
// The argument is clamped to +-87, where both e^x and 1 / (1 + e^x) are normal floats: a
// saturated activation (a diverging run) would otherwise make subnormal numbers, which this CPU
// family computes with slowly (a lenet5 step 10-20% slower; docs/speed-notes.md section 16). The
// activations built on it reach 0, 1 or +-1 to float precision long before that.
static const float EXP_LIMIT = 87.0f;
typedef int ivec __attribute__((vector_size(64)));

static inline vec exp_poly(vec r) {  // e^r for |r| <= ln2/2
    vec y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    return y * (r * r) + r + 1.0f;
}

#ifdef __AVX512F__
#include <immintrin.h>
static inline vec vexp(vec x) {
    x = x > EXP_LIMIT ? splat(EXP_LIMIT) : x;  // (written so that NaN stays NaN)
    x = x < -EXP_LIMIT ? splat(-EXP_LIMIT) : x;
    vec fn = (vec)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    return (vec)_mm512_scalef_ps((__m512)exp_poly(r), (__m512)fn);
}
static inline vec vrecip(vec d) {
    vec r = (vec)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
}
#else
static inline vec vexp(vec x) {
    x = x > EXP_LIMIT ? splat(EXP_LIMIT) : x;  // (written so that NaN stays NaN)
    x = x < -EXP_LIMIT ? splat(-EXP_LIMIT) : x;
    vec fx = x * 1.44269504088896341f + 0.5f;
    ivec n = __builtin_convertvector(fx, ivec);              // truncates toward zero ...
    vec fn = __builtin_convertvector(n, vec);
    ivec fix = fn > fx;                                      // ... so step down where that rounded up
    n += fix;                                                // (true lanes are -1)
    fn = __builtin_convertvector(n, vec);
    vec y = exp_poly(x - fn * 0.693359375f + fn * 2.12194440e-4f);
    ivec bits = (n + 127) << 23;
    vec scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}
static inline vec vrecip(vec d) { return 1.0f / d; }
#endif

// tanh for 16 floats as a rational function, x P(x^2) / Q(x^2) with P of degree 6 and Q of degree 3
// (the minimax coefficients of Eigen's float tanh), the argument clamped to +-7.905, where tanh
// rounds to +-1 in float: within 3e-7 of tanh (float64) everywhere, 1.6x faster than the same
// from exp and a reciprocal (speed-notes.md section 20). The clamps are written so NaN stays NaN.
static inline vec vtanh(vec x) {
    const float L = 7.90531110763549805f;
    x = x > L ? splat(L) : x;
    x = x < -L ? splat(-L) : x;
    const vec x2 = x * x;
    vec p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    vec q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return (p * x) * vrecip(q);
}

// Activations applied as a convolution's output is stored, and their derivatives written in terms
// of the output a (what the backward pass recomputes): sigmoid' = a(1-a), tanh' = 1-a^2, relu' = [a>0],
// and LeCun's scaled tanh f(z) = A tanh(Sz) (A = 1.7159, S = 2/3): f' = S(A - a^2/A).
enum { ACT_NONE = 0, ACT_SIGMOID = 1, ACT_TANH = 2, ACT_RELU = 3, ACT_SCALED_TANH = 4, ACT_LAST = ACT_SCALED_TANH };
static const float TANH_A = 1.7159f, TANH_S = 2.0f / 3.0f;
enum { POOL_NONE = 0, POOL_AVG = 1, POOL_MAX = 2 };

static inline vec activate(vec z, int act) {
    switch (act) {
        case ACT_SIGMOID: return vrecip(1.0f + vexp(-z));
        case ACT_TANH: return vtanh(z);
        case ACT_RELU: return z < 0.0f ? splat(0.0f) : z;  // NaN stays NaN, as in PyTorch
        case ACT_SCALED_TANH: return TANH_A * vtanh(TANH_S * z);
        default: return z;
    }
}

static inline vec activation_grad(vec a, int act) {
    switch (act) {
        case ACT_SIGMOID: return a * (1.0f - a);
        case ACT_TANH: return 1.0f - a * a;
        case ACT_RELU: return a > 0.0f ? splat(1.0f) : splat(0.0f);
        case ACT_SCALED_TANH: return TANH_S * TANH_A - (TANH_S / TANH_A) * (a * a);
        default: return splat(1.0f);
    }
}

// A [C][H][W][lanes] tensor seen from one chunk of 16 lanes: p points at lane b0 of element 0,
// and B is the distance between consecutive elements (the batch size, or 16 in a scratch buffer).
struct Map {
    float* p;
    int C, H, W, B;
    float* at(int c, int y, int x) const { return p + (((std::size_t)c * H + y) * W + x) * B; }
};

static inline Map cmap(const float* p, int C, int H, int W, int B) { return Map{const_cast<float*>(p), C, H, W, B}; }

// Output columns per register block: accumulators (xb * cob) + one input row window (xb + K - 1)
// + one broadcast weight must fit in ~30 of the 32 vector registers.
template <int K, int COB> constexpr int fwd_xb() {
    return (30 - (K - 1)) / (COB + 1) < 1 ? 1 : (30 - (K - 1)) / (COB + 1);
}

// Which (output, input) channel pairs a convolution connects: pair (o, i) is connected where
// p[o * so + i * si] is nonzero; p null connects every pair. LeNet-5's C3 reads 60 of its 96 input
// maps: the kernels skip the multiply-adds of the other 36 (their weights are zero) and leave their
// weight gradient at zero. `bits` packs a block of outputs: bit j says whether output o0 + j reads i.
struct ConvMask {
    const unsigned char* p = nullptr;
    int so = 0, si = 0;
    unsigned bits(int o0, int n, int i) const {
        unsigned b = 0;
        for (int j = 0; j < n; ++j) b |= (p[(std::size_t)(o0 + j) * so + (std::size_t)i * si] ? 1u : 0u) << j;
        return b;
    }
    ConvMask transposed() const { return ConvMask{p, si, so}; }  // inputs become outputs (the input gradient)
};

// One register block: COB output channels x XB output columns of output row y, 16 examples.
// MASKED: only the output channels connected to each input (mask.bits) take its multiply-adds, the
// block's input window still loaded once for all of them; each accumulator gets the same terms in
// the same order as without the mask, less the zero products.
// ZL, ZR: the block's first ZL and last ZR input columns are known zeros (the padded output
// gradient of an input gradient, at the row's ends): their taps are left out at compile time.
template <int K, int COB, int XB, bool MASKED, int ZL = 0, int ZR = 0>
static inline void conv_block(const Map& in, const float* w, const float* bias, const Map& out,
                              int pad, int co0, int y, int x0, int act, const ConvMask& mask) {
    vec acc[XB][COB];
    for (int co = 0; co < COB; ++co) {
        vec bv = splat(bias ? bias[co0 + co] : 0.0f);
        for (int xo = 0; xo < XB; ++xo) acc[xo][co] = bv;
    }
    const int ky_lo = std::max(0, pad - y), ky_hi = std::min(K, in.H + pad - y);
    const std::size_t wstride = (std::size_t)in.C * K * K;
    for (int ci = 0; ci < in.C; ++ci) {
        const unsigned bits = MASKED ? mask.bits(co0, COB, ci) : 0u;
        if (MASKED && !bits) continue;
        for (int ky = ky_lo; ky < ky_hi; ++ky) {
            const float* row = in.at(ci, y + ky - pad, x0);
            // Every tap unrolled, so the XB + K - 1 input columns stay in registers: a loop over kx
            // would index them at run time and keep them in memory (speed-notes.md section 13).
            vec iv[XB + K - 1];
            constexpr int live_lo = ZL, live_hi = XB + K - 1 - ZR;  // the columns [live_lo, live_hi) are read
#pragma GCC unroll 32
            for (int p = 0; p < XB + K - 1; ++p) iv[p] = p >= live_lo && p < live_hi ? load(row + (std::size_t)p * in.B) : vec{};
            const float* wp = w + (std::size_t)co0 * wstride + ((std::size_t)ci * K + ky) * K;
            if constexpr (MASKED) {  // one test per output channel and row of taps
#pragma GCC unroll 8
                for (int co = 0; co < COB; ++co) {
                    if (!(bits >> co & 1u)) continue;
#pragma GCC unroll 8
                    for (int kx = 0; kx < K; ++kx) {
                        vec wv = splat(wp[co * wstride + kx]);
#pragma GCC unroll 16
                        for (int xo = 0; xo < XB; ++xo)
                            if (xo + kx >= live_lo && xo + kx < live_hi) acc[xo][co] += wv * iv[xo + kx];
                    }
                }
            } else {
#pragma GCC unroll 8
                for (int kx = 0; kx < K; ++kx)
#pragma GCC unroll 8
                    for (int co = 0; co < COB; ++co) {
                        vec wv = splat(wp[co * wstride + kx]);
#pragma GCC unroll 16
                        for (int xo = 0; xo < XB; ++xo)
                            if (xo + kx >= live_lo && xo + kx < live_hi) acc[xo][co] += wv * iv[xo + kx];
                    }
            }
        }
    }
    for (int co = 0; co < COB; ++co)
        for (int xo = 0; xo < XB; ++xo) store(out.at(co0 + co, y, x0 + xo), activate(acc[xo][co], act));
}

// The block at column x0 of a row whose input has zc zero columns at each end (0: none known):
// where its window reaches into them, the block with those taps left out. Compiled for the input
// gradients of LeNet's 5 x 5 convolutions into 6 or 12 channels (COB 6, the family's); others
// compute the zeros.
template <int K, int COB, int XB, bool MASKED>
static inline void conv_block_at(const Map& in, const float* w, const float* bias, const Map& out,
                                 int pad, int co0, int y, int x0, int act, const ConvMask& mask, int zc) {
    if constexpr (K == 5 && COB == 6) {
        const int zl = std::max(0, zc - x0), zr = std::max(0, x0 + XB + K - 1 - (in.W - zc));
        if (zc && !(zl && zr)) {
            switch (zl) {
                case 1: return conv_block<K, COB, XB, MASKED, 1, 0>(in, w, bias, out, pad, co0, y, x0, act, mask);
                case 2: return conv_block<K, COB, XB, MASKED, 2, 0>(in, w, bias, out, pad, co0, y, x0, act, mask);
                case 3: return conv_block<K, COB, XB, MASKED, 3, 0>(in, w, bias, out, pad, co0, y, x0, act, mask);
                case 4: return conv_block<K, COB, XB, MASKED, 4, 0>(in, w, bias, out, pad, co0, y, x0, act, mask);
            }
            switch (zr) {
                case 1: return conv_block<K, COB, XB, MASKED, 0, 1>(in, w, bias, out, pad, co0, y, x0, act, mask);
                case 2: return conv_block<K, COB, XB, MASKED, 0, 2>(in, w, bias, out, pad, co0, y, x0, act, mask);
                case 3: return conv_block<K, COB, XB, MASKED, 0, 3>(in, w, bias, out, pad, co0, y, x0, act, mask);
                case 4: return conv_block<K, COB, XB, MASKED, 0, 4>(in, w, bias, out, pad, co0, y, x0, act, mask);
            }
        }
    }
    conv_block<K, COB, XB, MASKED>(in, w, bias, out, pad, co0, y, x0, act, mask);
}

// out = act(conv(in) + bias) for one chunk; out.H and out.W are the output's size.
template <int K, int COB, bool MASKED>
static void conv_rows(const Map& in, const float* w, const float* bias, const Map& out, int pad, int act,
                      const ConvMask& mask, int zc) {
    constexpr int XB = fwd_xb<K, COB>();
    const int full = out.W / XB * XB;
    for (int cb = 0; cb < out.C / COB; ++cb)
        for (int y = 0; y < out.H; ++y) {
            for (int x0 = 0; x0 < full; x0 += XB)
                conv_block_at<K, COB, XB, MASKED>(in, w, bias, out, pad, cb * COB, y, x0, act, mask, zc);
            for (int x0 = full; x0 < out.W; ++x0)
                conv_block_at<K, COB, 1, MASKED>(in, w, bias, out, pad, cb * COB, y, x0, act, mask, zc);
        }
}

template <int K, int COB>
static void conv_chunk(const Map& in, const float* w, const float* bias, const Map& out, int pad, int act,
                       const ConvMask& mask, int zc) {
    if (mask.p) conv_rows<K, COB, true>(in, w, bias, out, pad, act, mask, zc);
    else conv_rows<K, COB, false>(in, w, bias, out, pad, act, mask, zc);
}

// gw += weight gradient of one chunk, per lane: gw[co][ci][ky][kx] += sum_{y,x} g[co][y][goff+x] *
// in[ci][y+ky-pad][x+kx] (16 partial sums per weight; summed across lanes once, at the end).
// One item = COB output channels x one (ci, ky): COB x K accumulators.
template <int K> constexpr int wgrad_cob_max() { return 29 / (K + 1) > 7 ? 7 : 29 / (K + 1); }

// One item: the K x K kernels between input channel ci and the COB output channels cos[0..COB)
// (LISTED) or cos[0], cos[0] + 1, ... (the dense blocks: one pointer and a stride).
template <int K, int COB, bool LISTED>
static void wgrad_item(const Map& in, const Map& g, int goff, int pad, vec* gw, int ci, const int* cos) {
    // Registers: COB x K accumulators + XW + K - 1 input vectors + one gradient vector <= ~30.
    constexpr int XW = (30 - COB * K - K) < 1 ? 1 : (30 - COB * K - K) > 4 ? 4 : (30 - COB * K - K);
    const int Ho = g.H, Wo = in.W - K + 1;
    for (int ky = 0; ky < K; ++ky) {
        vec acc[COB][K];
        for (int co = 0; co < COB; ++co)
            for (int kx = 0; kx < K; ++kx) acc[co][kx] = vec{};
        for (int y = std::max(0, pad - ky); y < std::min(Ho, in.H + pad - ky); ++y) {
            const float* irow = in.at(ci, y + ky - pad, 0);
            const float* grow[COB];
            for (int co = 0; co < COB; ++co) grow[co] = LISTED ? g.at(cos[co], y, goff) : nullptr;
            const float* g0 = g.at(cos[0], y, goff);
            const std::size_t gstride = (std::size_t)g.H * g.W * g.B;
            auto gat = [&](int co, int x) { return LISTED ? grow[co] + (std::size_t)x * g.B : g0 + co * gstride + (std::size_t)x * g.B; };
            int x = 0;
            // XW output columns at a time: their XW + K - 1 input vectors are loaded once.
            for (; x + XW <= Wo; x += XW) {
                vec iv[XW + K - 1];
                for (int p = 0; p < XW + K - 1; ++p) iv[p] = load(irow + (std::size_t)(x + p) * in.B);
                for (int xw = 0; xw < XW; ++xw)
                    for (int co = 0; co < COB; ++co) {
                        vec gv = load(gat(co, x + xw));
                        for (int kx = 0; kx < K; ++kx) acc[co][kx] += gv * iv[xw + kx];
                    }
            }
            for (; x < Wo; ++x) {
                vec gv[COB];
                for (int co = 0; co < COB; ++co) gv[co] = load(gat(co, x));
                for (int kx = 0; kx < K; ++kx) {
                    vec iv = load(irow + (std::size_t)(x + kx) * in.B);
                    for (int co = 0; co < COB; ++co) acc[co][kx] += gv[co] * iv;
                }
            }
        }
        for (int co = 0; co < COB; ++co)
            for (int kx = 0; kx < K; ++kx) gw[(((std::size_t)cos[co] * in.C + ci) * K + ky) * K + kx] += acc[co][kx];
    }
}

// The item for the first n <= COB of cos (a masked input's last, smaller group of outputs).
template <int K, int COB>
static void wgrad_item_n(const Map& in, const Map& g, int goff, int pad, vec* gw, int ci, const int* cos, int n) {
    if constexpr (COB > 1)
        if (n < COB) return wgrad_item_n<K, COB - 1>(in, g, goff, pad, gw, ci, cos, n);
    wgrad_item<K, COB, true>(in, g, goff, pad, gw, ci, cos);
}

// Every item of a chunk: COB consecutive output channels x each input channel; with a mask, each
// input's connected output channels only, COB at a time (the others' gradient stays zero).
template <int K, int COB>
static void wgrad_chunk(const Map& in, const Map& g, int goff, int pad, vec* gw, const ConvMask& mask) {
    std::vector<int> cos(g.C);
    if (!mask.p) {
        for (int co = 0; co < g.C; ++co) cos[co] = co;
        for (int cb = 0; cb < g.C / COB; ++cb)
            for (int ci = 0; ci < in.C; ++ci) wgrad_item<K, COB, false>(in, g, goff, pad, gw, ci, cos.data() + cb * COB);
        return;
    }
    for (int ci = 0; ci < in.C; ++ci) {
        int n = 0;
        for (int co = 0; co < g.C; ++co)
            if (mask.bits(co, 1, ci)) cos[n++] = co;
        for (int j = 0; j < n; j += COB) wgrad_item_n<K, COB>(in, g, goff, pad, gw, ci, cos.data() + j, std::min(COB, n - j));
    }
}

// ---- dispatch on the kernel size and the largest channel block that divides Cout --------------

// The kernel sizes compiled in: conv_any and wgrad_any have a case for each.
static const int KERNEL_SIZES[] = {1, 3, 5, 7};
static bool supported(int K) { return std::find(std::begin(KERNEL_SIZES), std::end(KERNEL_SIZES), K) != std::end(KERNEL_SIZES); }

template <int K>
static void conv_k(const Map& in, const float* w, const float* bias, const Map& out, int pad, int act,
                   const ConvMask& m, int zc) {
    // Masked (C3): blocks of 4 output channels x 5 columns, whose 4 broadcast weights per 20 FMAs
    // are skipped with their channel, rather than 8 x 2 (8 per 16): -18% on C3's forward (8 x 2: -8%).
    if (m.p && out.C % 4 == 0) return conv_chunk<K, 4>(in, w, bias, out, pad, act, m, zc);
    switch (out.C % 8 == 0 ? 8 : out.C % 7 == 0 ? 7 : out.C % 6 == 0 ? 6 : out.C % 5 == 0 ? 5
            : out.C % 4 == 0 ? 4 : out.C % 3 == 0 ? 3 : out.C % 2 == 0 ? 2 : 1) {
        case 8: return conv_chunk<K, 8>(in, w, bias, out, pad, act, m, zc);
        case 7: return conv_chunk<K, 7>(in, w, bias, out, pad, act, m, zc);
        case 6: return conv_chunk<K, 6>(in, w, bias, out, pad, act, m, zc);
        case 5: return conv_chunk<K, 5>(in, w, bias, out, pad, act, m, zc);
        case 4: return conv_chunk<K, 4>(in, w, bias, out, pad, act, m, zc);
        case 3: return conv_chunk<K, 3>(in, w, bias, out, pad, act, m, zc);
        case 2: return conv_chunk<K, 2>(in, w, bias, out, pad, act, m, zc);
        default: return conv_chunk<K, 1>(in, w, bias, out, pad, act, m, zc);
    }
}

// zc: the input's first and last zc columns are zeros (an input gradient's padded output gradient).
static void conv_any(const Map& in, const float* w, const float* bias, const Map& out, int K, int pad, int act,
                     const ConvMask& m = {}, int zc = 0) {
    switch (K) {
        case 1: return conv_k<1>(in, w, bias, out, pad, act, m, zc);
        case 3: return conv_k<3>(in, w, bias, out, pad, act, m, zc);
        case 5: return conv_k<5>(in, w, bias, out, pad, act, m, zc);
        default: return conv_k<7>(in, w, bias, out, pad, act, m, zc);
    }
}

template <int K>
static void wgrad_k(const Map& in, const Map& g, int goff, int pad, vec* gw, const ConvMask& m) {
    for (int cob = wgrad_cob_max<K>(); cob >= 1; --cob) {
        if (g.C % cob) continue;
        switch (cob) {
            case 7: if constexpr (wgrad_cob_max<K>() >= 7) return wgrad_chunk<K, 7>(in, g, goff, pad, gw, m); break;
            case 6: if constexpr (wgrad_cob_max<K>() >= 6) return wgrad_chunk<K, 6>(in, g, goff, pad, gw, m); break;
            case 5: if constexpr (wgrad_cob_max<K>() >= 5) return wgrad_chunk<K, 5>(in, g, goff, pad, gw, m); break;
            case 4: if constexpr (wgrad_cob_max<K>() >= 4) return wgrad_chunk<K, 4>(in, g, goff, pad, gw, m); break;
            case 3: if constexpr (wgrad_cob_max<K>() >= 3) return wgrad_chunk<K, 3>(in, g, goff, pad, gw, m); break;
            case 2: return wgrad_chunk<K, 2>(in, g, goff, pad, gw, m);
            default: return wgrad_chunk<K, 1>(in, g, goff, pad, gw, m);
        }
    }
}

static void wgrad_any(const Map& in, const Map& g, int K, int goff, int pad, vec* gw, const ConvMask& m = {}) {
    switch (K) {
        case 1: return wgrad_k<1>(in, g, goff, pad, gw, m);
        case 3: return wgrad_k<3>(in, g, goff, pad, gw, m);
        case 5: return wgrad_k<5>(in, g, goff, pad, gw, m);
        default: return wgrad_k<7>(in, g, goff, pad, gw, m);
    }
}

// ---- pooling (k x k windows, stride k, floor) and the backward of activation + pooling ---------

static void pool_chunk(const Map& a, const Map& p, int k, bool is_max) {
    const float inv = 1.0f / (k * k);
    for (int c = 0; c < p.C; ++c)
        for (int i = 0; i < p.H; ++i)
            for (int j = 0; j < p.W; ++j) {
                vec s = load(a.at(c, i * k, j * k));
                for (int di = 0; di < k; ++di)
                    for (int dj = (di == 0); dj < k; ++dj) {
                        vec v = load(a.at(c, i * k + di, j * k + dj));
                        s = is_max ? ((v > s) | (v != v) ? v : s) : s + v;  // max: a NaN wins, as in PyTorch
                    }
                store(p.at(c, i, j), is_max ? s : s * inv);
            }
}

// gz (a's rows, at column goff of rows gz.W wide; all other columns zero) = the gradient of the
// block's output gp sent back through the pool, times act'(a). Average pooling spreads it evenly;
// max pooling sends it to the first maximum of each window in row-major order (as PyTorch's
// max_pool2d does); cells the pool does not cover (the floor) get zero. Window by window: each
// cell of a is read twice (for the window's maximum, then for its own gradient).
static void act_pool_backward_chunk(const Map& gp, const Map& a, const Map& gz, int goff, int pool, int k, int act) {
    const bool need_a = act != ACT_NONE || pool == POOL_MAX;  // (a is not read otherwise)
    auto put = [&](int c, int y, int x, vec g) {
        store(gz.at(c, y, goff + x), g * activation_grad(need_a ? load(a.at(c, y, x)) : vec{}, act));
    };
    for (int c = 0; c < a.C; ++c) {
        for (int y = 0; y < a.H; ++y) {  // the padding columns
            for (int x = 0; x < goff; ++x) store(gz.at(c, y, x), vec{});
            for (int x = goff + a.W; x < gz.W; ++x) store(gz.at(c, y, x), vec{});
        }
        if (!pool) {
            for (int y = 0; y < a.H; ++y)
                for (int x = 0; x < a.W; ++x) put(c, y, x, load(gp.at(c, y, x)));
            continue;
        }
        const int Hp = a.H / k, Wp = a.W / k;
        for (int y = 0; y < a.H; ++y)  // the floor: cells no window covers
            for (int x = (y < Hp * k ? Wp * k : 0); x < a.W; ++x) store(gz.at(c, y, goff + x), vec{});
        const vec inv = splat(1.0f / (k * k));
        for (int i = 0; i < Hp; ++i)
            for (int j = 0; j < Wp; ++j) {
                const vec g = load(gp.at(c, i, j));
                if (pool == POOL_AVG) {
                    for (int di = 0; di < k; ++di)
                        for (int dj = 0; dj < k; ++dj) put(c, i * k + di, j * k + dj, g * inv);
                    continue;
                }
                vec m = load(a.at(c, i * k, j * k));  // max: the window's maximum (a NaN wins, as in the forward)
                for (int di = 0; di < k; ++di)
                    for (int dj = 0; dj < k; ++dj) {
                        vec v = load(a.at(c, i * k + di, j * k + dj));
                        m = (v > m) | (v != v) ? v : m;
                    }
                ivec taken = ivec{};  // lanes whose first maximum has been passed
                for (int di = 0; di < k; ++di)
                    for (int dj = 0; dj < k; ++dj) {
                        const int y = i * k + di, x = j * k + dj;
                        const ivec first = (load(a.at(c, y, x)) == m) & ~taken;
                        taken |= first;
                        put(c, y, x, first ? g : vec{});
                    }
            }
    }
}


// ---- dense layers in the same layout: x [Fin][B] -> y [Fout][B] --------------------------------

// y = act(T x + b) for one register block: OB outputs x LB lane vectors (16 examples each). The
// weight of input i for output o is T[i * is + o * os]: the weight as stored, [Fout][Fin] (is 1,
// os Fin: the forward pass), or read as its transpose (is the layer's Fin, os 1: the input gradient
// W^T gz, a call whose Fin is the layer's Fout).
// x rows are xB floats apart, y rows yB floats apart.
template <int OB, int LB>
static inline void dense_block(const float* x, int xB, const float* T, std::size_t is, std::size_t os,
                               const float* bias, float* y, int yB, int Fin, int o0, int act) {
    vec acc[OB][LB];
    for (int ob = 0; ob < OB; ++ob) {
        vec bv = splat(bias ? bias[o0 + ob] : 0.0f);
        for (int l = 0; l < LB; ++l) acc[ob][l] = bv;
    }
    const float* wo = T + (std::size_t)o0 * os;
    for (int i = 0; i < Fin; ++i) {
        vec xv[LB];
        for (int l = 0; l < LB; ++l) xv[l] = load(x + (std::size_t)i * xB + l * V);
        const float* wr = wo + (std::size_t)i * is;
        for (int ob = 0; ob < OB; ++ob) {
            vec wv = splat(wr[ob * os]);
            for (int l = 0; l < LB; ++l) acc[ob][l] += wv * xv[l];
        }
    }
    for (int ob = 0; ob < OB; ++ob)
        for (int l = 0; l < LB; ++l) store(y + (std::size_t)(o0 + ob) * yB + l * V, activate(acc[ob][l], act));
}

// Lanes [0, n) of x and y (n a multiple of 16), all outputs; T, is, os as in dense_block.
static void dense_lanes(const float* x, int xB, const float* T, std::size_t is, std::size_t os, const float* bias,
                        float* y, int yB, int Fin, int Fout, int n, int act) {
    const int ofull = Fout / 6 * 6;
    int l0 = 0;
    for (; l0 + 4 * V <= n; l0 += 4 * V) {
        for (int o0 = 0; o0 < ofull; o0 += 6) dense_block<6, 4>(x + l0, xB, T, is, os, bias, y + l0, yB, Fin, o0, act);
        for (int o0 = ofull; o0 < Fout; ++o0) dense_block<1, 4>(x + l0, xB, T, is, os, bias, y + l0, yB, Fin, o0, act);
    }
    for (; l0 < n; l0 += V) {
        for (int o0 = 0; o0 < ofull; o0 += 6) dense_block<6, 1>(x + l0, xB, T, is, os, bias, y + l0, yB, Fin, o0, act);
        for (int o0 = ofull; o0 < Fout; ++o0) dense_block<1, 1>(x + l0, xB, T, is, os, bias, y + l0, yB, Fin, o0, act);
    }
}

// Per-thread partial sums (of weight and bias gradients), added in thread order at the end: the
// result is deterministic for a given thread count.
struct Partials {
    std::vector<float> data;
    std::size_t n;
    int T;
    explicit Partials(std::size_t n_) : n(n_) {
#ifdef _OPENMP
        T = omp_get_max_threads();
#else
        T = 1;
#endif
        data.assign((std::size_t)T * n, 0.0f);
    }
    float* mine() const {
#ifdef _OPENMP
        return const_cast<float*>(data.data()) + (std::size_t)omp_get_thread_num() * n;
#else
        return const_cast<float*>(data.data());
#endif
    }
    // Adds the 16 lanes of each of the first m accumulators of acc to this thread's partials.
    void add_lanes(const std::vector<vec>& acc, std::size_t m) const {
        float* p = mine();
        for (std::size_t i = 0; i < m; ++i) {
            float s = 0.0f;
            for (int l = 0; l < V; ++l) s += acc[i][l];
            p[i] += s;
        }
    }
    // The totals of a weight gradient (the first nw) and a bias gradient (the rest; if gb).
    void sum_split(float* gw, std::size_t nw, float* gb) const {
        std::vector<float> total(n);
        sum_into(total.data());
        std::copy(total.begin(), total.begin() + nw, gw);
        if (gb) std::copy(total.begin() + nw, total.end(), gb);
    }
    void sum_into(float* out) const {
        for (std::size_t i = 0; i < n; ++i) {
            float s = 0.0f;
            for (int t = 0; t < T; ++t) s += data[(std::size_t)t * n + i];
            out[i] = s;
        }
    }
};

// ---- BatchNorm in training mode over the first n lanes (the batch; the rest are padding) -------

// Lanes b0 .. b0+15 that are examples (b0 + l < n): 1, else 0.
static inline vec lane_mask(int b0, int n) {
    vec m;
    for (int l = 0; l < V; ++l) m[l] = b0 + l < n ? 1.0f : 0.0f;
    return m;
}

// The backward pass of p = pool(act(BatchNorm(z))) in training mode, where BatchNorm(z) = s z + t
// with s = gamma * rstd, t = beta - mean * s from the batch's own mean and rstd = 1/sqrt(var + eps).
// Two passes over the batch, window by window (a k x k pooling window, or one position without
// pooling), the activation recomputed in each: the first sums g (the gradient of s z + t) and g z
// per channel, which give the gradients of gamma and beta and the two per-channel coefficients
// through which the batch statistics pass the gradient on; the second writes
// gz = s g + A[c] + Bz[c] z (zero in the padded lanes). Max pooling sends a window's gradient to
// its first maximum in row-major order, as PyTorch does; cells no window covers get g = 0.
struct BnChannel {
    vec s, t, A, Bz, mask;
};

// Pass 1 (WRITE false): add g and g z of one window to sg, sgz. Pass 2: write gz there. The
// activation, pooling and window size are template arguments: every loop below unrolls and the
// window's values stay in registers.
template <bool WRITE, int ACT, int POOL, int K>
static inline void bn_window(const Map& in, const Map& gpm, const Map& out, const BnChannel& ch, int c, int y0, int x0,
                             int i, int j, vec& sg, vec& sgz) {
    constexpr int KK = POOL ? K : 1;
    vec zv[KK][KK], a[KK][KK];
    for (int dy = 0; dy < KK; ++dy)
        for (int dx = 0; dx < KK; ++dx) {
            zv[dy][dx] = load(in.at(c, y0 + dy, x0 + dx));
            a[dy][dx] = activate(zv[dy][dx] * ch.s + ch.t, ACT);
        }
    const vec gpv = load(gpm.at(c, i, j)) * (POOL == POOL_AVG ? 1.0f / (K * K) : 1.0f);
    vec m = a[0][0];
    if (POOL == POOL_MAX)
        for (int dy = 0; dy < KK; ++dy)
            for (int dx = 0; dx < KK; ++dx) m = (a[dy][dx] > m) | (a[dy][dx] != a[dy][dx]) ? a[dy][dx] : m;
    ivec taken = ivec{};
    for (int dy = 0; dy < KK; ++dy)
        for (int dx = 0; dx < KK; ++dx) {
            vec g = gpv * activation_grad(a[dy][dx], ACT);
            if (POOL == POOL_MAX) {
                const ivec first = (a[dy][dx] == m) & ~taken;
                taken |= first;
                g = first ? g : vec{};
            }
            if (WRITE) {
                store(out.at(c, y0 + dy, x0 + dx), (g * ch.s + ch.A + ch.Bz * zv[dy][dx]) * ch.mask);
            } else {
                sg += g;
                sgz += g * zv[dy][dx];
            }
        }
}

// One chunk, every window of every channel; cells outside the windows (pooling's floor) have g = 0.
template <bool WRITE, int ACT, int POOL, int K>
static void bn_chunk_t(const Map& in, const Map& gpm, const Map& out, const std::vector<BnChannel>& chs, vec* sums) {
    constexpr int KK = POOL ? K : 1;
    const int Hp = in.H / KK, Wp = in.W / KK;
    for (int c = 0; c < in.C; ++c) {
        vec sg = vec{}, sgz = vec{};
        for (int i = 0; i < Hp; ++i)
            for (int j = 0; j < Wp; ++j) bn_window<WRITE, ACT, POOL, K>(in, gpm, out, chs[c], c, i * KK, j * KK, i, j, sg, sgz);
        if (WRITE)  // the floor's cells: g = 0
            for (int y = 0; y < in.H; ++y)
                for (int x = (y < Hp * KK ? Wp * KK : 0); x < in.W; ++x)
                    store(out.at(c, y, x), (chs[c].A + chs[c].Bz * load(in.at(c, y, x))) * chs[c].mask);
        if (!WRITE) {
            sums[2 * c] += sg;
            sums[2 * c + 1] += sgz;
        }
    }
}

template <bool WRITE, int ACT>
static void bn_chunk_pool(const Map& in, const Map& gpm, const Map& out, const std::vector<BnChannel>& chs,
                          int pool, int k, vec* sums) {
    if (pool == POOL_NONE) return bn_chunk_t<WRITE, ACT, POOL_NONE, 1>(in, gpm, out, chs, sums);
    if (pool == POOL_MAX) {
        if (k == 2) return bn_chunk_t<WRITE, ACT, POOL_MAX, 2>(in, gpm, out, chs, sums);
        return bn_chunk_t<WRITE, ACT, POOL_MAX, 3>(in, gpm, out, chs, sums);
    }
    if (k == 2) return bn_chunk_t<WRITE, ACT, POOL_AVG, 2>(in, gpm, out, chs, sums);
    return bn_chunk_t<WRITE, ACT, POOL_AVG, 3>(in, gpm, out, chs, sums);
}

template <bool WRITE>
static void bn_chunk(const Map& in, const Map& gpm, const Map& out, const std::vector<BnChannel>& chs, int pool,
                     int k, int act, vec* sums) {
    switch (act) {
        case ACT_SIGMOID: return bn_chunk_pool<WRITE, ACT_SIGMOID>(in, gpm, out, chs, pool, k, sums);
        case ACT_TANH: return bn_chunk_pool<WRITE, ACT_TANH>(in, gpm, out, chs, pool, k, sums);
        case ACT_RELU: return bn_chunk_pool<WRITE, ACT_RELU>(in, gpm, out, chs, pool, k, sums);
        case ACT_SCALED_TANH: return bn_chunk_pool<WRITE, ACT_SCALED_TANH>(in, gpm, out, chs, pool, k, sums);
        default: return bn_chunk_pool<WRITE, ACT_NONE>(in, gpm, out, chs, pool, k, sums);
    }
}

// One chunk of pool(act(s[c] z + t[c])): into out directly without pooling, else through a (the
// chunk's scratch map, which may be z itself).
static void affine_chunk(const Map& z, const float* s, const float* t, const Map& a, const Map& out, int act,
                         int pool, int k) {
    const Map& dst = pool ? a : out;
    for (int c = 0; c < z.C; ++c) {
        const vec sv = splat(s[c]), tv = splat(t[c]);
        for (int y = 0; y < z.H; ++y)
            for (int x = 0; x < z.W; ++x) store(dst.at(c, y, x), activate(load(z.at(c, y, x)) * sv + tv, act));
    }
    if (pool) pool_chunk(a, out, k, pool == POOL_MAX);
}

// Adds, per channel c of one chunk z, the sum of its values and of their squares over the lanes
// that mask keeps (1) to sums[2c] and sums[2c + 1]: float within the chunk, double across chunks.
static void add_channel_sums(const Map& z, vec mask, std::vector<double>& sums) {
    for (int c = 0; c < z.C; ++c) {
        vec s1 = vec{}, s2 = vec{};
        for (int y = 0; y < z.H; ++y)
            for (int x = 0; x < z.W; ++x) {
                const vec v = load(z.at(c, y, x)) * mask;
                s1 += v;
                s2 += v * v;
            }
        for (int l = 0; l < V; ++l) {
            sums[2 * c] += s1[l];
            sums[2 * c + 1] += s2[l];
        }
    }
}

// Mean and biased variance per channel from add_channel_sums' totals over `count` values.
static void mean_and_var(const std::vector<double>& sums, double count, double* mean, double* var) {
    for (std::size_t c = 0; c < sums.size() / 2; ++c) {
        mean[c] = sums[2 * c] / count;
        var[c] = std::max(0.0, sums[2 * c + 1] / count - mean[c] * mean[c]);
    }
}

// From the per-channel sums of g and g z over `count` values: the gradients of gamma and beta, and
// the coefficients A, Bz of gz = s g + A + Bz z (the batch statistics' share of the gradient).
static void bn_coefficients(const std::vector<double>& sums, const float* s, const float* mean, const float* rstd,
                            double count, std::vector<BnChannel>& chs, float* ggamma, float* gbeta) {
    for (std::size_t c = 0; c < chs.size(); ++c) {
        const double sg = sums[2 * c], dgamma = rstd[c] * (sums[2 * c + 1] - mean[c] * sg);
        const double bz = -(double)s[c] * rstd[c] * dgamma / count;
        gbeta[c] = (float)sg;
        ggamma[c] = (float)dgamma;
        chs[c].Bz = splat((float)bz);
        chs[c].A = splat((float)(-(double)s[c] * sg / count - bz * mean[c]));
    }
}

// Per-thread double sums added in thread order (not in the order threads finish): the totals are
// the same in every run with the same thread count.
struct ThreadSums {
    std::vector<std::vector<double>> slots;
    explicit ThreadSums(std::size_t n) : slots(max_threads(), std::vector<double>(n, 0.0)) {}
    static int max_threads() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    }
    int T() const { return (int)slots.size(); }
    std::vector<double>& mine() {
#ifdef _OPENMP
        return slots[omp_get_thread_num()];
#else
        return slots[0];
#endif
    }
    std::vector<double> total() const {
        std::vector<double> out(slots[0].size(), 0.0);
        for (const auto& slot : slots)
            for (std::size_t i = 0; i < out.size(); ++i) out[i] += slot[i];
        return out;
    }
};

// Called by every thread of a parallel region of sums.T() threads after pass 1: stores this
// thread's per-lane sums, waits for all threads, and has one of them add them up and compute the
// coefficients; every thread sees them on return (the single's implicit barrier).
static void bn_reduce(const std::vector<vec>& mine, ThreadSums& sums, const float* s, const float* mean,
                      const float* rstd, double count, std::vector<BnChannel>& chs, float* ggamma, float* gbeta) {
    std::vector<double>& slot = sums.mine();
    for (std::size_t i = 0; i < slot.size(); ++i)
        for (int l = 0; l < V; ++l) slot[i] += mine[i][l];
#pragma omp barrier
#pragma omp single
    bn_coefficients(sums.total(), s, mean, rstd, count, chs, ggamma, gbeta);
}

// The argument checks every entry point shares: codes the kernels know, a pool window >= 1.
static bool act_ok(int act) { return act >= ACT_NONE && act <= ACT_LAST; }
static bool codes_ok(int act, int pool, int k) { return act_ok(act) && pool >= POOL_NONE && pool <= POOL_MAX && k >= 1; }

// Each thread's share of the batch, 16 lanes (one chunk) at a time, with its own scratch buffer
// of `scratch` floats: body(b0, scratch) for every chunk b0.
template <typename F>
static void for_each_chunk(int B, std::size_t scratch, F&& body) {
#pragma omp parallel
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        std::vector<float> buf(scratch);
        for (int b0 = lo; b0 < hi; b0 += V) body(b0, buf.data());
    }
}

// Back through o = act2(s[c] p + t[c]) for one chunk, given go (the gradient of o): gp = s g with
// g = go act2'(o), and the per-lane sums of g p and g into accs[c], acct[c] (as lenet_bl_affine_backward).
static void affine_backward_chunk(const Map& go, const Map& p, const float* s, const float* t, int act2,
                                  const Map& gp, vec* accs, vec* acct) {
    for (int c = 0; c < p.C; ++c) {
        const vec sv = splat(s[c]), tv = splat(t[c]);
        vec sz = vec{}, sg = vec{};
        for (int y = 0; y < p.H; ++y)
            for (int x = 0; x < p.W; ++x) {
                const vec pv = load(p.at(c, y, x));
                const vec g = load(go.at(c, y, x)) * activation_grad(activate(pv * sv + tv, act2), act2);
                sz += g * pv;
                sg += g;
                store(gp.at(c, y, x), g * sv);
            }
        accs[c] += sz;
        acct[c] += sg;
    }
}

extern "C" {

// The numbers the Python side must agree with, reported from here rather than written twice:
// the lanes (examples per vector), the number of kernel sizes and the sizes, the activation codes
// (none, sigmoid, tanh, relu, scaled tanh) and the pooling codes (none, average, max). Writes at most n ints to out
// and returns how many there are.
int lenet_bl_constants(int* out, int n) {
    std::vector<int> c = {V, (int)std::size(KERNEL_SIZES)};
    c.insert(c.end(), std::begin(KERNEL_SIZES), std::end(KERNEL_SIZES));
    c.insert(c.end(), {ACT_NONE, ACT_SIGMOID, ACT_TANH, ACT_RELU, ACT_SCALED_TANH, POOL_NONE, POOL_AVG, POOL_MAX});
    std::copy(c.begin(), c.begin() + std::min<std::size_t>(n, c.size()), out);
    return (int)c.size();
}

// The weight and bias a conv block runs, made from a layer's own parameters in one call (each fold
// would otherwise be a few PyTorch operations with an autograd node apiece):
//   pairs (if not null, [Cout][Cin]): the index in w of the K x K kernel between output o and input
//   i, or -1 where they are not connected (LeNet-5's C3 stores its 60 connected kernels only: the
//   others run as zeros); without it w is [Cout][Cin][K][K] already;
//   an input layer's affine map folded in (LeNet-5's LeCunInput, affine != 0): the conv of
//   scale x + shift is the conv of x with weight scale w and bias b + shift sum(w).
// wd [Cout][Cin][K][K], bd [Cout]; b may be null (no bias of its own).
void lenet_bl_fold(const float* w, const float* b, const int* pairs, int Cout, int Cin, int KK,
                   int affine, float scale, float shift, float* wd, float* bd) {
    for (int o = 0; o < Cout; ++o) {
        float sum = 0.0f;
        for (int i = 0; i < Cin; ++i) {
            const int at = pairs ? pairs[o * Cin + i] : o * Cin + i;
            float* dst = wd + ((std::size_t)o * Cin + i) * KK;
            for (int k = 0; k < KK; ++k) {
                const float v = at < 0 ? 0.0f : w[(std::size_t)at * KK + k];
                dst[k] = affine ? v * scale : v;
                sum += v;
            }
        }
        const float own = b ? b[o] : 0.0f;
        bd[o] = affine ? shift * sum + own : own;
    }
}

// The gradients of the layer's own parameters from those of the folded ones (gwd, gbd): gw = scale
// gwd + shift gbd[o] at each connected kernel (the bias's sum over the weights), gb = gbd (if gb).
void lenet_bl_unfold(const float* gwd, const float* gbd, const int* pairs, int Cout, int Cin, int KK,
                     int affine, float scale, float shift, float* gw, float* gb) {
    for (int o = 0; o < Cout; ++o) {
        for (int i = 0; i < Cin; ++i) {
            const int at = pairs ? pairs[o * Cin + i] : o * Cin + i;
            if (at < 0) continue;
            const float* src = gwd + ((std::size_t)o * Cin + i) * KK;
            float* dst = gw + (std::size_t)at * KK;
            for (int k = 0; k < KK; ++k) dst[k] = affine ? scale * src[k] + shift * gbd[o] : src[k];
        }
        if (gb) gb[o] = gbd[o];
    }
}

// The activation of a pooled block, kept for the backward pass (`kept`, see below), is stored
// chunk by chunk: chunk b0 / 16 is one [Cout][Ho][Wo][16] scratch map, written and read contiguously.
static inline Map kept_chunk(const float* kept, int b0, int C, int H, int W) {
    return cmap(kept + (std::size_t)(b0 / V) * C * H * W * V, C, H, W, V);
}

// A block's forward pass: p = pool(act(conv(x) + bias)); pool 0 none, 1 average, 2 max (k x k).
// With `kept` (pooled blocks only), the activation before the pool is written there for
// lenet_bl_block_backward, which then does not recompute it.
static int block_forward(const float* x, const float* w, const float* bias, const float* s, const float* t,
                         float* p, float* kept, int Cin, int Hin, int Win, int pad, int Cout, int K, int B,
                         int act, int pool, int k, int act2, const unsigned char* mask) {
    if (B % V || !supported(K) || !codes_ok(act, pool, k) || !act_ok(act2)
        || (kept && !pool) || (s && !pool)) return -1;
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int Hp = pool ? Ho / k : Ho, Wp = pool ? Wo / k : Wo;
    const ConvMask cm = mask ? ConvMask{mask, Cin, 1} : ConvMask{};
    for_each_chunk(B, pool && !kept ? (std::size_t)Cout * Ho * Wo * V : 0, [&](int b0, float* scratch) {
        Map in = cmap(x + b0, Cin, Hin, Win, B), out = cmap(p + b0, Cout, Hp, Wp, B);
        if (!pool) {
            conv_any(in, w, bias, out, K, pad, act, cm);
            return;
        }
        Map a = kept ? kept_chunk(kept, b0, Cout, Ho, Wo) : cmap(scratch, Cout, Ho, Wo, V);
        conv_any(in, w, bias, a, K, pad, act, cm);
        pool_chunk(a, out, k, pool == POOL_MAX);
        if (s) affine_chunk(out, s, t, out, out, act2, POOL_NONE, 1);  // act2(s p + t), in place
    });
    return 0;
}

int lenet_bl_block_forward(const float* x, const float* w, const float* bias, float* p, float* kept,
                           int Cin, int Hin, int Win, int pad, int Cout, int K, int B,
                           int act, int pool, int k, const unsigned char* mask) {
    return block_forward(x, w, bias, nullptr, nullptr, p, kept, Cin, Hin, Win, pad, Cout, K, B, act, pool, k, ACT_NONE,
                         mask);
}

// s_by s[c]: the affine entries take the layer's coefficient s and the factor the block's average
// pool is off by (LeNet-5's subsampling sums its 2 x 2 window: s_by = 4), so the caller needs no
// operation (and autograd node) of its own for the product.
static std::vector<float> scaled(const float* s, int C, float s_by) {
    std::vector<float> out(s, s + C);
    for (float& v : out) v *= s_by;
    return out;
}

// The same followed by a per-channel affine map and a second activation on the pooled output:
// p = act2(s_by s[c] pool(act(conv(x) + bias)) + t[c]) (LeNet-5's trainable subsampling and its
// squashing, rounded as lenet_bl_affine_forward rounds them).
int lenet_bl_block_affine_forward(const float* x, const float* w, const float* bias, const float* s, float s_by,
                                  const float* t, float* p, float* kept, int Cin, int Hin, int Win, int pad, int Cout,
                                  int K, int B, int act, int pool, int k, int act2, const unsigned char* mask) {
    if (!s || !t) return -1;
    const std::vector<float> se = scaled(s, Cout, s_by);
    return block_forward(x, w, bias, se.data(), t, p, kept, Cin, Hin, Win, pad, Cout, K, B, act, pool, k, act2, mask);
}

// The kernel of an input gradient: w [Cout][Cin][K][K] flipped and transposed, [Cin][Cout][K][K] (the
// input gradient is the convolution of the padded output gradient with it).
static std::vector<float> flipped_weight(const float* w, int Cout, int Cin, int K) {
    const int kk = K * K;
    std::vector<float> f((std::size_t)Cout * Cin * kk);
    for (int co = 0; co < Cout; ++co)
        for (int ci = 0; ci < Cin; ++ci)
            for (int i = 0; i < kk; ++i)
                f[((std::size_t)ci * Cout + co) * kk + (kk - 1 - i)] = w[((std::size_t)co * Cin + ci) * kk + i];
    return f;
}

// A block's backward pass, given x, the parameters and gp (the gradient of the block's output):
// gw, gb (if not null) and gx (if not null). The activation is read from `kept` (written by
// lenet_bl_block_forward) or, without it, recomputed chunk by chunk (cheaper for a first layer:
// speed-notes.md sections 10e, 12).
static int block_backward(const float* x, const float* w, const float* bias, const float* s, const float* t,
                          const float* kept, const float* gp, float* gx, float* gw, float* gb,
                          float* gs, float* gt, int Cin, int Hin, int Win, int pad, int Cout, int K, int B,
                          int act, int pool, int k, int act2, const unsigned char* mask) {
    if (B % V || !supported(K) || !codes_ok(act, pool, k) || !act_ok(act2)
        || (kept && !pool) || (s && (!pool || !t || !gs || !gt))) return -1;
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int Hp = pool ? Ho / k : Ho, Wp = pool ? Wo / k : Wo;
    const int goff = gx ? K - 1 : 0, gcols = Wo + 2 * goff;
    const std::size_t nw = (std::size_t)Cout * Cin * K * K, na = s ? 2 * (std::size_t)Cout : 0;
    Partials part(nw + Cout + na);  // weight gradient, bias gradient, then (with s) the gradients of s and t
    const ConvMask cm = mask ? ConvMask{mask, Cin, 1} : ConvMask{};
    const std::vector<float> wflip = gx ? flipped_weight(w, Cout, Cin, K) : std::vector<float>{};
#pragma omp parallel num_threads(part.T)
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        std::vector<vec> acc(nw + Cout + na, vec{});  // weight, bias (, s, t) gradients, per lane
        std::vector<float> a_buf(kept ? 0 : (std::size_t)Cout * Ho * Wo * V), gz_buf((std::size_t)Cout * Ho * gcols * V);
        std::vector<float> p_buf(s ? (std::size_t)Cout * Hp * Wp * V : 0), gq_buf(p_buf.size());
        Map a = cmap(a_buf.data(), Cout, Ho, Wo, V), gz = cmap(gz_buf.data(), Cout, Ho, gcols, V);
        Map pooled = cmap(p_buf.data(), Cout, Hp, Wp, V), gpool = cmap(gq_buf.data(), Cout, Hp, Wp, V);
        for (int b0 = lo; b0 < hi; b0 += V) {
            Map in = cmap(x + b0, Cin, Hin, Win, B);
            if (kept) a = kept_chunk(kept, b0, Cout, Ho, Wo);
            else if (act != ACT_NONE || pool == POOL_MAX || s) conv_any(in, w, bias, a, K, pad, act, cm);  // else a is not needed
            Map g_out = cmap(gp + b0, Cout, Hp, Wp, B);
            if (s) {  // back through act2(s p + t): the pooled output again, then its gradient
                pool_chunk(a, pooled, k, pool == POOL_MAX);
                affine_backward_chunk(g_out, pooled, s, t, act2, gpool, acc.data() + nw + Cout, acc.data() + nw + 2 * Cout);
                g_out = gpool;
            }
            act_pool_backward_chunk(g_out, a, gz, goff, pool, k, act);
            wgrad_any(in, gz, K, goff, pad, acc.data(), cm);
            for (int c = 0; c < Cout; ++c)
                for (int y = 0; y < Ho; ++y)
                    for (int xx = 0; xx < Wo; ++xx) acc[nw + c] += load(gz.at(c, y, goff + xx));
            if (gx) conv_any(gz, wflip.data(), nullptr, cmap(gx + b0, Cin, Hin, Win, B), K, K - 1 - pad, ACT_NONE, cm.transposed(), goff);
        }
        part.add_lanes(acc, nw + Cout + na);
    }
    std::vector<float> total(nw + Cout + na);
    part.sum_into(total.data());
    std::copy(total.begin(), total.begin() + nw, gw);
    if (gb) std::copy(total.begin() + nw, total.begin() + nw + Cout, gb);
    if (s) {
        std::copy(total.begin() + nw + Cout, total.begin() + nw + 2 * Cout, gs);
        std::copy(total.begin() + nw + 2 * Cout, total.end(), gt);
    }
    return 0;
}

int lenet_bl_block_backward(const float* x, const float* w, const float* bias,
                            const float* kept, const float* gp, float* gx, float* gw, float* gb,
                            int Cin, int Hin, int Win, int pad, int Cout, int K, int B,
                            int act, int pool, int k, const unsigned char* mask) {
    return block_backward(x, w, bias, nullptr, nullptr, kept, gp, gx, gw, gb, nullptr, nullptr,
                          Cin, Hin, Win, pad, Cout, K, B, act, pool, k, ACT_NONE, mask);
}

// The backward pass of lenet_bl_block_affine_forward: also gs, gt (the gradients of s and t).
int lenet_bl_block_affine_backward(const float* x, const float* w, const float* bias, const float* s, float s_by,
                                   const float* t, const float* kept, const float* gp, float* gx, float* gw,
                                   float* gb, float* gs, float* gt, int Cin, int Hin, int Win, int pad, int Cout,
                                   int K, int B, int act, int pool, int k, int act2, const unsigned char* mask) {
    if (!s || !gs) return -1;
    const std::vector<float> se = scaled(s, Cout, s_by);
    const int rc = block_backward(x, w, bias, se.data(), t, kept, gp, gx, gw, gb, gs, gt,
                                  Cin, Hin, Win, pad, Cout, K, B, act, pool, k, act2, mask);
    for (int c = 0; c < Cout; ++c) gs[c] *= s_by;  // the gradient of s itself, not of s_by s
    return rc;
}

// A per-channel affine map, activation and pooling on a [C][H][W][B] tensor: p = pool(act(s[c] z + t[c])).
// With s and t from batch statistics this is BatchNorm (training mode) followed by the block's
// activation and pooling; with running statistics, the same in evaluation mode.
int lenet_bl_affine_forward(const float* z, const float* s, const float* t, float* p,
                            int C, int H, int W, int B, int act, int pool, int k) {
    if (B % V || !codes_ok(act, pool, k)) return -1;
    const int Hp = pool ? H / k : H, Wp = pool ? W / k : W;
    for_each_chunk(B, (std::size_t)C * H * W * V, [&](int b0, float* scratch) {
        affine_chunk(cmap(z + b0, C, H, W, B), s, t, cmap(scratch, C, H, W, V), cmap(p + b0, C, Hp, Wp, B), act, pool, k);
    });
    return 0;
}

// The same after a convolution computed chunk by chunk and never stored: p = pool(act(s conv(x) + t)),
// with s z + t rounded exactly as lenet_bl_conv_bn_backward recomputes it, so that both passes pick
// the same maximum of every pooling window.
int lenet_bl_conv_affine_forward(const float* x, const float* w, const float* bias, const float* s, const float* t,
                                 float* p, int Cin, int Hin, int Win, int pad, int Cout, int K, int B,
                                 int act, int pool, int k) {
    if (B % V || !supported(K) || !codes_ok(act, pool, k))
        return -1;
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int Hp = pool ? Ho / k : Ho, Wp = pool ? Wo / k : Wo;
    for_each_chunk(B, (std::size_t)Cout * Ho * Wo * V, [&](int b0, float* scratch) {
        Map z = cmap(scratch, Cout, Ho, Wo, V);
        conv_any(cmap(x + b0, Cin, Hin, Win, B), w, bias, z, K, pad, ACT_NONE);
        affine_chunk(z, s, t, z, cmap(p + b0, Cout, Hp, Wp, B), act, pool, k);  // (in place in the scratch)
    });
    return 0;
}

// Its backward pass, given z, s, t and gp (the gradient of p): gz = s g, gs = sum g z and
// gt = sum g over every position and example, where g is the gradient of s z + t (the activation
// recomputed chunk by chunk, as in the blocks).
int lenet_bl_affine_backward(const float* z, const float* s, const float* t, const float* gp,
                             float* gz, float* gs, float* gt, int C, int H, int W, int B, int act, int pool, int k) {
    if (B % V || !codes_ok(act, pool, k)) return -1;
    const int Hp = pool ? H / k : H, Wp = pool ? W / k : W;
    Partials part(2 * (std::size_t)C);  // gs, then gt
#pragma omp parallel num_threads(part.T)
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        std::vector<vec> acc(2 * (std::size_t)C, vec{});
        std::vector<float> a_buf((std::size_t)C * H * W * V), g_buf((std::size_t)C * H * W * V);
        Map a = cmap(a_buf.data(), C, H, W, V), g = cmap(g_buf.data(), C, H, W, V);
        for (int b0 = lo; b0 < hi; b0 += V) {
            Map in = cmap(z + b0, C, H, W, B), out = cmap(gz + b0, C, H, W, B);
            for (int c = 0; c < C; ++c) {
                const vec sv = splat(s[c]), tv = splat(t[c]);
                for (int y = 0; y < H; ++y)
                    for (int x = 0; x < W; ++x) store(a.at(c, y, x), activate(load(in.at(c, y, x)) * sv + tv, act));
            }
            act_pool_backward_chunk(cmap(gp + b0, C, Hp, Wp, B), a, g, 0, pool, k, act);
            for (int c = 0; c < C; ++c) {
                const vec sv = splat(s[c]);
                vec sz = vec{}, sg = vec{};
                for (int y = 0; y < H; ++y)
                    for (int x = 0; x < W; ++x) {
                        const vec gv = load(g.at(c, y, x));
                        sz += gv * load(in.at(c, y, x));
                        sg += gv;
                        store(out.at(c, y, x), gv * sv);
                    }
                acc[c] += sz;
                acc[C + c] += sg;
            }
        }
        part.add_lanes(acc, 2 * (std::size_t)C);
    }
    std::vector<float> total(2 * (std::size_t)C);
    part.sum_into(total.data());
    std::copy(total.begin(), total.begin() + C, gs);
    std::copy(total.begin() + C, total.end(), gt);
    return 0;
}

// Per-channel mean and variance (biased, as BatchNorm normalises) of z [C][H][W][B] over every
// position and the first n lanes: sums in float per chunk, then in double.
int lenet_bl_channel_stats(const float* z, int C, int H, int W, int B, int n, double* mean, double* var) {
    if (B % V || n < 1 || n > B) return -1;
    ThreadSums sums(2 * (std::size_t)C);
#pragma omp parallel num_threads(sums.T())
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        for (int b0 = lo; b0 < hi && b0 < n; b0 += V)
            add_channel_sums(cmap(z + b0, C, H, W, B), lane_mask(b0, n), sums.mine());
    }
    mean_and_var(sums.total(), (double)n * H * W, mean, var);
    return 0;
}

// The backward pass of BatchNorm + activation + pooling: see bn_window above.
int lenet_bl_bn_backward(const float* z, const float* s, const float* t, const float* mean, const float* rstd,
                         const float* gp, float* gz, float* ggamma, float* gbeta,
                         int C, int H, int W, int B, int n, int act, int pool, int k) {
    if (B % V || n < 1 || n > B || !codes_ok(act, pool, k)
        || (pool && k != 2 && k != 3)) return -1;  // windows of 2 or 3 compiled in
    const int Hp = pool ? H / k : H, Wp = pool ? W / k : W;
    ThreadSums sums(2 * (std::size_t)C);  // sum g, sum g z
    std::vector<BnChannel> chs(C);
    for (int c = 0; c < C; ++c) chs[c] = BnChannel{splat(s[c]), splat(t[c]), vec{}, vec{}, vec{}};
#pragma omp parallel num_threads(sums.T())
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        std::vector<vec> mine(2 * (std::size_t)C, vec{});
        for (int b0 = lo; b0 < hi && b0 < n; b0 += V)  // pass 1 (padded lanes have gp = 0, so g = 0)
            bn_chunk<false>(cmap(z + b0, C, H, W, B), cmap(gp + b0, C, Hp, Wp, B), Map{}, chs, pool, k, act, mine.data());
        bn_reduce(mine, sums, s, mean, rstd, (double)n * H * W, chs, ggamma, gbeta);
        std::vector<BnChannel> mine_chs(chs);
        for (int b0 = lo; b0 < hi; b0 += V) {  // pass 2
            const vec m = lane_mask(b0, n);
            for (auto& ch : mine_chs) ch.mask = m;
            bn_chunk<true>(cmap(z + b0, C, H, W, B), cmap(gp + b0, C, Hp, Wp, B), cmap(gz + b0, C, H, W, B), mine_chs,
                           pool, k, act, nullptr);
        }
    }
    return 0;
}

// ---- A BatchNorm block whose convolution is cheaper to recompute than to store ------------------
//
// A first layer (one input channel) computes few multiply-adds per output but writes a large
// output: storing conv1's output costs more (it goes to memory at a 1 KB stride) than computing it
// again in the core's cache. These two entries never store it: the statistics pass computes the
// convolution chunk by chunk and sums it; the forward pass (lenet_bl_conv_affine_forward, above)
// convolves chunk by chunk and normalises in the chunk's scratch; the backward pass
// recomputes the convolution twice, once to sum g and g z and once to form gz in the chunk's
// scratch buffer, from which the weight (and input) gradients are taken as in a block's backward.

int lenet_bl_conv_stats(const float* x, const float* w, const float* bias, int Cin, int Hin, int Win, int pad,
                        int Cout, int K, int B, int n, double* mean, double* var) {
    if (B % V || !supported(K) || n < 1 || n > B) return -1;
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    ThreadSums sums(2 * (std::size_t)Cout);
#pragma omp parallel num_threads(sums.T())
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        std::vector<float> z_buf((std::size_t)Cout * Ho * Wo * V);
        Map z = cmap(z_buf.data(), Cout, Ho, Wo, V);
        for (int b0 = lo; b0 < hi && b0 < n; b0 += V) {
            conv_any(cmap(x + b0, Cin, Hin, Win, B), w, bias, z, K, pad, ACT_NONE);
            add_channel_sums(z, lane_mask(b0, n), sums.mine());
        }
    }
    mean_and_var(sums.total(), (double)n * Ho * Wo, mean, var);
    return 0;
}

int lenet_bl_conv_bn_backward(const float* x, const float* w, const float* bias,
                              const float* s, const float* t, const float* mean, const float* rstd, const float* gp,
                              float* gx, float* gw, float* gb, float* ggamma, float* gbeta,
                              int Cin, int Hin, int Win, int pad, int Cout, int K, int B, int n,
                              int act, int pool, int k) {
    if (B % V || !supported(K) || n < 1 || n > B || !codes_ok(act, pool, k) || (pool && k != 2 && k != 3)) return -1;
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int Hp = pool ? Ho / k : Ho, Wp = pool ? Wo / k : Wo;
    const int goff = gx ? K - 1 : 0, gcols = Wo + 2 * goff;
    const std::size_t nw = (std::size_t)Cout * Cin * K * K;
    ThreadSums sums(2 * (std::size_t)Cout);
    std::vector<BnChannel> chs(Cout);
    for (int c = 0; c < Cout; ++c) chs[c] = BnChannel{splat(s[c]), splat(t[c]), vec{}, vec{}, vec{}};
    Partials part(nw + Cout);  // weight gradient, then bias gradient
    const std::vector<float> wflip = gx ? flipped_weight(w, Cout, Cin, K) : std::vector<float>{};
#pragma omp parallel num_threads(part.T)
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        std::vector<float> z_buf((std::size_t)Cout * Ho * Wo * V), gz_buf((std::size_t)Cout * Ho * gcols * V);
        Map z = cmap(z_buf.data(), Cout, Ho, Wo, V), gz = cmap(gz_buf.data(), Cout, Ho, gcols, V);
        Map gz_at = cmap(gz_buf.data() + (std::size_t)goff * V, Cout, Ho, gcols, V);  // column goff of gz
        std::vector<vec> mine(2 * (std::size_t)Cout, vec{}), acc(nw + Cout, vec{});
        for (int b0 = lo; b0 < hi && b0 < n; b0 += V) {  // pass 1
            conv_any(cmap(x + b0, Cin, Hin, Win, B), w, bias, z, K, pad, ACT_NONE);
            bn_chunk<false>(z, cmap(gp + b0, Cout, Hp, Wp, B), Map{}, chs, pool, k, act, mine.data());
        }
        bn_reduce(mine, sums, s, mean, rstd, (double)n * Ho * Wo, chs, ggamma, gbeta);
        std::vector<BnChannel> mine_chs(chs);
        for (int b0 = lo; b0 < hi && b0 < n; b0 += V) {  // pass 2 (lanes past n: no example, no gradient)
            Map in = cmap(x + b0, Cin, Hin, Win, B);
            conv_any(in, w, bias, z, K, pad, ACT_NONE);
            const vec m = lane_mask(b0, n);
            for (auto& ch : mine_chs) ch.mask = m;
            bn_chunk<true>(z, cmap(gp + b0, Cout, Hp, Wp, B), gz_at, mine_chs, pool, k, act, nullptr);
            wgrad_any(in, gz, K, goff, pad, acc.data());
            for (int c = 0; c < Cout; ++c)
                for (int y = 0; y < Ho; ++y)
                    for (int xx = 0; xx < Wo; ++xx) acc[nw + c] += load(gz.at(c, y, goff + xx));
            if (gx) conv_any(gz, wflip.data(), nullptr, cmap(gx + b0, Cin, Hin, Win, B), K, K - 1 - pad, ACT_NONE, {}, goff);
        }
        if (gx)  // chunks wholly past n: zero input gradient
            for (int b0 = std::max(lo, (n + V - 1) / V * V); b0 < hi; b0 += V) {
                Map g = cmap(gx + b0, Cin, Hin, Win, B);
                for (int c = 0; c < Cin; ++c)
                    for (int y = 0; y < Hin; ++y)
                        for (int xx = 0; xx < Win; ++xx) store(g.at(c, y, xx), vec{});
            }
        part.add_lanes(acc, nw + Cout);
    }
    part.sum_split(gw, nw, gb);
    return 0;
}

// uint8 images [N][H][W] to the layout: out [H][W + 2p][B] = x / 255 (PyTorch's x.float() / 255,
// a true division, bit for bit), zero in the p padding columns each side and in lanes N..B-1. One
// pass: each 16-lane vector is gathered from 16 images that stay in L1 while the chunk is written.
int lenet_bl_images(const unsigned char* x, float* out, int N, int H, int W, int p, int B) {
    if (B % V || N < 0 || N > B || p < 0) return -1;
    const int Wp = W + 2 * p;
    const std::size_t image = (std::size_t)H * W;
#pragma omp parallel
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        for (int b0 = lo; b0 < hi; b0 += V) {
            const int n = std::min(V, std::max(0, N - b0));  // real images in this chunk
            const unsigned char* first = n ? x + (std::size_t)b0 * image : x;
            for (int r = 0; r < H; ++r)
                for (int c = 0; c < Wp; ++c) {
                    vec v = vec{};
                    if (c >= p && c < p + W) {
                        const unsigned char* px = first + (std::size_t)r * W + (c - p);
                        for (int l = 0; l < n; ++l) v[l] = (float)px[l * image];
                        v = v / splat(255.0f);
                    }
                    store(out + ((std::size_t)r * Wp + c) * B + b0, v);
                }
        }
    }
    return 0;
}

// y = act(W x + b): x [Fin][B], W [Fout][Fin] as stored (no transposed copy), y [Fout][B].
int lenet_bl_dense_forward(const float* x, const float* W, const float* bias, float* y,
                           int Fin, int Fout, int B, int act) {
    if (B % V || !act_ok(act)) return -1;
#pragma omp parallel
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        dense_lanes(x + lo, B, W, 1, Fin, bias, y + lo, B, Fin, Fout, hi - lo, act);
    }
    return 0;
}

// LeNet-5's output layer in the layout: RBF units y_k = sum_d (x_d - P_kd)^2 for x [D][B] and fixed
// prototypes P [K][D], written as out [K][B] = sign y (sign -1: the scores, the Negate after it).
int lenet_bl_rbf_forward(const float* x, const float* P, float* out, int D, int K, int B, float sign) {
    if (B % V) return -1;
#pragma omp parallel
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        for (int b0 = lo; b0 < hi; b0 += V)
            for (int k = 0; k < K; ++k) {
                const float* p = P + (std::size_t)k * D;
                vec acc = vec{};
                for (int d = 0; d < D; ++d) {
                    vec diff = load(x + (std::size_t)d * B + b0) - splat(p[d]);
                    acc += diff * diff;
                }
                store(out + (std::size_t)k * B + b0, acc * splat(sign));
            }
    }
    return 0;
}

// Its input gradient for g = d loss / d out [K][B]: gx_d = 2 sign (x_d sum_k g_k - sum_k g_k P_kd).
int lenet_bl_rbf_backward(const float* x, const float* P, const float* g, float* gx, int D, int K, int B,
                          float sign) {
    if (B % V) return -1;
#pragma omp parallel
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        for (int b0 = lo; b0 < hi; b0 += V) {
            vec total = vec{};
            for (int k = 0; k < K; ++k) total += load(g + (std::size_t)k * B + b0);
            for (int d = 0; d < D; ++d) {
                vec gp = vec{};
                for (int k = 0; k < K; ++k) gp += load(g + (std::size_t)k * B + b0) * splat(P[(std::size_t)k * D + d]);
                const std::size_t at = (std::size_t)d * B + b0;
                store(gx + at, (load(x + at) * total - gp) * splat(2.0f * sign));
            }
        }
    }
    return 0;
}

// LeNet-5's loss (the paper's equation 9; LeNet5.criterion in lenet/models/lenet5.py) for scores s,
// N x C row-major (the negative RBF penalties), and labels y: loss_n = -s[n][y_n] + log(e^-j +
// sum_c e^s[n][c]). Writes the mean over n to *loss and its gradient (e^s[n][c] / Z_n - [c = y_n]) / N
// (Z_n the sum in the log) to grad, N x C. One thread: 2,560 numbers at batch 256. -2 if a label is
// not in [0, C).
int lenet_bl_paper_loss(const float* s, const std::int64_t* y, float* loss, float* grad, int N, int C, float j) {
    if (N < 1 || C < 1) return -1;
    for (int n = 0; n < N; ++n)
        if (y[n] < 0 || y[n] >= C) return -2;
    double total = 0.0;
    const float share = 1.0f / (float)N;
    for (int n = 0; n < N; ++n) {
        const float* row = s + (std::size_t)n * C;
        float* g = grad + (std::size_t)n * C;
        float m = -j;  // the largest exponent, subtracted from every one (written so that NaN stays out of it)
        for (int c = 0; c < C; ++c) m = row[c] > m ? row[c] : m;
        float z = std::exp(-j - m);
        for (int c0 = 0; c0 < C; c0 += V) {  // e^(s - m), 16 classes at a time
            const int w = std::min(V, C - c0);
            float buf[V];
            for (int i = 0; i < V; ++i) buf[i] = i < w ? row[c0 + i] - m : -EXP_LIMIT;
            store(buf, vexp(load(buf)));
            for (int i = 0; i < w; ++i) {
                g[c0 + i] = buf[i];
                z += buf[i];
            }
        }
        total += (double)(m + std::log(z) - row[y[n]]);
        const float scale = share / z;
        for (int c = 0; c < C; ++c) g[c] *= scale;
        g[y[n]] -= share;
    }
    *loss = (float)(total / N);
    return 0;
}

// Backward of y = act(W x + b) given y and its gradient gy, except the weight gradient: gz (the
// gradient before the activation, [Fout][B]), gb (if not null) and gx = W^T gz (if not null; W
// [Fout][Fin] as stored, read as its transpose). The weight
// gradient gz x^T is a plain matrix product that lenet/kernels/ops.py leaves to PyTorch's BLAS: here
// it would need a horizontal sum per weight over only 128 lanes per thread.
int lenet_bl_dense_backward(const float* W, const float* y, const float* gy, float* gz,
                            float* gx, float* gb, int Fin, int Fout, int B, int act) {
    if (B % V || !act_ok(act)) return -1;
    Partials part(Fout);
#pragma omp parallel num_threads(part.T)
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        float* mine = part.mine();
        for (int o = 0; o < Fout; ++o) {
            vec bs = vec{};
            for (int l = lo; l < hi; l += V) {
                const std::size_t at = (std::size_t)o * B + l;
                vec g = load(gy + at) * activation_grad(load(y + at), act);
                store(gz + at, g);
                bs += g;
            }
            float s = 0.0f;
            for (int k = 0; k < V; ++k) s += bs[k];
            mine[o] += s;
        }
        if (gx && hi > lo) dense_lanes(gz + lo, B, W, Fin, 1, nullptr, gx + lo, B, Fout, Fin, hi - lo, ACT_NONE);
    }
    if (gb) part.sum_into(gb);
    return 0;
}

}  // extern "C"
