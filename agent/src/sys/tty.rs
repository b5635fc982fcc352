//! Terminal ioctls on descriptors the agent holds (its copies of a task's
//! pty ends, or pty ends it created for a restore).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `struct termios2`, as TCGETS2 fills it.
pub type Termios2 = libc::termios2;

/// `struct winsize`.
pub type Winsize = libc::winsize;

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An ioctl that reads one int.
fn get_int(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    // SAFETY: every request passed here writes exactly one int into `v`,
    // which outlives the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut libc::c_int) })?;
    Ok(v)
}

/// An ioctl that takes a pointer to one int.
fn set_int(fd: BorrowedFd<'_>, req: libc::Ioctl, v: libc::c_int) -> io::Result<()> {
    // SAFETY: every request passed here reads one int from the pointer,
    // which points to a live local.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, &v as *const libc::c_int) })
}

/// TCGETS2: the terminal's settings (a master reports its slave's).
pub fn get_termios(fd: BorrowedFd<'_>) -> io::Result<Termios2> {
    // SAFETY: termios2 is plain old data; all-zero is a valid value.
    let mut t: Termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one struct termios2 into `t`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, &mut t as *mut Termios2) })?;
    Ok(t)
}

/// TCSETS2: sets the terminal's settings at once.
pub fn set_termios(fd: BorrowedFd<'_>, t: &Termios2) -> io::Result<()> {
    // SAFETY: TCSETS2 reads one struct termios2 from `t`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCSETS2, t as *const Termios2) })
}

/// TIOCGWINSZ.
pub fn get_winsize(fd: BorrowedFd<'_>) -> io::Result<Winsize> {
    let mut w = Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one struct winsize into `w`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut w as *mut Winsize) })?;
    Ok(w)
}

/// TIOCSWINSZ.
pub fn set_winsize(fd: BorrowedFd<'_>, w: &Winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ reads one struct winsize from `w`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, w as *const Winsize) })
}

/// TIOCGPTN: the index of a pty master's slave.
pub fn pty_index(master: BorrowedFd<'_>) -> io::Result<u32> {
    get_int(master, libc::TIOCGPTN).map(|v| v as u32)
}

/// TIOCGPTLCK: whether the slave is locked (unlockpt not yet called).
pub fn pty_locked(master: BorrowedFd<'_>) -> io::Result<bool> {
    get_int(master, libc::TIOCGPTLCK).map(|v| v != 0)
}

/// TIOCSPTLCK.
pub fn set_pty_locked(master: BorrowedFd<'_>, locked: bool) -> io::Result<()> {
    set_int(master, libc::TIOCSPTLCK, i32::from(locked))
}

/// TIOCGPKT: whether the master is in packet mode.
pub fn packet_mode(master: BorrowedFd<'_>) -> io::Result<bool> {
    get_int(master, libc::TIOCGPKT).map(|v| v != 0)
}

/// TIOCPKT.
pub fn set_packet_mode(master: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    set_int(master, libc::TIOCPKT, i32::from(on))
}

/// FIONREAD: bytes waiting to be read at this end.
pub fn input_queued(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_int(fd, libc::FIONREAD).map(|v| v as u32)
}

/// TIOCOUTQ: bytes written at this end and not yet sent on.
pub fn output_queued(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_int(fd, libc::TIOCOUTQ).map(|v| v as u32)
}

/// TIOCSPGRP on the agent's own controlling terminal, with SIGTTOU
/// blocked for the call (the agent may be in a background group).
pub fn set_foreground(fd: BorrowedFd<'_>, pgrp: i32) -> io::Result<()> {
    use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old))?;
    let r = set_int(fd, libc::TIOCSPGRP, pgrp);
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
    r
}

/// Whether a descriptor is a terminal.
pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only reads the descriptor number.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}
