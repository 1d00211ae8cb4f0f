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

typedef float vec __attribute__((vector_size(64)));             // 16 floats
typedef float uvec __attribute__((vector_size(64), aligned(4)));  // the same, any alignment

static inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
static inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
static inline vec splat(float s) { return vec{} + s; }
static const int V = 16;

// Output columns per register block: accumulators (xb * cob) + one input row window (xb + K - 1)
// + one broadcast weight must fit in ~30 of the 32 vector registers.
template <int K, int COB> constexpr int fwd_xb() {
    return (30 - (K - 1)) / (COB + 1) < 1 ? 1 : (30 - (K - 1)) / (COB + 1);
}

// One block: COB output channels x XB output columns of one output row, for 16 examples.
template <int K, int COB, int XB>
static inline void fwd_block(const float* in, const float* w, const float* bias, float* out,
                             int Cin, int Hin, int Win, int pad, int Ho, int Wo, int B,
                             int b0, int co0, int y, int x0) {
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
            store(out + ((((std::size_t)(co0 + co)) * Ho + y) * Wo + x0 + xo) * B + b0, acc[xo][co]);
}

template <int K, int COB>
static void fwd(const float* in, const float* w, const float* bias, float* out,
                int Cin, int Hin, int Win, int pad, int Cout, int B) {
    constexpr int XB = fwd_xb<K, COB>();
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int nb = B / V, nco = Cout / COB;
    const int full = Wo / XB * XB;
#pragma omp parallel for collapse(3) schedule(static)
    for (int bi = 0; bi < nb; ++bi)
        for (int cb = 0; cb < nco; ++cb)
            for (int y = 0; y < Ho; ++y) {
                for (int x0 = 0; x0 < full; x0 += XB)
                    fwd_block<K, COB, XB>(in, w, bias, out, Cin, Hin, Win, pad, Ho, Wo, B, bi * V, cb * COB, y, x0);
                for (int x0 = full; x0 < Wo; ++x0)
                    fwd_block<K, COB, 1>(in, w, bias, out, Cin, Hin, Win, pad, Ho, Wo, B, bi * V, cb * COB, y, x0);
            }
}

// Weight gradient: gw[co][ci][ky][kx] = sum_{y,x,b} g[co][y][x][b] * in[ci][y+ky-pad][x+kx][b].
// One work item = COB output channels x one (ci, ky): COB x K accumulators, each 16 partial sums
// over the batch lanes, reduced at the end. Items write disjoint parts of gw: no locks, no atomics.
template <int K> constexpr int wgrad_cob_max() { return 29 / (K + 1) > 7 ? 7 : 29 / (K + 1); }

template <int K, int COB>
static void wgrad(const float* in, const float* g, float* gw,
                  int Cin, int Hin, int Win, int pad, int Cout, int B) {
    const int Ho = Hin + 2 * pad - K + 1, Wo = Win - K + 1;
    const int nco = Cout / COB;
#pragma omp parallel for collapse(3) schedule(static)
    for (int cb = 0; cb < nco; ++cb)
        for (int ci = 0; ci < Cin; ++ci)
            for (int ky = 0; ky < K; ++ky) {
                vec acc[COB][K];
                for (int co = 0; co < COB; ++co)
                    for (int kx = 0; kx < K; ++kx) acc[co][kx] = vec{};
                const int co0 = cb * COB;
                for (int b0 = 0; b0 < B; b0 += V)
                    for (int y = std::max(0, pad - ky); y < std::min(Ho, Hin + pad - ky); ++y) {
                        const float* irow = in + (((std::size_t)ci * Hin + (y + ky - pad)) * Win) * B + b0;
                        const float* grow = g + (((std::size_t)co0 * Ho + y) * Wo) * B + b0;
                        const std::size_t gstride = (std::size_t)Ho * Wo * B;
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
                        gw[(((std::size_t)(co0 + co) * Cin + ci) * K + ky) * K + kx] = s;
                    }
            }
}

// ---- dispatch: the largest channel block (<= the register budget) that divides Cout ----------

template <int K>
static int fwd_k(const float* in, const float* w, const float* bias, float* out,
                 int Cin, int Hin, int Win, int pad, int Cout, int B) {
    for (int cob = 8; cob >= 1; --cob) {
        if (Cout % cob) continue;
        switch (cob) {
            case 8: fwd<K, 8>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
            case 7: fwd<K, 7>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
            case 6: fwd<K, 6>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
            case 5: fwd<K, 5>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
            case 4: fwd<K, 4>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
            case 3: fwd<K, 3>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
            case 2: fwd<K, 2>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
            default: fwd<K, 1>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B); return 0;
        }
    }
    return -1;
}

template <int K>
static int wgrad_k(const float* in, const float* g, float* gw,
                   int Cin, int Hin, int Win, int pad, int Cout, int B) {
    for (int cob = wgrad_cob_max<K>(); cob >= 1; --cob) {
        if (Cout % cob) continue;
        switch (cob) {
            case 7: if constexpr (wgrad_cob_max<K>() >= 7) { wgrad<K, 7>(in, g, gw, Cin, Hin, Win, pad, Cout, B); return 0; } break;
            case 6: if constexpr (wgrad_cob_max<K>() >= 6) { wgrad<K, 6>(in, g, gw, Cin, Hin, Win, pad, Cout, B); return 0; } break;
            case 5: if constexpr (wgrad_cob_max<K>() >= 5) { wgrad<K, 5>(in, g, gw, Cin, Hin, Win, pad, Cout, B); return 0; } break;
            case 4: if constexpr (wgrad_cob_max<K>() >= 4) { wgrad<K, 4>(in, g, gw, Cin, Hin, Win, pad, Cout, B); return 0; } break;
            case 3: if constexpr (wgrad_cob_max<K>() >= 3) { wgrad<K, 3>(in, g, gw, Cin, Hin, Win, pad, Cout, B); return 0; } break;
            case 2: wgrad<K, 2>(in, g, gw, Cin, Hin, Win, pad, Cout, B); return 0;
            default: wgrad<K, 1>(in, g, gw, Cin, Hin, Win, pad, Cout, B); return 0;
        }
    }
    return -1;
}

extern "C" {

// Kernel sizes compiled in; lenet/blconv.py reads this to decide which layers can use the kernels.
int lenet_blconv_kernel_sizes(int* out, int n) {
    const int ks[] = {1, 3, 5, 7};
    for (int i = 0; i < n && i < 4; ++i) out[i] = ks[i];
    return 4;
}

// Returns 0 on success, -1 for an unsupported kernel size or a batch that is not a multiple of 16.
int lenet_blconv_forward(const float* in, const float* w, const float* bias, float* out,
                         int Cin, int Hin, int Win, int pad, int Cout, int K, int B) {
    if (B % V) return -1;
    switch (K) {
        case 1: return fwd_k<1>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B);
        case 3: return fwd_k<3>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B);
        case 5: return fwd_k<5>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B);
        case 7: return fwd_k<7>(in, w, bias, out, Cin, Hin, Win, pad, Cout, B);
        default: return -1;
    }
}

int lenet_blconv_weight_grad(const float* in, const float* g, float* gw,
                             int Cin, int Hin, int Win, int pad, int Cout, int K, int B) {
    if (B % V) return -1;
    switch (K) {
        case 1: return wgrad_k<1>(in, g, gw, Cin, Hin, Win, pad, Cout, B);
        case 3: return wgrad_k<3>(in, g, gw, Cin, Hin, Win, pad, Cout, B);
        case 5: return wgrad_k<5>(in, g, gw, Cin, Hin, Win, pad, Cout, B);
        case 7: return wgrad_k<7>(in, g, gw, Cin, Hin, Win, pad, Cout, B);
        default: return -1;
    }
}

}  // extern "C"
