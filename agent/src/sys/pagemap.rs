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

/// What to look for: pages must have every bit of `required` (after
/// flipping the bits of `inverted`) and at least one bit of `anyof`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    pub inverted: u64,
    pub required: u64,
    pub anyof: u64,
    pub returned: u64,
}

/// Scans `[start, end)` and appends matching regions to `out`. Loops until
/// the whole range is walked, so the result is complete.
pub fn scan(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    q: ScanQuery,
    out: &mut Vec<PageRegion>,
) -> io::Result<()> {
    let mut buf = vec![PageRegion::default(); 1024];
    let mut cur = start;
    while cur < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: cur,
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
        let n = r as usize;
        for reg in &buf[..n] {
            match out.last_mut() {
                Some(last) if last.end == reg.start && last.categories == reg.categories => {
                    last.end = reg.end
                }
                _ => out.push(*reg),
            }
        }
        if arg.walk_end <= cur {
            break;
        }
        cur = arg.walk_end;
    }
    Ok(())
}
