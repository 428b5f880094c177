//! gzip-NCD and ZIP-FIT alignment (PAPERS.md §7).
//!
//! `C(s) = len(gzip.compress(s, compresslevel=level))` exactly as stock zlib computes it (18 bytes of
//! gzip framing + the raw deflate stream), `NCD(x, y) = (C(x⊕y) − min(C(x), C(y))) / max(C(x), C(y))`
//! with x (the source) first, and the ZIP-FIT alignment of a source to n targets
//! `1 − mean_j NCD(x, y_j)`.
//!
//! [`oracle`] drives the bundled stock zlib (the test oracle); [`engine`] is lmkern's length-only
//! deflate that reproduces its lengths exactly at levels 1..=9 and shares a source's work across
//! targets (priming). Level 0 (stored blocks, content-blind) goes to zlib itself, which only copies.
use crate::error::{Error, Result};
use crate::parallel;
use std::cell::RefCell;
use std::sync::Mutex;

pub mod engine;
pub mod oracle;
mod trees;

pub use engine::{Deflater, TargetWalks, SMALL_MAX};

pub use oracle::{zlib_gzip_size, zlib_version, GZIP_OVERHEAD};

/// `len(gzip.compress(data, compresslevel=level))`, level 0..=9.
pub fn gzip_size(data: &[u8], level: i32) -> Result<i64> {
    gzip_size_pair(data, &[], level)
}

/// `len(gzip.compress(a + b, compresslevel=level))` without building `a + b`.
pub fn gzip_size_pair(a: &[u8], b: &[u8], level: i32) -> Result<i64> {
    oracle::check_level(level)?;
    if a.len() + b.len() > u32::MAX as usize {
        return Err(Error::value(format!("data: expected at most {} bytes, got {}", u32::MAX, a.len() + b.len())));
    }
    if level == 0 {
        return if b.is_empty() { zlib_gzip_size(a, 0) } else { zlib_gzip_size(&[a, b].concat(), 0) };
    }
    Ok(with_engine(0, level, |e| GZIP_OVERHEAD + e.deflate_len(a, b) as i64))
}

thread_local! {
    /// Two engines per thread (one for single inputs, one for pairs too long to prime), reused
    /// across calls.
    static ENGINES: [RefCell<Option<Deflater>>; 2] = const { [RefCell::new(None), RefCell::new(None)] };
    /// Up to SOURCE_BLOCK engines per thread, each primed with one source of a block.
    static PRIMED: RefCell<Vec<Deflater>> = const { RefCell::new(Vec::new()) };
}

/// Sources scored together by one task: each target's bytes and walks are then used this many
/// times in a row while they are in cache, instead of once per pass over all targets.
const SOURCE_BLOCK: usize = 4;

/// Run `f` on `n` (≤ SOURCE_BLOCK) engines of this thread set to `level` (1..=9).
fn with_primed_engines<R>(n: usize, level: i32, f: impl FnOnce(&mut [Deflater]) -> R) -> R {
    PRIMED.with(|engines| {
        let mut engines = engines.borrow_mut();
        engines.retain(|e| e.level() == level);
        while engines.len() < n {
            engines.push(Deflater::new(level).expect("level checked by the caller"));
        }
        f(&mut engines[..n])
    })
}

/// Run `f` on this thread's engine `slot` (0 or 1) set to `level` (1..=9).
fn with_engine<R>(slot: usize, level: i32, f: impl FnOnce(&mut Deflater) -> R) -> R {
    ENGINES.with(|engines| {
        let mut cell = engines[slot].borrow_mut();
        if cell.as_ref().map(|e| e.level()) != Some(level) {
            *cell = Some(Deflater::new(level).expect("level checked by the caller"));
        }
        f(cell.as_mut().expect("engine set above"))
    })
}

/// [`gzip_size`] of every text, in parallel on lmkern's pool.
pub fn compressed_sizes<T: AsRef<[u8]> + Sync>(texts: &[T], level: i32) -> Result<Vec<i64>> {
    oracle::check_level(level)?;
    let out: Vec<Mutex<i64>> = (0..texts.len()).map(|_| Mutex::new(0)).collect();
    let bytes: usize = texts.iter().map(|t| t.as_ref().len()).sum();
    parallel::for_each_task(texts.len(), bytes, |i| {
        // Level is checked above and inputs above 4 GiB are the only other failure.
        let c = gzip_size(texts[i].as_ref(), level).unwrap_or(-1);
        *out[i].lock().unwrap_or_else(|e| e.into_inner()) = c;
    });
    let sizes: Vec<i64> = out.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
    if let Some(i) = sizes.iter().position(|&c| c < 0) {
        return Err(Error::value(format!("texts[{i}]: expected at most {} bytes (under 4 GiB), got {}", u32::MAX, texts[i].as_ref().len())));
    }
    Ok(sizes)
}

/// [`TargetWalks`] of every target that fits (in target order) within [`WALKS_BUDGET`], in parallel.
fn target_walks(targets: &[Vec<u8>], level: i32) -> Vec<Option<TargetWalks>> {
    let mut budget = WALKS_BUDGET;
    let chosen: Vec<bool> = targets
        .iter()
        .map(|t| {
            let bytes = TargetWalks::BYTES_PER_TARGET_BYTE * t.len();
            let fits = (4..=9).contains(&level) && t.len() <= TargetWalks::MAX_LEN && bytes <= budget;
            if fits {
                budget -= bytes;
            }
            fits
        })
        .collect();
    let slots: Vec<Mutex<Option<TargetWalks>>> = (0..targets.len()).map(|_| Mutex::new(None)).collect();
    let bytes: usize = targets.iter().map(|t| t.len()).sum();
    parallel::for_each_task(targets.len(), bytes * 64, |i| {
        if chosen[i] {
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = TargetWalks::new(&targets[i], level);
        }
    });
    slots.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect()
}

/// `(cxy - min(cx, cy)) / max(cx, cy)` with exact integers turned into f64 before one division,
/// bit-identical to the same Python expression.
#[inline]
pub fn ncd_value(cx: i64, cy: i64, cxy: i64) -> f64 {
    (cxy - cx.min(cy)) as f64 / cx.max(cy) as f64
}

/// `1 - acc / n` with `acc` summed left to right in plain f64, as `acc = 0.0; for v in ncds: acc += v`.
#[inline]
pub fn alignment_value(ncds: &[f64]) -> f64 {
    let mut acc = 0.0f64;
    for &v in ncds {
        acc += v;
    }
    1.0 - acc / ncds.len() as f64
}

/// Scores sources against a fixed set of targets: the targets' sizes are computed once, and each
/// source's compression work is shared across all targets.
pub struct NcdScorer {
    targets: Vec<Vec<u8>>,
    sizes: Vec<i64>,
    /// Each target's precomputed own-chain walks (levels 4–9, targets up to TargetWalks::MAX_LEN,
    /// within WALKS_BUDGET bytes in all).
    walks: Vec<Option<TargetWalks>>,
    level: i32,
    min_target_len: usize,
}

/// Memory the scorer may spend on [`TargetWalks`] (21 bytes per target byte); targets past it
/// are scored without (same results, slower).
const WALKS_BUDGET: usize = 256 << 20;

impl NcdScorer {
    /// Targets are byte strings (UTF-8 text already encoded); level 0..=9. An empty target set is
    /// allowed (NCD rows are empty) but has no alignment.
    pub fn new(targets: Vec<Vec<u8>>, level: i32) -> Result<Self> {
        oracle::check_level(level)?;
        let sizes = compressed_sizes(&targets, level)?;
        let min_target_len = targets.iter().map(|t| t.len()).min().unwrap_or(0);
        let walks = target_walks(&targets, level);
        Ok(NcdScorer { targets, sizes, walks, level, min_target_len })
    }

    pub fn n_targets(&self) -> usize {
        self.targets.len()
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// `C(y_j)` for every target.
    pub fn target_sizes(&self) -> &[i64] {
        &self.sizes
    }

    /// NCD rows of a block of sources (≤ SOURCE_BLOCK) against every target, into `rows` (each of
    /// length n_targets). Targets in the outer loop, the block's primed sources in the inner one.
    fn ncd_rows(&self, sources: &[&[u8]], rows: &mut [&mut [f64]]) -> Result<()> {
        let level = self.level;
        let cxs = sources.iter().map(|s| gzip_size(s, level)).collect::<Result<Vec<i64>>>()?;
        if level == 0 {
            for ((source, row), &cx) in sources.iter().zip(rows.iter_mut()).zip(&cxs) {
                for (j, (y, &cy)) in self.targets.iter().zip(&self.sizes).enumerate() {
                    row[j] = ncd_value(cx, cy, gzip_size_pair(source, y, 0)?);
                }
            }
            return Ok(());
        }
        with_primed_engines(sources.len(), level, |primed| {
            for (e, source) in primed.iter_mut().zip(sources) {
                // Every target long enough lets the prime run on speculatively to the end of x.
                e.prime_for(source, self.min_target_len);
            }
            for (j, (y, &cy)) in self.targets.iter().zip(&self.sizes).enumerate() {
                let walks = self.walks[j].as_ref();
                for (b, e) in primed.iter_mut().enumerate() {
                    let len = match walks {
                        Some(w) => e.primed_len_walked(w),
                        None => e.primed_len(y),
                    };
                    let cxy = match len {
                        Some(len) => GZIP_OVERHEAD + len as i64,
                        // Too long to prime: whole, on engine 1.
                        None => with_engine(1, level, |whole| GZIP_OVERHEAD + whole.deflate_len(sources[b], y) as i64),
                    };
                    rows[b][j] = ncd_value(cxs[b], cy, cxy);
                }
            }
        });
        Ok(())
    }

    /// Every source's NCD row, block by block (SOURCE_BLOCK sources per task) on lmkern's pool:
    /// `emit(i, row)` receives source i's row. Needs n_targets > 0. The first error is returned.
    fn score_blocks<T: AsRef<[u8]> + Sync>(&self, sources: &[T], emit: impl Fn(usize, &[f64]) + Sync) -> Result<()> {
        let nt = self.n_targets();
        debug_assert!(nt > 0);
        let err: Mutex<Option<Error>> = Mutex::new(None);
        parallel::for_each_task(sources.len().div_ceil(SOURCE_BLOCK), self.work(sources), |bi| {
            let block = &sources[bi * SOURCE_BLOCK..((bi + 1) * SOURCE_BLOCK).min(sources.len())];
            let block: Vec<&[u8]> = block.iter().map(|s| s.as_ref()).collect();
            let mut buf = vec![0.0f64; block.len() * nt];
            let mut rows: Vec<&mut [f64]> = buf.chunks_mut(nt).collect();
            match self.ncd_rows(&block, &mut rows) {
                Ok(()) => buf.chunks(nt).enumerate().for_each(|(b, row)| emit(bi * SOURCE_BLOCK + b, row)),
                Err(e) => *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e),
            }
        });
        match err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn check_sources<T: AsRef<[u8]>>(&self, sources: &[T]) -> Result<()> {
        let limit = u32::MAX as usize - self.targets.iter().map(|t| t.len()).max().unwrap_or(0);
        if let Some((i, s)) = sources.iter().enumerate().find(|(_, s)| s.as_ref().len() > limit) {
            return Err(Error::value(format!(
                "sources[{i}]: expected at most {limit} bytes (source + target under 4 GiB), got {}",
                s.as_ref().len()
            )));
        }
        Ok(())
    }

    /// NCD of every (source, target) pair, row-major `[sources.len(), n_targets]` into `out`.
    pub fn ncd_into<T: AsRef<[u8]> + Sync>(&self, sources: &[T], out: &mut [f64]) -> Result<()> {
        let nt = self.n_targets();
        if out.len() != sources.len() * nt {
            return Err(Error::value(format!(
                "out: expected {} float64 ({} sources x {nt} targets), got {}",
                sources.len() * nt,
                sources.len(),
                out.len()
            )));
        }
        self.check_sources(sources)?;
        if nt == 0 {
            return Ok(());
        }
        let rows: Vec<Mutex<&mut [f64]>> = out.chunks_mut(nt).map(Mutex::new).collect();
        self.score_blocks(sources, |i, row| rows[i].lock().unwrap_or_else(|e| e.into_inner()).copy_from_slice(row))
    }

    /// ZIP-FIT alignment `1 − mean_j NCD(source_i, y_j)` of every source into `out` (length
    /// sources.len()). Error when there are no targets (the mean is undefined).
    pub fn alignment_into<T: AsRef<[u8]> + Sync>(&self, sources: &[T], out: &mut [f64]) -> Result<()> {
        let nt = self.n_targets();
        if nt == 0 {
            return Err(Error::value("targets: expected at least one target for an alignment, got none"));
        }
        if out.len() != sources.len() {
            return Err(Error::value(format!("out: expected {} float64 (one per source), got {}", sources.len(), out.len())));
        }
        self.check_sources(sources)?;
        let cells: Vec<Mutex<&mut f64>> = out.iter_mut().map(Mutex::new).collect();
        // One block of rows per task, never the whole matrix.
        self.score_blocks(sources, |i, row| **cells[i].lock().unwrap_or_else(|e| e.into_inner()) = alignment_value(row))
    }

    /// Bytes the pairs touch, for the serial/parallel decision.
    fn work<T: AsRef<[u8]>>(&self, sources: &[T]) -> usize {
        let tbytes: usize = self.targets.iter().map(|t| t.len()).sum();
        sources.iter().map(|s| s.as_ref().len() * self.targets.len() + tbytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_are_kept_while_the_level_stays() {
        // The thread's engines are rebuilt only when the level changes, as Deflater::level says:
        // were they rebuilt on every call, sizes would stay right at a fraction of the speed, which
        // no size test sees.
        for level in 1..=9 {
            assert_eq!(Deflater::new(level).unwrap().level(), level);
        }
        let built = || engine::BUILT.with(|b| b.get());
        // Each step: (what it runs, how many engines it builds).
        let steps: [(&dyn Fn(), usize); 7] = [
            (&|| assert_eq!(with_engine(0, 6, |e| e.level()), 6), 1),
            (&|| assert_eq!(with_engine(0, 6, |e| e.level()), 6), 0),
            (&|| assert_eq!(with_engine(1, 6, |e| e.level()), 6), 1),
            (&|| assert_eq!(with_engine(0, 9, |e| e.level()), 9), 1),
            (&|| assert!(with_primed_engines(3, 6, |es| es.iter().all(|e| e.level() == 6))), 3),
            (&|| assert!(with_primed_engines(2, 6, |es| es.iter().all(|e| e.level() == 6))), 0),
            (&|| assert!(with_primed_engines(3, 9, |es| es.iter().all(|e| e.level() == 9))), 3),
        ];
        for (i, (step, builds)) in steps.iter().enumerate() {
            let before = built();
            step();
            assert_eq!(built() - before, *builds, "step {i}");
        }
    }
}
