//! CPU power-quantization kernels: rows split across lmkern's pool, every row computed in a fixed
//! order (results do not depend on the thread count). See the module docs of [`super`] for the
//! operator and the packed layout.
use super::{boundaries, pack_row, qmax, unpack_fields, LinearArgs, QuantArgs, SearchArgs, Tables, FAKE_GRAD_EPS};
use crate::cpu::{multiversion, rows_of, rows_of_mut, slice, Acc, Elem};
use crate::error::{Error, Result};
use crate::parallel;
use crate::tensor::DType;
use half::{bf16, f16};
use std::sync::atomic::{AtomicBool, Ordering};

mod backward;
mod decode;
mod fake_grad;
mod linear;
mod search;
pub use backward::{avx512_narrow_bwd_shape, linear_backward, narrow_bwd_shape};
#[cfg(target_arch = "x86_64")]
use decode::*;
pub use linear::{avx512_shape, linear, rows512_shape};
#[cfg(target_arch = "x86_64")]
use linear::fast512_path;
use linear::{fast8_path, fast23_path, fast_path};
#[cfg(target_arch = "x86_64")]
use linear::rows512_path;
pub use search::search_exponent;

/// The comparison/accumulation type of an element type (f32, or f64 for f64 input).
pub trait Real: Acc {
    /// `t` (> 0) rounded up to this type: `v >= Self::thr_up(t)` ⟺ `v >= t` for every v of this type.
    fn thr_up(t: f64) -> Self;
    fn abs(self) -> Self;
    fn is_neg(self) -> bool;
    /// These values as float32, where they are (for the float32-only SIMD kernels).
    fn as_f32s(xs: &[Self]) -> Option<&[f32]> {
        let _ = xs;
        None
    }
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
    fn abs(self) -> f32 {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_neg(self) -> bool {
        self < 0.0
    }
    #[inline(always)]
    fn as_f32s(xs: &[f32]) -> Option<&[f32]> {
        Some(xs)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn thr_up(t: f64) -> f64 {
        t
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
    /// The element is float64.
    const IS_F64: bool = false;
    /// The element is bfloat16.
    const IS_BF16: bool = false;
}
impl QElem for f32 {
    const IS_F32: bool = true;
}
impl QElem for f64 {
    const IS_F64: bool = true;
}
impl QElem for f16 {}
impl QElem for bf16 {
    const IS_BF16: bool = true;
}

/// `v` as the element type E it is (T::IS_F32 for f32, T::IS_F64 for f64, T::IS_BF16 for bf16).
///
/// # Safety
/// T is E.
#[cfg(target_arch = "x86_64")]
unsafe fn same_as<T, E>(v: &[T]) -> &[E] {
    debug_assert_eq!(std::any::type_name::<T>(), std::any::type_name::<E>());
    std::slice::from_raw_parts(v.as_ptr() as *const E, v.len())
}

/// [`same_as`] for a unique borrow.
///
/// # Safety
/// T is E.
#[cfg(target_arch = "x86_64")]
unsafe fn same_as_mut<T, E>(v: &mut [T]) -> &mut [E] {
    debug_assert_eq!(std::any::type_name::<T>(), std::any::type_name::<E>());
    std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut E, v.len())
}

/// Rows handed to one task: about 16K elements of work, independent of the thread count.
fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).clamp(1, 256)
}

/// `f(r0, r1)` for consecutive row ranges of [`rows_per_task`] rows covering `0..rows` (rows of n
/// elements), as parallel tasks.
fn for_each_row_range(rows: usize, n: usize, f: impl Fn(usize, usize) + Sync + Send) {
    let rpt = rows_per_task(n);
    parallel::for_each_task(rows.div_ceil(rpt), rows * n, |ti| f(ti * rpt, ((ti + 1) * rpt).min(rows)));
}

/// The error of a quantizer whose input held NaN or inf (or whose scale overflowed).
fn nonfinite_x() -> Error {
    Error::value("x: expected finite values (NaN or inf found, or clip·max|x| overflows float32)")
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

/// cnt\[j\] = #{k : |xs\[j\]| ≥ thr\[k\]} for the P ≤ 7 boundaries of 2-, 3- and 4-bit codes: one pass,
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
    #[cfg(target_arch = "x86_64")]
    if let (Some(x32), Some(t32)) = (A::as_f32s(xs), A::as_f32s(&tab)) {
        if crate::cpu::has_avx512() {
            // SAFETY: the CPU supports AVX-512 F (checked at run time); t32 has 128 entries and
            // cnt at least as many as x32.
            unsafe { count_by_search_avx512(x32, t32.try_into().unwrap(), cnt) };
            return;
        }
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time); as above.
            unsafe { count_by_search_avx2(x32, t32.try_into().unwrap(), cnt) };
            return;
        }
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

/// [`count_by_search`] for float32 with AVX-512, 16 values a step: the same seven halvings, each
/// looking up its boundary in a table of only the candidates its step can reach (1, 2, 4, 8, 16
/// of them: one `vpermps`; 32: one `vpermt2ps`; 64: two and a blend) instead of a load per value.
///
/// # Safety
/// AVX-512 F; `cnt.len() >= xs.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn count_by_search_avx512(xs: &[f32], tab: &[f32; 128], cnt: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(cnt.len() >= xs.len());
    // The step of size s compares with tab[pos + s − 1], pos a multiple of 2s: candidate i = pos/(2s).
    let cand = |s: usize, i0: usize| -> __m512 {
        let v: [f32; 16] = std::array::from_fn(|i| tab[(2 * s * (i0 + i) + s - 1).min(127)]);
        _mm512_loadu_ps(v.as_ptr())
    };
    let small = [cand(64, 0), cand(32, 0), cand(16, 0), cand(8, 0), cand(4, 0)];
    let (s2a, s2b) = (cand(2, 0), cand(2, 16));
    let s1 = [cand(1, 0), cand(1, 16), cand(1, 32), cand(1, 48)];
    let count16 = |v: __m512| -> __m512i {
        let mut pos = _mm512_setzero_si512();
        // Steps 64 .. 4: candidates i = pos >> (7 − j) (log2 of 2s), at most 16.
        macro_rules! step {
            ($j:expr) => {{
                let s = 64 >> $j;
                let t = _mm512_permutexvar_ps(_mm512_srli_epi32::<{ 7 - $j }>(pos), small[$j]);
                pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(t, v), pos, _mm512_set1_epi32(s));
            }};
        }
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        step!(4);
        // s = 2: 32 candidates (i = pos >> 2, its low 5 bits pick one of the pair).
        let t = _mm512_permutex2var_ps(s2a, _mm512_srli_epi32::<2>(pos), s2b);
        pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(t, v), pos, _mm512_set1_epi32(2));
        // s = 1: 64 candidates (i = pos >> 1; bit 5 picks the pair).
        let i = _mm512_srli_epi32::<1>(pos);
        let lo = _mm512_permutex2var_ps(s1[0], i, s1[1]);
        let hi = _mm512_permutex2var_ps(s1[2], i, s1[3]);
        let t = _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), lo, hi);
        _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(t, v), pos, _mm512_set1_epi32(1))
    };
    let n = xs.len();
    let mut j = 0;
    while j + 16 <= n {
        let v = _mm512_abs_ps(_mm512_loadu_ps(xs.as_ptr().add(j)));
        _mm512_storeu_si512(cnt.as_mut_ptr().add(j) as *mut __m512i, count16(v));
        j += 16;
    }
    if j < n {
        let k: __mmask16 = (1u16 << (n - j)) - 1;
        let v = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, xs.as_ptr().add(j)));
        _mm512_mask_storeu_epi32(cnt.as_mut_ptr().add(j) as *mut i32, k, count16(v));
    }
}

/// [`count_by_search`] for float32 with AVX2, 8 values a step: as the AVX-512 form, each halving
/// looks its boundary up among the candidates it can reach, 8 to a register (`vpermps`), the
/// registers chosen by a blend tree on the candidate's higher bits (a gather per halving was no
/// faster than the scalar search).
///
/// # Safety
/// AVX2; `cnt.len() >= xs.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn count_by_search_avx2(xs: &[f32], tab: &[f32; 128], cnt: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(cnt.len() >= xs.len());
    // Candidates i0 .. i0 + 7 of the step of size s (tab[2s·i + s − 1]).
    let cand = |s: usize, i0: usize| -> __m256 {
        let v: [f32; 8] = std::array::from_fn(|i| tab[(2 * s * (i0 + i) + s - 1).min(127)]);
        _mm256_loadu_ps(v.as_ptr())
    };
    let small = [cand(64, 0), cand(32, 0), cand(16, 0), cand(8, 0)];
    let s4 = [cand(4, 0), cand(4, 8)];
    let s2: [__m256; 4] = std::array::from_fn(|k| cand(2, 8 * k));
    let s1: [__m256; 8] = std::array::from_fn(|k| cand(1, 8 * k));
    // The candidate of index i (< 8·R) from R registers (R = 2, 4, 8): bits 3, 4, 5 of i, each
    // moved to the sign bit, pick between halves.
    #[inline(always)]
    unsafe fn pick<const R: usize>(regs: &[__m256; R], i: __m256i) -> __m256 {
        let mut l: [__m256; 8] = [_mm256_setzero_ps(); 8];
        for k in 0..R {
            l[k] = _mm256_permutevar8x32_ps(regs[k], i);
        }
        let (mut len, mut b) = (R, 3);
        while len > 1 {
            let m = _mm256_castsi256_ps(_mm256_sllv_epi32(i, _mm256_set1_epi32(31 - b)));
            for k in 0..len / 2 {
                l[k] = _mm256_blendv_ps(l[2 * k], l[2 * k + 1], m);
            }
            len /= 2;
            b += 1;
        }
        l[0]
    }
    let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let count8 = |v: __m256| -> __m256i {
        let mut pos = _mm256_setzero_si256();
        let add = |t: __m256, s: i32, pos: &mut __m256i| {
            let le = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(t, v));
            *pos = _mm256_add_epi32(*pos, _mm256_and_si256(le, _mm256_set1_epi32(s)));
        };
        for (j, &r) in small.iter().enumerate() {
            // s = 64 >> j: candidate pos >> (7 − j), at most 8 of them.
            let i = _mm256_srlv_epi32(pos, _mm256_set1_epi32(7 - j as i32));
            add(_mm256_permutevar8x32_ps(r, i), 64 >> j, &mut pos);
        }
        add(pick(&s4, _mm256_srli_epi32::<3>(pos)), 4, &mut pos);
        add(pick(&s2, _mm256_srli_epi32::<2>(pos)), 2, &mut pos);
        add(pick(&s1, _mm256_srli_epi32::<1>(pos)), 1, &mut pos);
        pos
    };
    let n = xs.len();
    let mut j = 0;
    while j + 8 <= n {
        let v = _mm256_and_ps(_mm256_loadu_ps(xs.as_ptr().add(j)), sign);
        _mm256_storeu_si256(cnt.as_mut_ptr().add(j) as *mut __m256i, count8(v));
        j += 8;
    }
    if j < n {
        // The tail through a full-width copy (no read past xs, no write past cnt).
        let mut buf = [0f32; 8];
        buf[..n - j].copy_from_slice(&xs[j..]);
        let mut out = [0u32; 8];
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, count8(_mm256_and_ps(_mm256_loadu_ps(buf.as_ptr()), sign)));
        cnt[j..n].copy_from_slice(&out[..n - j]);
    }
}

/// Signed codes of a group from its counts.
#[inline(always)]
fn signed<A: Real>(xs: &[A], cnt: &[u32], codes: &mut [i8]) {
    for ((q, c), x) in codes.iter_mut().zip(cnt).zip(xs) {
        *q = if x.is_neg() { -(*c as i8) } else { *c as i8 };
    }
}

/// Elements of a row a task converts and counts at once: rows up to this long whole, longer ones
/// in pieces of whole groups, or of one group where a group is longer. (The scratch held the whole
/// row converted and counted, ~4.5x its size: quantizing [1, 2^27] bfloat16 took +1.19 GiB, now
/// +0.19 with the output.)
const PIECE: usize = 16384;

/// Per-task scratch of one row: its elements converted and their counts, a piece at a time, and
/// the row's codes (one byte an element: pack_row packs a whole row).
struct RowScratch<A> {
    xv: Vec<A>,
    cnt: Vec<u32>,
    codes: Vec<i8>,
}

impl<A: Real> RowScratch<A> {
    /// Rows of n, groups of g; `codes`: whether a row's codes are wanted (not by the backward).
    fn new(n: usize, g: usize, codes: bool) -> Self {
        RowScratch { xv: vec![A::ZERO; n.min(PIECE)], cnt: vec![0; g.min(PIECE)], codes: vec![0; if codes { n } else { 0 }] }
    }
}

/// `xv[..xs.len()]` = the elements of xs in the accumulation type.
#[inline(always)]
fn load_into<'a, T: QElem>(xs: &[T], xv: &'a mut [T::Acc]) -> &'a [T::Acc] {
    let xv = &mut xv[..xs.len()];
    for (v, x) in xv.iter_mut().zip(xs) {
        *v = x.load();
    }
    xv
}

/// Codes of one row (into `s.codes`) and its group scales; false when x holds NaN/inf or a scale
/// overflows float32. A row longer than [`PIECE`] goes a piece at a time; every element's code
/// and every group's max|x| are those of the whole row at once (a maximum does not round).
#[inline(always)]
fn quant_row<T: QElem>(xr: &[T], t: &[f64], q: &QuantArgs, scales: &mut [f32], s: &mut RowScratch<T::Acc>) -> bool
{
    let (g, n) = (q.group, xr.len());
    let RowScratch { xv, cnt, codes } = s;
    debug_assert_eq!(codes.len(), n);
    let mut ok = true;
    if g <= PIECE {
        // The row, or as many whole groups as a piece holds.
        let span = if n <= PIECE { n } else { PIECE / g * g };
        for ((xp, sp), cp) in xr.chunks(span).zip(scales.chunks_mut(span / g)).zip(codes.chunks_mut(span)) {
            let xv = load_into(xp, xv);
            for ((xs, sc), cs) in xv.chunks_exact(g).zip(sp).zip(cp.chunks_exact_mut(g)) {
                let (amax, finite) = absmax(xs);
                let m = (q.clip * amax.to_f64()) as f32;
                ok &= finite && m.is_finite();
                *sc = m;
                count_codes(xs, t, m, cnt);
                signed(xs, cnt, cs);
            }
        }
    } else {
        // A group longer than a piece: its max|x| over its pieces, then its codes piece by piece.
        for ((xg, sc), cg) in xr.chunks_exact(g).zip(scales.iter_mut()).zip(codes.chunks_exact_mut(g)) {
            let (mut amax, mut finite) = (T::Acc::ZERO, true);
            for xp in xg.chunks(PIECE) {
                let (a, f) = absmax(load_into(xp, xv));
                amax = if a > amax { a } else { amax };
                finite &= f;
            }
            let m = (q.clip * amax.to_f64()) as f32;
            ok &= finite && m.is_finite();
            *sc = m;
            for (xp, cp) in xg.chunks(PIECE).zip(cg.chunks_mut(PIECE)) {
                let xv = load_into(xp, xv);
                count_codes(xv, t, m, cnt);
                signed(xv, cnt, cp);
            }
        }
    }
    ok
}

/// [`super::row_lut`] of exponent a into `lut` (2^bits entries), rounded to A, without allocating: the
/// same powers, one per magnitude |q| (fields q and −q share it).
fn fill_lut<A: Real>(bits: u32, a: f32, lut: &mut [A]) {
    let qm = qmax(bits) as f64;
    let inv_a = 1.0 / a as f64;
    let mut mag = [0f64; 129]; // |q| ≤ 2^(b−1) ≤ 128
    for (k, v) in mag.iter_mut().enumerate().take((1 << (bits - 1)) + 1) {
        *v = (k as f64 / qm).powf(inv_a);
    }
    for (f, d) in lut.iter_mut().enumerate() {
        let q = super::field_to_code(f as u8, bits);
        let v = mag[q.unsigned_abs() as usize];
        *d = A::from_f64(if q < 0 { -v } else { v });
    }
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
        Err(nonfinite_x())
    }
}

unsafe fn quantize_t<T: QElem>(q: &QuantArgs, x: u64, a: u64, codes: u64, scales: u64) -> bool
{
    let (rows, n) = (q.rows, q.n);
    let ok = AtomicBool::new(true);
    let (xs, cs, ss) = (Shared(x as usize), Shared(codes as usize), Shared(scales as usize));
    for_each_row_range(rows, n, |r0, r1| {
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
    let mut s = RowScratch::<T::Acc>::new(n, q.group, true);
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
    for_each_row_range(q.rows, q.n, |r0, r1| deq_rows::<T>(&d, r0, r1));
}

multiversion!(fn deq_rows<T: QElem>(d: &Deq, r0: usize, r1: usize) => deq_rows_body);

#[inline(always)]
fn deq_rows_body<T: QElem>(d: &Deq, r0: usize, r1: usize)
{
    let q = d.q;
    let (n, rb, ng, g, nl) = (q.n, q.row_bytes(), q.groups(), q.group, 1usize << q.bits);
    // SAFETY: tasks write disjoint row ranges of out; the rest is only read.
    let (cr, sr, o) = unsafe {
        (rows_of::<u8>(d.codes, rb, r0, r1), rows_of::<f32>(d.scales, ng, r0, r1), rows_of_mut::<T>(d.out, n, r0, r1))
    };
    let mut f = vec![0u8; n];
    // The table of the last exponent seen, computed again only when the exponent changes from one
    // row to the next, as quant_rows does (a table a row: [2^22, 1] float32 8-bit took 8-11 s,
    // now 79 ms).
    let (mut cached, mut lut) = (f32::NAN, vec![T::Acc::ZERO; nl]);
    for i in 0..r1 - r0 {
        // The row's codebook (float32, as given), or None: its exponent's table is `lut`.
        let codebook = match d.tables {
            Tables::Exponents(a) => {
                // SAFETY: r0 + i < q.rows; a holds q.rows float32.
                let av = unsafe { *(a as *const f32).add(r0 + i) };
                if av.to_bits() != cached.to_bits() {
                    cached = av;
                    fill_lut(q.bits, av, &mut lut);
                }
                None
            }
            // SAFETY: r0 + i < q.rows; t holds q.rows rows of nl float32.
            Tables::Codebooks(t) => Some(unsafe { rows_of::<f32>(t, nl, r0 + i, r0 + i + 1) }),
        };
        let orow = &mut o[i * n..(i + 1) * n];
        if T::IS_F32 && (fast_path(q) || fast8_path(q) || fast23_path(q)) {
            // SAFETY: the *_path checks gave AVX2+FMA, the code width, and n and g multiples of 32
            // (4 bits), 16 (8 bits) or 8 (2, 3 bits; the AVX-512 forms: of 16, and has_avx512 gave
            // AVX-512 F/BW/VL); T is f32, so orow is n float32 and the table (lut, of T::Acc = f32,
            // or the codebook) 2^bits float32.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let table = codebook.map_or(lut.as_ptr() as *const f32, |c| c.as_ptr());
                let (codes, scales, out) = (&cr[i * rb..(i + 1) * rb], &sr[i * ng..(i + 1) * ng], orow.as_mut_ptr() as *mut f32);
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
        let scales = &sr[i * ng..(i + 1) * ng];
        match codebook {
            None => deq_groups::<T>(&f, scales, g, orow, |fv| lut[fv]),
            // The codebook's entries read where they are (no copy a row: tiny rows read 1 or 2).
            Some(c) => deq_groups::<T>(&f, scales, g, orow, |fv| T::Acc::from_f64(c[fv] as f64)),
        }
    }
}

/// `out[j] = m · table(field j)` for a row's groups of g, m its group's scale.
#[inline(always)]
fn deq_groups<T: QElem>(f: &[u8], scales: &[f32], g: usize, out: &mut [T], table: impl Fn(usize) -> T::Acc) {
    for ((ys, fs), &m) in out.chunks_exact_mut(g).zip(f.chunks_exact(g)).zip(scales) {
        let m = T::Acc::from_f64(m as f64);
        for (y, &fv) in ys.iter_mut().zip(fs) {
            *y = T::store(m * table(fv as usize));
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
        Err(nonfinite_x())
    }
}

unsafe fn fake_t<T: QElem>(q: &QuantArgs, x: u64, a: u64, y: u64, scales: u64) -> bool
{
    let (rows, n) = (q.rows, q.n);
    let ok = AtomicBool::new(true);
    let (xs, ys, ss) = (Shared(x as usize), Shared(y as usize), Shared(scales as usize));
    for_each_row_range(rows, n, |r0, r1| {
        // SAFETY: tasks own disjoint row ranges of y and scales; x and a are only read.
        let (xr, ar, yr, sr) = unsafe {
            (
                rows_of::<T>(xs.0 as u64, n, r0, r1),
                rows_of::<f32>(a, 1, r0, r1),
                rows_of_mut::<T>(ys.0 as u64, n, r0, r1),
                rows_of_mut::<f32>(ss.0 as u64, q.groups(), r0, r1),
            )
        };
        let mut s = RowScratch::<T::Acc>::new(n, q.group, true);
        let (g, ng, mask) = (q.group, q.groups(), (1u32 << q.bits) - 1);
        // Boundaries and table are recomputed only when the exponent changes from one row to the
        // next (as quant_rows does: 8-bit codes take 256 powers a row).
        let (mut cached, mut t, mut lut) = (f32::NAN, Vec::new(), vec![T::Acc::ZERO; 1 << q.bits]);
        for i in 0..r1 - r0 {
            if ar[i].to_bits() != cached.to_bits() {
                (cached, t) = (ar[i], boundaries(q.bits, ar[i]));
                fill_lut(q.bits, ar[i], &mut lut);
            }
            let srow = &mut sr[i * ng..(i + 1) * ng];
            if !quant_row_mv::<T>(&xr[i * n..(i + 1) * n], &t, q, srow, &mut s) {
                ok.store(false, Ordering::Relaxed);
            }
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

/// Elements of a piece the AVX-512 gradients take at a time (float64 copies of x, dy and dx: 6 KiB
/// a task).
#[cfg(target_arch = "x86_64")]
const GRAD_BLOCK: usize = 256;

#[allow(clippy::needless_range_loop)] // one index into the piece's values, counts, dy and dx
unsafe fn fake_bwd_t<T: QElem>(q: &QuantArgs, dy: u64, x: u64, scales: u64, a: u64, dx: u64, da: u64)
{
    let (rows, n, g, ng) = (q.rows, q.n, q.group, q.groups());
    let (dys, xs, dxs, das) = (Shared(dy as usize), Shared(x as usize), Shared(dx as usize), Shared(da as usize));
    let qm = qmax(q.bits) as f64;
    // Eight elements at a time with AVX-512 (fake_grad), else one by one below.
    #[cfg(target_arch = "x86_64")]
    let wide = crate::cpu::has_avx512();
    for_each_row_range(rows, n, |r0, r1| {
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
        let mut s = RowScratch::<T::Acc>::new(n, g, false);
        // The AVX-512 path's float64 copies of x, dy and dx (GRAD_BLOCK elements each) for float16.
        #[cfg(target_arch = "x86_64")]
        let mut wide_buf = vec![0f64; if wide && !(T::IS_F32 || T::IS_F64 || T::IS_BF16) { 3 * GRAD_BLOCK } else { 0 }];
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
            let mut da_row = 0.0f64;
            #[cfg(target_arch = "x86_64")]
            let mut da_lanes = [0f64; 8];
            #[cfg(target_arch = "x86_64")]
            let grad_row = fake_grad::GradRow { a: av, eps: FAKE_GRAD_EPS, big_r: &big_r, first: &first };
            for gi in 0..ng {
                let m32 = sr[i * ng + gi];
                let m = m32 as f64;
                // A piece of the group at a time (see PIECE), its elements in order.
                for p0 in (0..g).step_by(PIECE) {
                    let len = PIECE.min(g - p0);
                    let e0 = i * n + gi * g + p0;
                    let xs = load_into(&xr[e0..e0 + len], &mut s.xv);
                    // The same codes the forward made, from the same stored scale.
                    count_codes(xs, &t, m32, &mut s.cnt);
                    #[cfg(target_arch = "x86_64")]
                    if wide && (T::IS_F32 || T::IS_F64 || T::IS_BF16) {
                        let (xp, dyp, dxp) = (&xr[e0..e0 + len], &dyr[e0..e0 + len], &mut dxr[e0..e0 + len]);
                        // SAFETY: `wide` checked AVX-512 (F, BW, VL) and AVX2; T is the type each call
                        // reinterprets the piece as (same size and layout); the counts are codes'
                        // magnitudes, at most qmax (the tables' last index).
                        unsafe {
                            if T::IS_F32 {
                                let (x, dy, dx) = (same_as::<T, f32>(xp), same_as::<T, f32>(dyp), same_as_mut::<T, f32>(dxp));
                                fake_grad::piece_grads_avx512(x, dy, &s.cnt[..len], m, &grad_row, dx, &mut da_lanes)
                            } else if T::IS_F64 {
                                let (x, dy, dx) = (same_as::<T, f64>(xp), same_as::<T, f64>(dyp), same_as_mut::<T, f64>(dxp));
                                fake_grad::piece_grads_avx512(x, dy, &s.cnt[..len], m, &grad_row, dx, &mut da_lanes)
                            } else {
                                let (x, dy, dx) = (same_as::<T, bf16>(xp), same_as::<T, bf16>(dyp), same_as_mut::<T, bf16>(dxp));
                                fake_grad::piece_grads_avx512(x, dy, &s.cnt[..len], m, &grad_row, dx, &mut da_lanes)
                            }
                        };
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    if wide {
                        // float16 elements through float64 copies.
                        let (x64, rest) = wide_buf.split_at_mut(GRAD_BLOCK);
                        let (dy64, dx64) = rest.split_at_mut(GRAD_BLOCK);
                        for b0 in (0..len).step_by(GRAD_BLOCK) {
                            let bl = GRAD_BLOCK.min(len - b0);
                            for j in 0..bl {
                                (x64[j], dy64[j]) = (xs[b0 + j].to_f64(), dyr[e0 + b0 + j].load().to_f64());
                            }
                            // SAFETY: `wide` checked AVX-512 (F, BW, VL); the slices are bl long;
                            // the counts are codes' magnitudes, at most qmax (the tables' last index).
                            unsafe {
                                fake_grad::piece_grads_avx512::<f64>(&x64[..bl], &dy64[..bl], &s.cnt[b0..b0 + bl], m, &grad_row,
                                                              &mut dx64[..bl], &mut da_lanes)
                            };
                            for j in 0..bl {
                                dxr[e0 + b0 + j] = T::store(T::Acc::from_f64(dx64[j]));
                            }
                        }
                        continue;
                    }
                    for j in 0..len {
                        let e = e0 + j;
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
            }
            // (The AVX-512 path's lanes, added in a fixed order; the scalar path's sum is in da_row.)
            #[cfg(target_arch = "x86_64")]
            {
                let l = &da_lanes;
                da_row += ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_simd_gemv_takes_its_shapes() {
        // A path predicate that wrongly refuses sends its shapes to the scalar loop: right answers
        // at a fraction of the speed, which no value test sees. (bits, n, group) and whether each
        // SIMD GEMV takes it on a CPU with every ISA: forward AVX2 4-bit, AVX-512 4-bit, AVX2 8-bit,
        // AVX2 2-/3-bit; input gradient AVX2 and AVX-512 2-/3-/8-bit. On this CPU (and under
        // LMKERN_CPU_ISA) only those it runs.
        let cases: [(u32, usize, usize, [bool; 6]); 12] = [
            (4, 4096, 128, [true, true, false, false, false, false]),
            (4, 96, 32, [true, true, false, false, false, false]),
            (4, 48, 16, [false, false, false, false, false, false]),
            (4, 24, 8, [false, false, false, false, false, false]),
            (8, 4096, 128, [false, false, true, false, true, true]),
            (8, 48, 16, [false, false, true, false, true, true]),
            (8, 24, 8, [false, false, false, false, true, false]),
            (2, 4096, 128, [false, false, false, true, true, true]),
            (3, 4096, 128, [false, false, false, true, true, true]),
            (2, 24, 8, [false, false, false, true, true, false]),
            (3, 24, 8, [false, false, false, true, true, false]),
            (3, 12, 4, [false, false, false, false, false, false]),
        ];
        let x86 = cfg!(target_arch = "x86_64");
        let (avx2, avx512) = (x86 && crate::cpu::has_avx2(), x86 && crate::cpu::has_avx512());
        let runs = [avx2, avx512, avx2, avx2, avx2, avx512];
        for (bits, n, group, every_isa) in cases {
            let q = QuantArgs { bits, rows: 3, n, group, clip: 1.0 };
            let got = [
                fast_path(&q),
                linear::fast512_path(&q),
                fast8_path(&q),
                fast23_path(&q),
                backward::narrow_bwd_shape(bits, n, group),
                backward::avx512_narrow_bwd_shape(bits, n, group),
            ];
            let want: Vec<bool> = every_isa.iter().zip(runs).map(|(w, r)| *w && r).collect();
            assert_eq!(got.to_vec(), want, "bits {bits}, n {n}, group {group} (avx2 {avx2}, avx512 {avx512})");
        }
    }

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
    fn fill_lut_is_row_lut_rounded() {
        for bits in [2u32, 3, 4, 8] {
            for a in [1.0f32, 0.7, 0.7f32.next_up(), 0.31, 0.05, f32::MIN_POSITIVE] {
                let want = crate::quant::row_lut(bits, a);
                let (mut l32, mut l64) = (vec![f32::NAN; 1 << bits], vec![f64::NAN; 1 << bits]);
                fill_lut(bits, a, &mut l32);
                fill_lut(bits, a, &mut l64);
                for (f, w) in want.iter().enumerate() {
                    assert_eq!(l64[f].to_bits(), w.to_bits(), "bits {bits} a {a} field {f}");
                    assert_eq!(l32[f].to_bits(), (*w as f32).to_bits(), "bits {bits} a {a} field {f}");
                }
            }
        }
    }

    #[test]
    fn search_counts_equal_a_linear_count() {
        // The 8-bit count (AVX-512 or AVX2 where the CPU has them) against counting every
        // boundary, on values at, just below and just above boundaries, 0, huge, inf and NaN,
        // every tail length.
        let t = boundaries(8, 0.37);
        let thr: Vec<f32> = (0..t.len()).map(|k| threshold::<f32>(&t, 0.8f32 as f64, k)).collect();
        let mut xs: Vec<f32> = vec![0.0, -0.0, 1e30, f32::INFINITY, f32::NAN, f32::MIN_POSITIVE];
        for &v in &thr {
            xs.extend([v, -v, v.next_down(), v.next_up()]);
        }
        for n in 0..xs.len().min(40) {
            let mut cnt = vec![u32::MAX; n];
            count_codes(&xs[..n], &t, 0.8, &mut cnt);
            for (x, c) in xs.iter().zip(&cnt) {
                let want = thr.iter().filter(|&&v| v <= x.abs()).count() as u32;
                assert_eq!(*c, want, "x {x}");
            }
        }
        let mut cnt = vec![u32::MAX; xs.len()];
        count_codes(&xs, &t, 0.8, &mut cnt);
        for (x, c) in xs.iter().zip(&cnt) {
            let want = thr.iter().filter(|&&v| v <= x.abs()).count() as u32;
            assert_eq!(*c, want, "x {x}");
        }
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
