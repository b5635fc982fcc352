//! The simulated cluster, end to end. Needs root. Every test owns its own lab, so they run in
//! parallel; each lab is torn down by Drop even when an assertion fails.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_lab::Lab;
use common::*;

#[test]
fn two_nodes_talk_tcp_over_the_fabric() {
    require_root();
    let lab = Lab::up(2).unwrap();
    let (n1, n2) = (lab.node(1), lab.node(2));
    assert_eq!(
        n1.address(),
        std::net::Ipv4Addr::new(198, 18, lab.number(), 1)
    );
    // The socket belongs to node 1's namespace for life, though the thread that made it is gone.
    let listener = listen_in(n1.netns_path(), n1.address());
    let to = listener.local_addr().unwrap();
    let server = serve_once(listener, b"pong");
    let answer = exchange(n2, to, b"ping").unwrap();
    assert_eq!(answer, b"pong");
    assert_eq!(server.join().unwrap().unwrap(), b"ping");

    // The same address from the root namespace hits the prohibit route and fails locally.
    let t = Instant::now();
    let err = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}: {err}",
        t.elapsed()
    );
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
}

#[test]
fn job_address_moves_with_the_job_to_another_node() {
    require_root();
    let lab = Lab::up(3).unwrap();
    let k = lab.number();
    let job = lab.job_address(0);
    let mac = "02:00:00:00:00:01";
    // Named with the lab's prefix, so teardown removes it even if an assertion fails first.
    let job_ns = format!("{}job0", lab.netns_prefix());
    let job_path = Path::new("/run/netns").join(&job_ns);
    let ipns = |op: &str| {
        let st = Command::new("ip")
            .args(["netns", op, &job_ns])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns {op} {job_ns}");
        if op == "add" {
            // IPv6 chatter (DAD, MLD) from the new interface would teach the bridges the MAC's
            // new place by chance, a second or so later; the test must show the lab does it.
            ckpt_lab::in_netns_path(&job_path, || {
                std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
            })
            .unwrap()
            .unwrap();
        }
    };

    ipns("add");
    lab.node(1)
        .attach_netns("job0", &job_path, job, Some(mac))
        .unwrap();
    // Nodes 2 and 3 both talk to the job, so their ARP caches and every bridge know its MAC
    // behind node 1: the hard case for the move below.
    for n in [2, 3] {
        let l = listen_in(&job_path, job);
        let to = l.local_addr().unwrap();
        let server = serve_once(l, b"was1");
        assert_eq!(exchange(lab.node(n), to, b"hi-1").unwrap(), b"was1");
        assert_eq!(server.join().unwrap().unwrap(), b"hi-1");
    }
    let to = SocketAddr::from((job, 7));

    // Node 1 is lost: its address and the job's are gone from the fabric.
    lab.node(1).destroy().unwrap();
    let n1_addr = SocketAddr::from((lab.node(1).address(), 22));
    assert!(unreachable(
        lab.node(2),
        n1_addr,
        Duration::from_millis(300)
    ));
    assert!(unreachable(lab.node(2), to, Duration::from_millis(300)));

    // The job restarts on node 2 in a new namespace with the same address and MAC.
    ipns("del");
    ipns("add");
    lab.node(2)
        .attach_netns("job0", &job_path, job, Some(mac))
        .unwrap();
    let l = listen_in(&job_path, job);
    let to = l.local_addr().unwrap();
    let server = serve_once(l, b"was2");
    let t = Instant::now();
    assert_eq!(exchange(lab.node(3), to, b"hi-3").unwrap(), b"was2");
    assert_eq!(server.join().unwrap().unwrap(), b"hi-3");
    // Connect is immediate when the bridges know the new port, and takes 1 s (a SYN
    // retransmission) or fails outright when they still send the MAC to the old node.
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "reaching the moved job took {:?}",
        t.elapsed()
    );
    let l = listen_in(&job_path, job);
    let to = l.local_addr().unwrap();
    let server = serve_once(l, b"loc2");
    assert_eq!(exchange(lab.node(2), to, b"hi-2").unwrap(), b"loc2");
    assert_eq!(server.join().unwrap().unwrap(), b"hi-2");

    lab.down().unwrap();
    assert_gone(k);
}

#[test]
fn each_node_has_its_own_hostname_and_sees_the_cgroups() {
    require_root();
    let lab = Lab::up(2).unwrap();
    let mut seen = Vec::new();
    for node in lab.nodes() {
        let out = node.command("hostname").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let name = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(name, node.hostname());
        seen.push(name);

        // Why nsenter and not `ip netns exec`: the cgroup mounts must stay visible.
        let out = node.command("ls").arg("/sys/fs/cgroup").output().unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{out:?}");

        let out = node
            .command("ip")
            .args(["-br", "addr", "show", "dev", node.bridge()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("{}/24", node.address())),
            "{}: {text}",
            node.name()
        );
    }
    assert_ne!(seen[0], seen[1]);
    let mine = nix::unistd::gethostname().unwrap();
    assert!(!seen.iter().any(|s| *s == *mine.to_string_lossy()));
}

#[test]
fn destroying_a_node_kills_its_processes_and_removes_it() {
    require_root();
    let lab = Lab::up(2).unwrap();
    let k = lab.number();
    let (n1, n2) = (lab.node(1), lab.node(2));
    // One process the lab tracks, one it does not: both must die with the node.
    let tracked = n2.spawn(n2.command("sleep").arg("1000")).unwrap();
    let mut untracked = n2.command("sleep").arg("1000").spawn().unwrap();
    let shell = n2
        .spawn(
            n2.command("sh")
                .args(["-c", "sleep 1000 & echo $!; wait"])
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let mut line = String::new();
    BufReader::new(shell.take_stdout().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grandchild = line.trim().to_string();
    assert!(Path::new(&format!("/proc/{grandchild}")).exists());

    n2.destroy().unwrap();
    assert!(!n2.exists());
    assert!(
        tracked.try_wait().unwrap().is_some(),
        "tracked sleep survived"
    );
    let st = untracked.wait().unwrap();
    assert!(!st.success(), "untracked sleep ended with {st}");
    // Not our child, so it is reaped by init: gone from /proc, or a zombie at most.
    let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "grandchild alive: {stat}"
    );
    assert!(!Path::new(&format!("/run/ckpt-lab/{k}/uts/n2")).exists());
    let fab = Command::new("ip")
        .args(["-n", &lab.fabric_netns(), "link", "show", "n2"])
        .output()
        .unwrap();
    assert!(!fab.status.success(), "fabric port n2 still there");
    assert!(unreachable(
        n1,
        SocketAddr::from((n2.address(), 22)),
        Duration::from_millis(300)
    ));
    // Destroying again is harmless, and the lab knows the node is gone.
    n2.destroy().unwrap();
    assert!(lab.find_node("n2").is_err());
    assert!(lab.find_node("1").is_ok());
    drop(lab);
    assert_gone(k);
}

/// `sleep 1000` in network and UTS namespaces of its own, like a job; killed when dropped, so
/// that a failing test leaves nothing behind.
struct Job(std::process::Child);

impl Job {
    /// Starts it from this process (not from any node) and waits until it is in its namespaces.
    fn start() -> Job {
        let child = Command::new("unshare")
            .args(["--net", "--uts", "sleep", "1000"])
            .spawn()
            .unwrap();
        let job = Job(child);
        wait_left(job.pid(), Path::new("/proc/self/ns/net"));
        job
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn netns(&self) -> std::path::PathBuf {
        format!("/proc/{}/ns/net", self.pid()).into()
    }

    /// Whether it has died (and is now reaped).
    fn dead(&mut self) -> bool {
        self.0.try_wait().unwrap().is_some()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until process `pid` has left the network namespace at `from` (its unshare has run).
fn wait_left(pid: u32, from: &Path) {
    use std::os::unix::fs::MetadataExt;
    // The namespace's identity is the inode both paths lead to (a /run/netns file is a bind mount,
    // not a link).
    let ino = |p: &Path| std::fs::metadata(p).ok().map(|m| m.ino());
    let old = ino(from).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ino(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(old) {
        assert!(
            Instant::now() < deadline,
            "{pid} never unshared its namespaces"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Alive, not a zombie.
fn running(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z")
}

#[test]
fn destroying_a_node_kills_its_jobs() {
    require_root();
    let lab = Lab::up(2).unwrap();
    let k = lab.number();
    let (n1, n2) = (lab.node(1), lab.node(2));
    // Plugged into node 1, but started by nobody on it (as a job restored with --detach is once
    // its agent has exited): only its veth ties it to the node.
    let mut attached = Job::start();
    n1.attach_netns("job0", &attached.netns(), lab.job_address(0), None)
        .unwrap();
    // The same on node 2, which stays.
    let mut elsewhere = Job::start();
    n2.attach_netns("job1", &elsewhere.netns(), lab.job_address(1), None)
        .unwrap();
    // Forked by a process on node 1 into namespaces of its own and plugged into nothing (yet),
    // as an agent starts a job: only its ancestry ties it to the node.
    let shell = n1
        .spawn(
            n1.command("sh")
                .args(["-c", "unshare --net --uts sleep 1000 & echo $!; wait"])
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let mut line = String::new();
    BufReader::new(shell.take_stdout().unwrap())
        .read_line(&mut line)
        .unwrap();
    let forked = line.trim().to_string();
    wait_left(forked.parse().unwrap(), n1.netns_path());
    assert!(!attached.dead() && running(&forked));

    n1.destroy().unwrap();
    assert!(attached.dead(), "the job attached to node 1 survived it");
    assert!(!running(&forked), "the job forked on node 1 survived it");
    assert!(
        !elsewhere.dead(),
        "the job on node 2 died with node 1: {}",
        elsewhere.pid()
    );
    // Node 2's jobs go with the lab.
    drop(lab);
    assert!(elsewhere.dead(), "the job on node 2 survived the lab");
    assert_gone(k);
}

#[test]
fn drop_removes_everything_including_stray_processes() {
    require_root();
    let lab = Lab::up(2).unwrap();
    let k = lab.number();
    assert!(lab.shared_dir().is_dir());
    std::fs::write(lab.shared_dir().join("file"), b"x").unwrap();
    assert!(!remains(k).is_empty());
    let _tracked = lab
        .node(1)
        .spawn(lab.node(1).command("sleep").arg("1000"))
        .unwrap();
    let mut untracked = lab.node(2).command("sleep").arg("1000").spawn().unwrap();
    drop(lab);
    assert_gone(k);
    assert!(untracked.try_wait().unwrap().is_some(), "sleep survived");
}

#[test]
fn a_panic_inside_a_node_still_removes_the_lab() {
    require_root();
    let k = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::up(2).unwrap();
        *k.lock().unwrap() = Some(lab.number());
        lab.node(1).in_netns(|| panic!("boom in the node")).unwrap();
    });
    let payload = result.expect_err("the panic must reach the caller");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in the node"));
    assert_gone(k.into_inner().unwrap().expect("lab was built"));
}

#[test]
fn concurrent_labs_get_different_numbers_and_both_work() {
    require_root();
    let run = || {
        let lab = Lab::up(2).unwrap();
        let l = listen_in(lab.node(2).netns_path(), lab.node(2).address());
        let to = l.local_addr().unwrap();
        let server = serve_once(l, b"ok!!");
        assert_eq!(exchange(lab.node(1), to, b"labx").unwrap(), b"ok!!");
        server.join().unwrap().unwrap();
        lab
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(run);
        let b = s.spawn(run);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.number(), b.number());
    // Separate subnets and fabrics: lab a's node cannot reach lab b's.
    let other = SocketAddr::from((b.node(1).address(), 22));
    assert!(unreachable(a.node(1), other, Duration::from_millis(300)));
    let (ka, kb) = (a.number(), b.number());
    drop(a);
    assert_gone(ka);
    assert!(b.node(1).exists());
    drop(b);
    assert_gone(kb);
}

/// Run only as the child of `sweep_removes_a_lab_whose_owner_died`: builds a lab, starts a
/// process on it, reports both and waits to be killed.
#[test]
fn child_holding_a_lab() {
    if std::env::var_os("CKPT_LAB_SWEEP_CHILD").is_none() {
        return;
    }
    let lab = Lab::up(2).unwrap();
    let p = lab
        .node(1)
        .spawn(lab.node(1).command("sleep").arg("1000"))
        .unwrap();
    println!("LAB={} SLEEP={}", lab.number(), p.pid());
    std::thread::sleep(Duration::from_secs(30));
    panic!("child_holding_a_lab was not killed");
}

/// Removes a persisted lab when the test ends, passed or failed.
struct DownOnDrop(u8);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if let Ok(lab) = Lab::open(self.0) {
            let _ = lab.down();
        }
    }
}

#[test]
fn sweep_removes_a_lab_whose_owner_died() {
    require_root();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holding_a_lab",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CKPT_LAB_SWEEP_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut found = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The harness prints "test NAME ... " before the line, without a newline.
        if let Some((_, rest)) = line.split_once("LAB=") {
            let (k, sleep) = rest.split_once(" SLEEP=").unwrap();
            found = Some((k.parse::<u8>().unwrap(), sleep.to_string()));
            break;
        }
    }
    // SIGKILL: the child gets no chance to run Drop, as when a test run is killed.
    child.kill().unwrap();
    let (k, sleep) = found.expect("child printed its lab");
    assert!(!remains(k).is_empty());
    // Until the kernel has made it a zombie, the child still counts as a live owner.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
        .unwrap()
        .contains(") Z")
    {
        assert!(Instant::now() < deadline, "killed child did not die");
        std::thread::sleep(Duration::from_millis(5));
    }

    // A lab handed over to nobody (as `ckpt-lab up` does) is not stale.
    let kept = Lab::up(1).unwrap().persist().unwrap();
    let _kept_guard = DownOnDrop(kept);
    // A lab whose owner lives (this test process) is not stale either.
    let live = Lab::up(1).unwrap();

    // Not reaped yet: a zombie owner counts as dead.
    let swept = Lab::sweep_stale().unwrap();
    child.wait().unwrap();
    assert!(swept.contains(&k), "swept {swept:?}, not {k}");
    assert_gone(k);
    let stat = std::fs::read_to_string(format!("/proc/{sleep}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "sleep on the swept lab survived: {stat}"
    );
    assert!(!swept.contains(&kept) && !swept.contains(&live.number()));
    assert!(live.node(1).exists());
    assert!(Lab::open(kept).unwrap().node(1).exists());
    Lab::open(kept).unwrap().down().unwrap();
    assert_gone(kept);
}

#[test]
fn bad_node_counts_are_refused() {
    assert!(matches!(
        Lab::up(0),
        Err(ckpt_lab::LabError::NodeCount { .. })
    ));
    assert!(matches!(
        Lab::up(100),
        Err(ckpt_lab::LabError::NodeCount { .. })
    ));
}
