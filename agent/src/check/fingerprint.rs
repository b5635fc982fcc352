//! The node fingerprint: what a checkpoint taken here depends on.

use ckpt_proto::image::NodeFingerprint;

use super::vdso;
use super::CheckError;

fn read(path: &str) -> Result<String, CheckError> {
    std::fs::read_to_string(path).map_err(|source| CheckError::Io {
        path: path.into(),
        source,
    })
}

/// Builds this node's fingerprint.
pub fn fingerprint() -> Result<NodeFingerprint, CheckError> {
    let uts = nix::sys::utsname::uname().map_err(|e| CheckError::Io {
        path: "uname(2)".into(),
        source: e.into(),
    })?;
    let (cpu_model, cpu_flags) = parse_cpuinfo(&read("/proc/cpuinfo")?);
    let areas = vdso::self_areas()?;
    let elf = vdso::read_self_vdso(&areas)?;
    let syms = vdso::dynsyms(&elf).map_err(|what| CheckError::Parse {
        path: "/proc/self/mem".into(),
        what: format!("vdso ELF: {what}"),
    })?;
    let (xcr0, xsave_size) = xsave();
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u32;
    let status = read("/proc/self/status")?;
    let last_cap: u32 = read("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .map_err(|_| CheckError::Parse {
            path: "/proc/sys/kernel/cap_last_cap".into(),
            what: "not a number".into(),
        })?;
    let cap_eff = status_hex(&status, "CapEff").ok_or_else(|| CheckError::Parse {
        path: "/proc/self/status".into(),
        what: "no CapEff line".into(),
    })?;
    Ok(NodeFingerprint {
        hostname: uts.nodename().to_string_lossy().into_owned(),
        kernel_release: uts.release().to_string_lossy().into_owned(),
        arch: uts.machine().to_string_lossy().into_owned(),
        cpu_model,
        cpu_flags,
        xcr0,
        xsave_size,
        vdso_layout: vdso::layout_of(&areas),
        vdso_symtab_hash: vdso::symtab_hash(&syms),
        page_size,
        cgroup_mode: cgroup_mode(&read("/proc/self/mountinfo")?).to_string(),
        missing_caps: missing_caps(cap_eff, last_cap),
    })
}

#[cfg(target_arch = "x86_64")]
fn xsave() -> (u64, u32) {
    match crate::sys::probe::xgetbv0() {
        // Leaf 0xD sub-leaf 0 EBX: bytes needed for the features in XCR0.
        Some(xcr0) => (xcr0, crate::sys::probe::cpuid(0xd, 0).1),
        None => (0, 0),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn xsave() -> (u64, u32) {
    (0, 0)
}

/// Model name and sorted flags of the first CPU in /proc/cpuinfo.
pub(super) fn parse_cpuinfo(text: &str) -> (String, Vec<String>) {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let model = field("model name").unwrap_or_default();
    let mut flags: Vec<String> = field("flags")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    flags.sort();
    flags.dedup();
    (model, flags)
}

/// "v1", "v2" or "hybrid" from the cgroup mounts in a mountinfo file.
pub(super) fn cgroup_mode(mountinfo: &str) -> &'static str {
    let (mut v1, mut v2) = (false, false);
    for l in mountinfo.lines() {
        let Some((_, post)) = l.split_once(" - ") else {
            continue;
        };
        match post.split_whitespace().next() {
            Some("cgroup") => v1 = true,
            Some("cgroup2") => v2 = true,
            _ => {}
        }
    }
    match (v1, v2) {
        (true, true) => "hybrid",
        (true, false) => "v1",
        (false, true) => "v2",
        (false, false) => "none",
    }
}

fn status_hex(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| u64::from_str_radix(v.trim(), 16).ok())?
    })
}

/// Capability names, indexed by number.
const CAP_NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Names of the capabilities up to `last_cap` missing from `cap_eff`.
pub(super) fn missing_caps(cap_eff: u64, last_cap: u32) -> Vec<String> {
    (0..=last_cap.min(63))
        .filter(|&i| cap_eff & (1u64 << i) == 0)
        .map(|i| {
            CAP_NAMES
                .get(i as usize)
                .map_or_else(|| format!("CAP_{i}"), |n| n.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_first_cpu() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: sse2 fpu avx2 avx\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n";
        let (m, f) = parse_cpuinfo(text);
        assert_eq!(m, "AMD EPYC 9B14");
        assert_eq!(f, ["avx", "avx2", "fpu", "sse2"]);
    }

    #[test]
    fn cgroup_modes() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/freezer rw,relatime shared:12 - cgroup cgroup rw,freezer\n\
                      31 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_mode(hybrid), "hybrid");
        assert_eq!(
            cgroup_mode("31 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            "v2"
        );
        assert_eq!(
            cgroup_mode("30 25 0:26 / /x rw - cgroup cgroup rw,cpu\n"),
            "v1"
        );
    }

    #[test]
    fn caps_this_root_lacks() {
        assert_eq!(
            missing_caps(0x0000_01ff_feff_ffff, 40),
            ["CAP_SYS_RESOURCE"]
        );
        assert!(missing_caps(0x0000_01ff_ffff_ffff, 40).is_empty());
    }

    #[test]
    fn fingerprint_of_this_node() {
        let f = fingerprint().unwrap();
        assert!(!f.kernel_release.is_empty());
        assert_eq!(f.arch, std::env::consts::ARCH);
        assert!(f.vdso_layout.iter().any(|a| a.name == "[vdso]"));
        assert_eq!(f.vdso_layout[0].offset, 0);
        assert_eq!(f.vdso_symtab_hash.len(), 64);
        assert!(f.page_size >= 4096);
        if cfg!(target_arch = "x86_64") {
            assert!(f.xcr0 & 3 == 3 && f.xsave_size >= 512, "{f:?}");
        }
    }
}
