//! The namespaces of a job: which ones are its own, PID translation between
//! the agent's view and the job's, UTS names, and the mounts the job added
//! to its mount namespace (tmpfs contents included).
//!
//! Only namespaces the tree's root does not share with the dumping agent are
//! recorded and recreated; a process living in the agent's namespace keeps
//! the namespace of the agent that restores it.
//!
//! Reading and writing inside a job's namespace runs on a short-lived thread
//! that entered it (`in_ns`): setns is per thread, so the rest of the agent
//! keeps its own view. Mounts are made by the job's root itself (injected
//! mount calls), because a procfs belongs to the PID namespace of whoever
//! mounts it.
//!
//! The network namespace's interfaces, addresses and routes are the `net`
//! module's; this one calls it at the right moments.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use ckpt_proto::image::{FdTable, IpcImage, Mount, NetImage, NsImage, TaskCore};
use ckpt_proto::ImageKind;
use nix::sched::CloneFlags;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::images::ImageWriter;
use crate::inject::{Remote, Scratch};
use crate::proc::{self, MountInfo};

/// Image file of the namespaces.
pub const NS_IMAGE: &str = "ns.img";
/// Image file of the IPC namespace's objects (when the job has its own).
pub const IPC_IMAGE: &str = "ipc.img";

/// The namespaces ckpt knows, as /proc/PID/ns names and clone flags.
const KINDS: [(&str, i32); 7] = [
    ("pid", libc::CLONE_NEWPID),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("mnt", libc::CLONE_NEWNS),
    ("net", libc::CLONE_NEWNET),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("time", libc::CLONE_NEWTIME),
];

/// Namespaces restore can recreate for a job.
const RESTORABLE: u64 = (libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET) as u64;

fn ns_inode(pid: &str, name: &str) -> Result<u64> {
    let p = format!("/proc/{pid}/ns/{name}");
    Ok(std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.ino())
}

/// The namespaces `pid` has apart from this agent's, as CLONE_NEW* flags.
pub fn own_namespaces(pid: i32) -> Result<u64> {
    let mut own = 0;
    for (name, flag) in KINDS {
        if ns_inode(&pid.to_string(), name)? != ns_inode("self", name)? {
            own |= flag as u64;
        }
    }
    Ok(own)
}

/// Where the agent finds a path as /proc shows it for process `pid`
/// (a descriptor's or cwd link): as is in the agent's own mount namespace
/// (also for a chrooted process: links read from the agent's root), through
/// the process's root when `own` (its namespaces, as `own_namespaces`
/// gives them) includes a mount namespace of its own.
pub fn reach(pid: i32, own: u64, path: &str) -> String {
    if own & libc::CLONE_NEWNS as u64 != 0 {
        format!("/proc/{pid}/root{path}")
    } else {
        path.to_string()
    }
}

/// Runs `f` on a thread that entered the `flags` namespaces of `pid`.
pub fn in_ns<T: Send>(pid: i32, flags: u64, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let files = KINDS
        .iter()
        .filter(|(_, fl)| flags & *fl as u64 != 0)
        .map(|(name, fl)| {
            let p = format!("/proc/{pid}/ns/{name}");
            File::open(&p)
                .map(|file| (file, *fl, *name))
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::NoProcess { pid },
                    _ => Error::io(&p, e),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            if flags & libc::CLONE_NEWNS as u64 != 0 {
                // A thread shares its root and cwd with the whole agent until
                // it unshares them; only then may it change mount namespace.
                nix::sched::unshare(CloneFlags::CLONE_FS)
                    .map_err(|e| Error::sys(pid, "unshare(CLONE_FS)", e))?;
            }
            for (file, fl, name) in &files {
                nix::sched::setns(file, CloneFlags::from_bits_retain(*fl))
                    .map_err(|e| Error::sys(pid, format!("entering its {name} namespace"), e))?;
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Refused {
                pid,
                reason: "a namespace worker thread panicked".into(),
            })
        })
    })
}

/// Translates PIDs as the agent sees them (host) into the job's (inner).
/// Empty (identity) when the tree shares the agent's PID namespace.
#[derive(Debug, Default, Clone)]
pub struct PidMap {
    inner: HashMap<i32, i32>,
}

/// The last field of a "NSpid:" line: the id in the innermost namespace.
fn innermost(status: &HashMap<String, String>, key: &str) -> Option<i32> {
    status.get(key)?.split_whitespace().last()?.parse().ok()
}

impl PidMap {
    /// Builds the map of every process and thread of `pids` (host PIDs).
    pub fn of_tree(pids: &[i32]) -> Result<Self> {
        let mut inner = HashMap::new();
        for &pid in pids {
            for tid in proc::tids(pid)? {
                let st = proc::parse_status(&proc::read(pid, &format!("task/{tid}/status"))?);
                let v = innermost(&st, "NSpid").ok_or_else(|| Error::Refused {
                    pid,
                    reason: format!("no NSpid in /proc/{pid}/task/{tid}/status"),
                })?;
                inner.insert(tid, v);
            }
        }
        Ok(PidMap { inner })
    }

    /// Adds one translation (a zombie's, which has no status to read).
    pub fn insert(&mut self, host: i32, inner: i32) {
        self.inner.insert(host, inner);
    }

    /// The inner id of `host`; identity for an empty map, 0 for a process
    /// outside the job (the root's parent).
    pub fn inner(&self, host: i32) -> i32 {
        if self.inner.is_empty() {
            host
        } else {
            self.inner.get(&host).copied().unwrap_or(0)
        }
    }

    /// Every PID of a process image, into the job's view.
    pub fn core(&self, c: &mut TaskCore) {
        c.pid = self.inner(c.pid);
        c.ppid = self.inner(c.ppid);
        c.pgid = self.inner(c.pgid);
        c.sid = self.inner(c.sid);
        if c.fd_table_of != 0 {
            c.fd_table_of = self.inner(c.fd_table_of);
        }
        for t in &mut c.threads {
            t.tid = self.inner(t.tid);
        }
        for t in &mut c.posix_timers {
            if t.notify_tid != 0 {
                t.notify_tid = self.inner(t.notify_tid);
            }
        }
    }

    /// Every PID of an fd table, into the job's view.
    pub fn fds(&self, t: &mut FdTable) {
        t.pid = self.inner(t.pid);
        if let Some(c) = t.ctty.as_mut() {
            if c.fg_pgrp > 0 {
                c.fg_pgrp = self.inner(c.fg_pgrp);
            }
        }
        for f in &mut t.files {
            if f.owner_pid != 0 {
                f.owner_pid = self.inner(f.owner_pid);
            }
            if let Some(c) = f.unix.as_mut().and_then(|u| u.peer_cred.as_mut()) {
                c.pid = self.inner(c.pid);
            }
        }
        if let Some(c) = &mut t.ctty {
            c.fg_pgrp = self.inner(c.fg_pgrp);
        }
    }

    /// host -> inner pairs, for the image.
    pub fn pairs(&self) -> HashMap<i32, i32> {
        self.inner.iter().map(|(h, i)| (*i, *h)).collect()
    }
}

/// What the namespaces part of a dump found.
pub struct NsDump {
    pub image: NsImage,
    pub pids: PidMap,
}

/// Checks the namespaces of the tree and records the job's own ones.
/// `members` are the tree's processes (host PIDs, root first), all stopped.
pub fn dump(members: &[i32], writer: &ImageWriter) -> Result<NsDump> {
    let root = members[0];
    let own = own_namespaces(root)?;
    for &pid in &members[1..] {
        // A zombie has no namespaces left to compare.
        if proc::stat(pid, None).is_ok_and(|s| s.state() == 'Z') {
            continue;
        }
        for (name, _) in KINDS {
            if ns_inode(&pid.to_string(), name)? != ns_inode(&root.to_string(), name)? {
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "it is in another {name} namespace than the tree's root {root}; not supported yet"
                    ),
                });
            }
        }
    }
    if own & libc::CLONE_NEWCGROUP as u64 != 0 {
        return Err(Error::Refused {
            pid: root,
            reason: "it has its own cgroup namespace: not restored yet".into(),
        });
    }
    let mut image = NsImage {
        own,
        ..Default::default()
    };
    let mut pids = PidMap::default();
    if own & libc::CLONE_NEWPID as u64 != 0 {
        let st = proc::status(root)?;
        let mine = proc::parse_status(&proc::read(std::process::id() as i32, "status")?);
        let depth = |s: &HashMap<String, String>| {
            s.get("NSpid").map_or(0, |v| v.split_whitespace().count())
        };
        if innermost(&st, "NSpid") != Some(1) || depth(&st) != depth(&mine) + 1 {
            return Err(Error::Refused {
                pid: root,
                reason: format!(
                    "it lives in a PID namespace it is not the init of (NSpid {}); dump that namespace's init, \
                     or a tree in the agent's own PID namespace",
                    st.get("NSpid").map_or("?", |s| s.as_str())
                ),
            });
        }
        pids = PidMap::of_tree(members)?;
    }
    if own & libc::CLONE_NEWTIME as u64 != 0 {
        let (mono, boot) =
            parse_timens_offsets(&proc::read(root, "timens_offsets")?).ok_or_else(|| {
                Error::Refused {
                    pid: root,
                    reason: format!("cannot parse /proc/{root}/timens_offsets"),
                }
            })?;
        image.monotonic_offset_ns = mono;
        image.boottime_offset_ns = boot;
    }
    if own & libc::CLONE_NEWUTS as u64 != 0 {
        let u = in_ns(root, libc::CLONE_NEWUTS as u64, || {
            Ok(nix::sys::utsname::uname())
        })?
        .map_err(|e| Error::sys(root, "uname in its UTS namespace", e))?;
        image.hostname = u.nodename().to_string_lossy().into_owned();
        image.domainname = u.domainname().to_string_lossy().into_owned();
    }
    if own & libc::CLONE_NEWNET as u64 != 0 {
        let net = crate::net::dump(root)?;
        image.net_link_kinds = crate::net::link_kinds(&net);
        writer.write(crate::net::NET_IMAGE, ImageKind::Net, &net)?;
    }
    if own & libc::CLONE_NEWIPC as u64 != 0 {
        let ipc = crate::ipc::dump(root, writer)?;
        writer.write(IPC_IMAGE, ImageKind::Ipc, &ipc)?;
    }
    if own & libc::CLONE_NEWNS as u64 != 0 {
        image.mounts = job_mounts(root)?;
        dump_contents(root, &mut image.mounts, writer)?;
    }
    if let Some(cg) = crate::cgroup::JobCgroup::of_pid(root)? {
        image.job = cg.job;
    }
    image.host_pids = pids.pairs();
    writer.write(NS_IMAGE, ImageKind::Ns, &image)?;
    Ok(NsDump { image, pids })
}

/// Parses /proc/PID/timens_offsets: (monotonic, boottime) in nanoseconds.
pub fn parse_timens_offsets(text: &str) -> Option<(i64, i64)> {
    let mut mono = None;
    let mut boot = None;
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [clock, secs, nsecs] = f[..] else {
            continue;
        };
        let v = secs.parse::<i64>().ok()? * 1_000_000_000 + nsecs.parse::<i64>().ok()?;
        match clock {
            "monotonic" | "1" => mono = Some(v),
            "boottime" | "7" => boot = Some(v),
            _ => {}
        }
    }
    Some((mono?, boot?))
}

/// The offsets of `img` as /proc/PID/timens_offsets takes them.
pub fn timens_offsets_text(img: &NsImage) -> String {
    format!(
        "monotonic {} {}\nboottime {} {}\n",
        img.monotonic_offset_ns.div_euclid(1_000_000_000),
        img.monotonic_offset_ns.rem_euclid(1_000_000_000),
        img.boottime_offset_ns.div_euclid(1_000_000_000),
        img.boottime_offset_ns.rem_euclid(1_000_000_000),
    )
}

/// The key a mount is matched by between two mount namespaces.
fn mount_key(m: &MountInfo) -> (&str, &str, &str, &str) {
    (&m.mount_point, &m.fstype, &m.source, &m.root)
}

/// Per-mount flags from mountinfo's per-mount options.
fn mount_flags(options: &str) -> u64 {
    options
        .split(',')
        .map(|o| match o {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "strictatime" => libc::MS_STRICTATIME,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

fn propagation(tags: &[String]) -> &'static str {
    if tags.iter().any(|t| t.starts_with("shared:")) {
        "shared"
    } else if tags.iter().any(|t| t.starts_with("master:")) {
        "slave"
    } else if tags.iter().any(|t| t == "unbindable") {
        "unbindable"
    } else {
        "private"
    }
}

/// Filesystems restore mounts afresh (their contents are the kernel's view
/// of the job's namespaces, or saved with the job, for tmpfs).
const FRESH: [&str; 5] = ["tmpfs", "proc", "mqueue", "sysfs", "devpts"];

/// The mounts of `job` (a mount table) that are not in `agent`'s: those the
/// job made. Mounts are matched as multisets, so a job's procfs stacked on
/// the node's /proc counts as the job's.
pub fn added_mounts(job: &[MountInfo], agent: &[MountInfo], pid: i32) -> Result<Vec<Mount>> {
    let mut left: Vec<&MountInfo> = agent.iter().collect();
    let mut out = Vec::new();
    for (i, m) in job.iter().enumerate() {
        if let Some(k) = left.iter().position(|a| mount_key(a) == mount_key(m)) {
            left.swap_remove(k);
            continue;
        }
        if m.fstype == "nsfs" {
            // A namespace handle (`ip netns`, a lab node's UTS file) the
            // job inherited from the node at its start and the node has
            // dropped since: bookkeeping of the node's, which nothing can
            // recreate (its namespace may be gone). Not the job's.
            debug!(pid, mount = %m.mount_point, "namespace handle mount left out");
            continue;
        }
        // A filesystem mounted earlier in the job's table (inherited or
        // not): this is a bind of some directory of it.
        let from = job[..i].iter().rev().find_map(|e| {
            let rest = m.root.strip_prefix(e.root.trim_end_matches('/'))?;
            (e.dev == m.dev && (rest.is_empty() || rest.starts_with('/'))).then(|| {
                format!("{}{}", e.mount_point.trim_end_matches('/'), rest).replace("//", "/")
            })
        });
        let bind_from = match from {
            Some(f) => f,
            None if FRESH.contains(&m.fstype.as_str()) && m.root == "/" => String::new(),
            None => {
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "its mount of {} ({} from {}) is not supported yet: only tmpfs, proc, mqueue, sysfs, devpts and bind mounts are",
                        m.mount_point, m.fstype, m.source
                    ),
                })
            }
        };
        out.push(Mount {
            mount_point: m.mount_point.clone(),
            fstype: m.fstype.clone(),
            source: m.source.clone(),
            super_options: m.super_options.clone(),
            flags: mount_flags(&m.options),
            propagation: propagation(&m.tags).into(),
            bind_from,
            contents: String::new(),
        });
    }
    Ok(out)
}

fn job_mounts(root: i32) -> Result<Vec<Mount>> {
    let job = proc::mountinfo(root)?;
    let agent = proc::mountinfo(std::process::id() as i32)?;
    added_mounts(&job, &agent, root)
}

/// Archives the contents of every fresh tmpfs of the job, walked from a
/// thread inside the job's mount namespace.
fn dump_contents(root: i32, mounts: &mut [Mount], writer: &ImageWriter) -> Result<()> {
    for i in 0..mounts.len() {
        let m = &mounts[i];
        if m.fstype != "tmpfs" || !m.bind_from.is_empty() {
            continue;
        }
        if mounts[i + 1..]
            .iter()
            .any(|o| o.mount_point == m.mount_point)
        {
            warn!(
                pid = root,
                "tmpfs on {} is covered by another mount: its contents are not saved",
                m.mount_point
            );
            continue;
        }
        let name = format!("mnt-{i}.tar");
        let path = writer.dir().join(&name);
        let out = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mp = PathBuf::from(&m.mount_point);
        // Mounts below this one are saved (or recreated) on their own.
        let below: Vec<PathBuf> = proc::mountinfo(root)?
            .into_iter()
            .map(|o| PathBuf::from(o.mount_point))
            .filter(|p| p != &mp && p.starts_with(&mp))
            .collect();
        let n = in_ns(root, libc::CLONE_NEWNS as u64, || {
            archive(&mp, &below, out, root)
        })?;
        debug!(pid = root, mount = %m.mount_point, entries = n, "tmpfs archived");
        writer.add_raw(&name)?;
        mounts[i].contents = name;
    }
    Ok(())
}

/// Writes a tar archive of the directory tree at `dir`: mount points in
/// `below` are kept as directories, not entered; sockets, which their
/// owners recreate, are skipped.
fn archive(dir: &Path, below: &[PathBuf], out: File, pid: i32) -> Result<usize> {
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, out));
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    let mut stack = vec![PathBuf::new()];
    let mut n = 0;
    while let Some(rel) = stack.pop() {
        let full = dir.join(&rel);
        let rd = std::fs::read_dir(&full).map_err(|e| Error::io(&full, e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(&full, e))?;
            let path = e.path();
            let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let name = rel.join(e.file_name());
            if md.file_type().is_socket() {
                debug!(pid, path = %path.display(), "socket file not archived");
                continue;
            }
            let mount_point = below.contains(&path);
            let ft = md.file_type();
            if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
                // The tar crate would name these by their full path.
                let mut h = tar::Header::new_gnu();
                h.set_metadata_in_mode(&md, tar::HeaderMode::Complete);
                h.set_entry_type(if ft.is_fifo() {
                    tar::EntryType::Fifo
                } else if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                let rdev = md.rdev();
                h.set_device_major(libc::major(rdev))
                    .and_then(|_| h.set_device_minor(libc::minor(rdev)))
                    .map_err(|e| Error::io(&path, e))?;
                h.set_size(0);
                tar.append_data(&mut h, &name, std::io::empty())
            } else {
                tar.append_path_with_name(&path, &name)
            }
            .map_err(|e| Error::io(&path, e))?;
            n += 1;
            if md.is_dir() && !mount_point {
                stack.push(name);
            }
        }
    }
    tar.into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(n)
}

/// Unpacks a tmpfs archive into `dir`, from a thread inside the job's
/// mount namespace. The tar crate unpacks files, directories and links;
/// FIFOs and device nodes are made here. Directory times are set last,
/// once nothing is written into them any more.
fn unarchive(archive: File, dir: &Path) -> Result<()> {
    use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let io = |e: std::io::Error| Error::io(dir, e);
    let mut a = tar::Archive::new(BufReader::with_capacity(1 << 20, archive));
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    let mut dirs = Vec::new();
    for e in a.entries().map_err(io)? {
        let mut e = e.map_err(io)?;
        let rel = e.path().map_err(io)?.into_owned();
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(Error::io(
                &rel,
                std::io::Error::other("path leaves the archive's root"),
            ));
        }
        let target = dir.join(&rel);
        let h = e.header();
        let mtime = TimeSpec::new(h.mtime().map_err(io)? as i64, 0);
        let kind = match h.entry_type() {
            tar::EntryType::Fifo => Some(SFlag::S_IFIFO),
            tar::EntryType::Char => Some(SFlag::S_IFCHR),
            tar::EntryType::Block => Some(SFlag::S_IFBLK),
            _ => None,
        };
        if let Some(kind) = kind {
            let mode = Mode::from_bits_truncate(h.mode().map_err(io)?);
            let dev = libc::makedev(
                h.device_major().map_err(io)?.unwrap_or(0),
                h.device_minor().map_err(io)?.unwrap_or(0),
            );
            let _ = std::fs::remove_file(&target);
            mknod(&target, kind, mode, dev).map_err(|e| Error::io(&target, e.into()))?;
            let (uid, gid) = (h.uid().map_err(io)?, h.gid().map_err(io)?);
            std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32))
                .map_err(|e| Error::io(&target, e))?;
            // mknod applied the umask.
            std::fs::set_permissions(
                &target,
                std::os::unix::fs::PermissionsExt::from_mode(mode.bits()),
            )
            .map_err(|e| Error::io(&target, e))?;
            utimensat(
                nix::fcntl::AT_FDCWD,
                &target,
                &mtime,
                &mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| Error::io(&target, e.into()))?;
            continue;
        }
        if h.entry_type() == tar::EntryType::Directory {
            dirs.push((target.clone(), mtime));
        }
        e.unpack_in(dir).map_err(|e| Error::io(&target, e))?;
    }
    for (d, t) in dirs.iter().rev() {
        utimensat(
            nix::fcntl::AT_FDCWD,
            d,
            t,
            t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::io(d, e.into()))?;
    }
    Ok(())
}

/// The `check` probes a node must pass to restore a checkpoint whose
/// namespaces are `img`.
pub fn needed_features(img: &NsImage) -> Vec<String> {
    let mut v: Vec<String> = ["clone3_set_tid", "prctl_mm_map", "ptrace_xstate"]
        .map(String::from)
        .to_vec();
    for (flag, probe) in [
        (libc::CLONE_NEWPID, "ns_pid"),
        (libc::CLONE_NEWIPC, "ns_ipc"),
        (libc::CLONE_NEWUTS, "ns_uts"),
        (libc::CLONE_NEWNS, "ns_mnt"),
        (libc::CLONE_NEWNET, "ns_net"),
        (libc::CLONE_NEWTIME, "ns_time"),
    ] {
        if img.own & flag as u64 != 0 {
            v.push(probe.into());
        }
    }
    if img.own & libc::CLONE_NEWIPC as u64 != 0 {
        v.push("sysv_ipc_ids".into());
    }
    if img.net_link_kinds.iter().any(|k| k == "veth") {
        v.push("veth".into());
    }
    v
}

/// The clone flags that create the job's own namespaces for its root.
pub fn clone_flags(img: &NsImage) -> u64 {
    img.own & RESTORABLE
}

/// Whether the tree had its own time namespace (its root is forked into a
/// new one with the same offsets).
pub fn own_time_ns(img: &NsImage) -> bool {
    img.own & libc::CLONE_NEWTIME as u64 != 0
}

/// Whether the job has its own PID namespace (its root is PID 1 in it).
pub fn own_pid_ns(img: &NsImage) -> bool {
    img.own & libc::CLONE_NEWPID as u64 != 0
}

fn mount_call(
    remote: &Remote,
    scratch: &mut Scratch,
    src: &str,
    target: &str,
    fstype: &str,
    flags: u64,
    data: &str,
) -> Result<()> {
    scratch.reset();
    let mut s = |v: &str| -> Result<u64> {
        if v.is_empty() {
            Ok(0)
        } else {
            scratch.put_cstr(v)
        }
    };
    let (a, b, c, d) = (s(src)?, s(target)?, s(fstype)?, s(data)?);
    remote.syscall(libc::SYS_mount, &[a, b, c, flags, d])?;
    Ok(())
}

/// Super options that are the mount's flags (passed as flags, not data).
fn fs_data(super_options: &str) -> String {
    super_options
        .split(',')
        .filter(|o| !matches!(*o, "rw" | "ro" | ""))
        .collect::<Vec<_>>()
        .join(",")
}

/// What `finish` completes once every process of the job is built.
pub struct Restored {
    ipc: Option<IpcImage>,
    /// The network lock of a job with its own network namespace, released
    /// once every process runs.
    pub lock: Option<crate::netlock::NetLock>,
    /// The job's veths, removed if the restore fails before `finish`.
    links: Option<crate::net::Links>,
}

/// A network lock to take in the job's new network namespace before any
/// of its addresses exist: its name and the connections it blocks.
pub struct LockRequest {
    pub name: String,
    pub conns: Vec<crate::netlock::Conn>,
}

/// Recreates the job's own namespaces' contents from inside its freshly
/// cloned root `remote` (host PID `host`): mounts with tmpfs contents, UTS
/// names, loopback and the other interfaces (`net` says how the veths are
/// made on this node), IPC objects. Runs before any other process of the
/// job exists (their memory maps the IPC segments).
pub fn restore_root(
    img: &NsImage,
    host: i32,
    remote: &Remote,
    scratch: &mut Scratch,
    dir: &Path,
    lock: Option<LockRequest>,
    net: &crate::net::LinkOptions,
) -> Result<Restored> {
    if img.own & libc::CLONE_NEWNS as u64 != 0 {
        let slave = libc::MS_REC | libc::MS_SLAVE;
        mount_call(remote, scratch, "", "/", "", slave, "")?;
        for m in &img.mounts {
            restore_mount(m, host, remote, scratch, dir)?;
        }
    }
    if img.own & libc::CLONE_NEWUTS as u64 != 0 {
        for (nr, name) in [
            (libc::SYS_sethostname, &img.hostname),
            (libc::SYS_setdomainname, &img.domainname),
        ] {
            scratch.reset();
            let p = scratch.put(name.as_bytes())?;
            remote.syscall(nr, &[p, name.len() as u64])?;
        }
    }
    let mut netlock = None;
    let mut links = None;
    if img.own & libc::CLONE_NEWNET as u64 != 0 {
        // Locked before the job's addresses exist: a peer's retransmission
        // must not meet a reset before the job's sockets are rebuilt.
        if let Some(l) = lock {
            netlock = Some(crate::netlock::NetLock::take(
                &l.name,
                crate::netlock::Netns::Of(host),
                l.conns,
            )?);
        }
        in_ns(host, libc::CLONE_NEWNET as u64, || {
            crate::sys::misc::loopback_up().map_err(|e| Error::sys(host, "bringing lo up", e))
        })?;
        // Checkpoints from before net.img knew only loopback.
        let path = dir.join(crate::net::NET_IMAGE);
        if path.exists() {
            let n: NetImage = ckpt_proto::read_image_file(&path, ImageKind::Net)?;
            // Veth pairs made, the job's ends down and without addresses.
            let made = crate::net::create_links(host, &n, net)?;
            // The network lock (taken above) is in force before the
            // first packet can reach the job or leave it: `configure` adds
            // addresses, brings links up, adds routes and announces the
            // addresses.
            crate::net::configure(host, &n, &made)?;
            links = Some(made);
        }
    }
    let mut ipc = None;
    if img.own & libc::CLONE_NEWIPC as u64 != 0 {
        let i: IpcImage = ckpt_proto::read_image_file(&dir.join(IPC_IMAGE), ImageKind::Ipc)?;
        crate::ipc::restore(host, &i, dir)?;
        ipc = Some(i);
    }
    Ok(Restored {
        ipc,
        lock: netlock,
        links,
    })
}

/// The last namespace step, once every process is built: IPC segments
/// removed while attached are removed again; the veths stay from now on
/// (they go with the job's namespace).
pub fn finish(r: &Restored, host: i32) -> Result<()> {
    if let Some(i) = &r.ipc {
        crate::ipc::finish_restore(host, i)?;
    }
    if let Some(l) = &r.links {
        l.keep();
    }
    Ok(())
}

fn restore_mount(
    m: &Mount,
    host: i32,
    remote: &Remote,
    scratch: &mut Scratch,
    dir: &Path,
) -> Result<()> {
    let mp = m.mount_point.as_str();
    let ctx = |e: Error| Error::Refused {
        pid: host,
        reason: format!("recreating its mount of {} on {mp}: {e}", m.fstype),
    };
    if m.bind_from.is_empty() {
        mount_call(
            remote,
            scratch,
            &m.source,
            mp,
            &m.fstype,
            m.flags,
            &fs_data(&m.super_options),
        )
        .map_err(ctx)?;
    } else {
        let bind = libc::MS_BIND;
        mount_call(remote, scratch, &m.bind_from, mp, "", bind, "").map_err(ctx)?;
        let remount = (libc::MS_REMOUNT | libc::MS_BIND) | m.flags;
        mount_call(remote, scratch, "", mp, "", remount, "").map_err(ctx)?;
    }
    let prop = match m.propagation.as_str() {
        "shared" => libc::MS_SHARED,
        "slave" => libc::MS_SLAVE,
        "unbindable" => libc::MS_UNBINDABLE,
        _ => libc::MS_PRIVATE,
    };
    mount_call(remote, scratch, "", mp, "", prop, "").map_err(ctx)?;
    if !m.contents.is_empty() {
        let path = dir.join(&m.contents);
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let target = PathBuf::from(mp);
        in_ns(host, libc::CLONE_NEWNS as u64, || unarchive(f, &target)).map_err(ctx)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mi(line: &str) -> MountInfo {
        proc::parse_mountinfo(line).remove(0)
    }

    #[test]
    fn stale_namespace_handles_are_not_the_jobs() {
        let agent = vec![mi("1 0 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw")];
        let job = vec![
            mi("10 9 8:1 / / rw,relatime master:1 - ext4 /dev/sda1 rw"),
            mi("11 10 0:4 net:[4026532] /run/netns/gone rw - nsfs nsfs rw"),
        ];
        assert!(added_mounts(&job, &agent, 1).unwrap().is_empty());
    }

    #[test]
    fn added_mounts_are_the_jobs_own() {
        let agent = vec![
            mi("1 0 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"),
            mi("2 1 0:5 / /proc rw,nosuid shared:2 - proc proc rw"),
            mi("3 1 0:6 / /dev/shm rw shared:3 - tmpfs tmpfs rw"),
        ];
        let job = vec![
            mi("10 9 8:1 / / rw,relatime master:1 - ext4 /dev/sda1 rw"),
            mi("11 10 0:5 / /proc rw,nosuid master:2 - proc proc rw"),
            mi("12 10 0:6 / /dev/shm rw master:3 - tmpfs tmpfs rw"),
            mi("13 11 0:40 / /proc rw,nosuid,nodev,noexec - proc proc rw"),
            mi("14 10 0:41 / /tmp rw,nosuid,nodev shared:7 - tmpfs tmpfs rw,mode=1777"),
            mi("15 12 0:42 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw,mode=1777"),
            mi("16 14 0:41 /data /mnt/data ro,relatime shared:7 - tmpfs tmpfs rw,mode=1777"),
            mi("17 10 8:1 /home/u /mnt/home rw master:1 - ext4 /dev/sda1 rw"),
        ];
        let m = added_mounts(&job, &agent, 1).unwrap();
        let points: Vec<&str> = m.iter().map(|m| m.mount_point.as_str()).collect();
        assert_eq!(
            points,
            ["/proc", "/tmp", "/dev/shm", "/mnt/data", "/mnt/home"]
        );
        assert_eq!(
            m[0].flags,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC
        );
        assert_eq!(m[1].propagation, "shared");
        assert_eq!(m[1].bind_from, "");
        assert_eq!(m[3].bind_from, "/tmp/data");
        assert_eq!(m[3].flags & libc::MS_RDONLY, libc::MS_RDONLY);
        assert_eq!(m[4].bind_from, "/home/u");
        assert_eq!(m[4].propagation, "slave");
        assert_eq!(fs_data(&m[1].super_options), "mode=1777");
    }

    #[test]
    fn unknown_filesystems_are_refused() {
        let agent = vec![mi("1 0 8:1 / / rw - ext4 /dev/sda1 rw")];
        let job = vec![
            mi("10 9 8:1 / / rw - ext4 /dev/sda1 rw"),
            mi("11 10 8:2 / /scratch rw - xfs /dev/sdb1 rw"),
        ];
        let e = added_mounts(&job, &agent, 7).unwrap_err().to_string();
        assert!(e.contains("/scratch") && e.contains("xfs"), "{e}");
    }

    #[test]
    fn timens_offsets_parse() {
        let t = "monotonic        1000         5\nboottime           -2 999999999\n";
        assert_eq!(
            parse_timens_offsets(t),
            Some((1_000_000_000_005, -1_000_000_001))
        );
        assert_eq!(parse_timens_offsets("monotonic 1 0\n"), None);
    }

    #[test]
    fn pid_map_translates_images() {
        let mut m = PidMap::default();
        m.insert(5000, 1);
        m.insert(5001, 2);
        m.insert(5002, 3);
        let mut c = TaskCore {
            pid: 5001,
            ppid: 5000,
            pgid: 5000,
            sid: 5000,
            threads: vec![
                ckpt_proto::image::ThreadCore {
                    tid: 5001,
                    ..Default::default()
                },
                ckpt_proto::image::ThreadCore {
                    tid: 5002,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        m.core(&mut c);
        assert_eq!((c.pid, c.ppid, c.pgid, c.sid), (2, 1, 1, 1));
        assert_eq!(c.threads[1].tid, 3);
        // The root's parent is outside the job.
        assert_eq!(m.inner(4999), 0);
        assert_eq!(PidMap::default().inner(4999), 4999);
    }
}
