//! Finding the network namespaces that hang off a node by a veth: the node's jobs. A job started
//! by the node's agent has network and UTS namespaces of its own, and once restored with
//! `--detach` it is not even a descendant of anything on the node; its veth is what ties it to
//! the node, so losing the node must take it down too.

use std::collections::{HashMap, HashSet};
use std::process::Command;

use serde_json::Value;

use crate::cmd::{ip, run, run_input};
use crate::procs;
use crate::UPLINK;

/// A veth end in the node whose peer lives in another namespace.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Port {
    ifindex: u64,
    peer_ifindex: u64,
}

fn field(link: &Value, key: &str) -> Option<u64> {
    link.get(key)?.as_u64()
}

/// The node's interfaces with a peer in another namespace, but for its uplink, whose peer is the
/// fabric. Not only `br0`'s ports: a job may sit on any bridge of the node (`--veth br1`,
/// `restore --bridge br1`), or on none yet while its agent sets it up.
fn ports(node: &str) -> Vec<Port> {
    // A node already gone has no ports; nothing can be attached to it any more.
    let Ok(out) = run(
        &format!("listing the interfaces of {node}"),
        &mut ip(Some(node), &["-j", "link", "show"]),
    ) else {
        return Vec::new();
    };
    let links: Vec<Value> = serde_json::from_str(out.trim()).unwrap_or_default();
    links
        .iter()
        .filter(|l| l["ifname"] != UPLINK && l.get("link_netnsid").is_some())
        .filter_map(|l| {
            Some(Port {
                ifindex: field(l, "ifindex")?,
                peer_ifindex: field(l, "link_index")?,
            })
        })
        .collect()
}

/// Whether the namespace that process `pid` is in holds the other end of one of `ports`, whose
/// namespace is `node`. Ifindexes are only unique within a namespace (every job's eth0 is
/// likely 2), so the peer's namespace must be checked too: the candidate knows it by an nsid of
/// its own, which `ip netns list-id` run inside it turns into a /run/netns name. None if `pid`
/// is gone.
fn holds_peer(pid: i32, node: &str, ports: &HashSet<Port>) -> Option<bool> {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["ip", "-j", "-batch", "-"]);
    // Links first: listing them is what makes the kernel give the node an nsid here.
    let out = run_input(
        &format!("listing the interfaces of process {pid}'s network namespace"),
        &mut c,
        Some("link show\nnetns list-id\n"),
    )
    .ok()?;
    let mut docs = serde_json::Deserializer::from_str(&out).into_iter::<Vec<Value>>();
    let links = docs.next()?.ok()?;
    let ids = docs.next()?.ok()?;
    let node_ids: HashSet<u64> = ids
        .iter()
        .filter(|i| i["name"] == node)
        .filter_map(|i| field(i, "nsid"))
        .collect();
    Some(links.iter().any(|l| {
        let (Some(nsid), Some(ifindex), Some(peer)) = (
            field(l, "link_netnsid"),
            field(l, "ifindex"),
            field(l, "link_index"),
        ) else {
            return false;
        };
        node_ids.contains(&nsid)
            && ports.contains(&Port {
                ifindex: peer,
                peer_ifindex: ifindex,
            })
    }))
}

/// Inodes of the network namespaces, other than those in `exclude`, that some process is in and
/// that hold the peer of a veth in network namespace `node` (by name). Best effort: a process
/// or namespace that goes away while we look is simply not there.
pub(crate) fn attached_netns(node: &str, exclude: &HashSet<u64>) -> HashSet<u64> {
    let ports: HashSet<Port> = ports(node).into_iter().collect();
    if ports.is_empty() {
        return HashSet::new();
    }
    // Never the namespaces everything else lives in, whatever is plugged into the node.
    let mut exclude = exclude.clone();
    exclude.extend(procs::net_ns_of(std::process::id() as i32));
    exclude.extend(procs::net_ns_of(1));
    let candidates: HashMap<u64, Vec<i32>> = procs::net_namespaces()
        .into_iter()
        .filter(|(ino, _)| !exclude.contains(ino))
        .collect();
    candidates
        .into_iter()
        .filter(|(_, pids)| {
            pids.iter()
                .find_map(|&pid| holds_peer(pid, node, &ports))
                .unwrap_or(false)
        })
        .map(|(ino, _)| ino)
        .collect()
}
