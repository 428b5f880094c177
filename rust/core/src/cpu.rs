//! Helpers shared by the CPU kernels: slices rebuilt from caller addresses, non-temporal copies
//! for outputs too large to stay in cache, the instruction-set dispatch (AVX2, AVX-512), and the
//! element types kernels share.
use half::{bf16, f16};

/// Outputs at least this large (bytes) bypass the cache: a normal store first reads the line it
/// writes (read-for-ownership), a third pass over memory that a streaming store avoids.
pub const STREAM_BYTES: usize = 8 << 20;

/// The instruction sets the CPU kernels use, in increasing order: each level includes the ones
/// below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Baseline,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F, BW, CD, DQ and VL on top of AVX2 and FMA (x86-64-v4).
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// The environment variable that caps [`isa`] ("baseline", "avx2" or "avx512"): to run or test the
/// narrower kernels on a CPU that has wider ones.
pub const ISA_ENV: &str = "LMKERN_CPU_ISA";

/// The widest instruction set this CPU has, capped by [`ISA_ENV`] when set (in any case; an
/// unknown value caps nothing). Decided once per process.
pub fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var(ISA_ENV).map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Ok("baseline") => Isa::Baseline,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        detected().min(cap)
    })
}

fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return Isa::Baseline;
        }
        // x86-64-v4's set (Skylake-X, Zen 4 and later), so kernels may enable any of the five.
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512cd")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
        {
            return Isa::Avx512;
        }
        Isa::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Baseline
    }
}

/// Whether this CPU runs the AVX2+FMA versions of the kernels.
pub fn has_avx2() -> bool {
    isa() >= Isa::Avx2
}

/// Whether this CPU runs the AVX-512 versions of the kernels (which exist for some only): it has
/// AVX-512 F, BW, CD, DQ and VL.
pub fn has_avx512() -> bool {
    isa() >= Isa::Avx512
}

/// Whether this CPU runs the AVX-512 kernels ([`has_avx512`]) and has AVX512-VBMI (byte permutes
/// across a whole register: Ice Lake, Zen 4 and later).
pub fn has_avx512_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512() && std::arch::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU executes 512-bit vector operations as two 256-bit halves (AMD family 19h:
/// Zen 4; its AVX-512 peak is its AVX2 peak). The crossovers between the quantized GEMVs and torch's
/// matmul ([`crate::quant::cpu_gemv_max_tokens`]) depend on it: against a full-width core's
/// two 512-bit FMA units torch's matmul wins from far fewer tokens. Decided once per process.
pub fn avx512_half_width() -> bool {
    use std::sync::OnceLock;
    static HALF: OnceLock<bool> = OnceLock::new();
    *HALF.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: CPUID leaves 0 and 1 exist on every x86-64 CPU. (Newer Rust declares __cpuid
            // safe; the block keeps older toolchains building.)
            #[allow(unused_unsafe)]
            let (l0, l1) = unsafe { (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1)) };
            let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            half_width_core(&vendor, l1.eax)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// [`avx512_half_width`] from CPUID: the vendor string of leaf 0 and leaf 1's EAX (family 0xF plus
/// the extended family in bits 20-27 makes 0x19).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // called on x86-64 only; its test runs everywhere
fn half_width_core(vendor: &[u8], leaf1_eax: u32) -> bool {
    let family = (leaf1_eax >> 8) & 0xF;
    let family = if family == 0xF { family + ((leaf1_eax >> 20) & 0xFF) } else { family };
    vendor == b"AuthenticAMD" && family == 0x19
}

/// Rebuild a slice from a caller-given address.
///
/// # Safety
/// When `len > 0`, `ptr` is non-zero, aligned for `T`, and valid for reads of `len` elements while
/// the slice lives.
pub unsafe fn slice<'a, T>(ptr: u64, len: usize) -> &'a [T] {
    if len == 0 {
        return &[]; // torch may hand a null address for an empty tensor
    }
    std::slice::from_raw_parts(ptr as *const T, len)
}

/// Rows `[r0, r1)` of a row-major buffer of `n`-wide rows.
///
/// # Safety
/// As [`slice()`], for the rows asked.
pub unsafe fn rows_of<'a, T>(ptr: u64, n: usize, r0: usize, r1: usize) -> &'a [T] {
    slice((ptr as *const T).wrapping_add(r0 * n) as u64, (r1 - r0) * n)
}

/// # Safety
/// As [`rows_of`], writable, and no other live reference covers these rows.
pub unsafe fn rows_of_mut<'a, T>(ptr: u64, n: usize, r0: usize, r1: usize) -> &'a mut [T] {
    let len = (r1 - r0) * n;
    if len == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut((ptr as *mut T).add(r0 * n), len)
}

/// Copy `src` into `dst` with non-temporal stores where the CPU has them (same length required).
pub fn stream_copy<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let bytes = std::mem::size_of_val(src);
        let (d, s) = (dst.as_mut_ptr() as *mut u8, src.as_ptr() as *const u8);
        // Head up to 16-byte alignment of dst and the tail are copied normally.
        let head = (d.align_offset(16)).min(bytes);
        let body = (bytes - head) / 16;
        // SAFETY: d and s are valid for `bytes` bytes (equal-length slices); the body range
        // [head, head + 16·body) lies inside, and d + head is 16-byte aligned as _mm_stream_si128 needs.
        unsafe {
            std::ptr::copy_nonoverlapping(s, d, head);
            for i in 0..body {
                let off = head + 16 * i;
                let v = _mm_loadu_si128(s.add(off) as *const __m128i);
                _mm_stream_si128(d.add(off) as *mut __m128i, v);
            }
            let done = head + 16 * body;
            std::ptr::copy_nonoverlapping(s.add(done), d.add(done), bytes - done);
            _mm_sfence();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Define `$name` calling the `#[inline(always)]` function `$body` with the same arguments, compiled
/// twice: with AVX2+FMA (used when the CPU has them) and for the baseline target.
macro_rules! multiversion {
    (fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),*) => $body:ident) => {
        fn $name<$t: $bound>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) {
                    $body::<$t>($($arg),*)
                }
                if $crate::cpu::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            $body::<$t>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// An element type and the type its reductions accumulate in.
pub trait Elem: Copy + Send + Sync + 'static {
    type Acc: Acc;
    fn load(self) -> Self::Acc;
    fn store(v: Self::Acc) -> Self;
}

/// Accumulation arithmetic (f32 or f64).
pub trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn rsqrt(self) -> Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn rsqrt(self) -> Self {
        1.0 / self.sqrt()
    }
}
impl Acc for f64 {
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    fn rsqrt(self) -> Self {
        1.0 / self.sqrt()
    }
}

impl Elem for f32 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
}
impl Elem for f64 {
    type Acc = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(v: f64) -> Self {
        v
    }
}
impl Elem for bf16 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        // Exact widening; written with bits so the compiler vectorizes it.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl Elem for f16 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        f16::from_bits(f32_to_f16(v))
    }
}

/// Exact float16 → float32 with integer and float arithmetic only, so loops over it vectorize
/// (half's own conversion checks for F16C on every call). No float32 subnormal is ever formed, so
/// the result holds with flush-to-zero / denormals-are-zero modes on (torch.set_flush_denormal).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp = h & 0x7c00;
    let mant = h & 0x03ff;
    // Normal: move exponent and mantissa into place and rebias the exponent (15 → 127).
    let normal = ((h & 0x7fff) << 13) + ((127 - 15) << 23);
    // Subnormal (and zero): mant · 2^-24, computed from an integer, so every operand is normal.
    let subnormal = (mant as f32 * f32::from_bits((127 - 24) << 23)).to_bits();
    let inf_nan = 0x7f80_0000 | (mant << 13);
    let bits = if exp == 0 {
        subnormal
    } else if exp == 0x7c00 {
        inf_nan
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// float32 → float16, round to nearest even (overflow to inf, NaN stays NaN), vectorizable.
#[inline(always)]
pub fn f32_to_f16(f: f32) -> u16 {
    const F16_MAX_EXCL: u32 = (127 + 16) << 23; // first float32 past float16's range
    const MIN_NORMAL: u32 = 113 << 23; // 2^-14, float16's smallest normal
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let bits = f.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let abs = bits & 0x7fff_ffff;
    let out = if abs >= F16_MAX_EXCL {
        if abs > 0x7f80_0000 { 0x7e00 } else { 0x7c00 }
    } else if abs < MIN_NORMAL {
        // Adding 0.5 (the magic) makes the FPU round the subnormal mantissa into the low bits.
        (f32::from_bits(abs) + f32::from_bits(DENORM_MAGIC)).to_bits().wrapping_sub(DENORM_MAGIC)
    } else {
        let odd = (abs >> 13) & 1;
        // Rebias the exponent (127 → 15) and add the rounding bias: 0xfff, plus 1 when the kept mantissa is odd.
        (abs.wrapping_add(((15u32).wrapping_sub(127) << 23).wrapping_add(0xfff)).wrapping_add(odd)) >> 13
    };
    (out | sign) as u16
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversions_match_half_exactly() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#x}");
        }
        // Every float16 value, the midpoints between neighbours (ties), and values just off them.
        let probe = |f: f32| {
            let want = f16::from_f32(f);
            let got = f16::from_bits(f32_to_f16(f));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{f:e} ({:#x})", f.to_bits());
        };
        for h in 0..=u16::MAX {
            let v = f16::from_bits(h).to_f32();
            let next = f16::from_bits(h.wrapping_add(1)).to_f32();
            for f in [v, (v + next) / 2.0, f32::from_bits(v.to_bits() + 1), f32::from_bits(v.to_bits().wrapping_sub(1))] {
                probe(f);
            }
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            probe(f32::from_bits(x));
        }
        for f in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 65520.0, 65519.99, -0.0, 1e-8, 5.9604645e-8, 2.9802322e-8] {
            probe(f);
        }
    }

    /// Sets MXCSR's flush-to-zero and denormals-are-zero bits (what torch.set_flush_denormal does)
    /// for the current thread, runs `f`, and restores them.
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)]
    fn with_flush_denormal(f: impl FnOnce()) {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        // SAFETY: only the FTZ (bit 15) and DAZ (bit 6) flags change, and they are restored.
        unsafe {
            let old = _mm_getcsr();
            _mm_setcsr(old | 0x8040);
            f();
            _mm_setcsr(old);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16_subnormals_convert_with_flush_denormal_on() {
        with_flush_denormal(|| {
            for h in 1..0x0400u16 {
                let got = std::hint::black_box(f16_to_f32(std::hint::black_box(h)));
                assert_eq!(got, h as f32 * 2f32.powi(-24), "{h:#x}");
                assert_eq!(f32_to_f16(got), h);
            }
        });
    }

    #[test]
    fn half_width_is_amd_family_19h_only() {
        // Leaf 1 EAX of a Zen 4 EPYC (family 0xF + 0xA, model 0x11), a Zen 3 (also 0x19, without
        // AVX-512: the rule is read only where the AVX-512 kernels run), a Zen 5 (family 0x1A), a
        // Sapphire Rapids Xeon (family 6), and an Intel vendor string with Zen 4's EAX.
        assert!(half_width_core(b"AuthenticAMD", 0x00A1_0F11));
        assert!(half_width_core(b"AuthenticAMD", 0x00A0_0F11));
        assert!(!half_width_core(b"AuthenticAMD", 0x00B4_0F00));
        assert!(!half_width_core(b"GenuineIntel", 0x0008_06F8));
        assert!(!half_width_core(b"GenuineIntel", 0x00A1_0F11));
    }

    #[test]
    fn stream_copy_copies_every_alignment_and_length() {
        let src: Vec<u16> = (0..300u16).collect();
        for start in 0..9 {
            for len in [0usize, 1, 7, 8, 9, 31, 100, 250] {
                let mut dst = vec![0u16; 300];
                stream_copy(&mut dst[start..start + len], &src[start..start + len]);
                assert_eq!(&dst[start..start + len], &src[start..start + len]);
                assert!(dst[..start].iter().all(|&v| v == 0) && dst[start + len..].iter().all(|&v| v == 0));
            }
        }
    }
}
