//! TCP connections to a peer outside the checkpoint (this test): the
//! network lock keeps the peer from seeing a reset while the process is
//! dumped and restored, and a lock left by an agent killed mid-dump is
//! removed by `ckpt-agent cleanup`, after which the connection goes on.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_tests::{
    agent, agent_binary, dump, lock_tables, no_checkpoint, pid_exists, restore_detached_with,
    CaseProcess, StreamPeer, Workdir,
};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");

/// Releases a lock a dump of `pid` kept, whatever the test's outcome (a
/// kept lock waits for a restore that a failed test never makes).
struct KeptLockGuard(i32);

impl Drop for KeptLockGuard {
    fn drop(&mut self) {
        let _ = Command::new(agent_binary())
            .args(["cleanup", "--job", &format!("pid{}", self.0)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A case streaming with this test, set up.
fn streaming_case(dir: &Workdir) -> (CaseProcess, StreamPeer) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("peer"), listener.local_addr().unwrap().to_string()).unwrap();
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "tcp_stream", dir).unwrap();
    let peer = StreamPeer::start(listener);
    case.wait_ready().unwrap();
    peer.flows(10_000, Duration::from_secs(5)).unwrap();
    (case, peer)
}

/// The process is dumped (killed) and restored while the peer keeps
/// sending: the lock the dump kept in this namespace holds the peer off
/// (no reset) until the restore has rebuilt the connection, and both
/// directions go on byte-exact.
#[test]
fn connection_to_outside_peer_survives_dump_and_restore() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("tcp-outside-peer");
    let (mut case, peer) = streaming_case(&dir);
    let _kept = KeptLockGuard(case.pid);
    let images = dir.join("images");
    let run = dump(case.pid, &images, &["--tcp-established"], &dir);
    assert!(run.ok(), "dump failed:\n{}", run.describe());
    case.expect_gone().unwrap();
    // The process is gone; its addresses stay here: the lock must too.
    assert_eq!(
        lock_tables(case.pid).len(),
        1,
        "the dump must keep its lock until the restore"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        peer.error(),
        None,
        "the peer saw an error while the process was away"
    );
    let (run, pid) = restore_detached_with(&images, &["--tcp-established"], &dir, "restore");
    if pid == Some(case.pid) {
        case.adopt_restored();
    }
    assert!(run.ok(), "restore failed:\n{}", run.describe());
    assert!(
        lock_tables(case.pid).is_empty(),
        "lock left after the restore: {:?}",
        lock_tables(case.pid)
    );
    peer.flows(50_000, Duration::from_secs(10)).unwrap();
    case.terminate_and_check("restored process").unwrap();
    peer.finish();
}

/// With --leave-running the process goes on at once and the lock is gone.
#[test]
fn leave_running_unlocks() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("tcp-leave-running");
    let (mut case, peer) = streaming_case(&dir);
    let run = dump(
        case.pid,
        &dir.join("images"),
        &["--tcp-established", "--leave-running"],
        &dir,
    );
    assert!(run.ok(), "dump failed:\n{}", run.describe());
    assert!(
        lock_tables(case.pid).is_empty(),
        "lock left: {:?}",
        lock_tables(case.pid)
    );
    peer.flows(50_000, Duration::from_secs(10)).unwrap();
    case.terminate_and_check("after --leave-running").unwrap();
    peer.finish();
}

/// The agent is SIGKILLed mid-dump with the connection locked: the process
/// keeps running, `ckpt-agent cleanup` removes the lock, and the stream
/// goes on with no byte lost or repeated.
#[test]
fn agent_killed_while_locked() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("tcp-agent-killed");
    let (mut case, peer) = streaming_case(&dir);
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut agent_proc = Command::new(agent_binary())
        .args(["dump", "--tree", &case.pid.to_string(), "--images"])
        .arg(&images)
        .arg("--tcp-established")
        .env("CKPT_FAULT_HOLD_LOCKED_MS", "20000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock_tables(case.pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        lock_tables(case.pid).len(),
        1,
        "the dump never locked the network"
    );
    // Past the socket reads, inside the fault window.
    std::thread::sleep(Duration::from_millis(300));
    agent_proc.kill().unwrap();
    agent_proc.wait().unwrap();
    assert!(pid_exists(case.pid), "the process must keep running");
    assert_eq!(
        lock_tables(case.pid).len(),
        1,
        "a dead agent's lock is still there"
    );
    assert!(
        !images.join("inventory.img").exists(),
        "a dump that never committed must not look complete"
    );
    let run = agent(&["cleanup"], &dir, "cleanup");
    assert!(run.ok(), "cleanup failed:\n{}", run.describe());
    assert!(
        run.stdout.contains("removed network lock"),
        "{}",
        run.describe()
    );
    assert!(
        lock_tables(case.pid).is_empty(),
        "lock left after cleanup: {:?}",
        lock_tables(case.pid)
    );
    peer.flows(50_000, Duration::from_secs(10)).unwrap();
    case.terminate_and_check("after the agent died").unwrap();
    peer.finish();
}

/// A connection this side had shut down (FIN sent, acknowledged): restored
/// half-closed; the peer still receives no more data from it, and what the
/// peer sends after the restore arrives, then the peer's end of stream.
#[test]
fn half_closed_connection() {
    if no_checkpoint() {
        return;
    }
    let dir = Workdir::new("tcp-half-closed");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("peer"), listener.local_addr().unwrap().to_string()).unwrap();
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "tcp_half_closed", &dir).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    case.wait_ready().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    let images = dir.join("images");
    let _kept = KeptLockGuard(case.pid);
    let run = dump(case.pid, &images, &["--tcp-established"], &dir);
    assert!(run.ok(), "dump failed:\n{}", run.describe());
    case.expect_gone().unwrap();
    let (run, pid) = restore_detached_with(&images, &["--tcp-established"], &dir, "restore");
    if pid == Some(case.pid) {
        case.adopt_restored();
    }
    assert!(run.ok(), "restore failed:\n{}", run.describe());
    conn.write_all(b"answer after restore").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    // Nothing more from the case: its side stays closed.
    let mut more = Vec::new();
    let n = conn.read_to_end(&mut more).expect("read the case's side");
    assert_eq!((n, more), (0, Vec::new()), "the case's side must stay shut");
    case.terminate_and_check("restored half-closed").unwrap();
}
