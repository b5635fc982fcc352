//! Job specs: what `ckpt-coord launch JOBSPEC` starts (TOML,
//! docs/OPERATIONS.md). A job is one or more parts; each part is one
//! command started by one node's agent as an agent job of its own
//! (`JOBID.PART`), with its own namespaces and, optionally, its own network
//! address that moves with it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::config::valid_hostname;
use crate::{is_safe_name, line_of, toml_problem, FileProblem};

/// Longest agent job id (a cgroup name), the agent's limit.
pub const MAX_AGENT_JOB_ID: usize = 64;
/// Longest part name.
pub const MAX_PART_NAME: usize = 32;

/// Why a job spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("job spec {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<FileProblem>),
}

impl From<FileProblem> for SpecError {
    fn from(p: FileProblem) -> Self {
        SpecError::Invalid(Box::new(p))
    }
}

/// An address with its prefix length, such as `198.18.1.100/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' has no prefix length (write it as ADDRESS/PREFIX)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("'{p}' is not a prefix length (0-{max})"))?;
        if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
            return Err(format!("'{a}' cannot be a part's own address"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in this address's subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u32) {
            match ip {
                IpAddr::V4(a) => (u32::from(a) as u128, 32),
                IpAddr::V6(a) => (u128::from(a), 128),
            }
        };
        let ((a, wa), (b, wb)) = (bits(self.addr), bits(ip));
        if wa != wb {
            return false;
        }
        let host_bits = wa - u32::from(self.prefix);
        let mask = if host_bits >= 128 {
            0
        } else {
            !0u128 << host_bits
        };
        (a & mask) == (b & mask)
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a MAC address (write six hex bytes, 02:00:00:00:00:01)");
        let mut out = [0u8; 6];
        let mut n = 0;
        for b in s.split(':') {
            if n == 6 || b.len() != 2 {
                return Err(bad());
            }
            out[n] = u8::from_str_radix(b, 16).map_err(|_| bad())?;
            n += 1;
        }
        if n != 6 {
            return Err(bad());
        }
        if out[0] & 1 != 0 || out == [0; 6] {
            return Err(format!(
                "'{s}' is a multicast or zero address, not one interface's"
            ));
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Mac {
    /// The MAC a part gets when its spec names none: stable for the job and
    /// part (a restored part keeps its MAC anyway; a stable one also makes
    /// relaunches look the same to neighbours), locally administered.
    pub fn derived(job: &str, part: &str) -> Mac {
        let h = Sha256::new()
            .chain_update(b"ckpt-mac\0")
            .chain_update(job.as_bytes())
            .chain_update(b"\0")
            .chain_update(part.as_bytes())
            .finalize();
        let mut m = [0u8; 6];
        m.copy_from_slice(&h[..6]);
        m[0] = (m[0] & 0xfc) | 0x02;
        Mac(m)
    }
}

fn ser_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_opt_display<T: fmt::Display, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// A part's network interface: a veth whose other end joins its node's bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    #[serde(serialize_with = "ser_display")]
    pub address: Cidr,
    /// Default route via this gateway; none when absent.
    #[serde(
        serialize_with = "ser_opt_display",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway: Option<IpAddr>,
    #[serde(serialize_with = "ser_display")]
    pub mac: Mac,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// One part of a job: a command on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Part {
    pub name: String,
    /// The node it runs on; None until placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub command: String,
    pub args: Vec<String>,
    /// The job's environment merged with the part's own (the part wins).
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
    /// The file its stdout and stderr are appended to (on the node; set
    /// at launch to STORE/JOB/output/PART.log when absent, so that it
    /// follows the part to any node that sees the store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// Its own network namespace (always, when it has a network).
    pub net: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Hostname in its own UTS namespace.
    pub hostname: String,
}

/// A checked job spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobSpec {
    pub job: String,
    #[serde(rename = "part")]
    pub parts: Vec<Part>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    job: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    part: Vec<Spanned<RawPart>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPart {
    name: Spanned<String>,
    node: Option<Spanned<String>>,
    command: Spanned<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    workdir: Option<Spanned<String>>,
    output: Option<Spanned<String>>,
    net: Option<Spanned<bool>>,
    network: Option<Spanned<RawNetwork>>,
    hostname: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    address: Spanned<String>,
    gateway: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    mtu: Option<Spanned<u32>>,
}

/// A job id of the agent's alphabet; returns why not.
pub fn check_job_id(job: &str) -> Result<(), String> {
    if is_safe_name(job, MAX_AGENT_JOB_ID, &['.']) {
        Ok(())
    } else {
        Err(format!(
            "'{job}' is not a valid job id: use 1 to {MAX_AGENT_JOB_ID} letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

/// A fresh job id: the spec's file name, the time and a few random-ish
/// hex digits, so that two launches of one spec never collide.
pub fn generate_job_id(spec_file: &Path) -> String {
    let stem: String = spec_file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("job")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(20)
        .collect();
    let stem = if stem.is_empty() {
        "job".to_string()
    } else {
        stem
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let salt = Sha256::new()
        .chain_update(nanos.to_le_bytes())
        .chain_update(std::process::id().to_le_bytes())
        .finalize();
    format!(
        "{stem}-{}-{}",
        crate::time::compact_utc(crate::time::now_unix_ms()),
        hex::encode(&salt[..2])
    )
}

impl JobSpec {
    /// Reads and checks the job spec in `path`; `job` overrides its job id
    /// (`launch --job`).
    pub fn load(path: &Path, job: Option<&str>) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        JobSpec::parse(&text, path, job)
    }

    /// Parses and checks spec `text` (from `file`, for messages and a
    /// generated job id).
    pub fn parse(
        text: &str,
        file: &Path,
        job_override: Option<&str>,
    ) -> Result<JobSpec, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| {
            toml_problem(
                file,
                text,
                &e,
                "see the job spec format in docs/OPERATIONS.md",
            )
        })?;
        let at = |span: std::ops::Range<usize>, field: String, problem: String, fix: &str| {
            SpecError::from(FileProblem {
                file: file.to_owned(),
                line: Some(line_of(text, span.start)),
                field,
                problem,
                fix: fix.to_string(),
            })
        };
        let job = match (job_override, &raw.job) {
            (Some(j), _) => {
                check_job_id(j).map_err(|e| {
                    SpecError::from(FileProblem {
                        file: file.to_owned(),
                        line: None,
                        field: "--job".into(),
                        problem: e,
                        fix: String::new(),
                    })
                })?;
                j.to_string()
            }
            (None, Some(j)) => {
                check_job_id(j.get_ref()).map_err(|e| at(j.span(), "job".into(), e, ""))?;
                j.get_ref().clone()
            }
            (None, None) => generate_job_id(file),
        };
        check_env(&raw.env, "env", &at)?;
        if raw.part.is_empty() {
            return Err(SpecError::from(FileProblem {
                file: file.to_owned(),
                line: None,
                field: "part".into(),
                problem: "the job has no parts".into(),
                fix: "add at least one [[part]] with a name and a command".into(),
            }));
        }

        let mut parts: Vec<Part> = Vec::new();
        // Where each part's address and MAC were written, for "used twice" messages.
        let mut seen_addr: Vec<(IpAddr, String)> = Vec::new();
        let mut seen_mac: Vec<(Mac, String)> = Vec::new();
        for (i, sp) in raw.part.iter().enumerate() {
            let p = sp.get_ref();
            let field = |f: &str| format!("part[{i}].{f}");
            let name = p.name.get_ref();
            if !is_safe_name(name, MAX_PART_NAME, &[]) {
                return Err(at(
                    p.name.span(),
                    field("name"),
                    format!("'{name}' is not a valid part name"),
                    &format!("use 1 to {MAX_PART_NAME} letters, digits, '-' or '_'"),
                ));
            }
            if parts.iter().any(|o| &o.name == name) {
                return Err(at(
                    p.name.span(),
                    field("name"),
                    format!("two parts are called '{name}'"),
                    "give every part its own name",
                ));
            }
            let agent_job = format!("{job}.{name}");
            if agent_job.len() > MAX_AGENT_JOB_ID {
                return Err(at(
                    p.name.span(),
                    field("name"),
                    format!(
                        "the part's agent job id '{agent_job}' is longer than {MAX_AGENT_JOB_ID} characters"
                    ),
                    "shorten the job id or the part name",
                ));
            }
            if let Some(n) = &p.node {
                if !is_safe_name(n.get_ref(), 64, &['.']) {
                    return Err(at(
                        n.span(),
                        field("node"),
                        format!("'{}' is not a valid node name", n.get_ref()),
                        "name a node of the cluster configuration, or leave node out",
                    ));
                }
            }
            if p.command.get_ref().trim().is_empty() || p.command.get_ref().contains('\0') {
                return Err(at(
                    p.command.span(),
                    field("command"),
                    "empty command".into(),
                    "name the program to run; its arguments go in args = [...]",
                ));
            }
            if p.args.iter().any(|a| a.contains('\0')) {
                return Err(at(
                    sp.span(),
                    field("args"),
                    "an argument holds a NUL byte".into(),
                    "",
                ));
            }
            check_env(&p.env, &field("env"), &at)?;
            let workdir = crate::absolute_path(
                p.workdir.as_ref(),
                field("workdir"),
                "a part starts on a node of its own: give the full path",
                at,
            )?;
            let output = crate::absolute_path(
                p.output.as_ref(),
                field("output"),
                "give the full path of a file every node the part may run on sees",
                at,
            )?;
            let network = match &p.network {
                None => None,
                Some(n) => Some(network(n, &job, name, &field, &at)?),
            };
            let net = match (&p.net, &network) {
                (Some(v), Some(_)) if !*v.get_ref() => {
                    return Err(at(
                        v.span(),
                        field("net"),
                        "net = false, but the part has a [part.network]".into(),
                        "a network needs the part's own network namespace: remove net = false or the network",
                    ))
                }
                (v, n) => n.is_some() || v.as_ref().is_some_and(|v| *v.get_ref()),
            };
            if let (Some(net), Some(raw_net)) = (&network, &p.network) {
                let raw_net = raw_net.get_ref();
                if let Some((_, other)) = seen_addr.iter().find(|(a, _)| *a == net.address.addr) {
                    return Err(at(
                        raw_net.address.span(),
                        field("network.address"),
                        format!(
                            "parts '{other}' and '{name}' both have address {}",
                            net.address.addr
                        ),
                        "give every part its own address",
                    ));
                }
                seen_addr.push((net.address.addr, name.clone()));
                if let Some((_, other)) = seen_mac.iter().find(|(m, _)| *m == net.mac) {
                    let span = raw_net.mac.as_ref().map_or(sp.span(), |m| m.span());
                    return Err(at(
                        span,
                        field("network.mac"),
                        format!("parts '{other}' and '{name}' both have MAC {}", net.mac),
                        "give every part its own MAC, or leave mac out to have one derived",
                    ));
                }
                seen_mac.push((net.mac, name.clone()));
            }
            let hostname = match &p.hostname {
                Some(h) if !valid_hostname(h.get_ref()) => {
                    return Err(at(
                        h.span(),
                        field("hostname"),
                        format!("'{}' is not a valid hostname", h.get_ref()),
                        "use 1 to 64 characters without spaces or '/'",
                    ))
                }
                Some(h) => h.get_ref().clone(),
                None => name.clone(),
            };
            let mut env: BTreeMap<String, String> = raw
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.get_ref().clone()))
                .collect();
            env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())));
            parts.push(Part {
                name: name.clone(),
                node: p.node.as_ref().map(|n| n.get_ref().clone()),
                command: p.command.get_ref().clone(),
                args: p.args.clone(),
                env,
                workdir,
                output,
                net,
                network,
                hostname,
            });
        }
        Ok(JobSpec { job, parts })
    }

    /// The spec as TOML, in the form `parse` reads back (with the job id,
    /// placement and defaults filled in): what a manifest records.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a job spec serializes to TOML")
    }

    /// The part called `name`.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// The job id the agent runs part `part` under (its cgroup name).
    pub fn agent_job_id(&self, part: &str) -> String {
        format!("{}.{part}", self.job)
    }
}

type At<'a> = dyn Fn(std::ops::Range<usize>, String, String, &str) -> SpecError + 'a;

fn check_env(
    env: &BTreeMap<String, Spanned<String>>,
    field: &str,
    at: &At,
) -> Result<(), SpecError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(at(
                v.span(),
                format!("{field}.{k}"),
                format!("'{k}' is not an environment variable name"),
                "names hold no '=' and no NUL",
            ));
        }
        if v.get_ref().contains('\0') {
            return Err(at(
                v.span(),
                format!("{field}.{k}"),
                "the value holds a NUL byte".into(),
                "",
            ));
        }
    }
    Ok(())
}

fn network(
    n: &Spanned<RawNetwork>,
    job: &str,
    part: &str,
    field: &dyn Fn(&str) -> String,
    at: &At,
) -> Result<Network, SpecError> {
    let n = n.get_ref();
    let address: Cidr = n.address.get_ref().parse().map_err(|e| {
        at(
            n.address.span(),
            field("network.address"),
            e,
            "write e.g. address = \"198.18.1.100/24\"",
        )
    })?;
    let gateway = match &n.gateway {
        None => None,
        Some(g) => {
            let ip: IpAddr = g.get_ref().parse().map_err(|_| {
                at(
                    g.span(),
                    field("network.gateway"),
                    format!("'{}' is not an IP address", g.get_ref()),
                    "write an address without prefix, e.g. gateway = \"198.18.1.1\"",
                )
            })?;
            if ip == address.addr || !address.contains(ip) {
                return Err(at(
                    g.span(),
                    field("network.gateway"),
                    format!("gateway {ip} is not another address in {address}"),
                    "the gateway must be reachable on the part's own subnet",
                ));
            }
            Some(ip)
        }
    };
    let mac = match &n.mac {
        None => Mac::derived(job, part),
        Some(m) => m.get_ref().parse().map_err(|e| {
            at(
                m.span(),
                field("network.mac"),
                e,
                "or leave mac out to have one derived",
            )
        })?,
    };
    let mtu = match &n.mtu {
        Some(m) if !(68..=65535).contains(m.get_ref()) => {
            return Err(at(
                m.span(),
                field("network.mtu"),
                format!("MTU {} is out of range", m.get_ref()),
                "use 68 to 65535, or leave mtu out",
            ))
        }
        m => m.as_ref().map(|m| *m.get_ref()),
    };
    Ok(Network {
        address,
        gateway,
        mac,
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STENCIL: &str = r#"
job = "stencil-1"

[env]
OMP_NUM_THREADS = "2"

[[part]]
name = "left"
node = "n1"
command = "/usr/local/bin/stencil"
args = ["--rank", "0", "--peer", "198.18.1.101:5000"]
workdir = "/shared/run"
env = { RANK = "0", OMP_NUM_THREADS = "4" }

[part.network]
address = "198.18.1.100/24"
gateway = "198.18.1.1"

[[part]]
name = "right"
command = "/usr/local/bin/stencil"
args = ["--rank", "1"]
hostname = "rank1"

[part.network]
address = "198.18.1.101/24"
mac = "02:00:00:00:01:01"
mtu = 1400
"#;

    fn parse(text: &str) -> Result<JobSpec, SpecError> {
        JobSpec::parse(text, Path::new("/jobs/stencil.toml"), None)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("spec must be refused").to_string()
    }

    #[test]
    fn good_spec() {
        let s = parse(STENCIL).unwrap();
        assert_eq!(s.job, "stencil-1");
        assert_eq!(s.parts.len(), 2);
        let l = &s.parts[0];
        assert_eq!(l.node.as_deref(), Some("n1"));
        assert_eq!(l.args[3], "198.18.1.101:5000");
        assert_eq!(l.env["OMP_NUM_THREADS"], "4", "the part's env wins");
        assert_eq!(l.env["RANK"], "0");
        assert!(l.net);
        let n = l.network.as_ref().unwrap();
        assert_eq!(n.address.to_string(), "198.18.1.100/24");
        assert_eq!(n.gateway.unwrap().to_string(), "198.18.1.1");
        assert_eq!(n.mac, Mac::derived("stencil-1", "left"));
        assert_eq!(l.hostname, "left");
        let r = &s.parts[1];
        assert_eq!(r.node, None);
        assert_eq!(r.env["OMP_NUM_THREADS"], "2", "the job's env applies");
        assert_eq!(r.hostname, "rank1");
        assert_eq!(
            r.network.as_ref().unwrap().mac.to_string(),
            "02:00:00:00:01:01"
        );
        assert_eq!(r.network.as_ref().unwrap().mtu, Some(1400));
        assert_eq!(s.agent_job_id("left"), "stencil-1.left");
    }

    #[test]
    fn round_trips_through_toml() {
        let s = parse(STENCIL).unwrap();
        let again = JobSpec::parse(&s.to_toml(), Path::new("manifest"), None).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn job_id_override_and_generation() {
        let s = JobSpec::parse(STENCIL, Path::new("x.toml"), Some("other")).unwrap();
        assert_eq!(s.job, "other");
        let text = STENCIL.replace("job = \"stencil-1\"", "");
        let a = parse(&text).unwrap();
        assert!(a.job.starts_with("stencil-"), "{}", a.job);
        check_job_id(&a.job).unwrap();
        // the derived MAC follows the job id
        assert_eq!(
            a.parts[0].network.as_ref().unwrap().mac,
            Mac::derived(&a.job, "left")
        );
        let e = JobSpec::parse(STENCIL, Path::new("x.toml"), Some("../x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--job: '../x' is not a valid job id"), "{e}");
    }

    #[test]
    fn part_without_network() {
        let s = parse("[[part]]\nname = \"a\"\ncommand = \"sleep\"\nargs = [\"9\"]\n").unwrap();
        assert!(!s.parts[0].net);
        assert!(s.parts[0].network.is_none());
        let s = parse("[[part]]\nname = \"a\"\ncommand = \"sleep\"\nnet = true\n").unwrap();
        assert!(s.parts[0].net && s.parts[0].network.is_none());
    }

    #[test]
    fn bad_specs_name_line_field_and_fix() {
        let p = "[[part]]\nname = \"a\"\ncommand = \"x\"\n";
        let cases: Vec<(String, &str)> = vec![
            ("job = \"j\"\n".into(), "part: the job has no parts; add at least one [[part]]"),
            (format!("{p}{p}"), "stencil.toml:5: part[1].name: two parts are called 'a'"),
            ("[[part]]\nname = \"a.b\"\ncommand = \"x\"\n".into(), "part[0].name: 'a.b' is not a valid part name"),
            ("[[part]]\nname = \"a\"\ncommand = \" \"\n".into(), "stencil.toml:3: part[0].command: empty command"),
            ("[[part]]\nname = \"a\"\n".into(), "missing field `command`"),
            (format!("{p}comand = \"y\"\n"), "stencil.toml:4: unknown field `comand`"),
            (format!("{p}workdir = \"rel\"\n"), "stencil.toml:4: part[0].workdir: 'rel' is not an absolute path"),
            (format!("{p}node = \"../n\"\n"), "part[0].node: '../n' is not a valid node name"),
            (format!("{p}hostname = \"\"\n"), "part[0].hostname: '' is not a valid hostname"),
            (format!("{p}env = {{ \"A=B\" = \"1\" }}\n"), "part[0].env.A=B: 'A=B' is not an environment variable name"),
            ("job = \"a/b\"\n".to_string() + p, "stencil.toml:1: job: 'a/b' is not a valid job id"),
            (format!("job = \"{}\"\n{p}", "j".repeat(63)), "longer than 64 characters"),
            (format!("{p}[part.network]\naddress = \"198.18.1.100\"\n"), "stencil.toml:5: part[0].network.address: '198.18.1.100' has no prefix length"),
            (format!("{p}[part.network]\naddress = \"198.18.1.300/24\"\n"), "'198.18.1.300' is not an IPv4 or IPv6 address"),
            (format!("{p}[part.network]\naddress = \"198.18.1.3/33\"\n"), "'33' is not a prefix length (0-32)"),
            (format!("{p}[part.network]\naddress = \"127.0.0.1/8\"\n"), "cannot be a part's own address"),
            (format!("{p}[part.network]\naddress = \"198.18.1.3/24\"\ngateway = \"198.18.2.1\"\n"), "stencil.toml:6: part[0].network.gateway: gateway 198.18.2.1 is not another address in 198.18.1.3/24"),
            (format!("{p}[part.network]\naddress = \"198.18.1.3/24\"\ngateway = \"fd00::1\"\n"), "is not another address"),
            (format!("{p}[part.network]\naddress = \"198.18.1.3/24\"\nmac = \"01:00:00:00:00:01\"\n"), "multicast"),
            (format!("{p}[part.network]\naddress = \"198.18.1.3/24\"\nmac = \"02:00:00:00:00\"\n"), "is not a MAC address"),
            (format!("{p}[part.network]\naddress = \"198.18.1.3/24\"\nmtu = 20\n"), "part[0].network.mtu: MTU 20 is out of range"),
            (format!("{p}net = false\n[part.network]\naddress = \"198.18.1.3/24\"\n"), "stencil.toml:4: part[0].net: net = false, but the part has a [part.network]"),
            (
                format!("{p}[part.network]\naddress = \"198.18.1.3/24\"\n[[part]]\nname = \"b\"\ncommand = \"x\"\n[part.network]\naddress = \"198.18.1.3/16\"\n"),
                "stencil.toml:10: part[1].network.address: parts 'a' and 'b' both have address 198.18.1.3",
            ),
            (
                format!("{p}[part.network]\naddress = \"198.18.1.3/24\"\nmac = \"02:00:00:00:00:09\"\n[[part]]\nname = \"b\"\ncommand = \"x\"\n[part.network]\naddress = \"198.18.1.4/24\"\nmac = \"02:00:00:00:00:09\"\n"),
                "part[1].network.mac: parts 'a' and 'b' both have MAC 02:00:00:00:00:09",
            ),
            ("[[part]\n".into(), "stencil.toml:1:"),
        ];
        for (text, want) in &cases {
            let e = err(text);
            assert!(e.contains(want), "for {text:?}\n got: {e}\nwant: {want}");
            assert!(e.starts_with("/jobs/stencil.toml"), "{e}");
        }
    }

    #[test]
    fn the_example_in_the_operations_guide_parses() {
        let doc = include_str!("../../docs/OPERATIONS.md");
        let start = doc.find("```toml\njob = ").expect("a job spec example") + "```toml\n".len();
        let text = &doc[start..start + doc[start..].find("```").unwrap()];
        let s = JobSpec::parse(text, Path::new("OPERATIONS.md"), None).unwrap();
        assert_eq!(s.job, "stencil-1");
        assert_eq!(s.parts.len(), 2);
        assert_eq!(s.parts[0].env["RANK"], "0");
        assert_eq!(s.parts[1].env["OMP_NUM_THREADS"], "2");
        assert!(s.parts[1].net);
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "198.18.1.100/24".parse().unwrap();
        assert!(c.contains("198.18.1.1".parse().unwrap()));
        assert!(!c.contains("198.18.2.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let c: Cidr = "fd00::10/64".parse().unwrap();
        assert!(c.contains("fd00::1".parse().unwrap()));
        assert!(!c.contains("fd01::1".parse().unwrap()));
        let c: Cidr = "10.1.2.3/0".parse().unwrap();
        assert!(c.contains("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn derived_macs_are_local_unicast_and_stable() {
        let a = Mac::derived("j", "a");
        assert_eq!(a, Mac::derived("j", "a"));
        assert_ne!(a, Mac::derived("j", "b"));
        assert_ne!(a, Mac::derived("k", "a"));
        assert_eq!(a.0[0] & 3, 2, "locally administered, unicast: {a}");
        assert_eq!(a.to_string().parse::<Mac>().unwrap(), a);
    }
}
