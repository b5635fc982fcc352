//! The channel between ckpt-coord and a node agent: length-delimited
//! protobuf frames over TCP, a version handshake, and mutual proof of the
//! cluster key (HMAC-SHA256 challenge-response) before any request.
//!
//! Frame: payload length (u32, little endian) then the payload. Handshake
//! (docs/PROTOCOL.md has the diagram): the coordinator sends `Hello` with a
//! fresh 32-byte nonce; the agent answers with its `Hello` and nonce (a
//! version mismatch ends the connection there, each side saying which
//! versions met); the coordinator proves the key by sending
//! HMAC(key, "ckpt-rpc-v1 coordinator" | agent nonce | coordinator nonce);
//! the agent checks it and only then proves the key in turn with the
//! roles and nonces swapped. Each side signs the other's fresh nonce, so a
//! recorded exchange cannot be replayed, and the role tags keep one side's
//! proof from serving as the other's.
//!
//! Every frame after the handshake carries a MAC (keyed BLAKE3, 32 bytes),
//! under a session key derived (HMAC-SHA256) from the cluster key and both
//! nonces, over its direction,
//! its sequence number and its body. A proof alone does not bind the rest
//! of the connection: someone who could make a key holder run a handshake
//! with them (an agent relaying a user's requests, see the user socket)
//! could forward its proofs to a real agent and then speak freely on that
//! connection. Without the session key, every frame they send is refused.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use prost::Message;

/// The messages on the wire (proto/rpc.proto).
pub mod msg {
    include!(concat!(env!("OUT_DIR"), "/ckpt.rpc.rs"));
}

/// Version of the wire protocol this build speaks (2: frames after the
/// handshake are authenticated).
pub const PROTOCOL_VERSION: u32 = 3;
/// Bytes of the MAC at the end of an authenticated frame.
const FRAME_MAC_LEN: usize = 32;
/// Frames larger than this are refused (a broken or hostile peer).
pub const MAX_FRAME: usize = 16 << 20;
/// Smallest cluster key accepted.
pub const MIN_KEY_LEN: usize = 32;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What can go wrong on a channel; every variant names the peer or file.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("{peer}: bad frame: {reason}")]
    Frame { peer: String, reason: String },
    #[error("{peer} speaks protocol version {theirs}, this side {ours}: run the same ckpt version on both")]
    Version {
        peer: String,
        theirs: u32,
        ours: u32,
    },
    #[error("{peer}: authentication failed: {reason}")]
    Auth { peer: String, reason: String },
    #[error("cluster key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{peer}: {reason}")]
    Protocol { peer: String, reason: String },
}

/// The cluster key: a secret every machine of the cluster holds in a file
/// only its owner can read.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// Reads a key file, refusing one that others could read or that is
    /// too short to be a key.
    pub fn load(path: &Path) -> Result<Key, RpcError> {
        let err = |reason: String| RpcError::Key {
            path: path.to_owned(),
            reason,
        };
        let md = std::fs::metadata(path).map_err(|e| {
            err(format!(
                "{e} (create one with: head -c 32 /dev/urandom > {0} && chmod 600 {0})",
                path.display()
            ))
        })?;
        if !md.is_file() {
            return Err(err("not a regular file".into()));
        }
        if md.mode() & 0o077 != 0 {
            return Err(err(format!(
                "mode {:o} lets others read it: chmod 600 {}",
                md.mode() & 0o777,
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Key::from_bytes(bytes).map_err(err)
    }

    /// A key from its bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Key, String> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(format!(
                "{} bytes, at least {MIN_KEY_LEN} needed (head -c 32 /dev/urandom > FILE)",
                bytes.len()
            ));
        }
        Ok(Key(bytes))
    }

    /// HMAC-SHA256 of the concatenated `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("any key length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    }

    /// Checks a MAC in constant time.
    pub fn verify(&self, parts: &[&[u8]], mac: &[u8]) -> bool {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("any key length");
        for p in parts {
            m.update(p);
        }
        m.verify_slice(mac).is_ok()
    }
}

/// Which end of the channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Agent,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Coordinator => b"ckpt-rpc-v1 coordinator",
            Role::Agent => b"ckpt-rpc-v1 agent",
        }
    }
}

/// An authenticated connection.
pub struct Channel {
    stream: TcpStream,
    /// Set once the handshake is done: authenticates every later frame.
    session: Option<Session>,
    /// The peer as logs name it: its node name and address.
    peer: String,
    /// The peer's node name, from its Hello.
    pub peer_node: String,
    next_id: u64,
    /// Frame buffers kept from one frame to the next: a stream of images
    /// sends megabytes a frame, and a fresh buffer each time costs page
    /// faults and zeroing that halve the throughput.
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
}

/// The per-connection key and sequence numbers of an authenticated channel.
struct Session {
    /// Keys the frame MACs: BLAKE3 in keyed mode, which runs about four
    /// times as fast as HMAC-SHA256 here, and a stream of images sends
    /// gigabytes.
    key: [u8; 32],
    /// Whether this end is the coordinator's (the direction of its frames).
    coordinator: bool,
    sent: u64,
    received: u64,
}

impl Session {
    /// The session of the connection whose handshake had the agent's nonce
    /// `na` and the coordinator's `nc`, under cluster key `key`.
    fn new(key: &Key, na: &[u8], nc: &[u8], coordinator: bool) -> Session {
        let derived = key.mac(&[b"ckpt-rpc-v3 session", na, nc]);
        Session {
            key: derived.try_into().expect("HMAC-SHA256 gives 32 bytes"),
            coordinator,
            sent: 0,
            received: 0,
        }
    }

    fn frame_mac(&self, from_coordinator: bool, seq: u64, body: &[u8]) -> blake3::Hash {
        let dir: &[u8] = if from_coordinator { b"c>a" } else { b"a>c" };
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(dir);
        h.update(&seq.to_le_bytes());
        h.update(body);
        h.finalize()
    }

    fn mac(&self, from_coordinator: bool, seq: u64, body: &[u8]) -> [u8; 32] {
        *self.frame_mac(from_coordinator, seq, body).as_bytes()
    }

    /// Whether `mac` is the MAC of frame `seq` from the peer (compared in
    /// constant time).
    fn verify(&self, seq: u64, body: &[u8], mac: &[u8]) -> bool {
        let Ok(mac): Result<[u8; 32], _> = mac.try_into() else {
            return false;
        };
        self.frame_mac(!self.coordinator, seq, body) == blake3::Hash::from(mac)
    }
}

/// `N` bytes from the kernel's random source, for nonces, tokens and
/// names no one else picks.
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

fn nonce() -> std::io::Result<Vec<u8>> {
    Ok(random_bytes::<32>()?.to_vec())
}

impl Channel {
    /// Connects to an agent at `addr` and authenticates both ways.
    pub fn connect(addr: &str, key: &Key, timeout: Duration) -> Result<Channel, RpcError> {
        let io = |source| RpcError::Io {
            peer: addr.to_string(),
            source,
        };
        let sa: SocketAddr =
            addr.to_socket_addrs()
                .map_err(io)?
                .next()
                .ok_or_else(|| RpcError::Protocol {
                    peer: addr.to_string(),
                    reason: "no address".into(),
                })?;
        let stream = TcpStream::connect_timeout(&sa, timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut ch = Channel {
            stream,
            peer: addr.to_string(),
            peer_node: String::new(),
            next_id: 1,
            session: None,
            wbuf: Vec::new(),
            rbuf: Vec::new(),
        };
        let mine = nonce().map_err(io)?;
        ch.send(&msg::Hello {
            version: PROTOCOL_VERSION,
            node: "coordinator".into(),
            nonce: mine.clone(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
        })?;
        let theirs: msg::Hello = ch.recv_handshake()?;
        ch.check_hello(&theirs)?;
        ch.send(&msg::Proof {
            mac: key.mac(&[Role::Coordinator.tag(), &theirs.nonce, &mine]),
        })?;
        let proof: msg::Proof = ch.recv_handshake().map_err(|e| match e {
            RpcError::Io { peer, .. }
            | RpcError::Frame { peer, .. }
            | RpcError::Protocol { peer, .. } => RpcError::Auth {
                peer,
                reason:
                    "the agent refused our proof of the cluster key: do both use the same key file?"
                        .into(),
            },
            e => e,
        })?;
        if !key.verify(&[Role::Agent.tag(), &mine, &theirs.nonce], &proof.mac) {
            return Err(RpcError::Auth {
                peer: ch.peer.clone(),
                reason: "the agent does not hold our cluster key".into(),
            });
        }
        ch.session = Some(Session::new(key, &theirs.nonce, &mine, true));
        // Requests may take long (a dump); the coordinator sets its own
        // deadlines per call.
        ch.stream.set_read_timeout(None).map_err(|e| RpcError::Io {
            peer: ch.peer.clone(),
            source: e,
        })?;
        Ok(ch)
    }

    /// Authenticates a coordinator that connected to this agent (`node`).
    pub fn accept(
        stream: TcpStream,
        key: &Key,
        node: &str,
        timeout: Duration,
    ) -> Result<Channel, RpcError> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into());
        let io = |source| RpcError::Io {
            peer: peer.clone(),
            source,
        };
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut ch = Channel {
            stream,
            peer: peer.clone(),
            peer_node: String::new(),
            next_id: 1,
            session: None,
            wbuf: Vec::new(),
            rbuf: Vec::new(),
        };
        let theirs: msg::Hello = ch.recv_handshake()?;
        let mine = nonce().map_err(io)?;
        // Our Hello goes out even to a peer of another version: it learns
        // which version it met.
        ch.send(&msg::Hello {
            version: PROTOCOL_VERSION,
            node: node.into(),
            nonce: mine.clone(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
        })?;
        ch.check_hello(&theirs)?;
        let proof: msg::Proof = ch.recv_handshake()?;
        if !key.verify(&[Role::Coordinator.tag(), &mine, &theirs.nonce], &proof.mac) {
            return Err(RpcError::Auth {
                peer,
                reason: "its proof of the cluster key is wrong (another key file?)".into(),
            });
        }
        ch.send(&msg::Proof {
            mac: key.mac(&[Role::Agent.tag(), &theirs.nonce, &mine]),
        })?;
        ch.session = Some(Session::new(key, &mine, &theirs.nonce, false));
        ch.stream.set_read_timeout(None).map_err(io)?;
        Ok(ch)
    }

    fn check_hello(&mut self, h: &msg::Hello) -> Result<(), RpcError> {
        self.peer_node = h.node.clone();
        self.peer = format!("{} ({})", h.node, self.peer);
        if h.version != PROTOCOL_VERSION {
            return Err(RpcError::Version {
                peer: self.peer.clone(),
                theirs: h.version,
                ours: PROTOCOL_VERSION,
            });
        }
        if h.nonce.len() != 32 {
            return Err(RpcError::Auth {
                peer: self.peer.clone(),
                reason: "its challenge is not 32 bytes".into(),
            });
        }
        Ok(())
    }

    fn recv_handshake<M: Message + Default>(&mut self) -> Result<M, RpcError> {
        self.recv()?.ok_or_else(|| RpcError::Protocol {
            peer: self.peer.clone(),
            reason: "closed the connection during the handshake".into(),
        })
    }

    /// The peer, as logs and errors name it.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one message (with its MAC once the handshake is done).
    pub fn send<M: Message>(&mut self, m: &M) -> Result<(), RpcError> {
        let mut buf = std::mem::take(&mut self.wbuf);
        buf.clear();
        buf.extend_from_slice(&[0u8; 4]);
        m.encode(&mut buf).expect("a Vec has room for any message");
        if let Some(s) = &mut self.session {
            let mac = s.mac(s.coordinator, s.sent, &buf[4..]);
            s.sent += 1;
            buf.extend_from_slice(&mac);
        }
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        let r = self.stream.write_all(&buf).map_err(|source| RpcError::Io {
            peer: self.peer.clone(),
            source,
        });
        self.wbuf = buf;
        r
    }

    /// Receives one message; None when the peer closed the connection
    /// between messages. Once the handshake is done, a frame whose MAC is
    /// wrong (not from the peer that made the handshake, or replayed or
    /// reordered) ends the connection with an error.
    pub fn recv<M: Message + Default>(&mut self) -> Result<Option<M>, RpcError> {
        let Some(n) = self.recv_frame()? else {
            return Ok(None);
        };
        M::decode(&self.rbuf[..n])
            .map(Some)
            .map_err(|e| RpcError::Frame {
                peer: self.peer.clone(),
                reason: e.to_string(),
            })
    }

    /// Like `recv`, into `m` (cleared first), reusing its buffers: for
    /// streams of large messages. False when the peer closed the
    /// connection between messages.
    pub fn recv_into<M: Message>(&mut self, m: &mut M) -> Result<bool, RpcError> {
        let Some(n) = self.recv_frame()? else {
            return Ok(false);
        };
        m.clear();
        m.merge(&self.rbuf[..n]).map_err(|e| RpcError::Frame {
            peer: self.peer.clone(),
            reason: e.to_string(),
        })?;
        Ok(true)
    }

    /// Reads one frame into `rbuf` and checks its MAC; the length of its
    /// message.
    fn recv_frame(&mut self) -> Result<Option<usize>, RpcError> {
        if !read_raw_into(&mut self.stream, &self.peer, &mut self.rbuf)? {
            return Ok(None);
        }
        let body = &self.rbuf;
        let Some(s) = &mut self.session else {
            return Ok(Some(body.len()));
        };
        let bad = || RpcError::Auth {
            peer: self.peer.clone(),
            reason: "a frame failed its authentication (not from the peer that made \
                     the handshake, or replayed): connection dropped"
                .into(),
        };
        if body.len() < FRAME_MAC_LEN {
            return Err(bad());
        }
        let n = body.len() - FRAME_MAC_LEN;
        if !s.verify(s.received, &body[..n], &body[n..]) {
            return Err(bad());
        }
        s.received += 1;
        Ok(Some(n))
    }

    /// Bounds how long a call waits for its answer (`None`: forever), so
    /// that a coordinator gives up on a hung agent at its own deadline.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), RpcError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| RpcError::Io {
                peer: self.peer.clone(),
                source: e,
            })
    }

    /// Bounds how long a send may block on a peer that reads nothing
    /// (`None`: forever).
    pub fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<(), RpcError> {
        self.stream
            .set_write_timeout(timeout)
            .map_err(|e| RpcError::Io {
                peer: self.peer.clone(),
                source: e,
            })
    }

    /// Sends a request and waits for its response; an error the agent
    /// reports comes back as `RpcError::Protocol` naming the agent.
    pub fn call(
        &mut self,
        uid: u32,
        body: msg::request::Body,
    ) -> Result<Option<msg::response::Body>, RpcError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&msg::Request {
            id,
            uid,
            body: Some(body),
        })?;
        let r = self.recv()?;
        answer_to(&self.peer, id, r)
    }
}

/// The body of `r`, the answer `peer` gave to request `id` (None: the
/// connection closed first), or the error it reported.
pub fn answer_to(
    peer: &str,
    id: u64,
    r: Option<msg::Response>,
) -> Result<Option<msg::response::Body>, RpcError> {
    let fail = |reason: String| RpcError::Protocol {
        peer: peer.to_string(),
        reason,
    };
    let r = r.ok_or_else(|| fail("closed the connection before answering".into()))?;
    if r.id != id {
        return Err(fail(format!(
            "answered request {} while {id} was asked",
            r.id
        )));
    }
    if !r.error.is_empty() {
        return Err(fail(r.error));
    }
    Ok(r.body)
}

/// Writes `m` as one frame to `w` (a connection to `peer`).
pub fn write_frame<M: Message>(w: &mut impl Write, peer: &str, m: &M) -> Result<(), RpcError> {
    write_raw(w, peer, &m.encode_to_vec())
}

/// Writes `body` as one frame.
fn write_raw(w: &mut impl Write, peer: &str, body: &[u8]) -> Result<(), RpcError> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame).map_err(|source| RpcError::Io {
        peer: peer.to_string(),
        source,
    })
}

/// Reads one frame from `r` (a connection to `peer`); None when the peer
/// closed the connection between frames.
pub fn read_frame<M: Message + Default>(
    r: &mut impl Read,
    peer: &str,
) -> Result<Option<M>, RpcError> {
    let Some(body) = read_raw(r, peer)? else {
        return Ok(None);
    };
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|e| RpcError::Frame {
            peer: peer.to_string(),
            reason: e.to_string(),
        })
}

/// Reads the bytes of one frame.
fn read_raw(r: &mut impl Read, peer: &str) -> Result<Option<Vec<u8>>, RpcError> {
    let mut body = Vec::new();
    Ok(read_raw_into(r, peer, &mut body)?.then_some(body))
}

/// Reads the bytes of one frame into `body`; false when the peer closed
/// the connection between frames.
fn read_raw_into(r: &mut impl Read, peer: &str, body: &mut Vec<u8>) -> Result<bool, RpcError> {
    let peer = peer.to_string();
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(RpcError::Frame {
                    peer,
                    reason: "connection closed inside a frame header".into(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(RpcError::Io { peer, source }),
        }
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        // Most often not a ckpt peer at all: show what it sent.
        let text: String = len
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
            .collect();
        return Err(RpcError::Frame {
            peer,
            reason: format!(
                "{n} bytes, more than the {MAX_FRAME} allowed (it began with {text:?}: \
                 is this a ckpt agent, at the address and port of the configuration?)"
            ),
        });
    }
    body.resize(n, 0);
    r.read_exact(body)
        .map_err(|source| RpcError::Io { peer, source })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn key(b: u8) -> Key {
        Key::from_bytes(vec![b; 32]).unwrap()
    }

    /// Runs an agent side on a thread; returns the address and its result.
    fn agent(k: Key) -> (String, std::thread::JoinHandle<Result<Channel, RpcError>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            Channel::accept(s, &k, "node-a", Duration::from_secs(5))
        });
        (addr, h)
    }

    #[test]
    fn same_key_authenticates_both_ways_and_carries_requests() {
        let (addr, h) = agent(key(7));
        let mut c = Channel::connect(&addr, &key(7), Duration::from_secs(5)).unwrap();
        let mut a = h.join().unwrap().unwrap();
        assert_eq!(c.peer_node, "node-a");
        assert_eq!(a.peer_node, "coordinator");
        let t = std::thread::spawn(move || {
            let r: msg::Request = a.recv().unwrap().unwrap();
            a.send(&msg::Response {
                id: r.id,
                error: String::new(),
                body: Some(msg::response::Body::Status(msg::StatusReply {
                    node: "node-a".into(),
                    sessions: vec![3],
                    ..Default::default()
                })),
            })
            .unwrap();
            // The coordinator going away is a clean end of stream.
            assert!(a.recv::<msg::Request>().unwrap().is_none());
        });
        let r = c
            .call(0, msg::request::Body::Status(msg::StatusRequest::default()))
            .unwrap();
        assert!(matches!(r, Some(msg::response::Body::Status(s)) if s.sessions == vec![3]));
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (addr, h) = agent(key(7));
        let e = Channel::connect(&addr, &key(8), Duration::from_secs(5))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("same key file"), "{e}");
        let e = h.join().unwrap().err().expect("agent refuses");
        assert!(
            e.to_string().contains("proof of the cluster key is wrong"),
            "{e}"
        );
    }

    /// Someone who makes a key holder run its handshake with them, and
    /// forwards it to a real agent (what a user could do through an
    /// agent's user socket), gets a connection on which every frame they
    /// write themselves is refused.
    #[test]
    fn a_forwarded_handshake_gives_nothing_to_speak_with() {
        let (agent_addr, agent_side) = agent(key(7));
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake_addr = fake.local_addr().unwrap().to_string();
        // The key holder, deceived into connecting to the fake agent.
        let victim = std::thread::spawn(move || {
            Channel::connect(&fake_addr, &key(7), Duration::from_secs(5)).map(|_| ())
        });
        let (mut v, _) = fake.accept().unwrap();
        let mut a = TcpStream::connect(&agent_addr).unwrap();
        let hello_v: msg::Hello = read_frame(&mut v, "victim").unwrap().unwrap();
        write_frame(&mut a, "agent", &hello_v).unwrap();
        let hello_a: msg::Hello = read_frame(&mut a, "agent").unwrap().unwrap();
        write_frame(&mut v, "victim", &hello_a).unwrap();
        let proof_v: msg::Proof = read_frame(&mut v, "victim").unwrap().unwrap();
        write_frame(&mut a, "agent", &proof_v).unwrap();
        let proof_a: msg::Proof = read_frame(&mut a, "agent").unwrap().unwrap();
        write_frame(&mut v, "victim", &proof_a).unwrap();
        victim.join().unwrap().unwrap();
        // The handshake passed on the agent's side too...
        let mut ch = agent_side.join().unwrap().unwrap();
        // ...but a request of the forwarder's own is refused.
        write_frame(
            &mut a,
            "agent",
            &msg::Request {
                id: 1,
                uid: 0,
                body: Some(msg::request::Body::Status(msg::StatusRequest::default())),
            },
        )
        .unwrap();
        let e = ch.recv::<msg::Request>().expect_err("refused");
        assert!(e.to_string().contains("failed its authentication"), "{e}");
    }

    #[test]
    fn another_protocol_version_is_named() {
        let (addr, h) = agent(key(7));
        let mut raw = TcpStream::connect(&addr).unwrap();
        let hello = msg::Hello {
            version: 99,
            node: "old".into(),
            nonce: vec![0; 32],
            tool_version: String::new(),
        };
        let body = hello.encode_to_vec();
        raw.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        raw.write_all(&body).unwrap();
        let e = h.join().unwrap().err().expect("refused");
        assert!(e.to_string().contains("version 99, this side 3"), "{e}");
    }

    #[test]
    fn oversized_frames_are_refused() {
        let (addr, h) = agent(key(7));
        let mut raw = TcpStream::connect(&addr).unwrap();
        raw.write_all(&(u32::MAX).to_le_bytes()).unwrap();
        let e = h.join().unwrap().err().expect("refused");
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn key_files_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ckpt-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key");
        std::fs::write(&f, [1u8; 32]).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load(&f).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::load(&f).is_ok());
        std::fs::write(&f, [1u8; 8]).unwrap();
        assert!(Key::load(&f)
            .unwrap_err()
            .to_string()
            .contains("at least 32"));
        let e = Key::load(&dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("head -c 32 /dev/urandom"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn macs_depend_on_role_and_nonces() {
        let k = key(1);
        let m = k.mac(&[Role::Agent.tag(), b"a", b"b"]);
        assert!(k.verify(&[Role::Agent.tag(), b"a", b"b"], &m));
        assert!(!k.verify(&[Role::Coordinator.tag(), b"a", b"b"], &m));
        assert!(!k.verify(&[Role::Agent.tag(), b"b", b"a"], &m));
        assert!(!key(2).verify(&[Role::Agent.tag(), b"a", b"b"], &m));
    }
}
