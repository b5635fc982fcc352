//! A job in two parts on two nodes of a simulated cluster (ckpt-lab), the
//! parts streaming to each other over TCP on the job's own addresses: both
//! parts are checkpointed by their nodes' agents, both nodes are destroyed
//! (namespaces, agents, addresses), both parts are restored by the agents of
//! two other nodes, and the stream goes on byte-exact on the same sockets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_lab::{Lab, Node};
use ckpt_tests::{
    dump_in, no_checkpoint, on, parts_flow, restore_detached_in, strs, CaseProcess, JobCgroupGuard,
    StreamPeer, TcpPart, Workdir,
};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");

/// One part: the running part, its job id and where its images go.
struct Part {
    tcp: TcpPart,
    job: String,
    images: PathBuf,
}

/// Runs `ip ARGS` in `node`'s network namespace.
fn ip(node: &Node, args: &[&str]) {
    let st = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns_path().display()))
        .arg("ip")
        .args(args)
        .status()
        .expect("nsenter ip");
    assert!(
        st.success(),
        "ip {} on {} failed",
        args.join(" "),
        node.name()
    );
}

/// Makes `node` take over `addr` the way an address manager does: the
/// address on its bridge, then a gratuitous ARP (the kernel sends one for
/// every address of a device whose MAC is set, with arp_notify on), so
/// that peers stop sending to the old owner's MAC.
fn take_over(node: &Node, addr: std::net::Ipv4Addr) {
    ip(
        node,
        &["addr", "add", &format!("{addr}/24"), "dev", node.bridge()],
    );
    let sysctl = "/proc/sys/net/ipv4/conf/br0/arp_notify";
    let st = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns_path().display()))
        .args(["sh", "-c", &format!("echo 1 > {sysctl}")])
        .status()
        .unwrap();
    assert!(st.success());
    let mac = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns_path().display()))
        .args(["ip", "-o", "link", "show", "dev", node.bridge()])
        .output()
        .unwrap();
    // /sys is the root namespace's here: ask ip.
    let text = String::from_utf8_lossy(&mac.stdout).into_owned();
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"))
        .to_string();
    ip(
        node,
        &["link", "set", "dev", node.bridge(), "address", &mac],
    );
}

/// The lock tables in the network namespace of process `pid`.
fn lock_tables_of(pid: i32) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["nft", "list", "tables"])
        .output()
        .expect("nsenter nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tcp_parts_move_to_other_nodes() {
    if no_checkpoint() {
        return;
    }
    let lab = Lab::up(4).expect("bring up a lab of 4 nodes");
    let k = lab.number();
    let parts: Vec<Part> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(j, name)| Part {
            tcp: TcpPart {
                dir: Workdir::for_job(&format!("multinode-{name}")),
                addr: lab.job_address(j as u8),
                mac: format!("02:00:c6:12:{k:02x}:{:02x}", 100 + j),
            },
            job: format!("mn{k}-{name}-{}", std::process::id()),
            images: lab.shared_dir().join(format!("part-{name}")),
        })
        .collect();
    let _cgroups: Vec<JobCgroupGuard> = parts
        .iter()
        .map(|p| JobCgroupGuard(p.job.clone()))
        .collect();
    let (a, b) = (&parts[0], &parts[1]);
    let case_bin = Path::new(CASE_BIN);
    let mut ca = a
        .tcp
        .start(case_bin, &a.job, lab.node(1), "listen", a.tcp.addr);
    let mut cb = b
        .tcp
        .start(case_bin, &b.job, lab.node(2), "connect", a.tcp.addr);
    ca.wait_ready().unwrap();
    cb.wait_ready().unwrap();
    parts_flow(&[&a.tcp, &b.tcp], 20_000, Duration::from_secs(10)).unwrap();

    // Both parts checkpointed at once, each by its node's agent.
    let dumps = std::thread::scope(|s| {
        [(a, &ca, lab.node(1)), (b, &cb, lab.node(2))]
            .map(|(p, c, n)| {
                let prefix = on(n);
                let pid = c.pid;
                s.spawn(move || {
                    dump_in(
                        &strs(&prefix),
                        pid,
                        &p.images,
                        &["--tcp-established"],
                        &p.tcp.dir,
                    )
                })
            })
            .map(|h| h.join().unwrap())
    });
    for d in &dumps {
        assert!(d.ok(), "dump failed:\n{}", d.describe());
    }
    ca.expect_gone().unwrap();
    cb.expect_gone().unwrap();
    let before = (a.tcp.received(), b.tcp.received());

    // The old nodes go away, with their agents and addresses.
    lab.node(1).destroy().unwrap();
    lab.node(2).destroy().unwrap();

    for (p, c, n) in [(a, &mut ca, lab.node(3)), (b, &mut cb, lab.node(4))] {
        let (run, pid) = restore_detached_in(
            &strs(&on(n)),
            &p.images,
            &["--tcp-established"],
            &p.tcp.dir,
            "restore",
        );
        if let Some(pid) = pid {
            c.pid = pid;
            c.adopt_restored();
        }
        assert!(
            run.ok(),
            "restore of {} on {} failed:\n{}",
            p.job,
            n.name(),
            run.describe()
        );
        assert!(
            !lock_tables_of(c.pid).contains("ckpt_"),
            "a lock was left in the restored job's namespace"
        );
    }
    parts_flow(&[&a.tcp, &b.tcp], 100_000, Duration::from_secs(20)).unwrap_or_else(|e| {
        panic!(
            "after the move ({before:?} before): {e}\ncase logs:\n{}\n{}",
            ca.log_text(),
            cb.log_text()
        )
    });
    // Both told to stop at once: neither sees its peer vanish mid-stream.
    ca.terminate("part a").unwrap();
    cb.terminate("part b").unwrap();
    ca.check_exit("part a, restored on node 3").unwrap();
    cb.check_exit("part b, restored on node 4").unwrap();
    lab.down().unwrap();
}

/// A process living in its node's network namespace (not a job's own), on
/// an address of that node: dumped by the node's agent, restored by the
/// agent of the node that took the address over, into that agent's
/// namespace; its connection to a peer on a third node goes on.
#[test]
fn node_process_follows_its_address() {
    if no_checkpoint() {
        return;
    }
    let lab = Lab::up(3).expect("bring up a lab of 3 nodes");
    let service = lab.job_address(20);
    ip(
        lab.node(1),
        &["addr", "add", &format!("{service}/24"), "dev", "br0"],
    );
    // The peer listens on node 3.
    let n3 = lab.node(3).address();
    let listener = lab
        .node(3)
        .in_netns(|| std::net::TcpListener::bind((n3, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = Workdir::new("node-process");
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("peer"), format!("{n3}:{port} {service}")).unwrap();
    let mut case =
        CaseProcess::spawn_in(&on(lab.node(1)), Path::new(CASE_BIN), "tcp_stream", &dir).unwrap();
    let peer = StreamPeer::start(listener);
    case.wait_ready().unwrap();
    peer.flows(20_000, Duration::from_secs(5)).unwrap();
    let images = lab.shared_dir().join("node-process");
    let run = dump_in(
        &strs(&on(lab.node(1))),
        case.pid,
        &images,
        &["--tcp-established"],
        &dir,
    );
    assert!(run.ok(), "dump failed:\n{}", run.describe());
    case.expect_gone().unwrap();
    lab.node(1).destroy().unwrap();
    // Node 2 blocks the connection before the address comes to it: the
    // peer's retransmissions must not meet a reset before the restore.
    let images_s = images.display().to_string();
    let lock = ckpt_tests::agent_in(
        &strs(&on(lab.node(2))),
        &["lock", "--images", &images_s],
        &dir,
        "lock",
    );
    assert!(lock.ok(), "lock ahead failed:\n{}", lock.describe());
    take_over(lab.node(2), service);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        peer.error(),
        None,
        "the peer saw an error before the restore"
    );
    let (run, pid) = restore_detached_in(
        &strs(&on(lab.node(2))),
        &images,
        &["--tcp-established"],
        &dir,
        "restore",
    );
    if pid == Some(case.pid) {
        case.adopt_restored();
    }
    assert!(run.ok(), "restore on node 2 failed:\n{}", run.describe());
    let ns = |p: &str| std::fs::read_link(p).ok();
    assert_eq!(
        ns(&format!("/proc/{}/ns/net", case.pid)),
        ns(&lab.node(2).netns_path().display().to_string()).or_else(|| {
            std::fs::metadata(lab.node(2).netns_path()).ok().map(|m| {
                PathBuf::from(format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&m)))
            })
        }),
        "restored into node 2's namespace"
    );
    peer.flows(50_000, Duration::from_secs(10)).unwrap();
    case.terminate_and_check("restored on node 2").unwrap();
    peer.finish();
    lab.down().unwrap();
}
