//! CPU power-quantization kernels: rows split across lmkern's pool, every row computed in a fixed
//! order (results do not depend on the thread count). See the module docs of [`super`] for the
//! operator and the packed layout.
use super::{boundaries, pack_row, qmax, row_lut, unpack_fields, LinearArgs, QuantArgs, SearchArgs, Tables, FAKE_GRAD_EPS};
use crate::cpu::{multiversion, rows_of, rows_of_mut, slice, Acc, Elem};
use crate::error::{Error, Result};
use crate::parallel;
use crate::tensor::DType;
use half::{bf16, f16};
use std::sync::atomic::{AtomicBool, Ordering};

/// The comparison/accumulation type of an element type (f32, or f64 for f64 input).
pub trait Real: Acc {
    /// `t` (> 0) rounded up to this type: `v >= Self::thr_up(t)` ⟺ `v >= t` for every v of this type.
    fn thr_up(t: f64) -> Self;
    fn to_f64(self) -> f64;
    fn abs(self) -> Self;
    fn is_neg(self) -> bool;
}

impl Real for f32 {
    #[inline(always)]
    fn thr_up(t: f64) -> f32 {
        let f = t as f32; // round to nearest
        if (f as f64) < t {
            f.next_up()
        } else {
            f
        }
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn abs(self) -> f32 {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_neg(self) -> bool {
        self < 0.0
    }
}

impl Real for f64 {
    #[inline(always)]
    fn thr_up(t: f64) -> f64 {
        t
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn abs(self) -> f64 {
        f64::abs(self)
    }
    #[inline(always)]
    fn is_neg(self) -> bool {
        self < 0.0
    }
}

/// An element type whose accumulation type is [`Real`] (every lmkern dtype).
pub trait QElem: Elem<Acc: Real> {
    /// The element is float32 (the AVX2 dequantizer writes float32 only).
    const IS_F32: bool = false;
}
impl QElem for f32 {
    const IS_F32: bool = true;
}
impl QElem for f64 {}
impl QElem for f16 {}
impl QElem for bf16 {}

/// Rows handed to one task: about 16K elements of work, independent of the thread count.
fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).clamp(1, 256)
}

/// A raw address that tasks may share; each task touches only its own disjoint part (see uses).
#[derive(Clone, Copy)]
struct Shared(usize);

/// max|x| of a group, and whether every element is finite.
#[inline(always)]
fn absmax<A: Real>(xs: &[A]) -> (A, bool) {
    const L: usize = 8;
    let mut m = [A::ZERO; L];
    let mut z = [A::ZERO; L]; // Σ x·0: 0 unless some x is NaN or ±inf
    let chunks = xs.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            let v = c[i].abs();
            m[i] = if v > m[i] { v } else { m[i] };
            z[i] += c[i] * A::ZERO;
        }
    }
    for (i, v) in tail.iter().enumerate() {
        let a = v.abs();
        m[i] = if a > m[i] { a } else { m[i] };
        z[i] += *v * A::ZERO;
    }
    let mut mm = m[0];
    let mut zz = A::ZERO;
    for i in 0..L {
        mm = if m[i] > mm { m[i] } else { mm };
        zz += z[i];
    }
    (mm, zz == A::ZERO)
}

/// The scaled boundaries T_k = t_k·m (m > 0) of a group as this type's thresholds: never 0, so x = 0
/// stays code 0 even when t_k·m underflows.
#[inline(always)]
fn threshold<A: Real>(t: &[f64], m: f64, k: usize) -> A {
    A::thr_up((t[k] * m).max(f64::from_bits(1)))
}

#[inline(always)]
fn thresholds<A: Real, const P: usize>(t: &[f64], m: f64) -> [A; P] {
    let mut thr = [A::ZERO; P];
    for (k, v) in thr.iter_mut().enumerate() {
        *v = threshold(t, m, k);
    }
    thr
}

/// |q| of every element of a group: the number of scaled boundaries `T_k = t_k·m` at or below |x|.
#[inline(always)]
fn count_codes<A: Real>(xs: &[A], t: &[f64], m: f32, cnt: &mut [u32]) {
    let cnt = &mut cnt[..xs.len()];
    if m == 0.0 {
        cnt.fill(0); // an all-zero group: every code 0
        return;
    }
    let m = m as f64;
    match t.len() {
        1 => count_at_or_above::<A, 1>(xs, thresholds(t, m), cnt),
        3 => count_at_or_above::<A, 3>(xs, thresholds(t, m), cnt),
        7 => count_at_or_above::<A, 7>(xs, thresholds(t, m), cnt),
        _ => count_by_search(xs, t.len(), |k| threshold(t, m, k), cnt),
    }
}

/// cnt[j] = #{k : |xs[j]| ≥ thr[k]} for the P ≤ 7 boundaries of 2-, 3- and 4-bit codes: one pass,
/// the boundaries in registers (with P passes over the counts in memory the whole 4-bit quantizer
/// took 1.5x as long).
#[inline(always)]
fn count_at_or_above<A: Real, const P: usize>(xs: &[A], thr: [A; P], cnt: &mut [u32]) {
    for (c, x) in cnt.iter_mut().zip(xs) {
        let v = x.abs();
        let mut n = 0u32;
        for tk in &thr {
            n += (v >= *tk) as u32;
        }
        *c = n;
    }
}

/// 8 bits: a branchless binary search over the boundaries (`p` ≤ 127 of them, `thr(k)` each),
/// padded with +inf to 128.
#[inline(always)]
fn count_by_search<A: Real>(xs: &[A], p: usize, thr: impl Fn(usize) -> A, cnt: &mut [u32]) {
    let mut tab = [A::from_f64(f64::INFINITY); 128];
    for (k, v) in tab.iter_mut().enumerate().take(p) {
        *v = thr(k);
    }
    for (c, x) in cnt.iter_mut().zip(xs) {
        let v = x.abs();
        let mut pos = 0usize;
        let mut step = 64;
        while step > 0 {
            pos += if tab[pos + step - 1] <= v { step } else { 0 };
            step /= 2;
        }
        *c = pos as u32;
    }
}

/// Signed codes of a group from its counts.
#[inline(always)]
fn signed<A: Real>(xs: &[A], cnt: &[u32], codes: &mut [i8]) {
    for ((q, c), x) in codes.iter_mut().zip(cnt).zip(xs) {
        *q = if x.is_neg() { -(*c as i8) } else { *c as i8 };
    }
}

/// Per-task scratch of one row.
struct RowScratch<A> {
    xv: Vec<A>,
    cnt: Vec<u32>,
    codes: Vec<i8>,
}

impl<A: Real> RowScratch<A> {
    fn new(n: usize, g: usize) -> Self {
        RowScratch { xv: vec![A::ZERO; n], cnt: vec![0; g], codes: vec![0; n] }
    }
}

/// Codes of one row (into `s.codes`) and its group scales; false when x holds NaN/inf or a scale
/// overflows float32.
#[inline(always)]
fn quant_row<T: QElem>(xr: &[T], t: &[f64], q: &QuantArgs, scales: &mut [f32], s: &mut RowScratch<T::Acc>) -> bool
{
    let g = q.group;
    for (v, x) in s.xv.iter_mut().zip(xr) {
        *v = x.load();
    }
    let mut ok = true;
    for (gi, sc) in scales.iter_mut().enumerate() {
        let xs = &s.xv[gi * g..(gi + 1) * g];
        let (amax, finite) = absmax(xs);
        let m = (q.clip * amax.to_f64()) as f32;
        ok &= finite && m.is_finite();
        *sc = m;
        count_codes(xs, t, m, &mut s.cnt);
        signed(xs, &s.cnt, &mut s.codes[gi * g..(gi + 1) * g]);
    }
    ok
}

fn lut_of<A: Real>(bits: u32, a: f32) -> Vec<A> {
    row_lut(bits, a).into_iter().map(A::from_f64).collect()
}

// ---------------------------------------------------------------------------------------------
// quantize / dequantize / fake quantize
// ---------------------------------------------------------------------------------------------

/// # Safety
/// See [`super::quantize`].
pub unsafe fn quantize(dtype: DType, q: &QuantArgs, x: u64, a: u64, codes: u64, scales: u64) -> Result<()> {
    let ok = match dtype {
        DType::F32 => quantize_t::<f32>(q, x, a, codes, scales),
        DType::F64 => quantize_t::<f64>(q, x, a, codes, scales),
        DType::F16 => quantize_t::<f16>(q, x, a, codes, scales),
        DType::BF16 => quantize_t::<bf16>(q, x, a, codes, scales),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::value("x: expected finite values (NaN or inf found, or clip·max|x| overflows float32)"))
    }
}

unsafe fn quantize_t<T: QElem>(q: &QuantArgs, x: u64, a: u64, codes: u64, scales: u64) -> bool
{
    let (rows, n) = (q.rows, q.n);
    let ok = AtomicBool::new(true);
    let rpt = rows_per_task(n);
    let (xs, cs, ss) = (Shared(x as usize), Shared(codes as usize), Shared(scales as usize));
    parallel::for_each_task(rows.div_ceil(rpt), rows * n, |ti| {
        let (r0, r1) = (ti * rpt, ((ti + 1) * rpt).min(rows));
        if !quant_rows::<T>(q, xs, a, cs, ss, r0, r1) {
            ok.store(false, Ordering::Relaxed);
        }
    });
    ok.load(Ordering::Relaxed)
}

fn quant_rows<T: QElem>(q: &QuantArgs, x: Shared, a: u64, codes: Shared, scales: Shared, r0: usize, r1: usize) -> bool
{
    let (n, rb, ng) = (q.n, q.row_bytes(), q.groups());
    // SAFETY: tasks own disjoint row ranges [r0, r1) of codes and scales; x and a are only read.
    let (xr, ar, cr, sr) = unsafe {
        (
            rows_of::<T>(x.0 as u64, n, r0, r1),
            rows_of::<f32>(a, 1, r0, r1),
            rows_of_mut::<u8>(codes.0 as u64, rb, r0, r1),
            rows_of_mut::<f32>(scales.0 as u64, ng, r0, r1),
        )
    };
    let mut s = RowScratch::<T::Acc>::new(n, q.group);
    let mut ok = true;
    // Boundaries are recomputed only when the exponent changes from one row to the next.
    let (mut cached, mut t) = (f32::NAN, Vec::new());
    for i in 0..r1 - r0 {
        if ar[i].to_bits() != cached.to_bits() {
            (cached, t) = (ar[i], boundaries(q.bits, ar[i]));
        }
        ok &= quant_row_mv::<T>(&xr[i * n..(i + 1) * n], &t, q, &mut sr[i * ng..(i + 1) * ng], &mut s);
        pack_row(&s.codes, q.bits, &mut cr[i * rb..(i + 1) * rb]);
    }
    ok
}

/// quant_row compiled three times (AVX-512, AVX2+FMA and baseline), chosen at run time (with
/// AVX-512 the compiler's vectors are twice as wide: 11.4 -> 9.2 ms at [4096, 4096], 1 thread).
fn quant_row_mv<T: QElem>(xr: &[T], t: &[f64], q: &QuantArgs, scales: &mut [f32], s: &mut RowScratch<T::Acc>) -> bool
{
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<T: QElem>(xr: &[T], t: &[f64], q: &QuantArgs, scales: &mut [f32], s: &mut RowScratch<T::Acc>) -> bool
        {
            quant_row::<T>(xr, t, q, scales, s)
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512<T: QElem>(xr: &[T], t: &[f64], q: &QuantArgs, scales: &mut [f32], s: &mut RowScratch<T::Acc>) -> bool
        {
            quant_row::<T>(xr, t, q, scales, s)
        }
        if crate::cpu::has_avx512() {
            // SAFETY: the CPU supports AVX-512 F/BW/VL, AVX2 and FMA (checked at run time).
            return unsafe { avx512::<T>(xr, t, q, scales, s) };
        }
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { avx2::<T>(xr, t, q, scales, s) };
        }
    }
    quant_row::<T>(xr, t, q, scales, s)
}

/// # Safety
/// See [`super::dequantize`] and [`super::dequantize_codebooks`].
pub unsafe fn dequantize(dtype: DType, q: &QuantArgs, codes: u64, scales: u64, tables: Tables, out: u64) {
    match dtype {
        DType::F32 => dequantize_t::<f32>(q, codes, scales, tables, out),
        DType::F64 => dequantize_t::<f64>(q, codes, scales, tables, out),
        DType::F16 => dequantize_t::<f16>(q, codes, scales, tables, out),
        DType::BF16 => dequantize_t::<bf16>(q, codes, scales, tables, out),
    }
}

struct Deq<'a> {
    q: &'a QuantArgs,
    codes: u64,
    scales: u64,
    tables: Tables,
    out: u64,
}

unsafe fn dequantize_t<T: QElem>(q: &QuantArgs, codes: u64, scales: u64, tables: Tables, out: u64)
{
    let d = Deq { q, codes, scales, tables, out };
    let rpt = rows_per_task(q.n);
    parallel::for_each_task(q.rows.div_ceil(rpt), q.rows * q.n, |ti| {
        deq_rows::<T>(&d, ti * rpt, ((ti + 1) * rpt).min(q.rows))
    });
}

multiversion!(fn deq_rows<T: QElem>(d: &Deq, r0: usize, r1: usize) => deq_rows_body);

/// The table of row r: from its exponent (float64, rounded to the accumulation type) or its
/// codebook (float32, as given).
///
/// # Safety
/// r < q.rows; the exponents or codebooks are valid buffers as [`super::dequantize`] and
/// [`super::dequantize_codebooks`] document.
unsafe fn row_table<A: Real>(tables: Tables, bits: u32, r: usize) -> Vec<A> {
    match tables {
        Tables::Exponents(a) => lut_of(bits, *(a as *const f32).add(r)),
        Tables::Codebooks(t) => {
            let nl = 1usize << bits;
            slice::<f32>(t + (4 * r * nl) as u64, nl).iter().map(|&v| A::from_f64(v as f64)).collect()
        }
    }
}

#[inline(always)]
fn deq_rows_body<T: QElem>(d: &Deq, r0: usize, r1: usize)
{
    let q = d.q;
    let (n, rb, ng, g) = (q.n, q.row_bytes(), q.groups(), q.group);
    // SAFETY: tasks write disjoint row ranges of out; the rest is only read.
    let (cr, sr, o) = unsafe {
        (rows_of::<u8>(d.codes, rb, r0, r1), rows_of::<f32>(d.scales, ng, r0, r1), rows_of_mut::<T>(d.out, n, r0, r1))
    };
    let mut f = vec![0u8; n];
    for i in 0..r1 - r0 {
        // SAFETY: r0 + i < q.rows.
        let lut = unsafe { row_table::<T::Acc>(d.tables, q.bits, r0 + i) };
        let orow = &mut o[i * n..(i + 1) * n];
        if T::IS_F32 && (fast_path(q) || fast8_path(q) || fast23_path(q)) {
            // SAFETY: the *_path checks gave AVX2+FMA, the code width, and n and g multiples of 32
            // (4 bits), 16 (8 bits) or 8 (2, 3 bits; the AVX-512 forms: of 16, and has_avx512 gave
            // AVX-512 F/BW/VL); T is f32, so orow is n float32 and the table 2^bits float32.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (codes, scales, table, out) =
                    (&cr[i * rb..(i + 1) * rb], &sr[i * ng..(i + 1) * ng], lut.as_ptr() as *const f32, orow.as_mut_ptr() as *mut f32);
                match q.bits {
                    4 if fast512_path(q) => deq_row_avx512(codes, scales, table, g, out, n),
                    4 => deq_row_avx2(codes, scales, table, g, out, n),
                    8 if crate::cpu::has_avx512() => deq_row_avx512_8bit(codes, scales, table, g, out, n),
                    8 => deq_row_avx2_8bit(codes, scales, table, g, out, n),
                    2 if crate::cpu::has_avx512() && g.is_multiple_of(16) => deq_row_avx512_small::<2>(codes, scales, table, g, out, n),
                    2 => deq_row_avx2_small::<2>(codes, scales, table, g, out, n),
                    _ if crate::cpu::has_avx512() && g.is_multiple_of(16) => deq_row_avx512_small::<3>(codes, scales, table, g, out, n),
                    _ => deq_row_avx2_small::<3>(codes, scales, table, g, out, n),
                }
            };
            continue;
        }
        unpack_fields(&cr[i * rb..(i + 1) * rb], q.bits, 0, &mut f);
        for gi in 0..ng {
            let m = T::Acc::from_f64(sr[i * ng + gi] as f64);
            for (y, &fv) in orow[gi * g..(gi + 1) * g].iter_mut().zip(&f[gi * g..(gi + 1) * g]) {
                *y = T::store(m * lut[fv as usize]);
            }
        }
    }
}

/// # Safety
/// See [`super::fake_quantize`].
pub unsafe fn fake_quantize(dtype: DType, q: &QuantArgs, x: u64, a: u64, y: u64, scales: u64) -> Result<()> {
    let ok = match dtype {
        DType::F32 => fake_t::<f32>(q, x, a, y, scales),
        DType::F64 => fake_t::<f64>(q, x, a, y, scales),
        DType::F16 => fake_t::<f16>(q, x, a, y, scales),
        DType::BF16 => fake_t::<bf16>(q, x, a, y, scales),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::value("x: expected finite values (NaN or inf found, or clip·max|x| overflows float32)"))
    }
}

unsafe fn fake_t<T: QElem>(q: &QuantArgs, x: u64, a: u64, y: u64, scales: u64) -> bool
{
    let (rows, n) = (q.rows, q.n);
    let ok = AtomicBool::new(true);
    let rpt = rows_per_task(n);
    let (xs, ys, ss) = (Shared(x as usize), Shared(y as usize), Shared(scales as usize));
    parallel::for_each_task(rows.div_ceil(rpt), rows * n, |ti| {
        let (r0, r1) = (ti * rpt, ((ti + 1) * rpt).min(rows));
        // SAFETY: tasks own disjoint row ranges of y and scales; x and a are only read.
        let (xr, ar, yr, sr) = unsafe {
            (
                rows_of::<T>(xs.0 as u64, n, r0, r1),
                rows_of::<f32>(a, 1, r0, r1),
                rows_of_mut::<T>(ys.0 as u64, n, r0, r1),
                rows_of_mut::<f32>(ss.0 as u64, q.groups(), r0, r1),
            )
        };
        let mut s = RowScratch::<T::Acc>::new(n, q.group);
        let (g, ng, mask) = (q.group, q.groups(), (1u32 << q.bits) - 1);
        for i in 0..r1 - r0 {
            let t = boundaries(q.bits, ar[i]);
            let srow = &mut sr[i * ng..(i + 1) * ng];
            if !quant_row_mv::<T>(&xr[i * n..(i + 1) * n], &t, q, srow, &mut s) {
                ok.store(false, Ordering::Relaxed);
            }
            let lut = lut_of::<T::Acc>(q.bits, ar[i]);
            for gi in 0..ng {
                let m = T::Acc::from_f64(srow[gi] as f64);
                let yrow = &mut yr[i * n + gi * g..i * n + (gi + 1) * g];
                for (yv, &c) in yrow.iter_mut().zip(&s.codes[gi * g..(gi + 1) * g]) {
                    *yv = T::store(m * lut[(c as u8 as u32 & mask) as usize]);
                }
            }
        }
    });
    ok.load(Ordering::Relaxed)
}

/// # Safety
/// See [`super::fake_quantize_backward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn fake_quantize_backward(dtype: DType, q: &QuantArgs, dy: u64, x: u64, scales: u64, a: u64, dx: u64, da: u64) {
    match dtype {
        DType::F32 => fake_bwd_t::<f32>(q, dy, x, scales, a, dx, da),
        DType::F64 => fake_bwd_t::<f64>(q, dy, x, scales, a, dx, da),
        DType::F16 => fake_bwd_t::<f16>(q, dy, x, scales, a, dx, da),
        DType::BF16 => fake_bwd_t::<bf16>(q, dy, x, scales, a, dx, da),
    }
}

unsafe fn fake_bwd_t<T: QElem>(q: &QuantArgs, dy: u64, x: u64, scales: u64, a: u64, dx: u64, da: u64)
{
    let (rows, n, g, ng) = (q.rows, q.n, q.group, q.groups());
    let rpt = rows_per_task(n);
    let (dys, xs, dxs, das) = (Shared(dy as usize), Shared(x as usize), Shared(dx as usize), Shared(da as usize));
    let qm = qmax(q.bits) as f64;
    parallel::for_each_task(rows.div_ceil(rpt), rows * n, |ti| {
        let (r0, r1) = (ti * rpt, ((ti + 1) * rpt).min(rows));
        // SAFETY: tasks own disjoint row ranges of dx and da; the inputs are only read.
        let (dyr, xr, sr, ar, dxr) = unsafe {
            (
                rows_of::<T>(dys.0 as u64, n, r0, r1),
                rows_of::<T>(xs.0 as u64, n, r0, r1),
                rows_of::<f32>(scales, ng, r0, r1),
                rows_of::<f32>(a, 1, r0, r1),
                rows_of_mut::<T>(dxs.0 as u64, n, r0, r1),
            )
        };
        // SAFETY: da has one float per row; rows [r0, r1) belong to this task alone.
        let mut dar = (das.0 != 0).then(|| unsafe { rows_of_mut::<f32>(das.0 as u64, 1, r0, r1) });
        let mut s = RowScratch::<T::Acc>::new(n, g);
        // Per |q| = c (the row's exponent a): R = r^(1/a − 1) and r^(1/a)·ln r with r = c/qmax
        // (c = 0: R = [a = 1], no first term), recomputed only when a changes from row to row; per
        // element then one ln and one exp, (u+ε)^a being (u+ε)^(a−1)·(u+ε) (six before).
        let (mut cached, mut t) = (f32::NAN, Vec::new());
        let (mut big_r, mut first) = (vec![0f64; qm as usize + 1], vec![0f64; qm as usize + 1]);
        for i in 0..r1 - r0 {
            let av = ar[i] as f64;
            if ar[i].to_bits() != cached.to_bits() {
                (cached, t) = (ar[i], boundaries(q.bits, ar[i]));
                big_r[0] = if av == 1.0 { 1.0 } else { 0.0 };
                for c in 1..big_r.len() {
                    let lr = (c as f64 / qm).ln();
                    (big_r[c], first[c]) = (((1.0 / av - 1.0) * lr).exp(), (lr / av).exp() * lr);
                }
            }
            for (v, xv) in s.xv.iter_mut().zip(&xr[i * n..(i + 1) * n]) {
                *v = xv.load();
            }
            let mut da_row = 0.0f64;
            for gi in 0..ng {
                let m32 = sr[i * ng + gi];
                let xs = &s.xv[gi * g..(gi + 1) * g];
                // The same codes the forward made, from the same stored scale.
                count_codes(xs, &t, m32, &mut s.cnt);
                let m = m32 as f64;
                for j in 0..g {
                    let e = i * n + gi * g + j;
                    let xv = xs[j].to_f64();
                    let (ddx, dda) = if xv == 0.0 || m == 0.0 || xv.abs() > m {
                        (0.0, 0.0)
                    } else {
                        let sg = xv.signum();
                        let ue = xv.abs() / m + FAKE_GRAD_EPS;
                        let lu = ue.ln();
                        let c = s.cnt[j] as usize;
                        let p = ((av - 1.0) * lu).exp(); // (u+ε)^(a−1)
                        let ddx = big_r[c] * p;
                        let dda = -(m / (av * av)) * sg * first[c] + (m / av) * sg * big_r[c] * (p * ue) * lu;
                        (ddx, dda)
                    };
                    let g_out = dyr[e].load().to_f64();
                    dxr[e] = T::store(T::Acc::from_f64(g_out * ddx));
                    da_row += g_out * dda;
                }
            }
            if let Some(d) = dar.as_deref_mut() {
                d[i] = da_row as f32;
            }
        }
    });
}

/// # Safety
/// See [`super::codebook`].
pub unsafe fn codebook(bits: u32, rows: usize, a: u64, out: u64) {
    let nl = 1usize << bits;
    let (ar, o) = (slice::<f32>(a, rows), rows_of_mut::<f32>(out, nl, 0, rows));
    // Only qmax + 1 magnitudes per row: (k/qmax)^(1/a) = exp(ln(k/qmax)/a), logarithms shared.
    let qm = qmax(bits);
    let ln: Vec<f64> = (0..=qm).map(|k| (k as f64 / qm as f64).ln()).collect();
    let mut mag = vec![0f64; nl / 2 + 1];
    for (r, &av) in ar.iter().enumerate() {
        let inv_a = 1.0 / av as f64;
        for (k, v) in mag.iter_mut().enumerate() {
            *v = if k == 0 { 0.0 } else if k as i32 <= qm { (ln[k] * inv_a).exp() } else { (k as f64 / qm as f64).powf(inv_a) };
        }
        for (f, d) in o[r * nl..(r + 1) * nl].iter_mut().enumerate() {
            let q = super::field_to_code(f as u8, bits);
            let v = mag[q.unsigned_abs() as usize];
            *d = (if q < 0 { -v } else { v }) as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// linear: y = x @ Ŵᵀ + b, and dx = dy @ Ŵ
// ---------------------------------------------------------------------------------------------

/// Inputs of a linear call, loaded to float32 once.
struct Lin<'a> {
    l: &'a LinearArgs,
    /// x as float32 [tokens, k]; for the AVX2 4-bit path each 8-block is reordered to its 4 even
    /// elements then its 4 odd elements (the order of [`decode32`]), for the AVX-512 one each
    /// 32-block to its 16 even elements then its 16 odd ones ([`decode32_avx512`]).
    xf: Vec<f32>,
    codes: u64,
    scales: u64,
    /// The rows' codebooks, float32 [out, 2^b].
    table: u64,
    bias: u64,
    y: u64,
}

/// # Safety
/// See [`super::linear`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear(dtype: DType, l: &LinearArgs, x: u64, codes: u64, scales: u64, table: u64, bias: u64, y: u64) {
    match dtype {
        DType::F32 => linear_t::<f32>(l, x, codes, scales, table, bias, y),
        DType::F64 => linear_t::<f64>(l, x, codes, scales, table, bias, y),
        DType::F16 => linear_t::<f16>(l, x, codes, scales, table, bias, y),
        DType::BF16 => linear_t::<bf16>(l, x, codes, scales, table, bias, y),
    }
}

fn fast_path(q: &QuantArgs) -> bool {
    cfg!(target_arch = "x86_64") && q.bits == 4 && q.n.is_multiple_of(32) && q.group.is_multiple_of(32) && crate::cpu::has_avx2()
}

/// The AVX-512 4-bit GEMV and dequantizer apply: as [`fast_path`], on a CPU with AVX-512.
fn fast512_path(q: &QuantArgs) -> bool {
    avx512_shape(q.bits, q.n, q.group)
}

/// [`fast512_path`] for a shape: 4 bits, `n` and the group size multiples of 32, and this CPU runs
/// the AVX-512 kernels.
pub fn avx512_shape(bits: u32, n: usize, group: usize) -> bool {
    cfg!(target_arch = "x86_64") && bits == 4 && n.is_multiple_of(32) && group.is_multiple_of(32) && crate::cpu::has_avx512()
}

/// The AVX-512 transposed GEMV of the 2-, 3- and 8-bit input gradient applies: those widths, `n`
/// and the group size multiples of 16, and this CPU runs the AVX-512 kernels.
pub fn avx512_narrow_bwd_shape(bits: u32, n: usize, group: usize) -> bool {
    cfg!(target_arch = "x86_64") && matches!(bits, 2 | 3 | 8) && n.is_multiple_of(16) && group.is_multiple_of(16) && crate::cpu::has_avx512()
}

/// The AVX2 transposed GEMV of the 2-, 3- and 8-bit input gradient applies: those widths, `n` and
/// the group size multiples of 8, a CPU with AVX2 (where [`avx512_narrow_bwd_shape`] holds too, the
/// AVX-512 one runs).
pub fn narrow_bwd_shape(bits: u32, n: usize, group: usize) -> bool {
    cfg!(target_arch = "x86_64") && matches!(bits, 2 | 3 | 8) && n.is_multiple_of(8) && group.is_multiple_of(8) && crate::cpu::has_avx2()
}

/// The AVX2 8-bit GEMV applies: 8-bit codes, the group size (so the row) a multiple of 16.
fn fast8_path(q: &QuantArgs) -> bool {
    cfg!(target_arch = "x86_64") && q.bits == 8 && q.group.is_multiple_of(16) && crate::cpu::has_avx2()
}

/// The AVX2 2-/3-bit GEMV applies: 2 or 3 bits, the group size (so the row) a multiple of 8.
fn fast23_path(q: &QuantArgs) -> bool {
    cfg!(target_arch = "x86_64") && (q.bits == 2 || q.bits == 3) && q.group.is_multiple_of(8) && crate::cpu::has_avx2()
}

unsafe fn linear_t<T: QElem>(l: &LinearArgs, x: u64, codes: u64, scales: u64, table: u64, bias: u64, y: u64)
{
    let (k, nout, tokens) = (l.q.n, l.q.rows, l.tokens);
    let xin = slice::<T>(x, tokens * k);
    let fast512 = fast512_path(&l.q);
    let fast = fast_path(&l.q) && !fast512;
    let fast8 = fast8_path(&l.q);
    let fast23 = fast23_path(&l.q);
    let mut xf = vec![0f32; tokens * k];
    if fast512 {
        // The order in which decode32_avx512 produces them: each 32-block's even elements, then its odd ones.
        for (dst, src) in xf.chunks_exact_mut(32).zip(xin.chunks_exact(32)) {
            for i in 0..16 {
                dst[i] = src[2 * i].load().to_f64() as f32;
                dst[16 + i] = src[2 * i + 1].load().to_f64() as f32;
            }
        }
    } else if fast {
        // The order in which decode32 produces the weights of 32 codes.
        for (dst, src) in xf.chunks_exact_mut(32).zip(xin.chunks_exact(32)) {
            for j in 0..4 {
                for i in 0..4 {
                    dst[8 * j + i] = src[8 * j + 2 * i].load().to_f64() as f32;
                    dst[8 * j + 4 + i] = src[8 * j + 2 * i + 1].load().to_f64() as f32;
                }
            }
        }
    } else {
        for (d, s) in xf.iter_mut().zip(xin) {
            *d = s.load().to_f64() as f32;
        }
    }
    let lin = Lin { l, xf, codes, scales, table, bias, y };
    // Tiles of output rows: each reads its rows' codes once per tile of tokens (4-bit: 8, then 4, 2,
    // 1; 2-, 3- and 8-bit: 4, then 1). The calling thread
    // and the pool's threads each take the next tile until none is left: the caller starts at once
    // (rather than sleeping until a pool thread wakes: 2.0-2.3 -> 1.3-1.4 ms side by side with the
    // dense GEMV on this VM), and a thread the OS preempts holds up one tile, never a share of the
    // rows fixed in advance. Every row is still computed by one tile in a fixed order
    // (deterministic whatever the thread count).
    let work = nout * k * tokens.max(1);
    let tiles = nout.div_ceil(TILE);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let body = || loop {
        let ti = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if ti >= tiles {
            break;
        }
        let (o0, o1) = (ti * TILE, ((ti + 1) * TILE).min(nout));
        if fast512 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: fast512_path checked AVX-512F, AVX2+FMA, 4 bits, k and the group size
            // multiples of 32; x is in decode32_avx512's order.
            unsafe {
                linear_tiles_avx512::<T>(&lin, o0, o1)
            }
        } else if fast {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: fast_path checked AVX2+FMA, 4 bits, k and the group size multiples of 32.
            unsafe {
                linear_tiles_avx2::<T>(&lin, o0, o1)
            }
        } else if fast8 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: fast8_path checked AVX2+FMA, 8 bits, k and the group size multiples of 16
            // (has_avx512 AVX-512 too).
            unsafe {
                if crate::cpu::has_avx512() {
                    linear_tiles_avx512_8bit::<T>(&lin, o0, o1)
                } else {
                    linear_tiles_avx2_8bit::<T>(&lin, o0, o1)
                }
            }
        } else if fast23 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: fast23_path checked AVX2+FMA, 2 or 3 bits, k and the group size multiples of 8
            // (of 16 and AVX-512 F/BW/VL too, has_avx512, for the AVX-512 form).
            unsafe {
                match (l.q.bits, crate::cpu::has_avx512() && l.q.group.is_multiple_of(16)) {
                    (2, true) => linear_tiles_avx512_small::<T, 2>(&lin, o0, o1),
                    (_, true) => linear_tiles_avx512_small::<T, 3>(&lin, o0, o1),
                    (2, false) => linear_tiles_avx2_small::<T, 2>(&lin, o0, o1),
                    (_, false) => linear_tiles_avx2_small::<T, 3>(&lin, o0, o1),
                }
            }
        } else {
            linear_tile::<T>(&lin, o0, o1)
        }
    };
    parallel::run_with_caller(tiles - 1, work, body);
}

/// Rows o0..o1 of the AVX2 4-bit path, every token: tiles of 8 tokens, then 4, 2, 1.
///
/// # Safety
/// As [`linear_tile_avx2`] (without t0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_tiles_avx2<T: QElem>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut t0 = 0;
    while t0 < tokens {
        t0 += match tokens - t0 {
            r if r >= 8 => linear_tile_avx2_wide::<T, 8>(lin, o0, o1, t0),
            r if r >= 4 => linear_tile_avx2_wide::<T, 4>(lin, o0, o1, t0),
            r if r >= 2 => linear_tile_avx2::<T, 2>(lin, o0, o1, t0),
            _ => linear_tile_avx2::<T, 1>(lin, o0, o1, t0),
        };
    }
}

/// Rows o0..o1 of the AVX-512 4-bit path, every token: tiles of 8 tokens, then 4, 2, 1.
///
/// # Safety
/// As [`linear_tile_avx512`] (without t0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn linear_tiles_avx512<T: QElem>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut t0 = 0;
    while t0 < tokens {
        t0 += match tokens - t0 {
            r if r >= 8 => linear_tile_avx512::<T, 8>(lin, o0, o1, t0),
            r if r >= 4 => linear_tile_avx512::<T, 4>(lin, o0, o1, t0),
            r if r >= 2 => linear_tile_avx512::<T, 2>(lin, o0, o1, t0),
            _ => linear_tile_avx512::<T, 1>(lin, o0, o1, t0),
        };
    }
}

/// Rows o0..o1 of the AVX2 8-bit path, every token: tiles of 4 tokens, then single ones.
///
/// # Safety
/// AVX2 and FMA; 8-bit codes; k and the group size multiples of 16; `lin` valid as
/// [`super::linear`] documents (x in column order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_tiles_avx2_8bit<T: QElem>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut t0 = 0;
    while t0 < tokens {
        t0 += if tokens - t0 >= 4 {
            linear_tile_avx2_8bit::<T, 4>(lin, o0, o1, t0)
        } else {
            linear_tile_avx2_8bit::<T, 1>(lin, o0, o1, t0)
        };
    }
}

/// 8-bit codes with AVX2, tokens t0 .. t0 + NT: per 8 codes one zero-extension and one gather from
/// the row's 256-entry codebook, FMA'd with each token's activations (two chains per token,
/// alternating units); per group the sums are scaled by m. Returns NT.
///
/// # Safety
/// As [`linear_tiles_avx2_8bit`]; t0 + NT <= tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn linear_tile_avx2_8bit<T: QElem, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, ng, g) = (q.n, q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let x0 = lin.xf.as_ptr().add(t0 * k);
    for o in o0..o1 {
        let tab = table.add(256 * o);
        let row = codes.add(o * k);
        let mut tot = [_mm256_setzero_ps(); NT];
        for gi in 0..ng {
            let mut l = 0;
            while l < g {
                // Prefetches never fault: addresses past the buffers are harmless.
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(gi * g + l + PREFETCH) as *const i8);
                l += 64;
            }
            let (mut a, mut c) = ([_mm256_setzero_ps(); NT], [_mm256_setzero_ps(); NT]);
            let mut u = gi * g;
            while u < (gi + 1) * g {
                let i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(u) as *const __m128i));
                let i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(u + 8) as *const __m128i));
                let w0 = _mm256_i32gather_ps::<4>(tab, i0);
                let w1 = _mm256_i32gather_ps::<4>(tab, i1);
                for t in 0..NT {
                    let xp = x0.add(t * k + u);
                    a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), a[t]);
                    c[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), c[t]);
                }
                u += 16;
            }
            let m = _mm256_set1_ps(*scales.add(o * ng + gi));
            for t in 0..NT {
                tot[t] = _mm256_fmadd_ps(_mm256_add_ps(a[t], c[t]), m, tot[t]);
            }
        }
        write_row_sums::<T>(lin, o, t0, &tot);
    }
    NT
}

/// Rows o0..o1 of the AVX-512 8-bit path, every token: tiles of 4 tokens, then single ones.
///
/// # Safety
/// AVX-512 (F), AVX2 and FMA; otherwise as [`linear_tiles_avx2_8bit`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn linear_tiles_avx512_8bit<T: QElem>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut t0 = 0;
    while t0 < tokens {
        t0 += if tokens - t0 >= 4 {
            linear_tile_avx512_8bit::<T, 4>(lin, o0, o1, t0)
        } else {
            linear_tile_avx512_8bit::<T, 1>(lin, o0, o1, t0)
        };
    }
}

/// The entries of a row's 256-entry codebook (16 registers, `t`) at 16 byte indices: eight
/// two-source `vpermt2ps` (32 entries each, index bits 0-4), then blends by bits 5, 6 and 7. At
/// 4096² it decodes 2.8x as fast as 16-lane gathers on this project's AVX-512 EPYC.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn lookup256_avx512(t: &[std::arch::x86_64::__m512; 16], idx: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let p: [__m512; 8] = std::array::from_fn(|j| _mm512_permutex2var_ps(t[2 * j], idx, t[2 * j + 1]));
    let bit = |b: i32| _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << b));
    let (b5, b6, b7) = (bit(5), bit(6), bit(7));
    let q = [
        _mm512_mask_blend_ps(b5, p[0], p[1]),
        _mm512_mask_blend_ps(b5, p[2], p[3]),
        _mm512_mask_blend_ps(b5, p[4], p[5]),
        _mm512_mask_blend_ps(b5, p[6], p[7]),
    ];
    _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, q[0], q[1]), _mm512_mask_blend_ps(b6, q[2], q[3]))
}

/// [`linear_tile_avx2_8bit`] with AVX-512: per 16 codes one zero-extension and
/// [`lookup256_avx512`] instead of two 8-lane gathers. Returns NT.
///
/// # Safety
/// As [`linear_tiles_avx512_8bit`]; t0 + NT <= tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn linear_tile_avx512_8bit<T: QElem, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, ng, g) = (q.n, q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let x0 = lin.xf.as_ptr().add(t0 * k);
    for o in o0..o1 {
        let tab: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(table.add(256 * o + 16 * i)));
        let row = codes.add(o * k);
        let mut tot = [_mm512_setzero_ps(); NT];
        for gi in 0..ng {
            let mut l = 0;
            while l < g {
                // Prefetches never fault: addresses past the buffers are harmless.
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(gi * g + l + PREFETCH) as *const i8);
                l += 64;
            }
            let (mut a, mut c) = ([_mm512_setzero_ps(); NT], [_mm512_setzero_ps(); NT]);
            let mut u = gi * g;
            while u < (gi + 1) * g {
                let w = lookup256_avx512(&tab, _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(u) as *const __m128i)));
                for t in 0..NT {
                    let xv = _mm512_loadu_ps(x0.add(t * k + u));
                    if NT == 1 && (u / 16) % 2 == 1 {
                        c[t] = _mm512_fmadd_ps(w, xv, c[t]);
                    } else {
                        a[t] = _mm512_fmadd_ps(w, xv, a[t]);
                    }
                }
                u += 16;
            }
            let m = _mm512_set1_ps(*scales.add(o * ng + gi));
            for t in 0..NT {
                tot[t] = _mm512_fmadd_ps(_mm512_add_ps(a[t], c[t]), m, tot[t]);
            }
        }
        write_row_sums_avx512::<T>(lin, o, t0, &tot);
    }
    NT
}

/// Rows o0..o1 of the AVX2 B-bit path (B = 2, 3), every token: tiles of 4 tokens, then single ones.
///
/// # Safety
/// AVX2 and FMA; B-bit codes; k and the group size multiples of 8; `lin` valid as
/// [`super::linear`] documents (x in column order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_tiles_avx2_small<T: QElem, const B: usize>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut t0 = 0;
    while t0 < tokens {
        t0 += if tokens - t0 >= 4 {
            linear_tile_avx2_small::<T, B, 4>(lin, o0, o1, t0)
        } else {
            linear_tile_avx2_small::<T, B, 1>(lin, o0, o1, t0)
        };
    }
}

/// 2- or 3-bit codes with AVX2, tokens t0 .. t0 + NT. A unit of 8 codes is B bytes; its word is
/// broadcast to the 8 lanes, shifted right by B·lane and masked, and `vpermps` looks the 8 fields
/// up in the row's codebook (2^B ≤ 8 entries, one register) in column order: four operations per 8
/// weights, FMA'd with each token's activations (two chains per token for one token); per group
/// the sums are scaled by m. Returns NT.
///
/// # Safety
/// As [`linear_tiles_avx2_small`]; t0 + NT <= tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn linear_tile_avx2_small<T: QElem, const B: usize, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, rb, ng, g) = (q.n, q.row_bytes(), q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let units = k / 8;
    let x0 = lin.xf.as_ptr().add(t0 * k);
    for o in o0..o1 {
        let tab = small_codebook::<B>(table.add(o << B));
        let row = codes.add(o * rb);
        let mut l = 0;
        while l < rb {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(l + PREFETCH) as *const i8);
            l += 64;
        }
        // The word of unit u: a 4-byte load reads 4 − B bytes past the unit, so the row's last unit
        // is assembled from its own B bytes (the next row, or nothing, may follow).
        let word = |u: usize| -> i32 {
            if u + 1 < units {
                (row.add(B * u) as *const u32).read_unaligned() as i32
            } else {
                let mut w = 0u32;
                for b in 0..B {
                    w |= (*row.add(B * u + b) as u32) << (8 * b);
                }
                w as i32
            }
        };
        let mut tot = [_mm256_setzero_ps(); NT];
        for gi in 0..ng {
            let (mut a, mut c) = ([_mm256_setzero_ps(); NT], [_mm256_setzero_ps(); NT]);
            let mut u = gi * g / 8;
            while u < (gi + 1) * g / 8 {
                let w = decode8_small::<B>(tab, word(u));
                for t in 0..NT {
                    let xv = _mm256_loadu_ps(x0.add(t * k + 8 * u));
                    if NT == 1 && u % 2 == 1 {
                        c[t] = _mm256_fmadd_ps(w, xv, c[t]);
                    } else {
                        a[t] = _mm256_fmadd_ps(w, xv, a[t]);
                    }
                }
                u += 1;
            }
            let m = _mm256_set1_ps(*scales.add(o * ng + gi));
            for t in 0..NT {
                tot[t] = _mm256_fmadd_ps(_mm256_add_ps(a[t], c[t]), m, tot[t]);
            }
        }
        write_row_sums::<T>(lin, o, t0, &tot);
    }
    NT
}

/// Rows o0..o1 of the AVX-512 B-bit path (B = 2, 3), every token: tiles of 4 tokens, then single
/// ones.
///
/// # Safety
/// AVX-512 (F, BW, VL), AVX2 and FMA; B-bit codes; k and the group size multiples of 16; `lin`
/// valid as [`super::linear`] documents (x in column order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn linear_tiles_avx512_small<T: QElem, const B: usize>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut t0 = 0;
    while t0 < tokens {
        t0 += if tokens - t0 >= 4 {
            linear_tile_avx512_small::<T, B, 4>(lin, o0, o1, t0)
        } else {
            linear_tile_avx512_small::<T, B, 1>(lin, o0, o1, t0)
        };
    }
}

/// A B-bit row's codebook (B = 2, 3) repeated to 16 entries: `vpermps` reads 4 bits of an index,
/// so a field's lookup needs no mask of the next field's bits above it.
///
/// # Safety
/// AVX-512F; `table` valid for 2^B float32 reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn codebook16_avx512<const B: usize>(table: *const f32) -> std::arch::x86_64::__m512 {
    let t16: [f32; 16] = std::array::from_fn(|i| *table.add(i % (1 << B)));
    std::arch::x86_64::_mm512_loadu_ps(t16.as_ptr())
}

/// The 16 codebook entries of unit u (codes 16u .. 16u + 15) of a B-bit row (B = 2, 3) of `rb`
/// bytes, in column order ([`linear_tile_avx512_small`] describes the decode; a 3-bit unit takes a
/// masked load at the row's end, which never touches the bytes past it).
///
/// # Safety
/// AVX-512 F, BW, VL; `tab` from [`codebook16_avx512`]; `row` valid for `rb` bytes; 16u < the row's fields.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn decode16_small_avx512<const B: usize>(tab: std::arch::x86_64::__m512, row: *const u8, rb: usize, u: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if B == 2 {
        let lanes = _mm512_set1_epi32((row.add(4 * u) as *const i32).read_unaligned());
        _mm512_permutexvar_ps(_mm512_srlv_epi32(lanes, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)), tab)
    } else {
        let left = rb - 6 * u;
        let src = if left >= 16 {
            _mm_loadu_si128(row.add(6 * u) as *const __m128i)
        } else {
            _mm_maskz_loadu_epi8(((1u32 << left) - 1) as u16, row.add(6 * u) as *const i8)
        };
        let lanes = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(src), _mm512_loadu_si512(SHUF3.as_ptr() as *const _));
        _mm512_permutexvar_ps(_mm512_srlv_epi32(lanes, _mm512_loadu_si512(SHIFTS3.as_ptr() as *const _)), tab)
    }
}

/// The shifts of the 3-bit decode after [`SHUF3`]: lane i by 3i mod 8, field i's first bit in its byte.
#[cfg(target_arch = "x86_64")]
const SHIFTS3: [i32; 16] = [0, 3, 6, 1, 4, 7, 2, 5, 0, 3, 6, 1, 4, 7, 2, 5];

/// The `vpshufb` control of [`linear_tile_avx512_small`]'s 3-bit decode: dword lane i (of 16; four
/// per 128-bit lane) takes bytes ⌊3i/8⌋ .. ⌊3i/8⌋ + 3 of the 16 loaded, the bytes of field i.
#[cfg(target_arch = "x86_64")]
const SHUF3: [u8; 64] = {
    let mut c = [0u8; 64];
    let mut i = 0;
    while i < 16 {
        let mut p = 0;
        while p < 4 {
            c[4 * i + p] = (3 * i / 8 + p) as u8;
            p += 1;
        }
        i += 1;
    }
    c
};

/// [`linear_tile_avx2_small`] 16 fields at a time with AVX-512. A unit of 16 codes is 2·B bytes.
/// 2 bits: a unit reaches the 16 lanes as one broadcast dword, lane i shifted right by 2i. 3 bits:
/// two units (12 bytes) at a time from one 16-byte load broadcast to the four 128-bit lanes, where
/// `vpshufb` gives lane i the dword at byte ⌊3i/8⌋ ([`SHUF3`]; + 6 for the second unit) and a
/// shift by 3i mod 8 brings field i to bit 0. Then `vpermps` looks the lanes up in the row's
/// codebook repeated to 16 entries (it reads 4 bits of an index, so the next field's bits above
/// need no mask). Returns NT.
///
/// # Safety
/// As [`linear_tiles_avx512_small`]; t0 + NT <= tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn linear_tile_avx512_small<T: QElem, const B: usize, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, rb, ng, g) = (q.n, q.row_bytes(), q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let x0 = lin.xf.as_ptr().add(t0 * k);
    // 3 bits: the shifts, and the byte shuffles of a pair's first and second unit.
    let shifts3 = _mm512_loadu_si512(SHIFTS3.as_ptr() as *const _);
    let shuf = [_mm512_loadu_si512(SHUF3.as_ptr() as *const _), _mm512_add_epi8(_mm512_loadu_si512(SHUF3.as_ptr() as *const _), _mm512_set1_epi8(6))];
    for o in o0..o1 {
        let tab = codebook16_avx512::<B>(table.add(o << B));
        let row = codes.add(o * rb);
        let mut l = 0;
        while l < rb {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(l + PREFETCH) as *const i8);
            l += 64;
        }
        let mut tot = [_mm512_setzero_ps(); NT];
        for gi in 0..ng {
            let (mut a, mut c) = ([_mm512_setzero_ps(); NT], [_mm512_setzero_ps(); NT]);
            let (mut u, end) = (gi * g / 16, (gi + 1) * g / 16);
            // w0 (and w1) times x of unit u (and u + 1) into the group's sums (two of them: two
            // dependency chains). A macro, not a closure: a closure's borrow of the sums keeps
            // them in memory.
            macro_rules! add {
                ($u:expr, $w0:expr) => {
                    for t in 0..NT {
                        a[t] = _mm512_fmadd_ps($w0, _mm512_loadu_ps(x0.add(t * k + 16 * $u)), a[t]);
                    }
                };
                ($u:expr, $w0:expr, $w1:expr) => {
                    for t in 0..NT {
                        a[t] = _mm512_fmadd_ps($w0, _mm512_loadu_ps(x0.add(t * k + 16 * $u)), a[t]);
                        c[t] = _mm512_fmadd_ps($w1, _mm512_loadu_ps(x0.add(t * k + 16 * $u + 16)), c[t]);
                    }
                };
            }
            // 3 bits: the unit's (the pair's) 16 fields of the 16 bytes from unit u, broadcast.
            let dec3 = |lanes: __m512i, p: usize| _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_shuffle_epi8(lanes, shuf[p]), shifts3), tab);
            let dec2 = |u: usize| decode16_small_avx512::<2>(tab, row, rb, u);
            if B == 2 {
                while u + 1 < end {
                    add!(u, dec2(u), dec2(u + 1));
                    u += 2;
                }
                if u < end {
                    add!(u, dec2(u));
                }
            } else {
                // Pairs whose 16 bytes lie inside the row (all but the row's last two units).
                while u + 1 < end && 6 * u + 16 <= rb {
                    let lanes = _mm512_broadcast_i32x4(_mm_loadu_si128(row.add(6 * u) as *const __m128i));
                    add!(u, dec3(lanes, 0), dec3(lanes, 1));
                    u += 2;
                }
                // The group's rest (the row's last units, a lone unit where the group has an odd
                // number) one unit at a time, by a masked load at the row's end.
                while u < end {
                    add!(u, decode16_small_avx512::<3>(tab, row, rb, u));
                    u += 1;
                }
            }
            let m = _mm512_set1_ps(*scales.add(o * ng + gi));
            for t in 0..NT {
                tot[t] = _mm512_fmadd_ps(_mm512_add_ps(a[t], c[t]), m, tot[t]);
            }
        }
        write_row_sums_avx512::<T>(lin, o, t0, &tot);
    }
    NT
}

multiversion!(fn linear_tile<T: QElem>(lin: &Lin, o0: usize, o1: usize) => linear_tile_body);

/// Generic path: dequantize a row into float32 (table × scale), then one dot per token.
#[inline(always)]
fn linear_tile_body<T: QElem>(lin: &Lin, o0: usize, o1: usize)
{
    let q = &lin.l.q;
    let (k, nout, rb, ng, g) = (q.n, q.rows, q.row_bytes(), q.groups(), q.group);
    // SAFETY: read-only inputs; y elements (t, o) for o in [o0, o1) belong to this task alone.
    let nl = 1usize << q.bits;
    let (cr, sr, tr) = unsafe {
        (rows_of::<u8>(lin.codes, rb, o0, o1), rows_of::<f32>(lin.scales, ng, o0, o1), rows_of::<f32>(lin.table, nl, o0, o1))
    };
    // SAFETY: bias is a read-only float32 [out] when given (see `super::linear`).
    let bias = (lin.bias != 0).then(|| unsafe { slice::<f32>(lin.bias, nout) });
    let mut f = vec![0u8; k];
    let mut w = vec![0f32; k];
    for i in 0..o1 - o0 {
        let o = o0 + i;
        let lut = &tr[i * nl..(i + 1) * nl];
        unpack_fields(&cr[i * rb..(i + 1) * rb], q.bits, 0, &mut f);
        for gi in 0..ng {
            let m = sr[i * ng + gi];
            for (wv, &fv) in w[gi * g..(gi + 1) * g].iter_mut().zip(&f[gi * g..(gi + 1) * g]) {
                *wv = m * lut[fv as usize];
            }
        }
        let b = bias.map_or(0.0, |b| b[o]);
        for t in 0..lin.l.tokens {
            let v = dot16(&w, &lin.xf[t * k..(t + 1) * k]) + b;
            // SAFETY: (t, o) is inside y ([tokens, nout]) and written by this task only.
            unsafe { (lin.y as *mut T).add(t * nout + o).write(T::store(T::Acc::from_f64(v as f64))) };
        }
    }
}

#[inline(always)]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in at.iter().zip(bt).enumerate() {
        acc[i] += x * y;
    }
    let mut w = L / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// Output rows per task of the GEMV.
const TILE: usize = 16;

/// Activation floats a chunk of [`linear_tile_avx2_wide`] keeps in L1 (16 KB, half of Zen 3's L1d).
#[cfg(target_arch = "x86_64")]
const L1_ACTIVATION_FLOATS: usize = 4096;

/// Bytes of the code stream prefetched ahead of the decoder: two rows of a 4096-wide layer. The
/// hardware prefetchers stop at 4 KiB pages; without this the codes stream from DRAM at a third of
/// the bandwidth when a larger operation has evicted them (the dense GEMV next to this one does).
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 4096;

/// A row's 16-entry float32 codebook split into byte planes (plane b holds byte b of every
/// entry), in both 128-bit lanes: the tables [`decode32`] looks code nibbles up in. Group each
/// 4-float vector's bytes by plane, then transpose the 4×4 dwords.
///
/// # Safety
/// AVX2; `table` is valid for 16 float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn byte_planes(table: *const f32) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let by_plane = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let t = table as *const __m128i;
    let v0 = _mm_shuffle_epi8(_mm_loadu_si128(t), by_plane);
    let v1 = _mm_shuffle_epi8(_mm_loadu_si128(t.add(1)), by_plane);
    let v2 = _mm_shuffle_epi8(_mm_loadu_si128(t.add(2)), by_plane);
    let v3 = _mm_shuffle_epi8(_mm_loadu_si128(t.add(3)), by_plane);
    let (u0, u1) = (_mm_unpacklo_epi32(v0, v1), _mm_unpackhi_epi32(v0, v1));
    let (u2, u3) = (_mm_unpacklo_epi32(v2, v3), _mm_unpackhi_epi32(v2, v3));
    [
        _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(u0, u2)),
        _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(u0, u2)),
        _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(u1, u3)),
        _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(u1, u3)),
    ]
}

/// The codebook entries of the 32 4-bit fields in the 16 bytes at `codes`, as four vectors of 8
/// float32 holding elements [8j, 8j+2, 8j+4, 8j+6, 8j+1, 8j+3, 8j+5, 8j+7] for j = 0..3. One
/// broadcast load puts the bytes in both 128-bit lanes, a per-lane shift and a mask give 32 byte
/// indices (low nibbles = even elements in the low lane, high nibbles = odd elements in the high
/// lane), four `vpshufb` look up the four bytes of each entry in `planes` ([`byte_planes`]), and two
/// rounds of unpacks reassemble them into floats: 12 shuffles per 32 weights.
///
/// # Safety
/// AVX2; `codes` is valid for 16 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode32(planes: &[std::arch::x86_64::__m256i; 4], codes: *const u8) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let nib = _mm256_set1_epi8(0x0f);
    let lane_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(codes as *const __m128i));
    let idx = _mm256_and_si256(_mm256_srlv_epi32(v, lane_shift), nib);
    let b0 = _mm256_shuffle_epi8(planes[0], idx);
    let b1 = _mm256_shuffle_epi8(planes[1], idx);
    let b2 = _mm256_shuffle_epi8(planes[2], idx);
    let b3 = _mm256_shuffle_epi8(planes[3], idx);
    let (l01, h01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
    let (l23, h23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)),
    ]
}

/// 8 floats in [`decode32`]'s element order [0 2 4 6 1 3 5 7] put back in column order.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn column_order(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// A row's B-bit codebook (2^B ≤ 8 float32 entries) in one register, for [`decode8_small`]; with
/// 2 bits its 4 entries twice (`vpermps` reads indices 0..7).
///
/// # Safety
/// AVX2; `table` is valid for 2^B float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn small_codebook<const B: usize>(table: *const f32) -> std::arch::x86_64::__m256 {
    let mut tab = [0f32; 8];
    for (i, v) in tab.iter_mut().enumerate() {
        *v = *table.add(i % (1 << B));
    }
    std::arch::x86_64::_mm256_loadu_ps(tab.as_ptr())
}

/// The codebook entries of the 8 B-bit fields (B = 2, 3) in the low 8·B bits of `word`, in column
/// order: the word broadcast to 8 lanes, shifted right by B·lane, masked, looked up by `vpermps`.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode8_small<const B: usize>(tab: std::arch::x86_64::__m256, word: i32) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let b = B as i32;
    let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    let idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32((1 << B) - 1));
    _mm256_permutevar8x32_ps(tab, idx)
}

/// Writes y[t0 + t, o] = the lane sum of `sums[t]` + bias[o] for each token t of a GEMV tile (the
/// lanes added pairwise in a fixed order).
///
/// # Safety
/// AVX2; `lin` valid as [`super::linear`] documents; (t0 + t, o) inside y and written by this task only.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn write_row_sums<T: QElem>(lin: &Lin, o: usize, t0: usize, sums: &[std::arch::x86_64::__m256]) {
    let b = if lin.bias != 0 { *(lin.bias as *const f32).add(o) } else { 0.0 };
    for (t, v) in sums.iter().enumerate() {
        let mut lanes = [0f32; 8];
        std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), *v);
        let v = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + b;
        (lin.y as *mut T).add((t0 + t) * lin.l.q.rows + o).write(T::store(T::Acc::from_f64(v as f64)));
    }
}

/// [`write_row_sums`] for AVX-512 sums (the lanes added by `_mm512_reduce_add_ps`, a fixed order).
///
/// # Safety
/// AVX-512F; as [`write_row_sums`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn write_row_sums_avx512<T: QElem>(lin: &Lin, o: usize, t0: usize, sums: &[std::arch::x86_64::__m512]) {
    let b = if lin.bias != 0 { *(lin.bias as *const f32).add(o) } else { 0.0 };
    for (t, v) in sums.iter().enumerate() {
        let v = std::arch::x86_64::_mm512_reduce_add_ps(*v) + b;
        (lin.y as *mut T).add((t0 + t) * lin.l.q.rows + o).write(T::store(T::Acc::from_f64(v as f64)));
    }
}

/// [`deq_row_avx2`] with [`decode32_avx512`] and [`column_order_avx512`].
///
/// # Safety
/// AVX-512F, AVX2 and FMA; otherwise as [`deq_row_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn deq_row_avx512(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let tab = _mm512_loadu_ps(table);
    for (gi, &m) in scales.iter().enumerate().take(n / g) {
        let m = _mm512_set1_ps(m);
        for off in (gi * g..(gi + 1) * g).step_by(32) {
            let [ev, od] = decode32_avx512(tab, codes.as_ptr().add(off / 2));
            let [lo, hi] = column_order_avx512(ev, od);
            _mm512_storeu_ps(out.add(off), _mm512_mul_ps(m, lo));
            _mm512_storeu_ps(out.add(off + 16), _mm512_mul_ps(m, hi));
        }
    }
}

/// One row of the 4-bit dequantizer: `out[j] = scales[j / g] · table[field j]` (float32 product),
/// 32 elements per [`decode32`], put back in column order ([`column_order`]).
///
/// # Safety
/// AVX2 and FMA; n and g multiples of 32; `codes` holds n/2 bytes, `scales` n/g values, `table`
/// 16 float32, `out` n writable float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn deq_row_avx2(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let planes = byte_planes(table);
    for (gi, &m) in scales.iter().enumerate().take(n / g) {
        let m = _mm256_set1_ps(m);
        for off in (gi * g..(gi + 1) * g).step_by(32) {
            let w = decode32(&planes, codes.as_ptr().add(off / 2));
            for (j, wj) in w.into_iter().enumerate() {
                _mm256_storeu_ps(out.add(off + 8 * j), column_order(_mm256_mul_ps(wj, m)));
            }
        }
    }
}

/// One row of the 8-bit dequantizer: per 8 codes one gather from the codebook, times m (float32).
///
/// # Safety
/// AVX2; n and g multiples of 8; `codes` n bytes, `scales` n/g values, `table` 256 float32, `out`
/// n writable float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn deq_row_avx2_8bit(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let mut u = 0;
    while u < n {
        let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(u) as *const __m128i));
        let w = _mm256_i32gather_ps::<4>(table, idx);
        _mm256_storeu_ps(out.add(u), _mm256_mul_ps(w, _mm256_set1_ps(*scales.get_unchecked(u / g))));
        u += 8;
    }
}

/// [`deq_row_avx2_8bit`] with AVX-512: per 16 codes [`lookup256_avx512`] instead of two gathers.
///
/// # Safety
/// AVX-512F, AVX2 and FMA; n and g multiples of 16; otherwise as [`deq_row_avx2_8bit`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn deq_row_avx512_8bit(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let tab: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(table.add(16 * i)));
    for (gi, &m) in scales.iter().enumerate().take(n / g) {
        let m = _mm512_set1_ps(m);
        for u in (gi * g..(gi + 1) * g).step_by(16) {
            let w = lookup256_avx512(&tab, _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(u) as *const __m128i)));
            _mm512_storeu_ps(out.add(u), _mm512_mul_ps(w, m));
        }
    }
}

/// One row of the B-bit dequantizer (B = 2, 3): per unit of 8 codes the word broadcast, shifted per
/// lane, masked and looked up with `vpermps` (as [`linear_tile_avx2_small`]), times m (float32).
///
/// # Safety
/// AVX2; n and g multiples of 8; `codes` n·B/8 bytes, `scales` n/g values, `table` 2^B float32,
/// `out` n writable float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn deq_row_avx2_small<const B: usize>(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let tab = small_codebook::<B>(table);
    let rb = n * B / 8;
    for (gi, &m) in scales.iter().enumerate().take(n / g) {
        let m = _mm256_set1_ps(m);
        for u in gi * g / 8..(gi + 1) * g / 8 {
            // The B bytes of the 8 fields: one 4-byte load where the row has 4 bytes left.
            let word = if B * u + 4 <= rb {
                (codes.as_ptr().add(B * u) as *const i32).read_unaligned()
            } else {
                (0..B).fold(0u32, |w, b| w | (*codes.get_unchecked(B * u + b) as u32) << (8 * b)) as i32
            };
            _mm256_storeu_ps(out.add(8 * u), _mm256_mul_ps(decode8_small::<B>(tab, word), m));
        }
    }
}

/// [`deq_row_avx2_small`] 16 codes at a time with AVX-512 ([`decode16_small_avx512`]).
///
/// # Safety
/// AVX-512 F, BW, VL; n and g multiples of 16; otherwise as [`deq_row_avx2_small`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn deq_row_avx512_small<const B: usize>(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let tab = codebook16_avx512::<B>(table);
    let rb = n * B / 8;
    for (gi, &m) in scales.iter().enumerate().take(n / g) {
        let m = _mm512_set1_ps(m);
        for u in gi * g / 16..(gi + 1) * g / 16 {
            _mm512_storeu_ps(out.add(16 * u), _mm512_mul_ps(decode16_small_avx512::<B>(tab, codes.as_ptr(), rb, u), m));
        }
    }
}

/// AVX2 4-bit path for tokens `t0 .. t0 + NT` and rows `o0 .. o1`. Per 16 code bytes (32
/// weights) [`decode32`] gives four vectors of 8 floats, FMA'd with the activations (pre-permuted to
/// that order) into two accumulators per token; per group the partial sums are scaled by m. Its 12
/// shuffles per 32 weights are the bound of this loop. The code stream is prefetched [`PREFETCH`] bytes ahead (rows are
/// contiguous), the scales and codebook of the row it reaches likewise.
///
/// # Safety
/// The CPU has AVX2 and FMA; 4-bit codes; k and the group size are multiples of 32; `lin` holds
/// valid buffers as [`super::linear`] documents, x permuted as `linear_t` does; t0 + NT <= tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_tile_avx2<T: QElem, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, rb, ng, g) = (q.n, q.row_bytes(), q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let blocks = g / 32;
    let ahead_rows = PREFETCH.div_ceil(rb);
    // Plain locals and no iterator adapters in this function: without LTO the adapters stay calls
    // and the accumulators go through the stack (2.5x slower).
    let x0 = lin.xf.as_ptr().add(t0 * k);
    let x1 = lin.xf.as_ptr().add((t0 + NT - 1) * k); // = x0 when NT = 1
    for o in o0..o1 {
        let planes = byte_planes(table.add(16 * o));
        // Prefetches never fault, so addresses past the buffers are harmless (wrapping arithmetic).
        let sp = scales.wrapping_add((o + ahead_rows) * ng) as *const i8;
        let mut l = 0;
        while l < ng * 4 {
            _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(l));
            l += 64;
        }
        _mm_prefetch::<_MM_HINT_T0>(table.wrapping_add((o + ahead_rows) * 16) as *const i8);
        let row = codes.add(o * rb);
        let (mut tot0, mut tot1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for gi in 0..ng {
            let mut l = 0;
            while l < g / 2 {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(gi * g / 2 + l + PREFETCH) as *const i8);
                l += 64;
            }
            // Four independent FMA chains (two per token for a pair): with two, one token's chains
            // (2 FMAs × 4 cycles per block) were the bound, not the shuffles.
            let (mut a0, mut a1, mut c0, mut c1) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            for b in 0..blocks {
                let off = gi * g + b * 32;
                let [w0, w1, w2, w3] = decode32(&planes, row.add(off / 2));
                let xp = x0.add(off);
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), a1);
                if NT == 1 {
                    c0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), c0);
                    c1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), c1);
                } else {
                    a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), a0);
                    a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), a1);
                    let xp = x1.add(off);
                    c0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), c0);
                    c1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), c1);
                    c0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), c0);
                    c1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), c1);
                }
            }
            let m = _mm256_set1_ps(*scales.add(o * ng + gi));
            if NT == 1 {
                (a0, a1) = (_mm256_add_ps(a0, c0), _mm256_add_ps(a1, c1));
            }
            tot0 = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), m, tot0);
            if NT == 2 {
                tot1 = _mm256_fmadd_ps(_mm256_add_ps(c0, c1), m, tot1);
            }
        }
        write_row_sums::<T>(lin, o, t0, &[tot0, tot1][..NT]);
    }
    NT
}

/// The codebook entries of the 32 4-bit fields in the 16 bytes at `codes`: (even fields, odd
/// fields), 16 float32 each. The row's 16-entry codebook is one register, so a lookup is one
/// `vpermps` lane: the bytes zero-extended to 16 dwords index the low nibbles directly (vpermps
/// reads 4 bits of an index), and shifted right by 4 the high ones. Four instructions per 32
/// weights against [`decode32`]'s 12 shuffles.
///
/// # Safety
/// AVX-512F; `codes` is valid for 16 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn decode32_avx512(table: std::arch::x86_64::__m512, codes: *const u8) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes as *const __m128i));
    [_mm512_permutexvar_ps(idx, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), table)]
}

/// A 32-block's values in [`decode32_avx512`]'s order (its 16 even elements, its 16 odd ones) put
/// back in column order, as [`column_order`] does for [`decode32`]: two two-source permutes.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn column_order_avx512(ev: std::arch::x86_64::__m512, od: std::arch::x86_64::__m512) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    [_mm512_permutex2var_ps(ev, first, od), _mm512_permutex2var_ps(ev, second, od)]
}

/// 4-bit codes with AVX-512, tokens t0 .. t0 + NT: per 32-weight block [`decode32_avx512`] and two
/// FMAs per token (x in its order: [`linear_t`] puts each 32-block's even elements first), one
/// chain per token for the even fields and one for the odd, and at one token two more (blocks
/// alternate) so that four FMAs are in flight. As [`linear_tile_avx2_wide`], the tile's rows are
/// walked a chunk of whole groups at a time so that NT tokens' activations stay in L1 (at one token
/// a 4096-wide row is one chunk), every row's running sums kept in `tot`; per group each token's
/// partial sum is scaled by m, and each row sums its groups in order. Returns NT.
///
/// # Safety
/// AVX-512F, AVX2 and FMA; 4-bit codes; k and the group size multiples of 32; `lin` holds valid
/// buffers as [`super::linear`] documents, x in [`decode32_avx512`]'s order; t0 + NT <= tokens;
/// o1 - o0 <= TILE.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn linear_tile_avx512<T: QElem, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, rb, ng, g) = (q.n, q.row_bytes(), q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let blocks = g / 32;
    let chunk_groups = (L1_ACTIVATION_FLOATS / NT / g).max(1);
    let x0 = lin.xf.as_ptr().add(t0 * k);
    let mut tot = [[_mm512_setzero_ps(); NT]; TILE];
    let mut c0 = 0;
    while c0 < ng {
        let c1 = (c0 + chunk_groups).min(ng);
        for o in o0..o1 {
            let tab = _mm512_loadu_ps(table.add(16 * o));
            let row = codes.add(o * rb);
            // The same columns, scales and codebook two rows on (prefetches never fault: addresses
            // past the buffers are harmless, hence the wrapping arithmetic).
            let ahead = row.wrapping_add(2 * rb + c0 * g / 2);
            let mut l = 0;
            while l < (c1 - c0) * g / 2 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                l += 64;
            }
            let sp = scales.wrapping_add((o + 2) * ng + c0) as *const i8;
            let mut l = 0;
            while l < (c1 - c0) * 4 {
                _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(l));
                l += 64;
            }
            _mm_prefetch::<_MM_HINT_T0>(table.wrapping_add((o + 2) * 16) as *const i8);
            let tot_o = &mut tot[o - o0];
            for gi in c0..c1 {
                let mut a = [[_mm512_setzero_ps(); 2]; NT];
                let mut e = [_mm512_setzero_ps(); 2]; // the second pair of chains at NT = 1
                let mut b = 0;
                if NT == 1 {
                    while b + 2 <= blocks {
                        let off = gi * g + b * 32;
                        let [w0, w1] = decode32_avx512(tab, row.add(off / 2));
                        let [w2, w3] = decode32_avx512(tab, row.add(off / 2 + 16));
                        let xp = x0.add(off);
                        a[0][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[0][0]);
                        a[0][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[0][1]);
                        e[0] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp.add(32)), e[0]);
                        e[1] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp.add(48)), e[1]);
                        b += 2;
                    }
                }
                while b < blocks {
                    let off = gi * g + b * 32;
                    let [w0, w1] = decode32_avx512(tab, row.add(off / 2));
                    for t in 0..NT {
                        let xp = x0.add(t * k + off);
                        a[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[t][0]);
                        a[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[t][1]);
                    }
                    b += 1;
                }
                let m = _mm512_set1_ps(*scales.add(o * ng + gi));
                for t in 0..NT {
                    let mut s = _mm512_add_ps(a[t][0], a[t][1]);
                    if NT == 1 {
                        s = _mm512_add_ps(s, _mm512_add_ps(e[0], e[1]));
                    }
                    tot_o[t] = _mm512_fmadd_ps(s, m, tot_o[t]);
                }
            }
        }
        c0 = c1;
    }
    for o in o0..o1 {
        write_row_sums_avx512::<T>(lin, o, t0, &tot[o - o0]);
    }
    NT
}

/// [`linear_tile_avx2`] for NT = 4 or 8 tokens: each 32-weight block is decoded once and meets
/// the NT tokens' activations, so the decode (12 shuffles) is spread over 4·NT FMAs; one FMA chain
/// per token (the NT chains interleave; a second chain per token measured no faster at NT = 4 and
/// does not fit the registers at NT = 8); per group each token's partial sum is scaled by m. The NT activation rows (NT × 16 KB at k = 4096)
/// would stream from L2 for every weight row, so the tile's rows are walked a chunk of whole
/// groups at a time (about 16 KB of activations per chunk, in L1), every row's running sums kept
/// in `tot`; each row still sums its groups in order. Returns NT.
///
/// # Safety
/// As [`linear_tile_avx2`]; o1 - o0 <= TILE.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn linear_tile_avx2_wide<T: QElem, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, rb, ng, g) = (q.n, q.row_bytes(), q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let blocks = g / 32;
    let chunk_groups = (L1_ACTIVATION_FLOATS / NT / g).max(1);
    let x0 = lin.xf.as_ptr().add(t0 * k);
    let mut tot = [[_mm256_setzero_ps(); NT]; TILE];
    let mut c0 = 0;
    while c0 < ng {
        let c1 = (c0 + chunk_groups).min(ng);
        for o in o0..o1 {
            let planes = byte_planes(table.add(16 * o));
            let row = codes.add(o * rb);
            // The same columns two rows on (prefetches never fault: addresses past the buffers are
            // harmless, hence the wrapping arithmetic).
            let ahead = row.wrapping_add(2 * rb + c0 * g / 2);
            let mut l = 0;
            while l < (c1 - c0) * g / 2 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                l += 64;
            }
            let tot_o = &mut tot[o - o0];
            for gi in c0..c1 {
                let mut a = [_mm256_setzero_ps(); NT];
                for b in 0..blocks {
                    let off = gi * g + b * 32;
                    let [w0, w1, w2, w3] = decode32(&planes, row.add(off / 2));
                    for t in 0..NT {
                        let xp = x0.add(t * k + off);
                        a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), a[t]);
                        a[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), a[t]);
                        a[t] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), a[t]);
                        a[t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), a[t]);
                    }
                }
                let m = _mm256_set1_ps(*scales.add(o * ng + gi));
                for t in 0..NT {
                    tot_o[t] = _mm256_fmadd_ps(a[t], m, tot_o[t]);
                }
            }
        }
        c0 = c1;
    }
    for o in o0..o1 {
        write_row_sums::<T>(lin, o, t0, &tot[o - o0]);
    }
    NT
}

struct LinBwd<'a> {
    l: &'a LinearArgs,
    /// dy as float32 [tokens, out].
    dyf: Vec<f32>,
    /// Every row's codebook, float32 [out, 2^b].
    table: u64,
    codes: u64,
    scales: u64,
    dx: u64,
}

/// # Safety
/// See [`super::linear_backward`].
pub unsafe fn linear_backward(dtype: DType, l: &LinearArgs, dy: u64, codes: u64, scales: u64, table: u64, dx: u64) {
    match dtype {
        DType::F32 => linear_bwd_t::<f32>(l, dy, codes, scales, table, dx),
        DType::F64 => linear_bwd_t::<f64>(l, dy, codes, scales, table, dx),
        DType::F16 => linear_bwd_t::<f16>(l, dy, codes, scales, table, dx),
        DType::BF16 => linear_bwd_t::<bf16>(l, dy, codes, scales, table, dx),
    }
}

/// Columns of dx per task: a multiple of 32 (so every chunk starts on a byte of every code width,
/// and on a 32-column block of the SIMD kernels), at most 256, and at most what keeps the task's
/// float32 sums (tokens × columns) within 32 KiB, an L1 data cache, down to 32.
fn bwd_cols(tokens: usize) -> usize {
    (8192 / tokens.max(1) / 32 * 32).clamp(32, 256)
}

unsafe fn linear_bwd_t<T: QElem>(l: &LinearArgs, dy: u64, codes: u64, scales: u64, table: u64, dx: u64)
{
    let (k, nout, tokens) = (l.q.n, l.q.rows, l.tokens);
    let dyf: Vec<f32> = slice::<T>(dy, tokens * nout).iter().map(|v| v.load().to_f64() as f32).collect();
    let lb = LinBwd { l, dyf, table, codes, scales, dx };
    let cols = bwd_cols(tokens);
    parallel::for_each_task(k.div_ceil(cols), nout * k * tokens, |ci| {
        linear_bwd_cols::<T>(&lb, ci * cols, ((ci + 1) * cols).min(k))
    });
}

multiversion!(fn linear_bwd_cols<T: QElem>(lb: &LinBwd, c0: usize, c1: usize) => linear_bwd_cols_body);

#[inline(always)]
fn linear_bwd_cols_body<T: QElem>(lb: &LinBwd, c0: usize, c1: usize)
{
    let q = &lb.l.q;
    let (k, tokens, w_cols) = (q.n, lb.l.tokens, c1 - c0);
    let mut acc = vec![0f32; tokens * w_cols];
    if fast_path(q) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: fast_path checked AVX2+FMA (fast512_path AVX-512 too), 4 bits, k and g multiples
        // of 32, so c0 (a multiple of bwd_cols) and c1 (that or k) are multiples of 32; acc is
        // tokens × w_cols.
        unsafe {
            if fast512_path(q) {
                linear_bwd_cols_avx512(lb, c0, c1, &mut acc)
            } else {
                linear_bwd_cols_avx2(lb, c0, c1, &mut acc)
            }
        };
    } else if narrow_bwd_shape(q.bits, q.n, q.group) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: narrow_bwd_shape checked AVX2+FMA, 2, 3 or 8 bits, k and g multiples of 8, so c0
        // (a multiple of bwd_cols) and c1 (that or k) are multiples of 8; acc is tokens × w_cols;
        // avx512_narrow_bwd_shape checked AVX-512 F/BW/VL (has_avx512) and multiples of 16.
        unsafe {
            if avx512_narrow_bwd_shape(q.bits, q.n, q.group) {
                linear_bwd_cols_avx512_narrow(lb, c0, c1, &mut acc)
            } else {
                linear_bwd_cols_avx2_narrow(lb, c0, c1, &mut acc)
            }
        };
    } else {
        linear_bwd_cols_generic(lb, c0, c1, &mut acc);
    }
    for t in 0..tokens {
        // SAFETY: columns [c0, c1) of dx belong to this task alone.
        let out = unsafe { std::slice::from_raw_parts_mut((lb.dx as *mut T).add(t * k + c0), w_cols) };
        for (o, v) in out.iter_mut().zip(&acc[t * w_cols..(t + 1) * w_cols]) {
            *o = T::store(T::Acc::from_f64(*v as f64));
        }
    }
}

/// Columns [c0, c1) of dy @ Ŵ into acc (float32 [tokens, c1 − c0]) for any code width: each row's
/// weights of those columns unpacked and scaled, then added to every token's sums, rows in order.
#[inline(always)]
fn linear_bwd_cols_generic(lb: &LinBwd, c0: usize, c1: usize, acc: &mut [f32]) {
    let q = &lb.l.q;
    let (nout, rb, ng, g, tokens) = (q.rows, q.row_bytes(), q.groups(), q.group, lb.l.tokens);
    let nl = 1usize << q.bits;
    let w_cols = c1 - c0;
    // SAFETY: codes, scales and the codebooks are only read.
    let (codes, scales, table) =
        unsafe { (slice::<u8>(lb.codes, nout * rb), slice::<f32>(lb.scales, nout * ng), slice::<f32>(lb.table, nout * nl)) };
    let mut f = vec![0u8; w_cols];
    let mut w = vec![0f32; w_cols];
    for o in 0..nout {
        unpack_fields(&codes[o * rb..(o + 1) * rb], q.bits, c0, &mut f);
        let lut = &table[o * nl..(o + 1) * nl];
        // Weights of columns [c0, c1), group by group.
        let mut c = c0;
        while c < c1 {
            let gi = c / g;
            let end = ((gi + 1) * g).min(c1);
            let m = scales[o * ng + gi];
            for (wv, &fv) in w[c - c0..end - c0].iter_mut().zip(&f[c - c0..end - c0]) {
                *wv = m * lut[fv as usize];
            }
            c = end;
        }
        // Zeros of dy are not skipped: a NaN weight gives NaN, as in the matmul paths.
        for t in 0..tokens {
            let d = lb.dyf[t * nout + o];
            for (av, wv) in acc[t * w_cols..(t + 1) * w_cols].iter_mut().zip(&w) {
                *av += d * wv;
            }
        }
    }
}

/// [`linear_bwd_cols_generic`] for 4-bit codes with AVX2, rows two at a time from 4 tokens: per 32
/// columns the two rows' weights Ŵ = m·table[field] ([`decode32`] times the group scale: the
/// float32 weight the many-token path forms), then per token one load and one store of its 32 sums
/// around two FMAs per vector (loading and storing them for every row was this kernel's bound: 1.6x
/// slower at 8 tokens); each sum still adds the rows in order. Below 4 tokens two rows' byte
/// planes, weights and sums spill, so rows go one at a time, as (dy·m)·table[field]. Sums in
/// decode32's element order, put back in column order at the end.
///
/// # Safety
/// AVX2 and FMA; 4-bit codes; c0, c1 and the group size multiples of 32; `lb` valid as
/// [`super::linear_backward`] documents; acc is tokens × (c1 − c0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_bwd_cols_avx2(lb: &LinBwd, c0: usize, c1: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let nout = lb.l.q.rows;
    let mut o = 0;
    while lb.l.tokens >= 4 && o + 2 <= nout {
        bwd_rows_avx2::<2>(lb, o, c0, c1, acc.as_mut_ptr());
        o += 2;
    }
    while o < nout {
        bwd_rows_avx2::<1>(lb, o, c0, c1, acc.as_mut_ptr());
        o += 1;
    }
    let ap = acc.as_mut_ptr();
    let mut i = 0;
    while i < acc.len() {
        _mm256_storeu_ps(ap.add(i), column_order(_mm256_loadu_ps(ap.add(i))));
        i += 8;
    }
}

/// Rows o0 .. o0 + R of [`linear_bwd_cols_avx2`] into `ap` (tokens × (c1 − c0) sums).
///
/// # Safety
/// As [`linear_bwd_cols_avx2`]; o0 + R <= rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the rows keep their weights in registers
unsafe fn bwd_rows_avx2<const R: usize>(lb: &LinBwd, o0: usize, c0: usize, c1: usize, ap: *mut f32) {
    use std::arch::x86_64::*;
    let q = &lb.l.q;
    let (nout, rb, ng, g, tokens) = (q.rows, q.row_bytes(), q.groups(), q.group, lb.l.tokens);
    let (codes, scales, table) = (lb.codes as *const u8, lb.scales as *const f32, lb.table as *const f32);
    let w_cols = c1 - c0;
    // The same columns a few rows on (the row stride defeats the hardware prefetcher's reach;
    // prefetches never fault, hence the wrapping arithmetic).
    for r in 0..R {
        let ahead = codes.wrapping_add((o0 + 4 + r) * rb + c0 / 2);
        let mut l = 0;
        while l < w_cols / 2 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
            l += 64;
        }
    }
    let planes: [[__m256i; 4]; R] = std::array::from_fn(|r| byte_planes(table.add(16 * (o0 + r))));
    let dy = lb.dyf.as_ptr().add(o0);
    let mut c = c0;
    while c < c1 {
        // One row: its table entries, the scale going into each token's coefficient (dy·m) instead
        // (cheaper when few tokens share the block).
        let mut w = [[_mm256_setzero_ps(); 4]; R];
        let mut ms = [1f32; R];
        for r in 0..R {
            let m = *scales.add((o0 + r) * ng + c / g);
            let d = decode32(&planes[r], codes.add((o0 + r) * rb + c / 2));
            if R == 1 {
                (w[r], ms[r]) = (d, m);
            } else {
                for j in 0..4 {
                    w[r][j] = _mm256_mul_ps(_mm256_set1_ps(m), d[j]);
                }
            }
        }
        for t in 0..tokens {
            let a = ap.add(t * w_cols + (c - c0));
            let mut s = [_mm256_loadu_ps(a), _mm256_loadu_ps(a.add(8)), _mm256_loadu_ps(a.add(16)), _mm256_loadu_ps(a.add(24))];
            for r in 0..R {
                let d = _mm256_set1_ps(*dy.add(t * nout + r) * ms[r]);
                for j in 0..4 {
                    s[j] = _mm256_fmadd_ps(d, w[r][j], s[j]);
                }
            }
            for j in 0..4 {
                _mm256_storeu_ps(a.add(8 * j), s[j]);
            }
        }
        c += 32;
    }
}

/// [`linear_bwd_cols_avx2`] with AVX-512, rows four at a time: per 32 columns the four rows'
/// weights Ŵ = m·table[field] ([`decode32_avx512`] times the group scale: the float32 weight the
/// many-token path forms), then per token one load and one store of its 32 sums around four FMAs
/// (the AVX2 kernel loads and stores them for every row: its bound). Each sum still adds the rows
/// in order. Sums in decode32_avx512's order, put back in column order at the end.
///
/// # Safety
/// AVX-512F, AVX2 and FMA; otherwise as [`linear_bwd_cols_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn linear_bwd_cols_avx512(lb: &LinBwd, c0: usize, c1: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let nout = lb.l.q.rows;
    let mut o = 0;
    while o + 4 <= nout {
        bwd_rows_avx512::<4>(lb, o, c0, c1, acc.as_mut_ptr());
        o += 4;
    }
    while o < nout {
        bwd_rows_avx512::<1>(lb, o, c0, c1, acc.as_mut_ptr());
        o += 1;
    }
    let ap = acc.as_mut_ptr();
    let mut i = 0;
    while i < acc.len() {
        let [lo, hi] = column_order_avx512(_mm512_loadu_ps(ap.add(i)), _mm512_loadu_ps(ap.add(i + 16)));
        _mm512_storeu_ps(ap.add(i), lo);
        _mm512_storeu_ps(ap.add(i + 16), hi);
        i += 32;
    }
}

/// Rows o0 .. o0 + R of [`linear_bwd_cols_avx512`] into `ap` (tokens × (c1 − c0) sums).
///
/// # Safety
/// As [`linear_bwd_cols_avx512`]; o0 + R <= rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the rows keep their weights in registers
unsafe fn bwd_rows_avx512<const R: usize>(lb: &LinBwd, o0: usize, c0: usize, c1: usize, ap: *mut f32) {
    use std::arch::x86_64::*;
    let q = &lb.l.q;
    let (nout, rb, ng, g, tokens) = (q.rows, q.row_bytes(), q.groups(), q.group, lb.l.tokens);
    let (codes, scales, table) = (lb.codes as *const u8, lb.scales as *const f32, lb.table as *const f32);
    let w_cols = c1 - c0;
    // The same columns of the next group of rows (prefetches never fault: wrapping arithmetic).
    for r in 0..R {
        let ahead = codes.wrapping_add((o0 + R + r) * rb + c0 / 2);
        let mut l = 0;
        while l < w_cols / 2 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
            l += 64;
        }
    }
    let mut tabs = [_mm512_setzero_ps(); R];
    for r in 0..R {
        tabs[r] = _mm512_loadu_ps(table.add(16 * (o0 + r)));
    }
    let dy = lb.dyf.as_ptr().add(o0);
    let mut c = c0;
    while c < c1 {
        let mut w = [[_mm512_setzero_ps(); 2]; R];
        for r in 0..R {
            let m = _mm512_set1_ps(*scales.add((o0 + r) * ng + c / g));
            let [ev, od] = decode32_avx512(tabs[r], codes.add((o0 + r) * rb + c / 2));
            w[r] = [_mm512_mul_ps(m, ev), _mm512_mul_ps(m, od)];
        }
        for t in 0..tokens {
            let a = ap.add(t * w_cols + (c - c0));
            let (mut lo, mut hi) = (_mm512_loadu_ps(a), _mm512_loadu_ps(a.add(16)));
            for r in 0..R {
                let d = _mm512_set1_ps(*dy.add(t * nout + r));
                lo = _mm512_fmadd_ps(d, w[r][0], lo);
                hi = _mm512_fmadd_ps(d, w[r][1], hi);
            }
            _mm512_storeu_ps(a, lo);
            _mm512_storeu_ps(a.add(16), hi);
        }
        c += 32;
    }
}

/// [`linear_bwd_cols_generic`] for 2-, 3- and 8-bit codes with AVX-512, rows four at a time as
/// [`linear_bwd_cols_avx512`] does for 4 bits: per 16 columns the rows' weights Ŵ = m·table[field]
/// ([`decode16_small_avx512`], or for 8 bits [`lookup256_avx512`] over the row's codebook in 16
/// registers), then per token one load and one store of its 16 sums around the rows' FMAs. Sums in
/// column order, each adding the rows in order.
///
/// # Safety
/// AVX-512 F, BW, VL, AVX2 and FMA; 2-, 3- or 8-bit codes; c0, c1 and the group size multiples of
/// 16; `lb` valid as [`super::linear_backward`] documents; acc is tokens × (c1 − c0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn linear_bwd_cols_avx512_narrow(lb: &LinBwd, c0: usize, c1: usize, acc: &mut [f32]) {
    let (nout, ap) = (lb.l.q.rows, acc.as_mut_ptr());
    let rows = |o: usize, four: bool| match (lb.l.q.bits, four) {
        (2, true) => bwd_rows_avx512_narrow::<2, 4>(lb, o, c0, c1, ap),
        (2, false) => bwd_rows_avx512_narrow::<2, 1>(lb, o, c0, c1, ap),
        (3, true) => bwd_rows_avx512_narrow::<3, 4>(lb, o, c0, c1, ap),
        (3, false) => bwd_rows_avx512_narrow::<3, 1>(lb, o, c0, c1, ap),
        (_, true) => bwd_rows_avx512_narrow::<8, 4>(lb, o, c0, c1, ap),
        (_, false) => bwd_rows_avx512_narrow::<8, 1>(lb, o, c0, c1, ap),
    };
    let mut o = 0;
    while o + 4 <= nout {
        rows(o, true);
        o += 4;
    }
    while o < nout {
        rows(o, false);
        o += 1;
    }
}

/// Rows o0 .. o0 + R of [`linear_bwd_cols_avx512_narrow`] (B-bit codes) into `ap`.
///
/// # Safety
/// As [`linear_bwd_cols_avx512_narrow`]; o0 + R <= rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the rows keep their weights in registers
unsafe fn bwd_rows_avx512_narrow<const B: usize, const R: usize>(lb: &LinBwd, o0: usize, c0: usize, c1: usize, ap: *mut f32) {
    use std::arch::x86_64::*;
    let q = &lb.l.q;
    let (nout, rb, ng, g, tokens) = (q.rows, q.row_bytes(), q.groups(), q.group, lb.l.tokens);
    let (codes, scales, table) = (lb.codes as *const u8, lb.scales as *const f32, lb.table as *const f32);
    let w_cols = c1 - c0;
    // The same columns of the next group of rows (prefetches never fault: wrapping arithmetic).
    for r in 0..R {
        let ahead = codes.wrapping_add((o0 + R + r) * rb + c0 * B / 8);
        let mut l = 0;
        while l < w_cols * B / 8 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
            l += 64;
        }
    }
    // 2, 3 bits: tabs[r][0], the codebook repeated to 16 entries; 8 bits: its 256 entries.
    let tabs: [[__m512; 16]; R] = std::array::from_fn(|r| {
        let t = table.add((o0 + r) << B);
        if B == 8 {
            std::array::from_fn(|i| _mm512_loadu_ps(t.add(16 * i)))
        } else {
            [codebook16_avx512::<B>(t); 16]
        }
    });
    let dy = lb.dyf.as_ptr().add(o0);
    let mut c = c0;
    while c < c1 {
        let gi = c / g;
        let w: [__m512; R] = std::array::from_fn(|r| {
            let row = codes.add((o0 + r) * rb);
            let d = if B == 8 {
                lookup256_avx512(&tabs[r], _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(c) as *const __m128i)))
            } else {
                decode16_small_avx512::<B>(tabs[r][0], row, rb, c / 16)
            };
            _mm512_mul_ps(_mm512_set1_ps(*scales.add((o0 + r) * ng + gi)), d)
        });
        for t in 0..tokens {
            let a = ap.add(t * w_cols + (c - c0));
            let mut s = _mm512_loadu_ps(a);
            for r in 0..R {
                s = _mm512_fmadd_ps(_mm512_set1_ps(*dy.add(t * nout + r)), w[r], s);
            }
            _mm512_storeu_ps(a, s);
        }
        c += 16;
    }
}

/// [`linear_bwd_cols_avx512_narrow`] with AVX2: per 8 columns the rows' weights Ŵ = m·table[field]
/// ([`decode8_small`], or for 8 bits one gather from the row's codebook), rows two at a time (one
/// at a time took 1.2× longer even at 1 token), then per token one load and one store of its 8 sums
/// around the rows' FMAs. Sums in column order, each adding the rows in order.
///
/// # Safety
/// AVX2 and FMA; 2-, 3- or 8-bit codes; c0, c1 and the group size multiples of 8; otherwise as
/// [`linear_bwd_cols_avx512_narrow`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_bwd_cols_avx2_narrow(lb: &LinBwd, c0: usize, c1: usize, acc: &mut [f32]) {
    let (nout, ap) = (lb.l.q.rows, acc.as_mut_ptr());
    let rows = |o: usize, two: bool| match (lb.l.q.bits, two) {
        (2, true) => bwd_rows_avx2_narrow::<2, 2>(lb, o, c0, c1, ap),
        (2, false) => bwd_rows_avx2_narrow::<2, 1>(lb, o, c0, c1, ap),
        (3, true) => bwd_rows_avx2_narrow::<3, 2>(lb, o, c0, c1, ap),
        (3, false) => bwd_rows_avx2_narrow::<3, 1>(lb, o, c0, c1, ap),
        (_, true) => bwd_rows_avx2_narrow::<8, 2>(lb, o, c0, c1, ap),
        (_, false) => bwd_rows_avx2_narrow::<8, 1>(lb, o, c0, c1, ap),
    };
    let mut o = 0;
    while o + 2 <= nout {
        rows(o, true);
        o += 2;
    }
    while o < nout {
        rows(o, false);
        o += 1;
    }
}

/// Rows o0 .. o0 + R of [`linear_bwd_cols_avx2_narrow`] (B-bit codes) into `ap`: 32 columns a step
/// (per token four loads and stores of sums around 4·R FMAs: with 8 the loop's own work outweighed
/// them), the last columns 8 at a time.
///
/// # Safety
/// As [`linear_bwd_cols_avx2_narrow`]; o0 + R <= rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_rows_avx2_narrow<const B: usize, const R: usize>(lb: &LinBwd, o0: usize, c0: usize, c1: usize, ap: *mut f32) {
    use std::arch::x86_64::*;
    let q = &lb.l.q;
    let rb = q.row_bytes();
    let (codes, table) = (lb.codes as *const u8, lb.table as *const f32);
    // The same columns a few rows on (prefetches never fault: wrapping arithmetic).
    for r in 0..R {
        let ahead = codes.wrapping_add((o0 + 4 + r) * rb + c0 * B / 8);
        let mut l = 0;
        while l < (c1 - c0) * B / 8 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
            l += 64;
        }
    }
    // 2, 3 bits: the codebook repeated to 8 entries (8 bits: gathers from the table in memory).
    let tabs: [__m256; R] = std::array::from_fn(|r| if B == 8 { _mm256_setzero_ps() } else { small_codebook::<B>(table.add((o0 + r) << B)) });
    let mut c = c0;
    while c + 32 <= c1 {
        bwd_step_avx2_narrow::<B, R, 4>(lb, o0, c0, c1, c, &tabs, ap);
        c += 32;
    }
    while c < c1 {
        bwd_step_avx2_narrow::<B, R, 1>(lb, o0, c0, c1, c, &tabs, ap);
        c += 8;
    }
}

/// Columns c .. c + 8·U of [`bwd_rows_avx2_narrow`]: the R rows' weights Ŵ = m·table[field], then
/// every token's sums.
///
/// # Safety
/// As [`bwd_rows_avx2_narrow`]; c − c0 a multiple of 8, c + 8·U <= c1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::needless_range_loop)] // indexed loops over the rows keep their weights in registers
unsafe fn bwd_step_avx2_narrow<const B: usize, const R: usize, const U: usize>(
    lb: &LinBwd, o0: usize, c0: usize, c1: usize, c: usize, tabs: &[std::arch::x86_64::__m256; R], ap: *mut f32,
) {
    use std::arch::x86_64::*;
    let q = &lb.l.q;
    let (nout, rb, ng, g, tokens) = (q.rows, q.row_bytes(), q.groups(), q.group, lb.l.tokens);
    let (codes, scales, table) = (lb.codes as *const u8, lb.scales as *const f32, lb.table as *const f32);
    // The units' groups: one division a step where the group size is a multiple of the step.
    let g0 = c / g;
    let groups: [usize; U] = std::array::from_fn(|j| if g.is_multiple_of(8 * U) { g0 } else { (c + 8 * j) / g });
    let w: [[__m256; U]; R] = std::array::from_fn(|r| {
        let row = codes.add((o0 + r) * rb);
        std::array::from_fn(|j| {
            let u = c / 8 + j;
            let d = if B == 8 {
                let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(8 * u) as *const __m128i));
                _mm256_i32gather_ps::<4>(table.add((o0 + r) << 8), idx)
            } else {
                // The B bytes of the 8 fields: one 4-byte load where the row has 4 bytes left.
                let word = if B * u + 4 <= rb {
                    (row.add(B * u) as *const i32).read_unaligned()
                } else {
                    (0..B).fold(0u32, |w, b| w | (*row.add(B * u + b) as u32) << (8 * b)) as i32
                };
                decode8_small::<B>(tabs[r], word)
            };
            _mm256_mul_ps(_mm256_set1_ps(*scales.add((o0 + r) * ng + groups[j])), d)
        })
    });
    let dy = lb.dyf.as_ptr().add(o0);
    for t in 0..tokens {
        let a = ap.add(t * (c1 - c0) + (c - c0));
        let mut s: [__m256; U] = std::array::from_fn(|j| _mm256_loadu_ps(a.add(8 * j)));
        for r in 0..R {
            let d = _mm256_set1_ps(*dy.add(t * nout + r));
            for j in 0..U {
                s[j] = _mm256_fmadd_ps(d, w[r][j], s[j]);
            }
        }
        for j in 0..U {
            _mm256_storeu_ps(a.add(8 * j), s[j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// exponent search
// ---------------------------------------------------------------------------------------------

struct Search<'a> {
    s: &'a SearchArgs,
    w: u64,
    z: u64,
}

/// Scratch of one row's error evaluations.
struct ErrScratch {
    scales: Vec<f32>,
    cnt: Vec<u32>,
    e: Vec<f32>,
}

impl<'a> Search<'a> {
    fn scratch(&self) -> ErrScratch {
        let q = &self.s.q;
        ErrScratch { scales: vec![0.0; q.groups()], cnt: vec![0; q.group.max(1)], e: vec![0.0; q.n] }
    }

    fn row(&self, r: usize) -> &[f32] {
        // SAFETY: w holds rows·n float32, only read.
        unsafe { rows_of::<f32>(self.w, self.s.q.n, r, r + 1) }
    }

    /// Group scales of row r (as quantize stores them) into `sc.scales`; false on NaN/inf.
    fn prepare(&self, r: usize, sc: &mut ErrScratch) -> bool {
        let q = &self.s.q;
        let w = self.row(r);
        let mut ok = true;
        for (gi, m) in sc.scales.iter_mut().enumerate() {
            let (amax, finite) = absmax(&w[gi * q.group..(gi + 1) * q.group]);
            *m = (q.clip * amax as f64) as f32;
            ok &= finite && m.is_finite();
        }
        ok
    }

    /// The error of row r quantized with exponent `a` (its scales prepared in `sc`).
    fn error(&self, r: usize, a: f32, sc: &mut ErrScratch) -> f64 {
        search_err_mv(self, r, a, sc)
    }
}

fn search_err_mv(se: &Search, r: usize, a: f32, sc: &mut ErrScratch) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(se: &Search, r: usize, a: f32, sc: &mut ErrScratch) -> f64 {
            search_err(se, r, a, sc)
        }
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { avx2(se, r, a, sc) };
        }
    }
    search_err(se, r, a, sc)
}

#[inline(always)]
fn search_err(se: &Search, r: usize, a: f32, sc: &mut ErrScratch) -> f64 {
    let q = &se.s.q;
    let (n, g) = (q.n, q.group);
    let w = se.row(r);
    let t = boundaries(q.bits, a);
    // |q| → (|q|/qmax)^(1/a); the sign is applied from w.
    let lut: Vec<f32> = row_lut(q.bits, a).into_iter().take(qmax(q.bits) as usize + 1).map(|v| v as f32).collect();
    let mut err = 0f64;
    for gi in 0..q.groups() {
        let ws = &w[gi * g..(gi + 1) * g];
        let m = sc.scales[gi];
        count_codes(ws, &t, m, &mut sc.cnt);
        let es = &mut sc.e[gi * g..(gi + 1) * g];
        for ((e, &wv), &c) in es.iter_mut().zip(ws).zip(&sc.cnt[..g]) {
            let mag = m * lut[c as usize];
            *e = wv - if wv < 0.0 { -mag } else { mag };
        }
        if se.s.z_rows == 0 {
            err += dot16(es, es) as f64;
        }
    }
    if se.s.z_rows > 0 {
        // SAFETY: z holds z_rows·n float32, only read.
        let z = unsafe { slice::<f32>(se.z, se.s.z_rows * n) };
        for zr in z.chunks_exact(n) {
            let v = dot16(zr, &sc.e) as f64;
            err += v * v;
        }
    }
    err
}

/// A row prepared for the weight error: `u = |w|/m` sorted, with prefix sums of the weights m²,
/// m²·u and m²·u² (float64). Since |q| is a step function of u, the error of every code bucket
/// `[t_(k−1), t_k)` with value `L_k = (k/qmax)^(1/a)` is `Σm²u² − 2·L_k·Σm²u + L_k²·Σm²`, so one
/// evaluation costs qmax short searches, whatever the row length.
struct SortedRow {
    u: Vec<f32>,
    /// [Σm², Σm²u, Σm²u²] over the first j sorted elements, j = 0..=n.
    pre: Vec<[f64; 3]>,
    /// `bucket[b]` = the number of u below b/B (B = bucket.len() − 1 buckets over [0, 1]), so a
    /// boundary's search runs inside one bucket.
    bucket: Vec<u32>,
}

impl SortedRow {
    fn new(w: &[f32], g: usize, clip: f64) -> Option<SortedRow> {
        let mut ms: Vec<f32> = Vec::with_capacity(w.len() / g);
        // (bits of u ≥ 0) << 32 | group: integer order is the order of u.
        let mut keys: Vec<u64> = Vec::with_capacity(w.len());
        for (gi, ws) in w.chunks_exact(g).enumerate() {
            let (amax, finite) = absmax(ws);
            let m = (clip * amax as f64) as f32;
            if !finite || !m.is_finite() {
                return None;
            }
            // An all-zero group (m = 0) has no error whatever a: u = 0 and weight 0.
            ms.push(m);
            for &v in ws {
                let u = if m > 0.0 { v.abs() / m } else { 0.0 };
                keys.push(((u.to_bits() as u64) << 32) | gi as u64);
            }
        }
        keys.sort_unstable();
        let mut pre = Vec::with_capacity(keys.len() + 1);
        let mut acc = [0f64; 3];
        pre.push(acc);
        for &key in &keys {
            let (u, m) = (f32::from_bits((key >> 32) as u32) as f64, ms[(key & 0xffff_ffff) as usize] as f64);
            let m2 = m * m;
            acc = [acc[0] + m2, acc[1] + m2 * u, acc[2] + m2 * u * u];
            pre.push(acc);
        }
        let u: Vec<f32> = keys.iter().map(|&k| f32::from_bits((k >> 32) as u32)).collect();
        let nb = u.len().max(16);
        let mut bucket = vec![0u32; nb + 1];
        let mut j = 0usize;
        for (b, st) in bucket.iter_mut().enumerate() {
            // The same float32 arithmetic as the lookup (t·B truncated), so every u below the
            // edge of bucket b is counted before it.
            while j < u.len() && ((u[j] * nb as f32) as usize) < b {
                j += 1;
            }
            *st = j as u32;
        }
        Some(SortedRow { u, pre, bucket })
    }

    /// The error with the boundaries and levels of one exponent (see [`Levels`]).
    fn error(&self, lv: &Levels) -> f64 {
        let n = self.u.len();
        let mut start = 0usize;
        let mut err = 0.0;
        for (k, &l) in lv.level.iter().enumerate() {
            let end = match lv.thr.get(k) {
                Some(&t) => {
                    // t < 1 falls in bucket b: its position lies in [bucket[b], bucket[b + 1]].
                    let nb = self.bucket.len() - 1;
                    let b = ((t * nb as f32) as usize).min(nb - 1);
                    let (lo, hi) = (self.bucket[b] as usize, self.bucket[b + 1] as usize);
                    let p = if hi - lo <= 16 {
                        lo + self.u[lo..hi].iter().take_while(|&&v| v < t).count()
                    } else {
                        lo + self.u[lo..hi].partition_point(|&v| v < t)
                    };
                    p.max(start)
                }
                None => n,
            };
            if end > start {
                let (p, q) = (&self.pre[start], &self.pre[end]);
                err += (q[2] - p[2]) - 2.0 * l * (q[1] - p[1]) + l * l * (q[0] - p[0]);
            }
            start = end;
        }
        err
    }
}

/// Boundaries `t_k` (as float32, for the sorted float32 u) and levels `(k/qmax)^(1/a)` of an exponent.
struct Levels {
    thr: Vec<f32>,
    level: Vec<f64>,
}

impl Levels {
    fn new(bits: u32, a: f64) -> Levels {
        let qm = qmax(bits) as f64;
        let inv_a = 1.0 / a;
        // x^(1/a) as exp(ln(x)/a): the logarithms do not depend on a.
        Levels {
            thr: (0..qmax(bits)).map(|k| (((k as f64 + 0.5) / qm).ln() * inv_a).exp() as f32).collect(),
            level: (0..=qmax(bits)).map(|k| if k == 0 { 0.0 } else { ((k as f64 / qm).ln() * inv_a).exp() }).collect(),
        }
    }
}

/// The search: a coarse grid of `s.grid` exponents on [lo, 1], then a fine grid of `s.refine`
/// points on the two coarse cells around each of the `CANDIDATES` best coarse local minima (the
/// error is only piecewise smooth in a: narrow dips between code changes are common in short or
/// heavy-tailed rows, so refining one minimum is not enough).
const CANDIDATES: usize = 4;

fn coarse_point(lo: f64, nc: usize, i: usize) -> f64 {
    if i + 1 == nc {
        1.0
    } else {
        lo + (1.0 - lo) * i as f64 / (nc - 1) as f64
    }
}

fn coarse_points(s: &SearchArgs) -> Vec<f64> {
    (0..s.grid).map(|i| coarse_point(s.lo, s.grid, i)).collect()
}

/// Fine points around the best `CANDIDATES` local minima of the coarse errors.
fn fine_points(s: &SearchArgs, errs: &[f64]) -> Vec<f64> {
    let n = errs.len();
    let mut minima: Vec<usize> = (0..n)
        .filter(|&i| (i == 0 || errs[i] <= errs[i - 1]) && (i + 1 == n || errs[i] <= errs[i + 1]))
        .collect();
    // Best first; ties keep the larger exponent (stable sort of indices in descending order).
    minima.reverse();
    minima.sort_by(|&x, &y| errs[x].total_cmp(&errs[y]));
    let h = (1.0 - s.lo) / (s.grid - 1) as f64;
    let nf = s.refine.max(2);
    let mut pts = Vec::with_capacity(CANDIDATES * nf);
    if s.refine == 0 {
        return pts;
    }
    for &i in minima.iter().take(CANDIDATES) {
        let c = coarse_point(s.lo, s.grid, i);
        let (a0, a1) = ((c - h).max(s.lo), (c + h).min(1.0));
        pts.extend((0..nf).map(|j| a0 + (a1 - a0) * j as f64 / (nf - 1) as f64));
    }
    pts
}

/// The point of least error; ties keep the larger exponent (a = 1 for rows without error).
fn argmin(points: &[f64], errs: &[f64]) -> (f64, f64) {
    let mut best = (1.0, f64::INFINITY);
    for (&a, &e) in points.iter().zip(errs) {
        let a = a as f32 as f64; // the exponent as it will be stored
        if e < best.1 || (e == best.1 && a > best.0) {
            best = (a, e);
        }
    }
    best
}

/// Both stages with `eval` giving the errors at a list of exponents.
fn two_stage(s: &SearchArgs, coarse: &[f64], coarse_errs: &[f64], mut eval: impl FnMut(&[f64]) -> Vec<f64>) -> f32 {
    let (a0, e0) = argmin(coarse, coarse_errs);
    let fine = fine_points(s, coarse_errs);
    let (a1, e1) = argmin(&fine, &eval(&fine));
    (if e1 < e0 { a1 } else { a0 }) as f32
}

/// The weight-error search (no metric).
unsafe fn search_weight(s: &SearchArgs, w: u64, out: u64) -> Result<()> {
    let q = &s.q;
    let (rows, n) = (q.rows, q.n);
    let bad = AtomicBool::new(false);
    let coarse = coarse_points(s);
    let coarse_lv: Vec<Levels> = coarse.iter().map(|&a| Levels::new(q.bits, a)).collect();
    let row = |r: usize| -> Option<SortedRow> {
        // SAFETY: w holds rows·n float32, only read.
        let wr = unsafe { rows_of::<f32>(w, n, r, r + 1) };
        let sr = SortedRow::new(wr, q.group, q.clip);
        if sr.is_none() {
            bad.store(true, Ordering::Relaxed);
        }
        sr
    };
    if s.per_row {
        let os = Shared(out as usize);
        parallel::for_each_task(rows, rows * n * 4, |r| {
            let a = match (n, row(r)) {
                (0, _) | (_, None) => 1.0f32,
                (_, Some(sr)) => {
                    let errs: Vec<f64> = coarse_lv.iter().map(|lv| sr.error(lv)).collect();
                    two_stage(s, &coarse, &errs, |pts| pts.iter().map(|&a| sr.error(&Levels::new(q.bits, a))).collect())
                }
            };
            // SAFETY: task r writes out[r] only.
            unsafe { *(os.0 as *mut f32).add(r) = a };
        });
    } else {
        // Per-row errors at every point, then summed over rows in row order (deterministic).
        let total = |points: &[f64]| -> Vec<f64> {
            let k = points.len();
            let lvs: Vec<Levels> = points.iter().map(|&a| Levels::new(q.bits, a)).collect();
            let mut per_row = vec![0f64; rows * k];
            let ps = Shared(per_row.as_mut_ptr() as usize);
            parallel::for_each_task(rows, rows * n * 4, |r| {
                if n == 0 {
                    return;
                }
                if let Some(sr) = row(r) {
                    // SAFETY: task r writes per_row[r·k .. (r+1)·k] only; per_row outlives the tasks.
                    let dst = unsafe { std::slice::from_raw_parts_mut((ps.0 as *mut f64).add(r * k), k) };
                    for (d, lv) in dst.iter_mut().zip(&lvs) {
                        *d = sr.error(lv);
                    }
                }
            });
            let mut tot = vec![0f64; k];
            for r in 0..rows {
                for (t, e) in tot.iter_mut().zip(&per_row[r * k..(r + 1) * k]) {
                    *t += e;
                }
            }
            tot
        };
        let coarse_errs = total(&coarse);
        *(out as *mut f32) = two_stage(s, &coarse, &coarse_errs, total);
    }
    if bad.load(Ordering::Relaxed) {
        return Err(Error::value("w: expected finite values (NaN or inf found, or clip·max|w| overflows float32)"));
    }
    Ok(())
}

/// # Safety
/// See [`super::search_exponent`].
pub unsafe fn search_exponent(s: &SearchArgs, w: u64, z: u64, out: u64) -> Result<()> {
    if s.z_rows == 0 {
        return search_weight(s, w, out);
    }
    let q = &s.q;
    let se = Search { s, w, z };
    let bad = AtomicBool::new(false);
    if s.per_row {
        let os = Shared(out as usize);
        parallel::for_each_task(q.rows, q.rows * q.n * s.grid, |r| {
            // SAFETY: task r writes out[r] only.
            let o = unsafe { &mut *(os.0 as *mut f32).add(r) };
            if q.n == 0 {
                *o = 1.0;
                return;
            }
            let mut sc = se.scratch();
            if !se.prepare(r, &mut sc) {
                bad.store(true, Ordering::Relaxed);
                *o = 1.0;
                return;
            }
            let coarse = coarse_points(s);
            let mut eval = |pts: &[f64]| -> Vec<f64> { pts.iter().map(|&a| se.error(r, a as f32, &mut sc)).collect() };
            let errs = eval(&coarse);
            *o = two_stage(s, &coarse, &errs, eval);
        });
    } else {
        let mut errs = vec![0f64; q.rows];
        let total = |a: f32, errs: &mut Vec<f64>| -> f64 {
            let es = Shared(errs.as_mut_ptr() as usize);
            parallel::for_each_task(q.rows, q.rows * q.n, |r| {
                let mut sc = se.scratch();
                let ok = q.n == 0 || se.prepare(r, &mut sc);
                if !ok {
                    bad.store(true, Ordering::Relaxed);
                }
                let e = if q.n == 0 || !ok { 0.0 } else { se.error(r, a, &mut sc) };
                // SAFETY: task r writes errs[r] only; errs outlives the call.
                unsafe { *(es.0 as *mut f64).add(r) = e };
            });
            errs.iter().sum() // in row order: deterministic
        };
        let coarse = coarse_points(s);
        let mut eval = |pts: &[f64]| -> Vec<f64> { pts.iter().map(|&a| total(a as f32, &mut errs)).collect() };
        let cerrs = eval(&coarse);
        *(out as *mut f32) = two_stage(s, &coarse, &cerrs, eval);
    }
    if bad.load(Ordering::Relaxed) {
        return Err(Error::value("w: expected finite values (NaN or inf found, or clip·max|w| overflows float32)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thr_up_is_the_exact_comparison() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = f64::from_bits((x >> 12) | 0x3fe0_0000_0000_0000) * 1e-3; // in [1e-3, 2e-3)
            let up = f32::thr_up(t);
            assert!(up as f64 >= t && (up.next_down() as f64) < t);
        }
        assert_eq!(f32::thr_up(f64::from_bits(1)), f32::from_bits(1));
    }

    #[test]
    fn counts_match_rounding_of_the_power() {
        // Away from boundaries the counts equal round(qmax·u^a).
        for bits in [2u32, 3, 4, 8] {
            let qm = qmax(bits) as f64;
            for a in [1.0f32, 0.75, 0.5, 0.3] {
                let t = boundaries(bits, a);
                let xs: Vec<f32> = (0..1000).map(|i| (i as f32 / 999.0) * 2.0 - 1.0).collect();
                let mut cnt = vec![0u32; xs.len()];
                count_codes(&xs, &t, 1.0, &mut cnt);
                for (x, c) in xs.iter().zip(&cnt) {
                    let v = qm * (x.abs() as f64).powf(a as f64);
                    if (v - v.floor() - 0.5).abs() > 1e-6 {
                        assert_eq!(*c as f64, (v + 0.5).floor().min(qm), "bits {bits} a {a} x {x}");
                    }
                }
            }
        }
    }
}
