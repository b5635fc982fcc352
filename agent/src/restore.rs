//! `ckpt-agent restore`: recreate a process from an image directory.
//!
//! The agent forks a child with the dumped PID (clone3 with set_tid),
//! seizes it, and builds the process from outside: the child runs system
//! calls the agent injects (first from the agent's own text, then from a
//! scratch page), the agent writes pages into it with process_vm_writev in
//! parallel, and sets registers with ptrace. See docs/ARCHITECTURE.md for
//! why. Any failure kills the child: nothing half-alive is left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ckpt_proto::image::{FdTable, MmImage, NsImage, PageMap, TaskCore};
use ckpt_proto::{read_image_file, ImageKind};
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tracing::{info, warn};

use crate::cgroup::{Freezer, JobCgroup};
use crate::error::{Context, Error, Result};
use crate::images::{image_name, read_inventory};
use crate::inject::{self, Remote, Scratch};
use crate::progress::{Progress, Quiet};
use crate::{files, mm, ns, pages, proc, sys, task};

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub images: PathBuf,
    pub detach: bool,
    pub pidfile: Option<PathBuf>,
    /// Reconnect unix sockets that were connected outside the checkpoint.
    pub ext_unix_sk: bool,
    /// The cgroup name of a restored job (default: the dumped job's).
    pub job: Option<String>,
    /// Reopen the dumping shell's terminals on the agent's own (stdin) and
    /// restore the tree into the agent's session.
    pub shell_job: bool,
    /// Rebuild established TCP connections (else a checkpoint holding
    /// some is refused).
    pub tcp_established: bool,
    /// Put the node's ends of the job's veths on this bridge instead of
    /// the recorded one.
    pub bridge: Option<String>,
    /// Leave the restored job frozen and its TCP connections blocked (the
    /// lock kept), for a coordinator to release all parts of a job at once
    /// (`JobCgroup::thaw`, `netlock::recover`). Needs a job.
    pub hold: bool,
    /// Let the tree run before its private memory is in: the agent serves
    /// its page faults from the images and copies the rest meanwhile, and
    /// returns once every page is in.
    pub lazy_pages: bool,
    /// The cluster key, to fetch pages held by another node's agent (a
    /// post-copy migration's final level, see `held`).
    pub key: Option<ckpt_proto::rpc::Key>,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub pid: i32,
    /// The job's cgroup name, when it is a job.
    pub job: Option<String>,
    /// With `hold`: the name of the network lock kept until the release
    /// (for `netlock::recover`), if it has TCP endpoints.
    pub held_lock: Option<String>,
    pub threads: usize,
    pub pages_bytes: u64,
    pub verify_ms: f64,
    pub pages_ms: f64,
    pub total_ms: f64,
    /// With `lazy_pages`: what the page server did (`total_ms` is then
    /// until the tree ran).
    pub lazy: Option<crate::lazy::LazyReport>,
}

const SCRATCH_LEN: u64 = 64 * 1024;
/// Where the batch loop sits in the scratch area's first page (the syscall
/// gadget is at its start).
const BATCH_AT: u64 = 64;
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

struct Images {
    core: TaskCore,
    mm: MmImage,
    /// The process's page indexes along the checkpoint's chain of
    /// increments, the newest first.
    pages: Vec<pages::Level>,
    fds: FdTable,
}

fn load_core(dir: &Path, pid: i32) -> Result<TaskCore> {
    Ok(read_image_file(
        &dir.join(image_name(ImageKind::Core, pid)),
        ImageKind::Core,
    )?)
}

/// Reads the images of a live process; `chain` is the checkpoint's
/// directory followed by those of its parents.
fn load(chain: &[PathBuf], core: TaskCore, mapped: &crate::images::Mapped) -> Result<Images> {
    let pid = core.pid;
    let dir = &chain[0];
    Ok(Images {
        core,
        mm: read_image_file(&dir.join(image_name(ImageKind::Mm, pid)), ImageKind::Mm)?,
        pages: crate::images::page_chain(chain, pid, mapped)?,
        fds: read_image_file(
            &dir.join(image_name(ImageKind::Files, pid)),
            ImageKind::Files,
        )?,
    })
}

/// Takes, in this agent's network namespace, the lock a restore of the
/// checkpoint in `dir` takes, and keeps it for that restore: for when the
/// tree's addresses must come to this node before it is restored (a
/// retransmission reaching the address before its socket exists would get
/// a reset). Returns the lock's table, None when the checkpoint has no TCP
/// socket.
pub fn lock_ahead(dir: &Path) -> Result<Option<String>> {
    let inv = read_inventory(dir)?;
    // All of it: a lock taken for a checkpoint that cannot be restored
    // would stay.
    crate::images::verify(dir, &inv)?;
    let ns_img: Option<NsImage> = if dir.join(ns::NS_IMAGE).exists() {
        Some(read_image_file(&dir.join(ns::NS_IMAGE), ImageKind::Ns)?)
    } else {
        None
    };
    if ns_img
        .as_ref()
        .is_some_and(|n| n.own & libc::CLONE_NEWNET as u64 != 0)
    {
        return Err(Error::BadImages {
            dir: dir.to_path_buf(),
            reason: "the job has its own network namespace: its restore locks it before \
                     its addresses exist, there is nothing to lock ahead"
                .into(),
        });
    }
    let mut tables = Vec::new();
    for &pid in &inv.pids {
        if load_core(dir, pid)?.state != "Z" {
            let t: FdTable = read_image_file(
                &dir.join(image_name(ImageKind::Files, pid)),
                ImageKind::Files,
            )?;
            tables.push(t);
        }
    }
    let conns = crate::inet::lock_conns(&tables.iter().collect::<Vec<_>>());
    if conns.is_empty() {
        return Ok(None);
    }
    let name = crate::dump::lock_name(ns_img.as_ref().map_or("", |n| n.job.as_str()), inv.root_pid);
    let lock = crate::netlock::NetLock::take(&name, crate::netlock::Netns::Agent, conns)?;
    let table = lock.table().to_string();
    lock.keep()?;
    Ok(Some(table))
}

/// Kills every half-built process unless disarmed, children first.
struct TreeGuard {
    /// Host PIDs, in creation order.
    pids: Vec<i32>,
    /// Every PID and TID of the checkpoint (the job's view) to the task the
    /// agent sees; identity unless the job has its own PID namespace.
    host: HashMap<i32, i32>,
    armed: bool,
}

impl TreeGuard {
    fn host(&self, id: i32) -> i32 {
        self.host.get(&id).copied().unwrap_or(id)
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut tids = Vec::new();
        for &pid in self.pids.iter().rev() {
            tids.extend(proc::tids(pid).unwrap_or_default());
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        crate::seize::collect_killed(tids);
    }
}

/// Removes a job cgroup made for a restore that failed.
struct CgroupGuard {
    cg: JobCgroup,
    armed: bool,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.cg.remove();
        }
    }
}

/// Room for injected-call arguments in a blank process (a fork of the
/// agent that has not been rebuilt yet): well below its stack pointer.
fn blank_scratch(pid: i32) -> Result<Scratch> {
    let rsp = inject::get_regs(Pid::from_raw(pid))?.rsp;
    Ok(Scratch::new(pid, (rsp - 0x10000) & !0xfff, 0x1000))
}

/// What a job's own network namespace is restored with.
struct JobNet<'a> {
    /// The network lock to take in it before its addresses exist.
    lock: Option<ns::LockRequest>,
    /// Put the node ends of its veths on this bridge.
    bridge: Option<&'a str>,
}

/// Creates every process of the checkpoint, parents first, as a blank
/// copy of the agent forked by its own parent (clone3 with set_tid,
/// injected into the parent), stopped and traced; then recreates sessions
/// and process groups, in an order that makes setsid and setpgid legal.
fn skeleton(
    pids: &[i32],
    cores: &HashMap<i32, TaskCore>,
    guard: &mut TreeGuard,
    job: Option<(&NsImage, Option<&JobCgroup>)>,
    dir: &Path,
    root_own_session: bool,
    jobnet: JobNet<'_>,
) -> Result<Option<ns::Restored>> {
    let JobNet { lock, bridge } = jobnet;
    let gadget = sys::gadget::syscall_gadget_addr();
    let root = pids[0];
    let flags = job.map_or(0, |(img, _)| ns::clone_flags(img));
    let own_pid = job.is_some_and(|(img, _)| ns::own_pid_ns(img));
    let cgroup = job.and_then(|(_, cg)| cg);
    let cgfd = match cgroup {
        Some(cg) if cg.freezer == Freezer::V2 => Some(cg.open()?),
        _ => None,
    };
    use std::os::fd::AsFd;
    // The root of a job with its own PID namespace is that namespace's
    // first process, PID 1 by construction.
    let set_tid: &[i32] = if own_pid { &[] } else { &[root] };
    let forked = match job {
        Some((img, _)) if ns::own_time_ns(img) => sys::clone::fork_into_time_ns(
            ns::timens_offsets_text(img).as_bytes(),
            flags,
            cgfd.as_ref().map(|f| f.as_fd()),
            set_tid,
        )
        .map_err(|e| Error::sys(root, "clone3 into a new time namespace", e)),
        _ => sys::clone::fork_into(flags, cgfd.as_ref().map(|f| f.as_fd()), set_tid).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EEXIST) => Error::Refused {
                    pid: root,
                    reason: "this PID was taken while restoring; nothing was left behind".into(),
                },
                _ => Error::sys(root, "clone3 with set_tid", e),
            }
        }),
    };
    let child = match forked {
        Ok(Some(c)) => c,
        Ok(None) => child_wait_for_agent(),
        Err(e) => return Err(e),
    };
    guard.pids.push(child);
    guard.host.insert(root, child);
    if let Some(cg) = cgroup.filter(|cg| cg.freezer == Freezer::V1) {
        let procs = cg.dir.join("cgroup.procs");
        std::fs::write(&procs, child.to_string()).map_err(|e| Error::io(&procs, e))?;
    }
    let t = Pid::from_raw(child);
    ptrace::seize(t, inject::seize_options(true)).ctx(child, || "PTRACE_SEIZE".into())?;
    ptrace::interrupt(t).ctx(child, || "PTRACE_INTERRUPT".into())?;
    inject::wait_interrupt_stop(t)?;
    sys::ptrace::set_sigmask(t, !0).ctx(child, || "PTRACE_SETSIGMASK".into())?;
    let mut restored = None;
    if let Some((img, _)) = job {
        // Mounts, names, interfaces and IPC objects exist before any other
        // process does.
        let remote = Remote::new(t, gadget)?;
        let net = crate::net::LinkOptions {
            job: cgroup.map_or_else(|| format!("pid-{child}"), |cg| cg.job.clone()),
            bridge: bridge.map(String::from),
            hint: "--bridge NAME",
        };
        restored = Some(ns::restore_root(
            img,
            child,
            &remote,
            &mut blank_scratch(child)?,
            dir,
            lock,
            &net,
        )?);
    }
    let setsid = |host: i32, pid: i32| -> Result<()> {
        if cores[&pid].sid == pid {
            Remote::new(Pid::from_raw(host), gadget)?.syscall(libc::SYS_setsid, &[])?;
        }
        Ok(())
    };
    // A session leader's children must be born in its session (a
    // --shell-job root stays in the agent's, with the agent's terminal).
    if root_own_session {
        setsid(child, root)?;
    }
    for &pid in &pids[1..] {
        let parent = cores[&pid].ppid;
        if !guard.host.contains_key(&parent) {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "its parent {parent} is not part of the checkpoint (re-parented orphans are not supported yet)"
                ),
            });
        }
        let parent = guard.host(parent);
        let remote = Remote::new(Pid::from_raw(parent), gadget)?;
        let mut scratch = blank_scratch(parent)?;
        let tids = scratch.put(&pid.to_le_bytes())?;
        // A process sharing its parent's fd table is born sharing it.
        let flags = if cores[&pid].fd_table_of != 0 {
            libc::CLONE_FILES as u64
        } else {
            0
        };
        let args = sys::clone::encode_clone_args(flags, libc::SIGCHLD as u64, tids, 1);
        let ap = scratch.put(&args)?;
        let got = match remote.syscall(libc::SYS_clone3, &[ap, args.len() as u64]) {
            Ok(p) => p as i32,
            Err(Error::Remote {
                errno: nix::errno::Errno::EEXIST,
                ..
            }) => {
                return Err(Error::Refused {
                    pid,
                    reason: "this PID was taken while restoring; nothing was left behind".into(),
                })
            }
            Err(e) => return Err(e),
        };
        let host = remote.take_child().unwrap_or(got);
        guard.pids.push(host);
        guard.host.insert(pid, host);
        if got != pid {
            return Err(Error::Refused {
                pid,
                reason: format!("was recreated as {got}"),
            });
        }
        let t = Pid::from_raw(host);
        inject::wait_interrupt_stop(t)?;
        sys::ptrace::set_sigmask(t, !0).ctx(host, || "PTRACE_SETSIGMASK".into())?;
        setsid(host, pid)?;
    }
    // Group leaders first, then their members; groups led from outside the
    // checkpoint stay as inherited.
    for leaders in [true, false] {
        for &pid in pids {
            let c = &cores[&pid];
            let lead = c.pgid == pid;
            // A session leader leads its group already, unless it stays
            // in the agent's session (--shell-job root).
            let made_by_setsid = c.sid == pid && (pid != root || root_own_session);
            if lead != leaders || made_by_setsid || !pids.contains(&c.pgid) {
                continue;
            }
            Remote::new(Pid::from_raw(guard.host(pid)), gadget)?
                .syscall(libc::SYS_setpgid, &[0, c.pgid as u64])?;
        }
    }
    Ok(restored)
}

/// Makes a blank process exit with a zombie's saved wait status, and
/// collects it as its tracer, leaving it a zombie for its parent to reap.
fn make_zombie(core: &TaskCore, pid: i32) -> Result<()> {
    let t = Pid::from_raw(pid);
    let status = core.exit_code;
    let sig = status & 0x7f;
    if sig == 0 {
        let mut r = inject::get_regs(t)?;
        r.rax = libc::SYS_exit_group as u64;
        r.orig_rax = u64::MAX;
        r.rdi = ((status >> 8) & 0xff) as u64;
        r.rip = sys::gadget::syscall_gadget_addr();
        inject::set_regs(t, r)?;
        ptrace::cont(t, None).ctx(pid, || "PTRACE_CONT".into())?;
    } else {
        // Default action for the signal, delivered as the task resumes.
        let mut sa = blank_scratch(pid)?;
        let dfl = sa.put(&[0u8; 32])?;
        Remote::new(t, sys::gadget::syscall_gadget_addr())?
            .syscall(libc::SYS_rt_sigaction, &[sig as u64, dfl, 0, 8])?;
        ptrace::cont(
            t,
            Some(Signal::try_from(sig).map_err(|e| Error::sys(pid, "signal number", e))?),
        )
        .ctx(pid, || "PTRACE_CONT".into())?;
    }
    loop {
        match waitpid(t, Some(nix::sys::wait::WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(()),
            Ok(WaitStatus::Stopped(_, s)) => {
                ptrace::cont(t, Some(s)).ctx(pid, || "PTRACE_CONT".into())?;
            }
            Ok(_) => {
                ptrace::cont(t, None).ctx(pid, || "PTRACE_CONT".into())?;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::sys(pid, "waitpid", e)),
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
    restore_notify(req, progress, &|_| {})
}

/// Like `restore_with_progress`, calling `running` with the report as soon
/// as the tree runs (or is held): with `lazy_pages`, before its memory is
/// all in.
pub fn restore_notify(
    req: &RestoreRequest,
    progress: &dyn Progress,
    running: &dyn Fn(&RestoreReport),
) -> Result<(RestoreReport, Option<i32>)> {
    let t0 = Instant::now();
    let dir = &req.images;
    // What an agent that died here left is undone first.
    crate::netlock::recover(None)?;
    let inv = read_inventory(dir)?;
    if inv.pre_dump {
        return Err(Error::BadImages {
            dir: dir.clone(),
            reason: "it is a pre-dump, which holds memory only: restore the dump made with --parent on it".into(),
        });
    }
    // A lazy restore checks each block of page content as it first
    // reads it: checking gigabytes first would delay the start by as long.
    let content_now = !req.lazy_pages;
    if content_now {
        crate::held::fetch_chain(dir, req.key.as_ref())?;
    }
    let mut mapped = crate::images::Mapped::default();
    crate::images::verify_into(dir, &inv, content_now, &mut mapped)?;
    let chain = crate::images::chain_with(dir, &inv, content_now, &mut mapped)?;
    // Pages held elsewhere come in as the tree reads them.
    let held = match content_now {
        true => Default::default(),
        false => crate::held::fetch_lazily(&chain, req.key.as_ref(), &mut mapped)?,
    };
    let verify_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(node) = &inv.node {
        let here = crate::check::fingerprint()
            .map_err(|e| Error::Incompatible(format!("cannot fingerprint this node: {e}")))?;
        let why = crate::check::incompatibilities(node, &here);
        if !why.is_empty() {
            return Err(Error::Incompatible(why.join("; ")));
        }
    }
    if inv.pids.first() != Some(&inv.root_pid) {
        return Err(Error::BadImages {
            dir: dir.clone(),
            reason: "the inventory does not list its root process first".into(),
        });
    }
    let mut cores = HashMap::new();
    for &pid in &inv.pids {
        cores.insert(pid, load_core(dir, pid)?);
    }
    let mut live = Vec::new();
    for &pid in &inv.pids {
        let core = cores[&pid].clone();
        if core.state != "Z" {
            live.push(load(&chain, core, &mapped)?);
        }
    }
    // What no process reads from (levels the chain's newer ones cover) is
    // unmapped now.
    drop(mapped);
    let ns_img: Option<NsImage> = if dir.join(ns::NS_IMAGE).exists() {
        Some(read_image_file(&dir.join(ns::NS_IMAGE), ImageKind::Ns)?)
    } else {
        None
    };
    let tables: Vec<&FdTable> = live.iter().map(|i| &i.fds).collect();
    crate::tty::check_restore(&tables, req.shell_job)?;
    if !req.tcp_established {
        let conn = tables.iter().find_map(|t| {
            t.files
                .iter()
                .filter_map(|f| f.inet.as_ref())
                .find(|s| s.tcp.is_some())
                .map(|s| (t.pid, crate::inet::describe(s)))
        });
        if let Some((pid, what)) = conn {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "the checkpoint holds the established TCP connection {what}: restore with --tcp-established"
                ),
            });
        }
    }
    let own_session = !live
        .iter()
        .find(|i| i.core.pid == inv.root_pid)
        .is_some_and(|i| crate::tty::root_joins_agent_session(&i.fds, req.shell_job));
    let own_pid = ns_img.as_ref().is_some_and(ns::own_pid_ns);
    // In a new PID namespace every id is free by construction.
    for &pid in inv.pids.iter().filter(|_| !own_pid) {
        let tids = std::iter::once(pid).chain(cores[&pid].threads.iter().skip(1).map(|t| t.tid));
        for tid in tids {
            if Path::new(&format!("/proc/{tid}")).exists() {
                let comm = proc::stat(tid, None).map(|s| s.comm).unwrap_or_default();
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "id {tid} is in use (by '{comm}'); free it or restore in a new PID namespace"
                    ),
                });
            }
        }
    }

    if let Some(img) = &ns_img {
        let net = crate::net::LinkOptions {
            bridge: req.bridge.clone(),
            hint: "--bridge NAME",
            ..Default::default()
        };
        crate::net::check_restore(img, dir, &net)?;
    }

    // The job's cgroup (dropped after the tree guard: removed on failure
    // once the half-built tasks are gone).
    let job_id = req
        .job
        .clone()
        .or_else(|| ns_img.as_ref().map(|n| n.job.clone()))
        .filter(|j| !j.is_empty());
    if req.hold && job_id.is_none() {
        return Err(Error::Refused {
            pid: inv.root_pid,
            reason: "only a job (started with `ckpt-agent run`, or restored with --job) can be \
                     held frozen after its restore: it is its cgroup that holds it"
                .into(),
        });
    }
    let cgroup = job_id
        .as_deref()
        .map(JobCgroup::create)
        .transpose()?
        .map(|cg| CgroupGuard { cg, armed: true });
    let mut guard = TreeGuard {
        pids: Vec::new(),
        host: HashMap::new(),
        armed: true,
    };
    let job = ns_img
        .as_ref()
        .map(|img| (img, cgroup.as_ref().map(|g| &g.cg)));
    // The checkpoint's TCP endpoints stay blocked until every process runs:
    // in the job's new network namespace (taken there, before its
    // addresses exist) or in this agent's.
    let conns = crate::inet::lock_conns(&tables);
    let lock_name =
        crate::dump::lock_name(ns_img.as_ref().map_or("", |n| n.job.as_str()), inv.root_pid);
    let lock_job = lock_name.clone();
    let own_net = ns_img
        .as_ref()
        .is_some_and(|n| n.own & libc::CLONE_NEWNET as u64 != 0);
    let mut agent_lock = None;
    let mut job_lock = None;
    if !conns.is_empty() {
        if own_net {
            job_lock = Some(ns::LockRequest {
                name: lock_name,
                conns,
            });
        } else {
            agent_lock = Some(crate::netlock::NetLock::take(
                &lock_name,
                crate::netlock::Netns::Agent,
                conns,
            )?);
        }
    }
    let mut restored = skeleton(
        &inv.pids,
        &cores,
        &mut guard,
        job,
        dir,
        own_session,
        JobNet {
            lock: job_lock,
            bridge: req.bridge.as_deref(),
        },
    )?;
    let root = inv.root_pid;
    let mut shared = files::Shared::new(&tables);
    shared.shell_job = req.shell_job;
    shared.hosts = guard.host.clone();
    let mut pages_ms = 0.0;
    let mut lazies = req.lazy_pages.then(crate::lazy::Server::start);
    let fill = Fill {
        progress,
        lazy: lazies.as_ref(),
    };
    for img in &live {
        let is_root = img.core.pid == root;
        pages_ms += build(img, dir, req, is_root, &mut shared, &mut guard, &fill)?;
    }
    for &pid in &inv.pids {
        if cores[&pid].state == "Z" {
            make_zombie(&cores[&pid], guard.host(pid))?;
        }
    }
    if let Some(root_img) = live.iter().find(|i| i.core.pid == root) {
        let c = &root_img.core;
        let pgrp = (c.pgid == c.pid).then(|| guard.host(root));
        crate::tty::finish(&shared.ptys, &root_img.fds, pgrp, req.shell_job)?;
    }
    let child = guard.host(root);
    if let Some(r) = &restored {
        ns::finish(r, child)?;
    }
    if let Some(pf) = &req.pidfile {
        std::fs::write(pf, format!("{child}\n")).map_err(|e| Error::io(pf, e))?;
    }
    // A held job is frozen before ptrace lets go (cgroup v2 counts traced
    // tasks as frozen): not one instruction runs before the release. The
    // v1 freezer cannot take over traced tasks, so there the tasks are
    // frozen right after; their TCP traffic is blocked either way.
    let hold = cgroup.as_ref().filter(|_| req.hold).map(|g| &g.cg);
    if let Some(cg) = hold.filter(|cg| cg.freezer == Freezer::V2) {
        cg.hold()?;
    }
    // A page server that failed while the tree was built has nothing
    // more to give it: the restore fails before anything runs.
    if let Some(server) = lazies.as_mut() {
        server.check()?;
    }
    // Everything is built: let every process go at once.
    for img in &live {
        for th in &img.core.threads {
            let tid = guard.host(th.tid);
            ptrace::detach(Pid::from_raw(tid), None).ctx(tid, || "PTRACE_DETACH".into())?;
        }
    }
    if let Some(cg) = hold.filter(|cg| cg.freezer == Freezer::V1) {
        cg.hold()?;
    }
    guard.armed = false;
    // Every socket is rebuilt and every process runs: traffic may flow.
    let lock = agent_lock.or_else(|| restored.as_mut().and_then(|r| r.lock.take()));
    let mut held_lock = None;
    if let Some(l) = lock {
        if req.hold {
            held_lock = Some(lock_job);
            l.keep()?;
        } else {
            l.release()?;
        }
    }
    let cgroup = cgroup.map(|mut g| {
        g.armed = false;
        g.cg.clone()
    });
    let mut report = RestoreReport {
        pid: child,
        job: cgroup.as_ref().map(|cg| cg.job.clone()),
        held_lock,
        threads: live.iter().map(|i| i.core.threads.len()).sum(),
        pages_bytes: live
            .iter()
            .map(|i| pages::content_bytes(&i.pages[0].pm))
            .sum(),
        verify_ms,
        pages_ms,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        lazy: None,
    };
    info!(pid = child, total_ms = report.total_ms, "restored");
    running(&report);
    // Once the tree runs (the saving competes with the build): the holds
    // of the pages read from other nodes go once the levels are whole here.
    let settling = held.settle(req.key.clone());
    if let Some(server) = lazies {
        // On an error the server has killed the tree (its missing pages
        // would read as zeros).
        report.lazy = Some(server.finish()?);
    }
    if let Some(t) = settling {
        let _ = t.join();
    }
    if req.detach {
        return Ok((report, None));
    }
    let code = crate::job::wait_exit(child)?;
    if let Some(cg) = cgroup {
        cg.remove();
    }
    Ok((report, Some(code)))
}

/// Gives the agent a userfaultfd of the child, registered on its private
/// anonymous mappings that get pages, to fill them with UFFDIO_COPY (with
/// `features`: the events a lazy restore must hear of). None when the
/// kernel offers no userfaultfd: process_vm_writev does it all.
fn attach_filler(
    pid: i32,
    mm: &MmImage,
    pm: &PageMap,
    main: &Remote,
    features: u64,
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
    let filler =
        pages::UffdFiller::new(pid, sys::uffd::Userfaultfd::from_fd(ours), ranges, features)?;
    Ok(Some((filler, fd)))
}

/// The forked child's side: wait to be seized; never runs agent code again.
fn child_wait_for_agent() -> ! {
    sys::clone::child_park()
}

/// How a restore fills memory: progress shown, and with a lazy restore's
/// page server, which takes the private anonymous memory.
struct Fill<'a> {
    progress: &'a dyn Progress,
    lazy: Option<&'a crate::lazy::Server>,
}

/// Rebuilds one blank, stopped process from its images.
fn build(
    img: &Images,
    dir: &Path,
    req: &RestoreRequest,
    is_root: bool,
    shared: &mut files::Shared,
    guard: &mut TreeGuard,
    fill: &Fill<'_>,
) -> Result<f64> {
    let (progress, lazies) = (fill.progress, fill.lazy);
    // Everything the agent does to the process uses its own view of the
    // PIDs; injected calls use the job's (the images').
    let pid = guard.host(img.core.pid);
    let t = Pid::from_raw(pid);
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
    let mut busy: Vec<(u64, u64)> = proc::maps(pid)?.iter().map(|m| (m.start, m.end)).collect();
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
    inject::write_mem(pid, scratch_addr + BATCH_AT, &sys::gadget::BATCH_LOOP)?;
    let main = Remote::new(t, scratch_addr)?.with_batch_loop(scratch_addr + BATCH_AT);
    let mut scratch = Scratch::new(pid, scratch_addr + 4096, SCRATCH_LEN - 4096);

    // A process sharing another's fd table gets it from that one's build.
    let own_fds = img.core.fd_table_of == 0;
    if own_fds {
        main.syscall(libc::SYS_close_range, &[0, u32::MAX as u64, 0])?;
    }
    mm::prepare_address_space(
        &img.mm,
        pid,
        &main,
        (scratch_addr, scratch_addr + SCRATCH_LEN),
        &mut scratch,
    )?;
    mm::restore_fields(&img.mm, &main, &mut scratch)?;
    mm::restore_mappings(&img.mm, &main, &mut scratch, &mut shared.shm, dir)?;
    let tp = Instant::now();
    let features = match req.lazy_pages {
        true => crate::lazy::FEATURES,
        false => 0,
    };
    let filler = attach_filler(pid, &img.mm, &img.pages[0].pm, &main, features)?;
    let lazy = lazies.is_some() && filler.is_some();
    pages::restore(
        pid,
        &img.pages,
        progress,
        filler.as_ref().map(|f| &f.0),
        lazy,
        !req.lazy_pages,
    )?;
    if let Some((f, remote_fd)) = filler {
        if lazy {
            let (uffd, ranges) = f.into_parts();
            lazies.expect("lazy").add(crate::lazy::LazyProcess {
                pid,
                uffd,
                ranges,
                wipe_on_fork: img
                    .mm
                    .vmas
                    .iter()
                    .filter(|v| v.madv & mm::madv::WIPEONFORK != 0)
                    .map(|v| (v.start, v.end))
                    .collect(),
                source: pages::Source::open(img.pages.clone())?,
            });
        } else {
            f.finish(pid)?;
        }
        main.syscall(libc::SYS_close, &[remote_fd])?;
    }
    let pages_ms = tp.elapsed().as_secs_f64() * 1e3;
    mm::finish_mappings(&img.mm, &main, &mut scratch)?;

    // Threads, with their TIDs.
    let mut remotes = vec![main];
    for th in &img.core.threads[1..] {
        scratch.reset();
        let tids = scratch.put(&th.tid.to_le_bytes())?;
        let args = sys::clone::encode_clone_args(CLONE_THREAD_FLAGS, 0, tids, 1);
        let ap = scratch.put(&args)?;
        let got = remotes[0].syscall(libc::SYS_clone3, &[ap, args.len() as u64])? as i32;
        let host = remotes[0].take_child().unwrap_or(got);
        guard.host.insert(th.tid, host);
        if got != th.tid {
            return Err(Error::Refused {
                pid,
                reason: format!("thread {} was recreated as {got}", th.tid),
            });
        }
        inject::wait_interrupt_stop(Pid::from_raw(host))?;
        remotes.push(Remote::new(Pid::from_raw(host), scratch_addr)?);
    }
    for (th, r) in img.core.threads.iter().zip(&remotes) {
        task::restore_thread_inside(th, r, &mut scratch)?;
    }
    let main = &remotes[0];
    task::restore_process(&img.core, main, &mut scratch)?;
    if own_fds {
        files::restore(&img.fds, dir, main, &mut scratch, shared, req.ext_unix_sk)?;
    }
    scratch.reset();
    let cwd = scratch.put_cstr(&img.core.cwd)?;
    main.syscall(libc::SYS_chdir, &[cwd])?;
    if img.core.root != "/" {
        let root = scratch.put_cstr(&img.core.root)?;
        main.syscall(libc::SYS_chroot, &[root])?;
    }
    // The parked child asked for SIGKILL on the agent's death; replace it.
    let pdeath = img.core.flags.as_ref().map_or(0, |f| f.pdeath_signal);
    if is_root && req.detach && pdeath != 0 {
        warn!(
            pid,
            "not restoring the parent-death signal: its parent, the restoring agent, exits now"
        );
        task::set_pdeath_signal(main, 0)?;
    } else {
        task::set_pdeath_signal(main, pdeath)?;
    }
    task::restore_seccomp(&img.core, &remotes, &mut scratch)?;
    task::restore_creds(&img.core, main, &mut scratch)?;
    task::restore_pending(&img.core, &remotes, &mut scratch)?;
    main.syscall(libc::SYS_munmap, &[scratch_addr, SCRATCH_LEN])?;
    for th in &img.core.threads {
        task::restore_cpu(th, guard.host(th.tid))?;
    }
    Ok(pages_ms)
}
