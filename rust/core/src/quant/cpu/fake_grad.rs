//! The fake quantizer's straight-through gradients eight elements at a time with AVX-512 (float64
//! lanes): the per-element logarithm and exponential of [`super::fake_quantize_backward`] by
//! polynomials instead of libm's scalar calls, which took ~90 % of the backward (one ln and one
//! exp per element, ~16 ns an element).
//!
//! Accuracy: both functions are within a few float64 ulps over the arguments the gradient gives
//! them (ln of u + ε in [1e-12, 1 + 1e-12]; exp of (a − 1)·ln(u + ε) in [0, 28]); `tests` checks
//! them against libm over wider ranges, and tests/quant_cpu.rs the float64 gradients within 1e-12
//! of the formulas.
#![cfg(target_arch = "x86_64")]

use half::bf16;
use std::arch::x86_64::*;

/// ln 2 in two parts: `LN2_HI` with its low 32 mantissa bits zero (k·LN2_HI is exact for
/// |k| < 2^20), `LN2_LO` = ln 2 − LN2_HI rounded to float64 (from a 50-digit ln 2).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
#[allow(clippy::excessive_precision)]
const LN2_LO: f64 = 1.908_214_929_270_587_8e-10;

/// ln x for positive, finite x (NaN gives NaN): x = 2^e·m with m in [√½, √2), ln m = 2·atanh(s) with
/// s = (m − 1)/(m + 1), |s| ≤ 0.1716, its series to s^23 (the next term is below 2e-20 of the sum).
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn ln_pd(x: __m512d) -> __m512d {
    let mut e = _mm512_getexp_pd(x); // floor(log2 x)
    let mut m = _mm512_getmant_pd::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(x); // [1, 2)
    let big = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(m, _mm512_set1_pd(std::f64::consts::SQRT_2));
    m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
    e = _mm512_mask_add_pd(e, big, e, _mm512_set1_pd(1.0));
    let f = _mm512_sub_pd(m, _mm512_set1_pd(1.0)); // exact (Sterbenz)
    let s = _mm512_mul_pd(f, recip_pd(_mm512_add_pd(f, _mm512_set1_pd(2.0))));
    let z = _mm512_mul_pd(s, s);
    // 1 + z/3 + z²/5 + … + z¹¹/23 (Horner from the smallest term).
    let mut p = _mm512_set1_pd(1.0 / 23.0);
    for k in (0..11).rev() {
        p = _mm512_fmadd_pd(p, z, _mm512_set1_pd(1.0 / (2 * k + 1) as f64));
    }
    let ln_m = _mm512_mul_pd(_mm512_add_pd(s, s), p);
    // e·ln 2 + ln m, the small parts first.
    _mm512_fmadd_pd(e, _mm512_set1_pd(LN2_HI), _mm512_fmadd_pd(e, _mm512_set1_pd(LN2_LO), ln_m))
}

/// e^y for y in [−700, 700] (beyond, 0 or inf by the final scaling; NaN gives NaN): y = k·ln 2 + r
/// with |r| ≤ ½ ln 2, e^r by its Taylor series to r^13 (the next term is below 5e-18), scaled by 2^k.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn exp_pd(y: __m512d) -> __m512d {
    let k = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_pd(y, _mm512_set1_pd(std::f64::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_pd(k, _mm512_set1_pd(LN2_LO), _mm512_fnmadd_pd(k, _mm512_set1_pd(LN2_HI), y));
    // Σ r^n/n! for n ≤ 13 (Horner from 1/13!).
    let mut p = _mm512_set1_pd(INV_FACTORIAL[13]);
    for c in INV_FACTORIAL[..13].iter().rev() {
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(*c));
    }
    _mm512_scalef_pd(p, k)
}

/// 1/n! for n = 0..=13, each the float64 nearest (n! is exact in float64 to 18!).
const INV_FACTORIAL: [f64; 14] = {
    let mut t = [1f64; 14];
    let mut f = 1f64;
    let mut n = 1;
    while n < 14 {
        f *= n as f64;
        t[n] = 1.0 / f;
        n += 1;
    }
    t
};

/// 1/d for positive normal d (here in [1.7, 2.5]): the 14-bit estimate and two Newton steps
/// (error 2^-56 relative before rounding: within an ulp of the division; the loop's two divisions
/// a vector bound it: without them, with |x|·(1/m), 32 -> 24 ms on one thread).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn recip_pd(d: __m512d) -> __m512d {
    let one = _mm512_set1_pd(1.0);
    let mut y = _mm512_rcp14_pd(d);
    for _ in 0..2 {
        y = _mm512_fmadd_pd(y, _mm512_fnmadd_pd(d, y, one), y);
    }
    y
}

// Bitwise operations on float64 lanes through the integer forms (AVX-512F; the float forms are
// AVX512DQ, which `has_avx512` does not check).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn and(a: __m512d, b: __m512d) -> __m512d {
    _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(a), _mm512_castpd_si512(b)))
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn andnot(a: __m512d, b: __m512d) -> __m512d {
    _mm512_castsi512_pd(_mm512_andnot_si512(_mm512_castpd_si512(a), _mm512_castpd_si512(b)))
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn or(a: __m512d, b: __m512d) -> __m512d {
    _mm512_castsi512_pd(_mm512_or_si512(_mm512_castpd_si512(a), _mm512_castpd_si512(b)))
}

/// Elements the gradients load and store eight at a time as float64 lanes (masked: lanes off the
/// mask are neither read nor written): float32, float64 and bfloat16 (float16 goes through float64
/// copies). Inlined into [`piece_grads_avx512`], whose features the intrinsics need.
pub(super) trait Lanes: Copy {
    /// # Safety
    /// AVX-512F, BW and VL, AVX2; the masked lanes of p readable.
    unsafe fn load(p: *const Self, lanes: __mmask8) -> __m512d;
    /// # Safety
    /// AVX-512F, BW and VL, AVX2; the masked lanes of p writable.
    unsafe fn store(p: *mut Self, lanes: __mmask8, v: __m512d);
}

impl Lanes for f64 {
    #[inline(always)]
    unsafe fn load(p: *const f64, lanes: __mmask8) -> __m512d {
        _mm512_maskz_loadu_pd(lanes, p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f64, lanes: __mmask8, v: __m512d) {
        _mm512_mask_storeu_pd(p, lanes, v)
    }
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32, lanes: __mmask8) -> __m512d {
        _mm512_cvtps_pd(_mm256_maskz_loadu_ps(lanes, p))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, lanes: __mmask8, v: __m512d) {
        _mm256_mask_storeu_ps(p, lanes, _mm512_cvtpd_ps(v))
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    unsafe fn load(p: *const bf16, lanes: __mmask8) -> __m512d {
        let h = _mm_maskz_loadu_epi16(lanes, p as *const i16);
        _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))))
    }
    /// Through float32 as the scalar path's `bf16::from_f32(v as f32)`: rounded to nearest even on
    /// the upper 16 bits; NaN kept a quiet NaN of the same sign.
    #[inline(always)]
    unsafe fn store(p: *mut bf16, lanes: __mmask8, v: __m512d) {
        let b = _mm256_castps_si256(_mm512_cvtpd_ps(v));
        let high = _mm256_srli_epi32::<16>(b);
        let lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)));
        let nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
        let is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7fff_ffff)), _mm256_set1_epi32(0x7f80_0000));
        _mm_mask_storeu_epi16(p as *mut i16, lanes, _mm256_cvtepi32_epi16(_mm256_blendv_epi8(rounded, nan, is_nan)));
    }
}

/// What a row's pieces share: its exponent `a`, the ε added to u inside the logarithm, and for
/// |q| = c ≤ qmax `big_r[c]` = R and `first[c]` = r^(1/a)·ln r (see [`super::fake_quantize_backward`]).
pub(super) struct GradRow<'a> {
    pub a: f64,
    pub eps: f64,
    pub big_r: &'a [f64],
    pub first: &'a [f64],
}

/// `dx[j] = dy[j]·∂x̂/∂x` for the elements of one group's piece (x, dy and dx of a [`Lanes`] type,
/// computed in float64; `cnt[j]` = |q|, the group's scale `m`, the row's exponent and tables in
/// `t`), and `acc[j % 8]` += dy·∂x̂/∂a (the caller adds the lanes in a fixed order): the scalar loop
/// of fake_bwd_t, with its zero gradients where x = 0, m = 0 or |x| > m (NaN x or dy: NaN, as
/// there). One vector at a time: four at once (independent FMA chains) measured no faster.
///
/// # Safety
/// AVX-512F, BW and VL, AVX2; x, dy, cnt and dx of one length; every `cnt[j]` < the tables' length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
pub(super) unsafe fn piece_grads_avx512<E: Lanes>(
    x: &[E], dy: &[E], cnt: &[u32], m: f64, t: &GradRow, dx: &mut [E], acc: &mut [f64; 8],
) {
    let (a, eps) = (t.a, t.eps);
    let n = x.len();
    debug_assert!(dy.len() == n && cnt.len() == n && dx.len() == n);
    let small = t.big_r.len() <= 8;
    // Up to 8 entries: one permute each; more (8-bit codes): read one by one.
    let (tr, tf) = if small {
        let mut r = [0f64; 8];
        let mut f = [0f64; 8];
        r[..t.big_r.len()].copy_from_slice(t.big_r);
        f[..t.first.len()].copy_from_slice(t.first);
        (_mm512_loadu_pd(r.as_ptr()), _mm512_loadu_pd(f.as_ptr()))
    } else {
        (_mm512_setzero_pd(), _mm512_setzero_pd())
    };
    // |x|·(1/m) for |x|/m: within an ulp of it, one division a piece instead of one a vector.
    let (mv, inv_m, am1) = (_mm512_set1_pd(m), _mm512_set1_pd(1.0 / m), _mm512_set1_pd(a - 1.0));
    let (c_first, c_second) = (_mm512_set1_pd(-(m / (a * a))), _mm512_set1_pd(m / a));
    let sign = _mm512_set1_pd(-0.0);
    let one = _mm512_set1_pd(1.0);
    let mut sum = _mm512_loadu_pd(acc.as_ptr());
    let mut j = 0;
    while j < n {
        let len = (n - j).min(8);
        let lanes: __mmask8 = if len == 8 { 0xff } else { (1u8 << len) - 1 };
        let xv = E::load(x.as_ptr().add(j), lanes);
        let dyv = E::load(dy.as_ptr().add(j), lanes);
        let c = _mm256_maskz_loadu_epi32(lanes, cnt.as_ptr().add(j) as *const i32);
        let ax = andnot(sign, xv);
        // Zero gradients where x = 0, m = 0 or |x| > m; NaN x stays (NaN > m is false).
        let live = _mm512_mask_cmp_pd_mask::<_CMP_NEQ_UQ>(lanes, xv, _mm512_setzero_pd())
            & _mm512_mask_cmp_pd_mask::<_CMP_NGT_UQ>(lanes, ax, mv)
            & if m == 0.0 { 0 } else { 0xff };
        let (r, f) = if small {
            let idx = _mm512_cvtepu32_epi64(c);
            (_mm512_permutexvar_pd(idx, tr), _mm512_permutexvar_pd(idx, tf))
        } else {
            // (Element by element: the gather intrinsics' pointer type differs between Rust releases.)
            let (mut r, mut f) = ([0f64; 8], [0f64; 8]);
            for l in 0..len {
                let ci = cnt[j + l] as usize;
                (r[l], f[l]) = (t.big_r[ci], t.first[ci]);
            }
            (_mm512_loadu_pd(r.as_ptr()), _mm512_loadu_pd(f.as_ptr()))
        };
        let s = or(and(xv, sign), one);
        let ue = _mm512_fmadd_pd(ax, inv_m, _mm512_set1_pd(eps));
        let lu = ln_pd(ue);
        let p = exp_pd(_mm512_mul_pd(am1, lu)); // (u+ε)^(a−1)
        let ddx = _mm512_maskz_mul_pd(live, r, p);
        // −(m/a²)·s·first[c] + (m/a)·s·R·(p·ue)·lu
        let second = _mm512_mul_pd(_mm512_mul_pd(c_second, _mm512_mul_pd(s, r)), _mm512_mul_pd(_mm512_mul_pd(p, ue), lu));
        let dda = _mm512_maskz_mov_pd(live, _mm512_fmadd_pd(_mm512_mul_pd(c_first, s), f, second));
        E::store(dx.as_mut_ptr().add(j), lanes, _mm512_mul_pd(dyv, ddx));
        sum = _mm512_fmadd_pd(dyv, dda, sum);
        j += 8;
    }
    _mm512_storeu_pd(acc.as_mut_ptr(), sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: unsafe fn(__m512d) -> __m512d, g: fn(f64) -> f64, xs: &[f64], ulps: f64) {
        for c in xs.chunks(8) {
            let mut v = [1f64; 8];
            v[..c.len()].copy_from_slice(c);
            let mut out = [0f64; 8];
            // SAFETY: the caller checked AVX-512F.
            unsafe { _mm512_storeu_pd(out.as_mut_ptr(), f(_mm512_loadu_pd(v.as_ptr()))) };
            for (&x, &y) in c.iter().zip(&out) {
                let want = g(x);
                let tol = ulps * f64::EPSILON * want.abs().max(f64::MIN_POSITIVE);
                assert!((y - want).abs() <= tol, "{x}: {y} against {want}");
            }
        }
    }

    #[test]
    fn bfloat16_lanes_round_as_half_does() {
        if !crate::cpu::has_avx512() {
            return;
        }
        // Ties both ways, the largest finite values, infinities, NaNs, subnormals, zeros.
        let mut vs: Vec<f64> = vec![0.0, -0.0, 1.0, 1.0 + 2f64.powi(-8), 1.0 + 3.0 * 2f64.powi(-8), 1.0 + 2f64.powi(-8) + 2f64.powi(-30),
                                    f32::MAX as f64, -(f32::MAX as f64), 3.4e38, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, -f64::NAN,
                                    1e-40, -1e-45, 1e-39, 1e300, 65504.0];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            vs.push(f32::from_bits(rng as u32) as f64);
        }
        for c in vs.chunks(8) {
            let mut out = [bf16::ZERO; 8];
            let mut v = [0f64; 8];
            v[..c.len()].copy_from_slice(c);
            let lanes = ((1u16 << c.len()) - 1) as u8;
            // SAFETY: AVX-512 checked above; out holds 8.
            let back = unsafe {
                <bf16 as Lanes>::store(out.as_mut_ptr(), lanes, _mm512_loadu_pd(v.as_ptr()));
                let mut b = [0f64; 8];
                _mm512_storeu_pd(b.as_mut_ptr(), <bf16 as Lanes>::load(out.as_ptr(), lanes));
                b
            };
            for (i, &x) in c.iter().enumerate() {
                let want = bf16::from_f32(x as f32);
                assert_eq!(out[i].to_bits(), want.to_bits(), "{x:e}");
                assert!(back[i].to_bits() == want.to_f64().to_bits() || (back[i].is_nan() && want.is_nan()), "{x:e}");
            }
        }
    }

    #[test]
    fn ln_and_exp_within_a_few_ulps_of_libm() {
        if !crate::cpu::has_avx512() {
            return;
        }
        let mut xs: Vec<f64> = (0..20000).map(|i| 1e-13 * 1.0016f64.powi(i)).take_while(|&x| x < 3.0).collect();
        xs.extend([1.0, 1.0 + 1e-12, 1.0 - 1e-12, 0.5, 2.0, std::f64::consts::SQRT_2, 1e-12, 1e-300, 1e300]);
        // ln near 1 is small: its error is relative to the result there, which the atanh form keeps.
        check(ln_pd, f64::ln, &xs, 4.0);
        let ys: Vec<f64> = (-20000..=20000).map(|i| i as f64 * 0.0347).chain([0.0, -1e-12, 1e-12, 28.0]).collect();
        check(exp_pd, f64::exp, &ys, 4.0);
        // NaN passes through both.
        let mut out = [0f64; 8];
        // SAFETY: AVX-512F checked above.
        unsafe { _mm512_storeu_pd(out.as_mut_ptr(), exp_pd(ln_pd(_mm512_set1_pd(f64::NAN)))) };
        assert!(out.iter().all(|v| v.is_nan()));
    }
}
