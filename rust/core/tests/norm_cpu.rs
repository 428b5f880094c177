//! The CPU norm kernels against a float64 evaluation of the formulas, and their error paths.
use half::bf16;
use lmkern_core::norm::{self, dw_parts, NormArgs, NormBwd, NormFwd, NormKind};
use lmkern_core::{DType, Device, ErrorKind};

mod kernel_common;
use kernel_common::{addr, out, Rng};

/// y and rstd of one row, in float64 straight from the formulas.
fn reference_row(kind: NormKind, h: &[f64], w: Option<&[f64]>, eps: f64, offset: f64, scale: f64) -> (Vec<f64>, f64) {
    let n = h.len() as f64;
    let sq: f64 = h.iter().map(|v| v * v).sum();
    let s: f64 = h.iter().sum();
    let ms = match kind {
        NormKind::Rms => sq / n,
        NormKind::Crms => (sq + s * s) / (n + 1.0),
    };
    let r = 1.0 / (ms + eps).sqrt();
    let y = h.iter().enumerate().map(|(j, v)| v * r * w.map_or(1.0, |w| offset + w[j]) * scale).collect();
    (y, r)
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

fn args(kind: NormKind, dtype: DType, rows: usize, n: usize) -> NormArgs {
    NormArgs { kind, dtype, rows, n, eps: 1e-6, offset: 0.25, scale: 0.75 }
}

#[test]
fn forward_f32_matches_reference_with_residual_and_weight() {
    let mut rng = Rng(7);
    for kind in [NormKind::Rms, NormKind::Crms] {
        for (rows, n) in [(1, 1), (3, 17), (5, 64), (2, 1000), (1, 4099)] {
            let x: Vec<f32> = rng.vec(rows * n).iter().map(|&v| v as f32 * 3.0).collect();
            let res: Vec<f32> = rng.vec(rows * n).iter().map(|&v| v as f32).collect();
            let w: Vec<f32> = rng.vec(n).iter().map(|&v| v as f32).collect();
            let mut y = vec![f32::NAN; rows * n];
            let mut h = vec![f32::NAN; rows * n];
            let mut rstd = vec![f32::NAN; rows];
            let a = args(kind, DType::F32, rows, n);
            let p = NormFwd { x: addr(&x), residual: addr(&res), weight: addr(&w), y: out(&mut y), h: out(&mut h), rstd: out(&mut rstd) };
            unsafe { norm::forward(Device::Cpu, &a, &p) }.unwrap();
            let wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            for r in 0..rows {
                let hr: Vec<f64> = (0..n).map(|j| (x[r * n + j] + res[r * n + j]) as f64).collect();
                assert_eq!(&h[r * n..(r + 1) * n], &hr.iter().map(|&v| v as f32).collect::<Vec<_>>()[..]);
                let (yr, rr) = reference_row(kind, &hr, Some(&wd), a.eps, a.offset, a.scale);
                let got: Vec<f64> = y[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
                assert!(rel_err(&got, &yr) < 2e-6, "{kind:?} [{rows},{n}] row {r}: {}", rel_err(&got, &yr));
                assert!(((rstd[r] as f64) - rr).abs() / rr < 1e-6);
            }
        }
    }
}

#[test]
fn forward_bf16_and_without_weight() {
    let mut rng = Rng(11);
    let (rows, n) = (4, 333);
    let xd = rng.vec(rows * n);
    let x: Vec<bf16> = xd.iter().map(|&v| bf16::from_f64(v)).collect();
    let mut y = vec![bf16::NAN; rows * n];
    let mut rstd = vec![0f32; rows];
    let a = args(NormKind::Rms, DType::BF16, rows, n);
    let p = NormFwd { x: addr(&x), y: out(&mut y), rstd: out(&mut rstd), ..Default::default() };
    unsafe { norm::forward(Device::Cpu, &a, &p) }.unwrap();
    for r in 0..rows {
        let hr: Vec<f64> = x[r * n..(r + 1) * n].iter().map(|v| v.to_f64()).collect();
        let (yr, _) = reference_row(NormKind::Rms, &hr, None, a.eps, a.offset, a.scale);
        let got: Vec<f64> = y[r * n..(r + 1) * n].iter().map(|v| v.to_f64()).collect();
        assert!(rel_err(&got, &yr) < 1e-2);
    }
}

/// Backward against central differences of the float64 forward (a check independent of the formula).
#[test]
fn backward_f64_matches_finite_differences() {
    let mut rng = Rng(3);
    for kind in [NormKind::Rms, NormKind::Crms] {
        let (rows, n) = (3, 7);
        let h = rng.vec(rows * n);
        let w = rng.vec(n);
        let dy = rng.vec(rows * n);
        let dh_out = rng.vec(rows * n);
        let a = args(kind, DType::F64, rows, n);
        let loss = |h: &[f64], w: &[f64]| -> f64 {
            (0..rows)
                .map(|r| {
                    let (y, _) = reference_row(kind, &h[r * n..(r + 1) * n], Some(w), a.eps, a.offset, a.scale);
                    y.iter().zip(&dy[r * n..(r + 1) * n]).map(|(a, b)| a * b).sum::<f64>()
                        + h[r * n..(r + 1) * n].iter().zip(&dh_out[r * n..(r + 1) * n]).map(|(a, b)| a * b).sum::<f64>()
                })
                .sum()
        };
        let rstd: Vec<f64> = (0..rows).map(|r| reference_row(kind, &h[r * n..(r + 1) * n], None, a.eps, 0.0, 1.0).1).collect();
        let parts = dw_parts(rows, n);
        let mut partial = vec![f64::NAN; parts * n];
        let mut dx = vec![f64::NAN; rows * n];
        let mut dw = vec![f64::NAN; n];
        let p = NormBwd {
            dy: addr(&dy),
            h: addr(&h),
            weight: addr(&w),
            rstd: addr(&rstd),
            dh_out: addr(&dh_out),
            dx: out(&mut dx),
            dw_partial: out(&mut partial),
            dw: out(&mut dw),
            parts,
        };
        unsafe { norm::backward(Device::Cpu, &a, &p) }.unwrap();
        let step = 1e-6;
        for i in 0..rows * n {
            let (mut hp, mut hm) = (h.clone(), h.clone());
            hp[i] += step;
            hm[i] -= step;
            let fd = (loss(&hp, &w) - loss(&hm, &w)) / (2.0 * step);
            assert!((fd - dx[i]).abs() < 1e-6 * (1.0 + fd.abs()), "{kind:?} dx[{i}] {} vs {fd}", dx[i]);
        }
        for j in 0..n {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[j] += step;
            wm[j] -= step;
            let fd = (loss(&h, &wp) - loss(&h, &wm)) / (2.0 * step);
            assert!((fd - dw[j]).abs() < 1e-6 * (1.0 + fd.abs()), "{kind:?} dw[{j}] {} vs {fd}", dw[j]);
        }
    }
}

#[test]
fn dw_parts_depends_on_shape_only_and_is_bounded() {
    assert_eq!(dw_parts(0, 10), 1);
    assert_eq!(dw_parts(1, 10), 1);
    assert_eq!(dw_parts(8192, 4096), 512);
    assert!(dw_parts(1 << 20, 262_144) * 262_144 <= 1 << 22);
    for rows in [1, 15, 16, 17, 1000] {
        assert!(dw_parts(rows, 64) <= rows.max(1));
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let x = vec![1f32; 8];
    let mut y = vec![0f32; 8];
    let ok = NormFwd { x: addr(&x), y: out(&mut y), ..Default::default() };
    let a = args(NormKind::Rms, DType::F32, 2, 4);
    let err = |a: &NormArgs, p: &NormFwd| unsafe { norm::forward(Device::Cpu, a, p) }.unwrap_err();

    let e = err(&NormArgs { eps: f64::NAN, ..a }, &ok);
    assert_eq!(e.kind, ErrorKind::Value);
    assert!(e.message.contains("eps"));
    let e = err(&NormArgs { n: 0, ..a }, &ok);
    assert!(e.message.contains("(last) dimension"));
    let e = err(&a, &NormFwd { x: 0, ..ok });
    assert!(e.message.starts_with("x:"));
    let e = err(&a, &NormFwd { residual: addr(&x), ..ok });
    assert!(e.message.contains("residual and h"));
    let e = err(&a, &NormFwd { y: out(&mut y) + 1, ..ok });
    assert!(e.message.contains("aligned"));
    assert_eq!(DType::from_code(9).unwrap_err().kind, ErrorKind::Type);
    // Empty input is fine, even with null addresses.
    unsafe { norm::forward(Device::Cpu, &NormArgs { rows: 0, ..a }, &NormFwd::default()) }.unwrap();

    let b = NormBwd { dy: addr(&x), h: addr(&x), dx: addr(&y), rstd: addr(&x), ..Default::default() };
    let e = unsafe { norm::backward(Device::Cpu, &a, &NormBwd { dw: addr(&y), dw_partial: addr(&y), weight: addr(&x), parts: 3, ..b }) }
        .unwrap_err();
    assert!(e.message.contains("partial rows"));
    let e = unsafe { norm::backward(Device::Cpu, &a, &NormBwd { dw: addr(&y), dw_partial: addr(&y), parts: 1, ..b }) }.unwrap_err();
    assert!(e.message.contains("needs the weight"));
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng(5);
    let (rows, n) = (300, 257);
    let dy: Vec<f32> = rng.vec(rows * n).iter().map(|&v| v as f32).collect();
    let h: Vec<f32> = rng.vec(rows * n).iter().map(|&v| v as f32).collect();
    let w: Vec<f32> = rng.vec(n).iter().map(|&v| v as f32).collect();
    let rstd = vec![0.9f32; rows];
    let parts = dw_parts(rows, n);
    let run = |threads: usize| {
        lmkern_core::parallel::set_num_threads(threads);
        let mut partial = vec![0f32; parts * n];
        let mut dx = vec![0f32; rows * n];
        let mut dw = vec![0f32; n];
        let p = NormBwd {
            dy: addr(&dy),
            h: addr(&h),
            weight: addr(&w),
            rstd: addr(&rstd),
            dx: out(&mut dx),
            dw_partial: out(&mut partial),
            dw: out(&mut dw),
            parts,
            ..Default::default()
        };
        unsafe { norm::backward(Device::Cpu, &args(NormKind::Crms, DType::F32, rows, n), &p) }.unwrap();
        (dx, dw)
    };
    let one = run(1);
    let two = run(2);
    let three = run(3);
    assert!(one == two && two == three);
}

/// The in-place forward (y over x, h over residual) gives bit for bit what the out-of-place one
/// gives, with and without residual and weight, for rows small and large enough to stream.
#[test]
fn in_place_forward_equals_out_of_place() {
    let mut rng = Rng(13);
    for kind in [NormKind::Rms, NormKind::Crms] {
        for (rows, n) in [(1, 1), (3, 17), (7, 1000), (600, 4096)] {
            for (with_res, with_w) in [(false, false), (true, false), (false, true), (true, true)] {
                let x: Vec<f32> = rng.vec(rows * n).iter().map(|&v| v as f32 * 2.0).collect();
                let res: Vec<f32> = rng.vec(rows * n).iter().map(|&v| v as f32).collect();
                let w: Vec<f32> = rng.vec(n).iter().map(|&v| v as f32).collect();
                let a = args(kind, DType::F32, rows, n);
                let (mut y, mut h, mut rstd) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n], vec![f32::NAN; rows]);
                let p = NormFwd {
                    x: addr(&x),
                    residual: if with_res { addr(&res) } else { 0 },
                    weight: if with_w { addr(&w) } else { 0 },
                    y: out(&mut y),
                    h: if with_res { out(&mut h) } else { 0 },
                    rstd: out(&mut rstd),
                };
                unsafe { norm::forward(Device::Cpu, &a, &p) }.unwrap();
                let (mut xi, mut ri, mut rstd_i) = (x.clone(), res.clone(), vec![f32::NAN; rows]);
                let xp = out(&mut xi);
                let rp = if with_res { out(&mut ri) } else { 0 };
                let q = NormFwd { x: xp, residual: rp, weight: p.weight, y: xp, h: rp, rstd: out(&mut rstd_i) };
                unsafe { norm::forward(Device::Cpu, &a, &q) }.unwrap();
                let same = |u: &[f32], v: &[f32]| u.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same(&xi, &y), "{kind:?} [{rows},{n}] res={with_res} w={with_w}: y");
                assert!(same(&rstd_i, &rstd));
                if with_res {
                    assert!(same(&ri, &h), "{kind:?} [{rows},{n}]: h");
                } else {
                    assert!(same(&ri, &res), "residual untouched without a residual");
                }
            }
        }
    }
    // Half in place is refused.
    let mut x = vec![1f32; 8];
    let r = vec![1f32; 8];
    let mut h = vec![0f32; 8];
    let xp = out(&mut x);
    let p = NormFwd { x: xp, y: xp, residual: addr(&r), h: out(&mut h), ..Default::default() };
    let e = unsafe { norm::forward(Device::Cpu, &args(NormKind::Rms, DType::F32, 2, 4), &p) }.unwrap_err();
    assert!(e.message.contains("in place"), "{}", e.message);
}

/// A row of 2^24 + 3 elements: the row sums (forward) and Σ g·h (backward) stay float32-accurate.
/// Single float32 running sums were off by 2.3e-4 at this length (1.4e-2 at 2^28).
#[test]
fn very_long_row_keeps_float32_accuracy() {
    let n = (1 << 24) + 3;
    let mut rng = Rng(17);
    let x: Vec<f32> = rng.vec(n).iter().map(|&v| v as f32 + 0.5).collect(); // mean ≠ 0: CRMS's Σx matters
    let dy: Vec<f32> = rng.vec(n).iter().map(|&v| v as f32).collect();
    let h: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for kind in [NormKind::Rms, NormKind::Crms] {
        let a = NormArgs { kind, dtype: DType::F32, rows: 1, n, eps: 1e-6, offset: 0.0, scale: 1.0 };
        let (mut y, mut rstd) = (vec![f32::NAN; n], vec![f32::NAN; 1]);
        let p = NormFwd { x: addr(&x), y: out(&mut y), rstd: out(&mut rstd), ..Default::default() };
        unsafe { norm::forward(Device::Cpu, &a, &p) }.unwrap();
        let (_, r) = reference_row(kind, &h, None, a.eps, 0.0, 1.0);
        assert!((rstd[0] as f64 - r).abs() / r < 1e-6, "{kind:?} rstd {} vs {r}", rstd[0]);
        // dx = r·dy − r³/div · (Σ dy·h) · (h + s), s = Σh for CRMS (0 for RMS), div = n (n + 1 for CRMS)
        let mut dx = vec![f32::NAN; n];
        let b = NormBwd { dy: addr(&dy), h: addr(&x), rstd: addr(&rstd), dx: out(&mut dx), ..Default::default() };
        unsafe { norm::backward(Device::Cpu, &a, &b) }.unwrap();
        let r = rstd[0] as f64; // the kernel's own r: this checks the backward's sums alone
        let c: f64 = dy.iter().zip(&h).map(|(&g, v)| g as f64 * v).sum();
        let (s, div) = match kind {
            NormKind::Rms => (0.0, n as f64),
            NormKind::Crms => (h.iter().sum(), n as f64 + 1.0),
        };
        let want: Vec<f64> = dy.iter().zip(&h).map(|(&g, v)| r * g as f64 - r * r * r / div * c * (v + s)).collect();
        let got: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&got, &want) < 1e-6, "{kind:?} dx: {}", rel_err(&got, &want));
    }
}
