//! `ckpt-agent restore`: recreate a process from an image directory.
//!
//! The agent forks a child with the dumped PID (clone3 with set_tid),
//! seizes it, and builds the process from outside: the child runs system
//! calls the agent injects (first from the agent's own text, then from a
//! scratch page), the agent writes pages into it with process_vm_writev in
//! parallel, and sets registers with ptrace. See docs/ARCHITECTURE.md for
//! why. Any failure kills the child: nothing half-alive is left behind.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckpt_proto::image::{FdTable, MmImage, PageMap, TaskCore};
use ckpt_proto::{read_image_file, ImageKind};
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tracing::{info, warn};

use crate::error::{Context, Error, Result};
use crate::images::{image_name, pages_name, read_inventory, verify};
use crate::inject::{self, Remote, Scratch};
use crate::progress::{Progress, Quiet};
use crate::{files, mm, pages, proc, sys, task};

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub images: PathBuf,
    pub detach: bool,
    pub pidfile: Option<PathBuf>,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub pid: i32,
    pub threads: usize,
    pub pages_bytes: u64,
    pub verify_ms: f64,
    pub pages_ms: f64,
    pub total_ms: f64,
}

const SCRATCH_LEN: u64 = 64 * 1024;
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

struct Images {
    core: TaskCore,
    mm: MmImage,
    pm: PageMap,
    fds: FdTable,
}

fn load(dir: &Path, pid: i32) -> Result<Images> {
    Ok(Images {
        core: read_image_file(&dir.join(image_name(ImageKind::Core, pid)), ImageKind::Core)?,
        mm: read_image_file(&dir.join(image_name(ImageKind::Mm, pid)), ImageKind::Mm)?,
        pm: read_image_file(
            &dir.join(image_name(ImageKind::PageMap, pid)),
            ImageKind::PageMap,
        )?,
        fds: read_image_file(
            &dir.join(image_name(ImageKind::Files, pid)),
            ImageKind::Files,
        )?,
    })
}

/// Kills a half-built process unless disarmed.
struct ChildGuard {
    pid: i32,
    armed: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.armed {
            // Threads we trace must be collected before the leader can be.
            let mut tids = proc::tids(self.pid).unwrap_or_default();
            tids.retain(|&t| t != self.pid);
            tids.push(self.pid);
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            for t in tids {
                loop {
                    match waitpid(Pid::from_raw(t), Some(nix::sys::wait::WaitPidFlag::__WALL)) {
                        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => break,
                        Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

/// Restores the checkpoint in `req.images`; with `detach` returns once it
/// runs, otherwise waits for it and returns its exit status too.
pub fn restore(req: &RestoreRequest) -> Result<(RestoreReport, Option<i32>)> {
    restore_with_progress(req, &Quiet)
}

/// Like `restore`, reporting the page copy to `progress`.
pub fn restore_with_progress(
    req: &RestoreRequest,
    progress: &dyn Progress,
) -> Result<(RestoreReport, Option<i32>)> {
    let t0 = Instant::now();
    let dir = &req.images;
    let inv = read_inventory(dir)?;
    verify(dir, &inv)?;
    let verify_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(node) = &inv.node {
        let here = crate::check::fingerprint()
            .map_err(|e| Error::Incompatible(format!("cannot fingerprint this node: {e}")))?;
        let why = crate::check::incompatibilities(node, &here);
        if !why.is_empty() {
            return Err(Error::Incompatible(why.join("; ")));
        }
    }
    if inv.pids.len() != 1 {
        return Err(Error::BadImages {
            dir: dir.clone(),
            reason: format!(
                "{} processes in the checkpoint; this agent restores one",
                inv.pids.len()
            ),
        });
    }
    let pid = inv.root_pid;
    let img = load(dir, pid)?;
    if Path::new(&format!("/proc/{pid}")).exists() {
        let comm = proc::stat(pid, None).map(|s| s.comm).unwrap_or_default();
        return Err(Error::Refused {
            pid,
            reason: format!(
                "this PID is in use (by '{comm}'); free it or restore in a new PID namespace"
            ),
        });
    }
    for th in &img.core.threads[1..] {
        if Path::new(&format!("/proc/{}", th.tid)).exists() {
            return Err(Error::Refused {
                pid,
                reason: format!("thread id {} is in use by another task", th.tid),
            });
        }
    }

    let child = match sys::clone::fork_with_pid(&[pid]) {
        Ok(Some(c)) => c,
        Ok(None) => child_wait_for_agent(),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Err(Error::Refused {
                pid,
                reason: "this PID was taken while restoring; nothing was left behind".into(),
            })
        }
        Err(e) => return Err(Error::sys(pid, "clone3 with set_tid", e)),
    };
    let mut guard = ChildGuard {
        pid: child,
        armed: true,
    };
    let pages_ms = build(&img, dir, child, req.detach, progress)?;
    if let Some(pf) = &req.pidfile {
        std::fs::write(pf, format!("{child}\n")).map_err(|e| Error::io(pf, e))?;
    }
    for th in &img.core.threads {
        ptrace::detach(Pid::from_raw(th.tid), None).ctx(th.tid, || "PTRACE_DETACH".into())?;
    }
    guard.armed = false;
    let report = RestoreReport {
        pid: child,
        threads: img.core.threads.len(),
        pages_bytes: img.pm.pages_file_size,
        verify_ms,
        pages_ms,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    info!(pid = child, total_ms = report.total_ms, "restored");
    if req.detach {
        return Ok((report, None));
    }
    let code = loop {
        match waitpid(Pid::from_raw(child), None) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::sys(child, "waitpid", e)),
        }
    };
    Ok((report, Some(code)))
}

/// Gives the agent a userfaultfd of the child, registered on its private
/// anonymous mappings that get pages, to fill them with UFFDIO_COPY. None
/// when the kernel offers no userfaultfd: process_vm_writev does it all.
fn attach_filler(
    pid: i32,
    mm: &MmImage,
    pm: &PageMap,
    main: &Remote,
) -> Result<Option<(pages::UffdFiller, u64)>> {
    let ranges = mm::anon_private_with_pages(mm, pm);
    if ranges.is_empty() {
        return Ok(None);
    }
    let fd = match main.syscall(libc::SYS_userfaultfd, &[libc::O_CLOEXEC as u64]) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(
                pid,
                "no userfaultfd, filling pages with process_vm_writev: {e}"
            );
            return Ok(None);
        }
    };
    let pidfd = sys::pidfd::pidfd_open(pid).ctx(pid, || "pidfd_open".into())?;
    use std::os::fd::AsFd;
    let ours = sys::pidfd::pidfd_getfd(pidfd.as_fd(), fd as i32)
        .ctx(pid, || "pidfd_getfd (userfaultfd)".into())?;
    let filler = pages::UffdFiller::new(pid, sys::uffd::Userfaultfd::from_fd(ours), ranges)?;
    Ok(Some((filler, fd)))
}

/// The forked child's side: wait to be seized; never runs agent code again.
fn child_wait_for_agent() -> ! {
    sys::clone::child_park()
}

fn build(
    img: &Images,
    dir: &Path,
    child: i32,
    detach: bool,
    progress: &dyn Progress,
) -> Result<f64> {
    let pid = child;
    let t = Pid::from_raw(child);
    ptrace::seize(t, inject::seize_options(true)).ctx(pid, || "PTRACE_SEIZE".into())?;
    ptrace::interrupt(t).ctx(pid, || "PTRACE_INTERRUPT".into())?;
    inject::wait_interrupt_stop(t)?;
    sys::ptrace::set_sigmask(t, !0).ctx(pid, || "PTRACE_SETSIGMASK".into())?;
    let boot = Remote::new(t, sys::gadget::syscall_gadget_addr())?;

    // The child inherited the agent's rseq registration: drop it before the
    // memory it points to goes away.
    let rs = sys::ptrace::get_rseq_config(t).ctx(pid, || "PTRACE_GET_RSEQ_CONFIGURATION".into())?;
    if rs.rseq_abi_size != 0 {
        const RSEQ_FLAG_UNREGISTER: u64 = 1;
        boot.syscall(
            libc::SYS_rseq,
            &[
                rs.rseq_abi_pointer,
                rs.rseq_abi_size as u64,
                RSEQ_FLAG_UNREGISTER,
                rs.signature as u64,
            ],
        )?;
    }

    // A scratch area free in both the child's current layout and the image's.
    let mut busy: Vec<(u64, u64)> = proc::maps(child)?
        .iter()
        .map(|m| (m.start, m.end))
        .collect();
    busy.extend(img.mm.vmas.iter().map(|v| (v.start, v.end)));
    let scratch_addr = mm::find_gap(&busy, SCRATCH_LEN).ok_or_else(|| Error::Refused {
        pid,
        reason: "no free address range for the restore scratch area".into(),
    })?;
    let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    boot.syscall(
        libc::SYS_mmap,
        &[scratch_addr, SCRATCH_LEN, rwx, flags, u64::MAX, 0],
    )?;
    inject::write_mem(pid, scratch_addr, &sys::gadget::SYSCALL_INSN)?;
    let main = Remote::new(t, scratch_addr)?;
    let mut scratch = Scratch::new(pid, scratch_addr + 4096, SCRATCH_LEN - 4096);

    main.syscall(libc::SYS_close_range, &[0, u32::MAX as u64, 0])?;
    mm::prepare_address_space(
        &img.mm,
        pid,
        &main,
        (scratch_addr, scratch_addr + SCRATCH_LEN),
    )?;
    mm::restore_fields(&img.mm, &main, &mut scratch)?;
    mm::restore_mappings(&img.mm, &main, &mut scratch)?;
    let tp = Instant::now();
    let filler = attach_filler(pid, &img.mm, &img.pm, &main)?;
    pages::restore(
        pid,
        &img.pm,
        &dir.join(pages_name(img.core.pid)),
        progress,
        filler.as_ref().map(|f| &f.0),
    )?;
    if let Some((f, remote_fd)) = filler {
        f.finish(pid)?;
        main.syscall(libc::SYS_close, &[remote_fd])?;
    }
    let pages_ms = tp.elapsed().as_secs_f64() * 1e3;
    mm::finish_mappings(&img.mm, &main)?;

    // Threads, with their TIDs.
    let mut remotes = vec![main];
    for th in &img.core.threads[1..] {
        scratch.reset();
        let tids = scratch.put(&th.tid.to_le_bytes())?;
        let args = sys::clone::encode_clone_args(CLONE_THREAD_FLAGS, 0, tids, 1);
        let ap = scratch.put(&args)?;
        let got = remotes[0].syscall(libc::SYS_clone3, &[ap, args.len() as u64])? as i32;
        if got != th.tid {
            return Err(Error::Refused {
                pid,
                reason: format!("thread {} was recreated as {got}", th.tid),
            });
        }
        inject::wait_interrupt_stop(Pid::from_raw(got))?;
        remotes.push(Remote::new(Pid::from_raw(got), scratch_addr)?);
    }
    for (th, r) in img.core.threads.iter().zip(&remotes) {
        task::restore_thread_inside(th, r, &mut scratch)?;
    }
    let main = &remotes[0];
    task::restore_process(&img.core, main, &mut scratch)?;
    files::restore(&img.fds, dir, main, &mut scratch)?;
    scratch.reset();
    let cwd = scratch.put_cstr(&img.core.cwd)?;
    main.syscall(libc::SYS_chdir, &[cwd])?;
    if img.core.root != "/" {
        let root = scratch.put_cstr(&img.core.root)?;
        main.syscall(libc::SYS_chroot, &[root])?;
    }
    // The parked child asked for SIGKILL on the agent's death; replace it.
    let pdeath = img.core.flags.as_ref().map_or(0, |f| f.pdeath_signal);
    if detach && pdeath != 0 {
        warn!(
            pid,
            "not restoring the parent-death signal: its parent, the restoring agent, exits now"
        );
        task::set_pdeath_signal(main, 0)?;
    } else {
        task::set_pdeath_signal(main, pdeath)?;
    }
    // A restored process keeps its own session and group when it led them.
    if img.core.sid == img.core.pid {
        main.syscall(libc::SYS_setsid, &[])?;
    } else if img.core.pgid == img.core.pid {
        main.syscall(libc::SYS_setpgid, &[0, 0])?;
    }
    task::restore_seccomp(&img.core, &remotes, &mut scratch)?;
    task::restore_creds(&img.core, main, &mut scratch)?;
    task::restore_pending(&img.core, &remotes, &mut scratch)?;
    main.syscall(libc::SYS_munmap, &[scratch_addr, SCRATCH_LEN])?;
    for th in &img.core.threads {
        task::restore_cpu(th)?;
    }
    Ok(pages_ms)
}
