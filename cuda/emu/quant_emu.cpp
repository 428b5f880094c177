// Runs the kernels of cuda/quant.cu, unchanged, on the CPU emulator (emu.h) and checks them:
//   - quantize: codes and scales bit for bit against a C++ port of the CPU rule
//     (rust/core/src/quant/cpu/mod.rs: float32 |x| ≥ thr_up(t_k·m), pack_row), and the codes against
//     round(qmax·(|x|/m)^a) in float64 away from boundaries;
//   - dequantize and fake quantize forward: bit for bit against T(m·float(lut64)), and within float
//     rounding of the float64 formula m·sign(q)·(|q|/qmax)^(1/a); dequantize through given
//     codebooks (arbitrary tables, `a` null): bit for bit against T(m·table[field]);
//   - fake quantize backward: dx and da against the float64 formulas of quant/mod.rs;
//   - linear (the generic and the tiled kernels for every bits value and token tile, and the tuning
//     variants; codebooks given as float32 tables built like power_codebook's): against
//     Σ x·m·float(lut64) + bias in float64.
// For every bits value, dtype, odd n, group sizes from 1 to n, n not a multiple of 8, all-zero
// groups, exact zeros, NaN/inf inputs (NaN scale) and exponents outside (0, 1] (NaN tables), with
// launch shapes as rust/core/src/quant/cuda.rs plans them and other ones (grid-stride loops, idle
// row slots). Outputs are poisoned first and surrounded by guard bytes that must survive.
//
// Build and run (cuda/check.sh does):
//   g++ -std=c++17 -O2 -DLMKERN_EMU -I<cuda include> -Icuda cuda/emu/quant_emu.cpp -o quant_emu && ./quant_emu
#include "emu.h"
#include "../quant.cu"
#include "harness.h"

#include <algorithm>
#include <random>
#include <string>

using lmkern::quant::DeqParams;
using lmkern::quant::FakeBwdParams;
using lmkern::quant::LinearParams;
using lmkern::quant::QuantParams;

typedef void (*FwdFn)(const QuantParams);
typedef void (*DeqFn)(const DeqParams);
typedef void (*BwdFn)(const FakeBwdParams);
typedef void (*LinFn)(const LinearParams);

struct Kernels {
    const char* name;
    FwdFn fwd;
    DeqFn deq;
    BwdFn bwd;
    LinFn lin[9];        // the generic kernel, [NT]
    LinFn tile[9][9];    // the tiled kernels, [bits][NT]
    DeqFn deqtile[9];    // the tiled dequantizers, [bits]
};

#define TILES(TN, B) \
    {nullptr, quant_lintile##B##_##TN##_n1, quant_lintile##B##_##TN##_n2, nullptr, quant_lintile##B##_##TN##_n4, \
     nullptr, nullptr, nullptr, quant_lintile##B##_##TN##_n8}

#define TABLE(TN)                                                                                       \
    Kernels {                                                                                           \
        #TN, quant_fwd_##TN, quant_deq_##TN, quant_fake_bwd_##TN,                                      \
            {nullptr, quant_linear_##TN##_n1, quant_linear_##TN##_n2, nullptr, quant_linear_##TN##_n4,  \
             nullptr, nullptr, nullptr, quant_linear_##TN##_n8},                                        \
            {{}, {}, TILES(TN, 2), TILES(TN, 3), TILES(TN, 4), {}, {}, {}, TILES(TN, 8)},              \
            {nullptr, nullptr, quant_deqtile2_##TN, quant_deqtile3_##TN, quant_deqtile4_##TN, nullptr,   \
             nullptr, nullptr, quant_deqtile8_##TN}                                                     \
    }

static std::mt19937_64 rng(2026);
static double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
static double normal() { return std::normal_distribution<double>(0.0, 1.0)(rng); }

// ---------------------------------------------------------------------------------------------
// The CPU rule (rust/core/src/quant/{mod.rs,cpu.rs}), ported.
// ---------------------------------------------------------------------------------------------
static int qmax_of(int bits) { return (1 << (bits - 1)) - 1; }

static std::vector<double> boundaries(int bits, float a) {
    const double qm = qmax_of(bits), inv_a = 1.0 / (double)a;
    std::vector<double> t;
    for (int k = 0; k < qmax_of(bits); ++k) t.push_back(std::pow((k + 0.5) / qm, inv_a));
    return t;
}

static std::vector<double> row_lut(int bits, float a) {
    const double qm = qmax_of(bits), inv_a = 1.0 / (double)a;
    std::vector<double> l;
    for (int f = 0; f < (1 << bits); ++f) {
        const int q = f >= (1 << (bits - 1)) ? f - (1 << bits) : f;
        const double v = std::pow(std::abs(q) / qm, inv_a);
        l.push_back(q < 0 ? -v : v);
    }
    return l;
}

// f32::thr_up: t rounded up to float32.
static float thr_up(double t) {
    float f = (float)t;
    if ((double)f < t) f = std::nextafter(f, INFINITY);
    return f;
}

static std::vector<float> cpu_scales(const std::vector<float>& xf, size_t rows, size_t n, size_t g, double clip) {
    const size_t ng = n / g;
    std::vector<float> s(rows * ng);
    for (size_t r = 0; r < rows; ++r)
        for (size_t gi = 0; gi < ng; ++gi) {
            float amax = 0;
            for (size_t e = 0; e < g; ++e) amax = std::max(amax, std::fabs(xf[r * n + gi * g + e]));
            s[r * ng + gi] = (float)(clip * (double)amax);
        }
    return s;
}

static std::vector<int> cpu_codes(const std::vector<float>& xf, const std::vector<float>& sc, const std::vector<float>& a,
                                  size_t rows, size_t n, size_t g, int bits) {
    std::vector<int> q(rows * n, 0);
    const size_t ng = n / g;
    for (size_t r = 0; r < rows; ++r) {
        const std::vector<double> t = boundaries(bits, a[r]);
        for (size_t gi = 0; gi < ng; ++gi) {
            const float m = sc[r * ng + gi];
            if (m == 0.0f) continue;
            std::vector<float> thr;
            for (double tk : t) thr.push_back(thr_up(std::max(tk * (double)m, 4.9406564584124654e-324)));
            for (size_t e = 0; e < g; ++e) {
                const float v = xf[r * n + gi * g + e];
                int c = 0;
                for (float th : thr) c += std::fabs(v) >= th;
                q[r * n + gi * g + e] = v < 0.0f ? -c : c;
            }
        }
    }
    return q;
}

static std::vector<uint8_t> pack(const std::vector<int>& q, size_t rows, size_t n, int bits) {
    const size_t rb = (n * bits + 7) / 8;
    std::vector<uint8_t> out(rows * rb, 0);
    for (size_t r = 0; r < rows; ++r)
        for (size_t j = 0; j < n; ++j) {
            const unsigned f = (unsigned)q[r * n + j] & ((1u << bits) - 1);
            for (int b = 0; b < bits; ++b)
                if (f >> b & 1) {
                    const size_t bit = j * bits + b;
                    out[r * rb + bit / 8] |= (uint8_t)(1u << (bit % 8));
                }
        }
    return out;
}

static int field_at(const uint8_t* row, int bits, size_t j) {
    int f = 0;
    for (int b = 0; b < bits; ++b) {
        const size_t bit = j * bits + b;
        f |= ((row[bit / 8] >> (bit % 8)) & 1) << b;
    }
    return f;
}

// ---------------------------------------------------------------------------------------------
// Launch shapes: rust/core/src/quant/cuda.rs's planner.
// ---------------------------------------------------------------------------------------------
struct Shape {
    unsigned tx, ry, grid;
};

static Shape plan_rows(size_t rows, size_t n) {
    size_t units = (n + 7) / 8;
    size_t tx = std::min<size_t>(std::max<size_t>((units + 31) / 32 * 32, 32), 256);
    size_t ry = std::min<size_t>(std::max<size_t>(256 / tx, 1), 8);
    ry = std::min(ry, std::max<size_t>(rows, 1));
    return Shape{(unsigned)tx, (unsigned)ry, (unsigned)((rows + ry - 1) / ry)};
}

static int nt_for(size_t tokens) { return tokens <= 1 ? 1 : tokens == 2 ? 2 : tokens <= 4 ? 4 : 8; }

static double tol_of(size_t es) { return es == 4 ? 2e-7 : es == 2 ? 1.0 / 128 : 0; }

// ---------------------------------------------------------------------------------------------
// Quantize, dequantize, fake quantize forward and backward for one case.
// ---------------------------------------------------------------------------------------------
struct Case {
    size_t rows, n, g;
    int bits;
    double clip;
    bool misalign, zero_group, bad_exponent, nonfinite;
};

template <typename T>
static void run_case(const Kernels& K, const Case& c, const Shape* override_shape) {
    const size_t rows = c.rows, n = c.n, g = c.g, N = rows * n, ng = n / g, rb = (n * c.bits + 7) / 8;
    const int bits = c.bits, qm = qmax_of(bits);
    const size_t mis = c.misalign ? sizeof(T) : 0;
    const bool vec = !c.misalign && n % 8 == 0;
    char label[256];
    snprintf(label, sizeof label, "%s rows=%zu n=%zu g=%zu bits=%d clip=%g mis=%d zero=%d bad_a=%d nonfinite=%d", K.name,
             rows, n, g, bits, c.clip, c.misalign, c.zero_group, c.bad_exponent, c.nonfinite);
    const Shape sh = override_shape ? *override_shape : plan_rows(rows, n);
    std::string lb = std::string(label) + " tx=" + std::to_string(sh.tx) + " ry=" + std::to_string(sh.ry) +
                     " grid=" + std::to_string(sh.grid);

    // Inputs: normal values, some exact zeros, an all-zero group, values on the code boundaries.
    Buf x(N * sizeof(T), mis), a(rows * 4, 0);
    std::vector<float> av(rows), xf(N);
    for (size_t r = 0; r < rows; ++r) av[r] = r % 3 == 0 ? 1.0f : (float)uniform(0.05, 1.0);
    if (c.bad_exponent && rows > 1) av[1] = (rows % 2) ? 0.0f : 1.5f;
    for (size_t i = 0; i < N; ++i) {
        float v = (float)(normal() * (i % 7 == 3 ? 10.0 : 1.0));
        if (i % 11 == 5) v = 0.0f;
        x.as<T>()[i] = from_f<T>(v);
    }
    if (c.zero_group && rows > 0)
        for (size_t e = 0; e < g; ++e) x.as<T>()[(rows - 1) * n + e] = from_f<T>(0.0f);
    if (c.nonfinite && N > 2) x.as<T>()[N / 2] = from_f<T>(NAN), x.as<T>()[0] = from_f<T>(INFINITY);
    for (size_t i = 0; i < N; ++i) xf[i] = to_f(x.as<T>()[i]);
    // Some elements exactly on a float32 boundary threshold of their group (the rounding-up rule).
    {
        std::vector<float> s0 = cpu_scales(xf, rows, n, g, c.clip);
        for (size_t r = 0; r < rows; ++r) {
            std::vector<double> t = boundaries(bits, av[r]);
            for (size_t gi = 0; gi < ng && !c.nonfinite; ++gi) {
                const float m = s0[r * ng + gi];
                const size_t e = r * n + gi * g + (gi * 5 + r) % g;
                if (m == 0.0f || !(av[r] > 0 && av[r] <= 1) || g < 2) continue;
                const float th = thr_up(t[(r + gi) % t.size()] * (double)m);
                const float v = (gi % 2 ? th : std::nextafter(th, 0.0f)) * ((r + gi) % 3 ? 1.0f : -1.0f);
                if (std::fabs(v) >= std::fabs(to_f(from_f<T>(v))) && std::fabs(v) <= std::fabs(to_f(from_f<T>(v))) &&
                    std::fabs(v) <= m / (float)c.clip) {
                    x.as<T>()[e] = from_f<T>(v);  // representable in T and not above the group's max
                    xf[e] = v;
                }
            }
        }
    }
    for (size_t r = 0; r < rows; ++r) a.as<float>()[r] = av[r];

    // Expected: scales, codes (CPU rule), packed bytes.
    const std::vector<float> sref = cpu_scales(xf, rows, n, g, c.clip);
    const std::vector<int> qref = cpu_codes(xf, sref, av, rows, n, g, bits);
    const std::vector<uint8_t> pref = pack(qref, rows, n, bits);

    // --- quantize
    Buf codes(rows * rb, 0), scales(rows * ng * 4, 0);
    QuantParams qp{};
    qp.x = x.ptr(), qp.a = a.as<float>(), qp.codes = codes.as<uint8_t>(), qp.y = nullptr, qp.scales = scales.as<float>();
    qp.clip = c.clip, qp.rows = (int64_t)rows, qp.n = (int32_t)n, qp.group = (int32_t)g, qp.bits = bits;
    qp.row_bytes = (int32_t)rb, qp.vec = vec;
    emu::launch(dim3(sh.grid), dim3(sh.tx, sh.ry), 0, [&] { K.fwd(qp); });
    expect(codes.guards_ok() && scales.guards_ok(), lb + ": quantize wrote outside codes/scales");
    bool scales_ok = true, nan_where_nonfinite = true;
    for (size_t r = 0; r < rows; ++r)
        for (size_t gi = 0; gi < ng; ++gi) {
            bool finite = true;
            for (size_t e = 0; e < g; ++e) finite &= std::isfinite(xf[r * n + gi * g + e]);
            const float got = scales.as<float>()[r * ng + gi];
            if (finite)
                scales_ok &= got == sref[r * ng + gi];
            else
                nan_where_nonfinite &= std::isnan(got);
        }
    expect(scales_ok, lb + ": scales differ from float32(clip·max|x|)");
    expect(nan_where_nonfinite, lb + ": a group with NaN/inf does not get a NaN scale");
    if (!c.nonfinite) {
        // Rows with a bad exponent: the codes are unspecified (the caller raises); skip them.
        bool same = true;
        for (size_t r = 0; r < rows; ++r) {
            if (!(av[r] > 0 && av[r] <= 1)) continue;
            same &= memcmp(codes.as<uint8_t>() + r * rb, pref.data() + r * rb, rb) == 0;
        }
        expect(same, lb + ": packed codes differ from the CPU rule");
        // And the CPU rule itself against round(qmax·u^a) in float64, away from boundaries.
        bool formula = true;
        for (size_t r = 0; r < rows; ++r) {
            if (!(av[r] > 0 && av[r] <= 1)) continue;
            for (size_t j = 0; j < n; ++j) {
                const double m = sref[r * ng + j / g], v = xf[r * n + j];
                if (m == 0) {
                    formula &= qref[r * n + j] == 0;
                    continue;
                }
                const double u = std::min(std::fabs(v) / m, 1e300);
                const double s = qm * std::pow(u, (double)av[r]);
                if (std::fabs(s - std::floor(s) - 0.5) < 1e-6) continue;
                const int want = (int)std::min<double>(std::floor(s + 0.5), qm) * (v < 0 ? -1 : 1);
                formula &= qref[r * n + j] == want;
            }
        }
        expect(formula, lb + ": codes differ from round(qmax·(|x|/m)^a)");
    }

    // --- dequantize (from the expected codes, so a bad row reads the same bytes as a good one)
    Buf codes_in(rows * rb, 0), scales_in(rows * ng * 4, 0), out(N * sizeof(T), mis);
    memcpy(codes_in.ptr() ? codes_in.ptr() : (void*)pref.data(), pref.data(), rows * rb);
    for (size_t i = 0; i < rows * ng; ++i) scales_in.as<float>()[i] = sref[i];
    DeqParams dp{};
    dp.codes = codes_in.as<uint8_t>(), dp.scales = scales_in.as<float>(), dp.a = a.as<float>(), dp.out = out.ptr();
    dp.rows = (int64_t)rows, dp.n = (int32_t)n, dp.group = (int32_t)g, dp.bits = bits, dp.row_bytes = (int32_t)rb, dp.vec = vec;
    emu::launch(dim3(sh.grid), dim3(sh.tx, sh.ry), 0, [&] { K.deq(dp); });
    expect(out.guards_ok(), lb + ": dequantize wrote outside out");
    // The tiled dequantizer where rust/core/src/quant/cuda.rs (deq_tiled) would plan it: the same
    // values as the row kernel, bit for bit (NaN for NaN), from the exponents and from codebooks.
    const bool deq_tile = n % 16 == 0 && g % 16 == 0 && !c.misalign;
    auto same_as_tiled = [&](const DeqParams& base, Buf& ref, const char* what) {
        if (!deq_tile) return;
        Buf tout2(N * sizeof(T), 0);
        DeqParams tp2 = base;
        tp2.out = tout2.ptr();
        // (One block for every row in some cases: the grid-stride loop over row blocks.)
        const unsigned grid = c.zero_group && rows > 8 ? 1 : (unsigned)((rows + 7) / 8);
        emu::launch(dim3(grid), dim3(256), 0, [&] { K.deqtile[bits](tp2); });
        bool same = tout2.guards_ok();
        for (size_t i = 0; i < N; ++i) {
            const float u = to_f(tout2.as<T>()[i]), v = to_f(ref.as<T>()[i]);
            same &= (u == v) || (std::isnan(u) && std::isnan(v));
        }
        expect(same, lb + ": tiled dequantize" + what + " differs from the row kernel");
    };
    same_as_tiled(dp, out, "");
    const double tol = tol_of(sizeof(T));
    if (!c.nonfinite) {  // (with NaN/inf the scales are not finite: nothing to compare)
        bool exact = true, close = true, nan_rows = true;
        for (size_t r = 0; r < rows; ++r) {
            const bool good = av[r] > 0 && av[r] <= 1;
            const std::vector<double> l64 = row_lut(bits, good ? av[r] : 1.0f);
            for (size_t j = 0; j < n; ++j) {
                const float got = to_f(out.as<T>()[r * n + j]);
                if (!good) {
                    nan_rows &= std::isnan(got);
                    continue;
                }
                const int f = field_at(pref.data() + r * rb, bits, j);
                const float m = sref[r * ng + j / g];
                exact &= got == to_f(from_f<T>(m * (float)l64[f]));
                const double want = (double)m * l64[f];
                close &= std::fabs(got - want) <= tol * std::fabs(want) + 1e-38 + (sizeof(T) == 2 ? 6e-8 : 0);
            }
        }
        expect(exact, lb + ": dequantize differs from T(m·float(lut))");
        expect(close, lb + ": dequantize differs from the float64 formula");
        expect(nan_rows, lb + ": a row with an exponent outside (0, 1] does not dequantize to NaN");
    }

    // --- dequantize through given codebooks: arbitrary float32 tables (not derived from a, a NaN
    // entry in row 0), a null `a` (it must not be read), every row valid whatever its exponent.
    {
        const size_t nl = (size_t)1 << bits;
        Buf table(rows * nl * 4, 0), tout(N * sizeof(T), mis);
        for (size_t i = 0; i < rows * nl; ++i) table.as<float>()[i] = (float)(normal() * 3.0);
        if (rows > 0 && c.bad_exponent) table.as<float>()[1] = NAN;
        DeqParams tp = dp;
        tp.a = nullptr, tp.table = table.as<float>(), tp.out = tout.ptr();
        emu::launch(dim3(sh.grid), dim3(sh.tx, sh.ry), 0, [&] { K.deq(tp); });
        expect(tout.guards_ok(), lb + ": dequantize (codebooks) wrote outside out");
        same_as_tiled(tp, tout, " (codebooks)");
        bool exact = true;
        for (size_t r = 0; r < rows && !c.nonfinite; ++r)
            for (size_t j = 0; j < n; ++j) {
                const float got = to_f(tout.as<T>()[r * n + j]);
                const float want = to_f(from_f<T>(sref[r * ng + j / g] * table.as<float>()[r * nl + field_at(pref.data() + r * rb, bits, j)]));
                exact &= (got == want) || (std::isnan(got) && std::isnan(want));
            }
        expect(exact, lb + ": dequantize (codebooks) differs from T(m·table[field])");
    }

    // --- fake quantize forward
    Buf y(N * sizeof(T), mis), fscales(rows * ng * 4, 0);
    QuantParams fp = qp;
    fp.codes = nullptr, fp.y = y.ptr(), fp.scales = fscales.as<float>();
    emu::launch(dim3(sh.grid), dim3(sh.tx, sh.ry), 0, [&] { K.fwd(fp); });
    expect(y.guards_ok() && fscales.guards_ok(), lb + ": fake quantize wrote outside y/scales");
    if (!c.nonfinite) {
        bool exact = memcmp(fscales.ptr(), scales.ptr(), rows * ng * 4) == 0;
        for (size_t r = 0; r < rows; ++r) {
            if (!(av[r] > 0 && av[r] <= 1)) continue;
            const std::vector<double> l64 = row_lut(bits, av[r]);
            for (size_t j = 0; j < n; ++j) {
                const int f = (unsigned)qref[r * n + j] & ((1u << bits) - 1);
                exact &= to_f(y.as<T>()[r * n + j]) == to_f(from_f<T>(sref[r * ng + j / g] * (float)l64[f]));
            }
        }
        expect(exact, lb + ": fake quantize differs from dequantize(quantize(x))");
    }

    // --- fake quantize backward
    if (!c.nonfinite) {
        Buf dy(N * sizeof(T), mis), dx(N * sizeof(T), mis), da(rows * 4, 0);
        for (size_t i = 0; i < N; ++i) dy.as<T>()[i] = from_f<T>((float)uniform(-1, 1));
        FakeBwdParams bp{};
        bp.dy = dy.ptr(), bp.x = x.ptr(), bp.scales = scales_in.as<float>(), bp.a = a.as<float>(), bp.dx = dx.ptr();
        bp.da = rows % 2 == 0 || !c.zero_group ? da.as<float>() : nullptr;
        bp.rows = (int64_t)rows, bp.n = (int32_t)n, bp.group = (int32_t)g, bp.bits = bits;
        emu::launch(dim3(sh.grid), dim3(sh.tx, sh.ry), 0, [&] { K.bwd(bp); });
        expect(dx.guards_ok() && da.guards_ok(), lb + ": backward wrote outside dx/da");
        bool dx_ok = true, da_ok = true;
        for (size_t r = 0; r < rows; ++r) {
            if (!(av[r] > 0 && av[r] <= 1)) continue;
            const double A = av[r];
            double da_ref = 0, da_abs = 0;
            for (size_t j = 0; j < n; ++j) {
                const double xv = xf[r * n + j], m = sref[r * ng + j / g];
                const int c0 = std::abs(qref[r * n + j]);
                double ddx = 0, dda = 0;
                if (!(xv == 0 || m == 0 || std::fabs(xv) > m)) {
                    const double sg = xv > 0 ? 1 : -1, u = std::fabs(xv) / m, lu = std::log(u + 1e-12);
                    const double rr = c0 / (double)qm;
                    const double R = c0 == 0 ? (A == 1.0 ? 1.0 : 0.0) : std::pow(rr, 1.0 / A - 1.0);
                    const double tf = c0 == 0 ? 0.0 : -(m / (A * A)) * sg * std::pow(rr, 1.0 / A) * std::log(rr);
                    ddx = R * std::pow(u + 1e-12, A - 1.0);
                    dda = tf + (m / A) * sg * R * std::pow(u + 1e-12, A) * lu;
                }
                const double go = to_f(dy.as<T>()[r * n + j]);
                const double want = go * ddx, got = to_f(dx.as<T>()[r * n + j]);
                dx_ok &= std::fabs(got - want) <= (tol + 1e-12) * std::fabs(want) + 1e-30 + (sizeof(T) == 2 ? 6e-8 : 0);
                da_ref += go * dda;
                da_abs += std::fabs(go * dda);
            }
            if (bp.da) da_ok &= std::fabs(da.as<float>()[r] - da_ref) <= 1e-6 * da_abs + 1e-30;
        }
        expect(dx_ok, lb + ": fake backward dx differs from the float64 formula");
        expect(da_ok, lb + ": fake backward da differs from the float64 sum");
    }
}

// ---------------------------------------------------------------------------------------------
// Linear.
// ---------------------------------------------------------------------------------------------
template <typename T>
static void run_linear(const Kernels& K, size_t nout, size_t n, size_t g, int bits, size_t tokens, bool bias,
                       bool misalign, unsigned grid_override, bool generic_too = true, bool force_generic = false,
                       LinFn variant = nullptr, size_t variant_rows = 0, int flags = 0, unsigned threads = 256,
                       bool lut_in_t = false, size_t dynamic_smem = 0) {
    const size_t rb = (n * bits + 7) / 8, ng = n / g;
    const size_t mis = misalign ? sizeof(T) : 0;
    const size_t nl = (size_t)1 << bits;
    Buf x(tokens * n * sizeof(T), mis), codes(nout * rb, 0), scales(nout * ng * 4, 0), a(nout * 4, 0);
    Buf table(nout * nl * 4, 0);
    Buf b(bias ? nout * 4 : 0, 0), y(tokens * nout * sizeof(T), mis);
    std::vector<int> q(nout * n);
    for (size_t i = 0; i < tokens * n; ++i) x.as<T>()[i] = from_f<T>((float)normal());
    for (size_t i = 0; i < nout * n; ++i) q[i] = (int)(rng() % (2 * qmax_of(bits) + 1)) - qmax_of(bits);
    if (nout > 2 && n > 0) q[2 * n] = -(1 << (bits - 1));  // the most negative field, never made by quantize
    std::vector<uint8_t> p = pack(q, nout, n, bits);
    memcpy(codes.ptr() ? codes.ptr() : (void*)p.data(), p.data(), nout * rb);
    for (size_t i = 0; i < nout * ng; ++i) scales.as<float>()[i] = i % 13 == 4 ? 0.0f : (float)uniform(0.01, 2.0);
    for (size_t o = 0; o < nout; ++o) a.as<float>()[o] = o % 4 == 0 ? 1.0f : (float)uniform(0.1, 1.0);
    if (nout > 5) a.as<float>()[5] = -0.5f;  // invalid: row 5's codebook is NaN, and so is row 5 of y
    // The codebooks as power_codebook writes them (row_lut in float64 rounded to float32); NaN for an
    // exponent outside (0, 1] (the op refuses those; a NaN codebook must still give NaN outputs).
    for (size_t o = 0; o < nout; ++o) {
        const float ao = a.as<float>()[o];
        const bool good = ao > 0 && ao <= 1;
        const std::vector<double> l64 = row_lut(bits, good ? ao : 1.0f);
        for (size_t f = 0; f < nl; ++f) table.as<float>()[o * nl + f] = good ? (float)l64[f] : NAN;
    }
    for (size_t o = 0; bias && o < nout; ++o) b.as<float>()[o] = (float)uniform(-1, 1);

    const int nt = nt_for(tokens);
    // The tiled kernel's shape, as rust/core/src/quant/cuda.rs (tile_shape) plans it.
    const size_t cpl = nt <= 2 ? 16 : 8, rows_per_block = nt <= 2 ? (bits == 8 ? 8 : 16) : nt == 4 ? 8 : 4;
    const bool tiled = n % cpl == 0 && g % cpl == 0 && !misalign;
    if (generic_too && tiled) run_linear<T>(K, nout, n, g, bits, tokens, bias, misalign, grid_override, false, true);
    const bool use_tile = tiled && !force_generic;
    LinearParams lp{};
    lp.x = x.ptr(), lp.codes = codes.as<uint8_t>(), lp.scales = scales.as<float>(), lp.table = table.as<float>();
    lp.bias = bias ? b.as<float>() : nullptr, lp.y = y.ptr(), lp.tokens = (int64_t)tokens, lp.out_features = (int32_t)nout;
    lp.in_features = (int32_t)n, lp.group = (int32_t)g, lp.bits = bits, lp.row_bytes = (int32_t)rb, lp.flags = flags;
    const size_t rpb = variant ? variant_rows : use_tile ? rows_per_block : 8;
    const unsigned grid = grid_override ? grid_override : (unsigned)((nout + rpb - 1) / rpb);
    LinFn f = variant ? variant : use_tile ? K.tile[bits][nt] : K.lin[nt];
    if (!f) {
        expect(false, std::string(K.name) + ": no kernel to run");
        return;
    }
    emu::prefetch_ranges() = {{codes.as<unsigned char>(), codes.bytes}, {scales.as<unsigned char>(), scales.bytes},
                              {table.as<unsigned char>(), table.bytes}};
    emu::launch(dim3(grid), dim3(threads), dynamic_smem, [&] { f(lp); });
    emu::prefetch_ranges().clear();
    char label[200];
    snprintf(label, sizeof label, "%s linear out=%zu in=%zu g=%zu bits=%d tokens=%zu bias=%d mis=%d tiled=%d nt=%d grid=%u block=%u%s%s",
             K.name, nout, n, g, bits, tokens, bias, misalign, use_tile, nt, grid, threads, variant ? " (variant)" : "", flags ? " (PDL)" : "");
    expect(y.guards_ok(), std::string(label) + ": wrote outside y");
    bool ok = true, nan_row = true;
    double worst = 0;
    for (size_t o = 0; o < nout; ++o) {
        const float ao = a.as<float>()[o];
        const bool good = ao > 0 && ao <= 1;
        const std::vector<double> l64 = row_lut(bits, good ? ao : 1.0f);
        for (size_t t = 0; t < tokens; ++t) {
            double s = bias ? b.as<float>()[o] : 0.0, sabs = std::fabs(s);
            for (size_t k = 0; k < n; ++k) {
                const int fld = (unsigned)q[o * n + k] & ((1u << bits) - 1);
                // The tensor-core kernel rounds the codebook entries to T (lut_in_t).
                const double lv = lut_in_t ? to_f(from_f<T>((float)l64[fld])) : (double)(float)l64[fld];
                const double term = to_f(x.as<T>()[t * n + k]) * (double)scales.as<float>()[o * ng + k / g] * lv;
                s += term;
                sabs += std::fabs(term);
            }
            const double got = to_f(y.as<T>()[t * nout + o]);
            if (!good) {
                nan_row &= std::isnan(got);
                continue;
            }
            const double err = std::fabs(got - s);
            worst = std::max(worst, err / (sabs + 1e-30));
            ok &= err <= tol_of(sizeof(T)) * std::fabs(s) + 1e-6 * sabs + 1e-30;
        }
    }
    expect(ok, std::string(label) + ": y differs from Σ x·m·lut + b (worst " + std::to_string(worst) + ")");
    expect(nan_row, std::string(label) + ": a row with a NaN codebook is not NaN");
}

template <typename T>
static void suite(const Kernels& K) {
    int idx = 0;
    for (int bits : {2, 3, 4, 8}) {
        for (size_t n : {1, 2, 3, 7, 8, 9, 16, 24, 33, 64, 100, 128, 260, 1000, 2051}) {
            std::vector<size_t> gs;
            for (size_t d : {(size_t)1, (size_t)2, (size_t)3, (size_t)8, (size_t)32, (size_t)128, n})
                if (d <= n && n % d == 0 && std::find(gs.begin(), gs.end(), d) == gs.end()) gs.push_back(d);
            for (size_t g : gs) {
                if (n > 500 && g < 8 && g != n) continue;  // keep the run short
                ++idx;
                Case c{};
                c.rows = idx % 3 == 0 ? 1 : idx % 3 == 1 ? 5 : 13;
                c.n = n, c.g = g, c.bits = bits;
                c.clip = idx % 5 == 2 ? 0.75 : idx % 5 == 4 ? 1.5 : 1.0;
                c.misalign = idx % 4 == 3;
                c.zero_group = idx % 2 == 0;
                c.bad_exponent = idx % 6 == 1;
                run_case<T>(K, c, nullptr);
                if (idx % 7 == 0) {
                    c.nonfinite = true;
                    run_case<T>(K, c, nullptr);
                }
            }
        }
    }
    // Other shapes: grid-stride loops and idle row slots.
    for (int bits : {3, 4}) {
        for (size_t n : {24, 130, 1000}) {
            Case c{};
            c.rows = 11, c.n = n, c.g = n % 8 == 0 ? 8 : 2, c.bits = bits, c.clip = 1.0, c.zero_group = true;
            for (Shape s : {Shape{32, 1, 3}, Shape{64, 4, 2}, Shape{256, 1, 1}, Shape{32, 8, 1}}) run_case<T>(K, c, &s);
        }
    }
    // Linear: every token tile, the generic kernel and (where the shape allows) the tiled one.
    for (int bits : {2, 3, 4, 8}) {
        for (auto shape : {std::make_pair<size_t, size_t>(19, 256), std::make_pair<size_t, size_t>(9, 96),
                           std::make_pair<size_t, size_t>(5, 37), std::make_pair<size_t, size_t>(33, 1024)}) {
            const size_t nout = shape.first, n = shape.second;
            for (size_t g : {(size_t)32, (size_t)128, n, (size_t)1}) {
                if (n % g) continue;
                for (size_t tokens : {1, 2, 3, 8, 11}) {
                    if (n == 1024 && tokens > 3) continue;
                    run_linear<T>(K, nout, n, g, bits, tokens, tokens % 2 == 1, false, 0);
                }
            }
        }
    }
    run_linear<T>(K, 40, 256, 64, 4, 2, true, true, 0);   // misaligned x: the generic kernel
    run_linear<T>(K, 40, 256, 64, 4, 5, false, false, 2);  // grid-stride over output rows
    run_linear<T>(K, 1, 32, 32, 4, 1, true, false, 0);
    // Rows of more slices than a block has threads: several passes per thread and a partial last
    // one (8224 = 514 slices of 16, 1028 of 8), for every code width.
    for (int bits : {2, 3, 4, 8}) {
        run_linear<T>(K, 3, 8224, 32, bits, 1, true, false, 0);
        run_linear<T>(K, 3, 8224, 32, bits, 2, false, false, 0);
    }
    run_linear<T>(K, 2, 8224, 8224, 4, 3, false, false, 0);
    run_linear<T>(K, 6, 4224, 128, 8, 2, false, false, 0);
    run_linear<T>(K, 9, 2048, 2048, 3, 8, true, false, 3);  // grid-stride, tiled with 4 rows per block
    // As launched with PDL (the L2 prefetch of each block's first tile, whose addresses the
    // emulator touches): full and partial row tiles, grid-stride, several token tiles.
    for (int bits : {2, 3, 4, 8}) {
        run_linear<T>(K, 19, 256, 64, bits, 1, true, false, 0, false, false, nullptr, 0, lmkern::quant::LINEAR_PDL);
        run_linear<T>(K, 21, 8224, 32, bits, 5, false, false, 2, false, false, nullptr, 0, lmkern::quant::LINEAR_PDL);
    }
}

// n = 0 (empty rows): the backward writes da = 0, the linear writes y = bias; nothing else is read.
template <typename T>
static void empty_rows(const Kernels& K) {
    const size_t rows = 5, tokens = 3;
    Buf a(rows * 4, 0), da(rows * 4, 0), b(rows * 4, 0), y(tokens * rows * sizeof(T), 0), table(rows * 16 * 4, 0);
    for (size_t r = 0; r < rows; ++r) a.as<float>()[r] = 0.5f, b.as<float>()[r] = 0.25f * (float)r - 0.5f;
    FakeBwdParams bp{};
    bp.a = a.as<float>(), bp.da = da.as<float>(), bp.rows = (int64_t)rows, bp.n = 0, bp.group = 1, bp.bits = 4;
    const Shape s = plan_rows(rows, 0);
    emu::launch(dim3(s.grid), dim3(s.tx, s.ry), 0, [&] { K.bwd(bp); });
    bool zero = da.guards_ok();
    for (size_t r = 0; r < rows; ++r) zero &= da.as<float>()[r] == 0.0f;
    expect(zero, std::string(K.name) + " n=0: da is not zero");
    LinearParams lp{};
    lp.table = table.as<float>(), lp.bias = b.as<float>(), lp.y = y.ptr(), lp.tokens = (int64_t)tokens, lp.out_features = (int32_t)rows;
    lp.in_features = 0, lp.group = 1, lp.bits = 4, lp.row_bytes = 0;
    for (LinFn f : {K.lin[4], K.tile[4][4], K.tile[4][1]}) {
        memset(y.ptr(), 0xFF, y.bytes);
        emu::launch(dim3(1), dim3(256), 0, [&] { f(lp); });
        bool bias_only = y.guards_ok();
        for (size_t t = 0; t < tokens; ++t)
            for (size_t o = 0; o < rows; ++o) bias_only &= to_f(y.as<T>()[t * rows + o]) == to_f(from_f<T>(b.as<float>()[o]));
        expect(bias_only, std::string(K.name) + " in_features=0: y is not the bias" + (f == K.lin[4] ? "" : " (tiled)"));
    }
}

// The tuning variants of the bf16 4-bit tiled kernel (quant.cu, LMKERN_QUANT_LINTILE_VARIANT), as
// the launcher plans them, with and without PDL: several passes per thread and a partial row
// block, a grid-stride loop (the prefetch of every tile a block takes), several token tiles, one
// pass of exactly the block's slices, a row length that is no multiple of 16 bytes (a bulk
// prefetch leaves the tile's last bytes out), no input columns (y = bias), groups that are no power
// of two (TILE_UNIFORM divides rather than shifts), two passes of which the second is partial, one
// block taking three row tiles (the last partial). The variants specialized
// for one in_features and group size (fn, fg) run on the shapes of that size: full and partial row
// tiles, a grid-stride loop, several token tiles, a tile of only partial rows. The bulk-copy ones
// (linear_bulk) run on the shapes it takes: rows of scales of whole 16 bytes, at most 128 groups.
static void tile_variants(const Kernels& K) {
    struct V { LinFn f; size_t tokens, rows; unsigned threads; size_t fn, fg; bool bulk = false; };
    const V vs[] = {{quant_lintile4_bf16_n1_v24, 1, 16, 128, 0, 0}, {quant_lintile4_bf16_n1_v25, 1, 16, 128, 0, 0},
                    {quant_lintile4_bf16_n1_v40, 1, 16, 256, 4096, 128}, {quant_lintile4_bf16_n2_v41, 2, 16, 256, 4096, 128},
                    {quant_lintile4_bf16_n1_v42, 1, 16, 256, 14336, 128}, {quant_lintile4_bf16_n1_v43, 1, 16, 256, 0, 0},
                    {quant_lintile4_bf16_n2_v44, 2, 16, 256, 0, 0},       {quant_lintile4_bf16_n1_v45, 1, 16, 256, 4096, 128},
                    {quant_lintile4_bf16_n2_v46, 2, 16, 256, 4096, 128},  {quant_lintile4_bf16_n1_v47, 1, 16, 256, 0, 0},
                    {quant_lintile4_bf16_n1_v48, 1, 16, 256, 0, 0, true}, {quant_lintile4_bf16_n2_v49, 2, 16, 256, 0, 0, true},
                    {quant_lintile4_bf16_n1_v50, 1, 16, 256, 0, 0, true}};
    struct S { size_t nout, n, g, tokens; bool bias; unsigned grid; };
    const S shapes[] = {{19, 8448, 128, 1, true, 0}, {40, 256, 128, 1, false, 2}, {13, 512, 512, 3, true, 1},
                        {18, 4096, 128, 1, false, 0}, {21, 4112, 16, 1, false, 0}, {5, 0, 128, 1, true, 0},
                        {40, 4096, 128, 3, true, 2}, {5, 4096, 128, 1, true, 0}, {18, 14336, 128, 1, true, 0},
                        {5, 14336, 128, 2, false, 0}, {19, 960, 96, 1, true, 0}, {17, 4320, 240, 2, false, 0},
                        {9, 4608, 64, 1, true, 0}, {23, 1024, 32, 2, false, 2}, {7, 5376, 96, 1, true, 0}, {35, 4096, 128, 1, false, 1}};
    for (const V& v : vs) {
        for (int flags : {0, lmkern::quant::LINEAR_PDL}) {
            for (const S& e : shapes) {
                if (v.fn && (e.n != v.fn || e.g != v.fg)) continue;
                // linear_bulk's shapes (rust/core/src/quant/cuda.rs, bulk_fits)
                const size_t ng = e.n ? e.n / e.g : 0;
                if (v.bulk && (e.n % 32 != 0 || ng % 4 != 0 || ng > 128)) continue;
                run_linear<__nv_bfloat16>(K, e.nout, e.n, e.g, 4, e.tokens * v.tokens, e.bias, false, e.grid, false, false, v.f, v.rows,
                                          flags, v.threads);
            }
        }
    }
}

// The tensor-core linear (quant.cu, linear_mma; rust/core/src/quant/cuda.rs plans it for bf16/f16,
// 4 bits, n and the group multiples of 128): partial row tiles, a grid-stride loop, groups of one
// and of several chunks, 1-8 tokens on the 8-token kernel, 9-16 and a second token tile on the
// 16-token one, bias or not; against the product with the codebooks rounded to T.
template <typename T>
static void mma_linears(const Kernels& K, LinFn n8, LinFn n16) {
    for (size_t tokens : {1, 2, 3, 5, 8}) {
        run_linear<T>(K, 19, 256, 128, 4, tokens, tokens % 2 == 1, false, 0, false, false, n8, 16, 0, 256, true);
        run_linear<T>(K, 40, 512, 256, 4, tokens, false, false, 2, false, false, n8, 16, 0, 256, true);
    }
    run_linear<T>(K, 7, 1024, 1024, 4, 11, true, false, 0, false, false, n8, 16, 0, 256, true);  // two token tiles
    for (size_t tokens : {9, 16, 21}) run_linear<T>(K, 21, 384, 128, 4, tokens, tokens == 9, false, 0, false, false, n16, 16, 0, 256, true);
    run_linear<T>(K, 33, 128, 128, 4, 16, true, false, 1, false, false, n16, 16, 0, 256, true);
    run_linear<T>(K, 9, 4992, 128, 4, 4, false, false, 0, false, false, n8, 16, 0, 256, true);  // 39 chunks: 4 or 5 per warp
    run_linear<T>(K, 5, 0, 128, 4, 3, true, false, 0, false, false, n8, 16, 0, 256, true);     // in_features = 0: y = bias
    // As launched with PDL (the L2 prefetch of every row tile a block takes).
    const int pdl = lmkern::quant::LINEAR_PDL;
    run_linear<T>(K, 40, 512, 256, 4, 2, true, false, 2, false, false, n8, 16, pdl, 256, true);
    run_linear<T>(K, 21, 384, 128, 4, 16, false, false, 0, false, false, n16, 16, pdl, 256, true);
}

// The tensor-core linears with lane-private pair tables (quant.cu, linear_mma_lp: tuning variants
// 51-59, bf16, 8 or 16 rows a block, the pair tables and 58-59's x in dynamic shared memory): partial
// row tiles, a grid-stride loop, groups of one and of several chunks, chunks per warp fewer than,
// equal to and more than its ring (a partial last round), 1-8 tokens on the 8-token tiles, 9-21 (two
// tiles) on the 16-token one, 1 and 3 (three tiles) on 58-59's one-token tiles, in_features 0 (y =
// bias), with and without PDL; against the product with the codebooks rounded to bf16.
static void mma_lp_variants(const Kernels& K) {
    struct V { LinFn f; size_t ntok; unsigned threads; size_t rows; bool x_smem = false; };
    const V vs[] = {{quant_linmma8_bf16_n8_v51, 8, 128, 8},   {quant_linmma8_bf16_n8_v52, 8, 128, 8},
                    {quant_linmma8_bf16_n16_v53, 16, 128, 8}, {quant_linmma8_bf16_n8_v54, 8, 256, 8},
                    {quant_linmma16_bf16_n8_v55, 8, 256, 16}, {quant_linmma16_bf16_n8_v56, 8, 256, 16},
                    {quant_linmma16_bf16_n16_v57, 16, 256, 16}, {quant_linmma16_bf16_n1_v58, 1, 256, 16, true},
                    {quant_linmma8_bf16_n1_v59, 1, 128, 8, true}};
    struct S { size_t nout, n, g; unsigned grid; };
    const S shapes[] = {{19, 256, 128, 0}, {40, 512, 256, 2}, {8, 4096, 128, 0}, {13, 4992, 128, 0}, {5, 1024, 1024, 1},
                        {9, 2176, 128, 0}, {5, 0, 128, 0}, {33, 384, 128, 3}};
    for (const V& v : vs) {
        const std::vector<size_t> token_counts = v.ntok == 8    ? std::vector<size_t>{1, 2, 5, 8}
                                                 : v.ntok == 16 ? std::vector<size_t>{9, 16, 21}
                                                                : std::vector<size_t>{1, 3};
        const size_t pairs = v.rows == 8 ? lmkern::quant::MMA_LP_PAIR_BYTES<8> : lmkern::quant::MMA_LP_PAIR_BYTES<16>;
        for (int flags : {0, lmkern::quant::LINEAR_PDL}) {
            for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; ++si) {
                const S& e = shapes[si];
                const size_t smem = pairs + (v.x_smem ? 2 * e.n + 16 * (e.n / 64) : 0);
                for (size_t tokens : token_counts) {
                    if (e.n > 2048 && tokens != token_counts[si % token_counts.size()]) continue;  // keep the run short
                    run_linear<__nv_bfloat16>(K, e.nout, e.n, e.g, 4, tokens, (tokens + si) % 2 == 1, false, e.grid, false, false, v.f,
                                              v.rows, flags, v.threads, true, smem);
                }
            }
        }
    }
}

int main() {
    const Kernels f32 = TABLE(f32), bf16 = TABLE(bf16), f16 = TABLE(f16);
    mma_linears<__nv_bfloat16>(bf16, quant_linmma4_bf16_n8, quant_linmma4_bf16_n16);
    mma_linears<__half>(f16, quant_linmma4_f16_n8, quant_linmma4_f16_n16);
    tile_variants(bf16);
    mma_lp_variants(bf16);
    suite<float>(f32);
    suite<__nv_bfloat16>(bf16);
    suite<__half>(f16);
    empty_rows<float>(f32);
    empty_rows<__nv_bfloat16>(bf16);
    empty_rows<__half>(f16);
    return finish("quant_emu");
}
