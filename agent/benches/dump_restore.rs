//! Dump and restore throughput of one process holding SIZE GiB of touched
//! anonymous memory, to tmpfs, next to this machine's limits measured in
//! the same run.
//!
//! ```text
//! cargo bench -p ckpt-agent --bench dump_restore                 # 1 and 4 GiB
//! cargo bench -p ckpt-agent --bench dump_restore -- --sizes 0.25 # smoke run
//! cargo bench -p ckpt-agent --bench dump_restore -- --json       # JSON line on stdout
//! cargo bench -p ckpt-agent --bench dump_restore -- --snapshot --sizes 4
//! cargo bench -p ckpt-agent --bench dump_restore -- --incremental --sizes 4
//! ```
//!
//! `--snapshot` measures downtime instead: per size, a dump that keeps the
//! target stopped while its memory is copied (`--frozen-copy`) against one
//! that lets it run on once its state is captured and copies a
//! copy-on-write snapshot (both leave it running), next to the time
//! vmsplice + splice take to copy the same bytes into a /dev/shm file.
//!
//! `--incremental` measures increments: per round, a full frozen-copy
//! dump (the reference), a pre-dump, then CHANGED_PCT of the pages
//! rewritten, a dump with the pre-dump as parent copying frozen, the same
//! pages rewritten again, and a dump on that one with a snapshot; all
//! leave the target running.
//!
//! Options: `--sizes A,B` (GiB), `--reps N` (dump/restore cycles per size,
//! default 3), `--no-prewarm` (skip the touch-and-free of 1.25x the
//! working size before each measured step; see docs/PERFORMANCE.md),
//! `--json` (table on stderr, one JSON line on stdout), `--lazy` (restore
//! with --lazy-pages: the table's restore time is until the target runs),
//! `--stream` (the dumps stream into a page server in a thread of the
//! bench, over loopback, authenticated; the restores read what it
//! received), `--compress ALG`
//! (the dump/restore cycles store page content compressed: lz4, zstd,
//! zstd:N), `--thp` (the
//! target asks for transparent huge pages with MADV_HUGEPAGE; this
//! machine gives them only when asked).
//!
//! `CKPT_LOG=debug` logs the agent's phases, with the time into the frozen
//! window of each.
//!
//! Profiling one phase: with `CKPT_BENCH_PERF_CTL=FIFO` (and optionally
//! `CKPT_BENCH_PERF_PHASE=dump|restore`, default both) the bench writes
//! `enable`/`disable` to perf's control FIFO around each measured dump and
//! restore, e.g. `mkfifo /tmp/ctl; CKPT_BENCH_PERF_CTL=/tmp/ctl perf record
//! -D -1 --control fifo:/tmp/ctl -g -e cpu-clock -- BENCH --sizes 1 --reps 1`.
//!
//! The target is a child of the bench (fork): dump kills it and reaps it
//! (the bench is both its parent and its tracer); restore forks the
//! restored process from the bench too, so the bench reaps it as well.
//! PR_SET_CHILD_SUBREAPER is set anyway, for agents that daemonize.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ckpt_agent::dump::{dump, DumpReport, DumpRequest};
use ckpt_agent::pages::Codec;
use ckpt_agent::restore::{restore, RestoreReport, RestoreRequest};
use serde_json::json;

const PAGE: usize = 4096;
const GIB: f64 = (1u64 << 30) as f64;
/// Chunk of the copy pipelines measured as limits; the agent's CHUNK.
const PIPE_CHUNK: usize = 4 << 20;
/// Largest single process_vm_readv in the plain bandwidth measurement.
const PVR_CALL: usize = 64 << 20;
/// Every VERIFY_STRIDE-th page of the restored process is checked.
const VERIFY_STRIDE: usize = 97;

// ---------------------------------------------------------------- memory

/// An anonymous private mapping, unmapped on drop.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; threads only
// get disjoint slices of it.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes of fresh (untouched) memory.
    fn fresh(len: usize) -> Result<Region> {
        let len = len.div_ceil(PAGE) * PAGE;
        // SAFETY: a new anonymous mapping, not aliasing anything.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap {len}: {}", std::io::Error::last_os_error());
        }
        Ok(Region {
            ptr: p as *mut u8,
            len,
        })
    }

    /// Maps and fully writes `len` bytes (so later use runs on warm memory).
    fn touched(len: usize, byte: u8) -> Result<Region> {
        let r = Region::fresh(len)?;
        // SAFETY: ptr..ptr+len is ours and writable.
        unsafe { std::ptr::write_bytes(r.ptr, byte, r.len) };
        Ok(r)
    }

    fn addr(&self) -> usize {
        self.ptr as usize
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `fresh` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Touches (one store per page) and frees `1.25 * bytes` of memory, so the
/// measured step that follows gets memory the host has already handed back
/// to the guest (see NOTES: first touch of returned memory is 3-4x slower).
fn prewarm(bytes: usize) -> Result<()> {
    let r = Region::fresh(bytes + bytes / 4)?;
    for off in (0..r.len).step_by(PAGE) {
        // SAFETY: in bounds of the mapping.
        unsafe { r.ptr.add(off).write_volatile(1) };
    }
    Ok(())
}

/// The word `i` of page `p` of a target's memory: non-zero, distinct per page.
fn pattern(page: usize, word: usize) -> u64 {
    0x5a00_0000_0000_0000 | ((page as u64 + 1) << 12) | word as u64
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn best_of<F: FnMut() -> Result<f64>>(n: usize, mut f: F) -> Result<(f64, Vec<f64>)> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        all.push(f()?);
    }
    let best = all.iter().cloned().fold(0.0, f64::max);
    Ok((best, all))
}

// ---------------------------------------------------------------- target

/// A child process of the bench holding `len` bytes at `base`.
struct Target {
    pid: i32,
    base: usize,
    len: usize,
    reaped: bool,
}

impl Target {
    /// Forks a child that (if `fill`) writes the pattern into every page of
    /// a `len`-byte anonymous mapping, drops every fd but /dev/null on
    /// 0-2, creates a ready file, then waits in a pause loop.
    fn spawn(len: usize, fill: bool) -> Result<Target> {
        let len = len.div_ceil(PAGE) * PAGE;
        // Mapped in the bench before the fork (untouched, so the fork copies
        // nothing): the child inherits it at the same address, and the
        // bench knows where to look.
        let region = Region::fresh(len)?;
        let base = region.addr();
        let ready = PathBuf::from(format!(
            "/dev/shm/ckpt-bench-ready-{}-{}",
            std::process::id(),
            base
        ));
        let _ = std::fs::remove_file(&ready);
        let ready_c = CString::new(ready.as_os_str().as_encoded_bytes())?;
        // SAFETY: the child only makes raw system calls and plain stores
        // (async-signal-safe), then never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; nothing here allocates or takes locks.
            unsafe { target_child(base, len, fill, ready_c.as_ptr()) }
        }
        drop(region); // the bench's copy; the child keeps its own
        let t = Target {
            pid,
            base,
            len,
            reaped: false,
        };
        let t0 = Instant::now();
        while !ready.exists() {
            let mut st = 0;
            // SAFETY: plain waitpid on our own child.
            if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
                bail!("target {pid} died while filling its memory (status {st:#x})");
            }
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("target {pid} not ready after 300 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&ready);
        Ok(t)
    }

    /// Kills and reaps the process with this PID (target or restored).
    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut st = 0;
            while libc::waitpid(self.pid, &mut st, libc::__WALL) < 0 {
                if *libc::__errno_location() != libc::EINTR {
                    break; // ECHILD: already reaped (by dump's kill)
                }
            }
        }
        self.reaped = true;
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `--thp`: targets ask for transparent huge pages (MADV_HUGEPAGE).
static THP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The forked target's body.
///
/// # Safety
/// Only call in a freshly forked child; `base..base+len` must be mapped.
unsafe fn target_child(base: usize, len: usize, fill: bool, ready: *const libc::c_char) -> ! {
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    // The dumper refuses pipes and sockets: keep only /dev/null on 0-2.
    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
    for fd in 0..3 {
        libc::dup2(null, fd);
    }
    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    if THP.load(std::sync::atomic::Ordering::Relaxed) {
        libc::madvise(base as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    if fill {
        let words = PAGE / 8;
        for p in 0..len / PAGE {
            let w = (base + p * PAGE) as *mut u64;
            for i in 0..words {
                w.add(i).write_volatile(pattern(p, i));
            }
        }
    }
    let fd = libc::open(
        ready,
        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
        0o600,
    );
    libc::close(fd);
    loop {
        libc::pause();
    }
}

// ---------------------------------------------------------------- limits

#[derive(Debug, Clone, serde::Serialize)]
struct Limits {
    buffer_bytes: usize,
    /// First touch of fresh memory at the very start of the run, before any
    /// prewarm (one run: "cold"; the VM may still have recently freed pages).
    first_touch_cold_gbps: f64,
    /// First touch of a fresh mapping right after a prewarm, best of 3.
    first_touch_gbps: f64,
    memcpy_gbps: f64,
    /// One thread, 64 MiB calls, into a prewarmed buffer.
    pvr_gbps: f64,
    /// Two threads (this machine's cores), each half of the range.
    pvr_2t_gbps: f64,
    /// write() of a prewarmed buffer into a new /dev/shm file, 4 MiB writes.
    shm_write_gbps: f64,
    /// The dump's pipeline alone: 2 threads, process_vm_readv of 4 MiB
    /// into a reused buffer + pwrite to a /dev/shm file.
    pvr_pwrite_2t_gbps: f64,
    /// The restore's pipeline alone: 2 threads, process_vm_writev of 4 MiB
    /// from a mmapped /dev/shm file into fresh memory of another process.
    pvw_fresh_2t_gbps: f64,
    samples: serde_json::Value,
}

fn first_touch(len: usize) -> Result<f64> {
    let r = Region::fresh(len)?;
    let t = Instant::now();
    // SAFETY: in bounds; writes every byte of every page.
    unsafe { std::ptr::write_bytes(r.ptr, 0x11, r.len) };
    let s = t.elapsed().as_secs_f64();
    Ok(gbps(len as u64, s))
}

fn pvr(pid: i32, remote: usize, local: usize, len: usize) -> Result<()> {
    let mut off = 0;
    while off < len {
        let n = (len - off).min(PVR_CALL);
        let l = libc::iovec {
            iov_base: (local + off) as *mut libc::c_void,
            iov_len: n,
        };
        let r = libc::iovec {
            iov_base: (remote + off) as *mut libc::c_void,
            iov_len: n,
        };
        // SAFETY: the local range is ours and writable.
        let got = unsafe { libc::process_vm_readv(pid, &l, 1, &r, 1, 0) };
        if got <= 0 {
            bail!("process_vm_readv: {}", std::io::Error::last_os_error());
        }
        off += got as usize;
    }
    Ok(())
}

fn measure_limits(len: usize, cold: f64) -> Result<Limits> {
    let shm = PathBuf::from(format!("/dev/shm/ckpt-bench-limits-{}", std::process::id()));

    prewarm(len)?;
    let (ft, ft_all) = best_of(3, || {
        prewarm(len)?;
        first_touch(len)
    })?;

    let src = Region::touched(len, 0x22)?;
    let (mc, mc_all) = {
        let dst = Region::touched(len, 0x33)?;
        best_of(3, || {
            let t = Instant::now();
            // SAFETY: two distinct mappings of `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(src.ptr, dst.ptr, len) };
            Ok(gbps(len as u64, t.elapsed().as_secs_f64()))
        })?
    };

    let (sw, sw_all) = best_of(3, || {
        let _ = std::fs::remove_file(&shm);
        prewarm(len)?;
        let f = std::fs::File::create(&shm)?;
        let t = Instant::now();
        // SAFETY: src is a live, initialised mapping of `len` bytes.
        let buf = unsafe { std::slice::from_raw_parts(src.ptr, len) };
        for c in buf.chunks(PIPE_CHUNK) {
            std::io::Write::write_all(&mut &f, c)?;
        }
        let s = t.elapsed().as_secs_f64();
        Ok(gbps(len as u64, s))
    })?;
    // The last file stays for the process_vm_writev pipeline below.
    drop(src);

    let (pv, pv_all, pv2, pv2_all, pp, pp_all) = {
        let target = Target::spawn(len, true)?;
        let dst = Region::touched(len, 0x44)?;
        let (pv, pv_all) = best_of(3, || {
            let t = Instant::now();
            pvr(target.pid, target.base, dst.addr(), len)?;
            Ok(gbps(len as u64, t.elapsed().as_secs_f64()))
        })?;
        let half = len / 2 / PAGE * PAGE;
        let (pv2, pv2_all) = best_of(3, || {
            let t = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let a = s.spawn(|| pvr(target.pid, target.base, dst.addr(), half));
                pvr(
                    target.pid,
                    target.base + half,
                    dst.addr() + half,
                    len - half,
                )?;
                a.join().expect("pvr thread")
            })?;
            Ok(gbps(len as u64, t.elapsed().as_secs_f64()))
        })?;
        drop(dst);
        let out = PathBuf::from(format!("{}-pipe", shm.display()));
        let (pp, pp_all) = best_of(3, || {
            let _ = std::fs::remove_file(&out);
            prewarm(len)?;
            let f = std::fs::File::create(&out)?;
            f.set_len(len as u64)?;
            let nchunks = len.div_ceil(PIPE_CHUNK);
            let next = std::sync::atomic::AtomicUsize::new(0);
            let t = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let work = || -> Result<()> {
                    let buf = Region::touched(PIPE_CHUNK, 0)?;
                    loop {
                        let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c >= nchunks {
                            return Ok(());
                        }
                        let off = c * PIPE_CHUNK;
                        let n = (len - off).min(PIPE_CHUNK);
                        pvr(target.pid, target.base + off, buf.addr(), n)?;
                        // SAFETY: buf holds n initialised bytes.
                        let b = unsafe { std::slice::from_raw_parts(buf.ptr, n) };
                        std::os::unix::fs::FileExt::write_all_at(&f, b, off as u64)?;
                    }
                };
                let a = s.spawn(work);
                work()?;
                a.join().expect("pipeline thread")
            })?;
            Ok(gbps(len as u64, t.elapsed().as_secs_f64()))
        })?;
        let _ = std::fs::remove_file(&out);
        (pv, pv_all, pv2, pv2_all, pp, pp_all)
    };

    let (pw, pw_all) = {
        let f = std::fs::File::open(&shm)?;
        // SAFETY: a private read-only view of a file only this bench writes.
        let map = unsafe { memmap2::Mmap::map(&f)? };
        let r = best_of(3, || {
            prewarm(len)?;
            let target = Target::spawn(len, false)?;
            let nchunks = len.div_ceil(PIPE_CHUNK);
            let next = std::sync::atomic::AtomicUsize::new(0);
            let t = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let work = || -> Result<()> {
                    loop {
                        let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c >= nchunks {
                            return Ok(());
                        }
                        let off = c * PIPE_CHUNK;
                        let n = (len - off).min(PIPE_CHUNK);
                        let l = libc::iovec {
                            iov_base: map[off..].as_ptr() as *mut libc::c_void,
                            iov_len: n,
                        };
                        let r = libc::iovec {
                            iov_base: (target.base + off) as *mut libc::c_void,
                            iov_len: n,
                        };
                        // SAFETY: reads from our mapping, writes the target.
                        let got = unsafe { libc::process_vm_writev(target.pid, &l, 1, &r, 1, 0) };
                        if got as usize != n {
                            bail!("process_vm_writev: {}", std::io::Error::last_os_error());
                        }
                    }
                };
                let a = s.spawn(work);
                work()?;
                a.join().expect("pipeline thread")
            })?;
            Ok(gbps(len as u64, t.elapsed().as_secs_f64()))
        })?;
        drop(map);
        r
    };
    let _ = std::fs::remove_file(&shm);

    Ok(Limits {
        buffer_bytes: len,
        first_touch_cold_gbps: cold,
        first_touch_gbps: ft,
        memcpy_gbps: mc,
        pvr_gbps: pv,
        pvr_2t_gbps: pv2,
        shm_write_gbps: sw,
        pvr_pwrite_2t_gbps: pp,
        pvw_fresh_2t_gbps: pw,
        samples: json!({
            "first_touch": ft_all, "memcpy": mc_all, "pvr": pv_all, "pvr_2t": pv2_all,
            "shm_write": sw_all, "pvr_pwrite_2t": pp_all, "pvw_fresh_2t": pw_all,
        }),
    })
}

// ---------------------------------------------------------------- cycle

/// Switches perf recording on and off around one phase (see the top).
fn perf_ctl(phase: &str, on: bool) {
    let Ok(fifo) = std::env::var("CKPT_BENCH_PERF_CTL") else {
        return;
    };
    let want = std::env::var("CKPT_BENCH_PERF_PHASE").unwrap_or_default();
    if !want.is_empty() && want != phase {
        return;
    }
    let cmd: &[u8] = if on { b"enable\n" } else { b"disable\n" };
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&fifo) {
        let _ = std::io::Write::write_all(&mut f, cmd);
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Cycle {
    dump: DumpReport,
    restore: RestoreReport,
    /// The bench's own content check of the restored process.
    check_ms: f64,
    checked_pages: usize,
}

/// A dump of `pid` into `images`; `leave_running` and `snapshot` as the
/// agent's options.
fn request(pid: i32, images: &Path, leave_running: bool, snapshot: bool) -> DumpRequest {
    DumpRequest {
        pid,
        images: images.to_path_buf(),
        leave_running,
        snapshot,
        tasks_in_parallel: true,
        pre_dump: false,
        parent: None,
        track_mem: false,
        compress: Default::default(),
        ext_unix_sk: false,
        shell_job: false,
        tcp_established: false,
        key: None,
        stream: None,
        hold: None,
    }
}

/// Removes an image directory on drop.
struct ImageDir(PathBuf);

impl Drop for ImageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads sampled pages of the restored process and compares them with the
/// pattern the target wrote.
fn check_content(pid: i32, base: usize, len: usize) -> Result<usize> {
    let npages = len / PAGE;
    let mut pages: Vec<usize> = (0..npages).step_by(VERIFY_STRIDE).collect();
    pages.push(npages - 1);
    let mut buf = vec![0u64; PAGE / 8];
    for &p in &pages {
        pvr(pid, base + p * PAGE, buf.as_mut_ptr() as usize, PAGE)
            .with_context(|| format!("reading page {p} of restored process {pid}"))?;
        for (i, w) in buf.iter().enumerate() {
            if *w != pattern(p, i) {
                bail!(
                    "restored process {pid}: page {p} word {i} is {w:#x}, expected {:#x}",
                    pattern(p, i)
                );
            }
        }
    }
    Ok(pages.len())
}

/// A page server in a thread of the bench, receiving into /dev/shm.
struct Streaming {
    to: ckpt_agent::stream::StreamTo,
    root: PathBuf,
    key: PathBuf,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_file(&self.key);
    }
}

/// Starts a page server on loopback with a fresh cluster key.
fn start_page_server() -> Result<Streaming> {
    use std::os::unix::fs::OpenOptionsExt;
    let id = std::process::id();
    let key = PathBuf::from(format!("/dev/shm/ckpt-bench-{id}.key"));
    let bytes = ckpt_proto::rpc::random_bytes::<32>()?;
    std::io::Write::write_all(
        &mut std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&key)?,
        &bytes,
    )?;
    let root = PathBuf::from(format!("/dev/shm/ckpt-bench-{id}-received"));
    let server = ckpt_agent::stream::PageServer::bind(&root, "127.0.0.1:0", &key)?;
    let addr = server.local_addr()?;
    std::thread::spawn(move || server.run());
    Ok(Streaming {
        to: ckpt_agent::stream::StreamTo {
            addr: addr.to_string(),
            key: ckpt_proto::rpc::Key::load(&key)?,
            inbox: String::new(),
        },
        root,
        key,
    })
}

fn cycle(
    len: usize,
    tag: &str,
    warm: bool,
    compress: Codec,
    lazy: bool,
    stream: Option<&Streaming>,
) -> Result<Cycle> {
    let name = format!("ckpt-bench-{}-{tag}", std::process::id());
    // Streamed: the dump's directory is the spool of its small images,
    // the restore reads what the page server received.
    let dir = ImageDir(PathBuf::from(format!("/dev/shm/{name}")));
    let received = stream.map(|s| ImageDir(s.root.join(&name)));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;

    let mut target = Target::spawn(len, true)?;
    let (pid, base) = (target.pid, target.base);
    if warm {
        prewarm(len)?;
    }
    perf_ctl("dump", true);
    let d = dump(&DumpRequest {
        compress,
        stream: stream.map(|s| s.to.clone()),
        ..request(pid, &dir.0, false, false)
    });
    perf_ctl("dump", false);
    let d = d.with_context(|| format!("dump of {pid}"))?;
    target.kill(); // already reaped by the dump (we are its tracer): ECHILD
    if Path::new(&format!("/proc/{pid}")).exists() {
        bail!("dumped process {pid} still exists");
    }
    if d.pages_bytes < len as u64 {
        bail!(
            "dump stored {} bytes of pages, target holds {len}",
            d.pages_bytes
        );
    }

    if warm {
        prewarm(len)?;
    }
    perf_ctl("restore", true);
    let r = restore(&RestoreRequest {
        images: received.as_ref().map_or(&dir.0, |r| &r.0).clone(),
        detach: true,
        pidfile: None,
        ext_unix_sk: false,
        shell_job: false,
        tcp_established: false,
        job: None,
        bridge: None,
        hold: false,
        lazy_pages: lazy,
        key: None,
    });
    perf_ctl("restore", false);
    let (r, _) = r.with_context(|| format!("restore of {pid}"))?;
    let mut restored = Target {
        pid: r.pid,
        base,
        len,
        reaped: false,
    };
    if r.pid != pid {
        bail!("restored as {} instead of {pid}", r.pid);
    }
    let t = Instant::now();
    let checked_pages = check_content(restored.pid, restored.base, restored.len)?;
    let check_ms = t.elapsed().as_secs_f64() * 1e3;
    restored.kill();
    drop(dir);
    drop(received);
    Ok(Cycle {
        dump: d,
        restore: r,
        check_ms,
        checked_pages,
    })
}

// ---------------------------------------------------------------- snapshot

/// Copies `src` into a new file at `path` with vmsplice + splice, `threads`
/// threads taking 1 MiB chunks (the largest pipe here: fs.pipe-max-size);
/// returns the seconds taken.
fn vmsplice_copy(src: &Region, path: &Path, threads: usize) -> Result<f64> {
    const PIPE: usize = 1 << 20;
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path)?;
    f.set_len(src.len as u64)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let nchunks = src.len.div_ceil(PIPE);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let work = || -> Result<()> {
            let mut p = [0i32; 2];
            // SAFETY: pipe2 fills the two-int array.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                bail!("pipe2: {}", std::io::Error::last_os_error());
            }
            // SAFETY: plain fcntl on our pipe.
            unsafe { libc::fcntl(p[1], libc::F_SETPIPE_SZ, PIPE as libc::c_int) };
            let r = (|| -> Result<()> {
                loop {
                    let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if c >= nchunks {
                        return Ok(());
                    }
                    let off = c * PIPE;
                    let n = (src.len - off).min(PIPE);
                    let (mut put, mut moved) = (0usize, 0usize);
                    while moved < n {
                        if put < n {
                            let iov = libc::iovec {
                                iov_base: (src.addr() + off + put) as *mut libc::c_void,
                                iov_len: n - put,
                            };
                            // SAFETY: the iovec points into `src`, alive here.
                            let k = unsafe { libc::vmsplice(p[1], &iov, 1, 0) };
                            if k < 0 {
                                bail!("vmsplice: {}", std::io::Error::last_os_error());
                            }
                            put += k as usize;
                        }
                        let mut at = (off + moved) as libc::loff_t;
                        // SAFETY: splice between our pipe and our file.
                        let k = unsafe {
                            libc::splice(p[0], std::ptr::null_mut(), fd, &mut at, put - moved, 0)
                        };
                        if k <= 0 {
                            bail!("splice: {}", std::io::Error::last_os_error());
                        }
                        moved += k as usize;
                    }
                }
            })();
            // SAFETY: closing the pipe made above.
            unsafe {
                libc::close(p[0]);
                libc::close(p[1]);
            }
            r
        };
        let mut handles = Vec::new();
        for _ in 1..threads {
            handles.push(s.spawn(work));
        }
        work()?;
        for h in handles {
            h.join().expect("vmsplice thread")?;
        }
        Ok(())
    })?;
    Ok(t.elapsed().as_secs_f64())
}

/// Checks sampled pages of the target's region in the pages file of the
/// dump in `dir` against the pattern the target wrote; returns how many
/// were checked.
fn check_image(dir: &Path, target: &Target) -> Result<usize> {
    let name = ckpt_agent::images::image_name(ckpt_proto::ImageKind::PageMap, target.pid);
    let pm: ckpt_proto::image::PageMap =
        ckpt_proto::read_image_file(&dir.join(&name), ckpt_proto::ImageKind::PageMap)
            .with_context(|| format!("reading {name}"))?;
    let pages = ckpt_agent::pages::map_pages(&pm, &dir.join(&pm.pages_file))?
        .context("an empty pages file")?;
    let mut checked = 0;
    for p in (0..target.len / PAGE).step_by(VERIFY_STRIDE) {
        let va = (target.base + p * PAGE) as u64;
        let run = pm
            .runs
            .iter()
            .find(|r| r.vaddr <= va && va < r.vaddr + r.nr_pages * PAGE as u64)
            .with_context(|| format!("page {va:#x} of the target is not in the image"))?;
        let at = run.offset + (va - run.vaddr);
        for w in [0, PAGE / 8 - 1] {
            let at = (at + (w * 8) as u64) as usize;
            let b: [u8; 8] = pages[at..at + 8].try_into().expect("8 bytes");
            if u64::from_le_bytes(b) != pattern(p, w) {
                bail!("page {p} word {w} of the image is not what the target wrote");
            }
        }
        checked += 1;
    }
    Ok(checked)
}

/// One round of the downtime comparison on the same running target.
#[derive(Debug, Clone, serde::Serialize)]
struct SnapCycle {
    frozen_copy: DumpReport,
    snapshot: DumpReport,
}

fn snapshot_cycle(target: &Target, tag: &str, warm: bool) -> Result<SnapCycle> {
    let mut out = Vec::new();
    for snapshot in [false, true] {
        let dir = ImageDir(PathBuf::from(format!(
            "/dev/shm/ckpt-bench-{}-{tag}-{snapshot}",
            std::process::id()
        )));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0)?;
        if warm {
            prewarm(target.len)?;
        }
        perf_ctl("dump", true);
        let d = dump(&request(target.pid, &dir.0, true, snapshot));
        perf_ctl("dump", false);
        let d = d.with_context(|| format!("dump of {} (snapshot {snapshot})", target.pid))?;
        if snapshot && d.snapshot_bytes < target.len as u64 {
            bail!("only {} bytes came from the snapshot", d.snapshot_bytes);
        }
        check_image(&dir.0, target)?;
        out.push(d);
    }
    let snapshot = out.pop().expect("two dumps");
    let frozen_copy = out.pop().expect("two dumps");
    Ok(SnapCycle {
        frozen_copy,
        snapshot,
    })
}

/// How long fork() takes in this process, which holds the touched source
/// region (best of 3): the page-table copy that any fork-based snapshot
/// of a process with that memory pays while it is frozen.
fn fork_ms() -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: the child only calls _exit, which is async-signal-safe
        // (this process has threads).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)?;
    }
    Ok(best)
}

/// How long write-protecting the touched region `src` takes (best of 3),
/// with a userfaultfd (UFFDIO_WRITEPROTECT) and with mprotect: what a
/// write-protect snapshot (instead of a fork) would pay while the process
/// is frozen, one page-table entry at a time like the fork.
fn write_protect_ms(src: &Region) -> Result<(f64, f64)> {
    use ckpt_agent::sys::uffd::{Userfaultfd, UFFDIO_REGISTER_MODE_WP};
    let (start, len) = (src.ptr as u64, src.len as u64);
    let uffd = Userfaultfd::open().context("userfaultfd")?;
    uffd.api(0).context("UFFDIO_API")?;
    uffd.register(start, len, UFFDIO_REGISTER_MODE_WP)
        .context("UFFDIO_REGISTER (write-protect)")?;
    let (mut wp, mut mp) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t = Instant::now();
        uffd.writeprotect(start, len, true)
            .context("UFFDIO_WRITEPROTECT")?;
        wp = wp.min(t.elapsed().as_secs_f64() * 1e3);
        uffd.writeprotect(start, len, false)
            .context("UFFDIO_WRITEPROTECT (off)")?;
    }
    uffd.unregister(start, len).context("UFFDIO_UNREGISTER")?;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: the region is this bench's own mapping; nothing writes
        // it until it is writable again below.
        let r = unsafe { libc::mprotect(src.ptr.cast(), src.len, libc::PROT_READ) };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // SAFETY: as above.
        let back =
            unsafe { libc::mprotect(src.ptr.cast(), src.len, libc::PROT_READ | libc::PROT_WRITE) };
        if r != 0 || back != 0 {
            bail!("mprotect: {}", std::io::Error::last_os_error());
        }
        mp = mp.min(ms);
    }
    Ok((wp, mp))
}

/// `--snapshot`: per size, vmsplice + splice of the same bytes (1 and 2
/// threads, best of 3), then `reps` rounds of a frozen-copy dump and a
/// snapshot dump of one running target.
fn snapshot_main(args: &Args, human: &mut dyn std::io::Write) -> Result<serde_json::Value> {
    let mut runs = Vec::new();
    for &gib in &args.sizes {
        let len = ((gib * GIB) as usize).div_ceil(PAGE) * PAGE;
        let shm = PathBuf::from(format!(
            "/dev/shm/ckpt-bench-vmsplice-{}",
            std::process::id()
        ));
        let (vs1, vs2, fork_ms, (wp_ms, mprotect_ms)) = {
            let src = Region::touched(len, 0x55)?;
            let fork_ms = fork_ms()?;
            let wp = write_protect_ms(&src)?;
            let mut best = [f64::MAX; 2];
            for (i, threads) in [1, 2].into_iter().enumerate() {
                for _ in 0..3 {
                    if args.warm {
                        prewarm(len)?;
                    }
                    best[i] = best[i].min(vmsplice_copy(&src, &shm, threads)?);
                    let _ = std::fs::remove_file(&shm);
                }
            }
            (best[0] * 1e3, best[1] * 1e3, fork_ms, wp)
        };
        writeln!(
            human,
            "{gib} GiB: vmsplice+splice into /dev/shm: {vs1:.0} ms (1 thread), {vs2:.0} ms (2 threads); \
             fork() of this bench holding them (4 KiB pages): {fork_ms:.1} ms; write-protecting \
             them: {wp_ms:.1} ms (userfaultfd), {mprotect_ms:.1} ms (mprotect)"
        )?;
        let target = Target::spawn(len, true)?;
        let mut cycles = Vec::new();
        for rep in 0..args.reps {
            let c = snapshot_cycle(&target, &format!("{gib}-{rep}"), args.warm)?;
            let (f, s) = (&c.frozen_copy, &c.snapshot);
            writeln!(
                human,
                "  #{rep}: frozen copy: frozen {:.0} ms, total {:.0} ms | snapshot: frozen {:.1} ms ({:.1}% of the frozen copy's dump; a bare fork {:.1}%), total {:.0} ms ({:.0}% of vmsplice 1 thread, {:.0}% of 2 threads)",
                f.frozen_ms,
                f.total_ms,
                s.frozen_ms,
                100.0 * s.frozen_ms / f.total_ms,
                100.0 * fork_ms / f.total_ms,
                s.total_ms,
                100.0 * s.total_ms / (vs1 * s.pages_bytes as f64 / len as f64),
                100.0 * s.total_ms / (vs2 * s.pages_bytes as f64 / len as f64),
            )?;
            cycles.push(c);
        }
        runs.push(json!({
            "size_gib": gib,
            "vmsplice_ms_1t": vs1,
            "vmsplice_ms_2t": vs2,
            "fork_ms": fork_ms,
            "uffd_wp_ms": wp_ms,
            "mprotect_ms": mprotect_ms,
            "cycles": cycles,
        }));
    }
    Ok(json!({
        "bench": "dump_restore --snapshot",
        "prewarmed": args.warm,
        "thp": THP.load(std::sync::atomic::Ordering::Relaxed),
        "runs": runs,
    }))
}

// ---------------------------------------------------------------- incremental

/// Percentage of the target's pages each increment finds changed.
const CHANGED_PCT: usize = 5;

/// Rewrites every (100/CHANGED_PCT)-th page of the target (its first word,
/// to `stamp`), as the target would: process_vm_writev writes through its
/// page tables, so its write tracker sees these pages written.
fn rewrite(target: &Target, stamp: u64) -> Result<usize> {
    let stride = 100 / CHANGED_PCT;
    let mut n = 0;
    let bytes = stamp.to_le_bytes();
    for p in (0..target.len / PAGE).step_by(stride) {
        let local = [std::io::IoSlice::new(&bytes)];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: target.base + p * PAGE,
            len: 8,
        }];
        nix::sys::uio::process_vm_writev(nix::unistd::Pid::from_raw(target.pid), &local, &remote)
            .with_context(|| format!("rewriting page {p} of {}", target.pid))?;
        n += 1;
    }
    Ok(n)
}

/// Checks that the increment in `dir` holds exactly the rewritten pages of
/// the target's region, with `stamp`, and leaves the rest in its parent.
fn check_increment(dir: &Path, target: &Target, stamp: u64) -> Result<()> {
    let name = ckpt_agent::images::image_name(ckpt_proto::ImageKind::PageMap, target.pid);
    let pm: ckpt_proto::image::PageMap =
        ckpt_proto::read_image_file(&dir.join(&name), ckpt_proto::ImageKind::PageMap)
            .with_context(|| format!("reading {name}"))?;
    // Empty when nothing changed.
    let pages = ckpt_agent::pages::map_pages(&pm, &dir.join(&pm.pages_file))?;
    let stride = 100 / CHANGED_PCT;
    let (lo, hi) = (target.base as u64, (target.base + target.len) as u64);
    for r in pm.runs.iter().filter(|r| r.vaddr >= lo && r.vaddr < hi) {
        for i in 0..r.nr_pages {
            let p = ((r.vaddr - lo) / PAGE as u64 + i) as usize;
            let present = r.flags & ckpt_agent::pages::PAGE_PRESENT != 0;
            if present != p.is_multiple_of(stride) {
                bail!(
                    "page {p}: in the increment {present}, rewritten {}",
                    p.is_multiple_of(stride)
                );
            }
            if present {
                let at = (r.offset + i * PAGE as u64) as usize;
                let b: [u8; 8] = pages.as_ref().context("an empty increment")?[at..at + 8]
                    .try_into()
                    .expect("8 bytes");
                if u64::from_le_bytes(b) != stamp {
                    bail!("page {p} of the increment is not the rewritten one");
                }
            }
        }
    }
    Ok(())
}

/// `--incremental`: per size and round, a full frozen-copy dump, a
/// pre-dump, and two increments (frozen copy, then snapshot) of one
/// running target after CHANGED_PCT of its pages changed.
fn incremental_main(args: &Args, human: &mut dyn std::io::Write) -> Result<serde_json::Value> {
    let mut runs = Vec::new();
    for &gib in &args.sizes {
        let len = ((gib * GIB) as usize).div_ceil(PAGE) * PAGE;
        let target = Target::spawn(len, true)?;
        let mut cycles = Vec::new();
        for rep in 0..args.reps {
            let dir = |what: &str| {
                ImageDir(PathBuf::from(format!(
                    "/dev/shm/ckpt-bench-{}-{gib}-{rep}-{what}",
                    std::process::id()
                )))
            };
            let (full_dir, pre_dir, inc1_dir, inc2_dir) =
                (dir("full"), dir("pre"), dir("inc1"), dir("inc2"));
            let step = |d: &ImageDir, req: DumpRequest| -> Result<DumpReport> {
                let _ = std::fs::remove_dir_all(&d.0);
                if args.warm {
                    prewarm(len)?;
                }
                dump(&req).with_context(|| format!("dump into {}", d.0.display()))
            };
            let full = step(&full_dir, request(target.pid, &full_dir.0, true, false))?;
            let pre = step(
                &pre_dir,
                DumpRequest {
                    pre_dump: true,
                    track_mem: true,
                    ..request(target.pid, &pre_dir.0, true, true)
                },
            )?;
            let incremental = |d: &ImageDir, parent: &ImageDir, snapshot: bool, stamp: u64| {
                let changed = rewrite(&target, stamp)?;
                let r = step(
                    d,
                    DumpRequest {
                        parent: Some(parent.0.clone()),
                        track_mem: true,
                        ..request(target.pid, &d.0, true, snapshot)
                    },
                )?;
                check_increment(&d.0, &target, stamp)?;
                anyhow::Ok((changed, r))
            };
            let (changed, inc1) =
                incremental(&inc1_dir, &pre_dir, false, 0xfeed_0001 + rep as u64)?;
            let (_, inc2) = incremental(&inc2_dir, &inc1_dir, true, 0xfeed_1001 + rep as u64)?;
            writeln!(
                human,
                "  {gib} GiB #{rep}: full frozen-copy dump: frozen {:.0} ms | pre-dump: frozen {:.1} ms, total {:.0} ms | {changed} pages ({CHANGED_PCT}%) changed: increment frozen copy: frozen {:.1} ms ({:.1}% of the full dump's), {} MiB | increment with snapshot: frozen {:.1} ms ({:.1}%), total {:.0} ms",
                full.frozen_ms,
                pre.frozen_ms,
                pre.total_ms,
                inc1.frozen_ms,
                100.0 * inc1.frozen_ms / full.frozen_ms,
                inc1.pages_bytes >> 20,
                inc2.frozen_ms,
                100.0 * inc2.frozen_ms / full.frozen_ms,
                inc2.total_ms,
            )?;
            cycles.push(json!({
                "full": full,
                "pre_dump": pre,
                "changed_pages": changed,
                "increment_frozen_copy": inc1,
                "increment_snapshot": inc2,
            }));
        }
        runs.push(json!({ "size_gib": gib, "cycles": cycles }));
    }
    Ok(json!({
        "bench": "dump_restore --incremental",
        "prewarmed": args.warm,
        "thp": THP.load(std::sync::atomic::Ordering::Relaxed),
        "changed_pct": CHANGED_PCT,
        "runs": runs,
    }))
}

// ---------------------------------------------------------------- report

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    size_gib: f64,
    stat: &'static str,
    dump_total_ms: f64,
    dump_pages_gbps: f64,
    dump_total_gbps: f64,
    frozen_ms: f64,
    restore_total_ms: f64,
    restore_total_gbps: f64,
    restore_pages_gbps: f64,
    restore_verify_ms: f64,
    check_ms: f64,
    dump_vs_pvr: f64,
    dump_vs_pvr_2t: f64,
    dump_vs_memcpy: f64,
    restore_vs_first_touch: f64,
    restore_vs_memcpy: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One row per statistic: "best" takes the best of each column
/// independently (lowest time, highest rate), "median" the median.
fn rows(size_gib: f64, cycles: &[Cycle], lim: &Limits) -> Vec<Row> {
    let col = |f: &dyn Fn(&Cycle) -> f64| cycles.iter().map(f).collect::<Vec<f64>>();
    let pick = |v: Vec<f64>, best: bool, higher: bool| {
        if !best {
            median(v)
        } else if higher {
            v.into_iter().fold(f64::MIN, f64::max)
        } else {
            v.into_iter().fold(f64::MAX, f64::min)
        }
    };
    let mut out = Vec::new();
    for (stat, best) in [("best", true), ("median", false)] {
        let t = |f: &dyn Fn(&Cycle) -> f64| pick(col(f), best, false);
        let g = |f: &dyn Fn(&Cycle) -> f64| pick(col(f), best, true);
        let dump_pages_gbps = g(&|c| gbps(c.dump.pages_bytes, c.dump.pages_ms / 1e3));
        let restore_total_gbps = g(&|c| gbps(c.restore.pages_bytes, c.restore.total_ms / 1e3));
        out.push(Row {
            size_gib,
            stat,
            dump_total_ms: t(&|c| c.dump.total_ms),
            dump_pages_gbps,
            dump_total_gbps: g(&|c| gbps(c.dump.pages_bytes, c.dump.total_ms / 1e3)),
            frozen_ms: t(&|c| c.dump.frozen_ms),
            restore_total_ms: t(&|c| c.restore.total_ms),
            restore_total_gbps,
            restore_pages_gbps: g(&|c| gbps(c.restore.pages_bytes, c.restore.pages_ms / 1e3)),
            restore_verify_ms: t(&|c| c.restore.verify_ms),
            check_ms: t(&|c| c.check_ms),
            dump_vs_pvr: dump_pages_gbps / lim.pvr_gbps,
            dump_vs_pvr_2t: dump_pages_gbps / lim.pvr_2t_gbps,
            dump_vs_memcpy: dump_pages_gbps / lim.memcpy_gbps,
            restore_vs_first_touch: restore_total_gbps / lim.first_touch_gbps,
            restore_vs_memcpy: restore_total_gbps / lim.memcpy_gbps,
        });
    }
    out
}

fn print_limits(out: &mut dyn std::io::Write, l: &Limits) -> std::io::Result<()> {
    writeln!(
        out,
        "machine limits, {:.2} GiB buffers (GB/s = 1e9 B/s; best of 3):",
        l.buffer_bytes as f64 / GIB
    )?;
    let items = [
        ("memcpy (prewarmed, 1 thread)", l.memcpy_gbps),
        ("process_vm_readv (1 thread)", l.pvr_gbps),
        ("process_vm_readv (2 threads)", l.pvr_2t_gbps),
        ("first touch, after prewarm", l.first_touch_gbps),
        ("first touch, cold (1 run)", l.first_touch_cold_gbps),
        ("write() to /dev/shm", l.shm_write_gbps),
        ("readv 4M + pwrite shm (2 thr)", l.pvr_pwrite_2t_gbps),
        ("writev 4M to fresh mem (2 thr)", l.pvw_fresh_2t_gbps),
    ];
    for (k, v) in items {
        writeln!(out, "  {k:<32} {v:6.2} GB/s")?;
    }
    Ok(())
}

fn print_table(out: &mut dyn std::io::Write, rows: &[Row]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>5} {:>6} | {:>8} {:>7} {:>7} {:>7} | {:>8} {:>7} {:>7} {:>7} {:>7} | {:>6} {:>6} {:>6} {:>6} {:>6}",
        "GiB", "stat", "dump ms", "pg GB/s", "tot GB/s", "frz ms", "rst ms", "tot GB/s", "pg GB/s",
        "vrf ms", "chk ms", "d/pvr", "d/pvr2", "d/mcp", "r/ft", "r/mcp"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:>5} {:>6} | {:>8.0} {:>7.2} {:>8.2} {:>7.0} | {:>8.0} {:>8.2} {:>7.2} {:>7.0} {:>7.1} | {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            r.size_gib,
            r.stat,
            r.dump_total_ms,
            r.dump_pages_gbps,
            r.dump_total_gbps,
            r.frozen_ms,
            r.restore_total_ms,
            r.restore_total_gbps,
            r.restore_pages_gbps,
            r.restore_verify_ms,
            r.check_ms,
            r.dump_vs_pvr,
            r.dump_vs_pvr_2t,
            r.dump_vs_memcpy,
            r.restore_vs_first_touch,
            r.restore_vs_memcpy
        )?;
    }
    writeln!(
        out,
        "dump: pg = pages_bytes/pages_ms, tot = pages_bytes/total_ms; frz = frozen time.\n\
         restore: tot = pages_bytes/total_ms, pg = pages_bytes/pages_ms; vrf = image checksum\n\
         check inside restore; chk = this bench's sampled content check (not in restore ms).\n\
         ratios: d = dump pg GB/s over process_vm_readv (1 and 2 threads) and memcpy;\n\
         r = restore tot GB/s over first touch (after prewarm) and memcpy."
    )
}

// ---------------------------------------------------------------- main

struct Args {
    sizes: Vec<f64>,
    reps: usize,
    json: bool,
    warm: bool,
    snapshot: bool,
    incremental: bool,
    compress: Codec,
    lazy: bool,
    stream: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        sizes: vec![1.0, 4.0],
        reps: 3,
        json: false,
        warm: true,
        snapshot: false,
        incremental: false,
        compress: Codec::None,
        lazy: false,
        stream: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sizes" => {
                let v = it.next().context("--sizes needs a value, e.g. 1,4")?;
                a.sizes = v
                    .split(',')
                    .map(|s| s.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .context("--sizes: comma-separated GiB, e.g. 0.25 or 1,4")?;
            }
            "--reps" => a.reps = it.next().context("--reps needs a value")?.parse()?,
            "--json" => a.json = true,
            "--no-prewarm" => a.warm = false,
            "--snapshot" => a.snapshot = true,
            "--incremental" => a.incremental = true,
            "--lazy" => a.lazy = true,
            "--stream" => a.stream = true,
            "--compress" => {
                let v = it.next().context("--compress needs lz4, zstd or zstd:N")?;
                a.compress = v.parse().map_err(anyhow::Error::msg)?;
            }
            "--thp" => THP.store(true, std::sync::atomic::Ordering::Relaxed),
            // cargo bench passes --bench; ignore harness options we do not use.
            _ => {}
        }
    }
    if a.sizes.iter().any(|s| *s <= 0.0) || a.reps == 0 {
        bail!("sizes and --reps must be positive");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // CKPT_LOG=debug shows the phases of each dump (its frozen window).
    ckpt_agent::logging::init(0);
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut err = std::io::stderr();
    let mut out = std::io::stdout();
    let human: &mut dyn std::io::Write = if args.json { &mut err } else { &mut out };
    if args.snapshot || args.incremental {
        let line = match args.snapshot {
            true => snapshot_main(&args, human)?,
            false => incremental_main(&args, human)?,
        };
        if args.json {
            println!("{line}");
        }
        return Ok(());
    }

    let bytes = |gib: f64| ((gib * GIB) as usize).div_ceil(PAGE) * PAGE;
    let lim_len = |gib: f64| bytes(gib).min(1 << 30);
    // Cold first touch before anything else has touched memory in this run.
    let cold = first_touch(lim_len(args.sizes.iter().cloned().fold(0.0, f64::max)))?;

    let streaming = args.stream.then(start_page_server).transpose()?;
    let mut limits: Vec<Limits> = Vec::new();
    let mut all_rows = Vec::new();
    let mut runs = Vec::new();
    for &gib in &args.sizes {
        let ll = lim_len(gib);
        if !limits.iter().any(|l| l.buffer_bytes == ll) {
            let l = measure_limits(ll, cold)?;
            print_limits(human, &l)?;
            limits.push(l);
        }
        let lim = limits
            .iter()
            .find(|l| l.buffer_bytes == ll)
            .expect("limits measured")
            .clone();
        let len = bytes(gib);
        let mut cycles = Vec::new();
        for rep in 0..args.reps {
            let c = cycle(
                len,
                &format!("{gib}-{rep}"),
                args.warm,
                args.compress,
                args.lazy,
                streaming.as_ref(),
            )?;
            if let Some(l) = &c.restore.lazy {
                writeln!(
                    human,
                    "  {gib} GiB #{rep}: lazy restore: running after {:.1} ms, every page in {:.0} ms later ({} faults served)",
                    c.restore.total_ms, l.fill_ms, l.faults
                )?;
            }
            writeln!(
                human,
                "  {gib} GiB #{rep}: dump {:.0} ms ({:.2} GB/s pages, frozen {:.0} ms, stored {:.0}%), restore {:.0} ms ({:.2} GB/s pages), {} pages checked",
                c.dump.total_ms,
                gbps(c.dump.pages_bytes, c.dump.pages_ms / 1e3),
                c.dump.frozen_ms,
                100.0 * c.dump.stored_bytes as f64 / c.dump.pages_bytes as f64,
                c.restore.total_ms,
                gbps(c.restore.pages_bytes, c.restore.pages_ms / 1e3),
                c.checked_pages
            )?;
            cycles.push(c);
        }
        all_rows.extend(rows(gib, &cycles, &lim));
        runs.push(json!({ "size_gib": gib, "limits_buffer_bytes": ll, "cycles": cycles }));
    }
    writeln!(
        human,
        "\ndump/restore to /dev/shm{}, memory {} ({} reps per size):",
        if args.stream {
            " (dumps streamed over loopback into a page server there)"
        } else {
            ""
        },
        if args.warm {
            "prewarmed (1.25x touched and freed before each step)"
        } else {
            "NOT prewarmed"
        },
        args.reps
    )?;
    print_table(human, &all_rows)?;
    if args.json {
        let line = json!({
            "bench": "dump_restore",
            "streamed": args.stream,
            "prewarmed": args.warm,
            "reps": args.reps,
            "limits": limits,
            "rows": all_rows,
            "runs": runs,
        });
        println!("{line}");
    }
    Ok(())
}
