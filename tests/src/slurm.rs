//! A real Slurm 22.05 (Debian's slurmctld, slurmd, slurm-client, munge) on
//! a ckpt-lab cluster, for the Slurm preemption tests.
//!
//! Where things run:
//! - slurmctld and munged run on a controller of their own: a network
//!   namespace `ckl<K>-slurmctl` plugged into the lab's fabric bridge with
//!   address 198.18.K.254 (the lab's last job address, `job_address(154)`),
//!   and a UTS namespace whose hostname is `ckl<K>-slurmctl` (the
//!   `SlurmctldHost`). Tests destroy nodes; the controller must outlive
//!   them. The namespace carries the lab's prefix and its UTS file lives
//!   beside the nodes' ones, so `lab.down()` and `ckpt-lab sweep` remove
//!   them (and kill what runs there) even if this process dies.
//! - One `slurmd -D -N <hostname>` per lab node, entered with `on(node)`
//!   (nsenter: `ip netns exec` would hide the cgroup mounts).
//! - munged uses its own key and socket under the work dir; every daemon
//!   and client finds it through `AuthInfo=socket=...` in slurm.conf.
//! - Clients (sbatch, squeue, scontrol, ...) run in the controller's
//!   namespaces with `SLURM_CONF` set: from the root namespace they would
//!   hit the lab's prohibit route.
//!
//! Batch scripts run as root on the node: in the node's network and UTS
//! namespaces (hostname = node name), in the machine's mount, PID, IPC and
//! cgroup namespaces, with the environment of the `sbatch` call (which
//! includes the test process's: `--export=ALL`), cwd = the work dir. The
//! script itself is a copy in the node's spool dir (`$0` is not the file
//! given to `sbatch`).
//!
//! Measured (tests/tests/slurm_smoke.rs): up in about 1.1 s; a job starts
//! about 2 s after the first submission; with `--signal=B:USR1@60` the batch
//! shell gets USR1 0.3-3 s after a preemptor's submission (a trap runs
//! between commands only: run long steps as `cmd & wait $!`); the preemptor
//! starts as soon as the preempted job is requeued (`scontrol requeue` in
//! the handler); if nothing requeues it, after `GraceTime` Slurm sends
//! SIGTERM and requeues the job itself. A rerun truncates the job's output
//! file unless submitted with `--open-mode=append`. proctrack/linuxproc
//! only kills the batch shell's descendants: a process that was reparented
//! (a background child of a shell that exited) survives the job.
//!
//! Dropping a [`Slurm`] (also while a panic unwinds) kills every daemon and
//! everything they started (batch scripts and their children, found by the
//! `SLURM_CONF=<this slurm.conf>` in their environment, by descent, or by
//! living in the controller's namespaces), then removes the controller's
//! namespaces.

use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::on;

/// Last octet of the controller's address in the lab subnet.
pub const CONTROLLER_OCTET: u8 = 254;
/// Time allowed to the daemons to come up and every node to be idle.
pub const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to one client command (sbatch, scontrol, ...).
pub const CLIENT_TIMEOUT_SECS: u32 = 60;

/// Settings of [`Slurm::up_with`].
#[derive(Clone, Debug)]
pub struct SlurmOptions {
    /// `GraceTime` of partition `low`: seconds between the preemption
    /// signal (`--signal=B:USR1@..` with `preempt_send_user_signal`) and
    /// Slurm killing and requeueing the job itself.
    pub grace_time: u32,
    /// `SlurmdTimeout` (Slurm pings nodes every third of it; a node silent
    /// that long goes DOWN).
    pub slurmd_timeout: u32,
    /// `cred_expire` in `AuthInfo`: a step credential's lifetime, and also
    /// how long a requeued job waits (Reason=BeginTime) before it may run
    /// again (Slurm's default 120). Eligible is not started: with 10, a
    /// requeued job ran again 21 s after its requeue (the next backfill
    /// pass). [`Slurm::release_now`] skips the wait for one job.
    pub cred_expire: u32,
    /// CPUs each node advertises (`select/linear` hands out whole nodes).
    pub cpus: u32,
    /// Lines appended to slurm.conf (for keys not set above).
    pub extra_conf: Vec<String>,
}

impl Default for SlurmOptions {
    fn default() -> Self {
        SlurmOptions {
            grace_time: 60,
            slurmd_timeout: 30,
            cred_expire: 120,
            cpus: 2,
            extra_conf: Vec::new(),
        }
    }
}

/// A daemon this struct started, and where its stdout and stderr go.
struct Daemon {
    name: String,
    child: Child,
    out: PathBuf,
}

/// Slurm on a lab: munged, slurmctld, one slurmd per node. See the module
/// documentation.
pub struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    /// Name of the controller's network namespace (`ckl<K>-slurmctl`).
    ctl_netns: String,
    ctl_uts: PathBuf,
    ctl_host: String,
    ctl_addr: Ipv4Addr,
    fabric: String,
    nodes: Vec<String>,
    daemons: Vec<Daemon>,
    down: bool,
}

const FABRIC_PORT: &str = "slurmctl";

fn sh(cmd: &mut Command, what: &str) -> Result<String, String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!(
            "{what}: {cmd:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

fn ip(netns: Option<&str>, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    if let Some(n) = netns {
        c.args(["-n", n]);
    }
    c.args(args);
    c
}

/// The last `n` lines of a file, or why there are none.
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({e})"),
    }
}

fn mkdir(path: &Path, mode: u32) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

impl Slurm {
    /// Brings Slurm up on every node of `lab` with default options; state,
    /// spool, logs and the munge key go under `dir` (not /tmp). Panics,
    /// with the daemons' logs, if something does not come up.
    pub fn up(lab: &ckpt_lab::Lab, dir: &Path) -> Slurm {
        Slurm::up_with(lab, dir, &SlurmOptions::default())
    }

    /// [`Slurm::up`] with `opts`.
    pub fn up_with(lab: &ckpt_lab::Lab, dir: &Path, opts: &SlurmOptions) -> Slurm {
        let nodes: Vec<&ckpt_lab::Node> = lab.nodes().iter().filter(|n| n.exists()).collect();
        Slurm::up_on(lab, &nodes, dir, opts)
    }

    /// Brings Slurm up with a slurmd on each of `nodes` only.
    pub fn up_on(
        lab: &ckpt_lab::Lab,
        nodes: &[&ckpt_lab::Node],
        dir: &Path,
        opts: &SlurmOptions,
    ) -> Slurm {
        for prog in ["munged", "slurmctld", "slurmd", "sbatch"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
                .unwrap_or(false)
                || Path::new("/usr/sbin").join(prog).is_file();
            assert!(
                found,
                "{prog} is not installed: run scripts/install-deps.sh \
                 (Debian packages slurmctld slurmd slurm-client munge)"
            );
        }
        assert!(!nodes.is_empty(), "Slurm needs at least one node");
        let [a, b, c, _] = lab.subnet().network.octets();
        let uts_dir = nodes[0]
            .uts_path()
            .parent()
            .expect("a node's UTS file has a parent directory")
            .to_path_buf();
        let ctl_netns = format!("{}slurmctl", lab.netns_prefix());
        let dir = dir.to_path_buf();
        // From here on, a panic drops `s`, which cleans up what was built.
        let mut s = Slurm {
            conf: dir.join("slurm.conf"),
            dir,
            ctl_uts: uts_dir.join("slurmctl"),
            ctl_host: ctl_netns.clone(),
            ctl_netns,
            ctl_addr: Ipv4Addr::new(a, b, c, CONTROLLER_OCTET),
            fabric: lab.fabric_netns(),
            nodes: nodes.iter().map(|n| n.hostname().to_string()).collect(),
            daemons: Vec::new(),
            down: false,
        };
        let t = Instant::now();
        s.make_dirs();
        s.build_controller();
        s.write_conf(nodes, opts);
        s.start_munged();
        s.start(
            "slurmctld",
            s.ctl_prefix(),
            &["slurmctld", "-D"],
            s.dir.join("log/slurmctld.out"),
        );
        for n in nodes {
            s.start(
                &format!("slurmd {}", n.hostname()),
                on(n),
                &["slurmd", "-D", "-N", n.hostname()],
                s.dir.join(format!("log/slurmd-{}.out", n.hostname())),
            );
        }
        s.wait_all_idle(UP_TIMEOUT);
        eprintln!(
            "slurm: up on {} ({} nodes, controller {} at {}) in {:.1} s",
            s.dir.display(),
            s.nodes.len(),
            s.ctl_host,
            s.ctl_addr,
            t.elapsed().as_secs_f64()
        );
        s
    }

    fn make_dirs(&self) {
        mkdir(&self.dir, 0o755);
        for d in ["state", "log", "run", "spool", "tmp", "jobs"] {
            mkdir(&self.dir.join(d), 0o755);
        }
        for n in &self.nodes {
            mkdir(&self.dir.join("spool").join(n), 0o755);
            mkdir(&self.dir.join("tmp").join(n), 0o1777);
        }
        // munged wants its key private and its socket directory open to all.
        mkdir(&self.dir.join("munge"), 0o700);
        mkdir(&self.dir.join("munge-run"), 0o755);
        let mut key = vec![0u8; 1024];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .expect("reading /dev/urandom");
        let kf = self.munge_key();
        let _ = fs::remove_file(&kf);
        fs::write(&kf, &key).expect("writing the munge key");
        fs::set_permissions(&kf, fs::Permissions::from_mode(0o400)).expect("chmod munge key");
    }

    fn munge_key(&self) -> PathBuf {
        self.dir.join("munge/munge.key")
    }

    /// munged's socket, which every Slurm daemon and client uses.
    pub fn munge_socket(&self) -> PathBuf {
        self.dir.join("munge-run/munge.socket")
    }

    /// The controller's own network namespace on the fabric, and its UTS
    /// namespace named after `SlurmctldHost`.
    fn build_controller(&self) {
        let ns = self.ctl_netns.as_str();
        let fab = self.fabric.as_str();
        let ok = |r: Result<String, String>| r.unwrap_or_else(|e| panic!("slurm controller: {e}"));
        ok(sh(
            &mut ip(None, &["netns", "add", ns]),
            "creating its netns",
        ));
        let path = self.ctl_netns_path();
        ckpt_lab::in_netns_path(&path, || {
            for conf in ["all", "default"] {
                let knob = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                fs::write(&knob, "1").unwrap_or_else(|e| panic!("writing {knob}: {e}"));
            }
        })
        .unwrap_or_else(|e| panic!("slurm controller: entering {ns}: {e}"));
        ok(sh(
            &mut ip(
                Some(fab),
                &[
                    "link",
                    "add",
                    FABRIC_PORT,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                ],
            ),
            "creating its fabric veth",
        ));
        ok(sh(
            &mut ip(
                Some(fab),
                &["link", "set", FABRIC_PORT, "master", "fab0", "up"],
            ),
            "plugging it into the fabric bridge",
        ));
        let addr = format!("{}/24", self.ctl_addr);
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", &addr, "dev", "eth0"],
            &["link", "set", "eth0", "up"],
        ] {
            ok(sh(&mut ip(Some(ns), args), "configuring its eth0"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = ok(sh(
                Command::new("bridge").args(["-n", fab, "-j", "link", "show", "dev", FABRIC_PORT]),
                "reading its bridge port state",
            ));
            if out.contains("\"state\":\"forwarding\"") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "slurm controller: fabric port {FABRIC_PORT} never forwards: {out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fs::File::create(&self.ctl_uts)
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.ctl_uts.display()));
        ok(sh(
            Command::new("unshare")
                .arg(format!("--uts={}", self.ctl_uts.display()))
                .args(["hostname", &self.ctl_host]),
            "creating its UTS namespace",
        ));
    }

    /// /run/netns/ckl<K>-slurmctl.
    pub fn ctl_netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.ctl_netns)
    }

    /// The command prefix that runs a program on the controller (its
    /// network and UTS namespaces), like `on(node)` for a node.
    pub fn ctl_prefix(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net={}", self.ctl_netns_path().display()),
            format!("--uts={}", self.ctl_uts.display()),
            "--".into(),
        ]
    }

    /// The controller's hostname (`SlurmctldHost`).
    pub fn controller_host(&self) -> &str {
        &self.ctl_host
    }

    /// The controller's address, 198.18.K.254.
    pub fn controller_address(&self) -> Ipv4Addr {
        self.ctl_addr
    }

    /// The slurm.conf every daemon and client uses (`SLURM_CONF`).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The work dir (state, spool, logs; batch jobs start here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// NodeNames (= the nodes' hostnames), in lab order.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    fn write_conf(&self, nodes: &[&ckpt_lab::Node], opts: &SlurmOptions) {
        let d = self.dir.display();
        let mut c = String::new();
        let _ = write!(
            c,
            "# Written by ckpt-tests (tests/src/slurm.rs).\n\
             ClusterName={cluster}\n\
             SlurmctldHost={host}({addr})\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket},cred_expire={cred_expire}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool/%n\n\
             SlurmctldPidFile={d}/run/slurmctld.pid\n\
             SlurmdPidFile={d}/run/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd-%n.log\n\
             SlurmctldDebug=info\n\
             SlurmdDebug=info\n\
             TmpFS={d}/tmp/%n\n\
             MailProg=/bin/true\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             MpiDefault=none\n\
             SwitchType=switch/none\n\
             SelectType=select/linear\n\
             SchedulerType=sched/backfill\n\
             SlurmctldParameters=preempt_send_user_signal\n\
             PreemptType=preempt/partition_prio\n\
             PreemptMode=REQUEUE\n\
             JobRequeue=1\n\
             ReturnToService=2\n\
             SlurmdTimeout={slurmd_timeout}\n\
             SlurmctldTimeout=30\n\
             MessageTimeout=10\n\
             InactiveLimit=0\n\
             KillWait=5\n\
             MinJobAge=300\n\
             SlurmdParameters=config_overrides\n",
            cluster = self.ctl_netns.trim_end_matches("-slurmctl"),
            host = self.ctl_host,
            addr = self.ctl_addr,
            socket = self.munge_socket().display(),
            slurmd_timeout = opts.slurmd_timeout,
            cred_expire = opts.cred_expire,
        );
        for n in nodes {
            let _ = writeln!(
                c,
                "NodeName={} NodeAddr={} CPUs={} State=UNKNOWN",
                n.hostname(),
                n.address(),
                opts.cpus
            );
        }
        let _ = write!(
            c,
            "PartitionName=low Nodes=ALL Default=YES PriorityTier=1 GraceTime={} \
             MaxTime=INFINITE State=UP\n\
             PartitionName=high Nodes=ALL PriorityTier=10 PreemptMode=OFF \
             MaxTime=INFINITE State=UP\n",
            opts.grace_time
        );
        for l in &opts.extra_conf {
            let _ = writeln!(c, "{l}");
        }
        fs::write(&self.conf, c).expect("writing slurm.conf");
    }

    fn start_munged(&mut self) {
        let d = &self.dir;
        let args = [
            "munged".to_string(),
            "-F".into(),
            // Work dirs (Workdir::for_job) are world-writable: munged would
            // refuse a key, seed or socket below one without --force.
            "--force".into(),
            format!("--origin={}", self.ctl_addr),
            format!("--socket={}", self.munge_socket().display()),
            format!("--key-file={}", self.munge_key().display()),
            format!("--pid-file={}", d.join("munge-run/munged.pid").display()),
            format!("--seed-file={}", d.join("munge/munged.seed").display()),
            format!("--log-file={}", d.join("log/munged.log").display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start(
            "munged",
            self.ctl_prefix(),
            &args,
            self.dir.join("log/munged.out"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let socket = self.munge_socket();
        loop {
            if socket.exists() {
                let ok = Command::new("munge")
                    .arg("-n")
                    .arg("-S")
                    .arg(&socket)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
            }
            self.check_daemons("munged to answer");
            if Instant::now() > deadline {
                panic!(
                    "munged did not answer on {}{}",
                    socket.display(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `args` after `prefix` with SLURM_CONF set, its output to `out`.
    fn start(&mut self, name: &str, prefix: Vec<String>, args: &[&str], out: PathBuf) {
        let log =
            fs::File::create(&out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
        let child = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.daemons.push(Daemon {
            name: name.to_string(),
            child,
            out,
        });
    }

    /// Panics, with the logs, if a daemon has exited.
    fn check_daemons(&mut self, waiting_for: &str) {
        let mut dead = Vec::new();
        for d in &mut self.daemons {
            if let Ok(Some(st)) = d.child.try_wait() {
                dead.push(format!("{} exited ({st})", d.name));
            }
        }
        if !dead.is_empty() {
            panic!(
                "waiting for {waiting_for}: {}{}",
                dead.join(", "),
                self.logs()
            );
        }
    }

    /// Waits until every node is idle in `sinfo`.
    pub fn wait_all_idle(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            self.check_daemons("every node to be idle");
            let o = self.client("sinfo", &["-h", "-N", "-o", "%N %T"]);
            let last = if o.status.success() {
                let last = String::from_utf8_lossy(&o.stdout).into_owned();
                let idle: Vec<&str> = last
                    .lines()
                    .filter_map(|l| l.split_once(' '))
                    .filter(|(_, st)| *st == "idle")
                    .map(|(n, _)| n)
                    .collect();
                if self.nodes.iter().all(|n| idle.contains(&n.as_str())) {
                    return;
                }
                last
            } else {
                String::from_utf8_lossy(&o.stderr).into_owned()
            };
            if Instant::now() > deadline {
                panic!(
                    "Slurm: not every node idle after {} s; sinfo says:\n{last}{}",
                    within.as_secs(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The tails of the daemons' logs, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let log = self.dir.join("log");
        let mut files = vec![
            log.join("slurmctld.log"),
            log.join("munged.out"),
            log.join("slurmctld.out"),
        ];
        for n in &self.nodes {
            files.push(log.join(format!("slurmd-{n}.log")));
        }
        for d in &self.daemons {
            if !files.contains(&d.out) {
                files.push(d.out.clone());
            }
        }
        for f in files {
            if f.exists() {
                let _ = write!(s, "\n=== {} (tail)\n{}", f.display(), tail(&f, 25));
            }
        }
        s
    }

    // ------------------------------------------------------------ clients

    /// A Slurm client command run on the controller with SLURM_CONF set,
    /// in the work dir, bounded by `timeout`.
    pub fn client_command(&self, program: &str, args: &[&str]) -> Command {
        let prefix = self.ctl_prefix();
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..])
            .args(["timeout", &CLIENT_TIMEOUT_SECS.to_string(), program])
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        c
    }

    /// Runs a Slurm client to its end (see [`Slurm::client_command`]).
    pub fn client(&self, program: &str, args: &[&str]) -> Output {
        self.client_command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// Submits `script` with `sbatch --parsable ARGS SCRIPT`, with `env`
    /// added to the environment it passes to the job (the test process's
    /// own is passed too). The job's output goes to
    /// `<dir>/jobs/slurm-<id>.out` unless `args` says otherwise. Returns
    /// the job id; panics if sbatch fails.
    pub fn sbatch(&self, args: &[&str], script: &Path, env: &[(&str, &str)]) -> u32 {
        let has_output = args
            .iter()
            .any(|a| a.starts_with("-o") || a.starts_with("--output"));
        let output = format!("--output={}/jobs/slurm-%j.out", self.dir.display());
        let mut all: Vec<&str> = vec!["--parsable"];
        if !has_output {
            all.push(&output);
        }
        all.extend_from_slice(args);
        let script_s = script.to_string_lossy();
        all.push(&script_s);
        let o = self
            .client_command("sbatch", &all)
            .envs(env.iter().copied())
            .output()
            .expect("running sbatch");
        let out = String::from_utf8_lossy(&o.stdout);
        let id = out
            .trim()
            .split(';')
            .next()
            .and_then(|s| s.parse::<u32>().ok());
        match (o.status.success(), id) {
            (true, Some(id)) => id,
            _ => panic!(
                "sbatch {} failed ({}): {out}{}{}",
                all.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr),
                self.logs()
            ),
        }
    }

    /// Runs `scontrol ARGS`.
    pub fn scontrol(&self, args: &[&str]) -> Output {
        self.client("scontrol", args)
    }

    /// `scontrol show job -o J` as KEY=VALUE pairs (empty if unknown).
    pub fn job_fields(&self, job: u32) -> Vec<(String, String)> {
        let o = self.scontrol(&["show", "job", "-o", &job.to_string()]);
        if !o.status.success() {
            return Vec::new();
        }
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn job_field(&self, job: u32, key: &str) -> Option<String> {
        self.job_fields(job)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// `scontrol show job J`, for a failure message.
    pub fn job_info(&self, job: u32) -> String {
        let o = self.scontrol(&["show", "job", &job.to_string()]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// The job's state (PENDING, RUNNING, COMPLETING, COMPLETED,
    /// CANCELLED, REQUEUED, ...), or "UNKNOWN" if Slurm does not know it.
    pub fn squeue_state(&self, job: u32) -> String {
        let o = self.client(
            "squeue",
            &["-h", "-t", "all", "-j", &job.to_string(), "-o", "%T"],
        );
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if o.status.success() && !s.is_empty() {
            return s;
        }
        self.job_field(job, "JobState")
            .unwrap_or_else(|| "UNKNOWN".into())
    }

    /// The hostnames of the job's nodes (empty while it has none).
    pub fn job_nodes(&self, job: u32) -> Vec<String> {
        let list = match self.job_field(job, "NodeList") {
            Some(l) if !l.is_empty() && l != "(null)" => l,
            _ => return Vec::new(),
        };
        let o = self.scontrol(&["show", "hostnames", &list]);
        assert!(
            o.status.success(),
            "scontrol show hostnames {list}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Makes a requeued job eligible now instead of after `cred_expire`
    /// (~120 s): `scontrol update jobid=J StartTime=now`, once the job is
    /// PENDING (a requeued job passes through COMPLETING and REQUEUED
    /// first; up to 60 s). Panics if it fails.
    pub fn release_now(&self, job: u32) {
        if let Err(e) = self.wait_state(job, &["PENDING"], Duration::from_secs(60)) {
            panic!("releasing job {job}: {e}{}", self.logs());
        }
        let o = self.scontrol(&["update", &format!("jobid={job}"), "StartTime=now"]);
        assert!(
            o.status.success(),
            "scontrol update jobid={job} StartTime=now failed ({}): {}{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.job_info(job)
        );
    }

    /// Cancels the job (`scancel J`).
    pub fn cancel(&self, job: u32) {
        let o = self.client("scancel", &[&job.to_string()]);
        assert!(
            o.status.success(),
            "scancel {job}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Polls the job's state until it is one of `states` (returned), or
    /// fails after `within` with the state it was in and the job's record.
    pub fn wait_state(
        &self,
        job: u32,
        states: &[&str],
        within: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let st = self.squeue_state(job);
            if states.contains(&st.as_str()) {
                return Ok(st);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "job {job} is {st} after {} s, not one of {states:?}\n{}",
                    within.as_secs(),
                    self.job_info(job)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // ------------------------------------------------------------ teardown

    /// Kills every daemon and what they started, removes the controller's
    /// namespaces; returns what could not be cleaned up. Dropping does the
    /// same (and ignores the problems).
    pub fn shutdown(mut self) -> Result<(), String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), String> {
        if self.down {
            return Ok(());
        }
        self.down = true;
        let mut problems = Vec::new();
        let marker = format!("SLURM_CONF={}", self.conf.display());
        let ns = [ns_inode(&self.ctl_netns_path()), ns_inode(&self.ctl_uts)];
        let own: Vec<i32> = self.daemons.iter().map(|d| d.child.id() as i32).collect();
        let is_ours = |pid: i32| {
            own.contains(&pid)
                || environ_has(pid, &marker)
                || ["net", "uts"]
                    .iter()
                    .any(|t| proc_ns(pid, t).is_some_and(|i| ns.contains(&Some(i))))
        };
        let killed = stop_and_kill(is_ours);
        for d in &mut self.daemons {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        // Gone means no longer running: zombies of others' are init's to reap.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive: Vec<i32> = killed.iter().copied().filter(|&p| running(p)).collect();
            if alive.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                problems.push(format!("processes still running after SIGKILL: {alive:?}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.ctl_netns_path().exists() {
            if let Err(e) = sh(
                &mut ip(None, &["netns", "del", &self.ctl_netns]),
                "teardown",
            ) {
                if self.ctl_netns_path().exists() {
                    problems.push(e);
                }
            }
        }
        if self.ctl_uts.exists() {
            let _ = Command::new("umount").arg("-l").arg(&self.ctl_uts).status();
            if let Err(e) = fs::remove_file(&self.ctl_uts) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("removing {}: {e}", self.ctl_uts.display()));
                }
            }
        }
        let left: Vec<i32> = all_pids()
            .into_iter()
            .filter(|&p| running(p) && environ_has(p, &marker))
            .collect();
        if !left.is_empty() {
            problems.push(format!("processes with {marker} left: {left:?}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("slurm teardown: {e}");
        }
    }
}

// ------------------------------------------------------------ /proc

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The inode of the namespace at `path` (a /proc/PID/ns link or a bind
/// mount of one); None if it is not a namespace (e.g. an unmounted file).
fn ns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let nsfs = fs::metadata("/proc/self/ns/uts").ok()?.dev();
    fs::metadata(path)
        .ok()
        .filter(|m| m.dev() == nsfs)
        .map(|m| m.ino())
}

fn proc_ns(pid: i32, kind: &str) -> Option<u64> {
    ns_inode(Path::new(&format!("/proc/{pid}/ns/{kind}")))
}

fn environ_has(pid: i32, entry: &str) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|e| e.split(|&b| b == 0).any(|v| v == entry.as_bytes()))
        .unwrap_or(false)
}

/// (state, ppid) from /proc/PID/stat.
fn stat(pid: i32) -> Option<(char, i32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

fn running(pid: i32) -> bool {
    stat(pid).is_some_and(|(st, _)| st != 'Z' && st != 'X')
}

/// This process and its ancestors: never to be touched.
fn ancestors() -> Vec<i32> {
    let mut v = Vec::new();
    let mut p = std::process::id() as i32;
    while p > 1 {
        v.push(p);
        match stat(p) {
            Some((_, pp)) => p = pp,
            None => break,
        }
    }
    v.push(1);
    v
}

/// Stops every process `is_ours` picks and all their descendants, again
/// until no new one appears (a stopped process cannot fork), then kills
/// them all. Returns their pids.
fn stop_and_kill(is_ours: impl Fn(i32) -> bool) -> Vec<i32> {
    let spare = ancestors();
    let mut found: Vec<i32> = Vec::new();
    for _round in 0..50 {
        let table: Vec<(i32, i32)> = all_pids()
            .into_iter()
            .filter_map(|p| stat(p).map(|(_, pp)| (p, pp)))
            .collect();
        let mut set: Vec<i32> = table
            .iter()
            .map(|&(p, _)| p)
            .filter(|&p| !spare.contains(&p) && (found.contains(&p) || is_ours(p)))
            .collect();
        // Descendants of anything found.
        loop {
            let more: Vec<i32> = table
                .iter()
                .filter(|(p, pp)| set.contains(pp) && !set.contains(p) && !spare.contains(p))
                .map(|&(p, _)| p)
                .collect();
            if more.is_empty() {
                break;
            }
            set.extend(more);
        }
        let new: Vec<i32> = set.iter().copied().filter(|p| !found.contains(p)).collect();
        if new.is_empty() {
            break;
        }
        for &p in &new {
            // SAFETY: sending a signal has no memory-safety implications.
            unsafe { libc::kill(p, libc::SIGSTOP) };
        }
        found.extend(new);
    }
    for &p in &found {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    found
}
