//! IPv4 and IPv6 sockets: TCP connections (read and rebuilt in repair
//! mode), TCP listeners, UDP sockets with their queued datagrams.
//!
//! The agent works on its own copy of each socket (pidfd_getfd at dump; at
//! restore the task creates the socket in its network namespace and the
//! agent takes a copy): socket options, bind, connect and queue refills
//! act on the one socket both descriptors refer to.
//!
//! A connection is rebuilt as the kernel's repair mode allows: sequence
//! numbers set before a silent connect, the receive queue re-queued as if
//! received, the sent but unacknowledged bytes re-queued as if sent (the
//! retransmission timer resends what the peer had not acknowledged), the
//! bytes not yet sent sent normally once repair mode is off. A connection
//! whose own side was shut down gets its FIN back through shutdown() in
//! repair mode. A connection the peer closed (CLOSE_WAIT, LAST_ACK,
//! CLOSING) is refused: repair mode cannot replay a received FIN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use ckpt_proto::image::{Datagram, FdTable, FileKind, InetSocket, SockOpts, TcpConnection};
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, SockaddrStorage};

use crate::error::{Error, Result};
use crate::netlock::{Conn, NetLock};
use crate::sys::tcp::{self as t, QueueIoctl};

/// TCP states (include/net/tcp_states.h).
mod state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
}

fn state_name(s: u32) -> &'static str {
    match s {
        state::ESTABLISHED => "ESTABLISHED",
        state::SYN_SENT => "SYN_SENT",
        state::SYN_RECV => "SYN_RECV",
        state::FIN_WAIT1 => "FIN_WAIT1",
        state::FIN_WAIT2 => "FIN_WAIT2",
        state::TIME_WAIT => "TIME_WAIT",
        state::CLOSE => "CLOSE",
        state::CLOSE_WAIT => "CLOSE_WAIT",
        state::LAST_ACK => "LAST_ACK",
        state::LISTEN => "LISTEN",
        state::CLOSING => "CLOSING",
        _ => "unknown",
    }
}

/// What the dump of a tree's IP sockets needs.
pub struct DumpCtx<'a> {
    /// Established connections are dumped (else refused).
    pub tcp_established: bool,
    /// The lock blocking the tree's connections; sockets put in repair
    /// mode are noted there.
    pub lock: Option<&'a mut NetLock>,
}

fn addr_of(ss: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = ss.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*a)));
    }
    ss.as_sockaddr_in6()
        .map(|a| SocketAddr::V6(SocketAddrV6::from(*a)))
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The socket address an image records (None when never bound/connected).
fn image_addr(bytes: &[u8], port: u32) -> Option<SocketAddr> {
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port as u16))
}

/// The local (and remote) address of a dumped socket.
pub fn local_addr(s: &InetSocket) -> Option<SocketAddr> {
    image_addr(&s.src_addr, s.src_port)
}

/// The peer address of a dumped connected socket.
pub fn peer_addr(s: &InetSocket) -> Option<SocketAddr> {
    image_addr(&s.dst_addr, s.dst_port)
}

/// The TCP endpoints of a checkpoint the network lock must cover.
pub fn lock_conns(tables: &[&FdTable]) -> Vec<Conn> {
    let mut v = Vec::new();
    for f in tables.iter().flat_map(|t| &t.files) {
        let Some(s) = f
            .inet
            .as_ref()
            .filter(|_| f.kind == FileKind::FileInetSocket as i32)
        else {
            continue;
        };
        let Some(local) = local_addr(s) else { continue };
        // A connection rebuilt in repair mode carries its TCP state.
        let c = if s.tcp.is_some() {
            Conn {
                local,
                remote: peer_addr(s),
            }
        } else if s.state == state::LISTEN {
            Conn {
                local,
                remote: None,
            }
        } else {
            continue;
        };
        if !v.contains(&c) {
            v.push(c);
        }
    }
    v
}

/// Parses one address of /proc/net/tcp{,6} ("0100007F:1F90"): the
/// address words are printed as host-order integers.
fn proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        let w = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    image_addr(&bytes, u32::from(port))
}

/// The TCP connections and listeners that processes `pids` (host PIDs,
/// all in the network namespace of the first) hold, as the kernel lists
/// them: what the lock must cover before any socket is read.
pub fn live_conns(pids: &[i32]) -> Result<Vec<Conn>> {
    let Some(&first) = pids.first() else {
        return Ok(Vec::new());
    };
    let mut inodes = std::collections::HashSet::new();
    for &pid in pids {
        let dir = format!("/proc/{pid}/fd");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(l) = std::fs::read_link(e.path()) {
                let l = l.to_string_lossy();
                if let Some(i) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.extend(i.parse::<u64>().ok());
                }
            }
        }
    }
    // Reading the TCP tables walks the whole connection hash (about 5 ms
    // each here, with none in it), inside the freeze.
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        let text = match crate::proc::read(first, table) {
            Ok(t) => t,
            // No IPv6 in this kernel.
            Err(_) if table == "net/tcp6" => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(l), Some(r), Some(st), Some(ino)) = (f.get(1), f.get(2), f.get(3), f.get(9))
            else {
                continue;
            };
            if !ino.parse::<u64>().is_ok_and(|i| inodes.contains(&i)) {
                continue;
            }
            let (Some(local), Some(remote)) = (proc_addr(l), proc_addr(r)) else {
                continue;
            };
            let st = u32::from_str_radix(st, 16).unwrap_or(0);
            let c = match st {
                state::LISTEN => Conn {
                    local,
                    remote: None,
                },
                state::CLOSE | state::TIME_WAIT => continue,
                _ => Conn {
                    local,
                    remote: Some(remote),
                },
            };
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// Takes a socket out of repair mode without a window probe (the
/// connection goes on as if nothing happened).
pub fn repair_off(sock: BorrowedFd<'_>) -> std::result::Result<(), Errno> {
    match t::set_u32(sock, t::TCP_REPAIR, t::TCP_REPAIR_OFF_NO_WP) {
        // Kernels before 4.19 know only 0.
        Err(Errno::EINVAL) => t::set_u32(sock, t::TCP_REPAIR, 0),
        r => r,
    }
}

/// Dumps IP socket `fd` of `pid` (`sock` is the agent's copy).
pub fn dump(
    pid: i32,
    fd: i32,
    sock: &std::fs::File,
    ino: u64,
    ctx: &mut DumpCtx<'_>,
) -> Result<InetSocket> {
    let s = sock.as_fd();
    let sys = |what: &str| {
        let what = format!("{what} of socket fd {fd}");
        move |e: Errno| Error::sys(pid, what, e)
    };
    let refuse = |kind: String| Error::UnsupportedFd {
        pid,
        fd,
        kind,
        target: format!("socket:[{ino}]"),
    };
    let family = t::get_int(s, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(sys("SO_DOMAIN"))?;
    let sock_type = t::get_int(s, libc::SOL_SOCKET, libc::SO_TYPE).map_err(sys("SO_TYPE"))?;
    let protocol =
        t::get_int(s, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(sys("SO_PROTOCOL"))?;
    let tcp = match (sock_type, protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => true,
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => false,
        _ => {
            return Err(refuse(format!(
                "IP socket of type {sock_type} protocol {protocol} (only TCP and UDP)"
            )))
        }
    };
    let local =
        socket::getsockname::<SockaddrStorage>(s.as_raw_fd()).map_err(sys("getsockname"))?;
    let local = addr_of(&local);
    let peer = match socket::getpeername::<SockaddrStorage>(s.as_raw_fd()) {
        Ok(a) => addr_of(&a),
        Err(Errno::ENOTCONN) => None,
        Err(e) => return Err(sys("getpeername")(e)),
    };
    let mut out = InetSocket {
        family: family as u32,
        sock_type: sock_type as u32,
        protocol: protocol as u32,
        state: state::CLOSE,
        ino,
        opts: Some(dump_opts(s, family, tcp).map_err(sys("socket options"))?),
        ..Default::default()
    };
    // An unbound socket reports the wildcard address with port 0.
    if let Some(a) = local.filter(|a| a.port() != 0 || !a.ip().is_unspecified()) {
        out.src_addr = ip_bytes(&a.ip());
        out.src_port = u32::from(a.port());
    }
    if let Some(a) = peer {
        out.dst_addr = ip_bytes(&a.ip());
        out.dst_port = u32::from(a.port());
    }
    let conn_name = || match (local, peer) {
        (Some(l), Some(p)) => format!("{l} -> {p}"),
        _ => format!("socket:[{ino}]"),
    };
    if !tcp {
        out.queue = peek_datagrams(s).map_err(sys("peeking the datagram queue"))?;
        return Ok(out);
    }
    let info = t::tcp_info(s).map_err(sys("TCP_INFO"))?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    out.state = u32::from(info[0]);
    match out.state {
        state::CLOSE => {}
        state::LISTEN => {
            // For a listener, tcp_info's unacked/sacked are its accept
            // queue's length and limit.
            let (pending, backlog) = (u32_at(24), u32_at(28));
            if pending > 0 {
                return Err(refuse(format!(
                    "listening TCP socket {} with {pending} connection(s) not yet accepted \
                     (accept them first, or checkpoint again later)",
                    local.map(|a| a.to_string()).unwrap_or_default()
                )));
            }
            out.backlog = backlog;
        }
        state::ESTABLISHED | state::FIN_WAIT1 | state::FIN_WAIT2 => {
            if !ctx.tcp_established {
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "fd {fd} is the established TCP connection {}: dump with \
                         --tcp-established to keep it; the process was left running untouched",
                        conn_name()
                    ),
                });
            }
            let lock = ctx.lock.as_deref_mut().ok_or_else(|| Error::Refused {
                pid,
                reason: format!("TCP connection on fd {fd} found but the network is not locked"),
            })?;
            // In repair mode only while read: if the agent died here the
            // job would run on with it (cleanup takes it out again).
            lock.note_repair(pid, fd, ino)?;
            t::set_u32(s, t::TCP_REPAIR, 1).map_err(sys("TCP_REPAIR on"))?;
            let read = dump_connection(s, out.state, &info);
            repair_off(s).map_err(sys("TCP_REPAIR off"))?;
            // Leaving repair mode resets SO_REUSEADDR.
            let reuse = out.opts.as_ref().is_some_and(|o| o.reuseaddr);
            t::set_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, i32::from(reuse))
                .map_err(sys("SO_REUSEADDR"))?;
            lock.clear_repair(pid, fd)?;
            out.tcp = Some(read.map_err(sys("repair-mode read"))?);
            let copy = sock
                .try_clone()
                .map(OwnedFd::from)
                .map_err(|e| Error::sys(pid, format!("dup of socket fd {fd}"), e))?;
            lock.hold(pid, fd, ino, copy);
        }
        st => {
            let why = match st {
                state::CLOSE_WAIT | state::LAST_ACK | state::CLOSING => {
                    "its peer has closed its side, and repair mode cannot replay a received FIN"
                }
                state::SYN_SENT | state::SYN_RECV => "it is still being set up",
                _ => "this state cannot be rebuilt",
            };
            return Err(refuse(format!(
                "TCP connection {} in state {} ({why})",
                conn_name(),
                state_name(st)
            )));
        }
    }
    Ok(out)
}

fn dump_opts(s: BorrowedFd<'_>, family: i32, tcp: bool) -> std::result::Result<SockOpts, Errno> {
    let sol = |o| t::get_int(s, libc::SOL_SOCKET, o);
    let (linger_on, linger_secs) = t::get_linger(s)?;
    let mut o = SockOpts {
        reuseaddr: sol(libc::SO_REUSEADDR)? != 0,
        reuseport: sol(libc::SO_REUSEPORT)? != 0,
        keepalive: sol(libc::SO_KEEPALIVE)? != 0,
        broadcast: sol(libc::SO_BROADCAST)? != 0,
        sndbuf: sol(libc::SO_SNDBUF)? as u32,
        rcvbuf: sol(libc::SO_RCVBUF)? as u32,
        buf_lock: sol(t::SO_BUF_LOCK).unwrap_or(0) as u32,
        priority: sol(libc::SO_PRIORITY)?,
        mark: sol(t::SO_MARK)? as u32,
        linger_on,
        linger_secs,
        bind_device: t::get_string(s, libc::SOL_SOCKET, libc::SO_BINDTODEVICE).unwrap_or_default(),
        ..Default::default()
    };
    if family == libc::AF_INET6 {
        o.v6only = t::get_int(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0;
        o.freebind = t::get_int(s, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)? != 0;
        o.transparent = t::get_int(s, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT)? != 0;
        o.tos = t::get_int(s, libc::IPPROTO_IPV6, libc::IPV6_TCLASS)? as u32;
        o.ttl = t::get_int(s, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)?;
    } else {
        o.freebind = t::get_int(s, libc::IPPROTO_IP, libc::IP_FREEBIND)? != 0;
        o.transparent = t::get_int(s, libc::IPPROTO_IP, libc::IP_TRANSPARENT)? != 0;
        o.tos = t::get_int(s, libc::IPPROTO_IP, libc::IP_TOS)? as u32;
        o.ttl = t::get_int(s, libc::IPPROTO_IP, libc::IP_TTL)?;
    }
    if tcp {
        let tcpo = |opt| t::get_int(s, libc::IPPROTO_TCP, opt);
        o.nodelay = tcpo(libc::TCP_NODELAY)? != 0;
        o.cork = tcpo(libc::TCP_CORK)? != 0;
        o.keepidle = tcpo(libc::TCP_KEEPIDLE)? as u32;
        o.keepintvl = tcpo(libc::TCP_KEEPINTVL)? as u32;
        o.keepcnt = tcpo(libc::TCP_KEEPCNT)? as u32;
        o.user_timeout = tcpo(libc::TCP_USER_TIMEOUT)? as u32;
        o.notsent_lowat = tcpo(libc::TCP_NOTSENT_LOWAT)? as u32;
        o.congestion = t::get_string(s, libc::IPPROTO_TCP, libc::TCP_CONGESTION)?;
    }
    Ok(o)
}

/// Reads a connection in repair mode (the socket is in it already).
fn dump_connection(
    s: BorrowedFd<'_>,
    st: u32,
    info: &[u8],
) -> std::result::Result<TcpConnection, Errno> {
    let fin = matches!(st, state::FIN_WAIT1 | state::FIN_WAIT2);
    let outq = t::queue_len(s, QueueIoctl::Out)? as usize;
    let notsent = t::queue_len(s, QueueIoctl::OutNotSent)?;
    let inq = t::queue_len(s, QueueIoctl::In)? as usize;
    t::set_u32(s, t::TCP_REPAIR_QUEUE, t::TCP_SEND_QUEUE)?;
    let write_seq = t::get_u32(s, t::TCP_QUEUE_SEQ)?;
    let send_queue = peek(s, outq)?;
    t::set_u32(s, t::TCP_REPAIR_QUEUE, t::TCP_RECV_QUEUE)?;
    let rcv_nxt = t::get_u32(s, t::TCP_QUEUE_SEQ)?;
    let recv_queue = peek(s, inq)?;
    if recv_queue.len() != inq {
        // Not all of it could be read: the image would lose bytes.
        return Err(Errno::EIO);
    }
    let w = t::get_window(s)?;
    const TCPI_OPT_TIMESTAMPS: u8 = 1;
    const TCPI_OPT_SACK: u8 = 2;
    const TCPI_OPT_WSCALE: u8 = 4;
    let (opts, wscale) = (info[5], info[6]);
    // A queued FIN counts one sequence number after the data.
    let data_end = write_seq.wrapping_sub(u32::from(fin));
    Ok(TcpConnection {
        snd_seq: data_end.wrapping_sub(send_queue.len() as u32),
        rcv_seq: rcv_nxt.wrapping_sub(recv_queue.len() as u32),
        unsent: if fin {
            0
        } else {
            notsent.min(send_queue.len() as u32)
        },
        send_queue,
        recv_queue,
        mss: t::get_u32(s, libc::TCP_MAXSEG)?,
        wscale_ok: opts & TCPI_OPT_WSCALE != 0,
        snd_wscale: u32::from(wscale & 0xf),
        rcv_wscale: u32::from(wscale >> 4),
        sack: opts & TCPI_OPT_SACK != 0,
        timestamps: opts & TCPI_OPT_TIMESTAMPS != 0,
        timestamp: t::get_u32(s, t::TCP_TIMESTAMP)?,
        snd_wl1: w.snd_wl1,
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd: w.rcv_wnd,
        rcv_wup: w.rcv_wup,
        fin_sent: fin,
    })
}

/// Peeks up to `len` bytes of the selected queue (nothing is consumed).
fn peek(s: BorrowedFd<'_>, len: usize) -> std::result::Result<Vec<u8>, Errno> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len];
    match socket::recv(
        s.as_raw_fd(),
        &mut buf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => {
            buf.truncate(n);
            Ok(buf)
        }
        Err(Errno::EAGAIN) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Every datagram waiting on a UDP socket, oldest first, with its sender.
/// SO_PEEK_OFF makes each peek go on past the previous one; the socket's
/// own setting is put back.
fn peek_datagrams(s: BorrowedFd<'_>) -> std::result::Result<Vec<Datagram>, Errno> {
    let old = t::get_int(s, libc::SOL_SOCKET, t::SO_PEEK_OFF)?;
    t::set_int(s, libc::SOL_SOCKET, t::SO_PEEK_OFF, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let r = loop {
        let got = socket::recvmsg::<SockaddrStorage>(
            s.as_raw_fd(),
            &mut [std::io::IoSliceMut::new(&mut buf)],
            None,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
        )
        .map(|m| (m.bytes, m.address));
        match got {
            Ok((n, from)) => {
                let from = from.as_ref().and_then(addr_of);
                out.push(Datagram {
                    data: buf[..n.min(buf.len())].to_vec(),
                    src_addr: from.map(|a| ip_bytes(&a.ip())).unwrap_or_default(),
                    src_port: from.map_or(0, |a| u32::from(a.port())),
                });
            }
            Err(Errno::EAGAIN) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    t::set_int(s, libc::SOL_SOCKET, t::SO_PEEK_OFF, old)?;
    r.map(|()| out)
}

/// The socket() arguments that recreate a dumped socket.
pub fn socket_args(s: &InetSocket) -> [u64; 3] {
    [
        u64::from(s.family),
        u64::from(s.sock_type),
        u64::from(s.protocol),
    ]
}

/// Rebuilds dumped socket `s` on `sock`: the agent's copy of a fresh
/// socket the task created (see [`socket_args`]) in its own network
/// namespace. `raw(family)` makes a raw UDP socket in that namespace, to
/// queue datagrams again with their senders' addresses.
pub fn restore(
    pid: i32,
    sock: BorrowedFd<'_>,
    s: &InetSocket,
    raw: &mut dyn FnMut(i32) -> Result<OwnedFd>,
) -> Result<()> {
    let local = local_addr(s);
    let what = |w: &str| {
        let w = format!(
            "{w} ({} socket {})",
            if s.sock_type == libc::SOCK_STREAM as u32 {
                "TCP"
            } else {
                "UDP"
            },
            local
                .map(|a| a.to_string())
                .unwrap_or_else(|| "unbound".into())
        );
        move |e: Errno| Error::sys(pid, w, e)
    };
    let opts = s.opts.clone().unwrap_or_default();
    let v6 = s.family == libc::AF_INET6 as u32;
    let (ip_level, freebind) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
    } else {
        (libc::IPPROTO_IP, libc::IP_FREEBIND)
    };
    if v6 {
        // Before bind: it decides which addresses the socket may take.
        t::set_int(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            i32::from(opts.v6only),
        )
        .map_err(what("IPV6_V6ONLY"))?;
    }
    // The job's address may not be on this node yet (it moves with the
    // job): bind to it anyway.
    t::set_int(sock, ip_level, freebind, 1).map_err(what("FREEBIND"))?;
    set_buffers(sock, &opts, s.tcp.as_ref()).map_err(what("buffer sizes"))?;
    if let Some(c) = &s.tcp {
        restore_connection(sock, s, c).map_err(what("rebuilding the connection in repair mode"))?;
    } else {
        // The connections it accepted may be restored already, bound to its
        // port in repair mode: bind beside them, then take the socket's own
        // setting back.
        t::set_int(sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(what("SO_REUSEADDR"))?;
        t::set_int(
            sock,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            i32::from(opts.reuseport),
        )
        .map_err(what("SO_REUSEPORT"))?;
        if let Some(a) = local {
            socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(a)).map_err(what("bind"))?;
        }
        if s.state == state::LISTEN {
            let backlog =
                socket::Backlog::new(s.backlog as i32).unwrap_or(socket::Backlog::MAXCONN);
            socket::listen(&sock, backlog).map_err(what("listen"))?;
        }
        t::set_int(
            sock,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            i32::from(opts.reuseaddr),
        )
        .map_err(what("SO_REUSEADDR"))?;
        if !s.queue.is_empty() {
            let to = local.ok_or_else(|| Error::Refused {
                pid,
                reason: "datagrams queued on an unbound UDP socket".into(),
            })?;
            requeue_datagrams(pid, s, to, raw)?;
        }
        if let Some(p) = peer_addr(s) {
            socket::connect(sock.as_raw_fd(), &SockaddrStorage::from(p))
                .map_err(what("connect"))?;
        }
    }
    restore_opts(sock, &opts, v6, s.protocol == libc::IPPROTO_TCP as u32)
        .map_err(what("socket options"))?;
    Ok(())
}

/// Buffer sizes as they were (the queues must fit before they are
/// refilled); SO_BUF_LOCK put back afterwards says whether the kernel
/// may go on autotuning them.
fn set_buffers(
    sock: BorrowedFd<'_>,
    o: &SockOpts,
    c: Option<&TcpConnection>,
) -> std::result::Result<(), Errno> {
    let queued = c.map_or(0, |c| c.send_queue.len().max(c.recv_queue.len()) as u32);
    // getsockopt reports twice what setsockopt takes.
    let snd = (o.sndbuf / 2).max(queued);
    let rcv = (o.rcvbuf / 2).max(queued);
    if snd > 0 {
        t::set_int(sock, libc::SOL_SOCKET, t::SO_SNDBUFFORCE, snd as i32)?;
    }
    if rcv > 0 {
        t::set_int(sock, libc::SOL_SOCKET, t::SO_RCVBUFFORCE, rcv as i32)?;
    }
    Ok(())
}

fn restore_connection(
    sock: BorrowedFd<'_>,
    s: &InetSocket,
    c: &TcpConnection,
) -> std::result::Result<(), Errno> {
    let (Some(local), Some(peer)) = (local_addr(s), peer_addr(s)) else {
        return Err(Errno::EDESTADDRREQ);
    };
    t::set_u32(sock, t::TCP_REPAIR, 1)?;
    t::set_u32(sock, t::TCP_REPAIR_QUEUE, t::TCP_SEND_QUEUE)?;
    t::set_u32(sock, t::TCP_QUEUE_SEQ, c.snd_seq)?;
    t::set_u32(sock, t::TCP_REPAIR_QUEUE, t::TCP_RECV_QUEUE)?;
    t::set_u32(sock, t::TCP_QUEUE_SEQ, c.rcv_seq)?;
    // Repair mode binds even where a listener holds the port (an accepted
    // connection shares its port) and connects without a handshake.
    socket::bind(sock.as_raw_fd(), &SockaddrStorage::from(local))?;
    socket::connect(sock.as_raw_fd(), &SockaddrStorage::from(peer))?;
    let mut ro = vec![t::TcpRepairOpt {
        opt_code: t::TCPOPT_MSS,
        opt_val: c.mss,
    }];
    if c.wscale_ok {
        ro.push(t::TcpRepairOpt {
            opt_code: t::TCPOPT_WINDOW,
            opt_val: c.snd_wscale | (c.rcv_wscale << 16),
        });
    }
    if c.sack {
        ro.push(t::TcpRepairOpt {
            opt_code: t::TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if c.timestamps {
        ro.push(t::TcpRepairOpt {
            opt_code: t::TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    t::set_repair_options(sock, &ro)?;
    if c.timestamps {
        // The connection's clock goes on from where it was, whatever this
        // node's clock reads.
        t::set_u32(sock, t::TCP_TIMESTAMP, c.timestamp)?;
    }
    t::set_u32(sock, t::TCP_REPAIR_QUEUE, t::TCP_RECV_QUEUE)?;
    send_all(sock, &c.recv_queue)?;
    let sent = c.send_queue.len() - c.unsent as usize;
    t::set_u32(sock, t::TCP_REPAIR_QUEUE, t::TCP_SEND_QUEUE)?;
    send_all(sock, &c.send_queue[..sent])?;
    if c.fin_sent {
        // With the send queue selected, the FIN is queued as sent too.
        socket::shutdown(sock.as_raw_fd(), socket::Shutdown::Write)?;
    }
    t::set_window(
        sock,
        &t::TcpRepairWindow {
            snd_wl1: c.snd_wl1,
            snd_wnd: c.snd_wnd,
            max_window: c.max_window,
            rcv_wnd: c.rcv_wnd,
            rcv_wup: c.rcv_wup,
        },
    )?;
    t::set_u32(sock, t::TCP_REPAIR_QUEUE, 0)?;
    // A window probe tells the peer at once that this side is back.
    t::set_u32(sock, t::TCP_REPAIR, 0)?;
    send_all(sock, &c.send_queue[sent..])?;
    Ok(())
}

fn send_all(sock: BorrowedFd<'_>, mut data: &[u8]) -> std::result::Result<(), Errno> {
    while !data.is_empty() {
        let n = socket::send(
            sock.as_raw_fd(),
            data,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        if n == 0 {
            return Err(Errno::EIO);
        }
        data = &data[n..];
    }
    Ok(())
}

fn restore_opts(
    sock: BorrowedFd<'_>,
    o: &SockOpts,
    v6: bool,
    tcp: bool,
) -> std::result::Result<(), Errno> {
    let sol = |opt, v: i32| t::set_int(sock, libc::SOL_SOCKET, opt, v);
    // Leaving repair mode resets SO_REUSEADDR: set after it.
    sol(libc::SO_REUSEADDR, i32::from(o.reuseaddr))?;
    sol(libc::SO_REUSEPORT, i32::from(o.reuseport))?;
    sol(libc::SO_KEEPALIVE, i32::from(o.keepalive))?;
    sol(libc::SO_BROADCAST, i32::from(o.broadcast))?;
    sol(libc::SO_PRIORITY, o.priority)?;
    if o.mark != 0 {
        sol(t::SO_MARK, o.mark as i32)?;
    }
    if o.linger_on {
        t::set_linger(sock, o.linger_on, o.linger_secs)?;
    }
    if !o.bind_device.is_empty() {
        t::set_string(
            sock,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            &o.bind_device,
        )?;
    }
    // Fixed sizes stay fixed; others go back to autotuning.
    match t::set_int(sock, libc::SOL_SOCKET, t::SO_BUF_LOCK, o.buf_lock as i32) {
        Err(Errno::ENOPROTOOPT) | Ok(()) => {}
        Err(e) => return Err(e),
    }
    if v6 {
        t::set_int(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_FREEBIND,
            i32::from(o.freebind),
        )?;
        if o.transparent {
            t::set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1)?;
        }
        t::set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, o.tos as i32)?;
        t::set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, o.ttl)?;
    } else {
        t::set_int(
            sock,
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            i32::from(o.freebind),
        )?;
        if o.transparent {
            t::set_int(sock, libc::IPPROTO_IP, libc::IP_TRANSPARENT, 1)?;
        }
        t::set_int(sock, libc::IPPROTO_IP, libc::IP_TOS, o.tos as i32)?;
        t::set_int(sock, libc::IPPROTO_IP, libc::IP_TTL, o.ttl)?;
    }
    if tcp {
        let tcpo = |opt, v: i32| t::set_int(sock, libc::IPPROTO_TCP, opt, v);
        tcpo(libc::TCP_NODELAY, i32::from(o.nodelay))?;
        tcpo(libc::TCP_CORK, i32::from(o.cork))?;
        tcpo(libc::TCP_KEEPIDLE, o.keepidle as i32)?;
        tcpo(libc::TCP_KEEPINTVL, o.keepintvl as i32)?;
        tcpo(libc::TCP_KEEPCNT, o.keepcnt as i32)?;
        tcpo(libc::TCP_USER_TIMEOUT, o.user_timeout as i32)?;
        tcpo(libc::TCP_NOTSENT_LOWAT, o.notsent_lowat as i32)?;
        if !o.congestion.is_empty() {
            t::set_string(sock, libc::IPPROTO_TCP, libc::TCP_CONGESTION, &o.congestion)?;
        }
    }
    Ok(())
}

/// Queues the dumped datagrams on the socket bound at `to` again, each from
/// its original sender: a raw UDP socket in the same namespace, free to
/// use any source address (IP_TRANSPARENT), sends them in order over
/// loopback. The sending thread stays on one CPU so that loopback
/// delivers them in order.
fn requeue_datagrams(
    pid: i32,
    s: &InetSocket,
    to: SocketAddr,
    raw: &mut dyn FnMut(i32) -> Result<OwnedFd>,
) -> Result<()> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    let me = nix::unistd::Pid::from_raw(0);
    let old = sched_getaffinity(me).map_err(|e| Error::sys(pid, "sched_getaffinity", e))?;
    let mut one = CpuSet::new();
    let cpu = (0..CpuSet::count())
        .find(|&c| old.is_set(c).unwrap_or(false))
        .unwrap_or(0);
    one.set(cpu).map_err(|e| Error::sys(pid, "CpuSet", e))?;
    sched_setaffinity(me, &one).map_err(|e| Error::sys(pid, "sched_setaffinity", e))?;
    let r = (|| -> Result<()> {
        let v6 = s.family == libc::AF_INET6 as u32;
        // A wildcard-bound socket gets them on loopback.
        let dst_ip = match (to.ip().is_unspecified(), v6) {
            (false, _) => to.ip(),
            (true, false) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            (true, true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        let dst = SocketAddr::new(dst_ip, to.port());
        for (i, d) in s.queue.iter().enumerate() {
            let from =
                image_addr(&d.src_addr, d.src_port).unwrap_or_else(|| SocketAddr::new(dst_ip, 0));
            let fam = if from.is_ipv6() {
                libc::AF_INET6
            } else {
                libc::AF_INET
            };
            let r = raw(fam)?;
            let fail = |w: &str| {
                let w = format!("re-queuing datagram {i} from {from} to {dst}: {w}");
                move |e: Errno| Error::sys(pid, w, e)
            };
            let rb = r.as_fd();
            if fam == libc::AF_INET6 {
                t::set_int(rb, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1)
                    .map_err(fail("IPV6_TRANSPARENT"))?;
                // The kernel fills in the UDP checksum at this offset.
                t::set_int(rb, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 6)
                    .map_err(fail("IPV6_CHECKSUM"))?;
            } else {
                t::set_int(rb, libc::IPPROTO_IP, libc::IP_TRANSPARENT, 1)
                    .map_err(fail("IP_TRANSPARENT"))?;
            }
            let src = SocketAddr::new(from.ip(), 0);
            socket::bind(rb.as_raw_fd(), &SockaddrStorage::from(src)).map_err(fail("bind"))?;
            let len = 8 + d.data.len();
            let mut pkt = Vec::with_capacity(len);
            pkt.extend_from_slice(&(from.port()).to_be_bytes());
            pkt.extend_from_slice(&dst.port().to_be_bytes());
            pkt.extend_from_slice(&(len as u16).to_be_bytes());
            // IPv4: no checksum is allowed; IPv6: filled in by the kernel.
            pkt.extend_from_slice(&[0, 0]);
            pkt.extend_from_slice(&d.data);
            let raw_dst = SocketAddr::new(dst.ip(), 0);
            socket::sendto(
                rb.as_raw_fd(),
                &pkt,
                &SockaddrStorage::from(raw_dst),
                MsgFlags::empty(),
            )
            .map_err(fail("sendto"))?;
        }
        Ok(())
    })();
    let _ = sched_setaffinity(me, &old);
    r
}

/// Whether a socket's family can be dumped here at all.
pub fn is_inet(domain: i32) -> bool {
    domain == libc::AF_INET || domain == libc::AF_INET6
}

/// The dumped address, for logs and `show`.
pub fn describe(s: &InetSocket) -> String {
    let l = local_addr(s).map_or("unbound".to_string(), |a| a.to_string());
    match peer_addr(s) {
        Some(p) => format!("{l} -> {p} ({})", state_name(s.state)),
        None => format!("{l} ({})", state_name(s.state)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses() {
        assert_eq!(
            proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(proc_addr("zz:1"), None);
    }

    #[test]
    fn image_addresses_round_trip() {
        for a in ["10.1.2.3:80", "[fe80::1]:443", "[::ffff:1.2.3.4]:9"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(image_addr(&ip_bytes(&a.ip()), u32::from(a.port())), Some(a));
        }
        assert_eq!(image_addr(&[], 0), None);
    }
}
