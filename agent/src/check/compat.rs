//! Whether a checkpoint taken on one node can be restored on another.

use ckpt_proto::image::NodeFingerprint;

/// Names of the XCR0 state components, by bit.
const XSAVE_COMPONENTS: &[(u32, &str)] = &[
    (0, "x87"),
    (1, "sse"),
    (2, "avx"),
    (3, "mpx_bndregs"),
    (4, "mpx_bndcsr"),
    (5, "avx512_opmask"),
    (6, "avx512_zmm_hi256"),
    (7, "avx512_hi16_zmm"),
    (9, "pkru"),
    (17, "amx_tilecfg"),
    (18, "amx_tiledata"),
    (19, "apx"),
];

/// Human names of the components set in an XCR0 value.
pub(super) fn xsave_names(xcr0: u64) -> Vec<String> {
    (0..64)
        .filter(|b| xcr0 & (1u64 << b) != 0)
        .map(|b| {
            XSAVE_COMPONENTS
                .iter()
                .find(|(bit, _)| *bit == b)
                .map_or_else(|| format!("bit{b}"), |(_, n)| n.to_string())
        })
        .collect()
}

/// /proc/cpuinfo flags that describe the kernel, the hypervisor or
/// mitigations rather than instructions a user-space task can execute, so
/// their absence on a target never breaks a restored task.
const NON_ISA_FLAGS: &[&str] = &[
    "hypervisor",
    "constant_tsc",
    "nonstop_tsc",
    "tsc_known_freq",
    "tsc_reliable",
    "tsc_deadline_timer",
    "tsc_adjust",
    "arch_perfmon",
    "arch_capabilities",
    "rep_good",
    "nopl",
    "xtopology",
    "cpuid",
    "cpuid_fault",
    "pti",
    "ibrs",
    "ibpb",
    "stibp",
    "ssbd",
    "amd_ssbd",
    "virt_ssbd",
    "md_clear",
    "flush_l1d",
    "ibrs_enhanced",
    "retpoline",
    "user_shstk",
    "vmx",
    "svm",
    "ept",
    "vpid",
    "vnmi",
    "flexpriority",
    "tpr_shadow",
    "ept_ad",
    "invpcid_single",
    "aperfmperf",
    "tsc_scale",
    "vmcb_clean",
    "decodeassists",
    "pausefilter",
    "pfthreshold",
    "v_vmsave_vmload",
    "vgif",
    "npt",
    "lbrv",
    "nrip_save",
    "flushbyasid",
];

/// Why a checkpoint taken on node `image` cannot be restored on node
/// `here`; empty when it can.
pub fn incompatibilities(image: &NodeFingerprint, here: &NodeFingerprint) -> Vec<String> {
    let mut why = Vec::new();
    if image.arch != here.arch {
        why.push(format!(
            "architecture differs: image {}, here {}",
            image.arch, here.arch
        ));
    }
    if image.page_size != here.page_size {
        why.push(format!(
            "page size differs: image {}, here {}",
            image.page_size, here.page_size
        ));
    }
    let missing_flags: Vec<&str> = image
        .cpu_flags
        .iter()
        .filter(|f| !NON_ISA_FLAGS.contains(&f.as_str()) && !here.cpu_flags.contains(f))
        .map(String::as_str)
        .collect();
    if !missing_flags.is_empty() {
        why.push(format!(
            "CPU flags missing here: {}",
            missing_flags.join(" ")
        ));
    }
    let missing_x = image.xcr0 & !here.xcr0;
    if missing_x != 0 {
        why.push(format!(
            "xsave features enabled in the image but not here (xcr0 {:#x} vs {:#x}): {}",
            image.xcr0,
            here.xcr0,
            xsave_names(missing_x).join(" ")
        ));
    }
    if image.xsave_size > here.xsave_size {
        why.push(format!(
            "xsave area larger in the image ({} bytes) than here ({} bytes)",
            image.xsave_size, here.xsave_size
        ));
    }
    if image.vdso_layout != here.vdso_layout {
        let show = |f: &NodeFingerprint| {
            f.vdso_layout
                .iter()
                .map(|a| format!("{}:{:#x}@{:+#x}", a.name, a.size, a.offset))
                .collect::<Vec<_>>()
                .join(" ")
        };
        why.push(format!(
            "vdso layout differs: image [{}], here [{}]",
            show(image),
            show(here)
        ));
    }
    if image.vdso_symtab_hash != here.vdso_symtab_hash {
        why.push(format!(
            "vdso symbol table differs (sha256 {} vs {})",
            short(&image.vdso_symtab_hash),
            short(&here.vdso_symtab_hash)
        ));
    }
    why
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_proto::image::VdsoArea;

    fn node() -> NodeFingerprint {
        NodeFingerprint {
            hostname: "a".into(),
            kernel_release: "6.18.0".into(),
            arch: "x86_64".into(),
            cpu_model: "cpu".into(),
            cpu_flags: vec![
                "avx".into(),
                "avx2".into(),
                "fpu".into(),
                "hypervisor".into(),
            ],
            xcr0: 0x7,
            xsave_size: 832,
            vdso_layout: vec![
                VdsoArea {
                    name: "[vvar]".into(),
                    size: 0x4000,
                    offset: 0,
                },
                VdsoArea {
                    name: "[vdso]".into(),
                    size: 0x2000,
                    offset: 0x4000,
                },
            ],
            vdso_symtab_hash: "ab".repeat(32),
            page_size: 4096,
            cgroup_mode: "v2".into(),
            missing_caps: vec![],
        }
    }

    #[test]
    fn same_node_is_compatible() {
        assert!(incompatibilities(&node(), &node()).is_empty());
    }

    #[test]
    fn other_host_name_and_kernel_and_extra_features_are_fine() {
        let img = node();
        let mut here = node();
        here.hostname = "b".into();
        here.kernel_release = "6.19".into();
        here.cpu_flags.push("avx512f".into());
        here.cpu_flags.retain(|f| f != "hypervisor");
        here.xcr0 = 0xe7;
        here.xsave_size = 2688;
        here.cgroup_mode = "hybrid".into();
        assert!(incompatibilities(&img, &here).is_empty());
    }

    #[test]
    fn each_difference_is_reported() {
        let mut img = node();
        img.cpu_flags.push("avx512f".into());
        img.xcr0 = 0xe7;
        img.xsave_size = 2688;
        let here = node();
        let why = incompatibilities(&img, &here);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].contains("avx512f"));
        assert!(why[1].contains("avx512_opmask") && why[1].contains("avx512_hi16_zmm"));
        assert!(why[2].contains("2688"));

        let mut here = node();
        here.arch = "aarch64".into();
        here.page_size = 65536;
        assert_eq!(incompatibilities(&node(), &here).len(), 2);

        let mut here = node();
        here.vdso_layout.insert(
            1,
            VdsoArea {
                name: "[vvar_vclock]".into(),
                size: 0x2000,
                offset: 0x4000,
            },
        );
        here.vdso_layout[2].offset = 0x6000;
        let why = incompatibilities(&node(), &here);
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("vvar_vclock"));

        let mut here = node();
        here.vdso_symtab_hash = "cd".repeat(32);
        let why = incompatibilities(&node(), &here);
        assert!(why.len() == 1 && why[0].contains("symbol table"));
    }
}
