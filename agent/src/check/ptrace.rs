//! Probes of ptrace, pidfd and kcmp against a sleeping child.

use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::ptrace::{self as pt, Options};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{ctx, errno_ctx, Outcome, CHILD_TIMEOUT};
use crate::sys::probe::{self, fork_child, ProbeChild};
use crate::sys::{pidfd as pfd, ptrace as sp};

/// PTRACE_O_SUSPEND_SECCOMP (not in nix's Options).
const PTRACE_O_SUSPEND_SECCOMP: libc::c_int = 0x0020_0000;

/// A child that signals readiness and then sleeps in pause().
fn sleeper() -> Result<ProbeChild, String> {
    sleeper_with(|| Ok(()))
}

/// Like [`sleeper`], running `setup` in the child first (raw syscalls only).
fn sleeper_with<F: FnOnce() -> Result<(), nix::errno::Errno>>(
    setup: F,
) -> Result<ProbeChild, String> {
    let mut c = fork_child(|io| {
        if setup().is_err() {
            return io.fail(1);
        }
        io.report(0, nix::errno::Errno::UnknownErrno, &[]);
        io.idle()
    })
    .map_err(ctx("fork"))?;
    let r = c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    if r.step != 0 {
        return Err(format!("child setup failed: {}", r.errno));
    }
    Ok(c)
}

/// Seizes and interrupts `pid`, waiting for its PTRACE_EVENT_STOP.
fn seize_stop(pid: Pid, opts: Options) -> Result<(), String> {
    pt::seize(pid, opts).map_err(ctx("PTRACE_SEIZE"))?;
    pt::interrupt(pid).map_err(ctx("PTRACE_INTERRUPT"))?;
    let deadline = Instant::now() + CHILD_TIMEOUT;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_STOP => return Ok(()),
            Ok(WaitStatus::StillAlive) => {}
            Ok(other) => return Err(format!("unexpected wait status {other:?}")),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("waitpid: {e}")),
        }
        if Instant::now() >= deadline {
            return Err("no PTRACE_EVENT_STOP after PTRACE_INTERRUPT".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn stopped_sleeper() -> Result<ProbeChild, String> {
    let c = sleeper()?;
    seize_stop(c.pid(), Options::empty())?;
    Ok(c)
}

pub(super) fn seize() -> Outcome {
    let c = sleeper()?;
    seize_stop(c.pid(), Options::PTRACE_O_EXITKILL)?;
    Ok("seized and interrupted a child: PTRACE_EVENT_STOP seen".into())
}

pub(super) fn interrupt_syscall() -> Outcome {
    let c = sleeper()?;
    // Let the child get from its ready write into pause().
    std::thread::sleep(Duration::from_millis(10));
    seize_stop(c.pid(), Options::empty())?;
    let regs = pt::getregs(c.pid()).map_err(ctx("PTRACE_GETREGS"))?;
    let ret = regs.rax as i64;
    const ERESTARTNOHAND: i64 = 514;
    if regs.orig_rax as i64 >= 0 && (ret == -ERESTARTNOHAND || ret == -(libc::EINTR as i64)) {
        Ok(format!(
            "stopped inside syscall {} with rax={ret} (restart pending)",
            regs.orig_rax
        ))
    } else {
        Err(format!(
            "child not seen inside its syscall: orig_rax={} rax={ret}",
            regs.orig_rax as i64
        ))
    }
}

pub(super) fn xstate() -> Outcome {
    let c = stopped_sleeper()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = sp::get_xstate_into(c.pid(), &mut buf)
        .map_err(errno_ctx("PTRACE_GETREGSET NT_X86_XSTATE"))?;
    let cpuid_size = probe::cpuid(0xd, 0).1 as usize;
    let note = if cpuid_size == n {
        " (matches cpuid 0xD)".to_string()
    } else {
        format!(" (cpuid 0xD says {cpuid_size})")
    };
    Ok(format!("{n} bytes{note}"))
}

pub(super) fn sigmask() -> Outcome {
    let c = stopped_sleeper()?;
    let pid = c.pid();
    let orig = sp::get_sigmask(pid).map_err(errno_ctx("PTRACE_GETSIGMASK"))?;
    let want = orig | 1 << (libc::SIGUSR1 - 1) | 1 << (libc::SIGRTMIN() + 3 - 1);
    sp::set_sigmask(pid, want).map_err(errno_ctx("PTRACE_SETSIGMASK"))?;
    let got = sp::get_sigmask(pid).map_err(errno_ctx("PTRACE_GETSIGMASK"))?;
    sp::set_sigmask(pid, orig).map_err(errno_ctx("PTRACE_SETSIGMASK"))?;
    if got == want {
        Ok(format!("round-trip {orig:#x} -> {want:#x}"))
    } else {
        Err(format!("set {want:#x} but read back {got:#x}"))
    }
}

pub(super) fn rseq() -> Outcome {
    let c = stopped_sleeper()?;
    let r = sp::get_rseq_config(c.pid()).map_err(errno_ctx("PTRACE_GET_RSEQ_CONFIGURATION"))?;
    if r.rseq_abi_pointer == 0 {
        Ok("works; child has no rseq registered (glibc.pthread.rseq=0?)".into())
    } else {
        Ok(format!(
            "rseq at {:#x}, size {}, signature {:#x}",
            r.rseq_abi_pointer, r.rseq_abi_size, r.signature
        ))
    }
}

pub(super) fn seccomp() -> Outcome {
    let c = sleeper_with(probe::install_allow_all_seccomp)?;
    let opts = Options::from_bits_retain(PTRACE_O_SUSPEND_SECCOMP);
    seize_stop(c.pid(), opts).map_err(|e| format!("with PTRACE_O_SUSPEND_SECCOMP: {e}"))?;
    let prog = sp::seccomp_get_filter(c.pid(), 0)
        .and_then(|p| p.ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT)))
        .map_err(errno_ctx("PTRACE_SECCOMP_GET_FILTER"))?;
    if prog == probe::BPF_RET_ALLOW {
        Ok("suspended seccomp; read back the child's 1-instruction filter".into())
    } else {
        Err(format!(
            "filter read back with {} instructions, expected 1",
            prog.len() / probe::BPF_RET_ALLOW.len()
        ))
    }
}

pub(super) fn pidfd() -> Outcome {
    let mut c = fork_child(|io| {
        // A pipe opened after fork: the parent has no copy of it.
        match nix::unistd::pipe2(OFlag::empty()) {
            Ok((r, w)) => {
                let (r, _w) = (r.into_raw_fd(), w.into_raw_fd());
                io.report(0, nix::errno::Errno::UnknownErrno, &[r as u64]);
                io.idle()
            }
            Err(_) => io.fail(1),
        }
    })
    .map_err(ctx("fork"))?;
    let r = c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    if r.step != 0 {
        return Err(format!("child pipe: {}", r.errno));
    }
    let target = r.vals[0] as i32;
    let pidfd = pfd::pidfd_open(c.pid().as_raw()).map_err(errno_ctx("pidfd_open"))?;
    let got = pfd::pidfd_getfd(pidfd.as_fd(), target).map_err(errno_ctx("pidfd_getfd"))?;
    let mine = nix::sys::stat::fstat(&got).map_err(ctx("fstat"))?;
    let link = format!("/proc/{}/fd/{target}", c.pid());
    let theirs = nix::sys::stat::stat(link.as_str()).map_err(ctx("stat /proc/PID/fd"))?;
    if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino) {
        Ok(format!(
            "pidfd_getfd of the child's fd {target} is the same pipe (inode {})",
            mine.st_ino
        ))
    } else {
        Err("pidfd_getfd returned a different file".into())
    }
}

pub(super) fn kcmp() -> Outcome {
    let mut c = fork_child(|io| {
        let Ok((a, _)) = nix::unistd::pipe2(OFlag::empty()) else {
            return io.fail(1);
        };
        let Ok(b) = nix::unistd::dup(&a) else {
            return io.fail(2);
        };
        let Ok((other, _)) = nix::unistd::pipe2(OFlag::empty()) else {
            return io.fail(3);
        };
        let fds = [
            a.as_raw_fd() as u64,
            b.as_raw_fd() as u64,
            other.as_raw_fd() as u64,
        ];
        io.report(0, nix::errno::Errno::UnknownErrno, &fds);
        io.idle()
    })
    .map_err(ctx("fork"))?;
    let r = c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    if r.step != 0 {
        return Err(format!("child setup step {}: {}", r.step, r.errno));
    }
    let pid = c.pid().as_raw();
    let [a, b, o] = [r.vals[0] as i32, r.vals[1] as i32, r.vals[2] as i32];
    let same = pfd::kcmp_file(pid, a, pid, b).map_err(errno_ctx("kcmp(KCMP_FILE)"))?;
    let diff = pfd::kcmp_file(pid, a, pid, o).map_err(errno_ctx("kcmp(KCMP_FILE)"))?;
    if same == 0 && diff != 0 {
        Ok("KCMP_FILE: dup'ed fds equal, other pipe differs".into())
    } else {
        Err(format!("unexpected kcmp results: dup {same}, other {diff}"))
    }
}
