//! pidfd_open and pidfd_getfd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Opens a pidfd for `pid`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Duplicates descriptor `fd` of the process behind `pidfd` into ours.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// KCMP_FILE: do two descriptors refer to the same open file description?
const KCMP_FILE: libc::c_int = 0;

/// Orders two open file descriptions of two processes (0 equal, 1 less,
/// 2 greater, as kcmp(2) defines), so fds can be grouped by what they share.
pub fn kcmp_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> io::Result<i32> {
    // SAFETY: no pointers are passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            KCMP_FILE,
            fd1 as libc::c_ulong,
            fd2 as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// What two processes may share, for kcmp.
#[derive(Debug, Clone, Copy)]
pub enum Shared {
    /// The address space (CLONE_VM, or a vfork in progress).
    Vm = 1,
    /// The fd table (CLONE_FILES).
    Files = 2,
}

/// Whether two processes share a kernel object of the given kind.
pub fn kcmp_shares(pid1: i32, pid2: i32, what: Shared) -> io::Result<bool> {
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, what as libc::c_int, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r == 0)
}
