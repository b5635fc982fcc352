//! Stopping every thread of a process under ptrace, and letting them go
//! again exactly as they were.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::error::{Context, Error, Result};
use crate::inject::{self, Regs};
use crate::proc;
use crate::sys;

/// A seized thread with the state it had when it stopped.
pub struct Thread {
    pub tid: i32,
    pub regs: Regs,
    pub sigmask: u64,
}

/// Every thread of one process, stopped. Dropping it lets them run again
/// with their original registers and signal masks, so that any failure
/// leaves the process as it was.
pub struct Seized {
    pub pid: i32,
    pub threads: Vec<Thread>,
    released: bool,
}

/// Refuses targets that must never be checkpointed.
pub fn check_target(pid: i32) -> Result<()> {
    if pid <= 0 {
        return Err(Error::Refused {
            pid,
            reason: "not a valid process id".into(),
        });
    }
    let stat = proc::stat(pid, None)?;
    const PF_KTHREAD: u64 = 0x0020_0000;
    if stat.field(9) & PF_KTHREAD != 0 {
        return Err(Error::Refused {
            pid,
            reason: format!(
                "it is a kernel thread ({}); only user processes can be checkpointed",
                stat.comm
            ),
        });
    }
    if pid == 1 {
        return Err(Error::Refused {
            pid,
            reason: "it is this system's init; checkpointing it would stop the machine".into(),
        });
    }
    let me = std::process::id() as i32;
    let mut p = me;
    while p > 1 {
        if p == pid {
            return Err(Error::Refused {
                pid,
                reason: "it is the agent itself or one of its ancestors".into(),
            });
        }
        p = proc::stat(p, None).map(|s| s.field(4) as i32).unwrap_or(0);
    }
    Ok(())
}

/// Seizes and interrupts thread `tid` of process `pid` without waiting for
/// its stop (a frozen job's thread stops only once thawed). False when the
/// thread is gone; true when it is ours, also when it already was (a clone
/// auto-attached, or seized while its job was frozen).
pub fn seize_and_interrupt(pid: i32, tid: i32) -> Result<bool> {
    let t = Pid::from_raw(tid);
    match ptrace::seize(t, inject::seize_options(false)) {
        Ok(()) => {
            ptrace::interrupt(t).ctx(tid, || "PTRACE_INTERRUPT".into())?;
            Ok(true)
        }
        Err(Errno::ESRCH) => Ok(false),
        Err(Errno::EPERM) if traced_by_us(pid, tid) => Ok(true),
        Err(e) => Err(Error::sys(
            tid,
            "PTRACE_SEIZE (is it traced by a debugger, or protected by Yama?)",
            e,
        )),
    }
}

impl Seized {
    /// Seizes and interrupts every thread of `pid`, looping until no new
    /// thread appears (new clones are auto-attached meanwhile).
    pub fn process(pid: i32) -> Result<Self> {
        let mut s = Seized {
            pid,
            threads: Vec::new(),
            released: false,
        };
        let mut seen = std::collections::BTreeSet::new();
        loop {
            let tids = proc::tids(pid)?;
            let new: Vec<i32> = tids.into_iter().filter(|t| !seen.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                seen.insert(tid);
                // A thread that exited between listing and seizing is skipped.
                s.threads.extend(seize_thread(pid, tid)?);
            }
        }
        if s.threads.is_empty() {
            return Err(Error::NoProcess { pid });
        }
        // The thread group leader comes first: it is the one we inject into.
        s.threads.sort_by_key(|t| (t.tid != pid, t.tid));
        if s.threads[0].tid != pid {
            return Err(Error::Refused {
                pid,
                reason: "its main thread has exited (zombie leader); not supported yet".into(),
            });
        }
        debug!(pid, threads = s.threads.len(), "seized");
        Ok(s)
    }

    /// Seizes one thread of `pid` (its leader unless that has exited),
    /// for a short injected call while the others run on.
    pub fn one_thread(pid: i32) -> Result<Self> {
        for tid in proc::tids(pid)? {
            let zombie = proc::stat(pid, Some(tid)).map_or(true, |s| s.state() == 'Z');
            if zombie {
                continue;
            }
            if let Some(t) = seize_thread(pid, tid)? {
                return Ok(Seized {
                    pid,
                    threads: vec![t],
                    released: false,
                });
            }
        }
        Err(Error::NoProcess { pid })
    }

    /// Blocks every signal in every thread, so none is delivered while the
    /// agent makes them run system calls (the original masks come back on release).
    pub fn block_signals(&self) -> Result<()> {
        for t in &self.threads {
            sys::ptrace::set_sigmask(Pid::from_raw(t.tid), !0u64)
                .ctx(t.tid, || "PTRACE_SETSIGMASK".into())?;
        }
        Ok(())
    }

    /// Puts every thread's registers and mask back while keeping it stopped:
    /// once the injected calls are over, an agent that dies (the kernel
    /// then detaches its tracees) leaves the process exactly as it was.
    pub fn reset(&self) -> Result<()> {
        for t in &self.threads {
            reset_thread(t)?;
        }
        Ok(())
    }

    /// Lets every thread run on as before.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        let mut first_err = None;
        for t in &self.threads {
            if let Err(e) = resume_thread(t) {
                warn!(tid = t.tid, "could not resume thread cleanly: {e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills processes (after a dump without --leave-running) and waits
    /// until they are gone. All are killed first, so that they tear their
    /// address spaces down in parallel.
    pub fn kill_all(all: Vec<Seized>) -> Result<()> {
        Self::kill_all_now(all)?.wait()
    }

    /// Has the kernel kill every task should this agent die before it
    /// does (PTRACE_O_EXITKILL): the tree is then past the point where it
    /// may run on. Call from the thread that seized it.
    pub fn exit_kill(all: &[Seized]) -> Result<()> {
        for t in all.iter().flat_map(|s| &s.threads) {
            ptrace::setoptions(
                Pid::from_raw(t.tid),
                crate::inject::seize_options(false) | ptrace::Options::PTRACE_O_EXITKILL,
            )
            .ctx(t.tid, || "PTRACE_SETOPTIONS (exit kill)".into())?;
        }
        Ok(())
    }

    /// Sends SIGKILL to every process, and returns as soon as it is sent:
    /// from then on none of them runs another instruction of its own,
    /// though tearing their address spaces down (about 0.1 s per GiB here)
    /// has just begun. [`Killed::wait`] waits for the end. None is ever
    /// resumed, even when one could not be killed (that one is the error).
    pub fn kill_all_now(mut all: Vec<Seized>) -> Result<Killed> {
        let mut failed = None;
        for s in &mut all {
            s.released = true;
            match nix::sys::signal::kill(Pid::from_raw(s.pid), nix::sys::signal::Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    failed.get_or_insert(Error::sys(s.pid, "kill(SIGKILL)", e));
                }
            }
        }
        // A pidfd (of a zombie too) tells when each has exited; without
        // one (no fd left), its /proc entry does.
        let killed = Killed {
            pidfds: all
                .into_iter()
                .map(|s| {
                    let fd = sys::pidfd::pidfd_open(s.pid).ok();
                    (s, fd)
                })
                .collect(),
        };
        match failed {
            Some(e) => Err(e),
            None => Ok(killed),
        }
    }
}

/// Processes killed by [`Seized::kill_all_now`], still exiting.
pub struct Killed {
    pidfds: Vec<(Seized, Option<std::os::fd::OwnedFd>)>,
}

impl Killed {
    /// Collects the killed tasks (any thread of the tracer's process may)
    /// and waits until every process has exited.
    pub fn wait(self) -> Result<()> {
        let pidfds = self.pidfds;
        collect_killed(
            pidfds
                .iter()
                .flat_map(|(s, _)| s.threads.iter().map(|t| t.tid)),
        );
        for (s, pidfd) in &pidfds {
            let exited = match pidfd {
                Some(fd) => {
                    use std::os::fd::AsFd;
                    let mut fds = [nix::poll::PollFd::new(
                        fd.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16))
                        .ctx(s.pid, || "waiting for the process to exit".into())?
                        > 0
                }
                None => {
                    let deadline = std::time::Instant::now() + COLLECT_TIMEOUT;
                    let gone = || proc::stat(s.pid, None).map_or(true, |st| st.state() == 'Z');
                    while !gone() && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    gone()
                }
            };
            if !exited {
                warn!(pid = s.pid, "killed 10 s ago and still exiting");
            }
        }
        Ok(())
    }
}

/// How long killed tasks may take to be collected before we give up.
const COLLECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Collects the killed threads we trace: killed tracees linger as zombies
/// until their tracer collects them. In whatever order they become ready:
/// a leader is reported only after its other threads, and a PID
/// namespace's init only exits after every other task of its namespace,
/// so any fixed order can wait forever.
pub fn collect_killed(tids: impl IntoIterator<Item = i32>) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut left: Vec<i32> = tids.into_iter().collect();
    let deadline = std::time::Instant::now() + COLLECT_TIMEOUT;
    while !left.is_empty() {
        let before = left.len();
        left.retain(|&tid| {
            match waitpid(
                Pid::from_raw(tid),
                Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
            ) {
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => false,
                Ok(_) | Err(Errno::EINTR) => true,
                // Not (or no longer) ours to collect.
                Err(_) => false,
            }
        });
        if left.len() == before {
            if std::time::Instant::now() >= deadline {
                warn!(?left, "killed tasks not collected in time");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Puts a stopped thread's registers and signal mask back as they were
/// (an interrupted system call turned into its restart).
fn reset_thread(t: &Thread) -> Result<()> {
    let tid = Pid::from_raw(t.tid);
    inject::set_regs(tid, inject::normalize_restart(t.regs, true))?;
    sys::ptrace::set_sigmask(tid, t.sigmask).ctx(t.tid, || "PTRACE_SETSIGMASK".into())
}

fn resume_thread(t: &Thread) -> Result<()> {
    reset_thread(t)?;
    ptrace::detach(Pid::from_raw(t.tid), None).ctx(t.tid, || "PTRACE_DETACH".into())
}

/// Seizes and stops thread `tid` of `pid` and records its registers and
/// signal mask; None when the thread is gone.
fn seize_thread(pid: i32, tid: i32) -> Result<Option<Thread>> {
    if !seize_and_interrupt(pid, tid)? {
        return Ok(None);
    }
    let t = Pid::from_raw(tid);
    inject::wait_interrupt_stop(t)?;
    let regs = inject::get_regs(t)?;
    let sigmask = sys::ptrace::get_sigmask(t).ctx(tid, || "PTRACE_GETSIGMASK".into())?;
    Ok(Some(Thread { tid, regs, sigmask }))
}

/// A thread of `pid` this agent traces (and so holds stopped), if any.
pub fn held_thread(pid: i32) -> Option<i32> {
    proc::tids(pid)
        .ok()?
        .into_iter()
        .find(|&tid| traced_by_us(pid, tid))
}

/// TracerPid names the tracing *thread*: in `ckpt-agent serve` that is a
/// connection's thread, not the main one, so this thread's id counts as
/// well as the process id (what the command line always compared with).
fn traced_by_us(pid: i32, tid: i32) -> bool {
    let me = [
        nix::unistd::gettid().as_raw().to_string(),
        std::process::id().to_string(),
    ];
    proc::read(pid, &format!("task/{tid}/status"))
        .map(|s| {
            proc::parse_status(&s)
                .get("TracerPid")
                .is_some_and(|t| me.contains(t))
        })
        .unwrap_or(false)
}

impl Drop for Seized {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        for t in &self.threads {
            if let Err(e) = resume_thread(t) {
                warn!(
                    tid = t.tid,
                    "could not resume thread after a failed dump: {e}"
                );
            }
        }
    }
}
