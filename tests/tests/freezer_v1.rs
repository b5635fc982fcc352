//! Jobs frozen with the cgroup v1 freezer (where a frozen task reaches its
//! ptrace stop only once thawed), chosen with `CKPT_CGROUP_FREEZER=v1` for
//! every agent this test process starts. Its own test binary: the
//! variable is process-wide.

use ckpt_tests::{run_case, Mode};

fn v1_job(name: &str) {
    let v1 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" - cgroup ") && l.contains("freezer"));
    assert!(
        v1,
        "this machine has no cgroup v1 freezer mounted; the v1 path cannot be tested here"
    );
    std::env::set_var("CKPT_CGROUP_FREEZER", "v1");
    run_case(env!("CARGO_BIN_EXE_zdtm-case"), name, Mode::Job)
}

#[test]
fn threads_in_v1_freezer() {
    v1_job("threads")
}

#[test]
fn process_tree_in_v1_freezer() {
    v1_job("process_tree")
}
