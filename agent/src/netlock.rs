//! The network lock: while a job's TCP connections are read, and until the
//! job is resumed or restored, packets of those connections are dropped
//! (nftables, in the network namespace the sockets live in), so that no
//! peer sees a reset: the peer retransmits, and once the lock goes the
//! connection resumes where it was.
//!
//! A lock is an nftables table named after the job, plus a record file in
//! /run/ckpt/netlock flocked by the agent that holds it. Each socket put in
//! repair mode is noted there too. If the agent dies, the flock goes with
//! it: the next agent start or `ckpt-agent cleanup` finds the record
//! unlocked, deletes the table, takes the sockets out of repair mode and
//! thaws the job ([`recover`]). A dump that killed a job living in its
//! node's network namespace *keeps* the lock (the address stays on the
//! node and a peer's retransmission would meet a reset) until the job is
//! restored here or `ckpt-agent cleanup --job` says it went elsewhere.

use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// Where lock records live.
pub const RECORD_DIR: &str = "/run/ckpt/netlock";

/// One TCP endpoint of the job to block: a connection (both directions)
/// or a listening socket (new connections to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conn {
    pub local: SocketAddr,
    /// None for a listening socket.
    pub remote: Option<SocketAddr>,
}

/// Which network namespace a lock lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Netns {
    /// The agent's own (the node's).
    Agent,
    /// The one process `pid` (host PID) is in: a job's private namespace.
    Of(i32),
}

/// A socket the lock's holder put in repair mode: undone by [`recover`]
/// if the holder dies.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Repaired {
    pid: i32,
    fd: i32,
    ino: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    table: String,
    netns: Netns,
    netns_ino: u64,
    /// Kept after a dump that killed the job: not a leftover.
    kept: bool,
    conns: Vec<Conn>,
    repaired: Vec<Repaired>,
}

/// A held network lock. Dropping it without [`NetLock::release`] or
/// [`NetLock::keep`] releases it.
pub struct NetLock {
    rec: Record,
    path: PathBuf,
    file: Option<Flock<File>>,
    /// Our copies of the job's connections.
    held: Vec<(Repaired, OwnedFd)>,
    done: bool,
    /// Took over the lock a dump kept: a failure keeps it again.
    was_kept: bool,
}

/// The nftables table name for a lock of `job` (a job id or "pid<N>").
pub fn table_name(job: &str) -> String {
    let clean: String = job
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("ckpt_{clean}")
}

fn netns_ino(ns: Netns) -> Result<u64> {
    let p = match ns {
        Netns::Agent => "/proc/self/ns/net".to_string(),
        Netns::Of(pid) => format!("/proc/{pid}/ns/net"),
    };
    std::fs::metadata(&p)
        .map(|m| m.ino())
        .map_err(|e| Error::io(&p, e))
}

/// Runs `nft` with `script` on stdin in namespace `ns`.
fn nft(ns: Netns, name: &str, args: &[&str], script: &str) -> Result<String> {
    let run = || -> Result<String> {
        let mut child = Command::new("nft")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::NetLock {
                name: name.into(),
                reason: format!("cannot run nft (install the nftables package): {e}"),
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| Error::io("nft stdin", e))?;
        }
        let out = child.wait_with_output().map_err(|e| Error::io("nft", e))?;
        if !out.status.success() {
            return Err(Error::NetLock {
                name: name.into(),
                reason: format!(
                    "nft {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    match ns {
        Netns::Agent => run(),
        // A child spawned from a thread inside the namespace is in it too.
        Netns::Of(pid) => crate::ns::in_ns(pid, libc::CLONE_NEWNET as u64, run),
    }
}

/// The nft match of an address as source or destination (`dir`: "saddr"
/// or "daddr"); none for the wildcard. A v4-mapped IPv6 address travels as
/// IPv4 on the wire.
fn ip_match(dir: &str, ip: &IpAddr) -> Option<String> {
    if ip.is_unspecified() {
        return None;
    }
    Some(match ip {
        IpAddr::V4(v4) => format!("ip {dir} {v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip {dir} {v4}"),
            None => format!("ip6 {dir} {v6}"),
        },
    })
}

/// The nft match of one direction of a connection: `from` sends to `to`.
fn flow(from: &SocketAddr, to: &SocketAddr) -> String {
    let mut m: Vec<String> = [ip_match("saddr", &from.ip()), ip_match("daddr", &to.ip())]
        .into_iter()
        .flatten()
        .collect();
    m.push(format!("tcp sport {} tcp dport {}", from.port(), to.port()));
    m.join(" ")
}

/// The ruleset of a lock: its table, created if missing (so a restore on
/// the node where the dump kept its lock takes that lock over), with one
/// drop rule per direction of each connection and one per listener.
pub fn ruleset(table: &str, conns: &[Conn]) -> String {
    let mut s = format!(
        "table inet {table} {{\n\
         \tchain in {{ type filter hook input priority -310; policy accept; }}\n\
         \tchain out {{ type filter hook output priority -310; policy accept; }}\n\
         }}\n"
    );
    for c in conns {
        match &c.remote {
            Some(r) => {
                s += &format!("add rule inet {table} in {} drop\n", flow(r, &c.local));
                s += &format!("add rule inet {table} out {} drop\n", flow(&c.local, r));
            }
            None => {
                // New connections to the listener: match on the way in by
                // destination.
                let mut m: Vec<String> = ip_match("daddr", &c.local.ip()).into_iter().collect();
                m.push(format!("tcp dport {}", c.local.port()));
                s += &format!("add rule inet {table} in {} drop\n", m.join(" "));
            }
        }
    }
    s
}

impl NetLock {
    /// Blocks `conns` in namespace `ns` under the name of `job`.
    pub fn take(job: &str, ns: Netns, conns: Vec<Conn>) -> Result<NetLock> {
        let table = table_name(job);
        let ino = netns_ino(ns)?;
        std::fs::create_dir_all(RECORD_DIR).map_err(|e| Error::io(RECORD_DIR, e))?;
        let path = Path::new(RECORD_DIR).join(format!("{table}-{ino}"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let file = crate::cgroup::lock_briefly_held(file).map_err(|(_, e)| {
            Error::NetLock {
                name: table.clone(),
                reason: format!(
                    "another agent holds this lock ({}: {e}); is the job being checkpointed or restored?",
                    path.display()
                ),
            }
        })?;
        let was_kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Record>(&t).ok())
            .is_some_and(|r| r.kept);
        let mut lock = NetLock {
            rec: Record {
                table,
                netns: ns,
                netns_ino: ino,
                kept: false,
                conns,
                repaired: Vec::new(),
            },
            path,
            file: Some(file),
            held: Vec::new(),
            done: false,
            was_kept,
        };
        // Recorded before the rules exist: a crash in between leaves a
        // record whose cleanup finds nothing to delete, never rules nobody knows.
        lock.save()?;
        nft(
            ns,
            &lock.rec.table,
            &["-f", "-"],
            &ruleset(&lock.rec.table, &lock.rec.conns),
        )?;
        info!(
            table = lock.rec.table,
            conns = lock.rec.conns.len(),
            "network locked"
        );
        Ok(lock)
    }

    fn save(&mut self) -> Result<()> {
        let text = serde_json::to_string(&self.rec).expect("a record serializes");
        let f = self.file.as_mut().expect("record file held");
        f.set_len(0).map_err(|e| Error::io(&self.path, e))?;
        std::io::Seek::rewind(&mut **f).map_err(|e| Error::io(&self.path, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }

    /// Whether it blocks established connections (not only listeners).
    pub fn has_connections(&self) -> bool {
        self.rec.conns.iter().any(|c| c.remote.is_some())
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.rec.table
    }

    /// Notes that socket `fd` of `pid` goes into repair mode (before it
    /// does: a crash in between only makes cleanup check it).
    pub fn note_repair(&mut self, pid: i32, fd: i32, ino: u64) -> Result<()> {
        self.rec.repaired.push(Repaired { pid, fd, ino });
        self.save()
    }

    /// Notes that socket `fd` of `pid` left repair mode.
    pub fn clear_repair(&mut self, pid: i32, fd: i32) -> Result<()> {
        self.rec.repaired.retain(|r| (r.pid, r.fd) != (pid, fd));
        self.save()
    }

    /// Keeps the agent's copy of a connection's socket, for
    /// [`NetLock::repair_for_close`].
    pub fn hold(&mut self, pid: i32, fd: i32, ino: u64, sock: OwnedFd) {
        self.held.push((Repaired { pid, fd, ino }, sock));
    }

    /// Puts every held socket in repair mode, just before the job is
    /// killed: closed in repair mode, a socket vanishes without a FIN or a
    /// reset, and leaves no orphan holding its addresses.
    pub fn repair_for_close(&mut self) -> Result<()> {
        self.rec
            .repaired
            .extend(self.held.iter().map(|(r, _)| r.clone()));
        self.save()?;
        for (r, s) in &self.held {
            crate::sys::tcp::set_u32(std::os::fd::AsFd::as_fd(s), crate::sys::tcp::TCP_REPAIR, 1)
                .map_err(|e| Error::sys(r.pid, format!("TCP_REPAIR on, fd {}", r.fd), e))?;
        }
        Ok(())
    }

    /// Closes the agent's copies of the sockets (after the job was killed).
    pub fn drop_sockets(&mut self) -> Result<()> {
        self.held.clear();
        self.rec.repaired.clear();
        self.save()
    }

    /// Unblocks the connections and forgets the lock.
    pub fn release(mut self) -> Result<()> {
        self.done = true;
        self.unrepair_all();
        let r = delete_table(self.rec.netns, self.rec.netns_ino, &self.rec.table);
        self.held.clear();
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(f);
        }
        if r.is_ok() {
            info!(table = self.rec.table, "network unlocked");
        }
        r
    }

    /// Records already that the rules stay once the job is killed (as
    /// [`NetLock::keep`] will): an agent that dies before that leaves them
    /// for the restore, not unlocked by its successor.
    pub fn mark_kept(&mut self) -> Result<()> {
        self.rec.kept = true;
        self.save()
    }

    /// Leaves the rules in place after the job was killed, until it is
    /// restored on this node or `cleanup --job` releases them.
    pub fn keep(mut self) -> Result<()> {
        self.done = true;
        self.held.clear();
        self.rec.repaired.clear();
        self.rec.kept = true;
        self.save()?;
        info!(
            table = self.rec.table,
            "network lock kept until the job is restored"
        );
        self.file.take();
        Ok(())
    }
}

impl NetLock {
    /// Takes every socket noted in repair mode out of it (a failed dump:
    /// the job goes on).
    fn unrepair_all(&mut self) {
        for r in std::mem::take(&mut self.rec.repaired) {
            if let Err(e) = unrepair(&r) {
                warn!("{e}");
            }
        }
        let _ = self.save();
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.was_kept {
            // A restore that took over a dump's lock failed: the job's
            // connections still wait for a restore.
            self.unrepair_all();
            self.held.clear();
            self.rec.kept = true;
            if let Err(e) = self.save() {
                warn!("{e}");
            }
            self.file.take();
            return;
        }
        self.unrepair_all();
        if let Err(e) = delete_table(self.rec.netns, self.rec.netns_ino, &self.rec.table) {
            warn!("{e}");
        }
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(f);
        }
    }
}

/// Deletes a lock table; one already gone (or its namespace) is fine.
fn delete_table(ns: Netns, ino: u64, table: &str) -> Result<()> {
    if netns_ino(ns).ok() != Some(ino) {
        // The namespace went with the job (its PID may be someone else's now).
        return Ok(());
    }
    let script = format!("table inet {table}\ndelete table inet {table}\n");
    nft(ns, table, &["-f", "-"], &script).map(drop)
}

/// What [`recover`] did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Recovered {
    /// Tables deleted.
    pub unlocked: Vec<String>,
    /// Sockets taken out of repair mode, as "pid/fd".
    pub unrepaired: Vec<String>,
}

/// Undoes the locks of agents that died holding them: in this agent's
/// namespace or a job namespace it can reach. With `kept_of` set, also
/// releases the locks dumps of that job kept in this agent's namespace
/// (the job was restored elsewhere).
pub fn recover(kept_of: Option<&str>) -> Result<Recovered> {
    let mut done = Recovered::default();
    let rd = match std::fs::read_dir(RECORD_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(Error::io(RECORD_DIR, e)),
    };
    let own_ino = netns_ino(Netns::Agent)?;
    let kept_table = kept_of.map(table_name);
    for e in rd.flatten() {
        let path = e.path();
        let Ok(file) = File::options().read(true).write(true).open(&path) else {
            continue;
        };
        // Locked: its agent is alive, or another recovery is looking at
        // it. The lock being released was kept by a restore or dump that
        // has ended: a lock on it is another recovery's, held for a moment
        // (two parts of a job released at once on one machine), and is
        // waited for; skipping it left the part's traffic blocked for good.
        let ours = kept_table.as_deref().is_some_and(|t| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{t}-"))
        });
        let Some(file) = lock_record(file, ours) else {
            if ours {
                warn!(record = %path.display(), "the lock to release stays locked by a live process");
            }
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let Ok(rec) = serde_json::from_str::<Record>(&text) else {
            warn!("{}: unreadable lock record removed", path.display());
            let _ = std::fs::remove_file(&path);
            continue;
        };
        // Which namespace can this agent reach the lock in?
        let ns = match rec.netns {
            Netns::Of(pid) if netns_ino(Netns::Of(pid)).ok() == Some(rec.netns_ino) => {
                Some(Netns::Of(pid))
            }
            // The job and its namespace are gone: so are the rules.
            Netns::Of(_) => None,
            Netns::Agent if rec.netns_ino == own_ino => Some(Netns::Agent),
            // Another node's: its own agent recovers it, unless that
            // namespace is gone (the node with it), and its rules with it.
            Netns::Agent if netns_exists(rec.netns_ino) => continue,
            Netns::Agent => {
                debug!(table = rec.table, "lock record of a namespace that is gone");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        if rec.kept && ns.is_some() && kept_table.as_deref() != Some(rec.table.as_str()) {
            continue;
        }
        for r in &rec.repaired {
            match unrepair(r) {
                Ok(true) => done.unrepaired.push(format!("{}/{}", r.pid, r.fd)),
                Ok(false) => {}
                Err(e) => warn!("{e}"),
            }
        }
        if let Some(ns) = ns {
            delete_table(ns, rec.netns_ino, &rec.table)?;
            if rec.kept {
                info!(table = rec.table, "released the network lock a dump kept");
            } else {
                warn!(
                    table = rec.table,
                    "removed a network lock its agent left behind"
                );
            }
            done.unlocked.push(rec.table.clone());
        }
        let _ = std::fs::remove_file(&path);
        drop(file);
    }
    Ok(done)
}

/// Whether a lock named `name` (a job's, see [`table_name`]) is still
/// recorded on this machine: after a release, that it was not released.
pub fn recorded(name: &str) -> bool {
    let prefix = format!("{}-", table_name(name));
    std::fs::read_dir(RECORD_DIR).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

/// Takes the record's flock: at once, or when `patient`, waiting up to 5 s
/// for another holder to let go. None if it stays taken.
fn lock_record(mut file: File, patient: bool) -> Option<Flock<File>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Some(locked),
            Err((f, _)) if patient && std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
}

/// Whether a network namespace with inode `ino` still exists: some process
/// is in it, or a bind mount under /run/netns holds it.
fn netns_exists(ino: u64) -> bool {
    let held = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.ino() == ino);
    let by_process = std::fs::read_dir("/proc").is_ok_and(|rd| {
        rd.flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .any(|e| held(&e.path().join("ns/net")))
    });
    let by_mount =
        std::fs::read_dir("/run/netns").is_ok_and(|rd| rd.flatten().any(|e| held(&e.path())));
    by_process || by_mount
}

/// Takes socket `r` out of repair mode if it is still that process's fd.
fn unrepair(r: &Repaired) -> Result<bool> {
    let Ok(pidfd) = crate::sys::pidfd::pidfd_open(r.pid) else {
        return Ok(false);
    };
    let Ok(sock) = crate::sys::pidfd::pidfd_getfd(std::os::fd::AsFd::as_fd(&pidfd), r.fd) else {
        return Ok(false);
    };
    let f = File::from(sock);
    if f.metadata().map(|m| m.ino()).ok() != Some(r.ino) {
        debug!(pid = r.pid, fd = r.fd, "fd no longer the repaired socket");
        return Ok(false);
    }
    crate::inet::repair_off(std::os::fd::AsFd::as_fd(&f))
        .map_err(|e| Error::sys(r.pid, format!("TCP_REPAIR off, fd {}", r.fd), e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record held for a moment by another recovery is waited for when
    /// it is the lock being released, skipped otherwise.
    #[test]
    fn the_record_being_released_waits_out_a_passing_lock() {
        let path = std::env::temp_dir().join(format!("ckpt-netlock-rec-{}", std::process::id()));
        std::fs::write(&path, b"{}").unwrap();
        let open = || File::options().read(true).write(true).open(&path).unwrap();
        let held = Flock::lock(open(), FlockArg::LockExclusiveNonblock).unwrap();
        assert!(lock_record(open(), false).is_none(), "taken while held");
        let passer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
        });
        assert!(lock_record(open(), true).is_some(), "not waited for");
        passer.join().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn names_are_nft_identifiers() {
        assert_eq!(table_name("job-42.a"), "ckpt_job_42_a");
        assert_eq!(table_name("pid77"), "ckpt_pid77");
    }

    #[test]
    fn rules_cover_both_directions_and_listeners() {
        let conns = vec![
            Conn {
                local: "10.0.0.1:5000".parse().unwrap(),
                remote: Some("10.0.0.2:40000".parse().unwrap()),
            },
            Conn {
                local: "[::]:7000".parse().unwrap(),
                remote: None,
            },
            Conn {
                local: "[::ffff:10.0.0.1]:6000".parse().unwrap(),
                remote: Some("[::ffff:10.0.0.3]:1234".parse().unwrap()),
            },
        ];
        let s = ruleset("ckpt_j", &conns);
        assert!(s.contains("add rule inet ckpt_j in ip saddr 10.0.0.2 ip daddr 10.0.0.1 tcp sport 40000 tcp dport 5000 drop"));
        assert!(s.contains("add rule inet ckpt_j out ip saddr 10.0.0.1 ip daddr 10.0.0.2 tcp sport 5000 tcp dport 40000 drop"));
        assert!(s.contains("add rule inet ckpt_j in tcp dport 7000 drop"));
        // A v4-mapped connection's packets are IPv4 on the wire.
        assert!(
            s.contains("in ip saddr 10.0.0.3 ip daddr 10.0.0.1 tcp sport 1234 tcp dport 6000 drop")
        );
    }
}
