//! Helpers shared by the cases: recording and comparing state, memory
//! patterns, /proc parsing, thread hand-shakes.

use std::ffi::CString;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub type CaseResult = Result<(), String>;

pub const PAGE: usize = 4096;

/// Collects every mismatch instead of stopping at the first one, so that a
/// failed restore reports all the state it lost in one run.
#[derive(Default)]
pub struct Check {
    fails: Vec<String>,
}

impl Check {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn eq<T: PartialEq + Debug>(&mut self, what: &str, before: T, after: T) {
        if before != after {
            self.fails
                .push(format!("{what}: before {before:?}, after {after:?}"));
        }
    }

    pub fn ok(&mut self, what: &str, cond: bool) {
        if !cond {
            self.fails.push(what.to_string());
        }
    }

    pub fn fail(&mut self, why: impl Into<String>) {
        self.fails.push(why.into());
    }

    /// Folds a sub-check's outcome into this one.
    pub fn res(&mut self, r: CaseResult) {
        if let Err(e) = r {
            self.fails.push(e);
        }
    }

    pub fn fails_empty(&self) -> bool {
        self.fails.is_empty()
    }

    pub fn finish(self) -> CaseResult {
        if self.fails.is_empty() {
            Ok(())
        } else {
            Err(self.fails.join("; "))
        }
    }
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Turns a C-style `-1 and errno` return into a Result with the call named.
pub fn cvt<T: PartialOrd + Default + Copy>(ret: T, what: &str) -> Result<T, String> {
    if ret < T::default() {
        Err(os_err(what))
    } else {
        Ok(ret)
    }
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in path")
}

pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Directory where a case may create its files: the harness gives each case
/// its own, so the files outlive the process and are there for a restore.
pub fn tmp_dir() -> PathBuf {
    std::env::var_os("CKPT_ZDTM_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// A name no other case process uses at the same time, for abstract unix
/// sockets (one namespace per network namespace: the PID alone is 1 in
/// every job).
pub fn unique_name(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("zdtm-{tag}-{}-{t:x}", std::process::id())
}

/// A file name unique to this case process inside `tmp_dir()`.
pub fn tmp_path(tag: &str) -> PathBuf {
    let dir = tmp_dir();
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("zdtm-{}-{tag}", std::process::id()))
}

// ---------------------------------------------------------------- patterns

pub fn mix(seed: u64, i: u64) -> u64 {
    // splitmix64: cheap, and every word differs, so shifted or swapped pages
    // are caught.
    let mut z = seed
        .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `len` bytes (a multiple of 8) at `ptr` with a seed-specific pattern.
///
/// # Safety
/// `ptr..ptr+len` must be writable and 8-byte aligned.
pub unsafe fn fill(ptr: *mut u8, len: usize, seed: u64) {
    let words = ptr as *mut u64;
    for i in 0..len / 8 {
        words.add(i).write_volatile(mix(seed, i as u64));
    }
}

/// Checks a region written by [`fill`], naming the first bad offset.
///
/// # Safety
/// `ptr..ptr+len` must be readable and 8-byte aligned.
pub unsafe fn verify(what: &str, ptr: *const u8, len: usize, seed: u64) -> CaseResult {
    let words = ptr as *const u64;
    for i in 0..len / 8 {
        let got = words.add(i).read_volatile();
        let want = mix(seed, i as u64);
        if got != want {
            return Err(format!(
                "{what}: content differs at {:#x} (offset {:#x}): {got:#018x} != {want:#018x}",
                ptr as usize + i * 8,
                i * 8
            ));
        }
    }
    Ok(())
}

/// Checks that a region reads as zeroes.
///
/// # Safety
/// `ptr..ptr+len` must be readable and 8-byte aligned.
pub unsafe fn verify_zero(what: &str, ptr: *const u8, len: usize) -> CaseResult {
    let words = ptr as *const u64;
    for i in 0..len / 8 {
        let got = words.add(i).read_volatile();
        if got != 0 {
            return Err(format!(
                "{what}: expected zero at {:#x}, got {got:#018x}",
                ptr as usize + i * 8
            ));
        }
    }
    Ok(())
}

/// The bytes [`fill`] writes (x86-64 is little-endian), for file contents.
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| mix(seed, (i / 8) as u64).to_le_bytes()[i % 8])
        .collect()
}

// ---------------------------------------------------------------- mappings

/// An anonymous private mapping, unmapped never: the case process exits
/// right after checking, and unmapping in between would change the layout
/// that is being compared.
pub fn mmap_anon(len: usize, prot: i32, extra_flags: i32) -> Result<*mut u8, String> {
    mmap_at(std::ptr::null_mut(), len, prot, extra_flags)
}

pub fn mmap_at(addr: *mut u8, len: usize, prot: i32, extra_flags: i32) -> Result<*mut u8, String> {
    // SAFETY: a fresh anonymous mapping; MAP_FIXED is never passed here
    // without MAP_FIXED_NOREPLACE, so nothing existing is replaced.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(os_err("mmap"))
    } else {
        Ok(p as *mut u8)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: usize,
    pub end: usize,
    pub perms: String,
    pub offset: u64,
    pub path: String,
}

pub fn read_maps() -> Vec<MapsEntry> {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let _ino = it.next()?;
            let path = it.collect::<Vec<_>>().join(" ");
            let (s, e) = range.split_once('-')?;
            Some(MapsEntry {
                start: usize::from_str_radix(s, 16).ok()?,
                end: usize::from_str_radix(e, 16).ok()?,
                perms,
                offset,
                path,
            })
        })
        .collect()
}

pub fn maps_entry(addr: usize) -> Option<MapsEntry> {
    read_maps()
        .into_iter()
        .find(|m| m.start <= addr && addr < m.end)
}

/// Each page of `addr..addr+len` is mapped with `perms`: compared page range
/// by range rather than entry by entry, because the kernel may merge or split
/// adjacent VMAs differently after a restore without the process noticing.
pub fn check_range_mapped(what: &str, addr: usize, len: usize, perms: &str) -> CaseResult {
    let maps = read_maps();
    let mut at = addr;
    while at < addr + len {
        let m = maps
            .iter()
            .find(|m| m.start <= at && at < m.end)
            .ok_or_else(|| format!("{what}: {at:#x} is not mapped"))?;
        if m.perms != perms {
            return Err(format!(
                "{what}: {at:#x} mapped {} instead of {perms}",
                m.perms
            ));
        }
        at = m.end;
    }
    Ok(())
}

/// The VmFlags line of the smaps entry containing `addr`.
pub fn vm_flags(addr: usize) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string("/proc/self/smaps").map_err(|e| format!("smaps: {e}"))?;
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((s, e)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                inside = s <= addr && addr < e;
                continue;
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix("VmFlags:") {
                return Ok(rest.split_whitespace().map(String::from).collect());
            }
        }
    }
    Err(format!("no smaps VmFlags for {addr:#x}"))
}

// -------------------------------------------------------------------- /proc

pub fn read_text(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{path}: {e}>"))
}

pub fn read_bytes(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

pub fn readlink(path: &str) -> String {
    std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<{path}: {e}>"))
}

/// The value of `Key:` in a /proc status file, whitespace-normalised.
pub fn status_field(path: &str, key: &str) -> String {
    read_text(path)
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| format!("<no {key} in {path}>"))
}

pub fn task_status(tid: i32, key: &str) -> String {
    status_field(&format!("/proc/self/task/{tid}/status"), key)
}

/// Fields of a /proc stat file, numbered from 1 like proc(5); the comm field
/// (2) may contain spaces, so the rest is split after its closing ')'.
pub fn stat_fields(path: &str) -> Vec<String> {
    let text = read_text(path);
    let Some(close) = text.rfind(')') else {
        return Vec::new();
    };
    let mut v = vec![String::new(), String::new(), String::new()];
    v[1] = text[..text.find(' ').unwrap_or(0)].to_string();
    v[2] = text[text.find('(').map_or(0, |i| i + 1)..close].to_string();
    v.extend(text[close + 1..].split_whitespace().map(String::from));
    v
}

/// The syscall number a thread is blocked in, from /proc/.../syscall.
pub fn task_syscall(tid: i32) -> Option<i64> {
    read_text(&format!("/proc/self/task/{tid}/syscall"))
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn task_ids() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ------------------------------------------------------------------- timing

/// Polls `cond` every millisecond until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until thread `tid` sits in syscall `nr`, so that the checkpoint
/// catches it there rather than on its way in.
pub fn wait_in_syscall(tid: i32, nr: i64) -> CaseResult {
    if wait_until(Duration::from_secs(5), || task_syscall(tid) == Some(nr)) {
        Ok(())
    } else {
        Err(format!(
            "thread {tid} never entered syscall {nr} (now {:?})",
            task_syscall(tid)
        ))
    }
}

pub fn monotonic_ns() -> i128 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// A flag threads poll to leave their wait once the main thread has been
/// told to check.
pub struct StopFlag(pub AtomicBool);

impl StopFlag {
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

// ------------------------------------------------------------------ signals

pub fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for &sig in sigs {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// The calling thread's blocked mask as the kernel's 64-bit word.
pub fn current_mask() -> u64 {
    // SAFETY: a query only (set is NULL).
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
        sigset_bits(&old)
    }
}

pub fn sigset_bits(s: &libc::sigset_t) -> u64 {
    // glibc's sigset_t starts with the kernel's 64-bit mask.
    // SAFETY: sigset_t is at least 8 bytes.
    unsafe { *(s as *const libc::sigset_t as *const u64) }
}

pub fn block(sigs: &[i32]) {
    let s = sigset(sigs);
    // SAFETY: valid sigset.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
}

pub fn rtmin() -> i32 {
    libc::SIGRTMIN()
}

/// Installs `handler` as an SA_SIGINFO handler with extra `flags`.
pub fn install_handler(
    sig: i32,
    handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void),
    flags: i32,
    mask: &[i32],
) -> CaseResult {
    set_action(sig, handler as usize, libc::SA_SIGINFO | flags, mask)
}

/// Sets the disposition of `sig`: a handler address (or SIG_IGN/SIG_DFL),
/// sa_flags and the signals blocked while it runs.
pub fn set_action(sig: i32, handler: usize, flags: i32, mask: &[i32]) -> CaseResult {
    // SAFETY: sigaction with a fully initialised struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        sa.sa_mask = sigset(mask);
        cvt(
            libc::sigaction(sig, &sa, std::ptr::null_mut()),
            &format!("sigaction({sig})"),
        )?;
    }
    Ok(())
}

/// Raw view of the fields of a siginfo the cases compare: si_code, and the
/// union words at offsets 16, 20 and 24 (pid/uid/value for queued signals,
/// timer id/overrun/value for POSIX timers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigInfo {
    pub signo: i32,
    pub code: i32,
    pub w16: i32,
    pub w20: i32,
    pub value: u64,
}

impl SigInfo {
    /// # Safety
    /// `si` must point to a valid siginfo.
    pub unsafe fn from_raw(si: *const libc::siginfo_t) -> Self {
        let b = si as *const u8;
        Self {
            signo: *(b as *const i32),
            code: *(b.add(8) as *const i32),
            w16: *(b.add(16) as *const i32),
            w20: *(b.add(20) as *const i32),
            value: *(b.add(24) as *const u64),
        }
    }
}

/// sigtimedwait for one signal with a timeout in milliseconds.
pub fn wait_signal(sig: i32, timeout_ms: i64) -> Result<SigInfo, String> {
    let set = sigset(&[sig]);
    let ts = libc::timespec {
        tv_sec: timeout_ms / 1000,
        tv_nsec: (timeout_ms % 1000) * 1_000_000,
    };
    // SAFETY: valid set, out-pointer and timeout.
    unsafe {
        let mut si: libc::siginfo_t = std::mem::zeroed();
        loop {
            let r = libc::sigtimedwait(&set, &mut si, &ts);
            if r == sig {
                return Ok(SigInfo::from_raw(&si));
            }
            if r < 0 && errno() == libc::EINTR {
                continue;
            }
            return Err(os_err(&format!("sigtimedwait({sig})")));
        }
    }
}

pub fn sigqueue_to(tgid: i32, tid: Option<i32>, sig: i32, value: u64) -> CaseResult {
    // SAFETY: a siginfo built like glibc's sigqueue does (SI_QUEUE, own pid and
    // uid), sent with the raw syscalls so a thread can be targeted too.
    unsafe {
        let mut si: libc::siginfo_t = std::mem::zeroed();
        let b = &mut si as *mut libc::siginfo_t as *mut u8;
        *(b as *mut i32) = sig;
        *(b.add(8) as *mut i32) = libc::SI_QUEUE;
        *(b.add(16) as *mut i32) = libc::getpid();
        *(b.add(20) as *mut u32) = libc::getuid();
        *(b.add(24) as *mut u64) = value;
        let r = match tid {
            None => libc::syscall(libc::SYS_rt_sigqueueinfo, tgid, sig, &si),
            Some(t) => libc::syscall(libc::SYS_rt_tgsigqueueinfo, tgid, t, sig, &si),
        };
        cvt(r, "rt_sigqueueinfo")?;
    }
    Ok(())
}
