//! `ckpt-coord`: the coordinator's command line (BRIEF §3). The logic lives
//! in the library; this file parses arguments, prints results and maps
//! errors to exit codes (0 success, 1 failure, 2 bad usage).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use ckpt_coord::plan;
use ckpt_coord::store::{Entry, Signature, Verify};
use ckpt_coord::{flow, jobspec, Checkpoint, Cluster, JobSpec, Store};
use clap::{Parser, Subcommand};
use serde_json::json;

/// Checkpoints, restarts and migrates jobs that span several nodes.
#[derive(Parser)]
#[command(name = "ckpt-coord", version)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Cluster configuration (default: $CKPT_CLUSTER, else
    /// /etc/ckpt/cluster.toml, else this node alone).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// A `--nodes A,B` list.
#[derive(Clone, Debug)]
struct Nodes(Vec<String>);

fn nodes(s: &str) -> Result<Nodes, String> {
    ckpt_coord::parse_node_list(s).map(Nodes)
}

fn job_id(s: &str) -> Result<String, String> {
    jobspec::check_job_id(s).map(|()| s.to_string())
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the job a job spec describes, its parts on their nodes.
    Launch {
        /// The job spec (TOML; see docs/OPERATIONS.md).
        jobspec: PathBuf,
        /// Job id (default: the spec's, else generated).
        #[arg(long, value_parser = job_id)]
        job: Option<String>,
        /// Nodes to place the parts on (default: every node of the cluster).
        #[arg(long, value_parser = nodes, value_name = "A,B")]
        nodes: Option<Nodes>,
        /// Start over a job whose id is recorded already, if none of its
        /// parts runs any more.
        #[arg(long)]
        replace: bool,
    },
    /// Kill every part of a job on its node (its checkpoints stay).
    Kill {
        /// The job id.
        #[arg(value_parser = job_id)]
        job: String,
    },
    /// Record the spec of a job whose parts were started by hand (`ckpt-agent
    /// run --job JOB.PART` on their nodes), so that checkpoint and restart
    /// know it; the way to use the coordinator until launch is wired.
    Adopt {
        /// The job spec (TOML; every part names its node).
        jobspec: PathBuf,
        /// Job id (default: the spec's, else generated).
        #[arg(long, value_parser = job_id)]
        job: Option<String>,
    },
    /// Checkpoint every part of a job at once (two-phase).
    Checkpoint {
        /// The job id.
        #[arg(value_parser = job_id)]
        job: String,
        /// Let the job run on afterwards (the default).
        #[arg(long, conflicts_with = "stop")]
        leave_running: bool,
        /// Stop the job once the checkpoint is committed (for preemption).
        #[arg(long)]
        stop: bool,
        /// Keep the job stopped until all of its memory is copied (by
        /// default it runs on as soon as its state is captured, while its
        /// memory is copied from copy-on-write snapshots).
        #[arg(long, conflicts_with = "stop")]
        frozen_copy: bool,
        /// Compress the parts' page content: lz4, zstd or zstd:LEVEL
        /// (1-19), in parallel with the copy.
        #[arg(long, value_name = "ALG", default_value = "none")]
        compress: ckpt_agent::pages::Codec,
    },
    /// Restore a job from a checkpoint, on its nodes or on others.
    Restart {
        /// The job id.
        #[arg(value_parser = job_id)]
        job: String,
        /// Checkpoint id (default: the newest).
        #[arg(long, value_name = "ID")]
        checkpoint: Option<String>,
        /// Nodes to restore on, taking the checkpoint's nodes in order
        /// (default: the nodes it was taken on).
        #[arg(long, value_parser = nodes, value_name = "A,B")]
        nodes: Option<Nodes>,
        /// Allow fewer nodes than the checkpoint had: several nodes' parts
        /// share one.
        #[arg(long)]
        pack: bool,
    },
    /// Whether nodes can run jobs, or restore a checkpoint.
    Check {
        /// Nodes to check (default: every node, or the checkpoint's).
        #[arg(long, value_parser = nodes, value_name = "A,B")]
        nodes: Option<Nodes>,
        /// A checkpoint (ID, or JOB/ID) the nodes must be able to restore.
        #[arg(long, value_name = "ID")]
        checkpoint: Option<String>,
        /// Allow fewer nodes than the checkpoint had.
        #[arg(long)]
        pack: bool,
    },
    /// A job's checkpoints, their parts and nodes, and whether they verify;
    /// without JOB, a line per job.
    Status {
        /// The job id.
        #[arg(value_parser = job_id)]
        job: Option<String>,
        /// Also check every file's SHA-256 (reads whole checkpoints).
        #[arg(long)]
        full: bool,
    },
    /// Jobs in the checkpoint store and their checkpoints.
    List,
    /// Wait until no part of a job runs any more (for batch scripts: the
    /// job's processes are the agents', not the caller's children).
    Wait {
        /// The job id.
        #[arg(value_parser = job_id)]
        job: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Seconds between two looks.
        #[arg(long, value_name = "SECS", default_value_t = 2)]
        every: u64,
    },
    /// Move a job to other nodes (checkpoint, then restart there).
    Migrate {
        /// The job id.
        #[arg(value_parser = job_id)]
        job: String,
        /// The nodes to move to, taking the job's nodes in order.
        #[arg(long, value_parser = nodes, value_name = "A,B", required = true)]
        to: Nodes,
        /// Allow fewer nodes than the job has.
        #[arg(long)]
        pack: bool,
        /// Move it through a checkpoint committed to the store (checkpoint
        /// --stop, restart there) instead of streaming it from agent to
        /// agent while it runs.
        #[arg(long)]
        via_store: bool,
        /// Most pre-copy rounds while the job runs (0: stream everything
        /// frozen).
        #[arg(long, default_value_t = 4, conflicts_with = "via_store")]
        rounds: u32,
        /// Restore on the targets lazily: the job runs as soon as its
        /// parts exist, their memory brought in on demand and in the
        /// background (shorter freeze; a target failing meanwhile loses
        /// the job).
        #[arg(long, conflicts_with = "via_store")]
        lazy: bool,
        /// Compress the streamed pages: lz4, zstd or zstd:LEVEL.
        #[arg(
            long,
            value_name = "ALG",
            default_value = "none",
            conflicts_with = "via_store"
        )]
        compress: ckpt_agent::pages::Codec,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ckpt_agent::logging::init(cli.verbose);
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors carry their causes in their own message.
            eprintln!("ckpt-coord: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let cluster = Cluster::load(cli.config.as_deref())?;
    tracing::info!(config = %cluster.describe_source(), nodes = cluster.nodes.len(), store = %cluster.store.display(), "cluster");
    let store = Store::new(&cluster.store);
    match &cli.cmd {
        Cmd::List => list(cli, &store),
        Cmd::Kill { job } => {
            let parts = flow::kill(&cluster, &store, job)?;
            if cli.json {
                println!("{}", json!({ "job": job, "parts": parts }));
            } else {
                for p in &parts {
                    println!("part {} on {}: killed", p.part, p.node);
                }
            }
            Ok(())
        }
        Cmd::Wait {
            job,
            timeout,
            every,
        } => {
            let states = flow::wait(
                &cluster,
                &store,
                job,
                std::time::Duration::from_secs((*every).max(1)),
                timeout.map(std::time::Duration::from_secs),
            )?;
            if cli.json {
                println!("{}", json!({ "job": job, "parts": states }));
            } else {
                println!("job {job} has ended: no part of it runs");
            }
            Ok(())
        }
        Cmd::Status { job: None, full } => status_all(cli, &cluster, &store, *full),
        Cmd::Status {
            job: Some(job),
            full,
        } => status_job(cli, &cluster, &store, job, *full),
        Cmd::Launch {
            jobspec,
            job,
            nodes,
            replace,
        } => {
            let spec = JobSpec::load(jobspec, job.as_deref())?;
            let r = flow::launch(
                &cluster,
                &store,
                &spec,
                nodes.as_ref().map(|n| n.0.as_slice()),
                *replace,
                &progress(cli),
            )?;
            print_launch(cli, &r);
            Ok(())
        }
        Cmd::Adopt { jobspec, job } => adopt(cli, &cluster, &store, jobspec, job.as_deref()),
        Cmd::Checkpoint {
            job,
            stop,
            frozen_copy,
            compress,
            ..
        } => {
            let how = flow::Finish {
                stop: *stop,
                frozen_copy: *frozen_copy,
                compress: *compress,
            };
            let r = flow::checkpoint(&cluster, &store, job, how, &progress(cli))?;
            print_checkpoint(cli, &r);
            Ok(())
        }
        Cmd::Restart {
            job,
            checkpoint,
            nodes,
            pack,
        } => {
            let r = flow::restart(
                &cluster,
                &store,
                job,
                checkpoint.as_deref(),
                nodes.as_ref().map(|n| n.0.as_slice()),
                *pack,
                &progress(cli),
            )?;
            print_restart(cli, &r);
            Ok(())
        }
        Cmd::Check {
            nodes,
            checkpoint,
            pack,
        } => {
            let checks = flow::check(
                &cluster,
                &store,
                nodes.as_ref().map(|n| n.0.as_slice()),
                checkpoint.as_deref(),
                *pack,
            )?;
            let bad = checks.iter().filter(|c| !c.ok).count();
            if cli.json {
                println!("{}", json!({ "ok": bad == 0, "nodes": checks }));
            } else {
                for c in &checks {
                    let what = if c.parts.is_empty() {
                        String::new()
                    } else {
                        format!(" (parts {})", c.parts.join(","))
                    };
                    if c.ok {
                        println!("node {}{what}: ok", c.node);
                    } else {
                        println!("node {}{what}: CANNOT: {}", c.node, c.missing.join("; "));
                    }
                    for n in &c.notes {
                        println!("  note: {n}");
                    }
                }
            }
            if bad > 0 {
                let names: Vec<&str> = checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| c.node.as_str())
                    .collect();
                bail!(
                    "{bad} of {} node(s) cannot {} (node {})",
                    checks.len(),
                    if checkpoint.is_some() {
                        "restore the checkpoint"
                    } else {
                        "run jobs"
                    },
                    names.join(", node ")
                );
            }
            Ok(())
        }
        Cmd::Migrate {
            job,
            to,
            pack,
            via_store,
            rounds,
            lazy,
            compress,
        } => {
            let how = ckpt_coord::migrate::MigrateHow {
                via_store: *via_store,
                rounds: *rounds,
                compress: *compress,
                lazy: *lazy,
            };
            let r = ckpt_coord::migrate::migrate(
                &cluster,
                &store,
                job,
                &to.0,
                *pack,
                how,
                &progress(cli),
            )?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string(&r).expect("a report serializes")
                );
            } else {
                let how = match &r.checkpoint {
                    Some(cp) => format!("through checkpoint {}", cp.checkpoint),
                    None => format!(
                        "streamed in {} pre-copy round{} and a final {} MiB",
                        r.precopy.len(),
                        if r.precopy.len() == 1 { "" } else { "s" },
                        r.final_level.as_ref().map_or(0, |l| l.pages_bytes >> 20)
                    ),
                };
                println!(
                    "job {} moved to {} in {:.0} ms, {how}; it stood still {:.0} ms",
                    r.job,
                    to.0.join(","),
                    r.total_ms,
                    r.frozen_ms
                );
            }
            Ok(())
        }
    }
}

/// Progress lines on a terminal as each step ends; nothing for scripts.
fn progress(cli: &Cli) -> impl Fn(&flow::Step) + Sync {
    let show = !cli.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    move |s: &flow::Step| {
        if show {
            eprintln!("  {:<34} {:>9.1} ms", s.step, s.ms);
        }
    }
}

fn print_launch(cli: &Cli, r: &flow::LaunchReport) {
    if cli.json {
        println!("{}", serde_json::to_string(r).expect("a report serializes"));
        return;
    }
    println!(
        "job {} launched in {:.0} ms (spec {})",
        r.job,
        r.total_ms,
        r.spec.display()
    );
    for p in &r.parts {
        println!(
            "  part {} on {}: pid {} (agent job {}){}",
            p.part,
            p.node,
            p.pid,
            p.agent_job,
            p.output
                .as_ref()
                .map(|o| format!(", output {}", o.display()))
                .unwrap_or_default()
        );
    }
}

/// Records the spec of a job started by hand, placed on the cluster's
/// nodes as launch would place it (parts without `node` are refused: the
/// coordinator cannot guess where a hand-started part runs).
fn adopt(
    cli: &Cli,
    cluster: &Cluster,
    store: &Store,
    jobspec: &std::path::Path,
    job: Option<&str>,
) -> Result<()> {
    let spec = JobSpec::load(jobspec, job)?;
    if let Some(p) = spec.parts.iter().find(|p| p.node.is_none()) {
        bail!(
            "{}: part {} has no node: name the node its `ckpt-agent run --job {}` runs on",
            jobspec.display(),
            p.name,
            spec.agent_job_id(&p.name)
        );
    }
    let plan = plan::place(&spec, cluster, None)?;
    let path = store.record_spec(&plan.spec)?;
    let parts: Vec<serde_json::Value> = plan
        .spec
        .parts
        .iter()
        .map(|p| json!({ "part": p.name, "node": p.node, "agent_job": plan.spec.agent_job_id(&p.name) }))
        .collect();
    if cli.json {
        println!(
            "{}",
            json!({ "job": plan.spec.job, "spec": path, "parts": parts })
        );
    } else {
        println!(
            "job {} adopted: spec recorded in {}",
            plan.spec.job,
            path.display()
        );
        for p in &plan.spec.parts {
            println!(
                "  part {} on node {} (agent job {})",
                p.name,
                p.node.as_deref().unwrap_or("-"),
                plan.spec.agent_job_id(&p.name)
            );
        }
    }
    Ok(())
}

fn print_checkpoint(cli: &Cli, r: &flow::CheckpointReport) {
    if cli.json {
        println!("{}", serde_json::to_string(r).expect("a report serializes"));
        return;
    }
    println!(
        "job {} checkpoint {} committed in {:.0} ms ({}), {}",
        r.job,
        r.checkpoint,
        r.total_ms,
        r.dir.display(),
        if r.stopped {
            "job stopped"
        } else {
            "job runs on"
        }
    );
    for s in &r.steps {
        println!("  {:<34} {:>9.1} ms", s.step, s.ms);
    }
    for p in &r.parts {
        let ran_on = match p.snapshot_bytes {
            0 => String::new(),
            b => format!(" ({} MiB copied as it ran on)", b >> 20),
        };
        println!(
            "  part {} on {}: prepare {:.1} ms, dump {:.1} ms, frozen {:.1} ms{ran_on}",
            p.part, p.node, p.prepare_ms, p.dump_ms, p.frozen_ms
        );
    }
    for id in &r.pruned {
        println!("  pruned {id}");
    }
}

fn print_restart(cli: &Cli, r: &flow::RestartReport) {
    if cli.json {
        println!("{}", serde_json::to_string(r).expect("a report serializes"));
        return;
    }
    println!(
        "job {} restarted from checkpoint {} in {:.0} ms",
        r.job, r.checkpoint, r.total_ms
    );
    for s in &r.steps {
        println!("  {:<34} {:>9.1} ms", s.step, s.ms);
    }
    for p in &r.parts {
        println!(
            "  part {} on {}: pid {} ({:.1} ms){}",
            p.part,
            p.node,
            p.pid,
            p.restore_ms,
            if p.streamed_bytes > 0 {
                format!(", {} of images streamed to it", human(p.streamed_bytes))
            } else {
                String::new()
            }
        );
    }
}

fn size_of(m: &ckpt_proto::image::ManifestPart) -> u64 {
    m.files.iter().map(|f| f.size).sum()
}

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn parts_json(cp: &Checkpoint) -> serde_json::Value {
    cp.manifest
        .parts
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "node": p.node,
                "dir": cp.part_dir(&p.name),
                "files": p.files.len(),
                "bytes": size_of(p),
            })
        })
        .collect()
}

fn checkpoint_json(cp: &Checkpoint) -> serde_json::Value {
    let m = &cp.manifest;
    json!({
        "id": cp.id,
        "created": ckpt_coord::time::rfc3339_utc(m.created_unix_ms),
        "created_unix_ms": m.created_unix_ms,
        "leave_running": cp.options().leave_running,
        "tcp_established": cp.options().tcp_established,
        "signed": !m.signature.is_empty(),
        "owner_uid": m.owner_uid,
        "parts": parts_json(cp),
    })
}

fn parts_text(cp: &Checkpoint) -> String {
    cp.manifest
        .parts
        .iter()
        .map(|p| format!("{}@{}", p.name, p.node))
        .collect::<Vec<_>>()
        .join(",")
}

fn list(cli: &Cli, store: &Store) -> Result<()> {
    let jobs = store.jobs()?;
    let mut out = Vec::new();
    let mut rows: Vec<[String; 4]> = Vec::new();
    for job in &jobs {
        let entries = store.entries(job)?;
        let mut cps = Vec::new();
        let mut uncommitted = Vec::new();
        for e in &entries {
            if !e.committed {
                uncommitted.push(e.id.to_string());
                rows.push([
                    job.clone(),
                    e.id.to_string(),
                    "-".into(),
                    "(uncommitted: being written, or failed)".into(),
                ]);
                continue;
            }
            match store.open(job, &e.id) {
                Ok(cp) => {
                    rows.push([
                        job.clone(),
                        e.id.to_string(),
                        ckpt_coord::time::rfc3339_utc(cp.manifest.created_unix_ms),
                        parts_text(&cp),
                    ]);
                    cps.push(checkpoint_json(&cp));
                }
                Err(err) => {
                    rows.push([
                        job.clone(),
                        e.id.to_string(),
                        "-".into(),
                        format!("(unreadable: {err})"),
                    ]);
                    cps.push(json!({ "id": e.id, "error": err.to_string() }));
                }
            }
        }
        if entries.is_empty() {
            rows.push([
                job.clone(),
                "-".into(),
                "-".into(),
                "(no checkpoints)".into(),
            ]);
        }
        out.push(json!({ "job": job, "checkpoints": cps, "uncommitted": uncommitted }));
    }
    if cli.json {
        println!("{}", json!({ "store": store.root(), "jobs": out }));
        return Ok(());
    }
    if jobs.is_empty() {
        println!("no jobs in the checkpoint store {}", store.root().display());
        return Ok(());
    }
    print_table(&["JOB", "CHECKPOINT", "CREATED", "PARTS"], &rows);
    Ok(())
}

fn print_table(head: &[&str; 4], rows: &[[String; 4]]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: [&str; 4]| {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        );
    };
    line(*head);
    for r in rows {
        line([&r[0], &r[1], &r[2], &r[3]]);
    }
}

/// A checkpoint's verification, as status shows it.
fn verify_state(cluster: &Cluster, cp: &Checkpoint, full: bool) -> (bool, String) {
    let level = if full { Verify::Full } else { Verify::Quick };
    let what = if full {
        "every file's SHA-256"
    } else {
        "files present, sizes"
    };
    match cp.verify(ckpt_coord::link::signer(cluster).as_deref(), level) {
        Ok(Signature::Valid) => (true, format!("verified (signature valid; {what})")),
        Ok(Signature::Unsigned) => (true, format!("verified (unsigned, no cluster key; {what})")),
        Ok(Signature::NotChecked) => (
            true,
            format!("verified ({what}; signed, but no cluster key here to check the signature)"),
        ),
        Err(e) => (false, format!("REFUSED: {e}")),
    }
}

fn status_job(cli: &Cli, cluster: &Cluster, store: &Store, job: &str, full: bool) -> Result<()> {
    let entries = store.entries(job)?;
    let mut cps = Vec::new();
    let mut text = format!("job {job} (store {})\n", store.root().display());
    for e in &entries {
        if !e.committed {
            text += &format!("checkpoint {}  uncommitted: being written, or failed (pruned after the next commit)\n", e.id);
            cps.push(json!({ "id": e.id, "committed": false }));
            continue;
        }
        let cp = match store.open(job, &e.id) {
            Ok(cp) => cp,
            Err(err) => {
                text += &format!("checkpoint {}  REFUSED: {err}\n", e.id);
                cps.push(json!({ "id": e.id, "committed": true, "verified": false, "error": err.to_string() }));
                continue;
            }
        };
        let (ok, state) = verify_state(cluster, &cp, full);
        let o = cp.options();
        text += &format!(
            "checkpoint {}  created {}  job {}  {state}\n",
            e.id,
            ckpt_coord::time::rfc3339_utc(cp.manifest.created_unix_ms),
            if o.leave_running {
                "left running"
            } else {
                "stopped"
            },
        );
        for p in &cp.manifest.parts {
            text += &format!(
                "  part {:<12} node {:<12} {} files, {}  {}\n",
                p.name,
                p.node,
                p.files.len(),
                human(size_of(p)),
                cp.part_dir(&p.name).display()
            );
        }
        let mut v = checkpoint_json(&cp);
        v["committed"] = json!(true);
        v["verified"] = json!(ok);
        v["state"] = json!(state);
        cps.push(v);
    }
    if entries.is_empty() {
        text += "no checkpoints\n";
    }
    if cli.json {
        println!(
            "{}",
            json!({ "job": job, "store": store.root(), "checkpoints": cps })
        );
    } else {
        print!("{text}");
    }
    Ok(())
}

fn status_all(cli: &Cli, cluster: &Cluster, store: &Store, full: bool) -> Result<()> {
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for job in store.jobs()? {
        let entries: Vec<Entry> = store.entries(&job)?;
        let committed = entries.iter().filter(|e| e.committed).count();
        let (latest, state, ok) = match entries.iter().find(|e| e.committed) {
            None => (
                "-".to_string(),
                "no committed checkpoint".to_string(),
                false,
            ),
            Some(e) => match store.open(&job, &e.id) {
                Ok(cp) => {
                    let (ok, s) = verify_state(cluster, &cp, full);
                    (e.id.to_string(), s, ok)
                }
                Err(err) => (e.id.to_string(), format!("REFUSED: {err}"), false),
            },
        };
        rows.push([
            job.clone(),
            committed.to_string(),
            latest.clone(),
            state.clone(),
        ]);
        out.push(json!({ "job": job, "checkpoints": committed, "latest": latest, "verified": ok, "state": state }));
    }
    if cli.json {
        println!(
            "{}",
            json!({ "store": store.root(), "cluster": cluster.describe_source(), "nodes": cluster.nodes, "jobs": out })
        );
        return Ok(());
    }
    println!(
        "cluster {}: {} node(s), store {}",
        cluster.describe_source(),
        cluster.nodes.len(),
        store.root().display()
    );
    if rows.is_empty() {
        println!("no jobs in the checkpoint store");
    } else {
        print_table(&["JOB", "CHECKPOINTS", "LATEST", "STATE"], &rows);
    }
    Ok(())
}
