//! The length-only deflate engine against the bundled stock zlib, on generated inputs (single
//! inputs and primed pairs, all levels). The long run is examples/ncd_fuzz.rs.
use lmkern_core::ncd::{self, Deflater, TargetWalks, GZIP_OVERHEAD};

mod ncd_common;
use ncd_common::{any_input, length, pair, short_input, Rng};

fn zlib_raw(data: &[u8], level: i32) -> u64 {
    (ncd::zlib_gzip_size(data, level).unwrap() - GZIP_OVERHEAD) as u64
}

#[test]
fn empty_and_tiny_inputs() {
    for level in 1..=9 {
        let mut e = Deflater::new(level).unwrap();
        for data in [&b""[..], b"a", b"ab", b"abc", b"aaaa", b"abcabcabc", &[0u8; 300][..]] {
            assert_eq!(e.deflate_len(data, &[]), zlib_raw(data, level), "level {level} data {data:?}");
        }
    }
}

#[test]
fn single_inputs_match_zlib() {
    let mut rng = Rng::new(1);
    for case in 0..300 {
        let data = any_input(&mut rng, 140_000);
        for level in 1..=9 {
            let mut e = Deflater::new(level).unwrap();
            assert_eq!(e.deflate_len(&data, &[]), zlib_raw(&data, level), "case {case} level {level} len {}", data.len());
        }
    }
}

#[test]
fn split_inputs_match_zlib() {
    // a ⊕ b fed as two pieces equals the concatenation.
    let mut rng = Rng::new(2);
    for case in 0..100 {
        let (x, y) = pair(&mut rng, 70_000);
        let level = 1 + rng.below(9) as i32;
        let mut e = Deflater::new(level).unwrap();
        assert_eq!(e.deflate_len(&x, &y), zlib_raw(&[&x[..], &y[..]].concat(), level), "case {case} level {level}");
    }
}

#[test]
fn primed_pairs_match_zlib() {
    let mut rng = Rng::new(3);
    for case in 0..120 {
        let level = 1 + case % 9;
        let x = any_input(&mut rng, 66_000);
        let mut e = Deflater::new(level).unwrap();
        if !e.prime(&x) {
            assert!(x.len() > ncd::SMALL_MAX);
            continue;
        }
        // Several targets per primed source: the undo of one target must not leak into the next.
        for t in 0..6 {
            let y = if t % 2 == 0 && !x.is_empty() {
                let from = rng.below(x.len());
                x[from..(from + length(&mut rng, 3000)).min(x.len())].to_vec()
            } else {
                any_input(&mut rng, 40_000)
            };
            let want = zlib_raw(&[&x[..], &y[..]].concat(), level);
            match e.primed_len(&y) {
                Some(got) => assert_eq!(got, want, "case {case} target {t} level {level} x {} y {}", x.len(), y.len()),
                None => assert!(x.len() + y.len() > ncd::SMALL_MAX),
            }
        }
    }
}

#[test]
fn scorer_matches_formula_on_zlib_sizes() {
    let mut rng = Rng::new(4);
    let targets: Vec<Vec<u8>> = (0..7).map(|_| short_input(&mut rng, 3000)).collect();
    let sources: Vec<Vec<u8>> = (0..5).map(|_| short_input(&mut rng, 3000)).collect();
    for level in [0, 1, 6, 9] {
        let scorer = ncd::NcdScorer::new(targets.clone(), level).unwrap();
        let mut out = vec![f64::NAN; sources.len() * targets.len()];
        scorer.ncd_into(&sources, &mut out).unwrap();
        let mut al = vec![f64::NAN; sources.len()];
        scorer.alignment_into(&sources, &mut al).unwrap();
        for (i, x) in sources.iter().enumerate() {
            let cx = ncd::zlib_gzip_size(x, level).unwrap();
            let mut acc = 0.0f64;
            for (j, y) in targets.iter().enumerate() {
                let cy = ncd::zlib_gzip_size(y, level).unwrap();
                let cxy = ncd::zlib_gzip_size(&[&x[..], &y[..]].concat(), level).unwrap();
                let want = (cxy - cx.min(cy)) as f64 / cx.max(cy) as f64;
                assert_eq!(out[i * targets.len() + j].to_bits(), want.to_bits(), "level {level} pair ({i},{j})");
                acc += want;
            }
            assert_eq!(al[i].to_bits(), (1.0 - acc / targets.len() as f64).to_bits());
        }
    }
}

#[test]
fn scorer_errors() {
    assert!(ncd::NcdScorer::new(vec![b"a".to_vec()], 10).is_err());
    assert!(ncd::NcdScorer::new(vec![b"a".to_vec()], -1).is_err());
    let empty = ncd::NcdScorer::new(vec![], 9).unwrap();
    let mut out = [0.0f64; 1];
    let err = empty.alignment_into(&[b"x".to_vec()], &mut out).unwrap_err();
    assert!(err.message.contains("targets"), "{}", err.message);
    let s = ncd::NcdScorer::new(vec![b"a".to_vec(), b"b".to_vec()], 9).unwrap();
    assert!(s.ncd_into(&[b"x".to_vec()], &mut out).is_err()); // out too short
    assert!(ncd::compressed_sizes(&[b"x".to_vec()], 11).is_err());
    assert!(Deflater::new(0).is_err() && Deflater::new(10).is_err());
}

#[test]
fn bytes_past_the_end_decide_between_candidates() {
    // Inputs ending in zeros, with earlier zero runs of several lengths: longest_match compares bytes
    // past the data (zeros from fill_window's high-water logic, or stale bytes after a window slide);
    // zlib caps the result at the lookahead so they should not change the length, and the engine,
    // which reproduces those bytes, must agree. A primed engine sees the previous target's bytes
    // there unless it zeroes them like fill_window does.
    let mut rng = Rng::new(5);
    for case in 0..60 {
        let level = 1 + case % 9;
        let mut x = Vec::new();
        for _ in 0..1 + rng.below(6) {
            x.extend((0..rng.below(200)).map(|_| b"abc"[rng.below(3)]));
            x.extend(std::iter::repeat_n(0u8, 1 + rng.below(300)));
            x.push(rng.next() as u8);
        }
        let mut e = Deflater::new(level).unwrap();
        assert!(e.prime(&x));
        for _ in 0..8 {
            // long noisy target first, then short ones ending in a zero run
            let mut y: Vec<u8> = (0..rng.below(2000)).map(|_| 1 + (rng.next() % 255) as u8).collect();
            if rng.chance(0.7) {
                y.truncate(rng.below(40));
                y.extend(std::iter::repeat_n(0u8, rng.below(20)));
            }
            let xy = [&x[..], &y[..]].concat();
            let want = zlib_raw(&xy, level);
            assert_eq!(e.primed_len(&y), Some(want), "case {case} level {level}");
            assert_eq!(Deflater::new(level).unwrap().deflate_len(&xy, &[]), want, "case {case} level {level} whole");
        }
    }
    // The same past a window slide (stale window bytes instead of zeros).
    for case in 0..20 {
        let level = 1 + case % 9;
        let len = 70_000 + rng.below(70_000);
        let mut data: Vec<u8> = (0..len).map(|_| if rng.chance(0.3) { 0 } else { b"ab"[rng.below(2)] }).collect();
        let z = rng.below(300);
        data[len - z..].fill(0);
        assert_eq!(Deflater::new(level).unwrap().deflate_len(&data, &[]), zlib_raw(&data, level), "slide case {case}");
    }
}

#[test]
fn thousands_of_small_inputs_per_level() {
    // Where NCD lives: 0..3000 bytes. 1500 inputs per level, each checked whole and as a primed pair
    // (the source primed once for four targets).
    let mut rng = Rng::new(6);
    for level in 1..=9 {
        let mut whole = Deflater::new(level).unwrap();
        let mut primed = Deflater::new(level).unwrap();
        let mut checked = 0;
        while checked < 1500 {
            let x = short_input(&mut rng, 3000);
            assert!(primed.prime(&x));
            for _ in 0..4 {
                let y = if rng.chance(0.5) && !x.is_empty() {
                    let from = rng.below(x.len());
                    x[from..(from + rng.below(2000)).min(x.len())].to_vec()
                } else {
                    short_input(&mut rng, 3000)
                };
                let xy = [&x[..], &y[..]].concat();
                let want = zlib_raw(&xy, level);
                assert_eq!(whole.deflate_len(&xy, &[]), want, "level {level} whole len {}", xy.len());
                assert_eq!(primed.primed_len(&y), Some(want), "level {level} primed x {} y {}", x.len(), y.len());
                checked += 1;
            }
        }
    }
}

#[test]
fn deep_primed_pairs_match_zlib() {
    // prime_for(x, 262) runs the parse on past len(x) - 262 while no step reads beyond x; targets of
    // at least 262 bytes continue from there, shorter ones are refused (None).
    let mut rng = Rng::new(7);
    for case in 0..900 {
        let level = 1 + case % 9;
        let x = if case % 3 == 0 { any_input(&mut rng, 40_000) } else { short_input(&mut rng, 3000) };
        let mut e = Deflater::new(level).unwrap();
        assert!(e.prime_for(&x, 262));
        for t in 0..4 {
            let mut y = if t % 2 == 0 && !x.is_empty() {
                let from = rng.below(x.len());
                x[from..(from + 262 + rng.below(2000)).min(x.len())].to_vec()
            } else {
                short_input(&mut rng, 3000)
            };
            if y.len() < 262 && rng.chance(0.7) {
                y.extend(std::iter::repeat_n(b'e', 262 - y.len())); // most targets long enough
            }
            let want = zlib_raw(&[&x[..], &y[..]].concat(), level);
            match e.primed_len(&y) {
                Some(got) => assert_eq!(got, want, "case {case} target {t} level {level} x {} y {}", x.len(), y.len()),
                None => assert!(y.len() < 262 || x.len() + y.len() > ncd::SMALL_MAX),
            }
        }
    }
}

#[test]
fn target_walks_give_the_same_lengths() {
    // primed_len_walked (a target with its precomputed walks): the same lengths as zlib, for plain
    // and deep primes, on targets with long internal chains (runs, periods, small alphabets: the
    // chain budget and its quarter run out inside the target), short targets, an empty source (no
    // walks used at position 0), and walks built at another level (not used).
    let mut rng = Rng::new(8);
    let mut walked = 0;
    for case in 0..600 {
        let level = 4 + (case % 6) as i32;
        let x = if case % 5 == 0 { Vec::new() } else { short_input(&mut rng, 3000) };
        let mut plain = Deflater::new(level).unwrap();
        let mut deep = Deflater::new(level).unwrap();
        assert!(plain.prime(&x) && deep.prime_for(&x, 262));
        for t in 0..4 {
            let y = match t {
                0 if !x.is_empty() => {
                    let from = rng.below(x.len());
                    x[from..(from + rng.below(3000)).min(x.len())].to_vec()
                }
                1 => (0..300 + rng.below(6000)).map(|i| b"ab "[(i / (1 + case % 4)) % 3]).collect(),
                _ => short_input(&mut rng, 6000),
            };
            let walks = TargetWalks::new(&y, level).expect("levels 4-9, short target");
            let want = zlib_raw(&[&x[..], &y[..]].concat(), level);
            assert_eq!(walks.target(), &y[..]);
            assert_eq!(plain.primed_len_walked(&walks), Some(want), "case {case} level {level} x {} y {}", x.len(), y.len());
            if y.len() >= 262 {
                assert_eq!(deep.primed_len_walked(&walks), Some(want), "deep case {case} level {level}");
            }
            let other_level = TargetWalks::new(&y, if level == 9 { 8 } else { 9 }).unwrap();
            assert_eq!(plain.primed_len_walked(&other_level), Some(want), "other level's walks, case {case}");
            walked += 1;
        }
    }
    assert!(walked > 2000);
    assert!(TargetWalks::new(b"abcabcabc", 3).is_none(), "levels 1-3 insert by the parse: no walks");
    assert!(TargetWalks::new(&vec![b'a'; TargetWalks::MAX_LEN + 1], 9).is_none());
}
