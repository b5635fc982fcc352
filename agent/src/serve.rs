//! `ckpt-agent serve`: the node agent as a service for ckpt-coord.
//!
//! Every connection is authenticated with the cluster key (proto rpc.rs)
//! and served by a thread of its own. A checkpoint part lives as a
//! [`DumpSession`] owned by the connection that prepared it: ptrace wants
//! every request about a stopped task from the thread that seized it, and
//! a coordinator that goes away (or an agent restarted) must leave the job
//! running as before, so the session is aborted when its connection ends.
//! Sessions in progress are recorded under the state directory; a
//! restarted agent finds those its predecessor left and undoes its network
//! locks and freezes (the job runs on; whether a part's images count is
//! decided by the coordinator's manifest, committed last).

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use ckpt_proto::rpc::{self, msg, Channel, Key};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::dump::{DumpRequest, DumpSession};
use crate::error::{Error, Result};
use crate::progress::Quiet;
use crate::stream::StreamTo;

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on, `host:port` (port 0: any free one).
    pub listen: String,
    /// The cluster key file (mode 0600).
    pub key: PathBuf,
    /// This node's name, as the coordinator's configuration knows it.
    pub node: String,
    /// Where the agent keeps the state of its work in progress.
    pub state_dir: PathBuf,
    /// A unix socket serving users who cannot read the cluster key (see
    /// [`user_connection`]); none: only key holders are served.
    pub user_socket: Option<PathBuf>,
}

/// A session in progress, as recorded on disk.
#[derive(Debug, Serialize, Deserialize)]
struct SessionRecord {
    agent_pid: u32,
    job: String,
    pid: i32,
    images: PathBuf,
    /// The part is to stop once the checkpoint is committed.
    #[serde(default)]
    stop_after_commit: bool,
}

/// The file name prefix of held-part records (others are sessions').
const HELD_PREFIX: &str = "held-";

/// A job this agent started or restored, as recorded on disk.
#[derive(Debug, Serialize, Deserialize)]
struct StartedRecord {
    job: String,
    /// Its root process (host PID).
    pid: i32,
    /// Its cgroup's inode: where agents share a cgroup hierarchy (a lab on
    /// one machine), the job may have been moved to another node since,
    /// whose agent made a cgroup of the same name; that one is not ours
    /// to remove. 0: not known (records of older agents).
    #[serde(default)]
    cgroup_ino: u64,
}

/// The inode of job `job`'s cgroup, 0 when it has none.
fn cgroup_ino(job: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    crate::cgroup::JobCgroup::find(job)
        .ok()
        .and_then(|cg| std::fs::metadata(&cg.dir).ok())
        .map_or(0, |m| m.ino())
}

/// Making job cgroups (starts and restores, shared: they run side by side)
/// against removing those of ended jobs (exclusive): a cgroup a restore
/// just made is empty until its first process is forked into it, and must
/// not pass for the cgroup of a job that ended.
static CGROUP_OPS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Parts killed on their way out of this node (a migration's sources,
/// `FinishRequest.background`) whose tasks are still exiting, one entry
/// per part, by job. A run, restore, dump or kill of the same job here
/// waits for them (its network lock and addresses are the job's), and
/// Status lists them.
static DEPARTING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static DEPARTED: std::sync::Condvar = std::sync::Condvar::new();

/// How long a request waits for a departing part of its job.
const DEPARTURE_WAIT: Duration = Duration::from_secs(60);

/// Completes the departure of a part of job `job` on a thread of its own
/// (here, when no thread can be had).
fn depart(job: String, d: crate::dump::Departure) {
    fn complete(job: &str, d: crate::dump::Departure) {
        if let Err(e) = d.complete() {
            warn!(job, "a part killed on its way out: {e}");
        }
    }
    fn done(job: &str) {
        let mut left = DEPARTING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = left.iter().position(|j| j == job) {
            left.swap_remove(i);
        }
        DEPARTED.notify_all();
    }
    DEPARTING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(job.clone());
    // The departure comes back if the thread cannot be made.
    let (tx, rx) = std::sync::mpsc::channel();
    let j = job.clone();
    let spawned = std::thread::Builder::new()
        .name("ckpt-departure".into())
        .spawn(move || {
            if let Ok(d) = rx.recv() {
                complete(&j, d);
            }
            done(&j);
        });
    match spawned {
        Ok(_) => {
            let _ = tx.send(d);
        }
        Err(e) => {
            warn!(
                job,
                "no thread for a departure, completed before the answer: {e}"
            );
            complete(&job, d);
            done(&job);
        }
    }
}

/// Whether a part of job `job` is still on its way out of this node.
fn departing(job: &str) -> bool {
    DEPARTING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|j| j == job)
}

/// Waits until no part of job `job` is on its way out of this node.
fn wait_departed(job: &str) -> Result<()> {
    if job.is_empty() {
        return Ok(());
    }
    let left = DEPARTING.lock().unwrap_or_else(|e| e.into_inner());
    let (_left, waited) = DEPARTED
        .wait_timeout_while(left, DEPARTURE_WAIT, |l| l.iter().any(|j| j == job))
        .unwrap_or_else(|e| e.into_inner());
    if waited.timed_out() {
        return Err(Error::Job {
            job: job.to_string(),
            reason: format!(
                "its part killed on this node is still exiting after {} s: retry once it is \
                 gone (`ckpt-agent` logs why)",
                DEPARTURE_WAIT.as_secs()
            ),
        });
    }
    Ok(())
}

/// Records that this agent started or restored job `job` with root `pid`.
fn note_started(jobs_dir: &Path, job: &str, pid: i32) {
    if let Err(e) = std::fs::create_dir_all(jobs_dir) {
        warn!("{}: {e}", jobs_dir.display());
        return;
    }
    let path = jobs_dir.join(format!("{job}.json"));
    if let Err(e) = write_record(
        &path,
        &StartedRecord {
            job: job.to_string(),
            pid,
            cgroup_ino: cgroup_ino(job),
        },
    ) {
        warn!("{e}");
    }
}

/// Removes the cgroups of the jobs this agent started or restored that
/// have ended (root gone, no process left), with their records: a node
/// keeps nothing of a finished job. Returns the jobs removed.
pub fn sweep_ended(state_dir: &Path) -> Vec<String> {
    let _ops = CGROUP_OPS.write().unwrap_or_else(|e| e.into_inner());
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(jobs_dir(state_dir)) else {
        return removed;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(rec) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<StartedRecord>(&t).ok())
        else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        // A zombie root has ended (its reaper may be slow, or a subreaper
        // that never reaps).
        let running = crate::proc::stat(rec.pid, None).is_ok_and(|st| st.state() != 'Z');
        if running {
            continue;
        }
        if let Ok(cg) = crate::cgroup::JobCgroup::find(&rec.job) {
            let ours = rec.cgroup_ino == 0 || cgroup_ino(&rec.job) == rec.cgroup_ino;
            if ours {
                if !cg.procs().map(|p| p.is_empty()).unwrap_or(false) {
                    continue;
                }
                cg.remove();
            }
        }
        remove_node_ends(&rec.job);
        let _ = std::fs::remove_file(&path);
        info!(job = rec.job, "job ended: its cgroup and veths removed");
        removed.push(rec.job);
    }
    removed
}

/// A part restored held, waiting for its release, as recorded on disk.
#[derive(Debug, Serialize, Deserialize)]
struct HeldRecord {
    agent_pid: u32,
    job: String,
    lock: Option<String>,
}

/// Whether the checkpoint a part's images belong to was committed: the
/// store's layout (JOB/CHECKPOINT/part-NAME) has the manifest, written
/// last, beside the part directories.
fn committed(images: &Path) -> bool {
    images
        .parent()
        .is_some_and(|cp| cp.join(ckpt_proto::image::MANIFEST_FILE).is_file())
}

/// Runs the service until the process is killed. `ready` is called with
/// the bound address once connections are accepted.
pub fn serve(cfg: &ServeConfig, ready: impl FnOnce(&str)) -> Result<()> {
    let key = Key::load(&cfg.key).map_err(|e| Error::Job {
        job: "serve".into(),
        reason: e.to_string(),
    })?;
    recover(&cfg.state_dir)?;
    let listener = TcpListener::bind(&cfg.listen).map_err(|e| Error::io(&cfg.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(&cfg.listen, e))?
        .to_string();
    info!(node = cfg.node, addr, "serving");
    let swept = cfg.state_dir.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(2));
        sweep_ended(&swept);
        crate::cgroup::sweep_set_aside();
        crate::held::sweep(crate::held::IDLE);
    });
    if let Some(path) = &cfg.user_socket {
        let users = bind_user_socket(path)?;
        info!(socket = %path.display(), "serving users");
        let (key, node, dir) = (key.clone(), cfg.node.clone(), cfg.state_dir.clone());
        let key_file = cfg.key.clone();
        std::thread::spawn(move || {
            for conn in users.incoming() {
                match conn {
                    Ok(stream) => {
                        let (key, node, dir) = (key.clone(), node.clone(), dir.clone());
                        let key_file = key_file.clone();
                        std::thread::spawn(move || {
                            user_connection(stream, (&key, &key_file), &node, &dir)
                        });
                    }
                    Err(e) => warn!("accept on the user socket: {e}"),
                }
            }
        });
    }
    ready(&addr);
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("accept: {e}");
                continue;
            }
        };
        let (key, node, dir) = (key.clone(), cfg.node.clone(), cfg.state_dir.clone());
        let key_file = cfg.key.clone();
        std::thread::spawn(move || connection(stream, &key, &key_file, &node, &dir));
    }
    Ok(())
}

/// Listens on the user socket at `path`, which every user may connect to
/// (who they are, the kernel tells: SO_PEERCRED). A socket left by an
/// agent that died is replaced; any other file there is refused.
fn bind_user_socket(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(Error::Job {
                job: "serve".into(),
                reason: format!(
                    "{} exists and is not a socket: remove it or choose another --user-socket",
                    path.display()
                ),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Job {
                job: "serve".into(),
                reason: format!(
                    "{} is served by another agent: stop it first",
                    path.display()
                ),
            });
        }
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| Error::io(path, e))?;
    Ok(l)
}

/// Serves one connection on the user socket (proto rpc.proto, UserHello):
/// the user is who the kernel says connected; every request is stamped
/// with their uid, so that agents let them act on their own jobs alone.
/// The requests go to the agent the hello names, over a connection made
/// with the cluster key (the user never holds it), or to this agent.
fn user_connection(
    mut stream: UnixStream,
    (key, key_file): (&Key, &Path),
    node: &str,
    state_dir: &Path,
) {
    let cred =
        match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                warn!("user socket: SO_PEERCRED: {e}");
                return;
            }
        };
    let uid = cred.uid();
    let peer = format!("user {uid} (pid {})", cred.pid());
    let hello: msg::UserHello = match rpc::read_frame(&mut stream, &peer) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => {
            warn!("{e}");
            return;
        }
    };
    let mut reply = msg::UserHelloReply {
        error: String::new(),
        node: node.to_string(),
        uid,
    };
    // Where the user's requests go: the agent the hello names, over a
    // connection with the key, or this agent's own request handler.
    enum Target {
        Agent(Channel),
        Here(Box<Handler>),
    }
    let target = if hello.version != rpc::PROTOCOL_VERSION {
        Err(format!(
            "{peer} speaks protocol version {}, this agent {}: run the same ckpt version",
            hello.version,
            rpc::PROTOCOL_VERSION
        ))
    } else if hello.agent.is_empty() {
        std::env::current_exe()
            .map(|exe| {
                let mut h = Handler::new(node, state_dir, &exe, &peer, Some(key.clone()));
                h.key_file = Some(key_file.to_owned());
                Target::Here(Box::new(h))
            })
            .map_err(|e| format!("/proc/self/exe: {e}"))
    } else {
        Channel::connect(&hello.agent, key, Duration::from_secs(10))
            .map(Target::Agent)
            .map_err(|e| e.to_string())
    };
    match &target {
        Ok(Target::Agent(ch)) => reply.node = ch.peer_node.clone(),
        Ok(Target::Here(_)) => {}
        Err(e) => {
            warn!("{peer}: {e}");
            reply.error = e.clone();
        }
    }
    if rpc::write_frame(&mut stream, &peer, &reply).is_err() {
        return;
    }
    let Ok(mut target) = target else { return };
    info!(peer, to = reply.node, "user connected");
    loop {
        let mut req: msg::Request = match rpc::read_frame(&mut stream, &peer) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                warn!("{e}");
                break;
            }
        };
        req.uid = uid;
        let resp = match &mut target {
            Target::Agent(ch) => match ch.send(&req).and_then(|()| ch.recv::<msg::Response>()) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    warn!("{e}");
                    break;
                }
            },
            Target::Here(h) => h.respond(&req),
        };
        if rpc::write_frame(&mut stream, &peer, &resp).is_err() {
            break;
        }
    }
    // Dropping the channel (or the handler) aborts what the user left
    // unfinished, as for a coordinator holding the key.
}

/// Where in a state directory sessions and held parts are recorded.
fn sessions_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions")
}

/// Where in a state directory the jobs this agent started or restored are
/// recorded (until they end).
fn jobs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("jobs")
}

/// Where in a state directory streamed checkpoint parts are kept.
fn incoming_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("incoming")
}

/// Undoes what a predecessor recording its work in `state_dir` left: its
/// network locks and freezes, the parts it restored held, the images
/// streamed to it; and finishes the parts of checkpoints committed after
/// it prepared them. Makes the state directory if needed.
pub fn recover(state_dir: &Path) -> Result<()> {
    let me = std::process::id();
    let sessions_dir = &sessions_dir(state_dir);
    std::fs::create_dir_all(sessions_dir).map_err(|e| Error::io(sessions_dir, e))?;
    // Streamed images serve one restore, on one connection: a new agent
    // has no connection yet.
    let incoming = incoming_dir(state_dir);
    if incoming.exists() {
        std::fs::remove_dir_all(&incoming).map_err(|e| Error::io(&incoming, e))?;
    }
    for e in std::fs::read_dir(sessions_dir)
        .map_err(|e| Error::io(sessions_dir, e))?
        .flatten()
    {
        let path = e.path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let is_held = e.file_name().to_string_lossy().starts_with(HELD_PREFIX);
        if let Some(held) = is_held
            .then(|| serde_json::from_str::<HeldRecord>(&text).ok())
            .flatten()
        {
            if held.agent_pid != me && alive(held.agent_pid) {
                continue;
            }
            // Its restart never got the release: the job's other parts
            // were killed with it.
            warn!(
                job = held.job,
                "a part restored held by a dead agent, never released: killed"
            );
            if let Err(e) = kill_job(&held.job, held.lock.as_deref()) {
                warn!("{e}");
            }
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Ok(rec) = serde_json::from_str::<SessionRecord>(&text) else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if rec.agent_pid != me && alive(rec.agent_pid) {
            // Another agent of this node still serves it.
            continue;
        }
        // Its images stay: whether they count is the coordinator's
        // manifest's to say. A part of a committed checkpoint that was to
        // stop is stopped, as the finish its agent missed would have done
        // (the job's other parts were); any other runs on.
        if rec.stop_after_commit && committed(&rec.images) {
            warn!(job = rec.job, pid = rec.pid, images = %rec.images.display(),
                "a checkpoint session left by a dead agent after its checkpoint was committed: the part is stopped");
            if let Err(e) = kill_job(&rec.job, None) {
                warn!("{e}");
            }
        } else {
            warn!(job = rec.job, pid = rec.pid, images = %rec.images.display(),
                "a checkpoint session left by a dead agent: the part runs on");
        }
        let _ = std::fs::remove_file(&path);
    }
    crate::netlock::recover(None)?;
    crate::cgroup::recover_frozen()?;
    remove_dead_spools();
    Ok(())
}

/// Removes the stream spools of agents that are gone (named PID-RANDOM).
fn remove_dead_spools() {
    let Ok(rd) = std::fs::read_dir(crate::stream::spool_root()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|p| p != std::process::id() && !alive(p)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes the node's ends of the veths of job `job`. A job's network
/// namespace is freed by the kernel some time after its last process is
/// gone; until then its veths would still answer for the job's addresses
/// and MACs on this node's bridge, while the job (moved, or restarted from
/// a checkpoint) has them elsewhere: its TCP peers would get resets from
/// the dead copy.
fn remove_node_ends(job: &str) {
    for i in 0.. {
        let name = crate::net::node_end_name(job, i);
        let gone = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !gone {
            break;
        }
    }
}

/// Kills agent job `job` on this node (every process, its cgroup) and
/// releases the network lock `lock` a dump or held restore of it kept here.
/// A job already gone is fine. Returns how many processes were killed.
fn kill_job(job: &str, lock: Option<&str>) -> Result<usize> {
    let killed = match crate::cgroup::JobCgroup::find(job) {
        Ok(cg) => {
            let n = cg.kill_all()?;
            cg.remove();
            n
        }
        Err(_) => 0,
    };
    remove_node_ends(job);
    crate::netlock::recover(Some(lock.unwrap_or(job)))?;
    Ok(killed)
}

fn connection(stream: TcpStream, key: &Key, key_file: &Path, node: &str, state_dir: &Path) {
    let mut ch = match Channel::accept(stream, key, node, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            warn!("refused a connection: {e}");
            return;
        }
    };
    info!(peer = ch.peer(), "coordinator connected");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            warn!("/proc/self/exe: {e}");
            return;
        }
    };
    let mut handler = Handler::new(node, state_dir, &exe, ch.peer(), Some(key.clone()));
    handler.key_file = Some(key_file.to_owned());
    loop {
        let req: msg::Request = match ch.recv() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                warn!("{e}");
                break;
            }
        };
        // Another node's agent streaming a level into an inbox here: the
        // frames that follow are its chunks, not requests.
        if let Some(msg::request::Body::Stream(open)) = &req.body {
            let result = if req.uid != 0 {
                // Relayed for a user: what a user streams, the user chose.
                Err(Error::Job {
                    job: String::new(),
                    reason: format!(
                        "user {}: only agents (root, with the cluster key) stream images",
                        req.uid
                    ),
                })
            } else {
                inbox_dir(state_dir, &open.inbox).and_then(|root| {
                    crate::stream::receive(
                        &mut ch,
                        req.id,
                        &root,
                        open,
                        crate::stream::Keep::Transient,
                    )
                })
            };
            if !crate::stream::answer(&mut ch, req.id, result) {
                break;
            }
            continue;
        }
        if let Err(e) = ch.send(&handler.respond(&req)) {
            warn!("{e}");
            break;
        }
    }
    // Dropping the handler aborts whatever the connection left unfinished.
}

/// What one coordinator connection (or the coordinator's in-process
/// agent) asks of this node: its open dump sessions and the parts it
/// restored held. Dropped, it aborts the sessions (their jobs run on) and
/// kills the held parts (their restart failed): the end of a connection
/// never leaves a job frozen or half restored.
pub struct Handler {
    sessions: HashMap<u64, Session>,
    held: HashMap<String, Held>,
    next: u64,
    node: String,
    sessions_dir: PathBuf,
    jobs_dir: PathBuf,
    incoming_dir: PathBuf,
    /// Part directories streamed on this connection, and its inboxes
    /// (removed with it).
    staged: Vec<PathBuf>,
    /// Where this connection's streamed dumps keep their small images, for
    /// the next level of their chains (removed with it).
    spool: Option<PathBuf>,
    /// The ckpt-agent binary that starts and restores parts.
    agent_exe: PathBuf,
    /// Who the requests come from, for the logs.
    peer: String,
    /// The cluster key (none for the coordinator's in-process agent): signs
    /// inventories and users' manifests, checks the images users restore.
    key: Option<Key>,
    /// Its file, for the restoring processes this agent starts (they fetch
    /// held pages from other agents).
    pub key_file: Option<PathBuf>,
}

impl Drop for Handler {
    fn drop(&mut self) {
        let open = self.sessions.len();
        if open > 0 {
            warn!(
                peer = self.peer,
                sessions = open,
                "connection ended with checkpoints in progress: aborted, their jobs run on"
            );
        }
        self.sessions.clear();
        for dir in self.staged.drain(..) {
            remove_staged(&dir);
        }
        if let Some(spool) = self.spool.take() {
            let _ = std::fs::remove_dir_all(spool);
        }
        for (job, held) in self.held.drain() {
            warn!(
                peer = self.peer,
                job, "connection ended before the release of a part restored held: killed"
            );
            if let Err(e) = kill_job(&job, held.lock.as_deref()) {
                warn!("{e}");
            }
        }
    }
}

/// A session and its record on disk (removed with it).
struct Session {
    /// Taken out by finish.
    dump: Option<DumpSession>,
    record: PathBuf,
    /// The agent job it dumps.
    job: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.record);
    }
}

/// A part restored held, and its record on disk (removed with it).
struct Held {
    lock: Option<String>,
    record: PathBuf,
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.record);
    }
}

impl Handler {
    /// A handler for `peer`, recording its work in `state_dir` (where a
    /// restarted agent finds it, see [`recover`]), starting parts with
    /// `agent_exe`, signing with `key`.
    pub fn new(
        node: &str,
        state_dir: &Path,
        agent_exe: &Path,
        peer: &str,
        key: Option<Key>,
    ) -> Handler {
        Handler {
            sessions: HashMap::new(),
            held: HashMap::new(),
            next: 1,
            node: node.to_string(),
            sessions_dir: sessions_dir(state_dir),
            jobs_dir: jobs_dir(state_dir),
            incoming_dir: incoming_dir(state_dir),
            staged: Vec::new(),
            spool: None,
            agent_exe: agent_exe.to_path_buf(),
            peer: peer.to_string(),
            key,
            key_file: None,
        }
    }

    /// Answers one request; failures are logged and answered with an
    /// error naming this node.
    pub fn respond(&mut self, req: &msg::Request) -> msg::Response {
        let (body, error) = match self.handle(req) {
            Ok(b) => (Some(b), String::new()),
            Err(e) => (None, format!("{}: {e}", self.node)),
        };
        if !error.is_empty() {
            warn!(peer = self.peer, "{error}");
        }
        msg::Response {
            id: req.id,
            error,
            body,
        }
    }

    fn handle(&mut self, req: &msg::Request) -> Result<msg::response::Body> {
        use msg::request::Body as Q;
        use msg::response::Body as A;
        let refuse = |reason: String| Error::Job {
            job: String::new(),
            reason,
        };
        match req
            .body
            .as_ref()
            .ok_or_else(|| refuse("empty request".into()))?
        {
            Q::Check(c) => {
                let missing = if c.images.is_empty() {
                    crate::check::run_probes(&[])
                        .map_err(|e| refuse(e.to_string()))?
                        .into_iter()
                        .filter(|r| !r.ok && r.required)
                        .map(|r| format!("{}: {}", r.name, r.detail))
                        .collect()
                } else if !Path::new(&c.images).is_dir() {
                    return Ok(A::Check(msg::CheckReply {
                        ok: false,
                        missing: vec![format!(
                            "the images {} are not visible on this node",
                            c.images
                        )],
                        report_json: String::new(),
                        images_missing: true,
                    }));
                } else if c.compat_only {
                    crate::check::compatible(Path::new(&c.images))
                } else {
                    crate::check::restorable(Path::new(&c.images))
                };
                Ok(A::Check(msg::CheckReply {
                    ok: missing.is_empty(),
                    missing,
                    report_json: String::new(),
                    images_missing: false,
                }))
            }
            Q::Prepare(p) => {
                let t = Instant::now();
                wait_departed(&p.job)?;
                let pid = self.root_of(p)?;
                check_owner(req.uid, pid)?;
                if req.uid != 0 && !p.stream_to.is_empty() {
                    // A stream is signed with the cluster key: where it goes
                    // is root's to choose.
                    return Err(Error::Refused {
                        pid,
                        reason: format!(
                            "user {}: only root may stream a checkpoint to another agent",
                            req.uid
                        ),
                    });
                }
                let compress = match p.compress.as_str() {
                    "" => Default::default(),
                    c => c.parse().map_err(|reason| Error::Refused { pid, reason })?,
                };
                if p.pre_dump && p.stop_after_commit {
                    return Err(Error::Refused {
                        pid,
                        reason: "a pre-dump leaves the part running: it cannot stop it".into(),
                    });
                }
                let (images, parent, stream) = self.destination(p, pid)?;
                let hold = match p.hold_pages.as_str() {
                    "" => None,
                    _ if stream.is_none() || p.inbox.is_empty() || p.pre_dump => {
                        // A page server keeps whole checkpoints: none that
                        // needs a hold that goes when idle.
                        return Err(Error::Refused {
                            pid,
                            reason: "pages are held only by the final dump of a stream into \
                                     an agent's inbox (hold_pages needs stream_to and inbox, \
                                     and no pre-dump)"
                                .into(),
                        });
                    }
                    agent => Some(crate::held::Hold::create(&p.job, agent)?),
                };
                let dreq = DumpRequest {
                    pid,
                    images,
                    leave_running: false,
                    snapshot: p.snapshot && !p.stop_after_commit,
                    tasks_in_parallel: true,
                    pre_dump: p.pre_dump,
                    parent,
                    track_mem: false,
                    compress,
                    ext_unix_sk: p.ext_unix_sk,
                    shell_job: false,
                    tcp_established: p.tcp_established,
                    key: self.key.clone(),
                    stream,
                    hold,
                };
                let id = self.next;
                self.next += 1;
                let record = self
                    .sessions_dir
                    .join(format!("{}-{id}.json", std::process::id()));
                let rec = SessionRecord {
                    agent_pid: std::process::id(),
                    job: p.job.clone(),
                    pid,
                    images: dreq.images.clone(),
                    stop_after_commit: p.stop_after_commit,
                };
                if let Err(e) =
                    std::fs::write(&record, serde_json::to_vec(&rec).expect("serializes"))
                {
                    if let Some(h) = &dreq.hold {
                        h.remove();
                    }
                    return Err(Error::io(&record, e));
                }
                let dump = match DumpSession::prepare(&dreq).and_then(|d| {
                    // A user's checkpoint holds nothing but the user's: a
                    // process that gained privileges (a set-user-ID
                    // program) is refused, and dropping the session
                    // thaws the job.
                    if req.uid != 0 {
                        let ids = crate::user::ids_of(req.uid)?;
                        for pid in d.pids() {
                            crate::user::check_process(pid, &ids)?;
                        }
                    }
                    Ok(d)
                }) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = std::fs::remove_file(&record);
                        if let Some(h) = &dreq.hold {
                            h.remove();
                        }
                        return Err(e);
                    }
                };
                self.sessions.insert(
                    id,
                    Session {
                        dump: Some(dump),
                        record,
                        job: p.job.clone(),
                    },
                );
                Ok(A::Prepare(msg::PrepareReply {
                    session: id,
                    prepare_ms: t.elapsed().as_secs_f64() * 1e3,
                }))
            }
            Q::Dump(d) => {
                let t = Instant::now();
                let s = self.session(d.session)?;
                let dump = s.dump.as_mut().expect("open session");
                dump.dump(&Quiet)?;
                Ok(A::Dump(msg::DumpPartReply {
                    pages_bytes: dump.pages_bytes().unwrap_or(0),
                    dump_ms: t.elapsed().as_secs_f64() * 1e3,
                    snapshot_bytes: dump.snapshot_bytes().unwrap_or(0),
                    hold: dump.hold().map(|h| h.name.clone()).unwrap_or_default(),
                }))
            }
            Q::Finish(f) => {
                let mut s = self
                    .sessions
                    .remove(&f.session)
                    .ok_or_else(|| refuse(format!("no session {}", f.session)))?;
                let dump = s.dump.take().expect("open session");
                // Past this point the part is committed: not the work of a
                // dead agent to undo.
                let job = std::mem::take(&mut s.job);
                drop(s);
                // A part of a job may leave in the background: what waits
                // for its departure goes by the job's name.
                let r = if f.stop && f.background && !job.is_empty() {
                    let (r, departure) = dump.finish_departing()?;
                    if let Some(d) = departure {
                        depart(job.clone(), d);
                    }
                    r
                } else {
                    dump.finish(f.stop)?
                };
                if f.stop && !job.is_empty() {
                    // Before the answer: the killed part's namespace lives
                    // on while its tasks exit, and its end on the node's
                    // bridge would still answer for the job's address.
                    remove_node_ends(&job);
                }
                Ok(A::Finish(msg::FinishReply {
                    frozen_ms: r.frozen_ms,
                }))
            }
            Q::Abort(a) => {
                // Dropping the session undoes it.
                self.sessions.remove(&a.session);
                Ok(A::Abort(msg::AbortReply {}))
            }
            Q::Restore(r) => {
                // A user's images are read through this directory, open
                // from the check to the end of the restore: it cannot be
                // swapped for another after its check.
                let pinned = match req.uid {
                    0 => None,
                    uid => Some(self.check_user_restore(uid, r)?),
                };
                let images = match &pinned {
                    Some(d) => format!("/proc/{}/fd/{}", std::process::id(), d.as_raw_fd()),
                    None => r.images.clone(),
                };
                if r.hold && r.job.is_empty() {
                    return Err(refuse(
                        "a part restored held needs its job id (the release names it)".into(),
                    ));
                }
                wait_departed(&r.job)?;
                // Fault injection for tests: a node whose restores fail
                // (what a migration does when its target cannot restore).
                if std::env::var_os("CKPT_FAULT_RESTORE_FAILS").is_some() {
                    return Err(refuse(format!(
                        "fault injection: the restore of {} fails (CKPT_FAULT_RESTORE_FAILS)",
                        r.images
                    )));
                }
                let t = Instant::now();
                // Recorded before it exists: an agent that dies mid-way
                // leaves a record its successor kills the part by.
                let record = self
                    .sessions_dir
                    .join(format!("{HELD_PREFIX}{}.json", r.job));
                if r.hold {
                    write_record(
                        &record,
                        &HeldRecord {
                            agent_pid: std::process::id(),
                            job: r.job.clone(),
                            lock: Some(r.job.clone()),
                        },
                    )?;
                }
                let ops = CGROUP_OPS.read().unwrap_or_else(|e| e.into_inner());
                let log = self.sessions_dir.join(format!("restore-{}.log", r.job));
                // The key reaches the held pages of other agents: root's.
                let key_file = self.key_file.as_deref().filter(|_| req.uid == 0);
                let restored = restore_detached(&self.agent_exe, r, &images, key_file, &log);
                if let (Ok(v), false) = (&restored, r.job.is_empty()) {
                    note_started(&self.jobs_dir, &r.job, v.pid);
                }
                drop(ops);
                // Streamed images served their one restore.
                if let Some(i) = self.staged.iter().position(|d| d == Path::new(&r.images)) {
                    remove_staged(&self.staged.remove(i));
                }
                let restored = match restored {
                    Ok(v) => v,
                    Err(e) => {
                        if r.hold {
                            let _ = std::fs::remove_file(&record);
                        }
                        return Err(e);
                    }
                };
                if r.hold {
                    // Held from here on: the connection's end kills it,
                    // whatever happens to its record.
                    let lock = restored.held_lock;
                    self.held.insert(
                        r.job.clone(),
                        Held {
                            lock: lock.clone(),
                            record: record.clone(),
                        },
                    );
                    write_record(
                        &record,
                        &HeldRecord {
                            agent_pid: std::process::id(),
                            job: r.job.clone(),
                            lock,
                        },
                    )?;
                }
                Ok(A::Restore(msg::RestorePartReply {
                    pid: restored.pid,
                    restore_ms: t.elapsed().as_secs_f64() * 1e3,
                }))
            }
            Q::Release(r) => {
                // Every part first, so that none waits on another's lock;
                // then the traffic.
                let mut failed = Vec::new();
                let mut thawed = Vec::new();
                for job in &r.jobs {
                    let Some(held) = self.held.remove(job) else {
                        failed.push(format!("{job}: not restored held on this connection"));
                        continue;
                    };
                    match crate::cgroup::JobCgroup::find(job).and_then(|cg| cg.thaw()) {
                        Ok(()) => thawed.push((job, held)),
                        Err(e) => {
                            failed.push(e.to_string());
                            // Still held: killed with the connection,
                            // unless the coordinator kills it first.
                            self.held.insert(job.clone(), held);
                        }
                    }
                }
                for (job, held) in thawed {
                    let lock = held.lock.as_deref().unwrap_or(job);
                    if let Err(e) = crate::netlock::recover(Some(lock)) {
                        failed.push(e.to_string());
                    } else if crate::netlock::recorded(lock) {
                        // Its traffic would stay blocked: the job would
                        // run, and stall.
                        failed.push(format!(
                            "{job}: its network lock {lock} could not be released"
                        ));
                    }
                }
                if failed.is_empty() {
                    Ok(A::Release(msg::ReleaseReply {}))
                } else {
                    Err(refuse(format!("release: {}", failed.join("; "))))
                }
            }
            Q::PutFile(f) => {
                if req.uid != 0 {
                    // What a user streams, the user chose: an agent restores
                    // a user's part only from images agents wrote.
                    return Err(refuse(format!(
                        "user {}'s restart needs target nodes that see the checkpoint store: \
                         only root may stream images to an agent",
                        req.uid
                    )));
                }
                let dir = self.put_file(f)?;
                Ok(A::PutFile(msg::PutFileReply {
                    dir: dir.to_string_lossy().into_owned(),
                }))
            }
            Q::Run(r) => {
                wait_departed(&r.job)?;
                let _ops = CGROUP_OPS.read().unwrap_or_else(|e| e.into_inner());
                let pid = run_detached(&self.agent_exe, r, req.uid)?;
                note_started(&self.jobs_dir, &r.job, pid);
                Ok(A::Run(msg::RunPartReply { pid }))
            }
            Q::Kill(k) => {
                wait_departed(&k.job)?;
                if let Ok(cg) = crate::cgroup::JobCgroup::find(&k.job) {
                    for pid in cg.procs()? {
                        check_owner(req.uid, pid)?;
                    }
                }
                let held = self.held.remove(&k.job);
                let lock = held.as_ref().and_then(|h| h.lock.clone());
                let killed = kill_job(&k.job, lock.as_deref())?;
                Ok(A::Kill(msg::KillReply {
                    killed: killed as u32,
                }))
            }
            Q::Inbox(i) => {
                if req.uid != 0 {
                    return Err(refuse(format!(
                        "user {}: only root may have images streamed into an agent",
                        req.uid
                    )));
                }
                let name = random_name()?;
                let dir = self.incoming_dir.join(format!("inbox-{name}"));
                private_dir(&dir)?;
                info!(peer = self.peer, job = i.job, dir = %dir.display(), "inbox open");
                self.staged.push(dir.clone());
                Ok(A::Inbox(msg::InboxReply {
                    inbox: name,
                    dir: dir.to_string_lossy().into_owned(),
                }))
            }
            Q::Forward(f) => {
                if req.uid != 0 {
                    return Err(refuse(format!(
                        "user {}: only root may forward images to another agent",
                        req.uid
                    )));
                }
                let dir = PathBuf::from(&f.dir);
                if !self.staged.contains(&dir) {
                    return Err(refuse(format!(
                        "{} is not an inbox of this connection",
                        f.dir
                    )));
                }
                let key = self.key.clone().ok_or_else(|| {
                    refuse("forwarding images needs the cluster key (a `ckpt-agent serve`)".into())
                })?;
                let to = StreamTo {
                    addr: f.stream_to.clone(),
                    key,
                    inbox: f.inbox.clone(),
                };
                let mut bytes = 0;
                for level in &f.levels {
                    if !crate::stream::name_ok(level) {
                        return Err(refuse(format!("'{level}' cannot name a level")));
                    }
                    // Whole here first: the level goes on without its hold.
                    crate::held::fetch_absent(&dir.join(level), self.key.as_ref())?;
                    bytes += crate::stream::forward(&dir.join(level), &to)?;
                }
                Ok(A::Forward(msg::ForwardReply { bytes }))
            }
            Q::HeldRead(_) | Q::HeldDrop(_) if req.uid != 0 => Err(refuse(format!(
                "user {}: only agents (root, with the cluster key) read or drop held pages",
                req.uid
            ))),
            Q::HeldRead(h) => Ok(A::HeldRead(msg::HeldReadReply {
                data: crate::held::read(&h.hold, &h.file, h.offset, h.len)?,
            })),
            Q::HeldDrop(h) => Ok(A::HeldDrop(msg::HeldDropReply {
                dropped: crate::held::drop_hold(&h.hold)?,
            })),
            Q::Stream(_) => Err(refuse(
                "a stream of images goes to an agent's network service, not through a relay".into(),
            )),
            Q::SignManifest(m) => Ok(A::SignManifest(msg::SignManifestReply {
                signature: self.sign_manifest(req.uid, &m.manifest)?,
            })),
            Q::Status(st) => Ok(A::Status(msg::StatusReply {
                node: self.node.clone(),
                sessions: self.sessions.keys().copied().collect(),
                running: st
                    .jobs
                    .iter()
                    .filter(|j| {
                        crate::cgroup::JobCgroup::find(j)
                            .and_then(|cg| cg.procs())
                            .is_ok_and(|p| !p.is_empty())
                    })
                    .cloned()
                    .collect(),
                departing: st.jobs.iter().filter(|j| departing(j)).cloned().collect(),
            })),
        }
    }

    /// Where the dump `p` asks for writes (its images directory, or with a
    /// stream its spool here), its parent, and its stream.
    fn destination(
        &mut self,
        p: &msg::PrepareRequest,
        pid: i32,
    ) -> Result<(PathBuf, Option<PathBuf>, Option<StreamTo>)> {
        let refuse = |reason: String| Error::Refused { pid, reason };
        let parent = (!p.parent.is_empty()).then_some(p.parent.as_str());
        if p.stream_to.is_empty() {
            return Ok((PathBuf::from(&p.images), parent.map(PathBuf::from), None));
        }
        let key = self.key.clone().ok_or_else(|| {
            refuse("streaming to another agent needs the cluster key (a `ckpt-agent serve`)".into())
        })?;
        for name in std::iter::once(p.level.as_str()).chain(parent) {
            if !crate::stream::name_ok(name) {
                return Err(refuse(format!(
                    "'{name}' cannot name a level of a streamed chain"
                )));
            }
        }
        let spool = match &self.spool {
            Some(s) => s.clone(),
            None => {
                let s = crate::stream::spool_root().join(format!(
                    "{}-{}",
                    std::process::id(),
                    random_name()?
                ));
                private_dir(&s)?;
                self.spool = Some(s.clone());
                s
            }
        };
        Ok((
            spool.join(&p.level),
            parent.map(|n| spool.join(n)),
            Some(StreamTo {
                addr: p.stream_to.clone(),
                key,
                inbox: p.inbox.clone(),
            }),
        ))
    }

    /// Writes one chunk of a streamed checkpoint file into the part's
    /// directory under the state directory; returns that directory.
    fn put_file(&mut self, f: &msg::PutFileRequest) -> Result<PathBuf> {
        let bad = |reason: String| Error::Job {
            job: f.checkpoint.clone(),
            reason,
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && n != "."
                && n != ".."
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let (job, id) = f
            .checkpoint
            .split_once('/')
            .filter(|(j, i)| name_ok(j) && name_ok(i))
            .ok_or_else(|| bad(format!("'{}' is not a checkpoint (JOB/ID)", f.checkpoint)))?;
        // Images may sit in subdirectories of the part's directory.
        if !name_ok(&f.part) || !f.name.split('/').all(name_ok) {
            return Err(bad(format!(
                "part '{}', file '{}': not a part or file name",
                f.part, f.name
            )));
        }
        let dir = self
            .incoming_dir
            .join(job)
            .join(id)
            .join(format!("part-{}", f.part));
        if !self.staged.contains(&dir) {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            self.staged.push(dir.clone());
        }
        let path = dir.join(&f.name);
        if let Some(parent) = path.parent().filter(|p| *p != dir) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(f.offset == 0)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len != f.offset {
            return Err(bad(format!(
                "{}: a chunk at offset {} while the file has {len} bytes: chunks come in order",
                path.display(),
                f.offset
            )));
        }
        use std::io::{Seek, Write};
        file.seek(std::io::SeekFrom::End(0))
            .and_then(|_| file.write_all(&f.data))
            .map_err(|e| Error::io(&path, e))?;
        if f.last {
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            let got = sha256_of(&path)?;
            if !f.sha256.is_empty() && got[..] != f.sha256[..] {
                let _ = std::fs::remove_file(&path);
                return Err(bad(format!(
                    "{}: SHA-256 {} differs from the manifest's {}: damaged in transit",
                    path.display(),
                    hex::encode(got),
                    hex::encode(&f.sha256)
                )));
            }
        }
        Ok(dir)
    }

    /// Signs the encoded manifest `bytes` for user `uid`: only a manifest
    /// of that user's (any for root), not signed yet.
    fn sign_manifest(&self, uid: u32, bytes: &[u8]) -> Result<Vec<u8>> {
        use prost::Message;
        let refuse = |reason: String| Error::Job {
            job: String::new(),
            reason,
        };
        let key = self
            .key
            .as_ref()
            .ok_or_else(|| refuse("this agent holds no cluster key to sign with".into()))?;
        let m = ckpt_proto::image::Manifest::decode(bytes)
            .map_err(|e| refuse(format!("the manifest to sign does not decode: {e}")))?;
        let what = format!("manifest of {}/{}", m.job_id, m.checkpoint_id);
        if !m.signature.is_empty() {
            return Err(refuse(format!("the {what} is signed already")));
        }
        if uid != 0 && m.owner_uid != uid {
            return Err(refuse(format!(
                "user {uid} may not have the {what} signed: it names user {} as its owner",
                m.owner_uid
            )));
        }
        info!(peer = self.peer, uid, "signed the {what}");
        Ok(key.mac(&[&ckpt_proto::image::manifest_signing_bytes(&m)]))
    }

    /// Checks that user `uid` may restore the part `r` names (see
    /// `user::check_restore`); returns its image directory, open.
    fn check_user_restore(&self, uid: u32, r: &msg::RestorePartRequest) -> Result<std::fs::File> {
        let refuse = |reason: String| Error::Job {
            job: r.job.clone(),
            reason,
        };
        let key = self.key.as_ref().ok_or_else(|| {
            refuse(format!(
                "user {uid} restores only through an agent service that holds the cluster key"
            ))
        })?;
        if r.ext_unix_sk {
            // The restorer would connect them as root, and their servers
            // would see root at the other end.
            return Err(refuse(format!(
                "user {uid} may not restore unix sockets connected outside the job \
                 (--ext-unix-sk): only root"
            )));
        }
        let ids = crate::user::ids_of(uid)?;
        let dir = std::fs::File::open(&r.images).map_err(|e| Error::io(&r.images, e))?;
        let pinned = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        crate::user::check_restore(&pinned, Path::new(&r.images), &ids, key)?;
        Ok(dir)
    }

    fn session(&mut self, id: u64) -> Result<&mut Session> {
        self.sessions.get_mut(&id).ok_or_else(|| Error::Job {
            job: String::new(),
            reason: format!("no session {id} on this connection"),
        })
    }

    /// The process a prepare names: its pid, or the root of job `job`.
    fn root_of(&self, p: &msg::PrepareRequest) -> Result<i32> {
        if p.pid != 0 {
            return Ok(p.pid);
        }
        let cg = crate::cgroup::JobCgroup::find(&p.job)?;
        let procs = cg.procs()?;
        // The root: the one whose parent is not in the job.
        procs
            .iter()
            .copied()
            .find(|&pid| {
                crate::proc::stat(pid, None)
                    .map(|s| !procs.contains(&(s.field(4) as i32)))
                    .unwrap_or(false)
            })
            .ok_or_else(|| Error::Job {
                job: p.job.clone(),
                reason: "no process runs in it on this node".into(),
            })
    }
}

/// The directory of inbox `name` on this node (opened by a coordinator's
/// connection, see [`Handler`]'s Inbox).
fn inbox_dir(state_dir: &Path, name: &str) -> Result<PathBuf> {
    let dir = incoming_dir(state_dir).join(format!("inbox-{name}"));
    if !crate::stream::name_ok(name) || !dir.is_dir() {
        return Err(Error::Job {
            job: String::new(),
            reason: format!(
                "no inbox '{name}' on this node: a coordinator opens one before a stream into it"
            ),
        });
    }
    Ok(dir)
}

/// Makes directory `dir` (and its missing parents) readable by root only.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// 16 random hex digits, for names no one else picks.
fn random_name() -> Result<String> {
    let b = rpc::random_bytes::<8>().map_err(|e| Error::io("/dev/urandom", e))?;
    Ok(hex::encode(b))
}

/// Removes a streamed part's directory (incoming/JOB/ID/part-P) and its
/// checkpoint's and job's directories once empty.
fn remove_staged(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    for d in dir.ancestors().skip(1).take(2) {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
    }
}

/// The SHA-256 of the file at `path`.
fn sha256_of(path: &Path) -> Result<[u8; 32]> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(h.finalize().into())
}

/// Writes a record of work in progress.
fn write_record(path: &Path, rec: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_vec(rec).expect("a record serializes"))
        .map_err(|e| Error::io(path, e))
}

/// Starts a part in a process of its own (`ckpt-agent run --detach`), for
/// the reasons `restore_detached` gives, with the part's environment and
/// working directory.
fn run_detached(exe: &Path, r: &msg::RunPartRequest, uid: u32) -> Result<i32> {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--json", "run", "--detach", "--job", &r.job]);
    if uid != 0 {
        cmd.args(["--user", &uid.to_string()]);
    }
    if !r.hostname.is_empty() {
        cmd.args(["--hostname", &r.hostname]);
    }
    if r.net || !r.bridge.is_empty() {
        cmd.arg("--net");
    }
    if !r.bridge.is_empty() {
        cmd.args(["--veth", &r.bridge]);
        for a in &r.addresses {
            cmd.args(["--address", a]);
        }
        if !r.gateway.is_empty() {
            cmd.args(["--gateway", &r.gateway]);
        }
        if !r.mac.is_empty() {
            cmd.args(["--mac", &r.mac]);
        }
        if r.mtu != 0 {
            cmd.args(["--mtu", &r.mtu.to_string()]);
        }
    }
    // Without one, the job would inherit the pipe this reads the helper's
    // report from, and hold it open for as long as it runs.
    let output = match r.output.as_str() {
        "" => "/dev/null",
        o => o,
    };
    cmd.args(["--output", output]);
    cmd.arg("--").args(&r.argv);
    cmd.env_clear().envs(&r.env);
    if !r.env.contains_key("PATH") {
        cmd.env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        );
    }
    let workdir = if r.workdir.is_empty() {
        "/"
    } else {
        &r.workdir
    };
    cmd.current_dir(workdir);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            Error::io(
                if Path::new(workdir).is_dir() {
                    exe
                } else {
                    Path::new(workdir)
                },
                e,
            )
        })?;
    let err = || Error::Job {
        job: r.job.clone(),
        reason: format!(
            "cannot start {:?}: {}",
            r.argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    if !out.status.success() {
        return Err(err());
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get("pid")?.as_i64())
        .map(|p| p as i32)
        .ok_or_else(err)
}

/// Restores a part in a process of its own (`ckpt-agent restore --detach`):
/// the restored tree must not be a child of the long-lived service, which
/// could not reap it without stealing the ptrace stops of its dumps; once
/// the restoring process exits, the tree belongs to init (or the nearest
/// subreaper), as after a restore from the command line.
fn restore_detached(
    exe: &Path,
    r: &msg::RestorePartRequest,
    images: &str,
    key_file: Option<&Path>,
    log: &Path,
) -> Result<Restored> {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--json", "restore", "--detach", "--images", images]);
    if let Some(k) = key_file {
        cmd.arg("--key").arg(k);
    }
    if !r.job.is_empty() {
        cmd.args(["--job", &r.job]);
    }
    if !r.bridge.is_empty() {
        cmd.args(["--bridge", &r.bridge]);
    }
    if r.tcp_established {
        cmd.arg("--tcp-established");
    }
    if r.ext_unix_sk {
        cmd.arg("--ext-unix-sk");
    }
    if r.hold {
        cmd.arg("--hold");
    }
    if r.lazy_pages {
        cmd.args(["--lazy-pages", "--notify-running"]);
        return restore_lazily(cmd, r, log);
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io(exe, e))?;
    let err = || Error::Job {
        job: r.job.clone(),
        reason: format!(
            "restore of {} failed: {}",
            r.images,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    if !out.status.success() {
        return Err(err());
    }
    serde_json::from_slice::<Restored>(&out.stdout).map_err(|_| err())
}

/// Runs the lazy restore `cmd` and answers once its tree runs (or is
/// held): the restoring process goes on serving the tree's page faults
/// and copying the rest, and is reaped by a thread of its own, which logs
/// how it ended (on failure it has killed the tree: its missing pages
/// would read as zeros). Its stderr goes to `log`.
fn restore_lazily(
    mut cmd: std::process::Command,
    r: &msg::RestorePartRequest,
    log: &Path,
) -> Result<Restored> {
    use std::io::{BufRead, Read};
    let err_file = std::fs::File::create(log).map_err(|e| Error::io(log, e))?;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(err_file)
        .spawn()
        .map_err(|e| Error::io(log, e))?;
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut first = String::new();
    let _ = out.read_line(&mut first);
    let failed = |child: &mut std::process::Child| {
        let _ = child.wait();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let _ = std::fs::remove_file(log);
        Error::Job {
            job: r.job.clone(),
            reason: format!("restore of {} failed: {}", r.images, text.trim()),
        }
    };
    let restored = match serde_json::from_str::<Restored>(first.trim()) {
        Ok(v) => v,
        Err(_) => return Err(failed(&mut child)),
    };
    let (job, log) = (r.job.clone(), log.to_owned());
    std::thread::spawn(move || {
        // The final report follows; nothing else reads it.
        let _ = out.read_to_end(&mut Vec::new());
        match child.wait() {
            Ok(s) if s.success() => {
                info!(job, "every page of the lazily restored part is in");
                // Its log goes with it: what went wrong on the way (a
                // hold it could not drop) stays in this agent's.
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                for line in text
                    .lines()
                    .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                {
                    warn!(job, "lazy restore: {line}");
                }
            }
            Ok(s) => warn!(
                job,
                "the lazy restore's page server failed ({s}), the part was killed: {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            ),
            Err(e) => warn!(job, "waiting for the lazy restore: {e}"),
        }
        let _ = std::fs::remove_file(&log);
    });
    Ok(restored)
}

/// What `ckpt-agent --json restore` reports, as far as the service needs it.
#[derive(Deserialize)]
struct Restored {
    pid: i32,
    held_lock: Option<String>,
}

/// A user acts only on their own processes; root on all.
fn check_owner(uid: u32, pid: i32) -> Result<()> {
    if uid == 0 {
        return Ok(());
    }
    let owner = crate::proc::owner(pid)?;
    if owner != uid {
        return Err(Error::Refused {
            pid,
            reason: format!("user {uid} may not act on it: it belongs to user {owner}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that ended here after it moved to another node of the same
    /// cgroup hierarchy: its record goes, the cgroup of that name (the
    /// other node's) stays; its own cgroup would go.
    #[test]
    fn an_ended_job_leaves_another_agents_cgroup_of_its_name() {
        let state = tempfile::tempdir().unwrap();
        let job = format!("unit-sweep-{}", std::process::id());
        let mut ended = std::process::Command::new("true").spawn().unwrap();
        let pid = ended.id() as i32;
        ended.wait().unwrap();
        let cg = crate::cgroup::JobCgroup::create(&job).unwrap();
        let record = |ino: u64| {
            std::fs::create_dir_all(jobs_dir(state.path())).unwrap();
            write_record(
                &jobs_dir(state.path()).join(format!("{job}.json")),
                &StartedRecord {
                    job: job.clone(),
                    pid,
                    cgroup_ino: ino,
                },
            )
            .unwrap();
        };
        record(cgroup_ino(&job) + 1);
        assert_eq!(sweep_ended(state.path()), vec![job.clone()]);
        assert!(cg.dir.exists(), "another agent's cgroup was removed");
        record(cgroup_ino(&job));
        assert_eq!(sweep_ended(state.path()), vec![job.clone()]);
        assert!(!cg.dir.exists(), "its own cgroup stayed");
    }
}
