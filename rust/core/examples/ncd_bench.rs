//! Per-pair timing of the gzip-NCD scorer against stock zlib compressing x ⊕ y, on ~1 KB pieces of
//! real text (the Python standard library's top-level modules, code and docstrings, in sorted file
//! order, cut into 1024-byte pieces).
//!
//! cargo run --release -p lmkern-core --example ncd_bench -- [--dir D] [--sources 2000] [--targets 100]
//!     [--levels 1,9] [--piece 1024] [--zlib-pairs 20000]
use lmkern_core::ncd::{self, Deflater, NcdScorer};
use std::time::Instant;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn corpus(dir: &str, piece: usize, count: usize) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("--dir: readable directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "py" || x == "txt" || x == "md"))
        .collect();
    files.sort();
    let mut text = Vec::new();
    for f in files {
        if let Ok(b) = std::fs::read(&f) {
            text.extend_from_slice(&b);
        }
        if text.len() >= piece * count {
            break;
        }
    }
    assert!(text.len() >= piece * count, "not enough text in {dir}: {} bytes", text.len());
    text.chunks(piece).take(count).map(|c| c.to_vec()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let default_dir = "/root/.pyenv/versions/3.11.7/lib/python3.11".to_string();
    let dir: String = arg(&args, "--dir", default_dir);
    let n_src: usize = arg(&args, "--sources", 2000);
    let n_tgt: usize = arg(&args, "--targets", 100);
    let piece: usize = arg(&args, "--piece", 1024);
    let zlib_pairs: usize = arg(&args, "--zlib-pairs", 20000);
    let reps: usize = arg(&args, "--reps", 3);
    let levels: String = arg(&args, "--levels", "1,9".to_string());
    // --only zlib|whole|primed: time one path alone (for perf stat), print nothing else.
    let only: String = arg(&args, "--only", String::new());
    let texts = corpus(&dir, piece, n_src + n_tgt);
    let (sources, targets) = texts.split_at(n_src);
    let threads = lmkern_core::parallel::num_threads();
    println!(
        "corpus: {} sources x {} targets, {}-byte pieces from {dir}; zlib {}; {threads} threads; median of {reps}",
        n_src,
        n_tgt,
        piece,
        ncd::zlib_version()
    );
    for level in levels.split(',').map(|l| l.trim().parse::<i32>().expect("--levels: integers")) {
        if only == "scorer" {
            // The scorer alone, on --threads threads (default: all).
            lmkern_core::parallel::set_num_threads(arg(&args, "--threads", threads));
            let scorer = NcdScorer::new(targets.to_vec(), level).unwrap();
            let mut out = vec![0.0f64; n_src];
            let t = Instant::now();
            scorer.alignment_into(sources, &mut out).unwrap();
            let dt = t.elapsed().as_secs_f64();
            println!("scorer level {level} on {} threads: {:.0} pairs/s", lmkern_core::parallel::num_threads(), (n_src * n_tgt) as f64 / dt);
            continue;
        }
        if !only.is_empty() {
            let t = Instant::now();
            let mut acc = 0u64;
            let mut e = Deflater::new(level).unwrap();
            let mut xy = Vec::new();
            for x in sources {
                if only == "primed" {
                    e.prime(x);
                }
                if only == "deep" {
                    e.prime_for(x, 262);
                }
                for y in targets {
                    acc += match only.as_str() {
                        "zlib" => {
                            xy.clear();
                            xy.extend_from_slice(x);
                            xy.extend_from_slice(y);
                            ncd::zlib_gzip_size(&xy, level).unwrap() as u64
                        }
                        "whole" => e.deflate_len(x, y),
                        "deep" => e.primed_len(y).unwrap_or_else(|| e.deflate_len(x, y)),
                        _ => e.primed_len(y).unwrap(),
                    };
                }
            }
            if only == "deep" || only == "primed" {
                let mut gap = 0usize;
                for x in sources {
                    e.prime_for(x, if only == "deep" { 262 } else { 0 });
                    let (xl, at) = e.primed_at().unwrap();
                    gap += xl - at;
                }
                println!("mean bytes of x left to each target: {:.1}", gap as f64 / n_src as f64);
            }
            println!("{only} level {level}: {:.2} us/pair (checksum {acc})", t.elapsed().as_secs_f64() * 1e6 / (n_src * n_tgt) as f64);
            continue;
        }
        // 1. stock zlib compressing x ⊕ y per pair (the naive method's floor), one core.
        let pairs: Vec<(usize, usize)> = (0..zlib_pairs).map(|k| (k % n_src, (k * 7919) % n_tgt)).collect();
        let t_zlib = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    let mut acc = 0i64;
                    let mut xy = Vec::with_capacity(2 * piece);
                    for &(i, j) in &pairs {
                        xy.clear();
                        xy.extend_from_slice(&sources[i]);
                        xy.extend_from_slice(&targets[j]);
                        acc += ncd::zlib_gzip_size(&xy, level).unwrap();
                    }
                    std::hint::black_box(acc);
                    t.elapsed().as_secs_f64() / pairs.len() as f64
                })
                .collect(),
        );
        // 2. the engine on x ⊕ y whole, one core.
        let mut e = Deflater::new(level.max(1)).unwrap();
        let t_whole = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    let mut acc = 0u64;
                    for &(i, j) in &pairs {
                        acc += e.deflate_len(&sources[i], &targets[j]);
                    }
                    std::hint::black_box(acc);
                    t.elapsed().as_secs_f64() / pairs.len() as f64
                })
                .collect(),
        );
        // 3. primed: one prime per source, then every target, one core.
        let src_primed = (zlib_pairs / n_tgt).clamp(1, n_src);
        let t_primed = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    let mut acc = 0u64;
                    for x in &sources[..src_primed] {
                        e.prime(x);
                        for y in targets {
                            acc += e.primed_len(y).unwrap();
                        }
                    }
                    std::hint::black_box(acc);
                    t.elapsed().as_secs_f64() / (src_primed * n_tgt) as f64
                })
                .collect(),
        );
        // 4. the scorer (alignment of every source; C(x) per source included), 1 thread and all.
        let scorer = NcdScorer::new(targets.to_vec(), level).unwrap();
        let mut out = vec![0.0f64; n_src];
        let mut scorer_rate = |th: usize| {
            lmkern_core::parallel::set_num_threads(th);
            median(
                (0..reps)
                    .map(|_| {
                        let t = Instant::now();
                        scorer.alignment_into(sources, &mut out).unwrap();
                        (n_src * n_tgt) as f64 / t.elapsed().as_secs_f64()
                    })
                    .collect(),
            )
        };
        let one = scorer_rate(1);
        let all = scorer_rate(threads);
        lmkern_core::parallel::set_num_threads(threads);
        // Check: the scorer's alignments equal the formula on zlib sizes for a few sources.
        for i in (0..n_src).step_by((n_src / 5).max(1)) {
            let cx = ncd::zlib_gzip_size(&sources[i], level).unwrap();
            let mut acc = 0.0f64;
            for y in targets {
                let cy = ncd::zlib_gzip_size(y, level).unwrap();
                let cxy = ncd::zlib_gzip_size(&[&sources[i][..], &y[..]].concat(), level).unwrap();
                acc += ncd::ncd_value(cx, cy, cxy);
            }
            assert_eq!(out[i].to_bits(), (1.0 - acc / n_tgt as f64).to_bits(), "alignment {i} differs from zlib");
        }
        println!(
            "level {level}: zlib(x+y) {:.2} us/pair | engine whole {:.2} us/pair ({:.1}x zlib) | primed {:.2} us/pair ({:.1}x zlib) | scorer {:.0} pairs/s on 1 thread, {:.0} pairs/s on {threads} ({:.0}/core) = {:.1}x zlib's raw per-core rate x {threads}",
            t_zlib * 1e6,
            t_whole * 1e6,
            t_zlib / t_whole,
            t_primed * 1e6,
            t_zlib / t_primed,
            one,
            all,
            all / threads as f64,
            all / (threads as f64 / t_zlib),
        );
    }
}
