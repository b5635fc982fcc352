//! Cases with pipes, eventfd and epoll inside one process, and a unix
//! socket, which the engine does not support yet: the unix_socket case
//! serves the bad-input test (a dump must refuse it and leave the process
//! running).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::util::*;
use crate::Ctx;

/// A thread blocked in read() on an empty pipe, fed after the restore.
pub fn read_blocking(ctx: &Ctx) -> CaseResult {
    let mut p = [0i32; 2];
    // SAFETY: out-array of two fds.
    cvt(unsafe { libc::pipe2(p.as_mut_ptr(), 0) }, "pipe2")?;
    let (rd, wr) = (p[0], p[1]);
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name("zdtm-reader".into())
        .spawn(move || -> Result<Vec<u8>, String> {
            block(&[libc::SIGTERM]);
            let _ = tx.send(gettid());
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: buf is 64 bytes.
                let n = unsafe { libc::read(rd, buf.as_mut_ptr() as *mut libc::c_void, 64) };
                if n >= 0 {
                    return Ok(buf[..n as usize].to_vec());
                }
                if errno() != libc::EINTR {
                    return Err(os_err("read"));
                }
            }
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let tid = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "reader did not start")?;
    wait_in_syscall(tid, libc::SYS_read)?;
    ctx.ready_and_wait()?;
    let msg = b"wake up";
    // SAFETY: writes a static buffer.
    let n = unsafe { libc::write(wr, msg.as_ptr() as *const libc::c_void, msg.len()) };
    if n != msg.len() as isize {
        return Err(os_err("write pipe"));
    }
    if !wait_until(Duration::from_secs(5), || h.is_finished()) {
        return Err("reader not woken by the write".into());
    }
    let got = h.join().map_err(|_| "reader panicked")??;
    let mut c = Check::new();
    c.eq("data read", &msg[..], &got[..]);
    c.finish()
}

static EPOLL_TIMEOUTS: AtomicU32 = AtomicU32::new(0);

/// A thread looping in epoll_wait with a timeout on an empty epoll set.
pub fn epoll_wait(ctx: &Ctx) -> CaseResult {
    // SAFETY: no pointers.
    let ep = cvt(unsafe { libc::epoll_create1(0) }, "epoll_create1")?;
    let stop = std::sync::Arc::new(StopFlag::new());
    let stop2 = stop.clone();
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name("zdtm-epoll".into())
        .spawn(move || -> CaseResult {
            block(&[libc::SIGTERM]);
            let _ = tx.send(gettid());
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            while !stop2.get() {
                // SAFETY: room for one event.
                let n = unsafe { libc::syscall(libc::SYS_epoll_wait, ep, &mut ev, 1, 100) };
                match n {
                    0 => {
                        EPOLL_TIMEOUTS.fetch_add(1, Ordering::SeqCst);
                    }
                    n if n > 0 => return Err("event on an empty epoll set".into()),
                    _ if errno() == libc::EINTR => {}
                    _ => return Err(os_err("epoll_wait")),
                }
            }
            Ok(())
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let tid = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "epoll thread did not start")?;
    wait_in_syscall(tid, libc::SYS_epoll_wait)?;
    ctx.ready_and_wait()?;
    let n = EPOLL_TIMEOUTS.load(Ordering::SeqCst);
    let mut c = Check::new();
    c.ok(
        "epoll_wait keeps timing out every 100 ms",
        wait_until(Duration::from_secs(2), || {
            EPOLL_TIMEOUTS.load(Ordering::SeqCst) >= n + 2
        }),
    );
    stop.set();
    if !wait_until(Duration::from_secs(5), || h.is_finished()) {
        c.fail("epoll thread did not finish");
        return c.finish();
    }
    c.res(
        h.join()
            .unwrap_or_else(|_| Err("epoll thread panicked".into())),
    );
    c.finish()
}

/// Descriptor numbers of the socket pair; the bad-input test looks for them
/// in the dump's error.
pub const SOCK_FDS: [i32; 2] = [40, 41];

/// A unix stream socket pair with data queued in one direction.
pub fn unix_socket(ctx: &Ctx) -> CaseResult {
    let mut sv = [0i32; 2];
    // SAFETY: out-array of two fds, then moved to fixed numbers.
    unsafe {
        cvt(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()),
            "socketpair",
        )?;
        for (from, to) in sv.iter().zip(SOCK_FDS) {
            cvt(libc::dup2(*from, to), "dup2")?;
            libc::close(*from);
        }
    }
    let [a, b] = SOCK_FDS;
    let send = |fd: i32, m: &[u8]| -> CaseResult {
        // SAFETY: valid buffer.
        let n = unsafe { libc::write(fd, m.as_ptr() as *const libc::c_void, m.len()) };
        if n == m.len() as isize {
            Ok(())
        } else {
            Err(os_err("socket write"))
        }
    };
    let recv = |fd: i32| -> Result<Vec<u8>, String> {
        let mut buf = [0u8; 16];
        // SAFETY: valid buffer; MSG_DONTWAIT so a lost queue fails, not hangs.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                16,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(os_err("socket read"));
        }
        Ok(buf[..n as usize].to_vec())
    };
    send(a, b"ping")?;
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq("queued data", b"ping".to_vec(), recv(b)?);
    send(b, b"pong")?;
    c.eq("reply", b"pong".to_vec(), recv(a)?);
    c.finish()
}

/// A pipe holding data (bigger than default, read end non-blocking), a
/// semaphore eventfd with a count, and an epoll watching both.
pub fn pipe_eventfd_epoll(ctx: &Ctx) -> CaseResult {
    let mut p = [0i32; 2];
    // SAFETY: out-array of two fds.
    cvt(
        unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK) },
        "pipe2",
    )?;
    let (rd, wr) = (p[0], p[1]);
    // SAFETY: integer fcntl.
    cvt(
        unsafe { libc::fcntl(wr, libc::F_SETPIPE_SZ, 256 * 1024) },
        "F_SETPIPE_SZ",
    )?;
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: writes from a live buffer.
    let n = unsafe { libc::write(wr, data.as_ptr() as *const libc::c_void, data.len()) };
    if n != data.len() as isize {
        return Err(os_err("write pipe"));
    }
    // SAFETY: no pointers.
    let efd = cvt(unsafe { libc::eventfd(42, libc::EFD_SEMAPHORE) }, "eventfd")?;
    // SAFETY: no pointers.
    let ep = cvt(unsafe { libc::epoll_create1(0) }, "epoll_create1")?;
    for (fd, tag) in [(rd, 0xabcu64), (efd, 0xdefu64)] {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: tag,
        };
        // SAFETY: ev is a valid epoll_event.
        cvt(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
            "epoll_ctl",
        )?;
    }
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    // SAFETY: integer fcntls.
    c.eq("pipe size", 256 * 1024, unsafe {
        libc::fcntl(rd, libc::F_GETPIPE_SZ)
    });
    // SAFETY: integer fcntl.
    let fl = unsafe { libc::fcntl(rd, libc::F_GETFL) };
    c.ok("read end still O_NONBLOCK", fl & libc::O_NONBLOCK != 0);
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: room for 4 events.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 1000) };
    let mut tags: Vec<u64> = evs[..n.max(0) as usize].iter().map(|e| e.u64).collect();
    tags.sort_unstable();
    c.eq("epoll ready tags", vec![0xabcu64, 0xdef], tags);
    let mut buf = vec![0u8; 8192];
    // SAFETY: reads into a live buffer.
    let got = unsafe { libc::read(rd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    c.eq("pipe bytes", data.len() as isize, got);
    c.ok("pipe content", got > 0 && buf[..got as usize] == data[..]);
    let mut v = 0u64;
    // SAFETY: eventfd reads 8 bytes.
    unsafe { libc::read(efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
    c.eq("semaphore eventfd read", 1, v);
    let mut left = 0;
    for _ in 0..50 {
        // SAFETY: eventfd reads 8 bytes; non-blocking after count drains is
        // not set, so stop at 41 reads.
        unsafe { libc::read(efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        left += 1;
        if left == 41 {
            break;
        }
    }
    c.eq("eventfd count drained", 41, left);
    c.finish()
}
