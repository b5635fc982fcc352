//! A process's address space: dump and restore of its mappings, their
//! protections and advice, guard regions, the vdso, and the mm fields
//! (`MmImage`, mm.proto). Page contents go through `pages`.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;

use ckpt_proto::image::{MmFields, MmImage, PageRange, Vma, VmaKind};

use crate::error::{Error, Result};
use crate::inject::{read_mem, Remote, Scratch};
use crate::pages::Extent;
use crate::proc::{self, MapEntry};
use crate::sys::pagemap::{self, category, ScanQuery};

/// Advice bits kept in `Vma.madv`, as VmFlags shows them.
pub mod madv {
    pub const DONTFORK: u32 = 1 << 0;
    pub const WIPEONFORK: u32 = 1 << 1;
    pub const DONTDUMP: u32 = 1 << 2;
    pub const HUGEPAGE: u32 = 1 << 3;
    pub const NOHUGEPAGE: u32 = 1 << 4;
    pub const MERGEABLE: u32 = 1 << 5;
}

const MADV_GUARD_INSTALL: u64 = 102;
const PAGE: u64 = 4096;

/// (VmFlags token, our bit, the madvise(2) advice that sets it).
const ADVICE: [(&str, u32, i32); 6] = [
    ("dc", madv::DONTFORK, libc::MADV_DONTFORK),
    ("wf", madv::WIPEONFORK, libc::MADV_WIPEONFORK),
    ("dd", madv::DONTDUMP, libc::MADV_DONTDUMP),
    ("hg", madv::HUGEPAGE, libc::MADV_HUGEPAGE),
    ("nh", madv::NOHUGEPAGE, libc::MADV_NOHUGEPAGE),
    ("mg", madv::MERGEABLE, libc::MADV_MERGEABLE),
];

/// The `madv` bits of the advice mapping `m`'s VmFlags record.
fn advice_bits(m: &MapEntry) -> u32 {
    ADVICE
        .iter()
        .filter(|(tok, _, _)| m.has_flag(tok))
        .fold(0, |bits, (_, bit, _)| bits | bit)
}

fn special_kind(path: &str) -> Option<VmaKind> {
    Some(match path {
        "[vdso]" => VmaKind::VmaVdso,
        "[vvar]" => VmaKind::VmaVvar,
        "[vvar_vclock]" => VmaKind::VmaVvarVclock,
        "[vsyscall]" => VmaKind::VmaVsyscall,
        _ => return None,
    })
}

/// Whether a mapping is one of the kernel's special mappings (vdso and co).
pub fn is_special(kind: VmaKind) -> bool {
    matches!(
        kind,
        VmaKind::VmaVdso | VmaKind::VmaVvar | VmaKind::VmaVvarVclock | VmaKind::VmaVsyscall
    )
}

fn classify(pid: i32, m: &MapEntry) -> Result<VmaKind> {
    let unsupported = |what: &str| Error::UnsupportedVma {
        pid,
        start: m.start,
        end: m.end,
        what: format!(
            "{what}: {}",
            if m.path.is_empty() {
                "anonymous"
            } else {
                &m.path
            }
        ),
    };
    if let Some(k) = special_kind(&m.path) {
        return Ok(k);
    }
    if m.has_flag("io") || m.has_flag("pf") {
        return Err(unsupported("device (I/O or PFN) mapping"));
    }
    let deleted = m.path.ends_with(" (deleted)");
    if m.shared() {
        if m.path.starts_with("/dev/zero") {
            return Ok(VmaKind::VmaAnonShared);
        }
        if m.path.starts_with("/SYSV") {
            return Ok(VmaKind::VmaSysvShm);
        }
        if m.path.starts_with("/memfd:") {
            return Ok(VmaKind::VmaMemfdShared);
        }
        if deleted || m.inode == 0 {
            return Err(unsupported("shared mapping of a deleted file"));
        }
        return Ok(VmaKind::VmaFileShared);
    }
    if m.inode != 0 {
        if deleted {
            return Err(unsupported("private mapping of a deleted file"));
        }
        if !m.path.starts_with('/') {
            return Err(unsupported("file mapping without a path"));
        }
        return Ok(VmaKind::VmaFilePrivate);
    }
    Ok(VmaKind::VmaAnonPrivate)
}

/// Whether a fork gives the child a copy-on-write copy of mapping `m` as
/// it is now: private memory, unless excluded from forks (MADV_DONTFORK,
/// MADV_WIPEONFORK), hugetlb (whose copy can fail and unmap it in the
/// child), or registered with a userfaultfd of the process (whose monitor
/// would hear of the fork), other than the agent's own write tracker
/// (`tracked`), which does not ask to hear of forks.
fn copied_on_fork(kind: VmaKind, m: &MapEntry, tracked: bool) -> bool {
    matches!(kind, VmaKind::VmaAnonPrivate | VmaKind::VmaFilePrivate)
        && !["dc", "wf", "ht", "um", "ui"].iter().any(|f| m.has_flag(f))
        && (tracked || !m.has_flag("uw"))
}

/// Flags a snapshot child does not inherit: mlock (VM_LOCKED_MASK is
/// cleared by fork) and userfaultfd registrations (cleared unless their
/// monitor asked to hear of forks), and soft-dirty.
pub const NOT_INHERITED: [&str; 6] = ["lo", "lf", "um", "uw", "ui", "sd"];

/// Userfaultfd registration flags, kept from the read ahead when checked
/// against the process itself: the dump registers its own tracker while
/// frozen ("uw"), and a registration made by a monitor in between changes
/// nothing in what the pages are (only the image's flags miss it).
pub const UFFD_FLAGS: [&str; 3] = ["um", "uw", "ui"];

/// Makes the flags of `image` (read before the freeze) those of `actual`
/// (smaps of the process frozen, or of its snapshot child, which has them
/// as they were at the fork), keeping the image's `keep` flags. Mappings
/// of the image missing from `actual` are allowed only as `missing_ok`
/// says (a snapshot child has no MADV_DONTFORK mapping). A change that
/// decided how a mapping's pages were copied (the copy then read the wrong
/// source) is refused: the dump must be made again.
pub fn reconcile_flags(
    pid: i32,
    image: &mut MmImage,
    actual: &[MapEntry],
    keep: &[&str],
    missing_ok: impl Fn(&Vma) -> bool,
) -> Result<()> {
    for v in &mut image.vmas {
        let Some(a) = actual.iter().find(|a| a.start == v.start && a.end == v.end) else {
            if missing_ok(v) {
                continue;
            }
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "its mapping at {:#x}-{:#x} changed as the dump began; dump again",
                    v.start, v.end
                ),
            });
        };
        let mut flags: Vec<String> = a
            .vm_flags
            .iter()
            .filter(|f| !keep.contains(&f.as_str()))
            .cloned()
            .collect();
        flags.extend(
            v.vm_flags
                .iter()
                .filter(|f| keep.contains(&f.as_str()))
                .cloned(),
        );
        let same = |a: &[String], b: &[String]| {
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort();
            b.sort();
            a == b
        };
        if same(&flags, &v.vm_flags) {
            continue;
        }
        let kind = VmaKind::try_from(v.kind).unwrap_or(VmaKind::VmaAnonPrivate);
        let entry = |f: &[String]| MapEntry {
            vm_flags: f.to_vec(),
            ..a.clone()
        };
        let decides = ["io", "pf", "ht"];
        // "uw" is the same on both sides (kept); counted as the agent's
        // tracker, so that the other flags decide (a tracked mapping is
        // copied from the child too).
        if copied_on_fork(kind, &entry(&v.vm_flags), true)
            != copied_on_fork(kind, &entry(&flags), true)
            || decides
                .iter()
                .any(|d| entry(&v.vm_flags).has_flag(d) != entry(&flags).has_flag(d))
        {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "the flags of its mapping at {:#x}-{:#x} changed as the dump began \
                     ({} -> {}); dump again",
                    v.start,
                    v.end,
                    v.vm_flags.join(" "),
                    flags.join(" ")
                ),
            });
        }
        tracing::debug!(
            pid,
            start = v.start,
            "mapping flags changed before the freeze"
        );
        let e = entry(&flags);
        v.madv = advice_bits(&e);
        v.growsdown = e.has_flag("gd");
        v.vm_flags = flags;
    }
    Ok(())
}

/// Whether the write tracker can follow mapping `m`: private memory
/// (shared memory is saved whole each time), not hugetlb, not registered
/// with another userfaultfd.
fn trackable(kind: VmaKind, m: &MapEntry) -> bool {
    matches!(kind, VmaKind::VmaAnonPrivate | VmaKind::VmaFilePrivate)
        && !["ht", "um", "ui"].iter().any(|f| m.has_flag(f))
}

/// The write tracker an address space dump reads and resets.
pub struct Track<'a> {
    pub tracker: &'a crate::track::Tracker,
    /// The tracker was last reset by the dump this one is an increment
    /// of: pages it finds unwritten can stay in that parent.
    pub since_parent: bool,
}

/// What the dump of an address space produced: its image and the memory
/// ranges whose content must go to the page store.
pub struct MmDump {
    pub image: MmImage,
    pub extents: Vec<Extent>,
    /// Ranges with content unchanged since the parent checkpoint, sorted.
    pub in_parent: Vec<(u64, u64)>,
}

impl MmDump {
    /// Bytes of content in copy-on-write memory (what a snapshot holds).
    pub fn cow_bytes(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.cow)
            .map(|e| e.end - e.start)
            .sum()
    }
}

fn file_ident(path: &str) -> (u64, u64) {
    std::fs::metadata(path)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
        .unwrap_or((0, 0))
}

/// How a process of the restored job opens the object mapped at `v` of
/// process `pid` (a PID as the job sees it).
pub fn map_files(pid: i32, v: &Vma) -> String {
    format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end)
}

/// Saves the whole content of the memfd mapped at `m`, once per object.
fn save_memfd(
    pid: i32,
    m: &proc::MapEntry,
    writer: Option<&crate::images::ImageWriter>,
) -> Result<String> {
    let writer = writer.ok_or_else(|| Error::UnsupportedVma {
        pid,
        start: m.start,
        end: m.end,
        what: format!("shared memfd mapping {} (needs an image writer)", m.path),
    })?;
    let name = format!("memfd-{}.img", m.inode);
    let out = writer.dir().join(&name);
    if out.exists() {
        return Ok(name);
    }
    let src = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let mut from = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
    let mut to = std::fs::File::create(&out).map_err(|e| Error::io(&out, e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| Error::io(&out, e))?;
    writer.add_raw(&name)?;
    Ok(name)
}

/// Maps the memfd of `v`: the object another process (or descriptor)
/// already recreated, or a new memfd with the saved content.
fn map_memfd(
    img: &MmImage,
    v: &Vma,
    remote: &Remote,
    scratch: &mut Scratch,
    shm: &mut HashMap<u64, String>,
    dir: &Path,
) -> Result<()> {
    let pid = remote.tid.as_raw();
    let fd = match shm.get(&v.shmid) {
        Some(path) => {
            scratch.reset();
            let p = scratch.put_cstr(path)?;
            let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
            remote.syscall(libc::SYS_openat, &[libc::AT_FDCWD as u64, p, flags, 0])?
        }
        None => {
            scratch.reset();
            let name = v
                .path
                .trim_start_matches("/memfd:")
                .trim_end_matches(" (deleted)");
            let np = scratch.put_cstr(name)?;
            // Sealing allowed: a descriptor of this object may add seals.
            const MFD_ALLOW_SEALING: u64 = 2;
            let fd = remote.syscall(
                libc::SYS_memfd_create,
                &[np, MFD_ALLOW_SEALING | libc::MFD_CLOEXEC as u64],
            )?;
            let pidfd =
                crate::sys::pidfd::pidfd_open(pid).map_err(|e| Error::sys(pid, "pidfd_open", e))?;
            let ours = crate::sys::pidfd::pidfd_getfd(pidfd.as_fd(), fd as i32)
                .map_err(|e| Error::sys(pid, "pidfd_getfd (memfd)", e))?;
            let mut to = std::fs::File::from(ours);
            let path = dir.join(&v.ghost);
            let mut from = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            std::io::copy(&mut from, &mut to).map_err(|e| Error::sys(pid, "filling a memfd", e))?;
            shm.insert(v.shmid, map_files(img.pid, v));
            fd
        }
    };
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_SHARED | libc::MAP_FIXED) as u64;
    let r = remote.syscall(
        libc::SYS_mmap,
        &[v.start, v.end - v.start, prot, flags, fd, v.pgoff],
    );
    remote.syscall(libc::SYS_close, &[fd])?;
    r.map(|_| ())
}

/// Reads the mappings of stopped process `pid` and finds the pages to save:
/// present anonymous pages (not the shared zero page) and, in private file
/// mappings, only pages the process changed.
///
/// `skip` is the agent's own scratch mapping in the task, left out.
///
/// With a `writer`, the whole content of each memfd mapped shared is saved
/// once per object; without one such mappings are refused.
///
/// `read_ahead`: the mappings with their flags as read before the process
/// stopped, its layout checked since (see [`reconcile_flags`]); else
/// smaps is read now.
pub fn dump(
    pid: i32,
    brk: u64,
    skip: Option<(u64, u64)>,
    writer: Option<&crate::images::ImageWriter>,
    track: Option<&Track<'_>>,
    read_ahead: Option<Vec<MapEntry>>,
) -> Result<MmDump> {
    let t0 = std::time::Instant::now();
    let mut maps = match read_ahead {
        Some(m) => m,
        None => proc::smaps(pid)?,
    };
    tracing::debug!(pid, ms = t0.elapsed().as_secs_f64() * 1e3, "smaps read");
    maps.retain(|m| Some((m.start, m.end)) != skip);
    let pm_path = format!("/proc/{pid}/pagemap");
    let pm = std::fs::File::open(&pm_path).map_err(|e| Error::io(&pm_path, e))?;
    let mut vmas = Vec::with_capacity(maps.len());
    let mut extents: Vec<Extent> = Vec::new();
    let mut in_parent: Vec<(u64, u64)> = Vec::new();
    let mut regions = Vec::new();
    for m in &maps {
        let kind = classify(pid, m)?;
        let madv = advice_bits(m);
        let mut guards = Vec::new();
        // Tracked already ("uw": registered by a previous dump), or from
        // now on. A mapping registered only now may carry stale marks (a
        // mremap drops the registration, not the marks): none of its pages
        // can stay in the parent.
        let (tracked, since_parent) = match track {
            Some(t) if trackable(kind, m) => {
                let before = m.has_flag("uw");
                let now = before
                    || t.tracker
                        .register(m.start, m.end)
                        .map_err(|e| tracing::debug!(pid, start = m.start, "not tracked: {e}"))
                        .is_ok();
                (now, before && t.since_parent)
            }
            _ => (false, false),
        };
        if !is_special(kind) {
            // One walk of the page tables: what is present, swapped,
            // zero, file-backed or a guard marker (a swap-like entry,
            // never content); in a tracked mapping also what was written
            // since the last reset, which the same walk resets.
            regions.clear();
            let seen = category::PRESENT | category::SWAPPED | category::GUARD;
            let (flags, written) = match tracked {
                true => (
                    pagemap::flags::WP_MATCHING | pagemap::flags::CHECK_WPASYNC,
                    category::WRITTEN,
                ),
                false => (0, 0),
            };
            // Asking whether a page is file-backed makes the kernel look at
            // the struct page of every present page (a cache miss each):
            // only private file mappings hold both kinds.
            let file = match kind {
                VmaKind::VmaFilePrivate => category::FILE,
                _ => 0,
            };
            pagemap::scan(
                pm.as_fd(),
                m.start,
                m.end,
                ScanQuery {
                    anyof: seen,
                    returned: seen | category::PFNZERO | file | written,
                    ..Default::default()
                },
                flags,
                &mut regions,
            )
            .map_err(|e| Error::sys(pid, format!("PAGEMAP_SCAN {:#x}-{:#x}", m.start, m.end), e))?;
            let has = |r: &pagemap::PageRegion, c: u64| r.categories & c != 0;
            guards.extend(
                regions
                    .iter()
                    .filter(|r| has(r, category::GUARD))
                    .map(|r| PageRange {
                        start: r.start,
                        end: r.end,
                    }),
            );
            // Anonymous pages with content (not the shared zero page); in
            // private file mappings, only pages the process changed.
            let content = |r: &pagemap::PageRegion| match kind {
                VmaKind::VmaAnonPrivate | VmaKind::VmaAnonShared => {
                    !has(r, category::PFNZERO | category::GUARD)
                }
                VmaKind::VmaFilePrivate => {
                    !has(r, category::PFNZERO | category::GUARD | category::FILE)
                }
                _ => false,
            };
            let cow = copied_on_fork(kind, m, tracked);
            for r in regions.iter().filter(|r| content(r)) {
                // In a file mapping, a private page zapped since (by
                // MADV_DONTNEED or reclaim) leaves a write-protect marker
                // that reads as swapped and unwritten, while the process
                // sees the file again: only present pages can stay.
                let unchanged = !has(r, category::WRITTEN)
                    && (kind == VmaKind::VmaAnonPrivate || has(r, category::PRESENT));
                if since_parent && unchanged {
                    match in_parent.last_mut() {
                        Some(last) if last.1 == r.start => last.1 = r.end,
                        _ => in_parent.push((r.start, r.end)),
                    }
                    continue;
                }
                match extents.last_mut() {
                    Some(e) if e.end == r.start && e.cow == cow => e.end = r.end,
                    _ => extents.push(Extent {
                        start: r.start,
                        end: r.end,
                        cow,
                    }),
                }
            }
        }
        let (dev, ino) = if kind == VmaKind::VmaFilePrivate || kind == VmaKind::VmaFileShared {
            file_ident(&m.path)
        } else {
            (0, 0)
        };
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            kind: kind as i32,
            path: m.path.clone(),
            pgoff: m.offset,
            dev,
            ino,
            growsdown: m.has_flag("gd"),
            madv,
            vm_flags: m.vm_flags.clone(),
            guards,
            // The shmem object's inode: the same in every sharer. For SysV
            // shm the kernel makes the inode number the segment id.
            shmid: if matches!(
                kind,
                VmaKind::VmaAnonShared | VmaKind::VmaSysvShm | VmaKind::VmaMemfdShared
            ) {
                m.inode
            } else {
                0
            },
            ghost: if kind == VmaKind::VmaMemfdShared {
                save_memfd(pid, m, writer)?
            } else {
                String::new()
            },
        });
    }
    tracing::debug!(pid, ms = t0.elapsed().as_secs_f64() * 1e3, "pages scanned");
    check_sysv_attachments(pid, &vmas)?;
    let stat = proc::stat(pid, None)?;
    let auxv_raw = std::fs::read(format!("/proc/{pid}/auxv"))
        .map_err(|e| Error::io(format!("/proc/{pid}/auxv"), e))?;
    let auxv = auxv_raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let exe_path = proc::readlink(pid, "exe")?;
    if exe_path.ends_with(" (deleted)") {
        return Err(Error::Refused {
            pid,
            reason: format!("its executable {exe_path} was deleted; not supported yet"),
        });
    }
    let (exe_dev, exe_ino) = file_ident(&exe_path);
    let fields = MmFields {
        start_code: stat.field(26),
        end_code: stat.field(27),
        start_stack: stat.field(28),
        start_data: stat.field(45),
        end_data: stat.field(46),
        start_brk: stat.field(47),
        brk,
        arg_start: stat.field(48),
        arg_end: stat.field(49),
        env_start: stat.field(50),
        env_end: stat.field(51),
        auxv,
        exe_path,
        exe_dev,
        exe_ino,
    };
    Ok(MmDump {
        image: MmImage {
            pid,
            fields: Some(fields),
            vmas,
        },
        extents,
        in_parent,
    })
}

/// The vdso-related areas of an address space as (name, start, size).
fn vdso_areas<'a>(vmas: impl Iterator<Item = (&'a str, u64, u64)>) -> Vec<(String, u64, u64)> {
    let mut v: Vec<(String, u64, u64)> = vmas
        .filter(|(p, _, _)| matches!(*p, "[vdso]" | "[vvar]" | "[vvar_vclock]"))
        .map(|(p, s, e)| (p.to_string(), s, e - s))
        .collect();
    v.sort_by_key(|a| a.1);
    v
}

/// The vdso layout as names, sizes and offsets from the first area, for
/// comparing two address spaces.
fn layout(areas: &[(String, u64, u64)]) -> Vec<(String, u64, i64)> {
    let base = areas.first().map_or(0, |a| a.1);
    areas
        .iter()
        .map(|(n, s, len)| (n.clone(), *len, *s as i64 - base as i64))
        .collect()
}

/// Picks a free, page-aligned range of `size` bytes that overlaps none of
/// `busy`, high in the address space (where nothing is usually mapped
/// below the stack).
pub fn find_gap(busy: &[(u64, u64)], size: u64) -> Option<u64> {
    let mut b: Vec<(u64, u64)> = busy.to_vec();
    b.sort_unstable();
    let top = 0x7ff0_0000_0000u64;
    let mut hi = top;
    for &(s, e) in b.iter().rev() {
        if s >= hi {
            hi = hi.min(s);
            continue;
        }
        if e <= hi && hi - e >= size + 2 * PAGE {
            return Some((hi - size - PAGE) & !(PAGE - 1));
        }
        hi = hi.min(s);
    }
    (hi > size + 0x100_0000).then(|| (hi - size - PAGE) & !(PAGE - 1))
}

/// Clears the restoring child's address space, inherited from the agent,
/// keeping only the scratch area and its vdso, which it moves to where the
/// image had it (refusing when this kernel's vdso layout differs).
pub fn prepare_address_space(
    img: &MmImage,
    child: i32,
    remote: &Remote,
    keep: (u64, u64),
    scratch: &mut Scratch,
) -> Result<()> {
    let cur = proc::maps(child)?;
    let mine = vdso_areas(cur.iter().map(|m| (m.path.as_str(), m.start, m.end)));
    let theirs = vdso_areas(img.vmas.iter().map(|v| (v.path.as_str(), v.start, v.end)));
    // The agent's mappings the child inherited, in one batch (run from the
    // kept scratch area, which holds the batch loop).
    let mut unmaps: Vec<(i64, Vec<u64>)> = cur
        .iter()
        .filter(|m| special_kind(&m.path).is_none() && (m.start, m.end) != keep)
        .map(|m| (libc::SYS_munmap, vec![m.start, m.end - m.start]))
        .collect();
    if theirs.is_empty() {
        unmaps.extend(
            mine.iter()
                .map(|(_, s, len)| (libc::SYS_munmap, vec![*s, *len])),
        );
    }
    remote.syscalls(scratch, &unmaps)?;
    scratch.reset();
    if theirs.is_empty() {
        return Ok(());
    }
    if layout(&mine) != layout(&theirs) {
        return Err(Error::Incompatible(format!(
            "the vdso layout of this node {:?} differs from the checkpoint's {:?}",
            layout(&mine),
            layout(&theirs)
        )));
    }
    if mine.first().map(|a| a.1) == theirs.first().map(|a| a.1) {
        return Ok(());
    }
    // Move through a temporary place so no area lands on another one.
    let mut busy: Vec<(u64, u64)> = img.vmas.iter().map(|v| (v.start, v.end)).collect();
    busy.extend(mine.iter().map(|(_, s, l)| (*s, s + l)));
    busy.push(keep);
    let total = theirs.last().map(|a| a.1 + a.2).unwrap_or(0) - theirs[0].1;
    let tmp = find_gap(&busy, total).ok_or_else(|| Error::Refused {
        pid: child,
        reason: "no room to move the vdso".into(),
    })?;
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    let base = mine[0].1;
    for (_, s, len) in &mine {
        remote.syscall(libc::SYS_mremap, &[*s, *len, *len, flags, tmp + (s - base)])?;
    }
    for ((_, s, len), (_, dst, _)) in mine.iter().zip(&theirs) {
        remote.syscall(
            libc::SYS_mremap,
            &[tmp + (s - base), *len, *len, flags, *dst],
        )?;
    }
    Ok(())
}

/// Sets the mm fields and the exe link with one PR_SET_MM_MAP.
pub fn restore_fields(img: &MmImage, remote: &Remote, scratch: &mut Scratch) -> Result<()> {
    let f = img.fields.as_ref().ok_or_else(|| Error::Refused {
        pid: img.pid,
        reason: "mm image has no fields".into(),
    })?;
    scratch.reset();
    let path = scratch.put_cstr(&f.exe_path)?;
    let fd = remote.syscall(
        libc::SYS_openat,
        &[
            libc::AT_FDCWD as u64,
            path,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            0,
        ],
    )?;
    let auxv: Vec<u8> = f.auxv.iter().flat_map(|v| v.to_le_bytes()).collect();
    let auxv_p = scratch.put(&auxv)?;
    let mut map = Vec::with_capacity(104);
    for v in [
        f.start_code,
        f.end_code,
        f.start_data,
        f.end_data,
        f.start_brk,
        f.brk,
        f.start_stack,
        f.arg_start,
        f.arg_end,
        f.env_start,
        f.env_end,
        auxv_p,
    ] {
        map.extend_from_slice(&v.to_le_bytes());
    }
    map.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    map.extend_from_slice(&(fd as u32).to_le_bytes());
    let map_p = scratch.put(&map)?;
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    let r = remote.syscall(
        libc::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, map_p, map.len() as u64, 0],
    );
    remote.syscall(libc::SYS_close, &[fd])?;
    r.map(|_| ())
}

/// Creates every mapping of the image (writable for now, so that pages can
/// be filled in), leaving the special ones alone.
///
/// `shm` maps the shared anonymous objects already recreated (by earlier
/// processes of the checkpoint) to where they are mapped; a process that
/// shares one maps that same object, so the sharing survives.
pub fn restore_mappings(
    img: &MmImage,
    remote: &Remote,
    scratch: &mut Scratch,
    shm: &mut HashMap<u64, String>,
    dir: &Path,
) -> Result<()> {
    let mut fds: HashMap<(String, bool), u64> = HashMap::new();
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let result = (|| -> Result<()> {
        for v in &img.vmas {
            let kind = VmaKind::try_from(v.kind).unwrap_or(VmaKind::VmaAnonPrivate);
            let len = v.end - v.start;
            let grows = if v.growsdown { libc::MAP_GROWSDOWN } else { 0 };
            let fixed = libc::MAP_FIXED;
            match kind {
                VmaKind::VmaAnonPrivate => {
                    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed | grows;
                    remote.syscall(
                        libc::SYS_mmap,
                        &[v.start, len, rw, flags as u64, u64::MAX, 0],
                    )?;
                }
                VmaKind::VmaMemfdShared => {
                    map_memfd(img, v, remote, scratch, shm, dir)?;
                }
                VmaKind::VmaAnonShared => match shm.get(&v.shmid) {
                    // Another process of the checkpoint recreated this
                    // object: map the very same one, through its map_files.
                    Some(path) => {
                        scratch.reset();
                        let p = scratch.put_cstr(path)?;
                        let fd = remote.syscall(
                            libc::SYS_openat,
                            &[
                                libc::AT_FDCWD as u64,
                                p,
                                (libc::O_RDWR | libc::O_CLOEXEC) as u64,
                                0,
                            ],
                        )?;
                        let r = remote.syscall(
                            libc::SYS_mmap,
                            &[
                                v.start,
                                len,
                                rw,
                                (libc::MAP_SHARED | fixed) as u64,
                                fd,
                                v.pgoff,
                            ],
                        );
                        remote.syscall(libc::SYS_close, &[fd])?;
                        r?;
                    }
                    None => {
                        let flags = libc::MAP_SHARED | libc::MAP_ANONYMOUS | fixed;
                        remote.syscall(
                            libc::SYS_mmap,
                            &[v.start, len, rw, flags as u64, u64::MAX, 0],
                        )?;
                        if v.shmid != 0 {
                            shm.insert(v.shmid, map_files(img.pid, v));
                        }
                    }
                },
                VmaKind::VmaSysvShm => attach_sysv(img, v, remote)?,
                VmaKind::VmaFilePrivate | VmaKind::VmaFileShared => {
                    let shared = kind == VmaKind::VmaFileShared;
                    let writable = shared && v.vm_flags.iter().any(|f| f == "mw");
                    let key = (v.path.clone(), writable);
                    let fd = match fds.get(&key) {
                        Some(fd) => *fd,
                        None => {
                            scratch.reset();
                            let p = scratch.put_cstr(&v.path)?;
                            let mode = if writable {
                                libc::O_RDWR
                            } else {
                                libc::O_RDONLY
                            };
                            let fd = remote
                                .syscall(
                                    libc::SYS_openat,
                                    &[libc::AT_FDCWD as u64, p, (mode | libc::O_CLOEXEC) as u64, 0],
                                )
                                .map_err(|e| Error::Refused {
                                    pid: img.pid,
                                    reason: format!(
                                        "cannot open {} to map it at {:#x}: {e}",
                                        v.path, v.start
                                    ),
                                })?;
                            fds.insert(key, fd);
                            fd
                        }
                    };
                    let (prot, share) = if shared {
                        (v.prot as u64, libc::MAP_SHARED)
                    } else {
                        (rw | v.prot as u64, libc::MAP_PRIVATE)
                    };
                    remote.syscall(
                        libc::SYS_mmap,
                        &[
                            v.start,
                            len,
                            prot,
                            (share | fixed | grows) as u64,
                            fd,
                            v.pgoff,
                        ],
                    )?;
                }
                _ => {}
            }
        }
        Ok(())
    })();
    for fd in fds.values() {
        remote.syscall(libc::SYS_close, &[*fd])?;
    }
    result
}

/// One SysV shm attachment: the contiguous mappings of one segment, the
/// first at offset 0 (mprotect or madvise may split an attachment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SysvAttachment {
    shmid: u64,
    start: u64,
    end: u64,
    /// Attached read-write (VM_MAYWRITE), not SHM_RDONLY.
    writable: bool,
    exec: bool,
}

/// Groups the SysV shm mappings of an address space (sorted by address)
/// into attachments; refuses a mapping that does not continue one from
/// offset 0 (the head of the attachment was unmapped).
fn sysv_attachments(vmas: &[Vma]) -> std::result::Result<Vec<SysvAttachment>, String> {
    let mut out: Vec<SysvAttachment> = Vec::new();
    for v in vmas {
        if v.kind != VmaKind::VmaSysvShm as i32 {
            continue;
        }
        let writable =
            v.vm_flags.iter().any(|f| f == "mw") || v.prot & libc::PROT_WRITE as u32 != 0;
        let exec = v.prot & libc::PROT_EXEC as u32 != 0;
        match out.last_mut() {
            Some(a)
                if v.pgoff != 0
                    && a.shmid == v.shmid
                    && a.end == v.start
                    && v.pgoff == v.start - a.start =>
            {
                a.end = v.end;
                a.writable |= writable;
                a.exec |= exec;
            }
            _ if v.pgoff == 0 => out.push(SysvAttachment {
                shmid: v.shmid,
                start: v.start,
                end: v.end,
                writable,
                exec,
            }),
            _ => {
                return Err(format!(
                    "SysV shm id {} mapped at {:#x} from offset {:#x}, without the start of its attachment",
                    v.shmid, v.start, v.pgoff
                ))
            }
        }
    }
    Ok(out)
}

/// Refuses SysV shm attachments that restore cannot recreate with one
/// shmat: partly unmapped ones.
fn check_sysv_attachments(pid: i32, vmas: &[Vma]) -> Result<()> {
    let refuse = |start: u64, end: u64, what: String| Error::UnsupportedVma {
        pid,
        start,
        end,
        what,
    };
    let atts = sysv_attachments(vmas).map_err(|what| {
        let v = vmas
            .iter()
            .find(|v| v.kind == VmaKind::VmaSysvShm as i32)
            .map_or((0, 0), |v| (v.start, v.end));
        refuse(v.0, v.1, what)
    })?;
    for a in atts {
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", a.start, a.end);
        // The segment's size is the size of its shmem file.
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        let mapped = size.div_ceil(PAGE) * PAGE;
        if a.end - a.start != mapped {
            return Err(refuse(
                a.start,
                a.end,
                format!(
                    "SysV shm id {} of {size} bytes attached in part ({} bytes mapped)",
                    a.shmid,
                    a.end - a.start
                ),
            ));
        }
    }
    Ok(())
}

/// Attaches (injected shmat) the SysV segment of mapping `v` at its
/// address, in the task's IPC namespace, which must hold the restored
/// segments by now (`crate::ipc::restore`). The later mappings of the same
/// attachment are covered by this one.
fn attach_sysv(img: &MmImage, v: &Vma, remote: &Remote) -> Result<()> {
    let atts = sysv_attachments(&img.vmas).map_err(|reason| Error::Refused {
        pid: img.pid,
        reason,
    })?;
    let Some(a) = atts.iter().find(|a| a.start == v.start) else {
        return Ok(());
    };
    let mut flags = libc::SHM_REMAP;
    if !a.writable {
        flags |= libc::SHM_RDONLY;
    }
    if a.exec {
        flags |= libc::SHM_EXEC;
    }
    let at = remote
        .syscall(libc::SYS_shmat, &[a.shmid, a.start, flags as u64])
        .map_err(|e| Error::Refused {
            pid: img.pid,
            reason: format!(
                "cannot attach SysV shm id {} at {:#x}: {e}",
                a.shmid, a.start
            ),
        })?;
    if at != a.start {
        return Err(Error::Refused {
            pid: img.pid,
            reason: format!(
                "SysV shm id {} attached at {at:#x} instead of {:#x}",
                a.shmid, a.start
            ),
        });
    }
    Ok(())
}

/// Gives every mapping its final protection and advice, and reinstalls
/// guard regions, once its pages are in.
pub fn finish_mappings(img: &MmImage, remote: &Remote, scratch: &mut Scratch) -> Result<()> {
    let mut calls = Vec::new();
    for v in &img.vmas {
        let kind = VmaKind::try_from(v.kind).unwrap_or(VmaKind::VmaAnonPrivate);
        if is_special(kind) {
            continue;
        }
        let len = v.end - v.start;
        for (_, bit, advice) in ADVICE {
            if v.madv & bit != 0 {
                calls.push((libc::SYS_madvise, vec![v.start, len, advice as u64]));
            }
        }
        for g in &v.guards {
            calls.push((
                libc::SYS_madvise,
                vec![g.start, g.end - g.start, MADV_GUARD_INSTALL],
            ));
        }
        calls.push((libc::SYS_mprotect, vec![v.start, len, v.prot as u64]));
    }
    scratch.reset();
    remote.syscalls(scratch, &calls)?;
    scratch.reset();
    Ok(())
}

/// The private anonymous mappings that get pages from the page store, as
/// (start, end): restore fills them through userfaultfd.
pub fn anon_private_with_pages(img: &MmImage, pm: &ckpt_proto::image::PageMap) -> Vec<(u64, u64)> {
    let page = pm.page_size.max(1) as u64;
    img.vmas
        .iter()
        .filter(|v| v.kind == VmaKind::VmaAnonPrivate as i32)
        .filter(|v| {
            pm.runs
                .iter()
                .any(|r| r.vaddr < v.end && r.vaddr + r.nr_pages * page > v.start)
        })
        .map(|v| (v.start, v.end))
        .collect()
}

/// Reads the current program break of a stopped task (brk(0) inside it).
pub fn current_brk(remote: &Remote) -> Result<u64> {
    remote.syscall(libc::SYS_brk, &[0])
}

/// Finds a `syscall` instruction (bytes 0f 05) in the task's vdso, to make
/// it run injected system calls without writing to its code.
pub fn find_syscall_gadget(pid: i32) -> Result<u64> {
    let maps = proc::maps(pid)?;
    let candidates = maps.iter().filter(|m| m.path == "[vdso]").chain(
        maps.iter()
            .filter(|m| m.perms.starts_with("r-x") && m.path != "[vsyscall]"),
    );
    for m in candidates {
        let len = (m.end - m.start).min(1 << 20) as usize;
        let Ok(code) = read_mem(pid, m.start, len) else {
            continue;
        };
        if let Some(i) = code.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(m.start + i as u64);
        }
    }
    Err(Error::Refused {
        pid,
        reason: "no syscall instruction found in its vdso or code".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysv(start: u64, end: u64, shmid: u64, pgoff: u64, prot: i32) -> Vma {
        Vma {
            start,
            end,
            shmid,
            pgoff,
            prot: prot as u32,
            kind: VmaKind::VmaSysvShm as i32,
            ..Default::default()
        }
    }

    #[test]
    fn sysv_attachments_join_split_mappings() {
        let (r, rw) = (libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE);
        let anon = Vma {
            start: 0x9000,
            end: 0xa000,
            ..Default::default()
        };
        let vmas = [
            // One read-write attachment split in two by mprotect.
            sysv(0x1000, 0x3000, 7, 0, rw),
            sysv(0x3000, 0x4000, 7, 0x2000, r),
            // The same segment attached again, read-only, right after.
            sysv(0x4000, 0x7000, 7, 0, r),
            anon,
            sysv(0xa000, 0xb000, 9, 0, r),
        ];
        let a = sysv_attachments(&vmas).unwrap();
        assert_eq!(
            a,
            vec![
                SysvAttachment {
                    shmid: 7,
                    start: 0x1000,
                    end: 0x4000,
                    writable: true,
                    exec: false
                },
                SysvAttachment {
                    shmid: 7,
                    start: 0x4000,
                    end: 0x7000,
                    writable: false,
                    exec: false
                },
                SysvAttachment {
                    shmid: 9,
                    start: 0xa000,
                    end: 0xb000,
                    writable: false,
                    exec: false
                },
            ]
        );
        // mprotect to read-only keeps VM_MAYWRITE: still a writable attach.
        let mut ro = sysv(0x1000, 0x2000, 3, 0, r);
        ro.vm_flags = vec!["rd".into(), "sh".into(), "mr".into(), "mw".into()];
        assert!(sysv_attachments(&[ro]).unwrap()[0].writable);
    }

    #[test]
    fn sysv_attachment_without_its_head_is_refused() {
        let r = libc::PROT_READ;
        let err = sysv_attachments(&[sysv(0x2000, 0x3000, 7, 0x1000, r)]).unwrap_err();
        assert!(err.contains("id 7") && err.contains("0x2000"), "{err}");
        // Not contiguous with the attachment it would continue.
        let vmas = [
            sysv(0x1000, 0x2000, 7, 0, r),
            sysv(0x3000, 0x4000, 7, 0x2000, r),
        ];
        assert!(sysv_attachments(&vmas).is_err());
        // Another segment.
        let vmas = [
            sysv(0x1000, 0x2000, 7, 0, r),
            sysv(0x2000, 0x3000, 8, 0x1000, r),
        ];
        assert!(sysv_attachments(&vmas).is_err());
    }

    #[test]
    fn gap_avoids_busy_ranges() {
        let busy = [
            (0x7fef_ffff_0000, 0x7ff0_0000_0000),
            (0x7fef_fff0_0000, 0x7fef_fff8_0000),
        ];
        let g = find_gap(&busy, 0x10000).unwrap();
        for (s, e) in busy {
            assert!(
                g + 0x10000 <= s || g >= e,
                "gap {g:#x} overlaps {s:#x}-{e:#x}"
            );
        }
        assert_eq!(g % PAGE, 0);
    }

    #[test]
    fn vdso_layout_compares_relative_offsets() {
        let a = vdso_areas(
            [
                ("[vvar]", 0x1000u64, 0x5000u64),
                ("[vdso]", 0x7000, 0x9000),
                ("x", 0, 1),
            ]
            .into_iter(),
        );
        let b = vdso_areas(
            [
                ("[vdso]", 0x17000u64, 0x19000u64),
                ("[vvar]", 0x11000, 0x15000),
            ]
            .into_iter(),
        );
        assert_eq!(layout(&a), layout(&b));
        let c = vdso_areas(
            [
                ("[vdso]", 0x16000u64, 0x18000u64),
                ("[vvar]", 0x11000, 0x15000),
            ]
            .into_iter(),
        );
        assert_ne!(layout(&a), layout(&c));
    }

    #[test]
    fn flags_read_ahead_are_reconciled() {
        let vma = |start: u64, flags: &str| Vma {
            start,
            end: start + 0x1000,
            kind: VmaKind::VmaAnonPrivate as i32,
            vm_flags: flags.split_whitespace().map(String::from).collect(),
            ..Default::default()
        };
        let actual = |start: u64, flags: &str| MapEntry {
            start,
            end: start + 0x1000,
            perms: "rw-p".into(),
            vm_flags: flags.split_whitespace().map(String::from).collect(),
            ..Default::default()
        };
        let mut img = MmImage {
            vmas: vec![vma(0x1000, "rd wr lo"), vma(0x3000, "rd wr dc")],
            ..Default::default()
        };
        // The child: no mlock flag, no MADV_DONTFORK mapping, and a
        // MADV_HUGEPAGE given between the read and the freeze.
        let child = [actual(0x1000, "rd wr hg")];
        reconcile_flags(1, &mut img, &child, &NOT_INHERITED, |v| {
            v.vm_flags.iter().any(|f| f == "dc")
        })
        .unwrap();
        let mut f = img.vmas[0].vm_flags.clone();
        f.sort();
        assert_eq!(f, ["hg", "lo", "rd", "wr"]);
        assert_eq!(img.vmas[0].madv, madv::HUGEPAGE);
        // A mapping that lost its content in the child (MADV_WIPEONFORK
        // given late) was copied from the wrong source: refused.
        let mut img = MmImage {
            vmas: vec![vma(0x1000, "rd wr")],
            ..Default::default()
        };
        let e = reconcile_flags(1, &mut img, &[actual(0x1000, "rd wr wf")], &[], |_| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dump again"), "{e}");
        // The same for a mapping the dump's write tracker follows.
        let mut tracked = MmImage {
            vmas: vec![vma(0x1000, "rd wr uw")],
            ..Default::default()
        };
        let late = [actual(0x1000, "rd wr wf")];
        let e = reconcile_flags(1, &mut tracked, &late, &NOT_INHERITED, |_| false).unwrap_err();
        assert!(e.to_string().contains("dump again"), "{e}");
        // A mapping gone is refused unless allowed.
        let e = reconcile_flags(1, &mut img, &[], &[], |_| false).unwrap_err();
        assert!(e.to_string().contains("0x1000-0x2000"), "{e}");
    }
}
