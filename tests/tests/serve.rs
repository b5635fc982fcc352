//! `ckpt-agent serve` driven over the wire protocol, as ckpt-coord drives
//! it: a checkpoint in its phases (prepare, dump, finish) and a restore; a
//! connection that goes away aborts its checkpoint and the process runs on;
//! a coordinator with the wrong key is refused; `check` names what a node
//! lacks to restore a checkpoint.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_proto::rpc::msg::{self, request::Body as Q, response::Body as A};
use ckpt_proto::rpc::{Channel, Key};
use ckpt_tests::{agent_binary, no_checkpoint, CaseProcess, Workdir};

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
    let key = key_file(dir, "cluster.key", 0x42);
    let mut child = Command::new(agent_binary())
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
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("serve.err")).unwrap())
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
        let log = std::fs::read_to_string(dir.join("serve.err")).unwrap_or_default();
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
