//! The fused lookup-table GEMV of PowerQuantLinear on the CPU, y = x @ Ŵᵀ + b: Ŵ is never
//! formed; each row's codebook times its group scales meets x in registers, per instruction set
//! ([`crate::cpu::isa`]) and code width.
use super::*;

/// Inputs of a linear call, loaded to float32 once.
struct Lin<'a> {
    l: &'a LinearArgs,
    /// x as float32 [tokens, k]; for the AVX2 4-bit path each 8-block is reordered to its 4 even
    /// elements then its 4 odd elements (the order of [`decode32`]), for the AVX-512 one each
    /// 32-block to its 16 even elements then its 16 odd ones ([`decode32_avx512`]), for its
    /// row-blocked form (2-4 bits) each 128-block's element 8i + j at 16j + i ([`rows_avx512`]). Its first
    /// element is on a 64-byte boundary.
    xf: &'a [f32],
    codes: u64,
    scales: u64,
    /// The rows' codebooks, float32 [out, 2^b].
    table: u64,
    bias: u64,
    y: u64,
}

/// # Safety
/// See [`crate::quant::linear`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear(dtype: DType, l: &LinearArgs, x: u64, codes: u64, scales: u64, table: u64, bias: u64, y: u64) {
    match dtype {
        DType::F32 => linear_t::<f32>(l, x, codes, scales, table, bias, y),
        DType::F64 => linear_t::<f64>(l, x, codes, scales, table, bias, y),
        DType::F16 => linear_t::<f16>(l, x, codes, scales, table, bias, y),
        DType::BF16 => linear_t::<bf16>(l, x, codes, scales, table, bias, y),
    }
}

pub(super) fn fast_path(q: &QuantArgs) -> bool {
    cfg!(target_arch = "x86_64") && q.bits == 4 && q.n.is_multiple_of(32) && q.group.is_multiple_of(32) && crate::cpu::has_avx2()
}

/// The AVX-512 4-bit GEMV and dequantizer apply: as [`fast_path`], on a CPU with AVX-512.
pub(super) fn fast512_path(q: &QuantArgs) -> bool {
    avx512_shape(q.bits, q.n, q.group)
}

/// `fast512_path` for a shape: 4 bits, `n` and the group size multiples of 32, and this CPU runs
/// the AVX-512 kernels.
pub fn avx512_shape(bits: u32, n: usize, group: usize) -> bool {
    cfg!(target_arch = "x86_64") && bits == 4 && n.is_multiple_of(32) && group.is_multiple_of(32) && crate::cpu::has_avx512()
}

/// The row-blocked AVX-512 GEMV of 4-, 3- and 2-bit codes ([`tiles_rows512`]) and the input
/// gradient's row tasks apply to codes of `bits` in groups of `group`: the group size a multiple of
/// 128 (a load of codes is 128 weights of one group), a CPU with AVX-512 (3 bits: and VBMI, whose
/// byte permute spreads the 3-byte units to dwords).
pub fn rows512_shape(bits: u32, group: usize) -> bool {
    let bits_ok = match bits {
        4 | 2 => crate::cpu::has_avx512(),
        3 => crate::cpu::has_avx512_vbmi(),
        _ => false,
    };
    cfg!(target_arch = "x86_64") && group.is_multiple_of(128) && bits_ok
}

/// [`rows512_shape`] of a call.
pub(super) fn rows512_path(q: &QuantArgs) -> bool {
    rows512_shape(q.bits, q.group)
}

/// The AVX-512 8-bit GEMV decodes 64 codes at a time by byte planes ([`Planes256::decode64`]): the
/// group size (so the row) a multiple of 64, a CPU with AVX512-VBMI.
fn vbmi8_path(q: &QuantArgs) -> bool {
    q.bits == 8 && q.group.is_multiple_of(64) && crate::cpu::has_avx512_vbmi()
}

/// The AVX2 8-bit GEMV applies: 8-bit codes, the group size (so the row) a multiple of 16.
pub(super) fn fast8_path(q: &QuantArgs) -> bool {
    cfg!(target_arch = "x86_64") && q.bits == 8 && q.group.is_multiple_of(16) && crate::cpu::has_avx2()
}

/// The AVX2 2-/3-bit GEMV applies: 2 or 3 bits, the group size (so the row) a multiple of 8.
pub(super) fn fast23_path(q: &QuantArgs) -> bool {
    cfg!(target_arch = "x86_64") && (q.bits == 2 || q.bits == 3) && q.group.is_multiple_of(8) && crate::cpu::has_avx2()
}

unsafe fn linear_t<T: QElem>(l: &LinearArgs, x: u64, codes: u64, scales: u64, table: u64, bias: u64, y: u64)
{
    let (k, nout, tokens) = (l.q.n, l.q.rows, l.tokens);
    let xin = slice::<T>(x, tokens * k);
    let rows512 = rows512_path(&l.q);
    let fast512 = fast512_path(&l.q) && !rows512;
    let fast = fast_path(&l.q) && !fast512 && !rows512;
    let fast8 = fast8_path(&l.q);
    let fast23 = fast23_path(&l.q);
    // x as float32 from a 64-byte boundary (so every row, k being a multiple of 32 on the SIMD
    // paths): a 512-bit load of it then never straddles two cache lines.
    let mut store = vec![0f32; tokens * k + 15];
    let o = store.as_ptr().align_offset(64).min(15);
    let xf = &mut store[o..o + tokens * k];
    if rows512 {
        // The order of rows_avx512's lookups: element 8i + j of each 128-block
        // (nibble j of its code dword i) at 16j + i.
        for (dst, src) in xf.chunks_exact_mut(128).zip(xin.chunks_exact(128)) {
            for i in 0..16 {
                for j in 0..8 {
                    dst[16 * j + i] = src[8 * i + j].load().to_f64() as f32;
                }
            }
        }
    } else if fast512 {
        // The order in which decode32_avx512 produces them: each 32-block's even elements, then its odd ones.
        for (dst, src) in xf.chunks_exact_mut(32).zip(xin.chunks_exact(32)) {
            for i in 0..16 {
                dst[i] = src[2 * i].load().to_f64() as f32;
                dst[16 + i] = src[2 * i + 1].load().to_f64() as f32;
            }
        }
    } else if vbmi8_path(&l.q) {
        // The order in which Planes256::decode64 produces them: element 16L + 4v + e of each
        // 64-block at 16v + 4L + e.
        for (dst, src) in xf.chunks_exact_mut(64).zip(xin.chunks_exact(64)) {
            for v in 0..4 {
                for lane in 0..4 {
                    for e in 0..4 {
                        dst[16 * v + 4 * lane + e] = src[16 * lane + 4 * v + e].load().to_f64() as f32;
                    }
                }
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
    let lin = Lin { l, xf: &*xf, codes, scales, table, bias, y };
    // Tiles of output rows: each reads its rows' codes once per tile of tokens (4-bit: 8, then 4, 2,
    // 1; 2-, 3- and 8-bit: 4, then 1). The calling thread
    // and the pool's threads each take the next tile until none is left: the caller starts at once
    // (rather than sleeping until a pool thread wakes: 2.0-2.3 -> 1.3-1.4 ms side by side with the
    // dense GEMV on this VM), and a thread the OS preempts holds up one tile, never a share of the
    // rows fixed in advance. Every row is still computed by one tile in a fixed order
    // (deterministic whatever the thread count).
    let work = nout * k * tokens.max(1);
    let task_rows = if rows512 { TASK_ROWS512 } else { TILE };
    let tiles = nout.div_ceil(task_rows);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let body = || loop {
        let ti = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if ti >= tiles {
            break;
        }
        let (o0, o1) = (ti * task_rows, ((ti + 1) * task_rows).min(nout));
        if rows512 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: rows512_path checked AVX-512 (F, BW, VL, with AVX2+FMA; VBMI for 3 bits),
            // 4, 3 or 2 bits, the group size (so k) a multiple of 128; x is in rows_avx512's order.
            unsafe {
                let mut r0 = o0;
                while r0 < o1 {
                    tiles_rows512::<T>(&lin, r0, (r0 + TILE).min(o1));
                    r0 += TILE;
                }
            }
        } else if fast512 {
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
/// [`crate::quant::linear`] documents (x in column order).
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

/// Rows o0..o1 of the AVX-512 8-bit path, every token: tiles of 4 tokens, then single ones; by byte
/// planes ([`linear_tile_avx512_8bit_vbmi`]) where [`vbmi8_path`] holds (it checks the CPU's
/// AVX512-VBMI; BW comes with every AVX-512 CPU the kernels run on, [`crate::cpu::has_avx512`]).
///
/// # Safety
/// AVX-512 (F), AVX2 and FMA; otherwise as [`linear_tiles_avx2_8bit`]; x in decode64's order where
/// [`vbmi8_path`] holds (as [`linear_t`] puts it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn linear_tiles_avx512_8bit<T: QElem>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut t0 = 0;
    if vbmi8_path(&lin.l.q) {
        while t0 < tokens {
            t0 += if tokens - t0 >= 4 {
                linear_tile_avx512_8bit_vbmi::<T, 4>(lin, o0, o1, t0)
            } else {
                linear_tile_avx512_8bit_vbmi::<T, 1>(lin, o0, o1, t0)
            };
        }
        return;
    }
    while t0 < tokens {
        t0 += if tokens - t0 >= 4 {
            linear_tile_avx512_8bit::<T, 4>(lin, o0, o1, t0)
        } else {
            linear_tile_avx512_8bit::<T, 1>(lin, o0, o1, t0)
        };
    }
}

/// [`linear_tile_avx2_8bit`] with AVX-512: per 16 codes a [`Codebook256`] lookup instead of two
/// 8-lane gathers. Returns NT.
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
        let book = Codebook256::load(table.add(256 * o));
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
                let w = book.lookup(_mm_loadu_si128(row.add(u) as *const __m128i));
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

/// [`linear_tile_avx512_8bit`] with AVX512-VBMI: per 64 codes [`Planes256::decode64`] (x in its
/// order, as [`linear_t`] puts it) and four FMAs per token, into four chains at one token and two
/// beyond (the 16 plane registers leave no room for more); per group the sums are scaled by m.
/// Returns NT.
///
/// # Safety
/// As [`linear_tiles_avx512_8bit`], and AVX-512 BW and VBMI, the group size a multiple of 64, x
/// in decode64's order; t0 + NT <= tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn linear_tile_avx512_8bit_vbmi<T: QElem, const NT: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize) -> usize {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (k, ng, g) = (q.n, q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let x0 = lin.xf.as_ptr().add(t0 * k);
    let chains = if NT == 1 { 4 } else { 2 };
    for o in o0..o1 {
        let planes = Planes256::load(table.add(256 * o));
        let row = codes.add(o * k);
        let mut tot = [_mm512_setzero_ps(); NT];
        for gi in 0..ng {
            let mut a = [[_mm512_setzero_ps(); 4]; NT];
            let mut u = gi * g;
            while u < (gi + 1) * g {
                // Prefetches never fault: addresses past the buffers are harmless.
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(u + PREFETCH) as *const i8);
                let w = planes.decode64(row.add(u));
                for t in 0..NT {
                    let xp = x0.add(t * k + u);
                    for v in 0..4 {
                        a[t][v % chains] = _mm512_fmadd_ps(w[v], _mm512_loadu_ps(xp.add(16 * v)), a[t][v % chains]);
                    }
                }
                u += 64;
            }
            let m = _mm512_set1_ps(*scales.add(o * ng + gi));
            for t in 0..NT {
                let s = _mm512_add_ps(_mm512_add_ps(a[t][0], a[t][1]), _mm512_add_ps(a[t][2], a[t][3]));
                tot[t] = _mm512_fmadd_ps(s, m, tot[t]);
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
/// [`crate::quant::linear`] documents (x in column order).
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
    let x0 = lin.xf.as_ptr().add(t0 * k);
    for o in o0..o1 {
        let tab = small_codebook::<B>(table.add(o << B));
        let row = codes.add(o * rb);
        let mut l = 0;
        while l < rb {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(l + PREFETCH) as *const i8);
            l += 64;
        }
        let mut tot = [_mm256_setzero_ps(); NT];
        for gi in 0..ng {
            let (mut a, mut c) = ([_mm256_setzero_ps(); NT], [_mm256_setzero_ps(); NT]);
            let mut u = gi * g / 8;
            while u < (gi + 1) * g / 8 {
                let w = decode8_small::<B>(tab, unit_word::<B>(row, rb, u));
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
/// valid as [`crate::quant::linear`] documents (x in column order).
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
    // 3 bits: the byte shuffles of a pair's first and second unit.
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
            let dec3 = |lanes: __m512i, p: usize| lookup16_3bit_avx512(lanes, shuf[p], tab);
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
    // SAFETY: bias is a read-only float32 [out] when given (see `crate::quant::linear`).
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


/// Output rows per task of the GEMV.
const TILE: usize = 16;

/// Output rows per task of the row-blocked AVX-512 GEMV.
const TASK_ROWS512: usize = 64;

/// Activation floats a chunk of [`linear_tile_avx2_wide`] keeps in L1 (16 KB, half of Zen 3's L1d).
#[cfg(target_arch = "x86_64")]
const L1_ACTIVATION_FLOATS: usize = 4096;

/// Bytes of the code stream prefetched ahead of the decoder: two rows of a 4096-wide layer. The
/// hardware prefetchers stop at 4 KiB pages; without this the codes stream from DRAM at a third of
/// the bandwidth when a larger operation has evicted them (the dense GEMV next to this one does).
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 4096;

/// Writes y\[t0 + t, o\] = the lane sum of `sums[t]` + bias\[o\] for each token t of a GEMV tile (the
/// lanes added pairwise in a fixed order).
///
/// # Safety
/// AVX2; `lin` valid as [`crate::quant::linear`] documents; (t0 + t, o) inside y and written by this task only.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn write_row_sums<T: QElem>(lin: &Lin, o: usize, t0: usize, sums: &[std::arch::x86_64::__m256]) {
    let mut values = [0f32; 8];
    for (t, v) in sums.iter().enumerate() {
        let mut lanes = [0f32; 8];
        std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), *v);
        values[t] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    }
    write_row_values::<T>(lin, o, t0, &values[..sums.len()]);
}

/// [`write_row_sums`] for AVX-512 sums (the lanes added by `_mm512_reduce_add_ps`, a fixed order).
///
/// # Safety
/// AVX-512F; as [`write_row_sums`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn write_row_sums_avx512<T: QElem>(lin: &Lin, o: usize, t0: usize, sums: &[std::arch::x86_64::__m512]) {
    let mut values = [0f32; 8];
    for (t, v) in sums.iter().enumerate() {
        values[t] = std::arch::x86_64::_mm512_reduce_add_ps(*v);
    }
    write_row_values::<T>(lin, o, t0, &values[..sums.len()]);
}

/// Writes y\[t0 + t, o\] = `values[t]` + bias\[o\] (in float32) for each token t of a GEMV tile.
///
/// # Safety
/// `lin` valid as [`crate::quant::linear`] documents; (t0 + t, o) inside y and written by this task only.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn write_row_values<T: QElem>(lin: &Lin, o: usize, t0: usize, values: &[f32]) {
    let b = if lin.bias != 0 { *(lin.bias as *const f32).add(o) } else { 0.0 };
    for (t, &v) in values.iter().enumerate() {
        (lin.y as *mut T).add((t0 + t) * lin.l.q.rows + o).write(T::store(T::Acc::from_f64((v + b) as f64)));
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
/// valid buffers as [`crate::quant::linear`] documents, x permuted as `linear_t` does; t0 + NT <= tokens.
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

/// 4-bit codes with AVX-512, tokens t0 .. t0 + NT: per 32-weight block [`decode32_avx512`] and two
/// FMAs per token (x in its order: [`linear_t`] puts each 32-block's even elements first), one
/// chain per token for the even fields and one for the odd, and at one token two more (blocks
/// alternate) so that four FMAs are in flight. The codebook is scaled by each group's m before its
/// lookups (the weights are m·table\[field\] in float32, as Ŵ), so the chains run through the whole
/// row. As [`linear_tile_avx2_wide`], the tile's rows are walked a chunk of whole groups at a time
/// so that NT tokens' activations stay in L1 (at one token a 4096-wide row is one chunk), every
/// row's chains kept in `tot`. The code stream is prefetched two rows ahead one block at a time
/// (a burst of a row's 32 prefetches at its start stalled on the fill buffers: 25 % slower at one
/// token on a Xeon with AVX-512). Returns NT.
///
/// # Safety
/// AVX-512F, AVX2 and FMA; 4-bit codes; k and the group size multiples of 32; `lin` holds valid
/// buffers as [`crate::quant::linear`] documents, x in [`decode32_avx512`]'s order; t0 + NT <= tokens;
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
    // Each row's running sums, per token: chains 0 and 1 (the even and the odd fields) and, at one
    // token, 2 and 3 (every other block) so that four FMAs are in flight.
    let mut tot = [[[_mm512_setzero_ps(); 4]; NT]; TILE];
    let mut c0 = 0;
    while c0 < ng {
        let c1 = (c0 + chunk_groups).min(ng);
        for o in o0..o1 {
            let tab = _mm512_loadu_ps(table.add(16 * o));
            let row = codes.add(o * rb);
            // The same columns, scales and codebook two rows on (prefetches never fault: addresses
            // past the buffers are harmless, hence the wrapping arithmetic).
            let ahead = row.wrapping_add(2 * rb);
            let sp = scales.wrapping_add((o + 2) * ng + c0) as *const i8;
            let mut l = 0;
            while l < (c1 - c0) * 4 {
                _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(l));
                l += 64;
            }
            _mm_prefetch::<_MM_HINT_T0>(table.wrapping_add((o + 2) * 16) as *const i8);
            // A copy, so that the chains stay in registers through the groups.
            let mut acc = tot[o - o0];
            for gi in c0..c1 {
                // The group's scale goes into the codebook (one multiply a group), so the chains run
                // on from group to group with no sum per group.
                let tab = _mm512_mul_ps(tab, _mm512_set1_ps(*scales.add(o * ng + gi)));
                let mut b = 0;
                if NT == 1 {
                    while b + 2 <= blocks {
                        let off = gi * g + b * 32;
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off / 2) as *const i8);
                        let [w0, w1] = decode32_avx512(tab, row.add(off / 2));
                        let [w2, w3] = decode32_avx512(tab, row.add(off / 2 + 16));
                        let xp = x0.add(off);
                        acc[0][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0][0]);
                        acc[0][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[0][1]);
                        acc[0][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp.add(32)), acc[0][2]);
                        acc[0][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp.add(48)), acc[0][3]);
                        b += 2;
                    }
                }
                while b < blocks {
                    let off = gi * g + b * 32;
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off / 2) as *const i8);
                    let [w0, w1] = decode32_avx512(tab, row.add(off / 2));
                    for t in 0..NT {
                        let xp = x0.add(t * k + off);
                        acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[t][0]);
                        acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[t][1]);
                    }
                    b += 1;
                }
            }
            tot[o - o0] = acc;
        }
        c0 = c1;
    }
    for o in o0..o1 {
        let sums: [__m512; NT] = std::array::from_fn(|t| {
            let c = &tot[o - o0][t];
            _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3]))
        });
        write_row_sums_avx512::<T>(lin, o, t0, &sums);
    }
    NT
}

/// The row-blocked AVX-512 GEMV of 4-, 3- and 2-bit codes for rows o0..o1, every token: tiles of
/// up to 8 tokens ([`tile_sums_rows512`]), each row's sums then written with its bias.
///
/// # Safety
/// As [`rows_avx512`] for every token (the CPU and codes [`rows512_path`] checks); o1 - o0 <= TILE.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_rows512<T: QElem>(lin: &Lin, o0: usize, o1: usize) {
    let tokens = lin.l.tokens;
    let mut sums = [[0f32; 8]; TILE];
    let mut t0 = 0;
    while t0 < tokens {
        let nt = (tokens - t0).min(8);
        match lin.l.q.bits {
            4 => tile_sums_rows512::<4>(lin, o0, o1, t0, nt, &mut sums),
            3 => tile_sums_rows512::<3>(lin, o0, o1, t0, nt, &mut sums),
            _ => tile_sums_rows512::<2>(lin, o0, o1, t0, nt, &mut sums),
        }
        for o in o0..o1 {
            write_row_values::<T>(lin, o, t0, &sums[o - o0][..nt]);
        }
        t0 += nt;
    }
}

/// `sums[o - o0][s]` = row o's dot with token t0 + s for a tile of nt <= 8 tokens, rows R and chains C
/// per kernel call by the token count: R·NT·C accumulators fit the 32 registers with the tables,
/// codes and activations (1 token: 4 rows of 2 chains; 2: 4 rows, 2 chains a token; 3-4: 4 rows,
/// one chain; 5-8: 2 rows. At 4096² on a Xeon, 2 threads: 1 token 0.29 ms, 2 0.39-0.42, 4 0.60, 8
/// 1.18; 2 tokens of one chain 0.42, 4 by 2 rows 0.69, 8 by 1 row 1.36).
///
/// # Safety
/// As [`tiles_rows512`]; 1 <= nt <= 8, t0 + nt <= tokens.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_sums_rows512<const B: usize>(lin: &Lin, o0: usize, o1: usize, t0: usize, nt: usize, sums: &mut [[f32; 8]; TILE]) {
    match nt {
        8 => sums_rows512::<B, 8, 2, 1>(lin, o0, o1, t0, sums),
        7 => sums_rows512::<B, 7, 2, 1>(lin, o0, o1, t0, sums),
        6 => sums_rows512::<B, 6, 2, 1>(lin, o0, o1, t0, sums),
        5 => sums_rows512::<B, 5, 2, 1>(lin, o0, o1, t0, sums),
        4 => sums_rows512::<B, 4, 4, 1>(lin, o0, o1, t0, sums),
        3 => sums_rows512::<B, 3, 4, 1>(lin, o0, o1, t0, sums),
        2 => sums_rows512::<B, 2, 4, 2>(lin, o0, o1, t0, sums),
        _ => sums_rows512::<B, 1, 4, 2>(lin, o0, o1, t0, sums),
    }
}

/// [`sums_body`] with its instruction sets enabled (VBMI only for 3 bits).
///
/// # Safety
/// As [`tile_sums_rows512`], nt = NT.
#[cfg(target_arch = "x86_64")]
unsafe fn sums_rows512<const B: usize, const NT: usize, const R: usize, const C: usize>(
    lin: &Lin, o0: usize, o1: usize, t0: usize, sums: &mut [[f32; 8]; TILE],
) {
    if B == 3 {
        sums_avx512_vbmi::<NT, R, C>(lin, o0, o1, t0, sums)
    } else {
        sums_avx512::<B, NT, R, C>(lin, o0, o1, t0, sums)
    }
}

/// [`sums_body`] for 4- and 2-bit codes.
///
/// # Safety
/// As [`sums_body`], B = 4 or 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn sums_avx512<const B: usize, const NT: usize, const R: usize, const C: usize>(
    lin: &Lin, o0: usize, o1: usize, t0: usize, sums: &mut [[f32; 8]; TILE],
) {
    sums_body::<B, NT, R, C>(lin, o0, o1, t0, sums)
}

/// [`sums_body`] for 3-bit codes.
///
/// # Safety
/// As [`sums_body`], B = 3 (AVX512-VBMI).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma")]
unsafe fn sums_avx512_vbmi<const NT: usize, const R: usize, const C: usize>(
    lin: &Lin, o0: usize, o1: usize, t0: usize, sums: &mut [[f32; 8]; TILE],
) {
    sums_body::<3, NT, R, C>(lin, o0, o1, t0, sums)
}

/// Tokens t0 .. t0 + NT of the row-blocked AVX-512 GEMV for rows o0..o1: R rows at a time
/// ([`rows_avx512`]), then the tile's last rows one at a time, C chains per row and token. The
/// tile's rows are walked a chunk of whole groups at a time (NT tokens' activations of the chunk
/// stay in L1: at one token a 4096-wide row is one chunk), every row's chains kept in `tot`; each
/// row and token's chains are summed in a fixed order into `sums`.
///
/// # Safety
/// As [`rows_avx512`]; t0 + NT <= tokens; o1 - o0 <= TILE.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums_body<const B: usize, const NT: usize, const R: usize, const C: usize>(
    lin: &Lin, o0: usize, o1: usize, t0: usize, sums: &mut [[f32; 8]; TILE],
) {
    use std::arch::x86_64::*;
    let q = &lin.l.q;
    let (ng, g) = (q.groups(), q.group);
    let chunk_groups = (L1_ACTIVATION_FLOATS / NT / g).max(1);
    let mut tot = [[[_mm512_setzero_ps(); C]; NT]; TILE];
    let mut c0 = 0;
    while c0 < ng {
        let c1 = (c0 + chunk_groups).min(ng);
        let mut o = o0;
        while o + R <= o1 {
            rows_avx512::<R, NT, C, B>(lin, o, t0, c0, c1, &mut tot[o - o0..o - o0 + R]);
            o += R;
        }
        while o < o1 {
            rows_avx512::<1, NT, C, B>(lin, o, t0, c0, c1, &mut tot[o - o0..o - o0 + 1]);
            o += 1;
        }
        c0 = c1;
    }
    for o in o0..o1 {
        for s in 0..NT {
            let c = &tot[o - o0][s];
            let v = match C {
                1 => c[0],
                2 => _mm512_add_ps(c[0], c[1]),
                _ => _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])),
            };
            sums[o - o0][s] = _mm512_reduce_add_ps(v);
        }
    }
}

/// Rows o..o + R of the row-blocked AVX-512 GEMV of B-bit codes (B = 4, 3, 2), tokens t0 .. t0 +
/// NT, groups c0..c1, their chains in `acc`. 4 bits: the codes are read as dwords, 64 bytes (128
/// weights of one group) a load, nibble j of dword i being weight 8i + j, so `vpermps` (which
/// reads an index's low 4 bits) looks up the 16 weights of field j after a shift by 4j, the dword
/// register shifted on by 4 per step: per 16 weights one lookup and one shift for the NT FMAs,
/// with no byte-to-dword widening. 2 bits: 32 bytes a load, word i widened to dword i holds
/// weights 8i .. 8i + 7, shifted on by 2 per step; the codebook's 4 entries repeat through the
/// register's 16 ([`codebook16_avx512`]), so the next field in bits 2-3 of the index changes
/// nothing. 3 bits: 48 bytes a (masked) load, the 3-byte unit i (weights 8i .. 8i + 7) spread to
/// dword i by one `vpermb`, shifted on by 3, the 8 entries repeated twice. Each width leaves x in
/// that order ([`linear_t`] puts element 8i + j of each 128-block at 16j + i). The R rows share
/// each activation load and the NT tokens each lookup; chain j mod C of a row and token takes
/// step j (1 token: R = 4 rows of 2 chains, 3.4 cycles per 32 weights against the one-row
/// kernel's 4.4 on a Xeon with AVX-512, where the loads of x, one per FMA, were the bound). The
/// code stream is prefetched four rows (8 KB at k = 4096 and 4 bits) ahead, one line per row and
/// group (two rows ahead: 20 % slower from L3; none: 35 %). Each group's m goes into the
/// codebook first (weights m·table\[field\] in float32, as Ŵ).
///
/// # Safety
/// The caller enables AVX-512 F, BW and VL (and VBMI for B = 3), AVX2 and FMA, which the CPU has;
/// B-bit codes (B = 4, 3, 2); the group size a multiple of 128; `lin` holds valid buffers as
/// [`crate::quant::linear`] documents, x in the order above; rows o..o + R, tokens t0 .. t0 + NT
/// and groups c0..c1 exist; `acc` holds R rows' chains; C is 1, 2 or 4.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed loops over the accumulators keep them in registers
unsafe fn rows_avx512<const R: usize, const NT: usize, const C: usize, const B: usize>(
    lin: &Lin, o: usize, t0: usize, c0: usize, c1: usize, acc: &mut [[[std::arch::x86_64::__m512; C]; NT]],
) {
    use std::arch::x86_64::*;
    const AHEAD: usize = 4;
    let q = &lin.l.q;
    let (k, rb, ng, g) = (q.n, q.row_bytes(), q.groups(), q.group);
    let (codes, scales, table) = (lin.codes as *const u8, lin.scales as *const f32, lin.table as *const f32);
    let x = lin.xf.as_ptr().add(t0 * k);
    // The scales and codebooks of the rows AHEAD on (prefetches never fault: addresses past the
    // buffers are harmless, hence the wrapping arithmetic).
    let sp = scales.wrapping_add((o + AHEAD) * ng + c0) as *const i8;
    let mut l = 0;
    while l < R * (c1 - c0) * 4 {
        _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(l));
        l += 64;
    }
    _mm_prefetch::<_MM_HINT_T0>(table.wrapping_add((o + AHEAD) << B) as *const i8);
    let tab: [__m512; R] = std::array::from_fn(|r| codebook16_avx512::<B>(table.add((o + r) << B)));
    let mut a: [[[__m512; C]; NT]; R] = std::array::from_fn(|r| acc[r]);
    for gi in c0..c1 {
        let t: [__m512; R] = std::array::from_fn(|r| _mm512_mul_ps(tab[r], _mm512_set1_ps(*scales.add((o + r) * ng + gi))));
        let mut blk = 0;
        while blk < g / 128 {
            let col = gi * g + blk * 128;
            let mut d: [__m512i; R] = std::array::from_fn(|r| {
                let src = codes.add((o + r) * rb + col * B / 8);
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(AHEAD * rb) as *const i8);
                code_dwords::<B>(src)
            });
            let xp = x.add(col);
            for j in 0..8 {
                let xv: [__m512; NT] = std::array::from_fn(|s| _mm512_loadu_ps(xp.add(s * k + 16 * j)));
                let c = j % C;
                for r in 0..R {
                    let w = _mm512_permutexvar_ps(d[r], t[r]);
                    for s in 0..NT {
                        a[r][s][c] = _mm512_fmadd_ps(w, xv[s], a[r][s][c]);
                    }
                    d[r] = next_field::<B>(d[r]);
                }
            }
            blk += 1;
        }
    }
    acc[..R].copy_from_slice(&a);
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
