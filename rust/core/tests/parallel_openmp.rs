//! lmkern's CPU work on a shared OpenMP runtime (`share_openmp_runtime`): here the system's
//! libgomp (GCC's runtime, which the C toolchain that links this crate brings), loaded by the test
//! as torch loads its own. Its own binary: sharing is a process-wide switch.
#![cfg(target_os = "linux")]
use lmkern_core::parallel::{
    for_each_task, num_threads, set_num_threads, share_openmp_runtime, shared_openmp_runtime, Stop, SERIAL_BELOW,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const GOMP: &str = "libgomp.so.1";

/// The tests of this file, one at a time, each with the runtime shared and 3 threads.
fn shared() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: a NUL-terminated library name; the handle is never closed (the library stays loaded).
    let handle = unsafe { libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null(), "libgomp.so.1 (GCC's OpenMP runtime) is needed by this test");
    share_openmp_runtime(GOMP).unwrap();
    set_num_threads(3);
    guard
}

/// lmkern's own pool threads in this process.
fn own_pool_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).unwrap().starts_with("lmkern-"))
        .count()
}

/// 64 tasks that sleep a little: (every task ran once, the distinct threads that ran them).
fn spread() -> (bool, usize) {
    let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
    let threads = Mutex::new(HashSet::new());
    for_each_task(64, SERIAL_BELOW, |t| {
        std::thread::sleep(Duration::from_micros(300));
        hits[t].fetch_add(1, Ordering::Relaxed);
        threads.lock().unwrap().insert(std::thread::current().id());
    });
    (hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), threads.into_inner().unwrap().len())
}

#[test]
fn a_runtime_not_loaded_or_without_the_gnu_entry_is_refused() {
    let _g = shared();
    let e = share_openmp_runtime("/nonexistent/libgomp.so.1").unwrap_err();
    assert!(e.contains("not loaded in this process"), "{e}");
    let e = share_openmp_runtime("libc.so.6").unwrap_err();
    assert!(e.contains("no GOMP_parallel"), "{e}");
    // A refusal leaves the sharing as it was.
    assert_eq!(shared_openmp_runtime().as_deref(), Some(GOMP));
}

/// The tasks run on the runtime's team (the caller and up to num_threads - 1 of its threads), each
/// once, and lmkern's own pool is never started.
#[test]
fn tasks_run_once_each_on_the_runtimes_threads() {
    let _g = shared();
    assert_eq!(num_threads(), 3);
    for _ in 0..20 {
        let (once, threads) = spread();
        assert!(once);
        assert!((2..=3).contains(&threads), "{threads} threads took part");
    }
    assert_eq!(own_pool_threads(), 0);
    set_num_threads(1);
    assert_eq!(spread(), (true, 1));
    set_num_threads(3);
}

/// A panic on the caller's thread or on a team thread reaches the caller once the region has ended;
/// later calls work.
#[test]
fn a_panicking_task_panics_the_caller() {
    let _g = shared();
    let caller = std::thread::current().id();
    for on_caller in [true, false] {
        let r = std::panic::catch_unwind(|| {
            for_each_task(64, SERIAL_BELOW, |_| {
                std::thread::sleep(Duration::from_micros(300));
                assert!((std::thread::current().id() == caller) != on_caller, "this task fails");
            })
        });
        let payload = r.expect_err("the task's panic was lost");
        let msg = payload.downcast_ref::<&str>().copied().or(payload.downcast_ref::<String>().map(String::as_str)).unwrap_or("");
        assert!(msg.contains("this task fails"), "{msg:?}");
    }
    assert!(spread().0);
}

/// Calls from several threads at once (each gets a team of its own) and a call from inside a task
/// (a nested region: it runs alone) all finish with every task run once.
#[test]
fn concurrent_and_nested_calls() {
    let _g = shared();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..100 {
                    let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
                    for_each_task(97, SERIAL_BELOW, |t| {
                        hits[t].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            });
        }
    });
    let inner = AtomicUsize::new(0);
    for_each_task(8, SERIAL_BELOW, |_| {
        for_each_task(16, SERIAL_BELOW, |t| {
            inner.fetch_add(t, Ordering::Relaxed);
        });
    });
    assert_eq!(inner.into_inner(), 8 * (0..16).sum::<usize>());
}

/// A long call's stop requests are polled on the calling thread (the team's master) only.
#[test]
fn stop_polls_on_the_calling_thread() {
    let _g = shared();
    let caller = std::thread::current().id();
    let (polls, elsewhere) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let poll = || {
        polls.fetch_add(1, Ordering::Relaxed);
        if std::thread::current().id() != caller {
            elsewhere.fetch_add(1, Ordering::Relaxed);
        }
        false
    };
    let stop = Stop::every(&poll, 0);
    let ran = AtomicUsize::new(0);
    for_each_task(64, SERIAL_BELOW, |_| {
        if !stop.requested() {
            std::thread::sleep(Duration::from_micros(300));
            ran.fetch_add(1, Ordering::Relaxed);
        }
    });
    assert_eq!(ran.into_inner(), 64);
    assert!(polls.into_inner() > 0);
    assert_eq!(elsewhere.into_inner(), 0);
}

/// A forked child has none of the runtime's threads: it stops sharing and builds a pool of its own
/// (the work used to wait for ever); the parent goes on sharing.
#[test]
fn a_forked_child_uses_a_pool_of_its_own() {
    let _g = shared();
    assert!(spread().0); // the runtime's team is started in the parent
    // SAFETY: the child runs lmkern's pool and allocation only, then leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = std::panic::catch_unwind(|| {
            let (once, threads) = spread();
            shared_openmp_runtime().is_none() && num_threads() == 3 && once && threads >= 2 && own_pool_threads() == 3
        });
        // SAFETY: ends the child without the parent's exit handlers.
        unsafe { libc::_exit(if ok.unwrap_or(false) { 0 } else { 1 }) };
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = 0;
    // SAFETY: pid is our child; status is a valid out pointer.
    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
        if Instant::now() > deadline {
            // SAFETY: as above; reaps the child we kill.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the child's work hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child's work failed");
    assert_eq!(shared_openmp_runtime().as_deref(), Some(GOMP));
    assert!(spread().0);
}
