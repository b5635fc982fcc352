//! Finding and killing the processes that live in a node's namespaces, and telling whether a
//! lab's owner is still alive.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::LabError;

/// Inode of a namespace file (a `/run/netns` entry or a UTS bind mount): the namespace's identity.
pub(crate) fn ns_inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Inode of the namespace of kind `kind` ("net", "uts") that process `pid` is in; None once the
/// process has left its namespaces on exit (zombies have none).
fn proc_ns_inode(pid: i32, kind: &str) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix(kind)?
        .strip_prefix(":[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Inode of the namespace an open file descriptor refers to, if it is a network or UTS one.
fn fd_ns_inode(link: &Path) -> Option<u64> {
    let s = link.to_str()?;
    let rest = s
        .strip_prefix("net:[")
        .or_else(|| s.strip_prefix("uts:["))?;
    rest.strip_suffix(']')?.parse().ok()
}

/// Whether `pid` is in one of the namespaces `inodes`, or holds one open and so may enter it
/// at any moment: `nsenter` opens the namespace files, then calls setns, then execs, so a
/// process started just before a scan is found only by its descriptors.
fn is_member(pid: i32, inodes: &HashSet<u64>) -> bool {
    if ["net", "uts"]
        .iter()
        .any(|k| proc_ns_inode(pid, k).is_some_and(|i| inodes.contains(&i)))
    {
        return true;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .any(|l| fd_ns_inode(&l).is_some_and(|i| inodes.contains(&i)))
}

/// Every process (other than this one) in, or holding, one of the namespaces `inodes`.
fn members(inodes: &HashSet<u64>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && is_member(pid, inodes))
        .collect()
}

/// Whether process `pid` is in the network namespace `inode`.
pub(crate) fn in_net_ns(pid: u32, inode: u64) -> bool {
    proc_ns_inode(pid as i32, "net") == Some(inode)
}

/// SIGKILLs every process in (or holding) the namespaces `inodes` until none is left, because a
/// process that forks while we scan would otherwise survive its node. Callers run it again once
/// the namespace files are gone, when nobody new can open them. `what` names them for errors.
pub(crate) fn kill_members(inodes: &HashSet<u64>, what: &str) -> Result<usize, LabError> {
    if inodes.is_empty() {
        return Ok(0);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut killed = HashSet::new();
    loop {
        let pids = members(inodes);
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout {
                what: format!("processes {pids:?} in {what} to die after SIGKILL"),
                secs: 5,
            });
        }
        for pid in pids {
            if killed.insert(pid) {
                tracing::debug!(pid, %what, "killing");
            }
            // ESRCH only means it died between the scan and now.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Start time of `pid` in clock ticks since boot, and whether it is a zombie; None if it is gone.
fn stat(pid: u32) -> Option<(u64, bool)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let start = fields.get(19)?.parse().ok()?;
    Some((start, zombie))
}

/// Start time of `pid`, recorded with the pid so that a reused pid does not pass for the owner.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(s, _)| s)
}

/// Whether the process `pid` that started at `start` is still running (zombies count as dead:
/// a killed test's parent may not have reaped it yet).
pub(crate) fn alive(pid: u32, start: u64) -> bool {
    matches!(stat(pid), Some((s, false)) if s == start)
}
