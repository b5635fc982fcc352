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

use ckpt_proto::rpc::{msg, Channel, Key};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::dump::{DumpRequest, DumpSession};
use crate::error::{Error, Result};
use crate::progress::Quiet;

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
}

/// A session in progress, as recorded on disk.
#[derive(Debug, Serialize, Deserialize)]
struct SessionRecord {
    agent_pid: u32,
    job: String,
    pid: i32,
    images: PathBuf,
}

/// Runs the service until the process is killed. `ready` is called with
/// the bound address once connections are accepted.
pub fn serve(cfg: &ServeConfig, ready: impl FnOnce(&str)) -> Result<()> {
    let key = Key::load(&cfg.key).map_err(|e| Error::Job {
        job: "serve".into(),
        reason: e.to_string(),
    })?;
    let sessions_dir = cfg.state_dir.join("sessions");
    std::fs::create_dir_all(&sessions_dir).map_err(|e| Error::io(&sessions_dir, e))?;
    recover(&sessions_dir)?;
    let listener = TcpListener::bind(&cfg.listen).map_err(|e| Error::io(&cfg.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(&cfg.listen, e))?
        .to_string();
    info!(node = cfg.node, addr, "serving");
    ready(&addr);
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("accept: {e}");
                continue;
            }
        };
        let (key, node, dir) = (key.clone(), cfg.node.clone(), sessions_dir.clone());
        std::thread::spawn(move || connection(stream, &key, &node, &dir));
    }
    Ok(())
}

/// Undoes what a predecessor left: its network locks and freezes.
fn recover(sessions_dir: &Path) -> Result<()> {
    let me = std::process::id();
    for e in std::fs::read_dir(sessions_dir)
        .map_err(|e| Error::io(sessions_dir, e))?
        .flatten()
    {
        let path = e.path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(rec) = serde_json::from_str::<SessionRecord>(&text) else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if rec.agent_pid != me && Path::new(&format!("/proc/{}", rec.agent_pid)).exists() {
            // Another agent of this node still serves it.
            continue;
        }
        // Its images stay: whether they count is the coordinator's
        // manifest's to say (a part dumped but not finished may belong to
        // a committed checkpoint).
        warn!(job = rec.job, pid = rec.pid, images = %rec.images.display(), "a checkpoint session left by a dead agent");
        let _ = std::fs::remove_file(&path);
    }
    crate::netlock::recover(None)?;
    crate::cgroup::recover_frozen()?;
    Ok(())
}

fn connection(stream: TcpStream, key: &Key, node: &str, sessions_dir: &Path) {
    let mut ch = match Channel::accept(stream, key, node, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            warn!("refused a connection: {e}");
            return;
        }
    };
    info!(peer = ch.peer(), "coordinator connected");
    let mut state = Conn {
        sessions: HashMap::new(),
        next: 1,
        node: node.to_string(),
        sessions_dir: sessions_dir.to_path_buf(),
    };
    loop {
        let req: msg::Request = match ch.recv() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                warn!("{e}");
                break;
            }
        };
        let (body, error) = match state.handle(&req) {
            Ok(b) => (Some(b), String::new()),
            Err(e) => (None, format!("{node}: {e}")),
        };
        if !error.is_empty() {
            warn!("{error}");
        }
        if let Err(e) = ch.send(&msg::Response {
            id: req.id,
            error,
            body,
        }) {
            warn!("{e}");
            break;
        }
    }
    // Whatever was not finished is aborted with the connection.
    let open = state.sessions.len();
    if open > 0 {
        warn!(
            peer = ch.peer(),
            sessions = open,
            "connection ended with checkpoints in progress: aborted, their jobs run on"
        );
    }
}

/// One connection's open sessions.
struct Conn {
    sessions: HashMap<u64, Session>,
    next: u64,
    node: String,
    sessions_dir: PathBuf,
}

/// A session and its record on disk (removed with it).
struct Session {
    /// Taken out by finish.
    dump: Option<DumpSession>,
    record: PathBuf,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.record);
    }
}

impl Conn {
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
                } else {
                    crate::check::restorable(Path::new(&c.images))
                };
                Ok(A::Check(msg::CheckReply {
                    ok: missing.is_empty(),
                    missing,
                    report_json: String::new(),
                }))
            }
            Q::Prepare(p) => {
                let t = Instant::now();
                let pid = self.root_of(p)?;
                check_owner(req.uid, pid)?;
                let dreq = DumpRequest {
                    pid,
                    images: PathBuf::from(&p.images),
                    leave_running: false,
                    tasks_in_parallel: true,
                    ext_unix_sk: p.ext_unix_sk,
                    shell_job: false,
                    tcp_established: p.tcp_established,
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
                };
                std::fs::write(&record, serde_json::to_vec(&rec).expect("serializes"))
                    .map_err(|e| Error::io(&record, e))?;
                let dump = match DumpSession::prepare(&dreq) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = std::fs::remove_file(&record);
                        return Err(e);
                    }
                };
                self.sessions.insert(
                    id,
                    Session {
                        dump: Some(dump),
                        record,
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
                drop(s);
                let r = dump.finish(f.stop)?;
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
                if req.uid != 0 {
                    return Err(refuse(
                        "only root restores jobs through the agent service for now".into(),
                    ));
                }
                let t = Instant::now();
                let pid = restore_detached(r)?;
                Ok(A::Restore(msg::RestorePartReply {
                    pid,
                    restore_ms: t.elapsed().as_secs_f64() * 1e3,
                }))
            }
            Q::Status(_) => Ok(A::Status(msg::StatusReply {
                node: self.node.clone(),
                sessions: self.sessions.keys().copied().collect(),
            })),
        }
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

/// Restores a part in a process of its own (`ckpt-agent restore --detach`):
/// the restored tree must not be a child of the long-lived service, which
/// could not reap it without stealing the ptrace stops of its dumps; once
/// the restoring process exits, the tree belongs to init (or the nearest
/// subreaper), as after a restore from the command line.
fn restore_detached(r: &msg::RestorePartRequest) -> Result<i32> {
    let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["--json", "restore", "--detach", "--images", &r.images]);
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
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io(&exe, e))?;
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
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get("pid")?.as_i64())
        .map(|p| p as i32)
        .ok_or_else(err)
}

/// A user acts only on their own processes; root on all.
fn check_owner(uid: u32, pid: i32) -> Result<()> {
    if uid == 0 {
        return Ok(());
    }
    let owner = crate::proc::read(pid, "status")?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
    if owner != Some(uid) {
        return Err(Error::Refused {
            pid,
            reason: format!("user {uid} may not checkpoint it: it belongs to user {owner:?}"),
        });
    }
    Ok(())
}
