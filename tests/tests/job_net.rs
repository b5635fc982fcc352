//! Jobs with a veth on a bridge: `run --net --veth`, dump, restore on the
//! same bridge, on another node's bridge of another name (`--bridge`), and
//! the refusals (missing bridge, bad options) that must leave nothing
//! behind.
//!
//! Each test builds its own lab: a network namespace holding a bridge with
//! 198.18.250.1/24 and a TCP echo server on that address, and runs every
//! agent inside it with `nsenter --net=` (not `ip netns exec`, which hides
//! the cgroup mounts the agent needs). The job gets 198.18.250.10/24 (and
//! 2001:db8:250::10/64); the zdtm case `job_net_veth` records its
//! interfaces, addresses, MAC and routes from inside, reaches the echo
//! server, and checks all of it again after restore.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ckpt_tests::{
    agent, agent_in, dump_in, no_checkpoint, pids_mentioning, restore_detached_in, CaseProcess,
    JobCgroupGuard, JobOptions, Workdir,
};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");
const CASE: &str = "job_net_veth";
const GATEWAY: &str = "198.18.250.1";
const JOB_ADDR: &str = "198.18.250.10";
const JOB_MAC: &str = "02:00:c6:12:fa:0a";

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

/// While any lab exists, the lab's ranges are unreachable from the root
/// namespace: a client started there by mistake fails here instead of
/// sending lab traffic out of the machine.
static PROHIBIT: Mutex<usize> = Mutex::new(0);
const PROHIBIT_ROUTES: [&[&str]; 2] = [
    &["ip", "route", "prohibit", "198.18.250.0/24"],
    &["ip", "-6", "route", "prohibit", "2001:db8:250::/48"],
];

fn prohibit(add: bool) {
    let mut n = PROHIBIT.lock().unwrap_or_else(|e| e.into_inner());
    let change = if add { *n == 0 } else { *n == 1 };
    if change {
        for r in PROHIBIT_ROUTES {
            let mut c = r.to_vec();
            c.insert(c.len() - 2, if add { "replace" } else { "del" });
            let _ = sh(&c);
        }
    }
    if add {
        *n += 1;
    } else {
        *n = n.saturating_sub(1);
    }
}

/// A lab network namespace with a bridge and a TCP echo server on
/// 198.18.250.1; deleted when dropped, whatever happened.
struct Lab {
    name: String,
    /// `--net=/run/netns/NAME`, for nsenter.
    netns_arg: String,
    port: u16,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

impl Lab {
    /// A lab whose bridge is `bridge`, its echo server on `port` (0: any).
    fn new(bridge: &str, port: u16) -> Lab {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ckjn-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        prohibit(true);
        let mut lab = Lab {
            netns_arg: format!("--net=/run/netns/{name}"),
            name,
            port: 0,
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
        };
        sh(&["ip", "netns", "add", &lab.name]).expect("create the lab namespace");
        lab.ip(&["link", "set", "lo", "up"]).unwrap();
        lab.add_bridge(bridge);
        lab.start_server(port);
        lab
    }

    /// `nsenter --net=...`: what runs an agent in the lab.
    fn prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), self.netns_arg.clone()]
    }

    fn prefix_refs(&self) -> Vec<&str> {
        vec!["nsenter", &self.netns_arg]
    }

    /// `ip -n LAB ARGS`.
    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut c = vec!["ip", "-n", &self.name];
        c.extend_from_slice(args);
        sh(&c)
    }

    fn add_bridge(&self, bridge: &str) {
        self.ip(&["link", "add", bridge, "type", "bridge"]).unwrap();
        self.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", bridge])
            .unwrap();
        self.ip(&["addr", "add", "2001:db8:250::1/64", "dev", bridge, "nodad"])
            .unwrap();
        self.ip(&["link", "set", bridge, "up"]).unwrap();
        // Learn neighbours from gratuitous ARP, so that the job's
        // announcement after restore shows in the bridge's cache.
        let sysctl = format!("echo 1 > /proc/sys/net/ipv4/conf/{bridge}/arp_accept");
        let mut c: Vec<&str> = self.prefix_refs();
        c.extend(["sh", "-c", &sysctl]);
        sh(&c).unwrap();
    }

    /// An echo server on 198.18.250.1:`port` inside the lab, on a thread
    /// that entered the lab's namespace.
    fn start_server(&mut self, port: u16) {
        let (tx, rx) = mpsc::channel();
        let path = format!("/run/netns/{}", self.name);
        let stop = self.stop.clone();
        self.server = Some(std::thread::spawn(move || {
            let setup = || -> Result<TcpListener, String> {
                let f = fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns {path}: {e}"))?;
                let l = TcpListener::bind((GATEWAY, port))
                    .map_err(|e| format!("bind {GATEWAY}:{port}: {e}"))?;
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(l)
            };
            let l = match setup() {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(l.local_addr().map(|a| a.port()).unwrap_or(0)));
            while !stop.load(Ordering::SeqCst) {
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
        }));
        self.port = rx
            .recv()
            .expect("echo server thread")
            .expect("echo server in the lab");
    }

    /// Names of the interfaces on `bridge`.
    fn ports(&self, bridge: &str) -> Vec<String> {
        self.ip(&["-o", "link", "show", "master", bridge])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Names of every veth in the lab.
    fn veths(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show", "type", "veth"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Waits until `cond` holds (the kernel tears a namespace's veths down
    /// asynchronously); false after `secs` seconds.
    fn wait(&self, secs: u64, mut cond: impl FnMut(&Lab) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The server's socket would keep the namespace (and its veths)
        // alive after `ip netns del`.
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        if let Err(e) = sh(&["ip", "netns", "del", &self.name]) {
            eprintln!("removing lab namespace {}: {e}", self.name);
        }
        prohibit(false);
    }
}

/// True (and says so) when the agent is not under test.
fn skip() -> bool {
    if no_checkpoint() {
        eprintln!("skipped: CKPT_ZDTM_NOCKPT=1");
    }
    no_checkpoint()
}

/// What the job is given, what the case adds itself, and what it must see.
fn job_options(lab: &Lab, bridge: &str) -> JobOptions {
    let run_args = [
        "--veth",
        bridge,
        "--address",
        &format!("{JOB_ADDR}/24"),
        "--address",
        "2001:db8:250::10/64",
        "--gateway",
        GATEWAY,
        "--mac",
        JOB_MAC,
        "--mtu",
        "1400",
    ];
    JobOptions {
        prefix: lab.prefix(),
        run_args: run_args.iter().map(|s| s.to_string()).collect(),
        env: vec![
            (
                "CKPT_ZDTM_NET_PEER".into(),
                format!("{GATEWAY}:{}", lab.port),
            ),
            (
                "CKPT_ZDTM_NET_IP".into(),
                "addr add 198.18.250.11/24 dev eth0; \
                 route add blackhole 198.18.250.128/25; \
                 -6 route add 2001:db8:251::/64 via 2001:db8:250::1 dev eth0 metric 77"
                    .into(),
            ),
            (
                "CKPT_ZDTM_NET_EXPECT".into(),
                format!(
                    "link eth0 mac {JOB_MAC} mtu 1400 up; link lo mac 00:00:00:00:00:00 mtu 65536 up; \
                     addr eth0 {JOB_ADDR}/24; addr eth0 2001:db8:250::10/64; \
                     route4 eth0 0.0.0.0/0 via {GATEWAY} metric 0 flags 0003"
                ),
            ),
        ],
    }
}

/// A job started in `lab` on `bridge`, ready; and the name of its veth's
/// node end there.
fn start(lab: &Lab, bridge: &str, job: &str, dir: &Workdir) -> (CaseProcess, String) {
    let opts = job_options(lab, bridge);
    let mut case = CaseProcess::spawn_job_with(Path::new(CASE_BIN), CASE, job, dir, &opts)
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
    case.wait_ready().unwrap();
    let ports = lab.ports(bridge);
    assert_eq!(ports.len(), 1, "one port on {bridge}: {ports:?}");
    assert!(ports[0].starts_with("ckj-"), "{ports:?}");
    (case, ports[0].clone())
}

/// Dumps (and so kills) the job; its veth goes with it.
fn dump_job(lab: &Lab, case: &mut CaseProcess, dir: &Workdir) -> std::path::PathBuf {
    let images = dir.join("images");
    let run = dump_in(&lab.prefix_refs(), case.pid, &images, &[], dir);
    assert!(
        run.ok(),
        "{}\ncase log:\n{}",
        run.describe(),
        case.log_text()
    );
    case.expect_gone().unwrap();
    assert!(
        lab.wait(3, |l| l.veths().is_empty()),
        "the dumped job's veth is still there: {:?}",
        lab.veths()
    );
    images
}

/// Restores the job in `lab`; the case is the restored process from now.
fn restore_job(lab: &Lab, case: &mut CaseProcess, images: &Path, extra: &[&str], dir: &Workdir) {
    let (run, pid) = restore_detached_in(&lab.prefix_refs(), images, extra, dir, "restore");
    if let Some(p) = pid {
        case.pid = p;
        case.adopt_restored();
    }
    assert!(run.ok(), "{}", run.describe());
    assert!(pid.is_some(), "restore wrote no pid");
}

/// Nothing of a failed restore or run is left: no process of the case, no
/// job cgroup, no veth in the lab.
fn assert_nothing_left(lab: &Lab, dir: &Workdir, job: &str) {
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
        lab.veths().is_empty(),
        "veths left behind: {:?}",
        lab.veths()
    );
}

fn job_id(tag: &str) -> String {
    format!("jobnet-{tag}-{}", std::process::id())
}

#[test]
fn veth_job_keeps_its_address_mac_and_routes() {
    if skip() {
        return;
    }
    let lab = Lab::new("br0", 0);
    let job = job_id("same");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-same");
    let (mut case, node_end) = start(&lab, "br0", &job, &dir);
    let images = dump_job(&lab, &mut case, &dir);

    let show = agent(
        &[
            "--json",
            "show",
            &dir.join("images/net.img").to_string_lossy(),
        ],
        &dir,
        "show",
    );
    assert!(show.ok(), "{}", show.describe());
    for needle in [
        "\"kind\": \"net\"",
        "\"name\": \"eth0\"",
        "\"bridge\": \"br0\"",
        JOB_MAC,
        "198.18.250.11",
        "198.18.250.128/25",
        "2001:db8:251::/64",
    ] {
        assert!(
            show.stdout.contains(needle),
            "net.img lacks {needle}:\n{}",
            show.stdout
        );
    }

    // The bridge forgets the job; the restored job must announce itself.
    lab.ip(&["neigh", "flush", "all"]).unwrap();
    restore_job(&lab, &mut case, &images, &[], &dir);
    assert_eq!(lab.ports("br0"), [node_end]);
    let announced = lab.wait(2, |l| {
        l.ip(&["neigh", "show", JOB_ADDR, "dev", "br0"])
            .unwrap_or_default()
            .contains(JOB_MAC)
    });
    assert!(
        announced,
        "no gratuitous ARP from the restored job: neighbours {:?}",
        lab.ip(&["neigh"])
    );
    case.terminate_and_check("restored job")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}

#[test]
fn veth_job_moves_to_another_nodes_bridge() {
    if skip() {
        return;
    }
    let job = job_id("move");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-move");
    let first = Lab::new("br0", 0);
    let port = first.port;
    let (mut case, _) = start(&first, "br0", &job, &dir);
    let images = dump_job(&first, &mut case, &dir);
    // The old node is gone before the job restarts on the new one, whose
    // bridge has another name and whose echo server has the job's peer
    // address and port.
    drop(first);
    let second = Lab::new("fabric1", port);
    restore_job(&second, &mut case, &images, &["--bridge", "fabric1"], &dir);
    let ports = second.ports("fabric1");
    assert!(
        ports.len() == 1 && ports[0].starts_with("ckj-"),
        "{ports:?}"
    );
    case.terminate_and_check("job restored on another bridge")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}

#[test]
fn restore_refuses_a_missing_bridge_and_leaves_nothing() {
    if skip() {
        return;
    }
    let lab = Lab::new("br0", 0);
    let job = job_id("refused");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-refused");
    let (mut case, node_end) = start(&lab, "br0", &job, &dir);
    let images = dump_job(&lab, &mut case, &dir);
    let prefix = lab.prefix_refs();
    let refused = |extra: &[&str], label: &str, needles: &[&str]| {
        let (run, pid) = restore_detached_in(&prefix, &images, extra, &dir, label);
        assert_eq!(run.code, Some(1), "{}", run.describe());
        assert_eq!(pid, None, "{}", run.describe());
        for n in needles {
            assert!(
                run.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                run.describe()
            );
        }
        assert_nothing_left(&lab, &dir, &job);
    };

    // Checked before anything of the job exists.
    refused(
        &["--bridge", "nosuch"],
        "restore-nosuch",
        &["no bridge nosuch", "--bridge NAME"],
    );
    lab.ip(&["link", "del", "br0"]).unwrap();
    refused(&[], "restore-no-br0", &["no bridge br0", "--bridge NAME"]);
    lab.add_bridge("br0");
    refused(
        &["--bridge", "lo"],
        "restore-not-a-bridge",
        &["lo is a loopback interface, not a bridge"],
    );

    // Found only once the job's root and namespaces exist: its veth's
    // name is taken. All of the job goes again; the interface that was
    // there stays.
    lab.ip(&["link", "add", &node_end, "type", "bridge"])
        .unwrap();
    refused(&[], "restore-name-taken", &[&node_end, "already exists"]);
    assert!(lab.ip(&["link", "show", &node_end]).is_ok());
    lab.ip(&["link", "del", &node_end]).unwrap();

    // The images are still good.
    restore_job(&lab, &mut case, &images, &[], &dir);
    case.terminate_and_check("restored after the refusals")
        .unwrap_or_else(|e| panic!("{e}{}", dir.agent_report()));
}

#[test]
fn run_refuses_bad_network_options_and_leaves_nothing() {
    if skip() {
        return;
    }
    let lab = Lab::new("br0", 0);
    let job = job_id("badrun");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-badrun");
    let prefix = lab.prefix_refs();
    let addr = "198.18.250.20/24";
    for (args, code, needles) in [
        (
            vec!["--net", "--veth", "nosuch", "--address", addr],
            1,
            vec![
                "no bridge nosuch in the agent's network namespace",
                "another --veth",
            ],
        ),
        (vec!["--veth", "br0", "--address", addr], 2, vec!["--net"]),
        (vec!["--net", "--address", addr], 2, vec!["--veth"]),
        (
            vec!["--net", "--veth", "br0", "--address", "198.18.250.300/24"],
            1,
            vec!["bad --address \"198.18.250.300/24\""],
        ),
        (
            vec![
                "--net",
                "--veth",
                "br0",
                "--address",
                addr,
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
                addr,
                "--gateway",
                "198.18.249.1",
            ],
            1,
            vec!["198.18.249.1", "eth0"],
        ),
    ] {
        let mut full = vec!["run", "--job", &job];
        full.extend(&args);
        let marker = dir.path.to_string_lossy().into_owned();
        // The command names the work dir, so a leftover would be found.
        full.extend(["--", "/bin/sleep", "30", &marker]);
        let run = agent_in(&prefix, &full, &dir, "run");
        assert_eq!(run.code, Some(code), "{}", run.describe());
        for n in needles {
            assert!(
                run.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                run.describe()
            );
        }
        assert_nothing_left(&lab, &dir, &job);
    }
}

#[test]
fn dump_refuses_other_interfaces_and_the_job_runs_on() {
    if skip() {
        return;
    }
    let lab = Lab::new("br0", 0);
    let job = job_id("kinds");
    let _cg = JobCgroupGuard(job.clone());
    let dir = Workdir::for_job("job-net-kinds");
    let (mut case, _) = start(&lab, "br0", &job, &dir);
    let pid = case.pid.to_string();
    let in_job = |args: &[&str]| {
        let mut c = vec!["nsenter", "-t", &pid, "-n", "ip"];
        c.extend_from_slice(args);
        sh(&c).unwrap();
    };
    let images = dir.join("images");
    let prefix = lab.prefix_refs();
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
        let run = dump_in(&prefix, case.pid, &images, &[], &dir);
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
