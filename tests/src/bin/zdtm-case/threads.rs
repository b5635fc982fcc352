//! Per-thread state: TIDs and names, registers, xsave, fs/gs bases, signal
//! masks, pending signals, alt stacks, rseq, robust lists, clear-tid.

use std::cell::Cell;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::util::*;
use crate::Ctx;

// ------------------------------------------------------- per-thread helper

/// Per-thread before/after values, collected from the main thread (index 0)
/// and helper threads (1..).
pub struct PerThread<T> {
    /// (index, tid before, tid after, value before, value after)
    pub rows: Vec<(usize, i32, i32, T, T)>,
    handles: Vec<JoinHandle<()>>,
}

impl<T: PartialEq + Debug> PerThread<T> {
    /// Compares TIDs and values thread by thread.
    pub fn compare(&self, c: &mut Check, what: &str) {
        for (i, tb, ta, b, a) in &self.rows {
            c.eq(&format!("thread {i} tid"), tb, ta);
            c.eq(&format!("thread {i} (tid {tb}) {what}"), b, a);
        }
    }

    /// Joins the helpers, failing instead of hanging if one never finishes.
    pub fn join(self) -> CaseResult {
        for (n, h) in self.handles.into_iter().enumerate() {
            if !wait_until(Duration::from_secs(5), || h.is_finished()) {
                return Err(format!("helper thread {} did not finish", n + 1));
            }
            h.join()
                .map_err(|_| format!("helper thread {} panicked", n + 1))?;
        }
        Ok(())
    }
}

/// Runs `setup(i)` then `probe(i)` in the main thread (i = 0) and in
/// `helpers` threads, signals ready once all have recorded, waits for
/// SIGTERM, and probes each thread again.
///
/// Helpers block SIGTERM so that the signal always lands on the main
/// thread, whose sleep loop then lets the others go.
pub fn per_thread<T: Send + 'static>(
    ctx: &Ctx,
    helpers: usize,
    setup: fn(usize) -> CaseResult,
    probe: fn(usize) -> T,
) -> Result<PerThread<T>, String> {
    let stop = Arc::new(StopFlag::new());
    let (tx, rx) = mpsc::channel::<Result<(usize, i32, i32, T, T), String>>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    setup(0)?;
    let mut handles = Vec::new();
    for i in 1..=helpers {
        let (stop, tx, ready_tx) = (stop.clone(), tx.clone(), ready_tx.clone());
        let h = std::thread::Builder::new()
            .name(format!("zdtm-helper-{i}"))
            .spawn(move || {
                block(&[libc::SIGTERM]);
                if let Err(e) = setup(i) {
                    let _ = ready_tx.send(Err(format!("thread {i} setup: {e}")));
                    return;
                }
                let tid = gettid();
                let before = probe(i);
                let _ = ready_tx.send(Ok(()));
                while !stop.get() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = tx.send(Ok((i, tid, gettid(), before, probe(i))));
            })
            .map_err(|e| format!("spawn: {e}"))?;
        handles.push(h);
    }
    for _ in 0..helpers {
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "helper thread never got ready".to_string())??;
    }
    let tid = gettid();
    let before = probe(0);
    ctx.ready_and_wait()?;
    let after = probe(0);
    let mut rows = vec![(0, tid, gettid(), before, after)];
    stop.set();
    for _ in 0..helpers {
        rows.push(
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| "helper thread never reported after SIGTERM".to_string())??,
        );
    }
    rows.sort_by_key(|r| r.0);
    Ok(PerThread { rows, handles })
}

fn no_setup(_: usize) -> CaseResult {
    Ok(())
}

// ---------------------------------------------------------------- threads

fn thread_name() -> String {
    let mut buf = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes.
    unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// What a thread reports after the restore: its tid, its name and a
/// computation showing that it still runs.
#[derive(Debug, PartialEq)]
struct ThreadReport {
    tid: i32,
    name: String,
    work: u64,
}

fn work() -> u64 {
    (1..=1000u64).map(|i| i * i).sum()
}

/// Four named threads, each waiting differently: a sleep loop, a condvar,
/// a sched_yield spin and sigtimedwait.
pub fn threads(ctx: &Ctx) -> CaseResult {
    let stop = Arc::new(StopFlag::new());
    let cv = Arc::new((Mutex::new(false), Condvar::new()));
    let (tx, rx) = mpsc::channel::<(i32, String)>();
    let names = [
        "zdtm-sleeper",
        "zdtm-condvar",
        "zdtm-yielder",
        "zdtm-sigwaiter",
    ];
    let mut handles = Vec::new();
    for (kind, name) in names.iter().enumerate() {
        let (stop, cv, tx) = (stop.clone(), cv.clone(), tx.clone());
        let h = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                block(&[libc::SIGTERM, libc::SIGUSR1]);
                let _ = tx.send((gettid(), thread_name()));
                match kind {
                    0 => {
                        while !stop.get() {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    1 => {
                        let (m, c) = &*cv;
                        let mut woken = m.lock().unwrap();
                        while !*woken {
                            woken = c.wait(woken).unwrap();
                        }
                    }
                    2 => {
                        while !stop.get() {
                            // SAFETY: no preconditions.
                            unsafe { libc::sched_yield() };
                        }
                    }
                    _ => {
                        while !stop.get() {
                            let _ = wait_signal(libc::SIGUSR1, 50);
                        }
                    }
                }
                ThreadReport {
                    tid: gettid(),
                    name: thread_name(),
                    work: work(),
                }
            })
            .map_err(|e| format!("spawn: {e}"))?;
        handles.push(h);
    }
    let mut before = Vec::new();
    for _ in 0..names.len() {
        before.push(
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| "thread did not start")?,
        );
    }
    before.sort();
    let tasks_before = task_ids();
    let comms_before: Vec<String> = before
        .iter()
        .map(|(t, _)| read_text(&format!("/proc/self/task/{t}/comm")))
        .collect();

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq("task list", tasks_before, task_ids());
    c.eq(
        "comm of threads",
        comms_before,
        before
            .iter()
            .map(|(t, _)| read_text(&format!("/proc/self/task/{t}/comm")))
            .collect(),
    );
    c.eq("main thread tid", unsafe { libc::getpid() }, gettid());
    stop.set();
    {
        let (m, cvar) = &*cv;
        *m.lock().unwrap() = true;
        cvar.notify_all();
    }
    let mut after = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if !wait_until(Duration::from_secs(5), || h.is_finished()) {
            c.fail(format!("thread {} never finished", names[i]));
            return c.finish();
        }
        match h.join() {
            Ok(r) => after.push(r),
            Err(_) => c.fail(format!("thread {} panicked", names[i])),
        }
    }
    after.sort_by_key(|r| r.tid);
    let expected: Vec<ThreadReport> = before
        .into_iter()
        .map(|(tid, name)| ThreadReport {
            tid,
            name,
            work: work(),
        })
        .collect();
    c.eq("thread reports (tid, name, work)", expected, after);
    c.finish()
}

// --------------------------------------------------------------- regs_gpr

const GPR_NAMES: [&str; 11] = [
    "rbx", "rbp", "r12", "r13", "r14", "r15", "r8", "r9", "r10", "rdx", "rsi",
];

/// Loads known values into callee-saved and other registers, spins until
/// `flag`, and returns a bit per register (GPR_NAMES order) that changed.
fn hold_gprs(flag: *const u8, entered: *mut u8) -> u32 {
    let bad: u32;
    // SAFETY: rbx and rbp, which cannot be named as operands, are saved and
    // restored by hand; every other register used is declared.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "movabs rbx, 0xb0b0111122223333",
            "movabs rbp, 0xbebe444455556666",
            "movabs r12, 0x1212777788889999",
            "movabs r13, 0x1313aaaabbbbcccc",
            "movabs r14, 0x1414ddddeeeeffff",
            "movabs r15, 0x1515000011112222",
            "movabs r8, 0x0808333344445555",
            "movabs r9, 0x0909666677778888",
            "movabs r10, 0x10109999aaaabbbb",
            "movabs rdx, 0xdddd2222cccc3333",
            "movabs rsi, 0x5151eeee44440000",
            "mov byte ptr [rcx], 1",
            "2:",
            "pause",
            "cmp byte ptr [rdi], 0",
            "je 2b",
            "xor eax, eax",
            "movabs rcx, 0xb0b0111122223333",
            "cmp rbx, rcx",
            "je 3f",
            "or eax, 1",
            "3:",
            "movabs rcx, 0xbebe444455556666",
            "cmp rbp, rcx",
            "je 4f",
            "or eax, 2",
            "4:",
            "movabs rcx, 0x1212777788889999",
            "cmp r12, rcx",
            "je 5f",
            "or eax, 4",
            "5:",
            "movabs rcx, 0x1313aaaabbbbcccc",
            "cmp r13, rcx",
            "je 6f",
            "or eax, 8",
            "6:",
            "movabs rcx, 0x1414ddddeeeeffff",
            "cmp r14, rcx",
            "je 7f",
            "or eax, 16",
            "7:",
            "movabs rcx, 0x1515000011112222",
            "cmp r15, rcx",
            "je 8f",
            "or eax, 32",
            "8:",
            "movabs rcx, 0x0808333344445555",
            "cmp r8, rcx",
            "je 9f",
            "or eax, 64",
            "9:",
            "movabs rcx, 0x0909666677778888",
            "cmp r9, rcx",
            "je 22f",
            "or eax, 128",
            "22:",
            "movabs rcx, 0x10109999aaaabbbb",
            "cmp r10, rcx",
            "je 23f",
            "or eax, 256",
            "23:",
            "movabs rcx, 0xdddd2222cccc3333",
            "cmp rdx, rcx",
            "je 24f",
            "or eax, 512",
            "24:",
            "movabs rcx, 0x5151eeee44440000",
            "cmp rsi, rcx",
            "je 25f",
            "or eax, 1024",
            "25:",
            "pop rbp",
            "pop rbx",
            inout("rdi") flag => _,
            inout("rcx") entered => _,
            out("eax") bad,
            out("rdx") _,
            out("rsi") _,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r12") _,
            out("r13") _,
            out("r14") _,
            out("r15") _,
        );
    }
    bad
}

/// Runs `hold` in a thread that blocks SIGTERM, signals ready once the
/// thread sits in its asm loop, and returns what `hold` returned after the
/// flag was raised.
fn spin_thread<T: Send + 'static>(
    ctx: &Ctx,
    hold: fn(*const u8, *mut u8) -> T,
) -> Result<T, String> {
    static FLAG: AtomicU8 = AtomicU8::new(0);
    static ENTERED: AtomicU8 = AtomicU8::new(0);
    let h = std::thread::Builder::new()
        .name("zdtm-spinner".into())
        .spawn(move || {
            block(&[libc::SIGTERM]);
            hold(FLAG.as_ptr(), ENTERED.as_ptr())
        })
        .map_err(|e| format!("spawn: {e}"))?;
    if !wait_until(Duration::from_secs(5), || {
        ENTERED.load(Ordering::SeqCst) == 1
    }) {
        return Err("spinning thread never entered its loop".into());
    }
    ctx.ready_and_wait()?;
    FLAG.store(1, Ordering::SeqCst);
    if !wait_until(Duration::from_secs(5), || h.is_finished()) {
        return Err("spinning thread did not leave its loop after the flag".into());
    }
    h.join().map_err(|_| "spinning thread panicked".to_string())
}

/// General registers held in an asm loop across the checkpoint.
pub fn regs_gpr(ctx: &Ctx) -> CaseResult {
    let bad = spin_thread(ctx, hold_gprs)?;
    if bad == 0 {
        return Ok(());
    }
    let names: Vec<&str> = (0..GPR_NAMES.len())
        .filter(|i| bad & (1 << i) != 0)
        .map(|i| GPR_NAMES[i])
        .collect();
    Err(format!("registers changed: {}", names.join(", ")))
}

// ----------------------------------------------------------- xsave_avx512

/// The values loaded into and read back from the extended registers.
#[repr(C, align(64))]
pub struct XState {
    vec_in: [u8; 32 * 64],
    vec_out: [u8; 32 * 64],
    k_in: [u64; 8],
    k_out: [u64; 8],
    x87_in: [f64; 4],
    x87_out: [f64; 4],
    cw_in: u16,
    cw_out: u16,
    cw_default: u16,
    mxcsr_in: u32,
    mxcsr_out: u32,
    mxcsr_default: u32,
}

/// Precision control 53 bits instead of the default 64, masks unchanged.
const X87_CW: u16 = 0x027f;
/// Round toward zero, all exceptions masked (default is 0x1f80).
const MXCSR: u32 = 0x7f80;

static mut XSTATE: XState = XState {
    vec_in: [0; 32 * 64],
    vec_out: [0; 32 * 64],
    k_in: [0; 8],
    k_out: [0; 8],
    x87_in: [0.0; 4],
    x87_out: [0.0; 4],
    cw_in: X87_CW,
    cw_out: 0,
    cw_default: 0x037f,
    mxcsr_in: MXCSR,
    mxcsr_out: 0,
    mxcsr_default: 0x1f80,
};

/// Loads zmm0-31, k1-7, four x87 registers, the x87 control word and
/// MXCSR, spins until `flag`, then stores what the registers hold.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn hold_xstate_avx512(st: *mut XState, flag: *const u8, entered: *mut u8) {
    // SAFETY (caller): st, flag and entered are valid; every register
    // touched is declared clobbered and the x87 stack is left empty.
    unsafe {
        core::arch::asm!(
            "vmovdqu64 zmm0, [{p} + {vin} + 0]",
            "vmovdqu64 zmm1, [{p} + {vin} + 64]",
            "vmovdqu64 zmm2, [{p} + {vin} + 128]",
            "vmovdqu64 zmm3, [{p} + {vin} + 192]",
            "vmovdqu64 zmm4, [{p} + {vin} + 256]",
            "vmovdqu64 zmm5, [{p} + {vin} + 320]",
            "vmovdqu64 zmm6, [{p} + {vin} + 384]",
            "vmovdqu64 zmm7, [{p} + {vin} + 448]",
            "vmovdqu64 zmm8, [{p} + {vin} + 512]",
            "vmovdqu64 zmm9, [{p} + {vin} + 576]",
            "vmovdqu64 zmm10, [{p} + {vin} + 640]",
            "vmovdqu64 zmm11, [{p} + {vin} + 704]",
            "vmovdqu64 zmm12, [{p} + {vin} + 768]",
            "vmovdqu64 zmm13, [{p} + {vin} + 832]",
            "vmovdqu64 zmm14, [{p} + {vin} + 896]",
            "vmovdqu64 zmm15, [{p} + {vin} + 960]",
            "vmovdqu64 zmm16, [{p} + {vin} + 1024]",
            "vmovdqu64 zmm17, [{p} + {vin} + 1088]",
            "vmovdqu64 zmm18, [{p} + {vin} + 1152]",
            "vmovdqu64 zmm19, [{p} + {vin} + 1216]",
            "vmovdqu64 zmm20, [{p} + {vin} + 1280]",
            "vmovdqu64 zmm21, [{p} + {vin} + 1344]",
            "vmovdqu64 zmm22, [{p} + {vin} + 1408]",
            "vmovdqu64 zmm23, [{p} + {vin} + 1472]",
            "vmovdqu64 zmm24, [{p} + {vin} + 1536]",
            "vmovdqu64 zmm25, [{p} + {vin} + 1600]",
            "vmovdqu64 zmm26, [{p} + {vin} + 1664]",
            "vmovdqu64 zmm27, [{p} + {vin} + 1728]",
            "vmovdqu64 zmm28, [{p} + {vin} + 1792]",
            "vmovdqu64 zmm29, [{p} + {vin} + 1856]",
            "vmovdqu64 zmm30, [{p} + {vin} + 1920]",
            "vmovdqu64 zmm31, [{p} + {vin} + 1984]",
            "kmovq k1, [{p} + {kin} + 8]",
            "kmovq k2, [{p} + {kin} + 16]",
            "kmovq k3, [{p} + {kin} + 24]",
            "kmovq k4, [{p} + {kin} + 32]",
            "kmovq k5, [{p} + {kin} + 40]",
            "kmovq k6, [{p} + {kin} + 48]",
            "kmovq k7, [{p} + {kin} + 56]",
            "fldcw [{p} + {cwin}]",
            "ldmxcsr [{p} + {mxin}]",
            "fld qword ptr [{p} + {xin} + 0]",
            "fld qword ptr [{p} + {xin} + 8]",
            "fld qword ptr [{p} + {xin} + 16]",
            "fld qword ptr [{p} + {xin} + 24]",
            "mov byte ptr [{entered}], 1",
            "2:",
            "pause",
            "cmp byte ptr [{flag}], 0",
            "je 2b",
            "vmovdqu64 [{p} + {vout} + 0], zmm0",
            "vmovdqu64 [{p} + {vout} + 64], zmm1",
            "vmovdqu64 [{p} + {vout} + 128], zmm2",
            "vmovdqu64 [{p} + {vout} + 192], zmm3",
            "vmovdqu64 [{p} + {vout} + 256], zmm4",
            "vmovdqu64 [{p} + {vout} + 320], zmm5",
            "vmovdqu64 [{p} + {vout} + 384], zmm6",
            "vmovdqu64 [{p} + {vout} + 448], zmm7",
            "vmovdqu64 [{p} + {vout} + 512], zmm8",
            "vmovdqu64 [{p} + {vout} + 576], zmm9",
            "vmovdqu64 [{p} + {vout} + 640], zmm10",
            "vmovdqu64 [{p} + {vout} + 704], zmm11",
            "vmovdqu64 [{p} + {vout} + 768], zmm12",
            "vmovdqu64 [{p} + {vout} + 832], zmm13",
            "vmovdqu64 [{p} + {vout} + 896], zmm14",
            "vmovdqu64 [{p} + {vout} + 960], zmm15",
            "vmovdqu64 [{p} + {vout} + 1024], zmm16",
            "vmovdqu64 [{p} + {vout} + 1088], zmm17",
            "vmovdqu64 [{p} + {vout} + 1152], zmm18",
            "vmovdqu64 [{p} + {vout} + 1216], zmm19",
            "vmovdqu64 [{p} + {vout} + 1280], zmm20",
            "vmovdqu64 [{p} + {vout} + 1344], zmm21",
            "vmovdqu64 [{p} + {vout} + 1408], zmm22",
            "vmovdqu64 [{p} + {vout} + 1472], zmm23",
            "vmovdqu64 [{p} + {vout} + 1536], zmm24",
            "vmovdqu64 [{p} + {vout} + 1600], zmm25",
            "vmovdqu64 [{p} + {vout} + 1664], zmm26",
            "vmovdqu64 [{p} + {vout} + 1728], zmm27",
            "vmovdqu64 [{p} + {vout} + 1792], zmm28",
            "vmovdqu64 [{p} + {vout} + 1856], zmm29",
            "vmovdqu64 [{p} + {vout} + 1920], zmm30",
            "vmovdqu64 [{p} + {vout} + 1984], zmm31",
            "kmovq [{p} + {kout} + 8], k1",
            "kmovq [{p} + {kout} + 16], k2",
            "kmovq [{p} + {kout} + 24], k3",
            "kmovq [{p} + {kout} + 32], k4",
            "kmovq [{p} + {kout} + 40], k5",
            "kmovq [{p} + {kout} + 48], k6",
            "kmovq [{p} + {kout} + 56], k7",
            "fnstcw [{p} + {cwout}]",
            "stmxcsr [{p} + {mxout}]",
            "fstp qword ptr [{p} + {xout} + 0]",
            "fstp qword ptr [{p} + {xout} + 8]",
            "fstp qword ptr [{p} + {xout} + 16]",
            "fstp qword ptr [{p} + {xout} + 24]",
            "fldcw [{p} + {cwdef}]",
            "ldmxcsr [{p} + {mxdef}]",
            p = in(reg) st,
            flag = in(reg) flag,
            entered = in(reg) entered,
            vin = const std::mem::offset_of!(XState, vec_in),
            vout = const std::mem::offset_of!(XState, vec_out),
            xin = const std::mem::offset_of!(XState, x87_in),
            xout = const std::mem::offset_of!(XState, x87_out),
            cwin = const std::mem::offset_of!(XState, cw_in),
            cwout = const std::mem::offset_of!(XState, cw_out),
            cwdef = const std::mem::offset_of!(XState, cw_default),
            mxin = const std::mem::offset_of!(XState, mxcsr_in),
            mxout = const std::mem::offset_of!(XState, mxcsr_out),
            mxdef = const std::mem::offset_of!(XState, mxcsr_default),
            kin = const std::mem::offset_of!(XState, k_in),
            kout = const std::mem::offset_of!(XState, k_out),
            out("zmm0") _,
            out("zmm1") _,
            out("zmm2") _,
            out("zmm3") _,
            out("zmm4") _,
            out("zmm5") _,
            out("zmm6") _,
            out("zmm7") _,
            out("zmm8") _,
            out("zmm9") _,
            out("zmm10") _,
            out("zmm11") _,
            out("zmm12") _,
            out("zmm13") _,
            out("zmm14") _,
            out("zmm15") _,
            out("zmm16") _,
            out("zmm17") _,
            out("zmm18") _,
            out("zmm19") _,
            out("zmm20") _,
            out("zmm21") _,
            out("zmm22") _,
            out("zmm23") _,
            out("zmm24") _,
            out("zmm25") _,
            out("zmm26") _,
            out("zmm27") _,
            out("zmm28") _,
            out("zmm29") _,
            out("zmm30") _,
            out("zmm31") _,
            out("k1") _,
            out("k2") _,
            out("k3") _,
            out("k4") _,
            out("k5") _,
            out("k6") _,
            out("k7") _,
            out("st(0)") _,
            out("st(1)") _,
            out("st(2)") _,
            out("st(3)") _,
            out("st(4)") _,
            out("st(5)") _,
            out("st(6)") _,
            out("st(7)") _,
        );
    }
}

/// The AVX variant of [`hold_xstate_avx512`]: ymm0-15, x87 and MXCSR.
#[target_feature(enable = "avx")]
unsafe fn hold_xstate_avx(st: *mut XState, flag: *const u8, entered: *mut u8) {
    // SAFETY: as for hold_xstate_avx512.
    unsafe {
        core::arch::asm!(
            "vmovdqu ymm0, [{p} + {vin} + 0]",
            "vmovdqu ymm1, [{p} + {vin} + 64]",
            "vmovdqu ymm2, [{p} + {vin} + 128]",
            "vmovdqu ymm3, [{p} + {vin} + 192]",
            "vmovdqu ymm4, [{p} + {vin} + 256]",
            "vmovdqu ymm5, [{p} + {vin} + 320]",
            "vmovdqu ymm6, [{p} + {vin} + 384]",
            "vmovdqu ymm7, [{p} + {vin} + 448]",
            "vmovdqu ymm8, [{p} + {vin} + 512]",
            "vmovdqu ymm9, [{p} + {vin} + 576]",
            "vmovdqu ymm10, [{p} + {vin} + 640]",
            "vmovdqu ymm11, [{p} + {vin} + 704]",
            "vmovdqu ymm12, [{p} + {vin} + 768]",
            "vmovdqu ymm13, [{p} + {vin} + 832]",
            "vmovdqu ymm14, [{p} + {vin} + 896]",
            "vmovdqu ymm15, [{p} + {vin} + 960]",
            "fldcw [{p} + {cwin}]",
            "ldmxcsr [{p} + {mxin}]",
            "fld qword ptr [{p} + {xin} + 0]",
            "fld qword ptr [{p} + {xin} + 8]",
            "fld qword ptr [{p} + {xin} + 16]",
            "fld qword ptr [{p} + {xin} + 24]",
            "mov byte ptr [{entered}], 1",
            "2:",
            "pause",
            "cmp byte ptr [{flag}], 0",
            "je 2b",
            "vmovdqu [{p} + {vout} + 0], ymm0",
            "vmovdqu [{p} + {vout} + 64], ymm1",
            "vmovdqu [{p} + {vout} + 128], ymm2",
            "vmovdqu [{p} + {vout} + 192], ymm3",
            "vmovdqu [{p} + {vout} + 256], ymm4",
            "vmovdqu [{p} + {vout} + 320], ymm5",
            "vmovdqu [{p} + {vout} + 384], ymm6",
            "vmovdqu [{p} + {vout} + 448], ymm7",
            "vmovdqu [{p} + {vout} + 512], ymm8",
            "vmovdqu [{p} + {vout} + 576], ymm9",
            "vmovdqu [{p} + {vout} + 640], ymm10",
            "vmovdqu [{p} + {vout} + 704], ymm11",
            "vmovdqu [{p} + {vout} + 768], ymm12",
            "vmovdqu [{p} + {vout} + 832], ymm13",
            "vmovdqu [{p} + {vout} + 896], ymm14",
            "vmovdqu [{p} + {vout} + 960], ymm15",
            "fnstcw [{p} + {cwout}]",
            "stmxcsr [{p} + {mxout}]",
            "fstp qword ptr [{p} + {xout} + 0]",
            "fstp qword ptr [{p} + {xout} + 8]",
            "fstp qword ptr [{p} + {xout} + 16]",
            "fstp qword ptr [{p} + {xout} + 24]",
            "fldcw [{p} + {cwdef}]",
            "ldmxcsr [{p} + {mxdef}]",
            p = in(reg) st,
            flag = in(reg) flag,
            entered = in(reg) entered,
            vin = const std::mem::offset_of!(XState, vec_in),
            vout = const std::mem::offset_of!(XState, vec_out),
            xin = const std::mem::offset_of!(XState, x87_in),
            xout = const std::mem::offset_of!(XState, x87_out),
            cwin = const std::mem::offset_of!(XState, cw_in),
            cwout = const std::mem::offset_of!(XState, cw_out),
            cwdef = const std::mem::offset_of!(XState, cw_default),
            mxin = const std::mem::offset_of!(XState, mxcsr_in),
            mxout = const std::mem::offset_of!(XState, mxcsr_out),
            mxdef = const std::mem::offset_of!(XState, mxcsr_default),
            out("ymm0") _,
            out("ymm1") _,
            out("ymm2") _,
            out("ymm3") _,
            out("ymm4") _,
            out("ymm5") _,
            out("ymm6") _,
            out("ymm7") _,
            out("ymm8") _,
            out("ymm9") _,
            out("ymm10") _,
            out("ymm11") _,
            out("ymm12") _,
            out("ymm13") _,
            out("ymm14") _,
            out("ymm15") _,
            out("st(0)") _,
            out("st(1)") _,
            out("st(2)") _,
            out("st(3)") _,
            out("st(4)") _,
            out("st(5)") _,
            out("st(6)") _,
            out("st(7)") _,
        );
    }
}

fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

fn hold_xstate(flag: *const u8, entered: *mut u8) -> bool {
    // SAFETY: XSTATE is only touched by this thread until it returns, and the
    // main thread reads it only after joining; the feature checks guard the
    // target_feature functions.
    unsafe {
        let st = std::ptr::addr_of_mut!(XSTATE);
        if has_avx512() {
            hold_xstate_avx512(st, flag, entered);
            true
        } else if is_x86_feature_detected!("avx") {
            hold_xstate_avx(st, flag, entered);
            true
        } else {
            false
        }
    }
}

/// zmm0-31 (or ymm0-15), k1-7, x87 registers and control word, and MXCSR
/// held in an asm loop across the checkpoint.
pub fn xsave_avx512(ctx: &Ctx) -> CaseResult {
    let avx512 = has_avx512();
    // SAFETY: no other thread exists yet.
    unsafe {
        let st = &mut *std::ptr::addr_of_mut!(XSTATE);
        st.vec_in.copy_from_slice(&pattern_bytes(32 * 64, 300));
        for (i, k) in st.k_in.iter_mut().enumerate() {
            *k = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 3) ^ 0xf0f0;
        }
        st.x87_in = [1.5, -2.25, std::f64::consts::PI, 1e300];
    }
    if !spin_thread(ctx, hold_xstate)? {
        return Err("CPU has neither AVX nor AVX-512".into());
    }
    // SAFETY: the spinning thread has been joined.
    let st = unsafe { &*std::ptr::addr_of!(XSTATE) };
    let mut c = Check::new();
    let (regs, width, name) = if avx512 {
        (32, 64, "zmm")
    } else {
        (16, 32, "ymm")
    };
    for r in 0..regs {
        let range = r * 64..r * 64 + width;
        if st.vec_in[range.clone()] != st.vec_out[range.clone()] {
            c.fail(format!(
                "{name}{r}: held {:02x?}, got {:02x?}",
                &st.vec_in[range.start..range.start + 8],
                &st.vec_out[range.start..range.start + 8]
            ));
        }
    }
    if avx512 {
        c.eq("k1..k7", &st.k_in[1..8], &st.k_out[1..8]);
    }
    // st(0) is the last value loaded, and is stored first.
    let mut x87 = st.x87_in;
    x87.reverse();
    c.eq("x87 st0..st3", x87, st.x87_out);
    c.eq("x87 control word", X87_CW, st.cw_out);
    c.eq("MXCSR", MXCSR, st.mxcsr_out);
    c.finish()
}

// ------------------------------------------------------------------ fs_gs

thread_local! {
    static TLS_VALUE: Cell<u64> = const { Cell::new(0) };
}

/// A buffer the third thread points its GS base at.
static GS_BUF: [u64; 2] = [0x6565_6767_6969_6b6b, 0];

fn arch_get(code: i32) -> u64 {
    let mut v = 0u64;
    // SAFETY: ARCH_GET_* writes one word.
    unsafe { libc::syscall(libc::SYS_arch_prctl, code, &mut v) };
    v
}

const ARCH_SET_GS: i32 = 0x1001;
const ARCH_GET_FS: i32 = 0x1003;
const ARCH_GET_GS: i32 = 0x1004;

fn fs_gs_setup(i: usize) -> CaseResult {
    TLS_VALUE.with(|v| v.set(0x7153_0000 + i as u64));
    if i == 2 {
        // SAFETY: glibc does not use GS on x86-64; the base points at a
        // static that lives as long as the process.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, GS_BUF.as_ptr()) };
        cvt(r, "ARCH_SET_GS")?;
    }
    Ok(())
}

fn fs_gs_probe(i: usize) -> (u64, usize, u64, u64, u64) {
    let gs = arch_get(ARCH_GET_GS);
    let via_gs = if i == 2 && gs == GS_BUF.as_ptr() as u64 {
        let v: u64;
        // SAFETY: GS points at GS_BUF (checked just above).
        unsafe { core::arch::asm!("mov {}, qword ptr gs:[0]", out(reg) v) };
        v
    } else {
        0
    };
    (
        TLS_VALUE.with(|v| v.get()),
        TLS_VALUE.with(|v| v as *const Cell<u64> as usize),
        arch_get(ARCH_GET_FS),
        gs,
        via_gs,
    )
}

/// thread_local values, FS bases and a custom GS base, per thread.
pub fn fs_gs(ctx: &Ctx) -> CaseResult {
    let r = per_thread(ctx, 2, fs_gs_setup, fs_gs_probe)?;
    let mut c = Check::new();
    r.compare(&mut c, "(tls value, tls address, fs base, gs base, gs:[0])");
    c.ok(
        "gs:[0] read through the custom GS base",
        r.rows[2].4 .4 == GS_BUF[0],
    );
    c.res(r.join());
    c.finish()
}

// ---------------------------------------------------------------- sigmask

fn sigmask_setup(i: usize) -> CaseResult {
    let r = rtmin();
    match i {
        0 => block(&[libc::SIGUSR1, r + 3]),
        1 => block(&[libc::SIGUSR2, libc::SIGHUP]),
        2 => block(&[libc::SIGINT, libc::SIGQUIT, libc::SIGRTMAX()]),
        _ => {
            // SAFETY: fills a local set and blocks it.
            unsafe {
                let mut s: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut s);
                libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut());
            }
        }
    }
    Ok(())
}

fn sigmask_probe(_: usize) -> (u64, String) {
    (current_mask(), task_status(gettid(), "SigBlk"))
}

/// A different blocked mask in each of four threads.
pub fn sigmask(ctx: &Ctx) -> CaseResult {
    let r = per_thread(ctx, 3, sigmask_setup, sigmask_probe)?;
    let mut c = Check::new();
    r.compare(&mut c, "(blocked mask, SigBlk)");
    c.res(r.join());
    c.finish()
}

// -------------------------------------------------------- pending_signals

#[derive(Debug, PartialEq)]
struct Pending {
    shared: String,
    private: String,
}

fn pending_of(tid: i32) -> Pending {
    Pending {
        shared: task_status(tid, "ShdPnd"),
        private: task_status(tid, "SigPnd"),
    }
}

/// The si_code this kernel gives a signal sent by `send` (a kill or a
/// tgkill to ourselves), learnt with SIGURG so that the case does not
/// hard-code one kernel's choice.
fn calibrate_code(send: impl Fn(i32) -> i64) -> Result<i32, String> {
    block(&[libc::SIGURG]);
    cvt(send(libc::SIGURG), "calibration signal")?;
    Ok(wait_signal(libc::SIGURG, 1000)?.code)
}

/// Dequeues `sig` and checks si_code, sender pid and value.
fn expect_signal(c: &mut Check, who: &str, sig: i32, code: i32, value: Option<u64>) {
    match wait_signal(sig, 0) {
        Err(e) => c.fail(format!("{who}: signal {sig} not pending: {e}")),
        Ok(si) => {
            c.eq(&format!("{who}: si_code of {sig}"), code, si.code);
            c.eq(
                &format!("{who}: sender pid of {sig}"),
                unsafe { libc::getpid() },
                si.w16,
            );
            if let Some(v) = value {
                c.eq(&format!("{who}: si_value of {sig}"), v, si.value);
            }
        }
    }
}

/// Blocked SIGUSR1 sent to the process, SIGUSR2 to each thread, and queued
/// real-time signals with values, to the process and to single threads.
pub fn pending_signals(ctx: &Ctx) -> CaseResult {
    let (usr1, usr2, rt1, rt2) = (libc::SIGUSR1, libc::SIGUSR2, rtmin() + 1, rtmin() + 2);
    block(&[usr1, usr2, rt1, rt2]);
    let pid = unsafe { libc::getpid() };
    let main = gettid();
    // SAFETY: signals to ourselves, blocked.
    let kill_code = calibrate_code(|s| unsafe { libc::kill(pid, s) } as i64)?;
    let tkill_code = calibrate_code(|s| unsafe { libc::syscall(libc::SYS_tgkill, pid, main, s) })?;
    let stop = Arc::new(StopFlag::new());
    let (tx, rx) = mpsc::channel();
    let stop2 = stop.clone();
    let h = std::thread::Builder::new()
        .name("zdtm-pending".into())
        .spawn(move || {
            let _ = tx.send(gettid());
            while !stop2.get() {
                std::thread::sleep(Duration::from_millis(10));
            }
            // Only this thread can dequeue what was sent to it.
            let mut c = Check::new();
            expect_signal(&mut c, "helper", usr2, tkill_code, None);
            expect_signal(&mut c, "helper", rt2, libc::SI_QUEUE, Some(5));
            expect_signal(&mut c, "helper", rt2, libc::SI_QUEUE, Some(6));
            c.finish()
        })
        .map_err(|e| format!("spawn: {e}"))?;
    let helper = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "helper did not start")?;
    // SAFETY: signals to ourselves, all blocked.
    unsafe {
        cvt(libc::kill(pid, usr1), "kill")?;
        cvt(libc::syscall(libc::SYS_tgkill, pid, helper, usr2), "tgkill")?;
        cvt(libc::syscall(libc::SYS_tgkill, pid, main, usr2), "tgkill")?;
    }
    for v in [11, 22, 33, 44] {
        sigqueue_to(pid, None, rt1, v)?;
    }
    sigqueue_to(pid, Some(helper), rt2, 5)?;
    sigqueue_to(pid, Some(helper), rt2, 6)?;
    sigqueue_to(pid, Some(main), rt2, 7)?;
    let before = (pending_of(main), pending_of(helper));

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq(
        "(main, helper) pending (ShdPnd, SigPnd)",
        before,
        (pending_of(main), pending_of(helper)),
    );
    expect_signal(&mut c, "main", usr1, kill_code, None);
    expect_signal(&mut c, "main", usr2, tkill_code, None);
    for v in [11, 22, 33, 44] {
        expect_signal(&mut c, "main", rt1, libc::SI_QUEUE, Some(v));
    }
    expect_signal(&mut c, "main", rt2, libc::SI_QUEUE, Some(7));
    stop.set();
    if !wait_until(Duration::from_secs(5), || h.is_finished()) {
        c.fail("helper did not finish");
        return c.finish();
    }
    c.res(h.join().unwrap_or_else(|_| Err("helper panicked".into())));
    // Nothing extra may have appeared: everything sent was dequeued once.
    let left = current_pending();
    for sig in [usr1, usr2, rt1, rt2] {
        c.ok(
            &format!("signal {sig} still pending after dequeuing all"),
            left & (1 << (sig - 1)) == 0,
        );
    }
    c.finish()
}

fn current_pending() -> u64 {
    // SAFETY: out-pointer only.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut s);
        sigset_bits(&s)
    }
}

// ------------------------------------------------------------ sigaltstack

thread_local! {
    /// Address of a local in the last SIGUSR1 handler run on this thread.
    static HANDLER_SP: Cell<usize> = const { Cell::new(0) };
}

extern "C" fn altstack_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let local = 0u8;
    HANDLER_SP.with(|c| c.set(std::hint::black_box(&local) as *const u8 as usize));
}

fn altstack_setup(i: usize) -> CaseResult {
    if i == 0 {
        install_handler(libc::SIGUSR1, altstack_handler, libc::SA_ONSTACK, &[])?;
    }
    let size = 64 * 1024 * (i + 1);
    let sp = mmap_anon(size, libc::PROT_READ | libc::PROT_WRITE, 0)?;
    let ss = libc::stack_t {
        ss_sp: sp as *mut libc::c_void,
        ss_flags: if i == 2 { 1 << 31 } else { 0 }, // SS_AUTODISARM
        ss_size: size,
    };
    // SAFETY: valid stack_t describing memory that is never unmapped.
    cvt(
        unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) },
        "sigaltstack",
    )?;
    Ok(())
}

/// (alt stack base, size, flags, whether a SA_ONSTACK handler runs on it)
fn altstack_probe(_: usize) -> (usize, usize, i32, bool) {
    // SAFETY: query, then a signal to this very thread.
    unsafe {
        let mut ss: libc::stack_t = std::mem::zeroed();
        libc::sigaltstack(std::ptr::null(), &mut ss);
        HANDLER_SP.with(|c| c.set(0));
        libc::syscall(libc::SYS_tgkill, libc::getpid(), gettid(), libc::SIGUSR1);
        let at = HANDLER_SP.with(|c| c.get());
        let base = ss.ss_sp as usize;
        (
            base,
            ss.ss_size,
            ss.ss_flags,
            at > base && at < base + ss.ss_size,
        )
    }
}

/// A different alternate signal stack per thread, still used by handlers.
pub fn sigaltstack(ctx: &Ctx) -> CaseResult {
    let r = per_thread(ctx, 2, altstack_setup, altstack_probe)?;
    let mut c = Check::new();
    r.compare(&mut c, "(ss_sp, ss_size, ss_flags, handler ran on it)");
    for (i, _, _, b, _) in &r.rows {
        c.ok(
            &format!("thread {i}: handler on the alt stack before checkpoint"),
            b.3,
        );
    }
    c.res(r.join());
    c.finish()
}

// ------------------------------------------------------------------- rseq

extern "C" {
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

const RSEQ_SIG: u32 = 0x5305_3053;

fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: fs:0 holds the thread pointer itself on x86-64.
    unsafe { core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp) };
    tp
}

/// (area, errno of re-registering with glibc's parameters, cpu_id >= 0)
fn rseq_probe(_: usize) -> (usize, i32, bool) {
    // SAFETY: glibc's exported rseq layout; the syscall either fails (what
    // is expected) or would register the very area glibc already uses.
    unsafe {
        let area = thread_pointer().wrapping_add_signed(__rseq_offset);
        // glibc 2.35-2.39 registers 32 bytes; later ones export a smaller
        // feature size but still register at least 32.
        let mut err = 0;
        for len in [__rseq_size, 32] {
            let r = libc::syscall(libc::SYS_rseq, area, len, 0, RSEQ_SIG);
            err = if r == 0 { 0 } else { errno() };
            if err != libc::EINVAL {
                break;
            }
        }
        let cpu = ((area + 4) as *const i32).read_volatile();
        (area, err, cpu >= 0)
    }
}

/// glibc's rseq registration is still in place (EBUSY on re-registration
/// with the same area, length and signature) in two threads.
pub fn rseq(ctx: &Ctx) -> CaseResult {
    // SAFETY: reading glibc's exported constants.
    if unsafe { __rseq_size } == 0 {
        return Err("glibc did not register rseq (GLIBC_TUNABLES?)".into());
    }
    let r = per_thread(ctx, 1, no_setup, rseq_probe)?;
    let mut c = Check::new();
    r.compare(&mut c, "(rseq area, re-register errno, cpu_id valid)");
    for (i, _, _, b, a) in &r.rows {
        c.eq(
            &format!("thread {i}: rseq errno (EBUSY expected) before"),
            libc::EBUSY,
            b.1,
        );
        c.eq(
            &format!("thread {i}: rseq errno (EBUSY expected) after"),
            libc::EBUSY,
            a.1,
        );
        c.ok(&format!("thread {i}: cpu_id updated after restore"), a.2);
    }
    c.res(r.join());
    c.finish()
}

// ------------------------------------------------------------ robust_list

fn robust_probe(_: usize) -> (usize, usize) {
    let (mut head, mut len) = (0usize, 0usize);
    // SAFETY: out-pointers only.
    unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &mut head, &mut len) };
    (head, len)
}

/// Each thread's robust futex list head and length, as glibc set them.
pub fn robust_list(ctx: &Ctx) -> CaseResult {
    let r = per_thread(ctx, 2, no_setup, robust_probe)?;
    let mut c = Check::new();
    r.compare(&mut c, "robust list (head, len)");
    for (i, _, _, b, _) in &r.rows {
        c.ok(&format!("thread {i}: robust list set"), b.0 != 0);
    }
    c.res(r.join());
    c.finish()
}

// ------------------------------------------------------------ tid_address

fn tid_address_probe(_: usize) -> usize {
    let mut addr = 0usize;
    // SAFETY: out-pointer only.
    unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut addr) };
    addr
}

/// Each thread's clear-tid address; after the restore the kernel still
/// clears it when the thread exits (pthread_join depends on that).
pub fn tid_address(ctx: &Ctx) -> CaseResult {
    let r = per_thread(ctx, 2, no_setup, tid_address_probe)?;
    let mut c = Check::new();
    r.compare(&mut c, "clear-tid address");
    for (i, tid, _, b, _) in &r.rows {
        c.ok(&format!("thread {i}: clear-tid address set"), *b != 0);
        if *i > 0 && *b != 0 {
            // The word lives in the thread's descriptor, which stays
            // allocated until joined.
            let word = unsafe { &*(*b as *const AtomicU32) };
            if !wait_until(Duration::from_secs(5), || word.load(Ordering::SeqCst) == 0) {
                c.fail(format!(
                    "thread {i} (tid {tid}): clear-tid word at {b:#x} still {} after exit",
                    word.load(Ordering::SeqCst)
                ));
                return c.finish(); // joining would hang
            }
        }
    }
    c.res(r.join());
    c.finish()
}
