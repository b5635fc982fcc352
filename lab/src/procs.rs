//! Finding and killing the processes that live in a node's namespaces, and telling whether a
//! lab's owner is still alive.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::LabError;

/// How long killing a node's processes may take before teardown reports them.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for processes to stop before killing them anyway.
const STOP_TIMEOUT: Duration = Duration::from_millis(500);

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

/// Every live process's parent, from one pass over /proc (zombies left out: they have neither
/// namespaces nor children of their own any more).
fn parents() -> HashMap<i32, i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| match stat(pid as u32)? {
            Stat { zombie: true, .. } => None,
            s => Some((pid, s.ppid)),
        })
        .collect()
}

/// This process and its ancestors: never ours to kill, even if (say) the lab is used from a
/// shell running on a node.
fn protected(parents: &HashMap<i32, i32>) -> HashSet<i32> {
    let mut mine = HashSet::new();
    let mut pid = std::process::id() as i32;
    while pid > 0 && mine.insert(pid) {
        pid = parents.get(&pid).copied().unwrap_or(0);
    }
    mine
}

/// Every process in, or holding, one of the namespaces `inodes`, plus `also`, plus all their
/// descendants: a job that an agent on the node forked into namespaces of its own is the node's
/// too.
fn tree(inodes: &HashSet<u64>, also: &HashSet<i32>) -> HashSet<i32> {
    let parents = parents();
    let keep = protected(&parents);
    let mut found: HashSet<i32> = parents
        .keys()
        .copied()
        .filter(|&pid| !keep.contains(&pid) && (also.contains(&pid) || is_member(pid, inodes)))
        .collect();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in &parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut todo: Vec<i32> = found.iter().copied().collect();
    while let Some(pid) = todo.pop() {
        for &c in children.get(&pid).into_iter().flatten() {
            if !keep.contains(&c) && found.insert(c) {
                todo.push(c);
            }
        }
    }
    found
}

/// Whether `pid` is stopped (or traced, or gone): it can no longer fork.
fn stopped(pid: i32) -> bool {
    stat(pid as u32).is_none_or(|s| s.zombie || matches!(s.state, 'T' | 't'))
}

/// The processes of [`tree`], each sent SIGSTOP, grown until nothing new turns up once all of
/// them are stopped. A process forked between a scan and the SIGKILL of its parent would
/// otherwise be orphaned, no longer a descendant of anything on the node, and survive; a stopped
/// process cannot fork. Gives up waiting for stops at `until` (a task frozen by its cgroup, or in
/// uninterruptible sleep, stops late, but cannot fork meanwhile either).
fn stop_tree(inodes: &HashSet<u64>, until: Instant) -> HashSet<i32> {
    let mut set = HashSet::new();
    loop {
        let found = tree(inodes, &set);
        let mut new = false;
        for &pid in found.difference(&set) {
            new = true;
            // ESRCH only means it died between the scan and now.
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
        }
        set = found;
        if (!new && set.iter().all(|&p| stopped(p))) || Instant::now() > until {
            return set;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether process `pid` is in the network namespace `inode`.
pub(crate) fn in_net_ns(pid: u32, inode: u64) -> bool {
    proc_ns_inode(pid as i32, "net") == Some(inode)
}

/// Inode of the network namespace of process `pid`, None if it is gone or a zombie.
pub(crate) fn net_ns_of(pid: i32) -> Option<u64> {
    proc_ns_inode(pid, "net")
}

/// Every network namespace some process is in, with those processes (any of them will do to
/// enter it, but one may exit at any time).
pub(crate) fn net_namespaces() -> HashMap<u64, Vec<i32>> {
    let mut map: HashMap<u64, Vec<i32>> = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return map;
    };
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        if let Some(ino) = net_ns_of(pid) {
            map.entry(ino).or_default().push(pid);
        }
    }
    map
}

/// SIGKILLs every process in (or holding) the namespaces `inodes`, and every descendant of one,
/// until none is left, because a process that forks while we scan would otherwise survive its
/// node. Callers run it again once the namespace files are gone, when nobody new can open them.
/// `what` names them for errors.
pub(crate) fn kill_members(inodes: &HashSet<u64>, what: &str) -> Result<usize, LabError> {
    if inodes.is_empty() {
        return Ok(0);
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    let mut killed = HashSet::new();
    loop {
        let pids = stop_tree(inodes, (Instant::now() + STOP_TIMEOUT).min(deadline));
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() > deadline {
            let mut pids: Vec<i32> = pids.into_iter().collect();
            pids.sort_unstable();
            return Err(LabError::Timeout {
                what: format!("processes {pids:?} in {what} to die after SIGKILL"),
                secs: KILL_TIMEOUT.as_secs(),
            });
        }
        for pid in pids {
            if killed.insert(pid) {
                tracing::debug!(pid, %what, "killing");
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What /proc/PID/stat says that we use.
struct Stat {
    state: char,
    ppid: i32,
    /// Clock ticks since boot.
    start: u64,
    zombie: bool,
}

/// The stat of `pid`; None if it is gone.
fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    Some(Stat {
        state,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
        zombie: matches!(state, 'Z' | 'X'),
    })
}

/// Start time of `pid`, recorded with the pid so that a reused pid does not pass for the owner.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start)
}

/// Whether the process `pid` that started at `start` is still running (zombies count as dead:
/// a killed test's parent may not have reaped it yet).
pub(crate) fn alive(pid: u32, start: u64) -> bool {
    matches!(stat(pid), Some(s) if !s.zombie && s.start == start)
}
