//! `ckpt-coord`: drives the agents of all nodes of a job.
//!
//! The coordinated checkpoint protocol is the subject of a later issue; this
//! binary exists so that the workspace layout of the brief is in place.

use clap::Parser;

/// Drives the ckpt agents of every node of a job.
#[derive(Parser)]
#[command(name = "ckpt-coord", version)]
struct Cli {
    /// The command (launch, checkpoint, restart, check, status, list, migrate).
    #[arg(trailing_var_arg = true)]
    args: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    eprintln!(
        "ckpt-coord: '{}' is not implemented yet; use ckpt-agent dump/restore on a single node",
        cli.args.join(" ")
    );
    std::process::exit(1)
}
