//! ckpt-coord on a cluster of this machine alone (a configuration without
//! nodes): its in-process agent launches a job, checkpoints it (leaving it
//! running, then stopping it) and restarts it, and the job ends with an
//! uninterrupted run's checksum. No `ckpt-agent serve`, no key.

use std::fs;
use std::process::Command;
use std::time::Duration;

use ckpt_tests::{
    checksum_line, coord_binary, job_binary, log_coord, no_checkpoint, progress_lines,
    wait_finished, wait_for, JobCgroupGuard, Workdir,
};

const ARGS: [&str; 6] = ["--size", "256", "--iters", "20000", "--every", "1000"];

#[test]
fn local_only_cluster_launches_checkpoints_and_restarts_with_an_in_process_agent() {
    if no_checkpoint() {
        return;
    }
    let reference = Command::new(job_binary("stencil"))
        .args(ARGS)
        .output()
        .unwrap();
    let want = checksum_line(&String::from_utf8_lossy(&reference.stdout)).unwrap();
    let dir = Workdir::for_job("coord-local");
    let store = dir.join("store");
    let config = dir.join("cluster.toml");
    fs::write(&config, format!("store = \"{}\"\n", store.display())).unwrap();
    // Not under /tmp: the job gets a private one.
    let bin = dir.join("stencil");
    fs::copy(job_binary("stencil"), &bin).unwrap();
    let job = format!("local-{}", std::process::id());
    let _cgroup = JobCgroupGuard(format!("{job}.main"));
    let spec = dir.join("job.toml");
    fs::write(
        &spec,
        format!(
            "job = \"{job}\"\n[[part]]\nname = \"main\"\ncommand = \"{}\"\nargs = {:?}\n",
            bin.display(),
            ARGS
        ),
    )
    .unwrap();
    // The in-process agent's records go to the test's directory, not the
    // machine's /var/lib/ckpt.
    let state = dir.join("state");
    let coord = |args: &[&str]| {
        let o = Command::new(coord_binary())
            .env("CKPT_STATE_DIR", &state)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        log_coord(args, &o);
        o
    };
    let o = coord(&["status"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("local-only"),
        "the configuration is not local-only"
    );
    assert!(coord(&["launch", spec.to_str().unwrap()]).status.success());
    let out = store.join(&job).join("output/main.log");
    assert!(
        wait_for(Duration::from_secs(30), || progress_lines(&out) >= 2),
        "the job makes no progress"
    );
    assert!(
        coord(&["checkpoint", &job, "--leave-running", "--compress", "zstd"])
            .status
            .success()
    );
    let before = progress_lines(&out);
    assert!(
        wait_for(Duration::from_secs(30), || progress_lines(&out) > before),
        "the job stopped after a checkpoint that leaves it running"
    );
    // The restart reads a compressed checkpoint.
    assert!(coord(&["checkpoint", &job, "--stop", "--compress", "lz4"])
        .status
        .success());
    assert!(
        checksum_line(&fs::read_to_string(&out).unwrap()).is_none(),
        "the job had finished before its checkpoint: make it longer"
    );
    assert!(coord(&["restart", &job]).status.success());
    let text = wait_finished(
        &out,
        Duration::from_secs(120),
        "the restarted job",
        &[format!("{job}.main")],
    );
    assert_eq!(
        checksum_line(&text),
        Some(want),
        "the restarted job computed another result"
    );
    assert!(coord(&["wait", &job, "--timeout", "30"]).status.success());
    // The next coordinator's agent removes what the ended job left.
    assert!(coord(&["status"]).status.success());
    assert!(coord(&["--json", "check"]).status.success());
    let left: Vec<_> = fs::read_dir(state.join("jobs"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "records of the ended job left: {left:?}");
}
