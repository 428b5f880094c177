//! Differential fuzzing of lmkern's length-only deflate engine against the bundled stock zlib.
//!
//! cargo run --release -p lmkern-core --example ncd_fuzz -- --inputs N --seed S [--max BYTES]
//!
//! Inputs come in groups: one source x and 1..=8 targets y (unrelated, or cut from x), drawn by the
//! generators in tests/ncd_common (random bytes, word soup, runs, periodic patterns, small alphabets,
//! copies, mixtures, zeros at the end). 995 groups in 1000 are small (0..3000 bytes each); 5 are large,
//! weighted to the 16383-symbol, 32 K, 64 K and slide boundaries, up to --max. Each (x, y) is one input, at one level (cycling
//! 1..=9, so every level gets the same count), and is checked in three modes against one zlib run
//! of x ⊕ y: `single` (the engine on x ⊕ y as one buffer), `split` (x then y as two input pieces)
//! `primed` (x primed once per group, then y; skipped when x ⊕ y is too long to prime) and `deep`
//! (x primed speculatively for targets of ≥ 262 bytes, see Deflater::prime_for; only such y), and at
//! levels 4–9 `walked`: both primed modes again with y's TargetWalks (Deflater::primed_len_walked). The
//! first source of each group is also checked alone. Exit status 1 on any mismatch.
use lmkern_core::ncd::{self, Deflater, TargetWalks, GZIP_OVERHEAD, SMALL_MAX};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[path = "../tests/ncd_common/mod.rs"]
mod ncd_common;
use ncd_common::{input, Rng};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lengths for the long run. Most groups are small (cheap, and where NCD lives: 0..3000 bytes);
/// 5 in 1000 are large, weighted to the block / window / slide boundaries, up to `max`.
fn fuzz_len(rng: &mut Rng, large: bool, max: usize) -> usize {
    const MARKS: &[usize] = &[258, 262, 16383, 16384, 32506, 32768, 49152, 65273, 65274, 65536, 98304, 131072];
    let n = if !large {
        match rng.below(100) {
            0..=69 => rng.below(600),
            _ => rng.below(3000),
        }
    } else {
        match rng.below(100) {
            0..=29 => rng.below(20_000),
            30..=64 => {
                let m = MARKS[rng.below(MARKS.len())];
                (m + rng.below(800)).saturating_sub(400)
            }
            65..=89 => rng.below(70_000),
            _ => rng.below(max + 1),
        }
    };
    n.min(max)
}

fn zlib_raw(data: &[u8], level: i32) -> u64 {
    (ncd::zlib_gzip_size(data, level).expect("zlib") - GZIP_OVERHEAD) as u64
}

struct Counts {
    inputs: [AtomicU64; 10],
    single: [AtomicU64; 10],
    split: [AtomicU64; 10],
    primed: [AtomicU64; 10],
    deep: [AtomicU64; 10],
    walked: [AtomicU64; 10],
    bytes: AtomicU64,
    mismatches: AtomicU64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n_inputs: u64 = arg(&args, "--inputs", 100_000);
    let seed: u64 = arg(&args, "--seed", 1);
    let max: usize = arg(&args, "--max", 300_000);
    let z = || std::array::from_fn::<AtomicU64, 10, _>(|_| AtomicU64::new(0));
    let c = Counts { inputs: z(), single: z(), split: z(), primed: z(), deep: z(), walked: z(), bytes: AtomicU64::new(0), mismatches: AtomicU64::new(0) };
    let t0 = Instant::now();
    // Groups are independent and seeded by (seed, group index): the run is reproducible whatever the
    // thread count. A group holds up to 8 inputs; groups are generated until n_inputs are done.
    let groups = n_inputs.div_ceil(4);
    let done = AtomicU64::new(0);
    (0..groups).into_par_iter().for_each_init(
        || {
            // On the heap: rayon nests init calls on its 2 MiB worker stacks.
            let set = || (1..=9).map(|l| Deflater::new(l).unwrap()).collect::<Vec<_>>();
            (set(), set(), set())
        },
        |(engines, wholes, deeps), g| {
            if done.load(Ordering::Relaxed) >= n_inputs {
                return;
            }
            let mut rng = Rng::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ g);
            let level = 1 + (g % 9) as i32;
            let li = level as usize;
            let large = rng.below(1000) < 5;
            let xlen = fuzz_len(&mut rng, large, max);
            let x = input(&mut rng, xlen);
            let whole = &mut wholes[li - 1];
            // The source alone.
            let want = zlib_raw(&x, level);
            if whole.deflate_len(&x, &[]) != want {
                c.mismatches.fetch_add(1, Ordering::Relaxed);
                eprintln!("MISMATCH single seed {seed} group {g} level {level} x only len {}", x.len());
            }
            let e = &mut engines[li - 1];
            let primed = e.prime(&x);
            let d = &mut deeps[li - 1];
            let deep = d.prime_for(&x, 262);
            let targets = 1 + rng.below(8);
            for t in 0..targets {
                let y = if t % 2 == 1 && !x.is_empty() {
                    let from = rng.below(x.len());
                    let n = fuzz_len(&mut rng, large, 4000).min(x.len() - from);
                    x[from..from + n].to_vec()
                } else {
                    let n = fuzz_len(&mut rng, large, max);
                    input(&mut rng, n)
                };
                let xy = [&x[..], &y[..]].concat();
                let want = zlib_raw(&xy, level);
                let mut bad = Vec::new();
                if whole.deflate_len(&xy, &[]) != want {
                    bad.push("single");
                }
                c.single[li].fetch_add(1, Ordering::Relaxed);
                if whole.deflate_len(&x, &y) != want {
                    bad.push("split");
                }
                c.split[li].fetch_add(1, Ordering::Relaxed);
                // Levels 4–9: the primed modes again with the target's precomputed walks.
                let walks = TargetWalks::new(&y, level);
                if primed && xy.len() <= SMALL_MAX {
                    if e.primed_len(&y) != Some(want) {
                        bad.push("primed");
                    }
                    c.primed[li].fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = &walks {
                        if e.primed_len_walked(w) != Some(want) {
                            bad.push("primed+walks");
                        }
                        c.walked[li].fetch_add(1, Ordering::Relaxed);
                    }
                }
                if deep && xy.len() <= SMALL_MAX && y.len() >= 262 {
                    if d.primed_len(&y) != Some(want) {
                        bad.push("deep");
                    }
                    c.deep[li].fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = &walks {
                        if d.primed_len_walked(w) != Some(want) {
                            bad.push("deep+walks");
                        }
                        c.walked[li].fetch_add(1, Ordering::Relaxed);
                    }
                }
                if !bad.is_empty() {
                    c.mismatches.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "MISMATCH {bad:?} seed {seed} group {g} target {t} level {level} x {} y {}",
                        x.len(),
                        y.len()
                    );
                }
                c.inputs[li].fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(xy.len() as u64, Ordering::Relaxed);
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d.is_multiple_of(500_000) {
                    eprintln!("  {d} inputs, {:.0} s", t0.elapsed().as_secs_f64());
                }
            }
        },
    );
    let sum = |a: &[AtomicU64; 10]| a.iter().map(|v| v.load(Ordering::Relaxed)).sum::<u64>();
    println!("ncd_fuzz: seed {seed}, max {max} bytes, zlib {} (bundled, libz-sys), {:.0} s", ncd::zlib_version(), t0.elapsed().as_secs_f64());
    println!("level  inputs(x+y)   single    split   primed     deep   walked");
    for l in 1..=9 {
        println!(
            "{l:>5}  {:>11}  {:>7}  {:>7}  {:>7}  {:>7}  {:>7}",
            c.inputs[l].load(Ordering::Relaxed),
            c.single[l].load(Ordering::Relaxed),
            c.split[l].load(Ordering::Relaxed),
            c.primed[l].load(Ordering::Relaxed),
            c.deep[l].load(Ordering::Relaxed),
            c.walked[l].load(Ordering::Relaxed)
        );
    }
    println!(
        "total  {:>11}  {:>7}  {:>7}  {:>7}  {:>7}  {:>7}   ({} groups' sources also checked alone; {:.1} MB of x+y)",
        sum(&c.inputs),
        sum(&c.single),
        sum(&c.split),
        sum(&c.primed),
        sum(&c.deep),
        sum(&c.walked),
        groups,
        c.bytes.load(Ordering::Relaxed) as f64 / 1e6
    );
    let m = c.mismatches.load(Ordering::Relaxed);
    println!("mismatches: {m}");
    if m != 0 {
        std::process::exit(1);
    }
}
