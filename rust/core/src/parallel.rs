//! The CPU thread pool. One rayon pool owned by lmkern, rebuilt when the user sets a thread count,
//! so the count can change at run time (rayon's global pool cannot).
use std::sync::{Arc, RwLock};

/// The pool, or None before first use. If the OS refuses threads, kernels run on the caller's thread.
static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

fn build(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("lmkern-{i}"))
        .build()
        .ok()
        .map(Arc::new)
}

/// Set the number of CPU threads the kernels use (at least 1).
pub fn set_num_threads(threads: usize) {
    let mut guard = POOL.write().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().map(|p| p.current_num_threads()) != Some(threads.max(1)) {
        *guard = build(threads);
    }
}

/// The number of CPU threads the kernels use.
pub fn num_threads() -> usize {
    pool().map_or(1, |p| p.current_num_threads())
}

fn pool() -> Option<Arc<rayon::ThreadPool>> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Some(p.clone());
    }
    let mut guard = POOL.write().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = build(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    guard.clone()
}

/// Elements below which a kernel runs on the calling thread: waking the pool costs more than the work.
pub const SERIAL_BELOW: usize = 1 << 15;

/// Run `f(t)` for every task `t` in `0..tasks`: on the calling thread when `elems` (the work, in
/// elements) is small, else on the calling thread and lmkern's pool together, each taking the next
/// task from a shared counter (see [`run_with_caller`]). Tasks must be independent.
pub fn for_each_task(tasks: usize, elems: usize, f: impl Fn(usize) + Sync + Send) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    run_with_caller(tasks.saturating_sub(1), elems, || loop {
        let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if t >= tasks {
            break;
        }
        f(t);
    });
}

/// Run `f` on the calling thread and on `helpers` jobs of lmkern's pool at once (all of them when
/// `elems` is large enough), returning when every copy has returned. For work that the copies
/// share out themselves (an atomic counter): the caller starts at once instead of sleeping until
/// a pool thread has woken, which on a VM costs ~0.1–0.2 ms per call.
pub fn run_with_caller(helpers: usize, elems: usize, f: impl Fn() + Sync + Send) {
    match pool() {
        Some(pool) if helpers > 0 && elems >= SERIAL_BELOW && pool.current_num_threads() > 1 => {
            let f = &f;
            pool.in_place_scope(|s| {
                for _ in 0..helpers.min(pool.current_num_threads() - 1) {
                    s.spawn(move |_| f());
                }
                f();
            });
        }
        _ => f(),
    }
}
