//! The network namespace of a job: its interfaces (loopback and veth pairs
//! whose other end is on a bridge of the node), their addresses and MACs,
//! and the routes the kernel does not make by itself.
//!
//! `run --veth` and restore share one path: a `NetImage` (built from the
//! command line, or read from net.img) is applied in two steps,
//! `create_links` (veth pairs made, the node's end on its bridge and up,
//! the job's end down and bare) then `configure` (addresses, links up,
//! routes), so that a network lock can be put in the job's namespace in
//! between, before any address exists.
//!
//! Both read and write through the `ip` tool (iproute2, JSON output and
//! `-batch`), as CRIU does with `ip route save/restore`: it covers every
//! rtnetlink attribute we need and is installed wherever a node has
//! bridges. Inside the job's namespace it runs from a thread that entered
//! it (`ns::in_ns`): a child inherits its creating thread's namespaces.
//! The one question `ip` cannot answer, which namespace id a veth peer's
//! `link_netnsid` names, is asked over rtnetlink (`sys::netlink`).

use std::cell::Cell;
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ckpt_proto::image::{NetAddress, NetImage, NetLink, NetRoute, NsImage};
use ckpt_proto::ImageKind;
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// Image file of a job's network namespace.
pub const NET_IMAGE: &str = "net.img";

const NEWNET: u64 = libc::CLONE_NEWNET as u64;

/// Default MTU of a veth made by `run --veth`.
const DEFAULT_MTU: u32 = 1500;
/// MTU the kernel gives loopback.
const LOOPBACK_MTU: u32 = 65536;
/// The name of the job's end of a veth made by `run --veth`.
pub const JOB_IFNAME: &str = "eth0";

// ------------------------------------------------------------ the ip tool

/// Finds `ip` in PATH or the sbin directories (often missing from a
/// service's PATH).
fn ip_binary() -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join("ip"))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
            Error::net(
                "-",
                "the ip tool (Debian package iproute2) is needed for a job's network interfaces and was not found",
            )
        })
}

/// `ip -j ARGS` started in the calling thread's network namespace; its
/// output is read by `IpJson::parse`. Several can run at once: a dump
/// reads a frozen job's namespace, and every millisecond counts.
struct IpJson {
    child: std::process::Child,
    args: String,
}

impl IpJson {
    fn start(args: &[&str]) -> Result<IpJson> {
        let args_s = args.join(" ");
        let child = Command::new(ip_binary()?)
            .arg("-j")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::net("-", format!("running ip -j {args_s}: {e}")))?;
        Ok(IpJson {
            child,
            args: args_s,
        })
    }

    fn parse<T: serde::de::DeserializeOwned>(self) -> Result<T> {
        let args = self.args;
        let out = self
            .child
            .wait_with_output()
            .map_err(|e| Error::net("-", format!("waiting for ip -j {args}: {e}")))?;
        if !out.status.success() {
            return Err(Error::net(
                "-",
                format!(
                    "ip -j {args} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        // `ip -j` prints nothing at all for an empty list.
        let text = String::from_utf8_lossy(&out.stdout);
        let text = if text.trim().is_empty() { "[]" } else { &text };
        serde_json::from_str(text)
            .map_err(|e| Error::net("-", format!("parsing `ip -j {args}`: {e}")))
    }
}

/// `ip -j ARGS` in the calling thread's network namespace, parsed.
fn ip_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> Result<T> {
    IpJson::start(args)?.parse()
}

/// One line of an `ip -batch` script and the interface it is about.
struct IpCmd {
    iface: String,
    line: String,
}

fn cmd(iface: &str, words: &[&str]) -> IpCmd {
    IpCmd {
        iface: iface.to_string(),
        line: words.join(" "),
    }
}

/// Runs `cmds` as one `ip -batch` in the calling thread's network
/// namespace; stops at the first that fails and names it.
fn ip_batch(cmds: &[IpCmd]) -> Result<()> {
    if cmds.is_empty() {
        return Ok(());
    }
    let mut child = Command::new(ip_binary()?)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::net(&cmds[0].iface, format!("running ip -batch: {e}")))?;
    let script: String = cmds.iter().map(|c| format!("{}\n", c.line)).collect();
    debug!(script = %script.trim_end(), "ip -batch");
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means ip died early: its stderr says why.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::net(&cmds[0].iface, format!("waiting for ip -batch: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    // "Command failed -:N" names the failing line.
    let line = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("Command failed -:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .and_then(|n| cmds.get(n.wrapping_sub(1)));
    let why: Vec<&str> = err
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Command failed"))
        .collect();
    let (iface, what) = match line {
        Some(c) => (c.iface.as_str(), format!("`ip {}`", c.line)),
        None => (cmds[0].iface.as_str(), "ip -batch".to_string()),
    };
    Err(Error::net(
        iface,
        format!("{what} failed: {}", why.join("; ")),
    ))
}

/// A word of an `ip -batch` line coming from an image or the command line:
/// one printable token that the batch parser takes as is.
fn token<'a>(what: &str, s: &'a str) -> Result<&'a str> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\' | '#'));
    if ok {
        Ok(s)
    } else {
        Err(Error::net(s, format!("not a valid {what}: {s:?}")))
    }
}

/// A valid interface name (what the kernel accepts, minus what would need
/// quoting).
fn ifname(s: &str) -> Result<&str> {
    token("interface name", s)?;
    if s.len() > 15 || s.contains('/') || s.contains(':') || s == "." || s == ".." {
        return Err(Error::net(
            s,
            "not a valid interface name (at most 15 characters, no '/' or ':')",
        ));
    }
    Ok(s)
}

// ------------------------------------------------------------ ip's JSON

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IpLink {
    ifindex: i32,
    ifname: String,
    link_index: Option<i32>,
    link_netnsid: Option<i32>,
    flags: Vec<String>,
    mtu: u32,
    address: String,
    link_type: String,
    master: Option<String>,
    linkinfo: Option<LinkInfo>,
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LinkInfo {
    info_kind: String,
    info_slave_kind: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IpAddrInfo {
    family: String,
    local: String,
    prefixlen: u32,
    broadcast: Option<String>,
    scope: String,
    label: Option<String>,
    dynamic: bool,
    nodad: bool,
    noprefixroute: bool,
    home: bool,
    mngtmpaddr: bool,
    valid_life_time: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IpRoute {
    #[serde(rename = "type")]
    kind: Option<String>,
    dst: String,
    gateway: Option<String>,
    dev: Option<String>,
    protocol: Option<String>,
    scope: Option<String>,
    metric: Option<u32>,
    prefsrc: Option<String>,
    table: Option<String>,
    flags: Vec<String>,
    metrics: Vec<serde_json::Map<String, serde_json::Value>>,
    nexthops: Option<serde_json::Value>,
    nhid: Option<u32>,
}

impl IpLink {
    fn kind(&self) -> &str {
        if self.link_type == "loopback" {
            "loopback"
        } else {
            self.linkinfo
                .as_ref()
                .map(|l| l.info_kind.as_str())
                .filter(|k| !k.is_empty())
                .unwrap_or("device")
        }
    }
}

// ------------------------------------------------------------ dump

/// The kernel's own link-local address for `mac` (EUI-64), which it makes
/// again when the link comes up with that MAC.
fn eui64_link_local(mac: &str) -> Option<Ipv6Addr> {
    let m = parse_mac(mac).ok()?;
    let mut b = [0u8; 16];
    b[0] = 0xfe;
    b[1] = 0x80;
    b[8..].copy_from_slice(&[m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
    Some(Ipv6Addr::from(b))
}

/// The addresses of `l` that restore must add: not the kernel's own.
fn link_addresses(l: &IpLink) -> Vec<NetAddress> {
    let eui = eui64_link_local(&l.address);
    l.addr_info
        .iter()
        .filter(|a| {
            let kernels = (l.link_type == "loopback"
                && ((a.local == "127.0.0.1" && a.prefixlen == 8)
                    || (a.local == "::1" && a.prefixlen == 128)))
                || (a.family == "inet6"
                    && a.scope == "link"
                    && a.local.parse::<Ipv6Addr>().ok() == eui
                    && eui.is_some());
            // Addresses with a lifetime come from autoconfiguration, which
            // makes them again.
            let learnt = a.dynamic || a.valid_life_time.is_some_and(|t| t != u32::MAX as u64);
            if learnt {
                debug!(iface = %l.ifname, addr = %a.local, "address with a lifetime not recorded");
            }
            !kernels && !learnt && (a.family == "inet" || a.family == "inet6")
        })
        .map(|a| NetAddress {
            family: a.family.clone(),
            address: a.local.clone(),
            prefix_len: a.prefixlen,
            broadcast: a.broadcast.clone().unwrap_or_default(),
            label: a
                .label
                .clone()
                .filter(|x| *x != l.ifname)
                .unwrap_or_default(),
            scope: if a.scope == "global" || a.scope.is_empty() {
                String::new()
            } else {
                a.scope.clone()
            },
            flags: [
                ("nodad", a.nodad),
                ("noprefixroute", a.noprefixroute),
                ("home", a.home),
                ("mngtmpaddr", a.mngtmpaddr),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(f, _)| f.to_string())
            .collect(),
        })
        .collect()
}

/// The routes restore must add, from `ip -j route show table all` of one
/// family: not the local table, not the kernel's, not learnt from router
/// advertisements.
fn routes_to_keep(pid: i32, family: &str, routes: Vec<IpRoute>) -> Result<Vec<NetRoute>> {
    let mut out = Vec::new();
    for r in routes {
        let table = r.table.clone().unwrap_or_default();
        let proto = r.protocol.clone().unwrap_or_default();
        if table == "local" || proto == "kernel" || proto == "ra" {
            continue;
        }
        if r.nexthops.is_some() || r.nhid.is_some() {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "its network namespace has a multipath or nexthop-object route to {}: not supported yet",
                    r.dst
                ),
            });
        }
        let mtu = r
            .metrics
            .iter()
            .find_map(|m| m.get("mtu").and_then(|v| v.as_u64()))
            .unwrap_or(0) as u32;
        out.push(NetRoute {
            family: family.to_string(),
            r#type: r.kind.filter(|k| k != "unicast").unwrap_or_default(),
            dst: r.dst,
            gateway: r.gateway.unwrap_or_default(),
            dev: r.dev.unwrap_or_default(),
            protocol: if proto == "boot" {
                String::new()
            } else {
                proto
            },
            scope: r.scope.unwrap_or_default(),
            metric: r.metric.unwrap_or(0),
            prefsrc: r.prefsrc.unwrap_or_default(),
            table: if table == "main" {
                String::new()
            } else {
                table
            },
            flags: r.flags.into_iter().filter(|f| f == "onlink").collect(),
            mtu,
        });
    }
    Ok(out)
}

/// Records the network namespace of job root `pid` (host PID; the job is
/// frozen): every interface, which must be loopback or a veth whose other
/// end is in this agent's namespace, and the routes. Interfaces of any
/// other kind are refused, naming them.
pub fn dump(pid: i32) -> Result<NetImage> {
    // The node's links, for the other ends of veths; listing them also
    // makes the kernel give the job's namespace an id here if it had none.
    let node = IpJson::start(&["-d", "link", "show"])?;
    let (links, routes4, routes6) = crate::ns::in_ns(pid, NEWNET, || {
        let l = IpJson::start(&["-d", "addr", "show"])?;
        let r4 = IpJson::start(&["-4", "route", "show", "table", "all"])?;
        let r6 = IpJson::start(&["-6", "route", "show", "table", "all"])?;
        Ok((
            l.parse::<Vec<IpLink>>()?,
            r4.parse::<Vec<IpRoute>>()?,
            r6.parse::<Vec<IpRoute>>()?,
        ))
    })?;
    let node: Vec<IpLink> = node.parse()?;
    let mut img = NetImage::default();
    let mut job_nsid: Option<Option<i32>> = None;
    for l in &links {
        let kind = l.kind();
        let mut link = NetLink {
            name: l.ifname.clone(),
            kind: kind.to_string(),
            mac: l.address.clone(),
            mtu: l.mtu,
            up: l.flags.iter().any(|f| f == "UP"),
            addresses: link_addresses(l),
            ..Default::default()
        };
        match kind {
            "loopback" => {}
            "veth" => {
                let Some(netnsid) = l.link_netnsid else {
                    return Err(Error::Refused {
                        pid,
                        reason: format!(
                            "both ends of veth {} are inside its network namespace: not supported yet",
                            l.ifname
                        ),
                    });
                };
                let job_nsid = match job_nsid {
                    Some(id) => id,
                    None => {
                        let id = crate::sys::netlink::nsid_of_pid(pid).map_err(|e| {
                            Error::sys(pid, "RTM_GETNSID for its network namespace", e)
                        })?;
                        *job_nsid.insert(id)
                    }
                };
                let peer = node.iter().find(|p| {
                    job_nsid.is_some()
                        && p.link_netnsid == job_nsid
                        && p.link_index == Some(l.ifindex)
                        && p.kind() == "veth"
                });
                let Some(peer) = peer else {
                    return Err(Error::Refused {
                        pid,
                        reason: format!(
                            "the other end of veth {} (link-netnsid {netnsid} as the job sees it) is not in \
                             the agent's network namespace: run the agent in the namespace holding the job's bridge",
                            l.ifname
                        ),
                    });
                };
                link.peer_name = peer.ifname.clone();
                let on_bridge = peer
                    .linkinfo
                    .as_ref()
                    .is_some_and(|i| i.info_slave_kind == "bridge");
                match (&peer.master, on_bridge) {
                    (Some(b), true) => link.bridge = b.clone(),
                    _ => warn!(
                        pid,
                        iface = %l.ifname,
                        peer = %peer.ifname,
                        "the node's end of the veth is on no bridge: restore will need --bridge"
                    ),
                }
            }
            other => {
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "its network namespace has interface {} of kind {other}: only lo and veth are supported yet",
                        l.ifname
                    ),
                })
            }
        }
        img.links.push(link);
    }
    // Loopback first: it is up before anything else is configured.
    img.links.sort_by_key(|l| l.kind != "loopback");
    img.routes = routes_to_keep(pid, "inet", routes4)?;
    img.routes.extend(routes_to_keep(pid, "inet6", routes6)?);
    info!(
        pid,
        links = img.links.len(),
        routes = img.routes.len(),
        "network namespace recorded"
    );
    Ok(img)
}

/// Kinds of the interfaces of `img` besides loopback, once each (for the
/// restoring node's feature check).
pub fn link_kinds(img: &NetImage) -> Vec<String> {
    let mut v: Vec<String> = img
        .links
        .iter()
        .filter(|l| l.kind != "loopback")
        .map(|l| l.kind.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

// ------------------------------------------------------------ run --veth

/// What `run --veth BRIDGE` asks for the job's end, `eth0`.
#[derive(Debug, Clone, Default)]
pub struct VethRequest {
    /// The bridge in the agent's network namespace the node's end joins.
    pub bridge: String,
    /// CIDRs ("198.18.250.10/24", "2001:db8::10/64").
    pub addresses: Vec<String>,
    /// Default route via this address.
    pub gateway: Option<String>,
    /// MAC of eth0 (default: a random locally administered one).
    pub mac: Option<String>,
    /// MTU of both ends (default 1500).
    pub mtu: Option<u32>,
}

/// Parses "aa:bb:cc:dd:ee:ff".
fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "bad MAC address {s:?}: expected six hex bytes like 02:00:c6:12:fa:0a"
        ));
    }
    for (b, p) in m.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("bad MAC address {s:?}: {p:?} is not a hex byte"))?;
    }
    Ok(m)
}

fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random unicast, locally administered MAC (so it cannot clash with a
/// vendor's).
fn random_mac() -> std::result::Result<[u8; 6], String> {
    let mut m = ckpt_proto::rpc::random_bytes::<6>().map_err(|e| format!("/dev/urandom: {e}"))?;
    m[0] = (m[0] & 0xfe) | 0x02;
    Ok(m)
}

/// Parses "ADDRESS/PREFIX".
fn parse_cidr(s: &str) -> std::result::Result<(IpAddr, u32), String> {
    let bad = |why: &str| {
        format!(
            "bad --address {s:?}: {why} (expected an address with its prefix length, like \
             198.18.250.10/24 or 2001:db8::10/64)"
        )
    };
    let (a, p) = s.split_once('/').ok_or_else(|| bad("no prefix length"))?;
    let addr: IpAddr = a.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
    let prefix: u32 = p
        .parse()
        .map_err(|_| bad("the prefix length is not a number"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad(&format!("the prefix length is above {max}")));
    }
    if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
        return Err(bad("not a unicast address an interface can hold"));
    }
    Ok((addr, prefix))
}

fn family(a: &IpAddr) -> &'static str {
    if a.is_ipv4() {
        "inet"
    } else {
        "inet6"
    }
}

impl VethRequest {
    /// Checks the request and turns it into the namespace it describes:
    /// eth0 with its MAC, MTU and addresses, up, on `bridge`, and a default
    /// route via the gateway.
    pub fn image(&self) -> std::result::Result<NetImage, String> {
        ifname(&self.bridge).map_err(|e| format!("--veth: {e}"))?;
        let mut addresses = Vec::new();
        for s in &self.addresses {
            let (a, p) = parse_cidr(s)?;
            addresses.push(NetAddress {
                family: family(&a).into(),
                address: a.to_string(),
                prefix_len: p,
                ..Default::default()
            });
        }
        let mac = match &self.mac {
            Some(s) => {
                let m = parse_mac(s)?;
                if m[0] & 1 != 0 {
                    return Err(format!("bad MAC address {s:?}: a multicast address"));
                }
                if m == [0; 6] {
                    return Err(format!("bad MAC address {s:?}: all zeroes"));
                }
                m
            }
            None => random_mac()?,
        };
        let mtu = self.mtu.unwrap_or(DEFAULT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(format!("bad --mtu {mtu}: must be between 68 and 65535"));
        }
        let mut routes = Vec::new();
        if let Some(g) = &self.gateway {
            let gw: IpAddr = g
                .parse()
                .map_err(|_| format!("bad --gateway {g:?}: not an IPv4 or IPv6 address"))?;
            if !addresses.iter().any(|a| a.family == family(&gw)) {
                return Err(format!(
                    "--gateway {g} is {} but no {} --address was given: the job could not reach it",
                    if gw.is_ipv4() { "IPv4" } else { "IPv6" },
                    if gw.is_ipv4() { "IPv4" } else { "IPv6" },
                ));
            }
            routes.push(NetRoute {
                family: family(&gw).into(),
                dst: "default".into(),
                gateway: gw.to_string(),
                dev: JOB_IFNAME.into(),
                ..Default::default()
            });
        }
        Ok(NetImage {
            links: vec![NetLink {
                name: JOB_IFNAME.into(),
                kind: "veth".into(),
                mac: format_mac(&mac),
                mtu,
                up: true,
                addresses,
                bridge: self.bridge.clone(),
                peer_name: String::new(),
            }],
            routes,
        })
    }
}

// ------------------------------------------------------------ restore

/// How the veth pairs of a job are made on this node.
#[derive(Debug, Clone, Default)]
pub struct LinkOptions {
    /// The job id, which names the node's ends (`ckj-...`).
    pub job: String,
    /// Put every node end on this bridge instead of the recorded one.
    pub bridge: Option<String>,
    /// What to tell the operator to pass when a bridge is missing.
    pub hint: &'static str,
}

/// The name of the node's end of veth number `i` of `job`: at most 15
/// characters, the same on every node, different for different jobs.
pub fn node_end_name(job: &str, i: usize) -> String {
    let base = format!("ckj-{:08x}", crc32c::crc32c(job.as_bytes()));
    if i == 0 {
        base
    } else {
        format!("{base}{i}")
    }
}

/// The bridge the node's end of `l` goes on.
fn bridge_for<'a>(l: &'a NetLink, opts: &'a LinkOptions) -> Result<&'a str> {
    match opts.bridge.as_deref().unwrap_or(&l.bridge) {
        "" => Err(Error::net(
            &l.name,
            "its other end was on no bridge at dump: pass --bridge NAME",
        )),
        b => ifname(b),
    }
}

/// Checks that every bridge `img`'s veths need exists in this agent's
/// network namespace (before anything of the job is created).
pub fn check_bridges(img: &NetImage, opts: &LinkOptions) -> Result<()> {
    if !img.links.iter().any(|l| l.kind == "veth") {
        return Ok(());
    }
    let here: Vec<IpLink> = ip_json(&["-d", "link", "show"])?;
    check_bridges_in(&here, img, opts)
}

/// `check_bridges` against the links `here` (a listing of the agent's
/// namespace).
fn check_bridges_in(here: &[IpLink], img: &NetImage, opts: &LinkOptions) -> Result<()> {
    for l in img.links.iter().filter(|l| l.kind == "veth") {
        let b = bridge_for(l, opts)?;
        match here.iter().find(|x| x.ifname == b) {
            None => {
                return Err(Error::net(
                    b,
                    format!(
                        "no bridge {b} in the agent's network namespace (for the job's {}): create it or pass {}",
                        l.name, opts.hint
                    ),
                ))
            }
            Some(x) if x.kind() != "bridge" => {
                return Err(Error::net(
                    b,
                    format!(
                        "{b} is a {} interface, not a bridge (for the job's {}): pass {}",
                        x.kind(),
                        l.name,
                        opts.hint
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The checks restore makes before creating anything: the bridges the
/// checkpoint's veths need exist here.
pub fn check_restore(ns: &NsImage, dir: &Path, opts: &LinkOptions) -> Result<()> {
    let path = dir.join(NET_IMAGE);
    if ns.own & NEWNET == 0 || !path.exists() {
        if opts.bridge.is_some() {
            warn!("--bridge ignored: the checkpoint has no veth");
        }
        return Ok(());
    }
    let img: NetImage = ckpt_proto::read_image_file(&path, ImageKind::Net)?;
    if opts.bridge.is_some() && !img.links.iter().any(|l| l.kind == "veth") {
        warn!("--bridge ignored: the checkpoint has no veth");
    }
    check_bridges(&img, opts)
}

/// The node's ends of a job's veth pairs made by `create_links`: deleted
/// again (which deletes the job's ends too) when dropped, unless kept.
pub struct Links {
    names: Vec<String>,
    kept: Cell<bool>,
}

impl Links {
    /// The node's ends, by name.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The job runs: its veths stay (they go with its namespace).
    pub fn keep(&self) {
        self.kept.set(true);
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        if self.kept.get() || self.names.is_empty() {
            return;
        }
        let cmds: Vec<IpCmd> = self
            .names
            .iter()
            .map(|n| cmd(n, &["link", "del", n]))
            .collect();
        match ip_batch(&cmds) {
            Ok(()) => debug!(links = ?self.names, "veths of a failed start removed"),
            Err(e) => warn!("removing the veths of a failed start: {e}"),
        }
    }
}

/// Waits a little for a veth named `name` to go: the node's end of a job
/// that just ended on this node disappears only once the kernel has torn
/// its namespace down. Anything else of that name is an error at once.
/// `here` is a fresh listing of the agent's namespace, if there is one.
fn wait_name_free(name: &str, here: Option<Vec<IpLink>>) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut here = match here {
        Some(h) => h,
        None => ip_json(&["-d", "link", "show"])?,
    };
    loop {
        let Some(x) = here.iter().find(|x| x.ifname == name) else {
            return Ok(());
        };
        if x.kind() != "veth" || std::time::Instant::now() >= deadline {
            return Err(Error::net(
                name,
                format!(
                    "a {} interface of that name already exists in the agent's network namespace: \
                     remove it, or restore under another --job",
                    x.kind()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        here = ip_json(&["-d", "link", "show"])?;
    }
}

/// Creates the veth pairs of `img` for the job whose root is `host` (host
/// PID): each node end named after the job, on its bridge and up, in this
/// agent's network namespace; each job end in the job's namespace with its
/// name, MAC and MTU, down and without addresses. Then `configure` gives
/// the job's side its addresses and routes.
pub fn create_links(host: i32, img: &NetImage, opts: &LinkOptions) -> Result<Links> {
    let mut links = Links {
        names: Vec::new(),
        kept: Cell::new(false),
    };
    if !img.links.iter().any(|l| l.kind == "veth") {
        return Ok(links);
    }
    let listing: Vec<IpLink> = ip_json(&["-d", "link", "show"])?;
    check_bridges_in(&listing, img, opts)?;
    // Good for the first veth's name; later ones list again.
    let mut here = Some(listing);
    let netns = format!("/proc/{host}/ns/net");
    for (i, l) in img.links.iter().filter(|l| l.kind == "veth").enumerate() {
        let name = node_end_name(&opts.job, i);
        let bridge = bridge_for(l, opts)?;
        let job_end = ifname(&l.name)?;
        let mac = token("MAC address", &l.mac)?;
        parse_mac(mac).map_err(|e| Error::net(job_end, e))?;
        let mtu = l.mtu.to_string();
        wait_name_free(&name, here.take())?;
        ip_batch(&[cmd(
            &name,
            &[
                "link", "add", &name, "mtu", &mtu, "type", "veth", "peer", "name", job_end,
                "address", mac, "mtu", &mtu, "netns", &netns,
            ],
        )])?;
        links.names.push(name.clone());
        ip_batch(&[cmd(&name, &["link", "set", &name, "master", bridge, "up"])])?;
        info!(pid = host, job_end, node_end = %name, bridge, "veth created");
    }
    Ok(links)
}

/// The `ip` words adding address `a` to `dev`.
fn addr_cmd(dev: &str, a: &NetAddress) -> Result<IpCmd> {
    let cidr = format!("{}/{}", token("address", &a.address)?, a.prefix_len);
    let mut w = vec!["addr", "add", &cidr];
    if !a.broadcast.is_empty() {
        w.extend(["broadcast", token("broadcast address", &a.broadcast)?]);
    }
    if !a.label.is_empty() {
        w.extend(["label", token("address label", &a.label)?]);
    }
    if !a.scope.is_empty() {
        w.extend(["scope", token("address scope", &a.scope)?]);
    }
    w.extend(["dev", dev]);
    for f in &a.flags {
        if matches!(
            f.as_str(),
            "nodad" | "noprefixroute" | "home" | "mngtmpaddr"
        ) {
            w.push(f);
        }
    }
    // The address was the job's already (or its operator's choice): no
    // duplicate detection, which would hold it unusable ("tentative") for
    // a second or two after the job starts.
    if a.family == "inet6" && !a.flags.iter().any(|f| f == "nodad") {
        w.push("nodad");
    }
    Ok(cmd(dev, &w))
}

/// The `ip` words adding route `r`.
fn route_cmd(r: &NetRoute) -> Result<IpCmd> {
    // An explicit prefix says the family; "default" alone would not.
    let dst = match (r.dst.as_str(), r.family.as_str()) {
        ("default", "inet6") => "::/0".to_string(),
        ("default", _) => "0.0.0.0/0".to_string(),
        (d, _) => token("route destination", d)?.to_string(),
    };
    let metric = r.metric.to_string();
    let mtu = r.mtu.to_string();
    let mut w = vec!["route", "add"];
    if !r.r#type.is_empty() {
        w.push(token("route type", &r.r#type)?);
    }
    w.push(&dst);
    let fields = [
        ("via", &r.gateway, "gateway"),
        ("dev", &r.dev, "device"),
        ("proto", &r.protocol, "route protocol"),
        ("scope", &r.scope, "route scope"),
        ("src", &r.prefsrc, "preferred source"),
        ("table", &r.table, "route table"),
    ];
    for (kw, v, what) in fields {
        if !v.is_empty() {
            w.extend([kw, token(what, v)?]);
        }
    }
    if r.metric != 0 {
        w.extend(["metric", &metric]);
    }
    if r.mtu != 0 {
        w.extend(["mtu", &mtu]);
    }
    if r.flags.iter().any(|f| f == "onlink") {
        w.push("onlink");
    }
    Ok(cmd(if r.dev.is_empty() { "-" } else { &r.dev }, &w))
}

/// Writes a sysctl of the calling thread's network namespace; a missing
/// file (IPv6 disabled) is not an error.
fn net_sysctl(path: &str, value: &str) -> Result<()> {
    match std::fs::write(path, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            debug!(path, "no such sysctl here");
            Ok(())
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Gives the job's side of `img` (job root `host`, veths made by
/// `create_links` as `links`) its addresses, brings its links up and adds
/// its routes, from a thread in the job's network namespace; then
/// announces the addresses (see `announce`).
pub fn configure(host: i32, img: &NetImage, links: &Links) -> Result<()> {
    let mut cmds = Vec::new();
    for l in &img.links {
        let dev = ifname(&l.name)?;
        if l.kind == "loopback" && l.mtu != 0 && l.mtu != LOOPBACK_MTU {
            cmds.push(cmd(dev, &["link", "set", dev, "mtu", &l.mtu.to_string()]));
        }
        for a in &l.addresses {
            cmds.push(addr_cmd(dev, a)?);
        }
    }
    for l in &img.links {
        let state = if l.up { "up" } else { "down" };
        cmds.push(cmd(&l.name, &["link", "set", &l.name, state]));
    }
    for r in &img.routes {
        cmds.push(route_cmd(r)?);
    }
    let in_job = |e: Error| match e {
        Error::Net { iface, reason } => Error::net(
            iface,
            format!("in the job's network namespace (pid {host}): {reason}"),
        ),
        e => e,
    };
    crate::ns::in_ns(host, NEWNET, || {
        for l in img.links.iter().filter(|l| l.kind != "loopback") {
            net_sysctl(
                &format!("/proc/sys/net/ipv4/conf/{}/arp_notify", l.name),
                "1",
            )?;
            net_sysctl(
                &format!("/proc/sys/net/ipv6/conf/{}/ndisc_notify", l.name),
                "1",
            )?;
        }
        ip_batch(&cmds)
    })
    .map_err(in_job)?;
    announce(host, img, links).map_err(in_job)?;
    info!(pid = host, commands = cmds.len(), "job network configured");
    Ok(())
}

/// Makes the kernel announce the job's addresses once its veths carry
/// traffic: a gratuitous ARP for each IPv4 address and an unsolicited
/// neighbour advertisement for each IPv6 one, so that peers that knew the
/// job's address on its old node update their caches at once.
///
/// With `arp_notify` and `ndisc_notify` set the kernel announces when a
/// link comes up, but then the node's end has only just got its carrier
/// and the bridge still drops what arrives on it (it enables a port from
/// a link-watch event, after the fact). So this waits until each node end
/// is a forwarding bridge port, and then sets each job end's MAC again to
/// the same value: the kernel announces again on an address change, with
/// no other effect.
fn announce(host: i32, img: &NetImage, links: &Links) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    for name in &links.names {
        loop {
            let l: Vec<serde_json::Value> = ip_json(&["-d", "link", "show", "dev", name])?;
            let state = l
                .first()
                .and_then(|l| l.pointer("/linkinfo/info_slave_data/state"))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            if state == "forwarding" {
                break;
            }
            if std::time::Instant::now() >= deadline {
                warn!(pid = host, bridge_port = %name, state, "not forwarding yet: announcing anyway");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let cmds: Vec<IpCmd> = img
        .links
        .iter()
        .filter(|l| l.kind == "veth" && l.up && !l.addresses.is_empty())
        .map(|l| cmd(&l.name, &["link", "set", &l.name, "address", &l.mac]))
        .collect();
    crate::ns::in_ns(host, NEWNET, || ip_batch(&cmds))?;
    debug!(pid = host, links = cmds.len(), "addresses announced");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links_json() -> Vec<IpLink> {
        serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,
                "link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[
                {"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo",
                 "valid_life_time":4294967295},
                {"family":"inet","local":"127.0.0.2","prefixlen":8,"scope":"host","label":"lo",
                 "valid_life_time":4294967295},
                {"family":"inet6","local":"::1","prefixlen":128,"scope":"host",
                 "valid_life_time":4294967295}]},
               {"ifindex":2,"link_index":3,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP"],
                "mtu":1400,"link_type":"ether","address":"02:11:22:33:44:55","link_netnsid":0,
                "linkinfo":{"info_kind":"veth"},"addr_info":[
                {"family":"inet","local":"198.18.250.10","prefixlen":24,"scope":"global",
                 "label":"eth0","valid_life_time":4294967295},
                {"family":"inet","local":"198.18.250.11","prefixlen":24,"broadcast":"198.18.250.255",
                 "scope":"global","secondary":true,"label":"eth0:1","valid_life_time":4294967295},
                {"family":"inet6","local":"2001:db8::10","prefixlen":64,"scope":"global","nodad":true,
                 "valid_life_time":4294967295},
                {"family":"inet6","local":"2001:db8::abcd","prefixlen":64,"scope":"global",
                 "dynamic":true,"mngtmpaddr":true,"valid_life_time":86400},
                {"family":"inet6","local":"fe80::11:22ff:fe33:4455","prefixlen":64,"scope":"link",
                 "valid_life_time":4294967295}]}]"#,
        )
        .unwrap()
    }

    #[test]
    fn addresses_leave_out_the_kernels_own() {
        let links = links_json();
        let lo = link_addresses(&links[0]);
        assert_eq!(lo.len(), 1);
        assert_eq!(lo[0].address, "127.0.0.2");
        assert_eq!(lo[0].scope, "host");
        let eth = link_addresses(&links[1]);
        let got: Vec<&str> = eth.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(got, ["198.18.250.10", "198.18.250.11", "2001:db8::10"]);
        assert_eq!(eth[1].label, "eth0:1");
        assert_eq!(eth[1].broadcast, "198.18.250.255");
        assert_eq!(eth[0].label, "");
        assert_eq!(eth[2].flags, ["nodad"]);
        assert_eq!(links[1].kind(), "veth");
        assert_eq!(links[0].kind(), "loopback");
    }

    #[test]
    fn routes_leave_out_the_kernels_own() {
        let r: Vec<IpRoute> = serde_json::from_str(
            r#"[{"dst":"default","gateway":"198.18.250.1","dev":"eth0","flags":[]},
                {"dst":"198.18.250.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"198.18.250.10","flags":[]},
                {"type":"blackhole","dst":"198.18.250.128/25","flags":[]},
                {"dst":"10.1.0.0/16","gateway":"198.18.250.1","dev":"eth0","table":"7","protocol":"static","metric":5,"flags":["onlink"],"metrics":[{"mtu":1300}]},
                {"type":"local","dst":"127.0.0.1","dev":"lo","table":"local","protocol":"kernel","scope":"host","flags":[]}]"#,
        )
        .unwrap();
        let kept = routes_to_keep(1, "inet", r).unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].dst, "default");
        assert_eq!(kept[1].r#type, "blackhole");
        assert_eq!((kept[2].table.as_str(), kept[2].mtu), ("7", 1300));
        let c: Vec<String> = kept.iter().map(|r| route_cmd(r).unwrap().line).collect();
        assert_eq!(c[0], "route add 0.0.0.0/0 via 198.18.250.1 dev eth0");
        assert_eq!(c[1], "route add blackhole 198.18.250.128/25");
        assert_eq!(
            c[2],
            "route add 10.1.0.0/16 via 198.18.250.1 dev eth0 proto static table 7 metric 5 mtu 1300 onlink"
        );
        let multipath: Vec<IpRoute> =
            serde_json::from_str(r#"[{"dst":"default","nexthops":[{"gateway":"1.2.3.4"}]}]"#)
                .unwrap();
        let e = routes_to_keep(7, "inet", multipath)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pid 7") && e.contains("multipath"), "{e}");
    }

    #[test]
    fn eui64_matches_the_kernel() {
        assert_eq!(
            eui64_link_local("02:11:22:33:44:55"),
            Some("fe80::11:22ff:fe33:4455".parse().unwrap())
        );
    }

    #[test]
    fn veth_request_checks_its_input() {
        let ok = VethRequest {
            bridge: "br0".into(),
            addresses: vec!["198.18.250.10/24".into(), "2001:db8::10/64".into()],
            gateway: Some("198.18.250.1".into()),
            mac: Some("02:00:C6:12:FA:0A".into()),
            mtu: Some(1400),
        };
        let img = ok.image().unwrap();
        assert_eq!(img.links[0].mac, "02:00:c6:12:fa:0a");
        assert_eq!(img.links[0].addresses[1].family, "inet6");
        assert_eq!(img.routes[0].dst, "default");
        let cmds: Vec<String> = img.links[0]
            .addresses
            .iter()
            .map(|a| addr_cmd("eth0", a).unwrap().line)
            .collect();
        assert_eq!(cmds[0], "addr add 198.18.250.10/24 dev eth0");
        assert_eq!(cmds[1], "addr add 2001:db8::10/64 dev eth0 nodad");
        let random = VethRequest {
            mac: None,
            ..ok.clone()
        }
        .image()
        .unwrap();
        let m = parse_mac(&random.links[0].mac).unwrap();
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
        for (req, needle) in [
            (
                VethRequest {
                    addresses: vec!["198.18.250.10".into()],
                    ..ok.clone()
                },
                "no prefix length",
            ),
            (
                VethRequest {
                    addresses: vec!["198.18.250.300/24".into()],
                    ..ok.clone()
                },
                "not an IPv4 or IPv6",
            ),
            (
                VethRequest {
                    addresses: vec!["198.18.250.10/33".into()],
                    ..ok.clone()
                },
                "above 32",
            ),
            (
                VethRequest {
                    addresses: vec!["2001:db8::10/64".into()],
                    ..ok.clone()
                },
                "no IPv4 --address",
            ),
            (
                VethRequest {
                    mac: Some("01:00:5e:00:00:01".into()),
                    ..ok.clone()
                },
                "multicast",
            ),
            (
                VethRequest {
                    mac: Some("02:00:c6:12:fa".into()),
                    ..ok.clone()
                },
                "six hex bytes",
            ),
            (
                VethRequest {
                    mtu: Some(20),
                    ..ok.clone()
                },
                "--mtu",
            ),
            (
                VethRequest {
                    bridge: "br 0".into(),
                    ..ok.clone()
                },
                "--veth",
            ),
        ] {
            let e = req.image().unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn node_end_names_fit_and_differ() {
        let a = node_end_name("zdtm-job_net_veth-1234", 0);
        assert!(a.starts_with("ckj-") && a.len() <= 15, "{a}");
        assert_ne!(a, node_end_name("zdtm-job_net_veth-1235", 0));
        assert!(node_end_name("x", 12).len() <= 15);
        assert_eq!(a, node_end_name("zdtm-job_net_veth-1234", 0));
    }

    #[test]
    fn tokens_refuse_what_batch_would_misread() {
        assert!(token("t", "eth0").is_ok());
        for bad in ["", "a b", "a#b", "a\"b", "a\nb"] {
            assert!(token("t", bad).is_err(), "{bad:?}");
        }
        assert!(ifname("averyveryverylongname").is_err());
    }
}
