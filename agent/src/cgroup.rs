//! The cgroup of a job: where `run` puts it, what `dump` freezes so that no
//! fork, clone or exit can race the seizing, and what restore recreates.
//!
//! Every job gets `<root>/ckpt/<job>`, under the cgroup v2 hierarchy when
//! it is mounted (its `cgroup.freeze` needs no controller, so the hybrid
//! layout of this kind of machine works), else under the v1 freezer
//! (also chosen with `CKPT_CGROUP_FREEZER=v1`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::proc;

/// Which freezer a job cgroup uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup v2: `cgroup.freeze`, state in `cgroup.events`.
    V2,
    /// cgroup v1 freezer controller: `freezer.state`.
    V1,
}

/// The directory under each hierarchy that holds the job cgroups.
const PARENT: &str = "ckpt";
/// How long freezing may take before the dump gives up (and thaws).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// A job's cgroup.
#[derive(Debug, Clone)]
pub struct JobCgroup {
    pub job: String,
    pub dir: PathBuf,
    pub freezer: Freezer,
}

/// The mount points of the v2 hierarchy and of the v1 freezer in this
/// agent's mount namespace, if any.
pub fn hierarchies() -> Result<(Option<PathBuf>, Option<PathBuf>)> {
    Ok(freezer_roots(&own_mounts()?))
}

/// The mounts of this agent's mount namespace.
fn own_mounts() -> Result<Vec<proc::MountInfo>> {
    Ok(proc::parse_mountinfo(
        &std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("/proc/self/mountinfo", e))?,
    ))
}

/// The v2 hierarchy and the v1 freezer among `mounts`.
fn freezer_roots(mounts: &[proc::MountInfo]) -> (Option<PathBuf>, Option<PathBuf>) {
    let v2 = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| PathBuf::from(&m.mount_point));
    let v1 = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == "freezer"))
        .map(|m| PathBuf::from(&m.mount_point));
    (v2, v1)
}

/// How many more bytes of memory process `pid` may have charged before a
/// cgroup limit applies (v2 memory.max, v1 memory.limit_in_bytes): the
/// least headroom over its memory cgroup and their ancestors; None when
/// nothing limits it.
pub fn memory_headroom(pid: i32) -> Result<Option<u64>> {
    let mounts = own_mounts()?;
    let v2 = mounts.iter().find(|m| m.fstype == "cgroup2");
    let v1 = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == "memory"));
    let text = proc::read(pid, "cgroup")?;
    let mut least: Option<u64> = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (root, limit, usage) = match (id, controllers) {
            ("0", "") => match v2 {
                Some(m) => (&m.mount_point, "memory.max", "memory.current"),
                None => continue,
            },
            (_, c) if c.split(',').any(|c| c == "memory") => match v1 {
                Some(m) => (
                    &m.mount_point,
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                ),
                None => continue,
            },
            _ => continue,
        };
        let mut dir = Path::new(root).join(path.trim_start_matches('/'));
        loop {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            // "max", or v1's page-rounded i64::MAX: no limit here.
            if let (Some(max), Some(used)) = (read(limit), read(usage)) {
                if max < 1 << 60 {
                    let room = max.saturating_sub(used);
                    least = Some(least.map_or(room, |l| l.min(room)));
                }
            }
            if dir == Path::new(root) || !dir.pop() {
                break;
            }
        }
    }
    Ok(least)
}

/// A job id becomes a directory name: keep it to a safe alphabet.
pub fn check_job_id(job: &str) -> Result<()> {
    let ok = !job.is_empty()
        && job.len() <= 64
        && !job.starts_with('.')
        && job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Job {
            job: job.into(),
            reason: "not a valid job id: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'".into(),
        })
    }
}

impl JobCgroup {
    /// Creates the cgroup of job `job`, which must not exist yet (or be an
    /// empty leftover of a finished job of that name).
    pub fn create(job: &str) -> Result<Self> {
        check_job_id(job)?;
        let (mut v2, v1) = hierarchies()?;
        // An admin (or a test) may prefer the v1 freezer where both exist.
        if std::env::var("CKPT_CGROUP_FREEZER").is_ok_and(|v| v == "v1") {
            v2 = None;
        }
        let (root, freezer) = match (v2, v1) {
            (Some(r), _) if r.join("cgroup.procs").exists() => (r, Freezer::V2),
            (_, Some(r)) => (r, Freezer::V1),
            _ => {
                return Err(Error::Job {
                    job: job.into(),
                    reason: "no cgroup v2 hierarchy and no cgroup v1 freezer is mounted: a job needs one to be frozen".into(),
                })
            }
        };
        let parent = root.join(PARENT);
        let dir = parent.join(job);
        // The parent goes with the node's last job (`remove`): another
        // agent may take it away between the two mkdirs.
        let mut made = std::fs::create_dir(&dir);
        for _ in 0..5 {
            match &made {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
                    made = std::fs::create_dir(&dir);
                }
                _ => break,
            }
        }
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let cg = JobCgroup {
                    job: job.into(),
                    dir: dir.clone(),
                    freezer,
                };
                if !cg.procs()?.is_empty() {
                    return Err(Error::Job {
                        job: job.into(),
                        reason: format!(
                            "it is running on this node (cgroup {} is in use): pick another job id (--job)",
                            dir.display()
                        ),
                    });
                }
                cg.thaw()?;
                return Ok(cg);
            }
            Err(e) => return Err(Error::io(&dir, e)),
        }
        debug!(job, dir = %dir.display(), "job cgroup created");
        Ok(JobCgroup {
            job: job.into(),
            dir,
            freezer,
        })
    }

    /// The cgroup of job `job` on this node, which must exist.
    pub fn find(job: &str) -> Result<Self> {
        check_job_id(job)?;
        let (v2, v1) = hierarchies()?;
        for (root, freezer) in [(v2, Freezer::V2), (v1, Freezer::V1)] {
            let Some(root) = root else { continue };
            let dir = root.join(PARENT).join(job);
            if dir.join("cgroup.procs").exists() {
                return Ok(JobCgroup {
                    job: job.into(),
                    dir,
                    freezer,
                });
            }
        }
        Err(Error::Job {
            job: job.into(),
            reason: "no such job on this node".into(),
        })
    }

    /// The job cgroup `pid` is in, if it is in one.
    pub fn of_pid(pid: i32) -> Result<Option<Self>> {
        let text = proc::read(pid, "cgroup")?;
        let (v2, v1) = hierarchies()?;
        let prefix = format!("/{PARENT}/");
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (_, ctrls, path) = match (f.next(), f.next(), f.next()) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => continue,
            };
            let Some(job) = path.strip_prefix(&prefix) else {
                continue;
            };
            // A job's own sub-cgroups still belong to the job.
            let job = job.split('/').next().unwrap_or(job);
            let (root, freezer) = if ctrls.is_empty() {
                match &v2 {
                    Some(r) => (r, Freezer::V2),
                    None => continue,
                }
            } else if ctrls.split(',').any(|c| c == "freezer") {
                match &v1 {
                    Some(r) => (r, Freezer::V1),
                    None => continue,
                }
            } else {
                continue;
            };
            return Ok(Some(JobCgroup {
                job: job.to_string(),
                dir: root.join(PARENT).join(job),
                freezer,
            }));
        }
        Ok(None)
    }

    fn write(&self, file: &str, val: &str) -> Result<()> {
        let p = self.dir.join(file);
        std::fs::write(&p, val).map_err(|e| Error::io(&p, e))
    }

    fn read(&self, file: &str) -> Result<String> {
        let p = self.dir.join(file);
        std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
    }

    /// Every thread in the cgroup (host TIDs).
    pub fn threads(&self) -> Result<Vec<i32>> {
        let file = match self.freezer {
            Freezer::V2 => "cgroup.threads",
            Freezer::V1 => "tasks",
        };
        Ok(self
            .read(file)?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// The processes in the cgroup (host PIDs), sorted.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let mut v: Vec<i32> = self
            .read("cgroup.procs")?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// The directory, opened for clone3's CLONE_INTO_CGROUP (v2 only).
    pub fn open(&self) -> Result<File> {
        File::open(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }

    fn frozen(&self) -> Result<bool> {
        Ok(match self.freezer {
            Freezer::V2 => self
                .read("cgroup.events")?
                .lines()
                .any(|l| l.trim() == "frozen 1"),
            Freezer::V1 => self.read("freezer.state")?.trim() == "FROZEN",
        })
    }

    /// Freezes every task of the cgroup and waits until all are frozen;
    /// returns a guard that thaws them when dropped. While frozen, the
    /// agent holds a lock file naming the job: if the agent dies, the lock
    /// goes with it and `recover_frozen` thaws the job.
    pub fn freeze(&self) -> Result<Frozen<'_>> {
        let lock = FreezeLock::take(self)?;
        match self.freezer {
            Freezer::V2 => self.write("cgroup.freeze", "1")?,
            Freezer::V1 => self.write("freezer.state", "FROZEN")?,
        }
        let guard = Frozen { cg: self, lock };
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while !self.frozen()? {
            if Instant::now() >= deadline {
                return Err(Error::Job {
                    job: self.job.clone(),
                    reason: format!(
                        "did not freeze within {FREEZE_TIMEOUT:?} (a task stuck in the kernel?); it was thawed"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(guard)
    }

    /// Freezes the cgroup for longer than an agent's life (no recovery lock:
    /// a job restored held waits for its release, not for an agent's
    /// recovery) and waits until it is frozen.
    pub fn hold(&self) -> Result<()> {
        match self.freezer {
            Freezer::V2 => self.write("cgroup.freeze", "1")?,
            Freezer::V1 => self.write("freezer.state", "FROZEN")?,
        }
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while !self.frozen()? {
            if Instant::now() >= deadline {
                return Err(Error::Job {
                    job: self.job.clone(),
                    reason: format!("did not freeze within {FREEZE_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Kills every process of the cgroup and waits until it is empty;
    /// returns how many there were.
    pub fn kill_all(&self) -> Result<usize> {
        let mut killed = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = self.procs()?;
            if procs.is_empty() {
                return Ok(killed);
            }
            killed = killed.max(procs.len());
            if self.dir.join("cgroup.kill").exists() {
                self.write("cgroup.kill", "1")?;
            } else {
                // v1: a frozen task dies only once thawed.
                for &pid in &procs {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                self.thaw()?;
            }
            if Instant::now() >= deadline {
                return Err(Error::Job {
                    job: self.job.clone(),
                    reason: format!("processes {procs:?} did not die within 10 s of SIGKILL"),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets the cgroup's tasks run (tasks stopped by ptrace stay stopped).
    pub fn thaw(&self) -> Result<()> {
        match self.freezer {
            Freezer::V2 => self.write("cgroup.freeze", "0"),
            Freezer::V1 => self.write("freezer.state", "THAWED"),
        }
    }

    /// Removes the cgroup once its last task is gone (the kernel drops
    /// reaped tasks asynchronously, hence the short retry).
    pub fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    warn!("cannot remove job cgroup {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // The node's last job takes the parent with it (it holds other
        // jobs' cgroups otherwise, and rmdir refuses).
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }

    /// Moves the job's tasks, stopped and about to be killed, into a
    /// cgroup beside it with a name no job id holds, and removes the job's
    /// own: the job may come back to this node, or to another agent of the
    /// same hierarchy, while they exit. [`JobCgroup::remove`] then removes
    /// the one they are in. (cgroup v2 cannot rename a cgroup, and no
    /// kernel moves an exiting task: hence before the kill.) On failure
    /// the tasks are back in the job's cgroup.
    pub fn set_aside(&mut self) -> Result<()> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let aside = JobCgroup {
            job: self.job.clone(),
            dir: self
                .dir
                .with_file_name(format!("{}{GONE}{}-{seq}", self.job, std::process::id())),
            freezer: self.freezer,
        };
        std::fs::create_dir(&aside.dir).map_err(|e| Error::io(&aside.dir, e))?;
        let moved = self.procs().and_then(|procs| {
            procs
                .iter()
                .try_for_each(|pid| aside.write("cgroup.procs", &pid.to_string()))
        });
        let emptied = moved
            .and_then(|()| std::fs::remove_dir(&self.dir).map_err(|e| Error::io(&self.dir, e)));
        if let Err(e) = emptied {
            for pid in aside.procs().unwrap_or_default() {
                let _ = self.write("cgroup.procs", &pid.to_string());
            }
            let _ = std::fs::remove_dir(&aside.dir);
            return Err(e);
        }
        debug!(job = self.job, dir = %aside.dir.display(), "job cgroup set aside");
        self.dir = aside.dir;
        Ok(())
    }

    /// Moves the calling process into the cgroup (v1, where clone3 cannot
    /// place a child directly).
    pub fn enter_self(dir: &Path) -> Result<()> {
        let p = dir.join("cgroup.procs");
        std::fs::write(&p, "0").map_err(|e| Error::io(&p, e))
    }
}

/// What names a cgroup set aside ([`JobCgroup::set_aside`]); no job id
/// holds it ('~').
const GONE: &str = "~gone-";

/// Whether the cgroup set aside named `name` was left by an agent that
/// is gone (another agent's may be in the middle of its move; this one's
/// go with their departures).
fn left_by_dead_agent(name: &str) -> bool {
    let Some((_, rest)) = name.split_once(GONE) else {
        return false;
    };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the empty cgroups set aside that a dead agent left (it died
/// before its killed tasks were gone); those with tasks are still exiting.
pub fn sweep_set_aside() {
    let Ok((v2, v1)) = hierarchies() else { return };
    for root in [v2, v1].into_iter().flatten() {
        let Ok(rd) = std::fs::read_dir(root.join(PARENT)) else {
            continue;
        };
        let mut removed = false;
        for e in rd.flatten() {
            if left_by_dead_agent(&e.file_name().to_string_lossy())
                && std::fs::remove_dir(e.path()).is_ok()
            {
                debug!(dir = %e.path().display(), "cgroup set aside removed");
                removed = true;
            }
        }
        if removed {
            // As JobCgroup::remove does for the node's last job.
            let _ = std::fs::remove_dir(root.join(PARENT));
        }
    }
}

/// A frozen job cgroup; thawed when dropped.
pub struct Frozen<'a> {
    cg: &'a JobCgroup,
    lock: FreezeLock,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cg.thaw() {
            warn!("cannot thaw job {}: {e}", self.cg.job);
        }
        self.lock.release();
    }
}

/// Where the freeze locks live: one file per frozen job, holding the
/// cgroup directory, locked (flock) by the agent that froze it.
const LOCK_DIR: &str = "/run/ckpt/frozen";

/// The lock an agent holds while a job is frozen.
struct FreezeLock {
    path: PathBuf,
    file: Option<nix::fcntl::Flock<File>>,
}

impl FreezeLock {
    fn take(cg: &JobCgroup) -> Result<Self> {
        std::fs::create_dir_all(LOCK_DIR).map_err(|e| Error::io(LOCK_DIR, e))?;
        let path = Path::new(LOCK_DIR).join(&cg.job);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut file = lock_briefly_held(file).map_err(|(_, e)| Error::Job {
            job: cg.job.clone(),
            reason: format!(
                "another agent is checkpointing it ({}: {e})",
                path.display()
            ),
        })?;
        use std::io::Write;
        writeln!(file, "{}", cg.dir.display()).map_err(|e| Error::io(&path, e))?;
        Ok(FreezeLock {
            path,
            file: Some(file),
        })
    }

    fn release(&mut self) {
        // Removed before it is unlocked: nobody may find it unlocked while
        // it still names this freeze.
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(f);
        }
    }
}

/// Takes an exclusive flock on a lock record, waiting a little while it is
/// held only briefly: an agent recovering leftovers locks every record it
/// looks at for an instant, which must not pass for another agent at work
/// (that one holds it for its whole dump).
pub fn lock_briefly_held(
    file: File,
) -> std::result::Result<nix::fcntl::Flock<File>, (File, nix::errno::Errno)> {
    let mut file = file;
    for _ in 0..50 {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(4));
            }
            Err(e) => return Err(e),
        }
    }
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
}

/// Thaws the jobs an agent froze and then died without thawing (its lock
/// file is left, unlocked). Returns the jobs thawed.
pub fn recover_frozen() -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(LOCK_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(LOCK_DIR, e)),
    };
    let mut thawed = Vec::new();
    for e in rd.flatten() {
        let path = e.path();
        let Ok(file) = File::options().read(true).write(true).open(&path) else {
            continue;
        };
        // Locked: its agent is alive and will thaw the job itself.
        let Ok(file) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        let dir = std::fs::read_to_string(&path).unwrap_or_default();
        let dir = PathBuf::from(dir.trim());
        let job = e.file_name().to_string_lossy().into_owned();
        let freezer = if dir.join("cgroup.freeze").exists() {
            Some(Freezer::V2)
        } else if dir.join("freezer.state").exists() {
            Some(Freezer::V1)
        } else {
            None
        };
        if let Some(freezer) = freezer {
            let cg = JobCgroup {
                job: job.clone(),
                dir,
                freezer,
            };
            cg.thaw()?;
            warn!(job, "thawed a job an agent froze and left frozen");
            thawed.push(job);
        }
        let _ = std::fs::remove_file(&path);
        drop(file);
    }
    Ok(thawed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_freezers() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/freezer rw,relatime shared:12 - cgroup cgroup rw,freezer\n\
                  29 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  31 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw,nsdelegate\n\
                  32 25 0:28 / /my\\040dir rw - tmpfs tmpfs rw\n";
        let (v2, v1) = freezer_roots(&proc::parse_mountinfo(mi));
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(v1, Some(PathBuf::from("/sys/fs/cgroup/freezer")));
        assert_eq!(freezer_roots(&proc::parse_mountinfo("")), (None, None));
    }

    /// A killed job's cgroup renamed aside frees its name for the job's
    /// return while its tasks still live there; the sweep takes it once
    /// it is empty.
    #[test]
    fn a_cgroup_set_aside_frees_the_job_name() {
        /// Kills the test's child and removes its cgroups, pass or fail.
        struct Cleanup(std::process::Child, String);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
                sweep_set_aside();
                if let Ok(cg) = JobCgroup::find(&self.1) {
                    cg.remove();
                }
            }
        }
        let job = format!("unit-aside-{}", std::process::id());
        let mut cg = JobCgroup::create(&job).expect("create the job cgroup");
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        let mut cleanup = Cleanup(child, job.clone());
        std::fs::write(cg.dir.join("cgroup.procs"), pid.to_string())
            .or_else(|_| std::fs::write(cg.dir.join("tasks"), pid.to_string()))
            .expect("move the child into the job cgroup");
        let old = cg.dir.clone();
        cg.set_aside().expect("rename the cgroup");
        assert_ne!(cg.dir, old);
        assert_eq!(cg.procs().unwrap(), vec![pid], "its task went along");
        let back = JobCgroup::create(&job).expect("the name is free again");
        assert!(back.procs().unwrap().is_empty());
        back.remove();
        cleanup.0.kill().unwrap();
        cleanup.0.wait().unwrap();
        // This agent's own: its departure removes it, not the sweep.
        sweep_set_aside();
        assert!(cg.dir.exists());
        cg.remove();
        assert!(!cg.dir.exists());
        // One a dead agent left (no process has pid 0x7fffffff here).
        let left = cg.dir.with_file_name(format!("{job}{GONE}2147483647-0"));
        std::fs::create_dir_all(&left).unwrap();
        sweep_set_aside();
        assert!(
            !left.exists(),
            "the empty cgroup a dead agent set aside was swept"
        );
    }

    #[test]
    fn job_ids() {
        assert!(check_job_id("job-42.a_b").is_ok());
        for bad in ["", "..", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(check_job_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
