//! `ckpt-agent`: the node agent's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use ckpt_agent::{dump, job, pages, restore, show};
use clap::{Parser, Subcommand};

/// Checkpoint and restore of process trees on this node.
#[derive(Parser)]
#[command(name = "ckpt-agent", version)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Probe the kernel features dump and restore use, or whether this node
    /// can restore a checkpoint.
    Check {
        /// Only these probes (repeatable).
        #[arg(long = "feature")]
        features: Vec<String>,
        /// Say whether this node can restore the checkpoint in DIR.
        #[arg(long)]
        images: Option<PathBuf>,
    },
    /// Checkpoint a process into an image directory.
    Dump {
        /// The process to checkpoint.
        #[arg(long = "tree", short = 't')]
        pid: i32,
        /// Directory for the images (created; must not hold a checkpoint).
        #[arg(long, short = 'D')]
        images: PathBuf,
        /// Keep the process running after the dump (default: kill it). It
        /// runs on as soon as its state is captured, while its memory is
        /// copied from a copy-on-write snapshot.
        #[arg(long)]
        leave_running: bool,
        /// With --leave-running: keep the process stopped until all of its
        /// memory is copied, instead of copying from snapshots.
        #[arg(long, requires = "leave_running")]
        frozen_copy: bool,
        /// Accept unix sockets connected to named sockets outside the tree
        /// (reconnected by name on restore).
        #[arg(long)]
        ext_unix_sk: bool,
        /// The tree runs on this shell's terminal: record its terminals
        /// outside the tree as the restorer's terminal instead of refusing.
        #[arg(long)]
        shell_job: bool,
        /// Checkpoint established TCP connections (TCP repair mode; the
        /// job's connections are blocked meanwhile) instead of refusing.
        #[arg(long)]
        tcp_established: bool,
        /// Write only the pages changed since the checkpoint in DIR (a
        /// pre-dump or dump of this tree on this node); restore reads the
        /// others from there.
        #[arg(long, value_name = "DIR")]
        parent: Option<PathBuf>,
        /// Track the pages the tree writes from now on, for a later dump
        /// with --parent on this one (with --leave-running).
        #[arg(long, requires = "leave_running")]
        track_mem: bool,
        /// Compress page content: lz4, zstd or zstd:LEVEL (1-19), in
        /// parallel with the copy.
        #[arg(long, value_name = "ALG", default_value = "none")]
        compress: pages::Codec,
        #[command(flatten)]
        stream: StreamArgs,
    },
    /// Copy a tree's memory while it runs on, and track what it writes
    /// after, for a later `dump --parent` that writes only what changed.
    PreDump {
        /// The process whose tree to pre-dump.
        #[arg(long = "tree", short = 't')]
        pid: i32,
        /// Directory for the images (created; must not hold a checkpoint).
        #[arg(long, short = 'D')]
        images: PathBuf,
        /// Write only the pages changed since this earlier pre-dump.
        #[arg(long, value_name = "DIR")]
        parent: Option<PathBuf>,
        /// Keep the tree stopped until its memory is copied, instead of
        /// copying from snapshots.
        #[arg(long)]
        frozen_copy: bool,
        /// Compress page content: lz4, zstd or zstd:LEVEL (1-19).
        #[arg(long, value_name = "ALG", default_value = "none")]
        compress: pages::Codec,
        #[command(flatten)]
        stream: StreamArgs,
    },
    /// Recreate a checkpointed process with its PID.
    Restore {
        /// The checkpoint directory.
        #[arg(long, short = 'D')]
        images: PathBuf,
        /// Return once the process runs, printing its PID.
        #[arg(long, short = 'd')]
        detach: bool,
        /// Write the restored root PID into FILE.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Reconnect unix sockets that were connected outside the checkpoint.
        #[arg(long)]
        ext_unix_sk: bool,
        /// Job id (cgroup name) for a restored job (default: the dumped one).
        #[arg(long)]
        job: Option<String>,
        /// Reopen the dumping shell's terminals on this agent's terminal
        /// (its stdin) and restore the tree into this agent's session.
        #[arg(long)]
        shell_job: bool,
        /// Rebuild the established TCP connections of the checkpoint.
        #[arg(long)]
        tcp_established: bool,
        /// Put the node's ends of the job's veths on this bridge (in this
        /// agent's network namespace) instead of the one recorded at dump.
        #[arg(long, value_name = "NAME")]
        bridge: Option<String>,
        /// Leave the restored job frozen, its TCP connections blocked, for
        /// the coordinator to release every part of a job at once
        /// (implies --detach; needs a job).
        #[arg(long)]
        hold: bool,
        /// Let the tree run at once and bring its private memory in on
        /// demand (userfaultfd) while copying the rest in the background;
        /// the pidfile is written as soon as it runs, and the agent
        /// returns once every page is in.
        #[arg(long)]
        lazy_pages: bool,
        /// With --json: print the report once the tree runs (or is held)
        /// too, before a lazy restore's pages are all in (for the agent
        /// service, which answers then).
        #[arg(long, hide = true)]
        notify_running: bool,
        /// The cluster key file: for a checkpoint whose pages are held by
        /// the agent of the node that dumped it (held.img, a post-copy
        /// migration's final level), fetched from there.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Start a command as a job: its own cgroup and PID, IPC, UTS and
    /// mount namespaces, private /tmp and /dev/shm.
    Run {
        /// Job id (default: generated); names the job's cgroup.
        #[arg(long)]
        job: Option<String>,
        /// Give the job its own network namespace (loopback only, unless
        /// --veth).
        #[arg(long)]
        net: bool,
        /// Give the job an interface eth0, one end of a veth pair whose
        /// other end joins BRIDGE in this agent's network namespace.
        #[arg(long, value_name = "BRIDGE", requires = "net")]
        veth: Option<String>,
        /// An address of eth0 with its prefix length (IPv4 or IPv6;
        /// repeatable).
        #[arg(long = "address", value_name = "CIDR", requires = "veth")]
        addresses: Vec<String>,
        /// Default route of the job via this address.
        #[arg(long, value_name = "IP", requires = "veth")]
        gateway: Option<String>,
        /// MAC address of eth0 (default: random, locally administered).
        #[arg(long, value_name = "MAC", requires = "veth")]
        mac: Option<String>,
        /// MTU of eth0 and of the node's end (default 1500).
        #[arg(long, value_name = "N", requires = "veth")]
        mtu: Option<u32>,
        /// Hostname inside the job.
        #[arg(long)]
        hostname: Option<String>,
        /// Return once the job runs, printing its root's PID.
        #[arg(long, short = 'd')]
        detach: bool,
        /// Write the job root's PID into FILE.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Append the job's stdout and stderr to FILE; its stdin is
        /// /dev/null.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Run the command as this user (a uid): root sets the job up, then
        /// the command starts with the user's ids, groups and no privilege.
        #[arg(long, value_name = "UID")]
        user: Option<u32>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Undo what an agent that died mid-way left: remove its network
    /// locks, take its sockets out of repair mode, thaw the jobs it froze.
    Cleanup {
        /// Also release the network lock a dump of this job kept on this
        /// node (the job was restored on another node).
        #[arg(long)]
        job: Option<String>,
    },
    /// Block, in this agent's network namespace, the TCP connections of a
    /// checkpoint about to be restored here, before its addresses move to
    /// this node; the restore takes the lock over and releases it.
    Lock {
        /// The checkpoint directory.
        #[arg(long, short = 'D')]
        images: PathBuf,
    },
    /// Run as the node's service for ckpt-coord: authenticated connections
    /// carry checkpoint (prepare, dump, finish or abort) and restore orders.
    Serve {
        /// Address to listen on (port 0: any free port; the address is
        /// printed once listening).
        #[arg(long, default_value = "0.0.0.0:7707")]
        listen: String,
        /// The cluster key file (mode 0600, at least 32 bytes).
        #[arg(long, default_value = "/etc/ckpt/cluster.key")]
        key: PathBuf,
        /// This node's name in the cluster configuration (default: hostname).
        #[arg(long)]
        node: Option<String>,
        /// Where work in progress is recorded, for a restarted agent.
        #[arg(long, default_value = "/var/lib/ckpt/agent")]
        state_dir: PathBuf,
        /// Serve users other than root on this unix socket: a coordinator
        /// run by a user who cannot read the cluster key reaches the
        /// cluster through it, acting as that user (SO_PEERCRED).
        #[arg(long, value_name = "PATH")]
        user_socket: Option<PathBuf>,
    },
    /// Receive checkpoints that other nodes' agents stream here
    /// (`dump --stream-to`): each into a sub-directory of DIR named as the
    /// sender's images directory, which exists once it is whole.
    PageServer {
        /// Where received checkpoints go.
        #[arg(long, short = 'D')]
        images: PathBuf,
        /// Address to listen on (port 0: any free port; the address is
        /// printed once listening).
        #[arg(long, default_value = "0.0.0.0:7708")]
        listen: String,
        /// The cluster key file the senders hold too.
        #[arg(long, default_value = "/etc/ckpt/cluster.key")]
        key: PathBuf,
    },
    /// Decode any image file.
    Show {
        /// The image file.
        path: PathBuf,
    },
}

/// Where a dump streams its images instead of writing them here.
#[derive(clap::Args, Debug)]
struct StreamArgs {
    /// Stream the checkpoint into the page server (or agent inbox) at
    /// HOST:PORT: pages go straight onto the connection; --images is then
    /// a spool for the small images (put it on tmpfs), whose name names
    /// the checkpoint there, and which a later --parent names.
    #[arg(long, value_name = "HOST:PORT")]
    stream_to: Option<String>,
    /// The inbox at the receiving agent (none for a page server).
    #[arg(long, requires = "stream_to", default_value = "")]
    inbox: String,
    /// The cluster key file the receiver holds too.
    #[arg(
        long = "key",
        requires = "stream_to",
        default_value = "/etc/ckpt/cluster.key"
    )]
    stream_key: PathBuf,
}

impl StreamArgs {
    fn target(&self) -> Result<Option<ckpt_agent::stream::StreamTo>, String> {
        let Some(addr) = &self.stream_to else {
            return Ok(None);
        };
        let key = ckpt_proto::rpc::Key::load(&self.stream_key)
            .map_err(|e| format!("{}: {e}", self.stream_key.display()))?;
        Ok(Some(ckpt_agent::stream::StreamTo {
            addr: addr.clone(),
            key,
            inbox: self.inbox.clone(),
        }))
    }
}

/// A progress bar on stderr, drawn only on a terminal.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        if json || !std::io::stderr().is_terminal() {
            return Bar(indicatif::ProgressBar::hidden());
        }
        Bar(indicatif::ProgressBar::new(0))
    }
}

impl ckpt_agent::progress::Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        let style = indicatif::ProgressStyle::with_template(
            "{msg:>16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid progress template")
        .progress_chars("=> ");
        self.0.set_style(style);
        self.0.set_message(what.to_string());
        self.0.set_length(total);
        self.0.set_position(0);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("ckpt-agent: error: {e}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ckpt_agent::logging::init(cli.verbose);
    match cli.cmd {
        Cmd::Check { features, images } => match images {
            Some(dir) => check_images(&dir, cli.json),
            None => ExitCode::from(ckpt_agent::check::run_cli(cli.json, &features) as u8),
        },
        Cmd::Dump {
            pid,
            images,
            leave_running,
            frozen_copy,
            ext_unix_sk,
            shell_job,
            tcp_established,
            parent,
            track_mem,
            compress,
            stream,
        } => {
            let stream = match stream.target() {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let req = dump::DumpRequest {
                pid,
                images,
                leave_running,
                snapshot: leave_running && !frozen_copy,
                tasks_in_parallel: true,
                ext_unix_sk,
                shell_job,
                tcp_established,
                pre_dump: false,
                parent,
                track_mem,
                compress,
                key: None,
                stream,
                hold: None,
            };
            run_dump(&req, cli.json, "dumped")
        }
        Cmd::PreDump {
            pid,
            images,
            parent,
            frozen_copy,
            compress,
            stream,
        } => {
            let stream = match stream.target() {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let req = dump::DumpRequest {
                pid,
                images,
                leave_running: true,
                snapshot: !frozen_copy,
                tasks_in_parallel: true,
                ext_unix_sk: false,
                shell_job: false,
                tcp_established: false,
                pre_dump: true,
                parent,
                track_mem: true,
                compress,
                key: None,
                stream,
                hold: None,
            };
            run_dump(&req, cli.json, "pre-dumped")
        }
        Cmd::Restore {
            images,
            detach,
            pidfile,
            ext_unix_sk,
            job,
            shell_job,
            tcp_established,
            bridge,
            hold,
            lazy_pages,
            notify_running,
            key,
        } => {
            let detach = detach || hold;
            let key = match key.map(|k| ckpt_proto::rpc::Key::load(&k).map_err(|e| (k, e))) {
                None => None,
                Some(Ok(k)) => Some(k),
                Some(Err((k, e))) => return fail(format!("{}: {e}", k.display())),
            };
            let req = restore::RestoreRequest {
                images,
                detach,
                hold,
                lazy_pages,
                pidfile,
                ext_unix_sk,
                job,
                shell_job,
                tcp_established,
                bridge,
                key,
            };
            let running = |r: &restore::RestoreReport| {
                if notify_running {
                    println!("{}", serde_json::to_string(r).expect("report serializes"));
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
            };
            match restore::restore_notify(&req, &Bar::new(cli.json), &running) {
                Ok((r, code)) => {
                    if cli.json {
                        println!("{}", serde_json::to_string(&r).expect("report serializes"));
                    } else if detach {
                        println!("{}", r.pid);
                    }
                    match code {
                        Some(c) => ExitCode::from(c as u8),
                        None => ExitCode::SUCCESS,
                    }
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Run {
            job,
            net,
            veth,
            addresses,
            gateway,
            mac,
            mtu,
            hostname,
            detach,
            pidfile,
            output,
            user,
            cmd,
        } => {
            let user = match user.map(ckpt_agent::user::ids_of).transpose() {
                Ok(u) => u,
                Err(e) => return fail(e),
            };
            run(
                job::RunRequest {
                    job,
                    net,
                    hostname,
                    veth: veth.map(|bridge| ckpt_agent::net::VethRequest {
                        bridge,
                        addresses,
                        gateway,
                        mac,
                        mtu,
                    }),
                    output,
                    user,
                    cmd,
                },
                detach,
                pidfile,
                cli.json,
            )
        }
        Cmd::Cleanup { job } => {
            let net = match ckpt_agent::netlock::recover(job.as_deref()) {
                Ok(n) => n,
                Err(e) => return fail(e),
            };
            let untracked = ckpt_agent::track::prune();
            match ckpt_agent::cgroup::recover_frozen() {
                Ok(jobs) => {
                    if cli.json {
                        println!(
                            "{}",
                            serde_json::json!({ "thawed": jobs, "unlocked": net.unlocked, "unrepaired": net.unrepaired, "untracked": untracked })
                        );
                    } else if jobs.is_empty()
                        && net.unlocked.is_empty()
                        && net.unrepaired.is_empty()
                        && untracked.is_empty()
                    {
                        println!("nothing to clean up");
                    } else {
                        for t in &net.unlocked {
                            println!("removed network lock {t}");
                        }
                        for s in &net.unrepaired {
                            println!("took socket {s} (pid/fd) out of TCP repair mode");
                        }
                        for j in &jobs {
                            println!("thawed job {j}, left frozen by an agent that died");
                        }
                        for p in &untracked {
                            println!("forgot the memory tracker of pid {p}, which is gone");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Lock { images } => match restore::lock_ahead(&images) {
            Ok(t) => {
                if cli.json {
                    println!("{}", serde_json::json!({ "table": t }));
                } else {
                    match t {
                        Some(t) => println!("locked: nftables table inet {t} until the restore"),
                        None => println!("nothing to lock: the checkpoint has no TCP socket"),
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Cmd::PageServer {
            images,
            listen,
            key,
        } => {
            let json = cli.json;
            let server = match ckpt_agent::stream::PageServer::bind(&images, &listen, &key) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let addr = match server.local_addr() {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            if json {
                println!("{}", serde_json::json!({ "listening": addr }));
            } else {
                println!(
                    "page server listening on {addr}, receiving into {}",
                    images.display()
                );
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
            server.run();
            ExitCode::SUCCESS
        }
        Cmd::Serve {
            listen,
            key,
            node,
            state_dir,
            user_socket,
        } => {
            let node = node.unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "localhost".into())
            });
            let cfg = ckpt_agent::serve::ServeConfig {
                listen,
                key,
                node,
                state_dir,
                user_socket,
            };
            let json = cli.json;
            let r = ckpt_agent::serve::serve(&cfg, |addr| {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "node": cfg.node, "listening": addr })
                    );
                } else {
                    println!("node {} listening on {addr}", cfg.node);
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Show { path } => match show::show(&path, cli.json) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

fn run(req: job::RunRequest, detach: bool, pidfile: Option<PathBuf>, json: bool) -> ExitCode {
    let j = match job::run(&req) {
        Ok(j) => j,
        Err(e) => return fail(e),
    };
    if let Some(pf) = &pidfile {
        if let Err(e) = std::fs::write(pf, format!("{}\n", j.pid)) {
            return fail(format!("{}: {e}", pf.display()));
        }
    }
    if json {
        let v = serde_json::json!({"job": j.id, "pid": j.pid, "cgroup": j.cgroup.dir});
        println!("{v}");
    } else if detach {
        println!("{}", j.pid);
    } else {
        eprintln!("job {} started, root pid {}", j.id, j.pid);
    }
    if detach {
        return ExitCode::SUCCESS;
    }
    match j.wait() {
        Ok(c) => ExitCode::from(c as u8),
        Err(e) => fail(e),
    }
}

fn check_images(dir: &std::path::Path, json: bool) -> ExitCode {
    let why = ckpt_agent::check::restorable(dir);
    let ok = why.is_empty();
    if json {
        let v = serde_json::json!({"ok": ok, "cannot_restore": why});
        println!("{v}");
    } else if ok {
        println!("this node can restore the checkpoint in {}", dir.display());
    } else {
        for w in &why {
            println!("cannot restore: {w}");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs a dump or pre-dump and prints its report (`what`: the verb).
fn run_dump(req: &dump::DumpRequest, json: bool, what: &str) -> ExitCode {
    match dump::dump_with_progress(req, &Bar::new(json)) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r).expect("report serializes"));
            } else {
                let into = match &r.streamed_to {
                    Some(to) => format!("streamed to {to}"),
                    None => format!("into {}", r.images.display()),
                };
                eprintln!(
                    "{what} pid {} ({} threads, {} MiB of pages) {into} in {:.1} ms, frozen {:.1} ms",
                    r.pid,
                    r.threads,
                    r.pages_bytes >> 20,
                    r.total_ms,
                    r.frozen_ms
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
