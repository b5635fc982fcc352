//! Copy-on-write snapshots of frozen processes, so that a job stands still
//! only while its state is captured, not while its memory is copied.
//!
//! While the process is frozen, the agent makes it fork: the child's
//! private memory is the kernel's copy-on-write copy of the parent's at
//! that instant, exactly, whatever the parent does next (writes, munmap,
//! mremap, madvise). The process then runs on while the agent copies the
//! child's memory; the child never runs a single instruction of its own
//! and is killed when the copy is over.
//!
//! What the application may notice, and why it is harmless:
//! - the child's exit signal is 0: no SIGCHLD, and `wait`, `waitpid` and
//!   `waitid` without `__WALL`/`__WCLONE` neither see nor wait for it;
//! - it shares the parent's fd table and fs context (CLONE_FILES,
//!   CLONE_FS), so it holds no extra reference to any file: a pipe the
//!   application closes sees its EOF at once, a socket closes for real;
//! - once killed, its zombie is collected by an injected `wait4` in one
//!   thread of the parent (a stop of a few hundred microseconds).
//!
//! It is traced from birth with PTRACE_O_EXITKILL: should the agent die,
//! the kernel kills it before it could ever run.

use nix::sys::ptrace;
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::error::{Context, Error, Result};
use crate::inject::{self, Remote};
use crate::proc;
use crate::seize::Seized;

/// Flags of the snapshot fork; the exit signal (low byte) is 0.
const CLONE_FLAGS: u64 = (libc::CLONE_FILES | libc::CLONE_FS) as u64;

/// A stopped copy-on-write child of a dumped process. Dropping it kills
/// and collects the child.
#[derive(Debug)]
pub struct Snapshot {
    /// The dumped process (host PID).
    pub parent: i32,
    /// The child, as the agent sees it.
    pub child: i32,
    /// The child's PID as its parent sees it (in its PID namespace).
    inner: u64,
    ended: bool,
}

/// Makes the process `main` injects into (stopped, its signals blocked)
/// fork a snapshot of itself.
pub fn take(main: &Remote) -> Result<Snapshot> {
    let tid = main.tid;
    let parent = tid.as_raw();
    // The child inherits the tracing options of the thread that forks it:
    // EXITKILL from birth, so that no moment exists in which a dying
    // agent would let it run. The parent has it only during the call.
    ptrace::setoptions(
        tid,
        inject::seize_options(false) | ptrace::Options::PTRACE_O_EXITKILL,
    )
    .ctx(parent, || "PTRACE_SETOPTIONS (exit kill)".into())?;
    let forked = main.syscall(libc::SYS_clone, &[CLONE_FLAGS, 0, 0, 0, 0]);
    let child = main.take_child();
    ptrace::setoptions(tid, inject::seize_options(false))
        .ctx(parent, || "PTRACE_SETOPTIONS".into())?;
    let inner = forked?;
    let child = child.ok_or_else(|| Error::Refused {
        pid: parent,
        reason: format!("forked {inner} for a snapshot, but ptrace named no child"),
    })?;
    let snap = Snapshot {
        parent,
        child,
        inner,
        ended: false,
    };
    // Auto-attached children start in a stop of their own; collect it so
    // that a later wait finds only its end.
    inject::wait_stopped(Pid::from_raw(child))?;
    debug!(parent, child, "snapshot forked");
    Ok(snap)
}

impl Snapshot {
    /// Kills the child, collects it, and has the parent reap its zombie. A
    /// zombie left (the parent could not be stopped for it) is only logged:
    /// the checkpoint does not depend on it.
    pub fn end(mut self) {
        self.ended = true;
        if let Err(e) = self.finish() {
            warn!(
                parent = self.parent,
                child = self.child,
                "snapshot child not reaped: {e}"
            );
        }
    }

    /// Kills the child without waiting for it: its address space goes
    /// meanwhile. [`Snapshot::end`] (or the drop) collects it.
    pub fn kill(&self) {
        if let Err(e) = self.signal() {
            warn!(parent = self.parent, "{e}");
        }
    }

    fn signal(&self) -> Result<()> {
        let child = Pid::from_raw(self.child);
        match nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::sys(self.child, "kill(SIGKILL) of a snapshot", e)),
        }
    }

    fn finish(&self) -> Result<()> {
        self.signal()?;
        // Its tracer sees it die first; then it is its parent's zombie.
        crate::seize::collect_killed([self.child]);
        let parent_of = proc::stat(self.child, None).map(|s| s.field(4) as i32);
        match parent_of {
            Ok(p) if p == self.parent => self.reap(),
            // Gone already, or reparented (its parent exited): whoever
            // has it now reaps it.
            _ => Ok(()),
        }
    }

    /// Runs wait4 for the child in one thread of the parent.
    fn reap(&self) -> Result<()> {
        let wait = |remote: &Remote| -> Result<()> {
            let r = remote.syscall_raw(
                libc::SYS_wait4,
                &[self.inner, 0, (libc::__WALL | libc::WNOHANG) as u64, 0],
            )?;
            // ECHILD: the process reaped it itself (a wait with __WALL).
            match r {
                r if r >= 0 || r == -(libc::ECHILD as i64) => Ok(()),
                r => Err(Error::Remote {
                    pid: self.parent,
                    syscall: "wait4".into(),
                    errno: nix::errno::Errno::from_raw(-r as i32),
                }),
            }
        };
        let gadget = crate::mm::find_syscall_gadget(self.parent)?;
        if let Some(tid) = crate::seize::held_thread(self.parent) {
            // Still held by this dump (an abort before the job ran on):
            // its registers go back as they were after the call.
            let t = Pid::from_raw(tid);
            let regs = inject::get_regs(t)?;
            let mask =
                crate::sys::ptrace::get_sigmask(t).ctx(tid, || "PTRACE_GETSIGMASK".into())?;
            crate::sys::ptrace::set_sigmask(t, !0).ctx(tid, || "PTRACE_SETSIGMASK".into())?;
            let r = wait(&Remote::new(t, gadget)?);
            inject::set_regs(t, regs)?;
            crate::sys::ptrace::set_sigmask(t, mask).ctx(tid, || "PTRACE_SETSIGMASK".into())?;
            r?;
        } else {
            let held = Seized::one_thread(self.parent)?;
            held.block_signals()?;
            let remote = Remote::new(Pid::from_raw(held.threads[0].tid), gadget)?;
            wait(&remote)?;
            held.release()?;
        }
        debug!(parent = self.parent, child = self.child, "snapshot reaped");
        Ok(())
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Err(e) = self.finish() {
            warn!(
                parent = self.parent,
                child = self.child,
                "could not remove a snapshot child: {e}"
            );
        }
    }
}
