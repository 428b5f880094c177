//! Deterministic input generators for differential tests of the ncd engine against stock zlib
//! (shared by tests/ncd_engine.rs and examples/ncd_fuzz.rs).
#![allow(dead_code)]

/// splitmix64: small, seedable, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

const VOCAB: &[&str] = &[
    "the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as",
    "with", "his", "they", "I", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word",
    "compression", "distance", "normalized", "gzip", "zlib", "deflate", "Huffman", "window", "match",
    "\n", ", ", ". ", "def ", "return ", "(", ")", "{", "}", "\t", "    ", "λ", "数据", "🙂",
];

/// One segment of `len` bytes of the given kind.
fn segment(rng: &mut Rng, kind: usize, len: usize, out: &mut Vec<u8>) {
    let start = out.len();
    match kind {
        // uniform random bytes (literal-heavy: ~1 symbol per byte)
        0 => out.extend((0..len).map(|_| rng.next() as u8)),
        // text-like word soup from a small vocabulary
        1 => {
            let vocab = 1 + rng.below(VOCAB.len());
            while out.len() - start < len {
                out.extend_from_slice(VOCAB[rng.below(vocab)].as_bytes());
                if rng.chance(0.8) {
                    out.push(b' ');
                }
            }
            out.truncate(start + len);
        }
        // a long run of one byte
        2 => {
            let b = if rng.chance(0.5) { 0 } else { rng.next() as u8 };
            out.extend(std::iter::repeat_n(b, len));
        }
        // a periodic pattern, period 1..300, sometimes with mutations
        3 => {
            let pmax = if rng.chance(0.5) { 8 } else { 300 };
            let period = 1 + rng.below(pmax);
            let pat: Vec<u8> = (0..period).map(|_| rng.next() as u8).collect();
            let noise = if rng.chance(0.5) { 0.0 } else { 0.01 };
            out.extend((0..len).map(|i| if noise > 0.0 && rng.chance(noise) { rng.next() as u8 } else { pat[i % period] }));
        }
        // a small alphabet (long hash chains, many equal-length candidates)
        4 => {
            let k = 1 + rng.below(4);
            out.extend((0..len).map(|_| b"ab\0z"[rng.below(k)]));
        }
        // copies of earlier material at random distances (long matches, far candidates)
        _ => {
            if start == 0 {
                out.extend((0..len).map(|_| rng.next() as u8 & 0x0f));
            } else {
                while out.len() - start < len {
                    let from = rng.below(out.len());
                    let n = (1 + rng.below(300)).min(out.len() - from).min(len - (out.len() - start));
                    out.extend_from_within(from..from + n);
                    if rng.chance(0.3) {
                        out.push(rng.next() as u8);
                    }
                }
                out.truncate(start + len);
            }
        }
    }
}

/// A length drawn to hit the interesting places: small sizes, the window sizes (32 K, 64 K and the
/// slide point 65274) and the block size (16383 symbols ≈ that many bytes of random data), up to
/// about `max`.
pub fn length(rng: &mut Rng, max: usize) -> usize {
    const MARKS: &[usize] = &[258, 262, 16383, 16384, 32506, 32768, 65274, 65536, 98304, 131072];
    let n = match rng.below(10) {
        0..=3 => rng.below(600),
        4..=5 => rng.below(4000),
        6 => {
            let m = MARKS[rng.below(MARKS.len())];
            (m + rng.below(600)).saturating_sub(300)
        }
        7 => rng.below(70_000),
        8 => rng.below(20_000),
        _ => rng.below(max + 1),
    };
    n.min(max)
}

/// An input of exactly `len` bytes: one kind or a mixture of segments, sometimes zeros at the end.
pub fn input(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mixed = rng.chance(0.5);
    let kind0 = rng.below(6);
    while out.len() < len {
        let left = len - out.len();
        let seg = if mixed { (1 + rng.below(left.min(5000))).min(left) } else { left };
        let kind = if mixed { rng.below(6) } else { kind0 };
        segment(rng, kind, seg, &mut out);
    }
    if len > 0 && rng.chance(0.15) {
        let z = rng.below(len.min(600) + 1);
        out[len - z..].fill(0);
    }
    out
}

/// A (source, target) pair: unrelated, or the target borrows from the source (NCD's real case).
pub fn pair(rng: &mut Rng, max: usize) -> (Vec<u8>, Vec<u8>) {
    let x = any_input(rng, max);
    let ylen = length(rng, max);
    let y = if !x.is_empty() && rng.chance(0.5) {
        let mut y = Vec::with_capacity(ylen);
        while y.len() < ylen {
            let from = rng.below(x.len());
            let n = (1 + rng.below(400)).min(x.len() - from).min(ylen - y.len());
            y.extend_from_slice(&x[from..from + n]);
            if rng.chance(0.2) {
                let n = rng.below(40).min(ylen - y.len());
                y.extend(input(rng, n));
            }
        }
        y
    } else {
        input(rng, ylen)
    };
    (x, y)
}

/// An input of a [`length`] up to about `max`.
pub fn any_input(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = length(rng, max);
    input(rng, n)
}

/// An input of uniform length in 0..n.
pub fn short_input(rng: &mut Rng, n: usize) -> Vec<u8> {
    let len = rng.below(n);
    input(rng, len)
}
