//! The demo's flow as a test (issue 5): a simulated cluster of 4 nodes,
//! each with its agent; `ckpt-coord launch` starts `stencil-tcp`, its two
//! ranks on nodes 1 and 2 swapping halo rows over TCP on their own
//! addresses; `ckpt-coord checkpoint --stop` mid-run; nodes 1 and 2
//! destroyed; `ckpt-coord restart` on nodes 3 and 4; the final checksum
//! equals an uninterrupted run's.

use std::fs;
use std::time::Duration;

use ckpt_tests::{
    checksum_line, json_of, no_checkpoint, progress_lines, stencil_tcp_reference, wait_finished,
    wait_for, CoordCluster, JobCgroupGuard,
};

/// Sized to run a few seconds here: long enough to be caught mid-run.
const ARGS: [&str; 6] = ["--size", "512", "--iters", "12000", "--every", "600"];

#[test]
fn job_moves_to_other_nodes_with_its_tcp_connection_and_same_result() {
    if no_checkpoint() {
        return;
    }
    let want = stencil_tcp_reference(&ARGS);
    let mut cl = CoordCluster::up("demo", 4);
    let k = cl.lab.number();
    let job = format!("demo{k}-{}", std::process::id());
    let _cgroups = [
        JobCgroupGuard(format!("{job}.r0")),
        JobCgroupGuard(format!("{job}.r1")),
    ];
    let spec_file = cl.stencil_tcp_spec(&job, (1, 2), &ARGS);

    let o = cl.coord(3, &["--json", "launch", spec_file.to_str().unwrap()]);
    assert!(o.status.success(), "launch failed");
    let launched = json_of(&o);
    let out0 = cl.store().join(&job).join("output/r0.log");
    let out1 = cl.store().join(&job).join("output/r1.log");
    assert_eq!(
        launched["parts"][0]["output"].as_str(),
        out0.to_str(),
        "{launched}"
    );

    // Mid-run: a few progress lines out, most of the work still to do.
    assert!(
        wait_for(Duration::from_secs(30), || progress_lines(&out0) >= 3),
        "the job made no progress: {}",
        fs::read_to_string(&out0).unwrap_or_default()
    );
    let o = cl.coord(3, &["--json", "checkpoint", &job, "--stop"]);
    assert!(o.status.success(), "checkpoint --stop failed");
    let at = progress_lines(&out0);
    assert!(
        checksum_line(&fs::read_to_string(&out0).unwrap()).is_none(),
        "the job had finished before its checkpoint: make it longer"
    );
    for p in launched["parts"].as_array().unwrap() {
        let pid = p["pid"].as_i64().unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || !std::path::Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()),
            "part {} (pid {pid}) still runs after checkpoint --stop",
            p["part"]
        );
    }

    // Nodes 1 and 2 go away, agents first.
    cl.agents[0].take();
    cl.agents[1].take();
    cl.lab.node(1).destroy().unwrap();
    cl.lab.node(2).destroy().unwrap();

    let nodes = format!("{},{}", cl.lab.node(3).name(), cl.lab.node(4).name());
    let o = cl.coord(3, &["--json", "restart", &job, "--nodes", &nodes]);
    assert!(o.status.success(), "restart on nodes 3 and 4 failed");
    let restarted = json_of(&o);
    for (part, node) in [("r0", 3), ("r1", 4)] {
        assert!(
            restarted["parts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["part"] == part && x["node"] == cl.lab.node(node).name()),
            "part {part} not restored on node {node}: {restarted}"
        );
    }

    let text0 = wait_finished(
        &out0,
        Duration::from_secs(60),
        "the restarted job",
        &[format!("{job}.r0"), format!("{job}.r1")],
    );
    assert_eq!(
        checksum_line(&text0).as_deref(),
        Some(want.as_str()),
        "the moved job computed another result:\n{text0}"
    );
    assert!(
        progress_lines(&out0) > at,
        "no progress after the restart:\n{text0}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || fs::read_to_string(&out1)
            .is_ok_and(|s| s.contains("rank 1 done"))),
        "rank 1 did not finish: {}",
        fs::read_to_string(&out1).unwrap_or_default()
    );
    // The job has ended: the coordinator can tell, and the agents remove
    // what they made for it.
    let o = cl.coord(3, &["wait", &job, "--timeout", "30"]);
    assert!(o.status.success(), "wait for the ended job failed");
    for part in ["r0", "r1"] {
        let gone = || {
            ["/sys/fs/cgroup/unified/ckpt", "/sys/fs/cgroup/freezer/ckpt"]
                .iter()
                .all(|root| {
                    !std::path::Path::new(root)
                        .join(format!("{job}.{part}"))
                        .exists()
                })
        };
        assert!(
            wait_for(Duration::from_secs(10), gone),
            "the cgroup of part {part} outlived the job"
        );
    }
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}
