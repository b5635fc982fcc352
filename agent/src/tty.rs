//! Terminals: pty pairs inside the checkpoint, controlling terminals, and
//! (`--shell-job`) the terminal of the caller outside the tree.
//!
//! A pty pair is recreated once, by the agent, when the first of its ends
//! comes up: it opens the task's `/dev/ptmx` until the kernel hands out the
//! dumped index (closing the others), sets termios, window size and packet
//! mode through the master, and unlocks the slave; the master goes to the
//! task over SCM_RIGHTS, slaves are reopened by path in the task. A locked
//! pty is locked again once every process is built. Bytes buffered in a pty
//! cannot be peeked, so a dump refuses a pty with unread bytes at either
//! end. A session leader whose controlling terminal is a pair of the
//! checkpoint gets it back with TIOCSCTTY, and the terminal's foreground
//! group with TIOCSPGRP.
//!
//! Terminals outside the tree are refused unless dumped with
//! `--shell-job`: then they are "the restorer's terminal", reopened on
//! restore from the restoring agent's stdin; the restored tree joins the
//! agent's session, and the root's group becomes the terminal's
//! foreground group if it was at dump.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ckpt_proto::image::{Ctty, FdTable, FileKind, OpenFile, Tty};
use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::inject::{Remote, Scratch};
use crate::proc;
use crate::sys::tty as sys;

/// Majors of pty slaves (/dev/pts/N); the index is (major - 136) * 256 + minor.
const PTY_SLAVE_MAJORS: std::ops::RangeInclusive<u64> = 136..=143;

fn major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}
fn minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}

/// The pty index of a slave device number, if it is one.
fn slave_index(rdev: u64) -> Option<u32> {
    let m = major(rdev);
    PTY_SLAVE_MAJORS
        .contains(&m)
        .then(|| ((m - 136) * 256 + minor(rdev)) as u32)
}

/// Whether a character device is a terminal this module handles: a pty
/// master (5:2), a pty slave, a virtual console or serial line (major 4),
/// /dev/tty (5:0) or /dev/console (5:1).
pub fn is_terminal(rdev: u64) -> bool {
    let m = major(rdev);
    m == 4 || (m == 5 && minor(rdev) <= 2) || PTY_SLAVE_MAJORS.contains(&m)
}

fn is_master(rdev: u64) -> bool {
    major(rdev) == 5 && minor(rdev) == 2
}

fn state(pid: i32, fd: i32, file: std::os::fd::BorrowedFd<'_>) -> Result<Tty> {
    let t = sys::get_termios(file).map_err(|e| Error::sys(pid, format!("TCGETS2 fd {fd}"), e))?;
    let w =
        sys::get_winsize(file).map_err(|e| Error::sys(pid, format!("TIOCGWINSZ fd {fd}"), e))?;
    Ok(Tty {
        iflag: t.c_iflag,
        oflag: t.c_oflag,
        cflag: t.c_cflag,
        lflag: t.c_lflag,
        line: u32::from(t.c_line),
        cc: t.c_cc.to_vec(),
        ispeed: t.c_ispeed,
        ospeed: t.c_ospeed,
        rows: u32::from(w.ws_row),
        cols: u32::from(w.ws_col),
        xpixel: u32::from(w.ws_xpixel),
        ypixel: u32::from(w.ws_ypixel),
        ..Default::default()
    })
}

/// Reads a terminal descriptor (`fd` of stopped process `pid`, our copy
/// `file`) into `of`: a pty master with the pair's state, a pty slave
/// (which `link` later finds inside or outside the tree), or another
/// terminal, which only `--shell-job` accepts. Refuses a pty with bytes
/// not yet read, which cannot be copied without consuming them.
pub fn dump(pid: i32, fd: i32, file: &std::fs::File, of: &mut OpenFile) -> Result<()> {
    let queued = |what: &str, n: u32, dir: &str| {
        Error::Refused {
        pid,
        reason: format!(
            "fd {fd} ({}): {n} bytes {dir} are still queued in the {what} and cannot be saved; let the program read them and retry",
            of.path
        ),
    }
    };
    let ioerr = |what: &str, e: std::io::Error| Error::sys(pid, format!("{what} fd {fd}"), e);
    if is_master(of.rdev) {
        let f = file.as_fd();
        let mut t = state(pid, fd, f)?;
        t.index = sys::pty_index(f).map_err(|e| ioerr("TIOCGPTN", e))?;
        t.locked = sys::pty_locked(f).map_err(|e| ioerr("TIOCGPTLCK", e))?;
        t.packet = sys::packet_mode(f).map_err(|e| ioerr("TIOCGPKT", e))?;
        t.rdev = of.rdev;
        let dir = format!("from /dev/pts/{}", t.index);
        match sys::input_queued(f).map_err(|e| ioerr("FIONREAD", e))? {
            0 => {}
            n => return Err(queued("pty master", n, &dir)),
        }
        match sys::output_queued(f).map_err(|e| ioerr("TIOCOUTQ", e))? {
            0 => {}
            n => {
                return Err(queued(
                    "pty master",
                    n,
                    &format!("for /dev/pts/{}", t.index),
                ))
            }
        }
        of.kind = FileKind::FilePtyMaster as i32;
        of.tty = Some(t);
        return Ok(());
    }
    if let Some(index) = slave_index(of.rdev) {
        let f = file.as_fd();
        let mut t = state(pid, fd, f)?;
        t.index = index;
        t.rdev = of.rdev;
        match sys::input_queued(f).map_err(|e| ioerr("FIONREAD", e))? {
            0 => {}
            n => return Err(queued("pty slave", n, "of input")),
        }
        of.kind = FileKind::FilePtySlave as i32;
        of.tty = Some(t);
        return Ok(());
    }
    of.kind = FileKind::FileExtTty as i32;
    of.tty = Some(Tty {
        rdev: of.rdev,
        ..Default::default()
    });
    Ok(())
}

/// The controlling terminal of stopped process `pid`, if any.
pub fn dump_ctty(pid: i32) -> Result<Option<Ctty>> {
    let st = proc::stat(pid, None)?;
    let tty_nr = st.field(7) as u32;
    if tty_nr == 0 {
        return Ok(None);
    }
    Ok(Some(Ctty {
        tty_nr,
        fg_pgrp: st.field(8) as i32,
        leader: st.field(6) as i32 == pid,
        ..Default::default()
    }))
}

/// tty_nr of /proc/PID/stat as a pty index.
fn ctty_index(tty_nr: u32) -> Option<u32> {
    let (maj, min) = (
        (tty_nr >> 8) & 0xfff,
        (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00),
    );
    PTY_SLAVE_MAJORS
        .contains(&u64::from(maj))
        .then(|| (maj - 136) * 256 + min)
}

/// Processes outside `tree` holding the slave /dev/pts/`index` of the
/// devpts instance `root` (a process of the tree) sees. Matched by device
/// and devpts instance: every instance (a job's own, say) has a pts/0.
fn outside_holders(index: u32, root: i32, tree: &HashSet<i32>) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let target = format!("/dev/pts/{index}");
    let ident = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.rdev()));
    let Some(slave) = ident(&format!("/proc/{root}/root{target}")) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        if tree.contains(&pid) || pid == std::process::id() as i32 {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        if fds
            .filter_map(|e| e.ok())
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new(&target)))
            .any(|e| ident(&e.path().to_string_lossy()) == Some(slave))
        {
            out.push(pid);
        }
    }
    out
}

/// Links the terminals of a whole tree (`tables` in host PIDs, root
/// first): a slave whose master is dumped too is one end of a pair of the
/// checkpoint; any other terminal is the caller's (accepted with
/// `shell_job`, else refused naming pid, fd and terminal). A pty whose
/// slave is held outside the tree is refused. Controlling terminals are
/// resolved the same way.
pub fn link(tables: &mut [FdTable], shell_job: bool, snapshots: &[i32]) -> Result<()> {
    let tree: HashSet<i32> = tables
        .iter()
        .map(|t| t.pid)
        .chain(snapshots.iter().copied())
        .collect();
    let root = tables.first().map_or(0, |t| t.pid);
    let mut masters: HashMap<u32, (i32, u64)> = HashMap::new();
    for t in tables.iter() {
        for f in t
            .files
            .iter()
            .filter(|f| f.kind == FileKind::FilePtyMaster as i32)
        {
            let index = f.tty.as_ref().map_or(0, |t| t.index);
            let owner = (f.owner_pid, f.shared_id);
            match masters.get(&index) {
                Some(&(p, s)) if s == 0 || s != owner.1 => {
                    return Err(Error::Refused {
                        pid: t.pid,
                        reason: format!(
                            "pty master of /dev/pts/{index} is open twice (also in process {p}) as separate open files; not supported yet"
                        ),
                    })
                }
                _ => {
                    masters.insert(index, owner);
                }
            }
        }
    }
    for &index in masters.keys() {
        let others = outside_holders(index, root, &tree);
        if let Some(p) = others.first() {
            return Err(Error::Refused {
                pid: root,
                reason: format!(
                    "/dev/pts/{index}, the slave of a pty master in the tree, is held by process {p} outside it"
                ),
            });
        }
    }
    for t in tables.iter_mut() {
        let pid = t.pid;
        for f in t.files.iter_mut() {
            let kind = f.kind;
            if kind != FileKind::FilePtySlave as i32 && kind != FileKind::FileExtTty as i32 {
                continue;
            }
            let index = f.tty.as_ref().map_or(0, |t| t.index);
            if kind == FileKind::FilePtySlave as i32 && masters.contains_key(&index) {
                continue;
            }
            f.kind = FileKind::FileExtTty as i32;
        }
        let outside = t.fds.iter().find(|d| {
            t.files
                .iter()
                .any(|f| f.id == d.file_id && f.kind == FileKind::FileExtTty as i32)
        });
        if let (Some(d), false) = (outside, shell_job) {
            let path = &t
                .files
                .iter()
                .find(|f| f.id == d.file_id)
                .expect("found")
                .path;
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "fd {} is the terminal {path} of a session outside the dumped processes; dump with --shell-job to reopen it on the restoring terminal",
                    d.fd
                ),
            });
        }
        let Some(c) = t.ctty.as_mut() else { continue };
        match ctty_index(c.tty_nr).filter(|i| masters.contains_key(i)) {
            Some(index) => {
                c.in_tree = true;
                c.pty_index = index;
            }
            None if c.leader && pid != root => {
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "it leads a session whose controlling terminal (tty_nr {:#x}) is outside the dumped processes; not supported",
                        c.tty_nr
                    ),
                });
            }
            None => {
                c.external = true;
                c.foreground = pid == root
                    && proc::stat(pid, None).is_ok_and(|s| s.field(5) as i32 == c.fg_pgrp);
            }
        }
    }
    Ok(())
}

/// Whether the images hold terminals of the caller (dumped with
/// `--shell-job`), which only a `--shell-job` restore reopens; checked
/// before anything is created.
pub fn check_restore(tables: &[&FdTable], shell_job: bool) -> Result<()> {
    for t in tables {
        if let Some(f) = t
            .files
            .iter()
            .find(|f| f.kind == FileKind::FileExtTty as i32)
        {
            if !shell_job {
                return Err(Error::Refused {
                    pid: t.pid,
                    reason: format!(
                        "it had the terminal {} of the dumping shell open: restore with --shell-job to reopen it on this terminal",
                        f.path
                    ),
                });
            }
            if !sys::is_tty(std::io::stdin().as_fd()) {
                return Err(Error::Refused {
                    pid: t.pid,
                    reason: "--shell-job restore needs a terminal on the agent's stdin".into(),
                });
            }
        }
    }
    Ok(())
}

/// Whether the restored root leaves its dumped session for the agent's
/// (`--shell-job`, the root's controlling terminal was the caller's).
pub fn root_joins_agent_session(root: &FdTable, shell_job: bool) -> bool {
    shell_job && root.ctty.as_ref().is_some_and(|c| c.external)
}

/// The pty pairs of a restore: their saved state by index, and those the
/// agent has recreated (its own copy of each master).
#[derive(Default)]
pub struct Ptys {
    states: HashMap<u32, Tty>,
    masters: HashMap<u32, OwnedFd>,
}

impl Ptys {
    /// Records the state of a pair from one of its masters' open files.
    pub fn note(&mut self, of: &OpenFile) {
        if of.kind == FileKind::FilePtyMaster as i32 {
            if let Some(t) = &of.tty {
                self.states.insert(t.index, t.clone());
            }
        }
    }

    /// Recreates pair `index` once, in the devpts instance that the task
    /// `host` (agent's view) sees at /dev/pts.
    fn ensure(&mut self, pid: i32, host: i32, index: u32) -> Result<&OwnedFd> {
        if !self.masters.contains_key(&index) {
            let master = create_pair(pid, host, index, self.states.get(&index))?;
            self.masters.insert(index, master);
        }
        Ok(&self.masters[&index])
    }
}

fn create_pair(pid: i32, host: i32, index: u32, state: Option<&Tty>) -> Result<OwnedFd> {
    let state = state.ok_or_else(|| Error::Refused {
        pid,
        reason: format!("/dev/pts/{index}: its pty master is missing from the images"),
    })?;
    let slave = format!("/proc/{host}/root/dev/pts/{index}");
    let taken = || Error::Refused {
        pid,
        reason: format!(
            "pty /dev/pts/{index} is taken on this node: its slave index cannot be recreated"
        ),
    };
    if Path::new(&slave).exists() {
        return Err(taken());
    }
    let ptmx = format!("/proc/{host}/root/dev/ptmx");
    // The kernel hands out the lowest free index: hold the lower ones until
    // ours comes, as CRIU does, then let them go.
    let mut lower = Vec::new();
    let master = loop {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&ptmx)
            .map_err(|e| Error::io(&ptmx, e))?;
        let got = sys::pty_index(f.as_fd()).map_err(|e| Error::sys(pid, "TIOCGPTN", e))?;
        match got.cmp(&index) {
            std::cmp::Ordering::Equal => break OwnedFd::from(f),
            std::cmp::Ordering::Less => lower.push(f),
            std::cmp::Ordering::Greater => return Err(taken()),
        }
    };
    debug!(pid, index, skipped = lower.len(), "pty pair recreated");
    drop(lower);
    let m = master.as_fd();
    let ioerr =
        |what: &str, e: std::io::Error| Error::sys(pid, format!("{what} /dev/pts/{index}"), e);
    // Start from the current settings: fields the image lacks stay.
    let mut t = sys::get_termios(m).map_err(|e| ioerr("TCGETS2", e))?;
    t.c_iflag = state.iflag;
    t.c_oflag = state.oflag;
    t.c_cflag = state.cflag;
    t.c_lflag = state.lflag;
    t.c_line = state.line as u8;
    for (d, s) in t.c_cc.iter_mut().zip(&state.cc) {
        *d = *s;
    }
    t.c_ispeed = state.ispeed;
    t.c_ospeed = state.ospeed;
    sys::set_termios(m, &t).map_err(|e| ioerr("TCSETS2", e))?;
    let w = sys::Winsize {
        ws_row: state.rows as u16,
        ws_col: state.cols as u16,
        ws_xpixel: state.xpixel as u16,
        ws_ypixel: state.ypixel as u16,
    };
    sys::set_winsize(m, &w).map_err(|e| ioerr("TIOCSWINSZ", e))?;
    if state.packet {
        sys::set_packet_mode(m, true).map_err(|e| ioerr("TIOCPKT", e))?;
    }
    // Unlocked while slaves are reopened; locked again by `finish`.
    sys::set_pty_locked(m, false).map_err(|e| ioerr("TIOCSPTLCK", e))?;
    Ok(master)
}

/// How the task gets a terminal descriptor back.
pub enum Reopen {
    /// The agent's descriptor, to pass to the task.
    Install(OwnedFd),
    /// A path for the task to open (O_NOCTTY is added by the opener).
    Path(String),
}

/// A terminal open file of process `pid` (`host` in the agent's view).
pub fn open(
    pid: i32,
    host: i32,
    of: &OpenFile,
    ptys: &mut Ptys,
    shell_job: bool,
) -> Result<Reopen> {
    let index = of.tty.as_ref().map_or(0, |t| t.index);
    match FileKind::try_from(of.kind) {
        Ok(FileKind::FilePtyMaster) => {
            let m = ptys.ensure(pid, host, index)?;
            let ours = m
                .try_clone()
                .map_err(|e| Error::sys(pid, "dup of a pty master", e))?;
            Ok(Reopen::Install(ours))
        }
        Ok(FileKind::FilePtySlave) => {
            ptys.ensure(pid, host, index)?;
            Ok(Reopen::Path(format!("/dev/pts/{index}")))
        }
        _ => {
            if !shell_job {
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "{} was the dumping shell's terminal: restore with --shell-job",
                        of.path
                    ),
                });
            }
            let access = (of.flags & libc::O_ACCMODE as u32) as i32;
            let mut o = std::fs::OpenOptions::new();
            o.read(access != libc::O_WRONLY)
                .write(access != libc::O_RDONLY)
                .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC);
            let f = o
                .open("/proc/self/fd/0")
                .map_err(|e| Error::io("/proc/self/fd/0 (the restoring terminal)", e))?;
            info!(pid, was = %of.path, "reopened on the restoring terminal");
            Ok(Reopen::Install(f.into()))
        }
    }
}

/// Makes the pty of the checkpoint the controlling terminal of session
/// leader `pid` again (TIOCSCTTY in the task, once its fds are placed), with
/// its foreground process group. Run in the task itself: both ioctls act
/// on the caller's session.
pub fn restore_ctty(
    pid: i32,
    c: &Ctty,
    remote: &Remote,
    scratch: &mut Scratch,
    ptys: &mut Ptys,
) -> Result<()> {
    if !c.leader || !c.in_tree {
        return Ok(());
    }
    ptys.ensure(pid, remote.tid.as_raw(), c.pty_index)?;
    scratch.reset();
    let path = scratch.put_cstr(&format!("/dev/pts/{}", c.pty_index))?;
    let flags = (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    let fd = remote.syscall(libc::SYS_openat, &[libc::AT_FDCWD as u64, path, flags, 0])?;
    let result = (|| -> Result<()> {
        remote.syscall(libc::SYS_ioctl, &[fd, libc::TIOCSCTTY, 0])?;
        if c.fg_pgrp > 0 && c.fg_pgrp != pid {
            let p = scratch.put(&c.fg_pgrp.to_le_bytes())?;
            remote
                .syscall(libc::SYS_ioctl, &[fd, libc::TIOCSPGRP, p])
                .map_err(|e| Error::Refused {
                    pid,
                    reason: format!(
                        "cannot make group {} the foreground of /dev/pts/{}: {e}",
                        c.fg_pgrp, c.pty_index
                    ),
                })?;
        }
        Ok(())
    })();
    remote.syscall(libc::SYS_close, &[fd])?;
    result
}

/// Once every process is built: locks again the ptys that were locked, and
/// (`--shell-job`) gives the restoring terminal's foreground to the root's
/// group (`root_pgrp`, agent's view) if it had it at dump.
pub fn finish(ptys: &Ptys, root: &FdTable, root_pgrp: Option<i32>, shell_job: bool) -> Result<()> {
    for (index, m) in &ptys.masters {
        if ptys.states.get(index).is_some_and(|s| s.locked) {
            sys::set_pty_locked(m.as_fd(), true)
                .map_err(|e| Error::sys(root.pid, format!("TIOCSPTLCK /dev/pts/{index}"), e))?;
        }
    }
    let fg = root
        .ctty
        .as_ref()
        .is_some_and(|c| c.external && c.foreground);
    if let (true, true, Some(pgrp)) = (shell_job, fg, root_pgrp) {
        let stdin = std::io::stdin();
        sys::set_foreground(stdin.as_fd(), pgrp).map_err(|e| {
            Error::sys(
                root.pid,
                format!(
                    "making group {pgrp} the foreground of the restoring terminal (fd {})",
                    stdin.as_raw_fd()
                ),
                e,
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers() {
        // 136:3 as st_rdev and as /proc/PID/stat's tty_nr.
        let rdev = libc::makedev(136, 3);
        assert_eq!(slave_index(rdev), Some(3));
        assert_eq!(slave_index(libc::makedev(137, 1)), Some(257));
        assert_eq!(ctty_index((136 << 8) | 3), Some(3));
        assert!(is_terminal(libc::makedev(5, 2)) && is_master(libc::makedev(5, 2)));
        assert!(!is_terminal(libc::makedev(1, 3)));
    }
}
