//! The CPU power-quantization kernels against a float64 evaluation of the formulas (PAPERS.md §2),
//! and their error paths. No Python: buffers are Rust vectors passed by address.
use lmkern_core::quant::{self, field_to_code, qmax, row_bytes, row_lut, unpack_fields, LinearArgs, QuantArgs, SearchArgs};
use lmkern_core::{DType, Device, ErrorKind};

mod kernel_common;
use kernel_common::{addr, out, Rng};

/// (codes, scales) of one row in float64: m = f32(max|x|) per group, round half away from zero.
fn reference_row(x: &[f32], a: f64, bits: u32, g: usize) -> (Vec<i32>, Vec<f32>, Vec<bool>) {
    let qm = qmax(bits) as f64;
    let (mut q, mut ms, mut near) = (vec![], vec![], vec![]);
    for grp in x.chunks(g) {
        let m = grp.iter().fold(0f32, |m, v| m.max(v.abs()));
        ms.push(m);
        for &v in grp {
            let u = if m > 0.0 { v.abs() as f64 / m as f64 } else { 0.0 };
            let t = qm * u.powf(a);
            let k = (t + 0.5).floor().min(qm);
            near.push(((t - t.floor()) - 0.5).abs() < 1e-9);
            q.push(if v < 0.0 { -(k as i32) } else { k as i32 });
        }
    }
    (q, ms, near)
}

#[test]
fn quantize_dequantize_match_the_formula() {
    let mut rng = Rng(3);
    for bits in [2u32, 3, 4, 8] {
        for (rows, n, g) in [(1usize, 1usize, 1usize), (3, 17, 17), (4, 96, 32), (2, 256, 128), (5, 40, 8)] {
            let x: Vec<f32> = (0..rows * n).map(|_| rng.next() as f32 * 2.0).collect();
            let a: Vec<f32> = (0..rows).map(|r| 0.3 + 0.7 * r as f32 / rows as f32).collect();
            let q = QuantArgs { bits, rows, n, group: g, clip: 1.0 };
            let rb = row_bytes(n, bits);
            let mut codes = vec![0u8; rows * rb];
            let mut scales = vec![0f32; rows * (n / g)];
            let mut deq = vec![f32::NAN; rows * n];
            unsafe {
                quant::quantize(Device::Cpu, DType::F32, &q, addr(&x), addr(&a), out(&mut codes), out(&mut scales)).unwrap();
                quant::dequantize(Device::Cpu, DType::F32, &q, addr(&codes), addr(&scales), addr(&a), out(&mut deq)).unwrap();
            }
            for r in 0..rows {
                let (qr, ms, near) = reference_row(&x[r * n..(r + 1) * n], a[r] as f64, bits, g);
                assert_eq!(&scales[r * (n / g)..(r + 1) * (n / g)], &ms[..]);
                let mut f = vec![0u8; n];
                unpack_fields(&codes[r * rb..(r + 1) * rb], bits, 0, &mut f);
                for j in 0..n {
                    let got = field_to_code(f[j], bits);
                    assert!(got == qr[j] || near[j], "bits {bits} row {r} elem {j}: {got} vs {}", qr[j]);
                    let m = ms[j / g] as f64;
                    let want = m * (got.signum() as f64) * (got.abs() as f64 / qmax(bits) as f64).powf(1.0 / a[r] as f64);
                    let d = deq[r * n + j] as f64;
                    assert!((d - want).abs() <= 3e-7 * want.abs(), "dequantized {d} vs {want}");
                }
            }
        }
    }
}

/// The dequantizers on many rows whose exponents repeat, alternate, return after others, differ in
/// the last bit or all differ (the tasks keep the last exponent's table: a stale or misplaced table
/// shows here), against each row's own table (row_lut, or its codebook) applied in the test. Every
/// field value (random bytes), tasks of several rows (rows_per_task), the SIMD row paths (float32
/// with n and g multiples of 8/16/32) and the table loop (other shapes, float64, bfloat16).
#[test]
fn dequantize_rows_with_repeating_exponents_match_each_rows_table() {
    use half::bf16;
    let mut rng = Rng(31);
    type Pattern = (&'static str, fn(usize) -> f32); // a name and each row's exponent
    let patterns: [Pattern; 6] = [
        ("constant", |_| 0.7),
        ("alternating", |r| if r % 2 == 0 { 0.7 } else { 0.45 }),
        ("runs", |r| 0.3 + 0.1 * (r / 5 % 7) as f32),
        ("returning", |r| [0.7, 0.45, 0.7, 0.7, 0.2][r % 5]),
        ("last bit", |r| if r % 3 == 0 { 0.7f32.next_up() } else { 0.7 }),
        ("distinct", |r| 1.0 - 0.0009 * r as f32),
    ];
    for (bits, n, g, rows) in [(8u32, 1usize, 1usize, 700usize), (8, 8, 8, 600), (8, 16, 16, 300), (8, 48, 16, 70), (4, 32, 32, 300), (4, 5, 5, 520), (3, 8, 8, 400), (2, 16, 8, 400), (3, 3, 3, 333)] {
        let q = QuantArgs { bits, rows, n, group: g, clip: 1.0 };
        let rb = row_bytes(n, bits);
        let codes: Vec<u8> = (0..rows * rb).map(|_| (rng.next() * 256.0) as i32 as u8).collect();
        let scales: Vec<f32> = (0..rows * (n / g)).map(|_| rng.next().abs() as f32 * 3.0).collect();
        for (name, pat) in patterns {
            let a: Vec<f32> = (0..rows).map(pat).collect();
            let mut table = vec![0f32; rows << bits];
            unsafe { quant::codebook(bits, rows, addr(&a), out(&mut table)).unwrap() };
            let (mut o32, mut o64, mut o16) = (vec![f32::NAN; rows * n], vec![f64::NAN; rows * n], vec![bf16::NAN; rows * n]);
            let (mut c32, mut c64, mut c16) = (o32.clone(), o64.clone(), o16.clone());
            unsafe {
                let (c, s, ta, tt) = (addr(&codes), addr(&scales), addr(&a), addr(&table));
                quant::dequantize(Device::Cpu, DType::F32, &q, c, s, ta, out(&mut o32)).unwrap();
                quant::dequantize(Device::Cpu, DType::F64, &q, c, s, ta, out(&mut o64)).unwrap();
                quant::dequantize(Device::Cpu, DType::BF16, &q, c, s, ta, out(&mut o16)).unwrap();
                quant::dequantize_codebooks(Device::Cpu, DType::F32, &q, c, s, tt, out(&mut c32)).unwrap();
                quant::dequantize_codebooks(Device::Cpu, DType::F64, &q, c, s, tt, out(&mut c64)).unwrap();
                quant::dequantize_codebooks(Device::Cpu, DType::BF16, &q, c, s, tt, out(&mut c16)).unwrap();
            }
            let mut f = vec![0u8; n];
            for r in 0..rows {
                let lut = row_lut(bits, a[r]);
                let cb = &table[r << bits..(r + 1) << bits];
                unpack_fields(&codes[r * rb..(r + 1) * rb], bits, 0, &mut f);
                for j in 0..n {
                    let (m, fv, e) = (scales[r * (n / g) + j / g], f[j] as usize, r * n + j);
                    let at = format!("bits {bits} [{rows}, {n}] g{g} {name}: row {r} elem {j}");
                    assert_eq!(o32[e].to_bits(), (m * lut[fv] as f32).to_bits(), "{at} float32");
                    assert_eq!(o64[e].to_bits(), (m as f64 * lut[fv]).to_bits(), "{at} float64");
                    assert_eq!(o16[e].to_bits(), bf16::from_f32(m * lut[fv] as f32).to_bits(), "{at} bfloat16");
                    assert_eq!(c32[e].to_bits(), (m * cb[fv]).to_bits(), "{at} codebook float32");
                    assert_eq!(c64[e].to_bits(), (m as f64 * cb[fv] as f64).to_bits(), "{at} codebook float64");
                    assert_eq!(c16[e].to_bits(), bf16::from_f32(m * cb[fv]).to_bits(), "{at} codebook bfloat16");
                }
            }
        }
    }
}

/// The code of x with scale m against the boundaries t, as the kernels compare (module docs of
/// lmkern_core::quant): |x| ≥ T_k with T_k = t_k·m in float64 rounded up to float32 (never 0).
fn code_of(x: f32, t: &[f64], m: f32) -> i32 {
    if m == 0.0 {
        return 0;
    }
    let k = t
        .iter()
        .filter(|&&tk| {
            let v = (tk * m as f64).max(f64::from_bits(1));
            let up = if ((v as f32) as f64) < v { (v as f32).next_up() } else { v as f32 };
            x.abs() >= up
        })
        .count() as i32;
    if x < 0.0 {
        -k
    } else {
        k
    }
}

/// Rows longer than the kernels' pieces (16384 elements): groups of a few elements, groups that
/// fill pieces unevenly, groups longer than a piece (two, and one the whole row), a row of 3
/// pieces and a tail; each long group's max|x| in its last piece. float32 and bfloat16 quantize
/// against the exact comparison above; fake quantize against dequantize(quantize); the
/// backward's dx against the same elements as rows of a few elements with the same scales (no
/// long group), its da against their sum; NaN in a late piece is an error.
#[test]
fn long_rows_go_in_pieces_with_the_codes_of_the_whole_row() {
    use half::bf16;
    let mut rng = Rng(43);
    for (rows, n, groups, split_by) in [(2usize, 40002usize, &[40002usize, 20001, 6667, 3, 2][..], 3usize), (1, 3 * 16384 + 8, &[3 * 16384 + 8][..], 8)] {
        let mut x: Vec<f32> = (0..rows * n).map(|_| (rng.next() * rng.next().abs().powi(3)) as f32).collect();
        let a: Vec<f32> = (0..rows).map(|r| 0.45 + 0.3 * r as f32).collect();
        for bits in [3u32, 4, 8] {
            for &g in groups {
                // Each group's max|x| near its end.
                for gs in x.chunks_exact_mut(g) {
                    gs[g - 1 - g / 7] = 5.0 + gs.len() as f32 * 1e-4;
                }
                let (ng, rb) = (n / g, row_bytes(n, bits));
                let q = QuantArgs { bits, rows, n, group: g, clip: 0.9 };
                let xh: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                for (dtype, xv) in [(DType::F32, x.clone()), (DType::BF16, xh.iter().map(|v| v.to_f32()).collect())] {
                    let xa = if dtype == DType::F32 { addr(&x) } else { addr(&xh) };
                    let at = format!("bits {bits} [{rows}, {n}] g{g} {dtype:?}");
                    let (mut codes, mut scales) = (vec![0xAAu8; rows * rb], vec![f32::NAN; rows * ng]);
                    let (mut y, mut ys, mut yh, mut yhs) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * ng], vec![bf16::NAN; rows * n], vec![f32::NAN; rows * ng]);
                    let mut deq = vec![f32::NAN; rows * n];
                    let mut deqh = vec![bf16::NAN; rows * n];
                    unsafe {
                        quant::quantize(Device::Cpu, dtype, &q, xa, addr(&a), out(&mut codes), out(&mut scales)).unwrap();
                        if dtype == DType::F32 {
                            quant::fake_quantize(Device::Cpu, dtype, &q, xa, addr(&a), out(&mut y), out(&mut ys)).unwrap();
                            quant::dequantize(Device::Cpu, dtype, &q, addr(&codes), addr(&scales), addr(&a), out(&mut deq)).unwrap();
                        } else {
                            quant::fake_quantize(Device::Cpu, dtype, &q, xa, addr(&a), out(&mut yh), out(&mut yhs)).unwrap();
                            quant::dequantize(Device::Cpu, dtype, &q, addr(&codes), addr(&scales), addr(&a), out(&mut deqh)).unwrap();
                        }
                    }
                    let mut f = vec![0u8; n];
                    for r in 0..rows {
                        let t = quant::boundaries(bits, a[r]);
                        unpack_fields(&codes[r * rb..(r + 1) * rb], bits, 0, &mut f);
                        for (gi, xs) in xv[r * n..(r + 1) * n].chunks_exact(g).enumerate() {
                            let m = (0.9 * xs.iter().fold(0f32, |m, v| m.max(v.abs())) as f64) as f32;
                            assert_eq!(scales[r * ng + gi].to_bits(), m.to_bits(), "{at}: scale of row {r} group {gi}");
                            for (j, &v) in xs.iter().enumerate() {
                                let got = field_to_code(f[gi * g + j], bits);
                                assert_eq!(got, code_of(v, &t, m), "{at}: row {r} elem {}", gi * g + j);
                            }
                        }
                    }
                    if dtype == DType::F32 {
                        assert!(ys == scales && y.iter().zip(&deq).all(|(u, v)| u.to_bits() == v.to_bits()), "{at}: fake quantize");
                    } else {
                        assert!(yhs == scales && yh.iter().zip(&deqh).all(|(u, v)| u.to_bits() == v.to_bits()), "{at}: fake quantize");
                    }
                    // The backward (float32): the same elements as rows of `split` (a divisor of
                    // g) with the same scales and exponents.
                    if dtype != DType::F32 {
                        continue;
                    }
                    let split = if g % split_by == 0 { split_by } else { g };
                    let dy: Vec<f32> = (0..rows * n).map(|_| rng.next() as f32).collect();
                    let (mut dx, mut da) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows]);
                    let sq = QuantArgs { rows: rows * n / split, n: split, group: split, ..q };
                    let s_scales: Vec<f32> = (0..sq.rows).map(|k| scales[k * split / g]).collect();
                    let s_a: Vec<f32> = (0..sq.rows).map(|k| a[k * split / n]).collect();
                    let (mut sdx, mut sda) = (vec![f32::NAN; rows * n], vec![f32::NAN; sq.rows]);
                    unsafe {
                        quant::fake_quantize_backward(Device::Cpu, dtype, &q, addr(&dy), xa, addr(&scales), addr(&a), out(&mut dx), out(&mut da)).unwrap();
                        quant::fake_quantize_backward(Device::Cpu, dtype, &sq, addr(&dy), xa, addr(&s_scales), addr(&s_a), out(&mut sdx), out(&mut sda)).unwrap();
                    }
                    assert!(dx.iter().zip(&sdx).all(|(u, v)| u.to_bits() == v.to_bits()), "{at}: dx");
                    for r in 0..rows {
                        let parts = &sda[r * n / split..(r + 1) * n / split];
                        let (want, scale) = parts.iter().fold((0f64, 0f64), |(s, m), &v| (s + v as f64, m + (v as f64).abs()));
                        assert!((da[r] as f64 - want).abs() <= 1e-5 * scale + 1e-30, "{at}: da[{r}] {} vs {want}", da[r]);
                    }
                }
            }
        }
        // NaN in the last piece of a long group: an error, not a finite scale.
        let q = QuantArgs { bits: 4, rows, n, group: n, clip: 1.0 };
        x[n - 3] = f32::NAN;
        let (mut codes, mut scales) = (vec![0u8; rows * row_bytes(n, 4)], vec![0f32; rows]);
        let e = unsafe { quant::quantize(Device::Cpu, DType::F32, &q, addr(&x), addr(&a), out(&mut codes), out(&mut scales)) }.unwrap_err();
        assert!(e.message.contains("finite"), "{e}");
    }
}

/// ∂x̂/∂x and ∂x̂/∂a of one element in float64, straight from the formulas (PAPERS.md §2, the doc
/// of quant::fake_quantize_backward): code q, scale m, exponent a.
fn fake_grads_ref(x: f64, q: i32, m: f64, a: f64, bits: u32) -> (f64, f64) {
    if x == 0.0 || m == 0.0 || x.abs() > m {
        return (0.0, 0.0);
    }
    let (s, lu) = (x.signum(), (x.abs() / m + quant::FAKE_GRAD_EPS).ln());
    let r = q.unsigned_abs() as f64 / qmax(bits) as f64;
    let big_r = if q == 0 { if a == 1.0 { 1.0 } else { 0.0 } } else { r.powf(1.0 / a - 1.0) };
    let first = if q == 0 { 0.0 } else { -(m / (a * a)) * s * r.powf(1.0 / a) * r.ln() };
    (big_r * ((a - 1.0) * lu).exp(), first + (m / a) * s * big_r * (a * lu).exp() * lu)
}

#[test]
fn fake_quantize_gradients_match_the_formula() {
    use half::bf16;
    // Whichever path this CPU (and LMKERN_CPU_ISA) gives: AVX-512's eight lanes (with a short last
    // one: n or g not multiples of 8) or the scalar loop; float32, float64 and bfloat16 x; zeros,
    // an all-zero group, clipped elements (clip 0.8), a = 1 and tiny exponents.
    let mut rng = Rng(17);
    for bits in [2u32, 3, 4, 8] {
        for (rows, n, g) in [(1usize, 1usize, 1usize), (3, 5, 5), (2, 300, 60), (4, 96, 32), (2, 17, 17), (3, 1030, 1030)] {
            for clip in [1.0f64, 0.8] {
                let mut x: Vec<f64> = (0..rows * n).map(|_| rng.next() * 3.0).collect();
                x[n / 2] = 0.0;
                if n >= 2 * g {
                    x[g..2 * g].fill(0.0);
                }
                let a: Vec<f32> = (0..rows).map(|r| [1.0, 0.05, 0.7, 1e-3][r % 4]).collect();
                let dy: Vec<f64> = (0..rows * n).map(|_| rng.next()).collect();
                let q = QuantArgs { bits, rows, n, group: g, clip };
                let (rb, ng) = (row_bytes(n, bits), n / g);
                for dtype in [DType::F32, DType::F64, DType::BF16] {
                    let at = format!("bits {bits} [{rows}, {n}] g{g} clip {clip} {dtype:?}");
                    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                    let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f64(v)).collect();
                    let (xv, xa): (Vec<f64>, u64) = match dtype {
                        DType::F32 => (x32.iter().map(|&v| v as f64).collect(), addr(&x32)),
                        DType::BF16 => (x16.iter().map(|v| v.to_f64()).collect(), addr(&x16)),
                        _ => (x.clone(), addr(&x)),
                    };
                    let (mut codes, mut scales) = (vec![0u8; rows * rb], vec![0f32; rows * ng]);
                    unsafe { quant::quantize(Device::Cpu, dtype, &q, xa, addr(&a), out(&mut codes), out(&mut scales)).unwrap() };
                    // Elements within rounding of a code boundary may take either code: no gradient asked there.
                    let mut dyv = dy.clone();
                    let mut f = vec![0u8; n];
                    let (mut dx_ref, mut da_ref, mut da_abs) = (vec![0f64; rows * n], vec![0f64; rows], vec![0f64; rows]);
                    for r in 0..rows {
                        unpack_fields(&codes[r * rb..(r + 1) * rb], bits, 0, &mut f);
                        let t = quant::boundaries(bits, a[r]);
                        for j in 0..n {
                            let (e, m) = (r * n + j, scales[r * ng + j / g] as f64);
                            let u = xv[e].abs() / m;
                            if m > 0.0 && t.iter().any(|&b| (u - b).abs() <= 1e-6 * b) {
                                dyv[e] = 0.0;
                            }
                            let (gx, ga) = fake_grads_ref(xv[e], field_to_code(f[j], bits), m, a[r] as f64, bits);
                            dx_ref[e] = dyv[e] * gx;
                            da_ref[r] += dyv[e] * ga;
                            da_abs[r] += (dyv[e] * ga).abs();
                        }
                    }
                    let mut da = vec![f32::NAN; rows];
                    let dx: Vec<f64> = unsafe {
                        match dtype {
                            DType::F32 => {
                                let dy32: Vec<f32> = dyv.iter().map(|&v| v as f32).collect();
                                let mut dx = vec![f32::NAN; rows * n];
                                quant::fake_quantize_backward(Device::Cpu, dtype, &q, addr(&dy32), xa, addr(&scales), addr(&a), out(&mut dx), out(&mut da)).unwrap();
                                dx.iter().map(|&v| v as f64).collect()
                            }
                            DType::BF16 => {
                                let dy16: Vec<bf16> = dyv.iter().map(|&v| bf16::from_f64(v)).collect();
                                let mut dx = vec![bf16::NAN; rows * n];
                                quant::fake_quantize_backward(Device::Cpu, dtype, &q, addr(&dy16), xa, addr(&scales), addr(&a), out(&mut dx), out(&mut da)).unwrap();
                                dx.iter().map(|v| v.to_f64()).collect()
                            }
                            _ => {
                                let mut dx = vec![f64::NAN; rows * n];
                                quant::fake_quantize_backward(Device::Cpu, dtype, &q, addr(&dyv), xa, addr(&scales), addr(&a), out(&mut dx), out(&mut da)).unwrap();
                                dx
                            }
                        }
                    };
                    // (dy rounded to float32 or bfloat16 there, and dx stored so: the reference's
                    // dy is the float64 one.)
                    let tol = match dtype { DType::F32 => 2e-7, DType::BF16 => 8e-3, _ => 1e-12 };
                    for (e, (&got, &want)) in dx.iter().zip(&dx_ref).enumerate() {
                        assert!((got - want).abs() <= tol * want.abs() + 1e-300, "{at}: dx[{e}] {got} vs {want}");
                    }
                    for r in 0..rows {
                        let tol = match dtype { DType::F32 => 1e-6, DType::BF16 => 4e-3, _ => 1e-7 };
                        assert!((da[r] as f64 - da_ref[r]).abs() <= tol * da_abs[r] + 1e-30, "{at}: da[{r}] {} vs {}", da[r], da_ref[r]);
                    }
                }
            }
        }
    }
}

#[test]
fn linear_matches_dense_dequantized_matmul_on_both_paths() {
    let mut rng = Rng(5);
    // n = 256, g = 128 and n = 544, g = 32: the SIMD 4-bit paths (where available; 544 = two
    // 256-column chunks of the backward and a short one); 8 bits with g = 16: the AVX2 8-bit GEMV;
    // 2 and 3 bits with g a multiple of 8: the AVX2 2-/3-bit GEMV, or with AVX-512 and g a multiple
    // of 16 its AVX-512 form (64 / 32 at 3 bits, 96 / 48 at 2); n = 48, g = 16 at 4 bits, 8 bits
    // with g = 8 and 3 bits with g = 12: the generic paths.
    let cases = [(256usize, 128usize, 4u32), (544, 32, 4), (96, 16, 8), (64, 32, 3), (96, 48, 2), (80, 8, 2), (48, 16, 4), (40, 8, 8), (36, 12, 3)];
    // 3 and 5 tokens: the GEMV's tiles of 2 + 1 and 4 + 1; the transposed GEMV's AVX2 form takes
    // rows one at a time below 4 tokens, two at a time from 4 (19 rows: a short last group).
    for (n_in, g, bits, tokens) in cases.iter().flat_map(|&(n, g, b)| [(n, g, b, 3usize), (n, g, b, 5)]) {
        let n_out = 19usize;
        let w: Vec<f32> = (0..n_out * n_in).map(|_| rng.next() as f32).collect();
        let x: Vec<f32> = (0..tokens * n_in).map(|_| rng.next() as f32).collect();
        let bias: Vec<f32> = (0..n_out).map(|_| rng.next() as f32).collect();
        let a = vec![0.6f32; n_out];
        let q = QuantArgs { bits, rows: n_out, n: n_in, group: g, clip: 1.0 };
        let mut codes = vec![0u8; n_out * row_bytes(n_in, bits)];
        let mut scales = vec![0f32; n_out * (n_in / g)];
        let mut table = vec![0f32; n_out << bits];
        let mut wh = vec![0f32; n_out * n_in];
        let mut wt = vec![f32::NAN; n_out * n_in];
        let mut y = vec![f32::NAN; tokens * n_out];
        let mut dx = vec![f32::NAN; tokens * n_in];
        let l = LinearArgs { q, tokens };
        unsafe {
            quant::quantize(Device::Cpu, DType::F32, &q, addr(&w), addr(&a), out(&mut codes), out(&mut scales)).unwrap();
            quant::dequantize(Device::Cpu, DType::F32, &q, addr(&codes), addr(&scales), addr(&a), out(&mut wh)).unwrap();
            quant::codebook(bits, n_out, addr(&a), out(&mut table)).unwrap();
            quant::linear(Device::Cpu, DType::F32, &l, addr(&x), addr(&codes), addr(&scales), addr(&table), addr(&bias), out(&mut y)).unwrap();
            quant::dequantize_codebooks(Device::Cpu, DType::F32, &q, addr(&codes), addr(&scales), addr(&table), out(&mut wt)).unwrap();
            quant::linear_backward(Device::Cpu, DType::F32, &l, addr(&y), addr(&codes), addr(&scales), addr(&table), out(&mut dx)).unwrap();
        }
        // Through the rows' own codebooks, the dequantizer gives the same float32 weight.
        assert!(wt.iter().zip(&wh).all(|(a, b)| a.to_bits() == b.to_bits()));
        for t in 0..tokens {
            for o in 0..n_out {
                let want: f64 = (0..n_in).map(|k| x[t * n_in + k] as f64 * wh[o * n_in + k] as f64).sum::<f64>() + bias[o] as f64;
                let scale: f64 = (0..n_in).map(|k| (x[t * n_in + k] as f64 * wh[o * n_in + k] as f64).abs()).sum::<f64>();
                assert!((y[t * n_out + o] as f64 - want).abs() <= 1e-6 * scale + 1e-6, "y[{t},{o}]");
            }
            for k in 0..n_in {
                let want: f64 = (0..n_out).map(|o| y[t * n_out + o] as f64 * wh[o * n_in + k] as f64).sum();
                let scale: f64 = (0..n_out).map(|o| (y[t * n_out + o] as f64 * wh[o * n_in + k] as f64).abs()).sum();
                assert!((dx[t * n_in + k] as f64 - want).abs() <= 1e-6 * scale + 1e-6, "dx[{t},{k}]");
            }
        }
    }
}

#[test]
fn search_returns_exponents_in_range_and_a_one_for_zero_rows() {
    let mut rng = Rng(9);
    let (rows, n) = (4usize, 128usize);
    let mut w: Vec<f32> = (0..rows * n).map(|_| rng.next() as f32).collect();
    w[..n].iter_mut().for_each(|v| *v = 0.0);
    let mut a = vec![f32::NAN; rows];
    let s = SearchArgs { q: QuantArgs { bits: 4, rows, n, group: 32, clip: 1.0 }, per_row: true, z_rows: 0, lo: 0.05, grid: 64, refine: 8 };
    unsafe { quant::search_exponent(Device::Cpu, &s, addr(&w), 0, out(&mut a)).unwrap() };
    assert_eq!(a[0], 1.0);
    assert!(a[1..].iter().all(|&v| (0.05..=1.0).contains(&v)));
    // Every stage shape, with and without calibration rows z, per row and per tensor: no fine points
    // (refine 0), the smallest grid, z of one row.
    let z: Vec<f32> = (0..3 * n).map(|_| rng.next() as f32).collect();
    for (grid, refine, z_rows, per_row) in [(64, 0, 3, true), (2, 0, 1, false), (2, 1, 3, true), (64, 0, 0, false)] {
        let s = SearchArgs { grid, refine, z_rows, per_row, ..s };
        let mut a = vec![f32::NAN; rows];
        unsafe { quant::search_exponent(Device::Cpu, &s, addr(&w), addr(&z), out(&mut a)).unwrap() };
        let found = if per_row { &a[..] } else { &a[..1] };
        assert!(found.iter().all(|&v| (0.05..=1.0).contains(&v)), "grid {grid} refine {refine} z {z_rows}: {found:?}");
    }
    // Non-finite calibration rows are an error, not a = 1 for every row.
    let mut z = z;
    z[n + 5] = f32::NAN;
    let s = SearchArgs { z_rows: 3, ..s };
    let e = unsafe { quant::search_exponent(Device::Cpu, &s, addr(&w), addr(&z), out(&mut a)) }.unwrap_err();
    assert!(e.to_string().contains("finite"), "{e}");
}

/// A search asked to stop (Ctrl-C in Python) stops at the next task with an Interrupted error,
/// and a poll that never says yes changes nothing (the same exponents as the unpolled search), per
/// row and per tensor. Polling before every task (0 ms) on one thread, where the caller takes every
/// task: independent of this machine's speed and scheduling. With pool threads, only the calling
/// thread is asked (it may find every task taken: then it is not asked at all).
#[test]
fn search_stops_when_its_poll_says_so() {
    use lmkern_core::parallel::{set_num_threads, Stop};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut rng = Rng(21);
    let (rows, n, t) = (96usize, 256usize, 16usize);
    let w: Vec<f32> = (0..rows * n).map(|_| rng.next() as f32).collect();
    let z: Vec<f32> = (0..t * n).map(|_| rng.next() as f32).collect();
    let caller = std::thread::current().id();
    for (per_row, z_rows) in [(true, 0), (true, t), (false, t)] {
        let s = SearchArgs { q: QuantArgs { bits: 4, rows, n, group: 128, clip: 1.0 }, per_row, z_rows, lo: 0.05, grid: 64, refine: 4 };
        let (mut want, mut got) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
        unsafe { quant::search_exponent(Device::Cpu, &s, addr(&w), addr(&z), out(&mut want)).unwrap() };
        let polls = AtomicUsize::new(0);
        let polls = &polls;
        let answer = |yes: bool| {
            move || {
                assert_eq!(std::thread::current().id(), caller, "polled on a pool thread");
                polls.fetch_add(1, Ordering::Relaxed);
                yes
            }
        };
        let (no, yes) = (answer(false), answer(true));
        let same = |got: &[f32]| assert_eq!(want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), got.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        set_num_threads(2); // pool threads take tasks too
        unsafe { quant::search_exponent_stoppable(Device::Cpu, &s, addr(&w), addr(&z), out(&mut got), &Stop::every(&no, 0)).unwrap() };
        same(&got);
        set_num_threads(1); // every task on the calling thread
        polls.store(0, Ordering::Relaxed);
        unsafe { quant::search_exponent_stoppable(Device::Cpu, &s, addr(&w), addr(&z), out(&mut got), &Stop::every(&no, 0)).unwrap() };
        assert!(polls.swap(0, Ordering::Relaxed) >= 1, "per_row {per_row} z {z_rows}: never polled");
        same(&got);
        let e = unsafe { quant::search_exponent_stoppable(Device::Cpu, &s, addr(&w), addr(&z), out(&mut got), &Stop::every(&yes, 0)) }
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Interrupted, "{e}");
        assert_eq!(polls.load(Ordering::Relaxed), 1, "per_row {per_row} z {z_rows}: asked again after a yes");
    }
    set_num_threads(2);
}

/// Long rows, which a task of the search takes fewer at once (by their size: 5 of 2^18), give the
/// exponents each row gives alone, with and without calibration rows.
#[test]
fn search_of_long_rows_matches_each_row_alone() {
    let mut rng = Rng(41);
    let (rows, n, g) = (7usize, 1usize << 18, 4096usize);
    // Heavy tails in places, so that the rows' exponents differ.
    let w: Vec<f32> = (0..rows * n).map(|i| (rng.next() * rng.next().abs().powi(1 + (i / n % 4) as i32)) as f32).collect();
    let z: Vec<f32> = (0..3 * n).map(|_| rng.next() as f32).collect();
    for (bits, z_rows) in [(4u32, 0usize), (8, 0), (4, 3)] {
        let s = SearchArgs { q: QuantArgs { bits, rows, n, group: g, clip: 1.0 }, per_row: true, z_rows, lo: 0.05, grid: 256, refine: 8 };
        let mut all = vec![f32::NAN; rows];
        unsafe { quant::search_exponent(Device::Cpu, &s, addr(&w), addr(&z), out(&mut all)).unwrap() };
        for r in 0..rows {
            let one = SearchArgs { q: QuantArgs { rows: 1, ..s.q }, ..s };
            let mut a = [f32::NAN];
            unsafe { quant::search_exponent(Device::Cpu, &one, addr(&w[r * n..(r + 1) * n]), addr(&z), out(&mut a)).unwrap() };
            assert_eq!(all[r].to_bits(), a[0].to_bits(), "bits {bits} z rows {z_rows} row {r}");
        }
        assert!(all.iter().all(|v| (0.05..=1.0).contains(v)), "{all:?}");
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let x = vec![1f32; 8];
    let a = vec![0.5f32; 1];
    let mut codes = vec![0u8; 4];
    let mut scales = vec![0f32; 1];
    let run = |q: QuantArgs, a: &[f32], x: &[f32], codes: &mut [u8], scales: &mut [f32]| unsafe {
        quant::quantize(Device::Cpu, DType::F32, &q, addr(x), addr(a), out(codes), out(scales))
    };
    let q = QuantArgs { bits: 4, rows: 1, n: 8, group: 8, clip: 1.0 };
    for bad in [QuantArgs { bits: 5, ..q }, QuantArgs { group: 3, ..q }, QuantArgs { clip: 0.0, ..q }] {
        assert_eq!(run(bad, &a, &x, &mut codes, &mut scales).unwrap_err().kind, ErrorKind::Value);
    }
    for av in [0.0f32, 1.5, f32::NAN, -0.1] {
        assert_eq!(run(q, &[av], &x, &mut codes, &mut scales).unwrap_err().kind, ErrorKind::Value);
    }
    let mut xn = x.clone();
    xn[3] = f32::NAN;
    assert!(run(q, &a, &xn, &mut codes, &mut scales).unwrap_err().message.contains("finite"));
    // Scales negative or not finite (a hand-made or loaded quantized tensor) are refused by the
    // dequantizer: a negative one would flip its group's signs.
    let q2 = QuantArgs { rows: 2, n: 8, group: 4, ..q };
    let codes2 = vec![0x35u8; 8];
    let mut deq = vec![0f32; 16];
    for bad in [-0.5f32, f32::NAN, f32::INFINITY] {
        let mut sc = vec![1f32; 4];
        sc[3] = bad;
        let e = unsafe { quant::dequantize(Device::Cpu, DType::F32, &q2, addr(&codes2), addr(&sc), addr(&[0.5f32; 2]), out(&mut deq)) }
            .unwrap_err();
        assert!(e.kind == ErrorKind::Value && e.message.contains("scales: expected finite scales >= 0"), "{e}");
    }
    let ok = [0f32, 1.0, 2.5, 0.0];
    unsafe { quant::dequantize(Device::Cpu, DType::F32, &q2, addr(&codes2), addr(&ok), addr(&[0.5f32; 2]), out(&mut deq)) }.unwrap();
    // The CPU-only ops refuse CUDA devices before any buffer is touched (the CUDA kernels' own
    // refusals are tested in quant/cuda.rs).
    let cuda = Device::Cuda { ordinal: 0, stream: 0 };
    let l = LinearArgs { q, tokens: 1 };
    let table = vec![0f32; 16];
    let mut dx = vec![0f32; 8];
    let e = unsafe { quant::linear_backward(cuda, DType::F32, &l, addr(&x), addr(&codes), addr(&scales), addr(&table), out(&mut dx)) }
        .unwrap_err();
    assert!(e.kind == ErrorKind::Type && e.message.contains("CPU only"), "{e}");
    let s = SearchArgs { q, per_row: true, z_rows: 0, lo: 0.1, grid: 8, refine: 2 };
    let mut out_a = vec![0f32; 1];
    let e = unsafe { quant::search_exponent(cuda, &s, addr(&x), 0, out(&mut out_a)) }.unwrap_err();
    assert!(e.kind == ErrorKind::Type && e.message.contains("CPU only"), "{e}");
}

/// Every CPU GEMV, transposed GEMV and dequantizer path on awkward shapes: for each code width, a
/// row length and group that each kernel takes (and one that only the generic path takes), row
/// counts around the 16-row tile, every token-tile remainder (8/4/2/1 and 4/1 tiles; the input
/// gradient's row groups of 2 and 4, its column blocks narrowed for many tokens), x one element past an aligned address, an all-zero row, and
/// float32 and bfloat16. Buffers are exactly as long as the kernels may touch, so an overrun reads
/// or writes past a heap block: CI runs this under AddressSanitizer (.ci/asan.sh) and under every
/// LMKERN_CPU_ISA cap. Values against a float64 product of x and the dequantized weight.
#[test]
fn every_cpu_path_on_awkward_shapes() {
    use half::bf16;
    let mut rng = Rng(11);
    let shapes: [(u32, &[(usize, usize)]); 4] = [
        (4, &[(32, 32), (544, 32), (128, 128), (512, 256), (4352, 128), (48, 16), (1, 1)]),
        (8, &[(16, 16), (48, 16), (40, 8), (3, 3)]),
        (3, &[(8, 8), (16, 16), (96, 32), (384, 128), (12, 12), (1, 1)]),
        (2, &[(8, 8), (16, 16), (48, 48), (256, 128), (6, 6)]),
    ];
    let mut cases = 0;
    for (bits, list) in shapes {
        for &(n_in, g) in list {
            for n_out in [1usize, 17, 33] {
                let q = QuantArgs { bits, rows: n_out, n: n_in, group: g, clip: 1.0 };
                let mut w: Vec<f32> = (0..n_out * n_in).map(|_| rng.next() as f32).collect();
                if n_out > 1 {
                    w[n_in..2 * n_in].iter_mut().for_each(|v| *v = 0.0); // row 1: zero scales
                }
                let a: Vec<f32> = (0..n_out).map(|r| 0.35 + 0.6 * (r % 7) as f32 / 7.0).collect();
                let mut codes = vec![0u8; n_out * row_bytes(n_in, bits)];
                let mut scales = vec![0f32; n_out * (n_in / g)];
                let mut table = vec![0f32; n_out << bits];
                let mut wh = vec![f32::NAN; n_out * n_in];
                let mut wt = vec![f32::NAN; n_out * n_in];
                unsafe {
                    quant::quantize(Device::Cpu, DType::F32, &q, addr(&w), addr(&a), out(&mut codes), out(&mut scales)).unwrap();
                    quant::dequantize(Device::Cpu, DType::F32, &q, addr(&codes), addr(&scales), addr(&a), out(&mut wh)).unwrap();
                    quant::codebook(bits, n_out, addr(&a), out(&mut table)).unwrap();
                    quant::dequantize_codebooks(Device::Cpu, DType::F32, &q, addr(&codes), addr(&scales), addr(&table), out(&mut wt))
                        .unwrap();
                }
                assert!(wt.iter().zip(&wh).all(|(a, b)| a.to_bits() == b.to_bits()), "bits {bits} {n_out}x{n_in} g{g}: dequantizers");
                let bias: Vec<f32> = (0..n_out).map(|_| rng.next() as f32).collect();
                // 40 and 300 tokens: the input gradient's column blocks narrow (192 and 32 columns).
                let token_counts: &[usize] =
                    if n_out == 17 { &[1, 2, 3, 4, 5, 6, 8, 9, 15, 17, 40, 300] } else { &[1, 2, 3, 4, 5, 6, 8, 9, 15, 17] };
                for &tokens in token_counts {
                    // x one float past the buffer's start: unaligned for every vector width.
                    let xb: Vec<f32> = (0..tokens * n_in + 1).map(|_| rng.next() as f32).collect();
                    let x = &xb[1..];
                    let l = LinearArgs { q, tokens };
                    let mut y = vec![f32::NAN; tokens * n_out];
                    let mut dx = vec![f32::NAN; tokens * n_in];
                    let dy: Vec<f32> = (0..tokens * n_out).map(|_| rng.next() as f32).collect();
                    let xh: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                    let mut yh = vec![bf16::NAN; tokens * n_out];
                    unsafe {
                        let (c, s, t) = (addr(&codes), addr(&scales), addr(&table));
                        quant::linear(Device::Cpu, DType::F32, &l, addr(x), c, s, t, addr(&bias), out(&mut y)).unwrap();
                        quant::linear(Device::Cpu, DType::BF16, &l, addr(&xh), c, s, t, 0, out(&mut yh)).unwrap();
                        quant::linear_backward(Device::Cpu, DType::F32, &l, addr(&dy), c, s, t, out(&mut dx)).unwrap();
                    }
                    let at = |what: &str, i: usize| format!("bits {bits} {n_out}x{n_in} g{g} tokens {tokens}: {what}[{i}]");
                    for t in 0..tokens {
                        for o in 0..n_out {
                            let terms = (0..n_in).map(|k| (x[t * n_in + k] as f64, wh[o * n_in + k] as f64));
                            let (want, scale) = terms.fold((bias[o] as f64, bias[o].abs() as f64), |(s, a), (x, w)| (s + x * w, a + (x * w).abs()));
                            let i = t * n_out + o;
                            assert!((y[i] as f64 - want).abs() <= 1e-6 * scale + 1e-7, "{}: {} vs {want}", at("y", i), y[i]);
                            let terms = (0..n_in).map(|k| (bf16::from_f32(x[t * n_in + k]).to_f64(), wh[o * n_in + k] as f64));
                            let (want, scale) = terms.fold((0.0, 0.0), |(s, a), (x, w)| (s + x * w, a + (x * w).abs()));
                            let got = yh[i].to_f64();
                            assert!((got - want).abs() <= 8e-3 * scale + 1e-6, "{}: {got} vs {want}", at("y bf16", i));
                        }
                        for k in 0..n_in {
                            let terms = (0..n_out).map(|o| dy[t * n_out + o] as f64 * wh[o * n_in + k] as f64);
                            let (want, scale) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                            let i = t * n_in + k;
                            assert!((dx[i] as f64 - want).abs() <= 1e-6 * scale + 1e-7, "{}: {} vs {want}", at("dx", i), dx[i]);
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 22 * (10 + 12 + 10));
}

/// The row-blocked AVX-512 GEMV of 4-, 3- and 2-bit codes: its row tasks (64 rows: two whole, one
/// of 22 = a 16-row tile and a 6-row one, so four (or two) rows at a time and single ones), its
/// chunks of x (4352 = 34 groups of 128: two chunks at one token, 4 at 3 tokens, 9 at 8, 6 at 5
/// for 13 = 8 + 5, the last one short), and groups of 256 (two 128-weight loads each), with a
/// bias, against float64 sums of x·Ŵ; and the input gradient (at 1-8 tokens by tasks of 256 rows
/// in tiles of up to 4 tokens, 7 = 4 + 3, partials in the GEMV's column order summed back, 600
/// rows: three tasks; its chunks of columns: 3 at 3 and 4 tokens) against dy·Ŵ. On CPUs without
/// AVX-512 the other paths.
#[test]
fn row_blocked_gemv_row_tasks_chunks_and_long_groups() {
    let mut rng = Rng(29);
    let cases = [(4u32, 4352usize, 128usize), (4, 4352, 256), (4, 512, 256), (3, 4352, 128), (3, 512, 256), (2, 4352, 128), (2, 512, 256)];
    // 600 rows: the input gradient's tasks of 256 rows (two whole, one of 88) summed.
    let runs = cases.map(|c| (150usize, c)).into_iter().chain([(600, (4, 256, 128)), (600, (3, 384, 128)), (600, (2, 256, 128))]);
    for (tokens, (n_out, (bits, n_in, g))) in runs.flat_map(|r| [1usize, 3, 4, 7, 8, 13].map(|t| (t, r))) {
        let q = QuantArgs { bits, rows: n_out, n: n_in, group: g, clip: 1.0 };
        let w: Vec<f32> = (0..n_out * n_in).map(|_| rng.next() as f32).collect();
        let a: Vec<f32> = (0..n_out).map(|r| 0.3 + 0.1 * (r % 7) as f32).collect();
        let x: Vec<f32> = (0..tokens * n_in).map(|_| rng.next() as f32).collect();
        let bias: Vec<f32> = (0..n_out).map(|_| rng.next() as f32).collect();
        let mut codes = vec![0u8; n_out * row_bytes(n_in, bits)];
        let mut scales = vec![0f32; n_out * (n_in / g)];
        let mut table = vec![0f32; n_out << bits];
        let mut wh = vec![f32::NAN; n_out * n_in];
        let mut y = vec![f32::NAN; tokens * n_out];
        let dy: Vec<f32> = (0..tokens * n_out).map(|_| rng.next() as f32).collect();
        let mut dx = vec![f32::NAN; tokens * n_in];
        let l = LinearArgs { q, tokens };
        unsafe {
            quant::quantize(Device::Cpu, DType::F32, &q, addr(&w), addr(&a), out(&mut codes), out(&mut scales)).unwrap();
            quant::codebook(bits, n_out, addr(&a), out(&mut table)).unwrap();
            quant::dequantize_codebooks(Device::Cpu, DType::F32, &q, addr(&codes), addr(&scales), addr(&table), out(&mut wh)).unwrap();
            quant::linear(Device::Cpu, DType::F32, &l, addr(&x), addr(&codes), addr(&scales), addr(&table), addr(&bias), out(&mut y)).unwrap();
            quant::linear_backward(Device::Cpu, DType::F32, &l, addr(&dy), addr(&codes), addr(&scales), addr(&table), out(&mut dx)).unwrap();
        }
        let at = |t: usize| format!("{bits}-bit {n_out}x{n_in} g{g} token {t} of {tokens}");
        for t in 0..tokens {
            for c in 0..n_in {
                let terms = (0..n_out).map(|o| dy[t * n_out + o] as f64 * wh[o * n_in + c] as f64);
                let (want, scale) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                let got = dx[t * n_in + c];
                assert!((got as f64 - want).abs() <= 1e-6 * scale, "{} dx[{c}]: {got} vs {want}", at(t));
            }
            for o in 0..n_out {
                let terms = (0..n_in).map(|k| x[t * n_in + k] as f64 * wh[o * n_in + k] as f64);
                let (want, scale) = terms.fold((bias[o] as f64, bias[o].abs() as f64), |(s, a), v| (s + v, a + v.abs()));
                let got = y[t * n_out + o];
                assert!((got as f64 - want).abs() <= 1e-6 * scale, "{} y[{o}]: {got} vs {want}", at(t));
            }
        }
    }
}

/// 8-bit codes of every byte value (−128 too, which the quantizer never writes) through the GEMV,
/// its transposed twin and the dequantizer, with power_codebook's codebooks (antisymmetric: the
/// AVX-512 GEMV looks up half of each; free entries 0 and 128 changed on row 2) and with
/// codebooks that are not (one entry of each half changed on rows 3 and 4, random on row 5: the
/// full lookup), against float64 sums of x·m·table[byte]. 150 rows: the input gradient's row
/// tasks of 64 at 1-4 tokens (two full, one partial), its column blocks at 5. Every
/// LMKERN_CPU_ISA cap runs it in CI.
#[test]
fn eight_bit_codes_of_every_byte_with_any_codebook() {
    let mut rng = Rng(23);
    let (n_out, n_in, g) = (150usize, 512usize, 128usize);
    let q = QuantArgs { bits: 8, rows: n_out, n: n_in, group: g, clip: 1.0 };
    let a: Vec<f32> = (0..n_out).map(|r| 0.3 + 0.12 * (r % 6) as f32).collect();
    let mut table = vec![0f32; n_out << 8];
    unsafe { quant::codebook(8, n_out, addr(&a), out(&mut table)).unwrap() };
    (table[2 * 256], table[2 * 256 + 128]) = (0.25, 3.0);
    table[3 * 256 + 200] *= 1.5;
    table[4 * 256 + 7] *= 0.5;
    table[5 * 256..6 * 256].iter_mut().for_each(|v| *v = rng.next() as f32);
    // Row o, column k: byte (37k + 11o) mod 256, every value twice a row (37 is odd).
    let codes: Vec<u8> = (0..n_out * n_in).map(|i| ((i % n_in) * 37 + (i / n_in) * 11) as u8).collect();
    let scales: Vec<f32> = (0..n_out * n_in / g).map(|_| 0.5 + rng.next().abs() as f32).collect();
    let w = |o: usize, k: usize| scales[o * (n_in / g) + k / g] * table[o * 256 + codes[o * n_in + k] as usize];
    let mut wt = vec![f32::NAN; n_out * n_in];
    unsafe { quant::dequantize_codebooks(Device::Cpu, DType::F32, &q, addr(&codes), addr(&scales), addr(&table), out(&mut wt)).unwrap() };
    for (i, v) in wt.iter().enumerate() {
        assert_eq!(v.to_bits(), w(i / n_in, i % n_in).to_bits(), "dequantized [{}, {}]", i / n_in, i % n_in);
    }
    for tokens in [1usize, 2, 4, 5] {
        let x: Vec<f32> = (0..tokens * n_in).map(|_| rng.next() as f32).collect();
        let dy: Vec<f32> = (0..tokens * n_out).map(|_| rng.next() as f32).collect();
        let (mut y, mut dx) = (vec![f32::NAN; tokens * n_out], vec![f32::NAN; tokens * n_in]);
        let l = LinearArgs { q, tokens };
        unsafe {
            let (c, s, t) = (addr(&codes), addr(&scales), addr(&table));
            quant::linear(Device::Cpu, DType::F32, &l, addr(&x), c, s, t, 0, out(&mut y)).unwrap();
            quant::linear_backward(Device::Cpu, DType::F32, &l, addr(&dy), c, s, t, out(&mut dx)).unwrap();
        }
        for t in 0..tokens {
            for o in 0..n_out {
                let terms = (0..n_in).map(|k| x[t * n_in + k] as f64 * w(o, k) as f64);
                let (want, scale) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                let got = y[t * n_out + o] as f64;
                assert!((got - want).abs() <= 1e-6 * scale, "tokens {tokens} y[{t}, {o}]: {got} vs {want}");
            }
            for k in 0..n_in {
                let terms = (0..n_out).map(|o| dy[t * n_out + o] as f64 * w(o, k) as f64);
                let (want, scale) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                let got = dx[t * n_in + k] as f64;
                assert!((got - want).abs() <= 1e-6 * scale, "tokens {tokens} dx[{t}, {k}]: {got} vs {want}");
            }
        }
    }
    // No rows: no row tasks, dx zero.
    let l = LinearArgs { q: QuantArgs { rows: 0, ..q }, tokens: 2 };
    let (dy, mut dx) = (Vec::<f32>::new(), vec![f32::NAN; 2 * n_in]);
    unsafe { quant::linear_backward(Device::Cpu, DType::F32, &l, addr(&dy), 0, 0, 0, out(&mut dx)).unwrap() };
    assert!(dx.iter().all(|&v| v == 0.0), "no rows: dx {:?}", &dx[..4]);
}
