// Runs the kernels of cuda/norm.cu, unchanged, on the CPU emulator (emu.h) and compares them with a
// float64 reference: forward (y, h, rstd), backward (dx, per-part dw partials, dw), for every kernel
// variant, dtype, RMS/CRMS, with and without residual / weight / dh_out, for row lengths that hit
// every code path, with launch shapes as rust/core/src/norm/cuda.rs plans them and with smaller
// grids and other block shapes (grid-stride loops, idle row slots, idle packs), and in place (y
// over x, h over residual, as rms_norm_ runs them).
// Outputs are poisoned with NaN first and surrounded by guard bytes that must survive.
//
// Build and run (cuda/check.sh does):
//   g++ -std=c++17 -O2 -DLMKERN_EMU -I<cuda include> -Icuda cuda/emu/norm_emu.cpp -o norm_emu && ./norm_emu
#include "emu.h"
#include "../norm.cu"
#include "harness.h"

#include <algorithm>
#include <cinttypes>
#include <random>
#include <string>

using lmkern::norm::BwdParams;
using lmkern::norm::FwdParams;
using lmkern::norm::ReduceParams;

// ---------------------------------------------------------------------------------------------
// Kernel tables.
// ---------------------------------------------------------------------------------------------
typedef void (*FwdFn)(const FwdParams);
typedef void (*BwdFn)(const BwdParams);
typedef void (*RedFn)(const ReduceParams);

// How a row is cut (rust/core/src/norm/cuda.rs, Packing): one element at a time, 16-byte packs
// from the row's start (_v16), or 16-byte packs between a head and a tail (_s16, registers only).
enum Kind { ELEM = 0, VEC = 1, SPLIT = 2 };

struct Kernels {
    const char* name;
    int vec;            // elements per 16-byte pack
    FwdFn fwd[3][5];    // [kind][0: loop, 1/2/4: registers]
    BwdFn bwd[3][3];    // [kind][0: loop, 1/2: registers]
    RedFn reduce;
};

#define TABLE(TN, VEC)                                                                                       \
    Kernels {                                                                                                \
        #TN, VEC,                                                                                            \
            {{norm_fwd_##TN, norm_fwd_##TN##_r1, norm_fwd_##TN##_r2, nullptr, norm_fwd_##TN##_r4},           \
             {norm_fwd_##TN##_v16, norm_fwd_##TN##_v16_r1, norm_fwd_##TN##_v16_r2, nullptr, norm_fwd_##TN##_v16_r4}, \
             {nullptr, norm_fwd_##TN##_s16_r1, norm_fwd_##TN##_s16_r2, nullptr, norm_fwd_##TN##_s16_r4}}, \
            {{norm_bwd_##TN, norm_bwd_##TN##_r1, norm_bwd_##TN##_r2},                                      \
             {norm_bwd_##TN##_v16, norm_bwd_##TN##_v16_r1, norm_bwd_##TN##_v16_r2},                        \
             {nullptr, norm_bwd_##TN##_s16_r1, norm_bwd_##TN##_s16_r2}},                                   \
            norm_dw_reduce_##TN                                                                              \
    }

static double worst_y = 0, worst_dx = 0, worst_dw = 0;  // largest errors of the current dtype

// ‖a − b‖ / ‖b‖ (with NaN anywhere -> infinity).
static double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i])) return INFINITY;
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

static double sq_norm(const std::vector<double>& a) {
    double s = 0;
    for (double v : a) s += v * v;
    return s;
}

// The partition of the backward, as norm/mod.rs defines it.
static size_t dw_parts(size_t rows, size_t n) {
    const size_t ROWS_PER_PART = 16, MAX_PARTS = 512, MAX_PARTIAL_ELEMS = size_t(1) << 22;
    size_t by_rows = (rows + ROWS_PER_PART - 1) / ROWS_PER_PART;
    size_t by_size = std::max<size_t>(MAX_PARTIAL_ELEMS / std::max<size_t>(n, 1), 1);
    return std::max<size_t>(std::min(std::min(by_rows, MAX_PARTS), by_size), 1);
}

// ---------------------------------------------------------------------------------------------
// Launch shapes: the Rust planner's rules (rust/core/src/norm/cuda.rs, default tuning).
// ---------------------------------------------------------------------------------------------
struct Shape {
    int vpt;  // 0: looped kernel
    unsigned tx, ry, grid;
    size_t smem;
    int kind = -1;  // a Kind; -1: as the planner picks it
};

// Dynamic shared memory of an _s16 backward with a weight gradient (padded dw sums).
static size_t split_dw_bytes(size_t n) { return (n + n / 32) * 4; }

// The planner's packing: aligned rows take _v16; other rows of >= 32 packs (the emulator's
// buffers agree mod 16) are cut, where the registers (and for the backward with dw, the default
// 48 KiB of shared memory, 1 KiB kept aside) hold them; the rest go one element at a time.
static Kind fwd_kind(bool aligned, size_t n, int vec) {
    if (aligned) return VEC;
    return n / vec >= 32 && n / vec <= 4096 ? SPLIT : ELEM;
}
static Kind bwd_kind(bool aligned, size_t n, int vec, bool want_dw) {
    if (aligned) return VEC;
    const bool fits = n / vec >= 32 && n / vec <= 2048 && (!want_dw || split_dw_bytes(n) <= 48 * 1024 - 1024);
    return fits ? SPLIT : ELEM;
}

static void row_threads(size_t nv, size_t goal, unsigned& tx, int& vpt) {
    size_t t = ((nv + goal - 1) / goal + 31) / 32 * 32;
    t = std::min<size_t>(std::max<size_t>(t, 32), 1024);
    size_t v = (nv + t - 1) / t;
    tx = (unsigned)t;
    vpt = v <= 1 ? 1 : v == 2 ? 2 : 4;
}

static Shape plan_fwd(size_t rows, size_t nv) {
    Shape s{};
    if (nv <= 4096) {
        row_threads(nv, 2, s.tx, s.vpt);
        s.ry = (unsigned)std::min<size_t>(std::max<size_t>(256 / s.tx, 1), rows);
        s.grid = (unsigned)((rows + s.ry - 1) / s.ry);
    } else {
        s.vpt = 0, s.tx = 1024, s.ry = 1, s.grid = (unsigned)rows;
    }
    return s;
}

static Shape plan_bwd(size_t rows, size_t nv, size_t parts, int vw, bool want_dw) {
    Shape s{};
    if (nv <= 2048) {
        row_threads(nv, 1, s.tx, s.vpt);
        size_t rpp = std::max<size_t>((rows + parts - 1) / parts, 1);
        s.ry = (unsigned)std::min<size_t>(std::max<size_t>(256 / s.tx, 1), rpp);
        s.smem = want_dw && s.ry > 1 ? (size_t)(s.ry - 1) * s.tx * s.vpt * vw * 4 : 0;
    } else {
        s.vpt = 0, s.tx = 1024, s.ry = 1;
    }
    s.grid = (unsigned)parts;
    return s;
}

// ---------------------------------------------------------------------------------------------
// One forward + backward case.
// ---------------------------------------------------------------------------------------------
struct Case {
    size_t rows, n;
    bool crms, residual, weight, dh_out, want_dw, misalign;
    bool inplace = false;  // the forward writes y over x and h over residual (rms_norm_)
    double eps, offset, scale;
    double mag = 1.0;  // x and residual are drawn times this
};

static std::mt19937_64 rng(12345);

static double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

template <typename T>
static void run_case(const Kernels& K, const Case& c, const Shape* fwd_override, const Shape* bwd_override) {
    const size_t rows = c.rows, n = c.n, N = rows * n;
    const int vec = K.vec;
    // Misaligned: every buffer the same 1..VW-1 elements past a 16-byte boundary.
    const size_t mis = c.misalign ? sizeof(T) * (1 + (n + rows) % (vec - 1)) : 0;
    const bool aligned = !c.misalign && n % vec == 0;
    const double div = c.crms ? double(n) + 1 : double(n);
    char label[256];
    snprintf(label, sizeof label, "%s rows=%zu n=%zu %s res=%d w=%d dh=%d dw=%d mis=%d off=%g sc=%g mag=%g%s", K.name,
             rows, n, c.crms ? "crms" : "rms", c.residual, c.weight, c.dh_out, c.want_dw, c.misalign, c.offset, c.scale,
             c.mag, c.inplace ? " in place" : "");

    // Inputs.
    Buf x(N * sizeof(T), mis), res(c.residual ? N * sizeof(T) : 0, mis), w(c.weight ? n * sizeof(T) : 0, mis);
    for (size_t i = 0; i < N; ++i) x.as<T>()[i] = from_f<T>((float)(uniform(-2, 2) * c.mag));
    if (c.residual)
        for (size_t i = 0; i < N; ++i) res.as<T>()[i] = from_f<T>((float)(uniform(-1, 1) * c.mag));
    if (c.weight)
        for (size_t j = 0; j < n; ++j) w.as<T>()[j] = from_f<T>((float)uniform(-1.5, 1.5));
    Buf y(N * sizeof(T), mis), h(c.residual ? N * sizeof(T) : 0, mis), rstd(rows * 4, 0);

    // Forward reference (h rounded to T first, as the kernels and torch do).
    std::vector<double> href(N), yref(N), rref(rows);
    for (size_t i = 0; i < N; ++i) {
        float v = to_f(x.as<T>()[i]);
        if (c.residual) v = to_f(from_f<T>(v + to_f(res.as<T>()[i])));
        href[i] = v;
    }
    for (size_t r = 0; r < rows; ++r) {
        double ss = 0, s = 0;
        for (size_t j = 0; j < n; ++j) ss += href[r * n + j] * href[r * n + j], s += href[r * n + j];
        double ms = c.crms ? (ss + s * s) / div : ss / div;
        rref[r] = 1.0 / std::sqrt(ms + c.eps);
        for (size_t j = 0; j < n; ++j) {
            double wf = c.weight ? c.offset + to_f(w.as<T>()[j]) : 1.0;
            yref[r * n + j] = href[r * n + j] * rref[r] * wf * c.scale;
        }
    }

    // Where the kernel writes y and h: in place, over x and residual.
    Buf& yout = c.inplace ? x : y;
    Buf& hout = c.inplace ? res : h;
    FwdParams fp{};
    fp.x = x.ptr(), fp.residual = res.ptr(), fp.weight = w.ptr(), fp.y = yout.ptr(), fp.h = hout.ptr();
    fp.rstd = rstd.as<float>();
    fp.rows = (int64_t)rows, fp.n = (int32_t)n, fp.crms = c.crms;
    fp.eps = (float)c.eps, fp.inv_div = (float)(1.0 / div), fp.offset = (float)c.offset, fp.scale = (float)c.scale;
    const Kind fk = fwd_override && fwd_override->kind >= 0 ? Kind(fwd_override->kind) : fwd_kind(aligned, n, vec);
    Shape fs = fwd_override ? *fwd_override : plan_fwd(rows, n / (fk == ELEM ? 1 : vec));
    FwdFn ff = K.fwd[fk][fs.vpt];
    emu::launch(dim3(fs.grid), dim3(fs.tx, fs.ry), 0, [&] { ff(fp); });

    const double tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
    std::string fl = std::string(label) + " fwd kind=" + std::to_string(fk) + " vpt=" + std::to_string(fs.vpt) + " tx=" + std::to_string(fs.tx) +
                     " ry=" + std::to_string(fs.ry) + " grid=" + std::to_string(fs.grid);
    {
        std::vector<double> yk(N), rk(rows);
        for (size_t i = 0; i < N; ++i) yk[i] = to_f(yout.as<T>()[i]);
        for (size_t r = 0; r < rows; ++r) rk[r] = rstd.as<float>()[r];
        double ey = rel_err(yk, yref), er = rel_err(rk, rref);
        worst_y = std::max(worst_y, ey);
        expect(ey < tol, fl + ": y rel err " + std::to_string(ey));
        expect(er < 1e-6, fl + ": rstd rel err " + std::to_string(er));
        if (c.residual) {
            bool same = true;
            for (size_t i = 0; i < N; ++i) same &= (double)to_f(hout.as<T>()[i]) == href[i];
            expect(same, fl + ": h differs from round(x + residual)");
        }
        expect(yout.guards_ok() && hout.guards_ok() && rstd.guards_ok(), fl + ": forward wrote outside its outputs");
    }

    // Backward from the reference h and the kernel's rstd.
    Buf dy(N * sizeof(T), mis), hin(N * sizeof(T), mis), dho(c.dh_out ? N * sizeof(T) : 0, mis);
    Buf dx(N * sizeof(T), mis);
    for (size_t i = 0; i < N; ++i) {
        dy.as<T>()[i] = from_f<T>((float)uniform(-1, 1));
        hin.as<T>()[i] = from_f<T>((float)href[i]);
    }
    if (c.dh_out)
        for (size_t i = 0; i < N; ++i) dho.as<T>()[i] = from_f<T>((float)uniform(-0.5, 0.5));
    const bool want_dw = c.want_dw && c.weight;
    const size_t parts = dw_parts(rows, n);
    Buf partial(want_dw ? parts * n * 4 : 0, 0), dw(want_dw ? n * sizeof(T) : 0, mis);

    std::vector<double> dxref(N), dwref(n, 0.0), pref(parts * n, 0.0);
    double term2 = 0;  // ‖r·g‖² + ‖dh_out‖²
    for (size_t p = 0; p < parts; ++p) {
        const size_t r0 = p * rows / parts, r1 = (p + 1) * rows / parts;
        for (size_t r = r0; r < r1; ++r) {
            const double rr = rstd.as<float>()[r];
            double cc = 0, s = 0;
            for (size_t j = 0; j < n; ++j) {
                double wf = c.weight ? c.offset + to_f(w.as<T>()[j]) : 1.0;
                double hv = to_f(hin.as<T>()[r * n + j]);
                cc += to_f(dy.as<T>()[r * n + j]) * wf * c.scale * hv;
                s += hv;
            }
            for (size_t j = 0; j < n; ++j) {
                double wf = c.weight ? c.offset + to_f(w.as<T>()[j]) : 1.0;
                double hv = to_f(hin.as<T>()[r * n + j]), d = to_f(dy.as<T>()[r * n + j]);
                double g = d * wf * c.scale;
                double v = rr * g - rr * rr * rr / div * cc * (hv + (c.crms ? s : 0.0));
                term2 += rr * g * rr * g;
                if (c.dh_out) {
                    v += to_f(dho.as<T>()[r * n + j]);
                    term2 += (double)to_f(dho.as<T>()[r * n + j]) * to_f(dho.as<T>()[r * n + j]);
                }
                dxref[r * n + j] = v;
                pref[p * n + j] += d * hv * rr;
            }
        }
    }
    for (size_t p = 0; p < parts; ++p)
        for (size_t j = 0; j < n; ++j) dwref[j] += pref[p * n + j];
    for (size_t j = 0; j < n; ++j) dwref[j] *= c.scale;

    BwdParams bp{};
    bp.dy = dy.ptr(), bp.h = hin.ptr(), bp.weight = w.ptr(), bp.rstd = rstd.as<float>(), bp.dh_out = dho.ptr();
    bp.dx = dx.ptr(), bp.dw_partial = want_dw ? partial.as<float>() : nullptr;
    bp.rows = (int64_t)rows, bp.parts = (int64_t)parts, bp.n = (int32_t)n, bp.crms = c.crms;
    bp.inv_div = (float)(1.0 / div), bp.offset = (float)c.offset, bp.scale = (float)c.scale;
    const Kind bk = bwd_override && bwd_override->kind >= 0 ? Kind(bwd_override->kind) : bwd_kind(aligned, n, vec, want_dw);
    const int vw = bk == ELEM ? 1 : vec;
    Shape bs = bwd_override ? *bwd_override : plan_bwd(rows, n / vw, parts, vw, want_dw);
    if (bk == SPLIT) {
        bs.ry = 1;  // the _s16 backward: one row per block, dw sums in shared memory
        bs.smem = want_dw ? split_dw_bytes(n) : 0;
    } else if (bwd_override && want_dw && bs.ry > 1) {
        bs.smem = (size_t)(bs.ry - 1) * bs.tx * bs.vpt * vw * 4;
    }
    BwdFn bf = K.bwd[bk][bs.vpt];
    emu::launch(dim3(bs.grid), dim3(bs.tx, bs.ry), bs.smem, [&] { bf(bp); });
    std::string bl = std::string(label) + " bwd kind=" + std::to_string(bk) + " vpt=" + std::to_string(bs.vpt) + " tx=" + std::to_string(bs.tx) +
                     " ry=" + std::to_string(bs.ry) + " grid=" + std::to_string(bs.grid) + " parts=" + std::to_string(parts);
    {
        std::vector<double> dxk(N);
        for (size_t i = 0; i < N; ++i) dxk[i] = to_f(dx.as<T>()[i]);
        // Relative to the size of dx's largest term, r·g (and dh_out): for very short rows dx is a
        // near-cancellation (n = 1: dx = r·g·eps/(h² + eps)) that no float32 kernel gets to 1e-5
        // of |dx| itself.
        double e = rel_err(dxk, dxref) * std::sqrt(sq_norm(dxref) / std::max(sq_norm(dxref), term2));
        expect(e < tol, bl + ": dx rel err " + std::to_string(e));
        worst_dx = std::max(worst_dx, e);
        expect(dx.guards_ok(), bl + ": backward wrote outside dx");
    }
    if (want_dw) {
        std::vector<double> pk(parts * n);
        for (size_t i = 0; i < parts * n; ++i) pk[i] = partial.as<float>()[i];
        double e = rel_err(pk, pref);
        expect(e < 1e-5, bl + ": dw partials rel err " + std::to_string(e));
        expect(partial.guards_ok(), bl + ": backward wrote outside dw_partial");

        ReduceParams rp{};
        rp.partial = partial.as<float>(), rp.dw = dw.ptr(), rp.parts = (int64_t)parts, rp.n = (int32_t)n;
        rp.scale = (float)c.scale;
        emu::launch(dim3((unsigned)((n + 31) / 32)), dim3(32, 32), 0, [&] { K.reduce(rp); });
        std::vector<double> dwk(n);
        for (size_t j = 0; j < n; ++j) dwk[j] = to_f(dw.as<T>()[j]);
        double e2 = rel_err(dwk, dwref);
        expect(e2 < tol, bl + ": dw rel err " + std::to_string(e2));
        worst_dw = std::max(worst_dw, e2);
        expect(dw.guards_ok(), bl + ": reduce wrote outside dw");
        // The reduce is a fixed-order sum of the partials: check it bit for bit.
        bool exact = true;
        for (size_t j = 0; j < n; ++j) {
            float t = 0;
            for (int ch = 0; ch < 32; ++ch) {
                float a = 0;
                for (size_t q = ch * parts / 32; q < (ch + 1) * parts / 32; ++q) a += partial.as<float>()[q * n + j];
                t += a;
            }
            exact &= to_f(dw.as<T>()[j]) == to_f(from_f<T>((float)c.scale * t));
        }
        expect(exact, bl + ": dw differs from the documented summation order");
    }
}

template <typename T>
static void suite(const Kernels& K) {
    struct Report {
        const char* name;
        ~Report() {
            printf("%-5s largest relative errors vs float64: y %.2e, dx %.2e, dw %.2e\n", name, worst_y, worst_dx, worst_dw);
            worst_y = worst_dx = worst_dw = 0;
        }
    } report{K.name};
    const int vec = K.vec;
    // Row lengths: tiny, odd, pack multiples, every register tier, and the looped kernels; odd
    // rows long enough to be cut (_s16: the cut moves from row to row).
    std::vector<size_t> ns = {1, 2, 3, 7, 8, 16, 31, 33, 64, 100, 128, 257, 264, 520, 1000, 1001, 1024, 2056, 4095};
    // Beyond bwd / fwd registers; odd ones just inside them, cut (the f32 backward's dw sums fit in
    // shared memory, the 16-bit ones' do not: one element at a time).
    std::vector<size_t> big = {(size_t)2048 * vec + vec, (size_t)4096 * vec + vec, (size_t)2048 * vec - 1,
                               (size_t)4096 * vec - 1};
    int idx = 0;
    for (size_t n : ns) {
        for (size_t rows : {1, 5, 40}) {
            for (int v = 0; v < 4; ++v, ++idx) {
                Case c{};
                c.rows = rows, c.n = n;
                c.crms = (idx & 1) != 0;
                c.residual = (idx % 3) != 0;
                c.weight = (idx % 5) != 1;
                c.dh_out = (idx % 4) == 2;
                c.want_dw = (idx % 7) != 3;
                c.misalign = v == 3;
                c.eps = (idx & 2) ? 1e-6 : 1e-5;
                c.offset = (idx % 6) == 4 ? 1.0 : 0.0;
                c.scale = (idx % 8) == 5 ? 0.5 : 1.0;
                run_case<T>(K, c, nullptr, nullptr);
                if (idx % 5 == 1) {  // every pack kind, RMS and CRMS, with and without residual
                    c.inplace = true;
                    run_case<T>(K, c, nullptr, nullptr);
                }
            }
        }
    }
    for (size_t n : big) {
        Case c{};
        c.rows = 3, c.n = n, c.crms = true, c.residual = true, c.weight = true, c.dh_out = true, c.want_dw = true;
        c.eps = 1e-6, c.offset = 1.0, c.scale = 0.7;
        run_case<T>(K, c, nullptr, nullptr);
        c.inplace = true;  // the looped kernel's second pass must read h, not x + (overwritten) residual
        run_case<T>(K, c, nullptr, nullptr);
        c.crms = false, c.residual = false, c.dh_out = false, c.offset = 0.0;
        run_case<T>(K, c, nullptr, nullptr);
        c.inplace = false;
        run_case<T>(K, c, nullptr, nullptr);
    }

    // Rows of extreme magnitude where float32 still holds the forward's sums (not float16's range):
    // the backward's r³·c/d must stay in range too (r·r·r alone underflowed from RMS ~1e13).
    if (!std::is_same<T, __half>::value) {
        for (double mag : {1e-13, 1e14, 1e16}) {
            for (size_t n : {(size_t)64, (size_t)1000, (size_t)4096 * vec + vec}) {
                Case c{};
                c.rows = 3, c.n = n, c.crms = n == 1000, c.residual = n != 64, c.weight = true, c.want_dw = true;
                c.eps = mag < 1 ? 0.0 : 1e-6, c.offset = 0.0, c.scale = 1.0, c.mag = mag;
                run_case<T>(K, c, nullptr, nullptr);
                c.crms = !c.crms;
                run_case<T>(K, c, nullptr, nullptr);
            }
        }
    }

    // Other launch shapes on the same kernels: grid-stride loops (grid smaller than needed), more
    // rows per block than rows, idle packs (TX * VPT well above n/VW), looped kernels on short rows;
    // on aligned rows, misaligned rows one element at a time, and misaligned rows cut (_s16, also
    // on rows shorter than the planner cuts).
    for (size_t n : {8, 64, 200, 1024}) {
        for (int kind : {-1, (int)ELEM, (int)SPLIT}) {
            const bool misalign = kind >= 0;
            const int vw = kind == SPLIT || (!misalign && n % vec == 0) ? vec : 1;
            const size_t nv = n / vw, rows = 37, parts = dw_parts(rows, n);
            Case c{};
            c.rows = rows, c.n = n, c.crms = n % 16 == 8, c.residual = true, c.weight = true, c.dh_out = n == 64;
            c.want_dw = true, c.misalign = misalign, c.eps = 1e-6, c.offset = 0.0, c.scale = 1.0;
            for (int vpt : {1, 2, 4}) {
                unsigned tx = (unsigned)std::max<size_t>((nv + vpt - 1) / vpt, 1);
                tx = std::min<unsigned>((tx + 31) / 32 * 32, 1024);
                if ((size_t)tx * vpt < nv) continue;
                for (unsigned ry : {1u, 3u}) {
                    if (tx * ry > 1024) continue;
                    Shape fs{vpt, tx, ry, 2, 0, kind};
                    Shape bs{vpt <= 2 ? vpt : 2, tx, ry, (unsigned)std::max<size_t>(parts / 2, 1), 0, kind};
                    if ((size_t)bs.tx * bs.vpt < nv) {
                        if (kind == SPLIT) bs.vpt = 2, bs.tx = std::min<unsigned>(tx * 2, 1024);
                        else bs.vpt = 0, bs.tx = 256, bs.ry = 1;
                    }
                    run_case<T>(K, c, &fs, &bs);
                }
                Shape wide{vpt, std::min<unsigned>(tx * 2, 1024), 1, 5, 0, kind};
                const unsigned wtx = std::min<unsigned>(tx * 2, 1024);
                Shape wideb{vpt <= 2 ? vpt : 2, wtx, wtx <= 512 ? 2u : 1u, (unsigned)parts, 0, kind};
                if ((size_t)wideb.tx * wideb.vpt < nv) wideb.vpt = 0, wideb.ry = 1;
                if (wideb.vpt > 0 || kind != SPLIT) run_case<T>(K, c, &wide, &wideb);
            }
            const unsigned rtx = (unsigned)std::min<size_t>((nv + 31) / 32 * 32, 1024);
            Shape rf{1, rtx, rtx <= 256 ? 3u : 1u, 2, 0, kind};
            if (kind == SPLIT) {
                // No looped _s16 kernels: grid-stride and in place on the register kernels only.
                Shape rb{(int)std::min<size_t>((nv + rtx - 1) / rtx, 2), rtx, 1, (unsigned)std::max<size_t>(parts - 1, 1), 0, kind};
                c.inplace = true;
                run_case<T>(K, c, &rf, &rb);
                c.residual = false;
                run_case<T>(K, c, &rf, &rb);
                c.weight = false, c.dh_out = true;  // no weight: factor 1 on the head, packs and tail
                run_case<T>(K, c, &rf, &rb);
                continue;
            }
            Shape lf{0, 64, 1, 7, 0, kind}, lb{0, 96, 1, (unsigned)std::max<size_t>(parts - 1, 1), 0, kind};
            run_case<T>(K, c, &lf, &lb);
            c.inplace = true;  // grid-stride in place, on both kinds of kernel
            run_case<T>(K, c, &lf, &lb);
            run_case<T>(K, c, &rf, &lb);
            c.residual = false;  // in place without residual: y over x alone
            run_case<T>(K, c, &lf, &lb);
            run_case<T>(K, c, &rf, &lb);
        }
    }
}

// rows == 0 with a weight gradient: the backward writes zero partials (reading nothing), dw = 0.
template <typename T>
static void empty_rows(const Kernels& K) {
    for (size_t n : {5, 64, 3000}) {
        for (int kind : {ELEM, VEC, SPLIT}) {
            if (kind == VEC && n % K.vec) continue;
            const int vw = kind == ELEM ? 1 : K.vec;
            const size_t parts = dw_parts(0, n);
            Buf partial(parts * n * 4, 0), dw(n * sizeof(T), 0), w(n * sizeof(T), 0);
            for (size_t j = 0; j < n; ++j) w.as<T>()[j] = from_f<T>(1.0f);
            BwdParams bp{};
            bp.weight = w.ptr(), bp.dw_partial = partial.as<float>(), bp.rows = 0, bp.parts = (int64_t)parts;
            bp.n = (int32_t)n, bp.inv_div = 1.0f / n, bp.scale = 1.0f;
            Shape bs = plan_bwd(0, n / vw, parts, vw, true);
            if (kind == SPLIT) bs.ry = 1, bs.smem = split_dw_bytes(n);
            if (bs.vpt == 0 && kind == SPLIT) continue;  // no looped _s16 kernel
            emu::launch(dim3(bs.grid), dim3(bs.tx, bs.ry), bs.smem, [&] { K.bwd[kind][bs.vpt](bp); });
            ReduceParams rp{};
            rp.partial = partial.as<float>(), rp.dw = dw.ptr(), rp.parts = (int64_t)parts, rp.n = (int32_t)n, rp.scale = 1.0f;
            emu::launch(dim3((unsigned)((n + 31) / 32)), dim3(32, 32), 0, [&] { K.reduce(rp); });
            bool zero = true;
            for (size_t j = 0; j < n; ++j) zero &= to_f(dw.as<T>()[j]) == 0.0f;
            expect(zero && partial.guards_ok() && dw.guards_ok(),
                   std::string(K.name) + " rows=0 n=" + std::to_string(n) + ": dw is not zero");
        }
    }
}

int main() {
    const Kernels f32 = TABLE(f32, 4), bf16 = TABLE(bf16, 8), f16 = TABLE(f16, 8);
    suite<float>(f32);
    suite<__nv_bfloat16>(bf16);
    suite<__half>(f16);
    empty_rows<float>(f32);
    empty_rows<__nv_bfloat16>(bf16);
    empty_rows<__half>(f16);
    return finish("norm_emu");
}
