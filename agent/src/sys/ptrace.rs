//! ptrace requests that nix does not wrap: register sets, signal masks,
//! queued signals, rseq and seccomp introspection.

use std::io;

use nix::unistd::Pid;

/// NT_X86_XSTATE: the XSAVE area register set.
const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GETREGSET: libc::c_uint = 0x4204;
const PTRACE_SETREGSET: libc::c_uint = 0x4205;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// Flag of PTRACE_PEEKSIGINFO: read the process-wide queue.
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
/// Largest XSAVE area we accept (AMX tiles make it about 11 KiB).
pub const XSTATE_MAX: usize = 16 * 1024;
/// Size of a kernel siginfo_t.
pub const SIGINFO_SIZE: usize = 128;

fn ptrace_raw(req: libc::c_uint, tid: Pid, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes addr/data pointing to buffers it owns and
    // sized for the request; the kernel validates the tracee.
    let r = unsafe {
        libc::ptrace(
            req,
            tid.as_raw(),
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Reads the XSAVE area of a stopped tracee.
pub fn get_xstate(tid: Pid) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let n = get_xstate_into(tid, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads the XSAVE area of a stopped tracee into `buf`; returns the size
/// the kernel filled in (at most `buf.len()`).
pub fn get_xstate_into(tid: Pid, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    ptrace_raw(
        PTRACE_GETREGSET,
        tid,
        NT_X86_XSTATE as usize,
        &mut iov as *mut libc::iovec as usize,
    )?;
    Ok(iov.iov_len)
}

/// Writes the XSAVE area of a stopped tracee.
pub fn set_xstate(tid: Pid, xstate: &[u8]) -> io::Result<()> {
    let mut copy = xstate.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    ptrace_raw(
        PTRACE_SETREGSET,
        tid,
        NT_X86_XSTATE as usize,
        &mut iov as *mut libc::iovec as usize,
    )?;
    Ok(())
}

/// Reads the blocked-signal mask of a stopped tracee.
pub fn get_sigmask(tid: Pid) -> io::Result<u64> {
    let mut mask = 0u64;
    ptrace_raw(PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize)?;
    Ok(mask)
}

/// Sets the blocked-signal mask of a stopped tracee.
pub fn set_sigmask(tid: Pid, mask: u64) -> io::Result<()> {
    let mut m = mask;
    ptrace_raw(PTRACE_SETSIGMASK, tid, 8, &mut m as *mut u64 as usize)?;
    Ok(())
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// Reads, without dequeuing, the signals queued for a thread (or, with
/// `shared`, for its whole process), as raw 128-byte siginfo records.
pub fn peek_siginfo(tid: Pid, shared: bool) -> io::Result<Vec<[u8; SIGINFO_SIZE]>> {
    let mut out = Vec::new();
    const BATCH: usize = 32;
    loop {
        let mut buf = [[0u8; SIGINFO_SIZE]; BATCH];
        let mut args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        let n = ptrace_raw(
            PTRACE_PEEKSIGINFO,
            tid,
            &mut args as *mut PeekSiginfoArgs as usize,
            buf.as_mut_ptr() as usize,
        )? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < BATCH {
            return Ok(out);
        }
    }
}

/// The rseq registration of a thread, as PTRACE_GET_RSEQ_CONFIGURATION reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<RseqConfig>() == 24);

/// Reads the rseq registration of a stopped tracee (size 0 when none).
pub fn get_rseq_config(tid: Pid) -> io::Result<RseqConfig> {
    let mut conf = RseqConfig::default();
    ptrace_raw(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RseqConfig>(),
        &mut conf as *mut RseqConfig as usize,
    )?;
    Ok(conf)
}

/// Reads seccomp filter number `index` (0 = newest) of a tracee as raw
/// `struct sock_filter` bytes; `None` past the last filter.
pub fn seccomp_get_filter(tid: Pid, index: usize) -> io::Result<Option<Vec<u8>>> {
    let n = match ptrace_raw(PTRACE_SECCOMP_GET_FILTER, tid, index, 0) {
        Ok(n) => n as usize,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; n * 8];
    ptrace_raw(
        PTRACE_SECCOMP_GET_FILTER,
        tid,
        index,
        buf.as_mut_ptr() as usize,
    )?;
    Ok(Some(buf))
}

/// Reads the robust futex list head and length of any thread we may trace.
pub fn get_robust_list(tid: Pid) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: head and len are valid out-pointers for this call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut libc::size_t,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok((head, len as u64))
}
