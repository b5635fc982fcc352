//! Cluster configuration: the nodes and their agents, the cluster key, the
//! checkpoint store, retention and timeouts (TOML, docs/OPERATIONS.md).
//!
//! Where it comes from: `--config FILE`, else `$CKPT_CLUSTER`, else
//! `/etc/ckpt/cluster.toml`; when none of these exists, a local-only
//! cluster of one node named after this host, with an in-process agent.

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{is_safe_name, line_of, toml_problem, FileProblem};

/// Where the configuration is looked for when neither `--config` nor
/// `$CKPT_CLUSTER` names one.
pub const DEFAULT_CONFIG: &str = "/etc/ckpt/cluster.toml";
/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "CKPT_CLUSTER";
/// Checkpoint store of a cluster whose configuration names none.
pub const DEFAULT_STORE: &str = "/var/lib/ckpt/store";
/// Committed checkpoints kept per job unless the configuration says otherwise.
pub const DEFAULT_KEEP: usize = 3;
/// Bridge a node's job veths join unless its configuration names another.
pub const DEFAULT_BRIDGE: &str = "br0";
/// Where a node's agent serves users who cannot read the cluster key
/// (`ckpt-agent serve --user-socket`, as the shipped unit starts it).
pub const DEFAULT_USER_SOCKET: &str = "/run/ckpt/agent.sock";
/// Fewest bytes a cluster key file may hold (the HMAC-SHA256 output size).
pub const MIN_KEY_BYTES: u64 = 32;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cluster configuration {path} (from {via}): {source}")]
    Read {
        path: PathBuf,
        via: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<FileProblem>),
    #[error("node {name}: not in the cluster configuration {config} (known nodes: {known})")]
    UnknownNode {
        name: String,
        config: String,
        known: String,
    },
}

impl From<FileProblem> for ConfigError {
    fn from(p: FileProblem) -> Self {
        ConfigError::Invalid(Box::new(p))
    }
}

/// How the coordinator reaches a node's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// The local-only cluster: the agent runs inside ckpt-coord.
    InProcess,
    /// A `ckpt-agent serve` listening on host:port (host may be a name, an
    /// IPv4 address or a bracketed IPv6 address).
    Tcp { host: String, port: u16 },
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddr::InProcess => write!(f, "in-process"),
            AgentAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Serialize for AgentAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl AgentAddr {
    /// Parses `host:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("'{s}' is not host:port ({why})");
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the port must be 1-65535"))?;
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(bad("no host"));
        }
        if host.contains(':') || host.starts_with('[') {
            let inner = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .ok_or_else(|| bad("write an IPv6 address in brackets, [::1]:7707"))?;
            inner
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address in the brackets"))?;
        }
        Ok(AgentAddr::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

/// One machine of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// The name jobs, `--nodes` and checkpoints use.
    pub name: String,
    pub agent: AgentAddr,
    /// Network namespace to connect from (a simulated node of a lab).
    pub netns: Option<PathBuf>,
    /// The node's hostname, where it differs from its name.
    pub hostname: Option<String>,
    /// Bridge on the node that job veths join.
    pub bridge: String,
}

/// How long the coordinator waits for each step before it gives up (and,
/// before a commit, aborts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "secs")]
    pub connect: Duration,
    #[serde(serialize_with = "secs")]
    pub freeze: Duration,
    #[serde(serialize_with = "secs")]
    pub dump: Duration,
    #[serde(serialize_with = "secs")]
    pub restore: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            freeze: Duration::from_secs(30),
            dump: Duration::from_secs(600),
            restore: Duration::from_secs(600),
        }
    }
}

/// The cluster key: shared by the coordinator and every agent, it signs
/// checkpoint manifests (and authenticates the coordinator to agents).
#[derive(Clone)]
pub struct ClusterKey {
    path: PathBuf,
    /// The same key as the agents' wire protocol uses it.
    key: ckpt_proto::rpc::Key,
    len: usize,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key itself, not even in debug logs.
        write!(f, "ClusterKey({}, {} bytes)", self.path.display(), self.len)
    }
}

impl Serialize for ClusterKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.path.display())
    }
}

impl ClusterKey {
    /// A key from bytes already checked (tests, and keys handed over by a
    /// caller); shorter than the protocol accepts is a caller's bug.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        ClusterKey {
            path: path.to_owned(),
            key: ckpt_proto::rpc::Key::from_bytes(bytes).expect("a checked key length"),
            len,
        }
    }

    /// The key for authenticating to the agents.
    pub fn rpc(&self) -> &ckpt_proto::rpc::Key {
        &self.key
    }

    /// Reads a key file after checking that only its owner can read it.
    pub fn load(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let gen = format!(
            "make one with: head -c 32 /dev/urandom > {shown} && chmod 600 {shown}, \
             and copy it to every node"
        );
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{shown} does not exist; {gen}"),
            _ => format!("{shown}: {e}"),
        })?;
        if !meta.is_file() {
            return Err(format!("{shown} is not a regular file; {gen}"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{shown} has mode {mode:04o}: other users can read the cluster key; \
                 run: chmod 600 {shown}"
            ));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != me {
            return Err(format!(
                "{shown} is owned by uid {}, neither root nor this user (uid {me}); \
                 run: chown root {shown}",
                meta.uid()
            ));
        }
        if meta.len() < MIN_KEY_BYTES {
            return Err(format!(
                "{shown} holds {} bytes, a cluster key needs at least {MIN_KEY_BYTES}; {gen}",
                meta.len()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        Ok(ClusterKey::from_bytes(path, bytes))
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// HMAC-SHA256 of `data` under this key.
    pub fn sign(&self, data: &[u8]) -> Vec<u8> {
        self.key.mac(&[data])
    }

    /// Whether `signature` is this key's HMAC-SHA256 of `data` (constant time).
    pub fn verify(&self, data: &[u8], signature: &[u8]) -> bool {
        self.key.verify(&[data], signature)
    }
}

/// A loaded, checked cluster configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    /// The file it came from; None for the built-in local-only cluster.
    pub source: Option<PathBuf>,
    pub nodes: Vec<Node>,
    /// None: checkpoints are not signed (allowed for a local-only cluster),
    /// or this user cannot read the key (see `user_socket`).
    pub key: Option<ClusterKey>,
    /// Set when the cluster has a key this user cannot read: the agent of
    /// this machine serves them on this socket, relaying their requests
    /// and signing their manifests with the key.
    pub user_socket: Option<PathBuf>,
    /// The checkpoint store, a directory every node sees.
    pub store: PathBuf,
    /// Committed checkpoints kept per job.
    pub keep: usize,
    pub timeouts: Timeouts,
    /// The cluster is this machine alone, with an in-process agent.
    pub local_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    key: Option<Spanned<String>>,
    user_socket: Option<Spanned<String>>,
    store: Option<Spanned<String>>,
    keep: Option<Spanned<u64>>,
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    node: Vec<Spanned<RawNode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect_secs: Option<Spanned<u64>>,
    freeze_secs: Option<Spanned<u64>>,
    dump_secs: Option<Spanned<u64>>,
    restore_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    agent: Spanned<String>,
    netns: Option<Spanned<String>>,
    hostname: Option<Spanned<String>>,
    bridge: Option<Spanned<String>>,
}

/// Which file to read, and what named it (for messages).
pub fn locate(
    explicit: Option<&Path>,
    env: Option<&std::ffi::OsStr>,
) -> Option<(PathBuf, &'static str)> {
    if let Some(p) = explicit {
        return Some((p.to_owned(), "--config"));
    }
    if let Some(v) = env.filter(|v| !v.is_empty()) {
        return Some((PathBuf::from(v), CONFIG_ENV));
    }
    let d = Path::new(DEFAULT_CONFIG);
    d.exists().then(|| (d.to_owned(), "the default location"))
}

impl Cluster {
    /// Loads the configuration `--config` (or `$CKPT_CLUSTER`, or the
    /// default file) names; the local-only cluster when there is none.
    pub fn load(explicit: Option<&Path>) -> Result<Cluster, ConfigError> {
        let env = std::env::var_os(CONFIG_ENV);
        match locate(explicit, env.as_deref()) {
            Some((path, via)) => {
                // Messages and relative paths in the file read best from an absolute path.
                let path = std::path::absolute(&path).unwrap_or(path);
                tracing::debug!(config = %path.display(), via, "reading cluster configuration");
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    via,
                    source,
                })?;
                Cluster::parse(&text, &path)
            }
            None => {
                tracing::debug!("no cluster configuration: local-only cluster");
                Cluster::local(None)
            }
        }
    }

    /// The cluster of this machine alone: one node named after the hostname.
    pub fn local(store: Option<PathBuf>) -> Result<Cluster, ConfigError> {
        Ok(Cluster {
            source: None,
            nodes: vec![local_node()],
            key: None,
            user_socket: None,
            store: store.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE)),
            keep: DEFAULT_KEEP,
            timeouts: Timeouts::default(),
            local_only: true,
        })
    }

    /// Parses and checks configuration `text` read from `file` (relative
    /// paths in it are taken from the file's directory).
    pub fn parse(text: &str, file: &Path) -> Result<Cluster, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            toml_problem(
                file,
                text,
                &e,
                "see the cluster configuration in docs/OPERATIONS.md",
            )
        })?;
        let base = file.parent().unwrap_or(Path::new("/"));
        let at = |span: std::ops::Range<usize>, field: String, problem: String, fix: &str| {
            ConfigError::from(FileProblem {
                file: file.to_owned(),
                line: Some(line_of(text, span.start)),
                field,
                problem,
                fix: fix.to_string(),
            })
        };
        let resolve = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };

        let mut nodes: Vec<Node> = Vec::new();
        for (i, n) in raw.node.iter().enumerate() {
            let n = n.get_ref();
            let name = n.name.get_ref();
            let field = |f: &str| format!("node[{i}].{f}");
            if !is_safe_name(name, 64, &['.']) {
                return Err(at(
                    n.name.span(),
                    field("name"),
                    format!("'{name}' is not a valid node name"),
                    "use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                ));
            }
            if nodes.iter().any(|o| &o.name == name) {
                return Err(at(
                    n.name.span(),
                    field("name"),
                    format!("node '{name}' is defined twice"),
                    "give every node its own name",
                ));
            }
            let agent = AgentAddr::parse(n.agent.get_ref()).map_err(|e| {
                at(
                    n.agent.span(),
                    field("agent"),
                    e,
                    "write e.g. agent = \"198.18.1.2:7707\"",
                )
            })?;
            let netns = crate::absolute_path(
                n.netns.as_ref(),
                field("netns"),
                "name the namespace file, e.g. /run/netns/ckl1-n1",
                at,
            )?;
            if let Some(o) = nodes.iter().find(|o| o.agent == agent && o.netns == netns) {
                return Err(at(
                    n.agent.span(),
                    field("agent"),
                    format!(
                        "nodes '{}' and '{name}' have the same agent {agent}",
                        o.name
                    ),
                    "every node runs its own agent: give each its own address (or netns)",
                ));
            }
            let hostname = match &n.hostname {
                Some(h) if !valid_hostname(h.get_ref()) => {
                    return Err(at(
                        h.span(),
                        field("hostname"),
                        format!("'{}' is not a valid hostname", h.get_ref()),
                        "use 1 to 64 characters without spaces or '/'",
                    ))
                }
                h => h.as_ref().map(|h| h.get_ref().clone()),
            };
            let bridge = match &n.bridge {
                Some(b) if !valid_ifname(b.get_ref()) => {
                    return Err(at(
                        b.span(),
                        field("bridge"),
                        format!("'{}' is not a valid interface name", b.get_ref()),
                        "use 1 to 15 characters without spaces, '/' or ':'",
                    ))
                }
                Some(b) => b.get_ref().clone(),
                None => DEFAULT_BRIDGE.to_string(),
            };
            nodes.push(Node {
                name: name.clone(),
                agent,
                netns,
                hostname,
                bridge,
            });
        }
        let local_only = nodes.is_empty();

        // A user who may not read the key goes through the agent of this
        // machine, which holds it.
        let key_path = raw.key.as_ref().map(|k| resolve(k.get_ref()));
        let user_socket = key_path
            .as_deref()
            .filter(|p| {
                !nix::unistd::geteuid().is_root()
                    && std::fs::File::open(p)
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
            })
            .map(|_| {
                raw.user_socket
                    .as_ref()
                    .map(|u| resolve(u.get_ref()))
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_USER_SOCKET))
            });
        let key = match &raw.key {
            Some(_) if user_socket.is_some() => None,
            Some(k) => Some(
                ClusterKey::load(key_path.as_deref().expect("a key path"))
                    .map_err(|e| at(k.span(), "key".into(), e, ""))?,
            ),
            None if !local_only => {
                return Err(ConfigError::from(FileProblem {
                    file: file.to_owned(),
                    line: None,
                    field: "key".into(),
                    problem: "a cluster with nodes needs a cluster key (agents take orders only \
                              from a coordinator that holds it)"
                        .into(),
                    fix: "add key = \"/etc/ckpt/cluster.key\" and create that file with: \
                          head -c 32 /dev/urandom > /etc/ckpt/cluster.key && chmod 600 /etc/ckpt/cluster.key"
                        .into(),
                }))
            }
            None => None,
        };

        let store = match &raw.store {
            Some(s) if s.get_ref().is_empty() => {
                return Err(at(
                    s.span(),
                    "store".into(),
                    "empty path".into(),
                    "name a directory every node sees, e.g. /shared/ckpt",
                ))
            }
            Some(s) => resolve(s.get_ref()),
            None => PathBuf::from(DEFAULT_STORE),
        };

        let keep = match &raw.keep {
            Some(k) if *k.get_ref() == 0 => {
                return Err(at(
                    k.span(),
                    "keep".into(),
                    "keep = 0 would delete every checkpoint".into(),
                    "keep at least 1 (the default is 3)",
                ))
            }
            Some(k) => *k.get_ref() as usize,
            None => DEFAULT_KEEP,
        };

        let mut timeouts = Timeouts::default();
        if let Some(t) = &raw.timeouts {
            for (name, v, slot) in [
                ("connect_secs", &t.connect_secs, &mut timeouts.connect),
                ("freeze_secs", &t.freeze_secs, &mut timeouts.freeze),
                ("dump_secs", &t.dump_secs, &mut timeouts.dump),
                ("restore_secs", &t.restore_secs, &mut timeouts.restore),
            ] {
                if let Some(v) = v {
                    if *v.get_ref() == 0 {
                        return Err(at(
                            v.span(),
                            format!("timeouts.{name}"),
                            "a timeout of 0 seconds fails every time".into(),
                            "give at least 1 (seconds)",
                        ));
                    }
                    *slot = Duration::from_secs(*v.get_ref());
                }
            }
        }

        let nodes = if local_only {
            vec![local_node()]
        } else {
            nodes
        };
        Ok(Cluster {
            source: Some(file.to_owned()),
            nodes,
            key,
            user_socket,
            store,
            keep,
            timeouts,
            local_only,
        })
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node called `name`, or an error listing the known ones.
    pub fn require_node(&self, name: &str) -> Result<&Node, ConfigError> {
        self.node(name).ok_or_else(|| ConfigError::UnknownNode {
            name: name.to_string(),
            config: self.describe_source(),
            known: self
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Where this configuration came from, for messages.
    pub fn describe_source(&self) -> String {
        match &self.source {
            Some(p) if self.local_only => format!("{} (local-only)", p.display()),
            Some(p) => p.display().to_string(),
            None => {
                format!("(none: no {DEFAULT_CONFIG}, --config or {CONFIG_ENV}; local-only cluster)")
            }
        }
    }
}

fn local_node() -> Node {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    Node {
        name: hostname,
        agent: AgentAddr::InProcess,
        netns: None,
        hostname: None,
        bridge: DEFAULT_BRIDGE.to_string(),
    }
}

/// What sethostname accepts and tools can print.
pub(crate) fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && !h
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c.is_control())
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c.is_whitespace() || c == '/' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Self {
            Dir(tempfile::tempdir().unwrap())
        }
        fn key(&self, mode: u32, len: usize) -> PathBuf {
            let p = self.0.path().join("cluster.key");
            std::fs::write(&p, vec![7u8; len]).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        }
        fn parse(&self, text: &str) -> Result<Cluster, ConfigError> {
            let f = self.0.path().join("cluster.toml");
            std::fs::write(&f, text).unwrap();
            Cluster::parse(text, &f)
        }
    }

    const TWO: &str = r#"
key = "cluster.key"
store = "/shared/ckpt"
keep = 5

[timeouts]
freeze_secs = 10

[[node]]
name = "n1"
agent = "198.18.1.1:7707"
netns = "/run/netns/ckl1-n1"
hostname = "ckl1-n1"

[[node]]
name = "n2"
agent = "[fd00::2]:7707"
bridge = "fab0"
"#;

    fn err(r: Result<Cluster, ConfigError>) -> String {
        r.expect_err("config must be refused").to_string()
    }

    #[test]
    fn good_config() {
        let d = Dir::new();
        d.key(0o600, 32);
        let c = d.parse(TWO).unwrap();
        assert!(!c.local_only);
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[0].name, "n1");
        assert_eq!(c.nodes[0].agent.to_string(), "198.18.1.1:7707");
        assert_eq!(
            c.nodes[0].netns.as_deref(),
            Some(Path::new("/run/netns/ckl1-n1"))
        );
        assert_eq!(c.nodes[0].hostname.as_deref(), Some("ckl1-n1"));
        assert_eq!(c.nodes[0].bridge, "br0");
        assert_eq!(c.nodes[1].agent.to_string(), "[fd00::2]:7707");
        assert_eq!(c.nodes[1].bridge, "fab0");
        assert_eq!(c.store, Path::new("/shared/ckpt"));
        assert_eq!(c.keep, 5);
        assert_eq!(c.timeouts.freeze, Duration::from_secs(10));
        assert_eq!(c.timeouts.dump, Timeouts::default().dump);
        // relative key path: from the config file's directory
        assert_eq!(
            c.key.as_ref().unwrap().path(),
            d.0.path().join("cluster.key")
        );
        assert!(c.require_node("n2").is_ok());
        let e = c.require_node("n9").unwrap_err().to_string();
        assert!(e.contains("n9") && e.contains("n1, n2"), "{e}");
    }

    #[test]
    fn config_without_nodes_is_local_only() {
        let d = Dir::new();
        let c = d.parse("store = \"store\"\n").unwrap();
        assert!(c.local_only);
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.nodes[0].agent, AgentAddr::InProcess);
        assert!(c.key.is_none());
        assert_eq!(c.store, d.0.path().join("store"));
        assert_eq!(c.keep, DEFAULT_KEEP);
    }

    #[test]
    fn local_cluster_is_named_after_the_host() {
        let c = Cluster::local(None).unwrap();
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        assert_eq!(c.nodes[0].name, host);
        assert!(c.local_only && c.key.is_none());
        assert_eq!(c.store, Path::new(DEFAULT_STORE));
    }

    #[test]
    fn where_the_config_comes_from() {
        let (p, via) = locate(Some(Path::new("/a.toml")), Some("/b.toml".as_ref())).unwrap();
        assert_eq!((p.as_path(), via), (Path::new("/a.toml"), "--config"));
        let (p, via) = locate(None, Some("/b.toml".as_ref())).unwrap();
        assert_eq!((p.as_path(), via), (Path::new("/b.toml"), CONFIG_ENV));
        if !Path::new(DEFAULT_CONFIG).exists() {
            assert!(locate(None, None).is_none());
            assert!(locate(None, Some("".as_ref())).is_none());
        }
    }

    #[test]
    fn key_must_be_private() {
        let d = Dir::new();
        let k = d.key(0o644, 32);
        let e = err(d.parse(TWO));
        assert!(e.contains("cluster.toml:2: key:"), "{e}");
        assert!(e.contains("mode 0644"), "{e}");
        assert!(e.contains(&format!("chmod 600 {}", k.display())), "{e}");
        d.key(0o640, 32);
        assert!(err(d.parse(TWO)).contains("mode 0640"));
        d.key(0o400, 32);
        assert!(d.parse(TWO).is_ok(), "read-only for its owner is fine");
    }

    #[test]
    fn key_must_be_long_enough_and_a_file() {
        let d = Dir::new();
        d.key(0o600, 31);
        let e = err(d.parse(TWO));
        assert!(
            e.contains("holds 31 bytes") && e.contains("head -c 32 /dev/urandom"),
            "{e}"
        );
        std::fs::remove_file(d.0.path().join("cluster.key")).unwrap();
        let e = err(d.parse(TWO));
        assert!(
            e.contains("does not exist") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::create_dir(d.0.path().join("cluster.key")).unwrap();
        std::fs::set_permissions(
            d.0.path().join("cluster.key"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        assert!(err(d.parse(TWO)).contains("not a regular file"));
    }

    #[test]
    fn key_must_belong_to_root_or_us() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give the key file to another user");
            return;
        }
        let d = Dir::new();
        let k = d.key(0o600, 32);
        std::os::unix::fs::chown(&k, Some(4242), None).unwrap();
        let e = err(d.parse(TWO));
        assert!(
            e.contains("owned by uid 4242") && e.contains("chown root"),
            "{e}"
        );
    }

    #[test]
    fn nodes_need_a_key() {
        let d = Dir::new();
        let e = err(d.parse("[[node]]\nname = \"n1\"\nagent = \"h:1\"\n"));
        assert!(
            e.contains(": key: a cluster with nodes needs a cluster key"),
            "{e}"
        );
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn bad_nodes_name_line_and_field() {
        let d = Dir::new();
        d.key(0o600, 64);
        let cases: &[(&str, &str)] = &[
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"n1\"\nagent = \"nohost\"\n",
                "cluster.toml:4: node[0].agent: 'nohost' is not host:port (no port)",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"n1\"\nagent = \"h:0\"\n",
                "node[0].agent: 'h:0' is not host:port (the port must be 1-65535)",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"n1\"\nagent = \"fd00::1:70\"\n",
                "write an IPv6 address in brackets",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"n1\"\nagent = \"a:1\"\n[[node]]\nname = \"n1\"\nagent = \"b:1\"\n",
                "cluster.toml:6: node[1].name: node 'n1' is defined twice",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"../x\"\nagent = \"a:1\"\n",
                "node[0].name: '../x' is not a valid node name",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"a\"\nagent = \"h:1\"\n[[node]]\nname = \"b\"\nagent = \"h:1\"\n",
                "node[1].agent: nodes 'a' and 'b' have the same agent h:1",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"a\"\nagent = \"h:1\"\nnetns = \"ckl1-n1\"\n",
                "cluster.toml:5: node[0].netns: 'ckl1-n1' is not an absolute path",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"a\"\nagent = \"h:1\"\nbridge = \"a very long bridge name\"\n",
                "node[0].bridge",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"a\"\nagent = \"h:1\"\nhostname = \"a b\"\n",
                "node[0].hostname: 'a b' is not a valid hostname",
            ),
            (
                "key = \"cluster.key\"\n[[node]]\nname = \"a\"\nagnet = \"h:1\"\n",
                "cluster.toml:4: unknown field `agnet`",
            ),
            ("keep = 0\n", "cluster.toml:1: keep: keep = 0 would delete every checkpoint"),
            ("keep = -1\n", "cluster.toml:1: invalid value"),
            ("[timeouts]\ndump_secs = 0\n", "cluster.toml:2: timeouts.dump_secs"),
            ("[timeouts]\ndump = 5\n", "unknown field `dump`"),
            ("store = \n", "cluster.toml:1:"),
            ("store = \"\"\n", "store: empty path"),
        ];
        for (text, want) in cases {
            let e = err(d.parse(text));
            assert!(e.contains(want), "for {text:?}\n got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn the_example_in_the_operations_guide_parses() {
        let doc = include_str!("../../docs/OPERATIONS.md");
        let start = doc
            .find("```toml\n# /etc/ckpt/cluster.toml")
            .expect("a config example")
            + "```toml\n".len();
        let text = &doc[start..start + doc[start..].find("```").unwrap()];
        let d = Dir::new();
        let key = d.key(0o600, 32);
        let text = text.replace("/etc/ckpt/cluster.key", key.to_str().unwrap());
        let c = d.parse(&text).unwrap();
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.nodes[1].hostname.as_deref(), Some("compute-02"));
        assert_eq!(
            c.nodes[2].netns.as_deref(),
            Some(Path::new("/run/netns/ckl1-n3"))
        );
        assert_eq!(c.store, Path::new("/shared/ckpt"));
        assert_eq!(
            c.timeouts,
            Timeouts::default(),
            "the example shows the defaults"
        );
    }

    #[test]
    fn agent_addresses() {
        assert_eq!(
            AgentAddr::parse("node1.example:7707").unwrap(),
            AgentAddr::Tcp {
                host: "node1.example".into(),
                port: 7707
            }
        );
        assert!(AgentAddr::parse(":7707").is_err());
        assert!(AgentAddr::parse("h:70000").is_err());
        assert!(AgentAddr::parse("[nonsense]:1").is_err());
        assert!(AgentAddr::parse("[::1]:1").is_ok());
    }

    #[test]
    fn key_signs_and_verifies() {
        let k = ClusterKey::from_bytes(Path::new("k"), vec![1; 32]);
        let other = ClusterKey::from_bytes(Path::new("k2"), vec![2; 32]);
        let sig = k.sign(b"hello");
        assert_eq!(sig.len(), 32);
        assert!(k.verify(b"hello", &sig));
        assert!(!k.verify(b"hellO", &sig));
        assert!(!other.verify(b"hello", &sig));
        assert!(!k.verify(b"hello", &sig[..31]));
        assert!(
            !format!("{k:?}").contains("1, 1"),
            "Debug must not show the key"
        );
    }
}
