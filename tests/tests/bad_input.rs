//! The agent refuses bad input cleanly: impossible targets for dump,
//! broken or missing images and taken PIDs for restore, unsupported
//! descriptors. Skipped under CKPT_ZDTM_NOCKPT=1 except for the case-side
//! half of the unsupported-fd test.

use std::fs;
use std::path::{Path, PathBuf};

use ckpt_tests::{
    dump, no_checkpoint, pid_exists, pids_mentioning, restore_detached, CaseProcess, Workdir,
};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");

/// True (and says so) when the agent is not under test.
fn skip() -> bool {
    if no_checkpoint() {
        eprintln!("skipped: CKPT_ZDTM_NOCKPT=1");
    }
    no_checkpoint()
}

fn assert_refused(run: &ckpt_tests::AgentRun, must_mention: &[&str]) {
    assert_eq!(run.code, Some(1), "expected exit 1:\n{}", run.describe());
    for m in must_mention {
        assert!(
            run.stderr.contains(m),
            "stderr should mention {m:?}:\n{}",
            run.describe()
        );
    }
}

/// Starts a case and dumps it (killing it), for tests that need images.
fn dumped_case(name: &str, dir: &Workdir) -> (CaseProcess, PathBuf) {
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), name, dir).unwrap();
    case.wait_ready().unwrap();
    let images = dir.join("images");
    let run = dump(case.pid, &images, &[], dir);
    assert!(
        run.ok(),
        "dump needed by this test failed:\n{}",
        run.describe()
    );
    case.expect_gone().unwrap();
    (case, images)
}

#[test]
fn dump_missing_pid() {
    if skip() {
        return;
    }
    let dir = Workdir::new("missing-pid");
    let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let pid = (2..pid_max).rev().find(|p| !pid_exists(*p)).unwrap();
    let run = dump(pid, &dir.join("images"), &[], &dir);
    assert_refused(&run, &[&pid.to_string()]);
}

#[test]
fn dump_init_refused() {
    if skip() {
        return;
    }
    let dir = Workdir::new("pid1");
    let run = dump(1, &dir.join("images"), &[], &dir);
    assert_refused(&run, &[]);
    assert!(pid_exists(1));
}

/// PF_KTHREAD in /proc/PID/stat's flags (field 9).
fn is_kernel_thread(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    after
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & 0x0020_0000 != 0)
}

#[test]
fn dump_kernel_thread_refused() {
    if skip() {
        return;
    }
    // kthreadd is PID 2 on the host; inside a PID namespace look further.
    let kthread = std::iter::once(2)
        .chain(
            fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()),
        )
        .find(|&p| is_kernel_thread(p));
    let Some(pid) = kthread else {
        eprintln!("skipped: no kernel thread visible in this PID namespace");
        return;
    };
    let dir = Workdir::new("kthread");
    let run = dump(pid, &dir.join("images"), &[], &dir);
    assert_refused(&run, &[&pid.to_string()]);
    assert!(pid_exists(pid));
}

#[test]
fn restore_without_inventory() {
    if skip() {
        return;
    }
    let dir = Workdir::new("no-inventory");
    let images = dir.join("images");
    fs::create_dir_all(&images).unwrap();
    let (run, pid) = restore_detached(&images, &dir, "restore");
    assert_refused(&run, &[]);
    assert_eq!(pid, None, "no pidfile expected:\n{}", run.describe());
}

#[test]
fn restore_corrupt_pages_refused() {
    if skip() {
        return;
    }
    let dir = Workdir::new("corrupt-pages");
    let (mut case, images) = dumped_case("heap", &dir);
    let pages = images.join(format!("pages-{}.img", case.pid));
    let mut bytes = fs::read(&pages).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (images: {:?})",
            pages.display(),
            fs::read_dir(&images).map(|d| d.count())
        )
    });
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&pages, &bytes).unwrap();

    let (run, _) = restore_detached(&images, &dir, "restore");
    let appeared = pid_exists(case.pid);
    if appeared {
        case.adopt_restored(); // so that the guard kills it
    }
    assert_refused(&run, &[]);
    assert!(
        !appeared,
        "a process with pid {} appeared:\n{}",
        case.pid,
        run.describe()
    );
    let dir_s = dir.path.to_string_lossy();
    assert_eq!(
        pids_mentioning(&dir_s),
        Vec::<i32>::new(),
        "processes left behind"
    );
}

#[test]
fn restore_pid_taken_refused() {
    if skip() {
        return;
    }
    let dir = Workdir::new("pid-taken");
    let (mut case, images) = dumped_case("umask", &dir);
    let (first, pid) = restore_detached(&images, &dir, "restore-1");
    if pid == Some(case.pid) {
        case.adopt_restored();
    }
    assert!(first.ok(), "first restore failed:\n{}", first.describe());
    assert_eq!(pid, Some(case.pid), "{}", first.describe());

    let (second, _) = restore_detached(&images, &dir, "restore-2");
    assert_refused(&second, &[&case.pid.to_string()]);
    let dir_s = dir.path.to_string_lossy();
    assert_eq!(
        pids_mentioning(&dir_s),
        vec![case.pid],
        "only the first restored process may exist:\n{}",
        second.describe()
    );
    case.terminate_and_check("first restored process after a refused second restore")
        .unwrap();
}

/// A TCP connection whose peer closed its side cannot be rebuilt: refused
/// with pid, fd and state, and the process keeps its connection.
#[test]
fn dump_refuses_tcp_close_wait() {
    let dir = Workdir::new("tcp-close-wait");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "tcp_close_wait", &dir).unwrap();
    case.wait_ready().unwrap();
    if !no_checkpoint() {
        let run = dump(case.pid, &dir.join("images"), &["--tcp-established"], &dir);
        assert_refused(&run, &[&case.pid.to_string(), "CLOSE_WAIT", "FIN"]);
        assert!(pid_exists(case.pid), "the process must keep running");
    }
    case.terminate_and_check("after a refused dump").unwrap();
}

/// A listener whose accept queue is not empty: refused, naming the
/// listener, and the connection still waits to be accepted.
#[test]
fn dump_refuses_tcp_listen_pending() {
    let dir = Workdir::new("tcp-listen-pending");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "tcp_listen_pending", &dir).unwrap();
    case.wait_ready().unwrap();
    if !no_checkpoint() {
        let run = dump(case.pid, &dir.join("images"), &["--tcp-established"], &dir);
        assert_refused(
            &run,
            &[&case.pid.to_string(), "not yet accepted", "127.0.0.1"],
        );
        assert!(pid_exists(case.pid), "the process must keep running");
    }
    case.terminate_and_check("after a refused dump").unwrap();
}

/// Established connections need --tcp-established; refused without it,
/// and the connections go on untouched (the case checks them all).
#[test]
fn dump_refuses_tcp_without_flag() {
    let dir = Workdir::new("tcp-no-flag");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "tcp_loopback", &dir).unwrap();
    case.wait_ready().unwrap();
    if !no_checkpoint() {
        let run = dump(case.pid, &dir.join("images"), &[], &dir);
        assert_refused(&run, &[&case.pid.to_string(), "--tcp-established", " -> "]);
        assert!(pid_exists(case.pid), "the process must keep running");
        let left = ckpt_tests::lock_tables(case.pid);
        assert!(left.is_empty(), "lock rules left behind: {left:?}");
    }
    case.terminate_and_check("after a refused dump").unwrap();
}

/// A pipe whose write end a process outside the dumped tree holds (here
/// the test itself) cannot be rebuilt: refused, naming the pipe and its
/// missing end, and the process keeps running. The same case with no one
/// left holding the write end is restored (zdtm's pipe_writer_closed).
#[test]
fn dump_refuses_pipe_held_outside() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = Workdir::new("pipe-held-outside");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "pipe_writer_closed", &dir).unwrap();
    case.wait_ready().unwrap();
    // The case's only pipe descriptor: the read end of a pipe nobody writes.
    let fds = format!("/proc/{}/fd", case.pid);
    let (fd, pipe) = fs::read_dir(&fds)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let link = fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            link.starts_with("pipe:[").then(|| (e.file_name(), link))
        })
        .next()
        .unwrap_or_else(|| panic!("no pipe in {fds}"));
    // Opened through /proc, a pipe gives a new open file description on
    // it: this test now holds a write end.
    let writer = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(Path::new(&fds).join(&fd))
        .unwrap_or_else(|e| panic!("open a write end of {pipe}: {e}"));
    if !no_checkpoint() {
        let run = dump(case.pid, &dir.join("images"), &[], &dir);
        assert_refused(&run, &[&case.pid.to_string(), &pipe, "write end"]);
        assert!(pid_exists(case.pid), "the process must keep running");
    }
    // Gone again before the case checks its end of file.
    drop(writer);
    case.terminate_and_check("after a refused dump").unwrap();
}

/// An agent SIGKILLed in the middle of a dump (during the page copy) leaves
/// the process running as before, and no checkpoint that looks complete.
#[test]
fn agent_killed_mid_dump_leaves_process_running() {
    if skip() {
        return;
    }
    let dir = Workdir::new("agent-killed");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "big_memory", &dir).unwrap();
    case.wait_ready().unwrap();
    let images = dir.join("images");
    let mut agent = std::process::Command::new(ckpt_tests::agent_binary())
        .args(["dump", "--tree", &case.pid.to_string(), "--images"])
        .arg(&images)
        .arg("--leave-running")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Seizing and the injected queries take a few ms; copying 768 MiB takes
    // hundreds: 150 ms lands in the copy.
    std::thread::sleep(std::time::Duration::from_millis(150));
    let still_dumping = agent.try_wait().unwrap().is_none();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        still_dumping,
        "the dump ended before the agent could be killed mid-way"
    );
    assert!(pid_exists(case.pid), "the process must keep running");
    assert!(
        !images.join("inventory.img").exists(),
        "an interrupted dump must not look like a checkpoint"
    );
    case.terminate_and_check("after its dumping agent was killed")
        .unwrap();
}

/// Objects the engine does not support (io_uring, perf event, bpf,
/// netlink, a device) are refused at dump naming pid, fd and kind, and the
/// process keeps running as before.
#[test]
fn dump_refuses_unsupported_kinds() {
    for (case_name, kind) in [
        ("refuse_io_uring", "io_uring"),
        ("refuse_perf_event", "perf event"),
        ("refuse_bpf_map", "bpf object"),
        ("refuse_netlink", "netlink socket"),
        ("refuse_device", "character device"),
    ] {
        let dir = Workdir::new(case_name);
        let mut case = CaseProcess::spawn(Path::new(CASE_BIN), case_name, &dir).unwrap();
        case.wait_ready().unwrap();
        if !no_checkpoint() {
            let run = dump(case.pid, &dir.join("images"), &[], &dir);
            assert_refused(&run, &[&format!("pid {} fd 50", case.pid), kind]);
            assert!(
                pid_exists(case.pid),
                "{case_name}: the process must keep running"
            );
        }
        case.terminate_and_check(&format!("{case_name} after a refused dump"))
            .unwrap();
    }
}

/// Processes sharing an address space outside a thread group (CLONE_VM)
/// are refused, naming what they share, and keep running.
#[test]
fn dump_refuses_shared_address_space() {
    let dir = Workdir::new("shared-vm");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "shared_vm", &dir).unwrap();
    case.wait_ready().unwrap();
    if !no_checkpoint() {
        let run = dump(case.pid, &dir.join("images"), &[], &dir);
        assert_refused(&run, &["address space"]);
        assert!(pid_exists(case.pid), "the process must keep running");
    }
    case.terminate_and_check("after a refused dump").unwrap();
}

/// A checkpoint taken where the vdso looked different cannot be restored
/// here (the restored process keeps its vdso at the old address and calls
/// into it): `check --images` says why, and restore refuses before
/// creating anything.
#[test]
fn restore_other_vdso_layout_refused() {
    use ckpt_proto::image::Inventory;
    use ckpt_proto::{read_image_file, write_image_file, ImageKind};
    if skip() {
        return;
    }
    let dir = Workdir::new("vdso-layout");
    let (mut case, images) = dumped_case("heap", &dir);
    let inv_path = images.join("inventory.img");
    let mut inv: Inventory = read_image_file(&inv_path, ImageKind::Inventory).unwrap();
    let node = inv.node.as_mut().expect("the inventory names its node");
    let vdso = node
        .vdso_layout
        .iter_mut()
        .find(|a| a.name == "[vdso]")
        .expect("a [vdso] area");
    vdso.size += 4096;
    write_image_file(&inv_path, ImageKind::Inventory, &inv).unwrap();

    let images_s = images.to_string_lossy().into_owned();
    let check = ckpt_tests::agent(&["check", "--images", &images_s], &dir, "check");
    assert_eq!(check.code, Some(1), "{}", check.describe());
    assert!(check.stdout.contains("vdso"), "{}", check.describe());

    let (run, _) = restore_detached(&images, &dir, "restore");
    let appeared = pid_exists(case.pid);
    if appeared {
        case.adopt_restored();
    }
    assert_refused(&run, &["vdso"]);
    assert!(!appeared, "a process with pid {} appeared", case.pid);
}

/// A job checkpointed with --leave-running cannot be restored on the same
/// node under its own id while it runs (its cgroup is in use): refused,
/// naming the job and what to do, with nothing created. With `--job NEW`
/// the copy runs beside the original, in a cgroup of its own and as PID 1
/// of its own namespace.
#[test]
fn restore_job_id_in_use_refused() {
    use ckpt_tests::{inner_pid, restore_detached_with, JobCgroupGuard};
    if skip() {
        return;
    }
    let dir = Workdir::for_job("job-id-in-use");
    let job = format!("zdtm-idinuse-{}", std::process::id());
    let copy = format!("{job}-copy");
    let _guards = (JobCgroupGuard(job.clone()), JobCgroupGuard(copy.clone()));
    let mut case = CaseProcess::spawn_job(Path::new(CASE_BIN), "threads", &job, &dir).unwrap();
    case.wait_ready().unwrap();
    let images = dir.join("images");
    let run = dump(case.pid, &images, &["--leave-running"], &dir);
    assert!(run.ok(), "{}", run.describe());

    let (refused, pid) = restore_detached_with(&images, &[], &dir, "same-id");
    assert_refused(&refused, &[&job, "--job"]);
    assert_eq!(pid, None, "a refused restore writes no pid");
    assert!(pid_exists(case.pid), "the original keeps running");

    let (run, pid) = restore_detached_with(&images, &["--job", &copy], &dir, "new-id");
    assert!(run.ok(), "{}", run.describe());
    let pid = pid.expect("restored pid");
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let restored_ok = cgroup.contains(&format!("/ckpt/{copy}")) && inner_pid(pid) == Some(1);
    // SAFETY: ends the copy, ours to kill; collected by the harness's
    // subreaper wait.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = ckpt_tests::wait_pid(pid, std::time::Duration::from_secs(5));
    assert!(
        restored_ok,
        "copy not in ckpt/{copy} or not PID 1: {cgroup}"
    );
    case.terminate_and_check("original after the copy").unwrap();
}

/// An agent SIGKILLed while a job's cgroup is frozen leaves it frozen (no
/// one is left to thaw it): `ckpt-agent cleanup` (or any later dump) finds
/// the dead agent's freeze lock and thaws the job, which then runs on and
/// passes.
#[test]
fn agent_killed_while_job_frozen_thawed_by_cleanup() {
    use ckpt_tests::JobCgroupGuard;
    if skip() {
        return;
    }
    let dir = Workdir::for_job("killed-frozen");
    let job = format!("zdtm-killedfrozen-{}", std::process::id());
    let _guard = JobCgroupGuard(job.clone());
    let mut case = CaseProcess::spawn_job(Path::new(CASE_BIN), "threads", &job, &dir).unwrap();
    case.wait_ready().unwrap();
    let events = ["/sys/fs/cgroup/unified/ckpt", "/sys/fs/cgroup/ckpt"]
        .iter()
        .map(|r| Path::new(r).join(&job).join("cgroup.events"))
        .find(|p| p.exists())
        .expect("the job's cgroup v2 directory");
    let frozen = || fs::read_to_string(&events).is_ok_and(|s| s.contains("frozen 1"));
    let mut agent = std::process::Command::new(ckpt_tests::agent_binary())
        .args(["dump", "--tree", &case.pid.to_string(), "--images"])
        .arg(dir.join("images"))
        .env("CKPT_FAULT_HOLD_FROZEN_MS", "5000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !frozen() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let was_frozen = frozen();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(was_frozen, "the agent never froze the job");
    // Another test's dump may recover it first (every dump does): then
    // cleanup has nothing left to do, but the job must be thawed anyway.
    let still_frozen = frozen();
    let run = ckpt_tests::agent(&["cleanup"], &dir, "cleanup");
    assert!(run.ok(), "{}", run.describe());
    if still_frozen {
        assert!(run.stdout.contains(&job), "{}", run.describe());
    }
    assert!(!frozen(), "cleanup must thaw the job");
    assert!(
        !Path::new("/run/ckpt/frozen").join(&job).exists(),
        "the dead agent's freeze lock is gone"
    );
    case.terminate_and_check("after cleanup thawed it").unwrap();
}
