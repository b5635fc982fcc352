//! Cases about what a job's processes share: its own PID, UTS, mount and
//! IPC namespaces (only as jobs, under `ckpt-agent run`), and memory
//! objects mapped by several processes. Checked from inside after restore.

use std::ffi::CString;

use crate::later::{pipe_pair, read_u32, write_u32};
use crate::util::*;
use crate::Ctx;

pub(crate) fn must_be_job() -> CaseResult {
    // SAFETY: getpid has no arguments.
    let pid = unsafe { libc::getpid() };
    if pid != 1 {
        return Err(format!(
            "not running as a job's root (pid {pid}, not 1): run it under `ckpt-agent run`"
        ));
    }
    Ok(())
}

/// A child serving requests on a pipe: for each u32 `off` it reads the
/// byte at `base + off` and answers it. Raw syscalls only (forked child).
fn spawn_reader(base: usize) -> Result<(i32, i32, i32), String> {
    let (req_r, req_w) = pipe_pair()?;
    let (ans_r, ans_w) = pipe_pair()?;
    // SAFETY: the child only makes raw syscalls and reads mapped memory.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: raw syscalls in the child; base + off stays in the mapping
        // the parent gave.
        unsafe {
            // Only the parent writes requests: EOF ends this loop.
            libc::close(req_w);
            libc::close(ans_r);
            while let Some(off) = read_u32(req_r) {
                let v = *((base + off as usize) as *const u8);
                if !write_u32(ans_w, v as u32) {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    cvt(pid, "fork")?;
    // SAFETY: closing our copies of the child's ends.
    unsafe {
        libc::close(req_r);
        libc::close(ans_w);
    }
    Ok((pid, req_w, ans_r))
}

fn ask(req_w: i32, ans_r: i32, off: u32) -> Option<u32> {
    if !write_u32(req_w, off) {
        return None;
    }
    read_u32(ans_r)
}

/// The mount table without ids, peer groups renumbered by first use: what
/// must come back identical.
fn mount_table() -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    read_text("/proc/self/mountinfo")
        .lines()
        .map(|l| {
            let (pre, post) = l.split_once(" - ").unwrap_or((l, ""));
            let f: Vec<&str> = pre.split_whitespace().collect();
            let tags: Vec<String> = f
                .get(6..)
                .unwrap_or(&[])
                .iter()
                .map(|t| match t.split_once(':') {
                    Some((k @ ("shared" | "master"), n)) => {
                        let n = n.to_string();
                        let i = groups.iter().position(|g| *g == n).unwrap_or_else(|| {
                            groups.push(n);
                            groups.len() - 1
                        });
                        format!("{k}:#{i}")
                    }
                    _ => t.to_string(),
                })
                .collect();
            // Super options minus the size tmpfs derives from free memory.
            let mut p = post.split_whitespace();
            let (fstype, source) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
            format!(
                "{} root={} opts={} {} fs={fstype} src={source}",
                f.get(4).unwrap_or(&"?"),
                f.get(3).unwrap_or(&"?"),
                f.get(5).unwrap_or(&"?"),
                tags.join(","),
            )
        })
        .collect()
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> CaseResult {
    let (s, t, f, d) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    let opt = |c: &CString, v: &str| {
        if v.is_empty() {
            std::ptr::null()
        } else {
            c.as_ptr()
        }
    };
    // SAFETY: valid C strings or null.
    let r = unsafe {
        libc::mount(
            opt(&s, src),
            t.as_ptr(),
            opt(&f, fstype),
            flags,
            opt(&d, data).cast(),
        )
    };
    cvt(r, &format!("mount {fstype} {src} on {target}")).map(|_| ())
}

fn uts() -> (String, String) {
    // SAFETY: uname fills the struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::uname(&mut u) };
    let s = |a: &[libc::c_char]| {
        let b: Vec<u8> = a
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&b).into_owned()
    };
    (s(&u.nodename), s(&u.domainname))
}

/// PID 1 of its namespace with a child; UTS names; files of every kind on
/// the job's /tmp; a /dev/shm file mapped shared by parent and child; a
/// read-only bind mount and a shared tmpfs with a peer. After restore: the
/// same PIDs inside, names, files, mount table, and the mapping still one
/// object between the two processes.
pub fn job_namespaces(ctx: &Ctx) -> CaseResult {
    must_be_job()?;
    let domain = "zdtm-domain";
    // SAFETY: a valid buffer and length.
    cvt(
        unsafe { libc::setdomainname(domain.as_ptr().cast(), domain.len()) },
        "setdomainname",
    )?;
    let names = uts();

    // Files of every kind on the job's tmpfs.
    std::fs::create_dir("/tmp/d").map_err(|e| format!("mkdir /tmp/d: {e}"))?;
    let data = pattern_bytes(3 << 20, 42);
    std::fs::write("/tmp/d/data", &data).map_err(|e| format!("write: {e}"))?;
    std::os::unix::fs::symlink("d/data", "/tmp/link").map_err(|e| format!("symlink: {e}"))?;
    std::fs::write("/tmp/owned", b"by 1000").map_err(|e| format!("write: {e}"))?;
    std::os::unix::fs::chown("/tmp/owned", Some(1000), Some(1000))
        .map_err(|e| format!("chown: {e}"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions("/tmp/d", std::fs::Permissions::from_mode(0o750))
        .map_err(|e| format!("chmod: {e}"))?;
    let fifo = cstr("/tmp/fifo");
    // SAFETY: a valid path.
    cvt(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, "mkfifo")?;
    let stat = |p: &str| -> Result<(u32, u32, u64, i64), String> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).map_err(|e| format!("stat {p}: {e}"))?;
        Ok((m.mode(), m.uid(), m.len(), m.mtime()))
    };
    let files = [
        "/tmp/d",
        "/tmp/d/data",
        "/tmp/link",
        "/tmp/owned",
        "/tmp/fifo",
    ];
    // A descriptor on the job's tmpfs, at an offset: reopened there.
    let held = std::fs::File::open("/tmp/d/data").map_err(|e| format!("open: {e}"))?;
    use std::io::Seek;
    (&held)
        .seek(std::io::SeekFrom::Start(100))
        .map_err(|e| format!("seek: {e}"))?;
    let before: Vec<_> = files.iter().map(|p| stat(p)).collect::<Result<_, _>>()?;

    // A read-only bind mount, and a shared tmpfs with a peer.
    for d in ["/tmp/src", "/tmp/ro", "/tmp/sh", "/tmp/peer"] {
        std::fs::create_dir(d).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    std::fs::write("/tmp/src/f", b"bound").map_err(|e| format!("write: {e}"))?;
    mount("/tmp/src", "/tmp/ro", "", libc::MS_BIND, "")?;
    mount(
        "",
        "/tmp/ro",
        "",
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        "",
    )?;
    mount("zdtm", "/tmp/sh", "tmpfs", 0, "size=4m")?;
    mount("", "/tmp/sh", "", libc::MS_SHARED, "")?;
    std::fs::write("/tmp/sh/f", b"shared tmpfs").map_err(|e| format!("write: {e}"))?;
    mount("/tmp/sh", "/tmp/peer", "", libc::MS_BIND, "")?;

    // A /dev/shm file mapped shared by parent and child.
    const LEN: usize = 1 << 20;
    let shm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open("/dev/shm/zdtm-seg")
        .map_err(|e| format!("open /dev/shm/zdtm-seg: {e}"))?;
    shm.set_len(LEN as u64)
        .map_err(|e| format!("truncate: {e}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: maps the whole file shared.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            shm.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(os_err("mmap /dev/shm/zdtm-seg"));
    }
    drop(shm);
    let mem = base as *mut u8;
    // SAFETY: inside the mapping.
    unsafe { *mem.add(4096) = 0x5a };
    let (child, req_w, ans_r) = spawn_reader(base as usize)?;
    if ask(req_w, ans_r, 4096) != Some(0x5a) {
        return Err("child does not see the shared file mapping before the checkpoint".into());
    }
    let mounts = mount_table();

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    // SAFETY: getpid has no arguments.
    c.eq("pid", 1, unsafe { libc::getpid() });
    c.ok(
        "child still ours",
        std::fs::read_to_string(format!("/proc/{child}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(3) == Some("1")),
    );
    c.eq("uts names", names, uts());
    let after: Vec<_> = files.iter().map(|p| stat(p)).collect::<Result<_, _>>()?;
    c.eq("file modes, owners, sizes, mtimes", before, after);
    c.ok(
        "file contents",
        std::fs::read("/tmp/d/data").ok() == Some(data),
    );
    c.eq("symlink", readlink("/tmp/link"), "d/data".to_string());
    {
        use std::os::unix::fs::MetadataExt;
        let ino = |m: std::io::Result<std::fs::Metadata>| m.map(|m| m.ino()).ok();
        c.eq(
            "held descriptor is the file on the job's tmpfs",
            ino(std::fs::metadata("/tmp/d/data")),
            ino(held.metadata()),
        );
        c.eq(
            "held descriptor offset",
            Ok(100),
            (&held).stream_position().map_err(|e| e.to_string()),
        );
    }
    c.eq(
        "bind mount content",
        read_text("/tmp/ro/f"),
        "bound".to_string(),
    );
    c.ok(
        "bind mount is read-only",
        std::fs::write("/tmp/ro/f", b"x").is_err(),
    );
    c.eq(
        "shared tmpfs through its peer",
        read_text("/tmp/peer/f"),
        "shared tmpfs".to_string(),
    );
    c.eq("mount table", mounts, mount_table());
    // Mounting under one peer must show under the other: still peers.
    std::fs::create_dir("/tmp/sh/sub").map_err(|e| format!("mkdir: {e}"))?;
    c.res(mount("sub", "/tmp/sh/sub", "tmpfs", 0, "size=1m"));
    c.ok(
        "mount propagates between shared peers",
        read_text("/proc/self/mountinfo").contains(" /tmp/peer/sub "),
    );
    // The child still sees what the parent writes now: one object.
    // SAFETY: inside the mapping.
    unsafe { *mem.add(8192) = 0xa5 };
    c.eq(
        "shared mapping value seen by child",
        ask(req_w, ans_r, 8192),
        Some(0xa5),
    );
    c.eq(
        "old value seen by child",
        ask(req_w, ans_r, 4096),
        Some(0x5a),
    );
    // SAFETY: closing the request pipe ends the child, then reap it.
    unsafe {
        libc::close(req_w);
        let mut st = 0;
        libc::waitpid(child, &mut st, 0);
    }
    c.finish()
}

/// SysV shared memory attached by parent and child (one segment removed
/// while attached), a semaphore set, a message queue and a POSIX message
/// queue. After restore: same ids, contents, values and messages in order,
/// and the segment still shared between the two processes.
pub fn sysv_ipc(ctx: &Ctx) -> CaseResult {
    must_be_job()?;
    const LEN: usize = 256 << 10;
    // SAFETY: plain SysV calls; attachments are checked below.
    let (keyed, private) = unsafe {
        (
            libc::shmget(0x2a01, LEN, libc::IPC_CREAT | 0o640),
            libc::shmget(libc::IPC_PRIVATE, LEN, libc::IPC_CREAT | 0o600),
        )
    };
    cvt(keyed, "shmget keyed")?;
    cvt(private, "shmget private")?;
    // SAFETY: attaching fresh segments anywhere.
    let (ka, pa) = unsafe {
        (
            libc::shmat(keyed, std::ptr::null(), 0),
            libc::shmat(private, std::ptr::null(), 0),
        )
    };
    if ka as isize == -1 || pa as isize == -1 {
        return Err(os_err("shmat"));
    }
    let pattern = pattern_bytes(LEN, 7);
    // SAFETY: both attachments are LEN bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(pattern.as_ptr(), ka as *mut u8, LEN);
        *(pa as *mut u8).add(100) = 0x77;
        // Removed while attached: lives on until the last detach.
        libc::shmctl(private, libc::IPC_RMID, std::ptr::null_mut());
    }
    let (child, req_w, ans_r) = spawn_reader(pa as usize)?;
    if ask(req_w, ans_r, 100) != Some(0x77) {
        return Err("child does not see the private segment before the checkpoint".into());
    }

    // SAFETY: plain SysV calls with valid buffers.
    let sem = unsafe { libc::semget(0x2a02, 3, libc::IPC_CREAT | 0o600) };
    cvt(sem, "semget")?;
    let vals: [u16; 3] = [1, 5, 9];
    // SAFETY: SETALL reads 3 values from vals.
    cvt(
        unsafe { libc::semctl(sem, 0, libc::SETALL, vals.as_ptr()) },
        "semctl SETALL",
    )?;
    // SAFETY: as above.
    let msq = unsafe { libc::msgget(0x2a03, libc::IPC_CREAT | 0o600) };
    cvt(msq, "msgget")?;
    let msgs: [(i64, &[u8]); 3] = [(1, b"first"), (2, b"second, type 2"), (1, b"third")];
    for (t, body) in msgs {
        let mut buf = t.to_ne_bytes().to_vec();
        buf.extend_from_slice(body);
        // SAFETY: buf holds the type then the body.
        cvt(
            unsafe { libc::msgsnd(msq, buf.as_ptr().cast(), body.len(), 0) },
            "msgsnd",
        )?;
    }
    let mq_name = cstr("/zdtm-mq");
    // SAFETY: a zeroed mq_attr with the two fields mq_open uses.
    let mut attr: libc::mq_attr = unsafe { std::mem::zeroed() };
    attr.mq_maxmsg = 8;
    attr.mq_msgsize = 64;
    // SAFETY: valid name and attr.
    let mq = unsafe {
        libc::mq_open(
            mq_name.as_ptr(),
            libc::O_CREAT | libc::O_RDWR | libc::O_NONBLOCK,
            0o600,
            &attr as *const libc::mq_attr,
        )
    };
    cvt(mq, "mq_open")?;
    for (m, prio) in [(&b"low"[..], 1u32), (b"high", 5), (b"low two", 1)] {
        // SAFETY: m is a live buffer.
        cvt(
            unsafe { libc::mq_send(mq, m.as_ptr().cast(), m.len(), prio) },
            "mq_send",
        )?;
    }

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    // SAFETY: plain SysV lookups.
    c.eq("keyed shm id", keyed, unsafe { libc::shmget(0x2a01, 0, 0) });
    c.eq("sem id", sem, unsafe { libc::semget(0x2a02, 0, 0) });
    c.eq("msg id", msq, unsafe { libc::msgget(0x2a03, 0) });
    // SAFETY: the attachment is LEN bytes.
    let now = unsafe { std::slice::from_raw_parts(ka as *const u8, LEN) };
    c.ok("keyed segment contents", now == &pattern[..]);
    // SAFETY: shmid_ds is filled by IPC_STAT.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::shmctl(private, libc::IPC_STAT, &mut ds) };
    c.ok("removed segment still attached", r == 0);
    const SHM_DEST: u16 = 0o1000;
    c.ok(
        "removed segment still marked removed",
        r == 0 && ds.shm_perm.mode & SHM_DEST != 0,
    );
    c.eq("removed segment attach count", ds.shm_nattch, 2);
    // SAFETY: inside the attachment.
    unsafe { *(pa as *mut u8).add(200) = 0x99 };
    c.eq(
        "private segment still shared with child",
        ask(req_w, ans_r, 200),
        Some(0x99),
    );
    let mut got = [0u16; 3];
    // SAFETY: GETALL writes 3 values.
    unsafe { libc::semctl(sem, 0, libc::GETALL, got.as_mut_ptr()) };
    c.eq("semaphore values", vals, got);
    for (t, body) in msgs {
        let mut buf = vec![0u8; 8 + 64];
        // SAFETY: buf has room for the type and 64 bytes.
        let n = unsafe { libc::msgrcv(msq, buf.as_mut_ptr().cast(), 64, 0, libc::IPC_NOWAIT) };
        if n < 0 {
            c.fail(os_err("msgrcv"));
            break;
        }
        let ty = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
        c.eq(
            "message",
            (t, body.to_vec()),
            (ty, buf[8..8 + n as usize].to_vec()),
        );
    }
    for (m, prio) in [(&b"high"[..], 5u32), (b"low", 1), (b"low two", 1)] {
        let mut buf = [0u8; 64];
        let mut p = 0u32;
        // SAFETY: buf is mq_msgsize bytes.
        let n = unsafe { libc::mq_receive(mq, buf.as_mut_ptr().cast(), 64, &mut p) };
        if n < 0 {
            c.fail(os_err("mq_receive"));
            break;
        }
        c.eq(
            "posix message",
            (m.to_vec(), prio),
            (buf[..n as usize].to_vec(), p),
        );
    }
    // SAFETY: cleanup of what this case created; the namespace dies with it.
    unsafe {
        libc::close(req_w);
        let mut st = 0;
        libc::waitpid(child, &mut st, 0);
        libc::mq_unlink(mq_name.as_ptr());
    }
    c.finish()
}

/// A memfd larger than what is mapped, mapped shared by parent and child
/// (the child keeps only its mapping), sealed against resizing. After
/// restore: one object behind the parent's descriptor and both mappings
/// (same inode, writes through one seen through the others), its whole
/// content, and its seals.
pub fn memfd_shared_map(ctx: &Ctx) -> CaseResult {
    const MB: usize = 1 << 20;
    // SAFETY: a NUL-terminated name and flags.
    let fd = cvt(
        unsafe { libc::memfd_create(c"zdtm-mfd".as_ptr(), libc::MFD_ALLOW_SEALING) },
        "memfd_create",
    )?;
    let data = pattern_bytes(3 * MB, 99);
    // SAFETY: writes from a live buffer; mmap of the first two MiB.
    let base = unsafe {
        if libc::pwrite(fd, data.as_ptr().cast(), data.len(), 0) != data.len() as isize {
            return Err(os_err("write memfd"));
        }
        libc::mmap(
            std::ptr::null_mut(),
            2 * MB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(os_err("mmap memfd"));
    }
    // SAFETY: integer fcntl.
    cvt(
        unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
            )
        },
        "F_ADD_SEALS",
    )?;
    let (child, req_w, ans_r) = spawn_reader(base as usize)?;
    use std::os::unix::fs::MetadataExt;
    let ino = |p: String| std::fs::metadata(p).map(|m| m.ino()).unwrap_or(0);
    let map_path = format!(
        "/proc/self/map_files/{:x}-{:x}",
        base as usize,
        base as usize + 2 * MB
    );
    let before = (ino(format!("/proc/self/fd/{fd}")), ino(map_path.clone()));
    if before.0 != before.1 {
        return Err("descriptor and mapping are not one object before the checkpoint".into());
    }
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    let after = (ino(format!("/proc/self/fd/{fd}")), ino(map_path));
    c.ok(
        "descriptor and mapping are one object",
        after.0 == after.1 && after.0 != 0,
    );
    let mut now = vec![0u8; 3 * MB];
    // SAFETY: reads into a live buffer.
    let n = unsafe { libc::pread(fd, now.as_mut_ptr().cast(), now.len(), 0) };
    c.eq("size read", 3 * MB as isize, n);
    c.ok("whole content, unmapped part included", now == data);
    // SAFETY: integer fcntl.
    c.eq("seals", libc::F_SEAL_GROW | libc::F_SEAL_SHRINK, unsafe {
        libc::fcntl(fd, libc::F_GET_SEALS)
    });
    // A write through the descriptor shows in the child's mapping.
    let b = [0xeeu8];
    // SAFETY: writes one byte.
    unsafe { libc::pwrite(fd, b.as_ptr().cast(), 1, 4321) };
    c.eq(
        "child sees a write through the fd",
        ask(req_w, ans_r, 4321),
        Some(0xee),
    );
    // SAFETY: the mapping is 2 MiB.
    unsafe { *(base as *mut u8).add(MB + 7) = 0x11 };
    c.eq(
        "child sees a write through the mapping",
        ask(req_w, ans_r, (MB + 7) as u32),
        Some(0x11),
    );
    // SAFETY: closing the request pipe ends the child, then reap it.
    unsafe {
        libc::close(req_w);
        let mut st = 0;
        libc::waitpid(child, &mut st, 0);
    }
    c.finish()
}

/// A job with its own network namespace (`run --net`): loopback up, an
/// abstract unix listener (abstract names belong to the namespace) and a
/// socket pair. After restore: a new namespace with loopback up again, the
/// listener accepting, the pair carrying data.
pub fn job_net(ctx: &Ctx) -> CaseResult {
    must_be_job()?;
    let lo_up = || -> bool {
        // SAFETY: a plain socket and SIOCGIFFLAGS on a zeroed ifreq.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let mut ifr: libc::ifreq = std::mem::zeroed();
            ifr.ifr_name[0] = b'l' as libc::c_char;
            ifr.ifr_name[1] = b'o' as libc::c_char;
            let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) == 0
                && ifr.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0;
            libc::close(s);
            ok
        }
    };
    if !lo_up() {
        return Err("loopback is down in the job's network namespace".into());
    }
    let (l, a, len) = crate::later::listen_abstract("zdtm-job-net")?;
    let mut pair = [0i32; 2];
    // SAFETY: socketpair fills `pair`.
    cvt(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) },
        "socketpair",
    )?;
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    // (The harness checks the namespace is not the node's.)
    c.ok("loopback up after restore", lo_up());
    // SAFETY: connect/accept/send/recv on our own sockets.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        c.ok(
            "abstract listener accepts in the job's namespace",
            libc::connect(s, &a as *const _ as *const libc::sockaddr, len) == 0
                && libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) >= 0,
        );
        let msg = b"dgram";
        libc::send(pair[0], msg.as_ptr().cast(), msg.len(), 0);
        let mut buf = [0u8; 8];
        let n = libc::recv(pair[1], buf.as_mut_ptr().cast(), 8, 0);
        c.eq("pair carries data", &msg[..], &buf[..n.max(0) as usize]);
    }
    c.finish()
}

/// A process in a time namespace of its own (monotonic clock 1000 s and
/// boot time 2000 s ahead of the node's): it enters one by unsharing it,
/// setting the offsets and exec'ing itself again. After restore the
/// offsets are the same and the clocks did not jump back.
pub fn time_ns(ctx: &Ctx) -> CaseResult {
    const MONO: i64 = 1000;
    const BOOT: i64 = 2000;
    let offsets = || read_text("/proc/self/timens_offsets");
    let want = |o: &str| {
        o.split_whitespace().collect::<Vec<_>>()
            == ["monotonic", "1000", "0", "boottime", "2000", "0"]
    };
    if !want(&offsets()) {
        if std::env::var_os("ZDTM_TIMENS").is_some() {
            return Err(format!(
                "exec did not enter the new time namespace: {}",
                offsets()
            ));
        }
        nix_unshare_time()?;
        std::fs::write(
            "/proc/self/timens_offsets",
            format!("monotonic {MONO} 0\nboottime {BOOT} 0\n"),
        )
        .map_err(|e| format!("write timens_offsets: {e}"))?;
        // The namespace is for children and for the next exec.
        let args: Vec<CString> = std::env::args().map(|a| cstr(&a)).collect();
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        std::env::set_var("ZDTM_TIMENS", "1");
        // SAFETY: argv is a NULL-terminated array of live C strings.
        unsafe { libc::execv(c"/proc/self/exe".as_ptr(), argv.as_ptr()) };
        return Err(os_err("exec in the new time namespace"));
    }
    let mono = clock_ns(libc::CLOCK_MONOTONIC);
    let boot = clock_ns(libc::CLOCK_BOOTTIME);
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.ok("offsets kept", want(&offsets()));
    c.ok(
        "monotonic clock did not jump back",
        clock_ns(libc::CLOCK_MONOTONIC) >= mono,
    );
    c.ok(
        "boot time clock did not jump back",
        clock_ns(libc::CLOCK_BOOTTIME) >= boot,
    );
    c.finish()
}

fn nix_unshare_time() -> CaseResult {
    // SAFETY: unshare with a namespace flag only.
    cvt(
        unsafe { libc::unshare(libc::CLONE_NEWTIME) },
        "unshare(CLONE_NEWTIME)",
    )
    .map(|_| ())
}

/// The names in a directory, sorted.
fn dir_names(dir: &str) -> Result<Vec<String>, String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("list {dir}: {e}"))?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    v.sort();
    Ok(v)
}

/// (dev, ino) of what `fd` is open on.
fn fd_dev_ino(fd: i32) -> Result<(u64, u64), String> {
    // SAFETY: fstat into a zeroed local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    cvt(unsafe { libc::fstat(fd, &mut st) }, &format!("fstat {fd}"))?;
    Ok((st.st_dev, st.st_ino))
}

/// A file in the job's own /dev/shm (a private tmpfs), written, held open
/// and unlinked, as Open MPI does with its /dev/shm/open_mpi.NNNN backing
/// file. The restore must recreate it where the job sees it, not in the
/// node's /dev/shm. After restore: the descriptor reads the same content at
/// the same offset, is still unlinked (st_nlink 0, "(deleted)") and on the
/// job's /dev/shm, and /dev/shm lists what it listed before (the name is
/// free again: the file recreated to reopen it is gone).
pub fn job_unlinked_shm(ctx: &Ctx) -> CaseResult {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    must_be_job()?;
    const PATH: &str = "/dev/shm/zdtm-shm.0000";
    let data = pattern_bytes(300_000, 240);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(PATH)
        .map_err(|e| format!("create {PATH}: {e}"))?;
    f.write_all(&data)
        .map_err(|e| format!("write {PATH}: {e}"))?;
    f.seek(SeekFrom::Start(12345))
        .map_err(|e| format!("seek: {e}"))?;
    std::fs::remove_file(PATH).map_err(|e| format!("unlink {PATH}: {e}"))?;
    let fd = f.as_raw_fd();
    let link = || readlink(&format!("/proc/self/fd/{fd}"));
    let meta = |f: &std::fs::File| {
        f.metadata()
            .map(|m| (m.nlink(), m.len(), m.mode()))
            .map_err(|e| format!("fstat: {e}"))
    };
    let before = meta(&f)?;
    let want_link = format!("{PATH} (deleted)");
    if before.0 != 0 || link() != want_link {
        return Err(format!(
            "unexpected state before checkpoint: {before:?}, {}",
            link()
        ));
    }
    let names = dir_names("/dev/shm")?;
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq("(st_nlink, size, mode)", Ok(before), meta(&f));
    c.eq("descriptor's link", want_link, link());
    c.eq(
        "offset",
        Ok(12345),
        f.stream_position().map_err(|e| e.to_string()),
    );
    c.ok(
        "content",
        crate::files::pread_fd(fd, data.len() + 1, 0)? == data,
    );
    c.eq(
        "on the job's /dev/shm (st_dev)",
        std::fs::metadata("/dev/shm").map(|m| m.dev()).ok(),
        fd_dev_ino(fd).ok().map(|d| d.0),
    );
    c.ok(
        &format!("{PATH} does not exist"),
        std::fs::symlink_metadata(PATH).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
    );
    c.eq("/dev/shm entries", Ok(names), dir_names("/dev/shm"));
    c.finish()
}

/// A FIFO made in the job's own /tmp (a private tmpfs), open at both ends,
/// holding bytes written and not read yet. The restore must open it where
/// the job sees it, not in the node's /tmp. After restore: exactly those
/// bytes come out, the FIFO is still at its path, both descriptors are
/// that FIFO (same dev and inode as the path) and it carries new data.
pub fn job_fifo_tmp(ctx: &Ctx) -> CaseResult {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    must_be_job()?;
    const PATH: &str = "/tmp/zdtm-fifo-tmp";
    let cpath = cstr(PATH);
    // SAFETY: a NUL-terminated path.
    cvt(unsafe { libc::mkfifo(cpath.as_ptr(), 0o640) }, "mkfifo")?;
    // SAFETY: opens with a NUL-terminated path: the read end first and
    // non-blocking (so that a lost queue fails the read, not hangs it),
    // then the write end, which has a reader.
    let (rd, wr) = unsafe {
        let rd = cvt(
            libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK),
            "open fifo for reading",
        )?;
        let wr = cvt(
            libc::open(cpath.as_ptr(), libc::O_WRONLY),
            "open fifo for writing",
        )?;
        (rd, wr)
    };
    let data = pattern_bytes(5000, 241);
    // SAFETY: writes from a live buffer.
    if unsafe { libc::write(wr, data.as_ptr().cast(), data.len()) } != data.len() as isize {
        return Err(os_err("write fifo"));
    }
    let fifo_at_path = || {
        std::fs::symlink_metadata(PATH)
            .map(|m| {
                (
                    m.file_type().is_fifo(),
                    m.mode() & 0o7777,
                    (m.dev(), m.ino()),
                )
            })
            .map_err(|e| format!("stat {PATH}: {e}"))
    };
    let before = fifo_at_path()?;
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    let after = fifo_at_path();
    c.eq(
        "FIFO at its path (is FIFO, mode)",
        Ok((true, before.1)),
        after.clone().map(|a| (a.0, a.1)),
    );
    let path_id = after.ok().map(|a| a.2);
    c.eq(
        "read end is the FIFO at the path",
        path_id,
        fd_dev_ino(rd).ok(),
    );
    c.eq(
        "write end is the FIFO at the path",
        path_id,
        fd_dev_ino(wr).ok(),
    );
    // SAFETY: integer fcntls.
    let flags =
        |fd: i32| unsafe { libc::fcntl(fd, libc::F_GETFL) } & (libc::O_ACCMODE | libc::O_NONBLOCK);
    c.eq(
        "access modes and O_NONBLOCK (read end, write end)",
        (libc::O_RDONLY | libc::O_NONBLOCK, libc::O_WRONLY),
        (flags(rd), flags(wr)),
    );
    let read = || -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: reads into a live buffer.
        let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    };
    c.eq(
        "bytes kept in the FIFO",
        Ok(data),
        read().map_err(|e| e.to_string()),
    );
    // And nothing after them (non-blocking: EAGAIN).
    c.eq(
        "nothing after them",
        Err(Some(libc::EAGAIN)),
        read().map_err(|e| e.raw_os_error()),
    );
    // SAFETY: writes a static buffer.
    let n = unsafe { libc::write(wr, b"more".as_ptr().cast(), 4) };
    c.eq("write after restore", 4, n);
    c.eq(
        "read after restore",
        Ok(b"more".to_vec()),
        read().map_err(|e| e.to_string()),
    );
    c.finish()
}
