//! zdtm-style single-process cases: each one checkpointed, restored and
//! checked from inside the restored process. `CKPT_ZDTM_NOCKPT=1` runs the
//! cases without checkpoint, to validate the case programs themselves.

use ckpt_tests::{run_case, Mode};

fn zdtm(name: &str, mode: Mode) {
    run_case(env!("CARGO_BIN_EXE_zdtm-case"), name, mode)
}

/// Starts zdtm case `name` in `dir`, ready (its state built).
fn started(name: &str, dir: &ckpt_tests::Workdir) -> ckpt_tests::CaseProcess {
    let mut case =
        ckpt_tests::CaseProcess::spawn(env!("CARGO_BIN_EXE_zdtm-case").as_ref(), name, dir)
            .unwrap();
    case.wait_ready().unwrap();
    case
}

/// One Kill-mode test per case, plus the list of all of them.
macro_rules! cases {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        $(
            #[test]
            $(#[$attr])*
            fn $name() {
                zdtm(stringify!($name), Mode::Kill)
            }
        )*
        const ALL: &[&str] = &[$(stringify!($name)),*];
    };
}

cases!(
    // memory
    heap,
    anon_mmap,
    stack_deep,
    file_private,
    file_shared,
    ro_prot_none,
    guard_pages,
    growsdown,
    vdso,
    madvise_fork,
    mm_fields,
    memory_writer,
    lazy_events,
    advice_late,
    // per thread
    threads,
    regs_gpr,
    xsave_avx512,
    fs_gs,
    sigmask,
    pending_signals,
    sigaltstack,
    rseq,
    robust_list,
    tid_address,
    // per process
    sigactions,
    itimers,
    itimer_pending,
    posix_timers,
    rlimits,
    cwd_root,
    chroot,
    umask,
    comm,
    creds,
    nice,
    prctl_flags,
    seccomp,
    // inside system calls
    nanosleep,
    futex_wait,
    read_blocking,
    epoll_wait,
    pipe_eventfd_epoll,
    pipe_writer_closed,
    process_tree,
    shared_anon_tree,
    timerfd_signalfd,
    memfd_sealed,
    memfd_shared_map,
    time_ns,
    fifo,
    inet_socket,
    // network
    tcp_loopback,
    tcp_listener_accepted_low_fd,
    udp_sockets,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_tcp_close_wait runs it"]
    tcp_close_wait,
    #[ignore = "needs a peer outside the tree: the tcp tests run it"]
    tcp_stream,
    #[ignore = "one part of a job on two nodes: multinode::tcp_parts_move_to_other_nodes runs it"]
    job_net_tcp_part,
    #[ignore = "needs a peer outside the tree: tcp::half_closed_connection runs it"]
    tcp_half_closed,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_tcp_listen_pending runs it"]
    tcp_listen_pending,
    // files
    file_offsets,
    unlinked_file,
    shared_fd,
    dev_null,
    stdio_files,
    unix_socket,
    unix_pairs,
    unix_listener,
    unix_accepted,
    unix_accepted_closed,
    unix_pending,
    unix_peercred,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_unsupported_kinds runs it"]
    refuse_io_uring,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_unsupported_kinds runs it"]
    refuse_perf_event,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_unsupported_kinds runs it"]
    refuse_bpf_map,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_unsupported_kinds runs it"]
    refuse_netlink,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_unsupported_kinds runs it"]
    refuse_device,
    #[ignore = "needs a server outside the tree: ext_unix::reconnects_by_name runs it"]
    ext_unix_client,
    #[ignore = "needs a lab network namespace with a bridge: job_net.rs runs it"]
    job_net_veth,
    inotify,
    // terminals
    pty_pair,
    #[ignore = "needs a terminal outside the tree: shell_job::reattaches_to_the_restoring_terminal runs it"]
    shell_job,
    shared_fd_table,
    #[ignore = "refused at dump by design: bad_input::dump_refuses_shared_address_space runs it"]
    shared_vm,
    big_memory,
);

/// Dumped with --leave-running: the original must still pass, and so must
/// a copy restored from the same images.
mod leave_running {
    use super::*;

    #[test]
    fn threads() {
        zdtm("threads", Mode::LeaveRunning)
    }

    #[test]
    fn process_tree() {
        zdtm("process_tree", Mode::LeaveRunning)
    }

    #[test]
    fn pending_signals() {
        zdtm("pending_signals", Mode::LeaveRunning)
    }

    #[test]
    fn file_offsets() {
        zdtm("file_offsets", Mode::LeaveRunning)
    }

    #[test]
    fn xsave_avx512() {
        zdtm("xsave_avx512", Mode::LeaveRunning)
    }

    #[test]
    fn posix_timers() {
        zdtm("posix_timers", Mode::LeaveRunning)
    }

    #[test]
    fn tcp_loopback() {
        zdtm("tcp_loopback", Mode::LeaveRunning)
    }

    #[test]
    fn tcp_listener_accepted_low_fd() {
        zdtm("tcp_listener_accepted_low_fd", Mode::LeaveRunning)
    }

    #[test]
    fn pipe_writer_closed() {
        zdtm("pipe_writer_closed", Mode::LeaveRunning)
    }
}

/// Dumps that leave the case running: by default it runs on once its
/// state is captured, and its memory is copied from a copy-on-write
/// snapshot while it writes more.
mod snapshot {
    use std::time::Duration;

    use super::started;
    use ckpt_tests::{agent, restore_and_check, wait_for, Workdir};

    /// Field `key` of /proc/`pid`/status, if the process exists.
    fn status(pid: i32, key: &str) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
    }

    /// The children of every thread of `pid`.
    fn children(pid: i32) -> Vec<i32> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .flat_map(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(|c| c.parse().unwrap())
                    .collect::<Vec<i32>>()
            })
            .collect()
    }

    /// A v1 memory cgroup for a test, removed on drop (its processes
    /// moved back to the root first).
    struct MemoryCgroup(std::path::PathBuf);

    impl Drop for MemoryCgroup {
        fn drop(&mut self) {
            if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write("/sys/fs/cgroup/memory/cgroup.procs", p);
                }
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// Dumps `memory_writer` with `flags`, checks the report says whether
    /// a snapshot was copied, that the snapshot child is gone, then checks
    /// the original and a copy restored from the images. With `limit`, the
    /// case runs in a memory cgroup with that limit (v1).
    fn memory_writer(flags: &[&str], limit: Option<u64>, from_snapshot: bool) {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let name = "memory_writer";
        let dir = Workdir::new(&format!("{name}{}{}", flags.concat(), limit.is_some()));
        let images = dir.join("images");
        let mut case = started(name, &dir);
        let _cgroup = limit.map(|limit| {
            let cg = MemoryCgroup(format!("/sys/fs/cgroup/memory/ckpt-test-{}", case.pid).into());
            std::fs::create_dir_all(&cg.0).unwrap();
            std::fs::write(cg.0.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
            // Its memory stays charged where it was: the new cgroup has
            // the whole limit as headroom.
            std::fs::write(cg.0.join("cgroup.procs"), case.pid.to_string()).unwrap();
            cg
        });
        let (pid, images_s) = (case.pid.to_string(), images.to_string_lossy().into_owned());
        let args = [
            &[
                "--json",
                "dump",
                "--tree",
                &pid,
                "--images",
                &images_s,
                "--leave-running",
            ][..],
            flags,
        ]
        .concat();
        let run = agent(&args, &dir, "dump");
        assert!(
            run.ok(),
            "dump failed:\n{}\ncase log:\n{}",
            run.describe(),
            case.log_text()
        );
        let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        let (copied, total) = (
            report["snapshot_bytes"].as_u64().unwrap(),
            report["pages_bytes"].as_u64().unwrap(),
        );
        if from_snapshot {
            // The 512 MiB the writer works in are private memory, in the
            // case and in its child: all of it comes from the snapshots.
            assert!(copied >= 1024 << 20 && copied <= total, "{report}");
        } else {
            assert_eq!(copied, 0, "{report}");
        }
        // Its 512 MiB of pages went into several files written in
        // parallel (restored below from all of them).
        assert!(
            images.join(format!("pages-{}.s1.img", case.pid)).exists(),
            "no second segment of the pages file"
        );
        // The case's own child, and no snapshot child.
        let left = children(case.pid);
        assert_eq!(left.len(), 1, "children of the case: {left:?}");
        case.terminate_and_check("original after the dump").unwrap();
        if let Err(e) = restore_and_check(&mut case, &images, &dir) {
            panic!("{e}{}", dir.agent_report());
        }
    }

    /// Mapping flags are read before the freeze: MADV_WIPEONFORK given to
    /// a whole mapping after that read (a fault knob widens the window)
    /// empties it in the snapshot child. The dump must see it and fail,
    /// not save the empty copy; the job runs on intact.
    #[test]
    fn advice_changed_before_the_freeze_fails_the_dump() {
        advice_late(false)
    }

    /// The same in an increment on a pre-dump: the write tracker the
    /// pre-dump registered follows the mapping (its flags read ahead hold
    /// "uw").
    #[test]
    fn advice_changed_before_the_freeze_fails_a_tracked_dump() {
        advice_late(true)
    }

    fn advice_late(on_pre_dump: bool) {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        use std::io::BufRead;
        let dir = Workdir::new(&format!("advice_late-{on_pre_dump}"));
        let images = dir.join("images");
        let pre = dir.join("pre");
        let pre_s = pre.to_string_lossy().into_owned();
        let flags: &[&str] = match on_pre_dump {
            true => &["--parent", &pre_s],
            false => &[],
        };
        let mut case = started("advice_late", &dir);
        if on_pre_dump {
            let pid = case.pid.to_string();
            let run = agent(
                &["pre-dump", "--tree", &pid, "--images", &pre_s],
                &dir,
                "pre",
            );
            assert!(run.ok(), "{}", run.describe());
        }
        let mut agent = std::process::Command::new(ckpt_tests::agent_binary())
            .args([
                "dump",
                "--leave-running",
                "--tree",
                &case.pid.to_string(),
                "--images",
            ])
            .arg(&images)
            .args(flags)
            .env("CKPT_FAULT_HOLD_READ_AHEAD_MS", "5000")
            .env("CKPT_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(agent.stderr.take().unwrap());
        let mut log = String::new();
        // Its smaps read, the agent holds before the freeze.
        while !log.contains("CKPT_FAULT_HOLD_READ_AHEAD_MS") {
            if err.read_line(&mut log).unwrap() == 0 {
                panic!("the agent ended before its hold:\n{log}");
            }
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(case.pid),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
        // Given before the hold ends (5 s: ample for a signal).
        let wf = || {
            std::fs::read_to_string(format!("/proc/{}/smaps", case.pid))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "wf"))
        };
        assert!(wait_for(Duration::from_secs(4), wf), "{log}");
        std::io::Read::read_to_string(&mut err, &mut log).unwrap();
        let status = agent.wait().unwrap();
        assert!(
            !status.success() && log.contains("dump again"),
            "{status}:\n{log}"
        );
        assert!(!images.join("inventory.img").exists(), "{log}");
        case.terminate_and_check("the job after the refused dump")
            .unwrap();
    }

    /// The agent killed while it copies the snapshots: the kernel kills
    /// the snapshot children (traced with EXITKILL, they never ran), the
    /// job runs on intact, and nothing looks like a checkpoint.
    #[test]
    fn agent_killed_during_the_copy() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let name = "memory_writer";
        let dir = Workdir::new("memory_writer-agent-killed");
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let mut case = started(name, &dir);
        let pid = case.pid;
        // The case's own child, traced too until the release: not the
        // snapshot.
        let own = children(pid);
        let mut agent = std::process::Command::new(ckpt_tests::agent_binary())
            .args([
                "dump",
                "--tree",
                &pid.to_string(),
                "--leave-running",
                "--images",
            ])
            .arg(&images)
            .env("CKPT_FAULT_HOLD_RUNNING_MS", "30000")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Running on (untraced) with its snapshot child (traced) there.
        let traced = |p: i32| status(p, "TracerPid:").is_some_and(|t| t != "0");
        let mut snap = None;
        assert!(
            wait_for(Duration::from_secs(20), || {
                snap = children(pid)
                    .into_iter()
                    .find(|&c| traced(c) && !own.contains(&c));
                snap.is_some() && !traced(pid)
            }),
            "the dump never ran the case on with a snapshot"
        );
        let snap = snap.unwrap();
        agent.kill().unwrap();
        agent.wait().unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || {
                status(snap, "State:").is_none_or(|s| s.starts_with('Z'))
            }),
            "the snapshot child {snap} outlived the agent"
        );
        assert!(
            !images.join("inventory.img").exists(),
            "a dump that never committed must not look complete"
        );
        case.terminate_and_check("after the agent died mid-copy")
            .unwrap();
    }

    #[test]
    fn memory_writer_runs_on_during_the_copy() {
        memory_writer(&[], None, true)
    }

    #[test]
    fn memory_writer_frozen_copy() {
        memory_writer(&["--frozen-copy"], None, false)
    }

    /// Copy-on-write could charge its 512 MiB again to a job with 256 MiB
    /// left under its memory limit: it is copied frozen instead.
    #[test]
    fn memory_writer_near_its_memory_limit_is_copied_frozen() {
        memory_writer(&[], Some(256 << 20), false)
    }
}

/// Incremental dumps: pre-dumps that copy memory while the tree runs and
/// track what it writes after, dumps that write only what changed since
/// their parent, and restores from the chain.
mod incremental {
    use std::path::Path;
    use std::time::Duration;

    use super::started;
    use ckpt_tests::{agent, restore_and_check, CaseProcess, Workdir};

    /// Runs `ckpt-agent --json VERB --tree PID --images DIR [--parent P]
    /// EXTRA...` and returns its report's bytes of pages written.
    fn step(
        verb: &str,
        case: &CaseProcess,
        dir: &Workdir,
        images: &Path,
        parent: Option<&Path>,
        extra: &[&str],
    ) -> u64 {
        report(verb, case, dir, images, parent, extra)["pages_bytes"]
            .as_u64()
            .unwrap()
    }

    /// Like `step`, returning the whole report.
    fn report(
        verb: &str,
        case: &CaseProcess,
        dir: &Workdir,
        images: &Path,
        parent: Option<&Path>,
        extra: &[&str],
    ) -> serde_json::Value {
        let (pid, images_s) = (case.pid.to_string(), images.to_string_lossy().into_owned());
        let parent_s = parent.map(|p| p.to_string_lossy().into_owned());
        let mut args = vec!["--json", verb, "--tree", &pid, "--images", &images_s];
        if let Some(p) = &parent_s {
            args.extend(["--parent", p]);
        }
        args.extend_from_slice(extra);
        let run = agent(&args, dir, verb);
        assert!(
            run.ok(),
            "{verb} failed:\n{}\ncase log:\n{}",
            run.describe(),
            case.log_text()
        );
        serde_json::from_str(run.stdout.trim()).unwrap()
    }

    /// Bytes of memory the page indexes of a checkpoint leave in its parent.
    fn in_parent_bytes(images: &Path) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(images).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("pagemap-") {
                continue;
            }
            let pm: ckpt_proto::image::PageMap =
                ckpt_proto::read_image_file(&e.path(), ckpt_proto::ImageKind::PageMap).unwrap();
            total += pm
                .runs
                .iter()
                .filter(|r| r.flags & 4 != 0)
                .map(|r| r.nr_pages * 4096)
                .sum::<u64>();
        }
        total
    }

    /// `memory_writer` (512 MiB in a process and its forked child; a thread
    /// writes one page after the other all along, also while memory is
    /// copied) through pre-dump, pre-dump --parent and dump --parent; the
    /// original and a copy restored from the chain check every page.
    /// `stale`: the dump names the first pre-dump as its parent, though
    /// the second reset the tracker since: everything is written again.
    fn memory_writer_chain(final_flags: &[&str], stale: bool) {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let name = "memory_writer";
        let dir = Workdir::new(&format!("incremental{}{stale}", final_flags.concat()));
        let (pre1, pre2, last) = (dir.join("pre1"), dir.join("pre2"), dir.join("dump"));
        let mut case = started(name, &dir);
        let full = step("pre-dump", &case, &dir, &pre1, None, &[]);
        // Both processes' 512 MiB, written: all of it, nothing in a parent.
        assert!(full >= 1024 << 20, "first pre-dump wrote {full} bytes");
        assert_eq!(in_parent_bytes(&pre1), 0);
        std::thread::sleep(Duration::from_millis(300));
        let second = step("pre-dump", &case, &dir, &pre2, Some(&pre1), &[]);
        // The writer changes ~128 MiB/s: a fraction of what the first took.
        assert!(
            second < full / 4,
            "second pre-dump wrote {second} of {full} bytes"
        );
        assert!(in_parent_bytes(&pre2) >= full / 2);
        std::thread::sleep(Duration::from_millis(300));
        let parent = if stale { &pre1 } else { &pre2 };
        let mut flags = vec!["--leave-running"];
        flags.extend_from_slice(final_flags);
        let last_bytes = step("dump", &case, &dir, &last, Some(parent), &flags);
        if stale {
            assert!(
                last_bytes >= full,
                "dump on a stale parent wrote {last_bytes} of {full}"
            );
            assert_eq!(in_parent_bytes(&last), 0);
        } else {
            assert!(
                last_bytes < full / 4,
                "dump wrote {last_bytes} of {full} bytes"
            );
            assert!(in_parent_bytes(&last) >= full / 2);
        }
        eprintln!(
            "pages written: {full} by the pre-dump, {second} by the next, {last_bytes} by the dump \
             ({} left in its parent)",
            in_parent_bytes(&last)
        );
        case.terminate_and_check("original after the dumps")
            .unwrap();
        if let Err(e) = restore_and_check(&mut case, &last, &dir) {
            panic!("{e}{}", dir.agent_report());
        }
    }

    #[test]
    fn memory_writer_restored_from_a_chain() {
        memory_writer_chain(&[], false)
    }

    /// The final dump keeps the tree stopped until its pages are copied.
    #[test]
    fn memory_writer_chain_frozen_copy() {
        memory_writer_chain(&["--frozen-copy"], false)
    }

    #[test]
    fn a_parent_older_than_the_last_reset_is_not_trusted() {
        memory_writer_chain(&[], true)
    }

    /// Compressed checkpoints, alone and in a chain whose links use
    /// different codecs; memory_writer's pages (zeros and one word each)
    /// shrink to a small fraction. A corrupt frame is refused.
    #[test]
    fn compressed_chain_lz4_and_zstd() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let dir = Workdir::new("incremental-compressed");
        let (pre, last) = (dir.join("pre"), dir.join("dump"));
        let mut case = started("memory_writer", &dir);
        let first = report("pre-dump", &case, &dir, &pre, None, &["--compress", "zstd"]);
        let (content, stored) = (
            first["pages_bytes"].as_u64().unwrap(),
            first["stored_bytes"].as_u64().unwrap(),
        );
        assert!(content >= 1024 << 20 && stored < content / 20, "{first}");
        std::thread::sleep(Duration::from_millis(300));
        let flags = ["--leave-running", "--compress", "lz4"];
        let last_report = report("dump", &case, &dir, &last, Some(&pre), &flags);
        let stored = last_report["stored_bytes"].as_u64().unwrap();
        assert!(
            stored < last_report["pages_bytes"].as_u64().unwrap(),
            "{last_report}"
        );
        assert!(in_parent_bytes(&last) >= content / 2);
        case.terminate_and_check("original after the dumps")
            .unwrap();
        if let Err(e) = restore_and_check(&mut case, &last, &dir) {
            panic!("{e}{}", dir.agent_report());
        }
        // Again, lazily: pages served from both links, decompressed.
        let (run, pid) =
            ckpt_tests::restore_detached_with(&last, &["--lazy-pages"], &dir, "restore-lazy");
        assert!(run.ok() && pid == Some(case.pid), "{}", run.describe());
        case.adopt_restored();
        case.terminate_and_check("restored lazily from the chain")
            .unwrap();
        // One byte of a stored frame of the pre-dump flipped.
        let pages = std::fs::read_dir(&pre)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("pages-")
            })
            .unwrap();
        let mut bytes = std::fs::read(&pages).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&pages, bytes).unwrap();
        let run = agent(
            &["restore", "--images", &last.to_string_lossy(), "--detach"],
            &dir,
            "restore-corrupt",
        );
        assert!(
            !run.ok() && run.stderr.contains("fails its checksum"),
            "{}",
            run.describe()
        );
    }

    /// A page server (`ckpt-agent page-server`) on this machine, killed
    /// when dropped.
    struct PageServer {
        child: std::process::Child,
        addr: String,
    }

    impl PageServer {
        fn start(root: &Path, key: &Path, dir: &Workdir) -> PageServer {
            use std::io::BufRead;
            let log = std::fs::File::create(dir.join("page-server.log")).unwrap();
            let mut child = std::process::Command::new(ckpt_tests::agent_binary())
                .arg("page-server")
                .arg("--images")
                .arg(root)
                .args(["--listen", "127.0.0.1:0", "--key"])
                .arg(key)
                .stdout(std::process::Stdio::piped())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let addr = line
                .split_whitespace()
                .nth(4)
                .map(|a| a.trim_end_matches(',').to_string())
                .unwrap_or_else(|| panic!("page server said: {line}"));
            PageServer { child, addr }
        }
    }

    impl Drop for PageServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn key_file(dir: &Workdir) -> std::path::PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("cluster.key");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        let key = ckpt_proto::rpc::random_bytes::<32>().unwrap();
        std::io::Write::write_all(&mut f, &key).unwrap();
        path
    }

    /// Whether `dir` holds a pages file.
    fn has_pages(dir: &Path) -> bool {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("pages-"))
    }

    /// A chain streamed into a page server: `pre-dump` and `dump --parent`
    /// with `--stream-to` write no page on the sending side (its spool
    /// keeps the small images only); memory_writer, writing all along, is
    /// restored exactly from what the server received. A stream cut by the
    /// server's death fails the dump, leaves the tree running, and leaves
    /// no checkpoint behind.
    #[test]
    fn streamed_chain_into_a_page_server() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let dir = Workdir::new("incremental-streamed");
        let key = key_file(&dir);
        let (key_s, received) = (key.to_string_lossy().into_owned(), dir.join("received"));
        let server = PageServer::start(&received, &key, &dir);
        let spool = dir.join("spool");
        let (pre, last) = (spool.join("pre"), spool.join("final"));
        let mut case = started("memory_writer", &dir);
        let stream = ["--stream-to", &server.addr, "--key", &key_s];
        let first = report("pre-dump", &case, &dir, &pre, None, &stream);
        let full = first["pages_bytes"].as_u64().unwrap();
        assert!(full >= 1024 << 20, "{first}");
        assert!(
            first["streamed_to"]
                .as_str()
                .is_some_and(|t| t.ends_with("received/pre")),
            "{first}"
        );
        std::thread::sleep(Duration::from_millis(300));
        let mut flags = vec!["--leave-running"];
        flags.extend_from_slice(&stream);
        let second = report("dump", &case, &dir, &last, Some(&pre), &flags);
        let last_bytes = second["pages_bytes"].as_u64().unwrap();
        // The writer changes ~128 MiB/s while the first level streams.
        assert!(last_bytes < full / 2, "{second}");
        for d in [&pre, &last] {
            assert!(!has_pages(d), "{} holds pages", d.display());
        }
        assert!(has_pages(&received.join("final")));
        assert!(in_parent_bytes(&received.join("final")) >= full / 2);
        case.terminate_and_check("original after the streamed dumps")
            .unwrap();
        if let Err(e) = restore_and_check(&mut case, &received.join("final"), &dir) {
            panic!("{e}{}", dir.agent_report());
        }

        // A process that changed next to nothing since the parent.
        let dir = Workdir::new("incremental-streamed-idle");
        let mut case = started("heap", &dir);
        let (pre, last) = (spool.join("idle-pre"), spool.join("idle-final"));
        report("pre-dump", &case, &dir, &pre, None, &stream);
        let idle = report("dump", &case, &dir, &last, Some(&pre), &flags);
        assert!(idle["pages_bytes"].as_u64().unwrap() < 1 << 20, "{idle}");
        case.terminate_and_check("original after the streamed dumps")
            .unwrap();
        if let Err(e) = restore_and_check(&mut case, &received.join("idle-final"), &dir) {
            panic!("{e}{}", dir.agent_report());
        }
        drop(server);

        // The server dies while a pre-dump streams into it.
        let dir = Workdir::new("incremental-streamed-cut");
        let mut case = started("memory_writer", &dir);
        let cut = dir.join("received-cut");
        let mut server = PageServer::start(&cut, &key, &dir);
        let stream = ["--stream-to", &server.addr, "--key", &key_s];
        let (pid, images) = (
            case.pid.to_string(),
            spool.join("cut").to_string_lossy().into_owned(),
        );
        let mut args = vec!["pre-dump", "--tree", &pid, "--images", &images];
        args.extend_from_slice(&stream);
        let killer = {
            let pid = server.child.id() as i32;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            })
        };
        let run = agent(&args, &dir, "pre-dump-cut");
        killer.join().unwrap();
        let _ = server.child.wait();
        assert!(
            !run.ok() && run.stderr.contains("streaming images to"),
            "{}",
            run.describe()
        );
        assert!(!cut.join("cut/inventory.img").exists());
        assert!(!spool.join("cut/inventory.img").exists());
        case.terminate_and_check("running on after the cut stream")
            .unwrap();
    }

    /// A pre-dump holds memory only: restore refuses it, saying what to
    /// do; and a chain whose parent changed since is refused.
    #[test]
    fn restore_refuses_a_pre_dump_and_a_broken_chain() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let dir = Workdir::new("incremental-refusals");
        let (pre, last) = (dir.join("pre"), dir.join("dump"));
        let mut case = started("heap", &dir);
        step("pre-dump", &case, &dir, &pre, None, &[]);
        step("dump", &case, &dir, &last, Some(&pre), &["--leave-running"]);
        let restore = |images: &Path, label: &str| {
            agent(
                &["restore", "--images", &images.to_string_lossy(), "--detach"],
                &dir,
                label,
            )
        };
        let run = restore(&pre, "restore-pre-dump");
        assert!(
            !run.ok() && run.stderr.contains("pre-dump"),
            "{}",
            run.describe()
        );
        // The parent's inventory rewritten (here: its timestamp bumped).
        let inv_path = pre.join("inventory.img");
        let mut inv: ckpt_proto::image::Inventory =
            ckpt_proto::read_image_file(&inv_path, ckpt_proto::ImageKind::Inventory).unwrap();
        inv.created_unix_ms += 1;
        ckpt_proto::write_image_file(&inv_path, ckpt_proto::ImageKind::Inventory, &inv).unwrap();
        let run = restore(&last, "restore-broken-chain");
        assert!(
            !run.ok() && run.stderr.contains("chain is broken"),
            "{}",
            run.describe()
        );
        case.terminate_and_check("original after refused restores")
            .unwrap();
    }
}

/// Lazy restore: the tree runs before its memory is in; the agent serves
/// its page faults from the images and copies the rest meanwhile.
mod lazy {
    use std::time::Duration;

    use super::started;
    use ckpt_tests::{agent, agent_binary, wait_for, CaseProcess, Workdir};

    /// Starts case `name`, dumps it leaving it running, tells it to check
    /// itself; returns it (to be restored) and its images.
    fn dumped_case(name: &str, dir: &Workdir) -> (CaseProcess, std::path::PathBuf) {
        let images = dir.join("images");
        let mut case = started(name, dir);
        let (pid, images_s) = (case.pid.to_string(), images.to_string_lossy().into_owned());
        let args = [
            "dump",
            "--tree",
            &pid,
            "--images",
            &images_s,
            "--leave-running",
        ];
        let run = agent(&args, dir, "dump");
        assert!(run.ok(), "{}", run.describe());
        case.terminate_and_check("original after the dump").unwrap();
        (case, images)
    }

    /// Dumps case `name` (left running, then told to check itself), then
    /// restores it with --lazy-pages; with `delay`, the agent serves only
    /// faults for that long before it prefetches, and the restored case is
    /// told to check itself (it forks, drops, moves and unmaps memory)
    /// meanwhile. Returns the restore's report.
    fn dump_and_restore_lazily(name: &str, delay: Option<u64>) -> serde_json::Value {
        let dir = Workdir::new(&format!("lazy-{name}-{}", delay.is_some()));
        let (mut case, images) = dumped_case(name, &dir);
        let pidfile = dir.join("restore.pid");
        let mut restore = std::process::Command::new(agent_binary());
        restore
            .args(["--json", "restore", "--detach", "--lazy-pages", "--images"])
            .arg(&images)
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(ms) = delay {
            restore.env("CKPT_FAULT_LAZY_PREFETCH_DELAY_MS", ms.to_string());
        }
        let restore = restore.spawn().unwrap();
        assert!(
            wait_for(Duration::from_secs(20), || pidfile.exists()),
            "the restored tree never ran"
        );
        case.adopt_restored();
        if delay.is_some() {
            // Told while its pages are still missing: the check runs
            // against the page server alone.
            case.terminate("restored lazily").unwrap();
        }
        let out = restore.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "restore failed: {stderr}");
        let verdict = match delay {
            Some(_) => case.check_exit("restored lazily"),
            None => case.terminate_and_check("restored lazily"),
        };
        if let Err(e) = verdict {
            panic!("{e}\nrestore: {stderr}{}", dir.agent_report());
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("lazy restore of {name}: {}", report["lazy"]);
        report
    }

    /// memory_writer's writer runs at once and writes page after page
    /// while the rest comes in; every page is checked at the end.
    #[test]
    fn memory_writer_runs_before_its_memory_is_in() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let r = dump_and_restore_lazily("memory_writer", None);
        let lazy = &r["lazy"];
        assert!(lazy["prefetched_bytes"].as_u64().unwrap() > 0, "{r}");
    }

    /// Page content is checked block by block as it is first read, not
    /// up front: a corrupt block found while the tree runs kills the tree
    /// (its missing pages would read as zeros), and the restore fails.
    #[test]
    fn a_corrupt_block_kills_the_lazily_restored_tree() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let dir = Workdir::new("lazy-corrupt");
        let (case, images) = dumped_case("memory_writer", &dir);
        let (pid, images_s) = (case.pid, images.to_string_lossy().into_owned());
        // The last file of the pages (its 512 MiB are split in several).
        let pages = (1..)
            .map(|k| images.join(format!("pages-{pid}.s{k}.img")))
            .take_while(|p| p.exists())
            .last()
            .unwrap_or_else(|| images.join(format!("pages-{pid}.img")));
        let mut bytes = std::fs::read(&pages).unwrap();
        let at = bytes.len() - 3 * 4096;
        bytes[at] ^= 0x01;
        std::fs::write(&pages, bytes).unwrap();
        let run = agent(
            &["restore", "--images", &images_s, "--detach", "--lazy-pages"],
            &dir,
            "restore",
        );
        assert!(
            !run.ok() && run.stderr.contains("fail their checksum"),
            "{}",
            run.describe()
        );
        // Gone, or killed and left to this test (a subreaper) to reap.
        assert!(
            wait_for(Duration::from_secs(5), || ckpt_tests::dead(case.pid)),
            "the tree restored from a corrupt image runs on"
        );
    }

    /// lazy_events restored lazily and checked once every page is in: its
    /// saved pages run across two mappings (split by mprotect), which the
    /// prefetch must fill page by page at the boundary.
    #[test]
    fn prefetch_across_mappings() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let r = dump_and_restore_lazily("lazy_events", None);
        assert!(r["lazy"]["prefetched_bytes"].as_u64().unwrap() > 0, "{r}");
    }

    /// A fork, MADV_DONTNEED, mremap and munmap while pages are missing.
    #[test]
    fn events_while_pages_are_missing() {
        if ckpt_tests::no_checkpoint() {
            return;
        }
        let r = dump_and_restore_lazily("lazy_events", Some(3000));
        assert!(r["lazy"]["faults"].as_u64().unwrap() > 0, "{r}");
    }
}

/// Run as jobs (`ckpt-agent run`): own cgroup and PID, IPC, UTS and mount
/// namespaces, restored into new ones with the same PIDs inside.
mod job {
    use super::*;

    macro_rules! job_cases {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    zdtm(stringify!($name), Mode::Job)
                }
            )*
        };
    }

    // Cases that exist only as jobs.
    job_cases!(
        job_namespaces,
        sysv_ipc,
        job_net,
        job_net_tcp,
        job_net_unix_pairs,
        job_unlinked_shm,
        job_fifo_tmp,
    );
    pub const ONLY: &[&str] = &[
        "job_namespaces",
        "sysv_ipc",
        "job_net",
        "job_net_tcp",
        "job_net_unix_pairs",
        "job_unlinked_shm",
        "job_fifo_tmp",
    ];

    // Ordinary cases, as jobs too.
    job_cases!(
        process_tree,
        threads,
        shared_anon_tree,
        pipe_eventfd_epoll,
        pipe_writer_closed,
        unix_pairs,
        unix_listener,
        unix_accepted,
        unix_accepted_closed,
        unix_pending,
        unix_peercred,
        posix_timers,
        pending_signals,
        memfd_sealed,
        memfd_shared_map,
        fifo,
        file_shared,
        shared_fd_table,
        pty_pair,
        udp_sockets,
    );
}

/// Every case the program knows has a test above, and no test names a
/// case the program lacks.
#[test]
fn every_case_has_a_test() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zdtm-case"))
        .arg("--list")
        .output()
        .expect("run zdtm-case --list");
    let mut listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    let mut tested: Vec<String> = ALL.iter().chain(job::ONLY).map(|s| s.to_string()).collect();
    listed.sort();
    tested.sort();
    assert_eq!(listed, tested);
}
