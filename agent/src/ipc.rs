//! The contents of a job's IPC namespace (`IpcImage`, ipc.proto): SysV
//! shared memory segments (their contents in one raw file each), semaphore
//! sets and message queues with the same ids, keys, owners and modes; POSIX
//! message queues with their messages; and the namespace's IPC limits.
//!
//! The work runs on a dedicated thread that enters the target's IPC
//! namespace with setns (an IPC namespace is per thread), so every IPC
//! syscall, /proc/sysvipc and /proc/sys/{kernel,fs/mqueue} there see that
//! namespace while the rest of the agent is unaffected.
//!
//! Not covered: SEM_UNDO adjustments (they belong to processes, not to the
//! sets), per-object times and last pids, hugetlb segments (restored as
//! ordinary shared memory), mq_notify registrations (refused) and a full
//! POSIX queue (refused: draining it would let a blocked sender in).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use ckpt_proto::image::{
    ByteRun, IpcImage, IpcPerm, IpcSysctl, MsgQueue, PosixMsg, PosixQueue, SemSet, ShmSegment,
    SysvMsg,
};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::error::{Context, Error, Result};
use crate::sys::ipc as sys;

/// Granularity of zero-skipping in shared memory contents.
const PAGE: usize = 4096;

/// The IPC limits of a namespace, under /proc/sys. A fresh namespace starts
/// with the defaults, which may be too small for the objects restored.
const SYSCTLS: [&str; 13] = [
    "kernel/msgmax",
    "kernel/msgmnb",
    "kernel/msgmni",
    "kernel/sem",
    "kernel/shmall",
    "kernel/shmmax",
    "kernel/shmmni",
    RMID_FORCED,
    "fs/mqueue/msg_default",
    "fs/mqueue/msg_max",
    "fs/mqueue/msgsize_default",
    "fs/mqueue/msgsize_max",
    "fs/mqueue/queues_max",
];

/// Set, it destroys unattached segments whose creator is gone: restored
/// last, by `finish_restore`, once the tasks have re-attached theirs.
const RMID_FORCED: &str = "kernel/shm_rmid_forced";

/// Dumps every SysV object (shm, sem, msg) and POSIX message queue of the
/// IPC namespace that `pid` lives in. Segment contents go to raw files
/// `ipc-PID-shm-ID.img` registered with `writer`. The namespace's users
/// must be frozen: POSIX queues are drained and refilled.
pub fn dump(pid: i32, writer: &crate::images::ImageWriter) -> Result<IpcImage> {
    in_namespace(pid, || {
        let img = IpcImage {
            sysctls: dump_sysctls(pid)?,
            shm: dump_shm(pid, writer)?,
            sem: dump_sem(pid)?,
            msg: dump_msg(pid)?,
            mqueues: dump_mqueues(pid)?,
        };
        tracing::debug!(
            pid,
            shm = img.shm.len(),
            sem = img.sem.len(),
            msg = img.msg.len(),
            mqueues = img.mqueues.len(),
            "dumped the IPC namespace"
        );
        Ok(img)
    })
}

/// Recreates the objects of `img` in the IPC namespace that `pid` lives in
/// (freshly created, empty): same ids, keys, modes, owners (creators
/// included) and contents. Raw files are read from `dir`.
///
/// Segments that were removed while attached come back alive, and
/// kernel.shm_rmid_forced is not set yet: call `finish_restore` once the
/// restored tasks have attached their segments again.
pub fn restore(pid: i32, img: &IpcImage, dir: &Path) -> Result<()> {
    in_namespace(pid, || {
        restore_sysctls(pid, &img.sysctls, false)?;
        for s in &img.shm {
            restore_shm(pid, s, dir)?;
        }
        for s in &img.sem {
            restore_sem(pid, s)?;
        }
        for q in &img.msg {
            restore_msg(pid, q)?;
        }
        for q in &img.mqueues {
            restore_mqueue(pid, q)?;
        }
        tracing::debug!(pid, "restored the IPC namespace");
        Ok(())
    })
}

/// The last step of an IPC restore, once the restored tasks have attached
/// their segments again: removes (IPC_RMID) the segments that were removed
/// while attached at dump time, and sets kernel.shm_rmid_forced.
///
/// The restored segments' creator is the restoring thread, gone by now:
/// with shm_rmid_forced set, the kernel destroys those nobody attached.
pub fn finish_restore(pid: i32, img: &IpcImage) -> Result<()> {
    in_namespace(pid, || {
        for s in img.shm.iter().filter(|s| s.removed) {
            let p = perm_of(pid, s.perm.as_ref(), "shm")?;
            sys::shm_ctl(p.id, libc::IPC_RMID)
                .ctx(pid, || format!("{}: IPC_RMID", describe("shm", p)))?;
        }
        restore_sysctls(pid, &img.sysctls, true)
    })
}

/// Runs `work` on a new thread inside the IPC namespace of `pid`.
fn in_namespace<T: Send>(pid: i32, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    crate::ns::in_ns(pid, libc::CLONE_NEWIPC as u64, work)
}

// ---- /proc parsing ----

/// One object of /proc/sysvipc/{shm,sem,msg}.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysvEntry {
    pub key: i32,
    pub id: i32,
    /// The perms column: permission bits and, for shm, SHM_DEST/SHM_LOCKED.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    /// shm: size in bytes; sem: number of semaphores; msg: bytes queued.
    pub size: u64,
    /// shm: attachments; msg: messages queued; sem: 0.
    pub count: u64,
}

/// Parses a /proc/sysvipc file, finding the columns by the header's names.
pub fn parse_sysvipc(text: &str) -> std::result::Result<Vec<SysvEntry>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or("empty file")?
        .split_whitespace()
        .collect();
    let col = |names: &[&str]| {
        header
            .iter()
            .position(|h| names.contains(h))
            .ok_or_else(|| format!("no {} column in the header", names.join("/")))
    };
    let c_key = col(&["key"])?;
    let c_id = col(&["shmid", "semid", "msqid"])?;
    let c_perms = col(&["perms"])?;
    let c_size = col(&["size", "nsems", "cbytes"])?;
    let c_count = col(&["nattch", "qnum"]).ok();
    let c_ids = [
        col(&["uid"])?,
        col(&["gid"])?,
        col(&["cuid"])?,
        col(&["cgid"])?,
    ];
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let get = |i: usize| {
            f.get(i)
                .copied()
                .ok_or_else(|| format!("short line {line:?}"))
        };
        let num = |i: usize| -> std::result::Result<u64, String> {
            let s = get(i)?;
            s.parse()
                .map_err(|_| format!("bad number {s:?} in {line:?}"))
        };
        let int = |i: usize| -> std::result::Result<i32, String> {
            let s = get(i)?;
            s.parse()
                .map_err(|_| format!("bad number {s:?} in {line:?}"))
        };
        let perms = get(c_perms)?;
        let mode = u32::from_str_radix(perms, 8)
            .map_err(|_| format!("bad perms {perms:?} in {line:?}"))?;
        let id32 = |i: usize| num(i).map(|v| v as u32);
        out.push(SysvEntry {
            key: int(c_key)?,
            id: int(c_id)?,
            mode,
            uid: id32(c_ids[0])?,
            gid: id32(c_ids[1])?,
            cuid: id32(c_ids[2])?,
            cgid: id32(c_ids[3])?,
            size: num(c_size)?,
            count: match c_count {
                Some(c) => num(c)?,
                None => 0,
            },
        });
    }
    Ok(out)
}

/// What the file of a POSIX queue in an mqueue mount says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqStatus {
    /// Bytes queued.
    pub qsize: u64,
    /// Process registered with mq_notify (0: none).
    pub notify_pid: i32,
}

/// Parses "QSIZE:5 NOTIFY:0 SIGNO:0 NOTIFY_PID:0".
pub fn parse_mq_status(text: &str) -> Option<MqStatus> {
    let mut st = MqStatus::default();
    let (mut qsize, mut pid) = (false, false);
    for tok in text.split_whitespace() {
        let (k, v) = tok.split_once(':')?;
        match k {
            "QSIZE" => {
                st.qsize = v.parse().ok()?;
                qsize = true;
            }
            "NOTIFY_PID" => {
                st.notify_pid = v.parse().ok()?;
                pid = true;
            }
            _ => {}
        }
    }
    (qsize && pid).then_some(st)
}

/// The byte ranges of `data` holding a non-zero byte, in `page` steps,
/// neighbours merged.
pub fn nonzero_runs(data: &[u8], page: usize) -> Vec<ByteRun> {
    let mut runs: Vec<ByteRun> = Vec::new();
    for (i, chunk) in data.chunks(page).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let offset = (i * page) as u64;
        match runs.last_mut() {
            Some(r) if r.offset + r.len == offset => r.len += chunk.len() as u64,
            _ => runs.push(ByteRun {
                offset,
                len: chunk.len() as u64,
            }),
        }
    }
    runs
}

fn read_sysvipc(pid: i32, kind: &str) -> Result<Vec<SysvEntry>> {
    let path = format!("/proc/sysvipc/{kind}");
    let text = std::fs::read_to_string(&path)
        .ctx(pid, || format!("listing its SysV {kind} objects ({path})"))?;
    parse_sysvipc(&text).map_err(|reason| Error::Refused {
        pid,
        reason: format!("{path}: {reason}"),
    })
}

fn read_sysctl(pid: i32, name: &str) -> Result<String> {
    let path = format!("/proc/sys/{name}");
    let text = std::fs::read_to_string(&path)
        .ctx(pid, || format!("reading {name} of its IPC namespace"))?;
    Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn write_sysctl(pid: i32, name: &str, value: &str) -> Result<()> {
    std::fs::write(format!("/proc/sys/{name}"), value).ctx(pid, || {
        format!("setting {name} to {value} in its IPC namespace")
    })
}

fn describe(kind: &str, p: &IpcPerm) -> String {
    format!("SysV {kind} id {} key {:#x}", p.id, p.key as u32)
}

fn perm_of<'a>(pid: i32, p: Option<&'a IpcPerm>, kind: &str) -> Result<&'a IpcPerm> {
    p.ok_or_else(|| Error::Refused {
        pid,
        reason: format!("a SysV {kind} object of the IPC image has no perm"),
    })
}

fn image_perm(e: &SysvEntry) -> IpcPerm {
    IpcPerm {
        key: e.key,
        id: e.id,
        mode: e.mode & 0o777,
        uid: e.uid,
        gid: e.gid,
        cuid: e.cuid,
        cgid: e.cgid,
    }
}

fn sys_perm(p: &IpcPerm) -> sys::Perm {
    sys::Perm {
        key: p.key,
        uid: p.uid,
        gid: p.gid,
        cuid: p.cuid,
        cgid: p.cgid,
        mode: p.mode,
    }
}

// ---- dump ----

fn dump_sysctls(pid: i32) -> Result<Vec<IpcSysctl>> {
    SYSCTLS
        .iter()
        .map(|name| {
            Ok(IpcSysctl {
                name: name.to_string(),
                value: read_sysctl(pid, name)?,
            })
        })
        .collect()
}

/// Reading a segment through an attachment allocates the pages it never
/// touched (shmem has no shared zero page); those are then left out of the
/// image like every other zero page.
fn dump_shm(pid: i32, writer: &crate::images::ImageWriter) -> Result<Vec<ShmSegment>> {
    let mut out = Vec::new();
    for e in read_sysvipc(pid, "shm")? {
        let perm = image_perm(&e);
        let what = describe("shm", &perm);
        let name = format!("ipc-{pid}-shm-{}.img", e.id);
        let path = writer.dir().join(&name);
        let written = (|| -> Result<Vec<ByteRun>> {
            let att = sys::ShmAttach::new(e.id, false)
                .ctx(pid, || format!("{what}: attaching it to read it"))?;
            let bytes = att.bytes();
            let runs = nonzero_runs(bytes, PAGE);
            let f = File::create(&path).map_err(|err| Error::io(&path, err))?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            for r in &runs {
                let s = r.offset as usize;
                w.write_all(&bytes[s..s + r.len as usize])
                    .map_err(|err| Error::io(&path, err))?;
            }
            let f = w
                .into_inner()
                .map_err(|err| Error::io(&path, err.into_error()))?;
            f.sync_data().map_err(|err| Error::io(&path, err))?;
            Ok(runs)
        })();
        let runs = match written {
            Ok(r) => r,
            Err(err) => {
                let _ = std::fs::remove_file(&path);
                return Err(err);
            }
        };
        writer.add_raw(&name)?;
        tracing::debug!(
            pid,
            id = e.id,
            size = e.size,
            runs = runs.len(),
            "dumped {what}"
        );
        out.push(ShmSegment {
            perm: Some(perm),
            size: e.size,
            removed: e.mode & sys::SHM_DEST != 0,
            locked: e.mode & sys::SHM_LOCKED != 0,
            contents: name,
            runs,
        });
    }
    Ok(out)
}

fn dump_sem(pid: i32) -> Result<Vec<SemSet>> {
    read_sysvipc(pid, "sem")?
        .iter()
        .map(|e| {
            let perm = image_perm(e);
            let values =
                sys::sem_getall(e.id).ctx(pid, || format!("{}: GETALL", describe("sem", &perm)))?;
            Ok(SemSet {
                perm: Some(perm),
                values: values.into_iter().map(u32::from).collect(),
            })
        })
        .collect()
}

fn dump_msg(pid: i32) -> Result<Vec<MsgQueue>> {
    let msgmax: usize = read_sysctl(pid, "kernel/msgmax")?
        .parse()
        .map_err(|_| Error::Refused {
            pid,
            reason: "kernel/msgmax of its IPC namespace is not a number".into(),
        })?;
    let mut out = Vec::new();
    for e in read_sysvipc(pid, "msg")? {
        let perm = image_perm(&e);
        let what = describe("msg", &perm);
        let st = sys::msg_stat(e.id).ctx(pid, || format!("{what}: IPC_STAT"))?;
        let mut messages = Vec::new();
        while let Some((mtype, text)) =
            sys::msg_copy(e.id, messages.len() as u64, msgmax).ctx(pid, || {
                format!(
                    "{what}: copying message {} (msgrcv MSG_COPY, needs CONFIG_CHECKPOINT_RESTORE)",
                    messages.len()
                )
            })?
        {
            messages.push(SysvMsg { mtype, text });
        }
        if messages.len() as u64 != st.qnum {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "{what}: copied {} messages but the queue holds {}: is the job running?",
                    messages.len(),
                    st.qnum
                ),
            });
        }
        out.push(MsgQueue {
            perm: Some(perm),
            qbytes: st.qbytes,
            messages,
        });
    }
    Ok(out)
}

fn dump_mqueues(pid: i32) -> Result<Vec<PosixQueue>> {
    // A mount of our own, detached: the job need not have mounted mqueue,
    // and a mount it has could belong to another IPC namespace.
    let mnt = sys::mqueue_mount().ctx(pid, || {
        "mounting the mqueue filesystem of its IPC namespace (fsopen)".into()
    })?;
    let mut dir = nix::dir::Dir::openat(
        mnt.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ctx(pid, || "listing its POSIX message queues".into())?;
    let mut names = Vec::new();
    for ent in dir.iter() {
        let ent = ent.ctx(pid, || "listing its POSIX message queues".into())?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        tracing::debug!(pid, "no POSIX message queues");
    }
    names
        .iter()
        .map(|name| dump_mqueue(pid, mnt.as_fd(), name))
        .collect()
}

fn dump_mqueue(pid: i32, mnt: std::os::fd::BorrowedFd<'_>, name: &str) -> Result<PosixQueue> {
    let what = format!("POSIX message queue /{name}");
    let refuse = |reason: String| Error::Refused {
        pid,
        reason: format!("{what}: {reason}"),
    };
    let st = nix::sys::stat::fstatat(mnt, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .ctx(pid, || format!("{what}: stat"))?;
    let mut status = String::new();
    nix::fcntl::openat(mnt, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(std::io::Error::from)
        .and_then(|fd| File::from(fd).read_to_string(&mut status))
        .ctx(pid, || format!("{what}: reading its status"))?;
    let status =
        parse_mq_status(&status).ok_or_else(|| refuse(format!("unexpected status {status:?}")))?;
    if status.notify_pid != 0 {
        return Err(refuse(format!(
            "pid {} registered for a notification (mq_notify), which cannot be restored yet",
            status.notify_pid
        )));
    }
    let fd = sys::mq_open(
        name,
        libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        None,
    )
    .ctx(pid, || format!("{what}: mq_open"))?;
    let (maxmsg, msgsize, cur) =
        sys::mq_getattr(fd.as_fd()).ctx(pid, || format!("{what}: mq_getattr"))?;
    if cur > 0 && cur >= maxmsg {
        return Err(refuse(format!(
            "full ({cur} messages): reading it would let a blocked sender in; not supported yet"
        )));
    }
    // Take every message, then put them all back in the same order, which
    // leaves the queue as it was (the job is frozen).
    let mut messages = Vec::new();
    let mut buf = vec![0u8; msgsize.max(1) as usize];
    let taken = loop {
        match sys::mq_receive(fd.as_fd(), &mut buf) {
            Ok(Some((n, prio))) => messages.push(PosixMsg {
                prio,
                data: buf[..n].to_vec(),
            }),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    for (i, m) in messages.iter().enumerate() {
        sys::mq_send(fd.as_fd(), &m.data, m.prio).ctx(pid, || {
            format!(
                "{what}: putting message {i} back (of {}; the rest are lost)",
                messages.len()
            )
        })?;
    }
    taken.ctx(pid, || format!("{what}: mq_timedreceive"))?;
    if messages.len() as i64 != cur {
        return Err(refuse(format!(
            "read {} messages but it holds {cur}: is the job running?",
            messages.len()
        )));
    }
    Ok(PosixQueue {
        name: name.to_string(),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        maxmsg,
        msgsize,
        messages,
    })
}

// ---- restore ----

fn restore_sysctls(pid: i32, sysctls: &[IpcSysctl], rmid_forced: bool) -> Result<()> {
    for s in sysctls {
        if (s.name == RMID_FORCED) != rmid_forced {
            continue;
        }
        if !SYSCTLS.contains(&s.name.as_str()) {
            return Err(Error::Refused {
                pid,
                reason: format!("the IPC image sets {}, which is not an IPC limit", s.name),
            });
        }
        if read_sysctl(pid, &s.name)? != s.value {
            write_sysctl(pid, &s.name, &s.value)?;
        }
    }
    Ok(())
}

/// Runs `create` with the thread's effective uid/gid set to the creator of
/// `p`, so that the object gets the same cuid/cgid.
fn create_as<T>(
    pid: i32,
    p: &IpcPerm,
    what: &str,
    create: impl FnOnce() -> std::io::Result<T>,
) -> Result<T> {
    let (euid, egid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let switch = p.cuid != euid || p.cgid != egid;
    if switch {
        sys::thread_set_egid(p.cgid)
            .ctx(pid, || format!("{what}: taking creator gid {}", p.cgid))?;
        if let Err(e) = sys::thread_set_euid(p.cuid) {
            let _ = sys::thread_set_egid(egid);
            return Err(Error::sys(
                pid,
                format!("{what}: taking creator uid {}", p.cuid),
                e,
            ));
        }
    }
    let r = create();
    if switch {
        sys::thread_set_euid(euid).ctx(pid, || format!("{what}: taking back uid {euid}"))?;
        sys::thread_set_egid(egid).ctx(pid, || format!("{what}: taking back gid {egid}"))?;
    }
    r.ctx(pid, || format!("{what}: creating it"))
}

/// Makes the next object of `kind` created in this namespace get `id`.
fn set_next_id(pid: i32, kind: &str, id: i32) -> Result<()> {
    write_sysctl(pid, &format!("kernel/{kind}_next_id"), &id.to_string())
}

/// Checks the kernel gave the id asked for; removes the object if not.
fn check_id(
    pid: i32,
    what: &str,
    want: i32,
    got: i32,
    remove: impl FnOnce(i32) -> std::io::Result<()>,
) -> Result<()> {
    if want == got {
        return Ok(());
    }
    let _ = remove(got);
    Err(Error::Refused {
        pid,
        reason: format!("{what}: created with id {got} instead (is the IPC namespace fresh?)"),
    })
}

fn restore_shm(pid: i32, s: &ShmSegment, dir: &Path) -> Result<()> {
    let p = perm_of(pid, s.perm.as_ref(), "shm")?;
    let what = describe("shm", p);
    set_next_id(pid, "shm", p.id)?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
    let id = create_as(pid, p, &what, || sys::shm_get(p.key, s.size, flags))?;
    check_id(pid, &what, p.id, id, |id| sys::shm_ctl(id, libc::IPC_RMID))?;
    let result = (|| {
        fill_shm(pid, &what, id, s, dir)?;
        sys::shm_set(id, &sys_perm(p)).ctx(pid, || format!("{what}: IPC_SET"))?;
        if s.locked {
            sys::shm_ctl(id, libc::SHM_LOCK).ctx(pid, || format!("{what}: SHM_LOCK"))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = sys::shm_ctl(id, libc::IPC_RMID);
    }
    result
}

fn fill_shm(pid: i32, what: &str, id: i32, s: &ShmSegment, dir: &Path) -> Result<()> {
    let bad = |reason: String| Error::BadImages {
        dir: dir.to_owned(),
        reason: format!("{}: {what}: {reason}", s.contents),
    };
    // A file of the checkpoint directory, nothing else.
    if s.contents.is_empty() || s.contents.contains('/') || s.contents.starts_with('.') {
        return Err(bad("not a file name of the checkpoint".into()));
    }
    let path = dir.join(&s.contents);
    let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let flen = f.metadata().map_err(|e| Error::io(&path, e))?.len();
    let total: u64 = s.runs.iter().map(|r| r.len).sum();
    if flen != total {
        return Err(bad(format!("{flen} bytes, but its runs add up to {total}")));
    }
    let mut att = sys::ShmAttach::new(id, true).ctx(pid, || format!("{what}: attaching it"))?;
    let mem = att
        .bytes_mut()
        .ctx(pid, || format!("{what}: writing its contents"))?;
    for r in &s.runs {
        let range = usize::try_from(r.offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(usize::try_from(r.len).ok()?)?))
            .filter(|range| range.end <= mem.len())
            .ok_or_else(|| bad(format!("run {}+{} outside the segment", r.offset, r.len)))?;
        f.read_exact(&mut mem[range])
            .map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

fn restore_sem(pid: i32, s: &SemSet) -> Result<()> {
    let p = perm_of(pid, s.perm.as_ref(), "sem")?;
    let what = describe("sem", p);
    let values: Vec<u16> = s
        .values
        .iter()
        .map(|&v| u16::try_from(v))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Refused {
            pid,
            reason: format!("{what}: a semaphore value in the image is above 65535"),
        })?;
    set_next_id(pid, "sem", p.id)?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
    let id = create_as(pid, p, &what, || {
        sys::sem_get(p.key, values.len() as i32, flags)
    })?;
    check_id(pid, &what, p.id, id, sys::sem_rmid)?;
    let result = (|| {
        sys::sem_setall(id, &values).ctx(pid, || format!("{what}: SETALL"))?;
        sys::sem_set(id, &sys_perm(p)).ctx(pid, || format!("{what}: IPC_SET"))
    })();
    if result.is_err() {
        let _ = sys::sem_rmid(id);
    }
    result
}

fn restore_msg(pid: i32, q: &MsgQueue) -> Result<()> {
    let p = perm_of(pid, q.perm.as_ref(), "msg")?;
    let what = describe("msg", p);
    set_next_id(pid, "msg", p.id)?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
    let id = create_as(pid, p, &what, || sys::msg_get(p.key, flags))?;
    check_id(pid, &what, p.id, id, sys::msg_rmid)?;
    let result = (|| {
        // qbytes first, so that every message fits.
        sys::msg_set(id, &sys_perm(p), q.qbytes).map_err(|e| {
            let msgmnb = read_sysctl(pid, "kernel/msgmnb").unwrap_or_default();
            if e.raw_os_error() == Some(libc::EPERM) {
                Error::Refused {
                    pid,
                    reason: format!(
                        "{what}: setting msg_qbytes to {} above kernel.msgmnb ({msgmnb}) needs CAP_SYS_RESOURCE",
                        q.qbytes
                    ),
                }
            } else {
                Error::sys(pid, format!("{what}: IPC_SET (qbytes {})", q.qbytes), e)
            }
        })?;
        for (i, m) in q.messages.iter().enumerate() {
            sys::msg_send(id, m.mtype, &m.text).ctx(pid, || {
                format!(
                    "{what}: sending message {i} (type {}, {} bytes)",
                    m.mtype,
                    m.text.len()
                )
            })?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = sys::msg_rmid(id);
    }
    result
}

fn restore_mqueue(pid: i32, q: &PosixQueue) -> Result<()> {
    let what = format!("POSIX message queue /{}", q.name);
    if q.name.is_empty() || q.name.contains('/') {
        return Err(Error::Refused {
            pid,
            reason: format!("{what}: not a queue name"),
        });
    }
    let fd = sys::mq_open(
        &q.name,
        libc::O_WRONLY | libc::O_EXCL | libc::O_NONBLOCK | libc::O_CLOEXEC,
        Some((0o600, q.maxmsg, q.msgsize)),
    )
    .ctx(pid, || {
        format!(
            "{what}: creating it (maxmsg {}, msgsize {})",
            q.maxmsg, q.msgsize
        )
    })?;
    let result = (|| {
        for (i, m) in q.messages.iter().enumerate() {
            sys::mq_send(fd.as_fd(), &m.data, m.prio).ctx(pid, || {
                format!("{what}: sending message {i} (priority {})", m.prio)
            })?;
        }
        nix::unistd::fchown(
            fd.as_fd(),
            Some(nix::unistd::Uid::from_raw(q.uid)),
            Some(nix::unistd::Gid::from_raw(q.gid)),
        )
        .ctx(pid, || format!("{what}: fchown {}:{}", q.uid, q.gid))?;
        nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(q.mode & 0o7777))
            .ctx(pid, || format!("{what}: fchmod {:o}", q.mode))
    })();
    if result.is_err() {
        let _ = sys::mq_unlink(&q.name);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHM: &str = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
         0          3  1600                  8192   123   124      1  1000  1001     0     0 1700000000 1700000000 1700000000                  4096                     0
-559038737      65543   640                 10000   123     0      0     0     0     0     0          0          0 1700000000                     0                     0
";
    const SEM: &str =
        "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime
      4660          0   600          3     0     0     0     0          0 1700000000
";
    const MSG: &str = "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid      stime      rtime      ctime
      4661      32768   666         300          3   100     0    42    43    44    45 1700000000          0 1700000000
";

    #[test]
    fn sysvipc_shm() {
        let v = parse_sysvipc(SHM).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0],
            SysvEntry {
                key: 0,
                id: 3,
                mode: 0o1600,
                uid: 1000,
                gid: 1001,
                cuid: 0,
                cgid: 0,
                size: 8192,
                count: 1,
            }
        );
        assert_eq!(v[0].mode & sys::SHM_DEST, sys::SHM_DEST);
        assert_eq!(v[1].key as u32, 0xdead_beef);
        assert_eq!(v[1].id, 65543);
        assert_eq!(v[1].mode, 0o640);
        assert_eq!(v[1].size, 10000);
    }

    #[test]
    fn sysvipc_sem_and_msg() {
        let s = parse_sysvipc(SEM).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].key, s[0].id, s[0].size, s[0].count), (4660, 0, 3, 0));
        let m = parse_sysvipc(MSG).unwrap();
        assert_eq!(
            m[0],
            SysvEntry {
                key: 4661,
                id: 32768,
                mode: 0o666,
                uid: 42,
                gid: 43,
                cuid: 44,
                cgid: 45,
                size: 300,
                count: 3,
            }
        );
    }

    #[test]
    fn sysvipc_empty_and_bad() {
        let header = SEM.lines().next().unwrap();
        assert_eq!(parse_sysvipc(header).unwrap(), vec![]);
        assert!(parse_sysvipc("").is_err());
        assert!(parse_sysvipc("key perms\n1 2\n").is_err());
        let bad = format!("{header}\n 1 2 9z9 3 0 0 0 0 0 0\n");
        assert!(parse_sysvipc(&bad).unwrap_err().contains("perms"));
        let short = format!("{header}\n 1 2 600\n");
        assert!(parse_sysvipc(&short).unwrap_err().contains("short"));
    }

    #[test]
    fn mq_status() {
        assert_eq!(
            parse_mq_status("QSIZE:129        NOTIFY:0     SIGNO:0     NOTIFY_PID:0     \n"),
            Some(MqStatus {
                qsize: 129,
                notify_pid: 0
            })
        );
        assert_eq!(
            parse_mq_status("QSIZE:0          NOTIFY:2     SIGNO:0     NOTIFY_PID:4242  \n")
                .unwrap()
                .notify_pid,
            4242
        );
        assert_eq!(parse_mq_status("QSIZE:0\n"), None);
        assert_eq!(parse_mq_status("garbage"), None);
    }

    #[test]
    fn zero_pages_are_skipped() {
        let mut d = vec![0u8; 5 * PAGE + 100];
        assert!(nonzero_runs(&d, PAGE).is_empty());
        d[PAGE + 7] = 1;
        d[2 * PAGE] = 2;
        d[5 * PAGE + 99] = 3;
        let r = nonzero_runs(&d, PAGE);
        assert_eq!(
            r,
            vec![
                ByteRun {
                    offset: PAGE as u64,
                    len: 2 * PAGE as u64
                },
                ByteRun {
                    offset: 5 * PAGE as u64,
                    len: 100
                },
            ]
        );
    }
}
