//! `ckpt-coord migrate`: moving a running job to other nodes.
//!
//! By default the move is streamed and live (iterative pre-copy): each
//! source node's agent streams its part's memory straight into an inbox of
//! the target node's agent while the part runs on (a pre-dump, its writes
//! tracked from then on), then again only what changed, round after round
//! while that shrinks; then every part is frozen together (the barrier of a
//! checkpoint), only the last changes are streamed, the targets are checked
//! against what was dumped, the sources stop their parts, and the targets
//! restore them held and release them together. Nothing touches the source
//! nodes' disks or the checkpoint store, and the job stands still only for
//! the final increment and the restore.
//!
//! Until the sources stop their parts, any failure aborts and the job runs
//! on where it was. A restore that fails on a target after that sends the
//! streamed chain back to the source agents, which restore it there.
//!
//! `--via-store` moves the job through a committed checkpoint instead
//! (checkpoint --stop, restart elsewhere), leaving that checkpoint behind.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_proto::rpc::msg::{self, request::Body as Q, response::Body as A};
use serde::Serialize;

use crate::config::{AgentAddr, Cluster};
use crate::flow::{
    aborted, check, checkpoint_locked, confirm_sessions, dump_all, finish_part, ms, on_all, open,
    parallel, prepare_all, recorded_node, restart_locked, tcp_established, CheckpointReport,
    Dumping, End, Finish, FlowError, OnStep, PartDump, PartRestored, RestartReport, Step, Steps,
};
use crate::link::Link;
use crate::plan::{self, RestoreOrder};
use crate::store::Store;

/// How `migrate` moves a job.
#[derive(Debug, Clone, Copy)]
pub struct MigrateHow {
    /// Through a committed checkpoint in the store (checkpoint --stop,
    /// then restart), instead of streaming between the agents.
    pub via_store: bool,
    /// Most pre-copy rounds before the final freeze (0: the final dump
    /// streams everything, frozen).
    pub rounds: u32,
    /// How the streamed levels store their page content.
    pub compress: ckpt_agent::pages::Codec,
    /// Post-copy: the final level's pages stay on the source nodes (held
    /// by their agents, copied there while frozen instead of streamed),
    /// and the targets restore lazily: the job runs again as soon as its
    /// parts exist, their memory served on demand from the inboxes and,
    /// for the last changes, fetched from the sources, the rest copied in
    /// the background (a target or source that fails meanwhile kills the
    /// part: the job is then lost, as with any post-copy move).
    pub lazy: bool,
}

impl Default for MigrateHow {
    fn default() -> Self {
        MigrateHow {
            via_store: false,
            rounds: 4,
            compress: Default::default(),
            lazy: false,
        }
    }
}

/// Pre-copy ends once a round streams less than this: the final increment
/// would not get much smaller.
const ROUND_SMALL: u64 = 64 << 20;

/// One streamed level of every part.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub level: String,
    /// Bytes of page content streamed, all parts together (before any
    /// compression).
    pub pages_bytes: u64,
    /// Longest any part stood still for it (as its agent measured).
    pub frozen_ms: f64,
    pub ms: f64,
    /// Its page content stayed on the source nodes (post-copy), fetched
    /// by the targets as the job reads it.
    pub held: bool,
}

/// A migration, as `ckpt-coord migrate` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub job: String,
    /// "streamed" or "store".
    pub mode: &'static str,
    /// Each node the job was on and the node that took its parts.
    pub mapping: Vec<(String, String)>,
    /// Streamed: the rounds while the job ran on, then the frozen one.
    pub precopy: Vec<Round>,
    pub final_level: Option<Round>,
    /// How long the job stood still: from the freeze of its parts to
    /// their release on the new nodes.
    pub frozen_ms: f64,
    pub parts: Vec<PartRestored>,
    /// Through the store: the checkpoint taken and the restart from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartReport>,
    pub steps: Vec<Step>,
    pub total_ms: f64,
}

/// Moves job `job` to the nodes `to` (its nodes mapped onto them in
/// order; `pack` lets several nodes' parts share one), as `how` says.
/// Target nodes whose kernel cannot run the job refuse before it is
/// touched.
pub fn migrate(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    to: &[String],
    pack: bool,
    how: MigrateHow,
    on_step: OnStep<'_>,
) -> Result<MigrateReport, FlowError> {
    let _lock = store.lock_job(job, "migrate", false)?;
    // Placed first: a wrong --to is refused without contacting anyone.
    let spec = store.job_spec(job)?;
    let mut parts = Vec::new();
    for p in &spec.parts {
        parts.push((p.name.clone(), recorded_node(job, p)?, PathBuf::new()));
    }
    let moves = plan::plan_moves(
        &format!("job {job}"),
        &spec,
        &parts,
        cluster,
        Some(to),
        pack,
    )?;
    let refused: Vec<String> = check(cluster, store, Some(to), None, pack)?
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| format!("node {}: {}", c.node, c.missing.join("; ")))
        .collect();
    if !refused.is_empty() {
        return Err(FlowError::Setup(format!(
            "migration of job {job} refused before it was touched: {}",
            refused.join("; ")
        )));
    }
    if how.via_store {
        via_store(cluster, store, job, to, pack, on_step)
    } else {
        streamed(cluster, store, (job, spec, &parts), moves, how, on_step)
    }
}

/// The nodes job `spec`'s parts are on, in part order, without repeats.
fn nodes_of(spec: &crate::jobspec::JobSpec) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for p in &spec.parts {
        if let Some(n) = &p.node {
            if !v.contains(n) {
                v.push(n.clone());
            }
        }
    }
    v
}

/// Checkpoints the job with `--stop` and restarts that checkpoint on
/// `to`. If the restart there fails, the job is restarted from the same
/// checkpoint on the nodes it came from, and the error says so.
fn via_store(
    cluster: &Cluster,
    store: &Store,
    job: &str,
    to: &[String],
    pack: bool,
    on_step: OnStep<'_>,
) -> Result<MigrateReport, FlowError> {
    let t0 = Instant::now();
    let from = nodes_of(&store.job_spec(job)?);
    let cp = checkpoint_locked(
        cluster,
        store,
        job,
        Finish {
            stop: true,
            ..Default::default()
        },
        on_step,
    )?;
    let id = cp.checkpoint.to_string();
    match restart_locked(cluster, store, job, Some(&id), Some(to), pack, on_step) {
        Ok(restart) => {
            let mut steps = cp.steps.clone();
            steps.extend(restart.steps.iter().cloned());
            Ok(MigrateReport {
                job: job.to_string(),
                mode: "store",
                mapping: restart.mapping.clone(),
                precopy: Vec::new(),
                final_level: None,
                // Stopped at the checkpoint's freeze, running again at the
                // restart's release: about all of it.
                frozen_ms: ms(t0),
                parts: restart.parts.clone(),
                checkpoint: Some(cp),
                restart: Some(restart),
                steps,
                total_ms: ms(t0),
            })
        }
        Err(e) => {
            let back = restart_locked(cluster, store, job, Some(&id), None, false, on_step);
            Err(FlowError::Setup(match back {
                Ok(_) => format!(
                    "migration of job {job} to {} failed: {e}; the job was restarted from checkpoint {id} on {}, where it ran",
                    to.join(","),
                    from.join(",")
                ),
                Err(e2) => format!(
                    "migration of job {job} to {} failed: {e}; restarting it back on {} failed too: {e2}; \
                     the job is stopped, its checkpoint {id} is committed: restart it with `ckpt-coord restart {job} --nodes ...`",
                    to.join(","),
                    from.join(",")
                ),
            }))
        }
    }
}

/// Where one part streams to.
#[derive(Debug, Clone)]
struct Route {
    /// Index of its target node's order and link.
    target: usize,
    /// The target agent, as the source agent reaches it.
    addr: String,
    inbox: String,
    /// The inbox's directory on the target node.
    dir: PathBuf,
    /// The part's source agent, as the target agent reaches it (where a
    /// post-copy's held pages are fetched from).
    source: String,
}

/// The address of a node's agent that other agents connect to.
fn agent_addr(cluster: &Cluster, node: &str) -> Result<String, FlowError> {
    match &cluster
        .require_node(node)
        .map_err(plan::PlanError::from)?
        .agent
    {
        a @ AgentAddr::Tcp { .. } => Ok(a.to_string()),
        AgentAddr::InProcess => Err(FlowError::Setup(format!(
            "node {node} has no agent service (the local-only cluster): a streamed migration \
             goes from agent to agent; use --via-store"
        ))),
    }
}

/// The streamed move of job `job` (`spec`, its `parts` with their nodes)
/// as `moves` places it.
fn streamed(
    cluster: &Cluster,
    store: &Store,
    (job, spec, parts): (&str, crate::jobspec::JobSpec, &[(String, String, PathBuf)]),
    moves: plan::Moves,
    how: MigrateHow,
    on_step: OnStep<'_>,
) -> Result<MigrateReport, FlowError> {
    let t0 = Instant::now();
    let mut steps = Steps {
        done: Vec::new(),
        on_step,
    };
    let tcp = tcp_established(&spec);
    let timeouts = cluster.timeouts;
    let plan::Moves {
        mapping, orders, ..
    } = moves;
    for (_, node, _) in parts {
        agent_addr(cluster, node)?;
    }

    // One link per part on its source (its sessions live there), one per
    // target node; an inbox there for each part.
    let t = Instant::now();
    let mut conns = Vec::new();
    for (name, node, _) in parts {
        conns.push(Dumping {
            part: name.clone(),
            agent_job: spec.agent_job_id(name),
            link: open(cluster, node)?,
            session: None,
            report: PartDump {
                part: name.clone(),
                node: node.clone(),
                images: PathBuf::new(),
                prepare_ms: 0.0,
                dump_ms: 0.0,
                frozen_ms: 0.0,
                pages_bytes: 0,
                snapshot_bytes: 0,
                hold: String::new(),
            },
        });
    }
    let mut targets: Vec<Link> = Vec::new();
    let mut routes: HashMap<String, Route> = HashMap::new();
    for (i, o) in orders.iter().enumerate() {
        let mut link = open(cluster, &o.node)?;
        if link.uid() != 0 {
            return Err(FlowError::Setup(format!(
                "a live migration streams the job from agent to agent, which only root may \
                 order (user {}): move job {job} with --via-store",
                link.uid()
            )));
        }
        let addr = agent_addr(cluster, &o.node)?;
        for p in &o.parts {
            let source = parts
                .iter()
                .find(|(name, _, _)| *name == p.part)
                .map(|(_, node, _)| agent_addr(cluster, node))
                .transpose()?
                .unwrap_or_default();
            let (inbox, dir) = open_inbox(&mut link, &p.agent_job, timeouts.connect)
                .map_err(|reason| node_failed("open an inbox", &o.node, reason))?;
            routes.insert(
                p.part.clone(),
                Route {
                    target: i,
                    addr: addr.clone(),
                    inbox,
                    dir,
                    source,
                },
            );
        }
        targets.push(link);
    }
    steps.end("connect and open inboxes", t);

    // Pre-copy, the job running.
    let mut precopy: Vec<Round> = Vec::new();
    let mut parent = String::new();
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut count = |conns: &[Dumping]| {
        for c in conns {
            *sent.entry(c.part.clone()).or_default() += c.report.pages_bytes;
        }
    };
    for r in 1..=how.rounds {
        let t = Instant::now();
        let level = format!("pre-{r}");
        let round = stream_level(
            &mut conns, &routes, &level, &parent, true, tcp, how, timeouts,
        )?;
        count(&conns);
        steps.end(
            format!("pre-copy {level} ({} MiB)", round.pages_bytes >> 20),
            t,
        );
        if r == 1 {
            // Whether the targets can run what the sources run is known
            // from the first level: refuse before anything stands still.
            let t = Instant::now();
            check_targets(&orders, &mut targets, &routes, &level, timeouts.freeze).map_err(
                |e| {
                    FlowError::Setup(format!(
                        "migration of job {job} refused: {e}; the job runs on where it was"
                    ))
                },
            )?;
            steps.end("check the targets", t);
        }
        let enough = round.pages_bytes < ROUND_SMALL
            || precopy
                .last()
                .is_some_and(|p| round.pages_bytes * 4 > p.pages_bytes * 3);
        parent = level;
        precopy.push(round);
        if enough {
            break;
        }
    }

    // The final level: every part frozen, the last changes streamed.
    let frozen_at = Instant::now();
    let t = Instant::now();
    let last = stream_level(
        &mut conns, &routes, "final", &parent, false, tcp, how, timeouts,
    )?;
    count(&conns);
    steps.end(
        format!("final dump, frozen ({} MiB)", last.pages_bytes >> 20),
        t,
    );
    let t = Instant::now();
    if let Err(e) = check_targets(&orders, &mut targets, &routes, "final", timeouts.freeze) {
        let undone = crate::flow::abort_all(&mut conns, timeouts.freeze);
        return Err(FlowError::Setup(format!(
            "migration of job {job} refused: {e}{undone}"
        )));
    }
    // Every source still holds its part, frozen: past the stop below, the
    // job lives in the targets' inboxes.
    if let Err(failure) = confirm_sessions(&mut conns, timeouts.freeze) {
        return Err(aborted(
            &mut conns,
            "confirm before the move",
            failure,
            timeouts.freeze,
        ));
    }
    steps.end("check the targets and confirm", t);

    // The sources stop their parts.
    let t = Instant::now();
    let finished = parallel(&mut conns, |c| finish_part(c, End::Depart, timeouts.freeze));
    let mut not_stopped = Vec::new();
    let mut stopped: Vec<String> = Vec::new();
    // Those whose agents answered: their killed parts' exit is waited for
    // last, on the same links.
    let mut departing: Vec<String> = Vec::new();
    for (c, r) in conns.iter().zip(finished) {
        match r {
            Ok(()) => {
                stopped.push(c.part.clone());
                departing.push(c.part.clone());
            }
            // A finish that timed out may have stopped the part all the
            // same: what runs there decides.
            Err(e) => match running(cluster, &c.report.node, &c.agent_job) {
                Ok(false) => stopped.push(c.part.clone()),
                Ok(true) => not_stopped.push(format!("{}@{}: {e}", c.part, c.report.node)),
                Err(e2) => not_stopped.push(format!(
                    "{}@{}: {e}; and whether it still runs is unknown: {e2}",
                    c.part, c.report.node
                )),
            },
        }
    }
    steps.end("stop the sources", t);

    // The targets restore what stopped, held, and release it together.
    let t = Instant::now();
    let levels: Vec<String> = precopy
        .iter()
        .map(|r| r.level.clone())
        .chain(std::iter::once("final".to_string()))
        .collect();
    let restored = restore_held(&orders, &mut targets, &routes, &stopped, tcp, how, timeouts);
    // A failure from here on: the copies on the targets are killed (and
    // seen to be gone), and the job goes back where it was.
    let mut undo =
        |targets: &mut [Link], step: &str, node: String, reason: String, done: &[Restored]| {
            let what = format!("migration of job {job}: {step} failed on node {node}: {reason}");
            let undone = match kill_confirmed(cluster, targets, done, timeouts.freeze) {
                Ok(u) => u,
                Err(e) => return FlowError::Setup(format!("{what}; {e}")),
            };
            let back = move_back(
                cluster, &mut conns, targets, &routes, &stopped, &levels, tcp, timeouts,
            );
            FlowError::Setup(match back {
                Ok(()) => format!(
                "{what}{undone}; the job was sent back and restored where it was, and runs there"
            ),
                Err(e) => format!(
                "{what}{undone}; sending it back failed too: {e}; its images stay on the target \
                 nodes only until this command ends: the job is lost"
            ),
            })
        };
    let restored = match restored {
        Ok(r) => r,
        Err((done, node, reason)) => {
            return Err(undo(&mut targets, "restore", node, reason, &done))
        }
    };
    steps.end("restore on the targets (held)", t);
    let t = Instant::now();
    if let Err((node, reason)) = release(&mut targets, &restored, timeouts.freeze) {
        return Err(undo(&mut targets, "release", node, reason, &restored));
    }
    steps.end("release on the targets", t);
    let frozen_ms = ms(frozen_at);
    // The sources answered the stop once their parts were killed; the
    // command ends once they are gone too.
    let t = Instant::now();
    let still = sources_gone(&mut conns, &departing, timeouts.freeze);
    steps.end("sources gone", t);

    // Later checkpoints find the parts where they now run.
    let mut spec = spec;
    for p in spec.parts.iter_mut() {
        if let Some((_, r)) = restored.iter().find(|(_, r)| r.part == p.name) {
            p.node = Some(r.node.clone());
        }
    }
    store.record_spec(&spec).map_err(|e| {
        FlowError::Setup(format!(
            "job {job} was moved and runs, but its recorded spec could not be updated with \
             its new nodes (a checkpoint would look for it where it was): {e}"
        ))
    })?;
    if !not_stopped.is_empty() {
        return Err(FlowError::Setup(format!(
            "migration of job {job}: the parts that stopped were moved, but these sources \
             could not stop theirs, which run on where they were: {}",
            not_stopped.join("; ")
        )));
    }
    if !still.is_empty() {
        return Err(FlowError::Setup(format!(
            "migration of job {job}: the job was moved and runs on its targets, but these \
             sources, killed, were not seen gone (see their agents' logs): {}",
            still.join("; ")
        )));
    }
    let mut parts_report: Vec<PartRestored> = restored.into_iter().map(|(_, p)| p).collect();
    for p in parts_report.iter_mut() {
        p.streamed_bytes = sent.get(&p.part).copied().unwrap_or(0);
    }
    Ok(MigrateReport {
        job: job.to_string(),
        mode: "streamed",
        mapping,
        precopy,
        final_level: Some(last),
        frozen_ms,
        parts: parts_report,
        checkpoint: None,
        restart: None,
        steps: steps.done,
        total_ms: ms(t0),
    })
}

fn node_failed(step: &'static str, node: &str, reason: String) -> FlowError {
    FlowError::Node {
        step,
        node: node.to_string(),
        reason,
        undone: "; nothing was changed".into(),
    }
}

/// Opens an inbox for agent job `job` on `link`'s node: its name and
/// directory.
fn open_inbox(link: &mut Link, job: &str, timeout: Duration) -> Result<(String, PathBuf), String> {
    match link.call(
        timeout,
        Q::Inbox(msg::InboxRequest {
            job: job.to_string(),
        }),
    )? {
        A::Inbox(i) => Ok((i.inbox, PathBuf::from(i.dir))),
        other => Err(format!("answered inbox with {other:?}")),
    }
}

/// Streams level `level` of every part (on `parent`, the previous level)
/// into its inbox: a pre-dump (`pre`: the parts run on, each frozen only
/// while its memory is captured), or the final dump (every part frozen
/// and its network locked before any dumps, as for a checkpoint; left
/// prepared). A failure aborts every session: the job runs on.
#[allow(clippy::too_many_arguments)]
fn stream_level(
    conns: &mut [Dumping],
    routes: &HashMap<String, Route>,
    level: &str,
    parent: &str,
    pre: bool,
    tcp: bool,
    how: MigrateHow,
    timeouts: crate::config::Timeouts,
) -> Result<Round, FlowError> {
    let t = Instant::now();
    let prepared = prepare_all(conns, timeouts.freeze, |c| {
        let route = &routes[&c.part];
        msg::PrepareRequest {
            job: c.agent_job.clone(),
            pid: 0,
            images: String::new(),
            tcp_established: tcp,
            ext_unix_sk: false,
            stop_after_commit: !pre,
            snapshot: pre,
            compress: how.compress.to_string(),
            pre_dump: pre,
            parent: parent.to_string(),
            stream_to: route.addr.clone(),
            inbox: route.inbox.clone(),
            level: level.to_string(),
            hold_pages: match !pre && how.lazy {
                true => route.source.clone(),
                false => String::new(),
            },
        }
    });
    if let Err(failure) = prepared {
        return Err(aborted(conns, "prepare", failure, timeouts.freeze));
    }
    if let Err(failure) = dump_all(conns, timeouts.dump) {
        return Err(aborted(conns, "dump", failure, timeouts.freeze));
    }
    let mut frozen_ms = 0.0f64;
    if pre {
        // The parts run on already (snapshots); this ends the sessions.
        let finished = on_all(conns, |c| finish_part(c, End::RunOn, timeouts.freeze));
        if let Err(failure) = finished {
            return Err(aborted(
                conns,
                "finish a pre-dump",
                failure,
                timeouts.freeze,
            ));
        }
        frozen_ms = conns.iter().map(|c| c.report.frozen_ms).fold(0.0, f64::max);
    }
    Ok(Round {
        level: level.to_string(),
        pages_bytes: conns.iter().map(|c| c.report.pages_bytes).sum(),
        frozen_ms,
        ms: ms(t),
        // What the agents did, not what was asked.
        held: !conns.is_empty() && conns.iter().all(|c| !c.report.hold.is_empty()),
    })
}

/// Asks every target whether it can run its parts as level `level` shows
/// them (kernel features and CPU; the restore verifies the images).
fn check_targets(
    orders: &[RestoreOrder],
    targets: &mut [Link],
    routes: &HashMap<String, Route>,
    level: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut pairs: Vec<(&RestoreOrder, &mut Link)> =
        orders.iter().zip(targets.iter_mut()).collect();
    let answers = parallel(&mut pairs, |(o, link)| {
        let mut why = Vec::new();
        for p in &o.parts {
            let dir = routes[&p.part].dir.join(level);
            match link.call(
                timeout,
                Q::Check(msg::CheckRequest {
                    images: dir.to_string_lossy().into_owned(),
                    compat_only: true,
                }),
            ) {
                Ok(A::Check(c)) if c.ok => {}
                Ok(A::Check(c)) => why.push(format!(
                    "node {} cannot run part {}: {}",
                    o.node,
                    p.part,
                    c.missing.join("; ")
                )),
                Ok(other) => why.push(format!("node {}: answered check with {other:?}", o.node)),
                Err(e) => why.push(format!("node {}: {e}", o.node)),
            }
        }
        why
    });
    let why: Vec<String> = answers.into_iter().flatten().collect();
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// A part restored held: its agent job and report.
type Restored = (String, PartRestored);

/// Restores the parts named in `which` from their inboxes' final level,
/// held, each target node in parallel. On failure: what was restored, and
/// the first node that failed and why.
fn restore_held(
    orders: &[RestoreOrder],
    targets: &mut [Link],
    routes: &HashMap<String, Route>,
    which: &[String],
    tcp: bool,
    how: MigrateHow,
    timeouts: crate::config::Timeouts,
) -> Result<Vec<Restored>, (Vec<Restored>, String, String)> {
    let mut pairs: Vec<(&RestoreOrder, &mut Link)> =
        orders.iter().zip(targets.iter_mut()).collect();
    let results = parallel(&mut pairs, |(o, link)| {
        let mut out = Vec::new();
        for p in o.parts.iter().filter(|p| which.contains(&p.part)) {
            let images = routes[&p.part].dir.join("final");
            let r = link.call(
                timeouts.restore,
                Q::Restore(msg::RestorePartRequest {
                    images: images.to_string_lossy().into_owned(),
                    job: p.agent_job.clone(),
                    tcp_established: tcp,
                    ext_unix_sk: false,
                    bridge: o.bridge.clone(),
                    hold: true,
                    lazy_pages: how.lazy,
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
                        streamed_bytes: 0,
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
    let mut done = Vec::new();
    let mut failure = None;
    for ((d, r), o) in results.into_iter().zip(orders) {
        done.extend(d);
        if let (Err(e), None) = (r, &failure) {
            failure = Some((o.node.clone(), e));
        }
    }
    match failure {
        None => Ok(done),
        Some((node, reason)) => Err((done, node, reason)),
    }
}

/// Releases the parts restored held, every target at once.
fn release(
    targets: &mut [Link],
    restored: &[Restored],
    timeout: Duration,
) -> Result<(), (String, String)> {
    let mut per_link: Vec<(&mut Link, Vec<String>)> = targets
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
        if jobs.is_empty() {
            return Ok(());
        }
        let node = link.node().to_string();
        match link.call(
            timeout,
            Q::Release(msg::ReleaseRequest { jobs: jobs.clone() }),
        ) {
            Ok(A::Release(_)) => Ok(()),
            Ok(other) => Err((node, format!("answered release with {other:?}"))),
            Err(e) => Err((node, e)),
        }
    });
    released.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

/// Whether agent job `job` has processes on `node`, asked on a fresh link
/// (the operation's own may be out of step after a timeout).
fn running(cluster: &Cluster, node: &str, job: &str) -> Result<bool, String> {
    let mut link = open(cluster, node).map_err(|e| e.to_string())?;
    match link.call(
        Duration::from_secs(30),
        Q::Status(msg::StatusRequest {
            jobs: vec![job.to_string()],
        }),
    )? {
        A::Status(s) => Ok(s.running.iter().any(|j| j == job)),
        other => Err(format!("answered status with {other:?}")),
    }
}

/// Waits until every source part in `stopped` (their agents answered the
/// stop) is gone from its node: killed at the stop, its tasks were still
/// exiting (their memory being freed) when its agent answered. Returns
/// the parts not seen gone within `timeout`, with why.
fn sources_gone(conns: &mut [Dumping], stopped: &[String], timeout: Duration) -> Vec<String> {
    let results = parallel(conns, |c| {
        if !stopped.contains(&c.part) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let status = Q::Status(msg::StatusRequest {
                jobs: vec![c.agent_job.clone()],
            });
            match c.link.call(timeout, status)? {
                A::Status(s) if !s.departing.contains(&c.agent_job) => return Ok(()),
                A::Status(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                A::Status(_) => return Err(format!("still exiting after {} s", timeout.as_secs())),
                other => return Err(format!("answered status with {other:?}")),
            }
        }
    });
    conns
        .iter()
        .zip(results)
        .filter_map(|(c, r)| {
            r.err()
                .map(|e: String| format!("{}@{}: {e}", c.part, c.report.node))
        })
        .collect()
}

/// Kills the restored parts, on the link that restored them (so that its
/// agent forgets them: it would kill them again, by name, when the link
/// ends) or else on a fresh one, and makes sure none runs any more: moving
/// the job back while a copy of it may run on a target would leave two.
/// Says what was undone, or which part may still run.
fn kill_confirmed(
    cluster: &Cluster,
    targets: &mut [Link],
    restored: &[Restored],
    timeout: Duration,
) -> Result<String, String> {
    let mut killed = Vec::new();
    for (job, p) in restored {
        let kill = || Q::Kill(msg::KillRequest { job: job.clone() });
        let own = targets
            .iter_mut()
            .find(|l| l.node() == p.node)
            .map(|l| l.call(timeout, kill()));
        let gone = match own {
            Some(Ok(_)) => Ok(()),
            _ => open(cluster, &p.node)
                .map_err(|e| e.to_string())
                .and_then(|mut l| l.call(timeout, kill()).map(|_| ())),
        }
        .and_then(|()| running(cluster, &p.node, job));
        match gone {
            Ok(false) => killed.push(format!("{}@{}", p.part, p.node)),
            Ok(true) => {
                return Err(format!(
                    "part {} still runs on node {} after a kill: the job was NOT moved back; \
                     see `ckpt-coord status`",
                    p.part, p.node
                ))
            }
            Err(e) => {
                return Err(format!(
                    "part {} on node {} could not be killed ({e}): it may run there; the job \
                     was NOT moved back; see `ckpt-coord status`",
                    p.part, p.node
                ))
            }
        }
    }
    Ok(if killed.is_empty() {
        String::new()
    } else {
        format!("; killed on the targets: {}", killed.join(", "))
    })
}

/// Sends the chains of the parts in `which` back from the targets'
/// inboxes to their source agents and restores them there, held, then
/// releases them together: a move that failed on a target leaves the job
/// where it was.
#[allow(clippy::too_many_arguments)]
fn move_back(
    cluster: &Cluster,
    conns: &mut [Dumping],
    targets: &mut [Link],
    routes: &HashMap<String, Route>,
    which: &[String],
    levels: &[String],
    tcp: bool,
    timeouts: crate::config::Timeouts,
) -> Result<(), String> {
    let mut held: Vec<usize> = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        if !which.contains(&c.part) {
            continue;
        }
        let route = &routes[&c.part];
        let node = cluster
            .require_node(&c.report.node)
            .map_err(|e| e.to_string())?;
        let addr = node.agent.to_string();
        let (inbox, dir) = open_inbox(&mut c.link, &c.agent_job, timeouts.connect)?;
        match targets[route.target].call(
            timeouts.restore,
            Q::Forward(msg::ForwardRequest {
                dir: route.dir.to_string_lossy().into_owned(),
                levels: levels.to_vec(),
                stream_to: addr,
                inbox,
            }),
        )? {
            A::Forward(_) => {}
            other => return Err(format!("answered forward with {other:?}")),
        }
        match c.link.call(
            timeouts.restore,
            Q::Restore(msg::RestorePartRequest {
                images: dir.join("final").to_string_lossy().into_owned(),
                job: c.agent_job.clone(),
                tcp_established: tcp,
                ext_unix_sk: false,
                bridge: node.bridge.clone(),
                hold: true,
                lazy_pages: false,
            }),
        )? {
            A::Restore(_) => held.push(i),
            other => return Err(format!("answered restore with {other:?}")),
        }
    }
    for i in held {
        let c = &mut conns[i];
        c.link.call(
            timeouts.freeze,
            Q::Release(msg::ReleaseRequest {
                jobs: vec![c.agent_job.clone()],
            }),
        )?;
    }
    Ok(())
}
