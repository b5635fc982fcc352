//! Jobs with a veth on a lab node's bridge: `run --net --veth`, dump,
//! restore on the same node, on another node (its `br0`), on another node's
//! bridge of another name (`--bridge`), the refusals (missing bridge, bad
//! options) that must leave nothing behind, and the jobs of a destroyed
//! node dying with it.
//!
//! Each test builds a simulated cluster with ckpt-lab, as tests/multinode.rs
//! does, and runs every agent on a node with `ckpt_tests::on`. The last node
//! runs a TCP echo server on its address, which is also the job's gateway;
//! the job gets the lab's job address 0 on `--veth br0`. The zdtm case
//! `job_net_veth` records its interfaces, addresses, MAC and routes from
//! inside, reaches the echo server over the fabric, and checks all of it
//! again after restore.
//!
//! The lab turns IPv6 off in its nodes, not in the job's own namespace: the
//! job's IPv6 address and route stay, to prove that the agent carries IPv6
//! configuration (they reach nothing, so they need no prohibit route).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ckpt_lab::{Lab, Node, UPLINK};
use ckpt_tests::{
    agent, agent_in, dead, dump_in, no_checkpoint, on, pids_mentioning, restore_detached_in, strs,
    CaseProcess, JobCgroupGuard, JobOptions, Workdir,
};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");
const CASE: &str = "job_net_veth";
/// The job's IPv6 address, inside the job only (see the module comment).
const JOB_ADDR6: &str = "2001:db8:250::10/64";

/// Runs a command; its stdout, or why it failed.
fn sh(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NODE ARGS`.
fn ip(node: &Node, args: &[&str]) -> Result<String, String> {
    let mut c = vec!["ip", "-n", node.netns()];
    c.extend_from_slice(args);
    sh(&c)
}

/// Names of the interfaces in `node` that `ip -o link show ARGS` lists.
fn link_names(node: &Node, args: &[&str]) -> Vec<String> {
    let mut c = vec!["-o", "link", "show"];
    c.extend_from_slice(args);
    ip(node, &c)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// The ports of `bridge` in `node` but for the node's uplink: its jobs'.
fn job_ports(node: &Node, bridge: &str) -> Vec<String> {
    let mut v = link_names(node, &["master", bridge]);
    v.retain(|n| n != UPLINK);
    v
}

/// Every veth in `node` but its uplink.
fn job_veths(node: &Node) -> Vec<String> {
    let mut v = link_names(node, &["type", "veth"]);
    v.retain(|n| n != UPLINK);
    v
}

/// Waits until `cond` holds (the kernel tears a namespace's veths down
/// asynchronously); false after `secs` seconds.
fn wait(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A TCP echo server on a node's address: the listener lives in the node's
/// namespace, served from a thread of ours until dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(node: &Node) -> Echo {
        let l = node
            .in_netns(|| TcpListener::bind((node.address(), 0)))
            .expect("entering the server node")
            .unwrap_or_else(|e| panic!("echo server on {}: {e}", node.address()));
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                        let mut buf = [0u8; 256];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// A lab whose last node serves the echo; jobs run on the others.
struct Cluster {
    // Declared first, so dropped first: its sockets would keep the server
    // node's namespace alive after teardown.
    echo: Echo,
    lab: Lab,
}

impl Cluster {
    fn up(nodes: usize) -> Cluster {
        let lab = Lab::up(nodes).unwrap_or_else(|e| panic!("a lab of {nodes} nodes: {e}"));
        let echo = Echo::start(lab.node(nodes));
        Cluster { echo, lab }
    }

    fn node(&self, i: usize) -> &Node {
        self.lab.node(i)
    }

    /// The echo server's node; its address is the job's gateway.
    fn server(&self) -> &Node {
        self.lab.node(self.lab.nodes().len())
    }

    fn job_addr(&self) -> Ipv4Addr {
        self.nth_addr(0)
    }

    /// The address of the lab's `j`th job (two each: see `second_addr`).
    fn nth_addr(&self, j: u8) -> Ipv4Addr {
        self.lab.job_address(2 * j)
    }

    /// The job's MAC, unique to the lab, as in tests/multinode.rs.
    fn job_mac(&self) -> String {
        self.nth_mac(0)
    }

    fn nth_mac(&self, j: u8) -> String {
        format!("02:00:c6:12:{:02x}:{:02x}", self.lab.number(), 10 + j)
    }

    /// A second address the case adds itself (`run` was not told of it).
    fn second_addr(&self) -> Ipv4Addr {
        self.nth_second_addr(0)
    }

    fn nth_second_addr(&self, j: u8) -> Ipv4Addr {
        self.lab.job_address(2 * j + 1)
    }

    /// A route the case adds itself: the top half of the lab's /24, which
    /// holds no node and none of the job's addresses.
    fn blackhole(&self) -> String {
        let [a, b, c, _] = self.lab.subnet().network.octets();
        format!("{a}.{b}.{c}.128/25")
    }

    /// What the lab's `j`th job is given, what the case adds itself, and
    /// what it must see, for a job started on `node`'s `bridge`.
    fn job_options(&self, node: &Node, bridge: &str, j: u8) -> JobOptions {
        let gateway = self.server().address();
        let mac = self.nth_mac(j);
        let run_args = [
            "--veth",
            bridge,
            "--address",
            &format!("{}/24", self.nth_addr(j)),
            "--address",
            JOB_ADDR6,
            "--gateway",
            &gateway.to_string(),
            "--mac",
            &mac,
            "--mtu",
            "1400",
        ];
        JobOptions {
            prefix: on(node),
            run_args: run_args.iter().map(|s| s.to_string()).collect(),
            env: vec![
                ("CKPT_ZDTM_NET_PEER".into(), self.echo.addr.to_string()),
                (
                    "CKPT_ZDTM_NET_IP".into(),
                    format!(
                        "addr add {}/24 dev eth0; route add blackhole {}; \
                         -6 route add 2001:db8:251::/64 via 2001:db8:250::1 dev eth0 metric 77",
                        self.nth_second_addr(j),
                        self.blackhole()
                    ),
                ),
                (
                    "CKPT_ZDTM_NET_EXPECT".into(),
                    format!(
                        "link eth0 mac {mac} mtu 1400 up; link lo mac 00:00:00:00:00:00 mtu 65536 up; \
                         addr eth0 {}/24; addr eth0 {JOB_ADDR6}; \
                         route4 eth0 0.0.0.0/0 via {gateway} metric 0 flags 0003",
                        self.nth_addr(j)
                    ),
                ),
            ],
        }
    }

    /// The lab's first job started on `node`'s `bridge`, ready; and the
    /// name of its veth's node end there.
    fn start(&self, node: &Node, bridge: &str, job: &str, dir: &Workdir) -> (CaseProcess, String) {
        self.start_nth(node, bridge, job, dir, 0)
    }

    /// `start` for the lab's `j`th job, which has addresses and a MAC of
    /// its own.
    fn start_nth(
        &self,
        node: &Node,
        bridge: &str,
        job: &str,
        dir: &Workdir,
        j: u8,
    ) -> (CaseProcess, String) {
        let before = job_ports(node, bridge);
        let opts = self.job_options(node, bridge, j);
        let mut case = CaseProcess::spawn_job_with(Path::new(CASE_BIN), CASE, job, dir, &opts)
            .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
        case.wait_ready().unwrap();
        let mut ports = job_ports(node, bridge);
        ports.retain(|p| !before.contains(p));
        assert_eq!(ports.len(), 1, "one new job port on {bridge}: {ports:?}");
        assert!(ports[0].starts_with("ckj-"), "{ports:?}");
        (case, ports[0].clone())
    }
}

/// True (and says so) when the agent is not under test.
fn skip() -> bool {
    if no_checkpoint() {
        eprintln!("skipped: CKPT_ZDTM_NOCKPT=1");
    }
    no_checkpoint()
}

/// Dumps (and so kills) the job running on `node` into `images`; its veth
/// goes with it.
fn dump_job(node: &Node, case: &mut CaseProcess, images: &Path, dir: &Workdir) {
    let run = dump_in(&strs(&on(node)), case.pid, images, &[], dir);
    assert!(
        run.ok(),
        "{}\ncase log:\n{}",
        run.describe(),
        case.log_text()
    );
    case.expect_gone().unwrap();
    assert!(
        wait(3, || job_veths(node).is_empty()),
        "the dumped job's veth is still there: {:?}",
        job_veths(node)
    );
}

/// Restores the job on `node`; the case is the restored process from now.
fn restore_job(node: &Node, case: &mut CaseProcess, images: &Path, extra: &[&str], dir: &Workdir) {
    let (run, pid) = restore_detached_in(&strs(&on(node)), images, extra, dir, "restore");
    if let Some(p) = pid {
        case.pid = p;
        case.adopt_restored();
    }
    assert!(run.ok(), "{}", run.describe());
    assert!(pid.is_some(), "restore wrote no pid");
}

/// Nothing of a failed restore or run is left: no process of the case, no
/// job cgroup, no job veth on the node.
fn assert_nothing_left(node: &Node, dir: &Workdir, job: &str) {
    let left = pids_mentioning(&dir.path.to_string_lossy());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    for root in [
        "/sys/fs/cgroup/unified/ckpt",
        "/sys/fs/cgroup/ckpt",
        "/sys/fs/cgroup/freezer/ckpt",
    ] {
        let d = Path::new(root).join(job);
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    assert!(
        job_veths(node).is_empty(),
        "veths left behind: {:?}",
        job_veths(node)
    );
}

fn job_id(tag: &str) -> String {
    format!("jobnet-{tag}-{}", std::process::id())
}

/// Images in the lab's shared directory, which every node sees.
fn shared_images(c: &Cluster, tag: &str) -> PathBuf {
    c.lab.shared_dir().join(format!("images-{tag}"))
}

#[test]
fn veth_job_keeps_its_address_mac_and_routes() {
    if skip() {
        return;
    }
    let c = Cluster::up(2);
    let node = c.node(1);
    let job = job_id("same");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-same");
    // Learn neighbours from gratuitous ARP, so that the job's announcement
    // after restore shows in the node's cache.
    node.in_netns(|| std::fs::write("/proc/sys/net/ipv4/conf/br0/arp_accept", "1"))
        .unwrap()
        .unwrap();
    let (mut case, node_end) = c.start(node, "br0", &job, &dir);
    let images = dir.join("images");
    dump_job(node, &mut case, &images, &dir);

    let show = agent(
        &["--json", "show", &images.join("net.img").to_string_lossy()],
        &dir,
        "show",
    );
    assert!(show.ok(), "{}", show.describe());
    for needle in [
        "\"kind\": \"net\"",
        "\"name\": \"eth0\"",
        "\"bridge\": \"br0\"",
        &c.job_mac(),
        &c.second_addr().to_string(),
        &c.blackhole(),
        "2001:db8:251::/64",
    ] {
        assert!(
            show.stdout.contains(needle),
            "net.img lacks {needle}:\n{}",
            show.stdout
        );
    }

    // The node forgets the job; the restored job must announce itself.
    ip(node, &["neigh", "flush", "all"]).unwrap();
    restore_job(node, &mut case, &images, &[], &dir);
    assert_eq!(job_ports(node, "br0"), [node_end]);
    let job_addr = c.job_addr().to_string();
    let announced = wait(2, || {
        ip(node, &["neigh", "show", &job_addr, "dev", "br0"])
            .unwrap_or_default()
            .contains(&c.job_mac())
    });
    assert!(
        announced,
        "no gratuitous ARP from the restored job: neighbours {:?}",
        ip(node, &["neigh"])
    );
    case.terminate_and_check("restored job")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}

#[test]
fn veth_job_moves_to_another_node() {
    if skip() {
        return;
    }
    let c = Cluster::up(3);
    let job = job_id("move");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-move");
    let (mut case, _) = c.start(c.node(1), "br0", &job, &dir);
    let images = shared_images(&c, "move");
    dump_job(c.node(1), &mut case, &images, &dir);
    // The old node is gone before the job restarts on the new one; the
    // echo server, on a third node, is the same peer as before.
    c.node(1).destroy().unwrap();
    restore_job(c.node(2), &mut case, &images, &[], &dir);
    let ports = job_ports(c.node(2), "br0");
    assert!(
        ports.len() == 1 && ports[0].starts_with("ckj-"),
        "{ports:?}"
    );
    case.terminate_and_check("job restored on another node")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}

#[test]
fn veth_job_moves_onto_a_bridge_of_another_name() {
    if skip() {
        return;
    }
    let c = Cluster::up(3);
    let new = c.node(2);
    // Node 2's jobs go on br1, patched into its br0 by a veth pair of its
    // own, so that a job there still reaches the fabric, and the case's
    // peer on node 3 shows the job works on br1.
    let batch = "link add br1 type bridge\n\
                 link add patch1 type veth peer name patch0\n\
                 link set patch1 master br1\n\
                 link set patch0 master br0\n\
                 link set patch1 up\n\
                 link set patch0 up\n\
                 link set br1 up\n";
    let st = Command::new("ip")
        .args(["-n", new.netns(), "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut p| {
            p.stdin.take().unwrap().write_all(batch.as_bytes())?;
            p.wait()
        })
        .unwrap();
    assert!(st.success(), "making br1 on {}", new.name());
    let job = job_id("bridge");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-bridge");
    let (mut case, _) = c.start(c.node(1), "br0", &job, &dir);
    let images = shared_images(&c, "bridge");
    dump_job(c.node(1), &mut case, &images, &dir);
    c.node(1).destroy().unwrap();
    restore_job(new, &mut case, &images, &["--bridge", "br1"], &dir);
    let ports: Vec<String> = job_ports(new, "br1")
        .into_iter()
        .filter(|p| p != "patch1")
        .collect();
    assert!(
        ports.len() == 1 && ports[0].starts_with("ckj-"),
        "{ports:?}"
    );
    assert_eq!(job_ports(new, "br0"), ["patch0"], "the job is not on br0");
    case.terminate_and_check("job restored on another node's br1")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}

/// Losing a node takes its jobs with it, though each has network and UTS
/// namespaces of its own: one still under the agent that started it, and
/// one restored with --detach, a child of nothing on the node any more.
#[test]
fn a_destroyed_nodes_jobs_die_with_it() {
    if skip() {
        return;
    }
    let c = Cluster::up(2);
    let node = c.node(1);
    let (run_job, restored_job) = (job_id("lost-run"), job_id("lost-restored"));
    let _cg = [
        JobCgroupGuard(run_job.clone()),
        JobCgroupGuard(restored_job.clone()),
    ];
    let (run_dir, restored_dir) = (
        Workdir::for_job("job-net-lost-run"),
        Workdir::for_job("job-net-lost-restored"),
    );
    let (mut restored, _) = c.start_nth(node, "br0", &restored_job, &restored_dir, 1);
    let images = restored_dir.join("images");
    dump_job(node, &mut restored, &images, &restored_dir);
    restore_job(node, &mut restored, &images, &[], &restored_dir);
    let (running, _) = c.start_nth(node, "br0", &run_job, &run_dir, 0);
    assert!(!dead(running.pid) && !dead(restored.pid));

    node.destroy().unwrap();
    assert!(dead(running.pid), "the job run on the node survived it");
    assert!(
        dead(restored.pid),
        "the job restored on the node survived it"
    );
}

#[test]
fn restore_refuses_a_missing_bridge_and_leaves_nothing() {
    if skip() {
        return;
    }
    let c = Cluster::up(2);
    let node = c.node(1);
    let job = job_id("refused");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-refused");
    let (mut case, node_end) = c.start(node, "br0", &job, &dir);
    let images = dir.join("images");
    dump_job(node, &mut case, &images, &dir);
    let prefix = on(node);
    let refused = |extra: &[&str], label: &str, needles: &[&str]| {
        let (run, pid) = restore_detached_in(&strs(&prefix), &images, extra, &dir, label);
        assert_eq!(run.code, Some(1), "{}", run.describe());
        assert_eq!(pid, None, "{}", run.describe());
        for n in needles {
            assert!(
                run.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                run.describe()
            );
        }
        assert_nothing_left(node, &dir, &job);
    };

    // Checked before anything of the job exists.
    refused(
        &["--bridge", "nosuch"],
        "restore-nosuch",
        &["no bridge nosuch", "--bridge NAME"],
    );
    // The node's br0 out of the way for a moment (renamed, not deleted, so
    // that it comes back with its address, MAC and uplink).
    let rename = |from: &str, to: &str| {
        ip(node, &["link", "set", from, "down"]).unwrap();
        ip(node, &["link", "set", from, "name", to]).unwrap();
    };
    rename("br0", "br0-away");
    refused(&[], "restore-no-br0", &["no bridge br0", "--bridge NAME"]);
    rename("br0-away", "br0");
    ip(node, &["link", "set", "br0", "up"]).unwrap();
    refused(
        &["--bridge", "lo"],
        "restore-not-a-bridge",
        &["lo is a loopback interface, not a bridge"],
    );

    // Found only once the job's root and namespaces exist: its veth's
    // name is taken. All of the job goes again; the interface that was
    // there stays.
    ip(node, &["link", "add", &node_end, "type", "bridge"]).unwrap();
    refused(&[], "restore-name-taken", &[&node_end, "already exists"]);
    assert!(ip(node, &["link", "show", &node_end]).is_ok());
    ip(node, &["link", "del", &node_end]).unwrap();

    // The images are still good.
    restore_job(node, &mut case, &images, &[], &dir);
    case.terminate_and_check("restored after the refusals")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}

#[test]
fn run_refuses_bad_network_options_and_leaves_nothing() {
    if skip() {
        return;
    }
    let lab = Lab::up(1).expect("a lab of 1 node");
    let node = lab.node(1);
    let job = job_id("badrun");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-badrun");
    let prefix = on(node);
    let addr = format!("{}/24", lab.job_address(20));
    let [a, b, k, _] = lab.subnet().network.octets();
    let bad_addr = format!("{a}.{b}.{k}.300/24");
    // In the lab's /15, outside its /24: not on the job's link.
    let far_gateway = format!("{a}.{}.{k}.1", b + 1);
    for (args, code, needles) in [
        (
            vec!["--net", "--veth", "nosuch", "--address", &addr],
            1,
            vec![
                "no bridge nosuch in the agent's network namespace",
                "another --veth",
            ],
        ),
        (vec!["--veth", "br0", "--address", &addr], 2, vec!["--net"]),
        (vec!["--net", "--address", &addr], 2, vec!["--veth"]),
        (
            vec!["--net", "--veth", "br0", "--address", &bad_addr],
            1,
            vec![&*format!("bad --address {bad_addr:?}")],
        ),
        (
            vec![
                "--net",
                "--veth",
                "br0",
                "--address",
                &addr,
                "--mac",
                "01:00:5e:00:00:01",
            ],
            1,
            vec!["multicast"],
        ),
        // Fails inside the job's namespace, after its veth was made.
        (
            vec![
                "--net",
                "--veth",
                "br0",
                "--address",
                &addr,
                "--gateway",
                &far_gateway,
            ],
            1,
            vec![&*far_gateway, "eth0"],
        ),
    ] {
        let mut full = vec!["run", "--job", &job];
        full.extend(&args);
        let marker = dir.path.to_string_lossy().into_owned();
        // The command names the work dir, so a leftover would be found.
        full.extend(["--", "/bin/sleep", "30", &marker]);
        let run = agent_in(&strs(&prefix), &full, &dir, "run");
        assert_eq!(run.code, Some(code), "{}", run.describe());
        for n in needles {
            assert!(
                run.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                run.describe()
            );
        }
        assert_nothing_left(node, &dir, &job);
    }
}

#[test]
fn dump_refuses_other_interfaces_and_the_job_runs_on() {
    if skip() {
        return;
    }
    let c = Cluster::up(2);
    let node = c.node(1);
    let job = job_id("kinds");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-kinds");
    let (mut case, _) = c.start(node, "br0", &job, &dir);
    let pid = case.pid.to_string();
    let in_job = |args: &[&str]| {
        let mut c = vec!["nsenter", "-t", &pid, "-n", "ip"];
        c.extend_from_slice(args);
        sh(&c).unwrap();
    };
    let images = dir.join("images");
    let prefix = on(node);
    for (add, del, needles) in [
        (
            vec!["link", "add", "jbr", "type", "bridge"],
            vec!["link", "del", "jbr"],
            vec!["interface jbr of kind bridge", "only lo and veth"],
        ),
        (
            vec!["link", "add", "va", "type", "veth", "peer", "name", "vb"],
            vec!["link", "del", "va"],
            vec!["both ends of veth", "inside its network namespace"],
        ),
    ] {
        in_job(&add);
        let run = dump_in(&strs(&prefix), case.pid, &images, &[], &dir);
        assert_eq!(run.code, Some(1), "{}", run.describe());
        for n in needles {
            assert!(
                run.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                run.describe()
            );
        }
        assert!(!images.join("inventory.img").exists());
        in_job(&del);
    }
    // Left running as it was: its network unchanged, its peer reachable.
    case.terminate_and_check("after the refused dumps")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}
