//! Dump and restore of a process tree: 8 processes of 256 MiB each (memory
//! prewarmed, images on /dev/shm), with the pages of all tasks copied in
//! parallel and, for comparison, one task at a time.
//!
//! `cargo bench -p ckpt-agent --bench tree [-- --procs N --mib M --reps R]`

use std::ffi::CString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_agent::dump::{dump, DumpRequest};
use ckpt_agent::restore::{restore, RestoreRequest};

const PAGE: usize = 4096;

struct Args {
    procs: usize,
    mib: usize,
    reps: usize,
}

fn args() -> Args {
    let mut a = Args {
        procs: 8,
        mib: 256,
        reps: 2,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut it = v.iter();
    while let Some(k) = it.next() {
        let n = || it.clone().next().and_then(|s| s.parse().ok());
        match k.as_str() {
            "--procs" => a.procs = n().expect("--procs N"),
            "--mib" => a.mib = n().expect("--mib M"),
            "--reps" => a.reps = n().expect("--reps R"),
            _ => continue, // cargo bench passes --bench
        }
        it.next();
    }
    a
}

/// Touches and frees 1.25x `bytes`, so the measured step gets memory the
/// host has already handed back (see NOTES.md on first touch).
fn prewarm(bytes: usize) {
    let len = bytes + bytes / 4;
    // SAFETY: a fresh private mapping, written within bounds, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) as *mut u8;
        assert!(p as isize != -1, "mmap for prewarm");
        for off in (0..len).step_by(PAGE) {
            p.add(off).write_volatile(1);
        }
        libc::munmap(p as *mut libc::c_void, len);
    }
}

fn word(pid_index: usize, page: usize) -> u64 {
    0x7e00_0000_0000_0000 | ((pid_index as u64) << 40) | page as u64
}

/// The body of every process of the tree: fill `len` bytes, say ready,
/// wait. The root first forks the others.
///
/// # Safety
/// Only in a freshly forked child; raw system calls and stores only.
unsafe fn member(index: usize, len: usize, readies: &[CString], procs: usize) -> ! {
    if index == 0 {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        for i in 1..procs {
            if libc::fork() == 0 {
                member(i, len, readies, procs);
            }
        }
    }
    let p = libc::mmap(
        std::ptr::null_mut(),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    ) as *mut u64;
    for page in 0..len / PAGE {
        p.add(page * PAGE / 8).write_volatile(word(index, page));
        for w in 1..PAGE / 8 {
            p.add(page * PAGE / 8 + w).write_volatile(w as u64);
        }
    }
    // The address for the checker, in the ready file's name-independent content.
    let fd = libc::open(
        readies[index].as_ptr(),
        libc::O_CREAT | libc::O_WRONLY,
        0o600,
    );
    let addr = (p as u64).to_le_bytes();
    libc::write(fd, addr.as_ptr() as *const libc::c_void, 8);
    libc::close(fd);
    loop {
        libc::pause();
    }
}

struct Tree {
    pids: Vec<i32>,
    addrs: Vec<u64>,
}

fn spawn(procs: usize, len: usize) -> Tree {
    let readies: Vec<PathBuf> = (0..procs)
        .map(|i| {
            PathBuf::from(format!(
                "/dev/shm/ckpt-tree-bench-{}-{i}",
                std::process::id()
            ))
        })
        .collect();
    for r in &readies {
        let _ = std::fs::remove_file(r);
    }
    let cs: Vec<CString> = readies
        .iter()
        .map(|r| CString::new(r.as_os_str().as_encoded_bytes()).expect("no NUL"))
        .collect();
    // SAFETY: the child only makes raw system calls (see `member`).
    let root = unsafe { libc::fork() };
    if root == 0 {
        // SAFETY: freshly forked child.
        unsafe { member(0, len, &cs, procs) }
    }
    let t0 = Instant::now();
    let mut addrs = vec![0u64; procs];
    for (i, r) in readies.iter().enumerate() {
        loop {
            if let Ok(b) = std::fs::read(r) {
                if b.len() == 8 {
                    addrs[i] = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "tree not ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(r);
    }
    let kids =
        std::fs::read_to_string(format!("/proc/{root}/task/{root}/children")).unwrap_or_default();
    let mut pids = vec![root];
    pids.extend(
        kids.split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok()),
    );
    assert_eq!(pids.len(), procs, "tree has all its processes");
    // Children were forked in index order, so they are listed in it too.
    Tree { pids, addrs }
}

fn reap(pids: &[i32]) {
    for &p in pids {
        // SAFETY: reaping our own (adopted) children.
        unsafe {
            libc::kill(p, libc::SIGKILL);
            libc::waitpid(p, std::ptr::null_mut(), libc::__WALL);
        }
    }
}

fn check(t: &Tree, len: usize) -> usize {
    let mut checked = 0;
    for (i, (&pid, &addr)) in t.pids.iter().zip(&t.addrs).enumerate() {
        for page in (0..len / PAGE).step_by(97) {
            let mut v = 0u64;
            let local = libc::iovec {
                iov_base: &mut v as *mut u64 as *mut libc::c_void,
                iov_len: 8,
            };
            let remote = libc::iovec {
                iov_base: (addr as usize + page * PAGE) as *mut libc::c_void,
                iov_len: 8,
            };
            // SAFETY: reads 8 bytes into `v`.
            let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            assert_eq!(n, 8, "read pid {pid} page {page}");
            assert_eq!(v, word(i, page), "content of pid {pid} page {page}");
            checked += 1;
        }
    }
    checked
}

fn main() {
    let a = args();
    let len = a.mib << 20;
    let total = a.procs * len;
    // SAFETY: makes this process the reaper of the trees' orphans.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    println!(
        "tree of {} processes x {} MiB = {} MiB, images on /dev/shm, memory prewarmed",
        a.procs,
        a.mib,
        total >> 20
    );
    println!(
        "{:>10} {:>4} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "tasks", "rep", "dump ms", "pages ms", "GB/s", "restore ms", "checked"
    );
    for rep in 0..a.reps {
        for parallel in [true, false] {
            let t = spawn(a.procs, len);
            let dir = PathBuf::from(format!(
                "/dev/shm/ckpt-tree-bench-img-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            prewarm(total);
            let r = dump(&DumpRequest {
                pid: t.pids[0],
                images: dir.clone(),
                leave_running: false,
                snapshot: false,
                tasks_in_parallel: parallel,
                pre_dump: false,
                parent: None,
                track_mem: false,
                compress: Default::default(),
                ext_unix_sk: false,
                shell_job: false,
                tcp_established: false,
                key: None,
                stream: None,
                hold: None,
            })
            .expect("dump");
            reap(&t.pids);
            prewarm(total);
            let t1 = Instant::now();
            let (rr, _) = restore(&RestoreRequest {
                images: dir.clone(),
                detach: true,
                pidfile: None,
                ext_unix_sk: false,
                shell_job: false,
                tcp_established: false,
                job: None,
                bridge: None,
                hold: false,
                lazy_pages: false,
                key: None,
            })
            .expect("restore");
            let restore_ms = t1.elapsed().as_secs_f64() * 1e3;
            assert_eq!(rr.pid, t.pids[0]);
            let checked = check(&t, len);
            reap(&t.pids);
            let _ = std::fs::remove_dir_all(&dir);
            println!(
                "{:>10} {:>4} {:>9.0} {:>9.0} {:>9.2} {:>10.0} {:>9}",
                if parallel { "parallel" } else { "one by one" },
                rep,
                r.total_ms,
                r.pages_ms,
                r.pages_bytes as f64 / r.pages_ms / 1e6,
                restore_ms,
                checked
            );
        }
    }
}
