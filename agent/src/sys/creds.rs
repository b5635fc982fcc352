//! Acting for a user: file-system credentials of one thread (the agent
//! opens files for a user as that user), and the ids a job's first process
//! takes before it runs its command.

use std::io;

/// A user's ids as the kernel checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// Every group the user is in (the primary one included).
    pub groups: Vec<u32>,
}

/// Sets the calling thread's supplementary groups and file-system uid and
/// gid (raw syscalls: glibc's wrappers change every thread of the process).
/// The kernel drops the file-system capabilities (CAP_DAC_OVERRIDE, ...)
/// from the effective set when the file-system uid leaves 0, so that file
/// access is checked as for the user.
fn set_thread_fs_ids(ids: &Ids) -> io::Result<()> {
    // SAFETY: groups points to ids.groups.len() gid_t values alive for the
    // call; the other calls take plain integers and act on this thread only.
    unsafe {
        if libc::syscall(
            libc::SYS_setgroups,
            ids.groups.len(),
            ids.groups.as_ptr() as *const libc::gid_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        libc::syscall(libc::SYS_setfsgid, ids.gid);
        libc::syscall(libc::SYS_setfsuid, ids.uid);
        // setfs[ug]id report the previous id, never an error: ask again
        // with an invalid id to learn whether the change took.
        let fsgid = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
        let fsuid = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
        if fsuid != ids.uid || fsgid != ids.gid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    Ok(())
}

/// Runs `f` in a thread of its own whose file accesses are checked as
/// user `ids`'s (files it creates belong to that user), other threads
/// keeping the agent's credentials.
pub fn as_user<T: Send>(ids: &Ids, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> io::Result<T> {
            set_thread_fs_ids(ids)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a thread acting for a user panicked")))
    })
}

/// The ids a freshly forked, single-threaded child gives up root for:
/// groups, then gid, then uid (after which it could not change the
/// others). Raw syscalls only, no allocation: safe between fork and exec.
///
/// # Errors
/// The errno of the first call that failed.
pub fn drop_to(uid: u32, gid: u32, groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: groups points to groups.len() gid_t values; the other calls
    // take integers. In a single-threaded child the raw calls change the
    // whole process.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Files made by a thread acting for a user are that user's, and
    /// what only root may write stays closed to it.
    #[test]
    fn a_thread_acts_for_a_user_alone() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("ckpt-creds-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .unwrap();
        let ids = Ids {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let made = dir.join("made");
        let closed = dir.join("closed");
        std::fs::write(&closed, b"root's").unwrap();
        std::fs::set_permissions(&closed, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let (wrote, read_closed) = as_user(&ids, || {
            (
                std::fs::write(&made, b"x").is_ok(),
                std::fs::read(&closed).is_ok(),
            )
        })
        .unwrap();
        assert!(wrote);
        assert!(!read_closed, "a user thread read a root-only file");
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 65534);
        // The calling thread is still root.
        assert!(std::fs::read(&closed).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
