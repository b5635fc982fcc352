//! The vdso/vvar block: its layout from /proc/PID/maps, its ELF symbol
//! table (read from our own memory), and the probes that restore relies on.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ckpt_proto::image::VdsoArea;
use sha2::{Digest, Sha256};

use super::{ctx, CheckError, Outcome, CHILD_TIMEOUT};
use crate::sys::probe::{self, fork_child};

/// One special mapping with its absolute address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Area {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// The `[vvar*]` and `[vdso]` lines of a maps file, in address order.
pub(super) fn parse_maps_areas(maps: &str) -> Vec<Area> {
    let mut out: Vec<Area> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let name = f.nth(4)?;
            if !(name == "[vdso]" || name.starts_with("[vvar")) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(Area {
                name: name.to_string(),
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
            })
        })
        .collect();
    out.sort_by_key(|a| a.start);
    out
}

/// Layout as stored in a fingerprint: sizes and offsets from the lowest area.
pub(super) fn layout_of(areas: &[Area]) -> Vec<VdsoArea> {
    let lo = areas.first().map_or(0, |a| a.start);
    areas
        .iter()
        .map(|a| VdsoArea {
            name: a.name.clone(),
            size: a.end - a.start,
            offset: (a.start as i64).wrapping_sub(lo as i64),
        })
        .collect()
}

pub(super) fn self_areas() -> Result<Vec<Area>, CheckError> {
    let path = Path::new("/proc/self/maps");
    let maps = std::fs::read_to_string(path).map_err(|source| CheckError::Io {
        path: path.into(),
        source,
    })?;
    Ok(parse_maps_areas(&maps))
}

/// Reads our own vdso image through /proc/self/mem (no raw pointers).
pub(super) fn read_self_vdso(areas: &[Area]) -> Result<Vec<u8>, CheckError> {
    let path = Path::new("/proc/self/mem");
    let io = |source| CheckError::Io {
        path: path.into(),
        source,
    };
    let v = areas
        .iter()
        .find(|a| a.name == "[vdso]")
        .ok_or_else(|| CheckError::Parse {
            path: "/proc/self/maps".into(),
            what: "no [vdso] mapping".into(),
        })?;
    let mut f = std::fs::File::open(path).map_err(io)?;
    f.seek(SeekFrom::Start(v.start)).map_err(io)?;
    let mut buf = vec![0u8; (v.end - v.start) as usize];
    f.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

/// Dynamic symbols of an in-memory ELF64 image: (name, st_value).
pub(super) fn dynsyms(elf: &[u8]) -> Result<Vec<(String, u64)>, String> {
    let u16_at = |o: usize| -> Result<u16, String> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("ELF truncated at {o:#x}"))
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| format!("ELF truncated at {o:#x}"))
    };
    let u64_at = |o: usize| -> Result<u64, String> {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| format!("ELF truncated at {o:#x}"))
    };
    if elf.get(0..5) != Some(b"\x7fELF\x02") {
        return Err("not an ELF64 image".into());
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let sh = |i: usize| shoff + i * shentsize;
    const SHT_DYNSYM: u32 = 11;
    let dynsym = (0..shnum)
        .find(|&i| u32_at(sh(i) + 4) == Ok(SHT_DYNSYM))
        .ok_or("no .dynsym section")?;
    let sym_off = u64_at(sh(dynsym) + 0x18)? as usize;
    let sym_size = u64_at(sh(dynsym) + 0x20)? as usize;
    let link = u32_at(sh(dynsym) + 0x28)? as usize;
    let sym_ent = (u64_at(sh(dynsym) + 0x38)? as usize).max(24);
    let str_off = u64_at(sh(link) + 0x18)? as usize;
    let str_size = u64_at(sh(link) + 0x20)? as usize;
    let strtab = elf
        .get(str_off..str_off + str_size)
        .ok_or("dynstr out of range")?;
    let mut out = Vec::new();
    for i in 1..sym_size / sym_ent {
        let s = sym_off + i * sym_ent;
        let name_off = u32_at(s)? as usize;
        let value = u64_at(s + 8)?;
        let name = strtab
            .get(name_off..)
            .and_then(|t| t.split(|&b| b == 0).next())
            .ok_or("symbol name out of range")?;
        if !name.is_empty() {
            out.push((String::from_utf8_lossy(name).into_owned(), value));
        }
    }
    Ok(out)
}

/// Virtual address the image's first PT_LOAD expects (0 on modern kernels),
/// so symbol values can be turned into offsets from the mapping's start.
fn load_vaddr(elf: &[u8]) -> u64 {
    let rd = |o: usize, n: usize| elf.get(o..o + n);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2))
    else {
        return 0;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().expect("8")) as usize;
    let phentsize = u16::from_le_bytes(phentsize.try_into().expect("2")) as usize;
    let phnum = u16::from_le_bytes(phnum.try_into().expect("2")) as usize;
    (0..phnum)
        .filter_map(|i| {
            let p = phoff + i * phentsize;
            let ty = u32::from_le_bytes(rd(p, 4)?.try_into().ok()?);
            if ty == 1 {
                Some(u64::from_le_bytes(rd(p + 0x10, 8)?.try_into().ok()?))
            } else {
                None
            }
        })
        .next()
        .unwrap_or(0)
}

/// sha256 over the sorted "name=value" lines of the symbol table.
pub(super) fn symtab_hash(syms: &[(String, u64)]) -> String {
    let mut lines: Vec<String> = syms.iter().map(|(n, v)| format!("{n}={v:#x}")).collect();
    lines.sort();
    lines.dedup();
    let digest = Sha256::digest(lines.join("\n").as_bytes());
    hex::encode(digest)
}

/// Probe: the vdso block is where and what we expect.
pub(super) fn layout() -> Outcome {
    let areas = self_areas().map_err(|e| e.to_string())?;
    if !areas.iter().any(|a| a.name == "[vdso]") {
        return Err("no [vdso] in /proc/self/maps".into());
    }
    let elf = read_self_vdso(&areas).map_err(|e| e.to_string())?;
    let syms = dynsyms(&elf).map_err(ctx("vdso ELF"))?;
    let parts: Vec<String> = layout_of(&areas)
        .iter()
        .map(|a| format!("{} {}K@{:+#x}", a.name, a.size / 1024, a.offset))
        .collect();
    Ok(format!("{}; {} symbols", parts.join(" "), syms.len()))
}

/// Probe: a child moves the whole block with mremap and calls
/// clock_gettime through the moved vdso.
pub(super) fn mremap() -> Outcome {
    let areas = self_areas().map_err(|e| e.to_string())?;
    let vdso = areas
        .iter()
        .find(|a| a.name == "[vdso]")
        .ok_or("no [vdso] mapping")?
        .clone();
    let elf = read_self_vdso(&areas).map_err(|e| e.to_string())?;
    let base = load_vaddr(&elf);
    let entry = dynsyms(&elf)
        .map_err(ctx("vdso ELF"))?
        .into_iter()
        .find(|(n, _)| n == "__vdso_clock_gettime" || n == "clock_gettime")
        .ok_or("vdso exports no clock_gettime")?
        .1
        .wrapping_sub(base);
    let lo = areas[0].start;
    let span = areas.last().map_or(0, |a| a.end) - lo;
    let spans: Vec<(u64, u64)> = areas.iter().map(|a| (a.start, a.end - a.start)).collect();
    let mut child = fork_child(|io| {
        let before = match probe::raw_clock_gettime(libc::CLOCK_MONOTONIC) {
            Ok(t) => t.tv_sec,
            Err(_) => return io.fail(9),
        };
        match probe::vdso_move_and_call(&spans, lo, span, vdso.start, entry) {
            Ok((sec, nsec, newbase)) => {
                let ok = sec >= before && sec <= before + 5;
                io.report(
                    if ok { 0 } else { 4 },
                    nix::errno::Errno::UnknownErrno,
                    &[sec as u64, nsec as u64, newbase],
                )
            }
            Err((step, e)) => io.report(step, e, &[]),
        }
    })
    .map_err(ctx("fork"))?;
    let r = child
        .final_report(CHILD_TIMEOUT)
        .map_err(|e| e.to_string())?;
    match r.step {
        0 => Ok(format!(
            "moved {} areas ({} KiB) from {lo:#x} to {:#x}; clock_gettime via the moved vdso = {}.{:09}",
            spans.len(),
            span / 1024,
            r.vals[2],
            r.vals[0],
            r.vals[1]
        )),
        1 => Err(format!("mmap of the destination: {}", r.errno)),
        2 => Err(format!("mremap of the vdso block: {}", r.errno)),
        3 => Err(format!("clock_gettime through the moved vdso failed: {}", r.errno)),
        4 => Err(format!("clock_gettime through the moved vdso returned {}s, implausible", r.vals[0])),
        s => Err(format!("child failed at step {s}: {}", r.errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7ffd5a1f0000-7ffd5a211000 rw-p 00000000 00:00 0                          [stack]
7f6bcf2b8000-7f6bcf2ba000 r--p 00000000 00:00 0                          [vvar_vclock]
7f6bcf2b4000-7f6bcf2b8000 r--p 00000000 00:00 0                          [vvar]
7f6bcf2ba000-7f6bcf2bc000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn maps_areas_sorted_with_offsets() {
        let a = parse_maps_areas(MAPS);
        let names: Vec<&str> = a.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["[vvar]", "[vvar_vclock]", "[vdso]"]);
        let l = layout_of(&a);
        assert_eq!((l[0].size, l[0].offset), (0x4000, 0));
        assert_eq!((l[1].size, l[1].offset), (0x2000, 0x4000));
        assert_eq!((l[2].size, l[2].offset), (0x2000, 0x6000));
    }

    #[test]
    fn own_vdso_parses_and_hash_is_stable() {
        let areas = self_areas().unwrap();
        let elf = read_self_vdso(&areas).unwrap();
        let syms = dynsyms(&elf).unwrap();
        assert!(
            syms.iter().any(|(n, _)| n.contains("clock_gettime")),
            "{syms:?}"
        );
        let mut rev = syms.clone();
        rev.reverse();
        assert_eq!(symtab_hash(&syms), symtab_hash(&rev));
        assert_eq!(symtab_hash(&syms).len(), 64);
    }
}
