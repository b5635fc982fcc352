//! Running the external tools (`ip`, `bridge`, `nsenter`, `unshare`) with their failures reported.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::LabError;

/// The command line as a shell user would type it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, feeding it `input`, and returns its stdout; a non-zero exit is an
/// error carrying `context` and the command's stderr.
pub(crate) fn run_input(
    context: &str,
    cmd: &mut Command,
    input: Option<&str>,
) -> Result<String, LabError> {
    let line = describe(cmd);
    tracing::debug!(%context, command = %line, "running");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let spawn_err = |source| LabError::Spawn {
        context: context.to_string(),
        command: line.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(text) = input {
        // Dropping stdin after writing is what tells `ip -batch -` the batch is complete.
        let mut stdin = child.stdin.take().expect("stdin was piped");
        stdin.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        let mut command = line;
        if let Some(text) = input {
            command.push_str(" <<< ");
            command.push_str(&text.trim().replace('\n', "; "));
        }
        return Err(LabError::Command {
            context: context.to_string(),
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` to completion and returns its stdout, or an error naming `context`.
pub(crate) fn run(context: &str, cmd: &mut Command) -> Result<String, LabError> {
    run_input(context, cmd, None)
}

/// `ip` with the given arguments, optionally inside network namespace `netns` (by name).
pub(crate) fn ip(netns: Option<&str>, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    if let Some(ns) = netns {
        c.args(["-n", ns]);
    }
    c.args(args);
    c
}
