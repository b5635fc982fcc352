//! Parsers for what /proc shows about a task: maps with VmFlags, stat,
//! status, fdinfo and POSIX timers.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Reads /proc/PID/<name> as a string.
pub fn read(pid: i32, name: &str) -> Result<String> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            Error::NoProcess { pid }
        } else {
            Error::io(path, e)
        }
    })
}

/// Reads the target of /proc/PID/<name> (a symlink).
pub fn readlink(pid: i32, name: &str) -> Result<String> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    std::fs::read_link(&path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| Error::io(path, e))
}

/// One line of /proc/PID/maps with the VmFlags of smaps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    pub path: String,
    pub vm_flags: Vec<String>,
}

impl MapEntry {
    /// Whether VmFlags holds `flag` (e.g. "gd", "dc", "wf").
    pub fn has_flag(&self, flag: &str) -> bool {
        self.vm_flags.iter().any(|f| f == flag)
    }
    /// PROT_* bits of the perms column.
    pub fn prot(&self) -> u32 {
        let b = self.perms.as_bytes();
        let mut p = 0;
        if b.first() == Some(&b'r') {
            p |= libc::PROT_READ as u32;
        }
        if b.get(1) == Some(&b'w') {
            p |= libc::PROT_WRITE as u32;
        }
        if b.get(2) == Some(&b'x') {
            p |= libc::PROT_EXEC as u32;
        }
        p
    }
    /// Whether the mapping is MAP_SHARED.
    pub fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Whether the mapping is empty (never, for a kernel-reported one).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

fn parse_map_header(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms: perms.to_string(),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
        vm_flags: Vec::new(),
    })
}

/// Parses /proc/PID/maps or /proc/PID/smaps text.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.vm_flags = flags.split_whitespace().map(str::to_string).collect();
            }
            continue;
        }
        let first = line.split(' ').next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            if let Some(e) = parse_map_header(line) {
                out.push(e);
            }
        }
    }
    out
}

/// Reads the mappings of a process with their VmFlags.
pub fn smaps(pid: i32) -> Result<Vec<MapEntry>> {
    Ok(parse_maps(&read(pid, "smaps")?))
}

/// Reads the mappings of a process (without VmFlags; cheaper than smaps).
pub fn maps(pid: i32) -> Result<Vec<MapEntry>> {
    Ok(parse_maps(&read(pid, "maps")?))
}

/// The fields of /proc/PID/stat after the command name; `field(n)` uses
/// the numbering of proc(5) (1 = pid, 3 = state, ...).
#[derive(Debug, Clone)]
pub struct Stat {
    pub comm: String,
    rest: Vec<String>,
}

impl Stat {
    /// Field number `n` as proc(5) counts them (n >= 3).
    pub fn field(&self, n: usize) -> u64 {
        self.rest
            .get(n - 3)
            .and_then(|s| s.parse::<i64>().ok())
            .map(|v| v as u64)
            .unwrap_or(0)
    }
    /// The state letter.
    pub fn state(&self) -> char {
        self.rest
            .first()
            .and_then(|s| s.chars().next())
            .unwrap_or('?')
    }
}

/// Parses /proc/PID/stat text.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    Some(Stat {
        comm: text[open + 1..close].to_string(),
        rest: text[close + 1..]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    })
}

/// Reads /proc/PID/stat (or /proc/PID/task/TID/stat with `task`).
pub fn stat(pid: i32, task: Option<i32>) -> Result<Stat> {
    let name = match task {
        Some(t) => format!("task/{t}/stat"),
        None => "stat".to_string(),
    };
    let text = read(pid, &name)?;
    parse_stat(&text).ok_or_else(|| Error::Refused {
        pid,
        reason: format!("cannot parse /proc/{pid}/{name}"),
    })
}

/// Parses "Key:\tvalue" lines of /proc/PID/status.
pub fn parse_status(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Reads /proc/PID/status.
pub fn status(pid: i32) -> Result<HashMap<String, String>> {
    Ok(parse_status(&read(pid, "status")?))
}

/// The real uid of process `pid`: the user it belongs to.
pub fn owner(pid: i32) -> Result<u32> {
    status(pid)?
        .get("Uid")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| Error::Refused {
            pid,
            reason: "its /proc status names no uid".into(),
        })
}

/// Reads the thread ids of a process, sorted.
pub fn tids(pid: i32) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NoProcess { pid }
        } else {
            Error::io(&path, e)
        }
    })?;
    let mut v: Vec<i32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// One line of /proc/PID/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// "major:minor" of the filesystem.
    pub dev: String,
    /// The directory of the filesystem mounted here ("/" unless a bind).
    pub root: String,
    pub mount_point: String,
    /// Per-mount options (rw, nosuid, ...).
    pub options: String,
    /// Optional fields: "shared:N", "master:N", "unbindable", ...
    pub tags: Vec<String>,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// mountinfo escapes blanks, tabs, newlines and backslashes as octal.
pub fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Parses /proc/PID/mountinfo, skipping lines it cannot read.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut f = pre.split_whitespace();
            let id = f.next()?.parse().ok()?;
            let parent = f.next()?.parse().ok()?;
            let dev = f.next()?.to_string();
            let root = unescape_mount(f.next()?);
            let mount_point = unescape_mount(f.next()?);
            let options = f.next()?.to_string();
            let tags = f.map(str::to_string).collect();
            let mut p = post.split_whitespace();
            Some(MountInfo {
                id,
                parent,
                dev,
                root,
                mount_point,
                options,
                tags,
                fstype: p.next()?.to_string(),
                source: unescape_mount(p.next().unwrap_or("none")),
                super_options: p.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Reads the mount table of the mount namespace `pid` lives in.
pub fn mountinfo(pid: i32) -> Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&read(pid, "mountinfo")?))
}

/// What /proc/PID/fdinfo/FD says about a descriptor.
#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: u32,
    pub mnt_id: u64,
    pub ino: u64,
    pub extra: HashMap<String, String>,
}

/// Parses fdinfo text.
pub fn parse_fdinfo(text: &str) -> FdInfo {
    let mut fi = FdInfo::default();
    for (k, v) in parse_status(text) {
        match k.as_str() {
            "pos" => fi.pos = v.parse().unwrap_or(0),
            "flags" => fi.flags = u32::from_str_radix(&v, 8).unwrap_or(0),
            "mnt_id" => fi.mnt_id = v.parse().unwrap_or(0),
            "ino" => fi.ino = v.parse().unwrap_or(0),
            _ => {
                fi.extra.insert(k, v);
            }
        }
    }
    fi
}

/// One POSIX timer as /proc/PID/timers lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerInfo {
    pub id: i32,
    pub signo: i32,
    pub sigev_value: u64,
    /// "signal", "thread", or "none".
    pub notify: String,
    /// Whether the signal goes to one thread (SIGEV_THREAD_ID).
    pub to_thread: bool,
    pub notify_tid: i32,
    pub clock_id: i32,
}

/// Parses /proc/PID/timers.
pub fn parse_timers(text: &str) -> Vec<TimerInfo> {
    let mut out: Vec<TimerInfo> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "ID" => out.push(TimerInfo {
                id: v.parse().unwrap_or(0),
                ..Default::default()
            }),
            "signal" => {
                if let (Some(t), Some((sig, val))) = (out.last_mut(), v.split_once('/')) {
                    t.signo = sig.parse().unwrap_or(0);
                    t.sigev_value = u64::from_str_radix(val, 16).unwrap_or(0);
                }
            }
            "notify" => {
                if let (Some(t), Some((kind, who))) = (out.last_mut(), v.split_once('/')) {
                    t.notify = kind.to_string();
                    t.to_thread = who.starts_with("tid");
                    t.notify_tid = who
                        .split_once('.')
                        .and_then(|(_, n)| n.parse().ok())
                        .unwrap_or(0);
                }
            }
            "ClockID" => {
                if let Some(t) = out.last_mut() {
                    t.clock_id = v.parse().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    out
}

/// Parses /proc/PID/limits into (resource number, soft, hard) triples.
pub fn parse_limits(text: &str) -> Vec<(i32, u64, u64)> {
    // The rows follow the kernel's RLIMIT_* order.
    const NAMES: [&str; 16] = [
        "Max cpu time",
        "Max file size",
        "Max data size",
        "Max stack size",
        "Max core file size",
        "Max resident set",
        "Max processes",
        "Max open files",
        "Max locked memory",
        "Max address space",
        "Max file locks",
        "Max pending signals",
        "Max msgqueue size",
        "Max nice priority",
        "Max realtime priority",
        "Max realtime timeout",
    ];
    let val = |s: &str| {
        if s == "unlimited" {
            u64::MAX
        } else {
            s.parse().unwrap_or(u64::MAX)
        }
    };
    let mut out = Vec::new();
    for line in text.lines() {
        for (i, name) in NAMES.iter().enumerate() {
            if let Some(rest) = line.strip_prefix(name) {
                let mut it = rest.split_whitespace();
                if let (Some(soft), Some(hard)) = (it.next(), it.next()) {
                    out.push((i as i32, val(soft), val(hard)));
                }
            }
        }
    }
    out
}

/// Whether a process outside `tree` (host PIDs) holds pipe `ino` open: a
/// pipe end of the tree whose other end nobody else holds is a pipe whose
/// other end was closed, which a restore can rebuild.
pub fn pipe_held_outside(ino: u64, tree: &std::collections::HashSet<i32>) -> bool {
    let want = format!("pipe:[{ino}]");
    let Ok(rd) = std::fs::read_dir("/proc") else {
        // Cannot tell: assume the worst.
        return true;
    };
    let me = std::process::id() as i32;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_parse() {
        let text = "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n\
Size:                  4 kB\n\
VmFlags: rd wr mr mw me ac sd \n\
7f0000002000-7f0000004000 r-xp 00001000 fd:01 1234                       /usr/lib/x (deleted)\n\
VmFlags: rd ex mr mw me dc \n";
        let m = parse_maps(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].start, 0x7f0000000000);
        assert_eq!(m[0].path, "");
        assert_eq!(m[0].prot(), 3);
        assert!(m[0].has_flag("sd"));
        assert_eq!(m[1].path, "/usr/lib/x (deleted)");
        assert_eq!(m[1].dev_major, 0xfd);
        assert_eq!(m[1].offset, 0x1000);
        assert!(m[1].has_flag("dc"));
        assert_eq!(m[1].prot(), 5);
    }

    #[test]
    fn stat_parse_with_odd_comm() {
        let s = parse_stat("42 (a b) c) S 1 42 42 0 -1").unwrap();
        assert_eq!(s.comm, "a b) c");
        assert_eq!(s.state(), 'S');
        assert_eq!(s.field(4), 1);
        assert_eq!(s.field(8), u64::MAX);
    }

    #[test]
    fn timers_parse() {
        let t = parse_timers(
            "ID: 3\nsignal: 14/00007f00deadbeef\nnotify: thread/tid.77\nClockID: 1\nID: 4\nsignal: 0/0000000000000000\nnotify: none/pid.5\nClockID: 0\n",
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].id, 3);
        assert_eq!(t[0].signo, 14);
        assert_eq!(t[0].sigev_value, 0x7f00deadbeef);
        assert_eq!(t[0].notify, "thread");
        assert!(t[0].to_thread);
        assert_eq!(t[0].notify_tid, 77);
        assert_eq!(t[1].notify, "none");
        assert!(!t[1].to_thread);
    }

    #[test]
    fn limits_parse() {
        let l = parse_limits(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max open files            512                  1024                 files     \n",
        );
        assert_eq!(l, vec![(0, u64::MAX, u64::MAX), (7, 512, 1024)]);
    }

    #[test]
    fn fdinfo_parse() {
        let f = parse_fdinfo("pos:\t10\nflags:\t02102002\nmnt_id:\t25\nino:\t99\n");
        assert_eq!(f.pos, 10);
        assert_eq!(f.flags, 0o2102002);
        assert_eq!(f.ino, 99);
    }
    #[test]
    fn mountinfo_parse() {
        let t = "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw\n\
                 40 22 0:35 /sub /my\\040dir rw,relatime master:3 unbindable - tmpfs tmpfs rw,size=1024k\n\
                 bad line\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].id, 22);
        assert_eq!(m[0].mount_point, "/proc");
        assert_eq!(m[0].tags, vec!["shared:5"]);
        assert_eq!(m[0].fstype, "proc");
        assert_eq!(m[1].parent, 22);
        assert_eq!(m[1].root, "/sub");
        assert_eq!(m[1].mount_point, "/my dir");
        assert_eq!(m[1].tags, vec!["master:3", "unbindable"]);
        assert_eq!(m[1].super_options, "rw,size=1024k");
    }
}
