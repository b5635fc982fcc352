//! Probes of the memory interfaces: process_vm, map_files, pagemap and
//! PAGEMAP_SCAN, soft-dirty, userfaultfd, memfd and PR_SET_MM_MAP.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use memmap2::MmapMut;
use nix::errno::Errno;

use super::{ctx, errno_ctx, Outcome, CHILD_TIMEOUT};
use crate::sys::pagemap::{self, category, PageRegion, ScanQuery};
use crate::sys::probe::{self, fork_child, PrctlMmMap};
use crate::sys::uffd::{self, Userfaultfd};

const NOERR: Errno = Errno::UnknownErrno;

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as usize
}

fn anon(len: usize) -> Result<MmapMut, String> {
    MmapMut::map_anon(len).map_err(ctx("mmap"))
}

/// Reads `n` pagemap entries of `pid` starting at `addr`.
fn pagemap_entries(pid: &str, addr: usize, n: usize) -> Result<Vec<u64>, String> {
    let path = format!("/proc/{pid}/pagemap");
    let f = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    let mut buf = vec![0u8; n * 8];
    f.read_exact_at(&mut buf, (addr / page_size() * 8) as u64)
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_UFFD_WP: u64 = 1 << 57;

pub(super) fn process_vm() -> Outcome {
    let mut buf = vec![0xAAu8; 4096];
    let addr = buf.as_ptr() as usize;
    let mut c = fork_child(|io| {
        buf.fill(0xBB);
        io.report(0, NOERR, &[]);
        io.idle()
    })
    .map_err(ctx("fork"))?;
    c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    let pid = c.pid();
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr,
        len: 4096,
    }];
    let mut local = vec![0u8; 4096];
    let n =
        nix::sys::uio::process_vm_readv(pid, &mut [std::io::IoSliceMut::new(&mut local)], &remote)
            .map_err(ctx("process_vm_readv"))?;
    if n != 4096 || local.iter().any(|&b| b != 0xBB) {
        return Err("process_vm_readv did not return the child's bytes".into());
    }
    let pattern = vec![0xCCu8; 4096];
    nix::sys::uio::process_vm_writev(pid, &[std::io::IoSlice::new(&pattern)], &remote)
        .map_err(ctx("process_vm_writev"))?;
    nix::sys::uio::process_vm_readv(pid, &mut [std::io::IoSliceMut::new(&mut local)], &remote)
        .map_err(ctx("process_vm_readv"))?;
    if local != pattern || buf.iter().any(|&b| b != 0xAA) {
        return Err("process_vm_writev did not change the child's memory".into());
    }
    Ok("read and wrote 4 KiB of a child".into())
}

pub(super) fn map_files() -> Outcome {
    let mut c = fork_child(|io| {
        io.report(0, NOERR, &[]);
        io.idle()
    })
    .map_err(ctx("fork"))?;
    c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    let pid = c.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(ctx("read maps"))?;
    let (range, inode) = maps
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[5].starts_with('/') && f[4] != "0")
                .then(|| (f[0].to_string(), f[4].to_string()))
        })
        .ok_or("child has no file mapping")?;
    let path = format!("/proc/{pid}/map_files/{range}");
    let f = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    let st = nix::sys::stat::fstat(&f).map_err(ctx("fstat"))?;
    if st.st_ino.to_string() == inode {
        Ok(format!("opened map_files/{range} (inode {inode})"))
    } else {
        Err(format!(
            "map_files gave inode {}, maps says {inode}",
            st.st_ino
        ))
    }
}

/// A child that touched pages 0 and 2 of a 4-page buffer mapped before fork.
fn touched_child(buf: &mut MmapMut) -> Result<probe::ProbeChild, String> {
    let ps = page_size();
    let mut c = fork_child(|io| {
        buf[0] = 1;
        buf[2 * ps] = 1;
        io.report(0, NOERR, &[]);
        io.idle()
    })
    .map_err(ctx("fork"))?;
    c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    Ok(c)
}

pub(super) fn pagemap() -> Outcome {
    let ps = page_size();
    let mut buf = anon(4 * ps)?;
    let addr = buf.as_ptr() as usize;
    let c = touched_child(&mut buf)?;
    let e = pagemap_entries(&c.pid().to_string(), addr, 4)?;
    let present: Vec<bool> = e.iter().map(|v| v & PM_PRESENT != 0).collect();
    if present == [true, false, true, false] {
        Ok("present bits match the child's touched pages".into())
    } else {
        Err(format!(
            "present bits {present:?}, expected [true, false, true, false]"
        ))
    }
}

/// One PAGEMAP_SCAN call over `[start, end)` for pages with every category
/// of `cat` (and reporting just those), with room for 8 regions.
fn scan_once(
    pm: &File,
    start: u64,
    end: u64,
    cat: u64,
    flags: u64,
) -> std::io::Result<Vec<PageRegion>> {
    let q = ScanQuery {
        required: cat,
        returned: cat,
        ..Default::default()
    };
    let mut buf = [PageRegion::default(); 8];
    let (n, _) = pagemap::scan_once(pm.as_fd(), start, end, q, flags, &mut buf)?;
    Ok(buf[..n].to_vec())
}

pub(super) fn pagemap_scan() -> Outcome {
    let ps = page_size();
    let mut buf = anon(4 * ps)?;
    let addr = buf.as_ptr() as u64;
    let c = touched_child(&mut buf)?;
    let path = format!("/proc/{}/pagemap", c.pid());
    let f = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    let regions = scan_once(&f, addr, addr + 4 * ps as u64, category::PRESENT, 0)
        .map_err(errno_ctx("ioctl PAGEMAP_SCAN"))?;
    let got: Vec<(u64, u64)> = regions
        .iter()
        .map(|r| ((r.start - addr) / ps as u64, (r.end - addr) / ps as u64))
        .collect();
    if got == [(0, 1), (2, 3)] {
        Ok("found exactly the child's 2 present pages".into())
    } else {
        Err(format!(
            "regions (in pages) {got:?}, expected [(0, 1), (2, 3)]"
        ))
    }
}

pub(super) fn soft_dirty() -> Outcome {
    let ps = page_size();
    let mut buf = anon(ps)?;
    let addr = buf.as_ptr() as usize;
    let mut c = fork_child(|io| {
        buf[0] = 1;
        io.report(0, NOERR, &[]);
        if io.recv_u64().is_none() {
            return 1;
        }
        buf[0] = 2;
        io.report(0, NOERR, &[]);
        io.idle()
    })
    .map_err(ctx("fork"))?;
    c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    let pid = c.pid().to_string();
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(|e| format!("write 4 to {path}: {e}"))?;
    let before = pagemap_entries(&pid, addr, 1)?[0];
    c.send(&1u64.to_ne_bytes()).map_err(|e| e.to_string())?;
    c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    let after = pagemap_entries(&pid, addr, 1)?[0];
    match (before & PM_SOFT_DIRTY != 0, after & PM_SOFT_DIRTY != 0) {
        (false, true) => Ok("bit 55 clear after clear_refs=4, set after a write".into()),
        (_, false) => Err(
            "pagemap bit 55 never set after a write (soft-dirty tracking not available: CONFIG_MEM_SOFT_DIRTY off?)"
                .into(),
        ),
        (true, true) => Err("clear_refs=4 did not clear bit 55".into()),
    }
}

pub(super) fn uffd() -> Outcome {
    let ps = page_size();
    let u = Userfaultfd::open().map_err(ctx("userfaultfd"))?;
    let api = u.api(0).map_err(ctx("UFFDIO_API"))?;
    let buf = anon(ps)?;
    let addr = buf.as_ptr() as u64;
    u.register(addr, ps as u64, uffd::UFFDIO_REGISTER_MODE_MISSING)
        .map_err(ctx("UFFDIO_REGISTER missing"))?;
    let page = vec![0x5Au8; ps];
    let copied = u.copy(addr, &page);
    let _ = u.unregister(addr, ps as u64);
    copied.map_err(ctx("UFFDIO_COPY"))?;
    if buf[0] != 0x5A || buf[ps - 1] != 0x5A {
        return Err("UFFDIO_COPY did not fill the missing page".into());
    }
    Ok(format!(
        "via {}; features {:#x}; UFFDIO_COPY filled a missing page",
        u.source, api.features
    ))
}

pub(super) fn uffd_wp() -> Outcome {
    let ps = page_size();
    let u = Userfaultfd::open().map_err(ctx("userfaultfd"))?;
    u.api(uffd::UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        .map_err(ctx("UFFDIO_API with UFFD_FEATURE_PAGEFAULT_FLAG_WP"))?;
    let mut buf = anon(2 * ps)?;
    buf.fill(1);
    let addr = buf.as_ptr() as u64;
    let len = 2 * ps as u64;
    u.register(addr, len, uffd::UFFDIO_REGISTER_MODE_WP)
        .map_err(ctx("UFFDIO_REGISTER wp"))?;
    // Nothing may write the buffer while it is protected: a write would
    // block this thread forever on the synchronous fault.
    let res = (|| {
        u.writeprotect(addr, len, true)
            .map_err(ctx("UFFDIO_WRITEPROTECT"))?;
        let on = pagemap_entries("self", addr as usize, 2)?;
        u.writeprotect(addr, len, false)
            .map_err(ctx("UFFDIO_WRITEPROTECT off"))?;
        let off = pagemap_entries("self", addr as usize, 2)?;
        if on.iter().all(|e| e & PM_UFFD_WP != 0) && off.iter().all(|e| e & PM_UFFD_WP == 0) {
            Ok("protected and unprotected 2 pages (pagemap bit 57 followed)".to_string())
        } else {
            Err("pagemap bit 57 did not follow UFFDIO_WRITEPROTECT".to_string())
        }
    })();
    let _ = u.unregister(addr, len);
    res
}

pub(super) fn uffd_wp_async() -> Outcome {
    let ps = page_size();
    let u = Userfaultfd::open().map_err(ctx("userfaultfd"))?;
    u.api(uffd::UFFD_FEATURE_PAGEFAULT_FLAG_WP | uffd::UFFD_FEATURE_WP_ASYNC)
        .map_err(ctx("UFFDIO_API with UFFD_FEATURE_WP_ASYNC"))?;
    let mut buf = anon(4 * ps)?;
    buf.fill(1);
    let addr = buf.as_ptr() as u64;
    let len = 4 * ps as u64;
    u.register(addr, len, uffd::UFFDIO_REGISTER_MODE_WP)
        .map_err(ctx("UFFDIO_REGISTER wp"))?;
    let res = (|| {
        u.writeprotect(addr, len, true)
            .map_err(ctx("UFFDIO_WRITEPROTECT"))?;
        // Async mode: this write resolves itself instead of blocking.
        buf[ps] = 2;
        let pm = File::open("/proc/self/pagemap").map_err(ctx("/proc/self/pagemap"))?;
        let scan = |flags| {
            scan_once(&pm, addr, addr + len, category::WRITTEN, flags)
                .map_err(errno_ctx("ioctl PAGEMAP_SCAN"))
        };
        let written = scan(pagemap::flags::CHECK_WPASYNC | pagemap::flags::WP_MATCHING)?;
        let again = scan(pagemap::flags::CHECK_WPASYNC)?;
        let got: Vec<(u64, u64)> = written
            .iter()
            .map(|r| ((r.start - addr) / ps as u64, (r.end - addr) / ps as u64))
            .collect();
        if got == [(1, 2)] && again.is_empty() {
            Ok("PAGEMAP_SCAN saw exactly the written page, and re-protected it".to_string())
        } else {
            Err(format!(
                "written pages {got:?} (expected [(1, 2)]); after re-protect {} regions",
                again.len()
            ))
        }
    })();
    let _ = u.writeprotect(addr, len, false);
    let _ = u.unregister(addr, len);
    res
}

pub(super) fn memfd() -> Outcome {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"ckpt-probe",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(ctx("memfd_create"))?;
    let f = File::from(fd);
    f.write_all_at(&[7u8; 4096], 0).map_err(ctx("write"))?;
    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    fcntl(&f, FcntlArg::F_ADD_SEALS(seals)).map_err(ctx("F_ADD_SEALS"))?;
    let got = fcntl(&f, FcntlArg::F_GET_SEALS).map_err(ctx("F_GET_SEALS"))?;
    match f.write_at(&[1], 0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        other => {
            return Err(format!(
                "write to a sealed memfd: {other:?}, expected EPERM"
            ))
        }
    }
    if got & seals.bits() != seals.bits() {
        return Err(format!("F_GET_SEALS returned {got:#x}"));
    }
    Ok(format!("created, sealed (seals {got:#x}), writes refused"))
}

/// Fields 26.. of /proc/PID/stat that PR_SET_MM_MAP needs, by 1-based number.
fn stat_fields(stat: &str) -> Result<Vec<u64>, String> {
    let rest = stat.rsplit_once(')').ok_or("malformed stat")?.1;
    // rest starts at field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |n: usize| -> Result<u64, String> {
        f.get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("stat field {n} missing"))
    };
    [26, 27, 28, 45, 46, 47, 48, 49, 50, 51]
        .iter()
        .map(|&n| get(n))
        .collect()
}

pub(super) fn prctl_mm_map() -> Outcome {
    let mut c = fork_child(|io| {
        let brk = probe::current_brk();
        io.report(0, NOERR, &[brk]);
        let mut raw = [0u8; std::mem::size_of::<PrctlMmMap>()];
        let mut auxv = [0u8; 1024];
        if !io.recv_exact(&mut raw) || !io.recv_exact(&mut auxv) {
            return 1;
        }
        let size = match probe::prctl_mm_map_size() {
            Ok(s) => s,
            Err(e) => return io.report(2, e, &[]),
        };
        if size as usize != raw.len() {
            return io.report(3, NOERR, &[u64::from(size)]);
        }
        let mut map = PrctlMmMap::from_bytes(&raw);
        map.auxv = auxv.as_ptr() as u64;
        match probe::prctl_set_mm_map(&map) {
            Ok(()) => io.report(0, NOERR, &[u64::from(size)]),
            Err(e) => io.report(4, e, &[]),
        }
    })
    .map_err(ctx("fork"))?;
    let first = c.report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    let pid = c.pid();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(ctx("read stat"))?;
    let v = stat_fields(&stat)?;
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).map_err(ctx("read auxv"))?;
    if auxv.len() > 1024 {
        return Err(format!(
            "auxv of {} bytes is larger than expected",
            auxv.len()
        ));
    }
    let map = PrctlMmMap {
        start_code: v[0],
        end_code: v[1],
        start_stack: v[2],
        start_data: v[3],
        end_data: v[4],
        start_brk: v[5],
        brk: first.vals[0],
        arg_start: v[6],
        arg_end: v[7],
        env_start: v[8],
        env_end: v[9],
        auxv: 0,
        auxv_size: auxv.len() as u32,
        exe_fd: u32::MAX,
    };
    let mut padded = [0u8; 1024];
    padded[..auxv.len()].copy_from_slice(&auxv);
    c.send(map.as_bytes()).map_err(|e| e.to_string())?;
    c.send(&padded).map_err(|e| e.to_string())?;
    let r = c.final_report(CHILD_TIMEOUT).map_err(|e| e.to_string())?;
    match r.step {
        0 => Ok(format!(
            "PR_SET_MM_MAP_SIZE = {}; PR_SET_MM_MAP with the child's own values succeeded",
            r.vals[0]
        )),
        2 => Err(format!("PR_SET_MM_MAP_SIZE: {}", r.errno)),
        3 => Err(format!(
            "kernel expects struct prctl_mm_map of {} bytes, we have {}",
            r.vals[0],
            std::mem::size_of::<PrctlMmMap>()
        )),
        4 => Err(format!("PR_SET_MM_MAP: {}", r.errno)),
        s => Err(format!("child failed at step {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_comm_with_spaces() {
        let mut s = String::from("42 (a b) c) S");
        for n in 4..=52 {
            s += &format!(" {n}");
        }
        assert_eq!(
            stat_fields(&s).unwrap(),
            [26, 27, 28, 45, 46, 47, 48, 49, 50, 51]
        );
    }
}
