//! zdtm-case: one program per piece of kernel state, run by the zdtm harness.
//!
//! `zdtm-case NAME --ready FILE --result FILE`: the case builds its state,
//! records what it expects, creates FILE (`--ready`) and waits for SIGTERM.
//! Then it checks its state from the inside, which after a checkpoint and
//! restore is the restored process, and writes `PASS` or `FAIL: why` to the
//! result file. `zdtm-case --list` prints the case names.

mod files;
mod jobs;
mod later;
mod memory;
mod net;
mod netif;
mod process;
mod syscalls;
mod threads;
mod tty;
mod util;

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use util::{cstr, os_err, CaseResult};

type CaseFn = fn(&Ctx) -> CaseResult;

const CASES: &[(&str, CaseFn)] = &[
    // memory
    ("heap", memory::heap),
    ("anon_mmap", memory::anon_mmap),
    ("stack_deep", memory::stack_deep),
    ("file_private", memory::file_private),
    ("file_shared", memory::file_shared),
    ("ro_prot_none", memory::ro_prot_none),
    ("guard_pages", memory::guard_pages),
    ("growsdown", memory::growsdown),
    ("vdso", memory::vdso),
    ("madvise_fork", memory::madvise_fork),
    ("mm_fields", memory::mm_fields),
    ("memory_writer", memory::memory_writer),
    ("advice_late", memory::advice_late),
    ("lazy_events", memory::lazy_events),
    // per thread
    ("threads", threads::threads),
    ("regs_gpr", threads::regs_gpr),
    ("xsave_avx512", threads::xsave_avx512),
    ("fs_gs", threads::fs_gs),
    ("sigmask", threads::sigmask),
    ("pending_signals", threads::pending_signals),
    ("sigaltstack", threads::sigaltstack),
    ("rseq", threads::rseq),
    ("robust_list", threads::robust_list),
    ("tid_address", threads::tid_address),
    // per process
    ("sigactions", process::sigactions),
    ("itimers", process::itimers),
    ("itimer_pending", process::itimer_pending),
    ("posix_timers", process::posix_timers),
    ("rlimits", process::rlimits),
    ("cwd_root", process::cwd_root),
    ("chroot", process::chroot),
    ("umask", process::umask),
    ("comm", process::comm),
    ("creds", process::creds),
    ("nice", process::nice),
    ("prctl_flags", process::prctl_flags),
    ("seccomp", process::seccomp),
    // tasks caught inside system calls
    ("nanosleep", syscalls::nanosleep),
    ("futex_wait", syscalls::futex_wait),
    // files
    ("file_offsets", files::file_offsets),
    ("unlinked_file", files::unlinked_file),
    ("shared_fd", files::shared_fd),
    ("dev_null", files::dev_null),
    ("stdio_files", files::stdio_files),
    // terminals
    ("pty_pair", tty::pty_pair),
    ("shell_job", tty::shell_job),
    // need engine support that comes in later issues
    ("read_blocking", later::read_blocking),
    ("pipe_eventfd_epoll", later::pipe_eventfd_epoll),
    ("pipe_writer_closed", later::pipe_writer_closed),
    ("process_tree", later::process_tree),
    ("shared_anon_tree", later::shared_anon_tree),
    ("timerfd_signalfd", later::timerfd_signalfd),
    ("memfd_sealed", later::memfd_sealed),
    ("fifo", later::fifo),
    ("inet_socket", later::inet_socket),
    ("tcp_loopback", net::tcp_loopback),
    ("udp_sockets", net::udp_sockets),
    ("tcp_close_wait", net::tcp_close_wait),
    ("tcp_stream", net::tcp_stream),
    ("job_net_tcp_part", net::job_net_tcp_part),
    ("tcp_half_closed", net::tcp_half_closed),
    ("tcp_listen_pending", net::tcp_listen_pending),
    (
        "tcp_listener_accepted_low_fd",
        net::tcp_listener_accepted_low_fd,
    ),
    // the same in a job with its own network namespace (lock taken there)
    ("job_net_tcp", net::tcp_loopback),
    // descriptors shared between processes of a job with its own network
    // namespace (passed to each with SCM_RIGHTS at restore)
    ("job_net_unix_pairs", later::unix_pairs),
    ("unix_pairs", later::unix_pairs),
    ("unix_listener", later::unix_listener),
    ("unix_accepted", later::unix_accepted),
    ("unix_accepted_closed", later::unix_accepted_closed),
    ("unix_pending", later::unix_pending),
    ("unix_peercred", later::unix_peercred),
    // refused at dump, by kind
    ("refuse_io_uring", later::refuse_io_uring),
    ("refuse_perf_event", later::refuse_perf_event),
    ("refuse_bpf_map", later::refuse_bpf_map),
    ("refuse_netlink", later::refuse_netlink),
    ("refuse_device", later::refuse_device),
    ("ext_unix_client", later::ext_unix_client),
    ("inotify", later::inotify),
    ("shared_fd_table", later::shared_fd_table),
    ("shared_vm", later::shared_vm),
    ("big_memory", later::big_memory),
    ("epoll_wait", later::epoll_wait),
    ("unix_socket", later::unix_socket),
    // only as jobs (own namespaces)
    ("job_namespaces", jobs::job_namespaces),
    ("sysv_ipc", jobs::sysv_ipc),
    ("job_net", jobs::job_net),
    ("job_net_veth", netif::job_net_veth),
    ("memfd_shared_map", jobs::memfd_shared_map),
    ("time_ns", jobs::time_ns),
    ("job_unlinked_shm", jobs::job_unlinked_shm),
    ("job_fifo_tmp", jobs::job_fifo_tmp),
];

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

/// What a case gets from the runner: the ready/result protocol and the
/// SIGTERM flag.
pub struct Ctx {
    ready: String,
    result: String,
    /// Result file opened ahead of a change (chroot, credentials) that would
    /// stop the case from creating it at the end.
    result_fd: std::cell::Cell<Option<RawFd>>,
    /// Directory of the ready file, opened ahead of a chroot.
    ready_dir: std::cell::Cell<Option<RawFd>>,
}

impl Ctx {
    /// True once SIGTERM arrived.
    pub fn stopping(&self) -> bool {
        TERM.load(Ordering::SeqCst)
    }

    /// Opens the result file (and the ready file's directory) now, for cases
    /// that are about to lose access to the paths.
    pub fn open_early(&self) -> CaseResult {
        let fd = open_result(&self.result)?;
        self.result_fd.set(Some(fd));
        let dir = parent_dir(&self.ready);
        // SAFETY: plain open of a directory path.
        let dfd = unsafe {
            libc::open(
                cstr(&dir).as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if dfd < 0 {
            return Err(os_err(&format!("open {dir}")));
        }
        self.ready_dir.set(Some(dfd));
        Ok(())
    }

    /// Creates the ready file atomically (write FILE.tmp, rename), so the
    /// harness never sees a half-made one.
    pub fn ready(&self) -> CaseResult {
        let name = base_name(&self.ready);
        let tmp = format!("{name}.tmp");
        let (dirfd, tmp_c, name_c) = match self.ready_dir.get() {
            Some(d) => (d, cstr(&tmp), cstr(&name)),
            None => (
                libc::AT_FDCWD,
                cstr(&format!("{}.tmp", self.ready)),
                cstr(&self.ready),
            ),
        };
        // SAFETY: plain file calls on valid C strings.
        unsafe {
            let fd = libc::openat(
                dirfd,
                tmp_c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o644,
            );
            if fd < 0 {
                return Err(os_err("create ready file"));
            }
            let pid = format!("{}\n", libc::getpid());
            libc::write(fd, pid.as_ptr() as *const libc::c_void, pid.len());
            libc::close(fd);
            if libc::renameat(dirfd, tmp_c.as_ptr(), dirfd, name_c.as_ptr()) < 0 {
                return Err(os_err("rename ready file"));
            }
            // The directory fd must not be held across the checkpoint: it
            // is not part of the state under test.
            if let Some(d) = self.ready_dir.take() {
                libc::close(d);
            }
        }
        Ok(())
    }

    /// The plain wait: a 10 ms sleep loop until SIGTERM.
    pub fn wait(&self) {
        while !self.stopping() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn ready_and_wait(&self) -> CaseResult {
        self.ready()?;
        self.wait();
        Ok(())
    }
}

fn parent_dir(p: &str) -> String {
    match p.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => p[..i].into(),
        None => ".".into(),
    }
}

fn base_name(p: &str) -> String {
    p.rsplit('/').next().unwrap_or(p).to_string()
}

fn open_result(path: &str) -> Result<RawFd, String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: plain open.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        Err(os_err(&format!("open result {path}")))
    } else {
        Ok(fd)
    }
}

fn usage() -> ! {
    eprintln!("usage: zdtm-case NAME --ready FILE --result FILE | zdtm-case --list");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--list") {
        for (name, _) in CASES {
            println!("{name}");
        }
        return;
    }
    let (mut name, mut ready, mut result) = (None, None, None);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ready" => ready = it.next(),
            "--result" => result = it.next(),
            _ if name.is_none() && !a.starts_with('-') => name = Some(a),
            _ => usage(),
        }
    }
    let (Some(name), Some(ready), Some(result)) = (name, ready, result) else {
        usage()
    };
    let Some(&(_, case)) = CASES.iter().find(|(n, _)| *n == name) else {
        eprintln!("zdtm-case: unknown case {name}");
        std::process::exit(2)
    };

    // No SA_RESTART: cases that wait inside a system call want EINTR.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as extern "C" fn(i32) as usize;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }

    let ctx = Ctx {
        ready,
        result,
        result_fd: std::cell::Cell::new(None),
        ready_dir: std::cell::Cell::new(None),
    };
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&ctx))) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    };
    let text = match &outcome {
        Ok(()) => "PASS\n".to_string(),
        Err(why) => format!("FAIL: {why}\n"),
    };
    let fd = match ctx.result_fd.get() {
        Some(fd) => fd,
        None => match open_result(&ctx.result) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("zdtm-case {name}: {e}; outcome was {text}");
                std::process::exit(1)
            }
        },
    };
    // SAFETY: fd is ours and used only here.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = f.write_all(text.as_bytes());
    if outcome.is_err() {
        eprint!("zdtm-case {name}: {text}");
    }
    std::process::exit(i32::from(outcome.is_err()))
}
