//! Memory cases: heap, anonymous and file mappings, protections, guard
//! regions, growsdown, vdso, madvise flags and the mm fields.

use std::hint::black_box;
use std::os::fd::AsRawFd;

use crate::util::*;
use crate::Ctx;

/// brk grown with sbrk and filled; the break and the content must survive.
pub fn heap(ctx: &Ctx) -> CaseResult {
    // Give malloc's top chunk room first, so that nothing between recording
    // the break and the checkpoint makes glibc move it.
    drop(black_box(vec![1u8; 120_000]));
    let len = (1 << 20) + 3 * PAGE;
    // SAFETY: growing the break; the new range belongs to this case only.
    let p = unsafe { libc::sbrk(len as libc::intptr_t + 8) };
    if p as isize == -1 {
        return Err(os_err("sbrk"));
    }
    let p = ((p as usize + 7) & !7) as *mut u8;
    // SAFETY: p..p+len lies inside the range just added to the heap.
    unsafe { fill(p, len, 1) };
    let brk_before = unsafe { libc::sbrk(0) } as usize;
    let heap_before = maps_entry(p as usize).map(|m| m.path);

    ctx.ready_and_wait()?;

    let brk_after = unsafe { libc::sbrk(0) } as usize;
    let mut c = Check::new();
    c.eq("sbrk(0)", brk_before, brk_after);
    c.eq(
        "mapping of the sbrk area",
        heap_before,
        maps_entry(p as usize).map(|m| m.path),
    );
    c.res(check_range_mapped("heap", p as usize, len, "rw-p"));
    // SAFETY: still inside the heap (checked mapped above).
    c.res(unsafe { verify("heap", p, len, 1) });
    c.finish()
}

/// Several private anonymous mappings: full, sparse, zero-written,
/// populated-but-untouched, and one at a fixed address.
pub fn anon_mmap(ctx: &Ctx) -> CaseResult {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let full = mmap_anon(64 * PAGE, rw, 0)?;
    let sparse = mmap_anon(32 * PAGE, rw, 0)?;
    let zeroed = mmap_anon(16 * PAGE, rw, 0)?;
    let big = mmap_anon(1024 * PAGE, rw, 0)?;
    let populated = mmap_anon(8 * PAGE, rw, libc::MAP_POPULATE)?;
    let fixed_addr = 0x5a5a_0000_0000usize as *mut u8;
    let fixed = mmap_at(fixed_addr, 8 * PAGE, rw, libc::MAP_FIXED_NOREPLACE)?;
    if fixed != fixed_addr {
        return Err(format!("MAP_FIXED_NOREPLACE gave {fixed:p}"));
    }
    // SAFETY: all writes stay inside the mappings made above.
    unsafe {
        fill(full, 64 * PAGE, 10);
        for i in (1..32).step_by(2) {
            fill(sparse.add(i * PAGE), PAGE, 20 + i as u64);
        }
        std::ptr::write_bytes(zeroed, 0, 16 * PAGE);
        for i in [0, 511, 1023] {
            fill(big.add(i * PAGE), PAGE, 30 + i as u64);
        }
        fill(fixed, 8 * PAGE, 40);
    }

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    for (what, p, pages) in [
        ("full", full, 64),
        ("sparse", sparse, 32),
        ("zeroed", zeroed, 16),
        ("big", big, 1024),
        ("populated", populated, 8),
        ("fixed", fixed, 8),
    ] {
        c.res(check_range_mapped(what, p as usize, pages * PAGE, "rw-p"));
    }
    // Stop here if anything is unmapped: reading it would crash the checker.
    c.finish()?;
    let mut c = Check::new();
    // SAFETY: every range was just checked to be mapped read-write.
    unsafe {
        c.res(verify("full", full, 64 * PAGE, 10));
        for i in 0..32 {
            let page = sparse.add(i * PAGE);
            c.res(if i % 2 == 1 {
                verify("sparse touched page", page, PAGE, 20 + i as u64)
            } else {
                verify_zero("sparse untouched page", page, PAGE)
            });
        }
        c.res(verify_zero("zeroed", zeroed, 16 * PAGE));
        for i in 0..1024 {
            let page = big.add(i * PAGE);
            c.res(if [0, 511, 1023].contains(&i) {
                verify("big touched page", page, PAGE, 30 + i as u64)
            } else {
                verify_zero("big untouched page", page, PAGE)
            });
        }
        c.res(verify_zero("populated", populated, 8 * PAGE));
        c.res(verify("fixed", fixed, 8 * PAGE, 40));
    }
    c.finish()
}

const STACK_FRAMES: u64 = 200;

#[inline(never)]
fn recurse(ctx: &Ctx, depth: u64) -> CaseResult {
    let mut buf = [0u64; 512];
    // SAFETY: buf is 4 KiB of this frame.
    unsafe { fill(buf.as_mut_ptr() as *mut u8, 4096, 1000 + depth) };
    black_box(&mut buf);
    let mut c = Check::new();
    if depth == STACK_FRAMES {
        let addr = buf.as_ptr() as usize;
        let before = maps_entry(addr);
        c.res(ctx.ready_and_wait());
        let after = maps_entry(addr);
        // The low end may move: the SIGTERM frame can grow the stack.
        c.eq(
            "stack mapping (end, perms, name)",
            before.map(|m| (m.end, m.perms, m.path)),
            after.map(|m| (m.end, m.perms, m.path)),
        );
    } else {
        c.res(recurse(ctx, depth + 1));
    }
    black_box(&mut buf);
    // SAFETY: as above.
    c.res(unsafe {
        verify(
            &format!("stack frame {depth}"),
            buf.as_ptr() as *const u8,
            4096,
            1000 + depth,
        )
    });
    c.finish()
}

/// 200 frames of 4 KiB on the main stack, each with its own pattern.
pub fn stack_deep(ctx: &Ctx) -> CaseResult {
    recurse(ctx, 0)
}

fn create_file(tag: &str, content: &[u8]) -> Result<(String, std::fs::File), String> {
    let path = tmp_path(tag);
    std::fs::write(&path, content).map_err(|e| format!("write {}: {e}", path.display()))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    Ok((path.to_string_lossy().into_owned(), f))
}

fn mmap_file(fd: i32, len: usize, prot: i32, flags: i32, off: i64) -> Result<*mut u8, String> {
    // SAFETY: a fresh file mapping at a kernel-chosen address.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off) };
    if p == libc::MAP_FAILED {
        Err(os_err("mmap file"))
    } else {
        Ok(p as *mut u8)
    }
}

/// A MAP_PRIVATE file mapping with some pages changed: changed pages keep
/// their new content, the others still show the file.
pub fn file_private(ctx: &Ctx) -> CaseResult {
    const PAGES: usize = 16;
    const CHANGED: [usize; 3] = [1, 5, 9];
    let content = pattern_bytes(PAGES * PAGE, 70);
    let (path, f) = create_file("private", &content)?;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let p = mmap_file(f.as_raw_fd(), PAGES * PAGE, rw, libc::MAP_PRIVATE, 0)?;
    // A read-only window at a file offset, never touched.
    let window = mmap_file(
        f.as_raw_fd(),
        4 * PAGE,
        libc::PROT_READ,
        libc::MAP_PRIVATE,
        4 * PAGE as i64,
    )?;
    drop(f); // the mappings alone keep the file in use
             // SAFETY: inside the mapping.
    unsafe {
        for i in CHANGED {
            fill(p.add(i * PAGE), PAGE, 71 + i as u64);
        }
        black_box(p.add(2 * PAGE).read_volatile()); // read-faulted, unchanged
    }
    let entries = |p: *mut u8, w: *mut u8| {
        (
            maps_entry(p as usize).map(|m| (m.start, m.perms, m.offset, m.path)),
            maps_entry(w as usize).map(|m| (m.start, m.perms, m.offset, m.path)),
        )
    };
    let before = entries(p, window);

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq("maps entries", before.clone(), entries(p, window));
    c.ok(
        &format!("mapping names {path}: {:?}", before.0),
        before.0.as_ref().is_some_and(|e| e.3 == path),
    );
    c.res(check_range_mapped(
        "private",
        p as usize,
        PAGES * PAGE,
        "rw-p",
    ));
    c.res(check_range_mapped(
        "window",
        window as usize,
        4 * PAGE,
        "r--p",
    ));
    let file_now = std::fs::read(&path).map_err(|e| format!("read {path}: {e}"))?;
    c.ok("file itself unchanged", file_now == content);
    // SAFETY: ranges checked mapped above; a failure there would have been
    // reported, and reading is only done when the check passed.
    if c.fails_empty() {
        unsafe {
            for i in 0..PAGES {
                let page = std::slice::from_raw_parts(p.add(i * PAGE), PAGE);
                if CHANGED.contains(&i) {
                    c.res(verify("changed page", page.as_ptr(), PAGE, 71 + i as u64));
                } else if page != &content[i * PAGE..(i + 1) * PAGE] {
                    c.fail(format!("unchanged page {i} differs from the file"));
                }
            }
            let w = std::slice::from_raw_parts(window, 4 * PAGE);
            c.ok(
                "window shows file offset 4 pages",
                w == &content[4 * PAGE..8 * PAGE],
            );
        }
    }
    c.finish()
}

/// A MAP_SHARED file mapping written through: content survives and the
/// mapping still writes through to the file.
pub fn file_shared(ctx: &Ctx) -> CaseResult {
    const LEN: usize = 8 * PAGE;
    let (path, f) = create_file("shared", &vec![0u8; LEN])?;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let p = mmap_file(f.as_raw_fd(), LEN, rw, libc::MAP_SHARED, 0)?;
    drop(f);
    // SAFETY: inside the mapping.
    unsafe {
        fill(p, LEN, 80);
        libc::msync(p as *mut libc::c_void, LEN, libc::MS_SYNC);
    }
    let before = maps_entry(p as usize);

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq("maps entry", before, maps_entry(p as usize));
    c.res(check_range_mapped("shared", p as usize, LEN, "rw-s"));
    c.finish()?;
    let mut c = Check::new();
    // SAFETY: checked mapped.
    unsafe {
        c.res(verify("shared mapping", p, LEN, 80));
        let file = std::fs::read(&path).map_err(|e| format!("read {path}: {e}"))?;
        c.ok(
            "file holds what was written",
            file == pattern_bytes(LEN, 80),
        );
        // Still shared: a store now reaches the file.
        let v = 0x1122_3344_5566_7788u64;
        (p.add(PAGE) as *mut u64).write_volatile(v);
        libc::msync(p as *mut libc::c_void, LEN, libc::MS_SYNC);
        let file = std::fs::read(&path).map_err(|e| format!("read {path}: {e}"))?;
        c.eq(
            "store through the mapping reaches the file",
            v.to_le_bytes().as_slice(),
            &file[PAGE..PAGE + 8],
        );
    }
    c.finish()
}

/// A read-only region with content and a PROT_NONE region with content.
pub fn ro_prot_none(ctx: &Ctx) -> CaseResult {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let ro = mmap_anon(4 * PAGE, rw, 0)?;
    let none = mmap_anon(4 * PAGE, rw, 0)?;
    // SAFETY: inside the mappings; then only their protection changes.
    unsafe {
        fill(ro, 4 * PAGE, 90);
        fill(none, 4 * PAGE, 91);
        cvt(
            libc::mprotect(ro as _, 4 * PAGE, libc::PROT_READ),
            "mprotect ro",
        )?;
        cvt(
            libc::mprotect(none as _, 4 * PAGE, libc::PROT_NONE),
            "mprotect none",
        )?;
    }
    let before = (maps_entry(ro as usize), maps_entry(none as usize));

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq(
        "maps entries",
        before,
        (maps_entry(ro as usize), maps_entry(none as usize)),
    );
    c.res(check_range_mapped(
        "read-only",
        ro as usize,
        4 * PAGE,
        "r--p",
    ));
    c.res(check_range_mapped(
        "PROT_NONE",
        none as usize,
        4 * PAGE,
        "---p",
    ));
    c.finish()?;
    let mut c = Check::new();
    // SAFETY: checked mapped; PROT_NONE is opened for reading to check it.
    unsafe {
        c.res(verify("read-only", ro, 4 * PAGE, 90));
        cvt(
            libc::mprotect(none as _, 4 * PAGE, libc::PROT_READ),
            "mprotect",
        )?;
        c.res(verify("PROT_NONE", none, 4 * PAGE, 91));
        libc::mprotect(none as _, 4 * PAGE, libc::PROT_NONE);
    }
    c.finish()
}

const MADV_GUARD_INSTALL: i32 = 102;
const PM_GUARD_REGION: u64 = 1 << 58;

fn pagemap_entry(addr: usize) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / PAGE * 8) as u64)
        .map_err(|e| format!("pagemap read: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Reads one byte of our own memory through process_vm_readv: a guard page
/// gives EFAULT instead of the SIGSEGV a plain load would raise.
fn vm_read_errno(addr: usize) -> i32 {
    let mut b = 0u8;
    let local = libc::iovec {
        iov_base: &mut b as *mut u8 as *mut libc::c_void,
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: reads into a local byte.
    let r = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if r == 1 {
        0
    } else {
        errno()
    }
}

/// Guard pages installed with MADV_GUARD_INSTALL inside a mapping.
pub fn guard_pages(ctx: &Ctx) -> CaseResult {
    const PAGES: usize = 8;
    const GUARDS: [usize; 2] = [2, 3];
    let p = mmap_anon(PAGES * PAGE, libc::PROT_READ | libc::PROT_WRITE, 0)?;
    for i in 0..PAGES {
        // SAFETY: inside the mapping.
        unsafe { fill(p.add(i * PAGE), PAGE, 100 + i as u64) };
    }
    // SAFETY: advice on our own mapping.
    let r = unsafe { libc::madvise(p.add(2 * PAGE) as _, 2 * PAGE, MADV_GUARD_INSTALL) };
    if r != 0 && errno() == libc::EINVAL {
        eprintln!("guard_pages: kernel lacks MADV_GUARD_INSTALL; nothing to check");
        return ctx.ready_and_wait();
    }
    cvt(r, "madvise(MADV_GUARD_INSTALL)")?;
    let observe = || -> Result<Vec<(bool, i32)>, String> {
        (0..PAGES)
            .map(|i| {
                let a = p as usize + i * PAGE;
                Ok((pagemap_entry(a)? & PM_GUARD_REGION != 0, vm_read_errno(a)))
            })
            .collect()
    };
    let before = observe()?;
    for (i, &(pm, err)) in before.iter().enumerate() {
        if GUARDS.contains(&i) && !pm && err == 0 {
            return Err(format!(
                "guard on page {i} not observable before checkpoint"
            ));
        }
    }

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq(
        "per page (pagemap guard bit, process_vm_readv errno)",
        before,
        observe()?,
    );
    c.res(check_range_mapped(
        "guarded mapping",
        p as usize,
        PAGES * PAGE,
        "rw-p",
    ));
    for i in (0..PAGES).filter(|i| !GUARDS.contains(i)) {
        // SAFETY: not a guard page (checked above via the observation).
        c.res(unsafe { verify(&format!("page {i}"), p.add(i * PAGE), PAGE, 100 + i as u64) });
    }
    c.finish()
}

/// A MAP_GROWSDOWN mapping keeps its growsdown flag, address and content.
pub fn growsdown(ctx: &Ctx) -> CaseResult {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let p = mmap_anon(4 * PAGE, rw, libc::MAP_GROWSDOWN)?;
    // SAFETY: inside the mapping.
    unsafe { fill(p, 4 * PAGE, 110) };
    let before = (maps_entry(p as usize), vm_flags(p as usize)?);
    if !before.1.iter().any(|f| f == "gd") {
        return Err(format!("no gd flag even before checkpoint: {:?}", before.1));
    }

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq(
        "maps entry and VmFlags",
        before,
        (maps_entry(p as usize), vm_flags(p as usize)?),
    );
    c.res(check_range_mapped(
        "growsdown",
        p as usize,
        4 * PAGE,
        "rw-p",
    ));
    c.finish()?;
    // SAFETY: checked mapped.
    unsafe { verify("growsdown", p, 4 * PAGE, 110) }
}

fn vdso_maps() -> Vec<MapsEntry> {
    read_maps()
        .into_iter()
        .filter(|m| m.path == "[vdso]" || m.path.starts_with("[vvar"))
        .collect()
}

/// The vdso stays where it was and still works.
pub fn vdso(ctx: &Ctx) -> CaseResult {
    // SAFETY: getauxval has no preconditions.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    let maps = vdso_maps();
    let vdso = maps
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or("no [vdso] in maps")?
        .clone();
    // SAFETY: the vdso is mapped readable for its whole extent.
    let code =
        unsafe { std::slice::from_raw_parts(vdso.start as *const u8, vdso.end - vdso.start) }
            .to_vec();

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq(
        "AT_SYSINFO_EHDR",
        base,
        unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize,
    );
    c.eq("vdso/vvar maps lines", maps, vdso_maps());
    c.ok("vdso at AT_SYSINFO_EHDR", vdso.start == base);
    // SAFETY: checked equal to the old extent above (else this may fault,
    // which the harness reports as a crash).
    let now = unsafe { std::slice::from_raw_parts(vdso.start as *const u8, vdso.end - vdso.start) };
    c.ok("vdso code unchanged", now == code.as_slice());
    // The vdso's clocks read the vvar pages; compare against the syscall.
    for (name, clock) in [
        ("CLOCK_MONOTONIC", libc::CLOCK_MONOTONIC),
        ("CLOCK_REALTIME", libc::CLOCK_REALTIME),
    ] {
        let t1 = clock_ns(clock);
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::syscall(libc::SYS_clock_gettime, clock, &mut ts) };
        let sys = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
        let t2 = clock_ns(clock);
        c.ok(
            &format!("vdso {name} agrees with the syscall ({t1} <= {sys} <= {t2})"),
            t1 <= sys && sys <= t2,
        );
    }
    c.finish()
}

/// MADV_DONTFORK and MADV_WIPEONFORK survive, in the flags and in what a
/// child forked after the restore sees.
pub fn madvise_fork(ctx: &Ctx) -> CaseResult {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let dontfork = mmap_anon(4 * PAGE, rw, 0)?;
    let wipe = mmap_anon(4 * PAGE, rw, 0)?;
    let plain = mmap_anon(4 * PAGE, rw, 0)?;
    // SAFETY: inside the mappings.
    unsafe {
        fill(dontfork, 4 * PAGE, 120);
        fill(wipe, 4 * PAGE, 121);
        fill(plain, 4 * PAGE, 122);
        cvt(
            libc::madvise(dontfork as _, 4 * PAGE, libc::MADV_DONTFORK),
            "MADV_DONTFORK",
        )?;
        cvt(
            libc::madvise(wipe as _, 4 * PAGE, libc::MADV_WIPEONFORK),
            "MADV_WIPEONFORK",
        )?;
    }
    let flags = || -> Result<(bool, bool), String> {
        Ok((
            vm_flags(dontfork as usize)?.iter().any(|f| f == "dc"),
            vm_flags(wipe as usize)?.iter().any(|f| f == "wf"),
        ))
    };
    if flags()? != (true, true) {
        return Err(format!("flags not set before checkpoint: {:?}", flags()?));
    }

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    c.eq("(dc on DONTFORK, wf on WIPEONFORK)", (true, true), flags()?);
    // SAFETY: all three are still ours (flags() found them in smaps).
    unsafe {
        c.res(verify("DONTFORK content", dontfork, 4 * PAGE, 120));
        c.res(verify("WIPEONFORK content in parent", wipe, 4 * PAGE, 121));
        c.res(verify("plain content", plain, 4 * PAGE, 122));
        // The child only does async-signal-safe work and exits with a code
        // naming what it found.
        let pid = libc::fork();
        if pid == 0 {
            let mut vec = [0u8; 4];
            let code = if libc::mincore(dontfork as _, 4 * PAGE, vec.as_mut_ptr()) == 0 {
                2
            } else if verify_zero("", wipe, 4 * PAGE).is_err() {
                3
            } else if verify("", plain, 4 * PAGE, 122).is_err() {
                4
            } else {
                0
            };
            libc::_exit(code);
        }
        if pid < 0 {
            return Err(os_err("fork"));
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        let code = if libc::WIFEXITED(st) {
            libc::WEXITSTATUS(st)
        } else {
            -1
        };
        c.eq(
            "child exit (2: DONTFORK mapped in child, 3: WIPEONFORK not wiped, 4: plain lost)",
            0,
            code,
        );
    }
    c.finish()
}

/// Fields of /proc/self/stat that PR_SET_MM_MAP restores: start_code,
/// end_code, start_stack, and start_data through env_end.
const MM_STAT_FIELDS: [usize; 10] = [26, 27, 28, 45, 46, 47, 48, 49, 50, 51];

#[derive(Debug, PartialEq)]
struct MmFields {
    cmdline: Vec<u8>,
    environ: Vec<u8>,
    auxv: Vec<u8>,
    exe: String,
    stat: Vec<String>,
}

fn mm_fields_now() -> MmFields {
    let stat = stat_fields("/proc/self/stat");
    MmFields {
        cmdline: read_bytes("/proc/self/cmdline"),
        environ: read_bytes("/proc/self/environ"),
        auxv: read_bytes("/proc/self/auxv"),
        exe: readlink("/proc/self/exe"),
        stat: MM_STAT_FIELDS
            .iter()
            .map(|&i| stat.get(i).cloned().unwrap_or_default())
            .collect(),
    }
}

/// Argument and environment areas, auxv, exe link and the mm's addresses.
pub fn mm_fields(ctx: &Ctx) -> CaseResult {
    let before = mm_fields_now();
    if before.auxv.is_empty() || before.cmdline.is_empty() {
        return Err("cannot read /proc/self/auxv or cmdline".into());
    }
    ctx.ready_and_wait()?;
    let after = mm_fields_now();
    let mut c = Check::new();
    c.eq("cmdline", &before.cmdline, &after.cmdline);
    c.eq(
        "environ",
        String::from_utf8_lossy(&before.environ),
        String::from_utf8_lossy(&after.environ),
    );
    c.eq("auxv", &before.auxv, &after.auxv);
    c.eq("exe", &before.exe, &after.exe);
    for (i, f) in MM_STAT_FIELDS.iter().enumerate() {
        c.eq(&format!("stat field {f}"), &before.stat[i], &after.stat[i]);
    }
    c.finish()
}

/// The mapping SIGUSR1 gives MADV_WIPEONFORK in `advice_late`.
static LATE: [std::sync::atomic::AtomicUsize; 2] = [
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
];

extern "C" fn wipe_on_fork_now(_: libc::c_int) {
    let (p, len) = (
        LATE[0].load(std::sync::atomic::Ordering::Relaxed),
        LATE[1].load(std::sync::atomic::Ordering::Relaxed),
    );
    // SAFETY: madvise is async-signal-safe; the range is the case's own.
    unsafe { libc::madvise(p as *mut libc::c_void, len, libc::MADV_WIPEONFORK) };
}

/// 8 MiB of private memory whose advice changes without its layout
/// changing: on SIGUSR1 the whole mapping gets MADV_WIPEONFORK (a dump's
/// snapshot child would then hold it empty). Its content must stay.
pub fn advice_late(ctx: &Ctx) -> CaseResult {
    let len = 2048 * PAGE;
    let p = mmap_anon(len, libc::PROT_READ | libc::PROT_WRITE, 0)?;
    // SAFETY: inside the mapping.
    unsafe { fill(p, len, 77) };
    LATE[0].store(p as usize, std::sync::atomic::Ordering::Relaxed);
    LATE[1].store(len, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: a handler that only calls madvise on the case's own range.
    let r = unsafe {
        libc::signal(
            libc::SIGUSR1,
            wipe_on_fork_now as *const () as libc::sighandler_t,
        )
    };
    if r == libc::SIG_ERR {
        return Err(os_err("signal(SIGUSR1)"));
    }

    ctx.ready_and_wait()?;

    // SAFETY: still mapped (nothing unmaps it).
    unsafe { verify("late-advised mapping", p, len, 77) }
}

/// A thread appends to memory the whole time, also while the process (and
/// a forked child that waits on a pipe) is checkpointed: with --leave-running the process runs on while its memory
/// is copied from a snapshot, and the image must hold memory as it was at
/// one instant, whatever was written after.
///
/// 512 MiB of written zeros (present pages, all in the image) come first;
/// then the writer fills one page after the other with a value of its own
/// and counts them, checking first that the page is still zero. A page of
/// the image written later than the instant its count was saved is found
/// by the restored writer when it gets there, or by the final check.
pub fn memory_writer(ctx: &Ctx) -> CaseResult {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
    const LEN: usize = 512 << 20;
    const PAGES: usize = LEN / PAGE;
    /// Pages written per millisecond: the writer outlasts any copy.
    const PACE: usize = 32;
    struct State {
        count: AtomicUsize,
        /// 1 + the first page the writer found written before its turn.
        early: AtomicUsize,
        /// A witness the writer found ahead of its count.
        behind: AtomicUsize,
        stop: AtomicBool,
    }
    fn value(k: usize) -> u64 {
        (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
    }
    let base = mmap_anon(LEN, libc::PROT_READ | libc::PROT_WRITE, 0)? as usize;
    // SAFETY: the mapping made above, LEN bytes.
    unsafe { std::ptr::write_bytes(base as *mut u8, 0, LEN) };
    // A child shares the memory (copy on write) and waits on a pipe: two
    // processes to snapshot, one holding a pipe the other writes.
    let mut pipe = [0; 2];
    // SAFETY: pipe fills the two-int array.
    cvt(unsafe { libc::pipe(pipe.as_mut_ptr()) }, "pipe")?;
    // SAFETY: still one thread here; the child only reads and exits.
    let child = cvt(unsafe { libc::fork() }, "fork")?;
    if child == 0 {
        let mut b = 0u8;
        // SAFETY: a read of one byte into `b`, then _exit.
        unsafe {
            libc::close(pipe[1]);
            let n = libc::read(pipe[0], &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(if n == 1 && b == b'x' { 0 } else { 1 });
        }
    }
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(pipe[0]) };
    // A witness outside memory: every WITNESS pages the writer leaves its
    // count in a pipe of its own (only the latest). The pipe's content is
    // checkpointed with the files, when the process stands still; memory
    // restored from an older instant (a wrong increment, a stale parent)
    // would have a count behind the witness, and be self-consistent
    // otherwise.
    const WITNESS: usize = 256;
    let mut witness = [0; 2];
    // SAFETY: pipe2 fills the two-int array.
    cvt(
        unsafe { libc::pipe2(witness.as_mut_ptr(), libc::O_NONBLOCK) },
        "pipe2",
    )?;
    let latest_witness = move || {
        let (mut last, mut buf) = (None, [0u8; 8]);
        // SAFETY: reads of 8 bytes into `buf` from our pipe's read end.
        while unsafe { libc::read(witness[0], buf.as_mut_ptr().cast(), 8) } == 8 {
            last = Some(usize::from_le_bytes(buf));
        }
        last
    };
    let state: &'static State = Box::leak(Box::new(State {
        count: AtomicUsize::new(0),
        early: AtomicUsize::new(0),
        behind: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    }));
    let word = move |k: usize| (base + k * PAGE) as *mut u64;
    let writer = std::thread::spawn(move || {
        while !state.stop.load(Relaxed) {
            for _ in 0..PACE {
                let k = state.count.load(Relaxed);
                if k == PAGES {
                    break;
                }
                // SAFETY: page k of the mapping, which lives as long as
                // the process.
                unsafe {
                    if std::ptr::read_volatile(word(k)) != 0 && state.early.load(Relaxed) == 0 {
                        state.early.store(k + 1, Relaxed);
                    }
                    std::ptr::write_volatile(word(k), value(k));
                }
                state.count.store(k + 1, Release);
                if (k + 1).is_multiple_of(WITNESS) {
                    if let Some(w) = latest_witness().filter(|&w| w > k + 1) {
                        state.behind.store(w, Relaxed);
                    }
                    let b = (k + 1).to_le_bytes();
                    // SAFETY: 8 bytes from a local into our pipe's write end.
                    unsafe { libc::write(witness[1], b.as_ptr().cast(), 8) };
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
    // Well under way before the checkpoint.
    wait_until(std::time::Duration::from_secs(5), || {
        state.count.load(Relaxed) >= 1000
    });

    ctx.ready_and_wait()?;

    state.stop.store(true, Relaxed);
    writer
        .join()
        .map_err(|_| "the writer panicked".to_string())?;
    let mut c = Check::new();
    let mut status = 0;
    // SAFETY: one byte from a local to the pipe; waitpid on our child.
    let waited = unsafe {
        libc::write(pipe[1], b"x".as_ptr() as *const libc::c_void, 1);
        libc::waitpid(child, &mut status, 0)
    };
    c.eq(
        "the child, told through the pipe, exited 0",
        (child, 0),
        (waited, status),
    );
    let count = state.count.load(Acquire);
    c.ok("the writer wrote", count >= 1000);
    let seen = latest_witness();
    c.ok(
        &format!("the count ({count}) is not behind the witness in the pipe ({seen:?})"),
        seen.is_some_and(|w| w <= count),
    );
    c.eq(
        "a witness the writer found ahead of its count",
        0,
        state.behind.load(Relaxed),
    );
    c.eq(
        "first page found written before the writer's turn (1-based)",
        0,
        state.early.load(Relaxed),
    );
    // SAFETY: every page of the mapping, read only.
    let wrong = (0..PAGES).find(|&k| {
        let want = if k < count { value(k) } else { 0 };
        unsafe { std::ptr::read_volatile(word(k)) != want }
    });
    c.eq(
        &format!("first page not as the count ({count}) says"),
        None,
        wrong,
    );
    c.finish()
}

/// What a lazy restore must get right while pages are still missing: its
/// check (run while the agent serves faults only) forks a child that reads
/// every page, drops a range (MADV_DONTNEED: it must read zero, not the
/// saved content), moves one (mremap: the content moves along), unmaps
/// one, and reads the rest.
pub fn lazy_events(ctx: &Ctx) -> CaseResult {
    const PAGES: usize = 4096;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let base = mmap_anon(PAGES * PAGE, rw, 0)?;
    // SAFETY: inside the mapping made above.
    unsafe { fill(base, PAGES * PAGE, 77) };
    // One read-only page splits the mapping in two: the saved pages run
    // across both, one copy into the restored process cannot.
    // SAFETY: a page of our mapping.
    cvt(
        unsafe { libc::mprotect(base.add(2100 * PAGE).cast(), PAGE, libc::PROT_READ) },
        "mprotect",
    )?;
    // A place to move pages to, reserved now so the address is free.
    let target = mmap_anon(512 * PAGE, libc::PROT_NONE, 0)?;

    ctx.ready_and_wait()?;

    let mut c = Check::new();
    // SAFETY: the child only reads the mapping and exits.
    let child = cvt(unsafe { libc::fork() }, "fork")?;
    if child == 0 {
        // SAFETY: reads of the mapping, then _exit.
        unsafe {
            let ok = verify("child", base, PAGES * PAGE, 77).is_ok();
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    c.eq("the forked child read every page (exit status)", 0, status);
    // SAFETY: pages 0-511 of the mapping.
    unsafe {
        libc::madvise(base.cast(), 512 * PAGE, libc::MADV_DONTNEED);
        let words = std::slice::from_raw_parts(base as *const u64, 512 * PAGE / 8);
        c.ok(
            "pages dropped with MADV_DONTNEED read zero",
            words.iter().all(|&w| w == 0),
        );
    }
    // Pages 512-1023 move onto the reserved range.
    // SAFETY: both ranges are ours; MREMAP_FIXED replaces the reservation.
    let moved = unsafe {
        libc::mremap(
            base.add(512 * PAGE).cast(),
            512 * PAGE,
            512 * PAGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target,
        )
    };
    if moved == libc::MAP_FAILED {
        return Err(os_err("mremap"));
    }
    // SAFETY: the moved pages and the rest of the mapping are mapped.
    unsafe {
        // Offsets are relative to where `fill` started: check word by word.
        let words = std::slice::from_raw_parts(moved as *const u64, 512 * PAGE / 8);
        let first = 512 * PAGE / 8;
        let bad = words
            .iter()
            .enumerate()
            .find(|&(i, &w)| w != mix(77, (first + i) as u64))
            .map(|(i, _)| i);
        c.eq("first wrong word of the moved pages", None, bad);
        libc::munmap(base.add(1024 * PAGE).cast(), 512 * PAGE);
        let rest = base.add(1536 * PAGE) as *const u64;
        let first = 1536 * PAGE / 8;
        let bad = (0..(PAGES - 1536) * PAGE / 8)
            .find(|&i| rest.add(i).read_volatile() != mix(77, (first + i) as u64));
        c.eq("first wrong word of the pages left in place", None, bad);
    }
    c.finish()
}
