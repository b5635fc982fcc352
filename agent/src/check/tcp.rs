//! The TCP_REPAIR probe: in a child with its own network namespace, read an
//! established loopback connection's state in repair mode, close it
//! silently, rebuild it on a new socket and check that data still flows
//! both ways.

use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::socket::{
    accept, bind, connect, getsockname, listen, recv, send, socket, AddressFamily, Backlog,
    MsgFlags, SockFlag, SockType, SockaddrIn,
};

use super::{ctx, Outcome, CHILD_TIMEOUT};
use crate::sys::probe::{self, fork_child, ChildIo};
use crate::sys::tcp::{self as t, TcpRepairOpt};

const NOERR: Errno = Errno::UnknownErrno;
const FROM_SERVER: &[u8] = b"from-server";
const FROM_CLIENT: &[u8] = b"from-client";
const AFTER: &[u8] = b"after-restore";

/// Names of the child's steps, for the report.
const STEPS: &[&str] = &[
    "ok",
    "unshare(CLONE_NEWNET)",
    "bring lo up",
    "listen on 127.0.0.1",
    "connect",
    "accept",
    "exchange data",
    "TCP_REPAIR on",
    "TCP_REPAIR_QUEUE send + TCP_QUEUE_SEQ get",
    "peek the send queue",
    "TCP_REPAIR_QUEUE recv + TCP_QUEUE_SEQ get",
    "peek the receive queue",
    "TCP_REPAIR_WINDOW get",
    "TCP_TIMESTAMP get / TCP_MAXSEG / TCP_INFO",
    "new socket in repair mode",
    "TCP_QUEUE_SEQ set",
    "bind to the old local address",
    "connect in repair mode",
    "TCP_REPAIR_OPTIONS",
    "TCP_TIMESTAMP set",
    "refill the queues",
    "TCP_REPAIR_WINDOW set",
    "TCP_REPAIR off",
    "read the restored receive queue",
    "send after restore",
    "peer receives data after restore",
];

fn wait_readable(fd: impl AsFd, ms: u16) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// The child's whole job; returns its exit code after reporting.
fn child(io: &ChildIo) -> i32 {
    macro_rules! step {
        ($n:expr, $e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return io.report($n, e, &[]),
            }
        };
    }
    let sock = || {
        socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
    };
    step!(1, unshare(CloneFlags::CLONE_NEWNET));
    step!(2, probe::loopback_up());
    let lst = step!(3, sock());
    step!(3, bind(lst.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)));
    step!(3, listen(&lst, Backlog::new(4).unwrap_or(Backlog::MAXCONN)));
    let srv_addr: SockaddrIn = step!(3, getsockname(lst.as_raw_fd()));
    let cli = step!(4, sock());
    step!(4, connect(cli.as_raw_fd(), &srv_addr));
    let cli_addr: SockaddrIn = step!(4, getsockname(cli.as_raw_fd()));
    let srv = step!(5, accept(&lst));
    step!(6, send(srv.as_raw_fd(), FROM_SERVER, MsgFlags::empty()));
    step!(6, send(cli.as_raw_fd(), FROM_CLIENT, MsgFlags::empty()));
    if !wait_readable(&cli, 1000) {
        return io.report(6, Errno::ETIMEDOUT, &[]);
    }
    let c = cli.as_fd();
    step!(7, t::set_u32(c, t::TCP_REPAIR, 1));
    step!(8, t::set_u32(c, t::TCP_REPAIR_QUEUE, t::TCP_SEND_QUEUE));
    let snd_seq = step!(8, t::get_u32(c, t::TCP_QUEUE_SEQ));
    let mut sndbuf = [0u8; 64];
    let sndq = match recv(
        c.as_raw_fd(),
        &mut sndbuf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => n,
        Err(Errno::EAGAIN) => 0,
        Err(e) => return io.report(9, e, &[]),
    };
    let mut buf = [0u8; 64];
    step!(10, t::set_u32(c, t::TCP_REPAIR_QUEUE, t::TCP_RECV_QUEUE));
    let rcv_seq = step!(10, t::get_u32(c, t::TCP_QUEUE_SEQ));
    let n = step!(
        11,
        recv(
            c.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        )
    );
    if &buf[..n] != FROM_SERVER {
        return io.report(11, Errno::EBADMSG, &[n as u64]);
    }
    let rcvq_len = n;
    let win = step!(12, t::get_window(c));
    let ts = step!(13, t::get_u32(c, t::TCP_TIMESTAMP));
    let mss = step!(13, t::get_u32(c, libc::TCP_MAXSEG));
    let info = step!(13, t::tcp_info_head(c));
    drop(cli); // in repair mode: no FIN, no RST
    let (opts, wscale) = (info[5], info[6]);

    let s2 = step!(14, sock());
    let n2 = s2.as_fd();
    step!(14, t::set_u32(n2, t::TCP_REPAIR, 1));
    step!(14, t::set_reuseaddr(n2));
    step!(15, t::set_u32(n2, t::TCP_REPAIR_QUEUE, t::TCP_SEND_QUEUE));
    step!(
        15,
        t::set_u32(n2, t::TCP_QUEUE_SEQ, snd_seq.wrapping_sub(sndq as u32))
    );
    step!(15, t::set_u32(n2, t::TCP_REPAIR_QUEUE, t::TCP_RECV_QUEUE));
    step!(
        15,
        t::set_u32(n2, t::TCP_QUEUE_SEQ, rcv_seq.wrapping_sub(rcvq_len as u32))
    );
    step!(16, bind(n2.as_raw_fd(), &cli_addr));
    step!(17, connect(n2.as_raw_fd(), &srv_addr));
    let mut ro = [TcpRepairOpt::default(); 4];
    let mut k = 0;
    ro[k] = TcpRepairOpt {
        opt_code: t::TCPOPT_MSS,
        opt_val: mss,
    };
    k += 1;
    const TCPI_OPT_TIMESTAMPS: u8 = 1;
    const TCPI_OPT_SACK: u8 = 2;
    const TCPI_OPT_WSCALE: u8 = 4;
    if opts & TCPI_OPT_WSCALE != 0 {
        let (snd, rcv) = (u32::from(wscale & 0xf), u32::from(wscale >> 4));
        ro[k] = TcpRepairOpt {
            opt_code: t::TCPOPT_WINDOW,
            opt_val: snd | (rcv << 16),
        };
        k += 1;
    }
    if opts & TCPI_OPT_SACK != 0 {
        ro[k] = TcpRepairOpt {
            opt_code: t::TCPOPT_SACK_PERM,
            opt_val: 0,
        };
        k += 1;
    }
    if opts & TCPI_OPT_TIMESTAMPS != 0 {
        ro[k] = TcpRepairOpt {
            opt_code: t::TCPOPT_TIMESTAMP,
            opt_val: 0,
        };
        k += 1;
    }
    step!(18, t::set_repair_options(n2, &ro[..k]));
    step!(19, t::set_u32(n2, t::TCP_TIMESTAMP, ts));
    // The receive queue's data is re-queued by sending it in repair mode;
    // its sequence number was set to where that data started.
    step!(20, t::set_u32(n2, t::TCP_REPAIR_QUEUE, t::TCP_RECV_QUEUE));
    step!(
        20,
        send(n2.as_raw_fd(), &buf[..rcvq_len], MsgFlags::empty())
    );
    if sndq > 0 {
        step!(20, t::set_u32(n2, t::TCP_REPAIR_QUEUE, t::TCP_SEND_QUEUE));
        step!(20, send(n2.as_raw_fd(), &sndbuf[..sndq], MsgFlags::empty()));
    }
    step!(21, t::set_window(n2, &win));
    step!(22, t::set_u32(n2, t::TCP_REPAIR, 0));
    let mut got = [0u8; 64];
    let n = step!(23, recv(n2.as_raw_fd(), &mut got, MsgFlags::MSG_DONTWAIT));
    if &got[..n] != FROM_SERVER {
        return io.report(23, Errno::EBADMSG, &[n as u64]);
    }
    step!(24, send(n2.as_raw_fd(), AFTER, MsgFlags::empty()));
    // The server sees what the old socket sent, then what the new one sent.
    let mut all = [0u8; 64];
    let mut have = 0;
    let want = FROM_CLIENT.len() + AFTER.len();
    while have < want {
        if !wait_readable(&srv, 1000) {
            return io.report(25, Errno::ETIMEDOUT, &[have as u64]);
        }
        match recv(srv.as_raw_fd(), &mut all[have..], MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return io.report(25, Errno::ECONNRESET, &[have as u64]),
            Ok(n) => have += n,
            Err(Errno::EAGAIN) => {}
            Err(e) => return io.report(25, e, &[have as u64]),
        }
    }
    if &all[..FROM_CLIENT.len()] != FROM_CLIENT || &all[FROM_CLIENT.len()..want] != AFTER {
        return io.report(25, Errno::EBADMSG, &[have as u64]);
    }
    io.report(
        0,
        NOERR,
        &[
            u64::from(snd_seq),
            u64::from(rcv_seq),
            u64::from(win.snd_wnd),
            u64::from(win.rcv_wnd),
            u64::from(ts),
            sndq as u64,
        ],
    )
}

pub(super) fn tcp_repair() -> Outcome {
    let mut c = fork_child(child).map_err(ctx("fork"))?;
    let r = c.final_report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    if r.step == 0 {
        return Ok(format!(
            "rebuilt a loopback connection (snd_seq {}, rcv_seq {}, windows {}/{}, ts {}); data flowed both ways",
            r.vals[0], r.vals[1], r.vals[2], r.vals[3], r.vals[4]
        ));
    }
    let what = STEPS
        .get(r.step as usize)
        .copied()
        .unwrap_or("unknown step");
    Err(format!("{what}: {}", r.errno))
}
