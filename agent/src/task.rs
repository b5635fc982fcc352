//! A process's CPU, signal and process-wide kernel state: dump and restore
//! of `TaskCore` (core.proto).

use ckpt_proto::image::{
    Creds, ITimer, PosixTimer, ProcFlags, Rlimit, Rseq, SeccompFilter, SigAction, SigAltStack,
    SigInfo, TaskCore, ThreadCore, X86Regs,
};
use nix::unistd::Pid;

use crate::error::{Context, Error, Result};
use crate::inject::{self, read_mem, Regs, Remote, Scratch};
use crate::proc;
use crate::sys;

/// Signals whose disposition can be read and set (all but SIGKILL, SIGSTOP).
fn settable_signals() -> impl Iterator<Item = i32> {
    (1..=64).filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
}

const PR_GET_TID_ADDRESS: u64 = 40;
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

/// Both directions of the register conversion, from one list of fields.
macro_rules! regs_fields {
    ($($f:ident),*) => {
        /// Converts ptrace registers into their image form.
        pub fn regs_to_image(r: &Regs) -> X86Regs {
            X86Regs { $($f: r.$f),* }
        }

        /// Converts image registers back into ptrace's form.
        pub fn regs_from_image(r: &X86Regs) -> Regs {
            Regs { $($f: r.$f),* }
        }
    };
}

regs_fields!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
);

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn siginfo_image(raw: &[u8; sys::ptrace::SIGINFO_SIZE]) -> SigInfo {
    SigInfo {
        signo: i32::from_le_bytes(raw[0..4].try_into().expect("4 bytes")),
        code: i32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
        raw: raw.to_vec(),
    }
}

/// State a thread exposes through ptrace alone (no injection needed).
pub fn dump_thread_outside(pid: i32, tid: i32, regs: &Regs) -> Result<ThreadCore> {
    let t = Pid::from_raw(tid);
    let xsave = sys::ptrace::get_xstate(t).ctx(tid, || "PTRACE_GETREGSET(NT_X86_XSTATE)".into())?;
    let sigmask = sys::ptrace::get_sigmask(t).ctx(tid, || "PTRACE_GETSIGMASK".into())?;
    let pending = sys::ptrace::peek_siginfo(t, false)
        .ctx(tid, || "PTRACE_PEEKSIGINFO".into())?
        .iter()
        .map(siginfo_image)
        .collect();
    let rseq =
        sys::ptrace::get_rseq_config(t).ctx(tid, || "PTRACE_GET_RSEQ_CONFIGURATION".into())?;
    let (robust_head, robust_len) =
        sys::ptrace::get_robust_list(t).ctx(tid, || "get_robust_list".into())?;
    let status = proc::parse_status(&proc::read(pid, &format!("task/{tid}/status"))?);
    let seccomp_mode: u32 = status
        .get("Seccomp")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut seccomp = Vec::new();
    if seccomp_mode == 2 {
        for i in 0.. {
            match sys::ptrace::seccomp_get_filter(t, i)
                .ctx(tid, || "PTRACE_SECCOMP_GET_FILTER".into())?
            {
                Some(program) => seccomp.push(SeccompFilter { program }),
                None => break,
            }
        }
    }
    let comm = proc::read(pid, &format!("task/{tid}/comm"))?
        .trim_end_matches('\n')
        .to_string();
    Ok(ThreadCore {
        tid,
        comm,
        regs: Some(regs_to_image(regs)),
        xsave,
        sigmask,
        pending,
        altstack: None,
        rseq: (rseq.rseq_abi_size != 0).then_some(Rseq {
            address: rseq.rseq_abi_pointer,
            length: rseq.rseq_abi_size,
            flags: rseq.flags,
            signature: rseq.signature,
        }),
        robust_list_head: robust_head,
        robust_list_len: robust_len,
        clear_tid_address: 0,
        seccomp,
        seccomp_mode,
        nice: sys::misc::getpriority(tid).ctx(tid, || "getpriority".into())?,
    })
}

/// State only the thread itself can tell: its alternate signal stack and
/// clear-tid address.
pub fn dump_thread_inside(
    th: &mut ThreadCore,
    remote: &Remote,
    scratch: &mut Scratch,
) -> Result<()> {
    scratch.reset();
    let ss = scratch.alloc(24)?;
    remote.syscall(libc::SYS_sigaltstack, &[0, ss])?;
    let tid_addr = scratch.alloc(8)?;
    remote.syscall(libc::SYS_prctl, &[PR_GET_TID_ADDRESS, tid_addr])?;
    let b = read_mem(
        scratch.pid,
        scratch.addr,
        (tid_addr + 8 - scratch.addr) as usize,
    )?;
    let o = (ss - scratch.addr) as usize;
    th.altstack = Some(SigAltStack {
        sp: le_u64(&b, o),
        flags: i32::from_le_bytes(b[o + 8..o + 12].try_into().expect("4 bytes")),
        size: le_u64(&b, o + 16),
    });
    th.clear_tid_address = le_u64(&b, (tid_addr - scratch.addr) as usize);
    Ok(())
}

fn status_ids(status: &std::collections::HashMap<String, String>, key: &str) -> Vec<u32> {
    status
        .get(key)
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn status_hex(status: &std::collections::HashMap<String, String>, key: &str) -> u64 {
    status
        .get(key)
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0)
}

/// The working directory of `pid`, refused when restore could not chdir
/// back to it by its path: deleted, or hidden by a mount made over it (a
/// job started from the node's /tmp works in a directory its own /tmp
/// hides).
fn reachable_cwd(pid: i32, own: u64) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let cwd = proc::readlink(pid, "cwd")?;
    let ident = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let by_path = crate::ns::reach(pid, own, &cwd);
    if cwd.ends_with(" (deleted)") || ident(&format!("/proc/{pid}/cwd")) != ident(&by_path) {
        return Err(Error::Refused {
            pid,
            reason: format!(
                "its working directory {cwd} cannot be reached by its path any more (deleted, or hidden by a mount); \
                 start it from a directory that stays visible"
            ),
        });
    }
    Ok(cwd)
}

/// Process-wide state, read from /proc and by injection into the main thread.
/// `own`: the namespaces the process has apart from the agent's.
pub fn dump_process(pid: i32, own: u64, main: &Remote, scratch: &mut Scratch) -> Result<TaskCore> {
    let stat = proc::stat(pid, None)?;
    let status = proc::status(pid)?;
    scratch.reset();

    // Signal dispositions: one rt_sigaction per signal, read back in one go.
    let base = scratch.alloc(65 * 32)?;
    for sig in settable_signals() {
        main.syscall(
            libc::SYS_rt_sigaction,
            &[sig as u64, 0, base + sig as u64 * 32, 8],
        )?;
    }
    let acts = read_mem(pid, base, 65 * 32)?;
    let sigactions = settable_signals()
        .map(|sig| {
            let o = sig as usize * 32;
            SigAction {
                signo: sig,
                handler: le_u64(&acts, o),
                flags: le_u64(&acts, o + 8),
                restorer: le_u64(&acts, o + 16),
                mask: le_u64(&acts, o + 24),
            }
        })
        .collect();

    let mut itimers = Vec::new();
    for which in 0..3 {
        let a = scratch.alloc(32)?;
        main.syscall(libc::SYS_getitimer, &[which, a])?;
        let b = read_mem(pid, a, 32)?;
        let us = |o: usize| le_u64(&b, o) * 1_000_000 + le_u64(&b, o + 8);
        itimers.push(ITimer {
            which: which as i32,
            interval_us: us(0),
            value_us: us(16),
        });
    }

    let mut posix_timers = Vec::new();
    for t in proc::parse_timers(&proc::read(pid, "timers")?) {
        let a = scratch.alloc(32)?;
        main.syscall(libc::SYS_timer_gettime, &[t.id as u64, a])?;
        let b = read_mem(pid, a, 32)?;
        let ns = |o: usize| le_u64(&b, o) * 1_000_000_000 + le_u64(&b, o + 8);
        let overrun = main.syscall(libc::SYS_timer_getoverrun, &[t.id as u64])? as i32;
        posix_timers.push(PosixTimer {
            id: t.id,
            clock_id: t.clock_id,
            notify: match t.notify.as_str() {
                "none" => libc::SIGEV_NONE,
                "thread" => libc::SIGEV_THREAD,
                _ => libc::SIGEV_SIGNAL,
            } | if t.to_thread {
                libc::SIGEV_THREAD_ID
            } else {
                0
            },
            signo: t.signo,
            sigev_value: t.sigev_value,
            notify_tid: t.notify_tid,
            interval_ns: ns(0),
            value_ns: ns(16),
            overrun,
        });
    }

    // /proc/PID/limits, because prlimit() on another process needs
    // CAP_SYS_RESOURCE once its credentials differ from ours.
    let rlimits = proc::parse_limits(&proc::read(pid, "limits")?)
        .into_iter()
        .map(|(resource, cur, max)| Rlimit { resource, cur, max })
        .collect();

    let out = scratch.alloc(8)?;
    let prctl_out = |opt: u64| -> Result<i32> {
        main.syscall(libc::SYS_prctl, &[opt, out])?;
        let b = read_mem(pid, out, 4)?;
        Ok(i32::from_le_bytes(b[..4].try_into().expect("4 bytes")))
    };
    let pdeath_signal = prctl_out(libc::PR_GET_PDEATHSIG as u64)?;
    let child_subreaper = prctl_out(libc::PR_GET_CHILD_SUBREAPER as u64)? != 0;
    let dumpable = main.syscall(libc::SYS_prctl, &[libc::PR_GET_DUMPABLE as u64])? as i32;
    let thp_disable = main.syscall(libc::SYS_prctl, &[libc::PR_GET_THP_DISABLE as u64])? as i32;
    let timerslack_ns = main.syscall(libc::SYS_prctl, &[libc::PR_GET_TIMERSLACK as u64])? as i32;
    let securebits = main.syscall(libc::SYS_prctl, &[libc::PR_GET_SECUREBITS as u64])? as u32;

    let personality = u64::from_str_radix(proc::read(pid, "personality")?.trim(), 16).unwrap_or(0);
    let shared_pending = sys::ptrace::peek_siginfo(Pid::from_raw(pid), true)
        .ctx(pid, || "PTRACE_PEEKSIGINFO(shared)".into())?
        .iter()
        .map(siginfo_image)
        .collect();

    Ok(TaskCore {
        pid,
        ppid: stat.field(4) as i32,
        pgid: stat.field(5) as i32,
        sid: stat.field(6) as i32,
        comm: stat.comm.clone(),
        threads: Vec::new(),
        sigactions,
        itimers,
        posix_timers,
        rlimits,
        creds: Some(Creds {
            uids: status_ids(&status, "Uid"),
            gids: status_ids(&status, "Gid"),
            groups: status_ids(&status, "Groups"),
            cap_inh: status_hex(&status, "CapInh"),
            cap_prm: status_hex(&status, "CapPrm"),
            cap_eff: status_hex(&status, "CapEff"),
            cap_bnd: status_hex(&status, "CapBnd"),
            cap_amb: status_hex(&status, "CapAmb"),
            securebits,
        }),
        umask: status
            .get("Umask")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .unwrap_or(0o022),
        nice: sys::misc::getpriority(pid).ctx(pid, || "getpriority".into())?,
        personality,
        flags: Some(ProcFlags {
            dumpable,
            pdeath_signal,
            no_new_privs: status.get("NoNewPrivs").map(String::as_str) == Some("1"),
            child_subreaper,
            thp_disable,
            timerslack_ns,
        }),
        cwd: reachable_cwd(pid, own)?,
        root: proc::readlink(pid, "root")?,
        shared_pending,
        exit_code: 0,
        state: stat.state().to_string(),
        // Found by comparing processes (dump::check_sharing).
        fd_table_of: 0,
    })
}

/// Restores the per-thread state that the thread must set itself.
pub fn restore_thread_inside(
    th: &ThreadCore,
    remote: &Remote,
    scratch: &mut Scratch,
) -> Result<()> {
    scratch.reset();
    remote.syscall(libc::SYS_set_tid_address, &[th.clear_tid_address])?;
    remote.syscall(
        libc::SYS_set_robust_list,
        &[th.robust_list_head, th.robust_list_len.max(24)],
    )?;
    if let Some(ss) = &th.altstack {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&ss.sp.to_le_bytes());
        b.extend_from_slice(&ss.flags.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&ss.size.to_le_bytes());
        // SS_ONSTACK is a read-only state bit; a thread is never on its
        // alternate stack at a ptrace stop we restore into.
        let flags = ss.flags & !libc::SS_ONSTACK;
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        let a = scratch.put(&b)?;
        remote.syscall(libc::SYS_sigaltstack, &[a, 0])?;
    }
    let comm = scratch.put_cstr(&th.comm)?;
    remote.syscall(libc::SYS_prctl, &[libc::PR_SET_NAME as u64, comm])?;
    if let Some(r) = &th.rseq {
        remote.syscall(
            libc::SYS_rseq,
            &[r.address, r.length as u64, 0, r.signature as u64],
        )?;
    }
    Ok(())
}

/// Restores signal dispositions, timers, flags and limits of the process.
pub fn restore_process(core: &TaskCore, main: &Remote, scratch: &mut Scratch) -> Result<()> {
    let pid = core.pid;
    scratch.reset();
    // One batch: a process has up to 64 of them.
    let mut calls = Vec::with_capacity(core.sigactions.len());
    for a in &core.sigactions {
        let mut b = Vec::with_capacity(32);
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let addr = scratch.put(&b)?;
        calls.push((libc::SYS_rt_sigaction, vec![a.signo as u64, addr, 0, 8]));
    }
    main.syscalls(scratch, &calls)?;
    scratch.reset();
    for t in &core.itimers {
        // A periodic ITIMER_REAL that expired while its SIGALRM is pending
        // reads 0 left: the kernel re-arms it when that signal is taken.
        // Set as read it would be disarmed; one period from now keeps it
        // going (the pending SIGALRM is restored with the other signals).
        let value_us = if t.which == libc::ITIMER_REAL && t.value_us == 0 {
            t.interval_us
        } else {
            t.value_us
        };
        let mut b = Vec::with_capacity(32);
        for v in [
            t.interval_us / 1_000_000,
            t.interval_us % 1_000_000,
            value_us / 1_000_000,
            value_us % 1_000_000,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let addr = scratch.put(&b)?;
        main.syscall(libc::SYS_setitimer, &[t.which as u64, addr, 0])?;
        scratch.reset();
    }
    if !core.posix_timers.is_empty() {
        // Linux 6.16+ creates a timer with the id we ask for once this is on.
        main.syscall(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 1])
            .map_err(|e| Error::Refused {
                pid,
                reason: format!("POSIX timers need PR_TIMER_CREATE_RESTORE_IDS (Linux 6.16+): {e}"),
            })?;
        for t in &core.posix_timers {
            // struct sigevent: value (8), signo (4), notify (4), tid (4), pad.
            let mut ev = vec![0u8; 64];
            ev[0..8].copy_from_slice(&t.sigev_value.to_le_bytes());
            ev[8..12].copy_from_slice(&t.signo.to_le_bytes());
            ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
            ev[16..20].copy_from_slice(&t.notify_tid.to_le_bytes());
            let evp = scratch.put(&ev)?;
            let idp = scratch.put(&t.id.to_le_bytes())?;
            main.syscall(libc::SYS_timer_create, &[t.clock_id as u64, evp, idp])?;
            let got = read_mem(main.tid.as_raw(), idp, 4)?;
            let got = i32::from_le_bytes(got[..4].try_into().expect("4 bytes"));
            if got != t.id {
                return Err(Error::Refused {
                    pid,
                    reason: format!("POSIX timer {} was recreated with id {got}", t.id),
                });
            }
            if t.value_ns != 0 || t.interval_ns != 0 {
                let itsp = scratch.put(&itimerspec_left(t.interval_ns, t.value_ns))?;
                main.syscall(libc::SYS_timer_settime, &[t.id as u64, 0, itsp, 0])?;
            }
            scratch.reset();
        }
        main.syscall(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 0])?;
    }
    main.syscall(libc::SYS_personality, &[core.personality])?;
    main.syscall(libc::SYS_umask, &[core.umask as u64])?;
    if let Some(f) = &core.flags {
        main.syscall(
            libc::SYS_prctl,
            &[libc::PR_SET_DUMPABLE as u64, f.dumpable as u64],
        )?;
        main.syscall(
            libc::SYS_prctl,
            &[
                libc::PR_SET_CHILD_SUBREAPER as u64,
                f.child_subreaper as u64,
            ],
        )?;
        main.syscall(
            libc::SYS_prctl,
            &[
                libc::PR_SET_THP_DISABLE as u64,
                f.thp_disable as u64,
                0,
                0,
                0,
            ],
        )?;
        if f.timerslack_ns > 0 {
            main.syscall(
                libc::SYS_prctl,
                &[libc::PR_SET_TIMERSLACK as u64, f.timerslack_ns as u64],
            )?;
        }
        if f.no_new_privs {
            main.syscall(
                libc::SYS_prctl,
                &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
            )?;
        }
    }
    // Limits are set from inside: prlimit() on another process needs
    // CAP_SYS_RESOURCE, which root lacks on some machines. One batch; if it
    // fails, one by one again (setting a limit twice is harmless) to name
    // the limit that cannot be set.
    scratch.reset();
    let mut calls = Vec::with_capacity(core.rlimits.len());
    for r in &core.rlimits {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&r.cur.to_le_bytes());
        b.extend_from_slice(&r.max.to_le_bytes());
        let a = scratch.put(&b)?;
        calls.push((libc::SYS_prlimit64, vec![0, r.resource as u64, a, 0]));
    }
    if main.syscalls(scratch, &calls).is_err() {
        for (r, (nr, args)) in core.rlimits.iter().zip(&calls) {
            main.syscall(*nr, args).map_err(|e| Error::Refused {
                pid,
                reason: format!(
                    "cannot set resource limit {} to {}/{}: {e} (raising a hard limit needs CAP_SYS_RESOURCE)",
                    r.resource, r.cur, r.max
                ),
            })?;
        }
    }
    scratch.reset();
    // From inside: thread ids are the job's.
    for th in &core.threads {
        main.syscall(
            libc::SYS_setpriority,
            &[
                libc::PRIO_PROCESS as u64,
                th.tid as u64,
                th.nice as i64 as u64,
            ],
        )?;
    }
    Ok(())
}

/// A `struct itimerspec` for a timer with `left_ns` to go and a period: a
/// timer due at the dump instant (0 left) fires as soon as it is restored
/// instead of staying disarmed.
pub fn itimerspec_left(interval_ns: u64, left_ns: u64) -> Vec<u8> {
    let value = left_ns.max(1);
    [
        interval_ns / 1_000_000_000,
        interval_ns % 1_000_000_000,
        value / 1_000_000_000,
        value % 1_000_000_000,
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
}

/// Sets the parent-death signal of the task.
pub fn set_pdeath_signal(main: &Remote, signal: i32) -> Result<()> {
    main.syscall(
        libc::SYS_prctl,
        &[libc::PR_SET_PDEATHSIG as u64, signal as u64],
    )?;
    Ok(())
}

/// Installs each thread's seccomp filters (oldest first). Threads whose
/// filter chains are identical get them once, synchronised with TSYNC.
pub fn restore_seccomp(core: &TaskCore, remotes: &[Remote], scratch: &mut Scratch) -> Result<()> {
    let first = &core.threads[0];
    let all_same = core
        .threads
        .iter()
        .all(|t| t.seccomp == first.seccomp && t.seccomp_mode == first.seccomp_mode);
    let install =
        |th: &ThreadCore, remote: &Remote, scratch: &mut Scratch, tsync: bool| -> Result<()> {
            for f in th.seccomp.iter().rev() {
                scratch.reset();
                let prog = scratch.put(&f.program)?;
                let mut fprog = Vec::with_capacity(16);
                fprog.extend_from_slice(&((f.program.len() / 8) as u64).to_le_bytes());
                fprog.extend_from_slice(&prog.to_le_bytes());
                let fp = scratch.put(&fprog)?;
                const SECCOMP_SET_MODE_FILTER: u64 = 1;
                const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1;
                let flags = if tsync { SECCOMP_FILTER_FLAG_TSYNC } else { 0 };
                remote.syscall(libc::SYS_seccomp, &[SECCOMP_SET_MODE_FILTER, flags, fp])?;
            }
            if th.seccomp_mode == 1 {
                remote.syscall(libc::SYS_prctl, &[libc::PR_SET_SECCOMP as u64, 1])?;
            }
            Ok(())
        };
    if all_same {
        install(first, &remotes[0], scratch, remotes.len() > 1)
    } else {
        for (th, r) in core.threads.iter().zip(remotes) {
            install(th, r, scratch, false)?;
        }
        Ok(())
    }
}

/// Restores credentials last: after them the task may no longer be allowed
/// to do what restore needs.
pub fn restore_creds(core: &TaskCore, main: &Remote, scratch: &mut Scratch) -> Result<()> {
    let Some(c) = &core.creds else { return Ok(()) };
    let pid = core.pid;
    let my = proc::status(std::process::id() as i32)?;
    let same = status_ids(&my, "Uid") == c.uids
        && status_ids(&my, "Gid") == c.gids
        && status_ids(&my, "Groups") == c.groups
        && status_hex(&my, "CapEff") == c.cap_eff
        && status_hex(&my, "CapPrm") == c.cap_prm
        && status_hex(&my, "CapInh") == c.cap_inh
        && status_hex(&my, "CapBnd") == c.cap_bnd
        && status_hex(&my, "CapAmb") == c.cap_amb;
    if same {
        return Ok(());
    }
    if c.uids.len() != 4 || c.gids.len() != 4 {
        return Err(Error::Refused {
            pid,
            reason: "credentials in the image are incomplete".into(),
        });
    }
    scratch.reset();
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let gp = if groups.is_empty() {
        0
    } else {
        scratch.put(&groups)?
    };
    main.syscall(libc::SYS_setgroups, &[c.groups.len() as u64, gp])?;
    main.syscall(
        libc::SYS_setresgid,
        &[c.gids[0] as u64, c.gids[1] as u64, c.gids[2] as u64],
    )?;
    main.syscall(libc::SYS_setfsgid, &[c.gids[3] as u64])?;
    // Drop bounding-set capabilities while we still hold CAP_SETPCAP.
    for cap in 0..64u64 {
        if c.cap_bnd & (1 << cap) == 0 {
            let _ = main.syscall(libc::SYS_prctl, &[libc::PR_CAPBSET_DROP as u64, cap]);
        }
    }
    // Securebits need CAP_SETPCAP, so they are set while still root, with
    // KEEP_CAPS added so that setresuid keeps the permitted set for capset;
    // KEEP_CAPS alone can be put back unprivileged afterwards.
    const SECBIT_KEEP_CAPS: u64 = 1 << 4;
    main.syscall(
        libc::SYS_prctl,
        &[
            libc::PR_SET_SECUREBITS as u64,
            c.securebits as u64 | SECBIT_KEEP_CAPS,
        ],
    )?;
    main.syscall(
        libc::SYS_setresuid,
        &[c.uids[0] as u64, c.uids[1] as u64, c.uids[2] as u64],
    )?;
    main.syscall(libc::SYS_setfsuid, &[c.uids[3] as u64])?;
    // capset v3: header {version, pid}, two data structs {eff, prm, inh} u32 each.
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&0x2008_0522u32.to_le_bytes());
    hdr.extend_from_slice(&0i32.to_le_bytes());
    let mut data = Vec::new();
    for half in 0..2 {
        for v in [c.cap_eff, c.cap_prm, c.cap_inh] {
            data.extend_from_slice(&((v >> (32 * half)) as u32).to_le_bytes());
        }
    }
    let hp = scratch.put(&hdr)?;
    let dp = scratch.put(&data)?;
    main.syscall(libc::SYS_capset, &[hp, dp])?;
    for cap in 0..64u64 {
        if c.cap_amb & (1 << cap) != 0 {
            main.syscall(
                libc::SYS_prctl,
                &[
                    libc::PR_CAP_AMBIENT as u64,
                    libc::PR_CAP_AMBIENT_RAISE as u64,
                    cap,
                    0,
                    0,
                ],
            )?;
        }
    }
    let keep = (c.securebits as u64 & SECBIT_KEEP_CAPS != 0) as u64;
    main.syscall(libc::SYS_prctl, &[libc::PR_SET_KEEPCAPS as u64, keep])?;
    Ok(())
}

/// Queues the pending signals back. A task may queue any siginfo to
/// itself but not to others, so each thread queues its own and the main
/// thread the process-wide ones.
pub fn restore_pending(core: &TaskCore, remotes: &[Remote], scratch: &mut Scratch) -> Result<()> {
    for s in &core.shared_pending {
        scratch.reset();
        let a = scratch.put(&s.raw)?;
        remotes[0].syscall(
            libc::SYS_rt_sigqueueinfo,
            &[core.pid as u64, s.signo as u64, a],
        )?;
    }
    for (th, r) in core.threads.iter().zip(remotes) {
        for s in &th.pending {
            scratch.reset();
            let a = scratch.put(&s.raw)?;
            r.syscall(
                libc::SYS_rt_tgsigqueueinfo,
                &[core.pid as u64, th.tid as u64, s.signo as u64, a],
            )?;
        }
    }
    Ok(())
}

/// Sets a thread's final CPU state: XSAVE area, signal mask and registers
/// (with an interrupted system call turned into its restart).
pub fn restore_cpu(th: &ThreadCore, host_tid: i32) -> Result<()> {
    let t = Pid::from_raw(host_tid);
    if !th.xsave.is_empty() {
        sys::ptrace::set_xstate(t, &th.xsave)
            .ctx(host_tid, || "PTRACE_SETREGSET(NT_X86_XSTATE)".into())?;
    }
    sys::ptrace::set_sigmask(t, th.sigmask).ctx(host_tid, || "PTRACE_SETSIGMASK".into())?;
    let regs = th.regs.as_ref().ok_or_else(|| Error::Refused {
        pid: host_tid,
        reason: "image has no registers for this thread".into(),
    })?;
    inject::set_regs(t, inject::normalize_restart(regs_from_image(regs), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_survive_both_conversions() {
        let img = X86Regs {
            r15: 1,
            rax: 2,
            orig_rax: u64::MAX,
            rip: 0x401000,
            fs_base: 0x7f00_0000_1000,
            gs: 0x2b,
            ..Default::default()
        };
        assert_eq!(regs_to_image(&regs_from_image(&img)), img);
    }
}
