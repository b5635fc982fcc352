//! Which pages a process wrote since its last dump, without soft-dirty
//! bits (off in many distribution kernels, this one's included): a
//! userfaultfd made inside the process, so that it tracks the process's own
//! address space, in asynchronous write-protect mode. Its mappings are
//! registered; a dump reads and resets it in one PAGEMAP_SCAN
//! (PM_SCAN_WP_MATCHING) while the process is frozen: a page without the
//! write-protect mark was written since the last reset. The process never
//! waits on it: the kernel drops the mark at the first write
//! (UFFD_FEATURE_WP_ASYNC), at the cost of one minor fault per page.
//!
//! The userfaultfd lives in the process's fd table (high up, close on
//! exec) so that it outlives the agent between dumps. A record in
//! `/run/ckpt/track` names it: its fd, its inode (each userfaultfd has its
//! own) and its generation, the number of resets so far. A dump with a
//! parent trusts the tracker only when the parent recorded the same inode
//! and generation: then the parent was the last dump to reset it, and an
//! unmarked page is unchanged since the parent. The record is written
//! before each reset, so a dump that fails after resetting leaves no
//! checkpoint that claims the new generation.
//!
//! What the tracker does not see, like soft-dirty: writes by devices into
//! pinned memory (RDMA, io_uring fixed buffers). Mappings it cannot track
//! (shared memory, hugetlb, mappings remapped since) are saved whole.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ckpt_proto::image::Tracking;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::inject::Remote;
use crate::proc;
use crate::sys::uffd::{Userfaultfd, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_ASYNC};

/// Where the records of trackers live.
pub const RECORD_DIR: &str = "/run/ckpt/track";

/// What `readlink /proc/PID/fd/N` shows for a userfaultfd.
const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

/// Lowest fd number a tracker takes: high enough to stay out of the way
/// of the process's own numbering, low enough (under the usual 1024 soft
/// limit) not to grow its fd table.
const FD_FLOOR: u64 = 960;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    pid: i32,
    /// The process's start time (field 22 of its stat), against PID reuse.
    start_time: u64,
    fd: i32,
    ino: u64,
    generation: u64,
}

/// The write tracker of one process, held by a dump.
pub struct Tracker {
    record: Record,
    uffd: Userfaultfd,
}

fn record_path(pid: i32) -> PathBuf {
    Path::new(RECORD_DIR).join(format!("{pid}.json"))
}

fn start_time(pid: i32) -> Result<u64> {
    Ok(proc::stat(pid, None)?.field(22))
}

/// The inode of fd `fd` of `pid` if it is a userfaultfd.
fn uffd_ino(pid: i32, fd: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    if link.to_str() != Some(UFFD_LINK) {
        return None;
    }
    Some(
        std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .ok()?
            .ino(),
    )
}

fn read_record(pid: i32) -> Option<Record> {
    let text = std::fs::read_to_string(record_path(pid)).ok()?;
    serde_json::from_str(&text).ok()
}

impl Tracker {
    /// The tracker recorded for `pid`, if the process still holds it.
    /// A stale record (the process is another one now, or it closed the
    /// fd) is removed.
    pub fn find(pid: i32) -> Result<Option<Tracker>> {
        let Some(rec) = read_record(pid) else {
            return Ok(None);
        };
        let same_process = start_time(pid).ok() == Some(rec.start_time);
        if !same_process || uffd_ino(pid, rec.fd) != Some(rec.ino) {
            info!(
                pid,
                fd = rec.fd,
                "its memory tracker is gone; starting over"
            );
            let _ = std::fs::remove_file(record_path(pid));
            return Ok(None);
        }
        let uffd = Self::take_fd(pid, rec.fd)?;
        Ok(Some(Tracker { record: rec, uffd }))
    }

    fn take_fd(pid: i32, fd: i32) -> Result<Userfaultfd> {
        let pidfd =
            crate::sys::pidfd::pidfd_open(pid).map_err(|e| Error::sys(pid, "pidfd_open", e))?;
        let ours = crate::sys::pidfd::pidfd_getfd(pidfd.as_fd(), fd)
            .map_err(|e| Error::sys(pid, format!("pidfd_getfd of its tracker fd {fd}"), e))?;
        Ok(Userfaultfd::from_fd(ours))
    }

    /// Makes a new tracker inside the stopped process behind `remote`:
    /// the userfaultfd must be created by the process itself to track its
    /// address space. Returns None, leaving the process as it was, when
    /// the kernel refuses asynchronous write-protect.
    pub fn install(pid: i32, remote: &Remote) -> Result<Option<Tracker>> {
        // User-mode faults only: the tracker never handles a fault (async
        // write-protect resolves them in the kernel), and the flag is what
        // lets a process that is not root make one when
        // vm.unprivileged_userfaultfd is 0, the default.
        const UFFD_USER_MODE_ONLY: i32 = 1;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY) as u64;
        let first = match remote.syscall(libc::SYS_userfaultfd, &[flags]) {
            Ok(fd) => fd,
            Err(e @ Error::Remote { .. }) => {
                info!(
                    pid,
                    "no userfaultfd in the process, its memory is saved whole: {e}"
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let fd = match remote.syscall(
            libc::SYS_fcntl,
            &[first, libc::F_DUPFD_CLOEXEC as u64, FD_FLOOR],
        ) {
            Ok(high) => {
                remote.syscall(libc::SYS_close, &[first])?;
                high as i32
            }
            // A soft fd limit under the floor: it stays where it is.
            Err(Error::Remote { .. }) => first as i32,
            Err(e) => {
                let _ = remote.syscall(libc::SYS_close, &[first]);
                return Err(e);
            }
        };
        let close = || remote.syscall(libc::SYS_close, &[fd as u64]).map(|_| ());
        let uffd = match Self::take_fd(pid, fd) {
            Ok(u) => u,
            Err(e) => {
                close()?;
                return Err(e);
            }
        };
        if let Err(e) = uffd.api(UFFD_FEATURE_WP_ASYNC) {
            close()?;
            info!(
                pid,
                "the kernel refuses asynchronous write-protect ({e}); memory saved whole"
            );
            return Ok(None);
        }
        let Some(ino) = uffd_ino(pid, fd) else {
            close()?;
            return Err(Error::Refused {
                pid,
                reason: format!("its new tracker fd {fd} is not a userfaultfd"),
            });
        };
        let record = Record {
            pid,
            start_time: start_time(pid)?,
            fd,
            ino,
            generation: 0,
        };
        debug!(pid, fd, ino, "memory tracker installed");
        Ok(Some(Tracker { record, uffd }))
    }

    /// Whether the pages this tracker finds unmarked are unchanged since
    /// the checkpoint that recorded `parent`.
    pub fn continues(&self, parent: &Tracking) -> bool {
        parent.ino == self.record.ino && parent.generation == self.record.generation
    }

    /// Registers `[start, end)` (a whole mapping) for tracking. Fails for
    /// mappings userfaultfd cannot write-protect.
    pub fn register(&self, start: u64, end: u64) -> std::result::Result<(), nix::errno::Errno> {
        self.uffd
            .register(start, end - start, UFFDIO_REGISTER_MODE_WP)
            .map(|_| ())
    }

    /// Starts the next generation, recorded before the scan that resets
    /// the marks; returns what the checkpoint records.
    pub fn next_generation(&mut self) -> Result<Tracking> {
        self.record.generation += 1;
        std::fs::create_dir_all(RECORD_DIR).map_err(|e| Error::io(RECORD_DIR, e))?;
        let path = record_path(self.record.pid);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string(&self.record).expect("a record serializes");
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(Tracking {
            ino: self.record.ino,
            generation: self.record.generation,
        })
    }
}

/// Inodes of the recorded trackers, whose fds a dump leaves out: they are
/// the agent's, and a child forked since holds a copy.
pub fn inodes() -> HashSet<u64> {
    let Ok(rd) = std::fs::read_dir(RECORD_DIR) else {
        return HashSet::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<Record>(&t).ok())
        .map(|r| r.ino)
        .collect()
}

/// Whether fd `fd` of `pid` is a tracker of `trackers` (see [`inodes`]).
pub fn is_tracker(pid: i32, fd: i32, trackers: &HashSet<u64>) -> bool {
    !trackers.is_empty() && uffd_ino(pid, fd).is_some_and(|ino| trackers.contains(&ino))
}

/// Removes the records of processes that are gone; returns their PIDs.
pub fn prune() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(RECORD_DIR) else {
        return Vec::new();
    };
    let mut gone = Vec::new();
    for e in rd.flatten() {
        let Some(rec) = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| serde_json::from_str::<Record>(&t).ok())
        else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        if start_time(rec.pid).ok() != Some(rec.start_time) {
            let _ = std::fs::remove_file(e.path());
            gone.push(rec.pid);
        }
    }
    gone
}
