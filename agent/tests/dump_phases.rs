//! The dump in phases, as a two-phase checkpoint drives it: prepare stops
//! the tree, dump writes and commits the images, finish resumes or stops
//! it; a session dropped before finish aborts and leaves the tree running
//! as before with no checkpoint. Needs root.

use std::path::Path;
use std::process::{Command, Stdio};

use ckpt_agent::dump::{DumpRequest, DumpSession};
use ckpt_agent::progress::Quiet;

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn request(pid: u32, images: &Path) -> DumpRequest {
    DumpRequest {
        pid: pid as i32,
        images: images.to_path_buf(),
        leave_running: true,
        snapshot: false,
        tasks_in_parallel: true,
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
    }
}

#[test]
fn abort_after_dump_leaves_the_tree_running_and_no_checkpoint() {
    // Only stdio: descriptors the test runner leaks (a jobserver pipe)
    // would make a tree the dump refuses.
    let mut child = Command::new("bash")
        .args([
            "-c",
            r#"for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-"; done; exec sleep 60"#,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never became sleep"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let dir = std::env::temp_dir().join(format!("ckpt-phases-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let mut session = DumpSession::prepare(&request(pid, &dir.join("a"))).unwrap();
    assert_ne!(status_field(pid, "TracerPid:"), "0", "seized");
    session.dump(&Quiet).unwrap();
    assert!(dir.join("a/inventory.img").exists());
    drop(session);
    assert!(
        !dir.join("a/inventory.img").exists(),
        "an aborted checkpoint must not look complete"
    );
    assert_eq!(status_field(pid, "TracerPid:"), "0", "released");
    let st = status_field(pid, "State:");
    assert!(
        !st.starts_with('t') && !st.starts_with('T'),
        "running as before, not {st}"
    );

    // The whole way through, resuming.
    let mut session = DumpSession::prepare(&request(pid, &dir.join("b"))).unwrap();
    session.dump(&Quiet).unwrap();
    let report = session.finish(false).unwrap();
    assert_eq!(report.pid, pid as i32);
    assert!(dir.join("b/inventory.img").exists());
    assert_eq!(status_field(pid, "TracerPid:"), "0");
    assert!(child.try_wait().unwrap().is_none(), "still running");

    // Finish without a dump is refused, and aborts.
    let session = DumpSession::prepare(&request(pid, &dir.join("c"))).unwrap();
    assert!(session.finish(true).is_err());
    assert!(child.try_wait().unwrap().is_none(), "not killed");

    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
