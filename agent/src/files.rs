//! A process's file descriptors: dump and restore of its fd table and open
//! files (`FdTable`, files.proto). Regular files, directories and harmless
//! character devices are supported; files unlinked while open are saved
//! whole into the image ("ghost" files) and recreated on restore.

use std::cmp::Ordering;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ckpt_proto::image::{Fd, FdTable, FileKind, OpenFile};

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
pub fn dump(pid: i32, images: &ImageWriter) -> Result<FdTable> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let pidfd = sys::pidfd::pidfd_open(pid).map_err(|e| Error::sys(pid, "pidfd_open", e))?;

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
    for &fd in &order {
        let same = leader.is_some_and(|l| sys::pidfd::kcmp_file(pid, l, pid, fd).ok() == Some(0));
        if same {
            file_of_fd.insert(fd, files.len() as u32 - 1);
            continue;
        }
        leader = Some(fd);
        let link = proc::readlink(pid, &format!("fd/{fd}"))?;
        let info = proc::parse_fdinfo(&proc::read(pid, &format!("fdinfo/{fd}"))?);
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
        if link.starts_with("anon_inode:") {
            return Err(refuse(unsupported_kind(&link, mode)));
        }
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
        };
        match mode & libc::S_IFMT {
            libc::S_IFREG => {
                let deleted = link.ends_with(" (deleted)") || md.nlink() == 0;
                if deleted {
                    let name = format!("ghost-{pid}-{fd}.img");
                    let out = images.dir().join(&name);
                    let mut dst = std::fs::File::create(&out).map_err(|e| Error::io(&out, e))?;
                    let mut src = &file;
                    let _ = std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(0));
                    copy_at(&file, &mut dst, md.size()).map_err(|e| Error::io(&out, e))?;
                    images.add_raw(&name)?;
                    of.unlinked = true;
                    of.ghost = name;
                    of.path = link.trim_end_matches(" (deleted)").to_string();
                } else {
                    let on_disk = std::fs::metadata(&link).ok();
                    if on_disk.map(|m| (m.dev(), m.ino())) != Some((md.dev(), md.ino())) {
                        return Err(refuse("regular file replaced on disk since it was opened"));
                    }
                }
            }
            libc::S_IFDIR => of.kind = FileKind::FileDirectory as i32,
            libc::S_IFCHR => {
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
    let mut table = FdTable {
        pid,
        fds: Vec::with_capacity(fds.len()),
        files,
    };
    for fd in fds {
        let info = proc::parse_fdinfo(&proc::read(pid, &format!("fdinfo/{fd}"))?);
        table.fds.push(Fd {
            fd,
            file_id: file_of_fd[&fd],
            cloexec: info.flags & libc::O_CLOEXEC as u32 != 0,
        });
    }
    Ok(table)
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
/// else beside it; the caller unlinks it once the task has opened it.
fn recreate_ghost(of: &OpenFile, images_dir: &Path) -> Result<String> {
    let content = images_dir.join(&of.ghost);
    let orig = Path::new(&of.path);
    let parent = orig.parent().unwrap_or(Path::new("/"));
    let candidates = [
        orig.to_path_buf(),
        parent.join(format!(".ckpt-ghost-{}-{}", of.ino, std::process::id())),
    ];
    for path in candidates {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(of.mode & 0o7777)
            .open(&path);
        let Ok(mut f) = f else { continue };
        let mut src = std::fs::File::open(&content).map_err(|e| Error::io(&content, e))?;
        std::io::copy(&mut src, &mut f).map_err(|e| Error::io(&path, e))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(of.mode & 0o7777));
        let _ = std::os::unix::fs::chown(&path, Some(of.uid), Some(of.gid));
        return Ok(path.to_string_lossy().into_owned());
    }
    Err(Error::io(
        parent,
        std::io::Error::other("cannot recreate an unlinked open file here"),
    ))
}

/// Opens every file of the table in the task and puts it at its fds.
pub fn restore(
    table: &FdTable,
    images_dir: &Path,
    remote: &Remote,
    scratch: &mut Scratch,
) -> Result<()> {
    let pid = table.pid;
    for of in &table.files {
        let mut ghost_path = None;
        let path = if of.unlinked {
            let p = recreate_ghost(of, images_dir)?;
            ghost_path = Some(p.clone());
            p
        } else {
            of.path.clone()
        };
        scratch.reset();
        let p = scratch.put_cstr(&path)?;
        let strip =
            (libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOCTTY)
                as u32;
        let opened = remote.syscall(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, p, (of.flags & !strip) as u64, 0],
        );
        if let Some(g) = &ghost_path {
            let _ = std::fs::remove_file(g);
        }
        let tmp = opened.map_err(|e| Error::Refused {
            pid,
            reason: format!("cannot reopen {}: {e}", of.path),
        })?;
        let is_path = of.flags & libc::O_PATH as u32 != 0;
        if of.pos != 0 && !is_path {
            remote.syscall(libc::SYS_lseek, &[tmp, of.pos, libc::SEEK_SET as u64])?;
        }
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
    }
    Ok(())
}
