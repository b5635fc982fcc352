//! TCP_REPAIR socket options: reading and rebuilding an established
//! connection's state (sequence numbers, queues, window, options, timestamp).

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// Put a socket in (1) or out of (0) repair mode.
pub const TCP_REPAIR: libc::c_int = 19;
/// Select the queue later options and send/recv act on.
pub const TCP_REPAIR_QUEUE: libc::c_int = 20;
/// Sequence number of the selected queue.
pub const TCP_QUEUE_SEQ: libc::c_int = 21;
/// Negotiated options to restore (MSS, window scale, SACK, timestamps).
pub const TCP_REPAIR_OPTIONS: libc::c_int = 22;
/// Timestamp clock (get) or its offset base (set, repair mode).
pub const TCP_TIMESTAMP: libc::c_int = 24;
/// Window state.
pub const TCP_REPAIR_WINDOW: libc::c_int = 29;
/// Receive queue selector for TCP_REPAIR_QUEUE.
pub const TCP_RECV_QUEUE: u32 = 1;
/// Send queue selector for TCP_REPAIR_QUEUE.
pub const TCP_SEND_QUEUE: u32 = 2;
/// TCPOPT_MSS for TCP_REPAIR_OPTIONS.
pub const TCPOPT_MSS: u32 = 2;
/// TCPOPT_WINDOW (window scale) for TCP_REPAIR_OPTIONS.
pub const TCPOPT_WINDOW: u32 = 3;
/// TCPOPT_SACK_PERM for TCP_REPAIR_OPTIONS.
pub const TCPOPT_SACK_PERM: u32 = 4;
/// TCPOPT_TIMESTAMP for TCP_REPAIR_OPTIONS.
pub const TCPOPT_TIMESTAMP: u32 = 8;

/// `struct tcp_repair_window`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpRepairWindow {
    /// Last window update sequence.
    pub snd_wl1: u32,
    /// Send window.
    pub snd_wnd: u32,
    /// Largest window the peer ever offered.
    pub max_window: u32,
    /// Receive window.
    pub rcv_wnd: u32,
    /// rcv_nxt at the last window update.
    pub rcv_wup: u32,
}

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpRepairOpt {
    /// TCPOPT_* code.
    pub opt_code: u32,
    /// Its value.
    pub opt_val: u32,
}

fn getsockopt_raw<T: Copy + Default>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
) -> Result<(T, usize), Errno> {
    let mut v = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v` and updates len;
    // T is plain old data.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut T).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok((v, len as usize))
}

fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    max: usize,
) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; max];
    let mut len = max as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf` and updates len.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

fn setsockopt_raw<T: ?Sized>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    v: &T,
) -> Result<(), Errno> {
    // SAFETY: the kernel reads size_of_val(v) bytes from `v`.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (v as *const T).cast(),
            std::mem::size_of_val(v) as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// getsockopt(IPPROTO_TCP, opt) of a 32-bit value.
pub fn get_u32(fd: BorrowedFd<'_>, opt: libc::c_int) -> Result<u32, Errno> {
    getsockopt_raw::<u32>(fd, libc::IPPROTO_TCP, opt).map(|(v, _)| v)
}

/// setsockopt(IPPROTO_TCP, opt) of a 32-bit value.
pub fn set_u32(fd: BorrowedFd<'_>, opt: libc::c_int, v: u32) -> Result<(), Errno> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, opt, &v)
}

/// TCP_REPAIR_WINDOW get.
pub fn get_window(fd: BorrowedFd<'_>) -> Result<TcpRepairWindow, Errno> {
    getsockopt_raw::<TcpRepairWindow>(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW).map(|(v, _)| v)
}

/// TCP_REPAIR_WINDOW set.
pub fn set_window(fd: BorrowedFd<'_>, w: &TcpRepairWindow) -> Result<(), Errno> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, w)
}

/// TCP_REPAIR_OPTIONS set.
pub fn set_repair_options(fd: BorrowedFd<'_>, opts: &[TcpRepairOpt]) -> Result<(), Errno> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, opts)
}

/// The first bytes of `struct tcp_info` that repair needs: options (byte 5)
/// and the window scales (byte 6: snd low nibble, rcv high nibble).
pub fn tcp_info_head(fd: BorrowedFd<'_>) -> Result<[u8; 8], Errno> {
    getsockopt_raw::<[u8; 8]>(fd, libc::IPPROTO_TCP, libc::TCP_INFO).map(|(v, _)| v)
}

/// getsockopt of an int-sized option at any level.
pub fn get_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int) -> Result<i32, Errno> {
    getsockopt_raw::<i32>(fd, level, opt).map(|(v, _)| v)
}

/// setsockopt of an int-sized option at any level.
pub fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    v: i32,
) -> Result<(), Errno> {
    setsockopt_raw(fd, level, opt, &v)
}

/// getsockopt of a string option (TCP_CONGESTION, SO_BINDTODEVICE).
pub fn get_string(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
) -> Result<String, Errno> {
    let buf = getsockopt_bytes(fd, level, opt, 64)?;
    let s = &buf[..];
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    Ok(String::from_utf8_lossy(&s[..end]).into_owned())
}

/// setsockopt of a string option.
pub fn set_string(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    v: &str,
) -> Result<(), Errno> {
    setsockopt_raw(fd, level, opt, v.as_bytes())
}

/// SO_LINGER: (on, seconds).
pub fn get_linger(fd: BorrowedFd<'_>) -> Result<(bool, i32), Errno> {
    let (l, _) = getsockopt_raw::<[i32; 2]>(fd, libc::SOL_SOCKET, libc::SO_LINGER)?;
    Ok((l[0] != 0, l[1]))
}

/// SO_LINGER set.
pub fn set_linger(fd: BorrowedFd<'_>, on: bool, secs: i32) -> Result<(), Errno> {
    setsockopt_raw(
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &[i32::from(on), secs],
    )
}

/// The whole `struct tcp_info` as the kernel fills it.
pub fn tcp_info(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 256)
}

/// SIOCINQ (bytes to read), SIOCOUTQ (bytes not yet acknowledged) or
/// SIOCOUTQNSD (bytes not yet sent) of a socket.
pub fn queue_len(fd: BorrowedFd<'_>, req: QueueIoctl) -> Result<u32, Errno> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int through the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::c_ulong, &mut v) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(v.max(0) as u32)
}

/// The socket queue-length ioctls.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum QueueIoctl {
    /// SIOCINQ (= FIONREAD).
    In = 0x541B,
    /// SIOCOUTQ (= TIOCOUTQ).
    Out = 0x5411,
    /// SIOCOUTQNSD.
    OutNotSent = 0x894B,
}

/// SO_REUSEADDR on.
pub fn set_reuseaddr(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32)
}

/// SO_SNDBUFFORCE: SO_SNDBUF past net.core.wmem_max (CAP_NET_ADMIN).
pub const SO_SNDBUFFORCE: libc::c_int = 32;
/// SO_RCVBUFFORCE.
pub const SO_RCVBUFFORCE: libc::c_int = 33;
/// SO_MARK.
pub const SO_MARK: libc::c_int = 36;
/// SO_PEEK_OFF: MSG_PEEK goes on from where the last peek stopped.
pub const SO_PEEK_OFF: libc::c_int = 42;
/// SO_BUF_LOCK (5.14): whether the buffer sizes are fixed by the user.
pub const SO_BUF_LOCK: libc::c_int = 72;
/// TCP_REPAIR value: leave repair mode without sending a window probe.
pub const TCP_REPAIR_OFF_NO_WP: u32 = u32::MAX;
