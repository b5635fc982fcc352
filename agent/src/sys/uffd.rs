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
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_read!(uffdio_unregister, 0xAA, 0x01, UffdioRange);
nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);
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
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the kernel reads `src` (alive for the call) and fills only
        // pages of a uffd-registered range, i.e. memory the caller mapped.
        unsafe { uffdio_copy(self.fd.as_raw_fd(), &mut c) }?;
        Ok(())
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
    }
}
