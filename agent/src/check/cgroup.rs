//! Probes of the cgroup freezers: a sleeping child is put in a fresh cgroup,
//! frozen, seen frozen, thawed, killed, and the cgroup removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{ctx, Outcome, CHILD_TIMEOUT};
use crate::sys::probe::{fork_child, ProbeChild};

/// Mount points of cgroup filesystems: (fstype, super options, mount point).
fn cgroup_mounts(mountinfo: &str) -> Vec<(String, String, PathBuf)> {
    crate::proc::parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|m| m.fstype.starts_with("cgroup"))
        .map(|m| (m.fstype, m.super_options, PathBuf::from(m.mount_point)))
        .collect()
}

fn mounts() -> Result<Vec<(String, String, PathBuf)>, String> {
    Ok(cgroup_mounts(
        &std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(ctx("read /proc/self/mountinfo"))?,
    ))
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
    let ms = mounts()?;
    let root = ms
        .iter()
        .find(|(t, o, _)| t == "cgroup" && o.split(',').any(|x| x == "freezer"))
        .map(|(_, _, m)| m.clone())
        .ok_or("no cgroup v1 freezer hierarchy mounted")?;
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
    let ms = mounts()?;
    let root = ms
        .iter()
        .find(|(t, _, _)| t == "cgroup2")
        .map(|(_, _, m)| m.clone())
        .ok_or("no cgroup2 filesystem mounted")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup_mounts() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/freezer rw,relatime shared:12 - cgroup cgroup rw,freezer\n\
                  31 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw,nsdelegate\n\
                  32 25 0:28 / /my\\040dir rw - tmpfs tmpfs rw\n";
        let m = cgroup_mounts(mi);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, "cgroup");
        assert_eq!(m[0].1, "rw,freezer");
        assert_eq!(m[0].2, PathBuf::from("/sys/fs/cgroup/freezer"));
        assert_eq!(m[1].2, PathBuf::from("/sys/fs/cgroup/unified"));
    }
}
