// Power-exponent quantization (PowerQuant / NUPES, PAPERS.md §2): quantize, dequantize, fake
// quantize forward and backward, and the lookup-table dequantize-GEMV of PowerQuantLinear. The
// operator and the packed layout (codes, scales, exponents, codebooks) are specified in
// rust/core/src/quant/mod.rs; rust/core/src/quant/cpu.rs is the CPU twin these kernels mirror, and
// rust/core/src/quant/cuda.rs the launcher.
//
// Entry points, for <t> in {f32, bf16, f16}:
//   quant_fwd_<t>            codes (quantize) or y (fake quantize), and the group scales
//   quant_deq_<t>            x̂ = scales · lut[field], lut from the exponents or the given codebooks
//   quant_deqtile<B>_<t>     the same for B-bit codes and aligned shapes (deq_tiled below)
//   quant_fake_bwd_<t>       dx and da (per-row sum in a fixed order, no atomics)
//   quant_linear_<t>_n<NT>   y = x @ Ŵᵀ + b, any bits / group / alignment (NT = 1, 2, 4, 8)
//   quant_lintile<B>_<t>_n<NT>  the same for B-bit codes and aligned shapes (linear_tiled below)
//   quant_linmma4_<t>_n<NT>  the same on the tensor cores, t in {bf16, f16}, 4-bit codes, n and
//                            group multiples of 128, NT = 8, 16 (linear_mma below)
//   quant_linmma8_bf16_n<NT>_v<K>, quant_linmma16_bf16_n<NT>_v<K>, quant_lintile4_bf16_n<NT>_v<K>
//                            tuning variants (at the end)
//
// Row kernels (fwd, deq, fake_bwd): block (TX, RY), TX a multiple of 32 (at most 256), RY ≤ 8 row
// slots; grid-stride over groups of RY rows. Thread tx of a slot owns "units" u = tx, tx+TX, ... of
// 8 consecutive elements [8u, 8u+8) of the row, which are exactly the b bytes [b·u, b·u+b) of the
// packed row for every b (8 codes · b bits), so no two threads share a code byte (3-bit fields
// straddling bytes included); the last unit may be short (n % 8) and then writes only the row's
// remaining ceil bytes, whose unused high bits are 0.
//
// Codes are IDENTICAL to the CPU kernel's: per row the boundaries t_k = ((k+0.5)/qmax)^(1/a) are
// computed in float64, and |q| = #{k : |x| ≥ max(t_k·m, 2^-1074)} with the product in float64.
// The CPU compares float32 |x| with thr_up(t_k·m) (that product rounded up to float32), which is the
// same predicate for every float32 |x|. Only pow itself may differ (CUDA's double pow vs the host
// libm, each within 2 ulp of the exact value), which can flip a code only when |x| lies within
// ~1e-16 relative of a boundary.
//
// Error reporting: kernels never fail. A group holding NaN/inf gets a NaN scale (the Python layer
// checks the scales for finiteness); a row whose exponent is outside (0, 1] gets a NaN table, so
// its dequantized values are NaN rather than silently wrong. The linear kernels read the rows'
// codebooks (`table`, float32 [out, 2^bits], from power_codebook) as given.
//
// Linear (generic): one warp per output row (8 warps per block), the row's codebook copied from
// `table` into shared memory; each lane walks its own code units in a fixed order and the warp sums
// with a butterfly, so results depend on the shape only. Tokens go NT at a time (each tile re-reads
// the codes: meant for tokens ≤ 8; the Python layer dequantizes and calls cuBLAS for more). The
// tiled kernel (linear_tiled) is the fast path; its order of summation is fixed too.
#include <stddef.h>

#include "common.cuh"

namespace lmkern {
namespace quant {

struct QuantParams {
    const void* x;       // [rows, n] T
    const float* a;      // [rows]
    uint8_t* codes;      // [rows, row_bytes] or null (fake quantize)
    void* y;             // [rows, n] T (fake quantize) or null
    float* scales;       // [rows, n/group]
    double clip;
    int64_t rows;
    int32_t n;
    int32_t group;
    int32_t bits;
    int32_t row_bytes;
    int32_t vec;         // 1: n % 8 == 0 and x (and y) aligned to 8 elements: 8-element packs
    int32_t pad_;
};
static_assert(sizeof(QuantParams) == 80, "QuantParams layout must match the Rust mirror");

struct DeqParams {
    const uint8_t* codes;  // [rows, row_bytes]
    const float* scales;   // [rows, n/group]
    const float* a;        // [rows]: the tables from the exponents, when `table` is null
    const float* table;    // [rows, 2^bits] or null: the rows' codebooks, read as given
    void* out;             // [rows, n] T
    int64_t rows;
    int32_t n;
    int32_t group;
    int32_t bits;
    int32_t row_bytes;
    int32_t vec;
    int32_t pad_;
};
static_assert(sizeof(DeqParams) == 72, "DeqParams layout must match the Rust mirror");

struct FakeBwdParams {
    const void* dy;        // [rows, n] T
    const void* x;         // [rows, n] T
    const float* scales;   // [rows, n/group]
    const float* a;        // [rows]
    void* dx;              // [rows, n] T
    float* da;             // [rows] or null (not wanted)
    int64_t rows;
    int32_t n;
    int32_t group;
    int32_t bits;
    int32_t pad_;
};
static_assert(sizeof(FakeBwdParams) == 72, "FakeBwdParams layout must match the Rust mirror");

struct LinearParams {
    const void* x;         // [tokens, in] T
    const uint8_t* codes;  // [out, row_bytes]
    const float* scales;   // [out, in/group]
    const float* table;    // [out, 2^bits]: the rows' codebooks (power_codebook), row stride 2^bits
    const float* bias;     // [out] or null
    void* y;               // [tokens, out] T
    int64_t tokens;
    int32_t out_features;
    int32_t in_features;
    int32_t group;
    int32_t bits;
    int32_t row_bytes;
    int32_t flags;  // LINEAR_PDL or 0
};
static_assert(sizeof(LinearParams) == 80, "LinearParams layout must match the Rust mirror");
static_assert(offsetof(LinearParams, table) == 24 && offsetof(LinearParams, tokens) == 48,
              "LinearParams layout must match the Rust mirror");

// LinearParams.flags: launched with programmatic dependent launch (rust/core/src/quant/cuda.rs).
constexpr int LINEAR_PDL = 1;

constexpr int MAX_SLOTS = 8;     // row slots per block (RY)
constexpr int MAX_LEVELS = 256;  // 2^8 table entries
constexpr int MAX_BOUNDS = 128;  // 2^(8-1): qmax boundaries padded with +inf
constexpr double MIN_THR = 4.9406564584124654e-324;  // the CPU's floor of t_k·m (never 0)

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ float nan_f() { return __uint_as_float(0x7fc00000u); }
__device__ __forceinline__ bool valid_exponent(float a) { return a > 0.0f && a <= 1.0f; }

// The signed code of a b-bit field (sign extension).
__device__ __forceinline__ int field_code(int f, int bits) { return f >= (1 << (bits - 1)) ? f - (1 << bits) : f; }

// lut[f] = sign(q_f)·(|q_f|/qmax)^(1/a) in float64, rounded to float (row_lut in quant/mod.rs); NaN
// for an exponent outside (0, 1].
__device__ __forceinline__ float lut_entry(int bits, float a, int f) {
    if (!valid_exponent(a)) return nan_f();
    const int q = field_code(f, bits);
    const double qm = (double)((1 << (bits - 1)) - 1);
    const double v = pow((double)(q < 0 ? -q : q) / qm, 1.0 / (double)a);
    return (float)(q < 0 ? -v : v);
}

// Boundary k (0..P-1, P = 2^(b-1)): t_k = ((k+0.5)/qmax)^(1/a) for k < qmax, +inf for k = qmax.
__device__ __forceinline__ double boundary(int bits, float a, int k) {
    const int qm = (1 << (bits - 1)) - 1;
    if (k >= qm) return __builtin_huge_val();
    return pow(((double)k + 0.5) / (double)qm, 1.0 / (double)a);
}

// |q| for |x| = v under scale m > 0: the number of boundaries with max(t_k·m, 2^-1074) ≤ v; a
// branchless binary search over the P padded boundaries (log2 P steps).
__device__ __forceinline__ int count_code(const double* tb, int P, double m, double v) {
    int pos = 0;
    for (int step = P >> 1; step > 0; step >>= 1) {
        const double t = fmax(tb[pos + step - 1] * m, MIN_THR);
        pos += t <= v ? step : 0;
    }
    return pos;
}

// Load the 8 elements [e0, e0+cnt) of a row as floats (zeros past cnt).
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int64_t e0, int cnt, bool vec, float (&f)[8]) {
    if (vec && cnt == 8) {
        unpack(load_pack<T, 8>(row + e0, 0), f);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = j < cnt ? to_float(row[e0 + j]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ row, int64_t e0, int cnt, bool vec, const float (&f)[8]) {
    if (vec && cnt == 8) {
        store_pack<T, 8>(row + e0, 0, pack_floats<T, 8>(f));
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (j < cnt) row[e0 + j] = from_float<T>(f[j]);
    }
}

// The 64-bit little-endian word of unit u (8 fields) of a packed row: bytes [b·u, b·u+b) ∩ row.
__device__ __forceinline__ uint64_t load_unit(const uint8_t* __restrict__ row, int bits, int64_t u, int row_bytes) {
    const int64_t b0 = (int64_t)bits * u;
    const int nb = (int)min64(bits, row_bytes - b0);
    uint64_t w = 0;
    for (int i = 0; i < nb; ++i) w |= (uint64_t)row[b0 + i] << (8 * i);
    return w;
}

// ---------------------------------------------------------------------------------------------
// Quantize / fake quantize forward.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void fwd(const QuantParams& p) {
    __shared__ double tb[MAX_SLOTS][MAX_BOUNDS];
    __shared__ float lut[MAX_SLOTS][MAX_LEVELS];
    const T* __restrict__ x = static_cast<const T*>(p.x);
    T* __restrict__ y = static_cast<T*>(p.y);
    const int n = p.n, g = p.group, bits = p.bits, ng = n / g;
    const int P = 1 << (bits - 1), nl = 1 << bits, mask = nl - 1;
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x;
    const int lane = tx & 31, warp = tx >> 5, nwarps = TX >> 5;
    // Phase 1: S lanes per group (a power of two ≤ 32), 32/S groups per warp step.
    int S = 1;
    while (S < g && S < 32) S <<= 1;
    const int gpw = 32 / S, sub = lane / S, sl = lane % S;
    const int64_t nunits = ((int64_t)n + 7) / 8;  // n + 7 overflows int near 2^31
    const int64_t step = (int64_t)gridDim.x * blockDim.y;

    for (int64_t base = (int64_t)blockIdx.x * blockDim.y; base < p.rows; base += step) {
        const int64_t row = base + ty;
        const bool active = row < p.rows;
        const float av = active ? p.a[row] : 1.0f;
        if (active) {
            for (int k = tx; k < P; k += TX) tb[ty][k] = valid_exponent(av) ? boundary(bits, av, k) : __builtin_huge_val();
            if (y != nullptr)
                for (int f = tx; f < nl; f += TX) lut[ty][f] = lut_entry(bits, av, f);
        }
        const T* xr = x + row * n;
        float* sr = p.scales + row * ng;

        // Phase 1: group scales m = float(clip·max|x|), NaN when the group holds NaN/inf.
        // 64-bit counters: g0 and e step past ng and g, which may be near 2^31.
        for (int64_t g0 = warp * gpw; g0 < ng; g0 += nwarps * gpw) {  // warp-uniform bounds
            const int64_t gi = g0 + sub;
            const bool valid = active && gi < ng;
            float amax = 0.0f, z = 0.0f;
            if (valid) {
                for (int64_t e = sl; e < g; e += S) {
                    const float v = to_float(xr[gi * g + e]);
                    amax = fmaxf(amax, fabsf(v));
                    z += v * 0.0f;  // 0 unless some v is NaN or ±inf
                }
            }
            for (int o = S >> 1; o > 0; o >>= 1) {
                amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));
                z += __shfl_xor_sync(FULL_MASK, z, o);
            }
            if (valid && sl == 0) sr[gi] = z == 0.0f ? (float)(p.clip * (double)amax) : nan_f();
        }
        __syncthreads();  // scales (global, this block's rows) and tables visible to the block

        // Phase 2: codes of 8 elements per unit.
        if (active) {
            for (int64_t u = tx; u < nunits; u += TX) {
                const int64_t e0 = 8 * u;
                const int cnt = (int)min64(8, n - e0);
                float f[8], out[8];
                load8<T>(xr, e0, cnt, p.vec != 0, f);
                uint64_t word = 0;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    out[j] = 0.0f;
                    if (j < cnt) {
                        const float m = sr[(e0 + j) / g];
                        int c = 0;
                        if (m != 0.0f) c = count_code(tb[ty], P, (double)m, (double)fabsf(f[j]));
                        const int q = f[j] < 0.0f ? -c : c;
                        const int field = q & mask;
                        word |= (uint64_t)field << (bits * j);
                        if (y != nullptr) out[j] = m * lut[ty][field];
                    }
                }
                if (p.codes != nullptr) {
                    uint8_t* cr = p.codes + row * p.row_bytes;
                    const int64_t b0 = (int64_t)bits * u;
                    const int nb = (int)min64(bits, p.row_bytes - b0);
                    for (int i = 0; i < nb; ++i) cr[b0 + i] = (uint8_t)(word >> (8 * i));
                }
                if (y != nullptr) store8<T>(y + row * n, e0, cnt, p.vec != 0, out);
            }
        }
        __syncthreads();  // tables are rewritten for the next rows
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void deq(const DeqParams& p) {
    __shared__ float lut[MAX_SLOTS][MAX_LEVELS];
    T* __restrict__ out = static_cast<T*>(p.out);
    const int n = p.n, g = p.group, bits = p.bits, ng = n / g;
    const int nl = 1 << bits, mask = nl - 1;
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x;
    const int64_t nunits = ((int64_t)n + 7) / 8;  // n + 7 overflows int near 2^31
    const int64_t step = (int64_t)gridDim.x * blockDim.y;
    for (int64_t base = (int64_t)blockIdx.x * blockDim.y; base < p.rows; base += step) {
        const int64_t row = base + ty;
        const bool active = row < p.rows;
        if (active) {
            if (p.table != nullptr) {
                for (int f = tx; f < nl; f += TX) lut[ty][f] = p.table[row * nl + f];
            } else {
                const float av = p.a[row];
                for (int f = tx; f < nl; f += TX) lut[ty][f] = lut_entry(bits, av, f);
            }
        }
        __syncthreads();
        if (active) {
            const uint8_t* cr = p.codes + row * p.row_bytes;
            const float* sr = p.scales + row * ng;
            for (int64_t u = tx; u < nunits; u += TX) {
                const int64_t e0 = 8 * u;
                const int cnt = (int)min64(8, n - e0);
                const uint64_t word = load_unit(cr, bits, u, p.row_bytes);
                float v[8];
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    v[j] = j < cnt ? sr[(e0 + j) / g] * lut[ty][(int)(word >> (bits * j)) & mask] : 0.0f;
                store8<T>(out + row * n, e0, cnt, p.vec != 0, v);
            }
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Fake quantize backward (straight-through, m held constant; formulas in quant/mod.rs), in float64
// as the CPU computes them. da[row] = Σ dy·∂x̂/∂a: each thread sums its units in order, then the
// slot's first thread adds the TX partials in thread order (a fixed order; no atomics).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void fake_bwd(const FakeBwdParams& p) {
    __shared__ double tb[MAX_SLOTS][MAX_BOUNDS];
    __shared__ double red[MAX_SLOTS * 256];
    const T* __restrict__ dy = static_cast<const T*>(p.dy);
    const T* __restrict__ x = static_cast<const T*>(p.x);
    T* __restrict__ dx = static_cast<T*>(p.dx);
    const int n = p.n, g = p.group, bits = p.bits, ng = n / g;
    const int P = 1 << (bits - 1);
    const double qm = (double)(P - 1);
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x;
    const int64_t nunits = ((int64_t)n + 7) / 8;  // n + 7 overflows int near 2^31
    const int64_t step = (int64_t)gridDim.x * blockDim.y;
    for (int64_t base = (int64_t)blockIdx.x * blockDim.y; base < p.rows; base += step) {
        const int64_t row = base + ty;
        const bool active = row < p.rows;
        const float a32 = active ? p.a[row] : 1.0f;
        if (active)
            for (int k = tx; k < P; k += TX) tb[ty][k] = valid_exponent(a32) ? boundary(bits, a32, k) : __builtin_huge_val();
        __syncthreads();
        double da_part = 0.0;
        if (active) {
            const double av = (double)a32;
            const float* sr = p.scales + row * ng;
            for (int64_t u = tx; u < nunits; u += TX) {
                const int64_t e0 = 8 * u;
                const int cnt = (int)min64(8, n - e0);
                for (int j = 0; j < cnt; ++j) {
                    const int64_t e = row * n + e0 + j;
                    const float m32 = sr[(e0 + j) / g];
                    const double xv = (double)to_float(x[e]);
                    const double m = (double)m32;
                    double ddx = 0.0, dda = 0.0;
                    if (!(xv == 0.0 || m == 0.0 || fabs(xv) > m)) {
                        const double sg = xv > 0.0 ? 1.0 : -1.0;
                        const double lu = log(fabs(xv) / m + 1e-12);
                        const int c = count_code(tb[ty], P, m, fabs(xv));
                        double big_r, term_f;
                        if (c == 0) {
                            big_r = av == 1.0 ? 1.0 : 0.0;
                            term_f = 0.0;
                        } else {
                            const double lr = log((double)c / qm);
                            big_r = exp((1.0 / av - 1.0) * lr);
                            term_f = -(m / (av * av)) * sg * exp(lr / av) * lr;
                        }
                        ddx = big_r * exp((av - 1.0) * lu);
                        dda = term_f + (m / av) * sg * big_r * exp(av * lu) * lu;
                    }
                    const double go = (double)to_float(dy[e]);
                    dx[e] = from_float<T>((float)(go * ddx));
                    da_part += go * dda;
                }
            }
        }
        if (p.da != nullptr) {
            red[ty * TX + tx] = da_part;
            __syncthreads();
            if (active && tx == 0) {
                double s = 0.0;
                for (int i = 0; i < TX; ++i) s += red[ty * TX + i];
                p.da[row] = (float)s;
            }
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Linear: y[t, o] = Σ_k x[t, k]·m[o, k/g]·lut_o[field(o, k)] + bias[o].
// ---------------------------------------------------------------------------------------------
template <typename T, int NT>
__device__ __forceinline__ void linear(const LinearParams& p) {
    __shared__ float lut[8][MAX_LEVELS];  // one table per warp (blockDim.x ≤ 256)
    const T* __restrict__ x = static_cast<const T*>(p.x);
    T* __restrict__ y = static_cast<T*>(p.y);
    const int n = p.in_features, g = p.group, bits = p.bits, ng = n / g, nout = p.out_features;
    const int nl = 1 << bits, mask = nl - 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int64_t step = (int64_t)gridDim.x * nwarps;
    for (int64_t base = (int64_t)blockIdx.x * nwarps; base < nout; base += step) {
        const int64_t o = base + warp;
        const bool active = o < nout;
        if (active) {
            const float* tr = p.table + o * nl;
            for (int f = lane; f < nl; f += 32) lut[warp][f] = tr[f];
        }
        __syncthreads();
        const uint8_t* cr = p.codes + o * p.row_bytes;
        const float* sr = p.scales + o * ng;
        const float b = (active && p.bias != nullptr) ? p.bias[o] : 0.0f;
        for (int64_t t0 = 0; t0 < p.tokens; t0 += NT) {  // uniform across the block
            float acc[NT];
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
            int nt = (int)min64(NT, p.tokens - t0);
            if (active) {
                const int64_t nunits = ((int64_t)n + 7) / 8;  // n + 7 overflows int near 2^31
                for (int64_t u = lane; u < nunits; u += 32) {
                    const int64_t e0 = 8 * u;
                    const int cnt = (int)min64(8, n - e0);
                    const uint64_t word = load_unit(cr, bits, u, p.row_bytes);
                    for (int j = 0; j < cnt; ++j) {
                        const float w = sr[(e0 + j) / g] * lut[warp][(int)(word >> (bits * j)) & mask];
#pragma unroll
                        for (int t = 0; t < NT; ++t)
                            if (t < nt) acc[t] = fmaf(w, to_float(x[(t0 + t) * n + e0 + j]), acc[t]);
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[t] = warp_sum(acc[t]);
            if (active && lane == 0) {
                for (int t = 0; t < nt; ++t) y[(t0 + t) * nout + o] = from_float<T>(acc[t] + b);
            }
        }
        __syncthreads();  // the tables are rewritten for the next rows
    }
}

// ---------------------------------------------------------------------------------------------
// Linear, tiled: the kernel for aligned shapes (n and the group size multiples of CPL; x 16-byte
// aligned; the codes aligned to the slice's load width, see rust/core/src/quant/cuda.rs).
//
// A block of TT threads (TILE_THREADS but in tuning variants) takes R output rows at a time, and
// splits the input dimension between its threads: thread i owns the slices s = i, i + TT, ... of CPL
// consecutive columns (CPL·BITS/8 code bytes; one group, as g % CPL == 0). Per slice it loads x
// (NT tokens × CPL, converted to float once and reused by the R rows: the GEMV's x traffic is paid
// once per R rows) and the R rows' codes and scales, then adds m·Σ_j lut_r[field_j]·x[t][j] to
// acc[r][t]. The rows' codebooks are loaded first and the first slice right after, before the
// tables' barrier (which, as compiled, waits for the slice's codes too; see the kernel). A partial
// last row tile repeats its last row (no branch per row); those sums are dropped.
// The block then sums acc over its threads in a fixed order: a transposing butterfly within each
// warp, and the warps' partials in shared memory.
// Launched with programmatic dependent launch (flags & LINEAR_PDL, sm_90+), a block may start
// before the previous kernel ends: it prefetches the codes of its row tiles' first pass of slices
// into L2 and reads nothing before griddep_wait. Either way it lets the next kernel start as its
// blocks retire.
// ---------------------------------------------------------------------------------------------
constexpr int TILE_THREADS = 256;

// Options of the tiled kernel, a bitmask (linear_tiled's OPT; the default kernels take 0), for the
// tuning variants 43-47 (unmeasured): ~350 of the ~1,550 instructions a thread of the 1-token
// kernel issues at 4096² are row addresses after griddep_wait and ~150 the block's sums (H200,
// benches/results/2026-11-27-h200-9-quant-staged-mma, ncu_lintile4_n1.txt).
//   TILE_UNIFORM   full row tiles load at plain row strides, power-of-two groups by a shift
//                  (load_rows_slice)
//   TILE_SMEM_SUM  the block's sums through shared memory (smem_sums) instead of a transposing
//                  butterfly per warp and the warps' partials (stash_partials, finish_partials)
constexpr int TILE_UNIFORM = 1, TILE_SMEM_SUM = 2;

// Load the SB code bytes at `p` (aligned to SB's largest power-of-two divisor, at most 16) into
// little-endian words.
template <int SB>
__device__ __forceinline__ void load_codes(const uint8_t* __restrict__ p, uint32_t (&w)[(SB + 3) / 4]) {
    if constexpr (SB % 16 == 0) {
#pragma unroll
        for (int i = 0; i < SB / 16; ++i) {
            const uint4 v = reinterpret_cast<const uint4*>(p)[i];
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    } else if constexpr (SB % 8 == 0) {
#pragma unroll
        for (int i = 0; i < SB / 8; ++i) {
            const uint2 v = reinterpret_cast<const uint2*>(p)[i];
            w[2 * i] = v.x, w[2 * i + 1] = v.y;
        }
    } else if constexpr (SB % 4 == 0) {
#pragma unroll
        for (int i = 0; i < SB / 4; ++i) w[i] = reinterpret_cast<const uint32_t*>(p)[i];
    } else if constexpr (SB % 2 == 0) {
#pragma unroll
        for (int i = 0; i < (SB + 3) / 4; ++i) w[i] = 0;
#pragma unroll
        for (int i = 0; i < SB / 2; ++i) w[i / 2] |= (uint32_t)reinterpret_cast<const uint16_t*>(p)[i] << (16 * (i % 2));
    } else {
#pragma unroll
        for (int i = 0; i < (SB + 3) / 4; ++i) w[i] = 0;
#pragma unroll
        for (int i = 0; i < SB; ++i) w[i / 4] |= (uint32_t)p[i] << (8 * (i % 4));
    }
}

// Field j of a slice's words (BITS·j a compile-time constant once unrolled; 3-bit fields may
// straddle two words).
template <int BITS, int NWORDS>
__device__ __forceinline__ int slice_field(const uint32_t (&w)[NWORDS], int j) {
    const int b = BITS * j, i = b >> 5, sh = b & 31;
    uint32_t v = w[i] >> sh;
    if (sh + BITS > 32 && i + 1 < NWORDS) v |= w[i + 1] << (32 - sh);
    return (int)(v & ((1u << BITS) - 1));
}

// The table entry at byte offset `off` (4·field) of a row's table in shared memory.
__device__ __forceinline__ float table_at(const float* row, uint32_t off) {
    return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(row) + off);
}

// One step of the transposing butterfly: lanes whose bit `o` is set keep the upper half of v[0, 2H),
// the others the lower half, each adding its partner's copy of the half it keeps.
template <int H>
__device__ __forceinline__ void transpose_step(float* v, int lane, int o) {
    const bool up = (lane & o) != 0;
#pragma unroll
    for (int i = 0; i < H; ++i) {
        const float send = up ? v[i] : v[i + H];
        const float keep = up ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(FULL_MASK, send, o);
    }
    if constexpr (H > 1) transpose_step<H / 2>(v, lane, 2 * o);
}

// Σ over the warp of V ≤ 32 values per lane with V − 1 + log2(32/V) shuffles (not 5·V): lane l
// returns the sum for value transposed_index<V>(l); lanes 0..V-1 cover every value once.
template <int V>
__device__ __forceinline__ float warp_sum_transposed(float (&v)[V], int lane) {
    static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V is a power of two, at most 32");
    if constexpr (V > 1) transpose_step<V / 2>(v, lane, 1);
    float s = v[0];
#pragma unroll
    for (int o = V; o < 32; o *= 2) s += __shfl_xor_sync(FULL_MASK, s, o);
    return s;
}

template <int V>
__device__ __forceinline__ int transposed_index(int lane) {
    int idx = 0;
#pragma unroll
    for (int k = 0, h = V / 2; h >= 1; ++k, h /= 2) idx += ((lane >> k) & 1) * h;
    return idx;
}

// One slice's x (NT tokens × CPL columns from column c0, converted to float; zeros past the `nt`
// tokens present) into registers.
template <typename T, int NT, int CPL>
__device__ __forceinline__ void load_x_slice(const T* __restrict__ x, int64_t n, int64_t t0, int nt, int64_t c0,
                                             float (&xs)[NT][CPL]) {
    constexpr int VW = 16 / sizeof(T);  // x elements per 16-byte load
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int v = 0; v < CPL / VW; ++v) {
            float f[VW];
            if (t < nt) {
                unpack(load_pack<T, VW>(x + (t0 + t) * n + c0, v), f);
            } else {
#pragma unroll
                for (int e = 0; e < VW; ++e) f[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < VW; ++e) xs[t][v * VW + e] = f[e];
        }
    }
}

// log2 of the group size where it is a power of two, else -1; and the group of column `col` with
// it (a shift rather than a division where it can).
__device__ __forceinline__ int group_shift(int group) { return (group & (group - 1)) == 0 ? __ffs(group) - 1 : -1; }
__device__ __forceinline__ int column_group(int col, int group, int gsh) { return gsh >= 0 ? col >> gsh : col / group; }

// Slice s of the R rows from o0 (`rows_here` ≥ 1 of them present): the code words and the scale of
// the slice's group. Rows past the last one present repeat it (valid memory, no branch per row);
// their sums are computed and dropped (finish_partials stores rows below out_features only). Row
// r's slice is at cp + r·row_bytes, its scale at sp[r·ng] (one division per slice). FN, FG > 0:
// in_features and the group size fixed at compile time (the shape-specialized variants): a full
// row tile's rows then lie at constant offsets from the slice's first, so their loads take
// immediate offsets instead of each row's 64-bit address arithmetic, and the slice's group is a
// shift. OPT & TILE_UNIFORM: a full row tile's rows at plain strides from the slice's first (no
// clamp per row), the slice's group a shift by gsh where the group size is a power of two (gsh ≥ 0).
template <int BITS, int CPL, int R, int FN = 0, int FG = 0, int OPT = 0>
__device__ __forceinline__ void load_rows_slice(const LinearParams& p, int ng, int gsh, int64_t o0, int rows_here, int s,
                                                uint32_t (&cw)[R][(CPL * BITS / 8 + 3) / 4], float (&m)[R]) {
    constexpr int SB = CPL * BITS / 8;
    if constexpr (FN > 0) {
        static_assert(FN % FG == 0 && FG % CPL == 0 && FN * BITS % 8 == 0, "whole groups, whole slices, whole bytes");
        if (rows_here == R) {  // uniform
            constexpr int RB = FN * BITS / 8, NG = FN / FG;
            const uint8_t* cp = p.codes + o0 * RB + s * SB;
            const float* sp = p.scales + o0 * NG + s * CPL / FG;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                load_codes<SB>(cp + r * RB, cw[r]);
                m[r] = sp[r * NG];
            }
            return;
        }
    }
    const uint8_t* cp = p.codes + o0 * p.row_bytes + (int64_t)s * SB;
    const float* sp = p.scales + o0 * ng + column_group(s * CPL, p.group, gsh);  // s·CPL < n: an int
    if constexpr ((OPT & TILE_UNIFORM) != 0) {
        if (rows_here == R) {  // uniform
#pragma unroll
            for (int r = 0; r < R; ++r) {
                load_codes<SB>(cp + r * (int64_t)p.row_bytes, cw[r]);
                m[r] = sp[r * (int64_t)ng];
            }
            return;
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int rr = r < rows_here ? r : rows_here - 1;
        load_codes<SB>(cp + (int64_t)rr * p.row_bytes, cw[r]);
        m[r] = sp[(uint32_t)rr * (uint32_t)ng];  // < 16·2^28: n < 2^31 and groups of 8 at least
    }
}

// acc[r·NT + t] += m[r]·Σ_j lut[r][field_j(r)]·xs[t][j] over one slice.
template <int NT, int BITS, int CPL, int R>
__device__ __forceinline__ void slice_dot(const uint32_t (&cw)[R][(CPL * BITS / 8 + 3) / 4], const float (&m)[R],
                                          const float (&xs)[NT][CPL], const float (*lut)[1 << BITS], float (&acc)[R * NT]) {
    constexpr int NWORDS = (CPL * BITS / 8 + 3) / 4;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float part[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) part[t] = 0.0f;
        if constexpr (BITS == 4) {
            // Per word, the byte offsets into the row's table of the even fields (×4, one per byte of
            // `ev`) and of the odd ones (`od`): two operations per 8 fields, then one byte extract
            // (PRMT) per field before its shared-memory load.
#pragma unroll
            for (int i = 0; i < NWORDS; ++i) {
                const uint32_t ev = (cw[r][i] << 2) & 0x3c3c3c3cu, od = (cw[r][i] >> 2) & 0x3c3c3c3cu;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float w0 = table_at(lut[r], __byte_perm(ev, 0u, 0x4440u | k));
                    const float w1 = table_at(lut[r], __byte_perm(od, 0u, 0x4440u | k));
#pragma unroll
                    for (int t = 0; t < NT; ++t)
                        part[t] = fmaf(w1, xs[t][8 * i + 2 * k + 1], fmaf(w0, xs[t][8 * i + 2 * k], part[t]));
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
                const float w = lut[r][slice_field<BITS, NWORDS>(cw[r], j)];
#pragma unroll
                for (int t = 0; t < NT; ++t) part[t] = fmaf(w, xs[t][j], part[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r * NT + t] = fmaf(m[r], part[t], acc[r * NT + t]);
    }
}

// The R rows' codebooks from o0 as this thread's share of R·2^BITS entries, in a block of TT
// threads (zeros past the rows).
template <int BITS, int R, int TT>
constexpr int TABLE_SHARE = (R * (1 << BITS) + TT - 1) / TT;

template <int BITS, int R, int TT>
__device__ __forceinline__ void load_table_share(const LinearParams& p, int64_t o0, float (&tv)[TABLE_SHARE<BITS, R, TT>]) {
    constexpr int NL = 1 << BITS;
#pragma unroll
    for (int i = 0; i < TABLE_SHARE<BITS, R, TT>; ++i) {
        const int e = threadIdx.x + i * TT;
        const int64_t o = o0 + e / NL;
        tv[i] = (e < R * NL && o < p.out_features) ? p.table[o * NL + e % NL] : 0.0f;
    }
}

template <int BITS, int R, int TT>
__device__ __forceinline__ void store_table_share(float (*lut)[1 << BITS], const float (&tv)[TABLE_SHARE<BITS, R, TT>]) {
    constexpr int NL = 1 << BITS;
#pragma unroll
    for (int i = 0; i < TABLE_SHARE<BITS, R, TT>; ++i) {
        const int e = threadIdx.x + i * TT;
        if (e < R * NL) lut[e / NL][e % NL] = tv[i];
    }
}

// The block's sums of acc (R rows × NT tokens, one set per thread) into y for rows o0.. and tokens
// t0.. (nt of them): a transposing butterfly within each warp, the TT/32 warps' partials through `red`.
// The caller puts a barrier between the partials' stores and the final sums (`finish`).
template <int V>
__device__ __forceinline__ void stash_partials(float (&acc)[V], float (*red)[V]) {
    const int lane = threadIdx.x & 31;
    const float total = warp_sum_transposed<V>(acc, lane);
    if (lane < V) red[threadIdx.x >> 5][transposed_index<V>(lane)] = total;
}

template <typename T, int NT, int R, int TT>
__device__ __forceinline__ void finish_partials(const LinearParams& p, const float (*red)[R * NT], int64_t o0, int64_t t0, int nt) {
    const int tid = threadIdx.x;
    if (tid < R * NT) {
        const int r = tid / NT, t = tid % NT;
        const int64_t o = o0 + r;
        if (o < p.out_features && t < nt) {
            float sum = 0.0f;
#pragma unroll
            for (int w = 0; w < TT / 32; ++w) sum += red[w][tid];
            static_cast<T*>(p.y)[(t0 + t) * p.out_features + o] = from_float<T>(sum + (p.bias != nullptr ? p.bias[o] : 0.0f));
        }
    }
}

// TILE_SMEM_SUM: the block's sums of acc (V = R·NT per thread) through shared memory. Thread i
// stores its partials to sums[v][i]; after a barrier, P = TT/V threads per sum (lanes of one warp)
// add the V values sums[v][j + P·k] (k in order) and finish with a butterfly over the P lanes, which
// leaves every lane the same total (a fixed order, as the transposing one). A row of `sums` is TT + P
// words (P < 32), so that the 32/P sums a warp reads start in distinct banks: no conflicts. ~70
// instructions a thread at 16 rows, 1 token, against ~150 (sm_90 SASS).
template <int V, int TT>
struct SmemSums {
    static constexpr int P = TT / V, STRIDE = TT + (P < 32 ? P : 0);
    static_assert(TT % V == 0 && P <= 32 && (P & (P - 1)) == 0, "a power-of-two number of lanes per sum, within a warp");
};

template <int V, int TT>
__device__ __forceinline__ void stash_smem(const float (&acc)[V], float (*sums)[SmemSums<V, TT>::STRIDE]) {
#pragma unroll
    for (int v = 0; v < V; ++v) sums[v][threadIdx.x] = acc[v];
}

template <typename T, int NT, int R, int TT>
__device__ __forceinline__ void finish_smem(const LinearParams& p, const float (*sums)[SmemSums<R * NT, TT>::STRIDE], int64_t o0,
                                            int64_t t0, int nt) {
    constexpr int V = R * NT, P = SmemSums<V, TT>::P;
    const int v = threadIdx.x / P, j = threadIdx.x % P;
    float sum = sums[v][j];
#pragma unroll
    for (int k = 1; k < V; ++k) sum += sums[v][j + P * k];
#pragma unroll
    for (int o = P / 2; o >= 1; o /= 2) sum += __shfl_xor_sync(FULL_MASK, sum, o);
    const int r = v / NT, t = v % NT;
    const int64_t o = o0 + r;
    if (j == 0 && o < p.out_features && t < nt)
        static_cast<T*>(p.y)[(t0 + t) * p.out_features + o] = from_float<T>(sum + (p.bias != nullptr ? p.bias[o] : 0.0f));
}

// What a block prefetches into L2 when launched with PDL, before its griddep_wait, for each row
// tile it will take (one, unless the grid is smaller than the tiles): the tile's codes, a prefetch
// per 128-byte line (Codes); only the codes of the tile's first pass of slices (FirstPass, the
// same as Codes when a row is one pass); or the tile's codes in bulk, 16-KiB ranges (Bulk:
// cp.async.bulk.prefetch, sm_90; needs 16-byte aligned codes). The tiled kernel takes FirstPass:
// on the H200 (benches/results/2026-11-27-h200-9-quant-staged-mma, bf16 4-bit, 1 token) it took
// 14336 → 4096 (3.5 passes) to 15.3 µs against 17.9 with Codes and 16.8 without PDL, and matched
// Codes where a row is one pass. Prefetching the scales and codebooks too, or nothing, lost or tied.
enum class Prefetch { Codes, FirstPass, Bulk };

template <int BITS, int CPL, int R, int TT, Prefetch PF>
__device__ __forceinline__ void prefetch_tile(const LinearParams& p, int64_t o0) {
    const int tid = threadIdx.x;
    const uint8_t* tile = p.codes + o0 * p.row_bytes;  // rows o0.. are contiguous
    const int64_t rows = min64(R, p.out_features - o0), bytes = rows * p.row_bytes;
    constexpr int PASS = TT * CPL * BITS / 8, PASS_LINES = (PASS + 127) / 128;  // per row
    if constexpr (PF == Prefetch::Bulk) {
        // [lo, hi): the tile's bytes from the 16-byte boundary at or below its start (the buffer
        // is 16-byte aligned, so still in it) to the one at or below its end (its last < 16 bytes
        // are left out rather than read past the buffer).
        constexpr int64_t CHUNK = 16384;
        const uintptr_t lo = reinterpret_cast<uintptr_t>(tile) & ~uintptr_t(15);
        const int64_t span = (int64_t)((reinterpret_cast<uintptr_t>(tile + bytes) & ~uintptr_t(15)) - lo);
        for (int64_t e = tid; e * CHUNK < span; e += TT)
            prefetch_l2_bulk(reinterpret_cast<const void*>(lo + e * CHUNK), (uint32_t)min64(CHUNK, span - e * CHUNK));
    } else if (PF == Prefetch::FirstPass && p.row_bytes > PASS) {
        for (int e = tid; e < rows * PASS_LINES; e += TT)
            prefetch_l2(tile + (int64_t)(e / PASS_LINES) * p.row_bytes + 128 * (e % PASS_LINES));
    } else {
        for (int64_t e = tid; e < (bytes + 127) / 128; e += TT) prefetch_l2(tile + 128 * e);
    }
}

// Launched with PDL (flags & LINEAR_PDL), before the previous kernel has finished: meanwhile, the
// codes of every row tile of R rows this block will take into L2 (prefetch_tile). Only a prefetch
// (they may be that kernel's output); the caller reads nothing before griddep_wait.
template <int BITS, int CPL, int R, int TT, Prefetch PF>
__device__ __forceinline__ void prefetch_row_tiles(const LinearParams& p) {
    if (p.flags & LINEAR_PDL) {
        for (int64_t o0 = (int64_t)blockIdx.x * R; o0 < p.out_features; o0 += (int64_t)gridDim.x * R)
            prefetch_tile<BITS, CPL, R, TT, PF>(p, o0);
    }
}

// TT threads per block (a multiple of 32; the default kernels take TILE_THREADS). FN, FG > 0: the
// in_features and group size this instance is specialized for (variants 40-42 and 45-46,
// unmeasured; the launcher picks it only for that shape): ~350 of the ~1,550 instructions a thread
// of the 1-token kernel issues at 4096² are the 16 rows' code and scale addresses and the slice's
// group (a division), after griddep_wait (H200, benches/results/2026-11-27-h200-9-quant-staged-mma,
// ncu_lintile4_n1.txt); with the shape fixed most of them fold into immediate offsets. OPT: the
// TILE_* options (variants 43-47).
template <typename T, int NT, int BITS, int CPL, int R, Prefetch PF = Prefetch::FirstPass, int TT = TILE_THREADS, int FN = 0,
          int FG = 0, int OPT = 0>
__device__ __forceinline__ void linear_tiled(const LinearParams& p) {
    constexpr int NWORDS = (CPL * BITS / 8 + 3) / 4;
    constexpr int V = R * NT;  // partial sums per thread
    constexpr bool SMEM_SUM = (OPT & TILE_SMEM_SUM) != 0;
    static_assert(CPL % 8 == 0 && CPL % (16 / sizeof(T)) == 0, "a slice is whole bytes of codes and whole 16-byte x loads");
    static_assert(TT % 32 == 0 && TT <= 1024 && V <= TT, "whole warps; a thread per row and token for the final sums");
    __shared__ float lut[R][1 << BITS];
    // The partials: per warp (stash_partials) or per thread (SMEM_SUM).
    __shared__ float red[SMEM_SUM ? V : TT / 32][SMEM_SUM ? SmemSums<V, TT>::STRIDE : V];
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const int tid = threadIdx.x;
    const int n = FN > 0 ? FN : p.in_features, ng = n / (FG > 0 ? FG : p.group), nout = p.out_features, slices = n / CPL;
    const int64_t tokens = p.tokens;
    // the slices' groups by a shift where the group size is a power of two (TILE_UNIFORM only)
    const int gsh = (OPT & TILE_UNIFORM) != 0 ? group_shift(p.group) : -1;

    griddep_launch_dependents();  // with PDL, the next kernel may start its prologue as our blocks retire
    prefetch_row_tiles<BITS, CPL, R, TT, PF>(p);
    griddep_wait();  // the previous kernel's writes (x, maybe the codes) are visible, its reads of y done

    for (int64_t o0 = (int64_t)blockIdx.x * R; o0 < nout; o0 += (int64_t)gridDim.x * R) {
        const int rows_here = (int)min64(R, nout - o0);
        for (int64_t t0 = 0; t0 < tokens; t0 += NT) {  // uniform across the block
            const int nt = (int)min64(NT, tokens - t0);
            float xs[NT][CPL];
            uint32_t cw[R][NWORDS];
            float m[R];
            // The rows' codebooks are loaded before the first slice. ptxas (sm_90) puts that load
            // on the scoreboard of the slice's code loads, so storing it to shared memory waits for
            // every code load of the thread and the barrier for every warp's: a block starts its
            // lookups when its last codes are in. (Copying the table with cp.async instead, whose
            // wait is its own, tied on the H200: 5.87 against 5.85 µs at 4096², 1 token.)
            int s = tid;
            float tv[TABLE_SHARE<BITS, R, TT>];
            load_table_share<BITS, R, TT>(p, o0, tv);
            if (s < slices) {
                load_x_slice<T, NT, CPL>(x, n, t0, nt, (int64_t)s * CPL, xs);
                load_rows_slice<BITS, CPL, R, FN, FG, OPT>(p, ng, gsh, o0, rows_here, s, cw, m);
            }
            __syncthreads();  // the previous tile's readers of lut and red are done
            store_table_share<BITS, R, TT>(lut, tv);
            __syncthreads();

            float acc[V];
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] = 0.0f;
            while (s < slices) {
                slice_dot<NT, BITS, CPL, R>(cw, m, xs, lut, acc);
                s += TT;
                if (s < slices) {
                    load_x_slice<T, NT, CPL>(x, n, t0, nt, (int64_t)s * CPL, xs);
                    load_rows_slice<BITS, CPL, R, FN, FG, OPT>(p, ng, gsh, o0, rows_here, s, cw, m);
                }
            }
            if constexpr (SMEM_SUM) {
                stash_smem<V, TT>(acc, red);
                __syncthreads();
                finish_smem<T, NT, R, TT>(p, red, o0, t0, nt);
            } else {
                stash_partials<V>(acc, red);
                __syncthreads();
                finish_partials<T, NT, R, TT>(p, red, o0, t0, nt);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear, tiled, the row tile by bulk copies (tuning variants 48-50, sm_90+; unmeasured). Each
// thread takes the slices, lookups and order of summation of linear_tiled, but a row tile's codes,
// scales and codebooks reach shared memory through the tensor memory accelerator instead of each
// thread's 16 code and 16 scale loads (and their ~200 instructions of addresses): per pass of the
// block's slices, one thread per row r copies row r's codes of the pass (TT·SB bytes, one segment),
// one the tile's codebooks and scales (first pass; both contiguous for the R rows), and one per
// chunk c announces the bytes of rows c·RC.. on the chunk's barrier (lanes of different warps: a
// warp issues its copies one lane at a time): a thread starts its lookups on the first chunk while
// the later ones are in flight. It reads its SB code bytes per row at a constant offset
// (conflict-free: the slices of consecutive threads are consecutive). The block's sums go through
// shared memory (smem_sums) in the bytes the codes took. Rows past the last present are computed
// from stale shared memory and dropped.
// Takes (rust/core/src/quant/cuda.rs, bulk_fits): n a multiple of 2·CPL (whole 16-byte row
// segments), the groups per row a multiple of 4 (16-byte rows of scales) and at most
// BULK_MAX_GROUPS, the codes, scales and codebooks 16-byte aligned, sm_90.
// ---------------------------------------------------------------------------------------------
constexpr int BULK_MAX_GROUPS = 128;

template <typename T, int NT, int BITS, int CPL, int R, int RC, int TT = TILE_THREADS>
__device__ __forceinline__ void linear_bulk(const LinearParams& p) {
    constexpr int SB = CPL * BITS / 8, NWORDS = (SB + 3) / 4, PASS = TT * SB, NL = 1 << BITS, V = R * NT, NCH = R / RC;
    constexpr int W = TT / 32;  // warps
    static_assert(R % RC == 0 && NCH <= W && R <= TT, "whole chunks, a warp to announce each; a thread per row");
    static_assert(PASS % 16 == 0 && SB % 4 == 0 && CPL % (16 / sizeof(T)) == 0, "16-byte segments, whole words, 16-byte x loads");
    using Sums = SmemSums<V, TT>;
    constexpr int CODE_BYTES = R * PASS, SUM_BYTES = V * Sums::STRIDE * 4;
    alignas(16) __shared__ float lut[R][NL];
    alignas(128) __shared__ unsigned char tile[CODE_BYTES > SUM_BYTES ? CODE_BYTES : SUM_BYTES];  // codes, then the sums
    alignas(16) __shared__ float scales[R * BULK_MAX_GROUPS];
    alignas(8) __shared__ uint64_t bars[NCH];
    unsigned char(&codes)[R][PASS] = *reinterpret_cast<unsigned char(*)[R][PASS]>(tile);
    float(*red)[Sums::STRIDE] = reinterpret_cast<float(*)[Sums::STRIDE]>(tile);
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const int tid = threadIdx.x;
    const int n = p.in_features, ng = n / p.group, nout = p.out_features, slices = n / CPL;
    const int64_t tokens = p.tokens;
    const int gsh = group_shift(p.group);

    if (tid < NCH) {
        mbar_init(&bars[tid], 1);
        fence_proxy_async_shared();  // the copies see the barrier set up
    }
    griddep_launch_dependents();
    prefetch_row_tiles<BITS, CPL, R, TT, Prefetch::FirstPass>(p);
    __syncthreads();  // the barriers are set up
    griddep_wait();

    uint32_t parity = 0;  // of the barriers' current phase (each completes once a pass)
    for (int64_t o0 = (int64_t)blockIdx.x * R; o0 < nout; o0 += (int64_t)gridDim.x * R) {
        const int rows_here = (int)min64(R, nout - o0);
        for (int64_t t0 = 0; t0 < tokens; t0 += NT) {  // uniform across the block
            const int nt = (int)min64(NT, tokens - t0);
            float acc[V];
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] = 0.0f;
            for (int s0 = 0; s0 < slices; s0 += TT) {
                const int s = s0 + tid, seg = (int)min64(TT, slices - s0) * SB;  // the pass's bytes per row
                fence_proxy_async_shared();  // this thread's stores to the tile (the sums) before the copies over them
                __syncthreads();             // the previous pass's readers of the shared tile (its sums too) are done
                // The copies are issued by lanes of different warps (each warp serializes its own).
                const int lane = tid % 32, warp = tid / 32;
                if (lane < (R + W - 1) / W && lane * W + warp < rows_here) {
                    const int r = lane * W + warp;
                    bulk_copy_to_shared(codes[r], p.codes + (o0 + r) * p.row_bytes + (int64_t)s0 * SB, seg, &bars[r / RC]);
                }
                if (tid == TT - 1 && s0 == 0) {
                    bulk_copy_to_shared(lut, p.table + o0 * NL, rows_here * NL * 4, &bars[0]);
                    bulk_copy_to_shared(scales, p.scales + o0 * ng, rows_here * ng * 4, &bars[0]);
                }
                if (lane == 31 && warp < NCH) {  // chunk `warp`'s bytes
                    const int rows_c = (int)min64(RC, rows_here - warp * RC);
                    const int tables = warp == 0 && s0 == 0 ? rows_here * (NL + ng) * 4 : 0;
                    mbar_arrive_expect_tx(&bars[warp], (rows_c > 0 ? rows_c * seg : 0) + tables);
                }
                // Every thread computes (no branch: the lookups' table addresses then fold into
                // uniform registers); one past the pass's slices (s ≥ slices, a last partial pass)
                // takes zeros for x and for the scales (stale shared memory may hold NaN bits), and
                // stale codes (any code is a finite entry), and adds 0.
                const bool here = s < slices;
                float xs[NT][CPL];
                load_x_slice<T, NT, CPL>(x, n, t0, here ? nt : 0, here ? (int64_t)s * CPL : 0, xs);
                const int g = column_group(s * CPL, p.group, gsh);
#pragma unroll
                for (int c = 0; c < NCH; ++c) {
                    mbar_wait(&bars[c], parity);
                    uint32_t cw[RC][NWORDS];
                    float m[RC];
#pragma unroll
                    for (int r = 0; r < RC; ++r) {
                        load_codes<SB>(&codes[c * RC + r][tid * SB], cw[r]);
                        m[r] = here ? scales[(c * RC + r) * ng + g] : 0.0f;
                    }
                    slice_dot<NT, BITS, CPL, RC>(cw, m, xs, lut + c * RC, *reinterpret_cast<float(*)[RC * NT]>(acc + c * RC * NT));
                }
                parity ^= 1;
            }
            __syncthreads();  // the codes' last readers are done: the sums take their bytes
            stash_smem<V, TT>(acc, red);
            __syncthreads();
            finish_smem<T, NT, R, TT>(p, red, o0, t0, nt);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear on the tensor cores: bf16/f16 activations, 4-bit codes, n and the group size multiples of
// 128, x and the codes 16-byte aligned (rust/core/src/quant/cuda.rs, mma_fits), up to 8·NTB tokens
// per tile. A block takes MMA_ROWS = 16 output rows (one m16 tile) and its 8 warps split the input
// dimension in chunks of 128 columns (one group or part of one). Per chunk, lane (g, c) (g = lane/4,
// c = lane%4) loads 16 code bytes of rows g and g+8 (columns 32c .. 32c+31 of the chunk) and the
// same 32 columns of x for token g of each 8-token block, then runs 8 mma steps: step t takes the
// lane's columns 32c + 4t .. 32c + 4t + 3 as the mma's k = 2c, 2c+1, 2c+8, 2c+9 (a bijection of the
// chunk's 128 columns that A and B share, so the product is unchanged). An A register is two
// consecutive codes, one code byte, looked up in the row's pair table: byte b → (lut[b & 15],
// lut[b >> 4]) in T (256 entries per row in shared memory, built from the float32 codebooks). A
// chunk's 8 steps sum into a fresh accumulator that is then scaled by the rows' group scales, in
// float. The warps' sums meet in shared memory (fixed order). Codebook entries are rounded to T
// (the many-token path's dequantized weight is too); x is used as given. Launched with PDL it
// prefetches its row tiles' codes into L2 before griddep_wait, as linear_tiled does. The default
// from 3 tokens where it fits (H200, 4096² bf16: 11.0 µs at 3 tokens, 12.4 at 8, 15.5 at 16,
// against the FFMA kernels' 12.5, 24.5 and the dequantize + cuBLAS path's 33.9; 10.3 at 1 token
// against 5.85: rust/core/src/quant/cuda.rs, MMA_MIN_TOKENS).
// ---------------------------------------------------------------------------------------------
constexpr int MMA_ROWS = 16;
constexpr int MMA_CHUNK = 128;

// One warp step's operands, as lane (g, c) holds them: 16 code bytes of rows g and g+8, their
// group scales, and x for token g of each 8-token block (zeros past the tile's tokens).
template <int NTB>
struct MmaChunk {
    uint32_t qa[4], qb[4];
    float ma, mb;
    uint32_t xw[NTB][16];
};

template <typename T, int NTB>
__device__ __forceinline__ void mma_load_chunk(const LinearParams& p, const uint8_t* ca, const uint8_t* cb, const float* sa,
                                               const float* sb, const T* __restrict__ xg, int nt, int j, MmaChunk<NTB>& k) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    load_codes<16>(ca + (int64_t)j * (MMA_CHUNK / 2), k.qa);
    load_codes<16>(cb + (int64_t)j * (MMA_CHUNK / 2), k.qb);
    // The chunk lies in one group: j itself at g128 (no division in the common case).
    const int grp = p.group == MMA_CHUNK ? j : j * MMA_CHUNK / p.group;
    k.ma = sa[grp], k.mb = sb[grp];
#pragma unroll
    for (int nb = 0; nb < NTB; ++nb) {
        const int tk = nb * 8 + g;
        const uint4* xp = reinterpret_cast<const uint4*>(xg + (int64_t)(tk < nt ? tk : 0) * p.in_features + (int64_t)j * MMA_CHUNK + 32 * c);
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const uint4 w = tk < nt ? xp[v] : make_uint4(0, 0, 0, 0);
            k.xw[nb][4 * v] = w.x, k.xw[nb][4 * v + 1] = w.y, k.xw[nb][4 * v + 2] = w.z, k.xw[nb][4 * v + 3] = w.w;
        }
    }
}

// acc += the chunk's 8 mma steps (into a fresh accumulator) scaled by the rows' group scales.
template <typename T, int NTB>
__device__ __forceinline__ void mma_chunk(const MmaChunk<NTB>& k, const uint32_t (*pairs)[256], float (&acc)[NTB][4]) {
    const int g = (threadIdx.x & 31) >> 2;
    float cc[NTB][4];
#pragma unroll
    for (int nb = 0; nb < NTB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) cc[nb][i] = 0.0f;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        // Bytes 2t and 2t+1 of the lane's 16: codes 4t .. 4t+3 of its 32 columns.
        const int sh = 16 * (t & 1);
        const uint32_t a[4] = {pairs[g][(k.qa[t >> 1] >> sh) & 0xff], pairs[g + 8][(k.qb[t >> 1] >> sh) & 0xff],
                               pairs[g][(k.qa[t >> 1] >> (sh + 8)) & 0xff], pairs[g + 8][(k.qb[t >> 1] >> (sh + 8)) & 0xff]};
#pragma unroll
        for (int nb = 0; nb < NTB; ++nb) {
            const uint32_t b[2] = {k.xw[nb][2 * t], k.xw[nb][2 * t + 1]};
            mma_16816<T>(cc[nb], a, b);
        }
    }
#pragma unroll
    for (int nb = 0; nb < NTB; ++nb) {
        acc[nb][0] = fmaf(k.ma, cc[nb][0], acc[nb][0]);
        acc[nb][1] = fmaf(k.ma, cc[nb][1], acc[nb][1]);
        acc[nb][2] = fmaf(k.mb, cc[nb][2], acc[nb][2]);
        acc[nb][3] = fmaf(k.mb, cc[nb][3], acc[nb][3]);
    }
}

template <typename T, int NTB>
__device__ __forceinline__ void linear_mma(const LinearParams& p) {
    constexpr int WARPS = TILE_THREADS / 32, NTOK = 8 * NTB, NL = 16;
    static_assert(TILE_THREADS == MMA_ROWS * NL, "one codebook entry per thread");
    static_assert(MMA_ROWS * NTOK <= TILE_THREADS, "a thread per output of the tile for the final sums");
    __shared__ float lut[MMA_ROWS][NL];
    __shared__ uint32_t pairs[MMA_ROWS][256];
    __shared__ float red[WARPS][MMA_ROWS * NTOK];
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const int n = p.in_features, ng = n / p.group, nout = p.out_features, chunks = n / MMA_CHUNK;
    const int64_t tokens = p.tokens;
    griddep_launch_dependents();
    prefetch_row_tiles<4, 16, MMA_ROWS, TILE_THREADS, Prefetch::Codes>(p);
    griddep_wait();
    for (int64_t o0 = (int64_t)blockIdx.x * MMA_ROWS; o0 < nout; o0 += (int64_t)gridDim.x * MMA_ROWS) {
        const int rows_here = (int)min64(MMA_ROWS, nout - o0);
        // Rows past the last one present repeat it (valid memory; their sums are dropped).
        const int ra = g < rows_here ? g : rows_here - 1, rb = g + 8 < rows_here ? g + 8 : rows_here - 1;
        const uint8_t* ca = p.codes + (o0 + ra) * p.row_bytes + 16 * c;
        const uint8_t* cb = p.codes + (o0 + rb) * p.row_bytes + 16 * c;
        const float* sa = p.scales + (o0 + ra) * ng;
        const float* sb = p.scales + (o0 + rb) * ng;
        for (int64_t t0 = 0; t0 < tokens; t0 += NTOK) {  // uniform across the block
            const int nt = (int)min64(NTOK, tokens - t0);
            const T* xg = x + t0 * n;
            // The warp's first two chunks are in flight while the codebooks are set up (copied with
            // cp.async, so that waiting for them does not wait for these loads).
            MmaChunk<NTB> k0, k1;
            if (warp < chunks) mma_load_chunk<T, NTB>(p, ca, cb, sa, sb, xg, nt, warp, k0);
            if (warp + WARPS < chunks) mma_load_chunk<T, NTB>(p, ca, cb, sa, sb, xg, nt, warp + WARPS, k1);
            if (t0 == 0) {
                __syncthreads();  // the previous row tile's readers of lut and pairs are done
                {
                    const int r = tid / NL, f = tid % NL;
                    cp_async<4>(&lut[r][f], p.table + (o0 + (r < rows_here ? r : rows_here - 1)) * NL + f);
                    cp_async_wait_all();
                }
                __syncthreads();
                for (int e = tid; e < MMA_ROWS * 256; e += TILE_THREADS) {
                    const int r = e >> 8, b = e & 255;
                    const float pair[2] = {lut[r][b & 15], lut[r][b >> 4]};
                    pairs[r][b] = pack_floats<T, 2>(pair).w[0];
                }
                __syncthreads();
            }
            float acc[NTB][4];
#pragma unroll
            for (int nb = 0; nb < NTB; ++nb)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[nb][i] = 0.0f;
            // Two chunks in turn: while one is summed, the next one's loads are in flight.
            for (int j = warp; j < chunks; j += 2 * WARPS) {
                mma_chunk<T, NTB>(k0, pairs, acc);
                if (j + 2 * WARPS < chunks) mma_load_chunk<T, NTB>(p, ca, cb, sa, sb, xg, nt, j + 2 * WARPS, k0);
                if (j + WARPS >= chunks) break;
                mma_chunk<T, NTB>(k1, pairs, acc);
                if (j + 3 * WARPS < chunks) mma_load_chunk<T, NTB>(p, ca, cb, sa, sb, xg, nt, j + 3 * WARPS, k1);
            }
            // acc[nb][i] is row g + 8·(i/2), token nb·8 + 2c + i%2 of the tile.
#pragma unroll
            for (int nb = 0; nb < NTB; ++nb)
#pragma unroll
                for (int i = 0; i < 4; ++i) red[warp][(g + 8 * (i >> 1)) * NTOK + nb * 8 + 2 * c + (i & 1)] = acc[nb][i];
            __syncthreads();
            if (tid < MMA_ROWS * NTOK) {
                const int r = tid / NTOK, tk = tid % NTOK;
                if (r < rows_here && tk < nt) {
                    float sum = 0.0f;
#pragma unroll
                    for (int w = 0; w < WARPS; ++w) sum += red[w][tid];
                    const int64_t o = o0 + r;
                    static_cast<T*>(p.y)[(t0 + tk) * nout + o] = from_float<T>(sum + (p.bias != nullptr ? p.bias[o] : 0.0f));
                }
            }
            __syncthreads();  // red is rewritten by the next token tile
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear on the tensor cores with lane-private pair tables (tuning variants 51-59, bf16,
// unmeasured). What linear_mma lost at 1 token (10.3 against the FFMA kernel's 5.85 µs, H200) went
// to ~3.5-way bank conflicts on its pair tables (all 16 rows' tables start in bank 0, so random code
// bytes collide) and to a shallow pipeline; its lookups and mma issue about 2.3 instructions a
// weight against the FFMA kernel's ~6. Here, R = 8 or 16 output rows a block:
// - The codes' values are mma.sync m16n8k16's A: rows g and (R = 16) g + 8 of the tile; with R = 8
//   A's rows 8-15 are left undefined (no instruction makes them; their sums are dropped). x is B (8
//   tokens an mma; 16-token tiles take two).
// - Lane-private pair tables: lane L = (g, c) (g = L/4, c = L%4) looks up its row's pair for a code
//   byte b, (lut[b & 15], lut[b >> 4]) in T, at word (R/8)·32·b + 32·half + L of the tables (half 1:
//   row g + 8): bank L whatever the bytes. A row's 4 copies (lanes 4g .. 4g+3) are one 16-byte store;
//   R·4 KB of dynamic shared memory (MMA_LP_PAIR_BYTES), built once per row tile from the float32
//   codebooks.
// - A lookup's address is a shift and a LOP3 from the code word, (b << 7) | (L << 2), for R = 8; one
//   byte permute, (b << 8) | (L << 2), for R = 16, row g + 8's entry an immediate 128 bytes on. The
//   load is LDS [R + UR (+ imm)]: the tables' base in a uniform register (the warp index goes through
//   warp_uniform; else ptxas adds an IADD per lookup).
// - A warp's loads for D chunks (codes, scales, x) are in flight at once, in a ring.
// - XS (variants 58, 59): one token a tile, its x copied into the shared memory after the tables
//   (mma_lp_x_offset: 16 bytes of padding every 64 columns, so that the 4 column quarters a step's
//   lanes read, 64 bytes apart, fall in distinct banks) and read with one LDS.64 a step (the 8 mma
//   columns all that token; column 0 kept): a chunk's registers are then its codes and scales only,
//   so a ring of every chunk a warp has of a 4096-column row fits (4 with 8 warps, 8 with 4).
// Per chunk of 128 columns (one group or part of one) lane (g, c) loads 16 code bytes of each of its
// rows for columns 32c .. 32c+31 of the chunk, their group scales, and x at those columns for token g
// (and g + 8 with NTB = 2). Step t (8 a chunk) takes code bytes 2t and 2t+1, columns 32c + 4t ..
// 32c + 4t + 3, as the mma's k = 2c, 2c+1, 2c+8, 2c+9: a bijection of the chunk's columns that A and B
// share, so the product is unchanged. Tokens past the tile's repeat its last one (valid memory;
// dropped). Two accumulators (even and odd steps) halve the mma chain; a chunk's sum is scaled by
// the group scales in float. The warps' sums meet in shared memory (fixed order). Codebook entries
// are rounded to T, as linear_mma's are. Takes what linear_mma takes (rust/core/src/quant/cuda.rs,
// mma_fits): 4-bit codes, n and the group size multiples of 128, x and the codes 16-byte aligned.
// ---------------------------------------------------------------------------------------------
template <int R>
constexpr int MMA_LP_PAIR_BYTES = 256 * (R / 8) * 32 * 4;

// XS: the byte offset of column `col` of x in its shared copy (after the tables).
__device__ __forceinline__ int mma_lp_x_offset(int col) { return 2 * col + 16 * (col >> 6); }

template <int R, int NTB>
struct MmaLpChunk {
    uint32_t q[R / 8][4];  // 16 code bytes of rows g (and g + 8): columns 32c .. 32c+31 of the chunk
    float m[R / 8];        // their scales of the chunk's group
    uint32_t xw[NTB][16];  // x at those columns (pairs of T) for tokens g (and g + 8); not with XS
};

template <typename T, int R, int NTB, bool XS>
__device__ __forceinline__ void mma_lp_load(const LinearParams& p, const uint8_t* const (&cr)[R / 8], const float* const (&sr)[R / 8],
                                            const T* __restrict__ xg, int nt, int j, MmaLpChunk<R, NTB>& k) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int grp = p.group == MMA_CHUNK ? j : j * MMA_CHUNK / p.group;  // the chunk lies in one group
#pragma unroll
    for (int h = 0; h < R / 8; ++h) {
        load_codes<16>(cr[h] + (int64_t)j * (MMA_CHUNK / 2), k.q[h]);
        k.m[h] = sr[h][grp];
    }
    if constexpr (!XS) {  // (XS: x is read from shared memory, a step at a time)
#pragma unroll
        for (int h = 0; h < NTB; ++h) {
            const int tk = g + 8 * h < nt ? g + 8 * h : nt - 1;
            const uint4* xp = reinterpret_cast<const uint4*>(xg + (int64_t)tk * p.in_features + (int64_t)j * MMA_CHUNK + 32 * c);
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const uint4 w = xp[v];
                k.xw[h][4 * v] = w.x, k.xw[h][4 * v + 1] = w.y, k.xw[h][4 * v + 2] = w.z, k.xw[h][4 * v + 3] = w.w;
            }
        }
    }
}

// This lane's pair for byte K of w, in the tables' half H (row g + 8·H).
template <int R, int K, int H>
__device__ __forceinline__ uint32_t mma_lp_pair(const char* pairs, uint32_t w, uint32_t lane4) {
    uint32_t off;
    if constexpr (R == 16) {
        off = 128 * H + __byte_perm(w, lane4, 0x5504u | (K << 4));
    } else {
        constexpr int S = 8 * K;  // the byte's bit position
        off = ((S >= 7 ? (w >> (S - 7)) : (w << (7 - S))) & 0x7f80u) | lane4;
    }
    return *reinterpret_cast<const uint32_t*>(pairs + off);
}

// A register whose value does not matter (R = 8: A's rows 8-15): no instruction sets it.
__device__ __forceinline__ uint32_t undefined_reg() {
    uint32_t r;
#ifndef LMKERN_EMU
    asm("" : "=r"(r));
#else
    r = 0x7fc07fc0u;  // NaN pairs: the rows' sums, dropped, must not leak into the kept ones
#endif
    return r;
}

// acc += the chunk's 8 mma steps (two fresh accumulators) scaled by the rows' group scales:
// acc[h][i] is token 8h + 2c + i%2 of row g + 8·(i/2). XS: x from `xs`, the shared copy's bytes at
// the lane's first column of the chunk.
template <typename T, int R, int NTB, bool XS>
__device__ __forceinline__ void mma_lp_chunk(const MmaLpChunk<R, NTB>& k, const char* pairs, const char* xs, uint32_t lane4,
                                             float (&acc)[NTB][R / 4]) {
    float cc[2][NTB][4] = {};
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        constexpr int HB = R / 8 - 1;  // the half of A's rows 8-15
        const uint32_t wa = k.q[0][t >> 1], wb = k.q[HB][t >> 1];
        uint32_t a[4];
        if (t & 1) {
            a[0] = mma_lp_pair<R, 2, 0>(pairs, wa, lane4), a[2] = mma_lp_pair<R, 3, 0>(pairs, wa, lane4);
            a[1] = R == 16 ? mma_lp_pair<R, 2, HB>(pairs, wb, lane4) : undefined_reg();
            a[3] = R == 16 ? mma_lp_pair<R, 3, HB>(pairs, wb, lane4) : undefined_reg();
        } else {
            a[0] = mma_lp_pair<R, 0, 0>(pairs, wa, lane4), a[2] = mma_lp_pair<R, 1, 0>(pairs, wa, lane4);
            a[1] = R == 16 ? mma_lp_pair<R, 0, HB>(pairs, wb, lane4) : undefined_reg();
            a[3] = R == 16 ? mma_lp_pair<R, 1, HB>(pairs, wb, lane4) : undefined_reg();
        }
#pragma unroll
        for (int h = 0; h < NTB; ++h) {
            uint32_t b[2];
            if constexpr (XS) {
                const uint2 v = *reinterpret_cast<const uint2*>(xs + 8 * t);  // columns 4t .. 4t+3 of the lane's 32
                b[0] = v.x, b[1] = v.y;
            } else {
                b[0] = k.xw[h][2 * t], b[1] = k.xw[h][2 * t + 1];
            }
            mma_16816<T>(cc[t & 1][h], a, b);
        }
    }
#pragma unroll
    for (int h = 0; h < NTB; ++h)
#pragma unroll
        for (int i = 0; i < R / 4; ++i) acc[h][i] = fmaf(k.m[i >> 1], cc[0][h][i] + cc[1][h][i], acc[h][i]);
}

template <typename T, int R, int NTB, int D, int TT, bool XS = false>
__device__ __forceinline__ void linear_mma_lp(const LinearParams& p) {
    constexpr int W = TT / 32, NTOK = XS ? 1 : 8 * NTB, NL = 16, SHARE = R * 256 / TT, WPB = (R / 8) * 32;  // WPB: words a byte
    static_assert(R == 8 || R == 16, "8 or 16 rows a block");
    static_assert(TT % (16 * R) == 0 && TT <= R * 256 && R * NTOK <= TT,
                  "whole warps and table shares of one low nibble (below); a thread per output of the tile");
    static_assert(!XS || NTB == 1, "x in shared memory: one token a tile");
    uint32_t* pairs = dynamic_smem<uint32_t>();  // MMA_LP_PAIR_BYTES<R>, then (XS) x: as launched
    char* xsm = reinterpret_cast<char*>(pairs) + MMA_LP_PAIR_BYTES<R>;
    __shared__ float red[W][NTOK][R];
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const int tid = threadIdx.x, lane = tid & 31, warp = warp_uniform(tid >> 5), g = lane >> 2, c = lane & 3;
    const uint32_t lane4 = (uint32_t)lane << 2;
    const int n = p.in_features, ng = n / p.group, nout = p.out_features, chunks = n / MMA_CHUNK;
    const int64_t tokens = p.tokens;
    griddep_launch_dependents();
    prefetch_row_tiles<4, 16, R, TT, Prefetch::Codes>(p);
    griddep_wait();
    for (int64_t o0 = (int64_t)blockIdx.x * R; o0 < nout; o0 += (int64_t)gridDim.x * R) {
        const int rows_here = (int)min64(R, nout - o0);
        // The lane's rows g (and g + 8); rows past the last one present repeat it (valid memory;
        // their sums are dropped).
        const uint8_t* cr[R / 8];
        const float* sr[R / 8];
#pragma unroll
        for (int h = 0; h < R / 8; ++h) {
            const int r = g + 8 * h < rows_here ? g + 8 * h : rows_here - 1;
            cr[h] = p.codes + (o0 + r) * p.row_bytes + 16 * c;
            sr[h] = p.scales + (o0 + r) * ng;
        }
        for (int64_t t0 = 0; t0 < tokens; t0 += NTOK) {  // uniform across the block
            const int nt = (int)min64(NTOK, tokens - t0);
            const T* xg = x + t0 * n;
            // This thread's share of the tables (first token tile only): entries e = tid + TT·i, row
            // e % R (fixed), byte e / R, whose low nibble is fixed too (TT a multiple of 16·R). Its
            // codebook entries are read first, then the ring's chunks, then the tables are stored
            // (the barrier after the previous token tile's sums ended every read of the old ones).
            // Lanes 0-7 of a store phase write one byte's rows 0-7 (or 8-15): 128 consecutive bytes.
            const int tr = tid % R, tb = tid / R;
            float lo = 0.0f, hi[SHARE];
            if (t0 == 0) {
                const float* cb = p.table + (o0 + (tr < rows_here ? tr : rows_here - 1)) * NL;
                lo = cb[tb & 15];
#pragma unroll
                for (int i = 0; i < SHARE; ++i) hi[i] = cb[(tb + i * (TT / R)) >> 4];
            }
            MmaLpChunk<R, NTB> k[D];
#pragma unroll
            for (int i = 0; i < D; ++i)
                if (warp + i * W < chunks) mma_lp_load<T, R, NTB, XS>(p, cr, sr, xg, nt, warp + i * W, k[i]);
            if constexpr (XS) {  // the token's x, 8 columns a copy (n is a multiple of 128)
                for (int pc = tid; pc < n / 8; pc += TT)
                    *reinterpret_cast<uint4*>(xsm + mma_lp_x_offset(8 * pc)) = reinterpret_cast<const uint4*>(xg)[pc];
            }
            if (t0 == 0) {
#pragma unroll
                for (int i = 0; i < SHARE; ++i) {
                    const float pair[2] = {lo, hi[i]};
                    const uint32_t v = pack_floats<T, 2>(pair).w[0];
                    *reinterpret_cast<uint4*>(&pairs[WPB * (tb + i * (TT / R)) + 32 * (tr >> 3) + 4 * (tr & 7)]) = make_uint4(v, v, v, v);
                }
            }
            if (XS || t0 == 0) __syncthreads();  // the pair tables are built, x is in
            float acc[NTB][R / 4] = {};
            for (int j0 = warp; j0 < chunks; j0 += D * W) {
#pragma unroll
                for (int i = 0; i < D; ++i) {
                    const int j = j0 + i * W;
                    if (j < chunks) {
                        const char* xs = XS ? xsm + mma_lp_x_offset(j * MMA_CHUNK + 32 * c) : nullptr;
                        mma_lp_chunk<T, R, NTB, XS>(k[i], reinterpret_cast<const char*>(pairs), xs, lane4, acc);
                        if (j + D * W < chunks) mma_lp_load<T, R, NTB, XS>(p, cr, sr, xg, nt, j + D * W, k[i]);
                    }
                }
            }
            // acc[h][i]: token 8h + 2c + i%2 of row g + 8·(i/2). XS: the 8 mma columns are all the
            // tile's one token; lanes c = 0 keep column 0.
#pragma unroll
            for (int h = 0; h < NTB; ++h)
#pragma unroll
                for (int i = 0; i < R / 4; ++i)
                    if (8 * h + 2 * c + (i & 1) < NTOK) red[warp][8 * h + 2 * c + (i & 1)][g + 8 * (i >> 1)] = acc[h][i];
            __syncthreads();
            if (tid < R * NTOK) {
                const int tk = tid / R, r = tid % R;
                if (r < rows_here && tk < nt) {
                    float sum = 0.0f;
#pragma unroll
                    for (int w = 0; w < W; ++w) sum += red[w][tk][r];
                    const int64_t o = o0 + r;
                    static_cast<T*>(p.y)[(t0 + tk) * nout + o] = from_float<T>(sum + (p.bias != nullptr ? p.bias[o] : 0.0f));
                }
            }
            __syncthreads();  // red (and, for the next row tile, pairs) is rewritten
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize, tiled: the kernel for aligned shapes (n and the group size multiples of 16, out 16-byte
// aligned, the codes aligned to a slice's load width; rust/core/src/quant/cuda.rs). As the tiled
// linear: DEQ_ROWS rows per block, the row split over the block's threads in slices of 16 columns,
// one division per slice for its scale, 16-byte stores. Values are those of deq, bit for bit.
// ---------------------------------------------------------------------------------------------
constexpr int DEQ_ROWS = 8;
constexpr int DEQ_CPL = 16;

template <typename T, int BITS>
__device__ __forceinline__ void deq_tiled(const DeqParams& p) {
    constexpr int NL = 1 << BITS, R = DEQ_ROWS, CPL = DEQ_CPL;
    constexpr int SB = CPL * BITS / 8, NWORDS = (SB + 3) / 4, VW = 16 / sizeof(T);
    __shared__ float lut[R][NL];
    T* __restrict__ out = static_cast<T*>(p.out);
    const int tid = threadIdx.x, n = p.n, g = p.group, ng = n / g, slices = n / CPL;
    for (int64_t o0 = (int64_t)blockIdx.x * R; o0 < p.rows; o0 += (int64_t)gridDim.x * R) {
        const int rows_here = (int)min64(R, p.rows - o0);
        __syncthreads();  // the previous rows' readers of lut are done
        for (int e = tid; e < R * NL; e += TILE_THREADS) {
            const int r = e / NL, f = e % NL;
            float v = 0.0f;
            if (r < rows_here) v = p.table != nullptr ? p.table[(o0 + r) * NL + f] : lut_entry(BITS, p.a[o0 + r], f);
            lut[r][f] = v;
        }
        __syncthreads();
        for (int s = tid; s < slices; s += TILE_THREADS) {
            const int64_t c0 = (int64_t)s * CPL;
            const uint8_t* cp = p.codes + o0 * p.row_bytes + (int64_t)s * SB;
            const float* sp = p.scales + o0 * ng + (int)(c0 / g);
            uint32_t cw[R][NWORDS];
            float m[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r < rows_here) {
                    load_codes<SB>(cp + (int64_t)r * p.row_bytes, cw[r]);
                    m[r] = sp[(int64_t)r * ng];
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r < rows_here) {
                    T* orow = out + (o0 + r) * n + c0;
#pragma unroll
                    for (int q = 0; q < CPL / VW; ++q) {
                        float v[VW];
#pragma unroll
                        for (int e = 0; e < VW; ++e) v[e] = m[r] * lut[r][slice_field<BITS, NWORDS>(cw[r], q * VW + e)];
                        store_pack<T, VW>(orow, q, pack_floats<T, VW>(v));
                    }
                }
            }
        }
    }
}

}  // namespace quant
}  // namespace lmkern

// ---------------------------------------------------------------------------------------------
// extern "C" entry points (blocks of at most 256 threads).
// ---------------------------------------------------------------------------------------------
// quant_linear_<t>_n<NT>: the generic kernel. quant_lintile<BITS>_<t>_n<NT>: the tiled kernel, with
// CPL columns per slice and R rows per block (the Rust planner's tile_shape must agree).
#define LMKERN_QUANT_LINEAR(T, TN, NT)                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                      \
        quant_linear_##TN##_n##NT(const __grid_constant__ lmkern::quant::LinearParams p) { \
        lmkern::quant::linear<T, NT>(p);                                                   \
    }

#define LMKERN_QUANT_LINTILE(T, TN, BITS, NT, CPL, R, MINB)                                              \
    extern "C" __global__ void __launch_bounds__(lmkern::quant::TILE_THREADS, MINB)                    \
        quant_lintile##BITS##_##TN##_n##NT(const __grid_constant__ lmkern::quant::LinearParams p) {    \
        lmkern::quant::linear_tiled<T, NT, BITS, CPL, R>(p);                                           \
    }

// (NT, CPL, R, min blocks per SM) per token tile: rust/core/src/quant/cuda.rs, tile_shape. 8-bit
// codes take 8 rows at 1 and 2 tokens (16 rows of 16 code bytes do not fit in 128 registers).
#define LMKERN_QUANT_LINTILES(T, TN, BITS)   \
    LMKERN_QUANT_LINTILE(T, TN, BITS, 1, 16, (BITS == 8 ? 8 : 16), 2) \
    LMKERN_QUANT_LINTILE(T, TN, BITS, 2, 16, (BITS == 8 ? 8 : 16), 2) \
    LMKERN_QUANT_LINTILE(T, TN, BITS, 4, 8, 8, 2)   \
    LMKERN_QUANT_LINTILE(T, TN, BITS, 8, 8, 4, 2)

#define LMKERN_QUANT_DEQTILE(T, TN, BITS)                                                               \
    extern "C" __global__ void __launch_bounds__(lmkern::quant::TILE_THREADS)                         \
        quant_deqtile##BITS##_##TN(const __grid_constant__ lmkern::quant::DeqParams p) {              \
        lmkern::quant::deq_tiled<T, BITS>(p);                                                         \
    }

#define LMKERN_QUANT_ENTRIES(T, TN)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) quant_fwd_##TN(const __grid_constant__ lmkern::quant::QuantParams p) { \
        lmkern::quant::fwd<T>(p);                                                                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) quant_deq_##TN(const __grid_constant__ lmkern::quant::DeqParams p) { \
        lmkern::quant::deq<T>(p);                                                                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        quant_fake_bwd_##TN(const __grid_constant__ lmkern::quant::FakeBwdParams p) {                            \
        lmkern::quant::fake_bwd<T>(p);                                                                           \
    }                                                                                                            \
    LMKERN_QUANT_LINEAR(T, TN, 1)                                                                                \
    LMKERN_QUANT_LINEAR(T, TN, 2)                                                                                \
    LMKERN_QUANT_LINEAR(T, TN, 4)                                                                                \
    LMKERN_QUANT_LINEAR(T, TN, 8)                                                                                \
    LMKERN_QUANT_LINTILES(T, TN, 2)                                                                              \
    LMKERN_QUANT_LINTILES(T, TN, 3)                                                                              \
    LMKERN_QUANT_LINTILES(T, TN, 4)                                                                              \
    LMKERN_QUANT_LINTILES(T, TN, 8)                                                                              \
    LMKERN_QUANT_DEQTILE(T, TN, 2)                                                                               \
    LMKERN_QUANT_DEQTILE(T, TN, 3)                                                                               \
    LMKERN_QUANT_DEQTILE(T, TN, 4)                                                                               \
    LMKERN_QUANT_DEQTILE(T, TN, 8)

// Launch-shape variants of the bf16 4-bit tiled kernel, for tuning only (benches/gpu/tune_quant.py
// with LMKERN_CUDA_QUANT_TUNE=variant=<k>; rust/core/src/quant/cuda.rs, TILE_VARIANTS, must agree):
// (NT, CPL, R, threads per block, min blocks per SM, what the PDL prologue prefetches). The sweeps
// in benches/results/ (2026-11-26-h200-6 to 2026-11-27-h200-9) settled 1-32 but these two, kept
// because they won on one shape: blocks of 128 threads, 4 per SM (the same 128 registers a
// thread), which leave room on every SM for the next kernel's blocks. They lose at 4096 → 4096
// (7.96 against 5.85 µs, 1 token, PDL) and win at 4096 → 14336 (16.2 against 18.8: 896 row tiles,
// 3.4 waves of the default's blocks); 24 prefetches a line at a time, 25 in bulk.
#define LMKERN_QUANT_LINTILE_VARIANT(K, NT, CPL, R, TT, MINB, PF, FN, FG, OPT)                                      \
    extern "C" __global__ void __launch_bounds__(TT, MINB)                                                           \
        quant_lintile4_bf16_n##NT##_v##K(const __grid_constant__ lmkern::quant::LinearParams p) {                    \
        lmkern::quant::linear_tiled<__nv_bfloat16, NT, 4, CPL, R, lmkern::quant::Prefetch::PF, TT, FN, FG, OPT>(p); \
    }
LMKERN_QUANT_LINTILE_VARIANT(24, 1, 16, 16, 128, 4, Codes, 0, 0, 0)
LMKERN_QUANT_LINTILE_VARIANT(25, 1, 16, 16, 128, 4, Bulk, 0, 0, 0)
// The default 1- and 2-token shapes specialized for in_features 4096 and groups of 128 (40, 41),
// and the 1-token shape for in_features 14336 (42: 3.5 passes of the block's slices); unmeasured:
// see linear_tiled.
LMKERN_QUANT_LINTILE_VARIANT(40, 1, 16, 16, 256, 2, FirstPass, 4096, 128, 0)
LMKERN_QUANT_LINTILE_VARIANT(41, 2, 16, 16, 256, 2, FirstPass, 4096, 128, 0)
LMKERN_QUANT_LINTILE_VARIANT(42, 1, 16, 16, 256, 2, FirstPass, 14336, 128, 0)
// The default 1- and 2-token shapes with the options TILE_UNIFORM and TILE_SMEM_SUM, for every
// shape (43, 44); 40 and 41 with TILE_SMEM_SUM (45, 46); the 1-token one with TILE_UNIFORM alone
// (47); unmeasured: see TILE_UNIFORM.
#define LMKERN_QUANT_TILE_OPTS (lmkern::quant::TILE_UNIFORM | lmkern::quant::TILE_SMEM_SUM)
LMKERN_QUANT_LINTILE_VARIANT(43, 1, 16, 16, 256, 2, FirstPass, 0, 0, LMKERN_QUANT_TILE_OPTS)
LMKERN_QUANT_LINTILE_VARIANT(44, 2, 16, 16, 256, 2, FirstPass, 0, 0, LMKERN_QUANT_TILE_OPTS)
LMKERN_QUANT_LINTILE_VARIANT(45, 1, 16, 16, 256, 2, FirstPass, 4096, 128, lmkern::quant::TILE_SMEM_SUM)
LMKERN_QUANT_LINTILE_VARIANT(46, 2, 16, 16, 256, 2, FirstPass, 4096, 128, lmkern::quant::TILE_SMEM_SUM)
LMKERN_QUANT_LINTILE_VARIANT(47, 1, 16, 16, 256, 2, FirstPass, 0, 0, lmkern::quant::TILE_UNIFORM)
// The row tile by bulk copies (linear_bulk), 16 rows in chunks of RC: 1 and 2 tokens in chunks of 4
// rows (48, 49), 1 token in one chunk (50: no lookups before the whole tile is in).
#define LMKERN_QUANT_LINBULK_VARIANT(K, NT, RC)                                                        \
    extern "C" __global__ void __launch_bounds__(lmkern::quant::TILE_THREADS, 2)                      \
        quant_lintile4_bf16_n##NT##_v##K(const __grid_constant__ lmkern::quant::LinearParams p) {     \
        lmkern::quant::linear_bulk<__nv_bfloat16, NT, 4, 16, 16, RC>(p);                              \
    }
LMKERN_QUANT_LINBULK_VARIANT(48, 1, 4)
LMKERN_QUANT_LINBULK_VARIANT(49, 2, 4)
LMKERN_QUANT_LINBULK_VARIANT(50, 1, 16)
// The tensor-core linears with lane-private pair tables (linear_mma_lp), R rows a block, its pair
// tables (and 58's x) in dynamic shared memory (the launcher asks for MMA_LP_PAIR_BYTES<R>, and for
// 58 mma_lp_x_offset(n) more): R = 8 (32 KB): tiles of up to 8 tokens with rings of 4 chunks (51)
// and of 2 (52) a warp, blocks of 128 threads, 4 per SM (4096 rows: 512 blocks, one wave on 132
// SMs); tiles of 16 tokens, rings of 2 (53); tiles of 8 tokens, a ring of 4, blocks of 256 threads,
// 2 per SM (54). R = 16 (64 KB), blocks of 256 threads, 2 per SM: tiles of up to 8 tokens with rings
// of 2 (55) and 3 (56); tiles of 16 tokens, rings of 2 (57); x in shared memory, one token a tile, a
// ring of 4 (58; the launcher takes it at 1 token, n ≤ 16384). And R = 8 with x in shared memory, a
// ring of 8 in blocks of 128 threads, 4 per SM (59: 512 blocks at 4096 rows, a 4096-column row's 8
// chunks a warp all in flight).
#define LMKERN_QUANT_LINMMA_LP_VARIANT(K, R, NTOK, D, TT, MINB, XS)                                     \
    extern "C" __global__ void __launch_bounds__(TT, MINB)                                            \
        quant_linmma##R##_bf16_n##NTOK##_v##K(const __grid_constant__ lmkern::quant::LinearParams p) { \
        lmkern::quant::linear_mma_lp<__nv_bfloat16, R, (NTOK + 7) / 8, D, TT, XS>(p);                 \
    }
LMKERN_QUANT_LINMMA_LP_VARIANT(51, 8, 8, 4, 128, 4, false)
LMKERN_QUANT_LINMMA_LP_VARIANT(52, 8, 8, 2, 128, 4, false)
LMKERN_QUANT_LINMMA_LP_VARIANT(53, 8, 16, 2, 128, 4, false)
LMKERN_QUANT_LINMMA_LP_VARIANT(54, 8, 8, 4, 256, 2, false)
LMKERN_QUANT_LINMMA_LP_VARIANT(55, 16, 8, 2, 256, 2, false)
LMKERN_QUANT_LINMMA_LP_VARIANT(56, 16, 8, 3, 256, 2, false)
LMKERN_QUANT_LINMMA_LP_VARIANT(57, 16, 16, 2, 256, 2, false)
LMKERN_QUANT_LINMMA_LP_VARIANT(58, 16, 1, 4, 256, 2, true)
LMKERN_QUANT_LINMMA_LP_VARIANT(59, 8, 1, 8, 128, 4, true)

LMKERN_QUANT_ENTRIES(float, f32)
LMKERN_QUANT_ENTRIES(__nv_bfloat16, bf16)
LMKERN_QUANT_ENTRIES(__half, f16)

// quant_linmma4_<t>_n<NT>: linear_mma with tiles of NT tokens (bf16 and f16 only); two blocks per
// SM (at most 128 registers a thread), so that 4096 rows, 256 blocks, are one wave on 132 SMs.
#define LMKERN_QUANT_LINMMA(T, TN, NT)                                                                  \
    extern "C" __global__ void __launch_bounds__(lmkern::quant::TILE_THREADS, 2)                       \
        quant_linmma4_##TN##_n##NT(const __grid_constant__ lmkern::quant::LinearParams p) {            \
        lmkern::quant::linear_mma<T, NT / 8>(p);                                                       \
    }
LMKERN_QUANT_LINMMA(__nv_bfloat16, bf16, 8)
LMKERN_QUANT_LINMMA(__nv_bfloat16, bf16, 16)
LMKERN_QUANT_LINMMA(__half, f16, 8)
LMKERN_QUANT_LINMMA(__half, f16, 16)
