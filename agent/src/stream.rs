//! Checkpoints streamed into another node's agent instead of a directory
//! here: the sending end (an [`Outbox`], which a dump's image writer uses)
//! and the receiving end ([`receive`], run by `ckpt-agent serve` for its
//! inboxes and by `ckpt-agent page-server`).
//!
//! A migration's source node then writes nothing to its disks: page content
//! goes onto the connection as the copy threads read it, each chunk at its
//! offset in its pages file; the small images (and the raw files of tmpfs
//! mounts and SysV segments, which are in memory anyway) are kept in a
//! spool directory on tmpfs, for the next level of the chain to name as its
//! parent, and follow the pages; the inventory comes last, in the frame
//! that ends the stream, so a level exists on the receiving node only once
//! it is whole. The connection is the cluster's authenticated channel: every
//! frame carries its MAC under the cluster key.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ckpt_proto::rpc::{msg, Channel, Key};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::images::INVENTORY;

/// Largest chunk of a file sent in one frame (frames carry at most 16 MiB).
const CHUNK: usize = 4 << 20;

/// How long the receiver may take to make a level durable once it has all
/// of it (fsync of every file).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a stream may stand still, either way, before it is given up
/// (the dump then fails, and its tree runs on): a receiver that hangs must
/// not keep a job frozen, nor a vanished sender a receiving thread.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a dump streams its images.
#[derive(Debug, Clone)]
pub struct StreamTo {
    /// The receiving agent or page server, host:port.
    pub addr: String,
    /// The cluster key both hold.
    pub key: Key,
    /// The inbox there ("" for a page server).
    pub inbox: String,
}

/// Whether `name` may name a level or a file of one: no path separators,
/// nothing hidden, nothing that climbs.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn stream_err(peer: &str, reason: impl Into<String>) -> Error {
    Error::Stream {
        peer: peer.to_string(),
        reason: reason.into(),
    }
}

/// The sending end of one streamed checkpoint directory (one level).
pub struct Outbox {
    peer: String,
    /// The level's directory on the receiving node.
    dir: String,
    inner: Mutex<Sending>,
    sent: AtomicU64,
}

struct Sending {
    ch: Channel,
    /// Set by the first failure: later sends fail at once with it.
    failed: Option<String>,
    /// The frame being sent, its buffer kept from chunk to chunk.
    chunk: msg::StreamChunk,
}

impl Outbox {
    /// Connects to the receiver of `to` and opens level `level` in its
    /// inbox.
    pub fn open(to: &StreamTo, level: &str) -> Result<Outbox> {
        if !name_ok(level) {
            return Err(stream_err(
                &to.addr,
                format!("'{level}' cannot name a level (letters, digits, '-', '_', '.')"),
            ));
        }
        let mut ch = Channel::connect(&to.addr, &to.key, CONNECT_TIMEOUT)
            .map_err(|e| stream_err(&to.addr, e.to_string()))?;
        let peer = ch.peer().to_string();
        ch.set_timeout(Some(CONNECT_TIMEOUT))
            .map_err(|e| stream_err(&peer, e.to_string()))?;
        ch.set_write_timeout(Some(IDLE_TIMEOUT))
            .map_err(|e| stream_err(&peer, e.to_string()))?;
        let answer = ch
            .call(
                0,
                msg::request::Body::Stream(msg::StreamOpen {
                    inbox: to.inbox.clone(),
                    level: level.to_string(),
                }),
            )
            .map_err(|e| stream_err(&peer, e.to_string()))?;
        let dir = match answer {
            Some(msg::response::Body::Stream(r)) => r.dir,
            other => {
                return Err(stream_err(
                    &peer,
                    format!("answered the open with {other:?}"),
                ))
            }
        };
        debug!(peer, dir, "stream open");
        Ok(Outbox {
            peer,
            dir,
            inner: Mutex::new(Sending {
                ch,
                failed: None,
                chunk: msg::StreamChunk::default(),
            }),
            sent: AtomicU64::new(0),
        })
    }

    /// The receiver, as errors name it.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Where the level lands on the receiving node.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// Bytes of file content sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Sends one chunk of file `file`, the last frame when `end`.
    fn send(&self, file: &str, offset: u64, data: &[u8], end: bool) -> Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        if let Some(f) = &s.failed {
            return Err(stream_err(&self.peer, f.clone()));
        }
        s.chunk.file.clear();
        s.chunk.file.push_str(file);
        s.chunk.offset = offset;
        s.chunk.data.clear();
        s.chunk.data.extend_from_slice(data);
        s.chunk.end = end;
        if let Err(e) = s.ch.send(&s.chunk) {
            // The receiver says why it gave up before it closes; its
            // reason beats our broken pipe.
            let _ = s.ch.set_timeout(Some(Duration::from_secs(2)));
            let why = match s.ch.recv::<msg::Response>() {
                Ok(Some(r)) if !r.error.is_empty() => r.error,
                _ => e.to_string(),
            };
            s.failed = Some(why.clone());
            return Err(stream_err(&self.peer, why));
        }
        Ok(())
    }

    /// Sends `data`, the content of file `name` at `offset`.
    pub fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        for (i, part) in data.chunks(CHUNK).enumerate() {
            self.send(name, offset + (i * CHUNK) as u64, part, false)?;
        }
        // An empty file exists too.
        if data.is_empty() {
            self.send(name, offset, &[], false)?;
        }
        self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends file `path` whole, as `name`.
    pub fn send_file(&self, name: &str, path: &Path) -> Result<()> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 && offset > 0 {
                return Ok(());
            }
            self.write_at(name, offset, &buf[..n])?;
            if n == 0 {
                return Ok(());
            }
            offset += n as u64;
        }
    }

    /// Sends the files `inv` lists that are in `dir` (not yet on the
    /// stream), then commits with `inventory`, the framed image of `inv`.
    pub fn finish_level(
        &self,
        dir: &Path,
        inv: &ckpt_proto::image::Inventory,
        inventory: &[u8],
    ) -> Result<msg::StreamReply> {
        for f in &inv.files {
            let path = dir.join(&f.name);
            if path.exists() {
                self.send_file(&f.name, &path)?;
            }
        }
        self.commit(inventory)
    }

    /// Ends the stream with the level's inventory (`inventory`, the framed
    /// image) and waits for the receiver to make the level durable.
    pub fn commit(&self, inventory: &[u8]) -> Result<msg::StreamReply> {
        self.send(INVENTORY, 0, inventory, true)?;
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.ch.set_timeout(Some(COMMIT_TIMEOUT))
            .map_err(|e| stream_err(&self.peer, e.to_string()))?;
        let r =
            s.ch.recv::<msg::Response>()
                .map_err(|e| stream_err(&self.peer, e.to_string()))?;
        // The open was request 1: its final answer bears the same id.
        match ckpt_proto::rpc::answer_to(&self.peer, 1, r) {
            Ok(Some(msg::response::Body::Stream(r))) => {
                info!(
                    peer = self.peer,
                    dir = r.dir,
                    bytes = r.bytes,
                    "level streamed"
                );
                Ok(r)
            }
            Ok(other) => Err(stream_err(
                &self.peer,
                format!("answered the end with {other:?}"),
            )),
            Err(e) => Err(stream_err(&self.peer, e.to_string())),
        }
    }
}

/// Streams the checkpoint directory `dir` (received here) on to `to`, as
/// a level of the same name; returns the bytes sent.
pub fn forward(dir: &Path, to: &StreamTo) -> Result<u64> {
    let level = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join(INVENTORY);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let inv = crate::images::read_inventory(dir)?;
    let out = Outbox::open(to, &level)?;
    out.finish_level(dir, &inv, &bytes)?;
    Ok(out.sent())
}

/// Whether a received level must survive a crash of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A page server's checkpoints: every file is synced before the
    /// inventory is written.
    Durable,
    /// An inbox's levels serve one migration, which a crash of this node
    /// ends anyway (a restarted agent removes them): not synced, so that
    /// the job does not wait for the disk while frozen.
    Transient,
}

/// Receives the level `open` names into `root` over `ch`, the StreamOpen
/// having been request `id`: answers the open, writes every chunk at its
/// offset, and writes the inventory last, once every file is checked
/// against it (and durable if `keep` says). Returns what it wrote, for the
/// answer to the end; anything short of the end removes the level again.
pub fn receive(
    ch: &mut Channel,
    id: u64,
    root: &Path,
    open: &msg::StreamOpen,
    keep: Keep,
) -> Result<msg::StreamReply> {
    let peer = ch.peer().to_string();
    if !name_ok(&open.level) {
        return Err(stream_err(
            &peer,
            format!("'{}' cannot name a level", open.level),
        ));
    }
    let dir = root.join(&open.level);
    if dir.join(INVENTORY).exists() {
        return Err(stream_err(
            &peer,
            format!("{} already holds a checkpoint", dir.display()),
        ));
    }
    // What a broken stream left is no checkpoint: start afresh. (The root
    // must exist: an inbox removed meanwhile is not made again.)
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let r = receive_into(ch, id, &dir, &peer, keep);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

fn receive_into(
    ch: &mut Channel,
    id: u64,
    dir: &Path,
    peer: &str,
    keep: Keep,
) -> Result<msg::StreamReply> {
    let rpc = |e: ckpt_proto::rpc::RpcError| stream_err(peer, e.to_string());
    let dir_s = dir.to_string_lossy().into_owned();
    ch.send(&msg::Response {
        id,
        error: String::new(),
        body: Some(msg::response::Body::Stream(msg::StreamReply {
            dir: dir_s.clone(),
            bytes: 0,
            files: 0,
        })),
    })
    .map_err(rpc)?;
    // A sender whose host went away must not hold this thread forever.
    ch.set_timeout(Some(IDLE_TIMEOUT)).map_err(rpc)?;
    let mut files: HashMap<String, File> = HashMap::new();
    let mut bytes = 0u64;
    let mut c = msg::StreamChunk::default();
    loop {
        if !ch.recv_into(&mut c).map_err(rpc)? {
            return Err(stream_err(
                peer,
                "the sender closed the stream before its end",
            ));
        }
        if c.end {
            let durable = keep == Keep::Durable;
            for (name, f) in files.iter().filter(|_| durable) {
                f.sync_all().map_err(|e| Error::io(dir.join(name), e))?;
            }
            let inv = dir.join(INVENTORY);
            let tmp = dir.join("inventory.img.tmp");
            std::fs::write(&tmp, &c.data).map_err(|e| Error::io(&tmp, e))?;
            // A frame that does not decode is no inventory; one that lists
            // a file missing or different here commits nothing.
            let listed = ckpt_proto::read_image_file::<ckpt_proto::image::Inventory>(
                &tmp,
                ckpt_proto::ImageKind::Inventory,
            )?;
            crate::images::verify_with(dir, &listed, false)?;
            if durable && !crate::held::absent(dir, &listed)?.is_empty() {
                return Err(stream_err(
                    peer,
                    "a page server keeps whole checkpoints: this level's pages are held \
                     by the agent that dumped it",
                ));
            }
            if durable {
                File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::rename(&tmp, &inv).map_err(|e| Error::io(&inv, e))?;
            if durable {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::io(dir, e))?;
            }
            info!(
                peer,
                dir = dir_s,
                bytes,
                files = files.len(),
                "level received"
            );
            return Ok(msg::StreamReply {
                dir: dir_s,
                bytes,
                files: files.len() as u32 + 1,
            });
        }
        if !name_ok(&c.file) || c.file == INVENTORY || c.file.ends_with(".tmp") {
            return Err(stream_err(
                peer,
                format!("'{}' cannot name a file of a level", c.file),
            ));
        }
        let f = match files.get(&c.file) {
            Some(f) => f,
            None => {
                let path = dir.join(&c.file);
                let f = std::fs::OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?;
                files.entry(c.file.clone()).or_insert(f)
            }
        };
        f.write_all_at(&c.data, c.offset)
            .map_err(|e| Error::io(dir.join(&c.file), e))?;
        bytes += c.data.len() as u64;
    }
}

/// Serves one connection of a page server: authenticates it, then
/// receives every level it streams into `root`.
fn serve_connection(stream: std::net::TcpStream, key: &Key, root: &Path) {
    let mut ch = match Channel::accept(stream, key, "page-server", CONNECT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            warn!("refused a connection: {e}");
            return;
        }
    };
    loop {
        let req: msg::Request = match ch.recv() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                warn!("{e}");
                return;
            }
        };
        let result = match &req.body {
            Some(msg::request::Body::Stream(open)) if open.inbox.is_empty() => {
                receive(&mut ch, req.id, root, open, Keep::Durable)
            }
            _ => Err(stream_err(
                ch.peer(),
                "a page server only receives streamed checkpoints (StreamOpen, no inbox)",
            )),
        };
        if !answer(&mut ch, req.id, result) {
            return;
        }
    }
}

/// A page server: receives the checkpoints streamed to it into a
/// directory, a connection per thread.
pub struct PageServer {
    listener: std::net::TcpListener,
    key: Key,
    root: PathBuf,
}

impl PageServer {
    /// Listens on `listen` for streams into `root` (created if needed),
    /// authenticated with the key in `key_file`.
    pub fn bind(root: &Path, listen: &str, key_file: &Path) -> Result<PageServer> {
        let key = Key::load(key_file).map_err(|e| Error::Job {
            job: String::new(),
            reason: format!("{}: {e}", key_file.display()),
        })?;
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let listener = std::net::TcpListener::bind(listen).map_err(|e| Error::io(listen, e))?;
        Ok(PageServer {
            listener,
            key,
            root: root.to_owned(),
        })
    }

    /// The address it listens on (a port 0 asked for is chosen now).
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io(&self.root, e))
    }

    /// Serves until the process ends.
    pub fn run(self) {
        for conn in self.listener.incoming() {
            match conn {
                Ok(stream) => {
                    let (key, root) = (self.key.clone(), self.root.clone());
                    std::thread::spawn(move || serve_connection(stream, &key, &root));
                }
                Err(e) => warn!("accept: {e}"),
            }
        }
    }
}

/// Answers the StreamOpen `id` with what its stream came to; false when
/// the connection must end (the stream failed: what the sender still
/// sends is no request).
pub fn answer(ch: &mut Channel, id: u64, result: Result<msg::StreamReply>) -> bool {
    let failed = result.is_err();
    let answer = match result {
        Ok(r) => msg::Response {
            id,
            error: String::new(),
            body: Some(msg::response::Body::Stream(r)),
        },
        Err(e) => {
            warn!("{e}");
            msg::Response {
                id,
                error: e.to_string(),
                body: None,
            }
        }
    };
    ch.send(&answer).is_ok() && !failed
}

/// The spool directory for streamed levels on this node: tmpfs, so a
/// migration's source writes nothing to its disks.
pub fn spool_root() -> PathBuf {
    PathBuf::from("/run/ckpt/spool")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page server in a thread, with a fresh key, and a level streamed
    /// into it: an empty file arrives as an empty file, and an inventory
    /// naming a file that never came commits nothing.
    #[test]
    fn a_level_exists_only_whole() {
        use ckpt_proto::image::{FileEntry, Inventory};
        use std::os::unix::fs::OpenOptionsExt;
        let t = tempfile::tempdir().unwrap();
        let key_path = t.path().join("key");
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&key_path)
                .unwrap(),
            &[7u8; 32],
        )
        .unwrap();
        let root = t.path().join("received");
        let server = PageServer::bind(&root, "127.0.0.1:0", &key_path).unwrap();
        let to = StreamTo {
            addr: server.local_addr().unwrap().to_string(),
            key: Key::load(&key_path).unwrap(),
            inbox: String::new(),
        };
        std::thread::spawn(move || server.run());
        let inventory = |files: &[(&str, u64, u32)]| {
            ckpt_proto::encode_image(
                ckpt_proto::ImageKind::Inventory,
                &[Inventory {
                    files: files
                        .iter()
                        .map(|&(name, size, crc32c)| FileEntry {
                            name: name.into(),
                            size,
                            crc32c,
                        })
                        .collect(),
                    ..Default::default()
                }],
            )
        };
        let out = Outbox::open(&to, "one").unwrap();
        out.write_at("empty.img", 0, &[]).unwrap();
        out.write_at("data.img", 3, b"def").unwrap();
        out.write_at("data.img", 0, b"abc").unwrap();
        let crc = crc32c::crc32c(b"abcdef");
        let r = out
            .commit(&inventory(&[("empty.img", 0, 0), ("data.img", 6, crc)]))
            .unwrap();
        assert_eq!(r.bytes, 6);
        let one = root.join("one");
        assert!(one.join(INVENTORY).exists());
        assert_eq!(std::fs::read(one.join("data.img")).unwrap(), b"abcdef");
        assert_eq!(std::fs::metadata(one.join("empty.img")).unwrap().len(), 0);

        let out = Outbox::open(&to, "two").unwrap();
        out.write_at("data.img", 0, b"abcdef").unwrap();
        let e = out
            .commit(&inventory(&[("data.img", 6, crc), ("lost.img", 4, 0)]))
            .unwrap_err();
        assert!(e.to_string().contains("lost.img"), "{e}");
        assert!(!root.join("two").exists());
    }

    #[test]
    fn names() {
        assert!(name_ok("pre-1"));
        assert!(name_ok("pages-12.img"));
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b", "é"] {
            assert!(!name_ok(bad), "{bad}");
        }
    }
}
