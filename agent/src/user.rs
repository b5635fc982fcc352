//! What the agent does for users other than root: their jobs run under
//! their own ids, and they restore only checkpoints an agent wrote of their
//! own processes.
//!
//! The images a restore reads drive a root process (the restorer opens
//! files, sets credentials, binds sockets): a user's restore therefore
//! reads only a part directory that an agent holding the cluster key wrote
//! (its inventory is signed) and that no user can have changed since (the
//! directory and every file in it belong to root and are writable by root
//! alone), whose processes all belonged to that user without any
//! capability.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ckpt_proto::image::TaskCore;
use ckpt_proto::rpc::Key;
use ckpt_proto::{read_image_file, ImageKind};

pub use crate::sys::creds::Ids;

use crate::error::{Error, Result};
use crate::images::{image_name, read_inventory};

/// The ids of user `uid`: its primary group from the user database and
/// every group it is a member of.
pub fn ids_of(uid: u32) -> Result<Ids> {
    let refuse = |reason: String| Error::Job {
        job: String::new(),
        reason,
    };
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .map_err(|e| refuse(format!("looking up user {uid}: {e}")))?
        .ok_or_else(|| {
            refuse(format!(
                "user {uid} is not in this node's user database: \
                 every node needs the same users (NSS, LDAP)"
            ))
        })?;
    let name = std::ffi::CString::new(user.name.as_str())
        .map_err(|_| refuse(format!("user {uid} has a name with a NUL byte")))?;
    let groups = nix::unistd::getgrouplist(&name, user.gid)
        .map_err(|e| refuse(format!("groups of user {} ({uid}): {e}", user.name)))?;
    Ok(Ids {
        uid,
        gid: user.gid.as_raw(),
        groups: groups.iter().map(|g| g.as_raw()).collect(),
    })
}

/// Checks that user `who` may restore the part whose images are in `dir`
/// (see the module's comment); the error says what stood in the way,
/// naming the directory `shown`. `dir` should be a path that cannot change
/// under the caller (an open directory's /proc/self/fd link).
pub fn check_restore(dir: &Path, shown: &Path, who: &Ids, key: &Key) -> Result<()> {
    let bad = |reason: String| Error::BadImages {
        dir: shown.to_owned(),
        reason,
    };
    check_agent_written(dir, dir, &bad)?;
    let inv = read_inventory(dir)?;
    if inv.signature.is_empty() {
        return Err(bad(format!(
            "its inventory is not signed: user {} may restore only images a ckpt-agent service \
             wrote (ckpt-coord checkpoint), not those of a `ckpt-agent dump`",
            who.uid
        )));
    }
    if !key.verify(
        &[&ckpt_proto::image::inventory_signing_bytes(&inv)],
        &inv.signature,
    ) {
        return Err(bad(
            "the signature of its inventory does not match the cluster key: \
             changed after the dump, or written by another cluster"
                .into(),
        ));
    }
    if inv.owner_uid != who.uid {
        return Err(bad(format!(
            "its processes belong to user {}: user {} may restore only their own",
            inv.owner_uid, who.uid
        )));
    }
    for &pid in &inv.pids {
        let core: TaskCore =
            read_image_file(&dir.join(image_name(ImageKind::Core, pid)), ImageKind::Core)?;
        check_creds(&core, who).map_err(|reason| {
            bad(format!(
                "process {pid} ({}): {reason}: user {} may restore only processes of their own \
                 without privileges",
                core.comm, who.uid
            ))
        })?;
    }
    Ok(())
}

/// Checks that live process `pid` runs as user `who` alone (see
/// `check_creds`): a user checkpoints only such processes, whose images the
/// user may then read (a set-user-ID program's memory is not the user's).
pub fn check_process(pid: i32, who: &Ids) -> Result<()> {
    let st = crate::proc::status(pid)?;
    let ids = |k: &str| -> Vec<u32> {
        st.get(k)
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let cap = |k: &str| {
        st.get(k)
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(u64::MAX)
    };
    let core = TaskCore {
        comm: st.get("Name").cloned().unwrap_or_default(),
        creds: Some(ckpt_proto::image::Creds {
            uids: ids("Uid"),
            gids: ids("Gid"),
            groups: ids("Groups"),
            cap_inh: cap("CapInh"),
            cap_prm: cap("CapPrm"),
            cap_eff: cap("CapEff"),
            cap_amb: cap("CapAmb"),
            ..Default::default()
        }),
        ..Default::default()
    };
    check_creds(&core, who).map_err(|reason| Error::Refused {
        pid,
        reason: format!(
            "{} {reason}: user {} checkpoints only processes of their own without privileges",
            core.comm, who.uid
        ),
    })
}

/// Every entry under `dir` is a plain file or directory that belongs to
/// root and that only root may write: written by an agent, unchanged by
/// any user since.
fn check_agent_written(top: &Path, dir: &Path, bad: &dyn Fn(String) -> Error) -> Result<()> {
    let md = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    check_root_only(top, dir, &md, bad)?;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let path = e.path();
        let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        if md.is_dir() {
            check_agent_written(top, &path, bad)?;
        } else if md.is_file() {
            check_root_only(top, &path, &md, bad)?;
        } else {
            return Err(bad(format!(
                "{} is neither a file nor a directory: not written by an agent",
                shown(top, &path)
            )));
        }
    }
    Ok(())
}

fn check_root_only(
    top: &Path,
    path: &Path,
    md: &std::fs::Metadata,
    bad: &dyn Fn(String) -> Error,
) -> Result<()> {
    if md.uid() != 0 || md.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "{} belongs to uid {} with mode {:04o}: a user's restore reads only images that \
             belong to root and that only root may write (as an agent writes them)",
            shown(top, path),
            md.uid(),
            md.mode() & 0o7777
        )));
    }
    Ok(())
}

/// `path` as the operator knows it: relative to the part's directory.
fn shown(top: &Path, path: &Path) -> String {
    match path.strip_prefix(top) {
        Ok(rel) if rel.as_os_str().is_empty() => "the part's directory".into(),
        Ok(rel) => rel.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// Whether a dumped process ran as user `who` alone: every uid the user's,
/// every gid and supplementary group one of the user's, no capability.
fn check_creds(core: &TaskCore, who: &Ids) -> std::result::Result<(), String> {
    let c = core
        .creds
        .as_ref()
        .ok_or("its image records no credentials")?;
    if let Some(u) = c.uids.iter().find(|&&u| u != who.uid) {
        return Err(format!("it ran with uid {u}"));
    }
    let in_groups = |g: &u32| *g == who.gid || who.groups.contains(g);
    if let Some(g) = c.gids.iter().chain(&c.groups).find(|g| !in_groups(g)) {
        return Err(format!("it ran with group {g}, not one of the user's"));
    }
    if c.cap_eff | c.cap_prm | c.cap_inh | c.cap_amb != 0 {
        return Err(format!(
            "it held capabilities (effective {:#x}, permitted {:#x}, inheritable {:#x}, \
             ambient {:#x})",
            c.cap_eff, c.cap_prm, c.cap_inh, c.cap_amb
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_proto::image::Creds;

    fn core(uids: [u32; 4], gids: [u32; 4], groups: Vec<u32>, cap_eff: u64) -> TaskCore {
        TaskCore {
            comm: "job".into(),
            creds: Some(Creds {
                uids: uids.to_vec(),
                gids: gids.to_vec(),
                groups,
                cap_eff,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_users_unprivileged_processes_pass() {
        let who = Ids {
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
        };
        assert_eq!(
            check_creds(&core([1000; 4], [1000; 4], vec![27], 0), &who),
            Ok(())
        );
        assert_eq!(
            check_creds(&core([1000; 4], [27, 27, 1000, 27], vec![], 0), &who),
            Ok(())
        );
        let e = check_creds(&core([1000, 0, 1000, 1000], [1000; 4], vec![], 0), &who);
        assert_eq!(e, Err("it ran with uid 0".into()));
        let e = check_creds(&core([1000; 4], [1000; 4], vec![0], 0), &who);
        assert_eq!(e, Err("it ran with group 0, not one of the user's".into()));
        let e = check_creds(&core([1000; 4], [1000; 4], vec![], 1 << 21), &who).unwrap_err();
        assert!(e.contains("capabilities"), "{e}");
        assert!(check_creds(&TaskCore::default(), &who).is_err());
    }
}
