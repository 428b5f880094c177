//! SIMD decoders of packed codes (codes → codebook entries in registers), shared by the GEMV, its
//! transposed twin and the dequantizer, and the dequantizer's row kernels built on them.
/// The entries of a row's 256-entry codebook (16 registers, `t`) at 16 byte indices: eight
/// two-source `vpermt2ps` (32 entries each, index bits 0-4), then blends by bits 5, 6 and 7. At
/// 4096² it decodes 2.8x as fast as 16-lane gathers on this project's AVX-512 EPYC.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) unsafe fn lookup256_avx512(t: &[std::arch::x86_64::__m512; 16], idx: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512 {
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

/// Whether a row's 256-entry codebook (16 registers) is antisymmetric: `t[256 − f] = −t[f]`,
/// bit for bit, for f = 1..127, as [`super::codebook`] builds them (t[0] and t[128] are free), so
/// that [`lookup_antisym_avx512`] reads the same entries as [`lookup256_avx512`]. About 40
/// instructions a row; a codebook from elsewhere (the custom op takes any) may fail it.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) unsafe fn antisymmetric_avx512(t: &[std::arch::x86_64::__m512; 16]) -> bool {
    use std::arch::x86_64::*;
    let reverse = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let sign = _mm512_set1_epi32(i32::MIN);
    let mut equal: u16 = 0xFFFF;
    for j in 0..8 {
        // Lane l: t[255 − 16j − l] against −t[16j + l + 1] (f = 16j + l + 1).
        let back = _mm512_permutexvar_epi32(reverse, _mm512_castps_si512(t[15 - j]));
        let next = _mm512_alignr_epi32(_mm512_castps_si512(t[j + 1]), _mm512_castps_si512(t[j]), 1);
        let mut m = _mm512_cmpeq_epi32_mask(back, _mm512_xor_si512(next, sign));
        if j == 7 {
            m |= 0x8000; // f = 128: free
        }
        equal &= m;
    }
    equal == 0xFFFF
}

/// [`lookup256_avx512`] for an antisymmetric codebook ([`antisymmetric_avx512`]): its first 128
/// entries (`t[0..8]`) at |q| of the 16 codes q (the bytes as int8): four `vpermt2ps` and blends by
/// bits 5 and 6, half the permutes; |q| = 128 (q = −128) takes `top` = −t[128]; then the negative
/// codes' entries are negated.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) unsafe fn lookup_antisym_avx512(
    t: &[std::arch::x86_64::__m512; 16], top: std::arch::x86_64::__m512, bytes: std::arch::x86_64::__m128i,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let q = _mm512_cvtepi8_epi32(bytes);
    let (neg, idx) = (_mm512_cmplt_epi32_mask(q, _mm512_setzero_si512()), _mm512_abs_epi32(q));
    let p: [__m512; 4] = std::array::from_fn(|j| _mm512_permutex2var_ps(t[2 * j], idx, t[2 * j + 1]));
    let bit = |b: i32| _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << b));
    let (b5, b6, b7) = (bit(5), bit(6), bit(7));
    let v = _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, p[0], p[1]), _mm512_mask_blend_ps(b5, p[2], p[3]));
    let v = _mm512_mask_mov_ps(v, b7, top);
    _mm512_mask_sub_ps(v, neg, _mm512_setzero_ps(), v)
}

/// A row's 256-entry (8-bit) codebook in registers, looked up 16 codes at a time: by
/// [`lookup_antisym_avx512`] where it is antisymmetric (every codebook power_codebook makes), else
/// by [`lookup256_avx512`] (the custom op takes any table).
#[cfg(target_arch = "x86_64")]
pub(super) struct Codebook256 {
    t: [std::arch::x86_64::__m512; 16],
    /// −t[128], for [`lookup_antisym_avx512`].
    top: std::arch::x86_64::__m512,
    antisym: bool,
}

#[cfg(target_arch = "x86_64")]
impl Codebook256 {
    /// # Safety
    /// AVX-512F; `table` valid for 256 float32 reads.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    pub(super) unsafe fn load(table: *const f32) -> Codebook256 {
        use std::arch::x86_64::*;
        let t: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(table.add(16 * i)));
        Codebook256 { antisym: antisymmetric_avx512(&t), top: _mm512_set1_ps(-*table.add(128)), t }
    }

    /// The entries of the 16 codes in `bytes`.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    pub(super) unsafe fn lookup(&self, bytes: std::arch::x86_64::__m128i) -> std::arch::x86_64::__m512 {
        if self.antisym {
            lookup_antisym_avx512(&self.t, self.top, bytes)
        } else {
            lookup256_avx512(&self.t, std::arch::x86_64::_mm512_cvtepu8_epi32(bytes))
        }
    }
}

/// A row's 256-entry (8-bit) codebook as four byte planes (plane j: byte j of every entry, little
/// endian), each in four registers (entries 0-63, 64-127, 128-191, 192-255), for
/// [`Planes256::decode64`]: `vpermi2b` looks a byte up among 128 by the low 7 bits of its index.
#[cfg(target_arch = "x86_64")]
pub(super) struct Planes256 {
    p: [[std::arch::x86_64::__m512i; 4]; 4],
    /// The codebook is antisymmetric ([`antisymmetric_avx512`]: every codebook lmkern makes), so
    /// entries 0-127 and the sign decide every code but -128, whose entry is `t128`.
    antisym: bool,
    t128: u32,
}

#[cfg(target_arch = "x86_64")]
impl Planes256 {
    /// The planes of a row's codebook: each 16-entry register's bytes sorted by plane (`vpermb`),
    /// then each plane's 16-byte pieces gathered from four registers (three lane shuffles); of an
    /// antisymmetric one only entries 0-127 (the rest stay zero, unread).
    ///
    /// # Safety
    /// AVX-512 F, BW and VBMI; `table` valid for 256 float32 reads.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
    #[inline]
    pub(super) unsafe fn load(table: *const f32) -> Planes256 {
        use std::arch::x86_64::*;
        // Byte 4e + j of a register (entry e, byte j) to 16j + e: lane j holds plane j.
        let sort = _mm512_set_epi8(
            63, 59, 55, 51, 47, 43, 39, 35, 31, 27, 23, 19, 15, 11, 7, 3, 62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22,
            18, 14, 10, 6, 2, 61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21, 17, 13, 9, 5, 1, 60, 56, 52, 48, 44, 40, 36,
            32, 28, 24, 20, 16, 12, 8, 4, 0,
        );
        let t: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(table.add(16 * i)));
        let antisym = antisymmetric_avx512(&t);
        let z: [__m512i; 16] = std::array::from_fn(|i| {
            if antisym && i >= 8 {
                _mm512_setzero_si512()
            } else {
                _mm512_permutexvar_epi8(sort, _mm512_castps_si512(t[i]))
            }
        });
        let mut p = [[_mm512_setzero_si512(); 4]; 4];
        // An antisymmetric codebook's lookups read entries 0-127 only: their two registers a plane.
        let quarters = if antisym { 2 } else { 4 };
        macro_rules! plane {
            ($j:literal) => {
                for q in 0..quarters {
                    // Lane $j of z[4q], z[4q + 1], z[4q + 2], z[4q + 3], in order.
                    let a = _mm512_shuffle_i32x4::<{ $j * 0x55 }>(z[4 * q], z[4 * q + 1]);
                    let b = _mm512_shuffle_i32x4::<{ $j * 0x55 }>(z[4 * q + 2], z[4 * q + 3]);
                    p[$j][q] = _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b);
                }
            };
        }
        plane!(0);
        plane!(1);
        plane!(2);
        plane!(3);
        Planes256 { p, antisym, t128: (*table.add(128)).to_bits() }
    }

    /// The entries of the 64 codes at `codes`, as four vectors: vector v, 128-bit lane L, element e
    /// is code 16L + 4v + e (the order of the byte and word unpacks that assemble them). Per plane
    /// two `vpermi2b` (entries below and above 128) and a blend by the code's top bit, or, for an
    /// antisymmetric codebook, one `vpermi2b` at |q| and the sign of q put on the top byte (q = -128
    /// blended from `t128` where present); then eight unpacks: ~16-20 instructions per 64 weights
    /// against [`lookup_antisym_avx512`]'s ~60.
    ///
    /// # Safety
    /// As [`Planes256::load`]; `codes` valid for 64 bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
    #[inline]
    pub(super) unsafe fn decode64(&self, codes: *const u8) -> [std::arch::x86_64::__m512; 4] {
        use std::arch::x86_64::*;
        let idx = _mm512_loadu_si512(codes as *const _);
        let b: [__m512i; 4] = if self.antisym {
            // |q| as the index (q = -128 gives 0x80, read as entry 0 and replaced below).
            let abs = _mm512_abs_epi8(idx);
            let mut b: [__m512i; 4] = std::array::from_fn(|j| _mm512_permutex2var_epi8(self.p[j][0], abs, self.p[j][1]));
            // t[256 - |q|] = -t[|q|]: q's sign bit onto the entry's (bit 7 of its top byte).
            b[3] = _mm512_ternarylogic_epi32::<0x78>(b[3], idx, _mm512_set1_epi8(i8::MIN));
            let min = _mm512_cmpeq_epi8_mask(idx, _mm512_set1_epi8(i8::MIN));
            if min != 0 {
                for (j, bj) in b.iter_mut().enumerate() {
                    *bj = _mm512_mask_blend_epi8(min, *bj, _mm512_set1_epi8((self.t128 >> (8 * j)) as u8 as i8));
                }
            }
            b
        } else {
            let high = _mm512_movepi8_mask(idx);
            std::array::from_fn(|j| {
                let p = &self.p[j];
                let lo = _mm512_permutex2var_epi8(p[0], idx, p[1]);
                let hi = _mm512_permutex2var_epi8(p[2], idx, p[3]);
                _mm512_mask_blend_epi8(high, lo, hi)
            })
        };
        let (lo01, hi01) = (_mm512_unpacklo_epi8(b[0], b[1]), _mm512_unpackhi_epi8(b[0], b[1]));
        let (lo23, hi23) = (_mm512_unpacklo_epi8(b[2], b[3]), _mm512_unpackhi_epi8(b[2], b[3]));
        [
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)),
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23)),
        ]
    }
}

/// A B-bit row's codebook (B = 2, 3, 4) repeated to 16 entries: `vpermps` reads 4 bits of an
/// index, so a field's lookup needs no mask of the next field's bits above it (4 bits: the 16
/// entries as they are, one load).
///
/// # Safety
/// AVX-512F; `table` valid for 2^B float32 reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) unsafe fn codebook16_avx512<const B: usize>(table: *const f32) -> std::arch::x86_64::__m512 {
    if B == 4 {
        return std::arch::x86_64::_mm512_loadu_ps(table);
    }
    let t16: [f32; 16] = std::array::from_fn(|i| *table.add(i % (1 << B)));
    std::arch::x86_64::_mm512_loadu_ps(t16.as_ptr())
}

/// The 128 B-bit codes (B = 2, 3, 4) at `src` as 16 dwords for the row-blocked AVX-512 kernels,
/// dword i holding fields 8i .. 8i + 7 from bit 0, B bits each ([`next_field`] shifts the next
/// one down). 4 bits: one 64-byte load. 3 bits: the 48 bytes by a masked load (which touches
/// nothing past them), the 3-byte unit i spread to dword i by one `vpermb`. 2 bits: 32 bytes,
/// word i widened to dword i.
///
/// # Safety
/// AVX-512 F and BW (and VBMI for B = 3) enabled by the caller, which the CPU has; `src` valid
/// for 16·B bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn code_dwords<const B: usize>(src: *const u8) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    match B {
        4 => _mm512_loadu_si512(src as *const _),
        3 => {
            // Output byte 4i + b takes input byte 3i + b (b < 3; byte 3 is masked to zero).
            let spread3 = _mm512_set_epi8(
                63, 47, 46, 45, 63, 44, 43, 42, 63, 41, 40, 39, 63, 38, 37, 36, 63, 35, 34, 33, 63, 32, 31, 30, 63, 29, 28, 27, 63, 26, 25, 24,
                63, 23, 22, 21, 63, 20, 19, 18, 63, 17, 16, 15, 63, 14, 13, 12, 63, 11, 10, 9, 63, 8, 7, 6, 63, 5, 4, 3, 63, 2, 1, 0,
            );
            _mm512_maskz_permutexvar_epi8(0x7777_7777_7777_7777, spread3, _mm512_maskz_loadu_epi8(0xFFFF_FFFF_FFFF, src as *const i8))
        }
        _ => _mm512_cvtepu16_epi32(_mm256_loadu_si256(src as *const __m256i)),
    }
}

/// [`code_dwords`]' dwords shifted on to the next B-bit field.
///
/// # Safety
/// AVX-512F enabled by the caller, which the CPU has.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn next_field<const B: usize>(d: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    match B {
        4 => _mm512_srli_epi32::<4>(d),
        3 => _mm512_srli_epi32::<3>(d),
        _ => _mm512_srli_epi32::<2>(d),
    }
}

/// The B bytes (B = 2, 3) of the 8 B-bit fields 8u .. 8u + 7 of a row of `rb` bytes, little-endian
/// in an i32: one 4-byte load where the row has 4 bytes left from the unit, else its own B bytes
/// (the next row, or nothing, may follow).
///
/// # Safety
/// `row` valid for `rb` bytes; B·u + B <= rb.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn unit_word<const B: usize>(row: *const u8, rb: usize, u: usize) -> i32 {
    if B * u + 4 <= rb {
        (row.add(B * u) as *const i32).read_unaligned()
    } else {
        (0..B).fold(0u32, |w, b| w | (*row.add(B * u + b) as u32) << (8 * b)) as i32
    }
}

/// The 16 codebook entries of the 3-bit fields whose bytes `bytes` holds in each 128-bit lane:
/// `shuf` ([`SHUF3`], or it + 6 for the second unit of 12 bytes) gives lane i the dword of field
/// i's bytes, [`SHIFTS3`] brings the field to bit 0, `vpermps` looks it up in `tab`
/// ([`codebook16_avx512`]).
///
/// # Safety
/// AVX-512 F, BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
pub(super) unsafe fn lookup16_3bit_avx512(
    bytes: std::arch::x86_64::__m512i, shuf: std::arch::x86_64::__m512i, tab: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let lanes = _mm512_shuffle_epi8(bytes, shuf);
    _mm512_permutexvar_ps(_mm512_srlv_epi32(lanes, _mm512_loadu_si512(SHIFTS3.as_ptr() as *const _)), tab)
}

/// The 16 codebook entries of unit u (codes 16u .. 16u + 15) of a B-bit row (B = 2, 3) of `rb`
/// bytes, in column order (`linear_tile_avx512_small` in [`mod@super::linear`] describes the decode; a
/// 3-bit unit takes a masked load at the row's end, which never touches the bytes past it).
///
/// # Safety
/// AVX-512 F, BW, VL; `tab` from [`codebook16_avx512`]; `row` valid for `rb` bytes; 16u < the row's fields.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
pub(super) unsafe fn decode16_small_avx512<const B: usize>(tab: std::arch::x86_64::__m512, row: *const u8, rb: usize, u: usize) -> std::arch::x86_64::__m512 {
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
        lookup16_3bit_avx512(_mm512_broadcast_i32x4(src), _mm512_loadu_si512(SHUF3.as_ptr() as *const _), tab)
    }
}

/// The shifts of the 3-bit decode after [`SHUF3`]: lane i by 3i mod 8, field i's first bit in its byte.
#[cfg(target_arch = "x86_64")]
pub(super) const SHIFTS3: [i32; 16] = [0, 3, 6, 1, 4, 7, 2, 5, 0, 3, 6, 1, 4, 7, 2, 5];

/// The `vpshufb` control of the 3-bit decode (`linear_tile_avx512_small` in [`mod@super::linear`]):
/// dword lane i (of 16; four per 128-bit lane) takes bytes ⌊3i/8⌋ .. ⌊3i/8⌋ + 3 of the 16 loaded,
/// the bytes of field i.
#[cfg(target_arch = "x86_64")]
pub(super) const SHUF3: [u8; 64] = {
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

/// A row's 16-entry float32 codebook split into byte planes (plane b holds byte b of every
/// entry), in both 128-bit lanes: the tables [`decode32`] looks code nibbles up in. Group each
/// 4-float vector's bytes by plane, then transpose the 4×4 dwords.
///
/// # Safety
/// AVX2; `table` is valid for 16 float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn byte_planes(table: *const f32) -> [std::arch::x86_64::__m256i; 4] {
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
pub(super) unsafe fn decode32(planes: &[std::arch::x86_64::__m256i; 4], codes: *const u8) -> [std::arch::x86_64::__m256; 4] {
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
pub(super) unsafe fn column_order(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
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
pub(super) unsafe fn small_codebook<const B: usize>(table: *const f32) -> std::arch::x86_64::__m256 {
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
pub(super) unsafe fn decode8_small<const B: usize>(tab: std::arch::x86_64::__m256, word: i32) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let b = B as i32;
    let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    let idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32((1 << B) - 1));
    _mm256_permutevar8x32_ps(tab, idx)
}

/// [`deq_row_avx2`] with [`decode32_avx512`] and [`column_order_avx512`].
///
/// # Safety
/// AVX-512F, AVX2 and FMA; otherwise as [`deq_row_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn deq_row_avx512(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
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
pub(super) unsafe fn deq_row_avx2(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
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
pub(super) unsafe fn deq_row_avx2_8bit(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
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
pub(super) unsafe fn deq_row_avx512_8bit(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
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
/// lane, masked and looked up with `vpermps` (as `linear_tile_avx2_small` in [`mod@super::linear`]),
/// times m (float32).
///
/// # Safety
/// AVX2; n and g multiples of 8; `codes` n·B/8 bytes, `scales` n/g values, `table` 2^B float32,
/// `out` n writable float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn deq_row_avx2_small<const B: usize>(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let tab = small_codebook::<B>(table);
    let rb = n * B / 8;
    for (gi, &m) in scales.iter().enumerate().take(n / g) {
        let m = _mm256_set1_ps(m);
        for u in gi * g / 8..(gi + 1) * g / 8 {
            let word = unit_word::<B>(codes.as_ptr(), rb, u);
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
pub(super) unsafe fn deq_row_avx512_small<const B: usize>(codes: &[u8], scales: &[f32], table: *const f32, g: usize, out: *mut f32, n: usize) {
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
pub(super) unsafe fn decode32_avx512(table: std::arch::x86_64::__m512, codes: *const u8) -> [std::arch::x86_64::__m512; 2] {
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
pub(super) unsafe fn column_order_avx512(ev: std::arch::x86_64::__m512, od: std::arch::x86_64::__m512) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    [_mm512_permutex2var_ps(ev, first, od), _mm512_permutex2var_ps(ev, second, od)]
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::arch::x86_64::*;

    /// Row r's codebook from `crate::quant::codebook` (antisymmetric) at a few exponents.
    fn codebooks() -> Vec<f32> {
        let a = [0.05f32, 0.3, 0.71, 1.0];
        let mut t = vec![0f32; a.len() * 256];
        // SAFETY: a holds 4 exponents, t 4 × 256 float32.
        unsafe { crate::quant::codebook(8, a.len(), a.as_ptr() as u64, t.as_mut_ptr() as u64).unwrap() };
        t
    }

    /// Both lookups at all 256 bytes, against the table itself (bit for bit).
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn lookups(t: &[f32], antisym: bool) -> Result<(), String> {
        let tab: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(t.as_ptr().add(16 * i)));
        if antisymmetric_avx512(&tab) != antisym {
            return Err(format!("antisymmetric: expected {antisym}"));
        }
        let top = _mm512_set1_ps(-t[128]);
        for b0 in (0..256).step_by(16) {
            let bytes: [u8; 16] = std::array::from_fn(|i| (b0 + i) as u8);
            let v = _mm_loadu_si128(bytes.as_ptr() as *const __m128i);
            let (mut full, mut sym) = ([0f32; 16], [0f32; 16]);
            _mm512_storeu_ps(full.as_mut_ptr(), lookup256_avx512(&tab, _mm512_cvtepu8_epi32(v)));
            _mm512_storeu_ps(sym.as_mut_ptr(), lookup_antisym_avx512(&tab, top, v));
            for (i, &b) in bytes.iter().enumerate() {
                let want = t[b as usize].to_bits();
                if full[i].to_bits() != want || (antisym && sym[i].to_bits() != want) {
                    return Err(format!("byte {b}: {} / {} against {}", full[i], sym[i], t[b as usize]));
                }
            }
        }
        Ok(())
    }

    /// Planes256::decode64 gives entry `t[code]` of any table for every code value in every position,
    /// bit for bit, in its documented order: by both lookups (antisymmetric tables, with their free
    /// entries t[0] and t[128] at any value, and other ones).
    #[test]
    fn planes_decode_every_code_in_every_position() {
        if !crate::cpu::has_avx512_vbmi() {
            return; // the kernel under test needs AVX512-VBMI (CI's machine has it)
        }
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        // Random bit patterns (NaNs and infinities included: the lookup moves bytes), codebooks, one
        // with its free entries changed, one with an entry bent by an ulp (no longer antisymmetric).
        let mut tables: Vec<(Vec<f32>, bool)> = vec![((0..256).map(|_| f32::from_bits(next() as u32)).collect(), false)];
        tables.extend(codebooks().chunks_exact(256).map(|t| (t.to_vec(), true)));
        let mut free = tables[1].0.clone();
        (free[0], free[128]) = (0.25, -3.0);
        let mut bent = tables[2].0.clone();
        bent[200] = f32::from_bits(bent[200].to_bits() ^ 1);
        tables.extend([(free, true), (bent, false)]);
        for (t, antisym) in &tables {
            // SAFETY: AVX-512 F/BW/VBMI checked above; t holds 256 floats.
            let planes = unsafe { Planes256::load(t.as_ptr()) };
            assert_eq!(planes.antisym, *antisym);
            for round in 0..8 {
                // Rounds 0-3: code 64·round + position (every value once); then random codes.
                let codes: [u8; 64] = std::array::from_fn(|i| if round < 4 { (64 * round + i) as u8 } else { next() as u8 });
                let mut got = [[0u32; 16]; 4];
                // SAFETY: as above; codes holds 64 bytes.
                unsafe {
                    for (g, v) in got.iter_mut().zip(planes.decode64(codes.as_ptr())) {
                        _mm512_storeu_si512(g.as_mut_ptr() as *mut _, _mm512_castps_si512(v));
                    }
                }
                for (v, g) in got.iter().enumerate() {
                    for (i, &bits) in g.iter().enumerate() {
                        let code = codes[16 * (i / 4) + 4 * v + i % 4];
                        assert_eq!(bits, t[code as usize].to_bits(), "round {round}, vector {v}, element {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn antisymmetric_lookups_read_the_table() {
        if !crate::cpu::has_avx512() {
            return; // the kernels under test need AVX-512 (CI's machine has it)
        }
        for t in codebooks().chunks_exact(256) {
            // SAFETY: AVX-512 checked above.
            unsafe { lookups(t, true) }.unwrap();
            // t[0] and t[128] are free: any value is read back as it is.
            let mut free = t.to_vec();
            (free[0], free[128]) = (0.25, 3.0);
            unsafe { lookups(&free, true) }.unwrap();
            // Any one entry of the other 254 changed (by one ulp) breaks the antisymmetry.
            for f in (1..128).chain(129..256) {
                let mut bent = t.to_vec();
                bent[f] = f32::from_bits(bent[f].to_bits() ^ 1);
                unsafe { lookups(&bent, false) }.map_err(|e| format!("entry {f}: {e}")).unwrap();
            }
        }
    }
}
