//! CPU norm kernels: rayon over rows in lmkern's pool, f32 accumulation (f64 for f64) with fixed
//! per-row reduction order, so results do not depend on the thread count.
use super::{dw_parts, NormArgs, NormBwd, NormFwd, NormKind};
use crate::error::Result;
use crate::cpu::{multiversion, rows_of, rows_of_mut, slice, stream_copy, STREAM_BYTES};
use crate::parallel;
use crate::tensor::DType;
use half::{bf16, f16};
use crate::cpu::{Acc, Elem};

/// Lanes of independent partial sums: a fixed reduction order the compiler can vectorize.
const LANES: usize = 16;

/// Elements per block of a row's sums: each block is summed in LANES accumulators of the
/// accumulation type, the blocks' totals added in f64. A float32 running sum stops growing once it
/// is ~2^24 times its terms: rows of 2^24 elements were off by 2e-4, 2^28 by 1.4e-2. A row of one
/// block sums exactly as before.
const BLOCK: usize = LANES * 1024;

/// (Σh², Σh) of a row (Σh only for CRMSNorm).
#[inline(always)]
fn sums<T: Elem>(h: &[T], crms: bool) -> (T::Acc, T::Acc) {
    if h.len() <= BLOCK {
        return block_sums(h, crms);
    }
    let (mut sq, mut s) = (0f64, 0f64);
    for b in h.chunks(BLOCK) {
        let (bsq, bs) = block_sums(b, crms);
        sq += bsq.to_f64();
        s += bs.to_f64();
    }
    (T::Acc::from_f64(sq), T::Acc::from_f64(s))
}

#[inline(always)]
fn block_sums<T: Elem>(h: &[T], crms: bool) -> (T::Acc, T::Acc) {
    let mut sq = [T::Acc::ZERO; LANES];
    let mut s = [T::Acc::ZERO; LANES];
    let chunks = h.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let v = c[i].load();
            sq[i] += v * v;
            if crms {
                s[i] += v;
            }
        }
    }
    for (i, v) in tail.iter().enumerate() {
        let v = v.load();
        sq[i] += v * v;
        if crms {
            s[i] += v;
        }
    }
    (tree_sum(sq), tree_sum(s))
}

#[inline(always)]
#[allow(clippy::assign_op_pattern)] // Acc has Add, not AddAssign
fn tree_sum<A: Acc>(mut v: [A; LANES]) -> A {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            v[i] = v[i] + v[i + w];
        }
        w /= 2;
    }
    v[0]
}

/// Σ g·h over a row, in blocks as [`sums`].
#[inline(always)]
fn dot<T: Elem>(g: &[T::Acc], h: &[T]) -> T::Acc {
    if h.len() <= BLOCK {
        return block_dot::<T>(g, h);
    }
    let total: f64 = g.chunks(BLOCK).zip(h.chunks(BLOCK)).map(|(gb, hb)| block_dot::<T>(gb, hb).to_f64()).sum();
    T::Acc::from_f64(total)
}

#[inline(always)]
fn block_dot<T: Elem>(g: &[T::Acc], h: &[T]) -> T::Acc {
    let mut acc = [T::Acc::ZERO; LANES];
    let gc = g.chunks_exact(LANES);
    let hc = h.chunks_exact(LANES);
    let (gt, ht) = (gc.remainder(), hc.remainder());
    for (a, b) in gc.zip(hc) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i].load();
        }
    }
    for (i, (a, b)) in gt.iter().zip(ht).enumerate() {
        acc[i] += *a * b.load();
    }
    tree_sum(acc)
}

/// Rows handed to one task: enough work to amortize scheduling, independent of the thread count.
fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).clamp(1, 256)
}

/// # Safety
/// See [`super::forward`].
pub unsafe fn forward(a: &NormArgs, p: &NormFwd) -> Result<()> {
    match a.dtype {
        DType::F32 => forward_t::<f32>(a, p),
        DType::F64 => forward_t::<f64>(a, p),
        DType::F16 => forward_t::<f16>(a, p),
        DType::BF16 => forward_t::<bf16>(a, p),
    }
    Ok(())
}

/// # Safety
/// See [`super::backward`].
pub unsafe fn backward(a: &NormArgs, p: &NormBwd) -> Result<()> {
    match a.dtype {
        DType::F32 => backward_t::<f32>(a, p),
        DType::F64 => backward_t::<f64>(a, p),
        DType::F16 => backward_t::<f16>(a, p),
        DType::BF16 => backward_t::<bf16>(a, p),
    }
    Ok(())
}

/// What every forward task needs: the call's buffers and its scalars in the accumulation type.
struct Fwd<'a, T: Elem> {
    p: &'a NormFwd,
    n: usize,
    crms: bool,
    inv_div: T::Acc,
    eps: T::Acc,
    scale: T::Acc,
    /// (offset + w)·scale per column, when there is a weight.
    factor: Option<Vec<T::Acc>>,
    /// Write y and h through cache-bypassing stores (large outputs).
    stream: bool,
}

unsafe fn forward_t<T: Elem>(a: &NormArgs, p: &NormFwd) {
    let (rows, n) = (a.rows, a.n);
    let scale = T::Acc::from_f64(a.scale);
    let offset = T::Acc::from_f64(a.offset);
    let f = Fwd::<T> {
        p,
        n,
        crms: a.kind == NormKind::Crms,
        inv_div: T::Acc::from_f64(1.0 / a.divisor()),
        eps: T::Acc::from_f64(a.eps),
        scale,
        factor: (p.weight != 0).then(|| slice::<T>(p.weight, n).iter().map(|v| (offset + v.load()) * scale).collect()),
        stream: rows * n * std::mem::size_of::<T>() >= STREAM_BYTES,
    };
    let rpt = rows_per_task(n);
    let in_place = super::is_in_place(p);
    parallel::for_each_task(rows.div_ceil(rpt), rows * n, |t| {
        let (r0, r1) = (t * rpt, ((t + 1) * rpt).min(rows));
        if in_place {
            forward_rows_in_place::<T>(&f, r0, r1)
        } else {
            forward_rows::<T>(&f, r0, r1)
        }
    });
}

multiversion!(fn forward_rows_in_place<T: Elem>(f: &Fwd<T>, r0: usize, r1: usize) => forward_rows_in_place_body);

/// The in-place forward: h = x + residual written over residual, y over x. Each buffer is reached
/// through one slice, read before it is overwritten within a row. No streaming stores: the rows were
/// just read, so they are in cache and written back without a read-for-ownership.
#[inline(always)]
fn forward_rows_in_place_body<T: Elem>(f: &Fwd<T>, r0: usize, r1: usize) {
    let (n, p) = (f.n, f.p);
    // SAFETY: tasks cover disjoint row ranges [r0, r1); in place, y is x and h is residual, and the
    // two do not overlap each other (see `super::forward`), so these are the only live references.
    let xy = unsafe { rows_of_mut::<T>(p.x, n, r0, r1) };
    let mut rh = (p.residual != 0).then(|| unsafe { rows_of_mut::<T>(p.residual, n, r0, r1) });
    let mut rstd = (p.rstd != 0).then(|| unsafe { rows_of_mut::<T::Acc>(p.rstd, 1, r0, r1) });
    for i in 0..r1 - r0 {
        let xr = &mut xy[i * n..(i + 1) * n];
        let hr: &[T] = match rh.as_deref_mut() {
            Some(rh) => {
                let hh = &mut rh[i * n..(i + 1) * n];
                for j in 0..n {
                    hh[j] = T::store(xr[j].load() + hh[j].load());
                }
                &*hh
            }
            None => &*xr,
        };
        let (sq, s) = sums(hr, f.crms);
        let ms = if f.crms { (sq + s * s) * f.inv_div } else { sq * f.inv_div };
        let r = (ms + f.eps).rsqrt();
        if let Some(rs) = rstd.as_deref_mut() {
            rs[i] = r;
        }
        // Without a residual, hr is xr itself: scale it in place.
        match (&f.factor, rh.is_some()) {
            (Some(fac), true) => {
                let hr = &rh.as_deref().unwrap()[i * n..(i + 1) * n];
                for j in 0..n {
                    xr[j] = T::store(hr[j].load() * r * fac[j]);
                }
            }
            (None, true) => {
                let hr = &rh.as_deref().unwrap()[i * n..(i + 1) * n];
                let rs = r * f.scale;
                for j in 0..n {
                    xr[j] = T::store(hr[j].load() * rs);
                }
            }
            (Some(fac), false) => {
                for j in 0..n {
                    xr[j] = T::store(xr[j].load() * r * fac[j]);
                }
            }
            (None, false) => {
                let rs = r * f.scale;
                for v in xr.iter_mut() {
                    *v = T::store(v.load() * rs);
                }
            }
        }
    }
}

multiversion!(fn forward_rows<T: Elem>(f: &Fwd<T>, r0: usize, r1: usize) => forward_rows_body);

#[inline(always)]
fn forward_rows_body<T: Elem>(f: &Fwd<T>, r0: usize, r1: usize) {
    let (n, p) = (f.n, f.p);
    // SAFETY: tasks cover disjoint row ranges [r0, r1) of the caller's buffers (see `forward`).
    let (x, y) = unsafe { (rows_of::<T>(p.x, n, r0, r1), rows_of_mut::<T>(p.y, n, r0, r1)) };
    let mut rstd = (p.rstd != 0).then(|| unsafe { rows_of_mut::<T::Acc>(p.rstd, 1, r0, r1) });
    let res = (p.residual != 0).then(|| unsafe { rows_of::<T>(p.residual, n, r0, r1) });
    let mut h_out = (p.h != 0).then(|| unsafe { rows_of_mut::<T>(p.h, n, r0, r1) });
    // Rows are built here and streamed out when the outputs are too large to keep in cache.
    let mut ybuf: Vec<T> = if f.stream { vec![T::store(T::Acc::ZERO); n] } else { Vec::new() };
    let mut hbuf: Vec<T> = if f.stream && res.is_some() { vec![T::store(T::Acc::ZERO); n] } else { Vec::new() };
    for i in 0..r1 - r0 {
        let xr = &x[i * n..(i + 1) * n];
        // With a residual, h is formed and rounded to T first, then normalized (as torch would).
        let hr: &[T] = match res {
            Some(r) => {
                let rr = &r[i * n..(i + 1) * n];
                let hh: &mut [T] = if f.stream { &mut hbuf } else { &mut h_out.as_deref_mut().unwrap()[i * n..(i + 1) * n] };
                for j in 0..n {
                    hh[j] = T::store(xr[j].load() + rr[j].load());
                }
                &*hh
            }
            None => xr,
        };
        let (sq, s) = sums(hr, f.crms);
        let ms = if f.crms { (sq + s * s) * f.inv_div } else { sq * f.inv_div };
        let r = (ms + f.eps).rsqrt();
        if let Some(rs) = rstd.as_deref_mut() {
            rs[i] = r;
        }
        let yr: &mut [T] = if f.stream { &mut ybuf } else { &mut y[i * n..(i + 1) * n] };
        match &f.factor {
            Some(fac) => {
                for j in 0..n {
                    yr[j] = T::store(hr[j].load() * r * fac[j]);
                }
            }
            None => {
                let rs = r * f.scale;
                for j in 0..n {
                    yr[j] = T::store(hr[j].load() * rs);
                }
            }
        }
        if f.stream {
            stream_copy(&mut y[i * n..(i + 1) * n], &ybuf);
            if let Some(h) = h_out.as_deref_mut() {
                stream_copy(&mut h[i * n..(i + 1) * n], &hbuf);
            }
        }
    }
}

/// What every backward task needs.
struct Bwd<'a, T: Elem> {
    p: &'a NormBwd,
    rows: usize,
    n: usize,
    parts: usize,
    crms: bool,
    inv_div: T::Acc,
    /// (offset + w)·scale per column (scale alone without a weight).
    factor: Vec<T::Acc>,
}

unsafe fn backward_t<T: Elem>(a: &NormArgs, p: &NormBwd) {
    let (rows, n) = (a.rows, a.n);
    let scale = T::Acc::from_f64(a.scale);
    let offset = T::Acc::from_f64(a.offset);
    let b = Bwd::<T> {
        p,
        rows,
        n,
        parts: if p.dw != 0 { p.parts } else { dw_parts(rows, n) },
        crms: a.kind == NormKind::Crms,
        inv_div: T::Acc::from_f64(1.0 / a.divisor()),
        factor: match p.weight {
            0 => vec![scale; n],
            w => slice::<T>(w, n).iter().map(|v| (offset + v.load()) * scale).collect(),
        },
    };
    // One task per part: its rows in order into its own dw partial row, so the sum order is fixed.
    parallel::for_each_task(b.parts, rows * n, |pi| backward_part::<T>(&b, pi));

    if p.dw != 0 {
        // Second stage: dw = scale · Σ_parts partial, parts summed in order; columns split across tasks.
        const COLS: usize = 1024;
        let parts = b.parts;
        parallel::for_each_task(n.div_ceil(COLS), parts * n, |ci| {
            let (c0, c1) = (ci * COLS, ((ci + 1) * COLS).min(n));
            // SAFETY: tasks write disjoint column ranges of dw; the partials are only read here.
            let dw = unsafe { rows_of_mut::<T>(p.dw, 1, c0, c1) };
            let partial = unsafe { slice::<T::Acc>(p.dw_partial, parts * n) };
            let mut acc = vec![T::Acc::ZERO; c1 - c0];
            for pi in 0..parts {
                for (a, v) in acc.iter_mut().zip(&partial[pi * n + c0..pi * n + c1]) {
                    *a += *v;
                }
            }
            for (o, a) in dw.iter_mut().zip(acc) {
                *o = T::store(a * scale);
            }
        });
    }
}

multiversion!(fn backward_part<T: Elem>(b: &Bwd<T>, pi: usize) => backward_part_body);

#[inline(always)]
fn backward_part_body<T: Elem>(b: &Bwd<T>, pi: usize) {
    let (p, n) = (b.p, b.n);
    let (r0, r1) = (pi * b.rows / b.parts, (pi + 1) * b.rows / b.parts);
    // SAFETY: parts cover disjoint row ranges, and part `pi` alone owns partial row `pi`.
    let (dy, h, rstd, dx) = unsafe {
        (
            rows_of::<T>(p.dy, n, r0, r1),
            rows_of::<T>(p.h, n, r0, r1),
            rows_of::<T::Acc>(p.rstd, 1, r0, r1),
            rows_of_mut::<T>(p.dx, n, r0, r1),
        )
    };
    let dh_out = (p.dh_out != 0).then(|| unsafe { rows_of::<T>(p.dh_out, n, r0, r1) });
    let mut partial = (p.dw != 0).then(|| unsafe { rows_of_mut::<T::Acc>(p.dw_partial, n, pi, pi + 1) });
    if let Some(pw) = partial.as_deref_mut() {
        pw.fill(T::Acc::ZERO);
    }
    let factor = &b.factor[..n];
    let mut g = vec![T::Acc::ZERO; n];
    for i in 0..r1 - r0 {
        let dyr = &dy[i * n..(i + 1) * n];
        let hr = &h[i * n..(i + 1) * n];
        let dxr = &mut dx[i * n..(i + 1) * n];
        let r = rstd[i];
        for j in 0..n {
            g[j] = dyr[j].load() * factor[j];
        }
        let c = dot::<T>(&g, hr);
        // r·c first: r³ alone leaves float32 (underflows) for rows of RMS beyond ~1e12, while
        // (r·c)·inv_div·r·r stays in range for RMS within ~1e±19, where the forward sums do.
        let k = r * c * b.inv_div * r * r;
        let s = if b.crms { sums(hr, true).1 } else { T::Acc::ZERO };
        match dh_out {
            Some(d) => {
                let dr = &d[i * n..(i + 1) * n];
                for j in 0..n {
                    dxr[j] = T::store(r * g[j] - k * (hr[j].load() + s) + dr[j].load());
                }
            }
            None => {
                for j in 0..n {
                    dxr[j] = T::store(r * g[j] - k * (hr[j].load() + s));
                }
            }
        }
        if let Some(pw) = partial.as_deref_mut() {
            for j in 0..n {
                pw[j] += dyr[j].load() * hr[j].load() * r;
            }
        }
    }
}
