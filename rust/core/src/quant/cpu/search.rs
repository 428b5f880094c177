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
        Levels {
            thr: self.thr.iter().map(|&l| (l * inv_a).exp() as f32).collect(),
            // Level 0 is 0 (ln 0 = −inf).
            level: self.level.iter().map(|&l| if l == f64::NEG_INFINITY { 0.0 } else { (l * inv_a).exp() }).collect(),
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

/// Both stages with `eval` giving the errors at a list of exponents.
fn two_stage(s: &SearchArgs, coarse: &[f64], coarse_errs: &[f64], mut eval: impl FnMut(&[f64]) -> Vec<f64>) -> f32 {
    let (a0, e0) = argmin(coarse, coarse_errs);
    let fine = fine_points(s, coarse_errs);
    let (a1, e1) = argmin(&fine, &eval(&fine));
    (if e1 < e0 { a1 } else { a0 }) as f32
}

/// Rows of z a [`metric_errors`] pass takes at once: its prefix sums, (n + 1) × BLOCK float64 (2 MB
/// at n = 4096), stay in the L2 cache.
const BLOCK: usize = 64;

/// The layer-output errors ‖z·(w − ŵ_a)‖² of one row at the exponents of `lvs`, added to `out`
/// (zeroed by the caller). On `sr`'s order z·ŵ_a = Σ_k L_k·Σ_(j in bucket k) y_j, with
/// y_j = sign(w_c)·m·z[:, c] (c the column of sorted element j, m its group's scale): with prefix
/// sums Y of the y_j, each exponent costs qmax boundary counts and (qmax + 1)·T multiply-adds
/// instead of a pass over z (T·n). `zt` is zᵀ, [n, t_rows]; z's rows go BLOCK at a time.
fn metric_errors(sr: &SortedRow, w: &[f32], zt: &[f32], t_rows: usize, lvs: &[Levels], yp: &mut Vec<f64>, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,popcnt")]
        unsafe fn avx2(sr: &SortedRow, w: &[f32], zt: &[f32], t_rows: usize, lvs: &[Levels], yp: &mut Vec<f64>, out: &mut [f64]) {
            metric_errors_body(sr, w, zt, t_rows, lvs, yp, out)
        }
        if crate::cpu::has_avx2() && std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU supports AVX2, FMA and POPCNT (checked at run time).
            return unsafe { avx2(sr, w, zt, t_rows, lvs, yp, out) };
        }
    }
    metric_errors_body(sr, w, zt, t_rows, lvs, yp, out)
}

#[inline(always)]
fn metric_errors_body(sr: &SortedRow, w: &[f32], zt: &[f32], t_rows: usize, lvs: &[Levels], yp: &mut Vec<f64>, out: &mut [f64]) {
    let n = sr.n;
    let Some(nl) = lvs.first().map(|lv| lv.level.len()) else {
        return; // no exponents (a search with refine = 0 asks for no fine points)
    };
    // Every exponent's bucket ends, once for all blocks.
    let mut ends = vec![0u32; lvs.len() * nl];
    for (lv, e) in lvs.iter().zip(ends.chunks_exact_mut(nl)) {
        sr.bucket_ends(lv, e);
    }
    // Row 0 stays zero; row j + 1 is written before it is read. Kept by the caller across calls.
    yp.resize((n + 1) * BLOCK, 0.0);
    for t0 in (0..t_rows).step_by(BLOCK) {
        let tb = BLOCK.min(t_rows - t0);
        let zcol = |c: usize| &zt[c * t_rows + t0..c * t_rows + t0 + tb];
        // z·w on the block, and the prefix sums of the y_j (row j of yp: the first j of them).
        let mut zw = [0f64; BLOCK];
        for (c, &wc) in w.iter().enumerate() {
            for (a, &z) in zw.iter_mut().zip(zcol(c)) {
                *a += wc as f64 * z as f64;
            }
        }
        let mut run = [0f64; BLOCK];
        for ((&c, &y), dst) in sr.col.iter().zip(&sr.sm).zip(yp[BLOCK..].chunks_exact_mut(BLOCK)) {
            // run += y·z[:, c], stored as the next row (in one pass: a copy after is a call).
            for ((r, d), &z) in run.iter_mut().zip(dst).zip(zcol(c as usize)) {
                *r += y as f64 * z as f64;
                *d = *r;
            }
        }
        for ((lv, e), o) in lvs.iter().zip(ends.chunks_exact(nl)).zip(out.iter_mut()) {
            let mut acc = [0f64; BLOCK];
            let mut start = 0usize;
            for (&end, &l) in e.iter().zip(&lv.level) {
                let end = (end as usize).max(start);
                if end > start && l != 0.0 {
                    let (p, q) = (&yp[start * BLOCK..start * BLOCK + tb], &yp[end * BLOCK..end * BLOCK + tb]);
                    for ((a, &pv), &qv) in acc.iter_mut().zip(p).zip(q) {
                        *a += l * (qv - pv);
                    }
                }
                start = end;
            }
            *o += zw[..tb].iter().zip(&acc).map(|(&zv, &av)| (zv - av) * (zv - av)).sum::<f64>();
        }
    }
}

/// Rows whose errors a search for one exponent of the whole tensor holds at once (summed in row
/// order after each block: the same sums as all rows at once).
const TOTAL_ROWS: usize = 256;

/// The search over every row: the weight error, or with `zt` (zᵀ, [n, t_rows]) the layer-output
/// error (see [`metric_errors`]).
unsafe fn search(s: &SearchArgs, w: u64, zt: Option<(&[f32], usize)>, out: u64) -> Result<()> {
    let q = &s.q;
    let (rows, n) = (q.rows, q.n);
    let bad = AtomicBool::new(false);
    let logs = LevelLogs::new(q.bits);
    let coarse = coarse_points(s);
    let coarse_lv: Vec<Levels> = coarse.iter().map(|&a| logs.at(a)).collect();
    // Row r sorted (None, and `bad` set, where it holds NaN or inf; rows of n = 0 are not asked).
    let row = |r: usize| -> Option<(SortedRow, &[f32])> {
        // SAFETY: w holds rows·n float32, only read.
        let wr = unsafe { rows_of::<f32>(w, n, r, r + 1) };
        let sr = SortedRow::new(wr, q.group, q.clip);
        if sr.is_none() {
            bad.store(true, Ordering::Relaxed);
        }
        sr.map(|sr| (sr, wr))
    };
    // `yp`: metric_errors' scratch, kept across a row's calls.
    let errors = |(sr, wr): &(SortedRow, &[f32]), lvs: &[Levels], yp: &mut Vec<f64>, dst: &mut [f64]| match zt {
        None => {
            for (d, lv) in dst.iter_mut().zip(lvs) {
                *d = sr.error(lv);
            }
        }
        Some((zt, t_rows)) => {
            dst.fill(0.0);
            metric_errors(sr, wr, zt, t_rows, lvs, yp, dst);
        }
    };
    let at = |points: &[f64]| -> Vec<Levels> { points.iter().map(|&a| logs.at(a)).collect() };
    let work = rows * n * zt.map_or(4, |(_, t)| t.max(4));
    if s.per_row {
        let os = Shared(out as usize);
        parallel::for_each_task(rows, work, |r| {
            let a = match (n, row(r)) {
                (0, _) | (_, None) => 1.0f32,
                (_, Some(sr)) => {
                    let (mut errs, mut yp) = (vec![0f64; coarse.len()], Vec::new());
                    errors(&sr, &coarse_lv, &mut yp, &mut errs);
                    two_stage(s, &coarse, &errs, |pts| {
                        let mut e = vec![0f64; pts.len()];
                        errors(&sr, &at(pts), &mut yp, &mut e);
                        e
                    })
                }
            };
            // SAFETY: task r writes out[r] only.
            unsafe { *(os.0 as *mut f32).add(r) = a };
        });
    } else {
        // Per-row errors at every point, then summed over rows in row order (deterministic). Each
        // stage sorts the rows again: keeping every row's SortedRow would take ~40 bytes an element.
        let total = |points: &[f64]| -> Vec<f64> {
            let (k, lvs) = (points.len(), at(points));
            let mut tot = vec![0f64; k];
            // TOTAL_ROWS rows at a time, so the per-row errors held stay bounded whatever the grid.
            let mut per_row = vec![0f64; TOTAL_ROWS.min(rows) * k];
            for r0 in (0..rows).step_by(TOTAL_ROWS) {
                let r1 = (r0 + TOTAL_ROWS).min(rows);
                per_row.fill(0.0);
                let ps = Shared(per_row.as_mut_ptr() as usize);
                parallel::for_each_task(r1 - r0, work / rows.max(1) * (r1 - r0), |i| {
                    if n == 0 {
                        return;
                    }
                    if let Some(sr) = row(r0 + i) {
                        // SAFETY: task i writes per_row[i·k .. (i+1)·k] only; per_row outlives the tasks.
                        let dst = unsafe { std::slice::from_raw_parts_mut((ps.0 as *mut f64).add(i * k), k) };
                        errors(&sr, &lvs, &mut Vec::new(), dst);
                    }
                });
                for e in per_row[..(r1 - r0) * k].chunks_exact(k.max(1)) {
                    for (t, e) in tot.iter_mut().zip(e) {
                        *t += e;
                    }
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
/// See [`crate::quant::search_exponent`].
pub unsafe fn search_exponent(s: &SearchArgs, w: u64, z: u64, out: u64) -> Result<()> {
    if s.z_rows == 0 {
        return search(s, w, None, out);
    }
    // zᵀ, so that a column of z (one element's contribution to z·ŵ) is contiguous.
    let (t_rows, n) = (s.z_rows, s.q.n);
    let z = slice::<f32>(z, t_rows * n);
    if !z.iter().all(|v| v.is_finite()) {
        // Every error would be NaN or inf, and the search would return a = 1 for every row.
        return Err(Error::value("x: expected finite calibration activations (NaN or inf found)"));
    }
    let mut zt = vec![0f32; n * t_rows];
    for (t, zr) in z.chunks_exact(n.max(1)).enumerate() {
        for (c, &v) in zr.iter().enumerate() {
            zt[c * t_rows + t] = v;
        }
    }
    search(s, w, Some((&zt, t_rows)), out)
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
    fn metric_errors_equal_the_direct_product() {
        let mut rnd = uniform(0x9e37_79b9_7f4a_7c15);
        for bits in [2u32, 4, 8] {
            let logs = LevelLogs::new(bits);
            let lvs: Vec<Levels> = [0.05, 0.4, 0.83, 1.0].iter().map(|&a| logs.at(a)).collect();
            for (w, g) in rows().into_iter().step_by(3) {
                let n = w.len();
                let sr = SortedRow::new(&w, g, 1.0).unwrap();
                // 1 row, a few, one full block and one past it.
                for t_rows in [1usize, 3, BLOCK, BLOCK + 7] {
                    let z: Vec<f32> = (0..t_rows * n).map(|_| rnd()).collect();
                    let zt: Vec<f32> = (0..n * t_rows).map(|i| z[(i % t_rows) * n + i / t_rows]).collect();
                    let mut ours = vec![0f64; lvs.len()];
                    metric_errors(&sr, &w, &zt, t_rows, &lvs, &mut Vec::new(), &mut ours);
                    metric_errors(&sr, &w, &zt, t_rows, &[], &mut Vec::new(), &mut []); // none asked
                    for (lv, &o) in lvs.iter().zip(&ours) {
                        let e = direct_residual(&w, g, lv, false);
                        let want: f64 = z.chunks_exact(n).map(|zr| zr.iter().zip(&e).map(|(&a, &b)| a as f64 * b).sum::<f64>().powi(2)).sum();
                        let scale: f64 = z.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() * w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
                        assert!((o - want).abs() <= 1e-12 * scale.max(1e-300), "bits {bits} n {n} t {t_rows}: {o} vs {want}");
                    }
                }
            }
        }
    }
}
