//! The exponent search (search_exponent): a coarse grid and a refinement per row, against the
//! weight reconstruction error or the layer-output error on calibration activations.
use super::*;

/// A row prepared for the weight error: `u = |w|/m` sorted, with prefix sums of the weights m²
/// and m²·u (float64) and the total Σm²u². Since |q| is a step function of u, the error of every
/// code bucket `[t_(k−1), t_k)` with value `L_k = (k/qmax)^(1/a)` is
/// `Σm²u² − 2·L_k·Σm²u + L_k²·Σm²`, so one evaluation costs qmax short counts, whatever the row
/// length.
struct SortedRow {
    /// The sorted u, then `WINDOW` entries of +inf (so a window read past the row stays in bounds
    /// and counts nothing).
    u: Vec<f32>,
    /// The number of u (without the padding).
    n: usize,
    /// The column of each sorted u, and sign(w)·m there (m: its group's scale).
    col: Vec<u32>,
    sm: Vec<f32>,
    /// [Σm², Σm²u] over the first j sorted elements, j = 0..=n.
    pre: Vec<[f64; 2]>,
    /// Σm²u² over the row.
    s2: f64,
    /// `bucket[b]` = the number of u below b/B (B = bucket.len() − 1 buckets over [0, 1]), so a
    /// boundary's search runs inside one bucket.
    bucket: Vec<u32>,
}

impl SortedRow {
    fn new(w: &[f32], g: usize, clip: f64) -> Option<SortedRow> {
        // sign(w)·m per column (no division per element to find a column's group later).
        let mut sm_col: Vec<f32> = Vec::with_capacity(w.len());
        // (bits of u ≥ 0) << 32 | column: integer order is the order of u.
        let mut keys: Vec<u64> = Vec::with_capacity(w.len());
        for (gi, ws) in w.chunks_exact(g).enumerate() {
            let (amax, finite) = absmax(ws);
            let m = (clip * amax as f64) as f32;
            if !finite || !m.is_finite() {
                return None;
            }
            // An all-zero group (m = 0) has no error whatever a: u = 0 and weight 0.
            for (c, &v) in ws.iter().enumerate() {
                let u = if m > 0.0 { v.abs() / m } else { 0.0 };
                keys.push(((u.to_bits() as u64) << 32) | (gi * g + c) as u64);
                sm_col.push(if v < 0.0 { -m } else { m });
            }
        }
        keys.sort_unstable();
        let n = keys.len();
        let (mut col, mut sm) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut pre = Vec::with_capacity(n + 1);
        let mut acc = [0f64; 2];
        let mut s2 = 0f64;
        pre.push(acc);
        for &key in &keys {
            let c = key as u32;
            let (u, m) = (f32::from_bits((key >> 32) as u32) as f64, sm_col[c as usize]);
            col.push(c);
            sm.push(m);
            let m2 = m as f64 * m as f64;
            acc = [acc[0] + m2, acc[1] + m2 * u];
            s2 += m2 * u * u;
            pre.push(acc);
        }
        let mut u: Vec<f32> = Vec::with_capacity(n + WINDOW);
        u.extend(keys.iter().map(|&k| f32::from_bits((k >> 32) as u32)));
        let nb = n.max(16);
        // bucket[b] = #{u: trunc(u·nb) < b}, by a histogram of trunc(u·nb) (the same float32
        // arithmetic as the lookup, so every u below the edge of bucket b is counted before it)
        // and its running sum: no branch per u or per bucket.
        let mut bucket = vec![0u32; nb + 2];
        for &v in &u {
            bucket[((v * nb as f32) as usize).min(nb) + 1] += 1;
        }
        let mut run = 0;
        for st in bucket.iter_mut() {
            run += *st;
            *st = run;
        }
        bucket.truncate(nb + 1);
        u.resize(n + WINDOW, f32::INFINITY);
        Some(SortedRow { u, n, col, sm, pre, s2, bucket })
    }

    /// The error with the boundaries and levels of one exponent (see [`Levels`]).
    fn error(&self, lv: &Levels) -> f64 {
        #[cfg(target_arch = "x86_64")]
        {
            // popcnt counts a window's mask in one instruction (the baseline target spells it out
            // in a dozen), AVX2 compares a window in two.
            #[target_feature(enable = "avx2,fma,popcnt")]
            unsafe fn avx2(sr: &SortedRow, lv: &Levels) -> f64 {
                sr.error_body(lv)
            }
            if crate::cpu::has_avx2() && std::arch::is_x86_feature_detected!("popcnt") {
                // SAFETY: the CPU supports AVX2, FMA and POPCNT (checked at run time).
                return unsafe { avx2(self, lv) };
            }
        }
        self.error_body(lv)
    }

    /// The end of each code bucket of `lv` in the sorted order (the last is n).
    #[inline(always)]
    fn bucket_ends(&self, lv: &Levels, ends: &mut [u32]) {
        for (e, &t) in ends.iter_mut().zip(&lv.thr) {
            *e = self.position(t) as u32;
        }
        ends[lv.thr.len()] = self.n as u32;
    }

    /// The number of u below t (t < 1: t falls in bucket b, its position lies in
    /// \[bucket\[b\], bucket\[b + 1\]\]).
    #[inline(always)]
    fn position(&self, t: f32) -> usize {
        let nb = self.bucket.len() - 1;
        let b = ((t * nb as f32) as usize).min(nb - 1);
        let (lo, hi) = (self.bucket[b] as usize, self.bucket[b + 1] as usize);
        if hi - lo <= WINDOW {
            // Every u past bucket b exceeds t (the same float32 product, truncated, is larger),
            // so the whole window counts only bucket b's u below t: a fixed count without a
            // data-dependent branch (a scan's exit mispredicts).
            let win: &[f32; WINDOW] = self.u[lo..lo + WINDOW].try_into().unwrap();
            lo + win.iter().map(|&v| (v < t) as usize).sum::<usize>()
        } else {
            lo + self.u[lo..hi].partition_point(|&v| v < t)
        }
    }

    #[inline(always)]
    fn error_body(&self, lv: &Levels) -> f64 {
        // The boundaries' positions first (independent of each other, so their loads overlap),
        // then the buckets' errors in order.
        let mut ends = [0u32; 256];
        let ends = &mut ends[..lv.level.len()];
        self.bucket_ends(lv, ends);
        let mut start = 0usize;
        let mut err = self.s2;
        for (&end, &l) in ends.iter().zip(&lv.level) {
            let end = (end as usize).max(start);
            // An empty bucket adds exactly 0 (no branch to mispredict).
            let (p, q) = (&self.pre[start], &self.pre[end]);
            err += l * l * (q[0] - p[0]) - 2.0 * l * (q[1] - p[1]);
            start = end;
        }
        err
    }
}

/// The span of the sorted u that a boundary's count reads at once (see [`SortedRow::position`]).
const WINDOW: usize = 16;

/// Boundaries `t_k` (as float32, for the sorted float32 u) and levels `(k/qmax)^(1/a)` of an exponent.
struct Levels {
    thr: Vec<f32>,
    level: Vec<f64>,
    /// `L_k − L_(k+1)` for k < qmax: the layer-output error's weights of the boundaries (see
    /// [`metric_errors`]).
    step: Vec<f64>,
}

/// The logarithms `ln((k + 0.5)/qmax)` and `ln(k/qmax)` behind [`Levels`] (x^(1/a) = exp(ln(x)/a)):
/// they do not depend on a, so a search takes them once.
struct LevelLogs {
    thr: Vec<f64>,
    level: Vec<f64>,
}

impl LevelLogs {
    fn new(bits: u32) -> LevelLogs {
        let qm = qmax(bits) as f64;
        LevelLogs {
            thr: (0..qmax(bits)).map(|k| ((k as f64 + 0.5) / qm).ln()).collect(),
            level: (0..=qmax(bits)).map(|k| (k as f64 / qm).ln()).collect(),
        }
    }

    fn at(&self, a: f64) -> Levels {
        let inv_a = 1.0 / a;
        // Level 0 is 0 (ln 0 = −inf).
        let level: Vec<f64> = self.level.iter().map(|&l| if l == f64::NEG_INFINITY { 0.0 } else { (l * inv_a).exp() }).collect();
        Levels {
            thr: self.thr.iter().map(|&l| (l * inv_a).exp() as f32).collect(),
            step: level.windows(2).map(|l| l[0] - l[1]).collect(),
            level,
        }
    }
}

/// The search: a coarse grid of `s.grid` exponents on [lo, 1], then a fine grid of `s.refine`
/// points on the two coarse cells around each of the `CANDIDATES` best coarse local minima (the
/// error is only piecewise smooth in a: narrow dips between code changes are common in short or
/// heavy-tailed rows, so refining one minimum is not enough).
const CANDIDATES: usize = 4;

/// Coarse point i of nc on [lo, 1], as float32 (every point is evaluated as the exponent will be
/// stored: a float64 point could sit on the other side of a code change than its float32 self).
fn coarse_point(lo: f64, nc: usize, i: usize) -> f64 {
    if i + 1 == nc {
        1.0
    } else {
        (lo + (1.0 - lo) * i as f64 / (nc - 1) as f64) as f32 as f64
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
        pts.extend((0..nf).map(|j| (a0 + (a1 - a0) * j as f64 / (nf - 1) as f64) as f32 as f64));
    }
    pts
}

/// The point of least error; ties keep the larger exponent (a = 1 for rows without error).
fn argmin(points: &[f64], errs: &[f64]) -> (f64, f64) {
    let mut best = (1.0, f64::INFINITY);
    for (&a, &e) in points.iter().zip(errs) {
        if e < best.1 || (e == best.1 && a > best.0) {
            best = (a, e);
        }
    }
    best
}

/// The search's answer: the best of the coarse and the fine points (the coarse one on ties).
fn best(coarse: &[f64], coarse_errs: &[f64], fine: &[f64], fine_errs: &[f64]) -> f32 {
    let (a0, e0) = argmin(coarse, coarse_errs);
    let (a1, e1) = argmin(fine, fine_errs);
    (if e1 < e0 { a1 } else { a0 }) as f32
}

/// Tokens (rows of z) a [`metric_errors`] block takes at once: its prefix sums, (n + 1) × ZB
/// float64 (512 KB at n = 4096), stay in a 1 MB L2 cache, and a block's ZB sums are two AVX-512
/// registers (four AVX2 ones) through every exponent's loop.
const ZB: usize = 16;
const _: () = assert!(ZB.is_power_of_two()); // sum_squares halves it

/// z rearranged for [`metric_errors`]: block b holds tokens b·ZB .. b·ZB + ZB of every column,
/// column after column (\[n\]\[ZB\] float32, tokens past z's rows zero: they add exactly 0 to
/// every error), so that a column's slice of a block is one 64-byte cache line.
struct ZBlocks {
    buf: Vec<f32>,
    /// Where the blocks start in `buf` (its first 64-byte boundary).
    at: usize,
    /// The blocks' length, n·ZB·blocks.
    len: usize,
}

impl ZBlocks {
    /// From z, float32 [t_rows, n] row-major.
    fn new(z: &[f32], t_rows: usize, n: usize) -> ZBlocks {
        let len = t_rows.div_ceil(ZB) * n * ZB;
        let mut buf = vec![0f32; len + ZB];
        let at = buf.as_ptr().align_offset(64).min(ZB);
        let blocks = &mut buf[at..at + len];
        for (t, zr) in z.chunks_exact(n.max(1)).enumerate().take(t_rows) {
            let (b, i) = (t / ZB, t % ZB);
            let block = &mut blocks[b * n * ZB..(b + 1) * n * ZB];
            for (c, &v) in zr.iter().enumerate() {
                block[c * ZB + i] = v;
            }
        }
        ZBlocks { buf, at, len }
    }

    fn blocks(&self) -> &[f32] {
        &self.buf[self.at..self.at + self.len]
    }
}

/// The most rows a task of the search takes at once: with calibration activations, every row reads
/// all of z (T·n float32, more than the caches hold), so a group reads each block of z from memory
/// once.
const GROUP: usize = 16;

/// What a group's rows may hold of boundary positions (u32, one per boundary per exponent per
/// row, read again for every block of z): 8-bit codes with the default grid fill it with 4 rows
/// (T = 256: 7.5-8.5 s against 9.1 with 16 rows), 4-bit codes hold 16 in a quarter of it.
const GROUP_ENDS_BYTES: usize = 2 << 20;

/// Bytes a [`SortedRow`] holds per element while it is built: u, col, sm (4 each), pre (16) and
/// bucket (4), besides the keys (8) and signed scales (4) it is sorted from.
const SORTED_BYTES: usize = 44;

/// What a task's sorted rows may hold at once: 16 rows up to n ≈ 95K elements, one row past
/// n ≈ 1.5M (16 rows of 2^22 float32 each took +2.06 GiB whatever the thread count).
const GROUP_BYTES: usize = 64 << 20;

/// The rows a task takes at once: [`GROUP`], fewer where their sorted forms would pass
/// [`GROUP_BYTES`], or (with calibration activations: the weight error keeps none) where their
/// boundary positions at the most exponents a stage evaluates would pass [`GROUP_ENDS_BYTES`].
/// The results do not depend on it: each row's errors are its own, summed in a fixed order.
fn group_rows(s: &SearchArgs) -> usize {
    let by_size = (GROUP_BYTES / (SORTED_BYTES * s.q.n).max(1)).clamp(1, GROUP);
    if s.z_rows == 0 {
        return by_size;
    }
    let exponents = s.grid.max(CANDIDATES * s.refine);
    let per_row = exponents * (qmax(s.q.bits) as usize + 1) * size_of::<u32>();
    (GROUP_ENDS_BYTES / per_row.max(1)).clamp(1, by_size)
}

/// A row of w sorted for the search, with its weights.
type Row<'a> = (SortedRow, &'a [f32]);

/// The layer-output errors ‖z·(w − ŵ_a)‖² of a group of rows, each at its exponents (`rows`:
/// a row and the levels of its exponents), added to `out` (zeroed by the caller; row after row).
/// On a row's sorted order z·ŵ_a = Σ_k L_k·Σ_(j in bucket k) y_j, with y_j = sign(w_c)·m·z[:, c]
/// (c the column of sorted element j, m its group's scale). With prefix sums Y of the y_j
/// (Y_0 = 0) and the bucket ends e_k (e_qmax = n), summing by parts gives
/// z·ŵ_a = L_qmax·Y_n + Σ_(k<qmax) (L_k − L_(k+1))·Y_(e_k): after the row's T·n pass for Y, each
/// exponent costs qmax boundary counts and qmax·T multiply-adds. `zb`: z in [`ZBlocks`]' layout,
/// the blocks taken one after another, each for every row of the group.
fn metric_errors(rows: &[(&Row, &[Levels])], zb: &[f32], yp: &mut Vec<f64>, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx2,fma,popcnt")]
        unsafe fn avx512(rows: &[(&Row, &[Levels])], zb: &[f32], yp: &mut Vec<f64>, out: &mut [f64]) {
            metric_errors_body::<true>(rows, zb, yp, out)
        }
        #[target_feature(enable = "avx2,fma,popcnt")]
        unsafe fn avx2(rows: &[(&Row, &[Levels])], zb: &[f32], yp: &mut Vec<f64>, out: &mut [f64]) {
            metric_errors_body::<true>(rows, zb, yp, out)
        }
        if crate::cpu::has_avx2() && std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has the features enabled (checked at run time: has_avx512 means
            // AVX-512 F/BW/CD/DQ/VL besides AVX2 and FMA; POPCNT is checked here).
            return unsafe {
                if crate::cpu::has_avx512() {
                    avx512(rows, zb, yp, out)
                } else {
                    avx2(rows, zb, yp, out)
                }
            };
        }
    }
    metric_errors_body::<false>(rows, zb, yp, out)
}

/// `a·b + c`, fused where the caller compiles with FMA (elsewhere `mul_add` is a library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `acc + a·z`, lane by lane. (These helpers are functions with plain loops: a closure, including
/// `array::from_fn`'s, that is not inlined is compiled without the caller's target features, so
/// mul_add becomes a library call.)
#[inline(always)]
fn axpy<const FMA: bool>(mut acc: [f64; ZB], a: f64, z: &[f32; ZB]) -> [f64; ZB] {
    for (r, &v) in acc.iter_mut().zip(z) {
        *r = madd::<FMA>(a, v as f64, *r);
    }
    acc
}

/// `x + y`, lane by lane.
#[inline(always)]
fn add(mut x: [f64; ZB], y: &[f64; ZB]) -> [f64; ZB] {
    for (r, &v) in x.iter_mut().zip(y) {
        *r += v;
    }
    x
}

/// Σ v² over a block's tokens, added in a tree (a vector's halves, then theirs), not one by one
/// along a chain of dependent adds.
#[inline(always)]
fn sum_squares(v: &[f64; ZB]) -> f64 {
    let mut h = *v;
    for x in h.iter_mut() {
        *x *= *x;
    }
    let mut w = ZB;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            h[i] += h[i + w];
        }
    }
    h[0]
}

/// The prefix sums of a row's y_j on a block (`yp` row j: the sum of the first j; row 0 is left
/// as it is, zero), their total, and z·w on the block (w_c·z[:, c] summed in the same order).
/// Four at a time: their partial sums p1 = y_j, p2 = p1 + y_(j+1), ... do not wait for the
/// running total, which then takes one add per four (an add waits several cycles for the one
/// before it in its chain), and z·w is four sums.
#[inline(always)]
fn prefix_sums<const FMA: bool>(sr: &SortedRow, w: &[f32], block: &[f32], yp: &mut [f64]) -> ([f64; ZB], [f64; ZB]) {
    let n = sr.n;
    // Sorted element j's column of z on the block, y = sign·m and w.
    #[inline(always)]
    fn z<'b>(sr: &SortedRow, w: &[f32], block: &'b [f32], j: usize) -> (&'b [f32; ZB], f64, f64) {
        let c = sr.col[j] as usize;
        (block[c * ZB..(c + 1) * ZB].try_into().unwrap(), sr.sm[j] as f64, w[c] as f64)
    }
    #[inline(always)]
    fn put(yp: &mut [f64], j: usize, v: &[f64; ZB]) {
        yp[j * ZB..(j + 1) * ZB].copy_from_slice(v);
    }
    let mut run = [0f64; ZB];
    let mut zw = [[0f64; ZB]; 4];
    let quads = n / 4 * 4;
    for j in (0..quads).step_by(4) {
        let ((z0, y0, w0), (z1, y1, w1)) = (z(sr, w, block, j), z(sr, w, block, j + 1));
        let ((z2, y2, w2), (z3, y3, w3)) = (z(sr, w, block, j + 2), z(sr, w, block, j + 3));
        let p1 = axpy::<FMA>([0.0; ZB], y0, z0);
        let p2 = axpy::<FMA>(p1, y1, z1);
        let p3 = axpy::<FMA>(p2, y2, z2);
        let p4 = axpy::<FMA>(p3, y3, z3);
        put(yp, j + 1, &add(run, &p1));
        put(yp, j + 2, &add(run, &p2));
        put(yp, j + 3, &add(run, &p3));
        run = add(run, &p4);
        put(yp, j + 4, &run);
        zw = [axpy::<FMA>(zw[0], w0, z0), axpy::<FMA>(zw[1], w1, z1), axpy::<FMA>(zw[2], w2, z2), axpy::<FMA>(zw[3], w3, z3)];
    }
    for j in quads..n {
        let (zj, y, wj) = z(sr, w, block, j);
        run = axpy::<FMA>(run, y, zj);
        put(yp, j + 1, &run);
        zw[0] = axpy::<FMA>(zw[0], wj, zj);
    }
    (run, add(add(zw[0], &zw[1]), &add(zw[2], &zw[3])))
}

#[inline(always)]
fn metric_errors_body<const FMA: bool>(rows: &[(&Row, &[Levels])], zb: &[f32], yp: &mut Vec<f64>, out: &mut [f64]) {
    let n = rows.first().map_or(0, |((sr, _), _)| sr.n);
    if n == 0 {
        return; // no rows, or no error whatever a (and no blocks to step through)
    }
    // The levels' count (qmax + 1): 1 where a row has no exponents (nothing is read then).
    let nl = |lvs: &[Levels]| lvs.first().map_or(1, |lv| lv.level.len());
    // Every row's boundary positions at each of its exponents, once for all blocks.
    let ends: Vec<Vec<u32>> = rows
        .iter()
        .map(|((sr, _), lvs)| {
            let mut e = vec![0u32; lvs.len() * nl(lvs)];
            for (lv, e) in lvs.iter().zip(e.chunks_exact_mut(nl(lvs))) {
                sr.bucket_ends(lv, e);
            }
            e
        })
        .collect();
    // Row 0 stays zero; row j + 1 is written before it is read. Kept by the caller across calls.
    yp.resize((n + 1) * ZB, 0.0);
    for block in zb.chunks_exact(n * ZB) {
        // One read a cache line, in order, so that the block streams in from memory (the
        // prefetchers follow) before the rows read it in their sorted orders.
        let mut touch = 0u32;
        for line in block.chunks_exact(64 / size_of::<f32>()) {
            touch ^= line[0].to_bits();
        }
        std::hint::black_box(touch);
        let mut out = &mut out[..];
        for (((sr, w), lvs), ends) in rows.iter().zip(&ends) {
            let (run, zw) = prefix_sums::<FMA>(sr, w, block, &mut yp[..]);
            let (row_out, rest) = std::mem::take(&mut out).split_at_mut(lvs.len());
            out = rest;
            let nt = nl(lvs) - 1; // the boundaries, qmax
            for ((lv, e), o) in lvs.iter().zip(ends.chunks_exact(nt + 1)).zip(row_out) {
                // z·(w − ŵ_a) on the block.
                let top = lv.level[nt];
                let mut acc = zw;
                for (a, &r) in acc.iter_mut().zip(&run) {
                    *a = madd::<FMA>(-top, r, *a);
                }
                for (&ek, &ck) in e[..nt].iter().zip(&lv.step) {
                    let y: &[f64; ZB] = yp[ek as usize * ZB..(ek as usize + 1) * ZB].try_into().unwrap();
                    for (a, &yv) in acc.iter_mut().zip(y) {
                        *a = madd::<FMA>(-ck, yv, *a);
                    }
                }
                *o += sum_squares(&acc);
            }
        }
    }
}

/// Rows whose errors a search for one exponent of the whole tensor holds at once (summed in row
/// order after each block: the same sums as all rows at once).
const TOTAL_ROWS: usize = 256;

/// The search over every row: the weight error, or with `zb` (z in [`ZBlocks`]' layout, and its
/// rows) the layer-output error (see [`metric_errors`]). Rows go `group` (1..=[`GROUP`],
/// [`group_rows`]) at a time.
unsafe fn search(s: &SearchArgs, w: u64, zb: Option<(&[f32], usize)>, out: u64, group: usize, stop: &parallel::Stop) -> Result<()> {
    debug_assert!((1..=GROUP).contains(&group));
    let q = &s.q;
    let (rows, n) = (q.rows, q.n);
    let bad = AtomicBool::new(false);
    let logs = LevelLogs::new(q.bits);
    let coarse = coarse_points(s);
    let coarse_lv: Vec<Levels> = coarse.iter().map(|&a| logs.at(a)).collect();
    let at = |points: &[f64]| -> Vec<Levels> { points.iter().map(|&a| logs.at(a)).collect() };
    // Rows r0..r1 sorted, with their indices; those holding NaN or inf are left out (and `bad`
    // set). Rows of n = 0 are not asked for.
    let load = |r0: usize, r1: usize| -> Vec<(usize, Row)> {
        (r0..r1)
            .filter_map(|r| {
                // SAFETY: w holds rows·n float32, only read.
                let wr = unsafe { rows_of::<f32>(w, n, r, r + 1) };
                let sr = SortedRow::new(wr, q.group, q.clip);
                if sr.is_none() {
                    bad.store(true, Ordering::Relaxed);
                }
                sr.map(|sr| (r, (sr, wr)))
            })
            .collect()
    };
    // The errors of each row at its exponents, row after row into `dst`; `yp`: metric_errors'
    // scratch, kept by a thread across its calls.
    let errors = |rows: &[(&Row, &[Levels])], yp: &mut Vec<f64>, dst: &mut [f64]| match zb {
        None => {
            let lvs = rows.iter().flat_map(|((sr, _), lvs)| lvs.iter().map(move |lv| (sr, lv)));
            for (d, (sr, lv)) in dst.iter_mut().zip(lvs) {
                *d = sr.error(lv);
            }
        }
        Some((zb, _)) => {
            dst.fill(0.0);
            metric_errors(rows, zb, yp, dst);
        }
    };
    let work = rows * n * zb.map_or(4, |(_, t)| t.max(4));
    let groups = |r0: usize, r1: usize| (r1 - r0).div_ceil(group);
    if s.per_row {
        let os = Shared(out as usize);
        // `yp` (metric_errors' scratch) is kept by each thread across its groups: one a group
        // faulted (n + 1)·ZB·8 bytes in again ([16, 2^20] with 8 calibration rows: 1.7x the time).
        parallel::for_each_task_with(groups(0, rows), work, Vec::new, |gi, yp| {
            if stop.requested() {
                return;
            }
            let (r0, r1) = (gi * group, (gi * group + group).min(rows));
            // Rows of n = 0 or holding NaN or inf: a = 1.
            let mut a = [1.0f32; GROUP];
            let a = &mut a[..r1 - r0];
            if n > 0 {
                let loaded = load(r0, r1);
                let k = coarse.len();
                let mut errs = vec![0f64; loaded.len() * k];
                let asked: Vec<(&Row, &[Levels])> = loaded.iter().map(|(_, row)| (row, &coarse_lv[..])).collect();
                errors(&asked, yp, &mut errs);
                let fine: Vec<Vec<f64>> = errs.chunks_exact(k).map(|e| fine_points(s, e)).collect();
                let fine_lv: Vec<Vec<Levels>> = fine.iter().map(|p| at(p)).collect();
                let mut fine_errs = vec![0f64; fine.iter().map(Vec::len).sum()];
                let asked: Vec<(&Row, &[Levels])> = loaded.iter().zip(&fine_lv).map(|((_, row), lv)| (row, &lv[..])).collect();
                errors(&asked, yp, &mut fine_errs);
                let mut fe = &fine_errs[..];
                for (((r, _), e), p) in loaded.iter().zip(errs.chunks_exact(k)).zip(&fine) {
                    let (this, rest) = fe.split_at(p.len());
                    a[r - r0] = best(&coarse, e, p, this);
                    fe = rest;
                }
            }
            for (r, &v) in (r0..r1).zip(a.iter()) {
                // SAFETY: task gi writes out[r0..r1] only.
                unsafe { *(os.0 as *mut f32).add(r) = v };
            }
        });
    } else {
        // Per-row errors at every point, then summed over rows in row order (deterministic). Each
        // stage sorts the rows again: keeping every row's SortedRow would take ~40 bytes an element.
        let total = |points: &[f64]| -> Vec<f64> {
            let (k, lvs) = (points.len(), at(points));
            let mut tot = vec![0f64; k];
            if k == 0 || n == 0 {
                return tot;
            }
            // TOTAL_ROWS rows at a time, so the per-row errors held stay bounded whatever the grid.
            let mut per_row = vec![0f64; TOTAL_ROWS.min(rows) * k];
            for r0 in (0..rows).step_by(TOTAL_ROWS) {
                if stop.stopped() {
                    break;
                }
                let r1 = (r0 + TOTAL_ROWS).min(rows);
                per_row.fill(0.0);
                let ps = Shared(per_row.as_mut_ptr() as usize);
                parallel::for_each_task_with(groups(r0, r1), work / rows.max(1) * (r1 - r0), Vec::new, |gi, yp| {
                    if stop.requested() {
                        return;
                    }
                    let (g0, g1) = (r0 + gi * group, (r0 + gi * group + group).min(r1));
                    let loaded = load(g0, g1);
                    let mut errs = vec![0f64; loaded.len() * k];
                    let asked: Vec<(&Row, &[Levels])> = loaded.iter().map(|(_, row)| (row, &lvs[..])).collect();
                    errors(&asked, yp, &mut errs);
                    for ((r, _), e) in loaded.iter().zip(errs.chunks_exact(k)) {
                        // SAFETY: task gi writes the rows g0..g1 of per_row only; per_row
                        // outlives the tasks.
                        let dst = unsafe { std::slice::from_raw_parts_mut((ps.0 as *mut f64).add((r - r0) * k), k) };
                        dst.copy_from_slice(e);
                    }
                });
                for e in per_row[..(r1 - r0) * k].chunks_exact(k) {
                    for (t, e) in tot.iter_mut().zip(e) {
                        *t += e;
                    }
                }
            }
            tot
        };
        let coarse_errs = total(&coarse);
        if !stop.stopped() {
            let fine = fine_points(s, &coarse_errs);
            *(out as *mut f32) = best(&coarse, &coarse_errs, &fine, &total(&fine));
        }
    }
    if stop.stopped() {
        return Err(Error::interrupted("search_exponent: interrupted"));
    }
    if bad.load(Ordering::Relaxed) {
        return Err(Error::value("w: expected finite values (NaN or inf found, or clip·max|w| overflows float32)"));
    }
    Ok(())
}

/// # Safety
/// See [`crate::quant::search_exponent`].
pub unsafe fn search_exponent(s: &SearchArgs, w: u64, z: u64, out: u64, stop: &parallel::Stop) -> Result<()> {
    if s.z_rows == 0 {
        return search(s, w, None, out, group_rows(s), stop);
    }
    let (t_rows, n) = (s.z_rows, s.q.n);
    let z = slice::<f32>(z, t_rows * n);
    if !z.iter().all(|v| v.is_finite()) {
        // Every error would be NaN or inf, and the search would return a = 1 for every row.
        return Err(Error::value("x: expected finite calibration activations (NaN or inf found)"));
    }
    let zb = ZBlocks::new(z, t_rows, n);
    search(s, w, Some((zb.blocks(), t_rows)), out, group_rows(s), stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform values in [−0.5, 0.5) from a xorshift generator.
    fn uniform(mut x: u64) -> impl FnMut() -> f32 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Rows that stress the bucket index: exact zeros, runs of one value longer than WINDOW (a
    /// bucket the window cannot cover), values rounded to a few bits (ties), an all-zero group and
    /// a spread of magnitudes.
    fn rows() -> Vec<(Vec<f32>, usize)> {
        let mut rnd = uniform(0x2545_f491_4f6c_dd1d);
        let mut out = Vec::new();
        for (n, g) in [(1usize, 1usize), (5, 5), (17, 17), (64, 16), (300, 100), (1024, 128)] {
            let plain: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let normalish: Vec<f32> = (0..n).map(|_| rnd() + rnd() + rnd()).collect();
            let coarse: Vec<f32> = (0..n).map(|_| (rnd() * 16.0).round() / 16.0).collect();
            let clustered: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else if i % 3 == 1 { 0.25 } else { rnd() * 1e-3 }).collect();
            let zero_group: Vec<f32> = (0..n).map(|i| if i < g { 0.0 } else { rnd() }).collect();
            out.extend([plain, normalish, coarse, clustered, zero_group].map(|w| (w, g)));
        }
        out
    }

    /// w − ŵ in float64: ŵ = sign(w)·m·L(u), L(u) the level of the number of boundaries ≤ u;
    /// w itself, or (`via_u`) as m·u, the weight error's view of it.
    fn direct_residual(w: &[f32], g: usize, lv: &Levels, via_u: bool) -> Vec<f64> {
        let mut e = Vec::with_capacity(w.len());
        for ws in w.chunks_exact(g) {
            let m = ws.iter().fold(0f32, |a, v| a.max(v.abs()));
            for &v in ws {
                let u = if m > 0.0 { v.abs() / m } else { 0.0 };
                let k = lv.thr.iter().filter(|&&t| t <= u).count();
                let (s, wv) = (v.signum() as f64, if via_u { m as f64 * u as f64 } else { v.abs() as f64 });
                e.push(s * (wv - m as f64 * lv.level[k]));
            }
        }
        e
    }

    fn direct_error(w: &[f32], g: usize, lv: &Levels) -> f64 {
        direct_residual(w, g, lv, true).iter().map(|d| d * d).sum()
    }

    #[test]
    fn positions_count_the_u_below_t() {
        for (w, g) in rows() {
            let sr = SortedRow::new(&w, g, 1.0).unwrap();
            let u = &sr.u[..sr.n];
            for i in 0..=64 {
                for t in [i as f32 / 64.0, (i as f32 / 64.0).powi(8), 0.25f32.next_down(), 0.25, 0.25f32.next_up(), 1e-30] {
                    if t < 1.0 {
                        assert_eq!(sr.position(t), u.iter().filter(|&&v| v < t).count(), "n {} t {t}", w.len());
                    }
                }
            }
        }
    }

    #[test]
    fn error_equals_the_direct_sum() {
        for bits in [2u32, 3, 4, 8] {
            let logs = LevelLogs::new(bits);
            for (w, g) in rows() {
                let sr = SortedRow::new(&w, g, 1.0).unwrap();
                for a in [0.05, 0.3, 0.71, 1.0] {
                    let lv = logs.at(a);
                    let (ours, want) = (sr.error(&lv), direct_error(&w, g, &lv));
                    let scale: f64 = w.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().max(1e-300);
                    assert!((ours - want).abs() <= 1e-12 * scale, "bits {bits} n {} a {a}: {ours} vs {want}", w.len());
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_group_size() {
        // Long rows take fewer at once (by size), short rows GROUP.
        let args = |n: usize, z_rows: usize| SearchArgs {
            q: QuantArgs { bits: 4, rows: 1, n, group: n, clip: 1.0 },
            per_row: true,
            z_rows,
            lo: 0.05,
            grid: 1024,
            refine: 16,
        };
        assert_eq!(group_rows(&args(4096, 0)), GROUP);
        assert_eq!(group_rows(&args(1 << 18, 0)), 5);
        assert_eq!(group_rows(&args(1 << 22, 0)), 1);
        assert_eq!(group_rows(&args(1 << 18, 8)), 5);
        // 37 rows (no group size divides them but 1: the first of every kind rows() makes at n =
        // 300, then heavy-tailed ones), with and without calibration rows, per row and per tensor:
        // the same exponents at every group size.
        let mut rnd = uniform(0x1234_5678_9abc_def1);
        let n = 300usize;
        let mut w: Vec<f32> = rows().into_iter().filter(|(w, _)| w.len() == n).flat_map(|(w, _)| w).collect();
        let rows = 37usize;
        w.extend((w.len()..rows * n).map(|_| rnd() * rnd().abs().powi(3)));
        let z: Vec<f32> = (0..5 * n).map(|_| rnd()).collect();
        let zb = ZBlocks::new(&z, 5, n);
        for bits in [3u32, 8] {
            for (t_rows, per_row) in [(0usize, true), (0, false), (5, true), (5, false)] {
                let s = SearchArgs { q: QuantArgs { bits, rows, n, group: 100, clip: 1.0 }, per_row, z_rows: t_rows, lo: 0.05, grid: 64, refine: 8 };
                let zs = (t_rows > 0).then(|| (zb.blocks(), t_rows));
                let mut want = vec![f32::NAN; rows];
                unsafe { search(&s, w.as_ptr() as u64, zs, want.as_mut_ptr() as u64, GROUP, &parallel::Stop::never()).unwrap() };
                for group in 1..GROUP {
                    let mut got = vec![f32::NAN; rows];
                    unsafe { search(&s, w.as_ptr() as u64, zs, got.as_mut_ptr() as u64, group, &parallel::Stop::never()).unwrap() };
                    let k = if per_row { rows } else { 1 };
                    assert_eq!(&got[..k], &want[..k], "bits {bits} z rows {t_rows} per row {per_row} group {group}");
                    assert!(got[k..].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn metric_errors_equal_the_direct_product() {
        let mut rnd = uniform(0x9e37_79b9_7f4a_7c15);
        for bits in [2u32, 4, 8] {
            let logs = LevelLogs::new(bits);
            let lvs: Vec<Levels> = [0.05, 0.4, 0.83, 1.0].iter().map(|&a| logs.at(a)).collect();
            // rows() gives 5 rows of each length: a group of them, row i asking for lvs[i..] (the
            // last none), so that the rows' errors land in their own places of `out`.
            for group in rows().chunks(5) {
                let (n, g) = (group[0].0.len(), group[0].1);
                let sorted: Vec<Row> = group.iter().map(|(w, g)| (SortedRow::new(w, *g, 1.0).unwrap(), &w[..])).collect();
                let asked: Vec<(&Row, &[Levels])> = sorted.iter().enumerate().map(|(i, row)| (row, &lvs[i..])).collect();
                // 1 token, a few, one full block, one past it and several (the scratch kept
                // across calls).
                let mut yp = Vec::new();
                for t_rows in [1usize, 3, ZB, ZB + 7, 3 * ZB + 5] {
                    let z: Vec<f32> = (0..t_rows * n).map(|_| rnd()).collect();
                    let zb = ZBlocks::new(&z, t_rows, n);
                    assert_eq!(zb.blocks().as_ptr() as usize % 64, 0);
                    let mut ours = vec![0f64; asked.iter().map(|(_, l)| l.len()).sum()];
                    metric_errors(&asked, zb.blocks(), &mut yp, &mut ours);
                    metric_errors(&asked[4..], zb.blocks(), &mut yp, &mut []); // none asked
                    let mut ours = &ours[..];
                    for (i, (w, _)) in group.iter().enumerate() {
                        for lv in &lvs[i..] {
                            let e = direct_residual(w, g, lv, false);
                            let want: f64 = z.chunks_exact(n).map(|zr| zr.iter().zip(&e).map(|(&a, &b)| a as f64 * b).sum::<f64>().powi(2)).sum();
                            let scale: f64 = z.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() * w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
                            assert!((ours[0] - want).abs() <= 1e-12 * scale.max(1e-300), "bits {bits} n {n} row {i} t {t_rows}: {} vs {want}", ours[0]);
                            ours = &ours[1..];
                        }
                    }
                }
            }
        }
    }
}
