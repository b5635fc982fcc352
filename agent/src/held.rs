//! Held pages: a level whose page content stayed on the node that dumped
//! it (post-copy). A migration's final level is dumped with the job frozen;
//! streaming its pages to the target would keep the job standing still
//! for as long as the network takes. Instead the source agent writes them
//! into a hold here (tmpfs, a local memory copy) and streams only the
//! small images, the page indexes and `held.img`, which names the hold and
//! the agent serving it. The target restores lazily and fetches each block
//! as a fault needs it, while a background fetch brings in the rest in
//! file order; every block is checked against the crc32c its index (pinned
//! by the inventory) records, so content from the network is as trusted as
//! content from a disk.
//!
//! A hold outlives the session that wrote it (the source part is killed
//! meanwhile) and is removed when the restoring side has every page
//! (`HeldDrop`), when a migration is undone, or by the agent once nobody
//! read it for [`IDLE`].

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ckpt_proto::image::{HeldPages, Inventory, PageMap};
use ckpt_proto::rpc::{msg, Channel, Key};
use ckpt_proto::{read_image_file, ImageKind};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::pages::{self, BLOCK};

/// Name of the record of a held level.
pub const HELD: &str = "held.img";

/// A hold nobody read for this long is removed: its reader is gone.
pub const IDLE: Duration = Duration::from_secs(15 * 60);

/// Largest read one request may ask for (frames carry at most 16 MiB).
pub const MAX_READ: u32 = 8 << 20;

/// Bytes a fetch asks for at once, and how many requests it keeps in
/// flight: the round trip is hidden behind the next replies.
const FETCH: u64 = 4 << 20;
const DEPTH: usize = 4;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Where this node keeps its holds: tmpfs (memory, never throttled by
/// the writeback of dirty pages, as a disk is right after a checkpoint
/// went to it), which survives a restart of the agent; on Debian up to
/// half of RAM, where /run has a tenth.
const ROOT: &str = "/dev/shm/ckpt-held";

/// The holds' directory, made if needed: /dev/shm is everyone's, so it
/// must be root's own directory, private, not a link (anyone could have
/// made it first, and swapped holds or pointed reads elsewhere).
pub fn root() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let root = PathBuf::from(ROOT);
    match std::fs::DirBuilder::new().mode(0o700).create(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(&root, e)),
    }
    let md = std::fs::symlink_metadata(&root).map_err(|e| Error::io(&root, e))?;
    if !md.is_dir() || md.uid() != 0 || md.mode() & 0o077 != 0 {
        return Err(held_err(
            "",
            format!(
                "{ROOT} is not a private directory of root's (someone else made it?): \
                 remove it, the agent makes it again"
            ),
        ));
    }
    Ok(root)
}

/// Whether `name` is a hold's: JOB.16-HEX-DIGITS, as `Hold::create`
/// names them.
fn is_hold_name(name: &str) -> bool {
    crate::stream::name_ok(name)
        && name.rsplit_once('.').is_some_and(|(job, rnd)| {
            !job.is_empty() && rnd.len() == 16 && rnd.chars().all(|c| c.is_ascii_hexdigit())
        })
}

fn held_err(hold: &str, reason: impl Into<String>) -> Error {
    Error::Held {
        hold: hold.to_string(),
        reason: reason.into(),
    }
}

/// A hold being written by a dump on this node.
#[derive(Debug, Clone)]
pub struct Hold {
    pub name: String,
    pub dir: PathBuf,
    /// This agent, as the restoring node reaches it.
    pub agent: String,
}

impl Hold {
    /// Makes a new, empty hold for agent job `job`, to be served as
    /// `agent`.
    pub fn create(job: &str, agent: &str) -> Result<Hold> {
        let rnd = ckpt_proto::rpc::random_bytes::<8>().map_err(|e| Error::io("/dev/urandom", e))?;
        // Named after the job, for the operator: only characters a level's
        // name may have, never hidden.
        let job: String = job
            .trim_start_matches('.')
            .chars()
            .map(|c| match c.is_ascii_alphanumeric() || "-_.".contains(c) {
                true => c,
                false => '_',
            })
            .take(64)
            .collect();
        let job = if job.is_empty() { "hold" } else { job.as_str() };
        let name = format!("{job}.{}", hex::encode(rnd));
        let dir = root()?.join(&name);
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        info!(hold = name, "page content held here");
        Ok(Hold {
            name,
            dir,
            agent: agent.to_string(),
        })
    }

    /// The record the level carries.
    pub fn record(&self) -> HeldPages {
        HeldPages {
            agent: self.agent.clone(),
            hold: self.name.clone(),
        }
    }

    /// Removes the hold (its dump failed or was aborted).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory of hold `name` on this node, refusing names that are not
/// a hold's.
fn hold_dir(name: &str) -> Result<PathBuf> {
    if !is_hold_name(name) {
        return Err(held_err(name, "not the name of a hold"));
    }
    let dir = root()?.join(name);
    if !dir.is_dir() {
        return Err(held_err(
            name,
            "no such hold on this node (dropped, or removed after standing idle)",
        ));
    }
    Ok(dir)
}

/// Whether `file` may name a pages file (or segment) of a hold.
fn pages_file_ok(file: &str) -> bool {
    crate::stream::name_ok(file) && file.starts_with("pages-") && file.ends_with(".img")
}

/// Reads `len` bytes of pages file `file` of hold `name` from `offset`
/// (fewer only at its end); marks the hold as in use.
pub fn read(name: &str, file: &str, offset: u64, len: u32) -> Result<Vec<u8>> {
    let dir = hold_dir(name)?;
    if !pages_file_ok(file) {
        return Err(held_err(name, format!("'{file}' is not a pages file")));
    }
    if len > MAX_READ {
        return Err(held_err(
            name,
            format!("a read of {len} bytes: at most {MAX_READ} at once"),
        ));
    }
    let path = dir.join(file);
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let size = f.metadata().map_err(|e| Error::io(&path, e))?.len();
    let n = size.saturating_sub(offset).min(len as u64) as usize;
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, offset)
        .map_err(|e| Error::io(&path, e))?;
    // The idle clock restarts with each read (see `sweep`).
    if let Ok(d) = File::open(&dir) {
        let _ = d.set_modified(SystemTime::now());
    }
    Ok(buf)
}

/// Removes hold `name`; false when it was not there.
pub fn drop_hold(name: &str) -> Result<bool> {
    if !is_hold_name(name) {
        return Err(held_err(name, "not the name of a hold"));
    }
    let dir = root()?.join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            info!(hold = name, "hold dropped");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(&dir, e)),
    }
}

/// Removes the holds nobody read for longer than `idle`; returns their
/// names.
pub fn sweep(idle: Duration) -> Vec<String> {
    let mut gone = Vec::new();
    // Not made here: a node that never held anything keeps no directory.
    let made = std::path::Path::new(ROOT).exists();
    let Some(rd) = made
        .then(root)
        .and_then(|r| r.ok())
        .and_then(|r| std::fs::read_dir(r).ok())
    else {
        return gone;
    };
    for e in rd.flatten() {
        if !is_hold_name(&e.file_name().to_string_lossy()) {
            continue;
        }
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > idle);
        if stale && std::fs::remove_dir_all(e.path()).is_ok() {
            let name = e.file_name().to_string_lossy().into_owned();
            warn!(
                hold = name,
                idle_s = idle.as_secs(),
                "removed a hold nobody read: its restore ended without dropping it"
            );
            gone.push(name);
        }
    }
    gone
}

/// The hold a checkpoint directory's pages files are in, if its inventory
/// lists a `held.img`.
pub fn record(dir: &Path, inv: &Inventory) -> Result<Option<HeldPages>> {
    if !inv.files.iter().any(|f| f.name == HELD) {
        return Ok(None);
    }
    let rec: HeldPages = read_image_file(&dir.join(HELD), ImageKind::Held)?;
    if !is_hold_name(&rec.hold) || rec.agent.is_empty() {
        return Err(Error::BadImages {
            dir: dir.to_owned(),
            reason: format!("{HELD} names hold {:?} at {:?}", rec.hold, rec.agent),
        });
    }
    Ok(Some(rec))
}

/// The pages files (and segments) of `dir` that are held and not here.
pub fn absent(dir: &Path, inv: &Inventory) -> Result<Vec<String>> {
    if record(dir, inv)?.is_none() {
        return Ok(Vec::new());
    }
    Ok(inv
        .files
        .iter()
        .filter(|f| pages_file_ok(&f.name) && !dir.join(&f.name).exists())
        .map(|f| f.name.clone())
        .collect())
}

/// A connection to the agent serving a hold.
struct Client {
    ch: Channel,
    hold: String,
    next: u64,
}

impl Client {
    fn connect(rec: &HeldPages, key: &Key) -> Result<Client> {
        let mut ch = Channel::connect(&rec.agent, key, CONNECT_TIMEOUT)
            .map_err(|e| held_err(&rec.hold, format!("{}: {e}", rec.agent)))?;
        ch.set_timeout(Some(READ_TIMEOUT))
            .map_err(|e| held_err(&rec.hold, e.to_string()))?;
        Ok(Client {
            ch,
            hold: rec.hold.clone(),
            next: 1,
        })
    }

    fn err(&self, reason: impl std::fmt::Display) -> Error {
        held_err(&self.hold, format!("{}: {reason}", self.ch.peer()))
    }

    /// Sends request `body` (several may be in flight); its id.
    fn send(&mut self, body: msg::request::Body) -> Result<u64> {
        let id = self.next;
        self.next += 1;
        let req = msg::Request {
            id,
            uid: 0,
            body: Some(body),
        };
        self.ch.send(&req).map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// Sends a read of `len` bytes of `file` at `offset`; its id.
    fn ask(&mut self, file: &str, offset: u64, len: u64) -> Result<u64> {
        self.send(msg::request::Body::HeldRead(msg::HeldReadRequest {
            hold: self.hold.clone(),
            file: file.to_string(),
            offset,
            len: len as u32,
        }))
    }

    /// The answer to read `id`, which must be `len` bytes.
    fn answer(&mut self, id: u64, len: u64) -> Result<Vec<u8>> {
        let r = self.ch.recv::<msg::Response>().map_err(|e| self.err(e))?;
        match ckpt_proto::rpc::answer_to(self.ch.peer(), id, r) {
            Ok(Some(msg::response::Body::HeldRead(r))) if r.data.len() as u64 == len => Ok(r.data),
            Ok(Some(msg::response::Body::HeldRead(r))) => Err(self.err(format!(
                "answered a read of {len} bytes with {}",
                r.data.len()
            ))),
            Ok(other) => Err(self.err(format!("answered a read with {other:?}"))),
            Err(e) => Err(self.err(e)),
        }
    }

    fn drop_hold(&mut self) -> Result<bool> {
        let id = self.send(msg::request::Body::HeldDrop(msg::HeldDropRequest {
            hold: self.hold.clone(),
        }))?;
        let r = self.ch.recv::<msg::Response>().map_err(|e| self.err(e))?;
        match ckpt_proto::rpc::answer_to(self.ch.peer(), id, r) {
            Ok(Some(msg::response::Body::HeldDrop(r))) => Ok(r.dropped),
            Ok(other) => Err(self.err(format!("answered a drop with {other:?}"))),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Copies `[from, to)` of pages file `file` into `out` at the same
    /// offsets, DEPTH reads in flight; `done` hears of each piece written.
    fn copy(
        &mut self,
        file: &str,
        (from, to): (u64, u64),
        out: &File,
        path: &Path,
        done: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let mut flying = std::collections::VecDeque::new();
        let mut at = from;
        while at < to || !flying.is_empty() {
            while at < to && flying.len() < DEPTH {
                let n = FETCH.min(to - at);
                flying.push_back((self.ask(file, at, n)?, at, n));
                at += n;
            }
            let (id, off, n) = flying.pop_front().expect("one in flight");
            let data = self.answer(id, n)?;
            out.write_all_at(&data, off)
                .map_err(|e| Error::io(path, e))?;
            done(off, off + n);
        }
        Ok(())
    }
}

/// Fetches every held pages file absent from `dir` (see [`absent`]) whole
/// from its hold, before an eager restore (or a forward) reads the level,
/// then drops the hold: the level is whole here. Returns the bytes
/// fetched.
pub fn fetch_absent(dir: &Path, key: Option<&Key>) -> Result<u64> {
    let Some(Wanted {
        inv,
        files,
        rec,
        key,
    }) = wanted(dir, key)?
    else {
        return Ok(0);
    };
    let t = Instant::now();
    let mut client = Client::connect(&rec, key)?;
    let sizes: HashMap<&str, u64> = inv
        .files
        .iter()
        .map(|f| (f.name.as_str(), f.size))
        .collect();
    let mut bytes = 0;
    for name in &files {
        let size = sizes[name.as_str()];
        let r = place(dir, name, size, |out, part| {
            client.copy(name, (0, size), out, part, &mut |_, _| {})
        });
        match r {
            Ok(()) => bytes += size,
            // A lazy restore of the level saved it meanwhile (and dropped
            // the hold); the connection may be out of step now.
            Err(_) if dir.join(name).exists() => client = Client::connect(&rec, key)?,
            Err(e) => return Err(e),
        }
    }
    // Checked, as any restore checks a level, before the hold (the only
    // other copy) goes.
    if let Err(e) = crate::images::verify(dir, &inv) {
        for f in &files {
            let _ = std::fs::remove_file(dir.join(f));
        }
        return Err(e);
    }
    info!(
        hold = rec.hold,
        agent = rec.agent,
        bytes,
        ms = t.elapsed().as_secs_f64() * 1e3,
        "held pages fetched"
    );
    if let Err(e) = client.drop_hold() {
        warn!("{e}");
    }
    Ok(bytes)
}

/// What of a level is held elsewhere and not here.
struct Wanted<'k> {
    inv: Inventory,
    /// The pages files (and segments) to fetch.
    files: Vec<String>,
    rec: HeldPages,
    /// The key that reaches the agent holding them.
    key: &'k Key,
}

/// What of checkpoint `dir` is to be fetched (None: nothing), refused
/// without the key that reaches it.
fn wanted<'k>(dir: &Path, key: Option<&'k Key>) -> Result<Option<Wanted<'k>>> {
    let inv = crate::images::read_inventory(dir)?;
    let files = absent(dir, &inv)?;
    let Some(rec) = record(dir, &inv)?.filter(|_| !files.is_empty()) else {
        return Ok(None);
    };
    let key = key.ok_or_else(|| {
        held_err(
            &rec.hold,
            format!(
                "the pages of {} are held by the agent at {}: fetching them needs the cluster key (--key)",
                dir.display(),
                rec.agent
            ),
        )
    })?;
    Ok(Some(Wanted {
        inv,
        files,
        rec,
        key,
    }))
}

/// Writes file `name` (`size` bytes) of checkpoint `dir` with `fill`, under
/// a temporary name of its own, then in place: a reader sees it whole or
/// not at all, and two writers of the same file do not meet. Nothing to
/// do if it is there.
fn place(
    dir: &Path,
    name: &str,
    size: u64,
    fill: impl FnOnce(&File, &Path) -> Result<()>,
) -> Result<()> {
    let dest = dir.join(name);
    if dest.exists() {
        return Ok(());
    }
    let rnd = ckpt_proto::rpc::random_bytes::<4>().map_err(|e| Error::io("/dev/urandom", e))?;
    let part = dir.join(format!(".{name}.{}.part", hex::encode(rnd)));
    let written = (|| {
        let out = File::create(&part).map_err(|e| Error::io(&part, e))?;
        out.set_len(size).map_err(|e| Error::io(&part, e))?;
        fill(&out, &part)?;
        out.sync_all().map_err(|e| Error::io(&part, e))?;
        std::fs::rename(&part, &dest).map_err(|e| Error::io(&dest, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    written
}

/// Fetches the held pages files absent from checkpoint `dir` and from the
/// parents it chains to (see [`fetch_absent`]), before an eager restore.
pub fn fetch_chain(dir: &Path, key: Option<&Key>) -> Result<u64> {
    let (mut dir, mut bytes) = (dir.to_owned(), 0);
    for _ in 0..crate::images::MAX_CHAIN {
        bytes += fetch_absent(&dir, key)?;
        let inv = crate::images::read_inventory(&dir)?;
        if inv.parent.is_empty() {
            break;
        }
        dir = dir.join(&inv.parent);
    }
    Ok(bytes)
}

/// The held levels a lazy restore reads, and their fetches.
#[derive(Default)]
pub struct Lazily(Vec<(PathBuf, HeldPages, Vec<Arc<Fetch>>)>);

/// Starts fetching, for a lazy restore, every held pages file absent
/// from the checkpoints `dirs` (a chain), into copies in memory that
/// `mapped` records for the restore to read; returns them, for
/// [`settle`] once every page is in.
pub fn fetch_lazily(
    dirs: &[PathBuf],
    key: Option<&Key>,
    mapped: &mut crate::images::Mapped,
) -> Result<Lazily> {
    let mut held = Lazily::default();
    for dir in dirs {
        let Some(Wanted {
            files, rec, key, ..
        }) = wanted(dir, key)?
        else {
            continue;
        };
        let mut fetches = Vec::new();
        for name in files.iter().filter(|n| !pages::is_later_segment(n)) {
            let pid = crate::images::pages_pid(name).ok_or_else(|| Error::BadImages {
                dir: dir.clone(),
                reason: format!("unexpected file name {name}"),
            })?;
            let pm: PageMap = read_image_file(
                &dir.join(crate::images::image_name(ImageKind::PageMap, pid)),
                ImageKind::PageMap,
            )?;
            let (fetch, map) = Fetch::start(&rec, key, &pm)?;
            fetches.push(mapped.add_fetch(dir.join(name), fetch, map));
        }
        info!(
            hold = rec.hold,
            agent = rec.agent,
            files = files.len(),
            "fetching held pages on demand"
        );
        held.0.push((dir.clone(), rec, fetches));
    }
    Ok(held)
}

impl Lazily {
    /// Lets each hold go once a whole copy of its level exists without it,
    /// on a thread of its own (the tree need not have every page in: the
    /// pages are in the level): each held file is fetched to its end
    /// (pages the tree dropped are never read), saved beside the level's
    /// other files, which makes the level whole here, and then the hold
    /// is dropped. A migration undone after that (the part killed, its
    /// chain sent back) still finds every page. A level whose directory is
    /// gone (the inbox of a migration that ended) is needed by no one. On
    /// a failure the hold stays (until it stands idle), and why is logged.
    /// Join the thread before the process ends.
    pub fn settle(self, key: Option<Key>) -> Option<std::thread::JoinHandle<()>> {
        if self.0.is_empty() {
            return None;
        }
        let t = std::thread::Builder::new()
            .name("ckpt-held-settle".into())
            .spawn(move || {
                for (dir, rec, fetches) in self.0 {
                    match settle_level(&dir, &rec, &fetches, key.as_ref()) {
                        Ok(()) => info!(hold = rec.hold, dir = %dir.display(), "held pages all in and saved"),
                        Err(e) => warn!(hold = rec.hold, "the hold stays: {e}"),
                    }
                }
            });
        match t {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("the held pages stay held: no thread to settle them: {e}");
                None
            }
        }
    }
}

fn settle_level(
    dir: &Path,
    rec: &HeldPages,
    fetches: &[Arc<Fetch>],
    key: Option<&Key>,
) -> Result<()> {
    for f in fetches {
        f.complete()?;
    }
    if dir.is_dir() {
        for f in fetches {
            if let Err(e) = f.save(dir) {
                // The inbox goes with the migration's connection, maybe
                // while this saves into it: then no one needs the level.
                if dir.is_dir() {
                    return Err(e);
                }
                debug!(hold = rec.hold, dir = %dir.display(), "the level went while its held pages were saved: {e}");
                break;
            }
        }
    }
    let key = key.ok_or_else(|| held_err(&rec.hold, "no cluster key"))?;
    Client::connect(rec, key)?.drop_hold()?;
    Ok(())
}

/// What the fetch of one held pages file has brought in.
struct Progress {
    /// Per block of the file: in the local copy.
    present: Vec<bool>,
    /// The background fetch has ended (done, stopped or failed).
    ended: bool,
}

struct Shared {
    hold: String,
    /// The local copy's segments: name, file, path.
    segments: Vec<(String, File, PathBuf)>,
    segment: u64,
    size: u64,
    progress: Mutex<Progress>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    /// The segment holding byte `at` of the file and the offset there.
    fn locate(&self, at: u64) -> (usize, u64) {
        match self.segment {
            0 => (0, at),
            s => ((at / s) as usize, at % s),
        }
    }

    /// Where the segment holding byte `at` ends, in file offsets.
    fn segment_end(&self, at: u64) -> u64 {
        match self.segment {
            0 => self.size,
            s => ((at / s + 1) * s).min(self.size),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fetches `[from, to)` (block-aligned but at the file's end, inside
    /// one segment: segments are whole MiB) on `c`.
    fn fetch(&self, c: &mut Client, from: u64, to: u64) -> Result<()> {
        let (k, off) = self.locate(from);
        let (name, file, path) = &self.segments[k];
        c.copy(name, (off, off + (to - from)), file, path, &mut |_, _| {})?;
        let mut p = self.lock();
        for b in from / BLOCK..to.div_ceil(BLOCK) {
            p.present[b as usize] = true;
        }
        drop(p);
        self.changed.notify_all();
        Ok(())
    }

    /// The blocks of `[from, to)` not in yet, in runs inside a segment.
    fn missing(&self, p: &Progress, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in from / BLOCK..to.div_ceil(BLOCK) {
            if p.present[b as usize] {
                continue;
            }
            let (s, e) = (b * BLOCK, ((b + 1) * BLOCK).min(self.size));
            match runs.last_mut() {
                Some(r) if r.1 == s && self.locate(r.0).0 == self.locate(s).0 => r.1 = e,
                _ => runs.push((s, e)),
            }
        }
        runs
    }
}

/// A held pages file brought in while a lazy restore runs, into memory
/// (a memfd per segment, sparse at first, mapped like the file): the
/// restore asks [`Fetch::ensure`] for each range before it reads it; a
/// background thread fetches the rest in file order meanwhile. The copy
/// lives as long as the restore reads it: no file is left behind.
pub struct Fetch {
    shared: Arc<Shared>,
    /// For faults: blocks the background fetch has not reached yet.
    urgent: Mutex<Option<Client>>,
    /// The file's index: what a saved copy is checked against.
    pm: PageMap,
    rec: HeldPages,
    key: Key,
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fetch({} from {})", self.rec.hold, self.rec.agent)
    }
}

impl Fetch {
    /// Makes an empty copy in memory of the pages file of `pm` held as
    /// `rec`, starts fetching it, and returns the copy mapped as a pages
    /// file is (none when it is empty).
    pub fn start(
        rec: &HeldPages,
        key: &Key,
        pm: &PageMap,
    ) -> Result<(Fetch, Option<crate::sys::FilesMap>)> {
        let mut segments = Vec::new();
        for (name, len) in pages::segments(pm) {
            let path = PathBuf::from(format!("memfd:{}/{name}", rec.hold));
            let f = memfd(&name).map_err(|e| Error::io(&path, e))?;
            f.set_len(len).map_err(|e| Error::io(&path, e))?;
            segments.push((name, f, path));
        }
        let map = match pm.pages_file_size {
            0 => None,
            _ => {
                let files: Vec<(&File, u64)> = segments
                    .iter()
                    .zip(pages::segments(pm))
                    .map(|((_, f, _), (_, len))| (f, len))
                    .collect();
                let path = &segments[0].2;
                Some(crate::sys::mmap_files(&files).map_err(|e| Error::io(path, e))?)
            }
        };
        let blocks = pm.pages_file_size.div_ceil(BLOCK) as usize;
        let shared = Arc::new(Shared {
            hold: rec.hold.clone(),
            segments,
            segment: pm.segment_size,
            size: pm.pages_file_size,
            progress: Mutex::new(Progress {
                present: vec![false; blocks],
                ended: false,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let urgent = Client::connect(rec, key)?;
        {
            // Not joined: `Drop` only tells it to stop (see there).
            let (shared, rec, key) = (shared.clone(), rec.clone(), key.clone());
            std::thread::Builder::new()
                .name("ckpt-held-fetch".into())
                .spawn(move || fetch_all(&shared, &rec, &key))
                .map_err(|e| Error::io("spawning the fetch thread", e))?;
        }
        let fetch = Fetch {
            shared,
            urgent: Mutex::new(Some(urgent)),
            pm: pm.clone(),
            rec: rec.clone(),
            key: key.clone(),
        };
        Ok((fetch, map))
    }

    /// Whether bytes `[from, to)` of the file can be read without waiting
    /// for the background fetch (in already, or left to be fetched on
    /// demand once it stopped).
    pub fn ready(&self, from: u64, to: u64) -> bool {
        let p = self.shared.lock();
        p.ended
            || self
                .shared
                .missing(&p, from, to.min(self.shared.size))
                .is_empty()
    }

    /// Makes sure bytes `[from, to)` of the file are in the local copy:
    /// fetched at once when `urgent` (a thread waits on a fault), else
    /// waited for from the background fetch (fetched, if it stopped).
    pub fn ensure(&self, from: u64, to: u64, urgent: bool) -> Result<()> {
        let to = to.min(self.shared.size);
        let mut p = self.shared.lock();
        loop {
            let runs = self.shared.missing(&p, from, to);
            if runs.is_empty() {
                return Ok(());
            }
            if urgent || p.ended {
                drop(p);
                return self.fetch_now(&runs);
            }
            debug!(
                hold = self.rec.hold,
                at = from,
                "waiting for the background fetch"
            );
            p = self
                .shared
                .changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Brings in every block: waits for the background fetch, then
    /// fetches what it left (it failed) on a connection of its own, not
    /// the one faults use.
    fn complete(&self) -> Result<()> {
        let mut p = self.shared.lock();
        while !p.ended {
            p = self
                .shared
                .changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
        let runs = self.shared.missing(&p, 0, self.shared.size);
        drop(p);
        if runs.is_empty() {
            return Ok(());
        }
        let mut c = Client::connect(&self.rec, &self.key)?;
        for (s, e) in runs {
            self.shared.fetch(&mut c, s, e)?;
        }
        Ok(())
    }

    /// Writes the copy (every block in) into `dir` as the pages file, and
    /// checks what it wrote against the index: the hold, the only other
    /// copy, goes next (blocks the tree never read were never checked).
    fn save(&self, dir: &Path) -> Result<()> {
        let first = dir.join(&self.pm.pages_file);
        if first.exists() {
            // Saved by another (a forward's fetch), and checked there.
            return Ok(());
        }
        for (name, file, path) in &self.shared.segments {
            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            place(dir, name, len, |out, part| {
                let mut buf = vec![0u8; FETCH as usize];
                let mut at = 0u64;
                while at < len {
                    let n = (len - at).min(FETCH) as usize;
                    file.read_exact_at(&mut buf[..n], at)
                        .map_err(|e| Error::io(path, e))?;
                    out.write_all_at(&buf[..n], at)
                        .map_err(|e| Error::io(part, e))?;
                    at += n as u64;
                }
                Ok(())
            })?;
        }
        if let Err(e) = pages::verify(&self.pm, &first) {
            for (name, _) in pages::segments(&self.pm) {
                let _ = std::fs::remove_file(dir.join(name));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Fetches `runs` on the connection of faults, a run at a time (what
    /// another fetched meanwhile is not fetched again).
    fn fetch_now(&self, runs: &[(u64, u64)]) -> Result<()> {
        for &(s, e) in runs {
            let mut urgent = self.urgent.lock().unwrap_or_else(|e| e.into_inner());
            let still = self.shared.missing(&self.shared.lock(), s, e);
            if still.is_empty() {
                continue;
            }
            if urgent.is_none() {
                *urgent = Some(Client::connect(&self.rec, &self.key)?);
            }
            let c = urgent.as_mut().expect("connected");
            for (a, b) in still {
                if let Err(err) = self.shared.fetch(c, a, b) {
                    // A broken connection is made again for the next fault.
                    *urgent = None;
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Fetch {
    /// Stops the background fetch without waiting for it: a read it waits
    /// on from an agent that hangs would hold the restore's end (its
    /// failure, mostly) for as long as the read timeout.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// An anonymous file in memory, named for /proc/PID/fd.
fn memfd(name: &str) -> std::io::Result<File> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(format!("ckpt-held-{name}").as_str(), MFdFlags::MFD_CLOEXEC)?;
    Ok(File::from(fd))
}

/// The background fetch: every block not in yet, in file order, in runs
/// of at most FETCH * DEPTH bytes (a stop is heard between them).
fn fetch_all(shared: &Shared, rec: &HeldPages, key: &Key) {
    let t = Instant::now();
    let r = (|| -> Result<u64> {
        let mut c = Client::connect(rec, key)?;
        let mut bytes = 0;
        let mut at = 0u64;
        while at < shared.size && !shared.stop.load(Ordering::SeqCst) {
            let limit = (at + FETCH * DEPTH as u64).min(shared.segment_end(at));
            let run = shared.missing(&shared.lock(), at, limit).first().copied();
            let Some((s, e)) = run else {
                at = limit;
                continue;
            };
            shared.fetch(&mut c, s, e)?;
            bytes += e - s;
            at = e;
        }
        Ok(bytes)
    })();
    shared.lock().ended = true;
    shared.changed.notify_all();
    match r {
        Ok(bytes) => debug!(
            hold = shared.hold,
            bytes,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "background fetch done"
        ),
        Err(e) => warn!("background fetch stopped: {e}; the rest is fetched as it is read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_proto::rpc::msg::{request::Body as Q, response::Body as A};

    /// An agent holding `files` (name -> content) in a thread: answers
    /// reads and drops as `ckpt-agent serve` does, on any connection, and
    /// counts the drops.
    fn holder(
        files: HashMap<String, Vec<u8>>,
    ) -> (HeldPages, Key, Arc<std::sync::atomic::AtomicUsize>) {
        let key = Key::from_bytes(vec![9u8; 32]).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let rec = HeldPages {
            agent: listener.local_addr().unwrap().to_string(),
            hold: "job.0123456789abcdef".into(),
        };
        let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (k, files, d) = (key.clone(), Arc::new(files), drops.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (k, files, d) = (k.clone(), files.clone(), d.clone());
                std::thread::spawn(move || {
                    let mut ch = Channel::accept(conn, &k, "holder", CONNECT_TIMEOUT).unwrap();
                    while let Ok(Some(req)) = ch.recv::<msg::Request>() {
                        let body = match req.body {
                            Some(Q::HeldRead(r)) => {
                                let f = &files[&r.file];
                                let a = (r.offset as usize).min(f.len());
                                let b = (a + r.len as usize).min(f.len());
                                A::HeldRead(msg::HeldReadReply {
                                    data: f[a..b].to_vec(),
                                })
                            }
                            _ => {
                                d.fetch_add(1, Ordering::SeqCst);
                                A::HeldDrop(msg::HeldDropReply { dropped: true })
                            }
                        };
                        let r = msg::Response {
                            id: req.id,
                            error: String::new(),
                            body: Some(body),
                        };
                        if ch.send(&r).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (rec, key, drops)
    }

    /// A pages file of `len` bytes split into segments of `segment`: its
    /// index and content, and the content by segment file.
    fn held_file(len: u64, segment: u64) -> (PageMap, Vec<u8>, HashMap<String, Vec<u8>>) {
        let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let pm = PageMap {
            pid: 7,
            page_size: 4096,
            pages_file: "pages-7.img".into(),
            pages_file_size: len,
            content_size: len,
            segment_size: segment,
            block_size: BLOCK,
            block_crc32c: content.chunks(BLOCK as usize).map(crc32c::crc32c).collect(),
            runs: vec![ckpt_proto::image::PageRun {
                vaddr: 0x10000,
                nr_pages: len / 4096,
                offset: 0,
                flags: 1,
            }],
            ..Default::default()
        };
        let mut files = HashMap::new();
        let mut at = 0usize;
        for (name, n) in pages::segments(&pm) {
            files.insert(name, content[at..at + n as usize].to_vec());
            at += n as usize;
        }
        (pm, content, files)
    }

    #[test]
    fn a_fetch_brings_in_a_segmented_file_in_any_order() {
        let (pm, content, files) = held_file(5 * BLOCK + 12288, 2 * BLOCK);
        let (rec, key, _) = holder(files);
        let (fetch, map) = Fetch::start(&rec, &key, &pm).unwrap();
        let map = map.unwrap();
        // A fault in the last segment, before the background fetch could
        // get there, then a range across two segments.
        fetch
            .ensure(5 * BLOCK + 4096, 5 * BLOCK + 8192, true)
            .unwrap();
        assert!(fetch.ready(5 * BLOCK, 5 * BLOCK + 12288));
        assert_eq!(map[5 * BLOCK as usize..], content[5 * BLOCK as usize..]);
        fetch.ensure(BLOCK, 3 * BLOCK, true).unwrap();
        assert_eq!(
            map[BLOCK as usize..3 * BLOCK as usize],
            content[BLOCK as usize..3 * BLOCK as usize]
        );
        // The rest, as the background fetch brings it.
        fetch.ensure(0, pm.pages_file_size, false).unwrap();
        assert!(map[..] == content[..], "the copy differs from the hold");
        assert!(fetch.ready(0, u64::MAX));
    }

    #[test]
    fn a_fetch_whose_agent_is_gone_fails_and_names_the_hold() {
        let (pm, _, _) = held_file(BLOCK, 0);
        let rec = HeldPages {
            // Nothing listens there (port 1 is privileged, never a hold).
            agent: "127.0.0.1:1".into(),
            hold: "job.dead".into(),
        };
        let key = Key::from_bytes(vec![9u8; 32]).unwrap();
        let e = Fetch::start(&rec, &key, &pm).unwrap_err().to_string();
        assert!(e.contains("job.dead") && e.contains("127.0.0.1:1"), "{e}");
    }

    #[test]
    fn a_hold_is_read_by_name_and_dropped() {
        let hold = Hold::create("unit/test job", "127.0.0.1:7707").unwrap();
        assert!(hold.name.starts_with("unit_test_job."), "{}", hold.name);
        std::fs::write(hold.dir.join("pages-3.img"), b"0123456789").unwrap();
        assert_eq!(read(&hold.name, "pages-3.img", 2, 4).unwrap(), b"2345");
        // At the end: what is there.
        assert_eq!(read(&hold.name, "pages-3.img", 8, 100).unwrap(), b"89");
        for bad in ["../pages-3.img", "inventory.img", ".pages-3.img"] {
            assert!(read(&hold.name, bad, 0, 1).is_err(), "{bad} was read");
        }
        assert!(read("../held", "pages-3.img", 0, 1).is_err());
        assert!(read(&hold.name, "pages-3.img", 0, MAX_READ + 1).is_err());
        assert!(drop_hold(&hold.name).unwrap());
        assert!(!drop_hold(&hold.name).unwrap());
        let e = read(&hold.name, "pages-3.img", 0, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such hold"), "{e}");
    }

    #[test]
    fn an_idle_hold_is_swept() {
        let hold = Hold::create("unit-idle", "127.0.0.1:7707").unwrap();
        let fresh = Hold::create("unit-fresh", "127.0.0.1:7707").unwrap();
        let past = SystemTime::now() - IDLE - Duration::from_secs(60);
        File::open(&hold.dir).unwrap().set_modified(past).unwrap();
        let gone = sweep(IDLE);
        assert!(gone.contains(&hold.name), "{gone:?}");
        assert!(!hold.dir.exists() && fresh.dir.exists());
        fresh.remove();
    }

    /// A level dumped with `pm`'s pages held as `rec`: everything but the
    /// pages file.
    fn held_level(pm: &PageMap, rec: &HeldPages) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let w = crate::images::ImageWriter::create(dir.path()).unwrap();
        let name = crate::images::image_name(ImageKind::PageMap, pm.pid);
        w.write(&name, ImageKind::PageMap, pm).unwrap();
        w.add_pages(pm);
        w.write(HELD, ImageKind::Held, rec).unwrap();
        w.commit(Inventory::default(), None).unwrap();
        dir
    }

    #[test]
    fn a_forward_or_an_eager_restore_fetches_a_held_level_whole() {
        let (pm, _, files) = held_file(3 * BLOCK + 8192, 2 * BLOCK);
        let (rec, key, drops) = holder(files);
        let dir = held_level(&pm, &rec);
        let e = fetch_absent(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("needs the cluster key"), "{e}");
        assert_eq!(
            fetch_absent(dir.path(), Some(&key)).unwrap(),
            pm.pages_file_size
        );
        let inv = crate::images::read_inventory(dir.path()).unwrap();
        crate::images::verify(dir.path(), &inv).unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1, "the hold was not dropped");
        // Whole now: nothing more to fetch.
        assert_eq!(fetch_absent(dir.path(), Some(&key)).unwrap(), 0);

        // A holder whose copy differs from the index: nothing is kept,
        // and the hold stays.
        let (pm, _, mut files) = held_file(2 * BLOCK, 0);
        files.get_mut("pages-7.img").unwrap()[7] ^= 1;
        let (rec, key, drops) = holder(files);
        let dir = held_level(&pm, &rec);
        let e = fetch_absent(dir.path(), Some(&key))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        assert!(!dir.path().join("pages-7.img").exists());
        assert_eq!(drops.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_lazy_restore_saves_what_it_fetched_before_the_hold_goes() {
        let (pm, _, files) = held_file(2 * BLOCK + 4096, 0);
        let (rec, key, drops) = holder(files);
        let dir = held_level(&pm, &rec);
        let (fetch, _map) = Fetch::start(&rec, &key, &pm).unwrap();
        settle_level(dir.path(), &rec, &[Arc::new(fetch)], Some(&key)).unwrap();
        let inv = crate::images::read_inventory(dir.path()).unwrap();
        crate::images::verify(dir.path(), &inv).unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);

        // A holder whose copy differs from the index: nothing is saved,
        // and the hold stays.
        let (pm, _, mut files) = held_file(2 * BLOCK, 0);
        files.get_mut("pages-7.img").unwrap()[BLOCK as usize + 5] ^= 1;
        let (rec, key, drops) = holder(files);
        let dir = held_level(&pm, &rec);
        let (fetch, _map) = Fetch::start(&rec, &key, &pm).unwrap();
        let e = settle_level(dir.path(), &rec, &[Arc::new(fetch)], Some(&key))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        assert!(!dir.path().join("pages-7.img").exists());
        assert_eq!(drops.load(Ordering::SeqCst), 0);
    }
}
