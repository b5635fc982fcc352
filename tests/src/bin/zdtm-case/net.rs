//! TCP and UDP sockets: connections with data queued both ways (and more
//! than the peer's window, so some of it is not even sent yet), a listener,
//! IPv6, socket options, UDP datagrams with their senders.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::util::*;
use crate::Ctx;

fn byte_at(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

fn int_opt(fd: i32, level: i32, opt: i32) -> i32 {
    let mut v: i32 = -1;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: v is an int and len its size.
    unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut i32).cast(), &mut len) };
    v
}

fn set_int_opt(fd: i32, level: i32, opt: i32, v: i32) -> CaseResult {
    // SAFETY: v is an int and its size is passed.
    let r = unsafe { libc::setsockopt(fd, level, opt, (&v as *const i32).cast(), 4) };
    cvt(r, "setsockopt").map(drop)
}

fn read_exact_timeout(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)
        .map_err(|e| format!("reading {n} bytes: {e}"))?;
    Ok(buf)
}

/// A connected pair over a listener on `host`.
fn pair(l: &TcpListener) -> Result<(TcpStream, TcpStream), String> {
    let c = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| format!("connect: {e}"))?;
    let (s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    Ok((c, s))
}

/// Established TCP connections over loopback (IPv4 and IPv6) with data
/// queued both ways, a connection whose sender filled the peer's window
/// (bytes acknowledged, not acknowledged and not sent), options, and a
/// listener that still accepts after the restore.
pub fn tcp_loopback(ctx: &Ctx) -> CaseResult {
    let l4 = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let (mut c, mut s) = pair(&l4)?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    set_int_opt(c.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int_opt(c.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 77)?;
    // A fixed receive buffer stays fixed; the others go on autotuning.
    set_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 200_000)?;
    const SO_BUF_LOCK: i32 = 72;
    let bufs = |fd: i32| {
        (
            int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF),
            int_opt(fd, libc::SOL_SOCKET, SO_BUF_LOCK),
        )
    };
    let (s_bufs, c_lock) = (bufs(s.as_raw_fd()), bufs(c.as_raw_fd()).1);
    c.write_all(b"hello from client")
        .map_err(|e| e.to_string())?;
    s.write_all(b"hello from server")
        .map_err(|e| e.to_string())?;
    // A bulk sender that fills the window.
    let (mut bc, mut bs) = pair(&l4)?;
    bc.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sent = 0usize;
    loop {
        let block: Vec<u8> = (sent..sent + 16384).map(byte_at).collect();
        match bc.write(&block) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("bulk write: {e}")),
        }
    }
    // IPv6 when the machine has it.
    let v6 = TcpListener::bind("[::1]:0").ok();
    let mut p6 = match &v6 {
        Some(l) => Some(pair(l)?),
        None => None,
    };
    if let Some((c6, _)) = p6.as_mut() {
        c6.write_all(b"over ipv6").map_err(|e| e.to_string())?;
    }
    let addrs = |a: &TcpStream| (a.local_addr().ok(), a.peer_addr().ok());
    let before = (addrs(&c), addrs(&s), addrs(&bc));
    // Let the kernel settle what it sends and acknowledges.
    std::thread::sleep(Duration::from_millis(100));
    // The connection's timestamp clock (a random offset per connection).
    const TCP_TIMESTAMP: i32 = 24;
    let ts = |fd: i32| int_opt(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP) as u32;
    let (ts_before, t0) = (ts(c.as_raw_fd()), Instant::now());
    ctx.ready_and_wait()?;

    let mut k = Check::new();
    // It goes on from where it was, as the peer expects.
    let ticks = ts(c.as_raw_fd()).wrapping_sub(ts_before) as u64;
    let elapsed = t0.elapsed().as_millis() as u64;
    k.ok(
        &format!("timestamp clock went on ({ticks} ms in {elapsed} ms)"),
        ticks <= elapsed + 50,
    );
    k.eq("fixed receive buffer", s_bufs, bufs(s.as_raw_fd()));
    k.eq(
        "autotuned buffers stay unlocked",
        c_lock,
        bufs(c.as_raw_fd()).1,
    );
    k.eq("addresses", before, (addrs(&c), addrs(&s), addrs(&bc)));
    k.eq(
        "queued client -> server",
        Ok(b"hello from client".to_vec()),
        read_exact_timeout(&mut s, 17),
    );
    k.eq(
        "queued server -> client",
        Ok(b"hello from server".to_vec()),
        read_exact_timeout(&mut c, 17),
    );
    c.write_all(b"after").map_err(|e| e.to_string())?;
    s.write_all(b"restore").map_err(|e| e.to_string())?;
    k.eq(
        "new data c->s",
        Ok(b"after".to_vec()),
        read_exact_timeout(&mut s, 5),
    );
    k.eq(
        "new data s->c",
        Ok(b"restore".to_vec()),
        read_exact_timeout(&mut c, 7),
    );
    k.ok("nodelay kept", c.nodelay().unwrap_or(false));
    k.eq(
        "keepalive kept",
        (1, 77),
        (
            int_opt(c.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            int_opt(c.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        ),
    );
    // Every byte the bulk sender wrote arrives once and in order, while
    // the sender goes on writing.
    bc.set_nonblocking(false).map_err(|e| e.to_string())?;
    let extra = 100_000usize;
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let block: Vec<u8> = (sent..sent + extra).map(byte_at).collect();
        bc.write_all(&block)
            .map_err(|e| format!("bulk write after: {e}"))?;
        bc.shutdown(Shutdown::Write).map_err(|e| e.to_string())
    });
    bs.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::with_capacity(sent + extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match bs.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("bulk read after {} bytes: {e}", got.len())),
        }
    }
    let _ = writer.join();
    k.eq("bulk stream length", sent + extra, got.len());
    let bad = got.iter().enumerate().position(|(i, b)| *b != byte_at(i));
    k.eq("bulk stream bytes", None, bad);
    if let Some((_, s6)) = p6.as_mut() {
        k.eq(
            "ipv6 data",
            Ok(b"over ipv6".to_vec()),
            read_exact_timeout(s6, 9),
        );
    }
    let (mut c2, mut s2) = pair(&l4)?;
    c2.write_all(b"new").map_err(|e| e.to_string())?;
    k.eq(
        "listener accepts",
        Ok(b"new".to_vec()),
        read_exact_timeout(&mut s2, 3),
    );
    k.finish()
}

/// UDP sockets: one bound with datagrams queued from two senders, one
/// connected to it; after restore each datagram comes with its sender and
/// its boundaries, and the connection still filters.
pub fn udp_sockets(ctx: &Ctx) -> CaseResult {
    let a = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let b = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let c = UdpSocket::bind("127.0.0.2:0").map_err(|e| e.to_string())?;
    let aa = a.local_addr().map_err(|e| e.to_string())?;
    b.connect(aa).map_err(|e| e.to_string())?;
    for m in [&b"one"[..], b"two2", b""] {
        b.send(m).map_err(|e| e.to_string())?;
    }
    c.send_to(b"from c", aa).map_err(|e| e.to_string())?;
    let (ba, ca) = (b.local_addr().ok(), c.local_addr().ok());
    let v6 = UdpSocket::bind("[::1]:0").ok();
    if let Some(s) = &v6 {
        let to = s.local_addr().map_err(|e| e.to_string())?;
        let tx = UdpSocket::bind("[::1]:0").map_err(|e| e.to_string())?;
        tx.send_to(b"six", to).map_err(|e| e.to_string())?;
    }
    std::thread::sleep(Duration::from_millis(50));
    ctx.ready_and_wait()?;

    let mut k = Check::new();
    a.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut got: Vec<(Vec<u8>, Option<SocketAddr>)> = Vec::new();
    let mut buf = [0u8; 100];
    for _ in 0..4 {
        match a.recv_from(&mut buf) {
            Ok((n, from)) => got.push((buf[..n].to_vec(), Some(from))),
            Err(e) => return Err(format!("recv after {} datagrams: {e}", got.len())),
        }
    }
    k.eq(
        "datagrams with senders",
        vec![
            (b"one".to_vec(), ba),
            (b"two2".to_vec(), ba),
            (b"".to_vec(), ba),
            (b"from c".to_vec(), ca),
        ],
        got,
    );
    k.eq("connected peer", Some(aa), b.peer_addr().ok());
    a.send_to(b"back", ba.ok_or("b unbound")?)
        .map_err(|e| e.to_string())?;
    b.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let n = b.recv(&mut buf).map_err(|e| e.to_string())?;
    k.eq("reply", &b"back"[..], &buf[..n]);
    if let Some(s) = &v6 {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
        k.eq("ipv6 datagram", &b"six"[..], &buf[..n]);
    }
    k.finish()
}

/// A connection whose peer closed its side (CLOSE_WAIT): refused at dump
/// (repair mode cannot replay a received FIN), the process left running.
pub fn tcp_close_wait(ctx: &Ctx) -> CaseResult {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let (c, mut s) = pair(&l)?;
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(50));
    ctx.ready_and_wait()?;
    let mut k = Check::new();
    k.eq("peer's end of stream", Ok(Vec::new()), {
        let mut v = Vec::new();
        s.read_to_end(&mut v).map(|_| v).map_err(|e| e.to_string())
    });
    k.finish()
}

/// A stream to and from a peer outside the tree (the test, at the address
/// in $CKPT_ZDTM_TMP/peer): both sides send a counted byte pattern and check
/// what they receive, through checkpoints; the case passes when every byte
/// it received was the next one expected, and it received some.
pub fn tcp_stream(ctx: &Ctx) -> CaseResult {
    let tmp = std::env::var("CKPT_ZDTM_TMP").map_err(|_| "CKPT_ZDTM_TMP unset")?;
    let text = std::fs::read_to_string(format!("{tmp}/peer"))
        .map_err(|e| format!("reading the peer address: {e}"))?;
    // "PEER [LOCAL]": connect from a given local address.
    let mut words = text.split_whitespace();
    let peer: SocketAddr = words
        .next()
        .ok_or("empty peer file")?
        .parse()
        .map_err(|e| format!("peer address: {e}"))?;
    let s = match words.next() {
        None => TcpStream::connect(peer).map_err(|e| format!("connect {peer}: {e}"))?,
        Some(local) => connect_from(local, peer)?,
    };
    stream(ctx, s, None)
}

/// A TCP connection to `peer` from local address `local` (an IP).
fn connect_from(local: &str, peer: SocketAddr) -> Result<TcpStream, String> {
    use std::os::fd::FromRawFd;
    let ip: std::net::Ipv4Addr = local.parse().map_err(|e| format!("local {local}: {e}"))?;
    // SAFETY: a plain socket; its fd is owned by the TcpStream below.
    let fd = cvt(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: fd is a fresh socket nobody else owns.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(p) = peer else {
        return Err("IPv4 peers only".into());
    };
    let (a, b) = (sin(ip, 0), sin(*p.ip(), p.port()));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a and b are sockaddr_in of the given length.
    cvt(
        unsafe { libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) },
        "bind",
    )?;
    // SAFETY: as above.
    cvt(
        unsafe { libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len) },
        "connect",
    )?;
    Ok(s)
}

/// One part of a job spread over two nodes: $CKPT_ZDTM_TMP/part says
/// "listen ADDR" or "connect ADDR"; the two parts then stream to each
/// other as in `tcp_stream`, and each writes how many bytes it received
/// so far to $CKPT_ZDTM_TMP/count, for the test to watch.
pub fn job_net_tcp_part(ctx: &Ctx) -> CaseResult {
    let tmp = std::env::var("CKPT_ZDTM_TMP").map_err(|_| "CKPT_ZDTM_TMP unset")?;
    let part = std::fs::read_to_string(format!("{tmp}/part"))
        .map_err(|e| format!("reading the part file: {e}"))?;
    let (role, addr) = part.trim().split_once(' ').ok_or("part file: ROLE ADDR")?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    // The listener stays open through the checkpoint.
    let mut listener = None;
    let s = match role {
        "listen" => {
            let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            let (s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
            listener = Some(l);
            s
        }
        "connect" => {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!("connect {addr}: {e}"))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        r => return Err(format!("unknown role {r}")),
    };
    let r = stream(ctx, s, Some(format!("{tmp}/count")));
    drop(listener);
    r
}

/// Streams the counted pattern both ways on `s` until the case is told to
/// stop; checks every byte received.
fn stream(ctx: &Ctx, s: TcpStream, count_file: Option<String>) -> CaseResult {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = s;
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_w, received) = (stop.clone(), Arc::new(AtomicU64::new(0)));
    let writer = std::thread::spawn(move || -> Result<u64, String> {
        let mut sent = 0usize;
        while !stop_w.load(Ordering::Relaxed) {
            let block: Vec<u8> = (sent..sent + 1000).map(byte_at).collect();
            if let Err(e) = w.write_all(&block) {
                // The peer may be told to stop (and go) a moment before us.
                if crate::TERM.load(Ordering::SeqCst) {
                    break;
                }
                return Err(format!("write after {sent}: {e}"));
            }
            sent += 1000;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(sent as u64)
    });
    let rcount = received.clone();
    let reader = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; 8192];
        let mut at = 0usize;
        let mut told = Instant::now();
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(_) if crate::TERM.load(Ordering::SeqCst) => return Ok(()),
                Err(e) => return Err(format!("read after {at}: {e}")),
            };
            if let Some(i) = buf[..n]
                .iter()
                .enumerate()
                .position(|(i, b)| *b != byte_at(at + i))
            {
                return Err(format!("byte {} of the stream is wrong", at + i));
            }
            at += n;
            rcount.store(at as u64, Ordering::Relaxed);
            if let Some(f) = &count_file {
                if told.elapsed() > Duration::from_millis(50) {
                    let _ = std::fs::write(f, at.to_string());
                    told = Instant::now();
                }
            }
        }
    });
    if !wait_until(Duration::from_secs(5), || {
        received.load(Ordering::Relaxed) > 0
    }) {
        return Err("nothing received from the peer".into());
    }
    ctx.ready_and_wait()?;
    stop.store(true, Ordering::Relaxed);
    let mut k = Check::new();
    k.ok("writer ok", matches!(writer.join(), Ok(Ok(_))));
    k.ok("received data", received.load(Ordering::Relaxed) > 0);
    // A reader that stopped early says why (a wrong byte, a reset).
    if reader.is_finished() {
        k.eq(
            "reader",
            Ok(()),
            reader.join().map_err(|_| "panicked".to_string())?,
        );
    }
    k.finish()
}

/// Half-closed by this side: the case sent "bye" and shut down its sending
/// side to the peer (the test, at $CKPT_ZDTM_TMP/peer), which has not
/// answered yet. After restore the case still receives what the peer
/// sends, and its end of stream.
pub fn tcp_half_closed(ctx: &Ctx) -> CaseResult {
    let tmp = std::env::var("CKPT_ZDTM_TMP").map_err(|_| "CKPT_ZDTM_TMP unset")?;
    let peer: SocketAddr = std::fs::read_to_string(format!("{tmp}/peer"))
        .map_err(|e| format!("reading the peer address: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("peer address: {e}"))?;
    let mut s = TcpStream::connect(peer).map_err(|e| format!("connect {peer}: {e}"))?;
    s.write_all(b"bye").map_err(|e| e.to_string())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(100));
    ctx.ready_and_wait()?;
    let mut k = Check::new();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    k.eq(
        "peer's answer, then its end of stream",
        Ok(b"answer after restore".to_vec()),
        s.read_to_end(&mut got)
            .map(|_| got)
            .map_err(|e| e.to_string()),
    );
    k.finish()
}

/// A listener with a connection it has not accepted yet: refused at dump
/// (the kernel cannot put a connection back into an accept queue), the
/// process left running with its connection.
pub fn tcp_listen_pending(ctx: &Ctx) -> CaseResult {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let mut c = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    c.write_all(b"waiting").map_err(|e| e.to_string())?;
    ctx.ready_and_wait()?;
    let mut k = Check::new();
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    k.eq(
        "still there",
        Ok(b"waiting".to_vec()),
        read_exact_timeout(&mut s, 7),
    );
    k.finish()
}

/// A TCP listener made by hand: std's TcpListener sets SO_REUSEADDR, and
/// this one must not have it.
fn listen_no_reuseaddr(ip: std::net::Ipv4Addr) -> Result<TcpListener, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: a plain socket; its fd is owned by the TcpListener below.
    let fd = cvt(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: fd is a fresh socket nobody else owns.
    let l = unsafe { TcpListener::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sin is a sockaddr_in of the given length.
    cvt(
        unsafe { libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len) },
        "bind",
    )?;
    // SAFETY: no pointers.
    cvt(unsafe { libc::listen(fd, 16) }, "listen")?;
    Ok(l)
}

/// Accepts one connection on `l` within 10 s (the listener is left
/// non-blocking), so that a listener that lost its port fails the check
/// instead of hanging it.
fn accept_timeout(l: &TcpListener) -> Result<TcpStream, String> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Closes a connection from its client's side `c`, then its server's side
/// `s` once that has seen the end of stream (and nothing else).
fn close_client_first(c: TcpStream, mut s: TcpStream) -> CaseResult {
    drop(c);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} bytes before the client's end of stream")),
        Err(e) => Err(format!("waiting for the client's end of stream: {e}")),
    }
}

/// A listener on 0.0.0.0 without SO_REUSEADDR at a high descriptor (as a
/// program's libraries often leave it), with a client and the end it
/// accepted, that accepted end before the listener both by descriptor
/// number and in the kernel's order of open files (KCMP_FILE, by which a
/// dump may group descriptors). Which of two files comes first is the
/// kernel's choice (obfuscated pointers), so connect until an accepted end
/// does, keeping the others open meanwhile (a closed one's file would come
/// back in the same place). A listener whose place is near one end of that
/// order may have no accepted end before it for a long while (about one
/// listener in 65 does not get one in 64 tries), so after 32 tries start
/// over with a new listener.
fn listener_after_its_connection() -> Result<(TcpListener, TcpStream, TcpStream), String> {
    use std::os::fd::FromRawFd;
    for _ in 0..16 {
        let low = listen_no_reuseaddr(std::net::Ipv4Addr::UNSPECIFIED)?;
        // SAFETY: a new descriptor for the listener, owned below; the low
        // one is closed when `low` is dropped.
        let high = cvt(
            unsafe { libc::fcntl(low.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1000) },
            "F_DUPFD",
        )?;
        drop(low);
        // SAFETY: `high` is ours alone.
        let l = unsafe { TcpListener::from_raw_fd(high) };
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        let mut others = Vec::new();
        let mut found = None;
        while found.is_none() && others.len() < 32 {
            let c = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
            let s = accept_timeout(&l)?;
            if crate::files::kcmp_file(s.as_raw_fd(), l.as_raw_fd()) == Some(1) {
                found = Some((c, s));
            } else {
                others.push((c, s));
            }
        }
        for (c, s) in others {
            close_client_first(c, s)?;
        }
        if let Some((c, s)) = found {
            return Ok((l, c, s));
        }
    }
    Err("no accepted end came before its listener in KCMP_FILE order (16 listeners, 32 connections each)".into())
}

/// A listener on 0.0.0.0 without SO_REUSEADDR, and a connection it
/// accepted from a client in the same process, the accepted end before the
/// listener by descriptor number (the listener moved high, as a program's
/// libraries often leave it) and in the kernel's order of open files, with
/// bytes queued both ways. A restore that goes by either order rebuilds the
/// connection first, and it then holds the port the listener must bind
/// (the restore failed so: "Address already in use"). After restore: the
/// listener is on the same port with SO_REUSEADDR still 0 (the restore may
/// set it to bind, and must take it back), and accepts a new connection
/// that carries data both ways; the accepted connection delivers what was
/// queued, then new data both ways, then the client's end of stream.
pub fn tcp_listener_accepted_low_fd(ctx: &Ctx) -> CaseResult {
    let (l, mut client, mut accepted) = listener_after_its_connection()?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    let first = |s: &TcpStream| crate::files::kcmp_file(s.as_raw_fd(), l.as_raw_fd()) == Some(1);
    let reuse = |fd: i32| int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
    if accepted.as_raw_fd() >= l.as_raw_fd() || !first(&accepted) || reuse(l.as_raw_fd()) != 0 {
        return Err(format!(
            "setup: accepted fd {} must come before listener fd {}, whose SO_REUSEADDR ({}) must be 0",
            accepted.as_raw_fd(),
            l.as_raw_fd(),
            reuse(l.as_raw_fd())
        ));
    }
    client
        .write_all(b"queued to the server")
        .map_err(|e| e.to_string())?;
    accepted
        .write_all(b"queued to the client")
        .map_err(|e| e.to_string())?;
    let addrs = |s: &TcpStream| (s.local_addr().ok(), s.peer_addr().ok());
    let before = (
        l.local_addr().ok(),
        addrs(&accepted),
        addrs(&client),
        [client.as_raw_fd(), accepted.as_raw_fd(), l.as_raw_fd()],
    );
    // Let the kernel settle what it sends and acknowledges.
    std::thread::sleep(Duration::from_millis(100));
    ctx.ready_and_wait()?;

    let mut k = Check::new();
    k.eq(
        "addresses (listener, accepted, client) and descriptors",
        before,
        (
            l.local_addr().ok(),
            addrs(&accepted),
            addrs(&client),
            [client.as_raw_fd(), accepted.as_raw_fd(), l.as_raw_fd()],
        ),
    );
    k.eq("listener's SO_REUSEADDR", 0, reuse(l.as_raw_fd()));
    k.eq(
        "queued client -> server",
        Ok(b"queued to the server".to_vec()),
        read_exact_timeout(&mut accepted, 20),
    );
    k.eq(
        "queued server -> client",
        Ok(b"queued to the client".to_vec()),
        read_exact_timeout(&mut client, 20),
    );
    client.write_all(b"ping").map_err(|e| e.to_string())?;
    k.eq(
        "new data client -> server",
        Ok(b"ping".to_vec()),
        read_exact_timeout(&mut accepted, 4),
    );
    accepted.write_all(b"pong!").map_err(|e| e.to_string())?;
    k.eq(
        "new data server -> client",
        Ok(b"pong!".to_vec()),
        read_exact_timeout(&mut client, 5),
    );
    let mut c2 = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect to the listener's port {port}: {e}"))?;
    let mut s2 = accept_timeout(&l)?;
    c2.write_all(b"new").map_err(|e| e.to_string())?;
    s2.write_all(b"conn").map_err(|e| e.to_string())?;
    k.eq(
        "new connection client -> server",
        Ok(b"new".to_vec()),
        read_exact_timeout(&mut s2, 3),
    );
    k.eq(
        "new connection server -> client",
        Ok(b"conn".to_vec()),
        read_exact_timeout(&mut c2, 4),
    );
    // Closed from the clients' side, so that the TIME_WAIT sockets stay on
    // the clients' ports, not on the listener's: without SO_REUSEADDR
    // there, one would keep a copy restored from the same images (with
    // --leave-running) from binding it.
    k.res(close_client_first(client, accepted));
    k.res(close_client_first(c2, s2));
    k.finish()
}
