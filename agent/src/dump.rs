//! `ckpt-agent dump`: checkpoint a process into an image directory.
//!
//! Order matters: seize and stop every thread; read what ptrace shows;
//! make the task tell what only it knows (signal handlers, timers, its
//! alternate stacks) through injected system calls in a scratch page that
//! is gone again before the address space is read; copy the pages in
//! parallel; write the images; commit the inventory; then kill or release.
//! Any failure before the commit releases the process untouched.

use std::path::PathBuf;
use std::time::Instant;

use ckpt_proto::image::{DumpOptions, Inventory};
use ckpt_proto::{ImageKind, FORMAT_VERSION};
use nix::unistd::Pid;
use tracing::info;

use crate::error::{Error, Result};
use crate::images::{image_name, pages_name, ImageWriter};
use crate::inject::{Remote, Scratch};
use crate::progress::{Progress, Quiet};
use crate::seize::{check_target, Seized};
use crate::{files, mm, pages, proc, task};

/// What to dump and how.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    pub pid: i32,
    pub images: PathBuf,
    pub leave_running: bool,
}

/// What a dump did, for the command line and benchmarks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub threads: usize,
    pub images: PathBuf,
    pub pages_bytes: u64,
    pub frozen_ms: f64,
    pub pages_ms: f64,
    pub total_ms: f64,
}

const SCRATCH_LEN: u64 = 64 * 1024;

/// Refuses a tree (children come with process-tree support).
fn check_no_children(pid: i32) -> Result<()> {
    for tid in proc::tids(pid)? {
        let kids = proc::read(pid, &format!("task/{tid}/children")).unwrap_or_default();
        if let Some(child) = kids.split_whitespace().next() {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "it has child process {child}; dumping process trees is not supported yet"
                ),
            });
        }
    }
    Ok(())
}

/// Dumps one process (all its threads) into `req.images`.
pub fn dump(req: &DumpRequest) -> Result<DumpReport> {
    dump_with_progress(req, &Quiet)
}

/// Like `dump`, reporting the page copy to `progress`.
pub fn dump_with_progress(req: &DumpRequest, progress: &dyn Progress) -> Result<DumpReport> {
    let t0 = Instant::now();
    let pid = req.pid;
    check_target(pid)?;
    check_no_children(pid)?;
    let writer = ImageWriter::create(&req.images)?;
    let seized = Seized::process(pid)?;
    let frozen_at = Instant::now();
    let result = dump_seized(&seized, &writer, progress);
    let (pages_bytes, pages_ms) = match result {
        Ok(v) => v,
        Err(e) => {
            writer.discard();
            let _ = std::fs::remove_file(req.images.join(pages_name(pid)));
            drop(seized);
            return Err(e);
        }
    };
    let threads = seized.threads.len();
    let inv = Inventory {
        format_version: FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        root_pid: pid,
        pids: vec![pid],
        node: crate::check::fingerprint().ok(),
        files: Vec::new(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        options: Some(DumpOptions {
            leave_running: req.leave_running,
            ..Default::default()
        }),
        needs_features: vec![
            "clone3_set_tid".into(),
            "prctl_mm_map".into(),
            "ptrace_xstate".into(),
        ],
        signature: Vec::new(),
    };
    if let Err(e) = writer.commit(inv) {
        writer.discard();
        drop(seized);
        return Err(e);
    }
    if req.leave_running {
        seized.release()?;
    } else {
        seized.kill()?;
    }
    let frozen_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
    info!(pid, pages_bytes, frozen_ms, "dump complete");
    Ok(DumpReport {
        pid,
        threads,
        images: req.images.clone(),
        pages_bytes,
        frozen_ms,
        pages_ms,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

fn dump_seized(
    seized: &Seized,
    writer: &ImageWriter,
    progress: &dyn Progress,
) -> Result<(u64, f64)> {
    let pid = seized.pid;
    let mut threads = Vec::with_capacity(seized.threads.len());
    for t in &seized.threads {
        threads.push(task::dump_thread_outside(pid, t.tid, &t.regs)?);
    }
    seized.block_signals()?;
    let gadget = mm::find_syscall_gadget(pid)?;
    let main = Remote::new(Pid::from_raw(pid), gadget)?;
    // The scratch area sits in a gap with free pages on both sides, so it
    // merges with no mapping and can be left out of the image.
    let busy: Vec<(u64, u64)> = proc::maps(pid)?.iter().map(|m| (m.start, m.end)).collect();
    let want = mm::find_gap(&busy, SCRATCH_LEN).ok_or_else(|| Error::Refused {
        pid,
        reason: "no free address range for the agent's scratch area".into(),
    })?;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let addr = main.syscall(
        libc::SYS_mmap,
        &[want, SCRATCH_LEN, prot, flags, u64::MAX, 0],
    )?;
    let mut scratch = Scratch::new(pid, addr, SCRATCH_LEN);
    let result = (|| -> Result<_> {
        let mut core = task::dump_process(pid, &main, &mut scratch)?;
        for (th, t) in threads.iter_mut().zip(&seized.threads) {
            let r = Remote::new(Pid::from_raw(t.tid), gadget)?;
            task::dump_thread_inside(th, &r, &mut scratch)?;
        }
        core.threads = std::mem::take(&mut threads);
        let brk = mm::current_brk(&main)?;
        let fds = files::dump(pid, writer)?;
        let mmd = mm::dump(pid, brk, Some((addr, addr + SCRATCH_LEN)))?;
        let tp = Instant::now();
        let pages_path = writer.dir().join(pages_name(pid));
        let pm = pages::dump(pid, &mmd.extents, &pages_path, &pages_name(pid), progress)?;
        Ok((core, fds, mmd, pm, tp))
    })();
    main.syscall(libc::SYS_munmap, &[addr, SCRATCH_LEN])?;
    let (core, fds, mmd, pm, tp) = result?;
    let pages_ms = tp.elapsed().as_secs_f64() * 1e3;
    writer.add_pages(&pm);
    writer.write(&image_name(ImageKind::Core, pid), ImageKind::Core, &core)?;
    writer.write(&image_name(ImageKind::Mm, pid), ImageKind::Mm, &mmd.image)?;
    writer.write(
        &image_name(ImageKind::PageMap, pid),
        ImageKind::PageMap,
        &pm,
    )?;
    writer.write(&image_name(ImageKind::Files, pid), ImageKind::Files, &fds)?;
    Ok((pm.pages_file_size, pages_ms))
}
