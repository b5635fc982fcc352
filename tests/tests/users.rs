//! Users other than root (issue 5): a user who cannot read the cluster key
//! drives ckpt-coord through the agent of their machine (its user socket),
//! and the agents act for that user alone. The user's job runs under the
//! user's ids; they checkpoint it, and restart it on other nodes, from
//! images agents wrote. A user may not restore images they could have
//! changed, nor checkpoint a process that gained privileges.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use ckpt_tests::{
    checksum_line, json_of, no_checkpoint, progress_lines, stencil_tcp_reference, test_user,
    wait_finished, wait_for, CoordCluster, JobCgroupGuard,
};

/// Sized to run a few seconds here: long enough to be caught mid-run.
const ARGS: [&str; 6] = ["--size", "512", "--iters", "12000", "--every", "600"];

/// The four uids (real, effective, saved, fs) of process `pid`.
fn uids(pid: i64) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A cluster whose store users may write in, as an admin sets one up
/// (like /tmp: everyone makes their own job directories there).
fn cluster_for_users(name: &str, nodes: usize) -> CoordCluster {
    let cl = CoordCluster::up(name, nodes);
    fs::create_dir_all(cl.store()).unwrap();
    fs::set_permissions(cl.store(), fs::Permissions::from_mode(0o1777)).unwrap();
    cl
}

fn pids_of(report: &serde_json::Value) -> Vec<i64> {
    report["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap())
        .collect()
}

#[test]
fn a_user_launches_checkpoints_and_restarts_their_job_on_other_nodes() {
    if no_checkpoint() {
        return;
    }
    let user = test_user();
    let want = stencil_tcp_reference(&ARGS);
    let mut cl = cluster_for_users("users", 4);
    let k = cl.lab.number();
    let job = format!("user{k}-{}", std::process::id());
    let _cgroups = [
        JobCgroupGuard(format!("{job}.r0")),
        JobCgroupGuard(format!("{job}.r1")),
    ];
    let spec = cl.stencil_tcp_spec(&job, (1, 2), &ARGS);
    let spec = spec.to_str().unwrap();

    let o = cl.coord_as(user, 3, &["--json", "launch", spec]);
    assert!(o.status.success(), "the user's launch failed");
    for pid in pids_of(&json_of(&o)) {
        assert_eq!(
            uids(pid),
            [user.0; 4],
            "part pid {pid} runs as another user"
        );
    }
    let out0 = cl.store().join(&job).join("output/r0.log");
    assert!(
        wait_for(Duration::from_secs(30), || progress_lines(&out0) >= 3),
        "the job made no progress: {}",
        fs::read_to_string(&out0).unwrap_or_default()
    );
    let o = cl.coord_as(user, 3, &["--json", "checkpoint", &job, "--stop"]);
    assert!(o.status.success(), "the user's checkpoint failed");
    let at = progress_lines(&out0);
    let cp = json_of(&o)["checkpoint"].as_str().unwrap().to_string();

    // Root sees a checkpoint signed with the cluster key, owned by the user.
    let o = cl.coord(3, &["--json", "status", &job, "--full"]);
    assert!(o.status.success(), "root's status failed");
    let st = json_of(&o);
    let c = &st["checkpoints"][0];
    assert_eq!(c["id"], cp.as_str(), "{st}");
    assert_eq!(c["owner_uid"], user.0, "{st}");
    assert_eq!(c["verified"], true, "{st}");
    assert!(
        c["state"].as_str().unwrap().contains("signature valid"),
        "{st}"
    );

    cl.agents[0].take();
    cl.agents[1].take();
    cl.lab.node(1).destroy().unwrap();
    cl.lab.node(2).destroy().unwrap();
    let nodes = format!("{},{}", cl.lab.node(3).name(), cl.lab.node(4).name());
    let o = cl.coord_as(user, 3, &["--json", "restart", &job, "--nodes", &nodes]);
    assert!(o.status.success(), "the user's restart failed");
    for pid in pids_of(&json_of(&o)) {
        assert_eq!(
            uids(pid),
            [user.0; 4],
            "restored pid {pid} runs as another user"
        );
    }
    let text = wait_finished(
        &out0,
        Duration::from_secs(60),
        "the restarted job",
        &[format!("{job}.r0"), format!("{job}.r1")],
    );
    assert_eq!(
        checksum_line(&text).as_deref(),
        Some(want.as_str()),
        "{text}"
    );
    assert!(
        progress_lines(&out0) > at,
        "no progress after the restart:\n{text}"
    );
    let o = cl.coord_as(user, 3, &["wait", &job, "--timeout", "30"]);
    assert!(o.status.success(), "the user's wait failed");
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}

/// Runs `sh -c script` as `user`.
fn sh_as(user: (u32, u32), script: &str) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--init-groups"])
        .arg(format!("--reuid={}", user.0))
        .arg(format!("--regid={}", user.1))
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap()
}

#[test]
fn a_user_restores_only_images_agents_wrote_and_checkpoints_only_their_own() {
    if no_checkpoint() {
        return;
    }
    let user = test_user();
    let cl = cluster_for_users("users-refused", 2);
    let k = cl.lab.number();
    let job = format!("userr{k}-{}", std::process::id());
    let _cgroups = [
        JobCgroupGuard(format!("{job}.r0")),
        JobCgroupGuard(format!("{job}.r1")),
    ];
    let long = ["--size", "512", "--iters", "1000000", "--every", "600"];
    let spec = cl.stencil_tcp_spec(&job, (1, 2), &long);
    let o = cl.coord_as(user, 1, &["--json", "launch", spec.to_str().unwrap()]);
    assert!(o.status.success(), "the user's launch failed");
    let pids = pids_of(&json_of(&o));
    let o = cl.coord_as(user, 1, &["--json", "checkpoint", &job, "--stop"]);
    assert!(o.status.success(), "the user's checkpoint failed");
    let dir = Path::new(json_of(&o)["dir"].as_str().unwrap()).to_path_buf();
    for pid in &pids {
        assert!(
            wait_for(Duration::from_secs(5), || !Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()),
            "pid {pid} runs on after checkpoint --stop"
        );
    }

    // The user swaps a part's images for a copy of their own: the same
    // bytes (the manifest and its signature still hold), but files the
    // user could have changed.
    let part = dir.join("part-r0");
    let o = sh_as(
        user,
        &format!(
            "cp -r {p} {p}.copy && mv {p} {p}.orig && mv {p}.copy {p}",
            p = part.display()
        ),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cl.coord_as(user, 1, &["restart", &job]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a restore of user-written images was allowed"
    );
    assert!(
        err.contains(&format!("belongs to uid {}", user.0)) && err.contains("only root may write"),
        "the refusal does not say why: {err}"
    );
    for part in ["r0", "r1"] {
        let cg = Path::new("/sys/fs/cgroup/unified/ckpt").join(format!("{job}.{part}"));
        let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        assert!(
            procs.trim().is_empty(),
            "part {part} left processes: {procs}"
        );
    }
    // Put back, the images restore (for root: who restores does not
    // change what agents wrote).
    let o = sh_as(
        user,
        &format!("rm -r {p} && mv {p}.orig {p}", p = part.display()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cl.coord(1, &["--json", "restart", &job]);
    assert!(
        o.status.success(),
        "root's restart of the user's job failed"
    );
    for pid in pids_of(&json_of(&o)) {
        assert_eq!(
            uids(pid),
            [user.0; 4],
            "restored pid {pid} runs as another user"
        );
    }
    let o = cl.coord(1, &["kill", &job]);
    assert!(o.status.success(), "root's kill of the user's job failed");

    // A job of the user's that runs a set-user-ID program: its memory is
    // not the user's to read, and its checkpoint is refused; the job runs on.
    let suid = cl.dir.join("sleep-suid");
    fs::copy("/bin/sleep", &suid).unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
    let job2 = format!("{job}-suid");
    let _cg2 = JobCgroupGuard(format!("{job2}.s"));
    let spec2 = cl.dir.join("suid.toml");
    fs::write(
        &spec2,
        format!(
            "job = \"{job2}\"\n[[part]]\nname = \"s\"\nnode = \"{}\"\ncommand = \"{}\"\nargs = [\"600\"]\n",
            cl.lab.node(1).name(),
            suid.display()
        ),
    )
    .unwrap();
    let o = cl.coord_as(user, 1, &["--json", "launch", spec2.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "the user's launch of a set-user-ID program failed"
    );
    let pid = pids_of(&json_of(&o))[0];
    assert_eq!(
        uids(pid)[1],
        0,
        "the set-user-ID program did not gain uid 0"
    );
    let o = cl.coord_as(user, 1, &["checkpoint", &job2]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a user checkpointed a privileged process"
    );
    assert!(
        err.contains("it ran with uid 0") && err.contains(&pid.to_string()),
        "the refusal does not name the process and why: {err}"
    );
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.split_whitespace().nth(2).is_some_and(|s| s == "S"),
        "the job does not run on after the refusal: {state}"
    );
    // As kill(2) has it, the user may end a program they started.
    let o = cl.coord_as(user, 1, &["kill", &job2]);
    assert!(o.status.success(), "the user's kill of their job failed");
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}
