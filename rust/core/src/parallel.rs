//! The CPU thread pool. One rayon pool owned by lmkern, rebuilt when the user sets a thread count,
//! so the count can change at run time (rayon's global pool cannot); or, once
//! [`share_openmp_runtime`] has named one, the threads of an OpenMP runtime already loaded in the
//! process (the one torch's CPU ops run on), so that the two libraries do not fight over the cores.
//!
//! A process forked after the pool was built (a DataLoader worker, multiprocessing's default on
//! Linux) has none of its threads: work sent to it would wait forever. Fork handlers keep the lock
//! free across the fork, and the child drops the dead pool (leaked, never touched) for a new one
//! of the same size, built on first use.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

struct State {
    /// The thread count set by the user, or the dead parent pool's in a forked child; 0: the
    /// machine's parallelism.
    wanted: usize,
    /// The pool, or None before first use. If the OS refuses threads, kernels run on the caller's
    /// thread.
    pool: Option<Arc<Pool>>,
}

/// lmkern's rayon pool, and its helper jobs not started yet.
struct Pool {
    rayon: rayon::ThreadPool,
    /// Helper jobs queued and not yet started (see [`run_with_caller`]): while other calls keep
    /// the threads busy, new calls queue no more than the pool could start at once.
    queued: AtomicUsize,
}

static STATE: RwLock<State> = RwLock::new(State { wanted: 0, pool: None });

fn lock_state() -> std::sync::RwLockWriteGuard<'static, State> {
    STATE.write().unwrap_or_else(|e| e.into_inner())
}

/// A pool of `threads`; call [`fork::register`] first, outside the lock.
fn build(threads: usize) -> Option<Arc<Pool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("lmkern-{i}"))
        .build()
        .ok()
        .map(|rayon| Arc::new(Pool { rayon, queued: AtomicUsize::new(0) }))
}

/// Set the number of CPU threads the kernels use (at least 1). The new pool is started outside the
/// lock (thousands of threads take seconds): kernels keep running on the old one meanwhile.
pub fn set_num_threads(threads: usize) {
    let threads = threads.max(1);
    fork::register();
    {
        let mut state = lock_state();
        state.wanted = threads;
        if state.pool.as_ref().map(|p| p.rayon.current_num_threads()) == Some(threads) {
            return;
        }
        if openmp_entry().is_some() {
            // The OpenMP runtime's teams take the count per call; lmkern's own pool is built (at
            // this size) only if the sharing stops (a forked child).
            let old = state.pool.take();
            drop(state);
            drop(old);
            return;
        }
    }
    let mut pool = build(threads);
    let mut state = lock_state();
    if state.wanted == threads {
        // A call that set another count meanwhile installs its own pool instead.
        std::mem::swap(&mut state.pool, &mut pool);
    }
    drop(state);
    drop(pool); // the old pool's threads are told to stop, outside the lock
}

/// The number of CPU threads the kernels use.
pub fn num_threads() -> usize {
    if openmp_entry().is_some() {
        return wanted_threads();
    }
    pool().map_or(1, |p| p.rayon.current_num_threads())
}

/// The thread count set by the user, else the machine's parallelism.
fn wanted_threads() -> usize {
    match STATE.read().unwrap_or_else(|e| e.into_inner()).wanted {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

fn pool() -> Option<Arc<Pool>> {
    if let Some(p) = STATE.read().unwrap_or_else(|e| e.into_inner()).pool.as_ref() {
        return Some(p.clone());
    }
    // Before the lock: a fork while another thread registers must not find the lock held.
    fork::register();
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
    use std::sync::atomic::{AtomicBool, Ordering};
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
        // The OpenMP runtime's threads are not copied either, and its pool state would send work to
        // them: the child's kernels run on a pool of lmkern's own.
        super::stop_sharing_openmp();
        HELD.with(|h| {
            if let Some(mut state) = h.borrow_mut().take() {
                if let Some(dead) = state.pool.take() {
                    if state.wanted == 0 {
                        state.wanted = dead.rayon.current_num_threads();
                    }
                    // Dropping would signal threads that do not exist here, through locks they may
                    // have held at the fork.
                    std::mem::forget(dead);
                }
            }
        });
    }

    /// Install the handlers, once per process (a forked child inherits them). A flag, not a
    /// `Once`: a fork while another thread registers must not leave the child a `Once` that never
    /// completes (glibc serializes pthread_atfork with fork itself).
    pub(super) fn register() {
        static DONE: AtomicBool = AtomicBool::new(false);
        if !DONE.load(Ordering::Acquire) && !DONE.swap(true, Ordering::AcqRel) {
            // SAFETY: the three handlers are `extern "C" fn()` without arguments that live as long
            // as the program, as pthread_atfork requires; they only take and release STATE's lock.
            // A failure (ENOMEM) leaves fork as it was before: nothing to undo.
            unsafe {
                libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
            }
        }
    }
}

#[cfg(not(unix))]
mod fork {
    pub(super) fn register() {}
}

/// How a long call learns that its caller wants it to stop (Ctrl-C): its tasks ask [`Stop::requested`]
/// before each starts; on the thread that made the call, at most every `every_ms`, that asks the
/// caller's `poll` (the Python glue's takes the GIL to run Python's signal handlers, which only
/// that thread may do). Once `poll` has said yes, every later task is skipped.
pub struct Stop<'a> {
    poll: &'a (dyn Fn() -> bool + Sync),
    caller: std::thread::ThreadId,
    start: std::time::Instant,
    every_ms: u64,
    /// Milliseconds since `start` at which the calling thread polls next (written by it alone).
    next_ms: std::sync::atomic::AtomicU64,
    stopped: AtomicBool,
}

impl<'a> Stop<'a> {
    /// How far apart [`Stop::new`]'s polls are: a call shorter than this never polls.
    pub const EVERY_MS: u64 = 50;

    /// Made on the thread that makes the call.
    pub fn new(poll: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Self::every(poll, Self::EVERY_MS)
    }

    /// Polling every `ms` milliseconds (0: before every task the calling thread takes).
    pub fn every(poll: &'a (dyn Fn() -> bool + Sync), ms: u64) -> Self {
        Stop {
            poll,
            caller: std::thread::current().id(),
            start: std::time::Instant::now(),
            every_ms: ms,
            next_ms: std::sync::atomic::AtomicU64::new(ms),
            stopped: AtomicBool::new(false),
        }
    }

    /// Never asks to stop.
    pub fn never() -> Stop<'static> {
        Stop::every(&never_stop, u64::MAX)
    }

    /// Whether the call should stop (asking `poll` when it is the calling thread's turn).
    pub fn requested(&self) -> bool {
        if self.stopped.load(Ordering::Relaxed) {
            return true;
        }
        if std::thread::current().id() == self.caller {
            let now = self.start.elapsed().as_millis() as u64;
            if now >= self.next_ms.load(Ordering::Relaxed) {
                self.next_ms.store(now.saturating_add(self.every_ms), Ordering::Relaxed);
                if (self.poll)() {
                    self.stopped.store(true, Ordering::Relaxed);
                }
            }
        }
        self.stopped.load(Ordering::Relaxed)
    }

    /// Whether some task saw a stop request (the call's result is then incomplete).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

fn never_stop() -> bool {
    false
}

/// Elements below which a kernel runs on the calling thread: waking the pool costs more than the work.
pub const SERIAL_BELOW: usize = 1 << 15;

/// Run `f(t)` for every task `t` in `0..tasks`: on the calling thread when `elems` (the work, in
/// elements) is small, else on the calling thread and lmkern's pool (or the shared OpenMP runtime's
/// threads) together, each taking the next
/// task from a shared counter (see [`run_with_caller`]). Tasks must be independent.
pub fn for_each_task(tasks: usize, elems: usize, f: impl Fn(usize) + Sync + Send) {
    for_each_task_with(tasks, elems, || (), |t, _| f(t));
}

/// [`for_each_task`] with a scratch value made by `init` once per thread taking part and handed
/// to each of its tasks (buffers a task would otherwise allocate and fault in again).
pub fn for_each_task_with<S>(tasks: usize, elems: usize, init: impl Fn() -> S + Sync + Send,
                             f: impl Fn(usize, &mut S) + Sync + Send) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    run_with_caller(tasks.saturating_sub(1), elems, || {
        let mut scratch = init();
        loop {
            let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if t >= tasks {
                break;
            }
            f(t, &mut scratch);
        }
    });
}

/// Run `f` on the calling thread and on up to `helpers` threads of lmkern's pool at once (all of
/// them when `elems` is large enough), returning when every copy that started has returned. For work
/// that the copies share out themselves (an atomic counter): the caller starts at once instead of
/// sleeping until a pool thread has woken, which on a VM costs ~0.1–0.2 ms per call, and it never
/// waits for a helper that has not started: when other calls keep the pool busy (threads of a
/// server calling lmkern at once), a small call does its work alone instead of queueing behind
/// theirs (a 0.4 ms norm waited 3.4 s behind two exponent searches). With an OpenMP runtime shared
/// ([`share_openmp_runtime`]) the helpers are its threads instead: `f` runs as a parallel region of
/// up to `helpers` + 1 threads, which ends when all of them have run it.
pub fn run_with_caller(helpers: usize, elems: usize, f: impl Fn() + Sync + Send) {
    if let Some(entry) = openmp_entry() {
        let threads = wanted_threads().min(helpers.saturating_add(1));
        if threads > 1 && elems >= SERIAL_BELOW {
            return run_on_openmp(entry, threads, &f);
        }
        return f();
    }
    let pool = match pool() {
        Some(pool) if helpers > 0 && elems >= SERIAL_BELOW && pool.rayon.current_num_threads() > 1 => pool,
        _ => return f(),
    };
    // No more helpers than the pool could start now: jobs still queued from calls that the busy
    // threads have not reached count against it (each would only find its call closed).
    let threads = pool.rayon.current_num_threads();
    let helpers = helpers.min(threads - 1).min(threads.saturating_sub(pool.queued.load(Ordering::Relaxed)));
    if helpers == 0 {
        return f();
    }
    let f: &(dyn Fn() + Sync) = &f;
    // SAFETY: only the lifetime is erased. Helpers call f only between entering (before the call
    // is closed) and leaving, and this function does not return, or unwind, before it has closed
    // the call and every helper that entered has left: f outlives every use.
    let f: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(f as *const (dyn Fn() + Sync + '_)) };
    let call = Arc::new(Call { state: AtomicUsize::new(0), caller: std::thread::current(), panicked: AtomicBool::new(false), f });
    pool.queued.fetch_add(helpers, Ordering::Relaxed);
    for _ in 0..helpers {
        let (call, queue) = (call.clone(), pool.clone());
        pool.rayon.spawn(move || {
            queue.queued.fetch_sub(1, Ordering::Relaxed);
            call.help()
        });
    }
    // SAFETY: f is alive: it is this function's argument.
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*call.f)() }));
    call.state.fetch_or(CLOSED, Ordering::AcqRel);
    while call.state.load(Ordering::Acquire) != CLOSED {
        std::thread::park(); // the last helper to leave unparks this thread
    }
    if let Err(payload) = mine {
        std::panic::resume_unwind(payload);
    }
    if call.panicked.load(Ordering::Relaxed) {
        panic!("lmkern: a kernel task panicked on a pool thread");
    }
}

/// `GOMP_parallel(fn, data, num_threads, flags)`: the GNU OpenMP interface's parallel region, which
/// libgomp, Intel's libiomp5 and LLVM's libomp all export. It runs fn(data) on a team of num_threads
/// threads, the calling thread one of them, and returns when every one has returned.
type GompParallel = unsafe extern "C" fn(unsafe extern "C" fn(*mut std::ffi::c_void), *mut std::ffi::c_void, u32, u32);

/// The shared runtime's `GOMP_parallel` (0: none, lmkern's own pool), and the runtime's path.
static OPENMP: AtomicUsize = AtomicUsize::new(0);
static OPENMP_PATH: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn openmp_entry() -> Option<GompParallel> {
    match OPENMP.load(Ordering::Acquire) {
        0 => None,
        // SAFETY: a nonzero value is the address of GOMP_parallel in a runtime that stays loaded
        // (share_openmp_runtime keeps its handle open), stored from a function of this type.
        a => Some(unsafe { std::mem::transmute::<usize, GompParallel>(a) }),
    }
}

/// Run the kernels' parallel work on the threads of the OpenMP runtime at `path`, which must already
/// be loaded in the process (it is looked up, never loaded: the point is to share the runtime another
/// library's threads already come from). torch's CPU ops run on its OpenMP threads, which spin for
/// a while after each parallel op: a pool of lmkern's own then waits for the cores they hold (an
/// lmkern GEMV right after a torch matmul ran at half speed), while the same threads take an OpenMP
/// team's work at once. Calls then go as OpenMP parallel regions: the calling thread and up to
/// [`num_threads`] − 1 of the runtime's threads (a calling thread outside any team gets a team of its
/// own, so calls from several threads do not queue behind each other; one inside a team runs alone,
/// as nested regions do by default), sharing out the tasks as before, each region ending when every
/// thread of its team has. A forked child stops sharing (the runtime's threads are not copied) and
/// builds a pool of its own.
#[cfg(unix)]
pub fn share_openmp_runtime(path: &str) -> Result<(), String> {
    let c_path = std::ffi::CString::new(path).map_err(|_| format!("{path:?}: contains a NUL byte"))?;
    // SAFETY: a NUL-terminated path; RTLD_NOLOAD returns a handle only for a library already loaded
    // (running no initializer), or null.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Err(format!("{path}: not loaded in this process"));
    }
    // SAFETY: a valid handle and a NUL-terminated name.
    let entry = unsafe { libc::dlsym(handle, c"GOMP_parallel".as_ptr()) };
    if entry.is_null() {
        // SAFETY: the handle dlopen returned, closed once.
        unsafe { libc::dlclose(handle) };
        return Err(format!("{path}: no GOMP_parallel in it (not an OpenMP runtime with the GNU interface)"));
    }
    // The handle stays open: the runtime cannot be unloaded while its entry is stored.
    fork::register();
    *OPENMP_PATH.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.to_string());
    OPENMP.store(entry as usize, Ordering::Release);
    let old = lock_state().pool.take(); // its threads stop (outside the lock): no longer used
    drop(old);
    Ok(())
}

/// Sharing needs dlopen: on other systems the kernels keep lmkern's own pool.
#[cfg(not(unix))]
pub fn share_openmp_runtime(path: &str) -> Result<(), String> {
    Err(format!("{path}: sharing an OpenMP runtime needs dlopen (Unix only)"))
}

/// Go back to lmkern's own pool (built on the next call that needs it).
pub fn stop_sharing_openmp() {
    OPENMP.store(0, Ordering::Release);
}

/// The path of the OpenMP runtime the kernels share ([`share_openmp_runtime`]), or None when they
/// run on lmkern's own pool.
pub fn shared_openmp_runtime() -> Option<String> {
    openmp_entry()?;
    OPENMP_PATH.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `f` on an OpenMP team of `threads` threads, the caller's included; a panic in any copy reaches
/// the caller (the first one's payload) once the region has ended.
fn run_on_openmp(entry: GompParallel, threads: usize, f: &(dyn Fn() + Sync)) {
    struct Region<'a> {
        f: &'a (dyn Fn() + Sync),
        panic: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }
    unsafe extern "C" fn each_thread(data: *mut std::ffi::c_void) {
        // SAFETY: data is the Region that run_on_openmp passed; GOMP_parallel returns only after
        // every thread of the team has returned from this function, so it outlives every use.
        let region = unsafe { &*(data as *const Region) };
        // No unwinding across the runtime's C frames: a panic is caught here and carried over.
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(region.f)) {
            region.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
        }
    }
    let region = Region { f, panic: std::sync::Mutex::new(None) };
    let threads = u32::try_from(threads).unwrap_or(u32::MAX);
    // SAFETY: entry is GOMP_parallel of a loaded runtime (openmp_entry); each_thread catches every
    // panic, and region lives on this frame until the call has returned.
    unsafe { entry(each_thread, &region as *const Region as *mut std::ffi::c_void, threads, 0) };
    if let Some(payload) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(payload);
    }
}

/// [`Call::state`]: the caller has finished its copy of f; no helper may enter after this.
const CLOSED: usize = 1;
/// [`Call::state`]: one helper inside f.
const INSIDE: usize = 2;

/// One run_with_caller call, shared with its helper jobs (which may start after it returned).
struct Call {
    /// CLOSED bit, plus INSIDE per helper running f.
    state: AtomicUsize,
    caller: std::thread::Thread,
    panicked: AtomicBool,
    /// The caller's f, valid while the call is not closed or a helper is inside.
    f: *const (dyn Fn() + Sync + 'static),
}

// SAFETY: f points to a Sync closure, called only while valid (see run_with_caller).
unsafe impl Send for Call {}
unsafe impl Sync for Call {}

impl Call {
    /// A helper job: run f unless the caller has already closed the call.
    fn help(&self) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & CLOSED != 0 {
                return; // the work is done (or being finished by those inside): f may be gone
            }
            match self.state.compare_exchange_weak(s, s + INSIDE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        // SAFETY: entered before the close: the caller waits for this helper to leave.
        let f = unsafe { &*self.f };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            self.panicked.store(true, Ordering::Relaxed);
        }
        if self.state.fetch_sub(INSIDE, Ordering::AcqRel) == CLOSED | INSIDE {
            self.caller.unpark(); // the last one out after the close
        }
    }
}
