//! The coordinator's line to one node's agent: the wire protocol to its
//! `ckpt-agent serve` (from the node's network namespace when the
//! configuration names one), or, on a cluster of this machine alone, the
//! agent's request handler in a thread of this process.
//!
//! A user who cannot read the cluster key reaches the agents through the
//! agent of their machine, on its user socket: it relays their requests
//! with the key, stamped with their uid (see `ckpt-agent serve
//! --user-socket`), and signs their manifests.
//!
//! Either way, one link is one agent connection: the dump sessions and
//! held restores it opens live as long as it does, and a link dropped
//! before their end aborts them (a checkpoint) or kills them (a restart).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use ckpt_proto::rpc::msg::{self, request::Body as Q, response::Body as A};
use std::os::unix::net::UnixStream;

use ckpt_proto::image::Manifest;
use ckpt_proto::rpc::{self, Channel};

use crate::config::{AgentAddr, Cluster};
use crate::store::ManifestSigner;

/// Where the in-process agent records its work in progress (a restarted
/// coordinator's agent, like a restarted `ckpt-agent serve`, recovers it),
/// unless `CKPT_STATE_DIR` names another directory.
pub const LOCAL_STATE_DIR: &str = "/var/lib/ckpt/coord-local";

/// A connection to one node's agent.
pub struct Link {
    node: String,
    inner: Inner,
    /// The user requests are made for.
    uid: u32,
}

enum Inner {
    Remote(Channel),
    Local(Local),
    Relay(Relay),
}

/// A connection to an agent through the user socket of this machine's.
struct Relay {
    stream: UnixStream,
    /// The socket and the agent reached, for messages.
    peer: String,
    next_id: u64,
}

/// The agent's handler in a thread of its own: ptrace wants every request
/// about a stopped task from the thread that seized it.
struct Local {
    tx: Option<mpsc::Sender<msg::Request>>,
    rx: mpsc::Receiver<msg::Response>,
    thread: Option<std::thread::JoinHandle<()>>,
    next_id: u64,
    /// A request timed out: its answer may still come, and the thread may
    /// be stuck in it; it is left to finish on its own.
    stuck: bool,
}

impl Drop for Local {
    fn drop(&mut self) {
        // Closing the request channel ends the thread, whose handler then
        // aborts what this link left unfinished.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            if !self.stuck {
                let _ = t.join();
            }
        }
    }
}

/// The uid requests are made for: the agents let a user act only on their
/// own jobs. The real uid, so that a coordinator run with more privilege
/// than its user (to read the cluster key) still acts for that user.
pub fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The ckpt-agent binary the in-process agent starts and restores parts
/// with: beside this program (an installation or a build directory), else
/// on PATH.
fn agent_exe() -> Result<PathBuf, String> {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("ckpt-agent")))
        .filter(|p| p.is_file());
    if let Some(p) = sibling {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("ckpt-agent"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            "ckpt-agent is neither beside ckpt-coord nor on PATH: the in-process agent of a \
             local-only cluster runs it to start and restore jobs; install it"
                .to_string()
        })
}

impl Link {
    /// Connects to the agent of `node`.
    pub fn open(cluster: &Cluster, node: &str) -> Result<Link, String> {
        let n = cluster.require_node(node).map_err(|e| e.to_string())?;
        let inner = match &n.agent {
            AgentAddr::InProcess => Inner::Local(Local::start(node)?),
            AgentAddr::Tcp { .. } if cluster.key.is_none() && cluster.user_socket.is_some() => {
                let socket = cluster.user_socket.as_deref().expect("checked");
                Inner::Relay(Relay::open(
                    socket,
                    &n.agent.to_string(),
                    cluster.timeouts.connect,
                )?)
            }
            AgentAddr::Tcp { .. } => {
                let key = cluster.key.as_ref().ok_or_else(|| {
                    format!(
                        "the cluster configuration {} has no key: agents take orders only from \
                         a coordinator that holds the cluster key",
                        cluster.describe_source()
                    )
                })?;
                let addr = n.agent.to_string();
                let timeout = cluster.timeouts.connect;
                let connect =
                    move || Channel::connect(&addr, key.rpc(), timeout).map_err(|e| e.to_string());
                let ch = match &n.netns {
                    None => connect()?,
                    Some(ns) => in_netns(ns, connect)?,
                };
                Inner::Remote(ch)
            }
        };
        Ok(Link {
            node: node.to_string(),
            inner,
            uid: my_uid(),
        })
    }

    /// The user this link's requests are made for.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Makes this link's requests for user `uid` (root may act as any
    /// user; through a relay, the relaying agent stamps the real one).
    pub fn act_for(&mut self, uid: u32) {
        self.uid = uid;
    }

    /// The node this link reaches.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sends `body` and waits up to `timeout` for the agent's answer; an
    /// error says what went wrong (the agent's errors name its node).
    pub fn call(&mut self, timeout: Duration, body: Q) -> Result<A, String> {
        let answer = match &mut self.inner {
            Inner::Remote(ch) => {
                ch.set_timeout(Some(timeout)).map_err(|e| e.to_string())?;
                ch.call(self.uid, body).map_err(|e| e.to_string())?
            }
            Inner::Local(l) => l.call(timeout, self.uid, body)?,
            Inner::Relay(r) => r.call(timeout, body)?,
        };
        answer.ok_or_else(|| "answered with an empty response".to_string())
    }
}

impl Relay {
    /// Connects to the user socket `socket` and has its agent reach the
    /// agent at `agent` (itself when empty).
    fn open(socket: &Path, agent: &str, timeout: Duration) -> Result<Relay, String> {
        let shown = socket.display();
        let mut stream = UnixStream::connect(socket).map_err(|e| {
            format!(
                "{shown}: {e}: this user cannot read the cluster key, and no agent serves users \
                 on this machine there (ckpt-agent serve --user-socket {shown}; or set \
                 user_socket in the cluster configuration)"
            )
        })?;
        let peer = format!("the agent at {shown}");
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_secs(15))))
            .map_err(|e| format!("{peer}: {e}"))?;
        rpc::write_frame(
            &mut stream,
            &peer,
            &msg::UserHello {
                version: rpc::PROTOCOL_VERSION,
                agent: agent.to_string(),
            },
        )
        .map_err(|e| e.to_string())?;
        let reply: msg::UserHelloReply = rpc::read_frame(&mut stream, &peer)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{peer} closed the connection (is it a ckpt agent?)"))?;
        if !reply.error.is_empty() {
            return Err(format!("{peer}: {}", reply.error));
        }
        tracing::debug!(socket = %shown, node = reply.node, uid = reply.uid, "relayed");
        Ok(Relay {
            stream,
            peer: format!("{} (via {shown})", reply.node),
            next_id: 1,
        })
    }

    fn call(&mut self, timeout: Duration, body: Q) -> Result<Option<A>, String> {
        let id = self.next_id;
        self.next_id += 1;
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("{}: {e}", self.peer))?;
        let req = msg::Request {
            id,
            // The relaying agent stamps the uid the kernel gives it.
            uid: my_uid(),
            body: Some(body),
        };
        rpc::write_frame(&mut self.stream, &self.peer, &req).map_err(|e| e.to_string())?;
        let r = rpc::read_frame(&mut self.stream, &self.peer).map_err(|e| e.to_string())?;
        rpc::answer_to(&self.peer, id, r).map_err(|e| e.to_string())
    }
}

/// Signs manifests for a user who cannot read the cluster key: the agent
/// of their machine does, for manifests of theirs alone.
pub struct AgentSigner {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentSigner {
    fn signature(&self, m: &Manifest) -> Result<Vec<u8>, String> {
        use prost::Message;
        let mut unsigned = m.clone();
        unsigned.signature.clear();
        let mut relay = Relay::open(&self.socket, "", self.timeout)?;
        match relay.call(
            self.timeout,
            Q::SignManifest(msg::SignManifestRequest {
                manifest: unsigned.encode_to_vec(),
            }),
        )? {
            Some(A::SignManifest(r)) => Ok(r.signature),
            other => Err(format!("{} answered {other:?}", relay.peer)),
        }
    }
}

impl ManifestSigner for AgentSigner {
    fn sign(&self, m: &Manifest) -> Result<Vec<u8>, String> {
        self.signature(m)
    }

    fn verify(&self, m: &Manifest) -> Result<bool, String> {
        // The agent signs a manifest only for its owner: checking is
        // signing again and comparing (in constant time, for form's sake:
        // the user learns nothing they could not compute).
        let again = self.signature(m)?;
        Ok(again.len() == m.signature.len()
            && again
                .iter()
                .zip(&m.signature)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0)
    }

    fn describe(&self) -> String {
        format!(
            "the cluster key (held by the agent at {})",
            self.socket.display()
        )
    }
}

/// What signs and checks this cluster's manifests for this user: the key,
/// or the agent of this machine; none on a cluster without a key.
pub fn signer(cluster: &Cluster) -> Option<Box<dyn ManifestSigner + '_>> {
    match (&cluster.key, &cluster.user_socket) {
        (Some(k), _) => Some(Box::new(k.clone())),
        (None, Some(socket)) => Some(Box::new(AgentSigner {
            socket: socket.clone(),
            timeout: cluster.timeouts.connect.max(Duration::from_secs(15)),
        })),
        (None, None) => None,
    }
}

impl Local {
    fn start(node: &str) -> Result<Local, String> {
        let exe = agent_exe()?;
        let dir = std::env::var_os("CKPT_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(LOCAL_STATE_DIR));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        ckpt_agent::serve::recover(&dir).map_err(|e| e.to_string())?;
        // Jobs it started in earlier runs that have ended since.
        ckpt_agent::serve::sweep_ended(&dir);
        let (tx, requests) = mpsc::channel::<msg::Request>();
        let (answers, rx) = mpsc::channel::<msg::Response>();
        let node = node.to_string();
        let thread = std::thread::Builder::new()
            .name("in-process agent".into())
            .spawn(move || {
                let mut h = ckpt_agent::serve::Handler::new(
                    &node,
                    &dir,
                    &exe,
                    "the in-process coordinator",
                    None,
                );
                while let Ok(req) = requests.recv() {
                    if answers.send(h.respond(&req)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("starting the in-process agent: {e}"))?;
        Ok(Local {
            tx: Some(tx),
            rx,
            thread: Some(thread),
            next_id: 1,
            stuck: false,
        })
    }

    fn call(&mut self, timeout: Duration, uid: u32, body: Q) -> Result<Option<A>, String> {
        if self.stuck {
            return Err("the in-process agent is still busy with a request that timed out".into());
        }
        let id = self.next_id;
        self.next_id += 1;
        let req = msg::Request {
            id,
            uid,
            body: Some(body),
        };
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(req).ok())
            .ok_or("the in-process agent is gone")?;
        let r = match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.stuck = true;
                return Err(format!("no answer within {timeout:?}"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the in-process agent stopped".into())
            }
        };
        if !r.error.is_empty() {
            return Err(r.error);
        }
        Ok(r.body)
    }
}

/// Runs `f` in a thread that joined the network namespace `ns` (a
/// simulated node's): sockets it makes live there for good.
fn in_netns<T: Send>(ns: &Path, f: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(ns)
                .map_err(|e| format!("network namespace {}: {e}", ns.display()))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("joining network namespace {}: {e}", ns.display()))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err("a connecting thread panicked".into()))
    })
}
