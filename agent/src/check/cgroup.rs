//! Probes of the cgroup freezers: a sleeping child is put in a fresh cgroup,
//! frozen, seen frozen, thawed, killed, and the cgroup removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{ctx, Outcome, CHILD_TIMEOUT};
use crate::sys::probe::{fork_child, ProbeChild};

fn roots() -> Result<(Option<PathBuf>, Option<PathBuf>), String> {
    crate::cgroup::hierarchies().map_err(|e| e.to_string())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup directory made for one probe; the child in it is thawed,
/// killed and reaped before the directory is removed.
struct ProbeCgroup {
    dir: PathBuf,
    thaw: (&'static str, &'static str),
    child: Option<ProbeChild>,
}

impl ProbeCgroup {
    fn create(root: &Path, thaw: (&'static str, &'static str)) -> Result<Self, String> {
        let dir = root.join(format!(
            "ckpt-probe-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok(Self {
            dir,
            thaw,
            child: None,
        })
    }

    fn write(&self, file: &str, val: &str) -> Result<(), String> {
        let p = self.dir.join(file);
        std::fs::write(&p, val).map_err(|e| format!("write {val:?} to {}: {e}", p.display()))
    }

    fn read(&self, file: &str) -> Result<String, String> {
        let p = self.dir.join(file);
        std::fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()))
    }

    /// Polls `file` until `done` holds.
    fn wait_for(&self, file: &str, done: impl Fn(&str) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + CHILD_TIMEOUT;
        loop {
            let v = self.read(file)?;
            if done(&v) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{file} still says {:?}", v.trim()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn add_sleeper(&mut self) -> Result<i32, String> {
        let mut c = fork_child(|io| {
            io.report(0, nix::errno::Errno::UnknownErrno, &[]);
            io.idle()
        })
        .map_err(ctx("fork"))?;
        c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
        let pid = c.pid().as_raw();
        self.child = Some(c);
        self.write("cgroup.procs", &pid.to_string())?;
        Ok(pid)
    }
}

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        let _ = self.write(self.thaw.0, self.thaw.1);
        drop(self.child.take());
        // The kernel releases the reaped child's membership asynchronously.
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Err(e) = std::fs::remove_dir(&self.dir) {
            if Instant::now() >= deadline {
                tracing::warn!("cannot remove probe cgroup {}: {e}", self.dir.display());
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn task_state(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_else(|| "?".into())
}

pub(super) fn v1_freezer() -> Outcome {
    let root = roots()?.1.ok_or("no cgroup v1 freezer hierarchy mounted")?;
    let mut cg = ProbeCgroup::create(&root, ("freezer.state", "THAWED"))?;
    let pid = cg.add_sleeper()?;
    cg.write("freezer.state", "FROZEN")?;
    cg.wait_for("freezer.state", |s| s.trim() == "FROZEN")?;
    let state = task_state(pid);
    cg.write("freezer.state", "THAWED")?;
    cg.wait_for("freezer.state", |s| s.trim() == "THAWED")?;
    Ok(format!(
        "froze and thawed a child in {} (frozen task state {state})",
        root.display()
    ))
}

pub(super) fn v2_freeze() -> Outcome {
    let root = roots()?.0.ok_or("no cgroup2 filesystem mounted")?;
    let mut cg = ProbeCgroup::create(&root, ("cgroup.freeze", "0"))?;
    let pid = cg.add_sleeper()?;
    cg.write("cgroup.freeze", "1")?;
    cg.wait_for("cgroup.events", |s| {
        s.lines().any(|l| l.trim() == "frozen 1")
    })?;
    let state = task_state(pid);
    cg.write("cgroup.freeze", "0")?;
    cg.wait_for("cgroup.events", |s| {
        s.lines().any(|l| l.trim() == "frozen 0")
    })?;
    Ok(format!(
        "froze and thawed a child in {} (frozen task state {state})",
        root.display()
    ))
}
