//! sock_diag over netlink: what the kernel knows about every unix socket
//! of the caller's network namespace (peer, state, name, shutdown); and the
//! id under which the caller's network namespace knows another one.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_PEER: u32 = 4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// What sock_diag reports about one unix socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixDiag {
    pub ino: u64,
    pub kind: u8,
    pub state: u8,
    pub peer: u64,
    /// Bound name: a path, or an abstract name starting with '@'.
    pub name: String,
    /// RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2.
    pub shutdown: u8,
    /// Listening: connections waiting to be accepted; else bytes queued.
    pub rqueue: u32,
    /// Listening: the backlog; else bytes being sent.
    pub wqueue: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// Parses the attributes that follow a `unix_diag_msg`.
fn parse_msg(m: &[u8]) -> Option<UnixDiag> {
    // struct unix_diag_msg: family u8, type u8, state u8, pad u8, ino u32, cookie [u32; 2].
    if m.len() < 16 {
        return None;
    }
    let mut d = UnixDiag {
        kind: m[1],
        state: m[2],
        ino: u32_at(m, 4) as u64,
        ..Default::default()
    };
    let mut at = 16;
    while at + 4 <= m.len() {
        let len = u16_at(m, at) as usize;
        let kind = u16_at(m, at + 2) & 0x3fff;
        if len < 4 || at + len > m.len() {
            break;
        }
        let data = &m[at + 4..at + len];
        match kind {
            UNIX_DIAG_NAME => {
                d.name = match data.first() {
                    Some(0) => format!("@{}", String::from_utf8_lossy(&data[1..])),
                    _ => String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string(),
                }
            }
            UNIX_DIAG_PEER if data.len() >= 4 => d.peer = u32_at(data, 0) as u64,
            UNIX_DIAG_SHUTDOWN if !data.is_empty() => d.shutdown = data[0],
            UNIX_DIAG_RQLEN if data.len() >= 8 => {
                d.rqueue = u32_at(data, 0);
                d.wqueue = u32_at(data, 4);
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Some(d)
}

/// Lists every unix socket of this network namespace, by inode.
pub fn unix_sockets() -> io::Result<HashMap<u64, UnixDiag>> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // nlmsghdr (16) + unix_diag_req (24).
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    req.extend_from_slice(&[0xffu8; 8]); // no cookie
                                         // SAFETY: sends a buffer we own to the kernel.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receives into a buffer we own.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut at = 0usize;
        let n = n as usize;
        while at + 16 <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if len < 16 || at + len > n {
                break;
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = -(u32_at(&buf, at + 16) as i32);
                    return Err(io::Error::from_raw_os_error(errno));
                }
                _ => {
                    if let Some(d) = parse_msg(&buf[at + 16..at + len]) {
                        out.insert(d.ino, d);
                    }
                }
            }
            at += (len + 3) & !3;
        }
    }
}

const NETLINK_ROUTE: i32 = 0;
const RTM_GETNSID: u16 = 90;
const RTM_NEWNSID: u16 = 88;
const NETNSA_NSID: u16 = 1;
const NETNSA_PID: u16 = 2;

/// The id (nsid) under which the calling thread's network namespace knows
/// the network namespace of process `pid`; None when it has none assigned.
/// A veth's `link_netnsid` is such an id: comparing the two tells whether
/// an interface's peer lives in that process's namespace.
pub fn nsid_of_pid(pid: i32) -> io::Result<Option<i32>> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // nlmsghdr (16) + rtgenmsg padded (4) + NETNSA_PID attribute (8).
    let mut req = Vec::with_capacity(28);
    req.extend_from_slice(&28u32.to_ne_bytes());
    req.extend_from_slice(&RTM_GETNSID.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&NETNSA_PID.to_ne_bytes());
    req.extend_from_slice(&(pid as u32).to_ne_bytes());
    // SAFETY: sends a buffer we own to the kernel.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 4096];
    // SAFETY: receives into a buffer we own.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let m = &buf[..n as usize];
    if m.len() < 20 {
        return Err(io::Error::other("short RTM_GETNSID reply"));
    }
    match u16_at(m, 4) {
        NLMSG_ERROR => {
            let errno = -(u32_at(m, 16) as i32);
            Err(io::Error::from_raw_os_error(errno))
        }
        RTM_NEWNSID => {
            let len = (u32_at(m, 0) as usize).min(m.len());
            let mut at = 20;
            while at + 4 <= len {
                let alen = u16_at(m, at) as usize;
                if alen < 4 || at + alen > len {
                    break;
                }
                if u16_at(m, at + 2) & 0x3fff == NETNSA_NSID && alen >= 8 {
                    let id = u32_at(m, at + 4) as i32;
                    return Ok((id >= 0).then_some(id));
                }
                at += (alen + 3) & !3;
            }
            Ok(None)
        }
        t => Err(io::Error::other(format!(
            "unexpected netlink message type {t} in reply to RTM_GETNSID"
        ))),
    }
}

/// Sets SO_PEEK_OFF (-1 turns peeking with an offset off again).
pub fn set_peek_off(fd: std::os::fd::BorrowedFd<'_>, off: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live int of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&off as *const i32).cast(),
            4,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_socketpair_and_its_peer() {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::empty(),
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        let ino = |fd: &OwnedFd| {
            std::fs::File::from(fd.try_clone().unwrap())
                .metadata()
                .unwrap()
                .ino()
        };
        let all = unix_sockets().unwrap();
        let da = &all[&ino(&a)];
        assert_eq!(da.peer, ino(&b));
        assert_eq!(da.kind as i32, libc::SOCK_STREAM);
        assert!(da.name.is_empty());
    }

    #[test]
    fn own_namespace_has_no_nsid_or_a_valid_one() {
        // Our own namespace may or may not have an id for itself; asking
        // must work either way, and a missing process is an error.
        let me = std::process::id() as i32;
        assert!(nsid_of_pid(me).is_ok());
        assert!(nsid_of_pid(i32::MAX).is_err());
    }
}
