//! Unix sockets: dump and restore of connected pairs whose both ends belong
//! to the dumped processes (`UnixSocket`, files.proto), with the data
//! queued at each end (peeked without consuming it, message boundaries
//! kept) and their shutdown state; listening sockets without pending
//! connections, bound again to their path or abstract name; connections a
//! listener accepted (their end carries the listener's name), made again
//! by connect and accept (files.rs `accepted_pair`). Sockets connected outside the tree are reconnected
//! by name with --ext-unix-sk, or refused.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use ckpt_proto::image::UnixSocket;
use nix::sys::socket::{recvmsg, sendmsg, MsgFlags, SockaddrStorage};

use crate::error::{Error, Result};
use crate::sys::netlink::{self, UnixDiag};

/// Largest message we expect in a queue (the default socket buffer).
const MAX_MSG: usize = 256 * 1024;

/// Reads a unix socket end of process `pid` (its fd `fd`, our copy `sock`).
pub fn dump(
    pid: i32,
    fd: i32,
    sock: BorrowedFd<'_>,
    ino: u64,
    diag: &HashMap<u64, UnixDiag>,
) -> Result<UnixSocket> {
    let refuse = |what: &str| Error::UnsupportedFd {
        pid,
        fd,
        kind: format!("unix socket ({what})"),
        target: format!("socket:[{ino}]"),
    };
    let d = diag
        .get(&ino)
        .ok_or_else(|| refuse("not found by sock_diag"))?;
    const TCP_LISTEN: u8 = 10;
    if d.state == TCP_LISTEN {
        if !d.name.starts_with('/') && !d.name.starts_with('@') {
            return Err(refuse(&format!("listening on a relative path {}", d.name)));
        }
        return Ok(UnixSocket {
            sock_type: d.kind as u32,
            ino,
            name: d.name.clone(),
            listening: true,
            backlog: d.wqueue,
            pending: d.rqueue,
            // Who called listen(): what its clients see as their peer.
            peer_cred: peer_cred(sock),
            ..Default::default()
        });
    }
    const TCP_ESTABLISHED: u8 = 1;
    if d.peer == 0 && d.state == TCP_ESTABLISHED && d.kind as i32 != libc::SOCK_DGRAM {
        // Connected to a listener that has not accepted yet: its peer is an
        // embryo without an inode, but it still knows the listener's name.
        let listener = peer_name(sock);
        if !listener.is_empty() {
            if d.wqueue > 0 {
                return Err(refuse(&format!(
                    "connected to {listener}, which has not accepted it yet, with data sent in flight \
                     ({} bytes of buffer): not supported",
                    d.wqueue
                )));
            }
            return Ok(UnixSocket {
                sock_type: d.kind as u32,
                ino,
                external_peer: listener,
                pending: 1,
                shutdown: d.shutdown as u32,
                bound_name: d.name.clone(),
                ..Default::default()
            });
        }
    }
    if d.peer == 0 {
        return Err(refuse(&if d.name.is_empty() {
            "not connected".to_string()
        } else {
            format!("bound to {}, not connected", d.name)
        }));
    }
    // A named peer may be outside the tree (a daemon): files::link_tree
    // decides, once every process's sockets are known.
    let external_peer = diag
        .get(&d.peer)
        .map(|p| p.name.clone())
        .unwrap_or_default();
    let queue = peek_queue(sock, d.kind as i32).map_err(|e| match e {
        PeekError::Io(e) => Error::sys(pid, format!("peeking the queue of fd {fd}"), e),
        PeekError::Descriptors => refuse("descriptors in flight in its queue"),
    })?;
    let peer_name = if d.kind as i32 == libc::SOCK_DGRAM {
        String::new()
    } else {
        peer_name(sock)
    };
    Ok(UnixSocket {
        sock_type: d.kind as u32,
        ino,
        peer: d.peer,
        queue,
        shutdown: d.shutdown as u32,
        external_peer,
        bound_name: d.name.clone(),
        peer_cred: peer_cred(sock),
        peer_name,
        ..Default::default()
    })
}

/// SO_PEERCRED of a socket, as the agent (in the initial PID namespace)
/// sees it.
fn peer_cred(sock: BorrowedFd<'_>) -> Option<ckpt_proto::image::PeerCred> {
    nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| ckpt_proto::image::PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
}

/// The name of the socket `sock` is connected to, as diag spells names
/// ("@name" for an abstract one); empty when unnamed or not connected.
fn peer_name(sock: BorrowedFd<'_>) -> String {
    match nix::sys::socket::getpeername::<nix::sys::socket::UnixAddr>(sock.as_raw_fd()) {
        Ok(a) => {
            if let Some(p) = a.path() {
                p.to_string_lossy().into_owned()
            } else if let Some(n) = a.as_abstract() {
                format!("@{}", String::from_utf8_lossy(n))
            } else {
                String::new()
            }
        }
        Err(_) => String::new(),
    }
}

enum PeekError {
    Io(std::io::Error),
    Descriptors,
}

/// Copies what waits to be read at a socket, one entry per message,
/// without consuming it: MSG_PEEK with SO_PEEK_OFF moving past each one.
fn peek_queue(sock: BorrowedFd<'_>, kind: i32) -> std::result::Result<Vec<Vec<u8>>, PeekError> {
    netlink::set_peek_off(sock, 0).map_err(PeekError::Io)?;
    let result = (|| {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; MAX_MSG];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 16]);
        loop {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let r = recvmsg::<SockaddrStorage>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            );
            let msg = match r {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(PeekError::Io(e.into())),
            };
            let has_cmsgs = msg.cmsgs().map(|mut c| c.next().is_some()).unwrap_or(false);
            let n = msg.bytes;
            if has_cmsgs {
                return Err(PeekError::Descriptors);
            }
            if n == 0 && kind == libc::SOCK_STREAM {
                break;
            }
            let data = buf[..n].to_vec();
            match out.last_mut() {
                Some(last) if kind == libc::SOCK_STREAM => last.extend_from_slice(&data),
                _ => out.push(data),
            }
        }
        Ok(out)
    })();
    let _ = netlink::set_peek_off(sock, -1);
    result
}

/// Queues `msgs` for the far end of `sender` (our copy of the other end of
/// the pair), one send per message so datagram boundaries stay.
pub fn refill(pid: i32, sender: BorrowedFd<'_>, msgs: &[Vec<u8>]) -> Result<()> {
    for m in msgs {
        let iov = [std::io::IoSlice::new(m)];
        let n = sendmsg::<()>(
            sender.as_fd().as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(|e| Error::sys(pid, "refilling a unix socket queue", e))?;
        if n != m.len() {
            return Err(Error::Refused {
                pid,
                reason: format!("a unix socket took {n} of {} queued bytes back", m.len()),
            });
        }
    }
    Ok(())
}

/// Shuts a socket down as it was (RCV_SHUTDOWN 1, SEND_SHUTDOWN 2).
pub fn shut(pid: i32, sock: BorrowedFd<'_>, how: u32) -> Result<()> {
    use nix::sys::socket::{shutdown, Shutdown};
    let h = match how & 3 {
        0 => return Ok(()),
        1 => Shutdown::Read,
        2 => Shutdown::Write,
        _ => Shutdown::Both,
    };
    shutdown(sock.as_raw_fd(), h).map_err(|e| Error::sys(pid, "shutdown of a unix socket", e))
}

/// `struct sockaddr_un` bytes for a name as sock_diag shows it ("@x" is
/// the abstract name x).
pub fn sockaddr(name: &str) -> Vec<u8> {
    let mut a = (libc::AF_UNIX as u16).to_le_bytes().to_vec();
    match name.strip_prefix('@') {
        Some(abs) => {
            a.push(0);
            a.extend_from_slice(abs.as_bytes());
        }
        None => {
            a.extend_from_slice(name.as_bytes());
            a.push(0);
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(sockaddr("/a"), vec![1, 0, b'/', b'a', 0]);
        assert_eq!(sockaddr("@b"), vec![1, 0, 0, b'b']);
    }
}
