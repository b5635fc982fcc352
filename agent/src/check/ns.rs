//! Probes of namespaces, clone3 with set_tid, SysV IPC ids, nftables and
//! veth pairs on a bridge.
//! Every namespace is created in a throw-away child and dies with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use super::{ctx, Outcome, CHILD_TIMEOUT};
use crate::sys::probe::{self, fork_child, ChildIo, ProbeChild, SysvKind};

const NOERR: Errno = Errno::UnknownErrno;

fn ns_inode(path: &str) -> Result<u64, Errno> {
    nix::sys::stat::stat(path).map(|s| s.st_ino)
}

/// What a namespace probe's extra step returns: step (0 = fine), a value,
/// and a grandchild to keep alive until the namespace has been looked at.
type Extra = (u64, u64, Option<ProbeChild>);

/// Unshares `flag` in a child and compares `/proc/self/ns/<file>` there
/// with ours; `extra` runs in the child afterwards (raw syscalls only) and
/// returns a step number (0 = fine) and a value.
fn ns_probe(
    flag: CloneFlags,
    name: &str,
    file: &'static str,
    extra: fn(&ChildIo) -> Extra,
) -> Outcome {
    let ours =
        ns_inode(&format!("/proc/thread-self/ns/{file}")).map_err(ctx("stat own namespace"))?;
    let mut path = [0u8; 64];
    let prefix = b"/proc/self/ns/";
    path[..prefix.len()].copy_from_slice(prefix);
    path[prefix.len()..prefix.len() + file.len()].copy_from_slice(file.as_bytes());
    let path_len = prefix.len() + file.len();
    let mut c = fork_child(|io| {
        if unshare(flag).is_err() {
            return io.fail(1);
        }
        // `extra` first: pid_for_children only resolves once the new
        // namespace has its init.
        let (step, val, keep) = extra(io);
        if step != 0 {
            return io.report(step, Errno::last(), &[0, val]);
        }
        let p = std::str::from_utf8(&path[..path_len]).unwrap_or("/");
        let ino = ns_inode(p);
        drop(keep);
        match ino {
            Ok(ino) => io.report(0, NOERR, &[ino, val]),
            Err(_) => io.fail(2),
        }
    })
    .map_err(ctx("fork"))?;
    let r = c.final_report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    match r.step {
        0 if r.vals[0] != ours => Ok(format!(
            "new {name} namespace ({file} inode {} != {ours})",
            r.vals[0]
        )),
        0 => Err(format!("unshare succeeded but {file} is unchanged")),
        1 => Err(format!(
            "unshare(CLONE_NEW{}): {}",
            name.to_uppercase(),
            r.errno
        )),
        2 => Err(format!("stat /proc/self/ns/{file}: {}", r.errno)),
        s => Err(format!(
            "inside the new namespace, step {s} failed: {} (value {})",
            r.errno, r.vals[1]
        )),
    }
}

fn nothing(_: &ChildIo) -> Extra {
    (0, 0, None)
}

pub(super) fn ns_pid() -> Outcome {
    ns_probe(CloneFlags::CLONE_NEWPID, "pid", "pid_for_children", |_| {
        // The first child becomes the namespace's init, pid 1. It stays
        // alive (killed when `g` drops) so the namespace stays visible.
        let Ok(mut g) = fork_child(|gio| {
            gio.report(0, NOERR, &[probe::raw_getpid() as u64]);
            gio.idle()
        }) else {
            return (3, 0, None);
        };
        match g.report(Duration::from_secs(2)) {
            Ok(r) if r.vals[0] == 1 => (0, 1, Some(g)),
            Ok(r) => (4, r.vals[0], None),
            Err(_) => (5, 0, None),
        }
    })
    .map(|s| format!("{s}; its first child is pid 1"))
}

pub(super) fn ns_ipc() -> Outcome {
    ns_probe(CloneFlags::CLONE_NEWIPC, "ipc", "ipc", nothing)
}

pub(super) fn ns_uts() -> Outcome {
    ns_probe(CloneFlags::CLONE_NEWUTS, "uts", "uts", |_| {
        if nix::unistd::sethostname("ckpt-probe").is_err() {
            return (3, 0, None);
        }
        match nix::sys::utsname::uname() {
            Ok(u) if u.nodename() == "ckpt-probe" => (0, 0, None),
            _ => (4, 0, None),
        }
    })
}

pub(super) fn ns_mnt() -> Outcome {
    ns_probe(CloneFlags::CLONE_NEWNS, "mnt", "mnt", nothing)
}

pub(super) fn ns_net() -> Outcome {
    ns_probe(
        CloneFlags::CLONE_NEWNET,
        "net",
        "net",
        |_| match probe::loopback_up() {
            Ok(()) => (0, 0, None),
            Err(_) => (3, 0, None),
        },
    )
}

pub(super) fn ns_user() -> Outcome {
    ns_probe(CloneFlags::CLONE_NEWUSER, "user", "user", nothing)
}

pub(super) fn ns_cgroup() -> Outcome {
    ns_probe(CloneFlags::CLONE_NEWCGROUP, "cgroup", "cgroup", nothing)
}

/// Offset set on the new time namespace's monotonic clock, in seconds.
const TIME_OFFSET: i64 = 100_000;

pub(super) fn ns_time() -> Outcome {
    ns_probe(
        CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
        "time",
        "time_for_children",
        |_| {
            let Ok(fd) =
                nix::fcntl::open("/proc/self/timens_offsets", OFlag::O_WRONLY, Mode::empty())
            else {
                return (3, 0, None);
            };
            if nix::unistd::write(&fd, b"monotonic 100000 0").is_err() {
                return (4, 0, None);
            }
            drop(fd);
            let Ok(t0) = probe::raw_clock_gettime(libc::CLOCK_MONOTONIC) else {
                return (5, 0, None);
            };
            // Only children enter the new time namespace.
            let Ok(mut g) = fork_child(|_| match probe::raw_clock_gettime(libc::CLOCK_MONOTONIC) {
                Ok(t1) if t1.tv_sec - t0.tv_sec >= TIME_OFFSET - 1 => 0,
                _ => 1,
            }) else {
                return (6, 0, None);
            };
            match g.wait_exit(Duration::from_secs(2)) {
                Ok(WaitStatus::Exited(_, 0)) => (0, 0, None),
                _ => (7, 0, None),
            }
        },
    )
    .map(|s| format!("{s}; monotonic offset of {TIME_OFFSET} s seen by a child"))
}

/// Pids the clone3 probe asks for inside its new PID namespace.
const CHOSEN_PIDS: [i32; 2] = [1, 4242];

pub(super) fn clone3_set_tid() -> Outcome {
    let mut c = fork_child(|io| {
        if unshare(CloneFlags::CLONE_NEWPID).is_err() {
            return io.fail(1);
        }
        let init = probe::clone3_with_tid(CHOSEN_PIDS[0], || {
            probe::set_pdeathsig_kill();
            if probe::raw_getpid() != CHOSEN_PIDS[0] {
                return 10;
            }
            let Ok(second) = probe::clone3_with_tid(CHOSEN_PIDS[1], || {
                if probe::raw_getpid() == CHOSEN_PIDS[1] {
                    0
                } else {
                    11
                }
            }) else {
                return 12;
            };
            match waitpid(second, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(_, code)) => code,
                _ => 13,
            }
        });
        let init = match init {
            Ok(p) => p,
            Err(e) => return io.report(2, e, &[]),
        };
        match waitpid(init, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(_, code)) => {
                io.report(if code == 0 { 0 } else { 3 }, NOERR, &[code as u64])
            }
            _ => io.fail(4),
        }
    })
    .map_err(ctx("fork"))?;
    let r = c.final_report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    match (r.step, r.vals[0]) {
        (0, _) => Ok(format!(
            "in a new PID namespace, clone3 set_tid gave pids {} and {}",
            CHOSEN_PIDS[0], CHOSEN_PIDS[1]
        )),
        (1, _) => Err(format!("unshare(CLONE_NEWPID): {}", r.errno)),
        (2, _) => Err(format!(
            "clone3 with set_tid=[{}]: {}",
            CHOSEN_PIDS[0], r.errno
        )),
        (3, 10) => Err(format!("clone3 child is not pid {}", CHOSEN_PIDS[0])),
        (3, 11) => Err(format!("clone3 child is not pid {}", CHOSEN_PIDS[1])),
        (3, 12) => Err(format!(
            "clone3 with set_tid=[{}] failed inside the namespace",
            CHOSEN_PIDS[1]
        )),
        (s, v) => Err(format!("step {s} failed (code {v})")),
    }
}

/// (sysctl file, kind, id asked for). The ids are above 32768 so that the
/// sequence part of the id is exercised, not only the index.
const SYSV: [(&str, SysvKind, i32); 3] = [
    ("/proc/sys/kernel/shm_next_id", SysvKind::Shm, 98_765),
    ("/proc/sys/kernel/msg_next_id", SysvKind::Msg, 98_766),
    ("/proc/sys/kernel/sem_next_id", SysvKind::Sem, 98_767),
];

/// Formats a non-negative number into `buf` without allocating.
fn fmt_u32(mut v: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

pub(super) fn sysv_ipc_ids() -> Outcome {
    let mut c = fork_child(|io| {
        if unshare(CloneFlags::CLONE_NEWIPC).is_err() {
            return io.fail(1);
        }
        let mut got = [0u64; 3];
        for (i, (file, kind, want)) in SYSV.iter().enumerate() {
            let step = 2 + 3 * i as u64;
            let Ok(fd) = nix::fcntl::open(*file, OFlag::O_WRONLY, Mode::empty()) else {
                return io.fail(step);
            };
            let mut b = [0u8; 12];
            if nix::unistd::write(&fd, fmt_u32(*want as u32, &mut b)).is_err() {
                return io.fail(step);
            }
            drop(fd);
            let id = match probe::sysv_create(*kind) {
                Ok(id) => id,
                Err(e) => return io.report(step + 1, e, &[]),
            };
            got[i] = id as u64;
            let _ = probe::sysv_remove(*kind, id);
            if id != *want {
                return io.report(step + 2, NOERR, &got);
            }
        }
        io.report(0, NOERR, &got)
    })
    .map_err(ctx("fork"))?;
    let r = c.final_report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    if r.step == 0 {
        return Ok(format!(
            "shm {}, msg {}, sem {} created with the ids asked for",
            r.vals[0], r.vals[1], r.vals[2]
        ));
    }
    if r.step == 1 {
        return Err(format!("unshare(CLONE_NEWIPC): {}", r.errno));
    }
    let i = ((r.step - 2) / 3) as usize;
    let (file, kind, want) = SYSV.get(i).copied().unwrap_or(SYSV[0]);
    Err(match (r.step - 2) % 3 {
        0 => format!("write {file}: {}", r.errno),
        1 => format!("create {kind:?}: {}", r.errno),
        _ => format!("{kind:?} got id {} instead of {want}", r.vals[i]),
    })
}

/// Looks a program up in PATH and the sbin directories (often not in a
/// service's PATH).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

pub(super) fn nftables() -> Outcome {
    let nft = find_program("nft").ok_or("nft binary not found (apt-get install nftables)")?;
    let unshare_bin =
        find_program("unshare").ok_or("unshare binary not found (apt-get install util-linux)")?;
    let nft = nft.display();
    // A private network namespace: nothing here can touch the host's rules,
    // and everything vanishes with the namespace even if a step fails.
    let script = format!(
        "set -e; {nft} add table inet ckpt_probe; \
         {nft} add chain inet ckpt_probe out '{{ type filter hook output priority 0; }}'; \
         {nft} add rule inet ckpt_probe out ip daddr 198.18.0.1 tcp dport 9 drop; \
         {nft} list table inet ckpt_probe; \
         {nft} delete table inet ckpt_probe"
    );
    let out = Command::new(&unshare_bin)
        .args(["--net", "--", "sh", "-c", &script])
        .output()
        .map_err(|e| format!("run {}: {e}", unshare_bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("nft failed ({}): {}", out.status, err.trim()));
    }
    if !stdout.contains("drop") {
        return Err("nft list did not show the drop rule".into());
    }
    Ok("added, listed and deleted a table with a drop rule in a private netns".into())
}

pub(super) fn veth() -> Outcome {
    let ip = find_program("ip").ok_or("ip binary not found (apt-get install iproute2)")?;
    let unshare_bin =
        find_program("unshare").ok_or("unshare binary not found (apt-get install util-linux)")?;
    let ip = ip.display();
    // What a job's restore does, in a private network namespace that takes
    // everything with it when the probe ends.
    let script = format!(
        "set -e; {ip} link add ckpt-br type bridge; \
         {ip} link add ckpt-a mtu 1400 type veth peer name ckpt-b address 02:00:00:00:00:01 mtu 1400; \
         {ip} link set ckpt-a master ckpt-br up; {ip} link set ckpt-b up; \
         {ip} -j -d link show ckpt-a"
    );
    let out = Command::new(&unshare_bin)
        .args(["--net", "--", "sh", "-c", &script])
        .output()
        .map_err(|e| format!("run {}: {e}", unshare_bin.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("ip failed ({}): {}", out.status, err.trim()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.contains("\"master\":\"ckpt-br\"") {
        return Err("the veth end did not join the bridge".into());
    }
    Ok(
        "made a veth pair with a chosen MAC and MTU, one end on a bridge, in a private netns"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmt_numbers() {
        let mut b = [0u8; 12];
        assert_eq!(fmt_u32(0, &mut b), b"0");
        assert_eq!(fmt_u32(98_765, &mut b), b"98765");
        assert_eq!(fmt_u32(u32::MAX, &mut b), b"4294967295");
    }
}
