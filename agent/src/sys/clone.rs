//! clone3 with set_tid: creating a task with a chosen PID.

use std::io;

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
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: set_tid.len() as u64,
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
