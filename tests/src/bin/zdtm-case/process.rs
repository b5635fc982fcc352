//! Per-process state: signal handlers, timers, rlimits, cwd and root,
//! umask, comm, credentials, nice, prctl flags and seccomp.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::threads::per_thread;
use crate::util::*;
use crate::Ctx;

// ------------------------------------------------------------- sigactions

/// The kernel's struct sigaction for x86-64, read with the raw syscall so
/// that the restorer and the raw flags (SA_RESTORER) are compared too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
struct KSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

fn all_sigactions() -> Vec<(i32, KSigaction)> {
    (1..=64)
        .map(|sig| {
            let mut old = KSigaction::default();
            // SAFETY: a query (act NULL) into a correctly sized struct.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    std::ptr::null::<KSigaction>(),
                    &mut old,
                    8,
                )
            };
            (sig, old)
        })
        .collect()
}

static USR1_COUNT: AtomicU32 = AtomicU32::new(0);

extern "C" fn count_usr1(_: i32) {
    USR1_COUNT.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn siginfo_noop(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Handlers with SA_RESTART, SA_SIGINFO, SA_ONSTACK, SA_NODEFER,
/// SA_RESETHAND and masks, ignored signals, SIGCHLD flags: every signal's
/// action is compared, and one handler is run after the restore.
pub fn sigactions(ctx: &Ctx) -> CaseResult {
    let plain = count_usr1 as extern "C" fn(i32) as usize;
    let info = siginfo_noop as extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) as usize;
    let r = rtmin();
    set_action(
        libc::SIGUSR1,
        plain,
        libc::SA_RESTART,
        &[libc::SIGUSR2, libc::SIGHUP],
    )?;
    set_action(
        libc::SIGUSR2,
        info,
        libc::SA_SIGINFO | libc::SA_ONSTACK,
        &[libc::SIGINT],
    )?;
    set_action(libc::SIGHUP, libc::SIG_IGN, 0, &[])?;
    set_action(
        libc::SIGWINCH,
        info,
        libc::SA_SIGINFO | libc::SA_RESTART,
        &[r + 2],
    )?;
    set_action(r + 4, plain, libc::SA_NODEFER | libc::SA_RESETHAND, &[])?;
    set_action(r + 9, libc::SIG_IGN, 0, &[])?;
    set_action(
        libc::SIGCHLD,
        libc::SIG_DFL,
        libc::SA_NOCLDSTOP | libc::SA_NOCLDWAIT,
        &[],
    )?;
    let before = all_sigactions();

    ctx.ready_and_wait()?;

    let after = all_sigactions();
    let mut c = Check::new();
    for ((sig, b), (_, a)) in before.iter().zip(&after) {
        c.eq(&format!("signal {sig} action"), b, a);
    }
    // SAFETY: raising signals whose actions were set above.
    unsafe {
        let n = USR1_COUNT.load(Ordering::SeqCst);
        libc::raise(libc::SIGUSR1);
        c.eq(
            "SIGUSR1 handler runs",
            n + 1,
            USR1_COUNT.load(Ordering::SeqCst),
        );
        libc::raise(libc::SIGHUP); // ignored: would kill us otherwise
    }
    c.finish()
}

// ---------------------------------------------------------------- itimers

static ALRM: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_alrm(_: i32) {
    ALRM.fetch_add(1, Ordering::SeqCst);
}

fn getitimer(which: i32) -> (i128, i128) {
    // SAFETY: out-pointer only.
    let mut v: libc::itimerval = unsafe { std::mem::zeroed() };
    unsafe { libc::getitimer(which, &mut v) };
    let us = |t: libc::timeval| t.tv_sec as i128 * 1_000_000 + t.tv_usec as i128;
    (us(v.it_interval), us(v.it_value))
}

fn setitimer(which: i32, interval_us: i64, value_us: i64) -> CaseResult {
    let tv = |us: i64| libc::timeval {
        tv_sec: us / 1_000_000,
        tv_usec: us % 1_000_000,
    };
    let v = libc::itimerval {
        it_interval: tv(interval_us),
        it_value: tv(value_us),
    };
    // SAFETY: valid itimerval.
    cvt(
        unsafe { libc::setitimer(which, &v, std::ptr::null_mut()) },
        "setitimer",
    )?;
    Ok(())
}

/// Waits until `counter` has grown by `n`, within two seconds.
fn ticks(counter: &AtomicU32, n: u32) -> bool {
    let start = counter.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(2), || {
        counter.load(Ordering::SeqCst).wrapping_sub(start) >= n
    })
}

/// ITIMER_REAL ticking every 50 ms into a SIGALRM counter, and long
/// ITIMER_VIRTUAL/ITIMER_PROF timers that must keep their settings.
pub fn itimers(ctx: &Ctx) -> CaseResult {
    let h = on_alrm as extern "C" fn(i32) as usize;
    set_action(libc::SIGALRM, h, libc::SA_RESTART, &[])?;
    set_action(libc::SIGVTALRM, libc::SIG_IGN, 0, &[])?;
    set_action(libc::SIGPROF, libc::SIG_IGN, 0, &[])?;
    setitimer(libc::ITIMER_REAL, 50_000, 50_000)?;
    setitimer(libc::ITIMER_VIRTUAL, 100_000_000, 100_000_000)?;
    setitimer(libc::ITIMER_PROF, 200_000_000, 150_000_000)?;
    if !ticks(&ALRM, 2) {
        return Err("ITIMER_REAL does not tick even before checkpoint".into());
    }
    let before = [
        getitimer(libc::ITIMER_REAL),
        getitimer(libc::ITIMER_VIRTUAL),
        getitimer(libc::ITIMER_PROF),
    ];

    ctx.ready_and_wait()?;

    let after = [
        getitimer(libc::ITIMER_REAL),
        getitimer(libc::ITIMER_VIRTUAL),
        getitimer(libc::ITIMER_PROF),
    ];
    let mut c = Check::new();
    for (i, name) in ["ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"]
        .iter()
        .enumerate()
    {
        c.eq(&format!("{name} interval (us)"), before[i].0, after[i].0);
        // The CPU-time timers count in ticks: setting a value rounds it up
        // by up to one tick (10 ms at HZ=100), so a restore that sets what it
        // read may add that much. ITIMER_REAL is an exact hrtimer.
        let slack = if i == 0 { 0 } else { 10_000 };
        c.ok(
            &format!("{name} armed: value {} us, was {}", after[i].1, before[i].1),
            after[i].1 > 0 && after[i].1 <= before[i].0.max(before[i].1) + slack,
        );
    }
    c.ok(
        &format!(
            "ITIMER_REAL keeps ticking (count {})",
            ALRM.load(Ordering::SeqCst)
        ),
        ticks(&ALRM, 3),
    );
    c.finish()
}

/// A periodic ITIMER_REAL that expired while SIGALRM is blocked: the
/// kernel re-arms it only when the pending signal is taken, so until then
/// it reads 0 left. After restore it must still be periodic: the pending
/// SIGALRM arrives once unblocked, and the next ones follow.
pub fn itimer_pending(ctx: &Ctx) -> CaseResult {
    let h = on_alrm as extern "C" fn(i32) as usize;
    set_action(libc::SIGALRM, h, libc::SA_RESTART, &[])?;
    block(&[libc::SIGALRM]);
    setitimer(libc::ITIMER_REAL, 20_000, 20_000)?;
    let pending = || {
        // SAFETY: sigpending fills a sigset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigpending(&mut set);
            libc::sigismember(&set, libc::SIGALRM) == 1
        }
    };
    if !wait_until(Duration::from_secs(2), pending) {
        return Err("SIGALRM never became pending".into());
    }
    let before = getitimer(libc::ITIMER_REAL);
    if before.1 != 0 {
        return Err(format!(
            "expected an expired timer (0 left), read {before:?}"
        ));
    }
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.ok("SIGALRM still pending", pending());
    c.eq("interval (us)", 20_000, getitimer(libc::ITIMER_REAL).0);
    // SAFETY: unblocks SIGALRM for this thread.
    unsafe {
        let set = sigset(&[libc::SIGALRM]);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    c.ok(
        &format!("keeps ticking (count {})", ALRM.load(Ordering::SeqCst)),
        ticks(&ALRM, 3),
    );
    c.finish()
}

// ----------------------------------------------------------- posix_timers

static TIMER_GOOD: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];
static TIMER_BAD: AtomicU64 = AtomicU64::new(0);
static TIMER_IDS: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];
static TIMER_TID: AtomicI32 = AtomicI32::new(0);
const TIMER_VALUES: [u64; 2] = [0x1234, 0x5678];

/// Counts timer signals that carry the right si_code, timer id and value,
/// and for the thread-directed one that arrive on the right thread.
extern "C" fn on_timer(sig: i32, si: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let k = (sig - rtmin() - 5) as usize;
    // SAFETY: the kernel passes a valid siginfo.
    let si = unsafe { SigInfo::from_raw(si) };
    let good = k < 2
        && si.code == libc::SI_TIMER
        && si.w16 == TIMER_IDS[k].load(Ordering::SeqCst)
        && si.value == TIMER_VALUES[k]
        && (k == 0 || gettid() == TIMER_TID.load(Ordering::SeqCst));
    if good {
        TIMER_GOOD[k].fetch_add(1, Ordering::SeqCst);
    } else {
        TIMER_BAD.store(
            (si.code as u32 as u64) << 32 | si.value & 0xffff_ffff,
            Ordering::SeqCst,
        );
    }
}

fn timer_create(clock: i32, notify: i32, sig: i32, value: u64, tid: i32) -> Result<i32, String> {
    // SAFETY: a zeroed sigevent with the fields the kernel reads set.
    unsafe {
        let mut sev: libc::sigevent = std::mem::zeroed();
        sev.sigev_notify = notify;
        sev.sigev_signo = sig;
        sev.sigev_value = libc::sigval {
            sival_ptr: value as usize as *mut libc::c_void,
        };
        sev.sigev_notify_thread_id = tid;
        let mut id: i32 = -1;
        cvt(
            libc::syscall(libc::SYS_timer_create, clock, &sev, &mut id),
            "timer_create",
        )?;
        Ok(id)
    }
}

fn ns_ts(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    }
}

fn timer_settime(id: i32, interval_ns: i64, value_ns: i64) -> CaseResult {
    let its = libc::itimerspec {
        it_interval: ns_ts(interval_ns),
        it_value: ns_ts(value_ns),
    };
    // SAFETY: valid itimerspec.
    let r = unsafe { libc::syscall(libc::SYS_timer_settime, id, 0, &its, 0usize) };
    cvt(r, "timer_settime")?;
    Ok(())
}

/// (interval ns, remaining ns) or the errno of timer_gettime.
fn timer_gettime(id: i32) -> Result<(i128, i128), i32> {
    // SAFETY: out-pointer only.
    unsafe {
        let mut its: libc::itimerspec = std::mem::zeroed();
        if libc::syscall(libc::SYS_timer_gettime, id, &mut its) != 0 {
            return Err(errno());
        }
        let ns = |t: libc::timespec| t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
        Ok((ns(its.it_interval), ns(its.it_value)))
    }
}

/// /proc/self/timers as one entry per timer, sorted by id: the kernel lists
/// them in its internal order, which the process cannot otherwise observe.
fn proc_timers() -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in read_text("/proc/self/timers").lines() {
        match entries.last_mut() {
            Some(e) if !line.starts_with("ID: ") => {
                e.push('\n');
                e.push_str(line);
            }
            _ => entries.push(line.to_string()),
        }
    }
    entries.sort_by_key(|e| {
        e.strip_prefix("ID: ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|id| id.parse::<i64>().ok())
    });
    entries
}

/// POSIX timers on several clocks and notifications: a periodic
/// process-directed signal, SIGEV_NONE, a periodic thread-directed signal
/// and a disarmed one. Ids, settings and /proc/self/timers must survive and
/// the periodic ones keep firing with their values.
pub fn posix_timers(ctx: &Ctx) -> CaseResult {
    let r = rtmin();
    for k in 0..2 {
        install_handler(r + 5 + k, on_timer, libc::SA_RESTART, &[])?;
    }
    let stop = std::sync::Arc::new(StopFlag::new());
    let stop2 = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name("zdtm-timer-tgt".into())
        .spawn(move || {
            block(&[libc::SIGTERM, r + 5]);
            let _ = tx.send(gettid());
            while !stop2.get() {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let tid = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "timer thread did not start")?;
    TIMER_TID.store(tid, Ordering::SeqCst);

    const MS: i64 = 1_000_000;
    let periodic = timer_create(
        libc::CLOCK_MONOTONIC,
        libc::SIGEV_SIGNAL,
        r + 5,
        TIMER_VALUES[0],
        0,
    )?;
    TIMER_IDS[0].store(periodic, Ordering::SeqCst);
    let none = timer_create(libc::CLOCK_REALTIME, libc::SIGEV_NONE, 0, 0, 0)?;
    let to_thread = timer_create(
        libc::CLOCK_MONOTONIC,
        libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID,
        r + 6,
        TIMER_VALUES[1],
        tid,
    )?;
    TIMER_IDS[1].store(to_thread, Ordering::SeqCst);
    let disarmed = timer_create(libc::CLOCK_BOOTTIME, libc::SIGEV_SIGNAL, r + 7, 0x9abc, 0)?;
    timer_settime(periodic, 50 * MS, 50 * MS)?;
    timer_settime(none, 7000 * MS, 1_000_000 * MS)?;
    timer_settime(to_thread, 100 * MS, 100 * MS)?;
    let ids = [periodic, none, to_thread, disarmed];
    if !ticks(&TIMER_GOOD[0], 2) || !ticks(&TIMER_GOOD[1], 2) {
        return Err(format!(
            "timers do not fire even before checkpoint (bad signal {:#x})",
            TIMER_BAD.load(Ordering::SeqCst)
        ));
    }
    let proc_before = proc_timers();
    let before: Vec<_> = ids.iter().map(|&id| timer_gettime(id)).collect();

    ctx.ready_and_wait()?;

    let proc_after = proc_timers();
    let after: Vec<_> = ids.iter().map(|&id| timer_gettime(id)).collect();
    let mut c = Check::new();
    c.eq("/proc/self/timers", proc_before, proc_after);
    let names = ["periodic", "SIGEV_NONE", "thread-directed", "disarmed"];
    for i in 0..4 {
        match (before[i], after[i]) {
            (Ok(b), Ok(a)) => {
                c.eq(
                    &format!("timer {} ({}) interval", ids[i], names[i]),
                    b.0,
                    a.0,
                );
                if i == 3 {
                    c.eq("disarmed timer value", 0, a.1);
                } else {
                    c.ok(
                        &format!(
                            "timer {} ({}) armed: {} ns left, was {}",
                            ids[i], names[i], a.1, b.1
                        ),
                        a.1 > 0 && a.1 <= b.0.max(b.1),
                    );
                }
            }
            (b, a) => c.fail(format!(
                "timer {} ({}): gettime {b:?} -> {a:?}",
                ids[i], names[i]
            )),
        }
    }
    // An id that was never created must still not exist.
    let unused = ids.iter().max().unwrap_or(&0) + 1;
    c.eq(
        "timer_gettime of an unused id",
        Err(libc::EINVAL),
        timer_gettime(unused),
    );
    c.ok(
        "periodic timer keeps firing with its value",
        ticks(&TIMER_GOOD[0], 3),
    );
    c.ok(
        "thread-directed timer keeps firing on its thread",
        ticks(&TIMER_GOOD[1], 2),
    );
    c.eq(
        "bad timer signal (code<<32|value)",
        0,
        TIMER_BAD.load(Ordering::SeqCst),
    );
    stop.set();
    if wait_until(Duration::from_secs(5), || h.is_finished()) {
        let _ = h.join();
    } else {
        c.fail("timer thread did not finish");
    }
    c.finish()
}

// ---------------------------------------------------------------- rlimits

fn all_rlimits() -> Vec<(u64, u64)> {
    // The 16 resources Linux has had since 2.6.25 (RLIMIT_RTTIME is 15).
    (0..16)
        .map(|r| {
            let mut l = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: query into a local.
            unsafe { libc::prlimit64(0, r as _, std::ptr::null(), &mut l) };
            (l.rlim_cur, l.rlim_max)
        })
        .collect()
}

fn set_rlimit(res: libc::__rlimit_resource_t, cur: u64, max: Option<u64>) -> CaseResult {
    let mut l = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get then set with a valid struct.
    unsafe {
        libc::prlimit64(0, res, std::ptr::null(), &mut l);
        l.rlim_cur = cur;
        if let Some(m) = max {
            l.rlim_max = m;
        }
        cvt(
            libc::prlimit64(0, res, &l, std::ptr::null_mut()),
            &format!("prlimit({res})"),
        )?;
    }
    Ok(())
}

/// Lowered soft and hard limits; every limit is compared.
pub fn rlimits(ctx: &Ctx) -> CaseResult {
    set_rlimit(libc::RLIMIT_NOFILE, 512, Some(1000))?;
    set_rlimit(libc::RLIMIT_CORE, 1024, Some(8192))?;
    set_rlimit(libc::RLIMIT_STACK, 4 << 20, None)?;
    set_rlimit(libc::RLIMIT_MSGQUEUE, 4096, Some(8192))?;
    set_rlimit(libc::RLIMIT_CPU, 3600, Some(7200))?;
    let before = (all_rlimits(), read_text("/proc/self/limits"));
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    let after = (all_rlimits(), read_text("/proc/self/limits"));
    for (i, (b, a)) in before.0.iter().zip(&after.0).enumerate() {
        c.eq(&format!("rlimit {i} (soft, hard)"), b, a);
    }
    c.eq("/proc/self/limits", before.1, after.1);
    c.finish()
}

// ------------------------------------------------------------- cwd, root

fn getcwd() -> String {
    std::env::current_dir()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<getcwd: {e}>"))
}

fn stat_id(path: &str) -> Result<(u64, u64), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| format!("stat {path}: {e}"))?;
    Ok((m.dev(), m.ino()))
}

/// The working directory, by path, by identity and by relative lookups.
pub fn cwd_root(ctx: &Ctx) -> CaseResult {
    let dir = tmp_path("cwd").join("sub dir");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir: {e}"))?;
    std::fs::write(dir.join("marker"), "cwd marker").map_err(|e| e.to_string())?;
    std::env::set_current_dir(&dir).map_err(|e| format!("chdir: {e}"))?;
    let probe = || {
        (
            getcwd(),
            readlink("/proc/self/cwd"),
            readlink("/proc/self/root"),
            stat_id("."),
            std::fs::read_to_string("marker").map_err(|e| e.to_string()),
        )
    };
    let before = probe();
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq(
        "(getcwd, cwd link, root link, id of ., ./marker)",
        before,
        probe(),
    );
    c.finish()
}

/// A chroot into a prepared directory.
pub fn chroot(ctx: &Ctx) -> CaseResult {
    let dir = tmp_path("root");
    std::fs::create_dir_all(dir.join("etc")).map_err(|e| format!("mkdir: {e}"))?;
    std::fs::write(dir.join("etc/marker"), "chroot marker").map_err(|e| e.to_string())?;
    let want = stat_id(&dir.to_string_lossy())?;
    ctx.open_early()?;
    let d = cstr(&dir.to_string_lossy());
    // SAFETY: plain syscalls on a valid path.
    unsafe {
        cvt(libc::chroot(d.as_ptr()), "chroot")?;
        cvt(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    let probe = || {
        (
            stat_id("/"),
            stat_id("/.."),
            getcwd(),
            std::fs::read_to_string("/etc/marker").map_err(|e| e.to_string()),
        )
    };
    let before = probe();
    if before.0 != Ok(want) {
        return Err(format!(
            "chroot had no effect: / is {:?}, want {want:?}",
            before.0
        ));
    }
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq("(id of /, id of /.., getcwd, /etc/marker)", before, probe());
    c.finish()
}

// ------------------------------------------------- umask, comm, creds, nice

fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; the old value is put back at once.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

pub fn umask(ctx: &Ctx) -> CaseResult {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o027) };
    let probe = || (current_umask(), status_field("/proc/self/status", "Umask"));
    let before = probe();
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq("(umask, Umask)", before, probe());
    c.eq("umask value", 0o027, current_umask());
    c.finish()
}

pub fn comm(ctx: &Ctx) -> CaseResult {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"zdtm-comm-name!".as_ptr()) };
    let probe = || read_text("/proc/self/comm");
    let before = probe();
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq("comm", before.clone(), probe());
    c.eq("comm value", "zdtm-comm-name!\n".to_string(), before);
    c.finish()
}

#[derive(Debug, PartialEq)]
struct Creds {
    res_uid: (u32, u32, u32),
    res_gid: (u32, u32, u32),
    groups: Vec<u32>,
    status: Vec<String>,
    dumpable: i32,
    securebits: i32,
}

fn creds_now() -> Creds {
    // SAFETY: out-pointers only.
    unsafe {
        let (mut r, mut e, mut s) = (0, 0, 0);
        libc::getresuid(&mut r, &mut e, &mut s);
        let res_uid = (r, e, s);
        libc::getresgid(&mut r, &mut e, &mut s);
        let res_gid = (r, e, s);
        let mut groups = vec![0u32; 64];
        let n = libc::getgroups(64, groups.as_mut_ptr());
        groups.truncate(n.max(0) as usize);
        Creds {
            res_uid,
            res_gid,
            groups,
            status: [
                "Uid",
                "Gid",
                "Groups",
                "CapInh",
                "CapPrm",
                "CapEff",
                "CapBnd",
                "CapAmb",
                "NoNewPrivs",
            ]
            .iter()
            .map(|k| format!("{k}: {}", status_field("/proc/self/status", k)))
            .collect(),
            dumpable: libc::prctl(libc::PR_GET_DUMPABLE),
            securebits: libc::prctl(libc::PR_GET_SECUREBITS),
        }
    }
}

/// Supplementary groups, distinct real/effective/saved ids and the
/// capability sets that follow from them.
pub fn creds(ctx: &Ctx) -> CaseResult {
    // The result file cannot be created once the effective uid is 1000.
    ctx.open_early()?;
    // SAFETY: credential changes of this process only.
    unsafe {
        cvt(
            libc::setgroups(3, [1000u32, 2000, 3000].as_ptr()),
            "setgroups",
        )?;
        cvt(libc::setresgid(1000, 1001, 0), "setresgid")?;
        cvt(libc::setresuid(1000, 1002, 0), "setresuid")?;
    }
    let before = creds_now();
    if before.res_uid != (1000, 1002, 0) || before.res_gid != (1000, 1001, 0) {
        return Err(format!("credentials not set: {before:?}"));
    }
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq("credentials", before, creds_now());
    c.finish()
}

fn nice_setup(i: usize) -> CaseResult {
    // PRIO_PROCESS with who = 0 changes only the calling thread on Linux.
    let v = if i == 0 { 7 } else { 11 };
    // SAFETY: no pointers.
    cvt(
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, v) },
        "setpriority",
    )?;
    Ok(())
}

fn nice_probe(_: usize) -> (i32, String) {
    // SAFETY: getpriority returns the nice value (errno is not needed: the
    // stat field is compared as well).
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, gettid() as u32) };
    let stat = stat_fields(&format!("/proc/self/task/{}/stat", gettid()));
    (n, stat.get(19).cloned().unwrap_or_default())
}

/// Nice 7 on the main thread and 11 on a second thread.
pub fn nice(ctx: &Ctx) -> CaseResult {
    let r = per_thread(ctx, 1, nice_setup, nice_probe)?;
    let mut c = Check::new();
    r.compare(&mut c, "(getpriority, stat nice)");
    c.eq("main thread nice", 7, r.rows[0].3 .0);
    c.res(r.join());
    c.finish()
}

// ------------------------------------------------------------ prctl_flags

fn prctl_get(op: i32) -> i32 {
    // SAFETY: getters without pointers.
    unsafe { libc::prctl(op, 0, 0, 0, 0) }
}

fn prctl_get_ptr(op: i32) -> i32 {
    let mut v = 0i32;
    // SAFETY: the getter writes one int.
    unsafe { libc::prctl(op, &mut v) };
    v
}

/// Dumpable, parent-death signal, no-new-privs and child-subreaper.
///
/// The parent-death signal is tied to the parent. A restored root process
/// gets a new parent, the restoring agent, which exits at once: ckpt then
/// clears the signal rather than let the agent's exit fire it, which the
/// original process never got. So after a restore the signal is either
/// kept (same parent) or cleared, and never delivered.
pub fn prctl_flags(ctx: &Ctx) -> CaseResult {
    let h = count_usr1 as extern "C" fn(i32) as usize;
    set_action(libc::SIGUSR1, h, libc::SA_RESTART, &[])?;
    // SAFETY: prctl setters with integer arguments.
    unsafe {
        cvt(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1),
            "PR_SET_PDEATHSIG",
        )?;
        cvt(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "PR_SET_NO_NEW_PRIVS",
        )?;
        cvt(
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1),
            "PR_SET_CHILD_SUBREAPER",
        )?;
        // Dumpable stays 1: 0 would hide /proc/PID from the agent's view as
        // another user; the creds case covers dumpable 0.
        cvt(libc::prctl(libc::PR_SET_DUMPABLE, 1), "PR_SET_DUMPABLE")?;
    }
    let probe = || {
        (
            prctl_get(libc::PR_GET_DUMPABLE),
            prctl_get(libc::PR_GET_NO_NEW_PRIVS),
            prctl_get_ptr(libc::PR_GET_CHILD_SUBREAPER),
        )
    };
    let before = probe();
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq("(dumpable, no_new_privs, child_subreaper)", before, probe());
    c.eq("values", (1, 1, 1), before);
    let pdeath = prctl_get_ptr(libc::PR_GET_PDEATHSIG);
    if pdeath != libc::SIGUSR1 && pdeath != 0 {
        c.eq("pdeath signal (kept or cleared)", libc::SIGUSR1, pdeath);
    }
    c.eq(
        "SIGUSR1 received",
        0,
        USR1_COUNT.load(std::sync::atomic::Ordering::SeqCst),
    );
    c.finish()
}

// ---------------------------------------------------------------- seccomp

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

/// A classic BPF filter that makes syscall `nr` fail with `err`.
fn deny_filter(nr: i64, err: i32) -> CaseResult {
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let prog = [
        ins(LD_ABS, 0, 0, 4), // seccomp_data.arch
        ins(JEQ, 0, 3, AUDIT_ARCH_X86_64),
        ins(LD_ABS, 0, 0, 0), // seccomp_data.nr
        ins(JEQ, 0, 1, nr as u32),
        ins(RET, 0, 0, SECCOMP_RET_ERRNO | err as u32),
        ins(RET, 0, 0, SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: a valid program; root has CAP_SYS_ADMIN, so no-new-privs is
    // not needed (and left alone: prctl_flags covers it).
    let r = unsafe {
        libc::syscall(libc::SYS_seccomp, 1 /* SET_MODE_FILTER */, 0, &fprog)
    };
    cvt(r, "seccomp")?;
    Ok(())
}

fn raw_errno(nr: i64) -> i32 {
    // SAFETY: getpgid(0)/getsid(0) take no pointers.
    if unsafe { libc::syscall(nr, 0) } < 0 {
        errno()
    } else {
        0
    }
}

/// Two stacked seccomp filters making getpgid fail with EPERM and getsid
/// with EACCES; other syscalls keep working.
pub fn seccomp(ctx: &Ctx) -> CaseResult {
    deny_filter(libc::SYS_getpgid, libc::EPERM)?;
    deny_filter(libc::SYS_getsid, libc::EACCES)?;
    let probe = || {
        (
            raw_errno(libc::SYS_getpgid),
            raw_errno(libc::SYS_getsid),
            raw_errno(libc::SYS_getppid),
            status_field("/proc/self/status", "Seccomp"),
            status_field("/proc/self/status", "Seccomp_filters"),
        )
    };
    let before = probe();
    ctx.ready_and_wait()?;
    let mut c = Check::new();
    c.eq(
        "(getpgid errno, getsid errno, getppid errno, Seccomp, filters)",
        before.clone(),
        probe(),
    );
    c.eq(
        "expected",
        (
            libc::EPERM,
            libc::EACCES,
            0,
            "2".to_string(),
            "2".to_string(),
        ),
        before,
    );
    c.finish()
}
