//! The `ckpt-coord` binary on a temporary cluster configuration and store:
//! what it lists, what status says of good and tampered checkpoints, how
//! bad configurations are refused, and that commands needing agents fail
//! plainly.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ckpt_coord::store::{DumpedPart, Store, INVENTORY};
use ckpt_coord::{Checkpoint, ClusterKey, JobSpec};
use ckpt_proto::image::{CheckpointOptions, Inventory};
use ckpt_proto::{write_image_file, ImageKind};

const SPEC: &str = r#"
job = "j1"
[[part]]
name = "a"
node = "n1"
command = "/bin/sleep"
args = ["100"]
[part.network]
address = "198.18.1.100/24"
[[part]]
name = "b"
node = "n2"
command = "/bin/sleep"
args = ["100"]
"#;

struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab { dir };
        let key = lab.key();
        fs::write(&key, [0x5au8; 32]).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let mut cfg = format!(
            "key = \"{}\"\nstore = \"{}\"\n",
            key.display(),
            lab.store().display()
        );
        for i in 1..=3 {
            cfg += &format!("\n[[node]]\nname = \"n{i}\"\nagent = \"198.18.1.{i}:7707\"\n");
        }
        fs::write(lab.config(), cfg).unwrap();
        fs::write(lab.spec(), SPEC).unwrap();
        lab
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn key(&self) -> PathBuf {
        self.path("cluster.key")
    }
    fn config(&self) -> PathBuf {
        self.path("cluster.toml")
    }
    fn store(&self) -> PathBuf {
        self.path("store")
    }
    fn spec(&self) -> PathBuf {
        self.path("job.toml")
    }

    /// A committed, signed checkpoint of j1 as two agents would leave it.
    fn checkpoint(&self) -> Checkpoint {
        let spec = JobSpec::load(&self.spec(), None).unwrap();
        let store = Store::new(&self.store());
        let p = store.begin("j1").unwrap();
        for part in ["a", "b"] {
            let d = p.part_dir(part).unwrap();
            fs::write(d.join("pages-1.img"), vec![1u8; 5000]).unwrap();
            let inv = Inventory {
                root_pid: 1,
                ..Default::default()
            };
            write_image_file(&d.join(INVENTORY), ImageKind::Inventory, &inv).unwrap();
        }
        let key = ClusterKey::load(&self.key()).unwrap();
        let parts = [("a", "n1"), ("b", "n2")].map(|(name, node)| DumpedPart {
            name: name.into(),
            node: node.into(),
        });
        let opts = CheckpointOptions {
            leave_running: false,
            tcp_established: true,
        };
        p.commit(&spec, &parts, opts, Some(&key)).unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, None)
    }

    fn run_env(&self, args: &[&str], env: Option<&Path>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ckpt-coord"));
        c.env_remove("CKPT_CLUSTER").env_remove("CKPT_LOG");
        match env {
            Some(p) => {
                c.env("CKPT_CLUSTER", p);
            }
            None => {
                c.arg("--config").arg(self.config());
            }
        }
        c.args(args).output().unwrap()
    }
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

#[test]
fn list_shows_committed_and_uncommitted_checkpoints() {
    let lab = Lab::new();
    let o = lab.run(&["list"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("no jobs in the checkpoint store"),
        "{}",
        out(&o)
    );

    let c1 = lab.checkpoint();
    let c2 = lab.checkpoint();
    // A checkpoint whose coordinator died before the commit.
    let half = Store::new(&lab.store()).begin("j1").unwrap();
    let half_id = half.id().to_string();
    std::mem::forget(half);

    let o = lab.run(&["list"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let text = out(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("JOB"), "{text}");
    // Newest first; the uncommitted one is shown as such.
    assert!(
        lines[1].contains(&half_id) && lines[1].contains("uncommitted"),
        "{text}"
    );
    assert!(
        lines[2].contains(&c2.id.to_string()) && lines[2].contains("a@n1,b@n2"),
        "{text}"
    );
    assert!(lines[3].contains(&c1.id.to_string()), "{text}");

    let o = lab.run(&["list", "--json"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["job"], "j1");
    assert_eq!(job["checkpoints"].as_array().unwrap().len(), 2);
    assert_eq!(job["checkpoints"][0]["id"], c2.id.to_string());
    assert_eq!(job["checkpoints"][0]["parts"][1]["node"], "n2");
    assert_eq!(job["checkpoints"][0]["signed"], true);
    assert_eq!(job["checkpoints"][0]["leave_running"], false);
    assert_eq!(job["uncommitted"][0], half_id);
}

#[test]
fn status_verifies_and_names_what_was_tampered_with() {
    let lab = Lab::new();
    let c = lab.checkpoint();
    let o = lab.run(&["status", "j1"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let text = out(&o);
    assert!(text.contains(&format!("checkpoint {}", c.id)), "{text}");
    assert!(text.contains("verified (signature valid"), "{text}");
    assert!(text.contains("job stopped"), "{text}");
    assert!(
        text.contains("part a") && text.contains("node n1"),
        "{text}"
    );
    assert!(
        text.contains("part b") && text.contains("node n2"),
        "{text}"
    );

    // Same size, other content: only --full reads it.
    let pages = c.part_dir("b").join("pages-1.img");
    fs::write(&pages, vec![2u8; 5000]).unwrap();
    let o = lab.run(&["status", "j1"]);
    assert!(out(&o).contains("verified"), "{}", out(&o));
    let o = lab.run(&["status", "j1", "--full", "--json"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    let cp = &v["checkpoints"][0];
    assert_eq!(cp["verified"], false, "{v}");
    let state = cp["state"].as_str().unwrap();
    assert!(
        state.contains("part 'b'") && state.contains("pages-1.img"),
        "{state}"
    );

    // Truncated: the quick check sees it.
    fs::write(&pages, vec![1u8; 100]).unwrap();
    let o = lab.run(&["status", "j1"]);
    let text = out(&o);
    assert!(
        text.contains("REFUSED")
            && text.contains("part 'b'")
            && text.contains("pages-1.img has 100 bytes"),
        "{text}"
    );

    // A restart refuses it before anything else.
    let o = lab.run(&["restart", "j1"]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("is refused") && err(&o).contains("part 'b'"),
        "{}",
        err(&o)
    );
    assert!(!err(&o).contains("not wired"), "{}", err(&o));

    // The overview says the same.
    let o = lab.run(&["status"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("j1") && out(&o).contains("REFUSED"),
        "{}",
        out(&o)
    );
}

#[test]
fn status_of_an_unknown_job_fails() {
    let lab = Lab::new();
    lab.checkpoint();
    let o = lab.run(&["status", "nope"]);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("no job 'nope'"), "{}", err(&o));
    let o = lab.run(&["status", "../etc"]);
    assert_eq!(code(&o), 2, "a bad job id is bad usage: {}", err(&o));
}

#[test]
fn a_key_readable_by_others_is_refused_with_the_fix() {
    let lab = Lab::new();
    fs::set_permissions(lab.key(), fs::Permissions::from_mode(0o644)).unwrap();
    let o = lab.run(&["list"]);
    assert_eq!(code(&o), 1);
    let e = err(&o);
    assert!(
        e.contains(&format!("{}:1: key:", lab.config().display())),
        "{e}"
    );
    assert!(e.contains("mode 0644"), "{e}");
    assert!(
        e.contains(&format!("chmod 600 {}", lab.key().display())),
        "{e}"
    );
    assert!(out(&o).is_empty());
}

#[test]
fn bad_configs_name_file_line_and_field() {
    let lab = Lab::new();
    let cfg = fs::read_to_string(lab.config()).unwrap();
    fs::write(lab.config(), cfg.replace("198.18.1.2:7707", "198.18.1.2")).unwrap();
    let o = lab.run(&["list"]);
    assert_eq!(code(&o), 1);
    let e = err(&o);
    assert!(
        e.contains("cluster.toml:10: node[1].agent: '198.18.1.2' is not host:port"),
        "{e}"
    );

    let o = lab.run_env(&["list"], Some(&lab.path("missing.toml")));
    assert_eq!(code(&o), 1);
    let e = err(&o);
    assert!(e.contains("missing.toml (from CKPT_CLUSTER)"), "{e}");
}

#[test]
fn the_environment_names_the_config_and_the_option_wins() {
    let lab = Lab::new();
    lab.checkpoint();
    let o = lab.run_env(&["list"], Some(&lab.config()));
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("j1"));
    // --config beats CKPT_CLUSTER.
    let empty = lab.path("empty.toml");
    fs::write(
        &empty,
        format!("store = \"{}\"\n", lab.path("other").display()),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ckpt-coord"))
        .env("CKPT_CLUSTER", lab.config())
        .args(["--config", empty.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("local-only") && out(&o).contains("no jobs"),
        "{}",
        out(&o)
    );
}

#[test]
fn commands_name_the_node_whose_agent_they_cannot_reach() {
    let lab = Lab::new();
    lab.checkpoint();
    let spec = lab.spec();
    let spec = spec.to_str().unwrap();
    // No agent serves the configured addresses.
    for job in ["j2", "j3"] {
        let o = lab.run(&["launch", spec, "--job", job]);
        assert_eq!(code(&o), 1, "{}", err(&o));
        assert!(err(&o).contains("connect failed on node n1"), "{}", err(&o));
        assert!(out(&o).is_empty(), "launch printed {}", out(&o));
    }
    let o = lab.run(&["adopt", spec, "--job", "j4"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    for (args, want) in [
        // j4's parts may still run (nobody can say): their addresses are
        // not to be taken.
        (
            vec!["launch", spec, "--nodes", "n1,n2", "--job", "j3"],
            "address 198.18.1.100 belongs to part a of job j4 on node n1, which may still run",
        ),
        (vec!["check"], "node n1"),
        (vec!["check", "--nodes", "n3"], "node n3"),
        (vec!["kill", "j4"], "job j4: could not kill a@n1"),
        (
            vec!["wait", "j4", "--timeout", "1"],
            "job j4 still runs after",
        ),
        (
            vec!["migrate", "j4", "--to", "n2,n3"],
            "migration of job j4 refused before it was touched: node n2",
        ),
    ] {
        let o = lab.run(&args);
        assert_eq!(code(&o), 1, "{args:?}: {}", err(&o));
        assert!(err(&o).contains(want), "{args:?}: {}", err(&o));
        if !["check", "kill", "wait"].contains(&args[0]) {
            assert!(out(&o).is_empty(), "{args:?} printed {}", out(&o));
        }
    }
    // A launch that failed leaves no trace of its job.
    for job in ["j2", "j3"] {
        assert!(
            !lab.store().join(job).exists(),
            "a failed launch left {job} in the store"
        );
    }
    // What can be checked without agents is checked first.
    let cases: &[(&[&str], &str)] = &[
        (
            &["launch", spec, "--nodes", "n1,n9"],
            "node n9: not in the cluster configuration",
        ),
        (
            &["launch", spec, "--nodes", "n3"],
            "asks for node n1 (in its job spec), which is not among --nodes n3",
        ),
        (
            &["restart", "j1", "--nodes", "n3"],
            "parts on 2 nodes (n1, n2), but 1 node is given (n3)",
        ),
        (
            &["restart", "j1", "--checkpoint", "20000101T000000-7"],
            "no checkpoint '20000101T000000-7' of job 'j1'",
        ),
        (&["restart", "nojob"], "no job 'nojob'"),
        // Wired to the agents now: a job never launched nor adopted has
        // no spec to checkpoint by.
        (&["checkpoint", "j1", "--stop"], "has no recorded job spec"),
        (
            &["checkpoint", "j1", "--leave-running"],
            "ckpt-coord adopt JOBSPEC --job j1",
        ),
        (
            &["check", "--checkpoint", "20000101T000000-7"],
            "no checkpoint '20000101T000000-7'",
        ),
        (&["migrate", "j4", "--to", "n3"], "but 1 node is given (n3)"),
        (
            &["launch", "/nonexistent/spec.toml"],
            "/nonexistent/spec.toml",
        ),
    ];
    for (args, want) in cases {
        let o = lab.run(args);
        assert_eq!(code(&o), 1, "{args:?}: {}", err(&o));
        assert!(
            err(&o).contains(want),
            "{args:?}\n got: {}\nwant: {want}",
            err(&o)
        );
    }
    let bad = lab.path("bad.toml");
    fs::write(
        &bad,
        "[[part]]\nname = \"a\"\ncommand = \"x\"\n[[part]]\nname = \"a\"\ncommand = \"y\"\n",
    )
    .unwrap();
    let o = lab.run(&["launch", bad.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("bad.toml:5: part[1].name: two parts are called 'a'"),
        "{}",
        err(&o)
    );
}

#[test]
fn bad_usage_exits_2() {
    let lab = Lab::new();
    for args in [
        vec!["checkpoint"],
        vec!["checkpoint", "j1", "--stop", "--leave-running"],
        vec!["migrate", "j1"],
        vec!["restart", "j1", "--nodes", "n1,,n2"],
        vec!["restart", "j1", "--nodes", "n1,n1"],
        vec!["frobnicate"],
        vec![],
    ] {
        let o = lab.run(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", err(&o));
    }
}

#[test]
fn adopt_records_the_spec_that_checkpoint_needs() {
    let lab = Lab::new();
    let spec = lab.spec();
    let o = lab.run(&["--json", "adopt", spec.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["job"], "j1");
    assert_eq!(v["parts"][1]["agent_job"], "j1.b");
    assert!(lab.store().join("j1").join("job.toml").is_file());
    // The agents are unreachable: the error names the first node, and no
    // checkpoint directory is left behind.
    let o = lab.run(&["checkpoint", "j1"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("connect failed on node n"), "{}", err(&o));
    // (Besides the job's lock file, which stays.)
    let left: Vec<_> = fs::read_dir(lab.store().join("j1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(left, ["job.toml"], "left in the store: {left:?}");
    // A part without a node cannot be adopted: nobody knows where it runs.
    let unplaced = lab.path("unplaced.toml");
    fs::write(&unplaced, SPEC.replace("node = \"n2\"\n", "")).unwrap();
    let o = lab.run(&["adopt", unplaced.to_str().unwrap(), "--job", "j2"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("part b has no node"), "{}", err(&o));
    assert!(!lab.store().join("j2").exists());
}
