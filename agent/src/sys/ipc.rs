//! SysV IPC (shm, sem, msg), POSIX message queue and mqueue-mount
//! syscalls, which nix does not wrap. They act on the IPC namespace of the
//! calling thread, so callers run them on a thread that entered the
//! namespace they mean (see `crate::ipc`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `msgrcv` flag: copy the message at an index without dequeuing it.
pub const MSG_COPY: i32 = 0o40000;
/// `ipc_perm.mode` bit of a segment removed (IPC_RMID) while attached.
pub const SHM_DEST: u32 = 0o1000;
/// `ipc_perm.mode` bit of a segment locked in memory (SHM_LOCK).
pub const SHM_LOCKED: u32 = 0o2000;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Owner and permissions of a SysV object, as IPC_STAT shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Perm {
    pub key: i32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    /// Permission bits and, for shm, SHM_DEST and SHM_LOCKED.
    pub mode: u32,
}

impl Perm {
    fn from_raw(p: &libc::ipc_perm) -> Self {
        Perm {
            key: p.__key,
            uid: p.uid,
            gid: p.gid,
            cuid: p.cuid,
            cgid: p.cgid,
            mode: p.mode as u32,
        }
    }

    fn set_raw(&self, p: &mut libc::ipc_perm) {
        p.uid = self.uid;
        p.gid = self.gid;
        p.mode = (self.mode & 0o777) as libc::c_ushort;
    }
}

// ---- shared memory ----

/// shmget(2): returns the segment id.
pub fn shm_get(key: i32, size: u64, flags: i32) -> io::Result<i32> {
    // SAFETY: no pointers are passed.
    check(unsafe { libc::shmget(key, size as libc::size_t, flags) })
}

fn shm_ds(id: i32) -> io::Result<libc::shmid_ds> {
    // SAFETY: shmid_ds is plain data (integers); all zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds through a valid pointer.
    check(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) })?;
    Ok(ds)
}

/// IPC_STAT of a segment: its perms, size and number of attachments.
pub fn shm_stat(id: i32) -> io::Result<(Perm, u64, u64)> {
    let ds = shm_ds(id)?;
    Ok((
        Perm::from_raw(&ds.shm_perm),
        ds.shm_segsz as u64,
        ds.shm_nattch,
    ))
}

/// IPC_SET of a segment: owner uid/gid and permission bits.
pub fn shm_set(id: i32, perm: &Perm) -> io::Result<()> {
    let mut ds = shm_ds(id)?;
    perm.set_raw(&mut ds.shm_perm);
    // SAFETY: IPC_SET reads one shmid_ds through a valid pointer.
    check(unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) }).map(drop)
}

/// A shmctl command without a buffer (IPC_RMID, SHM_LOCK, SHM_UNLOCK).
pub fn shm_ctl(id: i32, cmd: i32) -> io::Result<()> {
    // SAFETY: these commands take no buffer; null is what they expect.
    check(unsafe { libc::shmctl(id, cmd, std::ptr::null_mut()) }).map(drop)
}

/// A segment attached to the calling process; detached on drop.
pub struct ShmAttach {
    addr: *mut u8,
    len: usize,
    writable: bool,
}

impl ShmAttach {
    /// Attaches segment `id` (its whole size) wherever the kernel likes.
    pub fn new(id: i32, writable: bool) -> io::Result<Self> {
        let (_, size, _) = shm_stat(id)?;
        let flags = if writable { 0 } else { libc::SHM_RDONLY };
        // SAFETY: a null address lets the kernel pick a free range; the
        // mapping is owned by the returned value and detached on drop.
        let p = unsafe { libc::shmat(id, std::ptr::null(), flags) };
        if p as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(ShmAttach {
            addr: p.cast(),
            len: size as usize,
            writable,
        })
    }

    /// The segment's bytes. Other processes attached to it may change
    /// them: callers read while those processes are frozen (dump) or
    /// before any runs (restore).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: addr..addr+len is mapped (readable) for as long as self
        // lives; the segment's size cannot change after creation.
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
    }

    /// The segment's bytes, writable (only for an attachment made with
    /// `writable`; see `bytes` about other users).
    pub fn bytes_mut(&mut self) -> io::Result<&mut [u8]> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        // SAFETY: as in `bytes`, and the attachment is read-write; the
        // &mut self borrow makes this the only slice of it in this process.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) })
    }
}

impl Drop for ShmAttach {
    fn drop(&mut self) {
        // SAFETY: addr is the address shmat returned, attached until now;
        // no slice of it outlives self.
        unsafe { libc::shmdt(self.addr.cast()) };
    }
}

// ---- semaphores ----

/// semget(2): returns the set id.
pub fn sem_get(key: i32, nsems: i32, flags: i32) -> io::Result<i32> {
    // SAFETY: no pointers are passed.
    check(unsafe { libc::semget(key, nsems, flags) })
}

fn sem_ds(id: i32) -> io::Result<libc::semid_ds> {
    // SAFETY: semid_ds is plain data; all zero is a valid value.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one semid_ds through the pointer passed as
    // the union semun argument.
    check(unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) })?;
    Ok(ds)
}

/// IPC_STAT of a semaphore set: its perms and number of semaphores.
pub fn sem_stat(id: i32) -> io::Result<(Perm, u64)> {
    let ds = sem_ds(id)?;
    Ok((Perm::from_raw(&ds.sem_perm), ds.sem_nsems as u64))
}

/// IPC_SET of a semaphore set: owner uid/gid and permission bits.
pub fn sem_set(id: i32, perm: &Perm) -> io::Result<()> {
    let mut ds = sem_ds(id)?;
    perm.set_raw(&mut ds.sem_perm);
    // SAFETY: IPC_SET reads one semid_ds through the semun pointer.
    check(unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) }).map(drop)
}

/// GETALL: the values of the set's semaphores.
pub fn sem_getall(id: i32) -> io::Result<Vec<u16>> {
    let (_, n) = sem_stat(id)?;
    let mut v = vec![0u16; n as usize];
    // SAFETY: GETALL writes sem_nsems shorts through the semun pointer,
    // and v holds that many.
    check(unsafe { libc::semctl(id, 0, libc::GETALL, v.as_mut_ptr()) })?;
    Ok(v)
}

/// SETALL: sets every semaphore of the set (`values` has one per semaphore).
pub fn sem_setall(id: i32, values: &[u16]) -> io::Result<()> {
    let (_, n) = sem_stat(id)?;
    if n as usize != values.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: SETALL reads sem_nsems shorts through the semun pointer, and
    // values holds exactly that many.
    check(unsafe { libc::semctl(id, 0, libc::SETALL, values.as_ptr()) }).map(drop)
}

// ---- message queues ----

/// msgget(2): returns the queue id.
pub fn msg_get(key: i32, flags: i32) -> io::Result<i32> {
    // SAFETY: no pointers are passed.
    check(unsafe { libc::msgget(key, flags) })
}

fn msg_ds(id: i32) -> io::Result<libc::msqid_ds> {
    // SAFETY: msqid_ds is plain data; all zero is a valid value.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one msqid_ds through a valid pointer.
    check(unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) })?;
    Ok(ds)
}

/// IPC_STAT of a message queue.
#[derive(Debug, Clone, Copy)]
pub struct MsgStat {
    pub perm: Perm,
    /// Number of messages queued.
    pub qnum: u64,
    /// Most bytes the queue may hold.
    pub qbytes: u64,
    /// Bytes queued.
    pub cbytes: u64,
}

/// IPC_STAT of a message queue.
pub fn msg_stat(id: i32) -> io::Result<MsgStat> {
    let ds = msg_ds(id)?;
    Ok(MsgStat {
        perm: Perm::from_raw(&ds.msg_perm),
        qnum: ds.msg_qnum,
        qbytes: ds.msg_qbytes,
        cbytes: ds.__msg_cbytes,
    })
}

/// IPC_SET of a queue: owner uid/gid, permission bits and qbytes.
pub fn msg_set(id: i32, perm: &Perm, qbytes: u64) -> io::Result<()> {
    let mut ds = msg_ds(id)?;
    perm.set_raw(&mut ds.msg_perm);
    ds.msg_qbytes = qbytes as libc::msglen_t;
    // SAFETY: IPC_SET reads one msqid_ds through a valid pointer.
    check(unsafe { libc::msgctl(id, libc::IPC_SET, &mut ds) }).map(drop)
}

/// IPC_RMID of a queue.
pub fn msg_rmid(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    check(unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) }).map(drop)
}

/// IPC_RMID of a semaphore set.
pub fn sem_rmid(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no semun argument.
    check(unsafe { libc::semctl(id, 0, libc::IPC_RMID) }).map(drop)
}

/// Copies message number `index` (0 = oldest) of queue `id` without
/// dequeuing it (MSG_COPY), as (type, text); None past the last one.
/// `max` bounds the text size (the namespace's msgmax); a longer message
/// is an error, never truncated.
pub fn msg_copy(id: i32, index: u64, max: usize) -> io::Result<Option<(i64, Vec<u8>)>> {
    // struct msgbuf: long mtype, then the text.
    let mut buf = vec![0u8; 8 + max];
    // SAFETY: buf holds an mtype and `max` bytes of text; msgrcv writes at
    // most that (and with MSG_COPY first reads as many, all initialized).
    let n = unsafe {
        libc::msgrcv(
            id,
            buf.as_mut_ptr().cast(),
            max,
            index as libc::c_long,
            MSG_COPY | libc::IPC_NOWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOMSG) => Ok(None),
            _ => Err(e),
        };
    }
    let mtype = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
    buf.truncate(8 + n as usize);
    buf.drain(..8);
    Ok(Some((mtype, buf)))
}

/// msgsnd(2) without waiting: queues one message of type `mtype`.
pub fn msg_send(id: i32, mtype: i64, text: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(8 + text.len());
    buf.extend_from_slice(&mtype.to_ne_bytes());
    buf.extend_from_slice(text);
    // SAFETY: buf holds an mtype followed by text.len() bytes of text.
    check(unsafe { libc::msgsnd(id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) }).map(drop)
}

// ---- POSIX message queues ----

fn mq_name(name: &str) -> io::Result<CString> {
    CString::new(format!("/{name}")).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// mq_open(3) of queue `name` (without the leading slash). With O_CREAT,
/// `create` gives the mode and (maxmsg, msgsize).
pub fn mq_open(name: &str, flags: i32, create: Option<(u32, i64, i64)>) -> io::Result<OwnedFd> {
    let cname = mq_name(name)?;
    let fd = match create {
        Some((mode, maxmsg, msgsize)) => {
            // SAFETY: mq_attr is plain data; all zero is a valid value.
            let mut attr: libc::mq_attr = unsafe { std::mem::zeroed() };
            attr.mq_maxmsg = maxmsg;
            attr.mq_msgsize = msgsize;
            // SAFETY: cname is a C string; with O_CREAT mq_open reads a
            // mode_t and a valid mq_attr pointer.
            unsafe {
                libc::mq_open(
                    cname.as_ptr(),
                    flags | libc::O_CREAT,
                    mode as libc::mode_t,
                    &attr as *const libc::mq_attr,
                )
            }
        }
        // SAFETY: cname is a C string; without O_CREAT nothing else is read.
        None => unsafe { libc::mq_open(cname.as_ptr(), flags) },
    };
    check(fd)?;
    // SAFETY: on Linux a queue descriptor is a file descriptor, new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// mq_unlink(3) of queue `name` (without the leading slash).
pub fn mq_unlink(name: &str) -> io::Result<()> {
    let cname = mq_name(name)?;
    // SAFETY: cname is a C string.
    check(unsafe { libc::mq_unlink(cname.as_ptr()) }).map(drop)
}

/// mq_getattr(3): (maxmsg, msgsize, curmsgs).
pub fn mq_getattr(fd: BorrowedFd<'_>) -> io::Result<(i64, i64, i64)> {
    // SAFETY: mq_attr is plain data; all zero is a valid value.
    let mut attr: libc::mq_attr = unsafe { std::mem::zeroed() };
    // SAFETY: mq_getattr writes one mq_attr through a valid pointer.
    check(unsafe { libc::mq_getattr(fd.as_raw_fd(), &mut attr) })?;
    Ok((attr.mq_maxmsg, attr.mq_msgsize, attr.mq_curmsgs))
}

/// Takes the first message of a queue opened O_NONBLOCK into `buf` (at
/// least msgsize bytes): (length, priority), or None when it is empty.
pub fn mq_receive(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<(usize, u32)>> {
    let mut prio: libc::c_uint = 0;
    // SAFETY: buf is valid for buf.len() bytes, prio is a valid out-pointer
    // and a null timeout is allowed.
    let n = unsafe {
        libc::mq_timedreceive(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut prio,
            std::ptr::null(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some((n as usize, prio)))
}

/// mq_send(3) of one message with priority `prio`.
pub fn mq_send(fd: BorrowedFd<'_>, msg: &[u8], prio: u32) -> io::Result<()> {
    // SAFETY: msg is valid for msg.len() bytes.
    check(unsafe { libc::mq_send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), prio) }).map(drop)
}

/// mq_notify(3) registration without a signal (SIGEV_NONE): the caller
/// becomes the queue's notification owner.
pub fn mq_notify_none(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: sigevent is plain data; all zero is a valid value.
    let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
    ev.sigev_notify = libc::SIGEV_NONE;
    // SAFETY: mq_notify reads one sigevent through a valid pointer.
    check(unsafe { libc::mq_notify(fd.as_raw_fd(), &ev) }).map(drop)
}

/// A detached mount (in no mount namespace) of the mqueue filesystem of
/// the calling thread's IPC namespace: fsopen, fsconfig, fsmount. It lists
/// the namespace's queues and goes away when the descriptor is closed.
pub fn mqueue_mount() -> io::Result<OwnedFd> {
    const FSOPEN_CLOEXEC: u64 = 1;
    const FSCONFIG_CMD_CREATE: u64 = 6;
    const FSMOUNT_CLOEXEC: u64 = 1;
    let syscall_fd = |r: libc::c_long| -> io::Result<OwnedFd> {
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
    };
    // SAFETY: the name is a C string literal.
    let fs =
        syscall_fd(unsafe { libc::syscall(libc::SYS_fsopen, c"mqueue".as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: FSCONFIG_CMD_CREATE takes no key, value or aux argument.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: no pointers are passed.
    syscall_fd(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) })
}

// ---- per-thread credentials ----

/// Sets the calling thread's (only) effective uid, with setresuid(2)
/// straight, not through libc which would change every thread. Objects
/// it creates then have that creator uid.
pub fn thread_set_euid(euid: u32) -> io::Result<()> {
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, u32::MAX, euid, u32::MAX) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's (only) effective gid; see `thread_set_euid`.
pub fn thread_set_egid(egid: u32) -> io::Result<()> {
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::syscall(libc::SYS_setresgid, u32::MAX, egid, u32::MAX) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
