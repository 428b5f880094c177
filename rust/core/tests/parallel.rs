//! lmkern's CPU pool: calls from several threads at once, panics, and forked processes. Its own
//! binary: the tests set the process's thread count.
use lmkern_core::parallel::{for_each_task, num_threads, set_num_threads, SERIAL_BELOW};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The tests of this file, one at a time (they set the pool's size).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sum 0..64 over the pool (each task sleeps so that the pool's threads take some of them).
fn pool_sum() -> usize {
    pool_work().0
}

/// `pool_sum`, and how many of its tasks ran on lmkern's pool threads (not the caller's).
fn pool_work() -> (usize, usize) {
    let (total, on_pool) = (AtomicUsize::new(0), AtomicUsize::new(0));
    for_each_task(64, SERIAL_BELOW, |t| {
        std::thread::sleep(Duration::from_micros(500));
        total.fetch_add(t, Ordering::Relaxed);
        if std::thread::current().name().is_some_and(|n| n.starts_with("lmkern-")) {
            on_pool.fetch_add(1, Ordering::Relaxed);
        }
    });
    (total.into_inner(), on_pool.into_inner())
}

/// Every task ran once, and some on the pool's threads (a dead pool leaves the caller alone).
fn pool_works() -> bool {
    let (sum, on_pool) = pool_work();
    sum == (0..64).sum::<usize>() && on_pool > 0
}

/// Run `f` in a forked child; its exit status (0 when `f` is true), or None when it hung.
#[cfg(unix)]
fn in_child(f: impl FnOnce() -> bool) -> Option<i32> {
    // SAFETY: the child runs only `f` (lmkern's pool, allocation) and leaves with _exit, skipping
    // the parent's exit handlers; the parent only waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(false);
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid out pointer.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            return Some(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 });
        }
        if Instant::now() > deadline {
            // SAFETY: as above; reaps the child we kill.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process forked after lmkern's pool started (a DataLoader worker; multiprocessing's default on
/// Linux) has none of the pool's threads: work sent to them never finished. The child must build a
/// pool of its own, of the parent's size.
#[cfg(unix)]
#[test]
fn a_forked_child_gets_a_pool_of_its_own() {
    let _serial = serial();
    let want = (0..64).sum::<usize>();
    set_num_threads(3);
    assert!(pool_works());
    // Work on the pool from another thread while forking: the lock is free in the child.
    let busy = std::thread::spawn(|| (0..50).all(|_| pool_sum() == (0..64).sum::<usize>()));
    for _ in 0..5 {
        let status = in_child(|| {
            num_threads() == 3
                && pool_works()
                // and its own child, forked from a pool built after a fork
                && in_child(pool_works) == Some(0)
        });
        assert_eq!(status, Some(0), "the child's pool work {}", if status.is_none() { "hung" } else { "failed" });
    }
    assert!(busy.join().unwrap());
    assert_eq!(num_threads(), 3);
    assert_eq!(pool_sum(), want);
}

/// A short call does not wait for pool threads that other calls keep busy: it does its tasks alone
/// (it used to wait until a thread came free to run a helper job that then found nothing to do).
#[test]
fn a_short_call_does_not_queue_behind_long_ones() {
    let _serial = serial();
    set_num_threads(2); // one pool thread besides each caller
    std::thread::scope(|s| {
        let long = || {
            for_each_task(40, SERIAL_BELOW, |_| std::thread::sleep(Duration::from_millis(50)));
        };
        let a = s.spawn(long);
        let b = s.spawn(long);
        std::thread::sleep(Duration::from_millis(200)); // both long calls hold a pool thread now
        let t = Instant::now();
        let done = AtomicUsize::new(0);
        for_each_task(4, SERIAL_BELOW, |_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        let short = t.elapsed();
        assert_eq!(done.into_inner(), 4);
        assert!(!a.is_finished() || !b.is_finished(), "the long calls ended too soon to tell");
        a.join().unwrap();
        b.join().unwrap();
        assert!(short < Duration::from_millis(300), "the short call took {short:?} (the long ones ~1 s)");
    });
}

/// A task that panics, on the caller or on a pool thread, reaches the caller as a panic once every
/// helper has left; the pool keeps working.
#[test]
fn a_panicking_task_panics_the_caller() {
    let _serial = serial();
    set_num_threads(2);
    for bad in [0usize, 63] {
        let ran = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each_task(64, SERIAL_BELOW, |t| {
                std::thread::sleep(Duration::from_micros(300));
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(t != bad, "task {t} fails");
            })
        }));
        assert!(r.is_err(), "task {bad}'s panic was lost");
    }
    assert_eq!(pool_sum(), (0..64).sum::<usize>());
}

/// Many threads calling at once while the pool is resized: every call completes with every task run
/// once.
#[test]
fn concurrent_calls_and_resizes() {
    let _serial = serial();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let callers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..200 {
                        let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
                        for_each_task(97, SERIAL_BELOW, |t| {
                            hits[t].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                })
            })
            .collect();
        s.spawn(|| {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                set_num_threads(1 + k % 4);
                k += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        for c in callers {
            c.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
}
