//! The agent library's error type: every variant names the pid, fd, path or
//! address it is about, so a refusal tells the operator what to look at.

use std::io;
use std::path::PathBuf;

/// Errors of dump, restore and their helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pid {pid}: no such process")]
    NoProcess { pid: i32 },
    #[error("pid {pid}: {reason}")]
    Refused { pid: i32, reason: String },
    #[error("pid {pid} fd {fd}: {kind} is not supported yet ({target}); the process was left running untouched")]
    UnsupportedFd {
        pid: i32,
        fd: i32,
        kind: String,
        target: String,
    },
    #[error("pid {pid}: mapping {start:#x}-{end:#x} ({what}) is not supported yet")]
    UnsupportedVma {
        pid: i32,
        start: u64,
        end: u64,
        what: String,
    },
    #[error("pid {pid}: {what}: {source}")]
    Sys {
        pid: i32,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid}: injected {syscall} returned {errno}")]
    Remote {
        pid: i32,
        syscall: String,
        errno: nix::errno::Errno,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Image(#[from] ckpt_proto::FrameError),
    #[error("images in {}: {reason}", dir.display())]
    BadImages { dir: PathBuf, reason: String },
    #[error("cannot restore here: {0}")]
    Incompatible(String),
    #[error("network lock {name}: {reason}")]
    NetLock { name: String, reason: String },
    #[error("job {job}: {reason}")]
    Job { job: String, reason: String },
    #[error("network interface {iface}: {reason}")]
    Net { iface: String, reason: String },
    #[error("streaming images to {peer}: {reason}")]
    Stream { peer: String, reason: String },
    #[error("held pages {hold}: {reason}")]
    Held { hold: String, reason: String },
}

/// Result with the agent's error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed syscall on behalf of `pid`.
    pub fn sys(pid: i32, what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Sys {
            pid,
            what: what.into(),
            source: source.into(),
        }
    }

    /// A network interface (or bridge) that cannot be dumped, created or
    /// configured.
    pub fn net(iface: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Net {
            iface: iface.into(),
            reason: reason.into(),
        }
    }

    /// A failed file operation on `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Adds the pid and the operation to a low-level error.
pub trait Context<T> {
    /// Names the pid and the operation that failed.
    fn ctx(self, pid: i32, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> Context<T> for std::result::Result<T, E> {
    fn ctx(self, pid: i32, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::sys(pid, what(), e))
    }
}
