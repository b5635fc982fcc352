//! `ckpt-agent serve` driven over the wire protocol, as ckpt-coord drives
//! it: a checkpoint in its phases (prepare, dump, finish) and a restore; a
//! connection that goes away aborts its checkpoint and the process runs on;
//! a coordinator with the wrong key is refused; `check` names what a node
//! lacks to restore a checkpoint; a post-copy between two agents: a final
//! level whose pages the source agent holds, restored lazily by the other;
//! a job's part stopped in the background (a migration's source), gone
//! before the answer, its exit waited for by the job's next request.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_proto::rpc::msg::{self, request::Body as Q, response::Body as A};
use ckpt_proto::rpc::{Channel, Key};
use ckpt_tests::{
    agent_binary, dead, no_checkpoint, reap_descendants, wait_for, CaseProcess, Workdir,
};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");

/// A served agent, killed when dropped.
struct Served {
    child: Child,
    addr: String,
    key: Key,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key_file(dir: &Workdir, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, [byte; 32]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn serve(dir: &Workdir) -> Served {
    serve_named(dir, "state")
}

/// An agent keeping its state in `dir`/`name` (several may share `dir`
/// and its key).
fn serve_named(dir: &Workdir, name: &str) -> Served {
    serve_with(dir, name, &[])
}

/// [`serve_named`] with more environment for the agent.
fn serve_with(dir: &Workdir, name: &str, env: &[(&str, &str)]) -> Served {
    let key = key_file(dir, "cluster.key", 0x42);
    let mut child = Command::new(agent_binary())
        .envs(env.iter().copied())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node",
            "test-node",
            "--key",
        ])
        .arg(&key)
        .arg("--state-dir")
        .arg(dir.join(name))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join(&format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(addr.contains(':'), "serve printed {line:?}");
    Served {
        child,
        addr,
        key: Key::load(&key).unwrap(),
    }
}

fn connect(s: &Served) -> Channel {
    Channel::connect(&s.addr, &s.key, Duration::from_secs(10)).unwrap()
}

fn prepare(ch: &mut Channel, pid: i32, images: &Path) -> u64 {
    match ch
        .call(
            0,
            Q::Prepare(msg::PrepareRequest {
                pid,
                images: images.to_string_lossy().into_owned(),
                ..Default::default()
            }),
        )
        .unwrap()
    {
        Some(A::Prepare(p)) => p.session,
        other => panic!("prepare answered {other:?}"),
    }
}

/// A case, prepared and dumped by the service (not finished): the case,
/// its images, the connection holding the session, the session.
fn dumped(dir: &Workdir, agent: &Served) -> (CaseProcess, PathBuf, Channel, u64) {
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "threads", dir).unwrap();
    case.wait_ready().unwrap();
    let images = dir.join("images");
    let mut ch = connect(agent);
    let session = prepare(&mut ch, case.pid, &images);
    match ch
        .call(0, Q::Dump(msg::DumpPartRequest { session }))
        .unwrap()
    {
        Some(A::Dump(d)) => assert!(d.pages_bytes > 0, "the dump reports its pages"),
        other => panic!("dump answered {other:?}"),
    }
    (case, images, ch, session)
}

#[test]
fn checkpoint_in_phases_then_restore() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("serve-phases");
    let agent = serve(&dir);
    let (mut case, images, mut ch, session) = dumped(&dir, &agent);
    assert!(images.join("inventory.img").exists());
    ch.call(
        0,
        Q::Finish(msg::FinishRequest {
            session,
            stop: true,
            background: false,
        }),
    )
    .unwrap();
    case.expect_gone().unwrap();
    let r = ch
        .call(
            0,
            Q::Restore(msg::RestorePartRequest {
                images: images.to_string_lossy().into_owned(),
                ..Default::default()
            }),
        )
        .unwrap();
    match r {
        Some(A::Restore(r)) => assert_eq!(r.pid, case.pid),
        other => panic!("restore answered {other:?}"),
    }
    case.adopt_restored();
    case.terminate_and_check("restored by the service").unwrap();
}

#[test]
fn a_connection_that_goes_away_aborts_its_checkpoint() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("serve-abort");
    let agent = serve(&dir);
    let (mut case, images, ch, _session) = dumped(&dir, &agent);
    drop(ch);
    let tracer = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:").map(|v| v.trim().to_string()))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracer(case.pid).as_deref() != Some("0") || images.join("inventory.img").exists() {
        assert!(
            Instant::now() < deadline,
            "the aborted session was not undone"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    case.terminate_and_check("after an aborted checkpoint")
        .unwrap();
}

#[test]
fn a_coordinator_with_another_key_is_refused() {
    let dir = Workdir::new("serve-key");
    let agent = serve(&dir);
    let wrong = Key::load(&key_file(&dir, "other.key", 0x43)).unwrap();
    let e = Channel::connect(&agent.addr, &wrong, Duration::from_secs(10))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("same key file"), "{e}");
    // The service goes on for the right key.
    let mut ch = connect(&agent);
    match ch
        .call(0, Q::Status(msg::StatusRequest::default()))
        .unwrap()
    {
        Some(A::Status(s)) => assert_eq!(s.node, "test-node"),
        other => panic!("status answered {other:?}"),
    }
    // Logged once the agent has dropped the connection: maybe a moment
    // after the coordinator saw it close.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = std::fs::read_to_string(dir.join("state.err")).unwrap_or_default();
        if log.contains("refused a connection") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        log.contains("refused a connection"),
        "the refusal is logged:\n{log}"
    );
}

#[test]
fn check_names_a_missing_kernel_feature() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("serve-check");
    let agent = serve(&dir);
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "threads", &dir).unwrap();
    case.wait_ready().unwrap();
    let images = dir.join("images");
    let run = ckpt_tests::dump(case.pid, &images, &["--leave-running"], &dir);
    assert!(run.ok(), "{}", run.describe());
    let mut ch = connect(&agent);
    let check = |ch: &mut Channel| match ch
        .call(
            0,
            Q::Check(msg::CheckRequest {
                images: images.to_string_lossy().into_owned(),
                compat_only: false,
            }),
        )
        .unwrap()
    {
        Some(A::Check(c)) => c,
        other => panic!("check answered {other:?}"),
    };
    let c = check(&mut ch);
    assert!(
        c.ok,
        "this node restores its own checkpoint: {:?}",
        c.missing
    );
    // The same checkpoint, as if it needed a feature this node lacks.
    let inv_path = images.join("inventory.img");
    let mut inv: ckpt_proto::image::Inventory =
        ckpt_proto::read_image_file(&inv_path, ckpt_proto::ImageKind::Inventory).unwrap();
    inv.needs_features.push("warp_drive".into());
    ckpt_proto::write_image_file(&inv_path, ckpt_proto::ImageKind::Inventory, &inv).unwrap();
    let c = check(&mut ch);
    assert!(!c.ok);
    assert!(
        c.missing.iter().any(|m| m.contains("warp_drive")),
        "{:?}",
        c.missing
    );
    case.terminate_and_check("after check").unwrap();
}

/// Sends `body` on `ch` and returns the answer, failing the test on an
/// error.
fn call(ch: &mut Channel, what: &str, body: Q) -> A {
    match ch.call(0, body) {
        Ok(Some(a)) => a,
        other => panic!("{what} answered {other:?}"),
    }
}

/// Prepares and dumps `req` on `ch`; returns the session and the dump's
/// answer.
fn prepare_and_dump(ch: &mut Channel, req: msg::PrepareRequest) -> (u64, msg::DumpPartReply) {
    let A::Prepare(p) = call(ch, "prepare", Q::Prepare(req)) else {
        panic!("prepare answered something else")
    };
    let session = p.session;
    match call(ch, "dump", Q::Dump(msg::DumpPartRequest { session })) {
        A::Dump(d) => (session, d),
        other => panic!("dump answered {other:?}"),
    }
}

/// Post-copy between two agents: a pre-dump streamed into the target's
/// inbox while the case writes on, then the final level streamed without
/// its pages, which the source agent holds; the source part stops, the
/// target restores lazily and fetches them; the case checks every page of
/// its memory, and the hold goes once every page is in.
#[test]
fn a_final_level_held_by_its_source_is_restored_lazily_elsewhere() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("serve-held");
    let source = serve_named(&dir, "source");
    let target = serve_named(&dir, "target");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "memory_writer", &dir).unwrap();
    case.wait_ready().unwrap();
    let mut t = connect(&target);
    let A::Inbox(inbox) = call(
        &mut t,
        "inbox",
        Q::Inbox(msg::InboxRequest { job: "held".into() }),
    ) else {
        panic!("inbox answered something else")
    };
    let mut s = connect(&source);
    let level = |level: &str| msg::PrepareRequest {
        pid: case.pid,
        stream_to: target.addr.clone(),
        inbox: inbox.inbox.clone(),
        level: level.into(),
        ..Default::default()
    };
    let (session, _) = prepare_and_dump(
        &mut s,
        msg::PrepareRequest {
            pre_dump: true,
            snapshot: true,
            ..level("pre-1")
        },
    );
    call(
        &mut s,
        "finish",
        Q::Finish(msg::FinishRequest {
            session,
            stop: false,
            background: false,
        }),
    );
    // The writer changes pages meanwhile: the final level has some.
    std::thread::sleep(Duration::from_millis(300));
    let (session, d) = prepare_and_dump(
        &mut s,
        msg::PrepareRequest {
            stop_after_commit: true,
            parent: "pre-1".into(),
            hold_pages: source.addr.clone(),
            ..level("final")
        },
    );
    assert!(d.pages_bytes > 0 && !d.hold.is_empty(), "{d:?}");
    let held = Path::new("/dev/shm/ckpt-held").join(&d.hold);
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        names(&held).iter().any(|n| n.starts_with("pages-")),
        "the hold has no pages: {:?}",
        names(&held)
    );
    let final_dir = Path::new(&inbox.dir).join("final");
    let received = names(&final_dir);
    assert!(
        received.iter().any(|n| n == "held.img")
            && !received.iter().any(|n| n.starts_with("pages-")),
        "the final level should name its hold and carry no pages: {received:?}"
    );
    call(
        &mut s,
        "finish",
        Q::Finish(msg::FinishRequest {
            session,
            stop: true,
            // As a migration stops its sources: the answer comes once the
            // part is killed, its exit goes on after.
            background: true,
        }),
    );
    case.expect_gone().unwrap();
    reap_descendants(case.pid, &final_dir).unwrap();
    let r = call(
        &mut t,
        "restore",
        Q::Restore(msg::RestorePartRequest {
            images: final_dir.to_string_lossy().into_owned(),
            lazy_pages: true,
            ..Default::default()
        }),
    );
    match r {
        A::Restore(r) => assert_eq!(r.pid, case.pid),
        other => panic!("restore answered {other:?}"),
    }
    case.adopt_restored();
    assert!(
        wait_for(Duration::from_secs(60), || !held.exists()),
        "the hold stayed after the lazy restore: {}",
        std::fs::read_to_string(dir.join("target.err")).unwrap_or_default()
    );
    // Dropped only once the level is whole here: what a migration undone
    // now would send back.
    assert!(
        names(&final_dir).iter().any(|n| n.starts_with("pages-")),
        "the held pages were not saved into the level: {:?}",
        names(&final_dir)
    );
    let o = Command::new(agent_binary())
        .args(["check", "--images"])
        .arg(&final_dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the saved level does not verify: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Ours once the restoring process has ended (we are a subreaper).
    let ppid = || {
        std::fs::read_to_string(format!("/proc/{}/stat", case.pid))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u32>()
                    .ok()
            })
    };
    assert!(
        wait_for(Duration::from_secs(30), || ppid()
            == Some(std::process::id())),
        "the restored case was not handed to the test"
    );
    case.terminate_and_check("restored from a level held by its source")
        .unwrap();
}

/// Where job `job`'s cgroup would be (v2 or the v1 freezer), if it exists.
fn job_cgroup(job: &str) -> Option<PathBuf> {
    [
        "/sys/fs/cgroup/unified/ckpt",
        "/sys/fs/cgroup/ckpt",
        "/sys/fs/cgroup/freezer/ckpt",
    ]
    .iter()
    .map(|root| Path::new(root).join(job))
    .find(|d| d.join("cgroup.procs").exists())
}

/// The cgroups set aside for job `job`'s departing parts.
fn set_aside(job: &str) -> Vec<PathBuf> {
    [
        "/sys/fs/cgroup/unified/ckpt",
        "/sys/fs/cgroup/ckpt",
        "/sys/fs/cgroup/freezer/ckpt",
    ]
    .iter()
    .filter_map(|root| std::fs::read_dir(root).ok())
    .flat_map(|rd| rd.flatten())
    .filter(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{job}~gone-"))
    })
    .map(|e| e.path())
    .collect()
}

/// Starts job `job` (`sleep`) on `ch`'s agent; its root's pid.
fn run_job(ch: &mut Channel, job: &str) -> i32 {
    match call(
        ch,
        "run",
        Q::Run(msg::RunPartRequest {
            job: job.into(),
            argv: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        }),
    ) {
        A::Run(r) => r.pid,
        other => panic!("run answered {other:?}"),
    }
}

/// Starts job `job` on `ch`'s agent, checkpoints it and stops it in the
/// background, as a migration stops its sources: the job's root and how
/// long the stop took to be answered.
fn run_and_depart(ch: &mut Channel, dir: &Workdir, job: &str) -> (i32, Duration) {
    let pid = run_job(ch, job);
    let (session, _) = prepare_and_dump(
        ch,
        msg::PrepareRequest {
            job: job.into(),
            images: dir.join("images").to_string_lossy().into_owned(),
            stop_after_commit: true,
            ..Default::default()
        },
    );
    let t = Instant::now();
    call(
        ch,
        "finish",
        Q::Finish(msg::FinishRequest {
            session,
            stop: true,
            background: true,
        }),
    );
    (pid, t.elapsed())
}

fn departing(ch: &mut Channel, job: &str) -> bool {
    match call(
        ch,
        "status",
        Q::Status(msg::StatusRequest {
            jobs: vec![job.into()],
        }),
    ) {
        A::Status(s) => s.departing.iter().any(|j| j == job),
        other => panic!("status answered {other:?}"),
    }
}

#[test]
fn a_part_stopped_in_the_background_is_dead_at_the_answer_and_waited_for() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("serve-depart");
    // The departure (waiting for the exit, removing the cgroup set aside)
    // is held 2 s after the answer, so the test sees inside it.
    let agent = serve_with(&dir, "state", &[("CKPT_FAULT_HOLD_DEPARTURE_MS", "2000")]);
    let job = format!("depart-{}", std::process::id());
    let mut ch = connect(&agent);
    let (pid, answered) = run_and_depart(&mut ch, &dir, &job);
    assert!(
        answered < Duration::from_secs(2),
        "the answer waited for the departure"
    );
    assert!(
        departing(&mut ch, &job),
        "Status does not list the departing part"
    );
    assert!(
        job_cgroup(&job).is_none(),
        "the job's cgroup is still there"
    );
    assert_eq!(set_aside(&job).len(), 1, "no cgroup set aside");
    assert!(
        wait_for(Duration::from_secs(1), || dead(pid)),
        "the part still runs after the answer"
    );
    // The job comes back to this node at once: its Run waits for the
    // departure, then starts it afresh.
    let t = Instant::now();
    let again = run_job(&mut ch, &job);
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "the run did not wait for the departure"
    );
    assert!(!departing(&mut ch, &job));
    assert!(set_aside(&job).is_empty(), "the cgroup set aside stayed");
    assert!(job_cgroup(&job).is_some() && !dead(again));
    call(
        &mut ch,
        "kill",
        Q::Kill(msg::KillRequest { job: job.clone() }),
    );
    assert!(wait_for(Duration::from_secs(5), || dead(again)));
}

#[test]
fn a_departure_cut_short_by_its_agent_leaves_nothing_running() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("serve-depart-dies");
    let mut agent = serve_with(&dir, "state", &[("CKPT_FAULT_HOLD_DEPARTURE_MS", "60000")]);
    let job = format!("depart-dies-{}", std::process::id());
    let mut ch = connect(&agent);
    let (pid, _) = run_and_depart(&mut ch, &dir, &job);
    // The agent dies inside the departure.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    assert!(
        wait_for(Duration::from_secs(5), || dead(pid)),
        "the part runs on after its agent died"
    );
    // Its successor sweeps the cgroup it left set aside.
    let _next = serve_named(&dir, "state");
    assert!(
        wait_for(Duration::from_secs(10), || set_aside(&job).is_empty()),
        "the cgroup set aside stayed: {:?}",
        set_aside(&job)
    );
    assert!(job_cgroup(&job).is_none());
}
