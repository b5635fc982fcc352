//! `ckpt-agent check`: probes of every kernel feature the engine uses, the
//! node fingerprint, and the compatibility test between two fingerprints.
//!
//! Every probe exercises its feature on a throw-away child (or object) and
//! cleans up after itself; probes run concurrently, one thread each, so the
//! whole check stays well under two seconds.

mod cgroup;
mod compat;
mod fingerprint;
mod mem;
mod ns;
mod ptrace;
mod tcp;
mod vdso;

use std::fmt::Display;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use ckpt_proto::image::NodeFingerprint;
pub use compat::incompatibilities;
pub use fingerprint::fingerprint;

/// The result of one probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    /// Probe name (snake_case, stable: used by `--feature`).
    pub name: &'static str,
    /// Whether the feature works here.
    pub ok: bool,
    /// What was observed, or why it is missing.
    pub detail: String,
    /// What in ckpt needs the feature.
    pub needed_by: &'static str,
    /// Whether dump or restore cannot work without it.
    pub required: bool,
}

/// Why probing or fingerprinting could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// `--feature` named a probe that does not exist.
    #[error("unknown feature {name:?}; valid names: {valid}")]
    UnknownProbe { name: String, valid: String },
    /// A file the fingerprint needs could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file the fingerprint needs did not have the expected shape.
    #[error("{path}: {what}")]
    Parse { path: PathBuf, what: String },
}

/// A probe's outcome: Ok(what was observed) or Err(why it is missing).
type Outcome = Result<String, String>;

struct ProbeDef {
    name: &'static str,
    needed_by: &'static str,
    required: bool,
    run: fn() -> Outcome,
}

const fn p(
    name: &'static str,
    needed_by: &'static str,
    required: bool,
    run: fn() -> Outcome,
) -> ProbeDef {
    ProbeDef {
        name,
        needed_by,
        required,
        run,
    }
}

const PROBES: &[ProbeDef] = &[
    p("ptrace_seize", "dump", true, ptrace::seize),
    p(
        "ptrace_interrupt_syscall",
        "dump (tasks inside syscalls)",
        false,
        ptrace::interrupt_syscall,
    ),
    p(
        "ptrace_xstate",
        "dump, restore (registers)",
        true,
        ptrace::xstate,
    ),
    p(
        "ptrace_sigmask",
        "dump, restore (signal mask)",
        true,
        ptrace::sigmask,
    ),
    p(
        "ptrace_rseq",
        "dump (rseq registration)",
        false,
        ptrace::rseq,
    ),
    p(
        "ptrace_seccomp",
        "dump (seccomp filters)",
        false,
        ptrace::seccomp,
    ),
    p("pidfd", "dump (files)", true, ptrace::pidfd),
    p("kcmp", "dump (shared files)", true, ptrace::kcmp),
    p(
        "clone3_set_tid",
        "restore (same PIDs)",
        true,
        ns::clone3_set_tid,
    ),
    p(
        "process_vm",
        "dump, restore (memory)",
        true,
        mem::process_vm,
    ),
    p("map_files", "dump (file mappings)", false, mem::map_files),
    p("pagemap", "dump (memory)", true, mem::pagemap),
    p(
        "pagemap_scan",
        "dump (fast page scan)",
        false,
        mem::pagemap_scan,
    ),
    p(
        "soft_dirty",
        "nothing yet (a tracker for kernels without uffd_wp_async)",
        false,
        mem::soft_dirty,
    ),
    p("uffd", "lazy restore", false, mem::uffd),
    p("uffd_wp", "incremental dump", false, mem::uffd_wp),
    p(
        "uffd_wp_async",
        "incremental dump",
        false,
        mem::uffd_wp_async,
    ),
    p("memfd", "restore (shared memory)", false, mem::memfd),
    p(
        "prctl_mm_map",
        "restore (mm fields)",
        true,
        mem::prctl_mm_map,
    ),
    p("tcp_repair", "tcp", false, tcp::tcp_repair),
    p("ns_pid", "job launcher, restore", false, ns::ns_pid),
    p("ns_ipc", "job launcher", false, ns::ns_ipc),
    p("ns_uts", "job launcher", false, ns::ns_uts),
    p("ns_mnt", "job launcher", false, ns::ns_mnt),
    p("ns_net", "job launcher, tcp", false, ns::ns_net),
    p("ns_user", "job launcher", false, ns::ns_user),
    p(
        "ns_time",
        "restore (clocks across nodes)",
        false,
        ns::ns_time,
    ),
    p("ns_cgroup", "job launcher", false, ns::ns_cgroup),
    p(
        "cgroup_v1_freezer",
        "dump (freeze)",
        false,
        cgroup::v1_freezer,
    ),
    p(
        "cgroup_v2_freeze",
        "dump (freeze)",
        false,
        cgroup::v2_freeze,
    ),
    p("nftables", "tcp (network lock)", false, ns::nftables),
    p(
        "veth",
        "job launcher, restore (job interfaces)",
        false,
        ns::veth,
    ),
    p(
        "sysv_ipc_ids",
        "restore (SysV IPC)",
        false,
        ns::sysv_ipc_ids,
    ),
    p("vdso_layout", "restore (vdso)", true, vdso::layout),
    p(
        "vdso_mremap",
        "restore (vdso at its old address)",
        false,
        vdso::mremap,
    ),
];

/// Names of every probe, in report order.
pub fn probe_names() -> Vec<&'static str> {
    PROBES.iter().map(|p| p.name).collect()
}

/// Runs the probes named in `filter` (all when empty), concurrently.
pub fn run_probes(filter: &[String]) -> Result<Vec<ProbeResult>, CheckError> {
    for name in filter {
        if !PROBES.iter().any(|p| p.name == name) {
            return Err(CheckError::UnknownProbe {
                name: name.clone(),
                valid: probe_names().join(", "),
            });
        }
    }
    let selected: Vec<&ProbeDef> = PROBES
        .iter()
        .filter(|p| filter.is_empty() || filter.iter().any(|f| f == p.name))
        .collect();
    let started = Instant::now();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = selected
            .iter()
            .map(|def| {
                let h = std::thread::Builder::new()
                    .name(format!("probe-{}", def.name))
                    .spawn_scoped(s, || run_one(def));
                (def, h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(def, h)| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| result(def, Err("probe panicked".into()))),
                Err(e) => result(def, Err(format!("cannot start probe thread: {e}"))),
            })
            .collect::<Vec<_>>()
    });
    tracing::debug!(probes = results.len(), elapsed = ?started.elapsed(), "probes done");
    Ok(results)
}

fn run_one(def: &ProbeDef) -> ProbeResult {
    let t = Instant::now();
    let out = (def.run)();
    tracing::debug!(probe = def.name, ok = out.is_ok(), elapsed = ?t.elapsed(), "probe");
    result(def, out)
}

fn result(def: &ProbeDef, out: Outcome) -> ProbeResult {
    let (ok, detail) = match out {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    ProbeResult {
        name: def.name,
        ok,
        detail,
        needed_by: def.needed_by,
        required: def.required,
    }
}

/// Default time a probe waits for its child.
const CHILD_TIMEOUT: Duration = Duration::from_secs(3);

/// Prefixes an error with what was being done.
fn ctx<E: Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Like [`ctx`] for the engine's `io::Error` wrappers: words the error as
/// its errno, the way the probes' own wrappers do.
fn errno_ctx(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {}", crate::sys::probe::errno_of(e))
}

/// Runs the check for the command line; returns the exit code.
pub fn run_cli(json: bool, features: &[String]) -> i32 {
    let probes = match run_probes(features) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ckpt-agent check: {e}");
            return 2;
        }
    };
    let fp = fingerprint();
    let missing: Vec<&str> = probes
        .iter()
        .filter(|p| p.required && !p.ok)
        .map(|p| p.name)
        .collect();
    if json {
        let fp_json = match &fp {
            Ok(f) => serde_json::to_value(f).unwrap_or(serde_json::Value::Null),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let doc = serde_json::json!({
            "probes": probes,
            "fingerprint": fp_json,
            "ok": missing.is_empty(),
            "missing_required": missing,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", render_table(&probes));
        match &fp {
            Ok(f) => print!("{}", render_fingerprint(f)),
            Err(e) => println!("fingerprint: unavailable: {e}"),
        }
    }
    if let Err(e) = &fp {
        tracing::warn!("fingerprint: {e}");
    }
    if missing.is_empty() {
        0
    } else {
        eprintln!(
            "ckpt-agent check: required kernel feature(s) missing: {}",
            missing.join(", ")
        );
        1
    }
}

fn render_table(probes: &[ProbeResult]) -> String {
    let nw = probes
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(4)
        .max(7);
    let dw = probes
        .iter()
        .map(|p| p.detail.chars().count())
        .max()
        .unwrap_or(3)
        .clamp(3, 90);
    let mut s = format!(
        "{:<nw$}  {:<7}  {:<dw$}  NEEDED BY\n",
        "FEATURE", "STATUS", "WHY"
    );
    for p in probes {
        let status = match (p.ok, p.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "missing",
        };
        let req = if p.required { " (required)" } else { "" };
        s += &format!(
            "{:<nw$}  {:<7}  {:<dw$}  {}{}\n",
            p.name, status, p.detail, p.needed_by, req
        );
    }
    s
}

fn render_fingerprint(f: &NodeFingerprint) -> String {
    let mut s = String::from("\nnode fingerprint\n");
    let mut kv = |k: &str, v: String| s += &format!("  {k:<17} {v}\n");
    kv("hostname", f.hostname.clone());
    kv("kernel", f.kernel_release.clone());
    kv("arch", f.arch.clone());
    kv("cpu", f.cpu_model.clone());
    kv("cpu flags", format!("{} flags", f.cpu_flags.len()));
    kv(
        "xsave",
        format!(
            "xcr0 {:#x} ({}), {} bytes",
            f.xcr0,
            compat::xsave_names(f.xcr0).join(" "),
            f.xsave_size
        ),
    );
    let layout: Vec<String> = f
        .vdso_layout
        .iter()
        .map(|a| format!("{} {} KiB @{:+#x}", a.name, a.size / 1024, a.offset))
        .collect();
    kv("vdso layout", layout.join(", "));
    kv("vdso symtab", f.vdso_symtab_hash.clone());
    kv("page size", f.page_size.to_string());
    kv("cgroup mode", f.cgroup_mode.clone());
    kv(
        "missing caps",
        if f.missing_caps.is_empty() {
            "none".into()
        } else {
            f.missing_caps.join(", ")
        },
    );
    s
}

/// Why this node cannot restore the checkpoint in `dir`, one reason per
/// entry naming what is wrong (empty: it can): the checkpoint's integrity,
/// the CPU, xsave and vdso layout it was taken with, and every kernel
/// feature it needs, probed here.
pub fn restorable(dir: &std::path::Path) -> Vec<String> {
    let inv = match crate::images::read_inventory(dir) {
        Ok(i) => i,
        Err(e) => return vec![e.to_string()],
    };
    let mut why = Vec::new();
    if inv.pre_dump {
        why.push("it is a pre-dump (memory only): restore the dump made on it instead".into());
    }
    if let Err(e) = crate::images::verify(dir, &inv) {
        why.push(e.to_string());
    } else if let Err(e) = crate::images::chain(dir, &inv) {
        why.push(e.to_string());
    }
    why.extend(incompatible(&inv));
    why
}

/// Why this node cannot run what the checkpoint in `dir` was taken on (its
/// CPU, kernel and the kernel features it needs), without checking the
/// images themselves: empty if it can.
pub fn compatible(dir: &std::path::Path) -> Vec<String> {
    match crate::images::read_inventory(dir) {
        Ok(inv) => incompatible(&inv),
        Err(e) => vec![e.to_string()],
    }
}

fn incompatible(inv: &ckpt_proto::image::Inventory) -> Vec<String> {
    let mut why = Vec::new();
    match (fingerprint(), &inv.node) {
        (Ok(here), Some(n)) => why.extend(incompatibilities(n, &here)),
        (Ok(_), None) => why.push("the checkpoint does not say which node it was taken on".into()),
        (Err(e), _) => why.push(format!("cannot fingerprint this node: {e}")),
    }
    let known: Vec<String> = inv
        .needs_features
        .iter()
        .filter(|f| PROBES.iter().any(|p| p.name == f.as_str()))
        .cloned()
        .collect();
    for f in inv.needs_features.iter().filter(|f| !known.contains(f)) {
        why.push(format!(
            "needs kernel feature {f}, which this ckpt does not know"
        ));
    }
    // (No features named: probing all of them would say nothing about
    // this checkpoint.)
    if known.is_empty() {
        return why;
    }
    match run_probes(&known) {
        Ok(results) => why.extend(
            results
                .into_iter()
                .filter(|r| !r.ok)
                .map(|r| format!("needs kernel feature {}: {}", r.name, r.detail)),
        ),
        Err(e) => why.push(e.to_string()),
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_feature_is_an_error_naming_valid_ones() {
        let err = run_probes(&["no_such_probe".into()]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no_such_probe") && msg.contains("ptrace_seize"),
            "{msg}"
        );
        assert_eq!(run_cli(false, &["bogus".into()]), 2);
    }

    #[test]
    fn names_are_unique_snake_case() {
        let names = probe_names();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        for n in names {
            assert!(n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
    }

    #[test]
    fn table_renders_every_probe() {
        let probes = vec![
            ProbeResult {
                name: "a",
                ok: true,
                detail: "fine".into(),
                needed_by: "dump",
                required: true,
            },
            ProbeResult {
                name: "b",
                ok: false,
                detail: "ENOSYS".into(),
                needed_by: "tcp",
                required: false,
            },
        ];
        let t = render_table(&probes);
        assert!(t.contains("a ") && t.contains("ok") && t.contains("missing") && t.contains("tcp"));
    }

    /// Runs every probe for real (needs root, as the agent does).
    #[test]
    fn run_probes_returns_every_probe() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: not root");
            return;
        }
        let t = Instant::now();
        let res = run_probes(&[]).expect("probes run");
        let elapsed = t.elapsed();
        let names: Vec<&str> = res.iter().map(|r| r.name).collect();
        assert_eq!(names, probe_names());
        for r in &res {
            eprintln!("{:<26} {:<5} {}", r.name, r.ok, r.detail);
        }
        eprintln!("elapsed {elapsed:?}");
        for r in res.iter().filter(|r| r.required) {
            assert!(r.ok, "required probe {} failed: {}", r.name, r.detail);
        }
        let one = run_probes(&["memfd".into()]).expect("one probe");
        assert_eq!(one.len(), 1);
        assert!(one[0].ok, "{}", one[0].detail);
    }
}
