//! Raw syscalls behind `ckpt-agent check`: probe children forked from a
//! multi-threaded agent, clone3 with set_tid in such a child, a seccomp
//! filter to read back, cpuid/xgetbv, PR_SET_MM_MAP, SysV IPC objects,
//! interface flags and the vdso move.
//!
//! The probes exercise the engine's own wrappers (ptrace, clone, pidfd,
//! pagemap) wherever those exist, so that `check` tests what dump and
//! restore really call; only what the engine has no use for lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, getppid, pipe2, read, write, ForkResult, Pid};

use super::clone;

/// Why talking to a probe child failed.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// A syscall on the parent side failed.
    #[error("pid {pid}: {what}: {errno}")]
    Sys {
        pid: i32,
        what: &'static str,
        errno: Errno,
    },
    /// The child did not answer in time.
    #[error("pid {pid}: timed out waiting for {what}")]
    Timeout { pid: i32, what: &'static str },
    /// The child ended before it answered.
    #[error("pid {pid}: child ended early ({status})")]
    Died { pid: i32, status: String },
}

/// What a multi-step probe child reports: the step it failed at (0 when all
/// went well), the errno at that point and up to six values.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// 0 on success, otherwise the number of the step that failed.
    pub step: u64,
    /// errno observed at the failing step.
    pub errno: Errno,
    /// Values the child measured.
    pub vals: [u64; 6],
}

/// The child's ends of its two pipes. Only raw syscalls happen behind it,
/// so it is usable right after fork in a multi-threaded process.
pub struct ChildIo {
    tx: OwnedFd,
    rx: OwnedFd,
}

impl ChildIo {
    /// Writes all of `buf` to the parent.
    pub fn send(&self, mut buf: &[u8]) -> bool {
        while !buf.is_empty() {
            match write(&self.tx, buf) {
                Ok(0) => return false,
                Ok(n) => buf = &buf[n..],
                Err(Errno::EINTR) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends up to 8 words to the parent in native byte order, in one
    /// write (atomic on a pipe).
    pub fn send_u64s(&self, vals: &[u64]) -> bool {
        let mut b = [0u8; 64];
        let n = vals.len().min(8);
        for (c, v) in b.chunks_exact_mut(8).zip(&vals[..n]) {
            c.copy_from_slice(&v.to_ne_bytes());
        }
        self.send(&b[..n * 8])
    }

    /// Reads exactly `buf.len()` bytes from the parent.
    pub fn recv_exact(&self, buf: &mut [u8]) -> bool {
        let mut got = 0;
        while got < buf.len() {
            match read(&self.rx, &mut buf[got..]) {
                Ok(0) => return false,
                Ok(n) => got += n,
                Err(Errno::EINTR) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads one word from the parent.
    pub fn recv_u64(&self) -> Option<u64> {
        let mut b = [0u8; 8];
        self.recv_exact(&mut b).then(|| u64::from_ne_bytes(b))
    }

    /// Sends a [`Report`] and returns the exit code that goes with it.
    pub fn report(&self, step: u64, errno: Errno, vals: &[u64]) -> i32 {
        let mut words = [0u64; 8];
        words[0] = step;
        words[1] = errno as i32 as u64;
        for (w, v) in words[2..].iter_mut().zip(vals) {
            *w = *v;
        }
        self.send_u64s(&words);
        step.min(100) as i32
    }

    /// Reports failure at `step` with the current errno.
    pub fn fail(&self, step: u64) -> i32 {
        self.report(step, Errno::last(), &[])
    }

    /// Waits for the parent to kill us.
    pub fn idle(&self) -> ! {
        loop {
            nix::unistd::pause();
        }
    }
}

/// A forked probe child, killed and reaped when dropped.
pub struct ProbeChild {
    pid: Pid,
    rx: OwnedFd,
    tx: OwnedFd,
    /// Set once reaped: the pid may then belong to someone else.
    status: Option<WaitStatus>,
}

/// Runs `body` in a forked child and `_exit`s with its return value.
///
/// `body` runs in the child of a possibly multi-threaded process: it must
/// restrict itself to raw syscalls (nix wrappers that do not allocate,
/// [`ChildIo`]) and must not take locks another thread could have held. The
/// child gets SIGKILL when the forking thread ends, as a safety net.
pub fn fork_child<F: FnOnce(&ChildIo) -> i32>(body: F) -> Result<ProbeChild, Errno> {
    let (p_rx, c_tx) = pipe2(OFlag::O_CLOEXEC)?;
    let (c_rx, p_tx) = pipe2(OFlag::O_CLOEXEC)?;
    let parent = getpid();
    // SAFETY: the child only runs `body`, which by this function's contract
    // makes async-signal-safe calls, and then `_exit`s without returning
    // into the parent's frames or running its destructors.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            drop(p_rx);
            drop(p_tx);
            set_pdeathsig_kill();
            // The parent may have died before PDEATHSIG was armed. In a new
            // PID namespace the parent is outside it and reads as 0.
            let pp = getppid();
            if pp != parent && pp.as_raw() != 0 {
                exit_now(1);
            }
            let io = ChildIo { tx: c_tx, rx: c_rx };
            let code =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&io))).unwrap_or(126);
            exit_now(code)
        }
        ForkResult::Parent { child } => Ok(ProbeChild {
            pid: child,
            rx: p_rx,
            tx: p_tx,
            status: None,
        }),
    }
}

/// Asks for SIGKILL when the parent (thread) of the caller ends.
pub fn set_pdeathsig_kill() {
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
}

/// Ends the calling process at once, skipping atexit handlers and stdio.
pub use super::clone::exit_now;

impl ProbeChild {
    /// The child's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    fn sys(&self, what: &'static str, errno: Errno) -> ChildError {
        ChildError::Sys {
            pid: self.pid.as_raw(),
            what,
            errno,
        }
    }

    /// Checks (without blocking) whether the child is gone, reaping it.
    fn check_alive(&mut self) -> Result<(), ChildError> {
        if let Some(st) = self.status {
            return Err(ChildError::Died {
                pid: self.pid.as_raw(),
                status: describe_status(&st),
            });
        }
        match waitpid(self.pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) => Ok(()),
            Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                self.status = Some(st);
                Err(ChildError::Died {
                    pid: self.pid.as_raw(),
                    status: describe_status(&st),
                })
            }
            Ok(_) => Ok(()),
            Err(e) => Err(self.sys("waitpid", e)),
        }
    }

    /// Reads exactly `buf.len()` bytes, giving up after `timeout`.
    ///
    /// EOF cannot be relied on (concurrent forks inherit the write end), so
    /// the child's liveness is polled between short waits.
    pub fn recv_exact(&mut self, buf: &mut [u8], timeout: Duration) -> Result<(), ChildError> {
        let deadline = Instant::now() + timeout;
        let mut got = 0;
        // Set once the child is seen gone: what it wrote before exiting is
        // still drained, and only then is its death an error.
        let mut dead: Option<ChildError> = None;
        while got < buf.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(ChildError::Timeout {
                    pid: self.pid.as_raw(),
                    what: "the child's answer",
                });
            }
            let slice = if dead.is_some() {
                Duration::ZERO
            } else {
                (deadline - now).min(Duration::from_millis(20))
            };
            let mut fds = [PollFd::new(self.rx.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(slice).unwrap_or(PollTimeout::ZERO);
            match nix::poll::poll(&mut fds, ms) {
                Ok(0) => {
                    if let Some(e) = dead {
                        return Err(e);
                    }
                    dead = self.check_alive().err();
                    continue;
                }
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(self.sys("poll", e)),
            }
            match read(&self.rx, &mut buf[got..]) {
                Ok(0) => {
                    if let Some(e) = dead {
                        return Err(e);
                    }
                    dead = self.check_alive().err();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(n) => got += n,
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(self.sys("read", e)),
            }
        }
        Ok(())
    }

    /// Reads `N` (at most 8) words from the child, without allocating so
    /// that a probe child can use it on its own children.
    pub fn recv_u64s<const N: usize>(&mut self, timeout: Duration) -> Result<[u64; N], ChildError> {
        const { assert!(N <= 8) };
        let mut bytes = [0u8; 64];
        self.recv_exact(&mut bytes[..N * 8], timeout)?;
        let mut out = [0u64; N];
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *o = u64::from_ne_bytes(c.try_into().expect("8-byte chunk"));
        }
        Ok(out)
    }

    /// Reads the child's [`Report`].
    pub fn report(&mut self, timeout: Duration) -> Result<Report, ChildError> {
        let w = self.recv_u64s::<8>(timeout)?;
        let mut vals = [0u64; 6];
        vals.copy_from_slice(&w[2..]);
        Ok(Report {
            step: w[0],
            errno: Errno::from_raw(w[1] as i32),
            vals,
        })
    }

    /// Reads the last [`Report`] of a child that exits by itself after it,
    /// and reaps it: the child then cleans up its own children rather than
    /// being killed mid-way and orphaning them.
    pub fn final_report(&mut self, timeout: Duration) -> Result<Report, ChildError> {
        let r = self.report(timeout)?;
        let _ = self.wait_exit(timeout);
        Ok(r)
    }

    /// Writes all of `buf` to the child.
    pub fn send(&self, mut buf: &[u8]) -> Result<(), ChildError> {
        while !buf.is_empty() {
            match write(&self.tx, buf) {
                Ok(n) => buf = &buf[n..],
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.sys("write", e)),
            }
        }
        Ok(())
    }

    /// Waits for the child to exit and reaps it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<WaitStatus, ChildError> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.status = Some(st);
                    return Ok(st);
                }
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.sys("waitpid", e)),
            }
            if Instant::now() >= deadline {
                return Err(ChildError::Timeout {
                    pid: self.pid.as_raw(),
                    what: "the child's exit",
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ProbeChild {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = kill(self.pid, Signal::SIGKILL);
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }
}

/// Renders a wait status the way a human reads it.
pub fn describe_status(st: &WaitStatus) -> String {
    match st {
        WaitStatus::Exited(_, c) => format!("exit code {c}"),
        WaitStatus::Signaled(_, s, core) => {
            format!(
                "killed by {s:?}{}",
                if *core { " (core dumped)" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

fn cvt(r: libc::c_long) -> Result<libc::c_long, Errno> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// The BPF instruction `ret SECCOMP_RET_ALLOW`.
pub const BPF_RET_ALLOW: [u8; 8] = {
    let code: u16 = 0x06; // BPF_RET | BPF_K
    let k: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
    let c = code.to_ne_bytes();
    let kk = k.to_ne_bytes();
    [c[0], c[1], 0, 0, kk[0], kk[1], kk[2], kk[3]]
};

/// Installs an allow-everything seccomp filter on the calling thread (for a
/// probe child). Sets no_new_privs first, as an unprivileged task would.
pub fn install_allow_all_seccomp() -> Result<(), Errno> {
    let insn = [BPF_RET_ALLOW];
    let prog = libc::sock_fprog {
        len: 1,
        filter: insn.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: integer-only prctl.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)?;
    // SAFETY: `prog` points at one valid instruction that lives across the
    // call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    cvt(r).map(|_| ())
}

/// clone3 with `set_tid = [tid]` (the pid in the innermost namespace), used
/// like fork: `body` runs in the child, which then `_exit`s. Same contract
/// as [`fork_child`]: only raw syscalls in `body`. Returns the child's pid
/// as seen by the caller.
pub fn clone3_with_tid<F: FnOnce() -> i32>(tid: i32, body: F) -> Result<Pid, Errno> {
    match clone::fork_with_pid(&[tid]) {
        Ok(Some(pid)) => Ok(Pid::from_raw(pid)),
        Ok(None) => exit_now(body()),
        Err(e) => Err(errno_of(e)),
    }
}

/// The errno behind an error of the engine's wrappers (which report
/// `io::Error`), so probes word it as they word their own. Does not
/// allocate.
pub fn errno_of(e: io::Error) -> Errno {
    Errno::try_from(e).unwrap_or(Errno::UnknownErrno)
}

/// Raw getpid (glibc's cache would be stale after a raw clone3).
pub fn raw_getpid() -> i32 {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// `struct prctl_mm_map`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PrctlMmMap {
    /// Start of the code segment.
    pub start_code: u64,
    /// End of the code segment.
    pub end_code: u64,
    /// Start of the data segment.
    pub start_data: u64,
    /// End of the data segment.
    pub end_data: u64,
    /// Start of the heap.
    pub start_brk: u64,
    /// Current program break.
    pub brk: u64,
    /// Start of the main stack.
    pub start_stack: u64,
    /// Start of argv strings.
    pub arg_start: u64,
    /// End of argv strings.
    pub arg_end: u64,
    /// Start of environment strings.
    pub env_start: u64,
    /// End of environment strings.
    pub env_end: u64,
    /// Address of the auxv copy to install.
    pub auxv: u64,
    /// Size of that copy in bytes.
    pub auxv_size: u32,
    /// New exe file, or u32::MAX to keep it.
    pub exe_fd: u32,
}

impl PrctlMmMap {
    /// The struct's bytes, as sent to a probe child.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C) plain integers without padding (13 u64-aligned
        // fields: 12 u64 + 2 u32), so every byte is initialised.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }

    /// Rebuilds the struct from [`PrctlMmMap::as_bytes`] output.
    pub fn from_bytes(b: &[u8; std::mem::size_of::<PrctlMmMap>()]) -> Self {
        let mut m = Self::default();
        // SAFETY: every bit pattern is a valid PrctlMmMap (integers only) and
        // `b` is exactly its size.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut m as *mut Self).cast::<u8>(), b.len())
        };
        m
    }
}

/// The calling process's current program break.
pub fn current_brk() -> u64 {
    // SAFETY: brk(0) never moves the break; it only returns it.
    unsafe { libc::syscall(libc::SYS_brk, 0) as u64 }
}

const PR_SET_MM_MAP: libc::c_ulong = 14;
const PR_SET_MM_MAP_SIZE: libc::c_ulong = 15;

/// prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE): the size of `struct prctl_mm_map`
/// this kernel expects.
pub fn prctl_mm_map_size() -> Result<u32, Errno> {
    let mut size: libc::c_uint = 0;
    // SAFETY: the kernel writes one unsigned int to `size`.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            PR_SET_MM_MAP_SIZE,
            &mut size as *mut libc::c_uint,
            0,
            0,
        )
    };
    cvt(r as libc::c_long)?;
    Ok(size)
}

/// prctl(PR_SET_MM, PR_SET_MM_MAP) on the calling process.
pub fn prctl_set_mm_map(map: &PrctlMmMap) -> Result<(), Errno> {
    // SAFETY: the kernel reads `size_of::<PrctlMmMap>()` bytes from `map`
    // and, if auxv_size is set, that many bytes from `map.auxv`, which the
    // caller points at memory it owns.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            PR_SET_MM_MAP,
            map as *const PrctlMmMap,
            std::mem::size_of::<PrctlMmMap>(),
            0,
        )
    };
    cvt(r as libc::c_long).map(|_| ())
}

/// cpuid with a sub-leaf: (eax, ebx, ecx, edx).
#[cfg(target_arch = "x86_64")]
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    // The intrinsic became safe in newer Rust; rust-version 1.85 still
    // needs the block.
    #[allow(unused_unsafe)]
    // SAFETY: cpuid exists on every x86-64 CPU and only reads registers.
    let r = unsafe { std::arch::x86_64::__cpuid_count(leaf, sub) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// XCR0 (the xsave features the OS enabled), or None when the CPU/OS does
/// not advertise OSXSAVE (xgetbv would fault).
#[cfg(target_arch = "x86_64")]
pub fn xgetbv0() -> Option<u64> {
    let (_, _, ecx, _) = cpuid(1, 0);
    if ecx & (1 << 27) == 0 {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set, so xgetbv with ecx=0 is a valid instruction;
    // it only writes eax/edx.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Which SysV IPC object kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysvKind {
    /// Shared memory segment.
    Shm,
    /// Message queue.
    Msg,
    /// Semaphore set.
    Sem,
}

/// Creates a private SysV object of `kind`; returns its id.
pub fn sysv_create(kind: SysvKind) -> Result<i32, Errno> {
    let flags = libc::IPC_CREAT | 0o600;
    // SAFETY: integer-only calls creating kernel objects.
    let r = unsafe {
        match kind {
            SysvKind::Shm => libc::shmget(libc::IPC_PRIVATE, 4096, flags),
            SysvKind::Msg => libc::msgget(libc::IPC_PRIVATE, flags),
            SysvKind::Sem => libc::semget(libc::IPC_PRIVATE, 1, flags),
        }
    };
    cvt(r as libc::c_long).map(|id| id as i32)
}

/// Removes a SysV object created by [`sysv_create`].
pub fn sysv_remove(kind: SysvKind, id: i32) -> Result<(), Errno> {
    // SAFETY: IPC_RMID ignores the buffer argument, so null is fine.
    let r = unsafe {
        match kind {
            SysvKind::Shm => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            SysvKind::Msg => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            SysvKind::Sem => libc::semctl(id, 0, libc::IPC_RMID),
        }
    };
    cvt(r as libc::c_long).map(|_| ())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> Result<(), Errno> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills ifr_ifru.ifru_flags of our ifreq.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } as libc::c_long)?;
    // SAFETY: reading/writing the flags member SIOCGIFFLAGS just set.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads our ifreq.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } as libc::c_long)?;
    Ok(())
}

/// Raw clock_gettime(2) syscall (bypasses the vdso).
pub fn raw_clock_gettime(clock: libc::clockid_t) -> Result<libc::timespec, Errno> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the kernel writes one timespec to `ts`.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_clock_gettime,
            clock,
            &mut ts as *mut libc::timespec,
        )
    })?;
    Ok(ts)
}

/// Moves the vdso block (every `[vvar*]`/`[vdso]` area, given as absolute
/// `(start, len)`, spanning `[lo, lo + span)`) to a fresh place, keeping
/// their relative layout, then calls `clock_gettime(CLOCK_MONOTONIC)`
/// through the moved vdso at `entry_off` from its start `vdso_start`.
///
/// Meant for a throw-away probe child only: afterwards glibc's cached vdso
/// pointers dangle. Returns the step that failed with errno, or the moved
/// call's result (seconds, nanoseconds) and the new base.
pub fn vdso_move_and_call(
    areas: &[(u64, u64)],
    lo: u64,
    span: u64,
    vdso_start: u64,
    entry_off: u64,
) -> Result<(i64, i64, u64), (u64, Errno)> {
    // Reserve a destination so the fixed moves cannot clobber anything.
    // SAFETY: a fresh PROT_NONE anonymous mapping at a kernel-chosen place.
    let dst = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if dst == libc::MAP_FAILED {
        return Err((1, Errno::last()));
    }
    let base = dst as u64;
    for &(start, len) in areas {
        // SAFETY: moves a special mapping onto our own reservation; nothing
        // in this child references the old addresses afterwards except via
        // the raw syscalls below.
        let r = unsafe {
            libc::mremap(
                start as *mut libc::c_void,
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                (base + (start - lo)) as *mut libc::c_void,
            )
        };
        if r == libc::MAP_FAILED {
            return Err((2, Errno::last()));
        }
    }
    let entry = base + (vdso_start - lo) + entry_off;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `entry` is __vdso_clock_gettime resolved from the vdso's own
    // symbol table, relocated with the whole block, so its vvar data moved
    // with it; it has the C signature below.
    let f: extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int =
        unsafe { std::mem::transmute(entry as usize) };
    let rc = f(libc::CLOCK_MONOTONIC, &mut ts);
    if rc != 0 {
        return Err((3, Errno::from_raw(-rc)));
    }
    Ok((ts.tv_sec, ts.tv_nsec, base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes() {
        assert_eq!(std::mem::size_of::<PrctlMmMap>(), 104);
    }

    #[test]
    fn mm_map_bytes_round_trip() {
        let m = PrctlMmMap {
            brk: 0x1234,
            exe_fd: u32::MAX,
            ..Default::default()
        };
        let b: [u8; 104] = m.as_bytes().try_into().unwrap();
        let back = PrctlMmMap::from_bytes(&b);
        assert_eq!((back.brk, back.exe_fd), (0x1234, u32::MAX));
    }
}
