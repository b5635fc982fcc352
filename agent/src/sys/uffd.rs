//! userfaultfd: the raw interface behind lazy restore and write-protect
//! based dirty tracking (whose PAGEMAP_SCAN side is in [`super::pagemap`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// UFFD API version.
pub const UFFD_API: u64 = 0xAA;
/// Write-protect faults are reported (UFFD_FEATURE_PAGEFAULT_FLAG_WP).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Write-protect unpopulated ptes too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write faults on wp ranges resolve themselves (dirty tracking).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// The monitor hears of forks (and gets the child's userfaultfd).
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// The monitor hears of mremap moves.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// The monitor hears of MADV_DONTNEED / MADV_REMOVE.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// The monitor hears of munmap.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Register for missing-page faults.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Register for write-protect faults.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_read!(uffdio_unregister, 0xAA, 0x01, UffdioRange);
nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);
nix::ioctl_readwrite!(uffdio_zeropage, 0xAA, 0x04, UffdioZeropage);
nix::ioctl_read!(uffdio_wake, 0xAA, 0x02, UffdioRange);
nix::ioctl_readwrite!(uffdio_writeprotect, 0xAA, 0x06, UffdioWriteprotect);

/// An open userfaultfd.
pub struct Userfaultfd {
    fd: OwnedFd,
    /// How it was obtained: "syscall" or "/dev/userfaultfd".
    pub source: &'static str,
}

/// What UFFDIO_API negotiated.
#[derive(Debug, Clone, Copy)]
pub struct UffdApi {
    /// Features the kernel reports (all supported ones when asked for none).
    pub features: u64,
    /// Bitmask of ioctls available on the fd.
    pub ioctls: u64,
}

impl Userfaultfd {
    /// Opens a userfaultfd, via the syscall or, when that is refused, via
    /// /dev/userfaultfd.
    pub fn open() -> Result<Self, Errno> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: integer-only syscall; a non-negative result is a new fd.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if r >= 0 {
            // SAFETY: fresh fd owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
            return Ok(Self {
                fd,
                source: "syscall",
            });
        }
        let first = Errno::last();
        let dev = match std::fs::File::open("/dev/userfaultfd") {
            Ok(f) => f,
            Err(_) => return Err(first),
        };
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument
        // and returns a new fd.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), userfaultfd_ioc_new_code(), flags) };
        if r < 0 {
            return Err(Errno::last());
        }
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
        Ok(Self {
            fd,
            source: "/dev/userfaultfd",
        })
    }

    /// Wraps a userfaultfd obtained elsewhere (e.g. from another process
    /// with pidfd_getfd).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fd,
            source: "passed",
        }
    }

    /// UFFDIO_API: enables `features` (0 asks what is supported).
    pub fn api(&self, features: u64) -> Result<UffdApi, Errno> {
        let mut a = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `a` is a valid uffdio_api for the kernel to read and fill.
        unsafe { uffdio_api(self.fd.as_raw_fd(), &mut a) }?;
        Ok(UffdApi {
            features: a.features,
            ioctls: a.ioctls,
        })
    }

    /// UFFDIO_REGISTER of `[start, start+len)` with `mode`.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: plain struct argument; the kernel validates the range.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut r) }?;
        Ok(r.ioctls)
    }

    /// UFFDIO_UNREGISTER.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = UffdioRange { start, len };
        // SAFETY: plain struct argument; the kernel validates the range.
        unsafe { uffdio_unregister(self.fd.as_raw_fd(), &mut r) }?;
        Ok(())
    }

    /// UFFDIO_COPY of `src` into the missing pages at `dst` (registered
    /// MISSING, owned by the caller as plain bytes).
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<(), Errno> {
        self.copy_partial(dst, src).0
    }

    /// UFFDIO_COPY that reports how far it got: with EEXIST (a page of the
    /// range is there already) or EAGAIN (the address space is changing),
    /// the bytes copied before it stopped.
    pub fn copy_partial(&self, dst: u64, src: &[u8]) -> (Result<(), Errno>, u64) {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the kernel reads `src` (alive for the call) and writes
        // only pages of ranges registered with this userfaultfd, in the
        // address space of the process that made it: the agent makes them
        // in processes it restores or tracks, never in itself.
        let r = unsafe { uffdio_copy(self.fd.as_raw_fd(), &mut c) };
        (r.map(|_| ()), c.copy.max(0) as u64)
    }

    /// UFFDIO_ZEROPAGE: maps the zero page at the missing pages of
    /// `[start, start+len)` and wakes their faulting threads.
    pub fn zeropage(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            ..Default::default()
        };
        // SAFETY: plain struct argument; the kernel validates the range.
        unsafe { uffdio_zeropage(self.fd.as_raw_fd(), &mut z) }?;
        Ok(())
    }

    /// UFFDIO_WAKE: wakes threads waiting on faults in `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = UffdioRange { start, len };
        // SAFETY: plain struct argument.
        unsafe { uffdio_wake(self.fd.as_raw_fd(), &mut r) }?;
        Ok(())
    }

    /// Reads one pending message without blocking: None when there is
    /// none.
    pub fn read_msg(&self) -> Result<Option<UffdEvent>, Errno> {
        let mut b = [0u8; 32];
        match nix::unistd::read(&self.fd, &mut b) {
            Ok(32) => Ok(Some(UffdEvent::from(UffdMsg::parse(&b)))),
            Ok(_) => Err(Errno::EIO),
            Err(Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The descriptor, for poll.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// UFFDIO_WRITEPROTECT on or off for `[start, start+len)`.
    pub fn writeprotect(&self, start: u64, len: u64, on: bool) -> Result<(), Errno> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: u64::from(on),
        };
        // SAFETY: plain struct argument; only page-table bits change.
        unsafe { uffdio_writeprotect(self.fd.as_raw_fd(), &mut w) }?;
        Ok(())
    }
}

/// What a userfaultfd reports.
pub enum UffdEvent {
    /// A thread faulted on a missing page at `address`.
    PageFault { address: u64 },
    /// The process forked: the child's userfaultfd.
    Fork(Userfaultfd),
    /// mremap moved `[from, from+len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// MADV_DONTNEED/MADV_REMOVE dropped `[start, end)`.
    Remove { start: u64, end: u64 },
    /// munmap of `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// Anything else (event number).
    Other(u8),
}

impl From<UffdMsg> for UffdEvent {
    fn from(m: UffdMsg) -> UffdEvent {
        match m {
            UffdMsg::PageFault { address } => UffdEvent::PageFault { address },
            UffdMsg::Fork { ufd } => {
                // SAFETY: the kernel installed `ufd` in this process's fd
                // table with the fork message just read; nothing else owns
                // it, and only a fork message read here gets this far.
                let fd = unsafe { OwnedFd::from_raw_fd(ufd) };
                UffdEvent::Fork(Userfaultfd {
                    fd,
                    source: "fork event",
                })
            }
            UffdMsg::Remap { from, to, len } => UffdEvent::Remap { from, to, len },
            UffdMsg::Remove { start, end } => UffdEvent::Remove { start, end },
            UffdMsg::Unmap { start, end } => UffdEvent::Unmap { start, end },
            UffdMsg::Other(e) => UffdEvent::Other(e),
        }
    }
}

/// A message as read from a userfaultfd (struct uffd_msg).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UffdMsg {
    /// A thread faulted on a missing page at `address`.
    PageFault { address: u64 },
    /// The process forked; `ufd` is the child's userfaultfd, installed in
    /// the reader's fd table.
    Fork { ufd: i32 },
    /// mremap moved `[from, from+len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// MADV_DONTNEED/MADV_REMOVE dropped `[start, end)`.
    Remove { start: u64, end: u64 },
    /// munmap of `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// Anything else (event number).
    Other(u8),
}

impl UffdMsg {
    fn parse(b: &[u8; 32]) -> UffdMsg {
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        match b[0] {
            0x12 => UffdMsg::PageFault {
                address: u64_at(16),
            },
            0x13 => UffdMsg::Fork {
                ufd: u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes")) as i32,
            },
            0x14 => UffdMsg::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            0x15 => UffdMsg::Remove {
                start: u64_at(8),
                end: u64_at(16),
            },
            0x16 => UffdMsg::Unmap {
                start: u64_at(8),
                end: u64_at(16),
            },
            e => UffdMsg::Other(e),
        }
    }
}

fn userfaultfd_ioc_new_code() -> libc::Ioctl {
    nix::request_code_none!(0xAA, 0x00) as libc::Ioctl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
    }

    #[test]
    fn messages_parse() {
        let mut b = [0u8; 32];
        b[0] = 0x12;
        b[16..24].copy_from_slice(&0x7f00_1000u64.to_ne_bytes());
        assert_eq!(
            UffdMsg::parse(&b),
            UffdMsg::PageFault {
                address: 0x7f00_1000
            }
        );
        b[0] = 0x14;
        b[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[24..32].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(
            UffdMsg::parse(&b),
            UffdMsg::Remap {
                from: 0x1000,
                to: 0x7f00_1000,
                len: 0x3000
            }
        );
        b[0] = 0x13;
        b[8..12].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(UffdMsg::parse(&b), UffdMsg::Fork { ufd: 9 });
    }
}
