//! `ckpt-coord check` and `ckpt-coord migrate` on a 4-node lab: every
//! node's agent probes its kernel; a stencil-tcp job launched on nodes 1
//! and 2 survives a post-copy move onto a node whose restores fail (its
//! final pages, held by the sources, are fetched back; it goes back and
//! runs on), is moved mid-run to nodes 3 and 4 by streaming with pre-copy
//! (its TCP connection with it), back to nodes 1 and 2 through the store,
//! whose checkpoint is checked against nodes 3 and 4, to nodes 3 and 4
//! again post-copy (restored lazily, the last pages fetched from the
//! sources, whose holds then go), and it ends with an uninterrupted run's
//! checksum.

use std::fs;
use std::time::Duration;

use ckpt_tests::{
    checksum_line, json_of, no_checkpoint, progress_lines, stencil_tcp_reference, wait_finished,
    wait_for, CoordCluster, JobCgroupGuard,
};

const ARGS: [&str; 6] = ["--size", "512", "--iters", "24000", "--every", "600"];

/// The holds of page content (post-copy) that agents keep for job `job`'s
/// parts on this machine (every lab node's agent shares /dev/shm).
fn holds_of(job: &str) -> Vec<String> {
    fs::read_dir("/dev/shm/ckpt-held")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{job}.")))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that migrate's report `m` puts parts r0 and r1 on lab nodes
/// `to`, each with pages streamed when `streamed`.
fn assert_moved(m: &serde_json::Value, cl: &CoordCluster, to: (usize, usize), streamed: bool) {
    for (part, node) in [("r0", to.0), ("r1", to.1)] {
        assert!(
            m["parts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["part"] == part
                    && x["node"] == cl.lab.node(node).name()
                    && (!streamed || x["streamed_bytes"].as_u64().unwrap_or(0) > 0)),
            "part {part} not moved to node {node}: {m}"
        );
    }
}

#[test]
fn check_and_migrate_move_a_running_job_to_other_nodes() {
    if no_checkpoint() {
        return;
    }
    let want = stencil_tcp_reference(&ARGS);
    let mut cl = CoordCluster::up("migrate", 4);
    let k = cl.lab.number();
    let job = format!("mig{k}-{}", std::process::id());
    let _cgroups = ["r0", "r1"].map(|p| JobCgroupGuard(format!("{job}.{p}")));

    let o = cl.coord(3, &["--json", "check"]);
    assert!(o.status.success(), "check of the lab's nodes failed");
    let checks = json_of(&o);
    assert_eq!(checks["ok"], true, "{checks}");
    assert_eq!(
        checks["nodes"].as_array().map(Vec::len),
        Some(4),
        "{checks}"
    );

    let spec = cl.stencil_tcp_spec(&job, (1, 2), &ARGS);
    assert!(cl
        .coord(3, &["launch", spec.to_str().unwrap()])
        .status
        .success());
    let out = cl.store().join(&job).join("output/r0.log");
    assert!(
        wait_for(Duration::from_secs(30), || progress_lines(&out) >= 3),
        "the job makes no progress"
    );
    // Another job on the same addresses is refused while this one runs.
    let twin = format!("{job}-twin");
    let twin_spec = cl.stencil_tcp_spec(&twin, (3, 4), &ARGS);
    let o = cl.coord(3, &["launch", twin_spec.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a job on taken addresses launched"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "address {} belongs to part r0 of job {job}",
            cl.lab.job_address(0)
        )),
        "{err}"
    );
    assert!(
        !cl.store().join(&twin).exists(),
        "the refused launch left its job in the store"
    );
    let to = format!("{},{}", cl.lab.node(3).name(), cl.lab.node(4).name());
    let from = format!("{},{}", cl.lab.node(1).name(), cl.lab.node(2).name());

    // Node 3 cannot restore: the post-copy move fails once the sources
    // have stopped, and the job goes back where it was (its last pages
    // fetched back from the sources' holds first), and runs on there.
    cl.restart_agent(3, &[("CKPT_FAULT_RESTORE_FAILS", "1")]);
    let before = progress_lines(&out);
    let o = cl.coord(3, &["migrate", &job, "--to", &to, "--lazy"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a move onto a failing node succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("CKPT_FAULT_RESTORE_FAILS")
            && err.contains("sent back and restored where it was"),
        "{err}"
    );
    assert!(
        wait_for(Duration::from_secs(30), || progress_lines(&out)
            > before + 1),
        "the job makes no progress after the failed move"
    );
    let spec_now = fs::read_to_string(cl.store().join(&job).join("job.toml")).unwrap();
    assert!(
        spec_now.contains(&format!("node = \"{}\"", cl.lab.node(1).name())),
        "the failed move changed the job's nodes:\n{spec_now}"
    );
    assert_eq!(holds_of(&job), Vec::<String>::new(), "holds left");
    cl.restart_agent(3, &[]);

    // Streamed, live: pre-copy while it runs, then a short freeze.
    let o = cl.coord(3, &["--json", "migrate", &job, "--to", &to]);
    assert!(o.status.success(), "migrate failed");
    let m = json_of(&o);
    assert_eq!(m["mode"], "streamed", "{m}");
    assert!(
        m["precopy"].as_array().is_some_and(|r| !r.is_empty()),
        "no pre-copy round: {m}"
    );
    assert_moved(&m, &cl, (3, 4), true);
    // Nothing of it went to the store.
    assert!(
        !fs::read_dir(cl.store().join(&job))
            .unwrap()
            .flatten()
            .any(|e| e.path().join(ckpt_proto::image::MANIFEST_FILE).exists()),
        "a streamed move wrote a checkpoint"
    );

    // Back through the store, which keeps the checkpoint it took.
    let o = cl.coord(
        3,
        &["--json", "migrate", &job, "--to", &from, "--via-store"],
    );
    assert!(o.status.success(), "migrate --via-store failed");
    let m = json_of(&o);
    assert_eq!(m["mode"], "store", "{m}");
    assert_moved(&m, &cl, (1, 2), false);
    assert!(
        checksum_line(&fs::read_to_string(&out).unwrap()).is_none(),
        "the job had finished before the moves: make it longer"
    );
    // The checkpoint the move took, checked against the nodes it left.
    let cp = m["checkpoint"]["checkpoint"].as_str().unwrap().to_string();
    let o = cl.coord(
        3,
        &[
            "--json",
            "check",
            "--checkpoint",
            &format!("{job}/{cp}"),
            "--nodes",
            &to,
        ],
    );
    assert!(o.status.success(), "check of the checkpoint failed");

    // Streamed again, post-copy: running before its memory is in, the
    // last changes fetched from the sources as it reads them.
    let o = cl.coord(3, &["--json", "migrate", &job, "--to", &to, "--lazy"]);
    assert!(o.status.success(), "migrate --lazy failed");
    let m = json_of(&o);
    assert_eq!(m["mode"], "streamed", "{m}");
    assert_eq!(m["final_level"]["held"], true, "{m}");
    assert_moved(&m, &cl, (3, 4), true);
    assert!(
        wait_for(Duration::from_secs(60), || holds_of(&job).is_empty()),
        "the sources still hold pages once the targets have them all: {:?}",
        holds_of(&job)
    );
    let text = wait_finished(
        &out,
        Duration::from_secs(60),
        "the moved job",
        &[format!("{job}.r0"), format!("{job}.r1")],
    );
    assert_eq!(
        checksum_line(&text).as_deref(),
        Some(want.as_str()),
        "the moved job computed another result"
    );
    // Later operations find it where it went.
    let spec_now = fs::read_to_string(cl.store().join(&job).join("job.toml")).unwrap();
    assert!(
        spec_now.contains(&format!("node = \"{}\"", cl.lab.node(3).name())),
        "the job's spec does not name its new nodes:\n{spec_now}"
    );
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}
