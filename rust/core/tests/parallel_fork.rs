//! A process forked after lmkern's pool started (a DataLoader worker; multiprocessing's default on
//! Linux) has none of the pool's threads: work sent to them never finished. The child must build a
//! pool of its own, of the parent's size. Its own binary: the test sets the process's thread count.
#![cfg(unix)]
use lmkern_core::parallel::{for_each_task, num_threads, set_num_threads, SERIAL_BELOW};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Sum 0..64 over the pool (each task sleeps so that the pool's threads take some of them).
fn pool_sum() -> usize {
    let total = AtomicUsize::new(0);
    for_each_task(64, SERIAL_BELOW, |t| {
        std::thread::sleep(Duration::from_micros(200));
        total.fetch_add(t, Ordering::Relaxed);
    });
    total.into_inner()
}

/// Run `f` in a forked child; its exit status (0 when `f` is true), or None when it hung.
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

#[test]
fn a_forked_child_gets_a_pool_of_its_own() {
    let want = (0..64).sum::<usize>();
    set_num_threads(3);
    assert_eq!(pool_sum(), want);
    // Work on the pool from another thread while forking: the lock is free in the child.
    let busy = std::thread::spawn(|| (0..50).all(|_| pool_sum() == (0..64).sum::<usize>()));
    for _ in 0..5 {
        let status = in_child(|| {
            num_threads() == 3
                && pool_sum() == want
                // and its own child, forked from a pool built after a fork
                && in_child(|| pool_sum() == want) == Some(0)
        });
        assert_eq!(status, Some(0), "the child's pool work {}", if status.is_none() { "hung" } else { "failed" });
    }
    assert!(busy.join().unwrap());
    assert_eq!(num_threads(), 3);
    assert_eq!(pool_sum(), want);
}
