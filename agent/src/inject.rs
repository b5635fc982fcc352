//! Making a stopped task run system calls for us.
//!
//! The agent points a seized thread's instruction pointer at a `syscall`
//! instruction, loads the number and arguments into its registers and lets it
//! run with PTRACE_SYSCALL up to the syscall-exit stop. No code is written
//! into the task: a dumped task executes a `syscall` found in its own vdso,
//! a task being restored one in the agent's text (it is a fork of the agent)
//! and then one in its scratch page.
//!
//! Where the `syscall` is followed by an `int3` (the agent's gadget, and its
//! copy in a restored task's scratch page), the task runs with PTRACE_CONT
//! to the trap instead: one stop per call instead of two (entry and exit).
//! Each stop is a round trip through the scheduler; a restore makes
//! hundreds of calls, and on this VM the stops were most of a small
//! process's restore time.

use std::io::IoSlice;
use std::io::IoSliceMut;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{trace, warn};

use crate::error::{Context, Error, Result};
use crate::sys::gadget::BATCH_ENTRY;

/// The x86-64 register file as ptrace sees it.
pub type Regs = libc::user_regs_struct;

/// nix does not name this option (1 << 21, needs CAP_SYS_ADMIN).
const PTRACE_O_SUSPEND_SECCOMP: ptrace::Options = ptrace::Options::from_bits_retain(1 << 21);

/// Most calls run in one batch (a table of 8 KiB in the scratch area).
pub const BATCH_MAX: usize = 128;

/// Options every seized task gets: syscall stops marked with 0x80, new
/// threads and children auto-attached, killed if the agent dies (restore),
/// seccomp suspended so injected calls are not filtered.
pub fn seize_options(exit_kill: bool) -> ptrace::Options {
    let mut o = ptrace::Options::PTRACE_O_TRACESYSGOOD
        | ptrace::Options::PTRACE_O_TRACECLONE
        | PTRACE_O_SUSPEND_SECCOMP;
    if exit_kill {
        // Restore: children it forks for us are traced from birth too.
        o |= ptrace::Options::PTRACE_O_EXITKILL | ptrace::Options::PTRACE_O_TRACEFORK;
    }
    o
}

/// Waits for `tid` to stop; errors if it exits instead.
pub fn wait_stopped(tid: Pid) -> Result<WaitStatus> {
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                return Err(Error::Refused {
                    pid: tid.as_raw(),
                    reason: format!("task exited while being checkpointed or restored ({s:?})"),
                })
            }
            Ok(s) => return Ok(s),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::sys(tid.as_raw(), "waitpid", e)),
        }
    }
}

/// Waits until a freshly seized and interrupted task reports its
/// PTRACE_EVENT_STOP, passing on any signal-delivery stop met on the way.
pub fn wait_interrupt_stop(tid: Pid) -> Result<()> {
    loop {
        match wait_stopped(tid)? {
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => return Ok(()),
            WaitStatus::Stopped(_, sig) => {
                // A signal arrived between seize and interrupt: let it through
                // (it will be delivered, or stays pending if blocked) and
                // wait for the interrupt stop.
                trace!(
                    tid = tid.as_raw(),
                    ?sig,
                    "signal-delivery stop before interrupt"
                );
                ptrace::cont(tid, Some(sig)).ctx(tid.as_raw(), || "PTRACE_CONT".into())?;
            }
            other => {
                trace!(tid = tid.as_raw(), ?other, "unexpected stop while seizing");
                ptrace::cont(tid, None).ctx(tid.as_raw(), || "PTRACE_CONT".into())?;
            }
        }
    }
}

/// Reads a thread's general registers.
pub fn get_regs(tid: Pid) -> Result<Regs> {
    ptrace::getregs(tid).ctx(tid.as_raw(), || "PTRACE_GETREGS".into())
}

/// Writes a thread's general registers.
pub fn set_regs(tid: Pid, regs: Regs) -> Result<()> {
    ptrace::setregs(tid, regs).ctx(tid.as_raw(), || "PTRACE_SETREGS".into())
}

/// Error codes the kernel uses internally for a system call to be restarted.
pub mod restart {
    pub const ERESTARTSYS: i64 = -512;
    pub const ERESTARTNOINTR: i64 = -513;
    pub const ERESTARTNOHAND: i64 = -514;
    pub const ERESTART_RESTARTBLOCK: i64 = -516;
    pub const NR_RESTART_SYSCALL: u64 = 219;
}

/// Turns registers of a task stopped inside an interrupted system call into
/// the registers of a task about to make that call again, as the kernel's
/// signal return path would (`restart_block` says whether the task's own
/// kernel restart block is still there to resume a timed wait).
pub fn normalize_restart(mut regs: Regs, restart_block: bool) -> Regs {
    use restart::*;
    if (regs.orig_rax as i64) < 0 {
        return regs;
    }
    match regs.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            regs.rax = regs.orig_rax;
            regs.rip -= 2;
        }
        ERESTART_RESTARTBLOCK if restart_block => {
            regs.rax = NR_RESTART_SYSCALL;
            regs.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => {
            // A new task has no restart block to resume from. An interrupted
            // absolute sleep can simply be made again; anything else returns
            // EINTR, as if a signal had interrupted it (nanosleep has already
            // written the remaining time for the caller's retry loop).
            const CLOCK_NANOSLEEP: u64 = libc::SYS_clock_nanosleep as u64;
            const TIMER_ABSTIME: u64 = 1;
            if regs.orig_rax == CLOCK_NANOSLEEP && regs.rsi & TIMER_ABSTIME != 0 {
                regs.rax = regs.orig_rax;
                regs.rip -= 2;
            } else {
                regs.rax = (-(libc::EINTR as i64)) as u64;
            }
        }
        _ => {}
    }
    regs.orig_rax = u64::MAX;
    regs
}

/// A stopped thread that runs system calls on the agent's behalf.
pub struct Remote {
    pub tid: Pid,
    /// Address of a `syscall` instruction mapped executable in the task.
    pub gadget: u64,
    /// Registers used as the template of every injected call.
    template: Regs,
    /// The task a forking injected call created, as the agent sees it
    /// (PTRACE_GETEVENTMSG): in a PID namespace, the call itself returns
    /// the child's PID inside.
    child: std::cell::Cell<Option<i32>>,
    /// The gadget is `syscall; int3`: run to the trap (one stop).
    traps: bool,
    /// Address of a copy of `sys::gadget::BATCH_LOOP` in the task, if any.
    batch: Option<u64>,
}

impl Remote {
    /// Prepares injection into `tid`, which must be in a ptrace stop.
    pub fn new(tid: Pid, gadget: u64) -> Result<Self> {
        let template = get_regs(tid)?;
        let traps = read_mem(tid.as_raw(), gadget, 3)
            .is_ok_and(|code| code == crate::sys::gadget::SYSCALL_INSN);
        Ok(Remote {
            tid,
            gadget,
            template,
            child: std::cell::Cell::new(None),
            traps,
            batch: None,
        })
    }

    /// Lets [`Remote::syscalls`] run batches through the copy of
    /// `sys::gadget::BATCH_LOOP` at `addr` in the task.
    pub fn with_batch_loop(mut self, addr: u64) -> Self {
        self.batch = Some(addr);
        self
    }

    /// The task the last forking injected call created (host PID).
    pub fn take_child(&self) -> Option<i32> {
        self.child.take()
    }

    fn pid(&self) -> i32 {
        self.tid.as_raw()
    }

    /// Runs one system call in the task and returns its raw result.
    pub fn syscall_raw(&self, nr: i64, args: &[u64]) -> Result<i64> {
        trace!(tid = self.pid(), call = syscall_name(nr), "injected");
        let mut r = self.template;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rip = self.gadget;
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        r.rdi = a[0];
        r.rsi = a[1];
        r.rdx = a[2];
        r.r10 = a[3];
        r.r8 = a[4];
        r.r9 = a[5];
        set_regs(self.tid, r)?;
        // Run to the trap after the call, or to the syscall-entry stop and
        // then the syscall-exit stop: a call that may unmap or replace the
        // gadget's page (a restore unmaps the agent's text it started from)
        // must stop before the task returns to it.
        let traps = self.traps
            && !matches!(
                nr,
                libc::SYS_mmap
                    | libc::SYS_munmap
                    | libc::SYS_mremap
                    | libc::SYS_shmat
                    | libc::SYS_execve
                    | libc::SYS_rt_sigreturn
            );
        let mut entered = false;
        loop {
            if traps {
                ptrace::cont(self.tid, None).ctx(self.pid(), || "PTRACE_CONT".into())?;
            } else {
                ptrace::syscall(self.tid, None).ctx(self.pid(), || "PTRACE_SYSCALL".into())?;
            }
            match wait_stopped(self.tid)? {
                WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGTRAP) if traps => {
                    let out = get_regs(self.tid)?;
                    if out.rip != self.gadget + 3 {
                        return Err(Error::Refused {
                            pid: self.pid(),
                            reason: format!(
                                "SIGTRAP at {:#x}, not after injected syscall {nr}",
                                out.rip
                            ),
                        });
                    }
                    return Ok(out.rax as i64);
                }
                WaitStatus::PtraceSyscall(_) if !entered => entered = true,
                WaitStatus::PtraceSyscall(_) => break,
                WaitStatus::PtraceEvent(_, _, ev) => {
                    trace!(tid = self.pid(), ev, "ptrace event during injected syscall");
                    if matches!(
                        ev,
                        libc::PTRACE_EVENT_FORK
                            | libc::PTRACE_EVENT_VFORK
                            | libc::PTRACE_EVENT_CLONE
                    ) {
                        let msg = ptrace::getevent(self.tid)
                            .ctx(self.pid(), || "PTRACE_GETEVENTMSG".into())?;
                        self.child.set(Some(msg as i32));
                    }
                }
                WaitStatus::Stopped(_, sig) => {
                    // Every catchable signal is blocked during injection;
                    // what reaches us here was forced (e.g. SIGSEGV from a
                    // wrong gadget). Give up rather than loop.
                    return Err(Error::Refused {
                        pid: self.pid(),
                        reason: format!("signal {sig} while running injected syscall {nr}"),
                    });
                }
                other => warn!(tid = self.pid(), ?other, "unexpected stop during injection"),
            }
        }
        let out = get_regs(self.tid)?;
        Ok(out.rax as i64)
    }

    /// Runs a system call and turns a negative result into an error naming it.
    pub fn syscall(&self, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.syscall_raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(Error::Remote {
                pid: self.pid(),
                syscall: syscall_name(nr),
                errno: Errno::from_raw(-r as i32),
            });
        }
        Ok(r as u64)
    }

    /// Runs `calls` (number and arguments) one after the other, with one
    /// stop for up to [`BATCH_MAX`] of them when the task has the batch loop
    /// (else one call at a time); stops at the first that fails, returned
    /// as an error naming it. The table goes into `scratch`. Returns each
    /// call's result. Not for calls that fork, or unmap the scratch area.
    pub fn syscalls(&self, scratch: &mut Scratch, calls: &[(i64, Vec<u64>)]) -> Result<Vec<u64>> {
        let Some(code) = self.batch.filter(|_| calls.len() > 1) else {
            return calls.iter().map(|(nr, a)| self.syscall(*nr, a)).collect();
        };
        let table = scratch.alloc((calls.len().min(BATCH_MAX) * BATCH_ENTRY) as u64)?;
        let mut results = Vec::with_capacity(calls.len());
        for chunk in calls.chunks(BATCH_MAX) {
            results.extend(self.batch(code, table, chunk)?);
        }
        Ok(results)
    }

    /// Runs one batch of `calls` through the loop at `code`, its table at
    /// `table`.
    fn batch(&self, code: u64, table: u64, calls: &[(i64, Vec<u64>)]) -> Result<Vec<u64>> {
        use crate::sys::gadget::BATCH_TRAP;
        let mut bytes = Vec::with_capacity(calls.len() * BATCH_ENTRY);
        for (nr, args) in calls {
            let mut a = [0u64; 6];
            a[..args.len()].copy_from_slice(args);
            bytes.extend_from_slice(&(*nr as u64).to_le_bytes());
            for v in a {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bytes.extend_from_slice(&0u64.to_le_bytes());
        }
        write_mem(self.pid(), table, &bytes)?;
        trace!(tid = self.pid(), calls = calls.len(), "injected batch");
        let mut r = self.template;
        r.rip = code;
        r.orig_rax = u64::MAX;
        r.rbx = table;
        r.r12 = calls.len() as u64;
        set_regs(self.tid, r)?;
        ptrace::cont(self.tid, None).ctx(self.pid(), || "PTRACE_CONT".into())?;
        let left = match wait_stopped(self.tid)? {
            WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGTRAP) => {
                let out = get_regs(self.tid)?;
                if out.rip != code + BATCH_TRAP {
                    return Err(Error::Refused {
                        pid: self.pid(),
                        reason: format!("SIGTRAP at {:#x}, not at the end of a batch", out.rip),
                    });
                }
                out.r12 as usize
            }
            other => {
                return Err(Error::Refused {
                    pid: self.pid(),
                    reason: format!("{other:?} while running a batch of injected calls"),
                })
            }
        };
        let back = read_mem(self.pid(), table, bytes.len())?;
        let result = |i: usize| {
            let o = i * BATCH_ENTRY + 56;
            u64::from_le_bytes(back[o..o + 8].try_into().expect("8 bytes"))
        };
        let done = calls.len() - left;
        if left > 0 {
            // The loop stopped at a failed call: entry `done`.
            return Err(Error::Remote {
                pid: self.pid(),
                syscall: syscall_name(calls[done].0),
                errno: Errno::from_raw(-(result(done) as i64) as i32),
            });
        }
        Ok((0..done).map(result).collect())
    }
}

/// A readable name for an injected syscall number, for errors.
pub fn syscall_name(nr: i64) -> String {
    let name = match nr {
        libc::SYS_mmap => "mmap",
        libc::SYS_munmap => "munmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_mremap => "mremap",
        libc::SYS_madvise => "madvise",
        libc::SYS_shmat => "shmat",
        libc::SYS_openat => "openat",
        libc::SYS_close => "close",
        libc::SYS_dup3 => "dup3",
        libc::SYS_lseek => "lseek",
        libc::SYS_prctl => "prctl",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_sigaltstack => "sigaltstack",
        libc::SYS_clone3 => "clone3",
        libc::SYS_rseq => "rseq",
        libc::SYS_timer_create => "timer_create",
        libc::SYS_timer_settime => "timer_settime",
        libc::SYS_setitimer => "setitimer",
        libc::SYS_chdir => "chdir",
        libc::SYS_chroot => "chroot",
        libc::SYS_seccomp => "seccomp",
        libc::SYS_setresuid => "setresuid",
        libc::SYS_setresgid => "setresgid",
        libc::SYS_setgroups => "setgroups",
        libc::SYS_capset => "capset",
        libc::SYS_rt_sigqueueinfo => "rt_sigqueueinfo",
        libc::SYS_rt_tgsigqueueinfo => "rt_tgsigqueueinfo",
        _ => return format!("syscall {nr}"),
    };
    name.to_string()
}

/// Reads `len` bytes at `addr` of process `pid`.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = process_vm_readv(
        Pid::from_raw(pid),
        &mut [IoSliceMut::new(&mut buf)],
        &[RemoteIoVec {
            base: addr as usize,
            len,
        }],
    )
    .ctx(pid, || format!("process_vm_readv at {addr:#x}"))?;
    if n != len {
        return Err(Error::Refused {
            pid,
            reason: format!("short read of {n} of {len} bytes at {addr:#x}"),
        });
    }
    Ok(buf)
}

/// Writes `data` at `addr` of process `pid`.
pub fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    let n = process_vm_writev(
        Pid::from_raw(pid),
        &[IoSlice::new(data)],
        &[RemoteIoVec {
            base: addr as usize,
            len: data.len(),
        }],
    )
    .ctx(pid, || format!("process_vm_writev at {addr:#x}"))?;
    if n != data.len() {
        return Err(Error::Refused {
            pid,
            reason: format!("short write of {n} of {} bytes at {addr:#x}", data.len()),
        });
    }
    Ok(())
}

/// A bump allocator over a scratch mapping in the remote task, for the
/// arguments and results of injected calls.
pub struct Scratch {
    pub pid: i32,
    pub addr: u64,
    pub len: u64,
    used: u64,
}

impl Scratch {
    /// Wraps a scratch area of `len` bytes at `addr` in task `pid`.
    pub fn new(pid: i32, addr: u64, len: u64) -> Self {
        Scratch {
            pid,
            addr,
            len,
            used: 0,
        }
    }
    /// Forgets every allocation.
    pub fn reset(&mut self) {
        self.used = 0;
    }
    /// Reserves `len` bytes (16-byte aligned) and returns their remote address.
    pub fn alloc(&mut self, len: u64) -> Result<u64> {
        let at = (self.used + 15) & !15;
        if at + len > self.len {
            return Err(Error::Refused {
                pid: self.pid,
                reason: format!("scratch area of {} bytes exhausted", self.len),
            });
        }
        self.used = at + len;
        Ok(self.addr + at)
    }
    /// Copies `data` into the scratch area and returns its remote address.
    pub fn put(&mut self, data: &[u8]) -> Result<u64> {
        let a = self.alloc(data.len() as u64)?;
        write_mem(self.pid, a, data)?;
        Ok(a)
    }
    /// Copies a NUL-terminated string into the scratch area.
    pub fn put_cstr(&mut self, s: &str) -> Result<u64> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-assembled batch loop runs its calls in order, returns
    /// their results, stops at the first that fails (naming it), and
    /// longer lists go in several batches.
    #[test]
    fn a_batch_runs_its_calls_and_stops_at_the_first_that_fails() {
        use crate::sys::gadget::{BATCH_LOOP, SYSCALL_INSN};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("needs root (ptrace)");
            return;
        }
        let pid = match crate::sys::clone::fork_with_pid(&[]).unwrap() {
            None => crate::sys::clone::child_park(),
            Some(p) => p,
        };
        let t = Pid::from_raw(pid);
        ptrace::seize(t, seize_options(true)).unwrap();
        ptrace::interrupt(t).unwrap();
        wait_interrupt_stop(t).unwrap();
        let boot = Remote::new(t, crate::sys::gadget::syscall_gadget_addr()).unwrap();
        let len = 4 * 4096u64;
        let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let addr = boot
            .syscall(libc::SYS_mmap, &[0, len, rwx, flags, u64::MAX, 0])
            .unwrap();
        write_mem(pid, addr, &SYSCALL_INSN).unwrap();
        write_mem(pid, addr + 64, &BATCH_LOOP).unwrap();
        let r = Remote::new(t, addr).unwrap().with_batch_loop(addr + 64);
        let mut scratch = Scratch::new(pid, addr + 4096, len - 4096);

        let ok = r
            .syscalls(
                &mut scratch,
                &[(libc::SYS_getpid, vec![]), (libc::SYS_getppid, vec![])],
            )
            .unwrap();
        assert_eq!(ok, [pid as u64, std::process::id() as u64]);

        scratch.reset();
        let e = r
            .syscalls(
                &mut scratch,
                &[
                    (libc::SYS_getpid, vec![]),
                    (libc::SYS_close, vec![987_654]),
                    (libc::SYS_exit_group, vec![3]),
                ],
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("close") && e.contains("EBADF"), "{e}");
        // The call after the failed one did not run: the task is alive.
        assert!(r.syscall(libc::SYS_getpid, &[]).is_ok());

        scratch.reset();
        let many: Vec<_> = (0..300).map(|_| (libc::SYS_getpid, vec![])).collect();
        assert_eq!(
            r.syscalls(&mut scratch, &many).unwrap(),
            vec![pid as u64; 300]
        );

        nix::sys::signal::kill(t, nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = waitpid(t, Some(WaitPidFlag::__WALL));
    }

    fn regs(rax: i64, orig: i64) -> Regs {
        let mut r = zero_regs();
        r.rax = rax as u64;
        r.orig_rax = orig as u64;
        r.rip = 0x1002;
        r
    }

    fn zero_regs() -> Regs {
        Regs {
            r15: 0,
            r14: 0,
            r13: 0,
            r12: 0,
            rbp: 0,
            rbx: 0,
            r11: 0,
            r10: 0,
            r9: 0,
            r8: 0,
            rax: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            rdi: 0,
            orig_rax: 0,
            rip: 0,
            cs: 0,
            eflags: 0,
            rsp: 0,
            ss: 0,
            fs_base: 0,
            gs_base: 0,
            ds: 0,
            es: 0,
            fs: 0,
            gs: 0,
        }
    }

    #[test]
    fn restart_semantics() {
        let r = normalize_restart(regs(restart::ERESTARTSYS, 0), false);
        assert_eq!((r.rax, r.rip, r.orig_rax), (0, 0x1000, u64::MAX));
        let r = normalize_restart(regs(restart::ERESTART_RESTARTBLOCK, 35), true);
        assert_eq!((r.rax, r.rip), (restart::NR_RESTART_SYSCALL, 0x1000));
        let r = normalize_restart(regs(restart::ERESTART_RESTARTBLOCK, 35), false);
        assert_eq!((r.rax as i64, r.rip), (-(libc::EINTR as i64), 0x1002));
        // Not in a syscall: untouched.
        let r = normalize_restart(regs(5, -1), false);
        assert_eq!((r.rax, r.rip), (5, 0x1002));
        // A completed syscall result is kept.
        let r = normalize_restart(regs(-11, 0), false);
        assert_eq!((r.rax as i64, r.rip), (-11, 0x1002));
    }
}
