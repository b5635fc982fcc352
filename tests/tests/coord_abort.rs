//! Coordinated checkpoints that lose an agent (issue 5): a `stencil-tcp`
//! job launched on nodes 1 and 2 is checkpointed with `--stop` three times,
//! and each time node 1's agent is killed at another point: while the
//! job is frozen (prepare), while its images are written with its network
//! locked (dump), and after every part is dumped, just before the commit.
//! Each time the coordinator fails naming node 1 and aborts node 2's part,
//! no checkpoint is left, and node 1's restarted agent (as systemd would
//! restart it) thaws and unlocks its part; the job runs on with no lock,
//! freeze or session left, and ends with an uninterrupted run's checksum.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_tests::{
    checksum_line, job_frozen, json_of, log_coord, no_checkpoint, progress_lines,
    stencil_tcp_reference, tables_in_netns_of, wait_finished, wait_for, CoordCluster,
    JobCgroupGuard,
};

/// Long enough to outlive three rounds (frozen time does not count).
const ARGS: [&str; 6] = ["--size", "512", "--iters", "24000", "--every", "600"];

/// Files in the part directories of `job`'s uncommitted checkpoints.
fn pending_files(store: &Path, job: &str, part: &str) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(store.join(job)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().join(format!("part-{part}")).is_dir())
        .filter(|e| !e.path().join("manifest.img").exists())
        .flat_map(|e| {
            fs::read_dir(e.path().join(format!("part-{part}")))
                .into_iter()
                .flatten()
        })
        .flatten()
        .map(|e| e.path())
        .collect()
}

struct Round<'a> {
    what: &'a str,
    /// Fault injection for node 1's agent.
    agent_env: Vec<(&'a str, &'a str)>,
    /// Fault injection for the coordinator.
    coord_env: Vec<(&'a str, &'a str)>,
    /// The step the coordinator's error names.
    step: &'a str,
}

#[test]
fn agent_killed_during_freeze_dump_or_before_commit_leaves_the_job_running() {
    if no_checkpoint() {
        return;
    }
    let want = stencil_tcp_reference(&ARGS);
    let mut cl = CoordCluster::up("coord-abort", 2);
    let k = cl.lab.number();
    let job = format!("abort{k}-{}", std::process::id());
    let (j0, j1) = (format!("{job}.r0"), format!("{job}.r1"));
    let _cgroups = [JobCgroupGuard(j0.clone()), JobCgroupGuard(j1.clone())];
    let spec_file = cl.stencil_tcp_spec(&job, (1, 2), &ARGS);
    let o = cl.coord(2, &["--json", "launch", spec_file.to_str().unwrap()]);
    assert!(o.status.success(), "launch failed");
    let launched = json_of(&o);
    let pids: Vec<i32> = launched["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect();
    let out0 = cl.store().join(&job).join("output/r0.log");
    let store = cl.store();

    let rounds = [
        Round {
            what: "while the job is frozen",
            agent_env: vec![("CKPT_FAULT_HOLD_FROZEN_MS", "60000")],
            coord_env: vec![],
            step: "prepare failed on node",
        },
        Round {
            what: "while its images are written, its network locked",
            agent_env: vec![("CKPT_FAULT_HOLD_LOCKED_MS", "60000")],
            coord_env: vec![],
            step: "dump failed on node",
        },
        Round {
            what: "after every part is dumped, just before the commit",
            agent_env: vec![],
            coord_env: vec![("CKPT_FAULT_HOLD_COMMIT_MS", "3000")],
            step: "confirm before commit failed on node",
        },
    ];
    for r in &rounds {
        eprintln!("--- node 1's agent killed {}", r.what);
        assert!(
            wait_for(Duration::from_secs(20), || progress_lines(&out0) >= 1),
            "the job makes no progress"
        );
        cl.restart_agent(1, &r.agent_env);
        let args = ["checkpoint", job.as_str(), "--stop"];
        let coord = cl.coord_spawn(2, &args, &r.coord_env);
        let in_window = match r.step {
            s if s.starts_with("prepare") => wait_for(Duration::from_secs(20), || job_frozen(&j0)),
            s if s.starts_with("dump") => wait_for(Duration::from_secs(20), || {
                pending_files(&store, &job, "r0")
                    .iter()
                    .any(|p| p.to_string_lossy().contains("pages"))
            }),
            _ => wait_for(Duration::from_secs(20), || {
                ["r0", "r1"].iter().all(|p| {
                    pending_files(&store, &job, p)
                        .iter()
                        .any(|f| f.ends_with("inventory.img"))
                })
            }),
        };
        assert!(
            in_window,
            "the checkpoint never reached the point {}",
            r.what
        );
        cl.agents[0].take().unwrap().crash();
        let o = coord.wait_with_output().unwrap();
        log_coord(&args, &o);
        assert_eq!(o.status.code(), Some(1), "the checkpoint did not fail");
        let err = String::from_utf8_lossy(&o.stderr);
        let node1 = cl.lab.node(1).name();
        assert!(
            err.contains(&format!("{} {node1}", r.step)),
            "the error does not say '{} {node1}': {err}",
            r.step
        );
        assert!(
            err.contains("aborted") && err.contains("nothing was committed"),
            "the error does not say what was aborted: {err}"
        );

        // As systemd restarts it: the new agent undoes its predecessor's
        // freeze and lock.
        cl.restart_agent(1, &[]);
        for (j, pid) in [(&j0, pids[0]), (&j1, pids[1])] {
            assert!(
                wait_for(Duration::from_secs(10), || !job_frozen(j)),
                "{j} left frozen"
            );
            let tables = tables_in_netns_of(pid);
            assert!(
                !tables.iter().any(|t| t.contains("ckpt_")),
                "a network lock is left in {j}'s namespace: {tables:?}"
            );
        }
        let sessions: Vec<_> = fs::read_dir(cl.state_dir(1).join("sessions"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(sessions.is_empty(), "session records left: {sessions:?}");
        let o = cl.coord(2, &["--json", "status", &job]);
        assert!(o.status.success());
        let st = json_of(&o);
        assert_eq!(
            st["checkpoints"].as_array().map(Vec::len),
            Some(0),
            "a checkpoint is left: {st}"
        );
        assert!(
            fs::read_dir(store.join(&job))
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("20")),
            "an uncommitted checkpoint directory is left"
        );
        for pid in &pids {
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "part pid {pid} is gone"
            );
        }
        let before = progress_lines(&out0);
        assert!(
            wait_for(Duration::from_secs(20), || progress_lines(&out0) > before),
            "the job does not progress after the aborted checkpoint"
        );
    }

    let text = wait_finished(
        &out0,
        Duration::from_secs(90),
        "the job",
        &[format!("{job}.r0"), format!("{job}.r1")],
    );
    assert_eq!(
        checksum_line(&text).as_deref(),
        Some(want.as_str()),
        "the job computed another result after three aborted checkpoints:\n{text}"
    );
    // Its processes are gone, and their namespaces with them: no job veth
    // is left on the nodes.
    for pid in &pids {
        assert!(
            wait_for(Duration::from_secs(10), || !Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()),
            "part pid {pid} outlived the job's end"
        );
    }
    for i in 1..=2 {
        let node = cl.lab.node(i);
        let job_veths = || {
            let out = std::process::Command::new("ip")
                .args([
                    "-n",
                    node.netns(),
                    "-o",
                    "link",
                    "show",
                    "master",
                    node.bridge(),
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("ckj-"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert!(
            wait_for(Duration::from_secs(5), || job_veths().is_empty()),
            "a job veth is left on node {i}: {:?}",
            job_veths()
        );
    }
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}
