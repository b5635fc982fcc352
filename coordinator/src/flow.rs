//! The coordinator driving the node agents (`ckpt-agent serve`, or the
//! in-process agent of a local-only cluster) through [`Link`]s: a job's
//! launch, its checkpoint in phases, its restart from a checkpoint, a
//! check of the nodes, and a migration.
//!
//! One link per part during a checkpoint: an agent keeps a part's dump
//! session on the link that prepared it (ptrace wants one thread per
//! stopped task) and aborts it when that link ends, so dropping the links
//! is itself the abort of last resort. Likewise a part restored held
//! (frozen, its network blocked) is killed by its agent if the link ends
//! before the release: a failed restart leaves nothing half alive. Each
//! link is used by one thread at a time, borrowed whole into a scoped
//! thread for the parallel phases.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_proto::image::CheckpointOptions;
use ckpt_proto::rpc::msg::{self, request::Body as Q, response::Body as A};
use serde::Serialize;

use crate::config::Cluster;
use crate::jobspec::JobSpec;
use crate::link::Link;
use crate::plan::{self, RestartPlan};
use crate::store::{Checkpoint, CheckpointId, DumpedPart, Pruned, Store, StoreError, Verify};

/// Why an operation did not happen (or not in full); every variant that
/// concerns a node names it.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("{0}")]
    Setup(String),
    /// A node failed a step; what was done before is undone.
    #[error("{step} failed on node {node}: {reason}{undone}")]
    Node {
        step: &'static str,
        node: String,
        reason: String,
        /// What the coordinator undid because of it.
        undone: String,
    },
    /// A restart refused before anything was restored.
    #[error("restart of {checkpoint} refused before restoring anything: {reasons}")]
    NotRestorable { checkpoint: String, reasons: String },
    /// The checkpoint is committed, but a node did not finish its part.
    #[error("checkpoint {checkpoint} is committed, but {reasons}")]
    AfterCommit { checkpoint: String, reasons: String },
}

/// One timed step of an operation.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    pub ms: f64,
}

/// Where an operation reports its steps as they end (a terminal's
/// progress lines; nothing in `--json` mode).
pub type OnStep<'a> = &'a (dyn Fn(&Step) + Sync);

/// A recorder of timed steps.
pub(crate) struct Steps<'a> {
    pub(crate) done: Vec<Step>,
    pub(crate) on_step: OnStep<'a>,
}

impl Steps<'_> {
    pub(crate) fn end(&mut self, step: impl Into<String>, since: Instant) {
        let s = Step {
            step: step.into(),
            ms: ms(since),
        };
        (self.on_step)(&s);
        self.done.push(s);
    }
}

/// One part's share of a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct PartDump {
    pub part: String,
    pub node: String,
    pub images: PathBuf,
    /// As the agent measured them.
    pub prepare_ms: f64,
    pub dump_ms: f64,
    pub frozen_ms: f64,
    pub pages_bytes: u64,
    /// Of `pages_bytes`, copied from snapshots once the part ran on.
    pub snapshot_bytes: u64,
    /// The hold its agent keeps the page content in (a post-copy
    /// migration's final level), if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hold: String,
}

/// A committed checkpoint, as `ckpt-coord checkpoint` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointReport {
    pub job: String,
    pub checkpoint: CheckpointId,
    pub dir: PathBuf,
    pub stopped: bool,
    pub tcp_established: bool,
    pub parts: Vec<PartDump>,
    pub steps: Vec<Step>,
    pub total_ms: f64,
    pub pruned: Vec<CheckpointId>,
}

/// One restored part.
#[derive(Debug, Clone, Serialize)]
pub struct PartRestored {
    pub part: String,
    pub node: String,
    pub pid: i32,
    pub restore_ms: f64,
    /// Bytes of images streamed to its node, which could not see the store.
    pub streamed_bytes: u64,
}

/// A restart, as `ckpt-coord restart` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    pub job: String,
    pub checkpoint: CheckpointId,
    /// Each node of the checkpoint and the node that took its parts.
    pub mapping: Vec<(String, String)>,
    pub parts: Vec<PartRestored>,
    pub steps: Vec<Step>,
    pub total_ms: f64,
}

/// One started part.
#[derive(Debug, Clone, Serialize)]
pub struct PartLaunched {
    pub part: String,
    pub node: String,
    pub agent_job: String,
    pub pid: i32,
    pub output: Option<PathBuf>,
}

/// A launch, as `ckpt-coord launch` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LaunchReport {
    pub job: String,
    pub spec: PathBuf,
    pub parts: Vec<PartLaunched>,
    pub steps: Vec<Step>,
    pub total_ms: f64,
}

/// One node's answer to a check.
#[derive(Debug, Clone, Serialize)]
pub struct NodeCheck {
    pub node: String,
    /// The parts of the checkpoint it was checked for (none: its kernel).
    pub parts: Vec<String>,
    pub ok: bool,
    /// What is missing, naming the feature; or why it could not be asked.
    pub missing: Vec<String>,
    /// What else the operator should know (images a restart would stream).
    pub notes: Vec<String>,
}

pub(crate) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The node part `p` of `job` runs on, as its recorded spec says.
pub(crate) fn recorded_node(job: &str, p: &crate::jobspec::Part) -> Result<String, FlowError> {
    p.node.clone().ok_or_else(|| {
        FlowError::Setup(format!(
            "part {} of job {job} has no node in its recorded spec",
            p.name
        ))
    })
}

pub(crate) fn open(cluster: &Cluster, node: &str) -> Result<Link, FlowError> {
    Link::open(cluster, node).map_err(|reason| FlowError::Node {
        step: "connect",
        node: node.to_string(),
        reason,
        undone: String::new(),
    })
}

/// Runs `f` on every item at once, one scoped thread each, and returns
/// the results in order.
pub(crate) fn parallel<T: Send, R: Send>(
    items: &mut [T],
    f: impl Fn(&mut T) -> R + Sync,
) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .iter_mut()
            .map(|it| {
                let f = &f;
                s.spawn(move || f(it))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a coordinator thread panicked"))
            .collect()
    })
}

/// One part's link during a checkpoint.
pub(crate) struct Dumping {
    pub(crate) part: String,
    pub(crate) agent_job: String,
    pub(crate) link: Link,
    pub(crate) session: Option<u64>,
    pub(crate) report: PartDump,
}

/// Runs `f` on every part's link at once and returns the first failure
/// (by part order) with its node.
pub(crate) fn on_all(
    conns: &mut [Dumping],
    f: impl Fn(&mut Dumping) -> Result<(), String> + Sync,
) -> Result<(), (String, String)> {
    let results = parallel(conns, |c| (c.report.node.clone(), f(c)));
    for (node, r) in results {
        r.map_err(|e| (node, e))?;
    }
    Ok(())
}

/// Phase 1 on every part at once: the agent prepares the session `request`
/// describes (its part stopped and locked, or a pre-dump's capture).
pub(crate) fn prepare_all(
    conns: &mut [Dumping],
    timeout: Duration,
    request: impl Fn(&Dumping) -> msg::PrepareRequest + Sync,
) -> Result<(), (String, String)> {
    on_all(conns, |c| {
        match c.link.call(timeout, Q::Prepare(request(c)))? {
            A::Prepare(p) => {
                c.session = Some(p.session);
                c.report.prepare_ms = p.prepare_ms;
                Ok(())
            }
            other => Err(format!("answered prepare with {other:?}")),
        }
    })
}

/// Phase 2 on every prepared part at once: each writes its images.
pub(crate) fn dump_all(conns: &mut [Dumping], timeout: Duration) -> Result<(), (String, String)> {
    on_all(conns, |c| {
        let session = c.session.expect("prepared");
        match c
            .link
            .call(timeout, Q::Dump(msg::DumpPartRequest { session }))?
        {
            A::Dump(d) => {
                c.report.dump_ms = d.dump_ms;
                c.report.pages_bytes = d.pages_bytes;
                c.report.snapshot_bytes = d.snapshot_bytes;
                c.report.hold = d.hold;
                Ok(())
            }
            other => Err(format!("answered dump with {other:?}")),
        }
    })
}

/// How a part's session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The part runs on.
    RunOn,
    /// The part is killed, and gone when the agent answers.
    Stop,
    /// The part is killed; the agent answers at once and its exit (the
    /// memory freed) goes on after: what a migration waits for last.
    Depart,
}

/// Phase 3 on one part: its session ends as `end` says.
pub(crate) fn finish_part(c: &mut Dumping, end: End, timeout: Duration) -> Result<(), String> {
    let session = c.session.take().expect("prepared");
    let finish = msg::FinishRequest {
        session,
        stop: end != End::RunOn,
        background: end == End::Depart,
    };
    match c.link.call(timeout, Q::Finish(finish))? {
        A::Finish(f) => {
            c.report.frozen_ms = f.frozen_ms;
            Ok(())
        }
        other => Err(format!("answered finish with {other:?}")),
    }
}

/// Asks every agent whether it still holds its part's session: the votes
/// are in, but an agent that died since would leave its part to a
/// successor that can only guess. The first that does not, with its node.
pub(crate) fn confirm_sessions(
    conns: &mut [Dumping],
    timeout: Duration,
) -> Result<(), (String, String)> {
    on_all(conns, |c| {
        let session = c.session.expect("prepared");
        match c
            .link
            .call(timeout, Q::Status(msg::StatusRequest { jobs: Vec::new() }))?
        {
            A::Status(s) if s.sessions.contains(&session) => Ok(()),
            A::Status(_) => Err(format!("no longer holds session {session}")),
            other => Err(format!("answered status with {other:?}")),
        }
    })
}

/// Undoes every prepared session and names what was undone. An agent
/// that cannot be asked (it died) leaves its part to its successor, which
/// thaws and unlocks it when it starts.
pub(crate) fn abort_all(conns: &mut [Dumping], timeout: Duration) -> String {
    let mut undone = Vec::new();
    let mut unreachable = Vec::new();
    for c in conns.iter_mut() {
        if let Some(session) = c.session.take() {
            let who = format!("{}@{}", c.part, c.report.node);
            match c
                .link
                .call(timeout, Q::Abort(msg::AbortRequest { session }))
            {
                Ok(_) => undone.push(who),
                Err(e) => {
                    tracing::warn!(node = %c.report.node, part = %c.part, "abort: {e}");
                    unreachable.push(who);
                }
            }
        }
    }
    let mut out = String::new();
    if !undone.is_empty() {
        out += &format!("; aborted, running on as before: {}", undone.join(", "));
    }
    if !unreachable.is_empty() {
        out += &format!(
            "; agent unreachable, its part is thawed and unlocked by the agent when it \
             restarts (or by `ckpt-agent cleanup` on its node): {}",
            unreachable.join(", ")
        );
    }
    out + "; nothing was committed"
}

/// The error of a checkpoint whose `step` failed on a node, once every
/// prepared part is aborted.
pub(crate) fn aborted(
    conns: &mut [Dumping],
    step: &'static str,
    (node, reason): (String, String),
    timeout: Duration,
) -> FlowError {
    let undone = abort_all(conns, timeout);
    FlowError::Node {
        step,
        node,
        reason,
        undone,
    }
}

/// Whether parts of `spec` have a network namespace of their own, so that
/// their established TCP connections are theirs to checkpoint.
pub(crate) fn tcp_established(spec: &JobSpec) -> bool {
    spec.parts.iter().any(|p| p.net || p.network.is_some())
}

/// Fault injection for tests: a pause at a named point of a flow (the
/// milliseconds in the environment variable), to kill an agent in.
fn fault_hold(var: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        tracing::warn!("fault injection: pausing {ms} ms ({var})");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// What becomes of a job once its checkpoint is taken.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finish {
    /// Stopped once the checkpoint is committed (else it runs on).
    pub stop: bool,
    /// Runs on only once all of its memory is copied (else as soon as its
    /// state is captured, its memory copied from snapshots).
    pub frozen_copy: bool,
    /// How the parts store their page content.
    pub compress: ckpt_agent::pages::Codec,
}

/// Checkpoints every part of job `job` at once (BRIEF §6): every node
/// freezes its part and locks its network (barrier), every node dumps in
/// parallel, every agent confirms it still holds its part, the manifest is
/// committed, then every node stops its part (`how.stop`) or lets it run on
/// (parts left running run on once their state is captured, unless
/// `how.frozen_copy`). A
/// failure before the commit aborts on every node and leaves no
/// checkpoint.
pub fn checkpoint(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    how: Finish,
    on_step: OnStep<'_>,
) -> Result<CheckpointReport, FlowError> {
    let stop = how.stop;
    let what = if stop {
        "checkpoint --stop"
    } else {
        "checkpoint"
    };
    let _lock = store.lock_job(job, what, false)?;
    checkpoint_locked(cluster, store, job, how, on_step)
}

pub(crate) fn checkpoint_locked(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    how: Finish,
    on_step: OnStep<'_>,
) -> Result<CheckpointReport, FlowError> {
    let stop = how.stop;
    let t0 = Instant::now();
    let mut steps = Steps {
        done: Vec::new(),
        on_step,
    };
    let spec = store.job_spec(job)?;
    let tcp = tcp_established(&spec);
    let pending = store.begin(job)?;

    let t = Instant::now();
    let mut conns = Vec::new();
    for p in &spec.parts {
        let node = recorded_node(job, p)?;
        let link = open(cluster, &node)?;
        conns.push(Dumping {
            agent_job: spec.agent_job_id(&p.name),
            part: p.name.clone(),
            link,
            session: None,
            report: PartDump {
                part: p.name.clone(),
                node,
                images: pending.part_dir(&p.name)?,
                prepare_ms: 0.0,
                dump_ms: 0.0,
                frozen_ms: 0.0,
                pages_bytes: 0,
                snapshot_bytes: 0,
                hold: String::new(),
            },
        });
    }
    steps.end("connect", t);

    // Phase 1, the barrier: every part frozen and locked before any dump.
    let t = Instant::now();
    let timeouts = cluster.timeouts;
    let prepared = prepare_all(&mut conns, timeouts.freeze, |c| msg::PrepareRequest {
        job: c.agent_job.clone(),
        pid: 0,
        images: c.report.images.to_string_lossy().into_owned(),
        tcp_established: tcp,
        ext_unix_sk: false,
        stop_after_commit: stop,
        snapshot: !stop && !how.frozen_copy,
        compress: how.compress.to_string(),
        ..Default::default()
    });
    if let Err(failure) = prepared {
        return Err(aborted(&mut conns, "prepare", failure, timeouts.freeze));
    }
    steps.end("prepare (all frozen and locked)", t);

    // Phase 2: every part dumps, in parallel.
    let t = Instant::now();
    if let Err(failure) = dump_all(&mut conns, timeouts.dump) {
        return Err(aborted(&mut conns, "dump", failure, timeouts.freeze));
    }
    steps.end("dump", t);

    // The votes are in; an agent that died since would leave its part to
    // its successor's recovery, which can only guess: ask once more, right
    // before the commit, that every agent still holds its part.
    fault_hold("CKPT_FAULT_HOLD_COMMIT_MS");
    let t = Instant::now();
    if let Err(failure) = confirm_sessions(&mut conns, timeouts.freeze) {
        return Err(aborted(
            &mut conns,
            "confirm before commit",
            failure,
            timeouts.freeze,
        ));
    }

    // The commit: from here on the checkpoint exists.
    let parts: Vec<DumpedPart> = conns
        .iter()
        .map(|c| DumpedPart {
            name: c.part.clone(),
            node: c.report.node.clone(),
        })
        .collect();
    let options = CheckpointOptions {
        leave_running: !stop,
        tcp_established: tcp,
    };
    let cp = match pending.commit(
        &spec,
        &parts,
        options,
        crate::link::signer(cluster).as_deref(),
    ) {
        Ok(cp) => cp,
        Err(e) => {
            let undone = abort_all(&mut conns, timeouts.freeze);
            return Err(FlowError::Setup(format!("{e}{undone}")));
        }
    };
    steps.end("confirm and commit", t);

    // Phase 3: every part stops or runs on.
    let t = Instant::now();
    let finished = parallel(&mut conns, |c| {
        let end = if stop { End::Stop } else { End::RunOn };
        let r = finish_part(c, end, timeouts.freeze);
        (format!("{}@{}", c.part, c.report.node), r)
    });
    steps.end(
        if stop {
            "finish (stop)"
        } else {
            "finish (run on)"
        },
        t,
    );
    let pruned: Pruned = store.prune(job, cluster.keep)?;
    let failures: Vec<String> = finished
        .into_iter()
        .filter_map(|(who, r)| r.err().map(|e| format!("{who}: {e}")))
        .collect();
    if !failures.is_empty() {
        return Err(FlowError::AfterCommit {
            checkpoint: cp.label(),
            reasons: format!(
                "finishing failed: {} (a restarted agent finishes its part as the checkpoint asked)",
                failures.join("; ")
            ),
        });
    }
    Ok(CheckpointReport {
        job: job.to_string(),
        checkpoint: cp.id.clone(),
        dir: cp.dir.clone(),
        stopped: stop,
        tcp_established: tcp,
        parts: conns.into_iter().map(|c| c.report).collect(),
        steps: steps.done,
        total_ms: ms(t0),
        pruned: pruned.removed,
    })
}

/// Starts job `spec` on the cluster: places its parts (`nodes`, or every
/// node), records its spec in the store, and has every node's agent start
/// its parts, nodes in parallel. If one part cannot start, the parts
/// already started are killed and the spec removed: nothing is left. A job
/// id already recorded is refused, unless `replace` and none of its parts
/// runs any more (a batch job that starts over).
pub fn launch(
    cluster: &Cluster,
    store: &Store,
    spec: &JobSpec,
    nodes: Option<&[String]>,
    replace: bool,
    on_step: OnStep<'_>,
) -> Result<LaunchReport, FlowError> {
    let t0 = Instant::now();
    let mut steps = Steps {
        done: Vec::new(),
        on_step,
    };
    let job = spec.job.clone();
    if store.spec_path(&job).exists() {
        if !replace {
            return Err(FlowError::Setup(format!(
                "job {job} exists already ({} is recorded): launch it under another id (--job), \
                 restart it from its checkpoints (`ckpt-coord restart {job}`), or start it over \
                 with --replace",
                store.spec_path(&job).display()
            )));
        }
        let running: Vec<String> = parts_running(cluster, store, &job)?
            .into_iter()
            .filter(|p| p.running != Some(false))
            .map(|p| format!("{}@{}", p.part, p.node))
            .collect();
        if !running.is_empty() {
            return Err(FlowError::Setup(format!(
                "job {job} cannot start over: its parts {} may still run (`ckpt-coord kill {job}` \
                 stops them)",
                running.join(", ")
            )));
        }
        std::fs::remove_file(store.spec_path(&job))
            .map_err(|e| FlowError::Setup(format!("{}: {e}", store.spec_path(&job).display())))?;
    }
    let mut placed = plan::place(spec, cluster, nodes)?;
    refuse_taken_addresses(cluster, store, spec)?;
    let _lock = store.lock_job(&job, "launch", true)?;
    // A launch that fails leaves no trace of the job in the store.
    let mut undo = LaunchUndo {
        job_dir: store.job_dir(&job),
        armed: true,
    };
    // A secret of the job's processes, for the ones that serve the others
    // (ckpt-rsh, which starts MPI daemons in the job's parts).
    let token = job_token().map_err(|e| FlowError::Setup(format!("/dev/urandom: {e}")))?;
    for p in placed.spec.parts.iter_mut() {
        p.env
            .entry("CKPT_JOB_TOKEN".to_string())
            .or_insert_with(|| token.clone());
    }
    // Output goes where every node sees it, so that a restored part
    // writes on into the same file.
    let out_dir = store.job_dir(&job).join("output");
    for p in placed.spec.parts.iter_mut().filter(|p| p.output.is_none()) {
        p.output = Some(out_dir.join(format!("{}.log", p.name)));
    }
    if placed
        .spec
        .parts
        .iter()
        .any(|p| p.output.as_deref().is_some_and(|o| o.starts_with(&out_dir)))
    {
        std::fs::create_dir_all(&out_dir)
            .map_err(|e| FlowError::Setup(format!("{}: {e}", out_dir.display())))?;
    }
    let spec = placed.spec;

    let t = Instant::now();
    let mut links = Vec::new();
    for o in &placed.orders {
        links.push((o, open(cluster, &o.node)?));
    }
    steps.end("connect", t);
    let spec_path = store.record_spec(&spec)?;

    let t = Instant::now();
    let timeout = cluster.timeouts.freeze;
    let results = parallel(&mut links, |(o, link)| {
        let mut started = Vec::new();
        for name in &o.parts {
            let p = spec.part(name).expect("placed parts are the spec's");
            let agent_job = spec.agent_job_id(name);
            let mut argv = vec![p.command.clone()];
            argv.extend(p.args.iter().cloned());
            let net = p.network.as_ref();
            let req = msg::RunPartRequest {
                job: agent_job.clone(),
                argv,
                env: p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                workdir: p
                    .workdir
                    .as_ref()
                    .map(|w| w.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                output: p
                    .output
                    .as_ref()
                    .map(|w| w.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                hostname: p.hostname.clone(),
                net: p.net,
                bridge: net
                    .map(|_| {
                        cluster
                            .node(&o.node)
                            .map(|n| n.bridge.clone())
                            .unwrap_or_default()
                    })
                    .unwrap_or_default(),
                addresses: net.map(|n| vec![n.address.to_string()]).unwrap_or_default(),
                gateway: net
                    .and_then(|n| n.gateway)
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
                mac: net.map(|n| n.mac.to_string()).unwrap_or_default(),
                mtu: net.and_then(|n| n.mtu).unwrap_or(0),
            };
            match link.call(timeout, Q::Run(req)) {
                Ok(A::Run(r)) => started.push(PartLaunched {
                    part: name.clone(),
                    node: o.node.clone(),
                    agent_job,
                    pid: r.pid,
                    output: p.output.clone(),
                }),
                Ok(other) => {
                    return (
                        started,
                        Err(format!("part {name}: answered run with {other:?}")),
                    )
                }
                Err(e) => return (started, Err(format!("part {name}: {e}"))),
            }
        }
        (started, Ok(()))
    });
    let mut parts = Vec::new();
    let mut failure = None;
    for ((started, r), (o, _)) in results.into_iter().zip(&links) {
        parts.extend(started);
        if let (Err(e), None) = (r, &failure) {
            failure = Some((o.node.clone(), e));
        }
    }
    if let Some((node, reason)) = failure {
        let undone = kill_parts(
            &mut links.iter_mut().map(|(_, l)| l).collect::<Vec<_>>(),
            &parts,
            timeout,
        );
        return Err(FlowError::Node {
            step: "launch",
            node,
            reason,
            undone: format!("{undone}; the job's spec was removed"),
        });
    }
    steps.end("start every part", t);
    undo.armed = false;
    Ok(LaunchReport {
        job,
        spec: spec_path,
        parts,
        steps: steps.done,
        total_ms: ms(t0),
    })
}

/// Refuses a launch whose parts' addresses belong to another job of the
/// store that still runs (or may: its agent cannot say): both would answer
/// for the address, and connections would go to either.
fn refuse_taken_addresses(
    cluster: &Cluster,
    store: &Store,
    spec: &JobSpec,
) -> Result<(), FlowError> {
    let mine: Vec<std::net::IpAddr> = spec
        .parts
        .iter()
        .filter_map(|p| p.network.as_ref().map(|n| n.address.addr))
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    for other in store.jobs()? {
        if other == spec.job {
            continue;
        }
        let Ok(their) = store.job_spec(&other) else {
            continue;
        };
        let shared: Vec<(String, std::net::IpAddr)> = their
            .parts
            .iter()
            .filter_map(|p| {
                let a = p.network.as_ref()?.address.addr;
                mine.contains(&a).then(|| (p.name.clone(), a))
            })
            .collect();
        if shared.is_empty() {
            continue;
        }
        let states = parts_running(cluster, store, &other)?;
        for (part, addr) in shared {
            if let Some(s) = states
                .iter()
                .find(|s| s.part == part && s.running != Some(false))
            {
                return Err(FlowError::Setup(format!(
                    "address {addr} belongs to part {part} of job {other} on node {}, which {}: \
                     give job {} other addresses, or end job {other} first (`ckpt-coord kill {other}`)",
                    s.node,
                    if s.running == Some(true) {
                        "still runs"
                    } else {
                        "may still run (its agent cannot say)"
                    },
                    spec.job
                )));
            }
        }
    }
    Ok(())
}

/// A fresh random job token.
fn job_token() -> std::io::Result<String> {
    Ok(hex::encode(ckpt_proto::rpc::random_bytes::<16>()?))
}

/// Removes what a failed launch made in the store: the job's directory
/// with its spec, lock and empty output directory (output a part wrote
/// before the launch failed stays, and with it the directory).
struct LaunchUndo {
    job_dir: PathBuf,
    armed: bool,
}

impl Drop for LaunchUndo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = std::fs::remove_file(self.job_dir.join(crate::store::JOB_SPEC));
        let _ = std::fs::remove_dir(self.job_dir.join("output"));
        let _ = std::fs::remove_file(self.job_dir.join(crate::store::JOB_LOCK));
        let _ = std::fs::remove_dir(&self.job_dir);
    }
}

/// Kills `parts` through the links to their nodes (best effort) and says
/// what was undone.
fn kill_parts(links: &mut [&mut Link], parts: &[PartLaunched], timeout: Duration) -> String {
    let mut undone = Vec::new();
    for p in parts {
        let Some(link) = links.iter_mut().find(|l| l.node() == p.node) else {
            continue;
        };
        match link.call(
            timeout,
            Q::Kill(msg::KillRequest {
                job: p.agent_job.clone(),
            }),
        ) {
            Ok(_) => undone.push(format!("{}@{}", p.part, p.node)),
            Err(e) => undone.push(format!("{}@{} NOT killed: {e}", p.part, p.node)),
        }
    }
    if undone.is_empty() {
        String::new()
    } else {
        format!("; killed the parts already started: {}", undone.join(", "))
    }
}

/// The checkpoint to restart from: `id`, or the newest.
fn pick(store: &Store, job: &str, id: Option<&str>) -> Result<Checkpoint, FlowError> {
    Ok(match id {
        Some(id) => store.open(job, &id.parse()?)?,
        None => store.latest(job)?.ok_or_else(|| {
            FlowError::Setup(format!(
                "job {job} has no committed checkpoint in {}",
                store.root().display()
            ))
        })?,
    })
}

/// A part's images as its target node sees them.
#[derive(Debug, Clone)]
struct PartImages {
    /// The store's directory, or where they were streamed to.
    dir: PathBuf,
    streamed_bytes: u64,
}

/// Largest chunk of a streamed image file (frames carry at most 16 MiB).
const CHUNK: usize = 4 << 20;

/// Streams the files of part `part` of `cp`, as its manifest lists them,
/// to the agent at `link`; returns where the agent keeps them and the
/// bytes sent. The agent checks every file against its SHA-256.
fn stream_part(
    link: &mut Link,
    cp: &Checkpoint,
    part: &str,
    timeout: Duration,
) -> Result<(PathBuf, u64), String> {
    use std::io::Read;
    let mp = cp
        .manifest
        .parts
        .iter()
        .find(|p| p.name == part)
        .ok_or_else(|| format!("part {part} is not in the manifest"))?;
    let src = cp.part_dir(part);
    let mut dir = PathBuf::new();
    let mut sent = 0u64;
    for f in &mp.files {
        let path = src.join(&f.name);
        let mut file =
            std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK];
            let mut n = 0;
            while n < CHUNK {
                match file.read(&mut data[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                }
            }
            data.truncate(n);
            let last = offset + n as u64 >= f.size;
            let r = link.call(
                timeout,
                Q::PutFile(msg::PutFileRequest {
                    checkpoint: cp.label(),
                    part: part.to_string(),
                    name: f.name.clone(),
                    offset,
                    data,
                    last,
                    sha256: if last { f.sha256.clone() } else { Vec::new() },
                }),
            )?;
            match r {
                A::PutFile(p) => dir = PathBuf::from(p.dir),
                other => return Err(format!("answered put-file with {other:?}")),
            }
            offset += n as u64;
            sent += n as u64;
            if last {
                break;
            }
            if n == 0 {
                return Err(format!(
                    "{}: shorter ({offset} bytes) than the manifest says ({})",
                    path.display(),
                    f.size
                ));
            }
        }
    }
    Ok((dir, sent))
}

/// Asks the node at `link` whether it can restore part `p` of `cp`. A node
/// that cannot see the store gets the part's images streamed first when
/// `stream` (a restart), and is asked again about its copy; without
/// `stream` (a check) that is noted instead.
fn check_part(
    link: &mut Link,
    cp: &Checkpoint,
    p: &plan::PartRestore,
    timeout: Duration,
    stream: bool,
) -> (Result<PartImages, Vec<String>>, Option<String>) {
    let ask = |link: &mut Link, dir: &std::path::Path| {
        link.call(
            timeout,
            Q::Check(msg::CheckRequest {
                images: dir.to_string_lossy().into_owned(),
                compat_only: false,
            }),
        )
    };
    let mut images = PartImages {
        dir: p.images.clone(),
        streamed_bytes: 0,
    };
    let mut note = None;
    let mut answer = ask(link, &images.dir);
    if let Ok(A::Check(c)) = &answer {
        if c.images_missing && !stream {
            note = Some(format!(
                "part {}: this node does not see the checkpoint store; a restart streams the \
                 images to it, and checks them there",
                p.part
            ));
            return (Ok(images), note);
        }
        if c.images_missing {
            match stream_part(link, cp, &p.part, timeout) {
                Ok((dir, bytes)) => {
                    note = Some(format!(
                        "part {}: {bytes} bytes of images streamed (this node does not see the store)",
                        p.part
                    ));
                    images = PartImages {
                        dir,
                        streamed_bytes: bytes,
                    };
                    answer = ask(link, &images.dir);
                }
                Err(e) => {
                    return (
                        Err(vec![format!(
                        "part {}: it does not see the store, and streaming the images failed: {e}",
                        p.part
                    )]),
                        None,
                    )
                }
            }
        }
    }
    let r = match answer {
        Ok(A::Check(c)) if c.ok => Ok(images),
        Ok(A::Check(c)) => Err(c
            .missing
            .into_iter()
            .map(|m| format!("part {}: {m}", p.part))
            .collect()),
        Ok(other) => Err(vec![format!("answered check with {other:?}")]),
        Err(e) => Err(vec![e]),
    };
    (r, note)
}

/// Asks every node of `plan` whether it can restore its parts (links in
/// plan order, nodes in parallel; see [`check_part`]); each node's verdict
/// with the images of its parts as it sees them.
fn check_plan(
    cp: &Checkpoint,
    plan: &RestartPlan,
    links: &mut [Link],
    timeout: Duration,
    stream: bool,
) -> Vec<(NodeCheck, Vec<PartImages>)> {
    let mut pairs: Vec<(&plan::RestoreOrder, &mut Link)> =
        plan.orders.iter().zip(links.iter_mut()).collect();
    parallel(&mut pairs, |(o, link)| {
        let mut missing = Vec::new();
        let mut notes = Vec::new();
        let mut images = Vec::new();
        for p in &o.parts {
            let (r, note) = check_part(link, cp, p, timeout, stream);
            notes.extend(note);
            match r {
                Ok(i) => images.push(i),
                Err(m) => missing.extend(m),
            }
        }
        (
            NodeCheck {
                node: o.node.clone(),
                parts: o.parts.iter().map(|p| p.part.clone()).collect(),
                ok: missing.is_empty(),
                missing,
                notes,
            },
            images,
        )
    })
}

/// Restarts job `job` from checkpoint `checkpoint` (default: the newest)
/// on `nodes` (default: its own): verifies the checkpoint in full, checks
/// every target node can restore its parts and refuses before restoring
/// anything if one cannot, restores every part held (frozen, its network
/// blocked), nodes in parallel, and then releases them all at once. If a
/// part cannot be restored, the parts already restored are killed: a
/// failed restart leaves nothing half alive. The job's recorded spec then
/// names the nodes its parts run on.
pub fn restart(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    checkpoint: Option<&str>,
    nodes: Option<&[String]>,
    pack: bool,
    on_step: OnStep<'_>,
) -> Result<RestartReport, FlowError> {
    let _lock = store.lock_job(job, "restart", false)?;
    restart_locked(cluster, store, job, checkpoint, nodes, pack, on_step)
}

pub(crate) fn restart_locked(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    checkpoint: Option<&str>,
    nodes: Option<&[String]>,
    pack: bool,
    on_step: OnStep<'_>,
) -> Result<RestartReport, FlowError> {
    let t0 = Instant::now();
    let mut steps = Steps {
        done: Vec::new(),
        on_step,
    };
    let cp = pick(store, job, checkpoint)?;
    let t = Instant::now();
    cp.verify(crate::link::signer(cluster).as_deref(), Verify::Full)?;
    steps.end("verify", t);
    let plan: RestartPlan = plan::plan_restart(&cp, cluster, nodes, pack)?;
    let tcp = cp.options().tcp_established;

    let t = Instant::now();
    let mut links = Vec::new();
    for o in &plan.orders {
        let mut l = open(cluster, &o.node)?;
        // Root restarting a user's checkpoint acts as that user: its
        // manifest, signed for the user, vouches for nothing the user could
        // not have written, so the agents check the images as for the user
        // (written by agents, of the user's own processes).
        if l.uid() == 0 && cp.manifest.owner_uid != 0 {
            l.act_for(cp.manifest.owner_uid);
        }
        links.push(l);
    }
    steps.end("connect", t);

    // Every node checked before any restores: a refusal leaves nothing
    // half restarted.
    let t = Instant::now();
    let timeouts = cluster.timeouts;
    let check_timeout = timeouts.connect.max(Duration::from_secs(30));
    // Streaming images to a node that cannot see the store takes as long
    // as copying them: the restore's deadline.
    let checked = check_plan(
        &cp,
        &plan,
        &mut links,
        timeouts.restore.max(check_timeout),
        true,
    );
    let refused: Vec<String> = checked
        .iter()
        .filter(|(c, _)| !c.ok)
        .map(|(c, _)| {
            format!(
                "node {} cannot restore it: {}",
                c.node,
                c.missing.join("; ")
            )
        })
        .collect();
    if !refused.is_empty() {
        return Err(FlowError::NotRestorable {
            checkpoint: cp.label(),
            reasons: refused.join("; "),
        });
    }
    let streamed = checked
        .iter()
        .any(|(_, i)| i.iter().any(|i| i.streamed_bytes > 0));
    let images: Vec<Vec<PartImages>> = checked.into_iter().map(|(_, i)| i).collect();
    steps.end(
        if streamed {
            "check every node (images streamed)"
        } else {
            "check every node"
        },
        t,
    );

    let t = Instant::now();
    let mut pairs: Vec<(&plan::RestoreOrder, &mut Link, &Vec<PartImages>)> = plan
        .orders
        .iter()
        .zip(links.iter_mut())
        .zip(&images)
        .map(|((o, l), i)| (o, l, i))
        .collect();
    let results = parallel(&mut pairs, |(o, link, images)| {
        let mut out = Vec::new();
        for (p, img) in o.parts.iter().zip(images.iter()) {
            let r = link.call(
                timeouts.restore,
                Q::Restore(msg::RestorePartRequest {
                    images: img.dir.to_string_lossy().into_owned(),
                    job: p.agent_job.clone(),
                    tcp_established: tcp,
                    ext_unix_sk: false,
                    bridge: o.bridge.clone(),
                    hold: true,
                    lazy_pages: false,
                }),
            );
            match r {
                Ok(A::Restore(r)) => out.push((
                    p.agent_job.clone(),
                    PartRestored {
                        part: p.part.clone(),
                        node: o.node.clone(),
                        pid: r.pid,
                        restore_ms: r.restore_ms,
                        streamed_bytes: img.streamed_bytes,
                    },
                )),
                Ok(other) => {
                    return (
                        out,
                        Err(format!("part {}: answered restore with {other:?}", p.part)),
                    )
                }
                Err(e) => return (out, Err(format!("part {}: {e}", p.part))),
            }
        }
        (out, Ok(()))
    });
    let mut restored: Vec<(String, PartRestored)> = Vec::new();
    let mut failures = Vec::new();
    for ((done, r), o) in results.into_iter().zip(&plan.orders) {
        restored.extend(done);
        if let Err(e) = r {
            failures.push((o.node.clone(), e));
        }
    }
    if let Some((node, reason)) = failures.first().cloned() {
        let undone = kill_restored(&mut links, &restored, timeouts.freeze);
        let more: Vec<String> = failures[1..]
            .iter()
            .map(|(n, e)| format!("node {n}: {e}"))
            .collect();
        return Err(FlowError::Node {
            step: "restore",
            node,
            reason: if more.is_empty() {
                reason
            } else {
                format!("{reason}; also {}", more.join("; "))
            },
            undone,
        });
    }
    steps.end("restore (held)", t);

    // Every part exists, frozen: let them all go.
    let t = Instant::now();
    let mut per_link: Vec<(&mut Link, Vec<String>)> = links
        .iter_mut()
        .map(|l| {
            let jobs = restored
                .iter()
                .filter(|(_, p)| p.node == l.node())
                .map(|(j, _)| j.clone())
                .collect();
            (l, jobs)
        })
        .collect();
    let released = parallel(&mut per_link, |(link, jobs)| {
        let node = link.node().to_string();
        match link.call(
            timeouts.freeze,
            Q::Release(msg::ReleaseRequest { jobs: jobs.clone() }),
        ) {
            Ok(A::Release(_)) => Ok(()),
            Ok(other) => Err((node, format!("answered release with {other:?}"))),
            Err(e) => Err((node, e)),
        }
    });
    if let Some(Err((node, reason))) = released.into_iter().find(|r| r.is_err()) {
        // Some parts may run, others not: a job in pieces is worse than
        // none, and the checkpoint is still there.
        let undone = kill_restored(&mut links, &restored, timeouts.freeze);
        return Err(FlowError::Node {
            step: "release",
            node,
            reason,
            undone,
        });
    }
    steps.end("release every part", t);

    // Later checkpoints find the parts where they now run.
    let mut spec = cp.spec()?;
    let moved: HashMap<&str, &str> = restored
        .iter()
        .map(|(_, p)| (p.part.as_str(), p.node.as_str()))
        .collect();
    for p in spec.parts.iter_mut() {
        if let Some(n) = moved.get(p.name.as_str()) {
            p.node = Some(n.to_string());
        }
    }
    store.record_spec(&spec).map_err(|e| {
        FlowError::Setup(format!(
            "job {job} was restarted and runs, but its recorded spec could not be updated with \
             its new nodes (a checkpoint would look for it where it was): {e}"
        ))
    })?;
    Ok(RestartReport {
        job: job.to_string(),
        checkpoint: cp.id.clone(),
        mapping: plan.mapping.clone(),
        parts: restored.into_iter().map(|(_, p)| p).collect(),
        steps: steps.done,
        total_ms: ms(t0),
    })
}

/// Kills restored parts (best effort; their agents kill held parts when
/// the links end anyway) and says what was undone.
fn kill_restored(
    links: &mut [Link],
    restored: &[(String, PartRestored)],
    timeout: Duration,
) -> String {
    let parts: Vec<PartLaunched> = restored
        .iter()
        .map(|(j, p)| PartLaunched {
            part: p.part.clone(),
            node: p.node.clone(),
            agent_job: j.clone(),
            pid: p.pid,
            output: None,
        })
        .collect();
    let mut refs: Vec<&mut Link> = links.iter_mut().collect();
    let undone = kill_parts(&mut refs, &parts, timeout);
    if undone.is_empty() {
        "; nothing was restored".into()
    } else {
        format!("{undone}; nothing of the job runs, its checkpoint is intact")
    }
}

/// Checks `nodes` (default: every node of the cluster) by their agents'
/// kernel probes, or, with `checkpoint`, whether they can restore it (its
/// nodes mapped onto `nodes` as a restart would).
pub fn check(
    cluster: &Cluster,
    store: &Store,
    nodes: Option<&[String]>,
    checkpoint: Option<&str>,
    pack: bool,
) -> Result<Vec<NodeCheck>, FlowError> {
    let timeout = cluster.timeouts.connect.max(Duration::from_secs(30));
    if let Some(name) = checkpoint {
        let cp = store.find(name)?;
        cp.verify(crate::link::signer(cluster).as_deref(), Verify::Full)?;
        let plan = plan::plan_restart(&cp, cluster, nodes, pack)?;
        let mut links = Vec::new();
        let mut unreachable = Vec::new();
        let mut orders = Vec::new();
        for o in &plan.orders {
            match Link::open(cluster, &o.node) {
                Ok(l) => {
                    links.push(l);
                    orders.push(o.clone());
                }
                Err(e) => unreachable.push(NodeCheck {
                    node: o.node.clone(),
                    parts: o.parts.iter().map(|p| p.part.clone()).collect(),
                    ok: false,
                    missing: vec![format!("cannot reach its agent: {e}")],
                    notes: Vec::new(),
                }),
            }
        }
        let reachable = RestartPlan {
            orders,
            ..plan.clone()
        };
        let mut out: Vec<NodeCheck> = check_plan(&cp, &reachable, &mut links, timeout, false)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        out.extend(unreachable);
        return Ok(out);
    }
    let names: Vec<String> = match nodes {
        Some(n) => n.to_vec(),
        None => cluster.nodes.iter().map(|n| n.name.clone()).collect(),
    };
    for n in &names {
        cluster
            .require_node(n)
            .map_err(|e| FlowError::Setup(e.to_string()))?;
    }
    let mut items: Vec<String> = names;
    Ok(parallel(&mut items, |node| {
        let answer = Link::open(cluster, node).and_then(|mut l| {
            l.call(
                timeout,
                Q::Check(msg::CheckRequest {
                    images: String::new(),
                    compat_only: false,
                }),
            )
        });
        let missing = match answer {
            Ok(A::Check(c)) if c.ok => Vec::new(),
            Ok(A::Check(c)) => c.missing,
            Ok(other) => vec![format!("answered check with {other:?}")],
            Err(e) => vec![e],
        };
        NodeCheck {
            node: node.clone(),
            parts: Vec::new(),
            ok: missing.is_empty(),
            missing,
            notes: Vec::new(),
        }
    }))
}

/// Where each part of a job runs, as its node's agent sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PartState {
    pub part: String,
    pub node: String,
    /// Some process of the part runs there; None: its agent could not say.
    pub running: Option<bool>,
    /// Why the agent could not say.
    pub error: Option<String>,
}

/// Asks the agents of the nodes job `job`'s recorded spec names whether
/// its parts run there.
pub fn parts_running(
    cluster: &Cluster,
    store: &Store,
    job: &str,
) -> Result<Vec<PartState>, FlowError> {
    let spec = store.job_spec(job)?;
    let mut by_node: Vec<(String, Vec<String>)> = Vec::new();
    for p in &spec.parts {
        let node = p.node.clone().unwrap_or_default();
        match by_node.iter_mut().find(|(n, _)| *n == node) {
            Some((_, parts)) => parts.push(p.name.clone()),
            None => by_node.push((node, vec![p.name.clone()])),
        }
    }
    let timeout = cluster.timeouts.connect.max(Duration::from_secs(10));
    let answers = parallel(&mut by_node, |(node, parts)| {
        let jobs: Vec<String> = parts.iter().map(|p| spec.agent_job_id(p)).collect();
        let r = Link::open(cluster, node).and_then(|mut l| {
            l.call(
                timeout,
                Q::Status(msg::StatusRequest { jobs: jobs.clone() }),
            )
        });
        parts
            .iter()
            .zip(&jobs)
            .map(|(p, j)| {
                let (running, error) = match &r {
                    Ok(A::Status(s)) => (Some(s.running.contains(j)), None),
                    Ok(other) => (None, Some(format!("answered status with {other:?}"))),
                    Err(e) => (None, Some(e.clone())),
                };
                PartState {
                    part: p.clone(),
                    node: node.clone(),
                    running,
                    error,
                }
            })
            .collect::<Vec<_>>()
    });
    Ok(answers.into_iter().flatten().collect())
}

/// Waits until no part of job `job` runs any more (every agent says so),
/// polling every `every`; gives up after `timeout`. An agent that cannot
/// be asked counts as "still running": the job is not known to be over.
pub fn wait(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    every: Duration,
    timeout: Option<Duration>,
) -> Result<Vec<PartState>, FlowError> {
    let t0 = Instant::now();
    loop {
        let states = parts_running(cluster, store, job)?;
        if states.iter().all(|s| s.running == Some(false)) {
            return Ok(states);
        }
        if timeout.is_some_and(|t| t0.elapsed() >= t) {
            let left: Vec<String> = states
                .iter()
                .filter(|s| s.running != Some(false))
                .map(|s| match &s.error {
                    Some(e) => format!("{}@{} (unknown: {e})", s.part, s.node),
                    None => format!("{}@{}", s.part, s.node),
                })
                .collect();
            return Err(FlowError::Setup(format!(
                "job {job} still runs after {:?}: {}",
                t0.elapsed(),
                left.join(", ")
            )));
        }
        std::thread::sleep(every);
    }
}

/// Kills every part of job `job` on its node (the Kill request: every
/// process of the part, its cgroup, a network lock kept for it); parts
/// already gone are fine. Its checkpoints stay. Errors name the parts
/// that could not be killed.
pub fn kill(cluster: &Cluster, store: &Store, job: &str) -> Result<Vec<PartState>, FlowError> {
    let spec = store.job_spec(job)?;
    let timeout = cluster.timeouts.freeze;
    let mut parts: Vec<(String, String, String)> = spec
        .parts
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.node.clone().unwrap_or_default(),
                spec.agent_job_id(&p.name),
            )
        })
        .collect();
    let results = parallel(&mut parts, |(part, node, agent_job)| {
        let r = Link::open(cluster, node).and_then(|mut l| {
            l.call(
                timeout,
                Q::Kill(msg::KillRequest {
                    job: agent_job.clone(),
                }),
            )
        });
        PartState {
            part: part.clone(),
            node: node.clone(),
            running: r.as_ref().ok().map(|_| false),
            error: r.err(),
        }
    });
    let failed: Vec<String> = results
        .iter()
        .filter_map(|p| {
            p.error
                .as_ref()
                .map(|e| format!("{}@{}: {e}", p.part, p.node))
        })
        .collect();
    if !failed.is_empty() {
        return Err(FlowError::Setup(format!(
            "job {job}: could not kill {}",
            failed.join("; ")
        )));
    }
    Ok(results)
}
