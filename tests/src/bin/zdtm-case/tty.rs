//! Terminals: a pty pair inside the tree (a child runs on the slave as its
//! controlling terminal), and a case attached to the caller's terminal
//! (`--shell-job`, driven by tests/tests/shell_job.rs).

use std::time::{Duration, Instant};

use crate::util::*;
use crate::Ctx;

fn termios(fd: i32) -> Result<libc::termios, String> {
    // SAFETY: tcgetattr fills a zeroed struct.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        cvt(libc::tcgetattr(fd, &mut t), "tcgetattr")?;
        Ok(t)
    }
}

/// The termios fields a restore must keep, comparable.
fn termios_key(t: &libc::termios) -> (u32, u32, u32, u32, Vec<u8>, u32, u32) {
    // SAFETY: reading speeds from a valid termios.
    let (i, o) = unsafe { (libc::cfgetispeed(t), libc::cfgetospeed(t)) };
    (
        t.c_iflag,
        t.c_oflag,
        t.c_cflag,
        t.c_lflag,
        t.c_cc.to_vec(),
        i,
        o,
    )
}

fn winsize(fd: i32) -> Result<(u16, u16, u16, u16), String> {
    let mut w = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills w.
    cvt(
        unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) },
        "TIOCGWINSZ",
    )?;
    Ok((w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel))
}

fn int_ioctl(fd: i32, req: libc::Ioctl, what: &str) -> Result<i32, String> {
    let mut v: libc::c_int = 0;
    // SAFETY: these requests write one int.
    cvt(unsafe { libc::ioctl(fd, req, &mut v) }, what)?;
    Ok(v)
}

/// Writes `msg` to `fd` and reads until `want` arrived (2 s at most).
fn exchange(fd: i32, msg: &[u8], want: &[u8]) -> Result<(), String> {
    // SAFETY: msg is a valid buffer.
    let n = unsafe { libc::write(fd, msg.as_ptr() as *const libc::c_void, msg.len()) };
    if n != msg.len() as isize {
        return Err(os_err("write to the pty master"));
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::new();
    while !got.windows(want.len()).any(|w| w == want) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "sent {:?}, wanted {:?}, got {:?}",
                String::from_utf8_lossy(msg),
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(&got)
            ));
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        if unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 256];
        // SAFETY: buf is 256 bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            return Err(os_err("read from the pty master"));
        }
        got.extend_from_slice(&buf[..n as usize]);
    }
    Ok(())
}

/// The child's view of its terminal as the parent sees it: tty_nr, tpgid
/// and session from /proc/CHILD/stat.
fn ctty_of(pid: i32) -> (String, String, String) {
    let f = stat_fields(&format!("/proc/{pid}/stat"));
    let at = |i: usize| f.get(i).cloned().unwrap_or_default();
    (at(7), at(8), at(6))
}

/// Child: session leader on the slave, answers what it reads uppercased.
fn run_echo_child(master: i32, slave: i32) -> ! {
    // SAFETY: raw syscalls in the forked child, then _exit.
    unsafe {
        libc::close(master);
        if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
            libc::_exit(3);
        }
        libc::dup2(slave, 0);
        libc::dup2(slave, 1);
        libc::close(slave);
        let mut buf = [0u8; 256];
        loop {
            let n = libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
            if n <= 0 {
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(0);
            }
            let n = n as usize;
            buf[..n].make_ascii_uppercase();
            libc::write(1, buf.as_ptr() as *const libc::c_void, n);
        }
    }
}

/// A pty pair inside the tree: raw mode with a custom VMIN, a window size,
/// a child that made the slave its controlling terminal in a new session
/// and echoes uppercased; the pty index, termios, window size and the
/// child's terminal must come back, and the echo must work again.
pub fn pty_pair(ctx: &Ctx) -> CaseResult {
    // SAFETY: plain pty calls on our own descriptors.
    let (master, slave) = unsafe {
        let m = cvt(
            libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY),
            "posix_openpt",
        )?;
        cvt(libc::grantpt(m), "grantpt")?;
        cvt(libc::unlockpt(m), "unlockpt")?;
        let mut name = [0 as libc::c_char; 64];
        cvt(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), "ptsname")?;
        let s = cvt(
            libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY),
            "open slave",
        )?;
        (m, s)
    };
    let mut t = termios(slave)?;
    // SAFETY: cfmakeraw edits a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cc[libc::VMIN] = 2;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: tcsetattr reads a valid termios; TIOCSWINSZ reads one winsize.
    unsafe {
        cvt(libc::tcsetattr(slave, libc::TCSANOW, &t), "tcsetattr")?;
        let w = libc::winsize {
            ws_row: 37,
            ws_col: 123,
            ws_xpixel: 5,
            ws_ypixel: 7,
        };
        cvt(libc::ioctl(slave, libc::TIOCSWINSZ, &w), "TIOCSWINSZ")?;
    }
    // SAFETY: the child only makes raw syscalls.
    let child = unsafe { libc::fork() };
    if child == 0 {
        run_echo_child(master, slave);
    }
    // SAFETY: closing our copy of the slave: the child holds it.
    unsafe { libc::close(slave) };
    let stop_child = || {
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
    };
    let index = int_ioctl(master, libc::TIOCGPTN, "TIOCGPTN")?;
    if let Err(e) = exchange(master, b"before", b"BEFORE") {
        stop_child();
        return Err(format!("echo before the checkpoint: {e}"));
    }
    let before = (
        termios_key(&termios(master)?),
        winsize(master)?,
        index,
        ctty_of(child),
        int_ioctl(master, libc::TIOCGPGRP, "TIOCGPGRP")?,
        int_ioctl(master, libc::TIOCGPTLCK, "TIOCGPTLCK")?,
    );
    if before.3 .2 != child.to_string() || before.4 != child {
        stop_child();
        return Err(format!(
            "child {child} does not lead its session on the pty: {before:?}"
        ));
    }
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.res(exchange(master, b"after", b"AFTER").map_err(|e| format!("echo after: {e}")));
    c.eq("termios", before.0, termios_key(&termios(master)?));
    c.eq("window size", before.1, winsize(master)?);
    c.eq(
        "pty index",
        before.2,
        int_ioctl(master, libc::TIOCGPTN, "TIOCGPTN")?,
    );
    c.eq("child's tty_nr, tpgid, session", before.3, ctty_of(child));
    c.eq(
        "foreground group (TIOCGPGRP)",
        before.4,
        int_ioctl(master, libc::TIOCGPGRP, "TIOCGPGRP")?,
    );
    c.eq(
        "lock (TIOCGPTLCK)",
        before.5,
        int_ioctl(master, libc::TIOCGPTLCK, "TIOCGPTLCK")?,
    );
    // Closing the master hangs the child's terminal up.
    // SAFETY: our own descriptor and child.
    let status = unsafe {
        libc::close(master);
        let mut st = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = libc::waitpid(child, &mut st, libc::WNOHANG);
            if r == child || Instant::now() > deadline {
                break if r == child { Some(st) } else { None };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    match status {
        // The hangup sends SIGHUP to the session's controlling process.
        Some(st) if libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGHUP => {}
        Some(st) if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 => {}
        other => {
            stop_child();
            c.fail(format!("echo child ended with {other:?}"));
        }
    }
    c.finish()
}

/// For `--shell-job`: the case runs on a terminal outside the tree (its
/// stdio, its controlling terminal) and answers each line it reads with
/// "ECHO:" and the line uppercased. Before and after the checkpoint its
/// controlling terminal is the one on its stdin, and its group is that
/// terminal's foreground group.
pub fn shell_job(ctx: &Ctx) -> CaseResult {
    let check_terminal = || -> CaseResult {
        // SAFETY: fstat into a local.
        let rdev = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            cvt(libc::fstat(0, &mut st), "fstat stdin")?;
            st.st_rdev
        };
        let f = stat_fields("/proc/self/stat");
        let tty_nr: u64 = f.get(7).and_then(|v| v.parse().ok()).unwrap_or(0);
        let (maj, min) = (libc::major(rdev) as u64, libc::minor(rdev) as u64);
        let want = (maj << 8) | (min & 0xff) | ((min & !0xff) << 12);
        if tty_nr != want {
            return Err(format!(
                "controlling terminal tty_nr {tty_nr:#x} is not stdin's {maj}:{min}"
            ));
        }
        // SAFETY: no pointers.
        let (fg, me) = unsafe { (libc::tcgetpgrp(0), libc::getpgrp()) };
        if fg != me {
            return Err(format!("foreground group {fg}, ours {me}"));
        }
        Ok(())
    };
    check_terminal().map_err(|e| format!("before: {e}"))?;
    ctx.ready()?;
    let mut line = Vec::new();
    while !ctx.stopping() {
        let mut p = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 256];
        // SAFETY: buf is 256 bytes.
        let n = unsafe { libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            continue;
        }
        for &b in &buf[..n as usize] {
            if b == b'\n' || b == b'\r' {
                if !line.is_empty() {
                    let mut out = b"ECHO:".to_vec();
                    out.extend(line.iter().map(u8::to_ascii_uppercase));
                    out.push(b'\n');
                    // SAFETY: out is a valid buffer.
                    unsafe { libc::write(1, out.as_ptr() as *const libc::c_void, out.len()) };
                    line.clear();
                }
            } else {
                line.push(b);
            }
        }
    }
    check_terminal().map_err(|e| format!("after: {e}"))
}
