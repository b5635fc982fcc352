//! `ckpt-agent run`: start a command as a job that can later be restored
//! with the same PIDs anywhere: its own cgroup (to freeze it atomically)
//! and its own PID, IPC, UTS and mount namespaces (network when asked),
//! with job-private tmpfs on /tmp and /dev/shm.
//!
//! With `--veth` the job's namespace also gets a veth pair whose other end
//! is on a bridge of the node (see `net`), all set up before the command
//! starts.
//!
//! The command itself is the job's root and PID 1 of its PID namespace: it
//! reaps orphans of the job and ignores signals it has no handler for
//! (except SIGKILL from outside), as any namespace init does.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tracing::info;

use crate::cgroup::{Freezer, JobCgroup};
use crate::error::{Error, Result};
use crate::sys::clone::{self, JobSpawn, MountStep, SpawnError, SpawnFailure};

/// What to start.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The job id (a cgroup name); generated when absent.
    pub job: Option<String>,
    /// Give the job its own network namespace (with loopback up).
    pub net: bool,
    /// Hostname inside the job's UTS namespace (default: the node's).
    pub hostname: Option<String>,
    /// A veth into the job's network namespace (needs `net`).
    pub veth: Option<crate::net::VethRequest>,
    /// Append the job's stdout and stderr to this file, its stdin being
    /// /dev/null (else it keeps the caller's).
    pub output: Option<PathBuf>,
    /// Run the command as this user (its output file opened as that user);
    /// else as root.
    pub user: Option<crate::user::Ids>,
    pub cmd: Vec<String>,
}

/// A started job.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    /// Host PID of the job's root (PID 1 inside).
    pub pid: i32,
    pub cgroup: JobCgroup,
}

/// The namespaces every job gets.
pub const JOB_NAMESPACES: u64 =
    (libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNS) as u64;

/// The mounts that make a job's mount namespace its own: no mount event
/// leaks out (the tree becomes a slave of the node's), a procfs of its PID
/// namespace, private /tmp and /dev/shm, and its IPC namespace's mqueue
/// filesystem.
pub fn job_mounts() -> Vec<(&'static str, &'static str, &'static str, u64, &'static str)> {
    let nsd = libc::MS_NOSUID | libc::MS_NODEV;
    // Systems without systemd lack the usual mount point: POSIX message
    // queues of a job can only be listed (and so checkpointed) through it.
    let _ = std::fs::create_dir_all("/dev/mqueue");
    let mut v = vec![
        ("", "/", "", (libc::MS_REC | libc::MS_SLAVE), ""),
        ("proc", "/proc", "proc", nsd | libc::MS_NOEXEC, ""),
        ("tmpfs", "/tmp", "tmpfs", nsd, "mode=1777"),
        ("tmpfs", "/dev/shm", "tmpfs", nsd, "mode=1777"),
        // Its own pty instance: slave indexes are the job's, free again on
        // whatever node restores it.
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        ("/dev/pts/ptmx", "/dev/ptmx", "", libc::MS_BIND, ""),
    ];
    if Path::new("/dev/mqueue").is_dir() {
        v.push(("mqueue", "/dev/mqueue", "mqueue", nsd | libc::MS_NOEXEC, ""));
    }
    v
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Job {
        job: String::new(),
        reason: format!("{what} {s:?} contains a NUL byte"),
    })
}

/// Finds `prog` as execvp would, so the child needs no allocation.
fn resolve(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Starts `req.cmd` as a new job; returns once the command is executing.
pub fn run(req: &RunRequest) -> Result<Job> {
    let id = req.job.clone().unwrap_or_else(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("job-{ms}")
    });
    let job_err = |reason: String| Error::Job {
        job: id.clone(),
        reason,
    };
    let prog = req
        .cmd
        .first()
        .ok_or_else(|| job_err("no command given".into()))?;
    let program =
        resolve(prog).ok_or_else(|| job_err(format!("command {prog:?} not found in PATH")))?;
    let program = std::fs::canonicalize(&program).unwrap_or(program);
    if let Some(dir) = ["/tmp", "/dev/shm"].iter().find(|d| program.starts_with(d)) {
        return Err(job_err(format!(
            "{} is under {dir}, which a job gets a private, empty one of: \
             install the program outside {dir}",
            program.display()
        )));
    }
    let cwd = std::env::current_dir().map_err(|e| job_err(format!("current directory: {e}")))?;
    if let Some(dir) = ["/tmp", "/dev/shm"].iter().find(|d| cwd.starts_with(d)) {
        return Err(job_err(format!(
            "the current directory {} is under {dir}, which a job gets a private, empty one of: \
             start the job from another directory",
            cwd.display()
        )));
    }
    if req.veth.is_some() && !req.net {
        return Err(job_err(
            "--veth needs --net: the veth's job end lives in the job's own network namespace"
                .into(),
        ));
    }
    let net_img = req
        .veth
        .as_ref()
        .map(|v| v.image())
        .transpose()
        .map_err(job_err)?;
    let link_opts = crate::net::LinkOptions {
        job: id.clone(),
        bridge: None,
        hint: "another --veth",
    };
    if let Some(img) = &net_img {
        crate::cgroup::check_job_id(&id)?;
        crate::net::check_bridges(img, &link_opts)?;
    }
    // Opened before anything is made: a bad path leaves nothing behind.
    let stdio = req
        .output
        .as_deref()
        .map(|out| -> Result<(std::fs::File, std::fs::File)> {
            let input = std::fs::File::open("/dev/null").map_err(|e| Error::io("/dev/null", e))?;
            let open = || {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(out)
                    .map_err(|e| Error::io(out, e))
            };
            let output = match &req.user {
                Some(ids) => crate::sys::creds::as_user(ids, open)
                    .map_err(|e| job_err(format!("acting as user {}: {e}", ids.uid)))??,
                None => open()?,
            };
            Ok((input, output))
        })
        .transpose()?;
    let cg = JobCgroup::create(&id)?;
    let mut flags = JOB_NAMESPACES;
    if req.net {
        flags |= libc::CLONE_NEWNET as u64;
    }
    let mounts = job_mounts();
    let spec = JobSpawn {
        flags,
        cgroup_v1_procs: match cg.freezer {
            Freezer::V1 => Some(cstring(
                &cg.dir.join("cgroup.procs").to_string_lossy(),
                "cgroup path",
            )?),
            Freezer::V2 => None,
        },
        hostname: req
            .hostname
            .as_deref()
            .map(|h| cstring(h, "hostname"))
            .transpose()?,
        loopback: req.net,
        mounts: mounts
            .iter()
            .map(|(src, tgt, fs, fl, data)| {
                Ok(MountStep {
                    source: cstring(src, "mount source")?,
                    target: cstring(tgt, "mount point")?,
                    fstype: cstring(fs, "filesystem type")?,
                    flags: *fl,
                    data: cstring(data, "mount options")?,
                })
            })
            .collect::<Result<_>>()?,
        program: cstring(&program.to_string_lossy(), "program")?,
        argv: req
            .cmd
            .iter()
            .map(|a| cstring(a, "argument"))
            .collect::<Result<_>>()?,
        stdio: stdio.as_ref().map(|(i, o)| {
            use std::os::fd::AsRawFd;
            (i.as_raw_fd(), o.as_raw_fd())
        }),
        user: req.user.as_ref().map(|u| (u.uid, u.gid, u.groups.clone())),
    };
    let cgfd = match cg.freezer {
        Freezer::V2 => Some(cg.open()?),
        Freezer::V1 => None,
    };
    use std::os::fd::AsFd;
    // The job's interfaces exist, addressed and up, before its command
    // runs: it may bind or connect at once. They are removed again if the
    // command does not start.
    let mut links = None;
    let network = |pid: i32| -> Result<()> {
        if let Some(img) = &net_img {
            let made = crate::net::create_links(pid, img, &link_opts)?;
            crate::net::configure(pid, img, &made)?;
            links = Some(made);
        }
        Ok(())
    };
    let spawned = clone::spawn_job(&spec, cgfd.as_ref().map(|f| f.as_fd()), network);
    if spawned.is_ok() {
        if let Some(l) = &links {
            l.keep();
        }
    }
    drop(links);
    let pid = match spawned {
        Ok(pid) => pid,
        Err(SpawnFailure::BeforeExec(e)) => {
            cg.remove();
            return Err(job_err(format!(
                "cannot start: setting up its network: {e}"
            )));
        }
        Err(SpawnFailure::Step(SpawnError { step, error })) => {
            cg.remove();
            let what = match step {
                clone::STEP_SETSID => "setsid".to_string(),
                clone::STEP_CGROUP => format!("joining {}", cg.dir.display()),
                clone::STEP_HOSTNAME => "sethostname".to_string(),
                clone::STEP_LOOPBACK => "bringing loopback up".to_string(),
                clone::STEP_EXEC => format!("exec {}", program.display()),
                clone::STEP_STDIO => "redirecting its stdin, stdout and stderr".to_string(),
                clone::STEP_USER => format!(
                    "taking the ids of user {}",
                    req.user.as_ref().map_or(0, |u| u.uid)
                ),
                n if n >= clone::STEP_MOUNTS && n - clone::STEP_MOUNTS < mounts.len() => {
                    let m = mounts[n - clone::STEP_MOUNTS];
                    format!("mount {} on {}", m.2, m.1)
                }
                _ => "clone3 with new namespaces".to_string(),
            };
            return Err(job_err(format!("cannot start: {what}: {error}")));
        }
    };
    info!(job = %id, pid, "job started");
    Ok(Job {
        id,
        pid,
        cgroup: cg,
    })
}

impl Job {
    /// Waits for the job's root to exit, removes the job's cgroup, and
    /// returns the root's exit code (128 + signal when killed).
    pub fn wait(&self) -> Result<i32> {
        let code = wait_exit(self.pid)?;
        self.cgroup.remove();
        Ok(code)
    }
}

/// Waits for child `pid` to end; its exit code, or 128 + the signal.
pub fn wait_exit(pid: i32) -> Result<i32> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::sys(pid, "waitpid", e)),
        }
    }
}
