//! Test harness shared by the suites.
//!
//! The zdtm-style flow ([`run_case`]): start a `zdtm-case` program, wait
//! until it has built its state, checkpoint it with `ckpt-agent dump`,
//! restore it with `ckpt-agent restore --detach`, send SIGTERM and read the
//! verdict the restored process wrote about itself. The building blocks
//! ([`CaseProcess`], [`agent`], [`Workdir`]) are public for the bad-input
//! tests.

pub mod slurm;

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Time allowed to a case to build its state.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to one agent invocation.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to a case between SIGTERM and its exit (the longest case
/// sleeps 3 s on purpose).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a case is taken through checkpoint and restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Dump (which kills the case), restore, check the restored process.
    Kill,
    /// Dump with `--leave-running`, check the original, then restore from
    /// the images and check the restored process too.
    LeaveRunning,
    /// No checkpoint at all: validates the case programs themselves.
    /// Selected for every test by `CKPT_ZDTM_NOCKPT=1`.
    NoCheckpoint,
    /// The case runs as a job (`ckpt-agent run`: own cgroup and PID, IPC,
    /// UTS and mount namespaces); dump kills it; restore recreates the
    /// namespaces and the case checks itself there (PID 1 inside again).
    Job,
}

/// True when `CKPT_ZDTM_NOCKPT=1` asks to skip checkpoint and restore.
pub fn no_checkpoint() -> bool {
    std::env::var("CKPT_ZDTM_NOCKPT").is_ok_and(|v| v == "1")
}

/// The mode a test asked for, unless `CKPT_ZDTM_NOCKPT=1` overrides it.
pub fn effective_mode(requested: Mode) -> Mode {
    if no_checkpoint() {
        Mode::NoCheckpoint
    } else {
        requested
    }
}

// ------------------------------------------------------------ binaries

/// `ckpt-agent`: `$CKPT_AGENT`, else the one built next to this test
/// executable (target/{debug,release}/ckpt-agent, same profile first).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CKPT_AGENT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let mut candidates = vec![profile_dir.join("ckpt-agent")];
    if let Some(target) = profile_dir.parent() {
        for profile in ["debug", "release"] {
            candidates.push(target.join(profile).join("ckpt-agent"));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "ckpt-agent not found (looked at {candidates:?}); build it with \
                 `cargo build -p ckpt-agent` or set CKPT_AGENT"
            )
        })
}

/// `ckpt-coord`: `$CKPT_COORD`, else the one built beside ckpt-agent (a
/// binary of another package: build it with `cargo build -p ckpt-coord`).
pub fn coord_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CKPT_COORD") {
        return PathBuf::from(p);
    }
    let p = agent_binary().with_file_name("ckpt-coord");
    assert!(
        p.is_file(),
        "ckpt-coord not found at {}; build it with `cargo build -p ckpt-coord` or set CKPT_COORD",
        p.display()
    );
    p
}

// ------------------------------------------------------------ work dirs

/// A per-case directory under `$CKPT_TEST_DIR` or the system temp dir,
/// removed when dropped unless the test is failing (then kept, and its path
/// printed, for a post-mortem).
pub struct Workdir {
    pub path: PathBuf,
    /// Every agent invocation made for this case, described, in order.
    runs: Mutex<Vec<String>>,
}

impl Workdir {
    pub fn new(name: &str) -> Workdir {
        Self::new_in(name, std::env::temp_dir())
    }

    /// A work dir outside /tmp (under `$CKPT_TEST_DIR` or /var/tmp), for
    /// cases run as jobs: a job's /tmp is its own.
    pub fn for_job(name: &str) -> Workdir {
        Self::new_in(name, PathBuf::from("/var/tmp"))
    }

    fn new_in(name: &str, default_base: PathBuf) -> Workdir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("CKPT_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or(default_base);
        let path = base.join(format!(
            "ckpt-zdtm-{}-{}-{}",
            name,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("tmp")).expect("create work dir");
        // Cases that drop privileges (creds) still create their files here.
        for d in [path.clone(), path.join("tmp")] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).expect("chmod work dir");
        }
        Workdir {
            path,
            runs: Mutex::new(Vec::new()),
        }
    }

    /// The agent invocations made so far, for a failure message.
    pub fn agent_report(&self) -> String {
        let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.iter().map(|r| format!("\n=== {r}")).collect()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept work dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ------------------------------------------------------------ processes

/// Makes this test process a child subreaper, once: a restored process is
/// a child of the restoring agent, and when `--detach` lets the agent exit
/// it is reparented here, so that it can be waited for.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: an integer prctl on this process.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER failed");
    });
}

/// Whether a process with this PID exists (zombies included).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` no longer runs: gone, or a zombie not yet reaped.
pub fn dead(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
        st.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

/// PIDs of processes whose command line contains `needle` (a work dir path
/// identifies a test's own processes, whatever else runs in parallel).
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(needle))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// waitpid(pid) with a timeout; the process must be our child (or have
/// been reparented to us). Returns the raw wait status.
pub fn wait_pid(pid: i32, timeout: Duration) -> Result<i32, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: out-pointer only.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(status);
        }
        if r < 0 {
            return Err(format!(
                "waitpid({pid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("pid {pid} still running after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

fn kill(pid: i32, sig: i32) -> bool {
    // SAFETY: no pointers.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// How `CaseProcess::spawn_job_with` starts the agent that runs a job.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// Command and arguments the agent runs under (e.g. `nsenter
    /// --net=/run/netns/NAME`, which execs it: the agent stays our child).
    pub prefix: Vec<String>,
    /// Extra `ckpt-agent run` options.
    pub run_args: Vec<String>,
    /// Extra environment for the agent and so for the case.
    pub env: Vec<(String, String)>,
}

/// A running case program (the original, or the restored process under the
/// same PID). Dropping it SIGKILLs and reaps whatever is still ours.
pub struct CaseProcess {
    pub name: String,
    pub pid: i32,
    /// The original, spawned by us; None once reaped or for a restored one.
    child: Option<Child>,
    /// True while a restored process with `pid` is believed alive and ours.
    restored: bool,
    pub ready: PathBuf,
    pub result: PathBuf,
    pub log: PathBuf,
}

/// `NAME --ready DIR/ready --result DIR/result`, the case's temp dir, stdin
/// /dev/null and stdout+stderr on `log`.
fn case_args(cmd: &mut Command, name: &str, dir: &Workdir, log: &Path) -> Result<(), String> {
    let log_file = fs::File::create(log).map_err(|e| format!("create log: {e}"))?;
    let err_file = log_file.try_clone().map_err(|e| e.to_string())?;
    cmd.arg(name)
        .arg("--ready")
        .arg(dir.join("ready"))
        .arg("--result")
        .arg(dir.join("result"))
        .env("CKPT_ZDTM_TMP", dir.join("tmp"))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file);
    Ok(())
}

impl CaseProcess {
    /// Starts `zdtm-case NAME` with stdin /dev/null and stdout+stderr on one
    /// log file, and no descriptors but those three.
    pub fn spawn(case_bin: &Path, name: &str, dir: &Workdir) -> Result<CaseProcess, String> {
        Self::spawn_in(&[], case_bin, name, dir)
    }

    /// `spawn` under a command `prefix` that execs the case (e.g.
    /// `nsenter --net=...`: the case runs in a lab node's namespaces).
    pub fn spawn_in(
        prefix: &[String],
        case_bin: &Path,
        name: &str,
        dir: &Workdir,
    ) -> Result<CaseProcess, String> {
        become_subreaper();
        let (ready, result, log) = (dir.join("ready"), dir.join("result"), dir.join("case.log"));
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(case_bin);
                c
            }
            None => Command::new(case_bin),
        };
        case_args(&mut cmd, name, dir, &log)?;
        // SAFETY: close_range is async-signal-safe. Descriptors inherited by
        // the test runner without CLOEXEC (a make jobserver pipe, say) would
        // otherwise become part of every case's state.
        unsafe {
            cmd.pre_exec(|| {
                libc::close_range(3, u32::MAX, 0);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", case_bin.display()))?;
        Ok(CaseProcess {
            name: name.to_string(),
            pid: child.id() as i32,
            child: Some(child),
            restored: false,
            ready,
            result,
            log,
        })
    }

    /// Starts `zdtm-case NAME` as job `job` under `ckpt-agent run` (which
    /// stays its parent and waits for it); `pid` is the job root's PID as
    /// this test sees it.
    pub fn spawn_job(
        case_bin: &Path,
        name: &str,
        job: &str,
        dir: &Workdir,
    ) -> Result<CaseProcess, String> {
        Self::spawn_job_with(case_bin, name, job, dir, &JobOptions::default())
    }

    /// `spawn_job` with a command in front of the agent (e.g. `nsenter
    /// --net=...`), extra `run` options and extra environment for the case.
    pub fn spawn_job_with(
        case_bin: &Path,
        name: &str,
        job: &str,
        dir: &Workdir,
        opts: &JobOptions,
    ) -> Result<CaseProcess, String> {
        become_subreaper();
        let (ready, result, log) = (dir.join("ready"), dir.join("result"), dir.join("case.log"));
        let pidfile = dir.join("job.pid");
        // A job's /tmp is its own: the case binary may live under the
        // node's (a checkout in /tmp), so the job runs a copy beside its
        // work dir.
        let copy = dir.join("zdtm-case");
        fs::copy(case_bin, &copy).map_err(|e| format!("copy {}: {e}", case_bin.display()))?;
        let case_bin = copy.as_path();
        let mut cmd = match opts.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        cmd.args(["run", "--job", job, "--hostname", "zdtm-job"]);
        // Cases named job_net* get a network namespace of their own.
        if name.starts_with("job_net") {
            cmd.arg("--net");
        }
        cmd.args(&opts.run_args);
        cmd.arg("--pidfile").arg(&pidfile).arg("--").arg(case_bin);
        // Not the test's own directory, which may be under the node's /tmp.
        cmd.current_dir(&dir.path);
        case_args(&mut cmd, name, dir, &log)?;
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn ckpt-agent run: {e}"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid = loop {
            if let Some(p) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "ckpt-agent run exited ({st}); log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("ckpt-agent run wrote no pidfile".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(CaseProcess {
            name: name.to_string(),
            pid,
            child: Some(child),
            restored: false,
            ready,
            result,
            log,
        })
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// Waits for the ready file; fails fast, with the log, if the case
    /// exits first.
    pub fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.ready.exists() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "case {} exited before ready ({st}); result: {}; log:\n{}",
                        self.name,
                        read_or(&self.result),
                        self.log_text()
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "case {} not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.name,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// After a successful dump without --leave-running the original must be
    /// gone: reaps it and reports how it ended.
    pub fn expect_gone(&mut self) -> Result<String, String> {
        let child = self.child.as_mut().ok_or("original already reaped")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Ok(st.to_string());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "original pid {} still running 5 s after a successful dump",
                    self.pid
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Records that a restore recreated this case under its PID.
    pub fn adopt_restored(&mut self) {
        self.restored = true;
    }

    /// Sends SIGTERM, waits for the exit and returns the verdict file's text
    /// (which must be PASS) or a failure message with everything known.
    pub fn terminate_and_check(&mut self, context: &str) -> Result<(), String> {
        self.terminate(context)?;
        self.check_exit(context)
    }

    /// Tells the case to check itself and exit (SIGTERM), without waiting:
    /// cases that talk to each other are told together, then checked.
    pub fn terminate(&mut self, context: &str) -> Result<(), String> {
        clear_result(&self.result);
        if !kill(self.pid, libc::SIGTERM) {
            return Err(format!(
                "{context}: cannot signal pid {}: {}; log:\n{}",
                self.pid,
                std::io::Error::last_os_error(),
                self.log_text()
            ));
        }
        Ok(())
    }

    /// Waits for a case told to terminate and reads its verdict.
    pub fn check_exit(&mut self, context: &str) -> Result<(), String> {
        let status = if let Some(mut child) = self.child.take() {
            wait_child(&mut child, EXIT_TIMEOUT).map(|s| describe_exit(&s))
        } else {
            let r = wait_pid(self.pid, EXIT_TIMEOUT).map(describe_status);
            if r.is_ok() {
                self.restored = false;
            }
            r
        };
        let result = read_or(&self.result);
        match status {
            Ok(st) if result.trim() == "PASS" && st == "exit 0" => Ok(()),
            Ok(st) => Err(format!(
                "{context}: case {} (pid {}) ended with {st}; result: {}; log:\n{}",
                self.name,
                self.pid,
                result.trim(),
                self.log_text()
            )),
            Err(e) => Err(format!(
                "{context}: case {}: {e}; result so far: {}; log:\n{}",
                self.name,
                result.trim(),
                self.log_text()
            )),
        }
    }
}

impl Drop for CaseProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A job's root is the child's child: killing it ends the agent.
            if child.id() as i32 != self.pid {
                kill(self.pid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.restored && kill(self.pid, libc::SIGKILL) {
            let _ = wait_pid(self.pid, Duration::from_secs(5));
        }
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Ok(st),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {timeout:?}; killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
}

fn describe_exit(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

/// Empties a verdict file left by an earlier run. Truncated, not removed:
/// cases that drop access to the path (chroot, creds) opened it early and
/// write through that descriptor, restored ones included.
fn clear_result(p: &Path) {
    let _ = fs::OpenOptions::new().write(true).truncate(true).open(p);
}

fn read_or(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|_| "<none>".into())
}

// ------------------------------------------------------------ the agent

/// One finished agent invocation.
#[derive(Debug)]
pub struct AgentRun {
    pub args: Vec<String>,
    /// None when the agent was killed (timeout or signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl AgentRun {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn describe(&self) -> String {
        format!(
            "`ckpt-agent {}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code
                .map_or("killed/timed out".to_string(), |c| format!("exit {c}")),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `ckpt-agent ARGS` with a timeout. Its output goes to files in
/// `dir`, not pipes: a detached restored process could otherwise inherit a
/// pipe and keep it open after the agent exits.
pub fn agent(args: &[&str], dir: &Workdir, label: &str) -> AgentRun {
    agent_in(&[], args, dir, label)
}

/// `agent` run under a command `prefix` (e.g. `nsenter --net=...`, which
/// execs the agent).
pub fn agent_in(prefix: &[&str], args: &[&str], dir: &Workdir, label: &str) -> AgentRun {
    let out_path = dir.join(&format!("agent-{label}.out"));
    let err_path = dir.join(&format!("agent-{label}.err"));
    let args_owned: Vec<String> = prefix.iter().chain(args).map(|s| s.to_string()).collect();
    let run = |code| AgentRun {
        args: args_owned.clone(),
        code,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    };
    let (Ok(out), Ok(err)) = (fs::File::create(&out_path), fs::File::create(&err_path)) else {
        panic!("cannot create agent output files in {}", dir.path.display());
    };
    let mut command = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(agent_binary());
            c
        }
        None => Command::new(agent_binary()),
    };
    // In the work dir: a job started by `run` refuses a current directory
    // under /tmp (where a CI checkout may be), which it could not see.
    let spawned = command
        .args(args)
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let mut r = run(None);
            let _ = write!(r.stderr, "spawn ckpt-agent: {e}");
            dir.runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(r.describe());
            return r;
        }
    };
    let r = match wait_child(&mut child, AGENT_TIMEOUT) {
        Ok(st) => run(st.code()),
        Err(e) => {
            let mut r = run(None);
            let _ = write!(r.stderr, "\n[harness] agent {e}");
            r
        }
    };
    dir.runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(r.describe());
    r
}

/// `ckpt-agent dump --tree PID --images DIR [extra...]`.
pub fn dump(pid: i32, images: &Path, extra: &[&str], dir: &Workdir) -> AgentRun {
    dump_in(&[], pid, images, extra, dir)
}

/// `dump` with the agent run under a command `prefix`.
pub fn dump_in(
    prefix: &[&str],
    pid: i32,
    images: &Path,
    extra: &[&str],
    dir: &Workdir,
) -> AgentRun {
    fs::create_dir_all(images).expect("create images dir");
    let pid_s = pid.to_string();
    let images_s = images.to_string_lossy().into_owned();
    let mut args = vec!["dump", "--tree", &pid_s, "--images", &images_s];
    args.extend_from_slice(extra);
    agent_in(prefix, &args, dir, "dump")
}

/// `ckpt-agent restore --images DIR --detach --pidfile DIR/../restore-N.pid`;
/// returns the run and the PID from the pidfile, if any.
pub fn restore_detached(images: &Path, dir: &Workdir, label: &str) -> (AgentRun, Option<i32>) {
    restore_detached_with(images, &[], dir, label)
}

/// `restore_detached` with extra agent arguments (e.g. `--ext-unix-sk`).
pub fn restore_detached_with(
    images: &Path,
    extra: &[&str],
    dir: &Workdir,
    label: &str,
) -> (AgentRun, Option<i32>) {
    restore_detached_in(&[], images, extra, dir, label)
}

/// `restore_detached_with` with the agent run under a command `prefix`.
pub fn restore_detached_in(
    prefix: &[&str],
    images: &Path,
    extra: &[&str],
    dir: &Workdir,
    label: &str,
) -> (AgentRun, Option<i32>) {
    let pidfile = dir.join(&format!("{label}.pid"));
    let _ = fs::remove_file(&pidfile);
    let images_s = images.to_string_lossy().into_owned();
    let pidfile_s = pidfile.to_string_lossy().into_owned();
    let mut args = vec![
        "restore",
        "--images",
        &images_s,
        "--detach",
        "--pidfile",
        &pidfile_s,
    ];
    args.extend_from_slice(extra);
    let run = agent_in(prefix, &args, dir, label);
    let pid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    (run, pid)
}

// ------------------------------------------------------------ lab nodes

/// The command prefix that runs an agent (or a case) on a lab node: its
/// network and UTS namespaces, entered with nsenter, not `ip netns exec`,
/// which hides the cgroup mounts the agent needs. nsenter execs, so the
/// program stays our child.
pub fn on(node: &ckpt_lab::Node) -> Vec<String> {
    vec![
        "nsenter".into(),
        format!("--net={}", node.netns_path().display()),
        format!("--uts={}", node.uts_path().display()),
        "--".into(),
    ]
}

/// `prefix` as the `&[&str]` that `agent_in`, `dump_in` and friends take.
pub fn strs(prefix: &[String]) -> Vec<&str> {
    prefix.iter().map(String::as_str).collect()
}

/// Port the parts of a two-part TCP job (`job_net_tcp_part`) talk on.
pub const PART_PORT: u16 = 7000;

/// One part of a job that streams TCP to another part on its own address
/// (the zdtm case `job_net_tcp_part`).
pub struct TcpPart {
    pub dir: Workdir,
    pub addr: std::net::Ipv4Addr,
    pub mac: String,
}

impl TcpPart {
    /// Starts the part as agent job `job` on `node`, with a veth on the
    /// node's bridge; it listens on, or connects to, `peer`:PART_PORT.
    pub fn start(
        &self,
        case_bin: &Path,
        job: &str,
        node: &ckpt_lab::Node,
        role: &str,
        peer: std::net::Ipv4Addr,
    ) -> CaseProcess {
        let tmp = self.dir.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("part"), format!("{role} {peer}:{PART_PORT}")).unwrap();
        let opts = JobOptions {
            prefix: on(node),
            run_args: [
                "--veth",
                node.bridge(),
                "--address",
                &format!("{}/24", self.addr),
                "--mac",
                &self.mac,
            ]
            .map(String::from)
            .to_vec(),
            env: Vec::new(),
        };
        CaseProcess::spawn_job_with(case_bin, "job_net_tcp_part", job, &self.dir, &opts)
            .unwrap_or_else(|e| panic!("starting part {job} on {}: {e}", node.name()))
    }

    /// Bytes the part has received so far, as it last wrote them.
    pub fn received(&self) -> u64 {
        fs::read_to_string(self.dir.join("tmp/count"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Waits until every part received `more` bytes beyond what it had.
pub fn parts_flow(parts: &[&TcpPart], more: u64, within: Duration) -> Result<(), String> {
    let start: Vec<u64> = parts.iter().map(|p| p.received()).collect();
    let deadline = Instant::now() + within;
    loop {
        let now: Vec<u64> = parts.iter().map(|p| p.received()).collect();
        if now.iter().zip(&start).all(|(n, s)| *n >= s + more) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the stream stalled: received {now:?}, was {start:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------ the flow

/// Restores `case` from `images` and checks the restored process.
/// Restores `case` from `images` and checks the restored process.
pub fn restore_and_check(
    case: &mut CaseProcess,
    images: &Path,
    dir: &Workdir,
) -> Result<(), String> {
    clear_result(&case.result);
    let (run, pid) = restore_detached_with(images, net_flags(&case.name), dir, "restore");
    if pid == Some(case.pid) {
        case.adopt_restored();
    }
    if !run.ok() {
        return Err("restore failed".into());
    }
    match pid {
        Some(p) if p == case.pid => case.terminate_and_check("restored process"),
        Some(p) => {
            // Not ours to keep running: a wrong PID is a failed restore.
            if kill(p, libc::SIGKILL) {
                let _ = wait_pid(p, Duration::from_secs(5));
            }
            Err(format!("restored pid {p} != original pid {}", case.pid))
        }
        None => Err("restore wrote no pid to its pidfile".into()),
    }
}

/// Runs one zdtm case in `mode` (or without checkpoint when
/// `CKPT_ZDTM_NOCKPT=1`). Panics on any failure with the reason, the case
/// log and verdict, and every agent invocation's output.
pub fn run_case(case_bin: &str, name: &str, mode: Mode) {
    let requested = mode;
    let mode = effective_mode(mode);
    let dir = if requested == Mode::Job {
        Workdir::for_job(name)
    } else {
        Workdir::new(name)
    };
    let result = if requested == Mode::Job {
        run_job_case(Path::new(case_bin), name, mode == Mode::NoCheckpoint, &dir)
    } else {
        run_case_in(Path::new(case_bin), name, mode, &dir)
    };
    if let Err(e) = result {
        panic!(
            "zdtm case {name} ({mode:?}) failed in {}:\n{e}{}",
            dir.path.display(),
            dir.agent_report()
        );
    }
}

/// After a dump killed a whole tree, the root's children were re-parented
/// to us (a subreaper): collect them, or their PIDs stay taken.
pub fn reap_descendants(root: i32, images: &Path) -> Result<(), String> {
    use ckpt_proto::image::Inventory;
    let inv: Inventory = ckpt_proto::read_image_file(
        &images.join("inventory.img"),
        ckpt_proto::ImageKind::Inventory,
    )
    .map_err(|e| format!("reading the inventory: {e}"))?;
    for pid in inv.pids.into_iter().filter(|&p| p != root) {
        wait_pid(pid, Duration::from_secs(5))
            .map_err(|e| format!("collecting killed pid {pid}: {e}"))?;
    }
    Ok(())
}

/// The cgroup of a test job, removed at the end whatever happened: what
/// still runs in it (a test that failed before ending its job, or whose
/// lab is torn down after this guard) is killed first.
pub struct JobCgroupGuard(pub String);

impl Drop for JobCgroupGuard {
    fn drop(&mut self) {
        for root in [
            "/sys/fs/cgroup/unified/ckpt",
            "/sys/fs/cgroup/ckpt",
            "/sys/fs/cgroup/freezer/ckpt",
        ] {
            let d = Path::new(root).join(&self.0);
            if !d.exists() {
                let _ = fs::remove_dir(root);
                continue;
            }
            // A frozen v1 cgroup's tasks die only once thawed.
            let _ = fs::write(d.join("freezer.state"), "THAWED");
            if fs::write(d.join("cgroup.kill"), "1").is_err() {
                for pid in fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while d.exists() && fs::remove_dir(&d).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // The last job's cgroup takes the agent's parent with it.
            let _ = fs::remove_dir(root);
        }
    }
}

/// PID of `host_pid` in its own PID namespace (the last NSpid field).
pub fn inner_pid(host_pid: i32) -> Option<i32> {
    let st = fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    st.lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// A case run as a job: dump kills it, restore recreates its namespaces,
/// and the restored root must be PID 1 of a new PID namespace again.
/// Agent flags a case needs on dump and restore: cases holding TCP
/// connections (named tcp_*, or job_net_tcp*) are dumped with them.
fn net_flags(name: &str) -> &'static [&'static str] {
    if name.starts_with("tcp") || name.starts_with("job_net_tcp") {
        &["--tcp-established"]
    } else {
        &[]
    }
}

fn run_job_case(case_bin: &Path, name: &str, no_ckpt: bool, dir: &Workdir) -> Result<(), String> {
    let job = format!("zdtm-{name}-{}", std::process::id());
    let _cg = JobCgroupGuard(job.clone());
    let images = dir.join("images");
    let mut case = CaseProcess::spawn_job(case_bin, name, &job, dir)?;
    case.wait_ready()?;
    if inner_pid(case.pid) != Some(1) {
        return Err(format!("job root {} is not PID 1 inside", case.pid));
    }
    if no_ckpt {
        return case.terminate_and_check("no checkpoint");
    }
    if !dump(case.pid, &images, net_flags(name), dir).ok() {
        return Err(format!("dump failed; case log:\n{}", case.log_text()));
    }
    case.expect_gone()?;
    clear_result(&case.result);
    let (run, pid) = restore_detached_with(&images, net_flags(name), dir, "restore");
    let Some(pid) = pid else {
        return Err(format!("restore wrote no pid (ok: {})", run.ok()));
    };
    // Ours from now on, whatever happens next.
    case.pid = pid;
    case.adopt_restored();
    if !run.ok() {
        return Err("restore failed".into());
    }
    let netns = |p: &str| fs::read_link(format!("/proc/{p}/ns/net")).ok();
    if name.starts_with("job_net") && netns(&pid.to_string()) == netns("self") {
        return Err("restored job is in the node's network namespace, not its own".into());
    }
    match inner_pid(pid) {
        Some(1) => case.terminate_and_check("restored job"),
        other => Err(format!(
            "restored job root {pid} has PID {other:?} inside, not 1"
        )),
    }
}

fn run_case_in(case_bin: &Path, name: &str, mode: Mode, dir: &Workdir) -> Result<(), String> {
    let images = dir.join("images");
    let mut case = CaseProcess::spawn(case_bin, name, dir)?;
    case.wait_ready()?;
    let dump_failed = |case: &CaseProcess| format!("dump failed; case log:\n{}", case.log_text());
    match mode {
        Mode::NoCheckpoint => case.terminate_and_check("no checkpoint"),
        Mode::Kill => {
            if !dump(case.pid, &images, net_flags(name), dir).ok() {
                return Err(dump_failed(&case));
            }
            case.expect_gone()?;
            reap_descendants(case.pid, &images)?;
            restore_and_check(&mut case, &images, dir)
        }
        Mode::Job => unreachable!("jobs run in run_job_case"),
        Mode::LeaveRunning => {
            let flags = [&["--leave-running"][..], net_flags(name)].concat();
            if !dump(case.pid, &images, &flags, dir).ok() {
                return Err(dump_failed(&case));
            }
            case.terminate_and_check("original after --leave-running dump")?;
            restore_and_check(&mut case, &images, dir)
        }
    }
}

/// The network lock tables of process `pid`'s checkpoints (`ckpt_pidN`) in
/// this network namespace; tests run in parallel, so each looks at its own.
pub fn lock_tables(pid: i32) -> Vec<String> {
    let name = format!("ckpt_pid{pid}");
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().last() == Some(name.as_str()))
        .map(str::to_string)
        .collect()
}

// ------------------------------------------------------------ streams

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

/// The byte at position `i` of the counted pattern stream cases send.
pub fn byte_at(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// A test's end of a pattern stream with a case (`tcp_stream`): sends
/// the pattern, checks every byte that arrives.
pub struct StreamPeer {
    received: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    conn: std::net::TcpStream,
}

impl StreamPeer {
    /// Accepts the case's connection on `listener` and starts streaming.
    pub fn start(listener: std::net::TcpListener) -> StreamPeer {
        let (conn, _) = listener.accept().expect("accept the case's connection");
        let received = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let mut r = conn.try_clone().unwrap();
        let (rc, re) = (received.clone(), error.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            let mut at = 0usize;
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if let Some(i) = (0..n).find(|&i| buf[i] != byte_at(at + i)) {
                            *re.lock().unwrap() = Some(format!("byte {} wrong", at + i));
                            return;
                        }
                        at += n;
                        rc.store(at as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *re.lock().unwrap() = Some(format!("read after {at}: {e}"));
                        return;
                    }
                }
            }
        });
        let mut w = conn.try_clone().unwrap();
        let (ws, we) = (stop.clone(), error.clone());
        std::thread::spawn(move || {
            let mut sent = 0usize;
            while !ws.load(Ordering::Relaxed) {
                let block: Vec<u8> = (sent..sent + 1000).map(byte_at).collect();
                if let Err(e) = w.write_all(&block) {
                    *we.lock().unwrap() = Some(format!("write after {sent}: {e}"));
                    return;
                }
                sent += 1000;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        StreamPeer {
            received,
            error,
            stop,
            conn,
        }
    }

    /// The first thing that went wrong, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }

    /// Waits until at least `more` new bytes arrived (the stream flows).
    pub fn flows(&self, more: u64, within: Duration) -> Result<(), String> {
        let start = self.received.load(Ordering::Relaxed);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(e) = self.error() {
                return Err(e);
            }
            if self.received.load(Ordering::Relaxed) >= start + more {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the stream stalled at {} bytes",
            self.received.load(Ordering::Relaxed)
        ))
    }

    /// Stops sending and closes the connection.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}

// ------------------------------------------------------------ coordinated clusters

/// Port the agents of a test cluster listen on (each in its node's
/// network namespace).
pub const AGENT_PORT: u16 = 7707;

/// A node's `ckpt-agent serve`, killed when dropped.
pub struct ServeAgent {
    child: Child,
}

impl ServeAgent {
    /// Kills the agent at once (SIGKILL), as a crash would.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for ServeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated cluster driven by ckpt-coord: a lab, an agent serving on
/// each node, a cluster key and a configuration whose store is the lab's
/// shared directory.
pub struct CoordCluster {
    pub lab: ckpt_lab::Lab,
    pub dir: Workdir,
    pub key: PathBuf,
    pub config: PathBuf,
    /// The agents, by node (1-based index - 1); None once stopped.
    pub agents: Vec<Option<ServeAgent>>,
}

impl CoordCluster {
    /// Brings up a lab of `nodes` nodes with an agent on each.
    pub fn up(name: &str, nodes: usize) -> CoordCluster {
        let lab = ckpt_lab::Lab::up(nodes).expect("bring up a lab");
        let dir = Workdir::for_job(name);
        let key = dir.join("cluster.key");
        fs::write(&key, [0x5a; 32]).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        // Users reach the cluster through the last node's agent: tests
        // destroy the first nodes.
        let mut cfg = format!(
            "key = \"{}\"\nstore = \"{}\"\nuser_socket = \"{}\"\n",
            key.display(),
            lab.shared_dir().join("store").display(),
            dir.join(&format!("user-{}.sock", lab.node(nodes).name()))
                .display()
        );
        for n in lab.nodes() {
            cfg += &format!(
                "\n[[node]]\nname = \"{}\"\nagent = \"{}:{AGENT_PORT}\"\n",
                n.name(),
                n.address()
            );
        }
        let config = dir.join("cluster.toml");
        fs::write(&config, cfg).unwrap();
        let mut c = CoordCluster {
            lab,
            dir,
            key,
            config,
            agents: Vec::new(),
        };
        for i in 1..=nodes {
            let a = c.start_agent(i, &[]);
            c.agents.push(Some(a));
        }
        c
    }

    /// Starts the agent of node `i` (with `env` added: fault injection).
    pub fn start_agent(&self, i: usize, env: &[(&str, &str)]) -> ServeAgent {
        self.start_agent_under(i, env, &[])
    }

    /// Starts the agent of node `i` under the command `wrap` (such as
    /// `setpriv` taking capabilities away), with `env` added.
    pub fn start_agent_under(&self, i: usize, env: &[(&str, &str)], wrap: &[&str]) -> ServeAgent {
        let node = self.lab.node(i);
        let prefix = on(node);
        let mut cmd = Command::new(&prefix[0]);
        cmd.args(&prefix[1..])
            .args(wrap)
            .arg(agent_binary())
            .args([
                "serve",
                "--listen",
                &format!("{}:{AGENT_PORT}", node.address()),
                "--node",
                node.name(),
                "--key",
            ])
            .arg(&self.key)
            .arg("--state-dir")
            .arg(self.state_dir(i))
            .arg("--user-socket")
            .arg(self.user_socket(i))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(&format!("serve-{}.err", node.name())))
                    .unwrap(),
            );
        let mut child = cmd.spawn().unwrap();
        // serve prints its address once it accepts connections.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(
            line.contains(':'),
            "serve on {} printed {line:?}",
            node.name()
        );
        ServeAgent { child }
    }

    /// Replaces node `i`'s agent by a fresh one (with `env`), as systemd
    /// restarts a crashed service.
    pub fn restart_agent(&mut self, i: usize, env: &[(&str, &str)]) {
        self.restart_agent_under(i, env, &[]);
    }

    /// [`CoordCluster::restart_agent`] under the command `wrap`.
    pub fn restart_agent_under(&mut self, i: usize, env: &[(&str, &str)], wrap: &[&str]) {
        if let Some(a) = self.agents[i - 1].take() {
            a.crash();
        }
        let a = self.start_agent_under(i, env, wrap);
        self.agents[i - 1] = Some(a);
    }

    /// Where node `i`'s agent records its work in progress.
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&format!("state-{}", self.lab.node(i).name()))
    }

    /// Where the agent of node `i` serves users (the configuration names
    /// the last node's).
    pub fn user_socket(&self, i: usize) -> PathBuf {
        self.dir
            .join(&format!("user-{}.sock", self.lab.node(i).name()))
    }

    /// Runs ckpt-coord with `args` as user `user` (uid, gid) in node
    /// `from`'s network namespace, logging what it printed.
    pub fn coord_as(&self, user: (u32, u32), from: usize, args: &[&str]) -> std::process::Output {
        let prefix = on(self.lab.node(from));
        let o = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["setpriv", "--init-groups"])
            .arg(format!("--reuid={}", user.0))
            .arg(format!("--regid={}", user.1))
            .arg("--")
            .arg(coord_binary())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!("(as uid {})", user.0);
        log_coord(args, &o);
        o
    }

    /// The checkpoint store.
    pub fn store(&self) -> PathBuf {
        self.lab.shared_dir().join("store")
    }

    /// Starts ckpt-coord with `args` in node `from`'s network namespace
    /// (the lab's addresses are reachable only from its nodes), with `env`.
    pub fn coord_spawn(&self, from: usize, args: &[&str], env: &[(&str, &str)]) -> Child {
        let prefix = on(self.lab.node(from));
        Command::new(&prefix[0])
            .args(&prefix[1..])
            .arg(coord_binary())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs ckpt-coord to its end (see [`CoordCluster::coord_spawn`]),
    /// logging what it printed.
    pub fn coord(&self, from: usize, args: &[&str]) -> std::process::Output {
        let o = self
            .coord_spawn(from, args, &[])
            .wait_with_output()
            .unwrap();
        log_coord(args, &o);
        o
    }
}

/// Waits up to `within` for the output file `out` to hold a checksum line
/// and returns the output then; panics showing it, saying that `what` did
/// not finish, with the state of agent jobs `parts` (see [`part_state`]),
/// when none comes.
pub fn wait_finished(out: &Path, within: Duration, what: &str, parts: &[String]) -> String {
    assert!(
        wait_for(within, || fs::read_to_string(out)
            .ok()
            .and_then(|s| checksum_line(&s))
            .is_some()),
        "{what} did not finish: {}\n{}",
        fs::read_to_string(out).unwrap_or_default(),
        parts.iter().map(|p| part_state(p)).collect::<String>()
    );
    fs::read_to_string(out).unwrap()
}

/// The processes of agent job `job` on this machine (state, where they
/// wait, command) and its TCP connections, for the message of a test whose
/// job stalls.
pub fn part_state(job: &str) -> String {
    let procs = job_procs(job);
    let mut s = format!("--- agent job {job}: {} processes\n", procs.len());
    if let Some(root) = procs.first() {
        let in_netns = |args: &[&str]| {
            Command::new("nsenter")
                .arg(format!("--net=/proc/{root}/ns/net"))
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        s += &format!("  TCP:\n{}\n", in_netns(&["ss", "-tnoie"]));
        s += &format!("  neighbours:\n{}\n", in_netns(&["ip", "neigh"]));
        // A network lock left in place blocks the part's traffic.
        s += &format!("  nftables:\n{}\n", in_netns(&["nft", "list", "ruleset"]));
    }
    for pid in procs {
        let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let stack = fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
        s += &format!(
            "  pid {pid} wchan {wchan} state {}: {}\n{stack}",
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("?"),
            String::from_utf8_lossy(&cmd).replace('\0', " ")
        );
    }
    s
}

/// The uid and gid of `ckpt-test-user`, a user without privileges made
/// for the tests that act as one (created on first use).
pub fn test_user() -> (u32, u32) {
    const NAME: &str = "ckpt-test-user";
    // The tests of one binary run in threads: two useradds at once on a
    // fresh machine left a user whose uid no longer existed a moment
    // later (setpriv: "uid 999 not found").
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, NAME]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                NAME,
            ])
            .status()
            .unwrap();
        // Another test may have made it meanwhile.
        assert!(
            made.success() || id("-u").is_some(),
            "useradd {NAME} failed"
        );
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// Logs a ckpt-coord run for the test's output.
pub fn log_coord(args: &[&str], o: &std::process::Output) {
    eprintln!(
        "ckpt-coord {}: {}\n{}{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// ckpt-coord's `--json` output.
pub fn json_of(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// The nftables tables in the network namespace of process `pid`.
pub fn tables_in_netns_of(pid: i32) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["nft", "list", "tables"])
        .output()
        .expect("nsenter nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether a job's cgroup (v2 or v1) says it is frozen.
pub fn job_frozen(job: &str) -> bool {
    let v2 = Path::new("/sys/fs/cgroup/unified/ckpt")
        .join(job)
        .join("cgroup.events");
    if let Ok(ev) = fs::read_to_string(&v2) {
        return ev.lines().any(|l| l.trim() == "frozen 1");
    }
    let v1 = Path::new("/sys/fs/cgroup/freezer/ckpt")
        .join(job)
        .join("freezer.state");
    fs::read_to_string(v1).is_ok_and(|s| s.trim() != "THAWED")
}

/// The processes of a job's cgroup.
pub fn job_procs(job: &str) -> Vec<i32> {
    for root in ["/sys/fs/cgroup/unified/ckpt", "/sys/fs/cgroup/freezer/ckpt"] {
        if let Ok(s) = fs::read_to_string(Path::new(root).join(job).join("cgroup.procs")) {
            return s.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    Vec::new()
}

/// Waits up to `within` for `cond`.
pub fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

// ------------------------------------------------------------ sample jobs

/// A sample job's binary (jobs/), built beside the agent.
pub fn job_binary(name: &str) -> PathBuf {
    let p = agent_binary().with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace's binaries first (make build)",
        p.display()
    );
    p
}

/// The checksum line of an uninterrupted `stencil-tcp` run of `args`
/// (both ranks on loopback): what a checkpointed run must print too.
pub fn stencil_tcp_reference(args: &[&str]) -> String {
    let bin = job_binary("stencil-tcp");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut r1 = Command::new(&bin)
        .args(["--rank", "1", "--connect", &addr])
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let r0 = Command::new(&bin)
        .args(["--rank", "0", "--listen", &addr])
        .args(args)
        .output()
        .unwrap();
    assert!(r1.wait().unwrap().success(), "reference rank 1 failed");
    assert!(r0.status.success(), "reference rank 0 failed");
    checksum_line(&String::from_utf8_lossy(&r0.stdout))
        .expect("the reference run printed no checksum")
}

/// The `checksum ...` line of a stencil job's output.
pub fn checksum_line(output: &str) -> Option<String> {
    output
        .lines()
        .find(|l| l.starts_with("checksum "))
        .map(str::to_string)
}

/// How many progress lines (`iter ...`) a stencil job's output has.
pub fn progress_lines(output: &Path) -> usize {
    fs::read_to_string(output)
        .map(|s| s.lines().filter(|l| l.starts_with("iter ")).count())
        .unwrap_or(0)
}

impl CoordCluster {
    /// Copies sample job binaries (and ckpt-rsh) into the lab's shared
    /// directory, which every node sees (a job cannot see the node's /tmp,
    /// where a checkout may live); returns that directory.
    pub fn shared_bin(&self, names: &[&str]) -> PathBuf {
        let dir = self.lab.shared_dir().join("bin");
        fs::create_dir_all(&dir).unwrap();
        for n in names {
            // A copy already there may be running: writing over it would
            // fail (ETXTBSY), and replacing it would leave its processes
            // mapping a deleted file.
            let (src, dst) = (job_binary(n), dir.join(n));
            if fs::read(&dst).ok() != Some(fs::read(&src).unwrap()) {
                fs::copy(&src, &dst).unwrap();
            }
        }
        dir
    }

    /// Writes the spec of a `stencil-tcp` job (`args` for both ranks):
    /// rank 0 as part r0 on node `n0`, rank 1 as part r1 on `n1`, on the
    /// lab's job addresses 0 and 1; returns the spec file.
    pub fn stencil_tcp_spec(&self, job: &str, (n0, n1): (usize, usize), args: &[&str]) -> PathBuf {
        let bin = self.shared_bin(&["stencil-tcp"]).join("stencil-tcp");
        let (a0, a1) = (self.lab.job_address(0), self.lab.job_address(1));
        let argv = |rank: &str, flag: &str| {
            let mut v = vec![
                "--rank".to_string(),
                rank.to_string(),
                flag.to_string(),
                format!("{a0}:7000"),
            ];
            v.extend(args.iter().map(|s| s.to_string()));
            format!("{v:?}")
        };
        let spec = format!(
            "job = \"{job}\"\n\
             [[part]]\nname = \"r0\"\nnode = \"{n0}\"\ncommand = \"{bin}\"\nargs = {args0}\n\
             [part.network]\naddress = \"{a0}/24\"\n\
             [[part]]\nname = \"r1\"\nnode = \"{n1}\"\ncommand = \"{bin}\"\nargs = {args1}\n\
             [part.network]\naddress = \"{a1}/24\"\n",
            n0 = self.lab.node(n0).name(),
            n1 = self.lab.node(n1).name(),
            bin = bin.display(),
            args0 = argv("0", "--listen"),
            args1 = argv("1", "--connect"),
        );
        let file = self.dir.join(&format!("{job}.toml"));
        fs::write(&file, spec).unwrap();
        file
    }
}

/// The checksum of an uninterrupted `jobs/heat` run of `args` (two ranks
/// on this machine): what a checkpointed run must print too.
pub fn heat_reference(args: &[&str]) -> String {
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--allow-run-as-root"])
        .arg(job_binary("heat"))
        .args(args)
        .output()
        .expect("mpirun (Open MPI: make deps installs it)");
    assert!(o.status.success(), "reference run failed: {o:?}");
    checksum_line(&String::from_utf8_lossy(&o.stdout)).expect("no checksum from the reference run")
}

impl CoordCluster {
    /// The spec of a `jobs/heat` MPI job of 4 ranks (`args`), two per part:
    /// mpirun in part `a` (hostname `ha`), the `ckpt-rsh --serve` that
    /// starts its daemon in part `b` (`hb`), on the lab's job addresses
    /// `first` and `first + 1`; shared memory between a part's ranks, TCP
    /// between the parts. `job` and `nodes` (lab node numbers) when given,
    /// else left to `launch --job/--nodes`.
    pub fn heat_spec(
        &self,
        job: Option<&str>,
        nodes: Option<(usize, usize)>,
        first: u8,
        args: &[&str],
    ) -> String {
        let bin = self.shared_bin(&["heat", "ckpt-rsh"]);
        let (a0, a1) = (self.lab.job_address(first), self.lab.job_address(first + 1));
        let rsh = bin.join("ckpt-rsh");
        let mut mpirun: Vec<String> = [
            "-np",
            "4",
            "--host",
            "ha:2,hb:2",
            "--oversubscribe",
            // Shared memory between the ranks of a part (segments in its
            // private /dev/shm), TCP between the parts.
            "--mca",
            "btl",
            "vader,tcp,self",
            "--mca",
            "plm_rsh_agent",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        mpirun.push(rsh.display().to_string());
        mpirun.push(bin.join("heat").display().to_string());
        mpirun.extend(args.iter().map(|s| s.to_string()));
        let node = |n: Option<usize>| {
            n.map(|i| format!("node = \"{}\"\n", self.lab.node(i).name()))
                .unwrap_or_default()
        };
        format!(
            "{job}[env]\n\
             CKPT_RSH_HOSTS = \"ha={a0},hb={a1}\"\n\
             OMPI_ALLOW_RUN_AS_ROOT = \"1\"\n\
             OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = \"1\"\n\
             PATH = \"/usr/bin:/bin\"\n\
             [[part]]\nname = \"a\"\n{na}hostname = \"ha\"\n\
             command = \"/usr/bin/mpirun\"\nargs = {mpirun:?}\n\
             [part.network]\naddress = \"{a0}/24\"\n\
             [[part]]\nname = \"b\"\n{nb}hostname = \"hb\"\n\
             command = \"{rsh}\"\nargs = [\"--serve\", \"--sessions\", \"1\"]\n\
             [part.network]\naddress = \"{a1}/24\"\n",
            job = job.map(|j| format!("job = \"{j}\"\n")).unwrap_or_default(),
            na = node(nodes.map(|n| n.0)),
            nb = node(nodes.map(|n| n.1)),
            rsh = rsh.display(),
        )
    }
}
