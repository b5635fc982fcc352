//! userfaultfd and the PAGEMAP_SCAN ioctl: the raw interfaces behind lazy
//! restore and write-protect based dirty tracking.

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

/// PAGEMAP_SCAN category: the page was written since it was protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// PAGEMAP_SCAN category: the page is present.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// PAGEMAP_SCAN flag: write-protect the matching pages atomically.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// PAGEMAP_SCAN flag: fail unless the range is registered WP_ASYNC.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

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

/// `struct pm_scan_arg` (96 bytes).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One `struct page_region` answered by PAGEMAP_SCAN.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Categories (masked by the return mask).
    pub categories: u64,
}

/// The PAGEMAP_SCAN ioctl number.
pub const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// PAGEMAP_SCAN on an open /proc/PID/pagemap over `[start, end)`: regions
/// whose pages have every category of `mask`, at most `max_regions` of
/// them; `flags` may write-protect what matched.
pub fn pagemap_scan(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    mask: u64,
    return_mask: u64,
    flags: u64,
    max_regions: usize,
) -> Result<(Vec<PageRegion>, u64), Errno> {
    let mut out = vec![PageRegion::default(); max_regions];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags,
        start,
        end,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.len() as u64,
        category_mask: mask,
        return_mask,
        ..Default::default()
    };
    // SAFETY: `arg` is a valid pm_scan_arg whose vec points at `out`, with
    // room for vec_len regions; the kernel writes at most that many.
    let r = unsafe {
        libc::ioctl(
            pagemap.as_raw_fd(),
            PAGEMAP_SCAN as libc::Ioctl,
            &mut arg as *mut PmScanArg,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    out.truncate(r as usize);
    Ok((out, arg.walk_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
    }
}
