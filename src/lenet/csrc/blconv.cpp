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
// Built at first use by lenet/blconv.py with `g++ -O3 -march=native -fopenmp`; plain C ABI.

#include <algorithm>
#include <cstddef>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vec __attribute__((vector_size(64)));             // 16 floats
typedef float uvec __attribute__((vector_size(64), aligned(4)));  // the same, any alignment

static inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
static inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
static inline vec splat(float s) { return vec{} + s; }
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
// scaling by 2^n through the exponent bits); relative error ~1e-7 over the clamped range.
typedef int ivec __attribute__((vector_size(64)));
static inline vec vexp(vec x) {
    x = x < 88.3762626647949f ? x : splat(88.3762626647949f);
    x = x > -88.3762626647949f ? x : splat(-88.3762626647949f);
    vec fx = x * 1.44269504088896341f + 0.5f;
    ivec n = __builtin_convertvector(fx, ivec);              // truncates toward zero ...
    vec fn = __builtin_convertvector(n, vec);
    ivec fix = fn > fx;                                      // ... so step down where that rounded up
    n += fix;                                                // (true lanes are -1)
    fn = __builtin_convertvector(n, vec);
    x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    vec y = splat(1.9875691500e-4f);
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    ivec bits = (n + 127) << 23;
    vec scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

// Activations applied as a convolution's output is stored, and their derivatives written in terms
// of the output a (what the backward pass keeps): sigmoid' = a(1-a), tanh' = 1-a^2, relu' = [a>0].
enum { ACT_NONE = 0, ACT_SIGMOID = 1, ACT_TANH = 2, ACT_RELU = 3 };

static inline vec activate(vec z, int act) {
    switch (act) {
        case ACT_SIGMOID: return 1.0f / (1.0f + vexp(-z));
        case ACT_TANH: return 2.0f / (1.0f + vexp(-2.0f * z)) - 1.0f;
        case ACT_RELU: return z > 0.0f ? z : splat(0.0f);
        default: return z;
    }
}

static inline vec activation_grad(vec a, int act) {
    switch (act) {
        case ACT_SIGMOID: return a * (1.0f - a);
        case ACT_TANH: return 1.0f - a * a;
        case ACT_RELU: return a > 0.0f ? splat(1.0f) : splat(0.0f);
        default: return splat(1.0f);
    }
}

// Output columns per register block: accumulators (xb * cob) + one input row window (xb + K - 1)
// + one broadcast weight must fit in ~30 of the 32 vector registers.
template <int K, int COB> constexpr int fwd_xb() {
    return (30 - (K - 1)) / (COB + 1) < 1 ? 1 : (30 - (K - 1)) / (COB + 1);
}

// One block: COB output channels x XB output columns of one output row, for 16 examples.
template <int K, int COB, int XB>
static inline void fwd_block(const float* in, const float* w, const float* bias, float* out,
                             int Cin, int Hin, int Win, int pad, int Ho, int Wo, int B,
                             int b0, int co0, int y, int x0, int act) {
    vec acc[XB][COB];
    for (int co = 0; co < COB; ++co) {
        vec bv = splat(bias ? bias[co0 + co] : 0.0f);
        for (int xo = 0; xo < XB; ++xo) acc[xo][co] = bv;
    }
    const int ky_lo = std::max(0, pad - y), ky_hi = std::min(K, Hin + pad - y);
    const std::size_t wstride = (std::size_t)Cin * K * K;
    for (int ci = 0; ci < Cin; ++ci) {
        for (int ky = ky_lo; ky < ky_hi; ++ky) {
            const float* row = in + (((std::size_t)ci * Hin + (y + ky - pad)) * Win + x0) * B + b0;
            vec iv[XB + K - 1];
            for (int p = 0; p < XB + K - 1; ++p) iv[p] = load(row + (std::size_t)p * B);
            const float* wp = w + (std::size_t)co0 * wstride + ((std::size_t)ci * K + ky) * K;
            for (int kx = 0; kx < K; ++kx)
                for (int co = 0; co < COB; ++co) {
                    vec wv = splat(wp[co * wstride + kx]);
                    for (int xo = 0; xo < XB; ++xo) acc[xo][co] += wv * iv[xo + kx];
                }
        }
    }
    for (int co = 0; co < COB; ++co)
        for (int xo = 0; xo < XB; ++xo)
            store(out + ((((std::size_t)(co0 + co)) * Ho + y) * Wo + x0 + xo) * B + b0, activate(acc[xo][co], act));
}

template <int K, int COB>
static void fwd(const float* in, const float* w, const float* bias, float* out,
                int Cin, int Hin, int Win, int pad, int Cout, int B, int act) {
    constexpr int XB = fwd_xb<K, COB>();
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int nco = Cout / COB;
    const int full = Wo / XB * XB;
#pragma omp parallel
    {
        int lo, hi;
        my_lanes(B, lo, hi);
        for (int b0 = lo; b0 < hi; b0 += V)
            for (int cb = 0; cb < nco; ++cb)
                for (int y = 0; y < Ho; ++y) {
                    for (int x0 = 0; x0 < full; x0 += XB)
                        fwd_block<K, COB, XB>(in, w, bias, out, Cin, Hin, Win, pad, Ho, Wo, B, b0, cb * COB, y, x0, act);
                    for (int x0 = full; x0 < Wo; ++x0)
                        fwd_block<K, COB, 1>(in, w, bias, out, Cin, Hin, Win, pad, Ho, Wo, B, b0, cb * COB, y, x0, act);
                }
    }
}

// Weight gradient: gw[co][ci][ky][kx] = sum_{y,x,b} g[co][y][x][b] * in[ci][y+ky-pad][x+kx][b].
// Each thread sums over its own lanes into its own copy of gw; the copies are added at the end (in
// thread order: the result is deterministic for a given thread count). Within a thread, one item
// = COB output channels x one (ci, ky): COB x K accumulators of 16 lanes each.
template <int K> constexpr int wgrad_cob_max() { return 29 / (K + 1) > 7 ? 7 : 29 / (K + 1); }

template <int K, int COB>
static void wgrad(const float* in, const float* g, float* gw,
                  int Cin, int Hin, int Win, int pad, int Cout, int B, int gcols, int goff) {
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int nco = Cout / COB;
    const std::size_t nw = (std::size_t)Cout * Cin * K * K;
#ifdef _OPENMP
    const int T = omp_get_max_threads();
#else
    const int T = 1;
#endif
    std::vector<float> part((std::size_t)T * nw, 0.0f);
#pragma omp parallel num_threads(T)
    {
        int lo, hi;
        my_lanes(B, lo, hi);
#ifdef _OPENMP
        float* mine = part.data() + (std::size_t)omp_get_thread_num() * nw;
#else
        float* mine = part.data();
#endif
        const std::size_t gstride = (std::size_t)Ho * gcols * B;
        for (int cb = 0; cb < nco; ++cb)
            for (int ci = 0; ci < Cin; ++ci)
                for (int ky = 0; ky < K; ++ky) {
                    vec acc[COB][K];
                    for (int co = 0; co < COB; ++co)
                        for (int kx = 0; kx < K; ++kx) acc[co][kx] = vec{};
                    const int co0 = cb * COB;
                    for (int b0 = lo; b0 < hi; b0 += V)
                        for (int y = std::max(0, pad - ky); y < std::min(Ho, Hin + pad - ky); ++y) {
                            const float* irow = in + (((std::size_t)ci * Hin + (y + ky - pad)) * Win) * B + b0;
                            const float* grow = g + (((std::size_t)co0 * Ho + y) * gcols + goff) * B + b0;
                            for (int x = 0; x < Wo; ++x) {
                                vec gv[COB];
                                for (int co = 0; co < COB; ++co) gv[co] = load(grow + co * gstride + (std::size_t)x * B);
                                for (int kx = 0; kx < K; ++kx) {
                                    vec iv = load(irow + (std::size_t)(x + kx) * B);
                                    for (int co = 0; co < COB; ++co) acc[co][kx] += gv[co] * iv;
                                }
                            }
                        }
                    for (int co = 0; co < COB; ++co)
                        for (int kx = 0; kx < K; ++kx) {
                            float s = 0.0f;
                            for (int l = 0; l < V; ++l) s += acc[co][kx][l];
                            mine[(((std::size_t)(co0 + co) * Cin + ci) * K + ky) * K + kx] = s;
                        }
                }
    }
    for (std::size_t i = 0; i < nw; ++i) {
        float s = 0.0f;
        for (int t = 0; t < T; ++t) s += part[(std::size_t)t * nw + i];
        gw[i] = s;
    }
}

// ---- dispatch: the largest channel block (<= the register budget) that divides Cout ----------

template <int K>
static int fwd_k(const float* in, const float* w, const float* bias, float* out,
                 int Cin, int Hin, int Win, int pad, int Cout, int B, int act) {
    for (int cob = 8; cob >= 1; --cob) {
        if (Cout % cob) continue;
        switch (cob) {
            case 8: fwd<K, 8>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
            case 7: fwd<K, 7>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
            case 6: fwd<K, 6>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
            case 5: fwd<K, 5>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
            case 4: fwd<K, 4>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
            case 3: fwd<K, 3>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
            case 2: fwd<K, 2>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
            default: fwd<K, 1>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act); return 0;
        }
    }
    return -1;
}

template <int K>
static int wgrad_k(const float* in, const float* g, float* gw,
                   int Cin, int Hin, int Win, int pad, int Cout, int B, int gcols, int goff) {
    for (int cob = wgrad_cob_max<K>(); cob >= 1; --cob) {
        if (Cout % cob) continue;
        switch (cob) {
            case 7: if constexpr (wgrad_cob_max<K>() >= 7) { wgrad<K, 7>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff); return 0; } break;
            case 6: if constexpr (wgrad_cob_max<K>() >= 6) { wgrad<K, 6>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff); return 0; } break;
            case 5: if constexpr (wgrad_cob_max<K>() >= 5) { wgrad<K, 5>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff); return 0; } break;
            case 4: if constexpr (wgrad_cob_max<K>() >= 4) { wgrad<K, 4>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff); return 0; } break;
            case 3: if constexpr (wgrad_cob_max<K>() >= 3) { wgrad<K, 3>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff); return 0; } break;
            case 2: wgrad<K, 2>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff); return 0;
            default: wgrad<K, 1>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff); return 0;
        }
    }
    return -1;
}

// ---- pooling (k x k windows, stride k, floor) and the backward of activation + pooling ---------

static void pool_forward(const float* a, float* p, int C, int H, int W, int B, int k, bool is_max) {
    const int Hp = H / k, Wp = W / k;
    const float inv = 1.0f / (k * k);
#pragma omp parallel
    {
    int lo, hi;
    my_lanes(B, lo, hi);
    for (int c = 0; c < C; ++c)
        for (int i = 0; i < Hp; ++i)
            for (int j = 0; j < Wp; ++j)
                for (int b0 = lo; b0 < hi; b0 += V) {
                    const float* base = a + (((std::size_t)c * H + i * k) * W + j * k) * B + b0;
                    vec s = load(base);
                    for (int di = 0; di < k; ++di)
                        for (int dj = (di == 0); dj < k; ++dj) {
                            vec v = load(base + ((std::size_t)di * W + dj) * B);
                            s = is_max ? (v > s ? v : s) : s + v;
                        }
                    store(p + (((std::size_t)c * Hp + i) * Wp + j) * B + b0, is_max ? s : s * inv);
                }
    }
}

// gz = (gradient of the pooled output routed back through the pool) * act'(a), written into rows
// of gcols columns starting at column goff; every other column of gz is set to zero. Average
// pooling spreads the gradient evenly; max pooling sends it to the first maximum of each window in
// row-major order (what PyTorch's max_pool2d does); cells outside the pooled area get zero.
static void act_pool_backward(const float* gp, const float* a, const float* p, float* gz,
                              int C, int H, int W, int B, int k, int pool, int act, int gcols, int goff) {
    const int Hp = k ? H / k : H, Wp = k ? W / k : W;
    const float inv = k ? 1.0f / (k * k) : 1.0f;
#pragma omp parallel
    {
    int lo, hi;
    my_lanes(B, lo, hi);
    for (int c = 0; c < C; ++c)
        for (int y = 0; y < H; ++y) {
            float* grow = gz + ((std::size_t)c * H + y) * gcols * B;
            for (int x = 0; x < goff; ++x)
                for (int b0 = lo; b0 < hi; b0 += V) store(grow + (std::size_t)x * B + b0, vec{});
            for (int x = goff + W; x < gcols; ++x)
                for (int b0 = lo; b0 < hi; b0 += V) store(grow + (std::size_t)x * B + b0, vec{});
            const float* arow = a + ((std::size_t)c * H + y) * W * B;
            for (int x = 0; x < W; ++x)
                for (int b0 = lo; b0 < hi; b0 += V) {
                    vec av = load(arow + (std::size_t)x * B + b0);
                    vec g = vec{};
                    if (pool == 0) {
                        g = load(gp + (((std::size_t)c * H + y) * W + x) * B + b0);
                    } else if (y < Hp * k && x < Wp * k) {
                        const int i = y / k, j = x / k;
                        const std::size_t at = (((std::size_t)c * Hp + i) * Wp + j) * B + b0;
                        g = load(gp + at);
                        if (pool == 1) {
                            g = g * inv;
                        } else {  // max: is (y, x) the first position in its window holding the max?
                            vec m = load(p + at);
                            ivec mine = av == m, earlier = ivec{};
                            for (int di = 0; di < k; ++di)
                                for (int dj = 0; dj < k; ++dj) {
                                    const int yy = i * k + di, xx = j * k + dj;
                                    if (yy * W + xx >= y * W + x) continue;
                                    earlier |= load(a + (((std::size_t)c * H + yy) * W + xx) * B + b0) == m;
                                }
                            g = (mine & ~earlier) ? g : vec{};
                        }
                    }
                    store(grow + (std::size_t)(goff + x) * B + b0, g * activation_grad(av, act));
                }
        }
    }
}

extern "C" {

// p: [C][H/k][W/k][B], average (is_max 0) or maximum (1) of each k x k window of a: [C][H][W][B].
int lenet_bl_pool_forward(const float* a, float* p, int C, int H, int W, int B, int k, int is_max) {
    if (B % V || k < 1) return -1;
    pool_forward(a, p, C, H, W, B, k, is_max != 0);
    return 0;
}

// pool: 0 none (gp has a's shape), 1 average, 2 maximum (p: the pooled output); act as above.
int lenet_bl_act_pool_backward(const float* gp, const float* a, const float* p, float* gz,
                               int C, int H, int W, int B, int k, int pool, int act, int gcols, int goff) {
    if (B % V || pool < 0 || pool > 2 || (pool && k < 1) || gcols < goff + W) return -1;
    act_pool_backward(gp, a, p, gz, C, H, W, B, pool ? k : 0, pool, act, gcols, goff);
    return 0;
}

// Kernel sizes compiled in; lenet/blconv.py reads this to decide which layers can use the kernels.
int lenet_blconv_kernel_sizes(int* out, int n) {
    const int ks[] = {1, 3, 5, 7};
    for (int i = 0; i < n && i < 4; ++i) out[i] = ks[i];
    return 4;
}

// Returns 0 on success, -1 for an unsupported kernel size or a batch that is not a multiple of 16.
int lenet_blconv_forward(const float* in, const float* w, const float* bias, float* out,
                         int Cin, int Hin, int Win, int pad, int Cout, int K, int B, int act) {
    if (B % V || act < ACT_NONE || act > ACT_RELU) return -1;
    switch (K) {
        case 1: return fwd_k<1>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act);
        case 3: return fwd_k<3>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act);
        case 5: return fwd_k<5>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act);
        case 7: return fwd_k<7>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B, act);
        default: return -1;
    }
}

int lenet_blconv_weight_grad(const float* in, const float* g, float* gw,
                             int Cin, int Hin, int Win, int pad, int Cout, int K, int B, int gcols, int goff) {
    if (B % V) return -1;
    switch (K) {
        case 1: return wgrad_k<1>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff);
        case 3: return wgrad_k<3>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff);
        case 5: return wgrad_k<5>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff);
        case 7: return wgrad_k<7>(in, g, gw, Cin, Hin, Win, pad, Cout, B, gcols, goff);
        default: return -1;
    }
}

}  // extern "C"
