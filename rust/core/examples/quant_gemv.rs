//! Times the CPU LUT GEMV (4096 → 4096, group 128; 4-bit unless BITS says) and the quantizer on this machine:
//! `cargo run --release -p lmkern-core --example quant_gemv [threads] [gemv|bwd|deq|search]` (`gemv`: the GEMV
//! only; `bwd`: the GEMV and the input gradient's transposed GEMV; `deq`: the GEMV and Ŵ through the
//! rows' codebooks (the many-token path's dequantizer) and through the exponents' tables, float32; `search`: search_exponent for every
//! row, with the Python layer's grid (and x as calibration activations where TOKENS > 1); `REPS=n` repeats, default 30; `TOKENS=t` activation rows, default 1; `BITS=b`, default 4; `ROWS=n` output rows, default 4096; `FLUSH_MB=n`, below). Min and median of the repeats, wall clock and, since the
//! machine is shared, CPU time (of the calling thread with 1 thread, of the process otherwise).
use lmkern_core::quant::{self, LinearArgs, QuantArgs, SearchArgs};
use lmkern_core::{DType, Device};
use std::time::Instant;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU seconds of this thread (clock 3) or this process (clock 2).
fn cpu_time(clock: i32) -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: ts is a valid timespec (x86-64 Linux layout) for the call to fill.
    unsafe { clock_gettime(clock, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let gemv_only = std::env::args().nth(2).is_some_and(|a| a == "gemv" || a == "bwd" || a == "deq");
    let bwd = std::env::args().nth(2).is_some_and(|a| a == "bwd");
    let deq = std::env::args().nth(2).is_some_and(|a| a == "deq");
    let reps: usize = std::env::var("REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(30).max(1);
    let tokens: usize = std::env::var("TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let bits: u32 = std::env::var("BITS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    lmkern_core::parallel::set_num_threads(threads);
    let clock = if threads == 1 { 3 } else { 2 };
    let n: usize = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(4096).max(1);
    let (k, g) = (4096usize, 128usize);
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
    let x: Vec<f32> = (0..tokens * k).map(|_| rnd()).collect();
    let a = vec![0.7f32; n];
    let q = QuantArgs { bits, rows: n, n: k, group: g, clip: 1.0 };
    let mut codes = vec![0u8; n * quant::row_bytes(k, bits)];
    let mut scales = vec![0f32; n * k / g];
    let mut table = vec![0f32; n << bits];
    let mut y = vec![0f32; tokens * n];
    // 64 MiB read between calls in the "flushed" runs, as the dense GEMV it is compared with reads
    // 64 MB: the codes then come from DRAM where the last-level cache is smaller than that
    // (`FLUSH_MB=n` for a larger one: 1024 on a 480 MB L3).
    let flush_mb: usize = std::env::var("FLUSH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(64).max(1);
    let junk = vec![1u8; flush_mb << 20];
    let mut sink = 0u8;
    let mut time = |name: &str, flush: bool, f: &mut dyn FnMut()| {
        let (mut wall, mut cpu) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            if flush {
                sink ^= junk.iter().step_by(64).fold(0u8, |a, b| a ^ b);
            }
            let (t, c) = (Instant::now(), cpu_time(clock));
            f();
            cpu.push((cpu_time(clock) - c) * 1e3);
            wall.push(t.elapsed().as_secs_f64() * 1e3);
        }
        wall.sort_by(|a, b| a.total_cmp(b));
        cpu.sort_by(|a, b| a.total_cmp(b));
        let m = reps / 2;
        println!(
            "{name}: min {:.3} ms, median {:.3} ms; cpu min {:.3} ms, median {:.3} ms ({threads} threads)",
            wall[0], wall[m], cpu[0], cpu[m]
        );
    };
    unsafe {
        if std::env::args().nth(2).is_some_and(|a| a == "search") {
            // lmkern.ops.quant's SEARCH_LO, SEARCH_GRID, SEARCH_REFINE.
            // TOKENS > 1: the layer-output error on x as calibration activations.
            let z_rows = if tokens > 1 { tokens } else { 0 };
            let sa = SearchArgs { q, per_row: true, z_rows, lo: 0.05, grid: 1024, refine: 16 };
            let mut out = vec![0f32; n];
            time(&format!("search_exponent [{n}, 4096] {bits}-bit g128, every row, {z_rows} calibration rows"), false, &mut || {
                quant::search_exponent(Device::Cpu, &sa, w.as_ptr() as u64, x.as_ptr() as u64, out.as_mut_ptr() as u64).unwrap()
            });
            println!("exponents: first {:?}, mean {:.5}", &out[..4], out.iter().map(|&v| v as f64).sum::<f64>() / n as f64);
            return;
        }
        let mut quantize = || {
            quant::quantize(Device::Cpu, DType::F32, &q, w.as_ptr() as u64, a.as_ptr() as u64, codes.as_mut_ptr() as u64, scales.as_mut_ptr() as u64)
                .unwrap()
        };
        if gemv_only {
            quantize();
        } else {
            time(&format!("quantize [{n}, 4096] {bits}-bit g128"), false, &mut || quantize());
        }
        quant::codebook(bits, n, a.as_ptr() as u64, table.as_mut_ptr() as u64).unwrap();
        let l = LinearArgs { q, tokens };
        let mut gemv = || {
            quant::linear(Device::Cpu, DType::F32, &l, x.as_ptr() as u64, codes.as_ptr() as u64, scales.as_ptr() as u64, table.as_ptr() as u64, 0, y.as_mut_ptr() as u64)
                .unwrap()
        };
        time(&format!("linear GEMV 4096 -> {n} {bits}-bit g128, {tokens} tokens"), false, &mut gemv);
        time("linear GEMV, caches flushed", true, &mut gemv);
        if bwd {
            // dy @ Ŵ (the input gradient's transposed GEMV), dy = y.
            let mut dx = vec![0f32; tokens * k];
            time(&format!("linear_backward 4096 -> {n} {bits}-bit g128, {tokens} tokens"), false, &mut || {
                quant::linear_backward(Device::Cpu, DType::F32, &l, y.as_ptr() as u64, codes.as_ptr() as u64, scales.as_ptr() as u64, table.as_ptr() as u64, dx.as_mut_ptr() as u64)
                    .unwrap()
            });
        }
        if deq {
            let mut wt = vec![0f32; n * k];
            time(&format!("dequantize_codebooks [{n}, 4096] {bits}-bit g128, float32"), false, &mut || {
                quant::dequantize_codebooks(Device::Cpu, DType::F32, &q, codes.as_ptr() as u64, scales.as_ptr() as u64, table.as_ptr() as u64, wt.as_mut_ptr() as u64)
                    .unwrap()
            });
            time(&format!("dequantize [{n}, 4096] {bits}-bit g128 (the exponents' tables), float32"), false, &mut || {
                quant::dequantize(Device::Cpu, DType::F32, &q, codes.as_ptr() as u64, scales.as_ptr() as u64, a.as_ptr() as u64, wt.as_mut_ptr() as u64)
                    .unwrap()
            });
        }
        if !gemv_only {
            let mut yd = vec![0f32; n];
            time("dense f32 GEMV (naive Rust dot, reference only)", false, &mut || {
                for (o, yo) in yd.iter_mut().enumerate() {
                    *yo = w[o * k..(o + 1) * k].iter().zip(&x).map(|(a, b)| a * b).sum();
                }
            });
        }
    }
    std::hint::black_box(sink);
}
