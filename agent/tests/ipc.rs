//! Dump and restore of an IPC namespace, against the kernel: a process in
//! a new IPC namespace is filled with SysV objects and POSIX queues, dumped,
//! and restored into a second fresh namespace; both are compared from
//! threads that entered them. Needs root.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_agent::images::{self, image_name, ImageWriter};
use ckpt_agent::ipc;
use ckpt_agent::sys::ipc as sys;
use ckpt_proto::image::{Inventory, IpcImage};
use ckpt_proto::ImageKind;
use nix::sched::{setns, CloneFlags};

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("ckpt-ipc-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(p.join("mq")).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sleep 60` in new IPC and mount namespaces, with that IPC namespace's
/// mqueue filesystem mounted on `mq` (seen at /proc/PID/root/`mq`);
/// killed on drop.
struct NsChild {
    child: std::process::Child,
    mq: PathBuf,
}

impl NsChild {
    fn spawn(mq: &Path) -> Self {
        let child = Command::new("unshare")
            .args(["--ipc", "--mount", "--propagation", "private", "--"])
            .args([
                "sh",
                "-c",
                "mount -t mqueue none \"$1\" && exec sleep 60",
                "sh",
            ])
            .arg(mq)
            .stdin(Stdio::null())
            .spawn()
            .expect("run unshare");
        let mut c = NsChild {
            child,
            mq: mq.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.child.try_wait().unwrap() {
                panic!("the namespace helper exited: {st}");
            }
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", c.pid()));
            if comm.map(|s| s.trim() == "sleep").unwrap_or(false) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the namespace helper did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_ne!(
            std::fs::read_link(format!("/proc/{}/ns/ipc", c.pid())).unwrap(),
            std::fs::read_link("/proc/self/ns/ipc").unwrap(),
            "the helper has its own IPC namespace"
        );
        c
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The mqueue mount of its IPC namespace, from outside.
    fn mq_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(self.mq.strip_prefix("/").unwrap())
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread inside the IPC namespace of `pid`.
fn in_ns<T: Send>(pid: i32, f: impl FnOnce() -> T + Send) -> T {
    let ns = File::open(format!("/proc/{pid}/ns/ipc")).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWIPC).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{name}"))
        .unwrap()
        .trim()
        .to_string()
}

fn set_sysctl(name: &str, v: &str) {
    std::fs::write(format!("/proc/sys/{name}"), v).unwrap();
}

fn sysvipc(kind: &str) -> Vec<ipc::SysvEntry> {
    ipc::parse_sysvipc(&std::fs::read_to_string(format!("/proc/sysvipc/{kind}")).unwrap()).unwrap()
}

const SHM_A: usize = 10000;
const SHM_B: usize = 3 * 4096 + 5;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Fills the calling thread's IPC namespace. Returns the id of a segment
/// still to be removed (while attached) by the caller.
fn populate() -> i32 {
    // Limits above a fresh namespace's defaults.
    set_sysctl("kernel/msgmnb", "32768");
    set_sysctl("fs/mqueue/msg_max", "20");

    // shm A: key 0x1234, content in pages 0 and 2, page 1 zero.
    let a = sys::shm_get(0x1234, SHM_A as u64, libc::IPC_CREAT | 0o640).unwrap();
    assert_eq!(a, 0);
    {
        let mut att = sys::ShmAttach::new(a, true).unwrap();
        let m = att.bytes_mut().unwrap();
        m[..100].copy_from_slice(&pattern(100, 7));
        m[9000..].copy_from_slice(&pattern(SHM_A - 9000, 9));
    }
    sys::shm_set(
        a,
        &sys::Perm {
            uid: 1000,
            gid: 1001,
            mode: 0o640,
            ..Default::default()
        },
    )
    .unwrap();

    // shm B: IPC_PRIVATE, at id 65543 (seq 2, index 7), created by
    // 2000:2001 and then given to 3000:3001.
    set_sysctl("kernel/shm_next_id", "65543");
    sys::thread_set_egid(2001).unwrap();
    sys::thread_set_euid(2000).unwrap();
    let b = sys::shm_get(libc::IPC_PRIVATE, SHM_B as u64, libc::IPC_CREAT | 0o600);
    sys::thread_set_euid(0).unwrap();
    sys::thread_set_egid(0).unwrap();
    let b = b.unwrap();
    assert_eq!(b, 65543);
    sys::ShmAttach::new(b, true)
        .unwrap()
        .bytes_mut()
        .unwrap()
        .copy_from_slice(&pattern(SHM_B, 77));
    sys::shm_set(
        b,
        &sys::Perm {
            uid: 3000,
            gid: 3001,
            mode: 0o604,
            ..Default::default()
        },
    )
    .unwrap();

    // shm C: to be removed while attached.
    let c = sys::shm_get(0x5678, 4096, libc::IPC_CREAT | 0o600).unwrap();
    sys::ShmAttach::new(c, true).unwrap().bytes_mut().unwrap()[..5].copy_from_slice(b"alive");

    // A semaphore set at id 5.
    set_sysctl("kernel/sem_next_id", "5");
    let s = sys::sem_get(0x2222, 4, libc::IPC_CREAT | 0o660).unwrap();
    assert_eq!(s, 5);
    sys::sem_setall(s, &[0, 1, 7, 32767]).unwrap();

    // A message queue holding 3 messages, qbytes above the default msgmnb.
    let q = sys::msg_get(0x3333, libc::IPC_CREAT | 0o620).unwrap();
    let st = sys::msg_stat(q).unwrap();
    sys::msg_set(q, &st.perm, 30000).unwrap();
    sys::msg_send(q, 1, b"one").unwrap();
    sys::msg_send(q, 7, &pattern(200, 3)).unwrap();
    sys::msg_send(q, 2, &pattern(5000, 4)).unwrap();
    // An empty one with a small qbytes.
    let q2 = sys::msg_get(0x3334, libc::IPC_CREAT | 0o600).unwrap();
    let st = sys::msg_stat(q2).unwrap();
    sys::msg_set(q2, &st.perm, 1000).unwrap();

    // POSIX queues: one with messages of several priorities (maxmsg above
    // the default msg_max), one empty.
    let fd = sys::mq_open("jobq", libc::O_RDWR | libc::O_EXCL, Some((0o640, 15, 128))).unwrap();
    for (prio, m) in [
        (1, &b"low"[..]),
        (5, b"high-a"),
        (0, b"zero"),
        (5, b"high-b"),
    ] {
        sys::mq_send(fd.as_fd(), m, prio).unwrap();
    }
    nix::unistd::fchown(
        fd.as_fd(),
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1001)),
    )
    .unwrap();
    sys::mq_open("empty", libc::O_RDWR | libc::O_EXCL, Some((0o600, 3, 64))).unwrap();
    c
}

/// Everything the test compares about a namespace, read from a thread
/// inside it (and its mqueue mount).
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// Entry (nattch zeroed), contents.
    shm: Vec<(ipc::SysvEntry, Vec<u8>)>,
    sem: Vec<(ipc::SysvEntry, Vec<u16>)>,
    msg: Vec<MsgState>,
    mq: BTreeMap<String, MqState>,
    limits: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
struct MsgState {
    entry: ipc::SysvEntry,
    qbytes: u64,
    /// (type, text), oldest first.
    messages: Vec<(i64, Vec<u8>)>,
}

#[derive(Debug, PartialEq, Eq)]
struct MqState {
    mode: u32,
    uid: u32,
    gid: u32,
    /// "QSIZE:n" of its status.
    qsize: String,
    maxmsg: i64,
    msgsize: i64,
    /// (priority, data), in receive order.
    messages: Vec<(u32, Vec<u8>)>,
}

fn snapshot(mq: &Path) -> Snapshot {
    use std::os::unix::fs::MetadataExt;
    let shm = sysvipc("shm")
        .into_iter()
        .map(|mut e| {
            let data = sys::ShmAttach::new(e.id, false).unwrap().bytes().to_vec();
            e.count = 0;
            (e, data)
        })
        .collect();
    let sem = sysvipc("sem")
        .into_iter()
        .map(|e| {
            let v = sys::sem_getall(e.id).unwrap();
            (e, v)
        })
        .collect();
    let msg = sysvipc("msg")
        .into_iter()
        .map(|e| {
            let qbytes = sys::msg_stat(e.id).unwrap().qbytes;
            let mut msgs = Vec::new();
            while let Some(m) = sys::msg_copy(e.id, msgs.len() as u64, 8192).unwrap() {
                msgs.push(m);
            }
            MsgState {
                entry: e,
                qbytes,
                messages: msgs,
            }
        })
        .collect();
    let mut mqs = BTreeMap::new();
    for ent in std::fs::read_dir(mq).unwrap() {
        let ent = ent.unwrap();
        let name = ent.file_name().to_string_lossy().into_owned();
        let md = ent.metadata().unwrap();
        let status = std::fs::read_to_string(ent.path()).unwrap();
        // Take the messages and put them back.
        let fd = sys::mq_open(&name, libc::O_RDWR | libc::O_NONBLOCK, None).unwrap();
        let (maxmsg, msgsize, _) = sys::mq_getattr(fd.as_fd()).unwrap();
        let mut buf = vec![0u8; msgsize as usize];
        let mut msgs = Vec::new();
        while let Some((n, prio)) = sys::mq_receive(fd.as_fd(), &mut buf).unwrap() {
            msgs.push((prio, buf[..n].to_vec()));
        }
        for (prio, m) in &msgs {
            sys::mq_send(fd.as_fd(), m, *prio).unwrap();
        }
        mqs.insert(
            name,
            MqState {
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                qsize: status.split_whitespace().take(1).collect(),
                maxmsg,
                msgsize,
                messages: msgs,
            },
        );
    }
    Snapshot {
        shm,
        sem,
        msg,
        mq: mqs,
        limits: ["kernel/msgmnb", "fs/mqueue/msg_max"]
            .iter()
            .map(|n| sysctl(n))
            .collect(),
    }
}

#[test]
fn dump_and_restore_an_ipc_namespace() {
    let tmp = TempDir::new("roundtrip");
    let src = NsChild::spawn(&tmp.0.join("mq"));
    let dst = NsChild::spawn(&tmp.0.join("mq"));
    let img_dir = tmp.0.join("img");
    let (src_pid, dst_pid) = (src.pid(), dst.pid());
    let src_mq = src.mq_dir();

    // Fill the first namespace, remove shm C while attached, dump, and
    // check that the dump changed nothing.
    let (img, before, after) = in_ns(src_pid, || {
        let c = populate();
        let att = sys::ShmAttach::new(c, false).unwrap();
        sys::shm_ctl(c, libc::IPC_RMID).unwrap();
        let before = snapshot(&src_mq);
        let writer = ImageWriter::create(&img_dir).unwrap();
        let img = ipc::dump(src_pid, &writer).unwrap();
        writer
            .write(&image_name(ImageKind::Ipc, src_pid), ImageKind::Ipc, &img)
            .unwrap();
        writer.commit(Inventory::default(), None).unwrap();
        let after = snapshot(&src_mq);
        drop(att);
        (img, before, after)
    });
    assert_eq!(before, after, "the dump changed the namespace");

    // What the source held, spelled out.
    assert_eq!(before.shm.len(), 3);
    let shm_a = &before.shm.iter().find(|s| s.0.key == 0x1234).unwrap();
    assert_eq!((shm_a.0.id, shm_a.0.uid, shm_a.0.gid), (0, 1000, 1001));
    assert_eq!(shm_a.1[..100], pattern(100, 7)[..]);
    assert!(shm_a.1[100..9000].iter().all(|&b| b == 0));
    let shm_b = &before.shm.iter().find(|s| s.0.id == 65543).unwrap();
    assert_eq!(
        (
            shm_b.0.key,
            shm_b.0.mode,
            shm_b.0.uid,
            shm_b.0.cuid,
            shm_b.0.cgid
        ),
        (0, 0o604, 3000, 2000, 2001)
    );
    assert_eq!(shm_b.1, pattern(SHM_B, 77));
    assert_eq!(before.sem[0].1, vec![0, 1, 7, 32767]);
    let q = &before.msg.iter().find(|m| m.entry.key == 0x3333).unwrap();
    assert_eq!(q.qbytes, 30000);
    let types: Vec<i64> = q.messages.iter().map(|m| m.0).collect();
    assert_eq!(types, vec![1, 7, 2]);
    let jobq = &before.mq["jobq"];
    let prios: Vec<u32> = jobq.messages.iter().map(|m| m.0).collect();
    assert_eq!(prios, vec![5, 5, 1, 0]);
    assert_eq!(jobq.messages[0].1, b"high-a");
    assert_eq!(
        (jobq.mode, jobq.uid, jobq.gid, jobq.maxmsg, jobq.msgsize),
        (0o640, 1000, 1001, 15, 128)
    );

    // The image: zero pages of shm A not stored, C marked removed.
    let a = img
        .shm
        .iter()
        .find(|s| s.perm.unwrap().key == 0x1234)
        .unwrap();
    let a_len = std::fs::metadata(img_dir.join(&a.contents)).unwrap().len();
    assert_eq!(a_len, (4096 + SHM_A - 8192) as u64);
    assert!(img.shm.iter().filter(|s| s.removed).count() == 1);

    // Restore into the second namespace from what is on disk.
    let inv = images::read_inventory(&img_dir).unwrap();
    images::verify(&img_dir, &inv).unwrap();
    let img2: IpcImage = ckpt_proto::read_image_file(
        &img_dir.join(image_name(ImageKind::Ipc, src_pid)),
        ImageKind::Ipc,
    )
    .unwrap();
    assert_eq!(img2, img);
    ipc::restore(dst_pid, &img2, &img_dir).unwrap();

    let dst_mq = dst.mq_dir();
    let restored = in_ns(dst_pid, || snapshot(&dst_mq));
    // C comes back alive (SHM_DEST again only in finish_restore).
    let mut expect = before;
    for s in &mut expect.shm {
        s.0.mode &= !sys::SHM_DEST;
    }
    assert_eq!(restored, expect);

    // finish_restore marks C removed once "a task" has attached it again.
    let c_id = img.shm.iter().find(|s| s.removed).unwrap().perm.unwrap().id;
    in_ns(dst_pid, || {
        let att = sys::ShmAttach::new(c_id, false).unwrap();
        assert_eq!(&att.bytes()[..5], b"alive");
        ipc::finish_restore(dst_pid, &img2).unwrap();
        let c = sysvipc("shm").into_iter().find(|e| e.id == c_id).unwrap();
        assert_eq!(c.mode & sys::SHM_DEST, sys::SHM_DEST);
        drop(att);
        assert!(
            sysvipc("shm").iter().all(|e| e.id != c_id),
            "C destroyed at last detach"
        );
    });

    // A second restore into the same (no longer fresh) namespace fails and
    // names the object.
    let err = ipc::restore(dst_pid, &img2, &img_dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("pid {dst_pid}")) && err.contains("shm id 0 key 0x1234"),
        "{err}"
    );
}

fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    const CAP_SYS_RESOURCE: u32 = 24;
    u64::from_str_radix(eff, 16).unwrap() & (1 << CAP_SYS_RESOURCE) != 0
}

#[test]
fn restore_sysctls_let_qbytes_exceed_the_default_msgmnb() {
    // Without the limits of the image, qbytes above msgmnb needs
    // CAP_SYS_RESOURCE: the image's kernel/msgmnb is what makes it work.
    let tmp = TempDir::new("qbytes");
    let src = NsChild::spawn(&tmp.0.join("mq"));
    let dst = NsChild::spawn(&tmp.0.join("mq"));
    let img_dir = tmp.0.join("img");
    let img = in_ns(src.pid(), || {
        set_sysctl("kernel/msgmnb", "65536");
        let q = sys::msg_get(0x77, libc::IPC_CREAT | 0o600).unwrap();
        let st = sys::msg_stat(q).unwrap();
        sys::msg_set(q, &st.perm, 65536).unwrap();
        for i in 0..5 {
            sys::msg_send(q, i + 1, &pattern(8000, i as u8)).unwrap();
        }
        ipc::dump(src.pid(), &ImageWriter::create(&img_dir).unwrap()).unwrap()
    });
    if !has_cap_sys_resource() {
        let mut no_limits = img.clone();
        no_limits.sysctls.clear();
        let err = ipc::restore(dst.pid(), &no_limits, &img_dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("msg id 0 key 0x77") && err.contains("msgmnb"),
            "{err}"
        );
    }
    // The failed queue was removed again, so the real restore can proceed.
    ipc::restore(dst.pid(), &img, &img_dir).unwrap();
    in_ns(dst.pid(), || {
        let q = sysvipc("msg");
        assert_eq!((q[0].size, q[0].count), (40000, 5));
        assert_eq!(sys::msg_stat(q[0].id).unwrap().qbytes, 65536);
    });
}

#[test]
fn dump_refuses_notified_and_full_posix_queues() {
    let tmp = TempDir::new("refuse");
    let child = NsChild::spawn(&tmp.0.join("mq"));
    let pid = child.pid();
    let img_dir = tmp.0.join("img");
    in_ns(pid, || {
        let writer = ImageWriter::create(&img_dir).unwrap();
        let fd = sys::mq_open("note", libc::O_RDWR | libc::O_EXCL, Some((0o600, 4, 16))).unwrap();
        sys::mq_send(fd.as_fd(), b"x", 3).unwrap();
        sys::mq_notify_none(fd.as_fd()).unwrap();
        let err = ipc::dump(pid, &writer).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {pid}"))
                && err.contains("/note")
                && err.contains("mq_notify"),
            "{err}"
        );
        // Refused before anything was taken from it.
        assert_eq!(sys::mq_getattr(fd.as_fd()).unwrap().2, 1);
        drop(fd); // closing it drops the registration
        sys::mq_unlink("note").unwrap();
        assert!(ipc::dump(pid, &writer).is_ok());

        let fd = sys::mq_open("full", libc::O_RDWR | libc::O_EXCL, Some((0o600, 2, 16))).unwrap();
        sys::mq_send(fd.as_fd(), b"a", 0).unwrap();
        sys::mq_send(fd.as_fd(), b"b", 0).unwrap();
        let err = ipc::dump(pid, &writer).unwrap_err().to_string();
        assert!(err.contains("/full") && err.contains("full"), "{err}");
        assert_eq!(sys::mq_getattr(fd.as_fd()).unwrap().2, 2);
    });
}

#[test]
fn dump_of_a_missing_process_fails() {
    let tmp = TempDir::new("missing");
    let writer = ImageWriter::create(&tmp.0.join("img")).unwrap();
    // Pid numbers above pid_max never exist.
    let err = ipc::dump(i32::MAX, &writer).unwrap_err();
    assert!(matches!(err, ckpt_agent::Error::NoProcess { pid } if pid == i32::MAX));
}

#[test]
fn restore_mappings_attach_sysv_segments_at_their_address() {
    use ckpt_agent::inject::{read_mem, wait_interrupt_stop, Remote, Scratch};
    use ckpt_agent::mm;
    use ckpt_proto::image::{MmImage, Vma, VmaKind};
    use nix::sys::ptrace;
    use nix::unistd::Pid;

    let tmp = TempDir::new("attach");
    let child = NsChild::spawn(&tmp.0.join("mq"));
    let pid = child.pid();
    let id = in_ns(pid, || {
        let id = sys::shm_get(libc::IPC_PRIVATE, 2 * 4096, libc::IPC_CREAT | 0o600).unwrap();
        sys::ShmAttach::new(id, true)
            .unwrap()
            .bytes_mut()
            .unwrap()
            .copy_from_slice(&pattern(2 * 4096, 11));
        id
    });

    let tid = Pid::from_raw(pid);
    ptrace::seize(tid, ckpt_agent::inject::seize_options(false)).unwrap();
    ptrace::interrupt(tid).unwrap();
    wait_interrupt_stop(tid).unwrap();
    let remote = Remote::new(tid, mm::find_syscall_gadget(pid).unwrap()).unwrap();
    let busy: Vec<(u64, u64)> = ckpt_agent::proc::maps(pid)
        .unwrap()
        .iter()
        .map(|m| (m.start, m.end))
        .collect();
    let ro_at = mm::find_gap(&busy, 2 * 4096).unwrap();
    let mut busy2 = busy.clone();
    busy2.push((ro_at - 4096, ro_at + 3 * 4096));
    let rw_at = mm::find_gap(&busy2, 2 * 4096).unwrap();
    let vma = |start: u64, prot: i32, flags: &[&str]| Vma {
        start,
        end: start + 2 * 4096,
        prot: prot as u32,
        kind: VmaKind::VmaSysvShm as i32,
        shmid: id as u64,
        vm_flags: flags.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    };
    let mut img = MmImage {
        pid,
        fields: None,
        vmas: vec![
            vma(rw_at, libc::PROT_READ, &["rd", "sh", "mr", "mw"]),
            vma(ro_at, libc::PROT_READ, &["rd", "sh", "mr"]),
        ],
    };
    img.vmas.sort_by_key(|v| v.start);
    mm::restore_mappings(
        &img,
        &remote,
        &mut Scratch::new(pid, 0, 0),
        &mut std::collections::HashMap::new(),
        std::path::Path::new("/nonexistent"),
    )
    .unwrap();

    let smaps = ckpt_agent::proc::smaps(pid).unwrap();
    for (at, may_write) in [(rw_at, true), (ro_at, false)] {
        let m = smaps.iter().find(|m| m.start == at).expect("attached");
        assert_eq!(m.end, at + 2 * 4096);
        assert!(m.path.starts_with("/SYSV"), "{m:?}");
        assert_eq!(m.inode, id as u64);
        assert_eq!(m.has_flag("mw"), may_write, "{m:?}");
        assert_eq!(read_mem(pid, at, 2 * 4096).unwrap(), pattern(2 * 4096, 11));
    }
    let att = in_ns(pid, || sys::shm_stat(id).unwrap().2);
    assert_eq!(att, 2, "two attachments in the task");
}
