//! A process's file descriptors: dump and restore of its fd table and open
//! files (`FdTable`, files.proto). Regular files, directories and harmless
//! character devices are supported; files unlinked while open are saved
//! whole into the image ("ghost" files) and recreated on restore.

use std::cmp::Ordering;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ckpt_proto::image::{EpollTarget, Fd, FdTable, FileKind, InotifyWatch, OpenFile};

use crate::error::{Error, Result};
use crate::images::ImageWriter;
use crate::inject::{Remote, Scratch};
use crate::proc;
use crate::sys;

/// Character devices any process may reopen by path (major, minor).
const SAFE_CHAR_DEVICES: [(u64, u64); 5] = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)];

/// Name of the object behind a descriptor we cannot checkpoint yet.
fn unsupported_kind(link: &str, mode: u32) -> &'static str {
    if let Some(anon) = link.strip_prefix("anon_inode:") {
        return match anon {
            "[eventpoll]" => "epoll",
            "[eventfd]" => "eventfd",
            "[signalfd]" => "signalfd",
            "[timerfd]" => "timerfd",
            "[io_uring]" => "io_uring",
            "[perf_event]" => "perf event",
            "inotify" => "inotify",
            "[fanotify]" => "fanotify",
            "[pidfd]" => "pidfd",
            "[userfaultfd]" => "userfaultfd",
            a if a.starts_with("bpf") => "bpf object",
            _ => "anonymous inode",
        };
    }
    match mode & libc::S_IFMT {
        libc::S_IFSOCK => "socket",
        libc::S_IFIFO => "pipe or FIFO",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        _ => "file",
    }
}

fn dev_major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}
fn dev_minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}

/// Reads the fd table of stopped process `pid`; refuses (naming pid, fd and
/// kind) any descriptor it cannot restore.
///
/// `own`: the namespaces the process has apart from the agent's.
pub fn dump(
    pid: i32,
    images: &ImageWriter,
    own: u64,
    net: &mut crate::inet::DumpCtx<'_>,
) -> Result<FdTable> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    // The agent's write trackers are not the process's files.
    let trackers = crate::track::inodes();
    fds.retain(|&fd| !crate::track::is_tracker(pid, fd, &trackers));
    let pidfd = sys::pidfd::pidfd_open(pid).map_err(|e| Error::sys(pid, "pidfd_open", e))?;
    // Paths and sockets are the process's: in namespaces of its own (a
    // job's) the agent reaches them from there.
    let own_net = own & libc::CLONE_NEWNET as u64 != 0;
    let reach = |path: &str| crate::ns::reach(pid, own, path);
    // Each fd's fdinfo, read once.
    let mut fdinfo = std::collections::HashMap::with_capacity(fds.len());
    for &fd in &fds {
        fdinfo.insert(fd, proc::read(pid, &format!("fdinfo/{fd}"))?);
    }

    // Group descriptors that share one open file description.
    let mut order = fds.clone();
    let mut kcmp_err = None;
    order.sort_by(|&a, &b| match sys::pidfd::kcmp_file(pid, a, pid, b) {
        Ok(0) => Ordering::Equal,
        Ok(1) => Ordering::Less,
        Ok(_) => Ordering::Greater,
        Err(e) => {
            kcmp_err.get_or_insert(e);
            a.cmp(&b)
        }
    });
    if let Some(e) = kcmp_err {
        return Err(Error::sys(pid, "kcmp(KCMP_FILE)", e));
    }
    let mut file_of_fd = std::collections::HashMap::new();
    let mut files: Vec<OpenFile> = Vec::new();
    let mut leader: Option<i32> = None;
    let mut diag: Option<std::collections::HashMap<u64, sys::netlink::UnixDiag>> = None;
    for &fd in &order {
        let same = leader.is_some_and(|l| sys::pidfd::kcmp_file(pid, l, pid, fd).ok() == Some(0));
        if same {
            file_of_fd.insert(fd, files.len() as u32 - 1);
            continue;
        }
        leader = Some(fd);
        let link = proc::readlink(pid, &format!("fd/{fd}"))?;
        let fdinfo_text = &fdinfo[&fd];
        let info = proc::parse_fdinfo(fdinfo_text);
        let file = sys::pidfd::pidfd_getfd(pidfd.as_fd(), fd)
            .map_err(|e| Error::sys(pid, format!("pidfd_getfd fd {fd}"), e))?;
        let file = std::fs::File::from(file);
        let md = file
            .metadata()
            .map_err(|e| Error::sys(pid, format!("fstat fd {fd}"), e))?;
        let mode = md.mode();
        let refuse = |kind: &str| Error::UnsupportedFd {
            pid,
            fd,
            kind: kind.to_string(),
            target: link.clone(),
        };
        let id = files.len() as u32;
        let mut of = OpenFile {
            id,
            kind: FileKind::FileRegular as i32,
            path: link.clone(),
            flags: info.flags & !(libc::O_CLOEXEC as u32),
            pos: info.pos,
            mode,
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            unlinked: false,
            ghost: String::new(),
            rdev: md.rdev(),
            uid: md.uid(),
            gid: md.gid(),
            ..Default::default()
        };
        match (link.as_str(), mode & libc::S_IFMT) {
            ("anon_inode:[eventpoll]", _) => {
                of.kind = FileKind::FileEpoll as i32;
                of.epoll_targets = parse_epoll_targets(fdinfo_text);
            }
            ("anon_inode:[eventfd]", _) => {
                of.kind = FileKind::FileEventfd as i32;
                let fi = proc::parse_fdinfo(fdinfo_text);
                let count = fi
                    .extra
                    .get("eventfd-count")
                    .map(String::as_str)
                    .unwrap_or("0");
                of.eventfd_count = u64::from_str_radix(count.trim(), 16).unwrap_or(0);
                of.eventfd_semaphore =
                    fi.extra.get("eventfd-semaphore").map(String::as_str) == Some("1");
            }
            ("anon_inode:inotify", _) => {
                of.kind = FileKind::FileInotify as i32;
                of.inotify_watches = inotify_watches(pid, fdinfo_text)?;
            }
            ("anon_inode:[timerfd]", _) => {
                of.kind = FileKind::FileTimerfd as i32;
                let t = parse_timerfd(fdinfo_text)
                    .ok_or_else(|| refuse("timerfd with unreadable fdinfo"))?;
                (of.timerfd_clock, of.timerfd_ticks, of.timerfd_settime_flags) = (t.0, t.1, t.2);
                (of.timerfd_value_ns, of.timerfd_interval_ns) = (t.3, t.4);
            }
            ("anon_inode:[signalfd]", _) => {
                of.kind = FileKind::FileSignalfd as i32;
                let fi = proc::parse_fdinfo(fdinfo_text);
                let mask = fi.extra.get("sigmask").map(String::as_str).unwrap_or("0");
                of.signalfd_mask = u64::from_str_radix(mask.trim(), 16).unwrap_or(0);
            }
            (l, _) if l.starts_with("anon_inode:") => {
                return Err(refuse(unsupported_kind(&link, mode)))
            }
            (l, libc::S_IFIFO) if l.starts_with("pipe:") => {
                if of.flags & libc::O_DIRECT as u32 != 0 {
                    return Err(refuse("packet-mode pipe (O_DIRECT)"));
                }
                of.kind = FileKind::FilePipe as i32;
                of.pipe_id = md.ino();
                of.pipe_size = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
                    .map_err(|e| Error::sys(pid, format!("F_GETPIPE_SZ fd {fd}"), e))?
                    as u32;
                if of.flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32 {
                    of.pipe_data = sys::misc::pipe_peek(file.as_fd())
                        .map_err(|e| Error::sys(pid, format!("peeking pipe fd {fd}"), e))?;
                }
            }
            (_, libc::S_IFSOCK) => {
                let domain = sys::misc::socket_domain(file.as_fd())
                    .map_err(|e| Error::sys(pid, format!("SO_DOMAIN of fd {fd}"), e))?;
                if crate::inet::is_inet(domain) {
                    of.kind = FileKind::FileInetSocket as i32;
                    of.inet = Some(crate::inet::dump(pid, fd, &file, md.ino(), net)?);
                    file_of_fd.insert(fd, id);
                    files.push(of);
                    continue;
                }
                if domain != libc::AF_UNIX {
                    return Err(refuse(match domain {
                        libc::AF_NETLINK => "netlink socket",
                        libc::AF_PACKET => "packet socket",
                        _ => "socket of another family",
                    }));
                }
                if diag.is_none() {
                    // sock_diag shows the sockets of the caller's network
                    // namespace: a job's own is entered first.
                    let list = || {
                        sys::netlink::unix_sockets()
                            .map_err(|e| Error::sys(pid, "sock_diag of unix sockets", e))
                    };
                    diag = Some(if own_net {
                        crate::ns::in_ns(pid, libc::CLONE_NEWNET as u64, list)?
                    } else {
                        list()?
                    });
                }
                let diag = diag.as_ref().expect("just filled");
                if !diag.contains_key(&md.ino()) {
                    return Err(refuse("unix socket not found by sock_diag"));
                }
                of.kind = FileKind::FileUnixSocket as i32;
                of.unix = Some(crate::unix::dump(pid, fd, file.as_fd(), md.ino(), diag)?);
            }
            (_, libc::S_IFIFO) => {
                of.kind = FileKind::FileFifo as i32;
                of.pipe_id = md.ino();
                of.pipe_size = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
                    .map_err(|e| Error::sys(pid, format!("F_GETPIPE_SZ fd {fd}"), e))?
                    as u32;
                // Peek through a reading descriptor of our own: opening a
                // FIFO for reading without blocking always works.
                let reader = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(reach(&link))
                    .map_err(|e| Error::io(&link, e))?;
                of.pipe_data = sys::misc::pipe_peek(reader.as_fd())
                    .map_err(|e| Error::sys(pid, format!("peeking FIFO fd {fd}"), e))?;
            }
            (l, libc::S_IFREG) if l.starts_with("/memfd:") => {
                of.kind = FileKind::FileMemfd as i32;
                of.path = l
                    .trim_start_matches("/memfd:")
                    .trim_end_matches(" (deleted)")
                    .to_string();
                of.ghost = save_content(pid, fd, &file, md.size(), images)?;
                const F_SEAL_SEAL: i32 = 1;
                let seals = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GET_SEALS)
                    .map_err(|e| Error::sys(pid, format!("F_GET_SEALS fd {fd}"), e))?;
                // A memfd created without MFD_ALLOW_SEALING reports only F_SEAL_SEAL.
                of.memfd_allow_sealing = seals != F_SEAL_SEAL;
                of.memfd_seals = seals as u32;
            }
            (l, libc::S_IFREG) if is_mqueue(&file) => {
                of.kind = FileKind::FileMqueue as i32;
                of.path = l.to_string();
            }
            (_, libc::S_IFREG) => {
                let deleted = link.ends_with(" (deleted)") || md.nlink() == 0;
                if deleted {
                    of.ghost = save_content(pid, fd, &file, md.size(), images)?;
                    of.unlinked = true;
                    of.path = link.trim_end_matches(" (deleted)").to_string();
                } else {
                    let on_disk = std::fs::metadata(reach(&link)).ok();
                    if on_disk.map(|m| (m.dev(), m.ino())) != Some((md.dev(), md.ino())) {
                        return Err(refuse("regular file replaced on disk since it was opened"));
                    }
                }
            }
            (_, libc::S_IFDIR) => of.kind = FileKind::FileDirectory as i32,
            (_, libc::S_IFCHR) if crate::tty::is_terminal(md.rdev()) => {
                crate::tty::dump(pid, fd, &file, &mut of)?
            }
            (_, libc::S_IFCHR) => {
                let dev = (dev_major(md.rdev()), dev_minor(md.rdev()));
                if !SAFE_CHAR_DEVICES.contains(&dev) {
                    return Err(refuse(&format!("character device {}:{}", dev.0, dev.1)));
                }
                of.kind = FileKind::FileCharDevice as i32;
            }
            _ => return Err(refuse(unsupported_kind(&link, mode))),
        }
        file_of_fd.insert(fd, id);
        files.push(of);
    }
    check_epolls(pid, &files, &fds)?;
    let mut table = FdTable {
        pid,
        fds: Vec::with_capacity(fds.len()),
        files,
        ctty: crate::tty::dump_ctty(pid)?,
    };
    for fd in fds {
        let info = proc::parse_fdinfo(&fdinfo[&fd]);
        table.fds.push(Fd {
            fd,
            file_id: file_of_fd[&fd],
            cloexec: info.flags & libc::O_CLOEXEC as u32 != 0,
        });
    }
    Ok(table)
}

/// Reads an inotify's watches from its fdinfo and finds the path of each
/// watched file from its file handle.
fn inotify_watches(pid: i32, text: &str) -> Result<Vec<InotifyWatch>> {
    let mountinfo = proc::read(pid, "mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("inotify ")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
        };
        let bad = || Error::Refused {
            pid,
            reason: format!("cannot read inotify watch '{line}'"),
        };
        let wd: i32 = field("wd:").and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let mask = field("mask:")
            .and_then(|v| u32::from_str_radix(&v, 16).ok())
            .ok_or_else(bad)?;
        let sdev = field("sdev:")
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .ok_or_else(bad)?;
        let htype: i32 = field("fhandle-type:")
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        let handle = field("f_handle:")
            .and_then(|v| hex::decode(v).ok())
            .ok_or_else(bad)?;
        // The kernel prints its internal dev_t: major in the top 12 bits.
        let dev = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
        let mnt = mountinfo
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&dev.as_str())).then(|| f.get(4).map(|m| m.to_string()))?
            })
            .ok_or_else(|| Error::Refused {
                pid,
                reason: format!("inotify watch {wd}: no mount of device {dev}"),
            })?;
        let root = format!("/proc/{pid}/root{mnt}");
        let mfd = std::fs::File::open(&root).map_err(|e| Error::io(&root, e))?;
        let target = sys::misc::open_by_handle(mfd.as_fd(), htype, &handle)
            .map_err(|e| Error::sys(pid, format!("open_by_handle_at for inotify watch {wd}"), e))?;
        let path = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&target)
        ))
        .map_err(|e| Error::sys(pid, format!("path of inotify watch {wd}"), e))?
        .to_string_lossy()
        .into_owned();
        out.push(InotifyWatch { wd, mask, path });
    }
    out.sort_by_key(|w| w.wd);
    Ok(out)
}

/// Reads a timerfd's fdinfo: (clock, ticks, settime flags, value ns,
/// interval ns).
fn parse_timerfd(text: &str) -> Option<(i32, u64, u32, u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let pair = |name: &str| -> Option<u64> {
        let v = field(name)?.trim_start_matches('(').trim_end_matches(')');
        let (sec, nsec) = v.split_once(',')?;
        Some(sec.trim().parse::<u64>().ok()? * 1_000_000_000 + nsec.trim().parse::<u64>().ok()?)
    };
    Some((
        field("clockid:")?.parse().ok()?,
        field("ticks:")?.parse().ok()?,
        u32::from_str_radix(field("settime flags:")?, 8).ok()?,
        pair("it_value:")?,
        pair("it_interval:")?,
    ))
}

/// Reads the targets an epoll instance watches from its fdinfo.
fn parse_epoll_targets(text: &str) -> Vec<EpollTarget> {
    text.lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let mut field = |name: &str| {
                it.by_ref()
                    .skip_while(|w| *w != name)
                    .nth(1)
                    .map(str::to_string)
            };
            let fd = field("tfd:")?.parse().ok()?;
            let events = u32::from_str_radix(&field("events:")?, 16).ok()?;
            let data = u64::from_str_radix(&field("data:")?, 16).ok()?;
            Some(EpollTarget { fd, events, data })
        })
        .collect()
}

/// An epoll can be rebuilt only with its targets.
fn check_epolls(pid: i32, files: &[OpenFile], fds: &[i32]) -> Result<()> {
    for f in files
        .iter()
        .filter(|f| f.kind == FileKind::FileEpoll as i32)
    {
        if let Some(t) = f.epoll_targets.iter().find(|t| !fds.contains(&t.fd)) {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "an epoll watches fd {} which is closed; not supported yet",
                    t.fd
                ),
            });
        }
    }
    Ok(())
}

/// Links the fd tables of all processes of a checkpoint (in dump order,
/// parents first, every process still stopped): open file descriptions
/// held by several processes get a shared id and the first holder as
/// owner, pipes the first process holding either end; and refuses what
/// cannot be rebuilt (a pipe end whose other end is held outside the tree,
/// as `held_outside` tells by the pipe's inode; an epoll shared between
/// processes). A pipe whose other end nobody holds any more (its writers
/// closed it) is rebuilt with that end closed.
pub fn link_tree(
    tables: &mut [FdTable],
    ext_unix_sk: bool,
    held_outside: &dyn Fn(u64) -> bool,
) -> Result<()> {
    use std::collections::HashMap;
    // A connected unix socket whose named peer is in the tree is one end of
    // a pair (an accepted connection); only a peer elsewhere is external.
    let sockets: std::collections::HashSet<u64> = tables
        .iter()
        .flat_map(|t| {
            t.files
                .iter()
                .filter_map(|f| f.unix.as_ref().map(|u| u.ino))
        })
        .collect();
    // Listeners by name, with the process that restores them.
    let listeners: HashMap<String, (usize, u32)> = tables
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| {
            t.files.iter().filter_map(move |f| {
                f.unix
                    .as_ref()
                    .filter(|u| u.listening)
                    .map(|u| (u.name.clone(), (ti, u.pending)))
            })
        })
        .collect();
    let mut pending_in_tree: HashMap<String, u32> = HashMap::new();
    for (ti, t) in tables.iter_mut().enumerate() {
        let pid = t.pid;
        for u in t.files.iter_mut().filter_map(|f| f.unix.as_mut()) {
            if u.external_peer.is_empty() {
                continue;
            }
            if u.pending != 0 {
                // Within one process pending clients are restored last (see
                // below); across processes, in tree order.
                if let Some(&(lt, _)) = listeners.get(&u.external_peer) {
                    if lt > ti {
                        return Err(Error::Refused {
                            pid,
                            reason: format!(
                                "unix socket:[{}] waits to be accepted by {}, which is restored after it; not supported yet",
                                u.ino, u.external_peer
                            ),
                        });
                    }
                    u.listener_in_tree = true;
                    *pending_in_tree.entry(u.external_peer.clone()).or_default() += 1;
                    continue;
                }
            }
            if sockets.contains(&u.peer) {
                u.external_peer.clear();
            } else if !ext_unix_sk {
                return Err(Error::Refused {
                    pid: t.pid,
                    reason: format!(
                        "unix socket:[{}] is connected to {} (socket:[{}]) of another process; \
                         dump with --ext-unix-sk to reconnect it by name on restore",
                        u.ino, u.external_peer, u.peer
                    ),
                });
            }
        }
    }
    // Pending clients connect again last in their process, oldest socket
    // first: the listener then queues them in the order they came (socket
    // creation order stands in for connect order, which the kernel does not
    // show).
    for t in tables.iter_mut() {
        t.files.sort_by_key(|f| match &f.unix {
            Some(u) if u.listener_in_tree => (1, u.ino),
            _ => (0, 0),
        });
    }
    for (name, &(ti, pending)) in &listeners {
        let ours = pending_in_tree.get(name).copied().unwrap_or(0);
        if pending > ours {
            return Err(Error::Refused {
                pid: tables[ti].pid,
                reason: format!(
                    "unix listener {name} has {} connections not yet accepted from outside the dumped processes; \
                     they would be lost",
                    pending - ours
                ),
            });
        }
    }
    let mut next_shared = 1u64;
    // pipe id -> (creator pid, has read end, has write end, path)
    let mut pipes: HashMap<u64, (i32, bool, bool, String)> = HashMap::new();
    for i in 0..tables.len() {
        let (earlier, rest) = tables.split_at_mut(i);
        let t = &mut rest[0];
        let pid = t.pid;
        for f in t.files.iter_mut() {
            f.owner_pid = pid;
            if f.kind == FileKind::FilePipe as i32 {
                let e = pipes
                    .entry(f.pipe_id)
                    .or_insert((pid, false, false, f.path.clone()));
                if f.flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32 {
                    e.1 = true;
                } else {
                    e.2 = true;
                }
                f.owner_pid = e.0;
            }
            let fd = t.fds.iter().find(|d| d.file_id == f.id).map(|d| d.fd);
            let Some(fd) = fd else { continue };
            'search: for other in earlier.iter_mut() {
                for g in other.files.iter_mut() {
                    if g.kind != f.kind || g.dev != f.dev || g.ino != f.ino {
                        continue;
                    }
                    let Some(gfd) = other.fds.iter().find(|d| d.file_id == g.id).map(|d| d.fd)
                    else {
                        continue;
                    };
                    if sys::pidfd::kcmp_file(other.pid, gfd, pid, fd).ok() == Some(0) {
                        if g.kind == FileKind::FileEpoll as i32 {
                            return Err(Error::Refused {
                                pid,
                                reason: format!(
                                    "an epoll shared with process {}: not supported yet",
                                    other.pid
                                ),
                            });
                        }
                        if g.shared_id == 0 {
                            g.shared_id = next_shared;
                            next_shared += 1;
                        }
                        f.shared_id = g.shared_id;
                        f.owner_pid = g.owner_pid;
                        break 'search;
                    }
                }
            }
        }
    }
    // Unix socket pairs: the first process holding either end recreates
    // the pair; both ends must be in the tree.
    let mut pairs: HashMap<u64, (i32, Vec<u64>)> = HashMap::new();
    for t in tables.iter_mut() {
        for f in t.files.iter_mut() {
            let Some(u) = f
                .unix
                .as_ref()
                .filter(|u| !u.listening && u.external_peer.is_empty())
            else {
                continue;
            };
            let key = u.ino.min(u.peer);
            let e = pairs.entry(key).or_insert((t.pid, Vec::new()));
            e.1.push(u.ino);
            f.owner_pid = e.0;
        }
    }
    let present: std::collections::HashSet<u64> =
        pairs.values().flat_map(|p| p.1.iter().copied()).collect();
    mark_accepted(tables);
    for t in tables.iter() {
        for u in t.files.iter().filter_map(|f| f.unix.as_ref()) {
            if !u.listening && u.external_peer.is_empty() && !present.contains(&u.peer) {
                return Err(Error::Refused {
                    pid: t.pid,
                    reason: format!(
                        "unix socket:[{}] is connected to socket:[{}] outside the dumped processes; not supported yet",
                        u.ino, u.peer
                    ),
                });
            }
        }
    }
    for (ino, (pid, r, w, path)) in pipes {
        if !(r && w) && held_outside(ino) {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "{path}: its {} end is outside the dumped processes; external pipes are not supported yet",
                    if r { "write" } else { "read" }
                ),
            });
        }
    }
    // A pipe's buffered bytes are kept once, with its first read end.
    let mut seen = std::collections::HashSet::new();
    for f in tables.iter_mut().flat_map(|t| t.files.iter_mut()) {
        if f.kind == FileKind::FilePipe as i32 && !f.pipe_data.is_empty() && !seen.insert(f.pipe_id)
        {
            f.pipe_data.clear();
        }
    }
    Ok(())
}

/// Sets a task's effective uid and gid (it is still root: real and saved
/// ids stay 0, so it can come back).
fn set_effective_ids(remote: &Remote, uid: u32, gid: u32) -> Result<()> {
    let keep = u64::MAX; // -1: unchanged
    if uid == 0 {
        remote.syscall(libc::SYS_setresuid, &[keep, 0, keep])?;
        remote.syscall(libc::SYS_setresgid, &[keep, gid as u64, keep])?;
    } else {
        remote.syscall(libc::SYS_setresgid, &[keep, gid as u64, keep])?;
        remote.syscall(libc::SYS_setresuid, &[keep, uid as u64, keep])?;
    }
    Ok(())
}

/// Makes the task run `nr(args)` with effective ids `cred` (when known),
/// back to root after: credentials the kernel records at that call.
fn as_ids(
    r: &Remote,
    cred: Option<&ckpt_proto::image::PeerCred>,
    nr: i64,
    args: &[u64],
) -> Result<u64> {
    if let Some(c) = cred {
        set_effective_ids(r, c.uid, c.gid)?;
    }
    let res = r.syscall(nr, args);
    if cred.is_some() {
        set_effective_ids(r, 0, 0)?;
    }
    res
}

/// Moves descriptor `fd` of the task `r` drives into the agent (closed
/// in the task).
fn take_out(r: &Remote, fd: u64) -> Result<std::os::fd::OwnedFd> {
    let host = r.tid.as_raw();
    let pidfd = sys::pidfd::pidfd_open(host).map_err(|e| Error::sys(host, "pidfd_open", e))?;
    let ours = sys::pidfd::pidfd_getfd(pidfd.as_fd(), fd as i32)
        .map_err(|e| Error::sys(host, format!("pidfd_getfd fd {fd}"), e))?;
    r.syscall(libc::SYS_close, &[fd])?;
    Ok(ours)
}

/// Runs `f` with an injector into process `host` (images' PID `pid`): the
/// task being built (its own remote and scratch) or a process of the
/// checkpoint not built yet (still a blank copy of the agent, with a
/// scratch area mapped for the occasion and unmapped after).
fn with_task<T>(
    op: &Opener<'_>,
    scratch: &mut Scratch,
    pid: i32,
    f: impl FnOnce(&Remote, &mut Scratch) -> Result<T>,
) -> Result<T> {
    if pid == op.pid {
        return f(op.remote, scratch);
    }
    let host = *op.shared.hosts.get(&pid).ok_or_else(|| Error::Refused {
        pid: op.pid,
        reason: format!("process {pid} of the checkpoint was not created"),
    })?;
    const LEN: u64 = 16 * 4096;
    let remote = Remote::new(
        nix::unistd::Pid::from_raw(host),
        sys::gadget::syscall_gadget_addr(),
    )?;
    let busy: Vec<(u64, u64)> = proc::maps(host)?.iter().map(|m| (m.start, m.end)).collect();
    let at = crate::mm::find_gap(&busy, LEN).ok_or_else(|| Error::Refused {
        pid: host,
        reason: "no free address range for a scratch area".into(),
    })?;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    remote.syscall(libc::SYS_mmap, &[at, LEN, prot, flags, u64::MAX, 0])?;
    let mut sc = Scratch::new(host, at, LEN);
    let r = f(&remote, &mut sc);
    remote.syscall(libc::SYS_munmap, &[at, LEN])?;
    r
}

/// Marks the connections made through a listener (see `UnixSocket.accepted`):
/// a stream or seqpacket pair in the tree whose one end is named and its
/// unnamed peer sees that name.
fn mark_accepted(tables: &mut [FdTable]) {
    use std::collections::HashMap;
    let ends: HashMap<u64, (String, String, u32)> = tables
        .iter()
        .flat_map(|t| t.files.iter().filter_map(|f| f.unix.as_ref()))
        .filter(|u| !u.listening && u.external_peer.is_empty() && u.peer != 0)
        .map(|u| {
            (
                u.ino,
                (u.bound_name.clone(), u.peer_name.clone(), u.sock_type),
            )
        })
        .collect();
    let accepted = |ino: u64, peer: u64| -> bool {
        let (Some(x), Some(y)) = (ends.get(&ino), ends.get(&peer)) else {
            return false;
        };
        let named = x.0.starts_with('/') || x.0.starts_with('@');
        named && y.0.is_empty() && y.1 == x.0 && x.2 != libc::SOCK_DGRAM as u32
    };
    for u in tables
        .iter_mut()
        .flat_map(|t| t.files.iter_mut().filter_map(|f| f.unix.as_mut()))
    {
        if ends.contains_key(&u.ino) {
            u.accepted = accepted(u.ino, u.peer);
            u.connected_by_name = accepted(u.peer, u.ino);
        }
    }
}

/// Saves a file's whole content into the image (files unlinked while open,
/// memfds) and returns the image file's name.
fn save_content(
    pid: i32,
    fd: i32,
    file: &std::fs::File,
    size: u64,
    images: &ImageWriter,
) -> Result<String> {
    let name = format!("ghost-{pid}-{fd}.img");
    let out = images.dir().join(&name);
    let mut dst = std::fs::File::create(&out).map_err(|e| Error::io(&out, e))?;
    copy_at(file, &mut dst, size).map_err(|e| Error::io(&out, e))?;
    images.add_raw(&name)?;
    Ok(name)
}

fn copy_at(src: &std::fs::File, dst: &mut std::fs::File, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = src.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(dst, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Recreates a file unlinked while open: at its old path when that is free,
/// else beside it, as task `pid` sees the file system (its mount namespace
/// may be a job's own, with a private /tmp and /dev/shm). Returns the path
/// for the task to open, and the same file as the agent reaches it, which
/// the caller unlinks once the task has opened it.
fn recreate_ghost(pid: i32, of: &OpenFile, images_dir: &Path) -> Result<(String, PathBuf)> {
    let content = images_dir.join(&of.ghost);
    let orig = Path::new(&of.path);
    let parent = orig.parent().unwrap_or(Path::new("/"));
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let candidates = [
        orig.to_path_buf(),
        parent.join(format!(".ckpt-ghost-{}-{}", of.ino, std::process::id())),
    ];
    for path in candidates {
        let ours = root.join(path.strip_prefix("/").unwrap_or(&path));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(of.mode & 0o7777)
            .open(&ours);
        let Ok(mut f) = f else { continue };
        let mut src = std::fs::File::open(&content).map_err(|e| Error::io(&content, e))?;
        std::io::copy(&mut src, &mut f).map_err(|e| Error::io(&path, e))?;
        let _ = std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(of.mode & 0o7777));
        let _ = std::os::unix::fs::chown(&ours, Some(of.uid), Some(of.gid));
        return Ok((path.to_string_lossy().into_owned(), ours));
    }
    Err(Error::io(
        parent,
        std::io::Error::other(format!(
            "cannot recreate an unlinked open file here (as pid {pid} sees it)"
        )),
    ))
}

/// Gets a fresh descriptor (in the task) for one open file, creating pipes
/// whole when their first end comes up.
struct Opener<'a> {
    pid: i32,
    /// The task's pidfd, for taking copies of its descriptors.
    pidfd: std::os::fd::OwnedFd,
    images_dir: &'a Path,
    remote: &'a Remote,
    /// Descriptors at or above this number never collide with a target fd.
    high: u64,
    /// Both ends of each pipe created so far, and whether each was handed out.
    pipes: std::collections::HashMap<u64, [(u64, bool); 2]>,
    /// Both ends (in the task) of each unix socket pair it created.
    socks: std::collections::HashMap<u64, [u64; 2]>,
    shared: &'a mut Shared,
    /// The task's socket that receives descriptors from the agent, and
    /// the agent's copy of its other end.
    receiver: Option<u64>,
    sender: Option<std::os::fd::OwnedFd>,
    /// Whether sockets connected outside the checkpoint may be reconnected.
    ext_unix_sk: bool,
}

/// Kernel objects that several processes of a checkpoint share. Open file
/// descriptions: the agent keeps a copy of each, taken from the process
/// that recreated it, and passes it to the others with SCM_RIGHTS. Shared
/// anonymous memory: the others map the recreating process's object.
#[derive(Default)]
pub struct Shared {
    files: std::collections::HashMap<u64, std::os::fd::OwnedFd>,
    pipe_ends: std::collections::HashMap<(u64, usize), std::os::fd::OwnedFd>,
    pipe_data: std::collections::HashMap<u64, Vec<u8>>,
    /// Shared memory objects (anonymous, memfd) recreated so far, by inode:
    /// the path a process of the job opens to get the same object.
    pub shm: std::collections::HashMap<u64, String>,
    /// Both ends of each unix socket pair recreated so far, by (pair, end).
    sock_ends: std::collections::HashMap<(u64, usize), std::os::fd::OwnedFd>,
    /// Every unix socket end's queue and shutdown state, by inode.
    sock_state: std::collections::HashMap<u64, (Vec<Vec<u8>>, u32)>,
    /// Every unix socket end's SO_PEERCRED, by inode.
    sock_creds: std::collections::HashMap<u64, ckpt_proto::image::PeerCred>,
    /// FIFOs held open read-write by the agent for the whole restore, so
    /// that no open of them blocks and their refilled bytes stay.
    fifos: std::collections::HashMap<u64, std::fs::File>,
    /// Pty pairs of the checkpoint, recreated by the agent.
    pub ptys: crate::tty::Ptys,
    /// Terminals of the dumping shell are reopened on the agent's.
    pub shell_job: bool,
    /// Every process of the checkpoint: its PID in the images -> the
    /// agent's, for system calls injected into a process not yet built.
    pub hosts: std::collections::HashMap<i32, i32>,
    /// Every unix socket end, by inode, and the first process (images'
    /// PID) holding it.
    unix_ends: std::collections::HashMap<u64, (ckpt_proto::image::UnixSocket, i32)>,
    /// The agent's copy of each listener restored so far, by name.
    listeners: std::collections::HashMap<String, std::os::fd::OwnedFd>,
    /// Listeners that already have restored clients waiting to be accepted.
    queued: std::collections::HashSet<String>,
}

impl Shared {
    /// Gathers what must be known before any process is restored (the
    /// buffered bytes of every pipe, which may be kept with an end that
    /// another process than the pipe's creator holds).
    pub fn new(tables: &[&FdTable]) -> Self {
        let mut s = Shared::default();
        for t in tables {
            for u in t.files.iter().filter_map(|f| f.unix.as_ref()) {
                s.unix_ends.entry(u.ino).or_insert((u.clone(), t.pid));
            }
        }
        for f in tables.iter().flat_map(|t| t.files.iter()) {
            let piped = f.kind == FileKind::FilePipe as i32 || f.kind == FileKind::FileFifo as i32;
            if piped && !f.pipe_data.is_empty() {
                s.pipe_data.insert(f.pipe_id, f.pipe_data.clone());
            }
            s.ptys.note(f);
            if let Some(u) = &f.unix {
                s.sock_state.insert(u.ino, (u.queue.clone(), u.shutdown));
                if let Some(c) = &u.peer_cred {
                    s.sock_creds.insert(u.ino, *c);
                }
            }
        }
        s
    }
}

impl Opener<'_> {
    /// Takes a copy of descriptor `fd` of the task into the agent.
    fn take(&self, fd: u64) -> Result<std::os::fd::OwnedFd> {
        sys::pidfd::pidfd_getfd(self.pidfd.as_fd(), fd as i32)
            .map_err(|e| Error::sys(self.pid, format!("pidfd_getfd fd {fd}"), e))
    }

    /// Sets the task's effective uid and gid (it is still root: real and
    /// saved ids stay 0, so it can come back).
    fn set_effective_ids(&self, uid: u32, gid: u32) -> Result<()> {
        set_effective_ids(self.remote, uid, gid)
    }

    /// Gives memfd `fd` the seals it had; `sealable` says whether the
    /// object was created with sealing allowed.
    fn add_seals(&self, of: &OpenFile, fd: u64, sealable: bool) -> Result<()> {
        const F_SEAL_SEAL: u32 = 1;
        let seals = match (of.memfd_allow_sealing, sealable) {
            (true, _) => of.memfd_seals,
            // Without MFD_ALLOW_SEALING a memfd reports just F_SEAL_SEAL.
            (false, true) => F_SEAL_SEAL,
            (false, false) if of.memfd_seals & !F_SEAL_SEAL != 0 => {
                return Err(Error::Refused {
                    pid: self.pid,
                    reason: format!("memfd {} has seals but did not allow sealing", of.path),
                })
            }
            (false, false) => 0,
        };
        if seals != 0 && sealable {
            self.remote.syscall(
                libc::SYS_fcntl,
                &[fd, libc::F_ADD_SEALS as u64, seals as u64],
            )?;
        }
        Ok(())
    }

    /// Puts the agent's descriptor `ours` into the task (SCM_RIGHTS over a
    /// socket pair the task makes, one end of which the agent takes: no
    /// name, so it works whatever network namespace the task is in) and
    /// returns its number there.
    fn install(&mut self, ours: std::os::fd::BorrowedFd<'_>, scratch: &mut Scratch) -> Result<u64> {
        use nix::sys::socket::{self, ControlMessage, MsgFlags};
        let pid = self.pid;
        let sock = match self.receiver {
            Some(s) => s,
            None => {
                scratch.reset();
                let arr = scratch.alloc(8)?;
                self.remote.syscall(
                    libc::SYS_socketpair,
                    &[
                        libc::AF_UNIX as u64,
                        (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64,
                        0,
                        arr,
                    ],
                )?;
                let b = crate::inject::read_mem(self.remote.tid.as_raw(), arr, 8)?;
                let mine = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) as u64;
                let theirs = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as u64;
                self.sender = Some(self.take(theirs)?);
                self.remote.syscall(libc::SYS_close, &[theirs])?;
                // Out of the way of the fds being placed.
                let s = self.to_high(mine)?;
                self.receiver = Some(s);
                s
            }
        };
        let sender = self.sender.as_ref().expect("sender made with the receiver");
        let fds = [std::os::fd::AsRawFd::as_raw_fd(&ours)];
        socket::sendmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(sender),
            &[std::io::IoSlice::new(b"f")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| Error::sys(pid, "sendmsg(SCM_RIGHTS)", e))?;
        // recvmsg in the task: msghdr, one 1-byte iovec, room for one fd.
        scratch.reset();
        let buf = scratch.alloc(8)?;
        let iov = scratch.put(&[buf.to_le_bytes(), 1u64.to_le_bytes()].concat())?;
        let control = scratch.alloc(32)?;
        let mut hdr = Vec::with_capacity(56);
        for v in [0u64, 0, iov, 1, control, 32, 0] {
            hdr.extend_from_slice(&v.to_le_bytes());
        }
        let hp = scratch.put(&hdr)?;
        self.remote.syscall(
            libc::SYS_recvmsg,
            &[sock, hp, libc::MSG_CMSG_CLOEXEC as u64],
        )?;
        let c = crate::inject::read_mem(self.remote.tid.as_raw(), control, 24)?;
        let level = i32::from_le_bytes(c[8..12].try_into().expect("4 bytes"));
        let kind = i32::from_le_bytes(c[12..16].try_into().expect("4 bytes"));
        if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
            return Err(Error::Refused {
                pid,
                reason: "no descriptor arrived over the restore socket".into(),
            });
        }
        let fd = i32::from_le_bytes(c[16..20].try_into().expect("4 bytes")) as u64;
        self.to_high(fd)
    }

    /// A new unix socket in the task, bound to (`bind`) or connected to
    /// `name` (a path, or "@x" for an abstract name).
    fn named_socket(
        &mut self,
        kind: u32,
        name: &str,
        bind: bool,
        scratch: &mut Scratch,
    ) -> Result<u64> {
        scratch.reset();
        let fd = self
            .remote
            .syscall(libc::SYS_socket, &[libc::AF_UNIX as u64, kind as u64, 0])?;
        let addr = crate::unix::sockaddr(name);
        let ap = scratch.put(&addr)?;
        let (nr, what) = if bind {
            (libc::SYS_bind, "bind a unix socket to")
        } else {
            (libc::SYS_connect, "reconnect a unix socket to")
        };
        self.remote
            .syscall(nr, &[fd, ap, addr.len() as u64])
            .map_err(|e| Error::Refused {
                pid: self.pid,
                reason: format!("cannot {what} {name}: {e}"),
            })?;
        Ok(fd)
    }

    /// A socket connected to another process's named socket, connected
    /// again by that name (what the peer had sent but not been read is
    /// not kept: it was the peer's).
    fn reconnect(
        &mut self,
        u: &ckpt_proto::image::UnixSocket,
        scratch: &mut Scratch,
        status: u64,
    ) -> Result<(u64, bool)> {
        // A connection not yet accepted by a listener of the checkpoint
        // connects again, and waits in its (restored) queue as before.
        if !self.ext_unix_sk && !u.listener_in_tree {
            return Err(Error::Refused {
                pid: self.pid,
                reason: format!(
                    "a unix socket was connected to {} outside the checkpoint: restore with --ext-unix-sk to reconnect it",
                    u.external_peer
                ),
            });
        }
        let fd = self.named_socket(u.sock_type, &u.external_peer, false, scratch)?;
        if u.listener_in_tree {
            self.shared.queued.insert(u.external_peer.clone());
        }
        self.remote
            .syscall(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, status])?;
        Ok((fd, true))
    }

    /// A listening unix socket, bound again to its name (a stale socket
    /// file left at its path by the dumped process is replaced).
    fn listener(
        &mut self,
        u: &ckpt_proto::image::UnixSocket,
        scratch: &mut Scratch,
        status: u64,
    ) -> Result<(u64, bool)> {
        if u.name.starts_with('/') {
            use std::os::unix::fs::FileTypeExt;
            // The path as the task sees it (a job's /tmp is its own).
            let path = format!("/proc/{}/root{}", self.remote.tid, u.name);
            let stale = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
            if stale {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        let fd = self.named_socket(u.sock_type, &u.name, true, scratch)?;
        // Its clients see the credentials listen() was called with.
        if let Some(c) = &u.peer_cred {
            self.set_effective_ids(c.uid, c.gid)?;
        }
        let listened = self
            .remote
            .syscall(libc::SYS_listen, &[fd, u.backlog as u64]);
        if u.peer_cred.is_some() {
            self.set_effective_ids(0, 0)?;
        }
        listened?;
        self.remote
            .syscall(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, status])?;
        let ours = self.take(fd)?;
        self.shared.listeners.insert(u.name.clone(), ours);
        Ok((fd, true))
    }

    /// Queues each end's saved data again (sent through the other end) and
    /// shuts them down as they were.
    fn refill_pair(&self, key: u64, u: &ckpt_proto::image::UnixSocket) -> Result<()> {
        // End 0 stands for the pair's lower inode, end 1 for the other.
        let inos = [key, u.ino.max(u.peer)];
        for (e, ino) in inos.iter().enumerate() {
            let (queue, _) = self.shared.sock_state.get(ino).cloned().unwrap_or_default();
            let sender = &self.shared.sock_ends[&(key, 1 - e)];
            crate::unix::refill(self.pid, sender.as_fd(), &queue)?;
        }
        for (e, ino) in inos.iter().enumerate() {
            let how = self.shared.sock_state.get(ino).map_or(0, |s| s.1);
            crate::unix::shut(self.pid, self.shared.sock_ends[&(key, e)].as_fd(), how)?;
        }
        Ok(())
    }

    /// Makes a connection through a listener again: a real connect (by the
    /// process holding the client end, with the effective ids it connected
    /// with) and accept, so that both ends name the listener and carry
    /// the peer credentials of the processes that connected and listened.
    /// The listener is the restored one, or a stand-in with its name, made
    /// by the process holding the accepted end when the name is free (the
    /// listener is gone or restored later). Returns the agent's copies of
    /// both ends (by end index), or None when that cannot be done (the
    /// pair is then made with socketpair and the ends are unnamed).
    fn accepted_pair(
        &mut self,
        u: &ckpt_proto::image::UnixSocket,
        scratch: &mut Scratch,
    ) -> Result<Option<[std::os::fd::OwnedFd; 2]>> {
        let (x_ino, y_ino) = if u.accepted {
            (u.ino, u.peer)
        } else {
            (u.peer, u.ino)
        };
        let (Some((x, x_pid)), Some((y, y_pid))) = (
            self.shared.unix_ends.get(&x_ino).cloned(),
            self.shared.unix_ends.get(&y_ino).cloned(),
        ) else {
            return Ok(None);
        };
        let name = x.bound_name.clone();
        if self.shared.queued.contains(&name) {
            // Accepting now would take a client restored as waiting.
            tracing::debug!(
                name,
                "listener has waiting clients: accepted pair made unnamed"
            );
            return Ok(None);
        }
        let addr = crate::unix::sockaddr(&name);
        let kind = u.sock_type as u64;
        let real = self.shared.listeners.contains_key(&name);
        // A stand-in listener where the accepted end's process is.
        let stand_in = if real {
            None
        } else {
            let lc = y.peer_cred;
            let made = with_task(self, scratch, x_pid, |r, sc| {
                sc.reset();
                let fd = r.syscall(
                    libc::SYS_socket,
                    &[libc::AF_UNIX as u64, kind | libc::SOCK_CLOEXEC as u64, 0],
                )?;
                let ap = sc.put(&addr)?;
                if r.syscall(libc::SYS_bind, &[fd, ap, addr.len() as u64])
                    .is_err()
                {
                    r.syscall(libc::SYS_close, &[fd])?;
                    return Ok(None);
                }
                as_ids(r, lc.as_ref(), libc::SYS_listen, &[fd, 1])?;
                Ok(Some(fd))
            })?;
            match made {
                Some(fd) => Some(fd),
                None => return Ok(None),
            }
        };
        // The client connects, as the process and ids that did.
        let cc = x.peer_cred;
        let client = with_task(self, scratch, y_pid, |r, sc| {
            sc.reset();
            let fd = r.syscall(
                libc::SYS_socket,
                &[libc::AF_UNIX as u64, kind | libc::SOCK_CLOEXEC as u64, 0],
            )?;
            let ap = sc.put(&addr)?;
            as_ids(
                r,
                cc.as_ref(),
                libc::SYS_connect,
                &[fd, ap, addr.len() as u64],
            )?;
            take_out(r, fd)
        });
        // Accepted only once the client is connected: an accept with
        // nothing queued would wait for ever.
        let accepted = match (&client, stand_in) {
            (Err(e), _) => Err(Error::Refused {
                pid: y_pid,
                reason: format!("cannot connect to {name} again: {e}"),
            }),
            (Ok(_), None) => {
                let l = &self.shared.listeners[&name];
                sys::misc::accept(l.as_fd())
                    .map_err(|e| Error::sys(self.pid, format!("accept on {name}"), e))
            }
            (Ok(_), Some(tl)) => with_task(self, scratch, x_pid, |r, _| {
                let fd = r.syscall(libc::SYS_accept4, &[tl, 0, 0, libc::SOCK_CLOEXEC as u64])?;
                take_out(r, fd)
            }),
        };
        if let Some(tl) = stand_in {
            self.drop_stand_in(x_pid, tl, &name, scratch)?;
        }
        let (accepted, client) = (accepted?, client?);
        let key = x_ino.min(y_ino);
        Ok(Some(if key == x_ino {
            [accepted, client]
        } else {
            [client, accepted]
        }))
    }

    /// Closes a stand-in listener; the socket file of a path name goes
    /// too, so that the real listener (restored later, if any) binds the
    /// name again.
    fn drop_stand_in(
        &mut self,
        pid: i32,
        fd: u64,
        name: &str,
        scratch: &mut Scratch,
    ) -> Result<()> {
        with_task(self, scratch, pid, |r, _| {
            r.syscall(libc::SYS_close, &[fd])?;
            if name.starts_with('/') {
                let path = format!("/proc/{}/root{name}", r.tid.as_raw());
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
            Ok(())
        })
    }

    /// A descriptor, in the task, of an open file another process of the
    /// checkpoint recreated.
    fn receive(&mut self, of: &OpenFile, scratch: &mut Scratch) -> Result<u64> {
        let pid = self.pid;
        let missing = || Error::Refused {
            pid,
            reason: format!(
                "{} is shared with process {}, which has not provided it",
                of.path, of.owner_pid
            ),
        };
        let ours = if let Some(u) = &of.unix {
            let key = u.ino.min(u.peer);
            self.shared
                .sock_ends
                .get(&(key, usize::from(u.ino != key)))
                .ok_or_else(missing)?
                .try_clone()
        } else if of.kind == FileKind::FilePipe as i32 {
            let end = usize::from(of.flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32);
            self.shared
                .pipe_ends
                .get(&(of.pipe_id, end))
                .ok_or_else(missing)?
                .try_clone()
        } else {
            self.shared
                .files
                .get(&of.shared_id)
                .ok_or_else(missing)?
                .try_clone()
        }
        .map_err(|e| Error::sys(pid, "dup", e))?;
        self.install(ours.as_fd(), scratch)
    }

    fn open_path(&self, scratch: &mut Scratch, path: &str, flags: u32) -> Result<u64> {
        scratch.reset();
        let p = scratch.put_cstr(path)?;
        let strip =
            (libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOCTTY)
                as u32;
        // Never a controlling terminal by accident: tty.rs sets those.
        let flags = (flags & !strip) | libc::O_NOCTTY as u32;
        self.remote.syscall(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, p, flags as u64, 0],
        )
    }

    fn to_high(&self, fd: u64) -> Result<u64> {
        let h = self
            .remote
            .syscall(libc::SYS_fcntl, &[fd, libc::F_DUPFD as u64, self.high])?;
        self.remote.syscall(libc::SYS_close, &[fd])?;
        Ok(h)
    }

    /// Returns a descriptor for `of` and whether the caller must close it.
    fn open(&mut self, of: &OpenFile, scratch: &mut Scratch) -> Result<(u64, bool)> {
        let pid = self.pid;
        let kind = FileKind::try_from(of.kind).unwrap_or(FileKind::FileRegular);
        let status = (of.flags
            & (libc::O_NONBLOCK | libc::O_APPEND | libc::O_ASYNC | libc::O_NOATIME) as u32)
            as u64;
        match kind {
            FileKind::FilePipe => {
                let end = usize::from(of.flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32);
                if !self.pipes.contains_key(&of.pipe_id) {
                    let arr = scratch.alloc(8)?;
                    self.remote.syscall(libc::SYS_pipe2, &[arr, 0])?;
                    let b = crate::inject::read_mem(self.remote.tid.as_raw(), arr, 8)?;
                    let r = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) as u64;
                    let w = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as u64;
                    if of.pipe_size != 0 && of.pipe_size != 65536 {
                        self.remote.syscall(
                            libc::SYS_fcntl,
                            &[w, libc::F_SETPIPE_SZ as u64, of.pipe_size as u64],
                        )?;
                    }
                    let (r, w) = (self.to_high(r)?, self.to_high(w)?);
                    self.pipes.insert(of.pipe_id, [(r, false), (w, false)]);
                    if let Some(data) = self.shared.pipe_data.get(&of.pipe_id) {
                        self.fill_pipe(w, data)?;
                    }
                    // Other processes holding an end get it from us.
                    for (end, fd) in [(0, r), (1, w)] {
                        let ours = self.take(fd)?;
                        self.shared.pipe_ends.insert((of.pipe_id, end), ours);
                    }
                }
                let (fd, used) = self.pipes[&of.pipe_id][end];
                let fd = if used {
                    // A second open file description of the same end.
                    self.open_path(scratch, &format!("/proc/self/fd/{fd}"), of.flags)?
                } else {
                    self.pipes.get_mut(&of.pipe_id).expect("pipe just created")[end].1 = true;
                    // Pipe ends are closed once every file is placed.
                    self.remote
                        .syscall(libc::SYS_fcntl, &[fd, libc::F_DUPFD as u64, self.high])?
                };
                self.remote
                    .syscall(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, status])?;
                Ok((fd, true))
            }
            FileKind::FileEventfd => {
                let mut flags = of.flags & libc::O_NONBLOCK as u32;
                if of.eventfd_semaphore {
                    flags |= libc::EFD_SEMAPHORE as u32;
                }
                let fd = self
                    .remote
                    .syscall(libc::SYS_eventfd2, &[of.eventfd_count, flags as u64])?;
                Ok((fd, true))
            }
            FileKind::FileInotify => {
                let flags = of.flags & libc::O_NONBLOCK as u32;
                let fd = self
                    .remote
                    .syscall(libc::SYS_inotify_init1, &[flags as u64])?;
                // Watch descriptors are handed out in turn from 1 and not
                // reused at once: placeholder watches, removed again, skip
                // the numbers the original had already used up.
                let mut next = 1;
                for w in &of.inotify_watches {
                    scratch.reset();
                    while next < w.wd {
                        // IN_MASK_CREATE: never touch a real watch of the same file.
                        const IN_MASK_CREATE: u64 = 0x1000_0000;
                        let mut dummy = None;
                        for place in ["/", "/proc", "/sys", "/dev", "/tmp", "/etc"] {
                            let p = scratch.put_cstr(place)?;
                            let mask = libc::IN_ACCESS as u64 | IN_MASK_CREATE;
                            if let Ok(d) = self
                                .remote
                                .syscall(libc::SYS_inotify_add_watch, &[fd, p, mask])
                            {
                                dummy = Some(d);
                                break;
                            }
                        }
                        let dummy = dummy.ok_or_else(|| Error::Refused {
                            pid,
                            reason: format!("cannot skip inotify watch numbers up to {}", w.wd),
                        })?;
                        self.remote
                            .syscall(libc::SYS_inotify_rm_watch, &[fd, dummy])?;
                        next = dummy as i32 + 1;
                    }
                    let p = scratch.put_cstr(&w.path)?;
                    let got = self
                        .remote
                        .syscall(libc::SYS_inotify_add_watch, &[fd, p, w.mask as u64])
                        .map_err(|e| Error::Refused {
                            pid,
                            reason: format!("cannot watch {} again: {e}", w.path),
                        })? as i32;
                    if got != w.wd {
                        return Err(Error::Refused {
                            pid,
                            reason: format!("inotify watch {} came back as {got}", w.wd),
                        });
                    }
                    next = got + 1;
                }
                // Removing placeholders queued IN_IGNORED events: drop them.
                let ours = self.take(fd)?;
                sys::misc::drain_readable(ours.as_fd())
                    .map_err(|e| Error::sys(pid, "draining an inotify", e))?;
                Ok((fd, true))
            }
            FileKind::FileTimerfd => {
                let flags = of.flags & libc::O_NONBLOCK as u32;
                let fd = self.remote.syscall(
                    libc::SYS_timerfd_create,
                    &[of.timerfd_clock as u64, flags as u64],
                )?;
                if of.timerfd_value_ns != 0 || of.timerfd_interval_ns != 0 {
                    // The kernel reports the time left: set it relative.
                    let its =
                        crate::task::itimerspec_left(of.timerfd_interval_ns, of.timerfd_value_ns);
                    scratch.reset();
                    let p = scratch.put(&its)?;
                    self.remote
                        .syscall(libc::SYS_timerfd_settime, &[fd, 0, p, 0])?;
                }
                if of.timerfd_ticks != 0 {
                    const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
                    scratch.reset();
                    let p = scratch.put(&of.timerfd_ticks.to_le_bytes())?;
                    self.remote
                        .syscall(libc::SYS_ioctl, &[fd, TFD_IOC_SET_TICKS, p])?;
                }
                Ok((fd, true))
            }
            FileKind::FileUnixSocket => {
                let u = of.unix.as_ref().ok_or_else(|| Error::BadImages {
                    dir: self.images_dir.to_owned(),
                    reason: format!("unix socket of pid {pid} without its details"),
                })?;
                if u.listening {
                    return self.listener(u, scratch, status);
                }
                if !u.external_peer.is_empty() {
                    return self.reconnect(u, scratch, status);
                }
                let key = u.ino.min(u.peer);
                if !self.socks.contains_key(&key) && (u.accepted || u.connected_by_name) {
                    if let Some(ends) = self.accepted_pair(u, scratch)? {
                        let mut local = [0u64; 2];
                        for (e, ours) in ends.into_iter().enumerate() {
                            local[e] = self.install(ours.as_fd(), scratch)?;
                            self.shared.sock_ends.insert((key, e), ours);
                        }
                        self.refill_pair(key, u)?;
                        self.socks.insert(key, local);
                    }
                }
                if !self.socks.contains_key(&key) {
                    let arr = scratch.alloc(8)?;
                    // socketpair() gives both ends the caller's credentials:
                    // those of a pair made by this process, with the
                    // effective ids it had then.
                    let creds = [u.ino, u.peer].map(|i| self.shared.sock_creds.get(&i).copied());
                    let as_creator = match &creds {
                        [Some(a), Some(b)] if a == b && a.pid == pid => Some(*a),
                        _ => {
                            tracing::debug!(
                                pid,
                                ino = u.ino,
                                ?creds,
                                "socket pair's peer credentials not reproduced"
                            );
                            None
                        }
                    };
                    if let Some(c) = &as_creator {
                        self.set_effective_ids(c.uid, c.gid)?;
                    }
                    let made = self.remote.syscall(
                        libc::SYS_socketpair,
                        &[libc::AF_UNIX as u64, u.sock_type as u64, 0, arr],
                    );
                    if as_creator.is_some() {
                        self.set_effective_ids(0, 0)?;
                    }
                    made?;
                    let b = crate::inject::read_mem(self.remote.tid.as_raw(), arr, 8)?;
                    let a = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) as u64;
                    let c = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as u64;
                    let ends = [self.to_high(a)?, self.to_high(c)?];
                    for (e, fd) in ends.iter().enumerate() {
                        let ours = self.take(*fd)?;
                        self.shared.sock_ends.insert((key, e), ours);
                    }
                    self.refill_pair(key, u)?;
                    self.socks.insert(key, ends);
                }
                let local = self.socks[&key][usize::from(u.ino != key)];
                let fd = self
                    .remote
                    .syscall(libc::SYS_fcntl, &[local, libc::F_DUPFD as u64, self.high])?;
                self.remote
                    .syscall(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, status])?;
                Ok((fd, true))
            }
            FileKind::FileInetSocket => {
                let s = of.inet.as_ref().ok_or_else(|| Error::Refused {
                    pid,
                    reason: format!("IP socket {} has no socket state in the images", of.id),
                })?;
                let fd = self
                    .remote
                    .syscall(libc::SYS_socket, &crate::inet::socket_args(s))?;
                let ours = self.take(fd)?;
                let remote = self.remote;
                let mut raw = |family: i32| -> Result<std::os::fd::OwnedFd> {
                    let r = remote.syscall(
                        libc::SYS_socket,
                        &[
                            family as u64,
                            libc::SOCK_RAW as u64,
                            libc::IPPROTO_UDP as u64,
                        ],
                    )?;
                    let ours = sys::pidfd::pidfd_getfd(self.pidfd.as_fd(), r as i32)
                        .map_err(|e| Error::sys(pid, format!("pidfd_getfd fd {r}"), e));
                    remote.syscall(libc::SYS_close, &[r])?;
                    ours
                };
                crate::inet::restore(pid, ours.as_fd(), s, &mut raw)?;
                self.remote
                    .syscall(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, status])?;
                Ok((fd, true))
            }
            FileKind::FileFifo => {
                if !self.shared.fifos.contains_key(&of.pipe_id) {
                    // As the task sees it: a job's /tmp is its own.
                    let ours = format!(
                        "/proc/{}/root/{}",
                        self.remote.tid.as_raw(),
                        of.path.trim_start_matches('/')
                    );
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&ours)
                        .map_err(|e| Error::io(&of.path, e))?;
                    if of.pipe_size != 0 && of.pipe_size != 65536 {
                        nix::fcntl::fcntl(
                            &f,
                            nix::fcntl::FcntlArg::F_SETPIPE_SZ(of.pipe_size as i32),
                        )
                        .map_err(|e| Error::sys(pid, format!("F_SETPIPE_SZ {}", of.path), e))?;
                    }
                    if let Some(data) = self.shared.pipe_data.get(&of.pipe_id) {
                        std::io::Write::write_all(&mut &f, data).map_err(|e| {
                            Error::sys(pid, format!("refilling FIFO {}", of.path), e)
                        })?;
                    }
                    self.shared.fifos.insert(of.pipe_id, f);
                }
                let fd =
                    self.open_path(scratch, &of.path, of.flags)
                        .map_err(|e| Error::Refused {
                            pid,
                            reason: format!("cannot reopen FIFO {}: {e}", of.path),
                        })?;
                Ok((fd, true))
            }
            FileKind::FileMqueue => {
                scratch.reset();
                let name = scratch.put_cstr(of.path.trim_start_matches('/'))?;
                let flags = of.flags & (libc::O_ACCMODE | libc::O_NONBLOCK) as u32;
                let fd = self
                    .remote
                    .syscall(libc::SYS_mq_open, &[name, flags as u64, 0, 0])
                    .map_err(|e| Error::Refused {
                        pid,
                        reason: format!("cannot reopen POSIX message queue {}: {e}", of.path),
                    })?;
                Ok((fd, true))
            }
            FileKind::FileMemfd if self.shared.shm.contains_key(&of.ino) => {
                // A mapping restored before recreated this very object.
                scratch.reset();
                let p = scratch.put_cstr(&self.shared.shm[&of.ino])?;
                let flags = (of.flags & libc::O_ACCMODE as u32) as u64;
                let fd = self
                    .remote
                    .syscall(libc::SYS_openat, &[libc::AT_FDCWD as u64, p, flags, 0])?;
                if of.pos != 0 {
                    self.remote
                        .syscall(libc::SYS_lseek, &[fd, of.pos, libc::SEEK_SET as u64])?;
                }
                // Mappings create their memfd with sealing allowed.
                self.add_seals(of, fd, true)?;
                Ok((fd, true))
            }
            FileKind::FileMemfd => {
                scratch.reset();
                let name = scratch.put_cstr(&of.path)?;
                const MFD_ALLOW_SEALING: u64 = 2;
                let flags = if of.memfd_allow_sealing {
                    MFD_ALLOW_SEALING
                } else {
                    0
                };
                let fd = self
                    .remote
                    .syscall(libc::SYS_memfd_create, &[name, flags])?;
                let content = self.images_dir.join(&of.ghost);
                let data = std::fs::read(&content).map_err(|e| Error::io(&content, e))?;
                let ours = std::fs::File::from(self.take(fd)?);
                ours.set_len(data.len() as u64)
                    .map_err(|e| Error::sys(pid, "ftruncate memfd", e))?;
                ours.write_all_at(&data, 0)
                    .map_err(|e| Error::sys(pid, "refilling a memfd", e))?;
                if of.pos != 0 {
                    self.remote
                        .syscall(libc::SYS_lseek, &[fd, of.pos, libc::SEEK_SET as u64])?;
                }
                self.add_seals(of, fd, of.memfd_allow_sealing)?;
                let status = of.flags & (libc::O_NONBLOCK | libc::O_APPEND) as u32;
                self.remote
                    .syscall(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, status as u64])?;
                Ok((fd, true))
            }
            FileKind::FilePtyMaster | FileKind::FilePtySlave | FileKind::FileExtTty => {
                let host = self.remote.tid.as_raw();
                let shell_job = self.shared.shell_job;
                let fd = match crate::tty::open(pid, host, of, &mut self.shared.ptys, shell_job)? {
                    crate::tty::Reopen::Install(ours) => self.install(ours.as_fd(), scratch)?,
                    crate::tty::Reopen::Path(p) => self.open_path(scratch, &p, of.flags)?,
                };
                self.remote
                    .syscall(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, status])?;
                Ok((fd, true))
            }
            FileKind::FileSignalfd => {
                scratch.reset();
                let m = scratch.put(&of.signalfd_mask.to_le_bytes())?;
                let flags = of.flags & libc::O_NONBLOCK as u32;
                let fd = self
                    .remote
                    .syscall(libc::SYS_signalfd4, &[u64::MAX, m, 8, flags as u64])?;
                Ok((fd, true))
            }
            FileKind::FileEpoll => {
                let fd = self.remote.syscall(libc::SYS_epoll_create1, &[0])?;
                for t in &of.epoll_targets {
                    scratch.reset();
                    let mut ev = Vec::with_capacity(12);
                    ev.extend_from_slice(&t.events.to_le_bytes());
                    ev.extend_from_slice(&t.data.to_le_bytes());
                    let evp = scratch.put(&ev)?;
                    self.remote
                        .syscall(
                            libc::SYS_epoll_ctl,
                            &[fd, libc::EPOLL_CTL_ADD as u64, t.fd as u64, evp],
                        )
                        .map_err(|e| Error::Refused {
                            pid,
                            reason: format!("epoll: cannot watch fd {} again: {e}", t.fd),
                        })?;
                }
                Ok((fd, true))
            }
            _ => {
                let mut ghost_path = None;
                let path = if of.unlinked {
                    let (p, ours) = recreate_ghost(self.remote.tid.as_raw(), of, self.images_dir)?;
                    ghost_path = Some(ours);
                    p
                } else {
                    of.path.clone()
                };
                let opened = self.open_path(scratch, &path, of.flags);
                if let Some(g) = &ghost_path {
                    let _ = std::fs::remove_file(g);
                }
                let fd = opened.map_err(|e| Error::Refused {
                    pid,
                    reason: format!("cannot reopen {}: {e}", of.path),
                })?;
                let is_path = of.flags & libc::O_PATH as u32 != 0;
                if of.pos != 0 && !is_path {
                    self.remote
                        .syscall(libc::SYS_lseek, &[fd, of.pos, libc::SEEK_SET as u64])?;
                }
                Ok((fd, true))
            }
        }
    }

    /// Writes a pipe's saved bytes through our own copy of its write end.
    fn fill_pipe(&self, write_end: u64, data: &[u8]) -> Result<()> {
        let mut f = std::fs::File::from(self.take(write_end)?);
        std::io::Write::write_all(&mut f, data)
            .map_err(|e| Error::sys(self.pid, "refilling a pipe", e))
    }
}

/// Opens every file of the table in the task and puts it at its fds;
/// epolls come last, once the files they watch are in place.
pub fn restore(
    table: &FdTable,
    images_dir: &Path,
    remote: &Remote,
    scratch: &mut Scratch,
    shared: &mut Shared,
    ext_unix_sk: bool,
) -> Result<()> {
    let high = table
        .fds
        .iter()
        .map(|f| f.fd as u64 + 1)
        .max()
        .unwrap_or(0)
        .max(3);
    let mut opener = Opener {
        pid: table.pid,
        // The agent's view of the process: the remote's task.
        pidfd: sys::pidfd::pidfd_open(remote.tid.as_raw())
            .map_err(|e| Error::sys(remote.tid.as_raw(), "pidfd_open", e))?,
        images_dir,
        remote,
        high,
        pipes: Default::default(),
        socks: Default::default(),
        shared,
        receiver: None,
        sender: None,
        ext_unix_sk,
    };
    let (epolls, mut others): (Vec<&OpenFile>, Vec<&OpenFile>) = table
        .files
        .iter()
        .partition(|f| f.kind == FileKind::FileEpoll as i32);
    // Listening and bound sockets before connections: a connection the
    // process accepted shares its listener's port, and once rebuilt (and
    // out of repair mode, its own SO_REUSEADDR back) a later bind of the
    // listener would collide with it.
    others.sort_by_key(|f| f.inet.as_ref().is_some_and(|i| i.tcp.is_some()));
    for of in others.into_iter().chain(epolls) {
        let tmp = if of.owner_pid != 0 && of.owner_pid != table.pid {
            opener.receive(of, scratch)?
        } else {
            let (tmp, _) = opener.open(of, scratch)?;
            if of.shared_id != 0 && of.kind != FileKind::FilePipe as i32 {
                let ours = opener.take(tmp)?;
                opener.shared.files.insert(of.shared_id, ours);
            }
            tmp
        };
        let mut keep_tmp = false;
        for fd in table.fds.iter().filter(|f| f.file_id == of.id) {
            let target = fd.fd as u64;
            if target == tmp {
                keep_tmp = true;
                let v = if fd.cloexec { libc::FD_CLOEXEC } else { 0 };
                remote.syscall(libc::SYS_fcntl, &[tmp, libc::F_SETFD as u64, v as u64])?;
            } else {
                let flags = if fd.cloexec { libc::O_CLOEXEC } else { 0 };
                remote.syscall(libc::SYS_dup3, &[tmp, target, flags as u64])?;
            }
        }
        if !keep_tmp {
            remote.syscall(libc::SYS_close, &[tmp])?;
        }
        // Mappings of this memfd restored later (in any process) open it
        // through this descriptor.
        if of.kind == FileKind::FileMemfd as i32 {
            if let Some(fd) = table.fds.iter().find(|f| f.file_id == of.id) {
                opener
                    .shared
                    .shm
                    .entry(of.ino)
                    .or_insert_with(|| format!("/proc/{}/fd/{}", table.pid, fd.fd));
            }
        }
    }
    if let Some(s) = opener.receiver {
        remote.syscall(libc::SYS_close, &[s])?;
    }
    for ends in opener.pipes.values() {
        for (fd, _) in ends {
            remote.syscall(libc::SYS_close, &[*fd])?;
        }
    }
    for fd in opener.socks.values().flatten() {
        remote.syscall(libc::SYS_close, &[*fd])?;
    }
    if let Some(c) = &table.ctty {
        crate::tty::restore_ctty(table.pid, c, remote, scratch, &mut opener.shared.ptys)?;
    }
    Ok(())
}

/// POSIX message queue descriptors look like regular files of the
/// mqueue filesystem.
fn is_mqueue(file: &std::fs::File) -> bool {
    const MQUEUE_MAGIC: i64 = 0x1980_0202;
    nix::sys::statfs::fstatfs(file).is_ok_and(|s| s.filesystem_type().0 == MQUEUE_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timerfd_fdinfo() {
        let t = parse_timerfd(
            "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1057\nclockid: 1\nticks: 3\nsettime flags: 01\nit_value: (0, 19000000)\nit_interval: (2, 500)\n",
        );
        assert_eq!(t, Some((1, 3, 1, 19_000_000, 2_000_000_500)));
    }

    #[test]
    fn epoll_fdinfo() {
        let t = parse_epoll_targets(
            "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\ntfd:        5 events:       19 data:                5  pos:0 ino:3f sdev:d\ntfd:        7 events: 80000001 data: ffffffffffffffff  pos:0 ino:40 sdev:d\n",
        );
        assert_eq!(
            t,
            vec![
                EpollTarget {
                    fd: 5,
                    events: 0x19,
                    data: 5
                },
                EpollTarget {
                    fd: 7,
                    events: 0x8000_0001,
                    data: u64::MAX
                },
            ]
        );
    }
}
