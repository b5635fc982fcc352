//! Errors of the lab: each names the namespace, interface, file or command involved.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building, using or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// An external command (`ip`, `nsenter`, `unshare`, ...) exited unsuccessfully.
    #[error("{context}: `{command}` failed ({status}): {stderr}")]
    Command {
        /// What the lab was doing, naming the namespace or interface.
        context: String,
        /// The command line as run.
        command: String,
        /// Exit status as the kernel reported it.
        status: String,
        /// The command's standard error, trimmed.
        stderr: String,
    },
    /// An external command could not be started at all.
    #[error("{context}: cannot run `{command}`: {source} (is it installed and on PATH?)")]
    Spawn {
        /// What the lab was doing.
        context: String,
        /// The program that could not be started.
        command: String,
        /// Why it could not be started.
        source: io::Error,
    },
    /// A file-system operation on a lab file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// The operation, e.g. "creating".
        what: String,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A system call through nix failed.
    #[error("{what} {}: {source}", path.display())]
    Sys {
        /// The operation, e.g. "entering network namespace".
        what: String,
        /// The namespace file or mount point involved.
        path: PathBuf,
        /// The underlying errno.
        source: nix::Error,
    },
    /// The node count asked for is outside what one /24 can hold next to job addresses.
    #[error("a lab has 1 to {max} nodes (addresses .1-.{max}; .100 and up are job addresses), not {asked}")]
    NodeCount {
        /// The number asked for.
        asked: usize,
        /// The largest allowed.
        max: usize,
    },
    /// All 256 lab numbers are taken.
    #[error("all 256 lab numbers are in use under /run/ckpt-lab; remove stale labs with `ckpt-lab sweep` (or `ckpt-lab list` to see them)")]
    Exhausted,
    /// No lab with that number exists on this machine.
    #[error("lab {0} does not exist (no /run/ckpt-lab/{0}/lab.json); `ckpt-lab list` shows the labs, `ckpt-lab sweep` removes remains of dead ones")]
    NoSuchLab(u8),
    /// The lab exists but has no such node, or the node was destroyed.
    #[error("lab {lab} has no node {node}: {why}")]
    NoSuchNode {
        /// Lab number.
        lab: u8,
        /// Node as named by the caller.
        node: String,
        /// Out of range, or destroyed.
        why: String,
    },
    /// The lab record on disk is unreadable.
    #[error("lab record {}: {why}", path.display())]
    Record {
        /// The record file.
        path: PathBuf,
        /// What was wrong with it.
        why: String,
    },
    /// Something did not reach the expected state in time.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What was awaited, naming the namespace or interface.
        what: String,
        /// How long we waited.
        secs: u64,
    },
    /// Teardown finished but could not remove everything.
    #[error("teardown of lab {lab} left: {}", problems.join("; "))]
    Teardown {
        /// Lab number.
        lab: u8,
        /// One line per thing left behind or step that failed.
        problems: Vec<String>,
    },
}

impl LabError {
    /// Wraps an io::Error with the operation and the path it concerned.
    pub(crate) fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }

    /// Wraps a nix error with the operation and the path it concerned.
    pub(crate) fn sys(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
        source: nix::Error,
    ) -> Self {
        LabError::Sys {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
}
