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
