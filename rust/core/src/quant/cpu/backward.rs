//! The input gradient of PowerQuantLinear on the CPU, dx = dy @ Ŵ: the transposed GEMV, tasks
//! owning blocks of dx's columns, per instruction set and code width (with AVX-512, 8-bit codes at
//! a few tokens and 2-4-bit codes at up to 32: tasks owning blocks of rows, their partial sums added
//! after).
use super::*;

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
/// See [`crate::quant::linear_backward`].
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
    #[cfg(target_arch = "x86_64")]
    if l.q.bits == 8 && tokens <= SPLIT_MAX_TOKENS && avx512_narrow_bwd_shape(8, k, l.q.group) {
        // SAFETY: avx512_narrow_bwd_shape checked AVX-512 and k, g multiples of 16; 8-bit codes.
        return unsafe {
            linear_bwd_split::<T>(&lb, SPLIT_ROWS, false, |o0, o1, dst| bwd_split_rows_avx512_8bit(&lb, o0, o1, dst))
        };
    }
    #[cfg(target_arch = "x86_64")]
    if tokens <= SPLIT_MAX_TOKENS_SMALL
        && nout.div_ceil(SPLIT_ROWS_SMALL) * tokens * k * 4 <= SPLIT_MAX_PARTIAL_BYTES
        && rows512_path(&l.q)
    {
        // SAFETY: rows512_path checked AVX-512 (F, BW, VL; VBMI for 3 bits), 2-4-bit codes, k and g
        // multiples of 128; at most SPLIT_MAX_TOKENS_SMALL tokens.
        return unsafe { linear_bwd_split::<T>(&lb, SPLIT_ROWS_SMALL, true, |o0, o1, dst| bwd_split_rows512(&lb, o0, o1, dst)) };
    }
    let cols = bwd_cols(tokens);
    parallel::for_each_task(k.div_ceil(cols), nout * k * tokens, |ci| {
        linear_bwd_cols::<T>(&lb, ci * cols, ((ci + 1) * cols).min(k))
    });
}

/// Rows a task of the 8-bit [`linear_bwd_split`] takes.
#[cfg(target_arch = "x86_64")]
const SPLIT_ROWS: usize = 64;
/// Rows a task of the 2-4-bit [`linear_bwd_split`] takes.
#[cfg(target_arch = "x86_64")]
const SPLIT_ROWS_SMALL: usize = 256;
/// The most tokens the 2-4-bit [`linear_bwd_split`] takes, in tiles of 4 (at 4096² on a Xeon,
/// against the column blocks: 4 bits 8 tokens 1.6 ms against 1.75, 16 3.1 against 3.6, 32 6.3
/// against 7.8; 2 bits 16 2.9 against 4.1, 32 5.5 against 9.1; 3 bits 32 6.9 against 10.4): the
/// 2- and 3-bit transposed GEMV's limit on a full-width CPU (cpu_bwd_gemv_max_tokens).
#[cfg(target_arch = "x86_64")]
const SPLIT_MAX_TOKENS_SMALL: usize = 32;
/// The most bytes of partial sums (tasks × tokens × n float32) the 2-4-bit [`linear_bwd_split`]
/// allocates: 8 MiB (4096² at 32 tokens; as the many-token path's scratch), beyond which the
/// column blocks, which need none, take the call.
#[cfg(target_arch = "x86_64")]
const SPLIT_MAX_PARTIAL_BYTES: usize = 8 << 20;
/// Partial sums (tokens × columns, float32) the 2-4-bit [`linear_bwd_split`] keeps in L1 while
/// its rows pass over them: 24 KiB.
#[cfg(target_arch = "x86_64")]
const SPLIT_L1_FLOATS: usize = 6144;
/// The most tokens the 8-bit [`linear_bwd_split`] takes: it wins at 1-4 (2.5x-1.6x, BENCHMARKS.md
/// stop 22) and loses from 8 (its per-token passes over the partial outgrow L1).
#[cfg(target_arch = "x86_64")]
const SPLIT_MAX_TOKENS: usize = 4;

/// dy @ Ŵ by rows (8-bit codes at a few tokens, 2-4-bit at 1-32): each task adds `task_rows` rows in
/// order into its own partial dx with `rows(o0, o1, partial)`, reading each row's codes in order
/// and its codebook once (as the GEMV does; the column blocks of [`linear_bwd_cols`] read a
/// codebook per row per block and the rows' codes in pieces 2 KB apart, which the L3 serves one
/// fill buffer a line: the 4-bit input gradient at one token ran 3x the GEMV's time), then the
/// partials are summed in task order (the same sums whatever the thread count). `dword_order`:
/// the partials hold each 128-column block's column 8i + j at 16j + i (the order of the
/// row-blocked GEMV's lookups; n a multiple of 128), put back in column order after the sum (which
/// runs on contiguous partials: reordering every partial's elements made the allocation and sum
/// 0.15 ms at 4 tokens and 4096², against 0.05).
///
/// # Safety
/// `rows` writes only the partial it is given, from rows o0..o1 (below the layer's rows); `lb`
/// valid as [`crate::quant::linear_backward`] documents.
#[cfg(target_arch = "x86_64")]
unsafe fn linear_bwd_split<T: QElem>(lb: &LinBwd, task_rows: usize, dword_order: bool,
                                     rows: impl Fn(usize, usize, &mut [f32]) + Sync + Send) {
    let q = &lb.l.q;
    let (k, nout, tokens) = (q.n, q.rows, lb.l.tokens);
    let tasks = nout.div_ceil(task_rows);
    let mut part = vec![0f32; tasks * tokens * k];
    let pp = Shared(part.as_mut_ptr() as usize);
    parallel::for_each_task(tasks, nout * k * tokens, |ti| {
        // SAFETY: task ti writes its own tokens × k partial only; part outlives the tasks.
        let dst = unsafe { std::slice::from_raw_parts_mut((pp.0 as *mut f32).add(ti * tokens * k), tokens * k) };
        rows(ti * task_rows, ((ti + 1) * task_rows).min(nout), dst);
    });
    let cols = 1024;
    let dxp = Shared(lb.dx as usize);
    parallel::for_each_task((tokens * k).div_ceil(cols), tasks * tokens * k, |ci| {
        let (c0, c1) = (ci * cols, ((ci + 1) * cols).min(tokens * k));
        // From zeros: no rows (no tasks) leave dx zero.
        let mut sum = vec![0f32; c1 - c0];
        for p in part.chunks_exact(tokens * k) {
            for (s, &v) in sum.iter_mut().zip(&p[c0..c1]) {
                *s += v;
            }
        }
        // SAFETY: elements [c0, c1) of dx (tokens × k, row-major) belong to this task alone.
        let out = unsafe { std::slice::from_raw_parts_mut((dxp.0 as *mut T).add(c0), c1 - c0) };
        if dword_order {
            // c0 is a multiple of 1024 and k of 128: whole 128-blocks.
            for (c, o) in out.iter_mut().enumerate() {
                *o = T::store(T::Acc::from_f64(sum[(c & !127) + 16 * (c % 8) + (c % 128) / 8] as f64));
            }
        } else {
            for (o, &v) in out.iter_mut().zip(&sum) {
                *o = T::store(T::Acc::from_f64(v as f64));
            }
        }
    });
}

/// Rows o0..o1 of the 8-bit [`linear_bwd_split`] added into `acc` (float32 [tokens, n]), rows in
/// order.
///
/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA; 8-bit codes; n and the group size multiples of 16; tokens <=
/// SPLIT_MAX_TOKENS; o1 <= rows; `lb` valid as [`crate::quant::linear_backward`] documents.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn bwd_split_rows_avx512_8bit(lb: &LinBwd, o0: usize, o1: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let q = &lb.l.q;
    let (k, nout, ng, g, tokens) = (q.n, q.rows, q.groups(), q.group, lb.l.tokens);
    let (codes, scales, table) = (lb.codes as *const u8, lb.scales as *const f32, lb.table as *const f32);
    let ap = acc.as_mut_ptr();
    for o in o0..o1 {
        let book = Codebook256::load(table.add(256 * o));
        let dy: [__m512; SPLIT_MAX_TOKENS] = std::array::from_fn(|t| _mm512_set1_ps(if t < tokens { lb.dyf[t * nout + o] } else { 0.0 }));
        let row = codes.add(o * k);
        for gi in 0..ng {
            let m = _mm512_set1_ps(*scales.add(o * ng + gi));
            for u in (gi * g..(gi + 1) * g).step_by(16) {
                let w = _mm512_mul_ps(book.lookup(_mm_loadu_si128(row.add(u) as *const __m128i)), m);
                for (t, &d) in dy.iter().enumerate().take(tokens) {
                    let a = ap.add(t * k + u);
                    _mm512_storeu_ps(a, _mm512_fmadd_ps(d, w, _mm512_loadu_ps(a)));
                }
            }
        }
    }
}

/// Rows o0..o1 of the 2-4-bit [`linear_bwd_split`] added into `acc` (float32 [tokens, n], each
/// token's columns in the row-blocked GEMV's order, [`rows512_path`]): four rows at a time, the
/// codes read as that GEMV reads them (128 weights of a group a load, one `vpermps` per 16
/// weights after a shift), so each load and store of 16 partial sums serves four rows' FMAs,
/// added in row order, and each lookup serves a tile of up to 4 tokens (the rows pass once per
/// tile; their codes come back from L2). The weights are m·table\[field\] in float32 (Ŵ), times dy
/// by the FMA.
///
/// # Safety
/// As [`rows512_path`] (the CPU and the codes); 1 <= tokens <= SPLIT_MAX_TOKENS_SMALL; o1 <= rows;
/// `lb` valid as [`crate::quant::linear_backward`] documents; `acc` tokens × n float32.
#[cfg(target_arch = "x86_64")]
unsafe fn bwd_split_rows512(lb: &LinBwd, o0: usize, o1: usize, acc: &mut [f32]) {
    match lb.l.q.bits {
        4 => bwd_split_tokens::<4>(lb, o0, o1, acc),
        3 => bwd_split_tokens::<3>(lb, o0, o1, acc),
        _ => bwd_split_tokens::<2>(lb, o0, o1, acc),
    }
}

/// [`bwd_split_rows512`] for B-bit codes: tiles of 4 tokens, then the rest.
///
/// # Safety
/// As [`bwd_split_rows512`], B-bit codes.
#[cfg(target_arch = "x86_64")]
unsafe fn bwd_split_tokens<const B: usize>(lb: &LinBwd, o0: usize, o1: usize, acc: &mut [f32]) {
    let tokens = lb.l.tokens;
    let mut t0 = 0;
    while t0 < tokens {
        let nt = (tokens - t0).min(4);
        match nt {
            1 => bwd_split_isa::<B, 1>(lb, o0, o1, t0, acc),
            2 => bwd_split_isa::<B, 2>(lb, o0, o1, t0, acc),
            3 => bwd_split_isa::<B, 3>(lb, o0, o1, t0, acc),
            _ => bwd_split_isa::<B, 4>(lb, o0, o1, t0, acc),
        }
        t0 += nt;
    }
}

/// [`bwd_split_body`] with its instruction sets enabled (VBMI only for 3 bits).
///
/// # Safety
/// As [`bwd_split_body`].
#[cfg(target_arch = "x86_64")]
unsafe fn bwd_split_isa<const B: usize, const NT: usize>(lb: &LinBwd, o0: usize, o1: usize, t0: usize, acc: &mut [f32]) {
    if B == 3 {
        bwd_split_rows512_vbmi::<NT>(lb, o0, o1, t0, acc)
    } else {
        bwd_split_rows512_plain::<B, NT>(lb, o0, o1, t0, acc)
    }
}

/// [`bwd_split_body`] for 4- and 2-bit codes.
///
/// # Safety
/// As [`bwd_split_body`], B = 4 or 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn bwd_split_rows512_plain<const B: usize, const NT: usize>(lb: &LinBwd, o0: usize, o1: usize, t0: usize, acc: &mut [f32]) {
    bwd_split_body::<B, NT>(lb, o0, o1, t0, acc)
}

/// [`bwd_split_body`] for 3-bit codes.
///
/// # Safety
/// As [`bwd_split_body`], B = 3 (AVX512-VBMI).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma")]
unsafe fn bwd_split_rows512_vbmi<const NT: usize>(lb: &LinBwd, o0: usize, o1: usize, t0: usize, acc: &mut [f32]) {
    bwd_split_body::<3, NT>(lb, o0, o1, t0, acc)
}

/// [`bwd_split_rows512`] for B-bit codes and tokens t0 .. t0 + NT: rows four at a time, then one,
/// over chunks of columns.
///
/// # Safety
/// As [`bwd_split_rows512`]; t0 + NT <= tokens.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bwd_split_body<const B: usize, const NT: usize>(lb: &LinBwd, o0: usize, o1: usize, t0: usize, acc: &mut [f32]) {
    let (ng, g) = (lb.l.q.groups(), lb.l.q.group);
    let chunk_groups = (SPLIT_L1_FLOATS / NT / g).max(1);
    let mut c0 = 0;
    while c0 < ng {
        let c1 = (c0 + chunk_groups).min(ng);
        let mut o = o0;
        while o + 4 <= o1 {
            bwd_rows512::<4, NT, B>(lb, o, t0, c0, c1, acc.as_mut_ptr());
            o += 4;
        }
        while o < o1 {
            bwd_rows512::<1, NT, B>(lb, o, t0, c0, c1, acc.as_mut_ptr());
            o += 1;
        }
        c0 = c1;
    }
}

/// Rows o..o + R of [`bwd_split_rows512`] into `ap`, tokens t0 .. t0 + NT, groups c0..c1.
///
/// # Safety
/// As [`bwd_split_rows512`]; o + R <= rows; t0 + NT <= tokens; c1 <= groups; `ap` valid for tokens × n
/// float32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed loops over the rows keep their registers
unsafe fn bwd_rows512<const R: usize, const NT: usize, const B: usize>(lb: &LinBwd, o: usize, t0: usize, c0: usize, c1: usize, ap: *mut f32) {
    use std::arch::x86_64::*;
    const AHEAD: usize = 4;
    let q = &lb.l.q;
    let (k, nout, rb, ng, g) = (q.n, q.rows, q.row_bytes(), q.groups(), q.group);
    let (codes, scales, table) = (lb.codes as *const u8, lb.scales as *const f32, lb.table as *const f32);
    let tab: [__m512; R] = std::array::from_fn(|r| codebook16_avx512::<B>(table.add((o + r) << B)));
    let dy: [[__m512; NT]; R] = std::array::from_fn(|r| std::array::from_fn(|s| _mm512_set1_ps(lb.dyf[(t0 + s) * nout + o + r])));
    for gi in c0..c1 {
        let t: [__m512; R] = std::array::from_fn(|r| _mm512_mul_ps(tab[r], _mm512_set1_ps(*scales.add((o + r) * ng + gi))));
        for blk in 0..g / 128 {
            let col = gi * g + blk * 128;
            let mut d: [__m512i; R] = std::array::from_fn(|r| {
                let src = codes.add((o + r) * rb + col * B / 8);
                // The same columns AHEAD rows on (prefetches never fault: wrapping arithmetic).
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(AHEAD * rb) as *const i8);
                code_dwords::<B>(src)
            });
            for j in 0..8 {
                let w: [__m512; R] = std::array::from_fn(|r| _mm512_permutexvar_ps(d[r], t[r]));
                for r in 0..R {
                    d[r] = next_field::<B>(d[r]);
                }
                // Every token's loads before its stores: the tokens' partials are k floats apart
                // (16 KB at k = 4096), so a load after another token's store looks like it reads
                // the stored address (the same low 12 bits) and waits for it.
                let a: [*mut f32; NT] = std::array::from_fn(|s| ap.add((t0 + s) * k + col + 16 * j));
                let mut v: [__m512; NT] = std::array::from_fn(|s| _mm512_loadu_ps(a[s]));
                for s in 0..NT {
                    for r in 0..R {
                        v[s] = _mm512_fmadd_ps(dy[r][s], w[r], v[s]);
                    }
                }
                for s in 0..NT {
                    _mm512_storeu_ps(a[s], v[s]);
                }
            }
        }
    }
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
/// columns the two rows' weights Ŵ = m·table\[field\] ([`decode32`] times the group scale: the
/// float32 weight the many-token path forms), then per token one load and one store of its 32 sums
/// around two FMAs per vector (loading and storing them for every row was this kernel's bound: 1.6x
/// slower at 8 tokens); each sum still adds the rows in order. Below 4 tokens two rows' byte
/// planes, weights and sums spill, so rows go one at a time, as (dy·m)·table\[field\]. Sums in
/// decode32's element order, put back in column order at the end.
///
/// # Safety
/// AVX2 and FMA; 4-bit codes; c0, c1 and the group size multiples of 32; `lb` valid as
/// [`crate::quant::linear_backward`] documents; acc is tokens × (c1 − c0).
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
/// weights Ŵ = m·table\[field\] ([`decode32_avx512`] times the group scale: the float32 weight the
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
/// [`linear_bwd_cols_avx512`] does for 4 bits: per 16 columns the rows' weights Ŵ = m·table\[field\]
/// ([`decode16_small_avx512`], or for 8 bits [`lookup256_avx512`] over the row's codebook in 16
/// registers), then per token one load and one store of its 16 sums around the rows' FMAs. Sums in
/// column order, each adding the rows in order.
///
/// # Safety
/// AVX-512 F, BW, VL, AVX2 and FMA; 2-, 3- or 8-bit codes; c0, c1 and the group size multiples of
/// 16; `lb` valid as [`crate::quant::linear_backward`] documents; acc is tokens × (c1 − c0).
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

/// [`linear_bwd_cols_avx512_narrow`] with AVX2: per 8 columns the rows' weights Ŵ = m·table\[field\]
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

/// Columns c .. c + 8·U of [`bwd_rows_avx2_narrow`]: the R rows' weights Ŵ = m·table\[field\], then
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
                decode8_small::<B>(tabs[r], unit_word::<B>(row, rb, u))
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
