//! The coordinator driving the node agents (`ckpt-agent serve`) over the
//! wire protocol (docs/PROTOCOL.md): a job's checkpoint in its phases and
//! its restart from a checkpoint.
//!
//! One connection per part: an agent keeps a part's dump session on the
//! connection that prepared it (ptrace wants one thread per stopped task),
//! and aborts it when that connection ends, so dropping the connections is
//! itself the abort of last resort. Each connection is used by one thread
//! at a time, borrowed whole into a scoped thread for the parallel phases.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_proto::image::CheckpointOptions;
use ckpt_proto::rpc::msg::{self, request::Body as Q, response::Body as A};
use ckpt_proto::rpc::{Channel, RpcError};
use serde::Serialize;

use crate::config::{AgentAddr, Cluster};
use crate::jobspec::JobSpec;
use crate::plan::{self, RestartPlan};
use crate::store::{CheckpointId, DumpedPart, Pruned, Store, StoreError, Verify};

/// Why a checkpoint or restart did not happen (or not in full); every
/// variant that concerns a node names it.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("{0}")]
    Setup(String),
    /// A node failed a step; nothing was committed or restored.
    #[error("{step} failed on node {node}: {reason}{aborted}")]
    Node {
        step: &'static str,
        node: String,
        reason: String,
        /// What the coordinator undid because of it.
        aborted: String,
    },
    /// A restart refused before anything was restored.
    #[error("restart of {checkpoint} refused before restoring anything: {reasons}")]
    NotRestorable { checkpoint: String, reasons: String },
    /// The checkpoint is committed, but a node did not finish its part.
    #[error("checkpoint {checkpoint} is committed, but {reasons}")]
    AfterCommit { checkpoint: String, reasons: String },
}

/// One timed step of a checkpoint or restart.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    pub ms: f64,
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
}

/// A restart, as `ckpt-coord restart` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    pub job: String,
    pub checkpoint: CheckpointId,
    pub parts: Vec<PartRestored>,
    pub steps: Vec<Step>,
    pub total_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The uid requests are made for: the agents let a user act only on their
/// own jobs. Read from /proc so that no unsafe libc call is needed.
fn my_uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self").expect("/proc/self is readable"),
    )
}

fn agent_addr(cluster: &Cluster, node: &str) -> Result<String, FlowError> {
    let n = cluster
        .require_node(node)
        .map_err(|e| FlowError::Setup(e.to_string()))?;
    match &n.agent {
        AgentAddr::Tcp { .. } => Ok(n.agent.to_string()),
        AgentAddr::InProcess => Err(FlowError::Setup(format!(
            "node {node} has the in-process agent of a local-only cluster, which is not \
             wired yet: configure the cluster with `ckpt-agent serve` agents (docs/OPERATIONS.md)"
        ))),
    }
}

fn connect(cluster: &Cluster, node: &str) -> Result<Channel, FlowError> {
    let key = cluster.key.as_ref().ok_or_else(|| {
        FlowError::Setup(format!(
            "the cluster configuration {} has no key: agents take orders only from a \
             coordinator that holds the cluster key",
            cluster.describe_source()
        ))
    })?;
    let addr = agent_addr(cluster, node)?;
    Channel::connect(&addr, key.rpc(), cluster.timeouts.connect).map_err(|e| FlowError::Node {
        step: "connect",
        node: node.to_string(),
        reason: e.to_string(),
        aborted: String::new(),
    })
}

/// A request with a deadline: a hung agent is an error naming its node.
fn call(ch: &mut Channel, timeout: Duration, body: Q) -> Result<Option<A>, RpcError> {
    ch.set_timeout(Some(timeout))?;
    ch.call(my_uid(), body)
}

/// One part's connection during a checkpoint.
struct Dumping {
    part: String,
    node: String,
    agent_job: String,
    images: PathBuf,
    ch: Channel,
    session: Option<u64>,
    report: PartDump,
}

/// Runs `f` on every connection at once, one scoped thread each, and
/// returns the first failure (by part order) with its node.
fn on_all<T: Send>(
    conns: &mut [Dumping],
    f: impl Fn(&mut Dumping) -> Result<T, String> + Sync,
) -> Result<Vec<T>, (String, String)> {
    let results: Vec<(String, Result<T, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .map(|c| {
                let f = &f;
                s.spawn(move || (c.node.clone(), f(c)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a coordinator thread panicked"))
            .collect()
    });
    let mut out = Vec::new();
    for (node, r) in results {
        out.push(r.map_err(|e| (node, e))?);
    }
    Ok(out)
}

/// Undoes every prepared session (best effort: an agent whose connection
/// ends aborts on its own) and names what was undone.
fn abort_all(conns: &mut [Dumping], timeout: Duration) -> String {
    let mut undone = Vec::new();
    for c in conns.iter_mut() {
        if let Some(session) = c.session.take() {
            if let Err(e) = call(&mut c.ch, timeout, Q::Abort(msg::AbortRequest { session })) {
                tracing::warn!(node = %c.node, part = %c.part, "abort: {e} (the connection's end aborts it)");
            }
            undone.push(format!("{}@{}", c.part, c.node));
        }
    }
    if undone.is_empty() {
        String::new()
    } else {
        format!(
            "; aborted, running on as before: {} (nothing was committed)",
            undone.join(", ")
        )
    }
}

/// Whether part parts of `spec` have a network namespace of their own, so
/// that their established TCP connections are theirs to checkpoint.
fn tcp_established(spec: &JobSpec) -> bool {
    spec.parts.iter().any(|p| p.net || p.network.is_some())
}

/// Checkpoints every part of job `job` at once (BRIEF §6): every node
/// freezes its part and locks its network (barrier), every node dumps in
/// parallel, the manifest is committed, then every node stops its part
/// (`stop`) or lets it run on. A failure before the commit aborts on
/// every node and leaves no checkpoint.
pub fn checkpoint(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    stop: bool,
) -> Result<CheckpointReport, FlowError> {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let spec = store.job_spec(job)?;
    let tcp = tcp_established(&spec);
    let pending = store.begin(job)?;

    let t = Instant::now();
    let mut conns = Vec::new();
    for p in &spec.parts {
        let node = p.node.clone().ok_or_else(|| {
            FlowError::Setup(format!(
                "part {} of job {job} has no node in its recorded spec",
                p.name
            ))
        })?;
        let ch = connect(cluster, &node)?;
        conns.push(Dumping {
            images: pending.part_dir(&p.name)?,
            agent_job: spec.agent_job_id(&p.name),
            part: p.name.clone(),
            node: node.clone(),
            ch,
            session: None,
            report: PartDump {
                part: p.name.clone(),
                node,
                images: PathBuf::new(),
                prepare_ms: 0.0,
                dump_ms: 0.0,
                frozen_ms: 0.0,
            },
        });
    }
    steps.push(Step {
        step: "connect".into(),
        ms: ms(t),
    });

    // Phase 1, the barrier: every part frozen and locked before any dump.
    let t = Instant::now();
    let timeouts = cluster.timeouts;
    let prepared = on_all(&mut conns, |c| {
        let r = call(
            &mut c.ch,
            timeouts.freeze,
            Q::Prepare(msg::PrepareRequest {
                job: c.agent_job.clone(),
                pid: 0,
                images: c.images.to_string_lossy().into_owned(),
                tcp_established: tcp,
                ext_unix_sk: false,
            }),
        )
        .map_err(|e| e.to_string())?;
        match r {
            Some(A::Prepare(p)) => {
                c.session = Some(p.session);
                c.report.prepare_ms = p.prepare_ms;
                Ok(())
            }
            other => Err(format!("answered prepare with {other:?}")),
        }
    });
    if let Err((node, reason)) = prepared {
        let aborted = abort_all(&mut conns, timeouts.freeze);
        return Err(FlowError::Node {
            step: "prepare",
            node,
            reason,
            aborted,
        });
    }
    steps.push(Step {
        step: "prepare (all frozen and locked)".into(),
        ms: ms(t),
    });

    // Phase 2: every part dumps, in parallel.
    let t = Instant::now();
    let dumped = on_all(&mut conns, |c| {
        let session = c.session.expect("prepared");
        match call(
            &mut c.ch,
            timeouts.dump,
            Q::Dump(msg::DumpPartRequest { session }),
        )
        .map_err(|e| e.to_string())?
        {
            Some(A::Dump(d)) => {
                c.report.dump_ms = d.dump_ms;
                Ok(())
            }
            other => Err(format!("answered dump with {other:?}")),
        }
    });
    if let Err((node, reason)) = dumped {
        let aborted = abort_all(&mut conns, timeouts.freeze);
        return Err(FlowError::Node {
            step: "dump",
            node,
            reason,
            aborted,
        });
    }
    steps.push(Step {
        step: "dump".into(),
        ms: ms(t),
    });

    // The commit: from here on the checkpoint exists.
    let t = Instant::now();
    let parts: Vec<DumpedPart> = conns
        .iter()
        .map(|c| DumpedPart {
            name: c.part.clone(),
            node: c.node.clone(),
        })
        .collect();
    let options = CheckpointOptions {
        leave_running: !stop,
        tcp_established: tcp,
    };
    let cp = match pending.commit(&spec, &parts, options, cluster.key.as_ref()) {
        Ok(cp) => cp,
        Err(e) => {
            let aborted = abort_all(&mut conns, timeouts.freeze);
            return Err(FlowError::Setup(format!("{e}{aborted}")));
        }
    };
    steps.push(Step {
        step: "commit".into(),
        ms: ms(t),
    });

    // Phase 3: every part stops or runs on.
    let t = Instant::now();
    let finished: Vec<(String, Result<(), String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    let session = c.session.take().expect("prepared");
                    let r = match call(
                        &mut c.ch,
                        timeouts.freeze,
                        Q::Finish(msg::FinishRequest { session, stop }),
                    ) {
                        Ok(Some(A::Finish(f))) => {
                            c.report.frozen_ms = f.frozen_ms;
                            Ok(())
                        }
                        Ok(other) => Err(format!("answered finish with {other:?}")),
                        Err(e) => Err(e.to_string()),
                    };
                    (format!("{}@{}", c.part, c.node), r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a coordinator thread panicked"))
            .collect()
    });
    steps.push(Step {
        step: if stop {
            "finish (stop)"
        } else {
            "finish (run on)"
        }
        .into(),
        ms: ms(t),
    });
    let pruned: Pruned = store.prune(job, cluster.keep)?;
    let failures: Vec<String> = finished
        .into_iter()
        .filter_map(|(who, r)| r.err().map(|e| format!("{who}: {e}")))
        .collect();
    if !failures.is_empty() {
        return Err(FlowError::AfterCommit {
            checkpoint: cp.label(),
            reasons: format!("finishing failed: {}", failures.join("; ")),
        });
    }
    Ok(CheckpointReport {
        job: job.to_string(),
        checkpoint: cp.id.clone(),
        dir: cp.dir.clone(),
        stopped: stop,
        tcp_established: tcp,
        parts: conns
            .into_iter()
            .map(|c| PartDump {
                images: c.images,
                ..c.report
            })
            .collect(),
        steps,
        total_ms: ms(t0),
        pruned: pruned.removed,
    })
}

/// Restarts job `job` from checkpoint `checkpoint` (default: the newest)
/// on `nodes` (default: its own): verifies the checkpoint in full, checks
/// every target node can restore its parts and refuses before restoring
/// anything if one cannot, then restores every node's parts, nodes in
/// parallel.
pub fn restart(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    checkpoint: Option<&str>,
    nodes: Option<&[String]>,
    pack: bool,
) -> Result<RestartReport, FlowError> {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let cp = match checkpoint {
        Some(id) => store.open(job, &id.parse()?)?,
        None => store.latest(job)?.ok_or_else(|| {
            FlowError::Setup(format!(
                "job {job} has no committed checkpoint in {}",
                store.root().display()
            ))
        })?,
    };
    let t = Instant::now();
    cp.verify(cluster.key.as_ref(), Verify::Full)?;
    steps.push(Step {
        step: "verify".into(),
        ms: ms(t),
    });
    let plan: RestartPlan = plan::plan_restart(&cp, cluster, nodes, pack)?;
    let tcp = cp.options().tcp_established;

    let t = Instant::now();
    let mut conns = Vec::new();
    for o in &plan.orders {
        conns.push((o, connect(cluster, &o.node)?));
    }
    steps.push(Step {
        step: "connect".into(),
        ms: ms(t),
    });

    // Every node checked before any restores: a refusal leaves nothing
    // half restarted.
    let t = Instant::now();
    let timeouts = cluster.timeouts;
    let mut missing = Vec::new();
    for (o, ch) in conns.iter_mut() {
        for p in &o.parts {
            let images = p.images.to_string_lossy().into_owned();
            match call(
                ch,
                timeouts.connect.max(Duration::from_secs(30)),
                Q::Check(msg::CheckRequest { images }),
            ) {
                Ok(Some(A::Check(c))) if c.ok => {}
                Ok(Some(A::Check(c))) => missing.push(format!(
                    "node {} cannot restore part {}: {}",
                    o.node,
                    p.part,
                    c.missing.join("; ")
                )),
                Ok(other) => missing.push(format!("node {} answered check with {other:?}", o.node)),
                Err(e) => missing.push(format!("node {}: {e}", o.node)),
            }
        }
    }
    if !missing.is_empty() {
        return Err(FlowError::NotRestorable {
            checkpoint: cp.label(),
            reasons: missing.join("; "),
        });
    }
    steps.push(Step {
        step: "check".into(),
        ms: ms(t),
    });

    let t = Instant::now();
    let results: Vec<Result<Vec<PartRestored>, (String, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .map(|(o, ch)| {
                let o = *o;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for p in &o.parts {
                        let r = call(
                            ch,
                            timeouts.restore,
                            Q::Restore(msg::RestorePartRequest {
                                images: p.images.to_string_lossy().into_owned(),
                                job: p.agent_job.clone(),
                                tcp_established: tcp,
                                ext_unix_sk: false,
                                bridge: o.bridge.clone(),
                            }),
                        );
                        match r {
                            Ok(Some(A::Restore(r))) => out.push(PartRestored {
                                part: p.part.clone(),
                                node: o.node.clone(),
                                pid: r.pid,
                                restore_ms: r.restore_ms,
                            }),
                            Ok(other) => {
                                return Err((
                                    o.node.clone(),
                                    format!("part {}: answered restore with {other:?}", p.part),
                                ))
                            }
                            Err(e) => {
                                return Err((o.node.clone(), format!("part {}: {e}", p.part)))
                            }
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a coordinator thread panicked"))
            .collect()
    });
    let mut parts = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(p) => parts.extend(p),
            Err((node, e)) => failures.push(format!("node {node}: {e}")),
        }
    }
    if !failures.is_empty() {
        let done: Vec<String> = parts
            .iter()
            .map(|p| format!("{}@{} (pid {})", p.part, p.node, p.pid))
            .collect();
        return Err(FlowError::Setup(format!(
            "restore of {} failed: {}{}",
            cp.label(),
            failures.join("; "),
            if done.is_empty() {
                String::new()
            } else {
                format!("; restored nonetheless: {}", done.join(", "))
            }
        )));
    }
    steps.push(Step {
        step: "restore".into(),
        ms: ms(t),
    });
    Ok(RestartReport {
        job: job.to_string(),
        checkpoint: cp.id.clone(),
        parts,
        steps,
        total_ms: ms(t0),
    })
}
