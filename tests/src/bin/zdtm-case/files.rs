//! Files: offsets, flags and fd numbers; unlinked files; shared open file
//! descriptions; device files; stdio redirected to files.

use std::os::unix::fs::MetadataExt;

use crate::util::*;
use crate::Ctx;

/// Opens `path` and moves the descriptor to number `fd`.
fn open_as(path: &str, flags: i32, fd: i32) -> Result<i32, String> {
    let c = cstr(path);
    // SAFETY: plain descriptor calls.
    unsafe {
        let tmp = cvt(
            libc::open(c.as_ptr(), flags, 0o644),
            &format!("open {path}"),
        )?;
        if tmp != fd {
            cvt(libc::dup2(tmp, fd), "dup2")?;
            libc::close(tmp);
        }
    }
    Ok(fd)
}

fn seek(fd: i32, off: i64, whence: i32) -> i64 {
    // SAFETY: no pointers.
    unsafe { libc::lseek(fd, off, whence) }
}

fn write_fd(fd: i32, data: &[u8]) -> CaseResult {
    // SAFETY: data is a valid buffer.
    let n = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
    if n != data.len() as isize {
        return Err(os_err(&format!("write fd {fd} ({n})")));
    }
    Ok(())
}

pub fn pread_fd(fd: i32, len: usize, off: i64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is len bytes.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr() as *mut libc::c_void, len, off) };
    if n < 0 {
        return Err(os_err(&format!("pread fd {fd}")));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn read_fd(fd: i32, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is len bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, len) };
    if n < 0 {
        return Err(os_err(&format!("read fd {fd}")));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Everything about a descriptor that a restore must reproduce.
#[derive(Debug, PartialEq)]
struct FdState {
    status_flags: i32,
    fd_flags: i32,
    pos: i64,
    link: String,
    dev: u64,
    ino: u64,
    rdev: u64,
    nlink: u64,
    size: i64,
    mode: u32,
}

fn fd_state(fd: i32) -> FdState {
    // SAFETY: fstat into a local; fcntl/lseek without pointers.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st);
        FdState {
            status_flags: libc::fcntl(fd, libc::F_GETFL),
            fd_flags: libc::fcntl(fd, libc::F_GETFD),
            pos: seek(fd, 0, libc::SEEK_CUR),
            link: readlink(&format!("/proc/self/fd/{fd}")),
            dev: st.st_dev,
            ino: st.st_ino,
            rdev: st.st_rdev,
            nlink: st.st_nlink,
            size: st.st_size,
            mode: st.st_mode,
        }
    }
}

pub(crate) fn open_fds() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn compare_fds(c: &mut Check, fds: &[i32], before: &[FdState]) {
    for (fd, b) in fds.iter().zip(before) {
        c.eq(&format!("fd {fd}"), b, &fd_state(*fd));
    }
}

fn write_file(tag: &str, content: &[u8]) -> Result<String, String> {
    let p = tmp_path(tag);
    std::fs::write(&p, content).map_err(|e| format!("write {}: {e}", p.display()))?;
    Ok(p.to_string_lossy().into_owned())
}

/// Regular files with every access mode, O_APPEND, O_NONBLOCK|O_NOATIME,
/// FD_CLOEXEC, offsets, at scattered descriptor numbers.
pub fn file_offsets(ctx: &Ctx) -> CaseResult {
    let ro_data = pattern_bytes(8192, 200);
    let wo_data = pattern_bytes(3000, 201);
    let rw_data = pattern_bytes(6000, 202);
    let app_data = pattern_bytes(100, 203);
    let ro = write_file("ro", &ro_data)?;
    let wo = tmp_path("wo").to_string_lossy().into_owned();
    let rw = write_file("rw", &rw_data)?;
    let app = write_file("app", b"")?;
    let nb = write_file("nb", &ro_data)?;

    let fds = [
        open_as(&ro, libc::O_RDONLY, 7)?,
        open_as(&wo, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 100)?,
        open_as(&rw, libc::O_RDWR | libc::O_CLOEXEC, 1000)?,
        open_as(&app, libc::O_WRONLY | libc::O_APPEND, 55)?,
        open_as(
            &nb,
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOATIME,
            333,
        )?,
    ];
    // dup2 clears FD_CLOEXEC; put it back on the one that should carry it.
    // SAFETY: fcntl without pointers.
    unsafe { libc::fcntl(1000, libc::F_SETFD, libc::FD_CLOEXEC) };
    seek(7, 1234, libc::SEEK_SET);
    write_fd(100, &wo_data)?;
    seek(100, 1000, libc::SEEK_SET);
    seek(1000, 4321, libc::SEEK_SET);
    write_fd(55, &app_data)?;
    let before: Vec<FdState> = fds.iter().map(|&fd| fd_state(fd)).collect();
    let fds_before = open_fds();

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    compare_fds(&mut c, &fds, &before);
    c.eq("open descriptors", fds_before, open_fds());
    // Reads only: with --leave-running the original checks too, and the
    // files must stay as they were for the restored copy.
    c.eq(
        "read at fd 7's offset",
        &ro_data[1234..1298],
        read_fd(7, 64)?.as_slice(),
    );
    c.eq(
        "read at fd 1000's offset",
        &rw_data[4321..4385],
        read_fd(1000, 64)?.as_slice(),
    );
    c.eq(
        "read at fd 333's offset",
        &ro_data[..64],
        read_fd(333, 64)?.as_slice(),
    );
    c.ok(
        "O_WRONLY file content",
        std::fs::read(&wo).ok().as_deref() == Some(&wo_data[..]),
    );
    c.ok(
        "O_APPEND file content",
        std::fs::read(&app).ok().as_deref() == Some(&app_data[..]),
    );
    c.finish()
}

/// Files unlinked while open: one plain, one whose name was reused by a new
/// file, which the restore must not pick up.
pub fn unlinked_file(ctx: &Ctx) -> CaseResult {
    let a_data = pattern_bytes(10000, 210);
    let b_data = pattern_bytes(5000, 211);
    let new_b = pattern_bytes(300, 212);
    let a = write_file("unlinked-a", &a_data)?;
    let b = write_file("unlinked-b", &b_data)?;
    open_as(&a, libc::O_RDWR, 40)?;
    open_as(&b, libc::O_RDONLY, 41)?;
    seek(40, 777, libc::SEEK_SET);
    seek(41, 4999, libc::SEEK_SET);
    std::fs::remove_file(&a).map_err(|e| e.to_string())?;
    std::fs::remove_file(&b).map_err(|e| e.to_string())?;
    std::fs::write(&b, &new_b).map_err(|e| e.to_string())?;
    let before = [fd_state(40), fd_state(41)];
    for (st, path) in before.iter().zip([&a, &b]) {
        if st.nlink != 0 || st.link != format!("{path} (deleted)") {
            return Err(format!("unexpected state before checkpoint: {st:?}"));
        }
    }

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    // Identity (dev, ino) may legitimately change when the restore
    // recreates the file, and so may the name before " (deleted)" (the
    // contract asks only for the suffix); nothing else may.
    for (fd, b) in [40, 41].iter().zip(&before) {
        let a = fd_state(*fd);
        let seen = |s: &FdState| (s.status_flags, s.fd_flags, s.pos, s.nlink, s.size, s.mode);
        c.eq(
            &format!("fd {fd} (flags, fd flags, pos, nlink, size, mode)"),
            seen(b),
            seen(&a),
        );
        c.ok(
            &format!("fd {fd} link {:?} ends in \" (deleted)\"", a.link),
            a.link.ends_with(" (deleted)"),
        );
    }
    // a's old name is free, so the file comes back under it; b's is taken
    // by a new file, so b's ghost gets another name in the same directory.
    c.eq("fd 40 link", format!("{a} (deleted)"), fd_state(40).link);
    c.ok("unlinked file a content", pread_fd(40, 20000, 0)? == a_data);
    c.ok("unlinked file b content", pread_fd(41, 20000, 0)? == b_data);
    c.ok(
        "the new file at b's old name is untouched",
        std::fs::read(&b).ok().as_deref() == Some(&new_b[..]),
    );
    c.finish()
}

pub(crate) fn kcmp_file(fd1: i32, fd2: i32) -> Option<i64> {
    // SAFETY: no pointers; KCMP_FILE = 0.
    let pid = unsafe { libc::getpid() };
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, 0, fd1, fd2) };
    (r >= 0).then_some(r)
}

/// Two descriptors sharing one open file description (dup) and a third
/// opened separately: offsets and status flags are shared only by the two.
pub fn shared_fd(ctx: &Ctx) -> CaseResult {
    let mut data = pattern_bytes(4096, 220);
    data[50..53].copy_from_slice(b"abc");
    let path = write_file("shared-fd", &data)?;
    open_as(&path, libc::O_RDWR, 60)?;
    // SAFETY: plain descriptor calls.
    unsafe { cvt(libc::dup2(60, 61), "dup2")? };
    open_as(&path, libc::O_RDONLY, 62)?;
    seek(60, 100, libc::SEEK_SET);
    seek(62, 7, libc::SEEK_SET);
    let fds = [60, 61, 62];
    let before: Vec<FdState> = fds.iter().map(|&fd| fd_state(fd)).collect();
    let kcmp_before = (kcmp_file(60, 61), kcmp_file(60, 62).map(|r| r != 0));

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    compare_fds(&mut c, &fds, &before);
    c.eq(
        "kcmp (60 vs 61, 60 differs from 62)",
        kcmp_before,
        (kcmp_file(60, 61), kcmp_file(60, 62).map(|r| r != 0)),
    );
    seek(60, 50, libc::SEEK_SET);
    c.eq("seek on 60 moves 61", 50, seek(61, 0, libc::SEEK_CUR));
    // Rewrites the bytes already there, so the file stays the same.
    c.res(write_fd(61, b"abc"));
    c.eq("write on 61 moves 60", 53, seek(60, 0, libc::SEEK_CUR));
    c.eq(
        "separate open keeps its offset",
        7,
        seek(62, 0, libc::SEEK_CUR),
    );
    // SAFETY: fcntl without pointers.
    unsafe {
        let fl = libc::fcntl(60, libc::F_GETFL);
        libc::fcntl(60, libc::F_SETFL, fl | libc::O_NONBLOCK);
        c.ok(
            "status flags shared by 61",
            libc::fcntl(61, libc::F_GETFL) & libc::O_NONBLOCK != 0,
        );
        c.ok(
            "status flags not shared by 62",
            libc::fcntl(62, libc::F_GETFL) & libc::O_NONBLOCK == 0,
        );
    }
    c.finish()
}

/// /dev/null, /dev/zero, /dev/urandom and /dev/full open, and working.
pub fn dev_null(ctx: &Ctx) -> CaseResult {
    let fds = [
        open_as("/dev/null", libc::O_RDWR, 30)?,
        open_as("/dev/zero", libc::O_RDONLY, 31)?,
        open_as("/dev/urandom", libc::O_RDONLY | libc::O_CLOEXEC, 32)?,
        open_as("/dev/full", libc::O_WRONLY, 33)?,
    ];
    let before: Vec<FdState> = fds.iter().map(|&fd| fd_state(fd)).collect();

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    compare_fds(&mut c, &fds, &before);
    c.eq("read /dev/null", 0, read_fd(30, 16)?.len());
    c.res(write_fd(30, b"discarded"));
    c.eq("read /dev/zero", vec![0u8; 16], read_fd(31, 16)?);
    let r = read_fd(32, 16)?;
    c.ok(
        "read /dev/urandom",
        r.len() == 16 && r.iter().any(|&b| b != 0),
    );
    // SAFETY: writes a static buffer.
    let n = unsafe { libc::write(33, b"x".as_ptr() as *const libc::c_void, 1) };
    c.eq("write /dev/full errno", (-1, libc::ENOSPC), (n, errno()));
    c.finish()
}

/// stdout and stderr redirected to the harness's log file (one open file
/// description): text written before and after lands in order, and the
/// offset stays at the end of the file.
pub fn stdio_files(ctx: &Ctx) -> CaseResult {
    let start = seek(1, 0, libc::SEEK_CUR);
    if start < 0 || seek(2, 0, libc::SEEK_CUR) != start {
        return Err(
            "stdout and stderr must share one open regular file (as the harness sets up)".into(),
        );
    }
    let texts: [&[u8]; 4] = [
        b"stdio_files: before, on stdout\n",
        b"stdio_files: before, on stderr\n",
        b"stdio_files: after, on stdout\n",
        b"stdio_files: after, on stderr\n",
    ];
    write_fd(1, texts[0])?;
    write_fd(2, texts[1])?;
    let fds = [0, 1, 2];
    let before: Vec<FdState> = fds.iter().map(|&fd| fd_state(fd)).collect();

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    // The size may not be compared yet: nothing else writes, but be exact
    // about what is compared before writing again.
    compare_fds(&mut c, &fds, &before);
    c.res(write_fd(1, texts[2]));
    c.res(write_fd(2, texts[3]));
    let pos = seek(1, 0, libc::SEEK_CUR);
    let log = &before[1].link;
    let meta = std::fs::metadata(log).map_err(|e| format!("stat {log}: {e}"))?;
    c.eq("stdout offset is the log's size", meta.size() as i64, pos);
    let content = std::fs::read(log).map_err(|e| format!("read {log}: {e}"))?;
    let want: Vec<u8> = texts.concat();
    let got = content.get(start as usize..).unwrap_or_default();
    c.eq(
        "log text from the first write on",
        String::from_utf8_lossy(&want),
        String::from_utf8_lossy(got),
    );
    c.finish()
}
