//! The PAGEMAP_SCAN ioctl of /proc/PID/pagemap: which pages of a range are
//! present, swapped, file-backed, zero, or guard pages, in one call.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Page categories reported by PAGEMAP_SCAN.
pub mod category {
    pub const WPALLOWED: u64 = 1 << 0;
    pub const WRITTEN: u64 = 1 << 1;
    pub const FILE: u64 = 1 << 2;
    pub const PRESENT: u64 = 1 << 3;
    pub const SWAPPED: u64 = 1 << 4;
    pub const PFNZERO: u64 = 1 << 5;
    pub const HUGE: u64 = 1 << 6;
    pub const SOFT_DIRTY: u64 = 1 << 7;
    pub const GUARD: u64 = 1 << 8;
}

/// Flags of a PAGEMAP_SCAN call.
pub mod flags {
    /// Write-protect the matching pages atomically (PM_SCAN_WP_MATCHING).
    pub const WP_MATCHING: u64 = 1 << 0;
    /// Fail unless the range is registered with userfaultfd WP_ASYNC
    /// (PM_SCAN_CHECK_WPASYNC).
    pub const CHECK_WPASYNC: u64 = 1 << 1;
}

const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;

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

/// One run of pages with the same categories.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// What to look for: pages must have every bit of `required` (after
/// flipping the bits of `inverted`) and at least one bit of `anyof`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    pub inverted: u64,
    pub required: u64,
    pub anyof: u64,
    pub returned: u64,
}

/// One PAGEMAP_SCAN call over `[start, end)` with `flags` (see [`flags`]):
/// fills `buf` with at most `buf.len()` regions, as the kernel reports them
/// (unmerged), and returns how many it filled and where the walk ended
/// (`end` when the whole range was walked).
pub fn scan_once(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    q: ScanQuery,
    flags: u64,
    buf: &mut [PageRegion],
) -> io::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags,
        start,
        end,
        vec: buf.as_mut_ptr() as u64,
        vec_len: buf.len() as u64,
        category_inverted: q.inverted,
        category_mask: q.required,
        category_anyof_mask: q.anyof,
        return_mask: q.returned,
        ..Default::default()
    };
    // SAFETY: arg is a valid pm_scan_arg whose vec points to buf, which
    // has vec_len entries and outlives the call.
    let r = unsafe {
        libc::ioctl(
            pagemap.as_raw_fd(),
            PAGEMAP_SCAN,
            &mut arg as *mut PmScanArg,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r as usize, arg.walk_end))
}

/// Scans `[start, end)` with `flags` (see [`flags`]) and appends matching
/// regions to `out`. Loops until the whole range is walked, so the result
/// is complete (and with `WP_MATCHING`, every matching page protected).
///
/// The walk is complete when a call leaves room in the vector: the kernel
/// stops early only when the vector is full. Its `walk_end` is not
/// trusted alone: when the kernel's own buffer (512 regions) filled during
/// a call that then walked to the end, 6.x kernels return the walk_end of
/// that internal stop, and walking again from there reports pages twice,
/// the second time after WP_MATCHING has reset them (seen on 6.18).
pub fn scan(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    q: ScanQuery,
    flags: u64,
    out: &mut Vec<PageRegion>,
) -> io::Result<()> {
    let mut buf = vec![PageRegion::default(); 1024];
    let mut cur = start;
    let first = out.len();
    while cur < end {
        let (n, walk_end) = scan_once(pagemap, cur, end, q, flags, &mut buf)?;
        for reg in &buf[..n] {
            let mut reg = *reg;
            if out.len() > first {
                // Never report a page twice.
                let last = out.last().expect("checked");
                if reg.end <= last.end {
                    continue;
                }
                reg.start = reg.start.max(last.end);
            }
            match out.last_mut() {
                Some(last) if last.end == reg.start && last.categories == reg.categories => {
                    last.end = reg.end
                }
                _ => out.push(reg),
            }
        }
        if n < buf.len() {
            break;
        }
        let next = walk_end.max(buf[n - 1].end);
        if next <= cur {
            break;
        }
        cur = next;
    }
    Ok(())
}
