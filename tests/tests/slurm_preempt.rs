//! Slurm preemption without lost work (issue 6): a real Slurm (slurmctld,
//! one slurmd per simulated node, munge) over a 4-node lab whose nodes run
//! ckpt agents. A low-priority `jobs/heat` MPI job, submitted with
//! `jobs/slurm/ckpt-job.sbatch`, runs on two nodes; a high-priority job
//! wants exactly those nodes; Slurm signals the low job's batch script,
//! which checkpoints the job with `ckpt-coord checkpoint --stop` and
//! requeues it; the requeued job starts on the two other nodes, where the
//! script restarts it from its checkpoint. It ends with the uninterrupted
//! run's checksum, every iteration computed once: nothing was redone.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_tests::slurm::Slurm;
use ckpt_tests::{checksum_line, no_checkpoint, progress_lines, wait_for, CoordCluster};

/// Long enough to be preempted mid-run over the lab's network.
const ARGS: [&str; 6] = ["--size", "256", "--iters", "8000", "--every", "250"];

/// The iteration numbers of the job's progress lines, in order.
fn iterations(out: &Path) -> Vec<u64> {
    fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("iter "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn preempted_heat_job_is_checkpointed_requeued_and_resumed_elsewhere() {
    if no_checkpoint() {
        return;
    }
    let t0 = Instant::now();
    let stamp = |what: &str| eprintln!("[{:>5.1}s] {what}", t0.elapsed().as_secs_f64());
    let want = ckpt_tests::heat_reference(&ARGS);
    let cl = CoordCluster::up("slurm", 4);
    // Without job id nor nodes: Slurm decides those.
    let spec = cl.dir.join("heat.toml");
    fs::write(&spec, cl.heat_spec(None, None, 0, &ARGS)).unwrap();
    let slurm = Slurm::up(&cl.lab, &cl.dir.join("slurm"));
    stamp("slurm up");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs/slurm/ckpt-job.sbatch");
    let coord = ckpt_tests::coord_binary();
    let env = [
        ("CKPT_COORD", coord.to_str().unwrap()),
        ("CKPT_CLUSTER", cl.config.to_str().unwrap()),
        ("CKPT_SPEC", spec.to_str().unwrap()),
    ];
    let low = slurm.sbatch(
        &[
            "-p",
            "low",
            "-N",
            "2",
            "--signal=B:USR1@60",
            "--requeue",
            // Both runs' output in one file.
            "--open-mode=append",
            "--export=ALL",
        ],
        &script,
        &env,
    );
    let _cgroups = ["a", "b"].map(|p| ckpt_tests::JobCgroupGuard(format!("slurm-{low}.{p}")));
    slurm
        .wait_state(low, &["RUNNING"], Duration::from_secs(90))
        .unwrap();
    let first_nodes = slurm.job_nodes(low);
    stamp(&format!("low job {low} runs on {first_nodes:?}"));
    let out = cl.store().join(format!("slurm-{low}")).join("output/a.log");
    assert!(
        wait_for(Duration::from_secs(90), || progress_lines(&out) >= 4),
        "the heat job makes no progress:\n{}\n{}",
        fs::read_to_string(&out).unwrap_or_default(),
        slurm.logs()
    );
    stamp("heat job mid-run");

    // A high-priority job that wants exactly the low job's nodes.
    let high_script = cl.dir.join("high.sh");
    fs::write(&high_script, "#!/bin/bash\nsleep 5\n").unwrap();
    let nodelist = first_nodes.join(",");
    let high = slurm.sbatch(
        &["-p", "high", "-N", "2", &format!("--nodelist={nodelist}")],
        &high_script,
        &[],
    );
    stamp(&format!("high job {high} submitted on {nodelist}"));
    // The low job's script checkpoints and requeues it.
    let st = slurm
        .wait_state(
            low,
            &["PENDING", "REQUEUED", "REQUEUE_HOLD"],
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", slurm.logs()));
    stamp(&format!("low job {st}"));
    let at = iterations(&out);
    assert!(
        checksum_line(&fs::read_to_string(&out).unwrap()).is_none(),
        "the heat job finished before it was preempted: make it longer"
    );
    slurm.release_now(low);
    slurm
        .wait_state(low, &["RUNNING", "COMPLETED"], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", slurm.logs()));
    let second_nodes = slurm.job_nodes(low);
    stamp(&format!("low job runs again on {second_nodes:?}"));
    assert!(
        second_nodes.iter().all(|n| !first_nodes.contains(n)),
        "the requeued job should run on other nodes: {first_nodes:?} then {second_nodes:?}"
    );
    assert!(
        wait_for(Duration::from_secs(240), || fs::read_to_string(&out)
            .ok()
            .and_then(|s| checksum_line(&s))
            .is_some()),
        "the resumed heat job did not finish:\n{}\n{}",
        fs::read_to_string(&out).unwrap_or_default(),
        slurm.logs()
    );
    stamp("heat job finished");
    let text = fs::read_to_string(&out).unwrap();
    assert_eq!(
        checksum_line(&text).as_deref(),
        Some(want.as_str()),
        "the preempted job computed another result:\n{text}"
    );
    // Resumed, not restarted: every progress line once, in order, the
    // ones after the preemption picking up where it stopped.
    let all = iterations(&out);
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "iterations were redone after the restart: {all:?} (at preemption: {at:?})"
    );
    assert!(all.len() > at.len(), "no progress after the restart");
    slurm
        .wait_state(low, &["COMPLETED"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", slurm.logs()));
    stamp("low job COMPLETED");
    eprintln!(
        "batch script output:\n{}",
        fs::read_to_string(slurm.dir().join(format!("jobs/slurm-{low}.out"))).unwrap_or_default()
    );
    slurm.shutdown().unwrap();
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}
