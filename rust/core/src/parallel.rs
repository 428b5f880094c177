//! The CPU thread pool. One rayon pool owned by lmkern, rebuilt when the user sets a thread count,
//! so the count can change at run time (rayon's global pool cannot).
//!
//! A process forked after the pool was built (a DataLoader worker, multiprocessing's default on
//! Linux) has none of its threads: work sent to it would wait forever. Fork handlers keep the lock
//! free across the fork, and the child drops the dead pool (leaked, never touched) for a new one
//! of the same size, built on first use.
use std::sync::{Arc, RwLock};

struct State {
    /// The thread count set by the user, or the dead parent pool's in a forked child; 0: the
    /// machine's parallelism.
    wanted: usize,
    /// The pool, or None before first use. If the OS refuses threads, kernels run on the caller's
    /// thread.
    pool: Option<Arc<rayon::ThreadPool>>,
}

static STATE: RwLock<State> = RwLock::new(State { wanted: 0, pool: None });

fn lock_state() -> std::sync::RwLockWriteGuard<'static, State> {
    STATE.write().unwrap_or_else(|e| e.into_inner())
}

fn build(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    fork::register();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("lmkern-{i}"))
        .build()
        .ok()
        .map(Arc::new)
}

/// Set the number of CPU threads the kernels use (at least 1).
pub fn set_num_threads(threads: usize) {
    let mut state = lock_state();
    state.wanted = threads.max(1);
    if state.pool.as_ref().map(|p| p.current_num_threads()) != Some(state.wanted) {
        state.pool = build(state.wanted);
    }
}

/// The number of CPU threads the kernels use.
pub fn num_threads() -> usize {
    pool().map_or(1, |p| p.current_num_threads())
}

fn pool() -> Option<Arc<rayon::ThreadPool>> {
    if let Some(p) = STATE.read().unwrap_or_else(|e| e.into_inner()).pool.as_ref() {
        return Some(p.clone());
    }
    let mut state = lock_state();
    if state.pool.is_none() {
        let threads = match state.wanted {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        state.pool = build(threads);
    }
    state.pool.clone()
}

#[cfg(unix)]
mod fork {
    use super::{lock_state, State};
    use std::cell::RefCell;
    use std::sync::RwLockWriteGuard;

    thread_local! {
        /// The pool lock, held by the forking thread from just before fork() until just after it
        /// (the parent and child handlers run on that thread), so no other thread holds it when
        /// the process is copied.
        static HELD: RefCell<Option<RwLockWriteGuard<'static, State>>> = const { RefCell::new(None) };
    }

    extern "C" fn prepare() {
        let guard = lock_state();
        HELD.with(|h| *h.borrow_mut() = Some(guard));
    }

    extern "C" fn parent() {
        HELD.with(|h| h.borrow_mut().take());
    }

    extern "C" fn child() {
        HELD.with(|h| {
            if let Some(mut state) = h.borrow_mut().take() {
                if let Some(dead) = state.pool.take() {
                    if state.wanted == 0 {
                        state.wanted = dead.current_num_threads();
                    }
                    // Dropping would signal threads that do not exist here, through locks they may
                    // have held at the fork.
                    std::mem::forget(dead);
                }
            }
        });
    }

    /// Install the handlers, once per process (a forked child inherits them).
    pub(super) fn register() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: the three handlers are `extern "C" fn()` without arguments that live as long
            // as the program, as pthread_atfork requires; they only take and release STATE's lock.
            // A failure (ENOMEM) leaves fork as it was before: nothing to undo.
            unsafe {
                libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
            }
        });
    }
}

#[cfg(not(unix))]
mod fork {
    pub(super) fn register() {}
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
