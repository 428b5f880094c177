//! Times the CPU 4-bit LUT GEMV (4096 → 4096, group 128) and the quantizer on this machine:
//! `cargo run --release -p lmkern-core --example quant_gemv [threads]`. Min and median of repeats.
use lmkern_core::quant::{self, LinearArgs, QuantArgs};
use lmkern_core::{DType, Device};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    lmkern_core::parallel::set_num_threads(threads);
    let (n, k, g) = (4096usize, 4096usize, 128usize);
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
    let x: Vec<f32> = (0..k).map(|_| rnd()).collect();
    let a = vec![0.7f32; n];
    let q = QuantArgs { bits: 4, rows: n, n: k, group: g, clip: 1.0 };
    let mut codes = vec![0u8; n * k / 2];
    let mut scales = vec![0f32; n * k / g];
    let mut table = vec![0f32; n * 16];
    let mut y = vec![0f32; n];
    let time = |name: &str, f: &mut dyn FnMut()| {
        let mut ts = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            f();
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        println!("{name}: min {:.3} ms, median {:.3} ms ({threads} threads)", ts[0], ts[ts.len() / 2]);
    };
    unsafe {
        time("quantize [4096, 4096] 4-bit g128", &mut || {
            quant::quantize(Device::Cpu, DType::F32, &q, w.as_ptr() as u64, a.as_ptr() as u64, codes.as_mut_ptr() as u64, scales.as_mut_ptr() as u64).unwrap()
        });
        quant::codebook(4, n, a.as_ptr() as u64, table.as_mut_ptr() as u64).unwrap();
        let l = LinearArgs { q, tokens: 1 };
        time("linear GEMV 4096 -> 4096 4-bit g128", &mut || {
            quant::linear(Device::Cpu, DType::F32, &l, x.as_ptr() as u64, codes.as_ptr() as u64, scales.as_ptr() as u64, table.as_ptr() as u64, 0, y.as_mut_ptr() as u64).unwrap()
        });
        // The same with the caches flushed before each call (64 MiB written in between), as when the
        // GEMV is interleaved with other work: the codes then come from DRAM.
        let mut junk = vec![0u8; 64 << 20];
        let mut ts = Vec::new();
        for it in 0..30 {
            junk.iter_mut().step_by(64).for_each(|b| *b = b.wrapping_add(it as u8));
            let t = Instant::now();
            quant::linear(Device::Cpu, DType::F32, &l, x.as_ptr() as u64, codes.as_ptr() as u64, scales.as_ptr() as u64, table.as_ptr() as u64, 0, y.as_mut_ptr() as u64).unwrap();
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        println!("linear GEMV, caches flushed: min {:.3} ms, median {:.3} ms ({threads} threads)", ts[0], ts[15]);
        let mut yd = vec![0f32; n];
        time("dense f32 GEMV (naive Rust dot, reference only)", &mut || {
            for (o, yo) in yd.iter_mut().enumerate() {
                *yo = w[o * k..(o + 1) * k].iter().zip(&x).map(|(a, b)| a * b).sum();
            }
        });
    }
}
