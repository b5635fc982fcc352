//! The coordinator's library: cluster configuration, job specs, the shared
//! checkpoint store and restart planning. Everything here is logic and
//! storage, and `flow`, which drives the agents through `link`s: the wire
//! protocol, or the agent library in this process for a local-only cluster.

pub mod config;
pub mod flow;
pub mod jobspec;
pub mod link;
pub mod migrate;
pub mod plan;
pub mod store;
pub mod time;

use std::fmt;
use std::path::{Path, PathBuf};

pub use config::{AgentAddr, Cluster, ClusterKey, ConfigError, Node, Timeouts};
pub use jobspec::{Cidr, JobSpec, Mac, Network, Part, SpecError};
pub use plan::{LaunchPlan, PlanError, RestartPlan, RestoreOrder};
pub use store::{Checkpoint, CheckpointId, PendingCheckpoint, Store, StoreError, Verify};

/// Any error of the coordinator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Flow(#[from] flow::FlowError),
}

/// A problem found in a file an admin or user wrote: where it is, what is
/// wrong and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    /// The file (a config file or a job spec).
    pub file: PathBuf,
    /// 1-based line, when the problem can be pinned to one.
    pub line: Option<usize>,
    /// The field, as a path such as `node[2].agent`; empty for syntax errors.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

/// 1-based line of byte `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Turns a TOML syntax or type error into a problem with its line.
pub(crate) fn toml_problem(file: &Path, text: &str, e: &toml::de::Error, fix: &str) -> FileProblem {
    FileProblem {
        file: file.to_owned(),
        line: e.span().map(|s| line_of(text, s.start)),
        field: String::new(),
        problem: e.message().trim().to_string(),
        fix: fix.to_string(),
    }
}

/// Names that become path components, cgroup names or agent job ids: a
/// safe alphabet, never `.` or `..`.
pub(crate) fn is_safe_name(s: &str, max: usize, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c))
}

/// Splits a `--nodes A,B` list, refusing empty names and repeats.
pub fn parse_node_list(s: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for n in s.split(',').map(str::trim) {
        if n.is_empty() {
            return Err(format!("empty node name in '{s}' (write A,B)"));
        }
        if out.iter().any(|o| o == n) {
            return Err(format!("node '{n}' is named twice in '{s}'"));
        }
        out.push(n.to_string());
    }
    Ok(out)
}

/// An optional field of a configuration or job spec that must be an
/// absolute path (it is used on nodes with other working directories);
/// `at` makes the file's error for the field at a span, with `hint`.
pub(crate) fn absolute_path<E>(
    value: Option<&toml::Spanned<String>>,
    field: String,
    hint: &str,
    at: impl Fn(std::ops::Range<usize>, String, String, &str) -> E,
) -> Result<Option<PathBuf>, E> {
    match value {
        Some(v) if !Path::new(v.get_ref()).is_absolute() => Err(at(
            v.span(),
            field,
            format!("'{}' is not an absolute path", v.get_ref()),
            hint,
        )),
        Some(v) => Ok(Some(PathBuf::from(v.get_ref()))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_problem_display() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
        let p = FileProblem {
            file: "/etc/ckpt/cluster.toml".into(),
            line: Some(4),
            field: "node[1].agent".into(),
            problem: "'x' is not host:port".into(),
            fix: "write e.g. 198.18.1.2:7707".into(),
        };
        assert_eq!(
            p.to_string(),
            "/etc/ckpt/cluster.toml:4: node[1].agent: 'x' is not host:port; write e.g. 198.18.1.2:7707"
        );
    }

    #[test]
    fn node_lists() {
        assert_eq!(parse_node_list("a,b").unwrap(), ["a", "b"]);
        assert_eq!(parse_node_list(" a , b ").unwrap(), ["a", "b"]);
        assert!(parse_node_list("a,,b").unwrap_err().contains("empty"));
        assert!(parse_node_list("a,b,a").unwrap_err().contains("twice"));
    }

    #[test]
    fn safe_names() {
        assert!(is_safe_name("job-1_x", 64, &['.']));
        assert!(is_safe_name("job.1", 64, &['.']));
        assert!(!is_safe_name("job.1", 64, &[]));
        assert!(!is_safe_name(".hidden", 64, &['.']));
        assert!(!is_safe_name("..", 64, &['.']));
        assert!(!is_safe_name("a/b", 64, &['.']));
        assert!(!is_safe_name("", 64, &[]));
        assert!(!is_safe_name(&"x".repeat(65), 64, &[]));
    }
}
