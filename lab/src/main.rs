//! `ckpt-lab`: builds, uses and removes simulated clusters from shell scripts.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use anyhow::{bail, Result};
use ckpt_lab::{Lab, Owner};
use clap::{Parser, Subcommand};

/// Simulated clusters on one machine: one network + UTS namespace per node, a fabric bridge,
/// a shared directory. Must run as root.
#[derive(Parser)]
#[command(name = "ckpt-lab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a lab that stays after this command exits (until `down`). Prints shell
    /// assignments (LAB=, SUBNET=, SHARED=, NODES=, ADDRESSES=) for `eval`, or JSON.
    Up {
        /// Number of nodes (1 to 99).
        #[arg(long)]
        nodes: usize,
        /// Print JSON instead of shell assignments.
        #[arg(long)]
        json: bool,
    },
    /// Run a command on a node (its network and UTS namespaces); exits with its status.
    Exec {
        /// Lab number.
        lab: u8,
        /// Node: 2, n2 or ckl<K>-n2.
        node: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Simulate losing a node: kill its processes and jobs and remove its namespaces.
    DestroyNode {
        /// Lab number.
        lab: u8,
        /// Node: 2, n2 or ckl<K>-n2.
        node: String,
    },
    /// Remove a lab entirely.
    Down {
        /// Lab number.
        lab: u8,
    },
    /// List the labs on this machine.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove labs whose owning process is gone (and remains of labs without a record).
    Sweep {
        /// Also remove labs made by `ckpt-lab up`.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ckpt-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root: it creates network namespaces, routes and mounts (try sudo)");
    }
    match cli.cmd {
        Cmd::Up { nodes, json } => up(nodes, json)?,
        Cmd::Exec { lab, node, command } => {
            let lab = Lab::open(lab)?;
            let node = lab.find_node(&node)?;
            let mut cmd = node.command(&command[0]);
            cmd.args(&command[1..]);
            // exec rather than spawn: exit status, signals and the terminal pass through.
            let err = cmd.exec();
            bail!("cannot run nsenter for {}: {err}", node.name());
        }
        Cmd::DestroyNode { lab, node } => {
            let lab = Lab::open(lab)?;
            let node = lab.find_node(&node)?;
            node.destroy()?;
            println!("destroyed {}", node.name());
        }
        Cmd::Down { lab: k } => {
            let lab = Lab::open(k)?;
            lab.down()?;
            println!("lab {k} removed");
        }
        Cmd::List { json } => list(json)?,
        Cmd::Sweep { all } => {
            let swept = Lab::sweep(all)?;
            if swept.is_empty() {
                println!("nothing to sweep");
            }
            for k in swept {
                println!("swept lab {k}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn up(nodes: usize, json: bool) -> Result<()> {
    let lab = Lab::up(nodes)?;
    let info = serde_json::json!({
        "lab": lab.number(),
        "subnet": lab.subnet().to_string(),
        "shared": lab.shared_dir(),
        "fabric_netns": lab.fabric_netns(),
        "nodes": lab.nodes().iter().map(|n| serde_json::json!({
            "name": n.name(),
            "address": n.address().to_string(),
            "hostname": n.hostname(),
            "netns": n.netns(),
            "netns_path": n.netns_path(),
            "uts_path": n.uts_path(),
            "bridge": n.bridge(),
        })).collect::<Vec<_>>(),
        "first_job_address": lab.job_address(0).to_string(),
    });
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name().to_string()).collect();
    let addrs: Vec<String> = lab
        .nodes()
        .iter()
        .map(|n| n.address().to_string())
        .collect();
    let k = lab.persist()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("LAB={k}");
        println!("SUBNET={}", info["subnet"].as_str().unwrap_or_default());
        println!("SHARED={}", ckpt_lab::shared_dir(k).display());
        println!("NODES='{}'", names.join(" "));
        println!("ADDRESSES='{}'", addrs.join(" "));
    }
    eprintln!("lab {k} is up; run on a node with `ckpt-lab exec {k} 1 -- CMD`, remove with `ckpt-lab down {k}`");
    Ok(())
}

fn list(json: bool) -> Result<()> {
    let labs = Lab::list();
    if json {
        println!("{}", serde_json::to_string_pretty(&labs)?);
        return Ok(());
    }
    if labs.is_empty() {
        println!("no labs");
        return Ok(());
    }
    println!("{:<4} {:<26} {:<16} NODES", "LAB", "OWNER", "SUBNET");
    for l in labs {
        let owner = match &l.owner {
            Some(Owner::Process { pid, .. }) if l.owner_alive => format!("pid {pid}"),
            Some(Owner::Process { pid, .. }) => format!("pid {pid} (dead: sweep)"),
            Some(Owner::Detached) => "ckpt-lab up".to_string(),
            None => "no record".to_string(),
        };
        println!(
            "{:<4} {:<26} {:<16} {}",
            l.lab,
            owner,
            l.subnet.to_string(),
            l.nodes.join(" ")
        );
    }
    Ok(())
}
