//! ckpt-coord driving the agents of a simulated cluster (ckpt-lab): a job
//! in two parts streaming TCP to each other on nodes 1 and 2, adopted by
//! the coordinator; a checkpoint that fails on one node and is aborted on
//! the others; a checkpoint that leaves it running, tampered with, is
//! refused by restart before anything starts; a checkpoint that stops it;
//! nodes 1 and 2 destroyed; a restart onto nodes 3 and 4 refused while
//! node 4's agent lacks CAP_NET_ADMIN (no TCP repair there); the job
//! restarted by the coordinator on nodes 3 and 4 (node 4's agent not
//! seeing the store: part b's images streamed to it), where its stream
//! goes on.

use std::path::Path;
use std::time::Duration;

use ckpt_tests::{
    json_of as json, no_checkpoint, parts_flow, CoordCluster, JobCgroupGuard, TcpPart, Workdir,
};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");

/// A part of the job: its name in the spec, and the running part.
struct Part {
    name: &'static str,
    tcp: TcpPart,
}

#[test]
fn coordinator_checkpoints_and_restarts_a_job_elsewhere() {
    if no_checkpoint() {
        return;
    }
    let mut cl = CoordCluster::up("coord", 4);
    let k = cl.lab.number();
    let job = format!("cw{k}-{}", std::process::id());
    let parts: Vec<Part> = ["a", "b"]
        .into_iter()
        .enumerate()
        .map(|(j, name)| Part {
            name,
            tcp: TcpPart {
                dir: Workdir::for_job(&format!("coord-{name}")),
                addr: cl.lab.job_address(j as u8),
                mac: format!("02:00:c6:13:{k:02x}:{:02x}", 100 + j),
            },
        })
        .collect();
    let agent_job = |p: &Part| format!("{job}.{}", p.name);
    let _cgroups: Vec<JobCgroupGuard> =
        parts.iter().map(|p| JobCgroupGuard(agent_job(p))).collect();
    let (a, b) = (&parts[0], &parts[1]);
    let mut ca = a.tcp.start(
        Path::new(CASE_BIN),
        &agent_job(a),
        cl.lab.node(1),
        "listen",
        a.tcp.addr,
    );
    let mut cb = b.tcp.start(
        Path::new(CASE_BIN),
        &agent_job(b),
        cl.lab.node(2),
        "connect",
        a.tcp.addr,
    );
    ca.wait_ready().unwrap();
    cb.wait_ready().unwrap();
    parts_flow(&[&a.tcp, &b.tcp], 20_000, Duration::from_secs(10)).unwrap();

    // The job as the coordinator knows it: parts started by hand, adopted.
    let mut spec = format!("job = \"{job}\"\n");
    for (p, n) in [(a, cl.lab.node(1)), (b, cl.lab.node(2))] {
        spec += &format!(
            "\n[[part]]\nname = \"{}\"\nnode = \"{}\"\ncommand = \"{}\"\n\n[part.network]\naddress = \"{}/24\"\nmac = \"{}\"\n",
            p.name,
            n.name(),
            p.tcp.dir.join("zdtm-case").display(),
            p.tcp.addr,
            p.tcp.mac
        );
    }
    // First a spec with a third part that runs nowhere: its node's prepare
    // fails, the parts already prepared are aborted and stream on, and no
    // checkpoint is left in the store.
    let bad = format!(
        "{spec}\n[[part]]\nname = \"c\"\nnode = \"{}\"\ncommand = \"/bin/true\"\n",
        cl.lab.node(3).name()
    );
    let bad_file = cl.dir.join("bad.toml");
    std::fs::write(&bad_file, bad).unwrap();
    let o = cl.coord(3, &["adopt", bad_file.to_str().unwrap()]);
    assert!(o.status.success(), "adopt of the 3-part spec failed");
    let o = cl.coord(3, &["checkpoint", &job, "--stop"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a checkpoint of a missing part succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("prepare failed on node {}", cl.lab.node(3).name())),
        "the error does not name node 3: {err}"
    );
    parts_flow(&[&a.tcp, &b.tcp], 20_000, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after an aborted checkpoint: {e}"));
    let o = cl.coord(3, &["--json", "status", &job]);
    assert!(o.status.success());
    assert_eq!(
        json(&o)["checkpoints"].as_array().map(Vec::len),
        Some(0),
        "an aborted checkpoint was left in the store"
    );

    let spec_file = cl.dir.join("job.toml");
    std::fs::write(&spec_file, spec).unwrap();
    let o = cl.coord(3, &["adopt", spec_file.to_str().unwrap()]);
    assert!(o.status.success(), "adopt failed");

    // A checkpoint that leaves the job running; the job streams on.
    let o = cl.coord(3, &["--json", "checkpoint", &job, "--leave-running"]);
    assert!(o.status.success(), "checkpoint --leave-running failed");
    let first = json(&o);
    let first_id = first["checkpoint"].as_str().unwrap().to_string();
    parts_flow(&[&a.tcp, &b.tcp], 20_000, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after a checkpoint that leaves it running: {e}"));

    // Tampered with, it is refused before any node is asked to restore.
    let inv = cl.store().join(&job).join(&first_id);
    let victim = std::fs::read_dir(&inv)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a part directory")
        .join("inventory.img");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.push(0);
    std::fs::write(&victim, bytes).unwrap();
    let names = format!("{},{}", cl.lab.node(3).name(), cl.lab.node(4).name());
    let o = cl.coord(
        3,
        &[
            "restart",
            &job,
            "--checkpoint",
            &first_id,
            "--nodes",
            &names,
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "a tampered checkpoint was restarted"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refused"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "restart printed {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    parts_flow(&[&a.tcp, &b.tcp], 20_000, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after the refused restart: {e}"));

    // A checkpoint that stops the job: both parts gone.
    let o = cl.coord(3, &["--json", "checkpoint", &job, "--stop"]);
    assert!(o.status.success(), "checkpoint --stop failed");
    let second = json(&o);
    assert_eq!(second["stopped"], true);
    ca.expect_gone().unwrap();
    cb.expect_gone().unwrap();
    let before = (a.tcp.received(), b.tcp.received());
    let o = cl.coord(3, &["--json", "status", &job]);
    assert!(o.status.success());
    let status = json(&o);
    let cps = status["checkpoints"].as_array().unwrap();
    assert!(
        cps.iter().any(|c| c["id"] == second["checkpoint"]
            && c["committed"] == true
            && c["verified"] == true),
        "the stopping checkpoint is not committed and verified: {status}"
    );

    // Nodes 1 and 2 go away, agents first.
    cl.agents[0].take();
    cl.agents[1].take();
    cl.lab.node(1).destroy().unwrap();
    cl.lab.node(2).destroy().unwrap();

    // Node 4's agent runs without CAP_NET_ADMIN (as if confined by its
    // service manager): it cannot rebuild TCP connections, and the restart
    // is refused before anything is restored, naming the node and feature.
    cl.restart_agent_under(4, &[], &["setpriv", "--bounding-set", "-net_admin"]);
    let o = cl.coord(3, &["restart", &job, "--nodes", &names]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a restart onto a node without TCP repair went ahead"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    let n4 = cl.lab.node(4).name();
    assert!(
        err.contains(&format!("node {n4} cannot restore it")) && err.contains("tcp_repair"),
        "the refusal does not name node 4 and tcp_repair: {err}"
    );
    for p in [a, b] {
        let procs = ckpt_tests::job_procs(&agent_job(p));
        assert!(
            procs.is_empty(),
            "part {} was restored anyway: {procs:?}",
            p.name
        );
    }
    // Node 4's agent, restarted, cannot see the checkpoint store (a node
    // without the cluster's file system): the coordinator streams part
    // b's images to it.
    let hide = format!(
        "mount -t tmpfs none {} && exec \"$0\" \"$@\"",
        cl.lab.shared_dir().display()
    );
    cl.restart_agent_under(
        4,
        &[],
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &hide,
        ],
    );

    let o = cl.coord(3, &["--json", "restart", &job, "--nodes", &names]);
    let restarted = if o.status.success() {
        Some(json(&o))
    } else {
        None
    };
    for (p, c) in [(a, &mut ca), (b, &mut cb)] {
        let pid = restarted.as_ref().and_then(|r| {
            r["parts"]
                .as_array()?
                .iter()
                .find(|x| x["part"] == p.name)?["pid"]
                .as_i64()
        });
        if let Some(pid) = pid {
            c.pid = pid as i32;
            c.adopt_restored();
        }
    }
    let r = restarted.expect("restart on nodes 3 and 4 failed");
    let streamed = |part: &str| {
        r["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["part"] == part)
            .and_then(|x| x["streamed_bytes"].as_u64())
    };
    assert_eq!(streamed("a"), Some(0), "node 3 sees the store: {r}");
    assert!(
        streamed("b").is_some_and(|n| n > 100_000),
        "part b's images were not streamed to node 4: {r}"
    );
    let incoming = cl.state_dir(4).join("incoming");
    let left: Vec<_> = walkdir_files(&incoming);
    assert!(left.is_empty(), "streamed images left on node 4: {left:?}");
    for (p, n) in [(a, cl.lab.node(3)), (b, cl.lab.node(4))] {
        assert!(
            r["parts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["part"] == p.name && x["node"] == n.name()),
            "part {} not restored on {}: {r}",
            p.name,
            n.name()
        );
    }
    parts_flow(&[&a.tcp, &b.tcp], 100_000, Duration::from_secs(20)).unwrap_or_else(|e| {
        panic!(
            "after the restart ({before:?} before): {e}\ncase logs:\n{}\n{}",
            ca.log_text(),
            cb.log_text()
        )
    });
    ca.terminate("part a").unwrap();
    cb.terminate("part b").unwrap();
    ca.check_exit("part a, restarted on node 3").unwrap();
    cb.check_exit("part b, restarted on node 4").unwrap();
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}

/// Every file under `dir` (none when it does not exist).
fn walkdir_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                walkdir_files(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}
