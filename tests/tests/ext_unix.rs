//! `--ext-unix-sk`: a unix socket connected to a server outside the tree is
//! refused without the flag, and reconnected by the server's name with it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

use ckpt_tests::{dump, no_checkpoint, pid_exists, restore_detached_with, CaseProcess, Workdir};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");

fn recv(server: &UnixDatagram) -> String {
    let mut buf = [0u8; 64];
    match server.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => format!("<nothing: {e}>"),
    }
}

#[test]
fn reconnects_by_name() {
    let name = format!("zdtm-ext-server-{}", std::process::id());
    let server =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let dir = Workdir::new("ext-unix");
    let mut case = CaseProcess::spawn(Path::new(CASE_BIN), "ext_unix_client", &dir).unwrap();
    case.wait_ready().unwrap();
    assert_eq!(recv(&server), "before");
    if no_checkpoint() {
        case.terminate_and_check("no checkpoint").unwrap();
        assert_eq!(recv(&server), "after");
        return;
    }
    let images = dir.join("images");
    let refused = dump(case.pid, &images, &[], &dir);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--ext-unix-sk"),
        "{}",
        refused.describe()
    );
    assert!(
        pid_exists(case.pid),
        "a refused dump leaves the process running"
    );

    let run = dump(case.pid, &images, &["--ext-unix-sk"], &dir);
    assert!(run.ok(), "{}", run.describe());
    case.expect_gone().unwrap();

    let (no_flag, _) = restore_detached_with(&images, &[], &dir, "restore-without-flag");
    assert_eq!(no_flag.code, Some(1), "{}", no_flag.describe());
    assert!(
        no_flag.stderr.contains("--ext-unix-sk"),
        "{}",
        no_flag.describe()
    );
    assert!(
        !pid_exists(case.pid),
        "a refused restore leaves nothing behind"
    );

    let (ok, pid) = restore_detached_with(&images, &["--ext-unix-sk"], &dir, "restore");
    if pid == Some(case.pid) {
        case.adopt_restored();
    }
    assert!(ok.ok(), "{}", ok.describe());
    case.terminate_and_check("restored, reconnected").unwrap();
    assert_eq!(recv(&server), "after");
}
