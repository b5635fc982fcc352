//! An Open MPI job checkpointed across nodes (issue 6): `jobs/heat` with 4
//! ranks on 2 simulated nodes, launched by `ckpt-coord launch` as two
//! parts: mpirun on the first node, and on the second a `ckpt-rsh --serve`
//! through which mpirun starts its daemon there (`--mca plm_rsh_agent
//! ckpt-rsh`), so that every daemon and rank lives in the job's namespaces
//! and cgroups, and all MPI traffic runs over the job's own addresses (TCP
//! between the nodes, shared memory in the part's private /dev/shm between
//! the ranks of a node).
//!
//! 1. A checkpoint with `--leave-running` mid-run: the job goes on and
//!    ends with the uninterrupted run's checksum; then that checkpoint,
//!    restarted on two other nodes, ends with it too.
//! 2. A second job, checkpointed mid-run with `--stop`; both its nodes
//!    destroyed; restarted on two other nodes; the same checksum.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt_tests::{
    checksum_line, json_of, no_checkpoint, progress_lines, wait_for, CoordCluster, JobCgroupGuard,
};

/// Sized for about 20 s over the lab's network here.
const ARGS: [&str; 6] = ["--size", "256", "--iters", "5000", "--every", "250"];

/// Launches `job` on `nodes` with addresses from `first` on; returns its
/// output file.
fn launch(cl: &CoordCluster, job: &str, nodes: (usize, usize), first: u8) -> PathBuf {
    let file = cl.dir.join(&format!("{job}.toml"));
    fs::write(&file, cl.heat_spec(Some(job), Some(nodes), first, &ARGS)).unwrap();
    let o = cl.coord(3, &["--json", "launch", file.to_str().unwrap()]);
    assert!(o.status.success(), "launch of {job} failed");
    cl.store().join(job).join("output/a.log")
}

/// Waits for the `n`-th checksum line of `out` (job `job`'s); returns it.
fn finished(out: &Path, job: &str, n: usize, within: Duration) -> String {
    let checksums = || -> Vec<String> {
        fs::read_to_string(out)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("checksum "))
            .map(str::to_string)
            .collect()
    };
    assert!(
        wait_for(within, || checksums().len() >= n),
        "{} did not finish (run {n}):\n{}",
        out.display(),
        job_state(out, job)
    );
    checksums()[n - 1].clone()
}

/// What the job's parts printed and which of its processes run, for a
/// failure's message.
fn job_state(out: &Path, job: &str) -> String {
    let mut s = String::new();
    for part in ["a", "b"] {
        let log = out.with_file_name(format!("{part}.log"));
        s += &format!(
            "--- part {part} output:\n{}\n",
            fs::read_to_string(&log).unwrap_or_default()
        );
        s += &ckpt_tests::part_state(&format!("{job}.{part}"));
    }
    s
}

/// Waits until the job's output shows `lines` progress lines.
fn mid_run(out: &Path, job: &str, lines: usize) {
    assert!(
        wait_for(Duration::from_secs(60), || progress_lines(out) >= lines),
        "the MPI job makes no progress:\n{}",
        job_state(out, job)
    );
    assert!(
        checksum_line(&fs::read_to_string(out).unwrap()).is_none(),
        "the job finished before its checkpoint: make it longer"
    );
}

#[test]
fn mpi_job_checkpointed_across_nodes_and_restarted_elsewhere() {
    if no_checkpoint() {
        return;
    }
    let t0 = Instant::now();
    let want = ckpt_tests::heat_reference(&ARGS);
    let mut cl = CoordCluster::up("mpi", 6);
    let k = cl.lab.number();
    let pid = std::process::id();
    let (j1, j2) = (format!("mpi{k}-{pid}-1"), format!("mpi{k}-{pid}-2"));
    let _cgroups: Vec<JobCgroupGuard> = [&j1, &j2]
        .iter()
        .flat_map(|j| ["a", "b"].map(|p| JobCgroupGuard(format!("{j}.{p}"))))
        .collect();

    // 1. --leave-running: the job goes on and ends right; so does a
    // restart of that checkpoint elsewhere.
    let out1 = launch(&cl, &j1, (1, 2), 0);
    mid_run(&out1, &j1, 4);
    let o = cl.coord(3, &["--json", "checkpoint", &j1, "--leave-running"]);
    assert!(o.status.success(), "checkpoint --leave-running failed");
    let report = json_of(&o);
    let cp1 = report["checkpoint"].as_str().unwrap().to_string();
    // The ranks ran on once their state was captured: their private
    // memory came from snapshots (the restart below checks it).
    let from_snapshots: u64 = report["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["snapshot_bytes"].as_u64().unwrap())
        .sum();
    assert!(
        from_snapshots > 0,
        "no part was copied from snapshots: {report}"
    );
    assert_eq!(
        finished(&out1, &j1, 1, Duration::from_secs(180)),
        want,
        "the job left running after its checkpoint computed another result"
    );
    eprintln!(
        "[{:.0?}] job 1 finished after a leave-running checkpoint",
        t0.elapsed()
    );
    let nodes = format!("{},{}", cl.lab.node(3).name(), cl.lab.node(4).name());
    let o = cl.coord(
        3,
        &[
            "--json",
            "restart",
            &j1,
            "--checkpoint",
            &cp1,
            "--nodes",
            &nodes,
        ],
    );
    assert!(
        o.status.success(),
        "restart of the leave-running checkpoint failed"
    );
    assert_eq!(
        finished(&out1, &j1, 2, Duration::from_secs(180)),
        want,
        "the job restarted from its leave-running checkpoint computed another result"
    );
    eprintln!(
        "[{:.0?}] job 1 restarted from its checkpoint finished",
        t0.elapsed()
    );

    // 2. --stop, its nodes destroyed, restarted on two others. A job of
    // its own addresses: the first may still be ending on nodes 3 and 4.
    let out2 = launch(&cl, &j2, (1, 2), 2);
    mid_run(&out2, &j2, 4);
    let o = cl.coord(3, &["--json", "checkpoint", &j2, "--stop"]);
    assert!(o.status.success(), "checkpoint --stop failed");
    let at = progress_lines(&out2);
    // The ranks of a part talked through shared memory: its segments are
    // in the part's /dev/shm, archived with it.
    let dir = PathBuf::from(json_of(&o)["dir"].as_str().unwrap());
    let archived: String = fs::read_dir(dir.join("part-a"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .map(|p| {
            let o = std::process::Command::new("tar")
                .arg("tf")
                .arg(&p)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .collect();
    assert!(
        archived.contains("vader_segment"),
        "no shared-memory segment in part a's archives:\n{archived}"
    );
    cl.agents[0].take();
    cl.agents[1].take();
    cl.lab.node(1).destroy().unwrap();
    cl.lab.node(2).destroy().unwrap();
    let nodes = format!("{},{}", cl.lab.node(5).name(), cl.lab.node(6).name());
    let o = cl.coord(3, &["--json", "restart", &j2, "--nodes", &nodes]);
    assert!(o.status.success(), "restart on nodes 5 and 6 failed");
    let r = json_of(&o);
    for (part, node) in [("a", 5), ("b", 6)] {
        assert!(
            r["parts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["part"] == part && x["node"] == cl.lab.node(node).name()),
            "part {part} not on node {node}: {r}"
        );
    }
    assert_eq!(
        finished(&out2, &j2, 1, Duration::from_secs(180)),
        want,
        "the MPI job moved to other nodes computed another result"
    );
    assert!(progress_lines(&out2) > at, "no progress after the restart");
    eprintln!("[{:.0?}] job 2 moved and finished", t0.elapsed());
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}
