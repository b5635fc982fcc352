//! Tasks caught inside a system call: they must resume with the kernel's
//! restart semantics.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use crate::util::*;
use crate::Ctx;

const SEC: i128 = 1_000_000_000;

fn ts(ns: i128) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / SEC) as i64,
        tv_nsec: (ns % SEC) as i64,
    }
}

/// Sleeps `ns` with the raw nanosleep syscall, resuming after EINTR with
/// the remaining time; fails if it returns before its monotonic deadline.
fn sleep_full(ns: i128) -> CaseResult {
    let deadline = monotonic_ns() + ns;
    let mut req = ts(ns);
    loop {
        let mut rem = ts(0);
        // SAFETY: valid timespec pointers.
        let r = unsafe { libc::syscall(libc::SYS_nanosleep, &req, &mut rem) };
        if r == 0 {
            break;
        }
        if errno() != libc::EINTR {
            return Err(os_err("nanosleep"));
        }
        req = rem;
    }
    let now = monotonic_ns();
    if now < deadline {
        return Err(format!(
            "nanosleep returned {} ms early",
            (deadline - now) / 1_000_000
        ));
    }
    Ok(())
}

/// A thread inside a 3 s nanosleep and the main thread inside 1 s
/// clock_nanosleeps at checkpoint time: neither may wake early.
pub fn nanosleep(ctx: &Ctx) -> CaseResult {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name("zdtm-nanosleep".into())
        .spawn(move || {
            block(&[libc::SIGTERM]);
            let _ = tx.send(gettid());
            sleep_full(3 * SEC)
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let tid = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "sleeper did not start")?;
    wait_in_syscall(tid, libc::SYS_nanosleep)?;
    ctx.ready()?;
    let mut c = Check::new();
    while !ctx.stopping() {
        let start = monotonic_ns();
        let req = ts(SEC);
        // SAFETY: valid timespec; a relative sleep on CLOCK_MONOTONIC.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clock_nanosleep,
                libc::CLOCK_MONOTONIC,
                0,
                &req,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if r == 0 && monotonic_ns() < start + SEC {
            c.fail(format!(
                "main clock_nanosleep returned {} ms early",
                (start + SEC - monotonic_ns()) / 1_000_000
            ));
        } else if r != 0 && errno() != libc::EINTR {
            c.fail(os_err("clock_nanosleep"));
            break;
        }
    }
    if !wait_until(Duration::from_secs(10), || h.is_finished()) {
        c.fail("sleeping thread did not finish within 10 s");
        return c.finish();
    }
    c.res(h.join().unwrap_or_else(|_| Err("sleeper panicked".into())));
    c.finish()
}

static WORD: AtomicU32 = AtomicU32::new(0);
static WORD_TIMED: AtomicU32 = AtomicU32::new(0);

fn futex(word: &AtomicU32, op: i32, val: u32, timeout: *const libc::timespec, mask: u32) -> i64 {
    // SAFETY: the word is a live static; other pointers are valid or NULL.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            val,
            timeout,
            std::ptr::null::<u32>(),
            mask,
        )
    }
}

/// Waits on `word` until it becomes non-zero; `abs_timeout` (monotonic)
/// selects FUTEX_WAIT_BITSET with an absolute timeout.
fn futex_waiter(word: &'static AtomicU32, abs_timeout: Option<i128>) -> CaseResult {
    while word.load(Ordering::SeqCst) == 0 {
        let r = match abs_timeout {
            None => futex(
                word,
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0,
                std::ptr::null(),
                0,
            ),
            Some(t) => {
                let t = ts(t);
                let op = libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG;
                futex(word, op, 0, &t, u32::MAX)
            }
        };
        if r < 0 {
            match errno() {
                libc::EINTR | libc::EAGAIN => {}
                libc::ETIMEDOUT => return Err("futex wait timed out (60 s deadline)".into()),
                _ => return Err(os_err("futex wait")),
            }
        }
    }
    Ok(())
}

/// Threads blocked in FUTEX_WAIT, in FUTEX_WAIT_BITSET with an absolute
/// timeout, and on a condvar, woken by the main thread after the restore.
pub fn futex_wait(ctx: &Ctx) -> CaseResult {
    let cv = Arc::new((Mutex::new(false), Condvar::new()));
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for kind in 0..3 {
        let (cv, tx) = (cv.clone(), tx.clone());
        let deadline = monotonic_ns() + 60 * SEC;
        let h = std::thread::Builder::new()
            .name(format!("zdtm-futex-{kind}"))
            .spawn(move || {
                block(&[libc::SIGTERM]);
                let _ = tx.send(gettid());
                match kind {
                    0 => futex_waiter(&WORD, None),
                    1 => futex_waiter(&WORD_TIMED, Some(deadline)),
                    _ => {
                        let (m, c) = &*cv;
                        let mut woken = m.lock().unwrap();
                        while !*woken {
                            woken = c.wait(woken).unwrap();
                        }
                        Ok(())
                    }
                }
            })
            .map_err(|e| format!("spawn: {e}"))?;
        let tid = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "waiter did not start")?;
        wait_in_syscall(tid, libc::SYS_futex)?;
        handles.push(h);
    }

    ctx.ready_and_wait()?;

    WORD.store(1, Ordering::SeqCst);
    WORD_TIMED.store(1, Ordering::SeqCst);
    futex(
        &WORD,
        libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
        1,
        std::ptr::null(),
        0,
    );
    futex(
        &WORD_TIMED,
        libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
        1,
        std::ptr::null(),
        0,
    );
    {
        let (m, c) = &*cv;
        *m.lock().unwrap() = true;
        c.notify_all();
    }
    let mut c = Check::new();
    for (i, h) in handles.into_iter().enumerate() {
        if !wait_until(Duration::from_secs(5), || h.is_finished()) {
            c.fail(format!("waiter {i} not woken within 5 s"));
            continue;
        }
        c.res(
            h.join()
                .unwrap_or_else(|_| Err(format!("waiter {i} panicked"))),
        );
    }
    c.finish()
}
