//! The exponent search (search_exponent): a coarse grid and a refinement per row, against the
//! weight reconstruction error or the layer-output error on calibration activations.
use super::*;

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
    /// The sorted u, then `WINDOW` entries of +inf (so a window read past the row stays in bounds
    /// and counts nothing).
    u: Vec<f32>,
    /// The number of u (without the padding).
    n: usize,
    /// [Σm², Σm²u, Σm²u²] over the first j sorted elements, j = 0..=n.
    pre: Vec<[f64; 2]>,
    /// Σm²u² over the row.
    s2: f64,
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
        let mut acc = [0f64; 2];
        let mut s2 = 0f64;
        pre.push(acc);
        for &key in &keys {
            let (u, m) = (f32::from_bits((key >> 32) as u32) as f64, ms[(key & 0xffff_ffff) as usize] as f64);
            let m2 = m * m;
            acc = [acc[0] + m2, acc[1] + m2 * u];
            s2 += m2 * u * u;
            pre.push(acc);
        }
        let n = keys.len();
        let mut u: Vec<f32> = Vec::with_capacity(n + WINDOW);
        u.extend(keys.iter().map(|&k| f32::from_bits((k >> 32) as u32)));
        let nb = n.max(16);
        let mut bucket = vec![0u32; nb + 1];
        let mut j = 0usize;
        for (b, st) in bucket.iter_mut().enumerate() {
            // The same float32 arithmetic as the lookup (t·B truncated), so every u below the
            // edge of bucket b is counted before it.
            while j < n && ((u[j] * nb as f32) as usize) < b {
                j += 1;
            }
            *st = j as u32;
        }
        u.resize(n + WINDOW, f32::INFINITY);
        Some(SortedRow { u, n, pre, s2, bucket })
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

    /// The number of u below t (t < 1: t falls in bucket b, its position lies in
    /// [bucket[b], bucket[b + 1]]).
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
        for (e, &t) in ends.iter_mut().zip(&lv.thr) {
            *e = self.position(t) as u32;
        }
        ends[lv.thr.len()] = self.n as u32;
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
    let logs = LevelLogs::new(q.bits);
    let coarse_lv: Vec<Levels> = coarse.iter().map(|&a| logs.at(a)).collect();
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
                    two_stage(s, &coarse, &errs, |pts| pts.iter().map(|&a| sr.error(&logs.at(a))).collect())
                }
            };
            // SAFETY: task r writes out[r] only.
            unsafe { *(os.0 as *mut f32).add(r) = a };
        });
    } else {
        // Per-row errors at every point, then summed over rows in row order (deterministic).
        let total = |points: &[f64]| -> Vec<f64> {
            let k = points.len();
            let lvs: Vec<Levels> = points.iter().map(|&a| logs.at(a)).collect();
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
/// See [`crate::quant::search_exponent`].
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

    /// Rows that stress the bucket index: exact zeros, runs of one value longer than WINDOW (a
    /// bucket the window cannot cover), values rounded to a few bits (ties), an all-zero group and
    /// a spread of magnitudes.
    fn rows() -> Vec<(Vec<f32>, usize)> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
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

    /// Σ m²·(u − L(u))² with L(u) the level of the number of boundaries ≤ u, in float64.
    fn direct_error(w: &[f32], g: usize, lv: &Levels) -> f64 {
        let mut err = 0.0;
        for ws in w.chunks_exact(g) {
            let m = ws.iter().fold(0f32, |a, v| a.max(v.abs()));
            for &v in ws {
                let u = if m > 0.0 { v.abs() / m } else { 0.0 };
                let k = lv.thr.iter().filter(|&&t| t <= u).count();
                let d = m as f64 * (u as f64 - lv.level[k]);
                err += d * d;
            }
        }
        err
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
}
