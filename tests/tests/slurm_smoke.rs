//! A real Slurm on a lab of 3 nodes (tests/src/slurm.rs): a 2-node job in
//! partition `low` is preempted by a 2-node job in partition `high` on the
//! same nodes; its batch script gets USR1 (`--signal=B:USR1@60` with
//! `preempt_send_user_signal`), requeues itself, is released at once and
//! runs again once the high job is done, with SLURM_RESTART_COUNT=1.
//! No checkpoint here: this checks the test infrastructure issue 6's
//! preemption test stands on. Needs root and the Slurm packages
//! (scripts/install-deps.sh).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_lab::Lab;
use ckpt_tests::slurm::Slurm;
use ckpt_tests::{wait_for, Workdir};

/// The low job: records where and how often it ran, then sleeps; on USR1
/// it says so, stops its sleep (a process left behind would escape
/// proctrack/linuxproc) and requeues itself (a handler that just exits
/// would make the job COMPLETED).
const LOW_SCRIPT: &str = r#"#!/bin/bash
#SBATCH -N 2 -p low
out="$SMOKE_OUT"
echo "start host=$(hostname) nodes=$SLURM_JOB_NODELIST restart=${SLURM_RESTART_COUNT:-0}" >> "$out"
echo "stdout of run restart=${SLURM_RESTART_COUNT:-0}"
trap 'echo "got USR1" >> "$out"; kill $sleeper; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
# A trap runs between commands only: wait, unlike a foreground sleep, returns on a signal.
sleep 300 &
sleeper=$!
wait $sleeper
"#;

const HIGH_SCRIPT: &str = r#"#!/bin/bash
echo "high host=$(hostname) nodes=$SLURM_JOB_NODELIST" >> "$SMOKE_OUT"
sleep 5
"#;

fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Prints how long a phase took and starts the next one.
fn phase(name: &str, t: &mut Instant) {
    eprintln!("slurm_smoke: {name}: {:.1} s", t.elapsed().as_secs_f64());
    *t = Instant::now();
}

#[test]
fn low_job_preempted_requeued_and_rerun() {
    let start = Instant::now();
    let mut t = Instant::now();
    // Dropped in reverse: Slurm first, then the work dir, then the lab.
    let lab = Lab::up(3).expect("bring up a lab of 3 nodes");
    let dir = Workdir::for_job("slurm_smoke");
    let slurm = Slurm::up(&lab, &dir.join("slurm"));
    phase("lab and Slurm up", &mut t);

    let low_out = lab.shared_dir().join("low.out");
    let high_out = lab.shared_dir().join("high.out");
    let low_script = dir.join("low.sh");
    let high_script = dir.join("high.sh");
    write_script(&low_script, LOW_SCRIPT);
    write_script(&high_script, HIGH_SCRIPT);
    let low_env = low_out.to_string_lossy().into_owned();
    let high_env = high_out.to_string_lossy().into_owned();

    // (1) The low job runs on 2 nodes.
    let low = slurm.sbatch(
        &["--signal=B:USR1@60"],
        &low_script,
        &[("SMOKE_OUT", &low_env)],
    );
    slurm
        .wait_state(low, &["RUNNING"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}{}", slurm.logs()));
    let nodes = slurm.job_nodes(low);
    assert_eq!(nodes.len(), 2, "low job {low} on {nodes:?}");
    assert!(
        wait_for(Duration::from_secs(30), || read(&low_out)
            .contains("restart=0")),
        "the low job's script did not start: {:?}",
        read(&low_out)
    );
    let first = read(&low_out);
    assert!(
        first.contains(&format!("start host={} ", nodes[0])),
        "batch script not on the job's first node {}: {first:?}",
        nodes[0]
    );
    phase("low job running", &mut t);

    // (2) A high job on the same two nodes preempts it.
    let nodelist = format!("--nodelist={}", nodes.join(","));
    let high = slurm.sbatch(
        &["-N", "2", "-p", "high", &nodelist],
        &high_script,
        &[("SMOKE_OUT", &high_env)],
    );
    assert!(
        wait_for(Duration::from_secs(60), || read(&low_out)
            .contains("got USR1")),
        "the low job's script never got USR1: {:?}\n{}{}",
        read(&low_out),
        slurm.job_info(low),
        slurm.logs()
    );
    phase("preemption signal delivered", &mut t);
    slurm
        .wait_state(low, &["PENDING"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("low job not requeued: {e}{}", slurm.logs()));
    phase("low job requeued", &mut t);
    slurm
        .wait_state(
            high,
            &["RUNNING", "COMPLETING", "COMPLETED"],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("high job did not run: {e}{}", slurm.logs()));
    let mut high_nodes = slurm.job_nodes(high);
    high_nodes.sort();
    let mut low_nodes = nodes.clone();
    low_nodes.sort();
    assert_eq!(high_nodes, low_nodes, "high job not on the low job's nodes");
    phase("high job running", &mut t);

    // (3) Released at once, the low job runs again after the high one.
    slurm.release_now(low);
    slurm
        .wait_state(high, &["COMPLETED"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("high job did not complete: {e}{}", slurm.logs()));
    phase("high job completed", &mut t);
    slurm
        .wait_state(low, &["RUNNING"], Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("low job did not run again: {e}{}", slurm.logs()));
    assert!(
        wait_for(Duration::from_secs(30), || read(&low_out)
            .contains("restart=1")),
        "the rerun did not see SLURM_RESTART_COUNT=1: {:?}",
        read(&low_out)
    );
    phase("low job running again", &mut t);
    let text = read(&low_out);
    eprintln!(
        "low job's file:\n{text}high job's file:\n{}low job's stdout:\n{}",
        read(&high_out),
        read(&slurm.dir().join(format!("jobs/slurm-{low}.out")))
    );
    let starts: Vec<&str> = text.lines().filter(|l| l.starts_with("start ")).collect();
    assert_eq!(starts.len(), 2, "two runs expected: {text:?}");
    assert!(starts[1].contains("restart=1"), "{text:?}");
    assert_eq!(slurm.job_nodes(low).len(), 2);

    slurm.cancel(low);
    slurm
        .wait_state(low, &["CANCELLED"], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    slurm.shutdown().expect("Slurm shuts down cleanly");
    phase("shut down", &mut t);
    lab.down().expect("lab down");
    eprintln!("slurm_smoke: total {:.1} s", start.elapsed().as_secs_f64());
}
