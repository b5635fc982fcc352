//! A simulated cluster on one machine: each node is a network namespace plus a UTS namespace,
//! joined to a fabric bridge; a directory under /var/tmp stands in for the shared file system.
//!
//! Lab K uses only 198.18.K.0/24: nodes are .1 to .99, job addresses .100 and up. Everything a
//! lab creates is named after K (`ckl<K>-*` namespaces, /run/ckpt-lab/<K>, /var/tmp/ckpt-lab-<K>,
//! a `prohibit` route with protocol [`ROUTE_PROTO`]) so that teardown and `sweep` can find it
//! again even when the process that built it is gone. See docs/LAB.md.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cmd;
mod error;
mod peers;
mod procs;
mod record;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

pub use error::LabError;
pub use record::{Owner, RUN_DIR};

use cmd::{ip, run, run_input};
use record::{lab_dir, Record};

/// Largest node count: node addresses must stay below the job addresses at .100.
pub const MAX_NODES: usize = 99;
/// Name of the bridge inside each node that the uplink and job veths are enslaved to.
pub const NODE_BRIDGE: &str = "br0";
/// Name of the bridge in the fabric namespace that joins the nodes.
pub const FABRIC_BRIDGE: &str = "fab0";
/// Name of a node's end of its fabric veth pair (the fabric end is `n<i>`).
pub const UPLINK: &str = "uplink";
/// Routing protocol number on the lab's `prohibit` route, marking it as ours so that teardown
/// never removes a route someone else added for the same prefix.
pub const ROUTE_PROTO: u8 = 245;
/// Where the per-lab shared directories live: not /tmp, which jobs see privately.
pub const VAR_DIR: &str = "/var/tmp";

const NETNS_DIR: &str = "/run/netns";
const PREFIX_LEN: u8 = 24;
const FORWARDING_TIMEOUT: Duration = Duration::from_secs(5);

/// Namespace name prefix of lab `k`; every namespace with it is removed with the lab.
pub fn netns_prefix(k: u8) -> String {
    format!("ckl{k}-")
}

/// Name of node `i` of lab `k`: its network namespace name and its hostname.
pub fn node_name(k: u8, i: usize) -> String {
    format!("ckl{k}-n{i}")
}

/// Name of lab `k`'s fabric network namespace.
pub fn fabric_netns(k: u8) -> String {
    format!("ckl{k}-fab")
}

/// /var/tmp/ckpt-lab-<K>: removed with the lab.
fn var_dir(k: u8) -> PathBuf {
    PathBuf::from(VAR_DIR).join(format!("ckpt-lab-{k}"))
}

/// The directory every node of lab `k` sees, standing in for a cluster file system.
pub fn shared_dir(k: u8) -> PathBuf {
    var_dir(k).join("shared")
}

fn uts_dir(k: u8) -> PathBuf {
    lab_dir(k).join("uts")
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// An IPv4 subnet, printed as `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Subnet {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl Subnet {
    /// Whether `addr` is inside the subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(addr) & mask == u32::from(self.network) & mask
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        let host = u32::MAX
            .checked_shr(u32::from(self.prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.network) | host)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Lab `k`'s subnet, 198.18.K.0/24.
pub fn subnet(k: u8) -> Subnet {
    Subnet {
        network: Ipv4Addr::new(198, 18, k, 0),
        prefix_len: PREFIX_LEN,
    }
}

/// Children spawned on nodes, killed and reaped at node destruction and at teardown.
#[derive(Default)]
struct Tracked {
    children: Mutex<Vec<TrackedChild>>,
}

struct TrackedChild {
    node: usize,
    pid: u32,
    child: Arc<Mutex<Child>>,
}

/// Locks even after a panic elsewhere: teardown must still run while a test unwinds.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracked {
    /// Kills and reaps the tracked children of `node` (all if None).
    fn kill(&self, node: Option<usize>) {
        let mut list = lock(&self.children);
        list.retain(|t| {
            if node.is_some_and(|n| n != t.node) {
                return true;
            }
            match t.child.try_lock() {
                Ok(mut c) => {
                    if let Ok(None) = c.try_wait() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
                // Someone is blocked in wait() on it, so it is unreaped and the pid still its own.
                Err(_) => {
                    let _ = kill(Pid::from_raw(t.pid as i32), Signal::SIGKILL);
                }
            }
            false
        });
    }
}

/// A process started on a node with [`Node::spawn`]; the lab kills it at teardown.
pub struct NodeProcess {
    pid: u32,
    child: Arc<Mutex<Child>>,
}

impl NodeProcess {
    /// Its pid (that of the program itself: nsenter execs it without forking).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for it to exit.
    pub fn wait(&self) -> io::Result<ExitStatus> {
        lock(&self.child).wait()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        lock(&self.child).try_wait()
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&self) -> io::Result<ExitStatus> {
        let mut c = lock(&self.child);
        if c.try_wait()?.is_none() {
            c.kill()?;
        }
        c.wait()
    }

    /// Its stdin, if it was piped and not yet taken.
    pub fn take_stdin(&self) -> Option<ChildStdin> {
        lock(&self.child).stdin.take()
    }

    /// Its stdout, if it was piped and not yet taken.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        lock(&self.child).stdout.take()
    }

    /// Its stderr, if it was piped and not yet taken.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        lock(&self.child).stderr.take()
    }
}

/// One simulated node: a network namespace with bridge `br0` holding the node's address, and a
/// UTS namespace whose hostname is the node's name.
pub struct Node {
    lab: u8,
    index: usize,
    name: String,
    netns_path: PathBuf,
    uts_path: PathBuf,
    address: Ipv4Addr,
    tracked: Arc<Tracked>,
}

impl Node {
    fn new(lab: u8, index: usize, tracked: Arc<Tracked>) -> Node {
        let name = node_name(lab, index);
        Node {
            lab,
            index,
            netns_path: netns_path(&name),
            uts_path: uts_dir(lab).join(format!("n{index}")),
            address: Ipv4Addr::new(198, 18, lab, index as u8),
            name,
            tracked,
        }
    }

    /// The node's name, `ckl<K>-n<i>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's number i, from 1.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Name of the node's network namespace (as `ip netns` knows it).
    pub fn netns(&self) -> &str {
        &self.name
    }

    /// /run/netns/NAME, for `nsenter --net=` and setns.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The bind mount that keeps the node's UTS namespace alive, for `nsenter --uts=`.
    pub fn uts_path(&self) -> &Path {
        &self.uts_path
    }

    /// The node's address 198.18.K.i, on its `br0`.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The hostname processes on this node see.
    pub fn hostname(&self) -> &str {
        &self.name
    }

    /// The node-local bridge that job veths are enslaved to.
    pub fn bridge(&self) -> &str {
        NODE_BRIDGE
    }

    /// Whether the node still exists (it has not been destroyed).
    pub fn exists(&self) -> bool {
        self.netns_path.exists()
    }

    /// A command that runs `program` in this node's network and UTS namespaces. `nsenter` rather
    /// than `ip netns exec`, which remounts /sys and so hides the cgroup mounts an agent needs.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path.display()))
            .arg(format!("--uts={}", self.uts_path.display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Spawns `cmd` (normally from [`Node::command`]) and tracks it so teardown kills it.
    pub fn spawn(&self, cmd: &mut Command) -> Result<NodeProcess, LabError> {
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            context: format!("starting a process on {}", self.name),
            command: cmd::describe(cmd),
            source,
        })?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        lock(&self.tracked.children).push(TrackedChild {
            node: self.index,
            pid,
            child: child.clone(),
        });
        let process = NodeProcess { pid, child };
        if cmd.get_program() == "nsenter" {
            self.wait_entered(&process)?;
        }
        Ok(process)
    }

    /// Waits until `p` is inside the node's network namespace (or has exited): spawn returns once
    /// nsenter is exec'd, before its setns, and callers expect a process that is on the node.
    fn wait_entered(&self, p: &NodeProcess) -> Result<(), LabError> {
        let Some(inode) = procs::ns_inode(&self.netns_path) else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !procs::in_net_ns(p.pid, inode) {
            if !matches!(p.try_wait(), Ok(None)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!("process {} to enter {}", p.pid, self.name),
                    secs: 5,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered this node's network namespace (so sockets it opens
    /// live there) and returns its result; a panic in `f` is resumed in the caller.
    pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, LabError> {
        in_netns_path(&self.netns_path, f)
    }

    /// Connects the network namespace at `netns_path` to this node's `br0` the way an agent
    /// connects a job: a veth pair with end `port` on `br0` and end `eth0` (MAC `mac` if given)
    /// holding `address`/24 in the other namespace. Then announces the address, because after a
    /// move every bridge still sends the MAC towards the old node until it hears from it.
    pub fn attach_netns(
        &self,
        port: &str,
        netns_path: &Path,
        address: Ipv4Addr,
        mac: Option<&str>,
    ) -> Result<(), LabError> {
        let ctx = format!(
            "attaching {} to {}:{} as {address}",
            netns_path.display(),
            self.name,
            NODE_BRIDGE
        );
        let target = netns_path.to_string_lossy();
        let mut args = vec!["link", "add", port, "type", "veth", "peer", "name", "eth0"];
        if let Some(m) = mac {
            args.extend(["address", m]);
        }
        args.extend(["netns", &target]);
        run(&ctx, &mut ip(Some(&self.name), &args))?;
        run(
            &ctx,
            &mut ip(
                Some(&self.name),
                &["link", "set", port, "master", NODE_BRIDGE, "up"],
            ),
        )?;
        let mut inside = Command::new("nsenter");
        inside
            .arg(format!("--net={}", netns_path.display()))
            .args(["ip", "-batch", "-"]);
        let batch =
            format!("link set lo up\naddr add {address}/{PREFIX_LEN} dev eth0\nlink set eth0 up\n");
        run_input(&ctx, &mut inside, Some(&batch))?;
        wait_forwarding(&self.name, Some(port))?;
        announce(netns_path, address)
    }

    /// Simulates losing the node: kills every process in its network or UTS namespace, every
    /// process in a network namespace plugged into it by a veth (its jobs, which have namespaces
    /// of their own), and every descendant of one of those, then removes its fabric veth (at
    /// once, so its addresses leave the fabric now rather than when the kernel gets round to
    /// freeing the namespace), the namespace and the UTS bind mount.
    pub fn destroy(&self) -> Result<(), LabError> {
        tracing::info!(node = %self.name, "destroying node");
        let mut problems = Vec::new();
        let mut inodes: HashSet<u64> = [&self.netns_path, &self.uts_path]
            .iter()
            .filter_map(|p| procs::ns_inode(p))
            .collect();
        // The node's own processes first: once its agents are gone, nobody plugs in a new job
        // while we look for the jobs.
        if let Err(e) = procs::kill_members(&inodes, &self.name) {
            problems.push(e.to_string());
        }
        self.tracked.kill(Some(self.index));
        let jobs = peers::attached_netns(&self.name, &node_inodes(self.lab));
        if !jobs.is_empty() {
            tracing::debug!(node = %self.name, namespaces = jobs.len(), "killing the node's jobs");
            inodes.extend(jobs);
            if let Err(e) = procs::kill_members(&inodes, &self.name) {
                problems.push(e.to_string());
            }
        }
        let fab = fabric_netns(self.lab);
        let port = format!("n{}", self.index);
        if netns_path(&fab).exists() {
            let r = run(
                &format!("removing {}'s fabric port {port} in {fab}", self.name),
                &mut ip(Some(&fab), &["link", "del", &port]),
            );
            if let Err(e) = r {
                if link_exists(&fab, &port) {
                    problems.push(e.to_string());
                }
            }
        }
        if let Err(e) = delete_netns(&self.name) {
            problems.push(e.to_string());
        }
        if let Err(e) = remove_uts(&self.uts_path) {
            problems.push(e.to_string());
        }
        // Anyone who opened the namespace files before they went is found now.
        if let Err(e) = procs::kill_members(&inodes, &self.name) {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown {
                lab: self.lab,
                problems,
            })
        }
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path` and returns its result;
/// a panic in `f` is resumed in the caller. Only that thread changes namespace.
pub fn in_netns_path<T: Send, F: FnOnce() -> T + Send>(path: &Path, f: F) -> Result<T, LabError> {
    let ns = fs::File::open(path).map_err(|e| LabError::io("opening namespace", path, e))?;
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| LabError::sys("entering network namespace", path, e))?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Sends one broadcast datagram from `address` inside the network namespace at `path`, so that
/// every bridge of the lab learns where that address's MAC now is (198.18.K.0/24 assumed).
/// Needed after a job moves with its MAC: otherwise the bridges keep forwarding to the old node
/// until their entries age out (300 s). The kernel's `arp_notify` does not help here: its
/// gratuitous ARP goes out before the new bridge port forwards.
pub fn announce(path: &Path, address: Ipv4Addr) -> Result<(), LabError> {
    let [a, b, c, _] = address.octets();
    let bcast = Subnet {
        network: Ipv4Addr::new(a, b, c, 0),
        prefix_len: PREFIX_LEN,
    }
    .broadcast();
    let what = format!("announcing {address} from {}", path.display());
    in_netns_path(path, || -> io::Result<()> {
        let s = UdpSocket::bind((address, 0))?;
        s.set_broadcast(true)?;
        // Port 9 (discard): nobody answers, and no ICMP error is sent for broadcasts.
        s.send_to(b"ckpt-lab announce", (bcast, 9))?;
        Ok(())
    })?
    .map_err(|e| LabError::io(what, path, e))
}

/// Whether interface `dev` exists in namespace `ns`.
fn link_exists(ns: &str, dev: &str) -> bool {
    ip(Some(ns), &["link", "show", "dev", dev])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deletes a named network namespace; already gone is fine, so teardown can be repeated.
fn delete_netns(name: &str) -> Result<(), LabError> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    match run(
        &format!("deleting network namespace {name}"),
        &mut ip(None, &["netns", "del", name]),
    ) {
        Err(e) if netns_path(name).exists() => Err(e),
        _ => Ok(()),
    }
}

/// Unmounts and removes a UTS bind file; already gone is fine.
fn remove_uts(path: &Path) -> Result<(), LabError> {
    if !path.exists() {
        return Ok(());
    }
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (the bind never happened): just a file to remove.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(LabError::sys("unmounting UTS namespace", path, e)),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(LabError::io("removing", path, e)),
        _ => Ok(()),
    }
}

/// Waits until every bridge port in namespace `ns` (or just `port`) forwards, because frames sent
/// before that are dropped and the first packets of a test would then depend on retransmits.
fn wait_forwarding(ns: &str, port: Option<&str>) -> Result<(), LabError> {
    let ctx = format!("reading bridge port states in {ns}");
    let deadline = Instant::now() + FORWARDING_TIMEOUT;
    loop {
        let mut c = Command::new("bridge");
        c.args(["-n", ns, "-j", "link", "show"]);
        if let Some(p) = port {
            c.args(["dev", p]);
        }
        let out = run(&ctx, &mut c)?;
        let ports: Vec<serde_json::Value> =
            serde_json::from_str(out.trim()).map_err(|e| LabError::Record {
                path: PathBuf::from(format!("bridge -n {ns} -j link show")),
                why: e.to_string(),
            })?;
        let waiting: Vec<String> = ports
            .iter()
            .filter(|p| p["state"] != "forwarding")
            .map(|p| format!("{} ({})", p["ifname"], p["state"]))
            .collect();
        if waiting.is_empty() && !ports.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout {
                what: format!("bridge ports {waiting:?} in {ns} to forward"),
                secs: FORWARDING_TIMEOUT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Turns IPv6 off in a lab namespace: no link-local addresses, DAD or MLD reports whose side
/// effect of teaching bridges where a MAC is would make tests pass or fail by chance.
fn quiet_ipv6(name: &str) -> Result<(), LabError> {
    let path = netns_path(name);
    in_netns_path(&path, || -> Result<(), LabError> {
        for conf in ["all", "default"] {
            let knob = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"));
            fs::write(&knob, "1")
                .map_err(|e| LabError::io(format!("in {name}, writing"), &knob, e))?;
        }
        Ok(())
    })?
}

/// Network namespaces whose names carry lab `k`'s prefix, the fabric last (nodes hang off it).
fn lab_netns(k: u8) -> Vec<String> {
    let prefix = netns_prefix(k);
    let mut v: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let fab = fabric_netns(k);
    v.sort_by_key(|n| (*n == fab, n.clone()));
    v
}

/// Whether `name` is one of lab `k`'s node namespaces (not its fabric, nor a job namespace named
/// with the lab's prefix).
fn is_node_netns(k: u8, name: &str) -> bool {
    name.strip_prefix(&netns_prefix(k))
        .and_then(|rest| rest.strip_prefix('n'))
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// Inodes of lab `k`'s node and fabric namespaces: they are wired to each other by veths, which
/// is no reason for one to take another down.
fn node_inodes(k: u8) -> HashSet<u64> {
    let fab = fabric_netns(k);
    lab_netns(k)
        .into_iter()
        .filter(|n| *n == fab || is_node_netns(k, n))
        .filter_map(|n| procs::ns_inode(&netns_path(&n)))
        .collect()
}

/// Whether our prohibit route for lab `k` is in the root namespace.
fn prohibit_route_present(k: u8) -> bool {
    let net = subnet(k).to_string();
    let proto = ROUTE_PROTO.to_string();
    run(
        "listing prohibit routes in the root namespace",
        &mut ip(
            None,
            &[
                "route", "show", "exact", &net, "type", "prohibit", "proto", &proto,
            ],
        ),
    )
    .is_ok_and(|out| !out.trim().is_empty())
}

/// Whether some route that is not ours covers exactly lab `k`'s subnet: then K is someone
/// else's and must not be used (our teardown would otherwise be tempted to remove it).
fn foreign_route(k: u8) -> bool {
    let net = subnet(k).to_string();
    let proto = ROUTE_PROTO.to_string();
    run(
        "listing routes in the root namespace",
        &mut ip(None, &["route", "show", "exact", &net, "table", "all"]),
    )
    .is_ok_and(|out| out.lines().any(|l| !l.contains(&format!("proto {proto}"))))
}

fn remove_prohibit_route(k: u8) -> Result<(), LabError> {
    if !prohibit_route_present(k) {
        return Ok(());
    }
    let net = subnet(k).to_string();
    let proto = ROUTE_PROTO.to_string();
    match run(
        &format!("removing the prohibit route for {net}"),
        &mut ip(None, &["route", "del", "prohibit", &net, "proto", &proto]),
    ) {
        Err(e) if prohibit_route_present(k) => Err(e),
        _ => Ok(()),
    }
}

/// Everything that still exists for lab `k`, one description each; empty once it is gone.
pub fn leftovers(k: u8) -> Vec<String> {
    remains(k, true)
}

/// Like [`leftovers`], leaving out /run/ckpt-lab/<K> unless `with_lab_dir`.
fn remains(k: u8, with_lab_dir: bool) -> Vec<String> {
    let mut v: Vec<String> = lab_netns(k)
        .into_iter()
        .map(|n| format!("network namespace {n}"))
        .collect();
    if prohibit_route_present(k) {
        v.push(format!("prohibit route {}", subnet(k)));
    }
    for d in [lab_dir(k), var_dir(k)] {
        if d.exists() && (with_lab_dir || d != lab_dir(k)) {
            v.push(format!("directory {}", d.display()));
        }
    }
    v
}

/// Removes everything named after lab `k`; with `remove_lab_dir` also /run/ckpt-lab/<K>, which
/// is the lock on the number and so goes last. Returns what could not be removed.
fn teardown_k(k: u8, remove_lab_dir: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let names = lab_netns(k);
    let uts: Vec<PathBuf> = fs::read_dir(uts_dir(k))
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    let mut inodes: HashSet<u64> = names
        .iter()
        .map(|n| netns_path(n))
        .chain(uts.iter().cloned())
        .filter_map(|p| procs::ns_inode(&p))
        .collect();
    let what = format!("lab {k}");
    let mut kill_all = |inodes: &HashSet<u64>| match procs::kill_members(inodes, &what) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(lab = k, killed = n, "killed processes left in the lab"),
        Err(e) => problems.push(e.to_string()),
    };
    kill_all(&inodes);
    // Then the jobs plugged into the nodes, as `Node::destroy` does.
    let nodes = node_inodes(k);
    let jobs: HashSet<u64> = names
        .iter()
        .filter(|n| is_node_netns(k, n))
        .flat_map(|n| peers::attached_netns(n, &nodes))
        .collect();
    if !jobs.is_empty() {
        inodes.extend(jobs);
        kill_all(&inodes);
    }
    for n in &names {
        if let Err(e) = delete_netns(n) {
            problems.push(e.to_string());
        }
    }
    for u in &uts {
        if let Err(e) = remove_uts(u) {
            problems.push(e.to_string());
        }
    }
    // Anyone who opened the namespace files before they went is found now.
    if let Err(e) = procs::kill_members(&inodes, &format!("lab {k}")) {
        problems.push(e.to_string());
    }
    if let Err(e) = remove_prohibit_route(k) {
        problems.push(e.to_string());
    }
    let mut dirs = vec![var_dir(k)];
    if remove_lab_dir {
        dirs.push(lab_dir(k));
    } else {
        dirs.push(uts_dir(k));
    }
    for d in dirs {
        match fs::remove_dir_all(&d) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                problems.push(LabError::io("removing", &d, e).to_string())
            }
            _ => {}
        }
    }
    problems
}

/// What `Lab::list` reports about one lab.
#[derive(Debug, Clone, Serialize)]
pub struct LabInfo {
    /// Lab number K.
    pub lab: u8,
    /// Its owner, if its record is readable.
    pub owner: Option<Owner>,
    /// Whether the owner is alive (always for a detached lab).
    pub owner_alive: bool,
    /// Names of the nodes that still exist.
    pub nodes: Vec<String>,
    /// Its subnet.
    pub subnet: Subnet,
    /// Its shared directory.
    pub shared_dir: PathBuf,
}

/// A running lab. Dropping it tears the lab down (also while a panic unwinds), unless it came
/// from [`Lab::open`] or was handed over with [`Lab::persist`].
pub struct Lab {
    k: u8,
    nodes: Vec<Node>,
    tracked: Arc<Tracked>,
    shared_dir: PathBuf,
    teardown_on_drop: bool,
    done: bool,
}

impl Lab {
    fn handle(k: u8, nodes: usize, teardown_on_drop: bool) -> Lab {
        let tracked = Arc::new(Tracked::default());
        Lab {
            k,
            nodes: (1..=nodes)
                .map(|i| Node::new(k, i, tracked.clone()))
                .collect(),
            tracked,
            shared_dir: shared_dir(k),
            teardown_on_drop,
            done: false,
        }
    }

    /// Builds a lab of `nodes` nodes under a free lab number, owned by this process.
    pub fn up(nodes: usize) -> Result<Lab, LabError> {
        if nodes == 0 || nodes > MAX_NODES {
            return Err(LabError::NodeCount {
                asked: nodes,
                max: MAX_NODES,
            });
        }
        let k = allocate()?;
        // From here on, dropping `lab` (on any error below) removes whatever was built.
        let lab = Lab::handle(k, nodes, true);
        Record {
            lab: k,
            nodes,
            owner: Owner::me(),
        }
        .write()?;
        let t = Instant::now();
        lab.build()?;
        tracing::info!(
            lab = k,
            nodes,
            ms = t.elapsed().as_millis() as u64,
            "lab up"
        );
        Ok(lab)
    }

    fn build(&self) -> Result<(), LabError> {
        let k = self.k;
        let fab = fabric_netns(k);
        run(
            &format!("creating fabric namespace {fab}"),
            &mut ip(None, &["netns", "add", &fab]),
        )?;
        quiet_ipv6(&fab)?;
        run_input(
            &format!("creating bridge {FABRIC_BRIDGE} in {fab}"),
            &mut ip(Some(&fab), &["-batch", "-"]),
            Some(&format!(
                "link set lo up\nlink add {FABRIC_BRIDGE} type bridge\nlink set {FABRIC_BRIDGE} up\n"
            )),
        )?;
        let net = subnet(k).to_string();
        run(
            &format!("adding the prohibit route for {net} in the root namespace"),
            &mut ip(
                None,
                &[
                    "route",
                    "add",
                    "prohibit",
                    &net,
                    "proto",
                    &ROUTE_PROTO.to_string(),
                ],
            ),
        )?;
        let shared = &self.shared_dir;
        fs::create_dir_all(shared).map_err(|e| LabError::io("creating", shared, e))?;
        // Sticky and world-writable like /tmp: jobs may run as any user.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(shared, fs::Permissions::from_mode(0o1777))
            .map_err(|e| LabError::io("setting permissions of", shared, e))?;
        let uts = uts_dir(k);
        fs::create_dir_all(&uts).map_err(|e| LabError::io("creating", &uts, e))?;
        for node in &self.nodes {
            self.build_node(node)?;
        }
        wait_forwarding(&fab, None)?;
        for node in &self.nodes {
            wait_forwarding(node.netns(), None)?;
        }
        Ok(())
    }

    fn build_node(&self, node: &Node) -> Result<(), LabError> {
        let (k, i, name) = (self.k, node.index, node.netns());
        let fab = fabric_netns(k);
        let port = format!("n{i}");
        run(
            &format!("creating node namespace {name}"),
            &mut ip(None, &["netns", "add", name]),
        )?;
        quiet_ipv6(name)?;
        run(
            &format!("creating veth {fab}:{port} <-> {name}:{UPLINK}"),
            &mut ip(
                Some(&fab),
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", UPLINK, "netns", name,
                ],
            ),
        )?;
        run(
            &format!("enslaving {port} to {FABRIC_BRIDGE} in {fab}"),
            &mut ip(
                Some(&fab),
                &["link", "set", &port, "master", FABRIC_BRIDGE, "up"],
            ),
        )?;
        // A bridge takes the lowest MAC of its ports unless given one: a job veth plugged in
        // later could then change the node's MAC under every neighbour's ARP cache.
        let mac = format!("02:c1:{k:02x}:00:00:{i:02x}");
        let batch = format!(
            "link set lo up\n\
             link add {NODE_BRIDGE} type bridge\n\
             link set {NODE_BRIDGE} address {mac}\n\
             link set {UPLINK} master {NODE_BRIDGE}\n\
             link set {UPLINK} up\n\
             link set {NODE_BRIDGE} up\n\
             addr add {}/{PREFIX_LEN} dev {NODE_BRIDGE}\n",
            node.address
        );
        run_input(
            &format!("creating {NODE_BRIDGE} with {} in {name}", node.address),
            &mut ip(Some(name), &["-batch", "-"]),
            Some(&batch),
        )?;
        let uts = &node.uts_path;
        fs::File::create(uts).map_err(|e| LabError::io("creating", uts, e))?;
        // unshare bind-mounts the new namespace onto the file before running `hostname` in it.
        run(
            &format!("creating UTS namespace for {name}"),
            Command::new("unshare")
                .arg(format!("--uts={}", uts.display()))
                .args(["hostname", node.hostname()]),
        )?;
        Ok(())
    }

    /// A handle on lab `k` as recorded on disk (e.g. made by `ckpt-lab up`); dropping it leaves
    /// the lab alone.
    pub fn open(k: u8) -> Result<Lab, LabError> {
        let rec = Record::read(k)?;
        Ok(Lab::handle(k, rec.nodes, false))
    }

    /// Hands the lab over to nobody: it outlives this process until `ckpt-lab down` or `sweep
    /// --all`. Returns its number.
    pub fn persist(mut self) -> Result<u8, LabError> {
        Record {
            lab: self.k,
            nodes: self.nodes.len(),
            owner: Owner::Detached,
        }
        .write()?;
        self.teardown_on_drop = false;
        Ok(self.k)
    }

    /// Tears the lab down now, reporting anything that could not be removed.
    pub fn down(mut self) -> Result<(), LabError> {
        self.done = true;
        self.teardown()
    }

    fn teardown(&self) -> Result<(), LabError> {
        tracing::info!(lab = self.k, "tearing lab down");
        // Tracked children are killed with everything else on the nodes (killing them alone
        // first would orphan their children, which then no longer show as the nodes'); here
        // they are only reaped, or killed if they never entered a node.
        let problems = teardown_k(self.k, true);
        self.tracked.kill(None);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown {
                lab: self.k,
                problems,
            })
        }
    }

    /// The lab number K.
    pub fn number(&self) -> u8 {
        self.k
    }

    /// All nodes, node 1 first (destroyed ones included; see [`Node::exists`]).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`, counting from 1. Panics if there is no such node, like indexing.
    pub fn node(&self, i: usize) -> &Node {
        assert!(
            (1..=self.nodes.len()).contains(&i),
            "lab {} has nodes 1 to {}, not {i}",
            self.k,
            self.nodes.len()
        );
        &self.nodes[i - 1]
    }

    /// A node by number ("2"), short name ("n2") or full name ("ckl<K>-n2"), if it still exists.
    pub fn find_node(&self, which: &str) -> Result<&Node, LabError> {
        let full = which.strip_prefix(&netns_prefix(self.k)).unwrap_or(which);
        let num = full.strip_prefix('n').unwrap_or(full);
        let missing = |why: String| LabError::NoSuchNode {
            lab: self.k,
            node: which.to_string(),
            why,
        };
        let i: usize = num
            .parse()
            .map_err(|_| missing(format!("name nodes as 2, n2 or {}", node_name(self.k, 2))))?;
        if !(1..=self.nodes.len()).contains(&i) {
            return Err(missing(format!("it has nodes 1 to {}", self.nodes.len())));
        }
        let node = &self.nodes[i - 1];
        if !node.exists() {
            return Err(missing("it was destroyed".into()));
        }
        Ok(node)
    }

    /// The address of job part `j`: 198.18.K.(100+j). Panics if j > 154.
    pub fn job_address(&self, j: u8) -> Ipv4Addr {
        assert!(
            j <= 154,
            "job addresses are .100 to .254: j <= 154, not {j}"
        );
        Ipv4Addr::new(198, 18, self.k, 100 + j)
    }

    /// Prefix length of the lab subnet (24).
    pub fn prefix_len(&self) -> u8 {
        PREFIX_LEN
    }

    /// The lab subnet, 198.18.K.0/24.
    pub fn subnet(&self) -> Subnet {
        subnet(self.k)
    }

    /// The directory every node sees, /var/tmp/ckpt-lab-<K>/shared.
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    /// Name of the fabric network namespace.
    pub fn fabric_netns(&self) -> String {
        fabric_netns(self.k)
    }

    /// Prefix of every namespace removed with the lab: name extra namespaces (e.g. a job's)
    /// with it to have them cleaned up too.
    pub fn netns_prefix(&self) -> String {
        netns_prefix(self.k)
    }

    /// Every lab on this machine.
    pub fn list() -> Vec<LabInfo> {
        record::lab_numbers()
            .into_iter()
            .map(|k| {
                let owner = Record::read(k).ok().map(|r| r.owner);
                let fab = fabric_netns(k);
                LabInfo {
                    lab: k,
                    owner_alive: owner.as_ref().is_some_and(Owner::alive),
                    owner,
                    nodes: lab_netns(k).into_iter().filter(|n| *n != fab).collect(),
                    subnet: subnet(k),
                    shared_dir: shared_dir(k),
                }
            })
            .collect()
    }

    /// Removes labs whose owning process died without tearing them down, and remains of labs
    /// with no record at all. Returns the numbers removed.
    pub fn sweep_stale() -> Result<Vec<u8>, LabError> {
        Lab::sweep(false)
    }

    /// Like [`Lab::sweep_stale`]; with `include_detached` also removes labs made by `ckpt-lab up`.
    pub fn sweep(include_detached: bool) -> Result<Vec<u8>, LabError> {
        let mut swept = Vec::new();
        let mut problems = Vec::new();
        let mut first_bad = None;
        for k in record::lab_numbers() {
            let stale = match Record::read(k) {
                Ok(r) => r.owner.stale(include_detached),
                // No or unreadable record: `claim` decides by how long it has been so.
                Err(_) => true,
            };
            if !stale || !record::claim(k, include_detached) {
                continue;
            }
            tracing::info!(lab = k, "sweeping stale lab");
            let p = teardown_k(k, true);
            if !p.is_empty() {
                first_bad.get_or_insert(k);
                problems.extend(p);
            }
            swept.push(k);
        }
        for k in orphan_numbers() {
            // Taking the number as `up` would makes sure no lab is being built under it.
            if fs::create_dir(lab_dir(k)).is_err() {
                continue;
            }
            tracing::info!(lab = k, "sweeping remains of a lab with no record");
            let p = teardown_k(k, true);
            if !p.is_empty() {
                first_bad.get_or_insert(k);
                problems.extend(p);
            }
            swept.push(k);
        }
        match first_bad {
            None => Ok(swept),
            Some(lab) => Err(LabError::Teardown { lab, problems }),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.teardown_on_drop && !self.done {
            self.done = true;
            if let Err(e) = self.teardown() {
                tracing::error!("{e}");
            }
        }
    }
}

/// Takes a free lab number: creating /run/ckpt-lab/<K> is atomic, so concurrent processes and
/// test threads never get the same K. The search starts after the last number handed out, so a
/// number just freed is not reused at once (a test checking that its lab is gone would otherwise
/// see a concurrent test's new lab under the same name).
fn allocate() -> Result<u8, LabError> {
    fs::create_dir_all(RUN_DIR).map_err(|e| LabError::io("creating", RUN_DIR, e))?;
    let hint = Path::new(RUN_DIR).join("next");
    // Only a hint: a torn or lost write merely makes the search start elsewhere.
    let start: u8 = fs::read_to_string(&hint)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    for n in 0..=255u8 {
        let k = start.wrapping_add(n);
        let dir = lab_dir(k);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(LabError::io("creating", &dir, e)),
        }
        if foreign_route(k) {
            tracing::warn!(lab = k, subnet = %subnet(k), "a route not made by ckpt-lab covers this subnet: skipping it");
            // Kept, so later labs skip K without asking again; sweep removes it (no record).
            continue;
        }
        // Holding K, anything else named after it is a remain of a lab whose owner died.
        let old = remains(k, false);
        if !old.is_empty() {
            tracing::warn!(lab = k, ?old, "removing remains of an earlier lab");
            let problems = teardown_k(k, false);
            if !problems.is_empty() {
                let _ = fs::remove_dir(&dir);
                return Err(LabError::Teardown { lab: k, problems });
            }
        }
        let _ = fs::write(&hint, k.wrapping_add(1).to_string());
        return Ok(k);
    }
    Err(LabError::Exhausted)
}

/// Lab numbers that have namespaces or a shared directory but no /run/ckpt-lab/<K>.
fn orphan_numbers() -> Vec<u8> {
    let mut ks = HashSet::new();
    let number = |s: &str| -> Option<u8> { s.split('-').next()?.parse().ok() };
    if let Ok(d) = fs::read_dir(NETNS_DIR) {
        for e in d.flatten() {
            if let Some(k) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("ckl"))
                .and_then(number)
            {
                ks.insert(k);
            }
        }
    }
    if let Ok(d) = fs::read_dir(VAR_DIR) {
        for e in d.flatten() {
            if let Some(k) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("ckpt-lab-"))
                .and_then(|n| n.parse().ok())
            {
                ks.insert(k);
            }
        }
    }
    if let Ok(out) = run(
        "listing prohibit routes",
        &mut ip(
            None,
            &[
                "route",
                "show",
                "type",
                "prohibit",
                "proto",
                &ROUTE_PROTO.to_string(),
            ],
        ),
    ) {
        for l in out.lines() {
            let net = l.split_whitespace().find(|w| w.starts_with("198.18."));
            if let Some(k) = net.and_then(|n| n.split('.').nth(2)?.parse().ok()) {
                ks.insert(k);
            }
        }
    }
    let mut v: Vec<u8> = ks.into_iter().filter(|&k| !lab_dir(k).exists()).collect();
    v.sort_unstable();
    v
}
