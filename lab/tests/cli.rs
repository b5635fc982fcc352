//! The `ckpt-lab` command as a shell script uses it. Needs root.

mod common;

use std::process::{Command, Output};

use common::*;

fn ckpt_lab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ckpt-lab"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// Takes a CLI lab down when the test ends, passed or failed.
struct DownOnDrop(u8);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = ckpt_lab(&["down", &self.0.to_string()]);
    }
}

#[test]
fn cli_lab_lifecycle() {
    require_root();
    let out = ckpt_lab(&["up", "--nodes", "2", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = info["lab"].as_u64().unwrap() as u8;
    let _guard = DownOnDrop(k);
    let ks = k.to_string();
    assert_eq!(info["nodes"][1]["address"], format!("198.18.{k}.2"));
    assert_eq!(info["shared"], format!("/var/tmp/ckpt-lab-{k}/shared"));

    // Outlives the command that made it, and `sweep` leaves it alone.
    let out = ckpt_lab(&["sweep"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!text(&out.stdout).contains(&format!("swept lab {k}\n")));
    let out = ckpt_lab(&["list"]);
    assert!(
        text(&out.stdout).contains(&format!("ckl{k}-n1 ckl{k}-n2")),
        "{out:?}"
    );

    let out = ckpt_lab(&["exec", &ks, "n2", "--", "hostname"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), format!("ckl{k}-n2"));
    let out = ckpt_lab(&["exec", &ks, "1", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));

    let out = ckpt_lab(&["destroy-node", &ks, &format!("ckl{k}-n2")]);
    assert!(out.status.success(), "{out:?}");
    let out = ckpt_lab(&["exec", &ks, "2", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("destroyed"), "{out:?}");

    let out = ckpt_lab(&["down", &ks]);
    assert!(out.status.success(), "{out:?}");
    assert_gone(k);
    let out = ckpt_lab(&["down", &ks]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("does not exist"), "{out:?}");
}

#[test]
fn cli_errors_say_what_to_do() {
    require_root();
    let out = ckpt_lab(&["up", "--nodes", "0"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("1 to 99 nodes"), "{out:?}");
    let free = (0..=255u8)
        .rev()
        .find(|k| !std::path::Path::new(&format!("/run/ckpt-lab/{k}")).exists())
        .unwrap();
    let out = ckpt_lab(&["exec", &free.to_string(), "1", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("ckpt-lab list"), "{out:?}");
}

#[test]
fn a_failure_halfway_through_up_removes_what_was_built() {
    require_root();
    // An `unshare` that fails, found first on PATH: node 1's network is built by then.
    let bin = std::env::temp_dir().join(format!("ckpt-lab-fake-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("unshare");
    std::fs::write(&fake, "#!/bin/sh\necho injected failure >&2\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_ckpt-lab"))
        .args(["up", "--nodes", "2"])
        .env("PATH", path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&bin).unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("injected failure"), "{err}");
    // The message names the namespace being made, which tells us the lab number.
    let k: u8 = err
        .split("creating UTS namespace for ckl")
        .nth(1)
        .and_then(|r| r.split('-').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("no namespace named in: {err}"));
    assert_gone(k);
}
