//! A length-only deflate engine that reproduces stock zlib's raw-deflate output length exactly
//! (windowBits 15, memLevel 8, default strategy, levels 1..=9, all input given at once with
//! Z_FINISH — what `gzip.compress` does).
//!
//! It follows zlib's deflate.c step for step on the same data structures (written from the bundled
//! 1.3.2 source; fuzzed against it, and spot-checked against the host's 1.2.13 through Python): the
//! 64 KiB window with fill_window's sliding and high-water zeroing (longest_match reads up to 258
//! bytes past the data — zeros, or stale data after a slide; zlib caps its results at the lookahead
//! so they should not matter, and the engine reproduces them anyway), the 15-bit hash with head/prev
//! chains indexed `pos & wmask`, deflate_fast (levels 1–3, insertion skipped for matches longer than
//! max_insert_length) and deflate_slow (4–9, lazy matching, TOO_FAR), longest_match with its chain
//! length, good_match reduction, nice_match capped by the lookahead, MAX_DIST limit and scan_end
//! test, and block flushes when the symbol buffer holds lit_bufsize − 1 = 16383 symbols. Per block it
//! keeps only the symbol frequencies; the Huffman work and the stored/fixed/dynamic choice are in
//! `super::trees`. No output byte is produced.
//!
//! Priming ([`Deflater::prime`] / [`Deflater::primed_len`]): for x ⊕ y short enough that zlib reads it
//! in one piece and never slides (x.len() + y.len() ≤ [`SMALL_MAX`]), every step at a position p with
//! p + MIN_LOOKAHEAD ≤ x.len() reads only bytes of x and sees a lookahead ≥ MIN_LOOKAHEAD whatever y is,
//! so the state there is y-independent. The engine runs x up to that point once, then for each y
//! copies y behind x in the window, restores the snapshot (a few words and the block's symbol counts;
//! hash heads through an undo log; prev[] entries of positions after the prime point are always
//! written before they are read, except the slots that positions ≥ WSIZE share with primed positions,
//! which are undo-logged too) and finishes.
//!
//! Deep priming ([`Deflater::prime_for`] with targets of ≥ MIN_LOOKAHEAD bytes): the lookahead then
//! stays ≥ MIN_LOOKAHEAD until the end of x for every target, so the parse can go on past
//! x.len() − MIN_LOOKAHEAD while no step reads a byte of y. Each step there is speculative: a step that
//! hashes or compares a byte at or after x.len() is rolled back (state, counts, undo log) and priming
//! stops before it; on real text that leaves about 5 bytes of x, instead of ~255, to redo per target.
//!
//! Target walks ([`TargetWalks`], levels 4–9): the part of every match search that stays inside the
//! target, and the target's own hash chains, are computed once per target and looked up for each
//! source it is paired with.
use super::trees::{d_code, Trees, END_BLOCK, D_CODES, LENGTH_CODE, LITERALS, L_CODES};

use crate::error::{Error, Result};

const WSIZE: usize = 1 << 15;
const WMASK: usize = WSIZE - 1;
const WINDOW_SIZE: usize = 2 * WSIZE;
const HASH_BITS: usize = 15; // memLevel 8 + 7
const HASH_SIZE: usize = 1 << HASH_BITS;
const HASH_MASK: usize = HASH_SIZE - 1;
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
const MIN_LOOKAHEAD: usize = MAX_MATCH + MIN_MATCH + 1;
const MAX_DIST: usize = WSIZE - MIN_LOOKAHEAD;
const WIN_INIT: usize = MAX_MATCH;
const TOO_FAR: u32 = 4096;
const LIT_BUFSIZE: usize = 1 << (8 + 6); // memLevel 8
const SYM_END: usize = LIT_BUFSIZE - 1;
const WINDOW_PAD: usize = 512;

/// A zeroed boxed array, built on the heap (no large stack temporary).
fn boxed<T: Copy + Default, const N: usize>() -> Box<[T; N]> {
    vec![T::default(); N].into_boxed_slice().try_into().unwrap_or_else(|_| unreachable!())
}

/// Largest x.len() + y.len() for which zlib reads the input in one piece and never slides the window
/// (a slide needs strstart ≥ WSIZE + MAX_DIST = 65274, and strstart ≤ input length): the primed path.
pub const SMALL_MAX: usize = WSIZE + MAX_DIST - 1;

/// zlib's configuration_table: good_length, max_lazy, nice_length, max_chain, deflate_fast or slow.
#[derive(Clone, Copy, Debug)]
struct Config {
    good: usize,
    lazy: usize,
    nice: usize,
    chain: usize,
    fast: bool,
}

const CONFIG: [Config; 10] = [
    Config { good: 0, lazy: 0, nice: 0, chain: 0, fast: true }, // level 0: stored, not handled here
    Config { good: 4, lazy: 4, nice: 8, chain: 4, fast: true },
    Config { good: 4, lazy: 5, nice: 16, chain: 8, fast: true },
    Config { good: 4, lazy: 6, nice: 32, chain: 32, fast: true },
    Config { good: 4, lazy: 4, nice: 16, chain: 16, fast: false },
    Config { good: 8, lazy: 16, nice: 32, chain: 32, fast: false },
    Config { good: 8, lazy: 16, nice: 128, chain: 128, fast: false },
    Config { good: 8, lazy: 32, nice: 128, chain: 256, fast: false },
    Config { good: 32, lazy: 128, nice: 258, chain: 1024, fast: false },
    Config { good: 32, lazy: 258, nice: 258, chain: 4096, fast: false },
];

/// The scalar part of zlib's deflate_state that the parse and the block accounting use.
#[derive(Clone, Copy, Debug)]
struct State {
    strstart: usize,
    block_start: isize,
    lookahead: usize,
    match_length: usize,
    prev_length: usize,
    /// uInt in zlib, and it can wrap on a slide (then it is stale and only TOO_FAR looks at it).
    match_start: u32,
    prev_match: u32,
    match_available: bool,
    /// Symbols in the current block.
    sym_next: usize,
    /// Bits of output so far.
    bits: u64,
}

impl State {
    fn init() -> Self {
        State {
            strstart: 0,
            block_start: 0,
            lookahead: 0,
            match_length: MIN_MATCH - 1,
            prev_length: MIN_MATCH - 1,
            match_start: 0,
            prev_match: 0,
            match_available: false,
            sym_next: 0,
            bits: 0,
        }
    }
}

/// The input not yet read into the window: up to two pieces read one after the other (x then y).
struct Input<'a> {
    parts: [&'a [u8]; 2],
}

impl Input<'_> {
    fn avail(&self) -> usize {
        self.parts[0].len() + self.parts[1].len()
    }
    /// zlib's read_buf: copy min(avail, dst.len()) bytes.
    fn read(&mut self, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for part in self.parts.iter_mut() {
            let n = part.len().min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&part[..n]);
            *part = &part[n..];
            done += n;
        }
        done
    }
}

/// Snapshot of a primed source (or of the speculative run at a loop top).
#[derive(Clone)]
struct Primed {
    xlen: usize,
    state: State,
    lfreq: [u32; L_CODES],
    dfreq: [u32; D_CODES],
    /// Undo-log lengths at the snapshot: the entries below belong to the snapshot's own state.
    undo_len: usize,
    undo_prev_len: usize,
    /// Targets shorter than this cannot continue from this snapshot.
    min_y: usize,
}

#[cfg(test)]
thread_local! {
    /// Engines built on this thread: tests tell a kept engine from a rebuilt one by it.
    pub(crate) static BUILT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The engine. About 200 KB; reuse one per thread.
pub struct Deflater {
    cfg: Config,
    level: i32,
    /// zlib's window (WINDOW_SIZE bytes) plus WINDOW_PAD bytes that are never read or written: fixed
    /// sizes let the compiler drop bounds checks on `pos & 0xffff` and `h & HASH_MASK` indices.
    window: Box<[u8; WINDOW_SIZE + WINDOW_PAD]>,
    head: Box<[u16; HASH_SIZE]>,
    prev: Box<[u16; WSIZE]>,
    high_water: usize,
    s: State,
    lfreq: [u32; L_CODES],
    dfreq: [u32; D_CODES],
    trees: Box<Trees>,
    /// (hash, old head) of every insertion since the prime, undone before the next target.
    undo: Vec<(u16, u16)>,
    /// (pos & wmask, old prev) of insertions at pos ≥ WSIZE since the prime: such a pos shares its
    /// prev[] slot with pos − WSIZE, which may be a primed position a later target still walks to.
    undo_prev: Vec<(u16, u16)>,
    logging: bool,
    primed: Option<Primed>,
    /// Speculative priming (see prime_for): bytes at or past spec_end are unknown; a step that
    /// reads one sets `tainted` and is rolled back to `spec_snap`. usize::MAX when not speculating.
    spec_end: usize,
    tainted: bool,
    spec_snap: Option<Box<Primed>>,
    /// Where the target starts in the window while [`Deflater::primed_len_walked`] runs with a
    /// [`TargetWalks`]; usize::MAX otherwise.
    ybase: usize,
}

impl Deflater {
    /// An engine for level 1..=9 (level 0 is zlib's stored path, not modelled here: use the oracle).
    pub fn new(level: i32) -> Result<Self> {
        if !(1..=9).contains(&level) {
            return Err(Error::value(format!("level: expected 1..=9 for the deflate engine, got {level}")));
        }
        #[cfg(test)]
        BUILT.with(|b| b.set(b.get() + 1));
        Ok(Deflater {
            cfg: CONFIG[level as usize],
            level,
            window: boxed(),
            head: boxed(),
            prev: boxed(),
            high_water: 0,
            s: State::init(),
            lfreq: [0; L_CODES],
            dfreq: [0; D_CODES],
            trees: Trees::new(),
            undo: Vec::new(),
            undo_prev: Vec::new(),
            logging: false,
            primed: None,
            spec_end: usize::MAX,
            tainted: false,
            spec_snap: None,
            ybase: usize::MAX,
        })
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// deflateReset + lm_init + init_block.
    fn reset(&mut self) {
        self.head.fill(0);
        self.high_water = 0;
        self.s = State::init();
        self.init_block();
        self.undo.clear();
        self.undo_prev.clear();
        self.logging = false;
        self.primed = None;
        self.spec_end = usize::MAX;
        self.tainted = false;
    }

    fn init_block(&mut self) {
        self.lfreq = [0; L_CODES];
        self.dfreq = [0; D_CODES];
        self.lfreq[END_BLOCK] = 1;
        self.s.sym_next = 0;
    }

    /// Raw deflate length in bytes of `a ⊕ b` (compressed in one call, as zlib.compress does).
    pub fn deflate_len(&mut self, a: &[u8], b: &[u8]) -> u64 {
        self.reset();
        let mut input = Input { parts: [a, b] };
        self.run(&mut input, usize::MAX);
        self.s.bits / 8
    }

    /// Prepare for many [`primed_len`](Self::primed_len) calls with source `x`. Needs
    /// x.len() ≤ SMALL_MAX; returns false (and primes nothing) otherwise.
    pub fn prime(&mut self, x: &[u8]) -> bool {
        self.prime_for(x, 0)
    }

    /// [`prime`](Self::prime) for targets of at least `min_y` bytes. With min_y ≥ MIN_LOOKAHEAD
    /// (262) the lookahead stays ≥ MIN_LOOKAHEAD up to the end of x for every such target, so the
    /// parse may run on past x.len() − MIN_LOOKAHEAD for as long as no step reads a byte at or after
    /// x.len(): each step speculates, and the first one that reads such a byte (a hash of the last two
    /// positions, a match that reaches the end of x) is rolled back and priming stops there. Shorter
    /// targets then get None from primed_len.
    pub fn prime_for(&mut self, x: &[u8], min_y: usize) -> bool {
        self.reset();
        if x.len() > SMALL_MAX {
            return false;
        }
        let xlen = x.len();
        self.window[..xlen].copy_from_slice(x);
        // As if fill_window had read x ⊕ y whole: every step taken below sees lookahead ≥
        // MIN_LOOKAHEAD, so the true lookahead (which includes y) never matters, and fill_window is
        // not called.
        self.s.lookahead = xlen;
        let mut none = Input { parts: [&[], &[]] };
        self.run(&mut none, xlen);
        self.logging = true;
        let min_y = if min_y >= MIN_LOOKAHEAD {
            // As if y had exactly MIN_LOOKAHEAD bytes: every lookahead test (insertion, nice_match
            // and result caps, max_insert, fill_window) then goes the same way as for any longer y.
            self.s.lookahead = xlen - self.s.strstart + MIN_LOOKAHEAD;
            self.spec_end = xlen;
            self.tainted = false;
            self.run(&mut none, usize::MAX);
            self.spec_end = usize::MAX;
            self.spec_snap = None;
            MIN_LOOKAHEAD
        } else {
            0
        };
        self.primed = Some(Primed {
            xlen,
            state: self.s,
            lfreq: self.lfreq,
            dfreq: self.dfreq,
            undo_len: self.undo.len(),
            undo_prev_len: self.undo_prev.len(),
            min_y,
        });
        true
    }

    /// (x.len(), the position where the primed parse stops) of the primed source, if any.
    pub fn primed_at(&self) -> Option<(usize, usize)> {
        self.primed.as_ref().map(|p| (p.xlen, p.state.strstart))
    }

    /// At a loop top while speculating: roll back a tainted step and stop, stop before a step that
    /// would hash bytes past x, else remember this point.
    #[cold]
    fn spec_checkpoint(&mut self) -> bool {
        if self.tainted {
            let snap = self.spec_snap.take().expect("a tainted step follows a checkpoint");
            self.rollback_to(&snap);
            self.tainted = false;
            return true;
        }
        if self.s.strstart + 2 >= self.spec_end {
            return true;
        }
        let snap = Primed {
            xlen: self.spec_end,
            state: self.s,
            lfreq: self.lfreq,
            dfreq: self.dfreq,
            undo_len: self.undo.len(),
            undo_prev_len: self.undo_prev.len(),
            min_y: 0,
        };
        match self.spec_snap.as_mut() {
            Some(b) => **b = snap,
            None => self.spec_snap = Some(Box::new(snap)),
        }
        false
    }

    /// Restore the hash heads (and aliased prev slots) logged after `snap`, newest first, and its
    /// scalar state and symbol counts.
    fn rollback_to(&mut self, snap: &Primed) {
        for &(h, old) in self.undo[snap.undo_len..].iter().rev() {
            self.head[h as usize] = old;
        }
        self.undo.truncate(snap.undo_len);
        for &(i, old) in self.undo_prev[snap.undo_prev_len..].iter().rev() {
            self.prev[i as usize] = old;
        }
        self.undo_prev.truncate(snap.undo_prev_len);
        self.s = snap.state;
        self.lfreq = snap.lfreq;
        self.dfreq = snap.dfreq;
    }

    #[inline(always)]
    fn spec_stop<const SPEC: bool>(&mut self) -> bool {
        SPEC && self.spec_checkpoint()
    }

    /// Raw deflate length of x ⊕ y for the primed x, or None when x.len() + y.len() > SMALL_MAX,
    /// y is shorter than the prime allows, or nothing is primed.
    pub fn primed_len(&mut self, y: &[u8]) -> Option<u64> {
        self.primed_len_impl(y, None)
    }

    /// [`primed_len`](Self::primed_len) of the target `t` holds, using its walks (when built at this
    /// engine's level; else without): the same length, without re-walking the target's own chains.
    pub fn primed_len_walked(&mut self, t: &TargetWalks) -> Option<u64> {
        let walks = (t.level == self.level).then_some(t);
        self.primed_len_impl(&t.target, walks)
    }

    fn primed_len_impl(&mut self, y: &[u8], walks: Option<&TargetWalks>) -> Option<u64> {
        let p = self.primed.take()?;
        let xlen = p.xlen;
        let total = xlen + y.len();
        if total > SMALL_MAX || y.len() < p.min_y {
            self.primed = Some(p);
            return None;
        }
        // Undo the previous target's hash-head changes, newest first, and restore the snapshot.
        self.rollback_to(&p);
        self.primed = Some(p);
        self.window[xlen..total].copy_from_slice(y);
        // fill_window's first call zeroes WIN_INIT bytes after the data (total + 258 < window size).
        self.window[total..total + WIN_INIT].fill(0);
        self.high_water = total + WIN_INIT;
        self.s.lookahead = total - self.s.strstart;
        let mut none = Input { parts: [&[], &[]] };
        self.ybase = xlen;
        self.run_with(&mut none, usize::MAX, walks);
        self.ybase = usize::MAX;
        Some(self.s.bits / 8)
    }

    /// deflate_fast or deflate_slow until the input is done (then the final block is flushed), or
    /// until the loop top sees strstart + MIN_LOOKAHEAD > stop (priming: nothing is flushed).
    fn run(&mut self, input: &mut Input, stop: usize) {
        self.run_with(input, stop, None)
    }

    /// [`run`](Self::run), with the current target's precomputed walks (slow levels only).
    fn run_with(&mut self, input: &mut Input, stop: usize, walks: Option<&TargetWalks>) {
        // The speculation checks are compiled out of the ordinary runs (every pair's).
        match (self.cfg.fast, self.spec_end != usize::MAX) {
            (true, false) => self.deflate_fast::<false>(input, stop),
            (true, true) => self.deflate_fast::<true>(input, stop),
            (false, false) => self.deflate_slow::<false>(input, stop, walks),
            (false, true) => self.deflate_slow::<true>(input, stop, walks),
        }
    }

    /// zlib's fill_window (deflate.c), with the read pieces of `input`.
    #[inline(always)]
    fn fill_window(&mut self, input: &mut Input) {
        // Nothing to read, slide or zero (the common case near the end of every pair): return early.
        let curr = self.s.strstart + self.s.lookahead;
        if input.avail() == 0 && self.s.strstart < WSIZE + MAX_DIST && self.high_water >= (curr + WIN_INIT).min(WINDOW_SIZE) {
            return;
        }
        self.fill_window_work(input)
    }

    #[inline(never)]
    fn fill_window_work(&mut self, input: &mut Input) {
        loop {
            let mut more = WINDOW_SIZE - self.s.lookahead - self.s.strstart;
            if self.s.strstart >= WSIZE + MAX_DIST {
                self.window.copy_within(WSIZE..WSIZE + WSIZE - more, 0);
                self.s.match_start = self.s.match_start.wrapping_sub(WSIZE as u32);
                self.s.strstart -= WSIZE;
                self.s.block_start -= WSIZE as isize;
                self.slide_hash();
                more += WSIZE;
            }
            if input.avail() == 0 {
                break;
            }
            let at = self.s.strstart + self.s.lookahead;
            let n = input.read(&mut self.window[at..at + more]);
            self.s.lookahead += n;
            // zlib initialises its rolling hash here; this engine hashes each position directly
            // from its three bytes, which is the same value (see insert_string).
            if !(self.s.lookahead < MIN_LOOKAHEAD && input.avail() != 0) {
                break;
            }
        }
        if self.high_water < WINDOW_SIZE {
            let curr = self.s.strstart + self.s.lookahead;
            if self.high_water < curr {
                let init = (WINDOW_SIZE - curr).min(WIN_INIT);
                self.window[curr..curr + init].fill(0);
                self.high_water = curr + init;
            } else if self.high_water < curr + WIN_INIT {
                let init = (curr + WIN_INIT - self.high_water).min(WINDOW_SIZE - self.high_water);
                self.window[self.high_water..self.high_water + init].fill(0);
                self.high_water += init;
            }
        }
    }

    fn slide_hash(&mut self) {
        for p in self.head.iter_mut().chain(self.prev.iter_mut()) {
            let m = *p as usize;
            *p = if m >= WSIZE { (m - WSIZE) as u16 } else { 0 };
        }
    }

    /// INSERT_STRING: zlib's rolling hash UPDATE_HASH with shift 5 and mask 0x7fff, after the three
    /// updates since the last non-consecutive reset, equals this direct hash of the 3 bytes at pos.
    #[inline(always)]
    fn insert_string<const SPEC: bool>(&mut self, pos: usize) -> usize {
        if SPEC && pos + 2 >= self.spec_end {
            self.tainted = true;
        }
        let w: &[u8; 3] = self.window[pos & 0xffff..][..3].try_into().unwrap();
        let h = (((w[0] as usize) << 10) ^ ((w[1] as usize) << 5) ^ (w[2] as usize)) & HASH_MASK;
        let old = self.head[h];
        if self.logging {
            self.undo.push((h as u16, old));
            if pos >= WSIZE {
                self.undo_prev.push(((pos & WMASK) as u16, self.prev[pos & WMASK]));
            }
        }
        self.prev[pos & WMASK] = old;
        self.head[h] = pos as u16;
        old as usize
    }

    /// insert_string at a target position with the target's walks: the previous position of the same
    /// hash is the walks' `first` when it is in the target, else the head — which no target position
    /// writes, so it still holds the last position before the target. The head is neither read
    /// (mostly) nor written here, so the target's positions leave nothing to undo.
    #[inline(always)]
    fn insert_walked(&mut self, pos: usize, w: &TargetWalks) -> usize {
        let first = w.walks[pos - self.ybase].first;
        let old = if first != NONE {
            (self.ybase + first as usize) as u16
        } else {
            let b: &[u8; 3] = self.window[pos & 0xffff..][..3].try_into().unwrap();
            self.head[(((b[0] as usize) << 10) ^ ((b[1] as usize) << 5) ^ (b[2] as usize)) & HASH_MASK]
        };
        if pos >= WSIZE {
            // pos shares its prev[] slot with pos − WSIZE, a position before the target.
            self.undo_prev.push(((pos & WMASK) as u16, self.prev[pos & WMASK]));
        }
        self.prev[pos & WMASK] = old;
        old as usize
    }

    /// insert_string, or insert_walked at target positions when the target's walks are given.
    #[inline(always)]
    fn insert<const SPEC: bool>(&mut self, pos: usize, walks: Option<&TargetWalks>) -> usize {
        match walks {
            Some(w) if pos >= self.ybase => self.insert_walked(pos, w),
            _ => self.insert_string::<SPEC>(pos),
        }
    }

    #[inline(always)]
    fn tally_lit(&mut self, c: u8) -> bool {
        self.lfreq[c as usize] += 1;
        self.s.sym_next += 1;
        self.s.sym_next == SYM_END
    }

    #[inline(always)]
    fn tally_dist(&mut self, dist: usize, lc: usize) -> bool {
        self.lfreq[LENGTH_CODE[lc] as usize + LITERALS + 1] += 1;
        self.dfreq[d_code(dist - 1)] += 1;
        self.s.sym_next += 1;
        self.s.sym_next == SYM_END
    }

    /// FLUSH_BLOCK_ONLY: _tr_flush_block over window[block_start..strstart], then init_block.
    fn flush_block(&mut self, last: bool) {
        let stored_len = (self.s.strstart as isize - self.s.block_start) as u64;
        let stored_ok = self.s.block_start >= 0;
        let (bits, _) = self.trees.flush_block(self.s.bits, &self.lfreq, &self.dfreq, stored_len, stored_ok, last);
        self.s.bits = bits;
        self.s.block_start = self.s.strstart as isize;
        self.init_block();
    }

    /// zlib's longest_match (the portable, byte-compare variant; the UNALIGNED_OK variant computes
    /// the same lengths). Sets match_start; returns min(best_len, lookahead).
    ///
    /// With `walks` (the current target's, see [`TargetWalks`]) and strstart inside the target, the
    /// chain's first part — the target's own earlier positions — is not walked: its outcome for this
    /// start length and budget is looked up, and the walk goes on from the first position before the
    /// target.
    #[inline(always)]
    fn longest_match<const SPEC: bool>(&mut self, mut cur_match: usize, walks: Option<&TargetWalks>) -> usize {
        let mut chain_length = self.cfg.chain;
        let strstart = self.s.strstart;
        let mut best_len = self.s.prev_length;
        let mut nice_match = self.cfg.nice;
        let limit = strstart.saturating_sub(MAX_DIST); // NIL (0) when strstart ≤ MAX_DIST
        let window = &self.window;
        // strstart ≤ window_size − MIN_LOOKAHEAD, so the 259 bytes from strstart are in the window
        // (positions are < 64 Ki; the mask only tells the compiler so).
        let scan: &[u8; MAX_MATCH + 1] = window[strstart & 0xffff..][..MAX_MATCH + 1].try_into().unwrap();
        // Bytes best_len − 1 and best_len, and bytes 0 and 1, compared two at a time (the
        // UNALIGNED_OK form of the same test).
        let pair = |a: &[u8; MAX_MATCH + 1], i: usize| u16::from_le_bytes([a[i], a[i + 1]]);
        let scan_start = pair(scan, 0);
        let mut scan_end = pair(scan, best_len - 1);
        if self.s.prev_length >= self.cfg.good {
            chain_length >>= 2;
        }
        if nice_match > self.s.lookahead {
            nice_match = self.s.lookahead;
        }
        let mut match_start = self.s.match_start;
        // While speculating, bytes from spec_end on are unknown: flag any test that reads one.
        let spec_end = self.spec_end;
        let mut tainted = SPEC && strstart + best_len >= spec_end;
        if let Some(w) = walks {
            // The lookup holds for a chain that starts inside the target (a target-internal part
            // exists), a start length below nice_match (so the first record ≥ nice is where the walk
            // stops), and a real target start (position 0 would read as NIL).
            let ybase = self.ybase;
            if cur_match >= ybase && best_len < nice_match && ybase > 0 {
                let e = &w.walks[strstart - ybase];
                debug_assert_eq!(cur_match - ybase, e.first as usize, "chain head inside the target");
                let part = if chain_length == self.cfg.chain { e.full } else { e.quarter };
                if part.best as usize > best_len {
                    best_len = part.best as usize;
                    match_start = (ybase + part.at as usize) as u32;
                }
                let visited = part.visited as usize;
                // The walk ended inside the target: at nice_match, or with the budget spent.
                let mut done = part.stopped || visited >= chain_length;
                if !done {
                    // Every target position on the chain was visited: go on from the one before them.
                    cur_match = self.prev[(ybase + e.last as usize) & WMASK] as usize;
                    chain_length -= visited;
                    done = cur_match <= limit;
                }
                if done {
                    self.s.match_start = match_start;
                    return best_len.min(self.s.lookahead);
                }
                scan_end = pair(scan, best_len - 1);
            }
        }
        loop {
            let m: &[u8; MAX_MATCH + 1] = window[cur_match & 0xffff..][..MAX_MATCH + 1].try_into().unwrap();
            if pair(m, best_len - 1) == scan_end && pair(m, 0) == scan_start {
                // Bytes 3..=257 decide (byte 2 is implied by the hash; a mismatch at 258 still gives
                // 258): the length is the first mismatch index, at most 258.
                let len = MIN_MATCH + common_prefix(&scan[3..MAX_MATCH], &m[3..MAX_MATCH]);
                tainted |= SPEC && strstart + len >= spec_end;
                if len > best_len {
                    match_start = cur_match as u32;
                    best_len = len;
                    if len >= nice_match {
                        break;
                    }
                    scan_end = pair(scan, best_len - 1);
                }
            }
            cur_match = self.prev[cur_match & WMASK] as usize;
            if cur_match <= limit {
                break;
            }
            chain_length -= 1;
            if chain_length == 0 {
                break;
            }
        }
        self.s.match_start = match_start;
        if SPEC {
            self.tainted |= tainted;
        }
        if best_len <= self.s.lookahead {
            best_len
        } else {
            self.s.lookahead
        }
    }

    /// zlib's deflate_fast (levels 1–3) with flush = Z_FINISH.
    fn deflate_fast<const SPEC: bool>(&mut self, input: &mut Input, stop: usize) {
        loop {
            if self.s.strstart + MIN_LOOKAHEAD > stop || self.spec_stop::<SPEC>() {
                return;
            }
            if self.s.lookahead < MIN_LOOKAHEAD {
                self.fill_window(input);
                if self.s.lookahead == 0 {
                    break;
                }
            }
            let mut hash_head = 0;
            if self.s.lookahead >= MIN_MATCH {
                hash_head = self.insert_string::<SPEC>(self.s.strstart);
            }
            if hash_head != 0 && self.s.strstart - hash_head <= MAX_DIST {
                self.s.match_length = self.longest_match::<SPEC>(hash_head, None);
            }
            let bflush;
            if self.s.match_length >= MIN_MATCH {
                bflush = self.tally_dist(self.s.strstart - self.s.match_start as usize, self.s.match_length - MIN_MATCH);
                self.s.lookahead -= self.s.match_length;
                if self.s.match_length <= self.cfg.lazy && self.s.lookahead >= MIN_MATCH {
                    // max_insert_length == max_lazy_match
                    self.s.match_length -= 1;
                    loop {
                        self.s.strstart += 1;
                        self.insert_string::<SPEC>(self.s.strstart);
                        self.s.match_length -= 1;
                        if self.s.match_length == 0 {
                            break;
                        }
                    }
                    self.s.strstart += 1;
                } else {
                    self.s.strstart += self.s.match_length;
                    self.s.match_length = 0;
                }
            } else {
                bflush = self.tally_lit(self.window[self.s.strstart]);
                self.s.lookahead -= 1;
                self.s.strstart += 1;
            }
            if bflush {
                self.flush_block(false);
            }
        }
        self.flush_block(true);
    }

    /// zlib's deflate_slow (levels 4–9) with flush = Z_FINISH.
    fn deflate_slow<const SPEC: bool>(&mut self, input: &mut Input, stop: usize, walks: Option<&TargetWalks>) {
        loop {
            if self.s.strstart + MIN_LOOKAHEAD > stop || self.spec_stop::<SPEC>() {
                return;
            }
            if self.s.lookahead < MIN_LOOKAHEAD {
                self.fill_window(input);
                if self.s.lookahead == 0 {
                    break;
                }
            }
            let mut hash_head = 0;
            if self.s.lookahead >= MIN_MATCH {
                hash_head = self.insert::<SPEC>(self.s.strstart, walks);
            }
            self.s.prev_length = self.s.match_length;
            self.s.prev_match = self.s.match_start;
            self.s.match_length = MIN_MATCH - 1;
            if hash_head != 0 && self.s.prev_length < self.cfg.lazy && self.s.strstart - hash_head <= MAX_DIST {
                self.s.match_length = self.longest_match::<SPEC>(hash_head, walks);
                if self.s.match_length <= 5
                    && self.s.match_length == MIN_MATCH
                    && (self.s.strstart as u32).wrapping_sub(self.s.match_start) > TOO_FAR
                {
                    self.s.match_length = MIN_MATCH - 1;
                }
            }
            if self.s.prev_length >= MIN_MATCH && self.s.match_length <= self.s.prev_length {
                let max_insert = self.s.strstart + self.s.lookahead - MIN_MATCH;
                let bflush = self.tally_dist(
                    self.s.strstart - 1 - self.s.prev_match as usize,
                    self.s.prev_length - MIN_MATCH,
                );
                self.s.lookahead -= self.s.prev_length - 1;
                self.s.prev_length -= 2;
                loop {
                    self.s.strstart += 1;
                    if self.s.strstart <= max_insert {
                        self.insert::<SPEC>(self.s.strstart, walks);
                    }
                    self.s.prev_length -= 1;
                    if self.s.prev_length == 0 {
                        break;
                    }
                }
                self.s.match_available = false;
                self.s.match_length = MIN_MATCH - 1;
                self.s.strstart += 1;
                if bflush {
                    self.flush_block(false);
                }
            } else if self.s.match_available {
                let bflush = self.tally_lit(self.window[self.s.strstart - 1]);
                if bflush {
                    self.flush_block(false);
                }
                self.s.strstart += 1;
                self.s.lookahead -= 1;
            } else {
                self.s.match_available = true;
                self.s.strstart += 1;
                self.s.lookahead -= 1;
            }
        }
        if self.s.match_available {
            self.tally_lit(self.window[self.s.strstart - 1]);
            self.s.match_available = false;
        }
        self.flush_block(true);
    }
}

/// What a target-internal chain walk finds within one chain budget.
#[derive(Clone, Copy, Debug, Default)]
struct WalkPart {
    /// The longest match found (0: none), and where, relative to the target start: the first
    /// candidate reaching that length. The engine takes it only if it beats its start length.
    best: u16,
    at: u16,
    /// Candidates visited (≤ the budget).
    visited: u16,
    /// The walk stopped at a match ≥ nice_match.
    stopped: bool,
}

/// The target-internal part of the chain walk from one target position.
#[derive(Clone, Copy, Debug, Default)]
struct Walk {
    /// With the level's full chain budget, and with the quarter budget used after a good match.
    full: WalkPart,
    quarter: WalkPart,
    /// The first (NONE: none) and the last (oldest) target position on the chain.
    first: u16,
    last: u16,
}

/// No target position (targets are at most MAX_DIST bytes).
const NONE: u16 = u16::MAX;

/// Per-target precomputation for the slow levels (4–9), reused for every source the target is
/// paired with (see [`Deflater::primed_len_walked`]).
///
/// At a position p of y in x ⊕ y, longest_match walks p's hash chain newest first: first y's own
/// earlier positions with that hash, then x's. Levels 4–9 insert every position whatever the parse,
/// so the y part of the chain, and the match length against each of its candidates (bytes of y and
/// the zeros after it), depend on y alone. The walk keeps the first candidate that beats the running
/// best, so from a start length b its y part ends at the last prefix maximum within the budget if
/// that beats b — or stops at the first prefix maximum ≥ nice_match when b < nice_match. The budget
/// is the level's chain length or a quarter of it; nice_match is min(nice, y.len() − j). This stores,
/// per position j, that outcome for both budgets (20 bytes per target byte). The parse-dependent
/// start length and the x part of the chain stay with the engine.
///
/// The same tables give each position's predecessor on its chain inside y, so with walks the
/// engine does not keep the hash heads for y's positions at all (see `insert_walked`): at a position
/// whose hash has no earlier occurrence in y, the head still holds the last one before y.
pub struct TargetWalks {
    level: i32,
    /// The target itself, so that walks can only be applied to the target they were built for.
    target: Vec<u8>,
    walks: Vec<Walk>,
}

impl TargetWalks {
    /// Largest target handled: its internal match distances stay below MAX_DIST, so the engine's
    /// distance limit never cuts the y part of a chain.
    pub const MAX_LEN: usize = MAX_DIST;

    /// The target these walks were built for.
    pub fn target(&self) -> &[u8] {
        &self.target
    }

    /// Memory held per target byte: one walk entry and the target's copy.
    pub const BYTES_PER_TARGET_BYTE: usize = std::mem::size_of::<Walk>() + 1;

    /// The walks of target `y` at `level`; None for levels 1–3 (their insertions depend on the
    /// parse) and for targets longer than [`Self::MAX_LEN`].
    pub fn new(y: &[u8], level: i32) -> Option<Self> {
        if !(4..=9).contains(&level) || y.len() > Self::MAX_LEN {
            return None;
        }
        let cfg = CONFIG[level as usize];
        let n = y.len();
        // y and then the zeros primed_len writes after it: a compare reads up to 258 bytes past p.
        let mut buf = Vec::with_capacity(n + MAX_MATCH + 1);
        buf.extend_from_slice(y);
        buf.resize(n + MAX_MATCH + 1, 0);
        let mut head = vec![NONE; HASH_SIZE];
        let mut prev = vec![NONE; n];
        let mut walks = vec![Walk { first: NONE, ..Walk::default() }; n];
        let quarter_budget = cfg.chain >> 2;
        // Positions j ≤ n − 3 are inserted (their 3 bytes are in y) and may start a walk.
        for j in 0..n.saturating_sub(MIN_MATCH - 1) {
            let h = (((buf[j] as usize) << 10) ^ ((buf[j + 1] as usize) << 5) ^ (buf[j + 2] as usize)) & HASH_MASK;
            prev[j] = head[h];
            head[h] = j as u16;
            if prev[j] == NONE {
                continue;
            }
            let nice = cfg.nice.min(n - j);
            let scan = &buf[j..j + MAX_MATCH];
            let (mut best, mut at, mut visited, mut stopped) = (0usize, 0usize, 0usize, false);
            let mut quarter = None;
            let mut c = prev[j];
            let mut last = c;
            while c != NONE && visited < cfg.chain {
                if visited == quarter_budget {
                    quarter = Some(WalkPart { best: best as u16, at: at as u16, visited: visited as u16, stopped: false });
                }
                let ci = c as usize;
                let len = common_prefix(scan, &buf[ci..ci + MAX_MATCH]);
                visited += 1;
                last = c;
                if len > best {
                    (best, at) = (len, ci);
                    if len >= nice {
                        stopped = true;
                        break;
                    }
                }
                c = prev[ci];
            }
            let full = WalkPart { best: best as u16, at: at as u16, visited: visited as u16, stopped };
            walks[j] = Walk { full, quarter: quarter.unwrap_or(full), first: prev[j], last };
        }
        Some(TargetWalks { level, target: y.to_vec(), walks })
    }
}

/// Length of the common prefix of two equal-length slices, 8 bytes at a time.
#[inline(always)]
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().unwrap()) ^ u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}
