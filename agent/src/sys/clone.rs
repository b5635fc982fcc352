//! clone3 with set_tid: creating a task with a chosen PID.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Size of `struct clone_args` as this layer passes it (CLONE_ARGS_SIZE_VER2).
pub const CLONE_ARGS_SIZE: usize = std::mem::size_of::<CloneArgs>();
const _: () = assert!(CLONE_ARGS_SIZE == 88);

/// Encodes a `struct clone_args` for a clone3 call injected into another
/// task: `set_tid_ptr` is the address of the TID array in that task.
pub fn encode_clone_args(
    flags: u64,
    exit_signal: u64,
    set_tid_ptr: u64,
    set_tid_len: u64,
) -> Vec<u8> {
    let fields = [
        flags,
        0,
        0,
        0,
        exit_signal,
        0,
        0,
        0,
        set_tid_ptr,
        set_tid_len,
        0,
    ];
    fields.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// Forks this process into a child whose PID is `set_tid[0]` (innermost
/// namespace first, as clone3 expects). Returns `Some(pid)` in the parent
/// and `None` in the child, like fork.
///
/// The child of a multi-threaded program may only make async-signal-safe
/// calls; callers use the raw helpers of this layer there. This function
/// does not allocate, so such a child may itself call it.
pub fn fork_with_pid(set_tid: &[libc::pid_t]) -> io::Result<Option<i32>> {
    fork_into(0, None, set_tid)
}

/// Like `fork_with_pid`, with extra clone flags (new namespaces) and the
/// cgroup (an open cgroup v2 directory) the child starts in.
pub fn fork_into(
    flags: u64,
    cgroup: Option<BorrowedFd<'_>>,
    set_tid: &[libc::pid_t],
) -> io::Result<Option<i32>> {
    let args = CloneArgs {
        flags: flags
            | if cgroup.is_some() {
                CLONE_INTO_CGROUP
            } else {
                0
            },
        // A sibling (CLONE_PARENT) inherits the caller's exit signal; clone3
        // refuses one given with it.
        exit_signal: if flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        set_tid: if set_tid.is_empty() {
            0
        } else {
            set_tid.as_ptr() as u64
        },
        set_tid_size: set_tid.len() as u64,
        cgroup: cgroup.map_or(0, |fd| fd.as_raw_fd() as u64),
        ..Default::default()
    };
    // SAFETY: args is a valid clone_args and set_tid outlives the call;
    // without CLONE_VM the child gets its own copy of memory, so returning
    // into Rust code in it is sound as long as it sticks to
    // async-signal-safe calls.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid as i32)),
    }
}

/// A close-on-exec pipe over which a forked child reports 8 bytes before
/// it exits (or execs: then the parent reads nothing); a held job's child
/// also reports once before it waits for the parent's go.
struct ReportPipe {
    rd: OwnedFd,
    wr: Option<OwnedFd>,
}

/// A close-on-exec pipe pair, owned.
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) })
}

impl ReportPipe {
    fn new() -> io::Result<Self> {
        let (rd, wr) = cloexec_pipe()?;
        Ok(ReportPipe { rd, wr: Some(wr) })
    }

    fn wr_raw(&self) -> i32 {
        self.wr.as_ref().map_or(-1, |w| w.as_raw_fd())
    }

    /// The child's side: sends `msg` (raw syscall, no allocation).
    fn send(&self, msg: [u8; 8]) {
        // SAFETY: writes 8 bytes from the stack.
        unsafe {
            libc::write(self.wr_raw(), msg.as_ptr().cast(), 8);
        }
    }

    /// The child's side: sends `msg` and exits with `code` (raw syscalls
    /// only, no allocation).
    fn send_and_exit(&self, msg: [u8; 8], code: i32) -> ! {
        self.send(msg);
        // SAFETY: exits at once.
        unsafe { libc::_exit(code) }
    }

    /// The parent's side: the next 8 bytes the child sent, or None when it
    /// sent nothing more (exec'ed, or died).
    fn receive(&mut self) -> Option<[u8; 8]> {
        self.wr = None;
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into buf.
        let n = unsafe { libc::read(self.rd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        (n == 8).then_some(buf)
    }
}

/// Like `fork_into`, with the child in a new time namespace whose offsets
/// are `offsets` (the text /proc/PID/timens_offsets takes). Offsets can be
/// set only before a process enters the namespace, through the file of the
/// thread group leader whose children will enter it, and setns back needs a
/// single-threaded caller: so a short-lived single-threaded intermediate
/// process unshares the namespace, writes the offsets and forks the child
/// with CLONE_PARENT (its parent is this process, as with `fork_into`),
/// reports the child's PID over a pipe and exits. Raw syscalls only in
/// the intermediate and the child.
pub fn fork_into_time_ns(
    offsets: &[u8],
    flags: u64,
    cgroup: Option<BorrowedFd<'_>>,
    set_tid: &[libc::pid_t],
) -> io::Result<Option<i32>> {
    let mut pipe = ReportPipe::new()?;
    let path = c"/proc/self/timens_offsets";
    let report = |v: i64| -> ! { pipe.send_and_exit(v.to_le_bytes(), 0) };
    match fork_into(0, None, &[])? {
        None => {
            let errno = || -(io::Error::last_os_error().raw_os_error().unwrap_or(1) as i64);
            // SAFETY: raw syscalls on buffers prepared by the parent.
            unsafe {
                if libc::unshare(libc::CLONE_NEWTIME) != 0 {
                    report(errno());
                }
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, offsets.as_ptr().cast(), offsets.len()) < 0 {
                    report(errno());
                }
                libc::close(fd);
            }
            match fork_into(flags | libc::CLONE_PARENT as u64, cgroup, set_tid) {
                Ok(Some(pid)) => report(pid as i64),
                Ok(None) => Ok(None),
                Err(e) => report(-(e.raw_os_error().unwrap_or(1) as i64)),
            }
        }
        Some(mid) => {
            let got = pipe.receive().map(i64::from_le_bytes);
            // SAFETY: reaps the intermediate, which exits right after writing.
            unsafe { libc::waitpid(mid, std::ptr::null_mut(), 0) };
            match got {
                Some(v) if v > 0 => Ok(Some(v as i32)),
                Some(v) => Err(io::Error::from_raw_os_error(-v as i32)),
                None => Err(io::Error::other("the time namespace helper died")),
            }
        }
    }
}

/// clone3 flag: start the child in the cgroup `clone_args.cgroup` names.
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// One mount a job's first process makes before it runs the command.
pub struct MountStep {
    pub source: CString,
    pub target: CString,
    pub fstype: CString,
    pub flags: u64,
    pub data: CString,
}

/// Everything the first process of a job does between clone3 and exec,
/// prepared in the parent: the child must not allocate.
pub struct JobSpawn {
    /// CLONE_NEW* flags.
    pub flags: u64,
    /// `cgroup.procs` of a v1 cgroup the child moves itself into, when
    /// CLONE_INTO_CGROUP (v2) is not used.
    pub cgroup_v1_procs: Option<CString>,
    pub hostname: Option<CString>,
    /// Bring the loopback interface up (in a new network namespace).
    pub loopback: bool,
    pub mounts: Vec<MountStep>,
    /// Absolute path of the program and its argv.
    pub program: CString,
    pub argv: Vec<CString>,
    /// Descriptors to become the job's stdin and its stdout and stderr
    /// (else it keeps the caller's).
    pub stdio: Option<(i32, i32)>,
    /// The user the command runs as (uid, gid, groups), once root's work
    /// (namespaces, mounts, network) is done; else root.
    pub user: Option<(u32, u32, Vec<libc::gid_t>)>,
}

/// Why the first process of a job could not start: the failed step (an
/// index into the spawn's steps: the STEP_* constants, then one per mount)
/// and its errno.
#[derive(Debug)]
pub struct SpawnError {
    pub step: usize,
    pub error: io::Error,
}

/// Why `spawn_job` failed: a step of the child, or the parent's own work
/// before the exec.
#[derive(Debug)]
pub enum SpawnFailure<E> {
    /// A step of the child failed (or it could not be created).
    Step(SpawnError),
    /// The parent's `before_exec` failed; the child was killed.
    BeforeExec(E),
}

/// Step numbers reported in `SpawnError`.
pub const STEP_SETSID: usize = 0;
pub const STEP_CGROUP: usize = 1;
pub const STEP_HOSTNAME: usize = 2;
pub const STEP_EXEC: usize = 3;
pub const STEP_LOOPBACK: usize = 4;
pub const STEP_STDIO: usize = 5;
pub const STEP_USER: usize = 6;
pub const STEP_MOUNTS: usize = 7;
/// Not a step: the child's report that it is set up and waits for the go.
const HELD: u32 = u32::MAX - 1;

fn decode_report(buf: [u8; 8]) -> SpawnError {
    let step = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let errno = i32::from_le_bytes(buf[4..].try_into().expect("4 bytes"));
    SpawnError {
        step,
        error: io::Error::from_raw_os_error(errno),
    }
}

/// Kills and reaps a child that will not run its command.
fn kill_and_reap(pid: i32) {
    // SAFETY: signals and reaps our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Starts a job's first process: clone3 with `spec.flags` (into `cgroup`
/// when given), then in the child setsid, join the v1 cgroup, set the
/// hostname, make the mounts, and wait: the parent runs `before_exec` with
/// the child's PID (its namespaces exist, its command has not started:
/// the place to give it network interfaces), and only once that succeeded
/// does the child exec the program. Returns the child's PID once the exec
/// succeeded; on any failure the child is gone.
pub fn spawn_job<E>(
    spec: &JobSpawn,
    cgroup: Option<BorrowedFd<'_>>,
    before_exec: impl FnOnce(i32) -> Result<(), E>,
) -> Result<i32, SpawnFailure<E>> {
    let early = |error| {
        SpawnFailure::Step(SpawnError {
            step: usize::MAX,
            error,
        })
    };
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut pipe = ReportPipe::new().map_err(early)?;
    let (go_rd, go_wr) = cloexec_pipe().map_err(early)?;
    match fork_into(spec.flags, cgroup, &[]) {
        Err(e) => Err(early(e)),
        Ok(None) => child_setup(spec, &argv, &pipe, go_rd.as_raw_fd(), go_wr.as_raw_fd()),
        Ok(Some(pid)) => {
            drop(go_rd);
            match pipe.receive() {
                Some(buf) if buf[..4] == HELD.to_le_bytes() => {}
                Some(buf) => {
                    // SAFETY: reaps the child that reported its failure.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                    return Err(SpawnFailure::Step(decode_report(buf)));
                }
                None => {
                    kill_and_reap(pid);
                    return Err(early(io::Error::other(
                        "the job's first process died while being set up",
                    )));
                }
            }
            if let Err(e) = before_exec(pid) {
                kill_and_reap(pid);
                return Err(SpawnFailure::BeforeExec(e));
            }
            // SAFETY: writes one byte from the stack to our pipe.
            let sent = unsafe { libc::write(go_wr.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
            if sent != 1 {
                let e = io::Error::last_os_error();
                kill_and_reap(pid);
                return Err(early(e));
            }
            drop(go_wr);
            match pipe.receive() {
                None => Ok(pid),
                Some(buf) => {
                    // SAFETY: reaps the child that reported its failure.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                    Err(SpawnFailure::Step(decode_report(buf)))
                }
            }
        }
    }
}

/// The child side of `spawn_job`: raw syscalls only, no allocation.
fn child_setup(
    spec: &JobSpawn,
    argv: &[*const libc::c_char],
    report: &ReportPipe,
    go_rd: i32,
    go_wr: i32,
) -> ! {
    let fail = |step: usize| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(step as u32).to_le_bytes());
        msg[4..].copy_from_slice(&errno.to_le_bytes());
        report.send_and_exit(msg, 127)
    };
    // SAFETY: every pointer passed below comes from a CString or an array
    // prepared by the parent and still alive in this copy of its memory;
    // the calls are async-signal-safe and do not allocate.
    unsafe {
        // Only the parent writes the go: if it dies instead, the read
        // below sees end of file.
        libc::close(go_wr);
        if libc::setsid() < 0 {
            fail(STEP_SETSID);
        }
        if let Some(procs) = &spec.cgroup_v1_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(STEP_CGROUP);
            }
            libc::close(fd);
        }
        if let Some(h) = &spec.hostname {
            if libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0 {
                fail(STEP_HOSTNAME);
            }
        }
        if spec.loopback && super::misc::loopback_up().is_err() {
            fail(STEP_LOOPBACK);
        }
        for (i, m) in spec.mounts.iter().enumerate() {
            let opt = |c: &CString| {
                if c.as_bytes().is_empty() {
                    std::ptr::null()
                } else {
                    c.as_ptr()
                }
            };
            if libc::mount(
                opt(&m.source),
                m.target.as_ptr(),
                opt(&m.fstype),
                m.flags as libc::c_ulong,
                opt(&m.data).cast(),
            ) != 0
            {
                fail(STEP_MOUNTS + i);
            }
        }
        let mut held = [0u8; 8];
        held[..4].copy_from_slice(&HELD.to_le_bytes());
        report.send(held);
        let mut go = 0u8;
        loop {
            let n = libc::read(go_rd, (&mut go as *mut u8).cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // The parent gave up on this job (or died): never run it.
            libc::_exit(127);
        }
        libc::close(go_rd);
        if let Some((input, output)) = spec.stdio {
            if libc::dup2(input, 0) < 0 || libc::dup2(output, 1) < 0 || libc::dup2(output, 2) < 0 {
                fail(STEP_STDIO);
            }
        }
        // A job starts with stdin, stdout and stderr only: descriptors the
        // caller leaked would tie it to processes outside the job.
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
        if let Some((uid, gid, groups)) = &spec.user {
            if super::creds::drop_to(*uid, *gid, groups).is_err() {
                fail(STEP_USER);
            }
        }
        libc::execv(spec.program.as_ptr(), argv.as_ptr());
        fail(STEP_EXEC)
    }
}

/// Stops the calling process with SIGSTOP, for a tracer to seize it (raw
/// syscalls only: safe in a freshly forked child).
pub fn stop_self() {
    // SAFETY: plain syscalls with no memory arguments.
    unsafe {
        libc::syscall(
            libc::SYS_kill,
            libc::syscall(libc::SYS_getpid),
            libc::SIGSTOP,
        );
    }
}

/// Exits the calling process immediately without running any destructor.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// Parks a freshly forked child until the agent seizes it: it dies with
/// the agent, and only ever waits (raw syscalls only).
pub fn child_park() -> ! {
    // SAFETY: plain syscalls with no memory arguments; the loop never
    // returns into Rust code of the forked copy of the agent.
    unsafe {
        libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}
