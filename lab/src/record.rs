//! The on-disk record of a lab under /run/ckpt-lab/<K>/: who owns it and how many nodes it has,
//! so that other processes (the CLI, `sweep`) can find, use and remove it.

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::LabError;
use crate::procs;

/// Root of every lab's runtime directory; /run is a tmpfs, so nothing here survives a reboot.
pub const RUN_DIR: &str = "/run/ckpt-lab";

/// Who keeps a lab alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    /// A process whose `Lab` value tears the lab down when dropped; stale once it is dead.
    Process {
        /// The owner's pid.
        pid: u32,
        /// Its start time in clock ticks since boot, so a reused pid is not mistaken for it.
        start_time: u64,
    },
    /// Created by `ckpt-lab up`: lives until `ckpt-lab down` (or `sweep --all`).
    Detached,
}

impl Owner {
    /// The calling process as owner.
    pub(crate) fn me() -> Owner {
        let pid = std::process::id();
        Owner::Process {
            pid,
            start_time: procs::start_time(pid).unwrap_or(0),
        }
    }

    /// Whether `sweep` should remove the lab: its owner died, or it is detached and
    /// `include_detached` asks for those too.
    pub fn stale(&self, include_detached: bool) -> bool {
        match self {
            Owner::Process { .. } => !self.alive(),
            Owner::Detached => include_detached,
        }
    }

    /// Whether the owner still exists; a detached lab is always owned.
    pub fn alive(&self) -> bool {
        match *self {
            Owner::Process { pid, start_time } => procs::alive(pid, start_time),
            Owner::Detached => true,
        }
    }
}

/// Contents of /run/ckpt-lab/<K>/lab.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub lab: u8,
    pub nodes: usize,
    pub owner: Owner,
}

/// /run/ckpt-lab/<K>
pub(crate) fn lab_dir(k: u8) -> PathBuf {
    PathBuf::from(RUN_DIR).join(k.to_string())
}

/// /run/ckpt-lab/<K>/lab.json
pub(crate) fn record_path(k: u8) -> PathBuf {
    lab_dir(k).join("lab.json")
}

/// Marker that a sweeper has claimed the lab, so that only one process tears it down.
fn claim_path(k: u8) -> PathBuf {
    lab_dir(k).join("sweeping.json")
}

impl Record {
    /// Writes the record through a temporary file and a rename, so readers never see half of it.
    pub fn write(&self) -> Result<(), LabError> {
        let path = record_path(self.lab);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).expect("a record always serializes");
        fs::write(&tmp, text).map_err(|e| LabError::io("writing", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| LabError::io("renaming into", &path, e))
    }

    /// Reads lab `k`'s record; NoSuchLab if there is none.
    pub fn read(k: u8) -> Result<Record, LabError> {
        let path = record_path(k);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(LabError::NoSuchLab(k)),
            Err(e) => return Err(LabError::io("reading", &path, e)),
        };
        serde_json::from_slice(&text).map_err(|e| LabError::Record {
            path,
            why: e.to_string(),
        })
    }
}

/// How long ago `path` was last modified; zero if unknown, so unknown never looks stale.
fn age(path: &std::path::Path) -> Duration {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

/// Makes this process the one that removes lab `k`; false if another sweeper got there first,
/// the lab is still being created, or its record (read again once held) says it is not stale.
pub(crate) fn claim(k: u8, include_detached: bool) -> bool {
    // The rename succeeds for exactly one of several concurrent sweepers.
    if fs::rename(record_path(k), claim_path(k)).is_ok() {
        // The record may have been written after the caller looked: judge the one we now hold.
        let held: Option<Record> = fs::read(claim_path(k))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok());
        if held.is_some_and(|r| !r.owner.stale(include_detached)) {
            let _ = fs::rename(claim_path(k), record_path(k));
            return false;
        }
        return true;
    }
    // No record: either `up` is between mkdir and writing it (microseconds), or a teardown or
    // sweep was interrupted. Only the second leaves the directory untouched for long.
    let quiet = Duration::from_secs(30);
    if age(&lab_dir(k)) < quiet {
        return false;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(claim_path(k))
    {
        Ok(_) => true,
        // A claim older than any sweep takes belongs to a sweeper that died.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => age(&claim_path(k)) > quiet * 2,
        Err(_) => false,
    }
}

/// Lab numbers that have a directory under /run/ckpt-lab.
pub(crate) fn lab_numbers() -> Vec<u8> {
    let mut v: Vec<u8> = fs::read_dir(RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}
