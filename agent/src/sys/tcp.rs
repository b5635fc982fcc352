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

/// SO_REUSEADDR on.
pub fn set_reuseaddr(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32)
}
