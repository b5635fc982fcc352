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

/// Files mapped read-only one after the other in one range of the address
/// space, read as one slice: a pages file split into segments.
#[derive(Debug)]
pub struct FilesMap {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the range is read-only shared file memory owned by this value
// alone; reading it from several threads is sound.
unsafe impl Send for FilesMap {}
// SAFETY: as above; nothing mutates through a shared reference.
unsafe impl Sync for FilesMap {}

impl std::ops::Deref for FilesMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: addr..addr+len is mapped readable for the life of self.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Drop for FilesMap {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by mmap_files and belongs to self.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Maps `files`, each `(file, length)`, read-only one after the other;
/// every length but the last must be a multiple of the page size, and
/// their sum not zero. Each file must hold its length (checked); like any
/// file mapping, one truncated later faults (SIGBUS) where it is read:
/// image files are not changed while the agent reads them.
pub fn mmap_files(files: &[(&std::fs::File, u64)]) -> io::Result<FilesMap> {
    use std::os::fd::AsRawFd;
    let len: u64 = files.iter().map(|f| f.1).sum();
    if len == 0
        || files
            .iter()
            .rev()
            .skip(1)
            .any(|f| !f.1.is_multiple_of(4096))
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (f, flen) in files {
        if f.metadata()?.len() < *flen {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("a file is shorter than the {flen} bytes to map"),
            ));
        }
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // Reserve the whole range first, so that the files land contiguously.
    // SAFETY: a fresh anonymous, inaccessible mapping; no pointer is given.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // Unmaps the reservation if a file fails to map.
    let map = FilesMap { addr, len };
    let mut at = 0usize;
    for &(file, flen) in files {
        let flen = flen as usize;
        if flen == 0 {
            continue;
        }
        // SAFETY: MAP_FIXED replaces only pages of our own reservation
        // (at + flen <= len); the file is mapped read-only and shared.
        let r = unsafe {
            libc::mmap(
                (addr as *mut u8).add(at) as *mut libc::c_void,
                flen,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        at += flen;
    }
    Ok(map)
}

/// Maps a whole file read-only.
pub fn mmap_readonly(file: &std::fs::File) -> io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and image files are not modified
    // while the agent reads them (a truncation would SIGBUS, not corrupt).
    unsafe { memmap2::Mmap::map(file) }
}

/// Copies the bytes buffered in a pipe without consuming them (tee into a
/// pipe of our own, then read that), given a descriptor of its read end.
pub fn pipe_peek(read_end: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let n = readable_bytes(read_end)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    // tee copies whole buffers: our pipe gets as many slots as the source,
    // so one call takes everything the source holds.
    let capacity = nix::fcntl::fcntl(read_end, nix::fcntl::FcntlArg::F_GETPIPE_SZ)?;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(capacity))?;
    let got = nix::fcntl::tee(read_end, &w, n, nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK)?;
    if got != n {
        return Err(io::Error::other(format!(
            "tee copied {got} of the pipe's {n} bytes"
        )));
    }
    let mut out = vec![0u8; n];
    let mut read = 0;
    while read < n {
        read += nix::unistd::read(&r, &mut out[read..])?;
    }
    Ok(out)
}

/// Opens (O_PATH) the file a file handle names, on the filesystem of
/// `mount_fd` (open_by_handle_at; needs CAP_DAC_READ_SEARCH).
pub fn open_by_handle(
    mount_fd: std::os::fd::BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // struct file_handle: handle_bytes u32, handle_type i32, f_handle[].
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&handle_type.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: buf holds a complete file_handle for the kernel to read.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            buf.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// Reads and drops whatever a descriptor has ready (FIONREAD bytes),
/// without blocking.
pub fn drain_readable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let n = readable_bytes(fd)?;
    if n > 0 {
        let mut buf = vec![0u8; n];
        nix::unistd::read(fd, &mut buf)?;
    }
    Ok(())
}

/// How many bytes a descriptor has ready to read (FIONREAD).
pub fn readable_bytes(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a valid pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Brings the loopback interface of the calling thread's network namespace
/// up (a new namespace starts with it down). Raw syscalls only, no
/// allocation: safe in a freshly forked child.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket/ioctl/close with a stack ifreq that outlives the calls.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[..3].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char, 0]);
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(s);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// The address family of socket `fd` (SO_DOMAIN).
pub fn socket_domain(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<i32> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out-pointers of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// accept4(SOCK_CLOEXEC) on a listening socket: the new connection's end.
pub fn accept(listener: std::os::fd::BorrowedFd<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: no address is asked for (null pointers are allowed).
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
