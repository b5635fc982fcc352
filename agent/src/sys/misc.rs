//! Small syscalls without a nix wrapper that takes another process.

use std::io;

/// Reads (and with `new`, sets) resource limit `resource` of process `pid`.
pub fn prlimit(pid: i32, resource: i32, new: Option<(u64, u64)>) -> io::Result<(u64, u64)> {
    let newlim = new.map(|(cur, max)| libc::rlimit64 {
        rlim_cur: cur,
        rlim_max: max,
    });
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let newp = newlim
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const libc::rlimit64);
    // SAFETY: newp is null or points to a live rlimit64; old is a valid out-pointer.
    let r = unsafe { libc::prlimit64(pid, resource as _, newp, &mut old) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// Reads the nice value of process `pid`.
pub fn getpriority(pid: i32) -> io::Result<i32> {
    nix::errno::Errno::clear();
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::getpriority(libc::PRIO_PROCESS, pid as libc::id_t) };
    if r == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Sets the nice value of process `pid`.
pub fn setpriority(pid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps a whole file read-only.
pub fn mmap_readonly(file: &std::fs::File) -> io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and image files are not modified
    // while the agent reads them (a truncation would SIGBUS, not corrupt).
    unsafe { memmap2::Mmap::map(file) }
}
