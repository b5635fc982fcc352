//! The checkpoint store: a directory every node sees (the cluster's shared
//! file system) holding `JOBID/CHECKPOINT/`, with one image directory per
//! part (`part-NAME/`, written by that part's agent, with its own
//! inventory) and `manifest.img`, committed last. A checkpoint directory
//! without a manifest is a checkpoint being written or one that failed: it
//! is never listed, opened or restored, and pruning removes it once a newer
//! checkpoint is committed.
//!
//! The manifest records every file of every part with its size and SHA-256
//! and is signed with the cluster key, so that a changed, truncated or
//! added file, or a changed manifest, is refused before anything restores.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ckpt_proto::image::{CheckpointOptions, Manifest, ManifestPart, PartFile};
use ckpt_proto::{read_image_file, write_image_file, FrameError, ImageKind};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::ClusterKey;
use crate::is_safe_name;
use crate::jobspec::{check_job_id, JobSpec};

/// The manifest's file name in a checkpoint directory.
pub const MANIFEST: &str = ckpt_proto::image::MANIFEST_FILE;
/// A job's recorded spec, in its directory of the store.
pub const JOB_SPEC: &str = "job.toml";
/// A job's lock file, in its directory of the store (see
/// [`Store::lock_job`]).
pub const JOB_LOCK: &str = ".lock";

/// A job's lock in the store, held while it lives.
pub struct JobLock {
    _lock: nix::fcntl::Flock<fs::File>,
}
/// The agent's inventory in each part's image directory.
pub const INVENTORY: &str = "inventory.img";
/// Version of the manifest's content this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// Why the store could not do what was asked, or refused a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("no job '{job}' in the checkpoint store {}", store.display())]
    NoJob { job: String, store: PathBuf },
    #[error("no checkpoint '{id}' of job '{job}'{hint}")]
    NoCheckpoint {
        job: String,
        id: String,
        hint: String,
    },
    #[error("checkpoint '{id}' exists for several jobs ({jobs}): name it as JOB/{id}")]
    Ambiguous { id: String, jobs: String },
    #[error("'{0}' is not a checkpoint id (YYYYmmddTHHMMSS-N, as `ckpt-coord list` shows)")]
    BadId(String),
    #[error("{0}")]
    BadJob(String),
    #[error("checkpoint {checkpoint} is refused: {reason}")]
    Refused { checkpoint: String, reason: String },
    #[error("checkpoint {checkpoint} cannot be committed: {reason}")]
    Commit { checkpoint: String, reason: String },
    #[error("job '{job}' is busy: {holder} (wait for it to end, or check it with `ckpt-coord status {job}`)")]
    Busy { job: String, holder: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A checkpoint's id: `YYYYmmddTHHMMSS-N`, the UTC time it was begun and
/// the job's checkpoint count. Ids order by N, so a clock that goes back
/// cannot make an older checkpoint look newer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckpointId {
    serial: u64,
    stamp: String,
}

impl CheckpointId {
    /// The job's checkpoint count at this checkpoint (from 1).
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

impl FromStr for CheckpointId {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let bad = || StoreError::BadId(s.to_string());
        let (stamp, serial) = s.split_once('-').ok_or_else(bad)?;
        let b = stamp.as_bytes();
        let stamp_ok = b.len() == 15
            && b[8] == b'T'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 8 || c.is_ascii_digit());
        if !stamp_ok
            || serial.is_empty()
            || serial.starts_with('0')
            || !serial.bytes().all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        Ok(CheckpointId {
            serial: serial.parse().map_err(|_| bad())?,
            stamp: stamp.to_string(),
        })
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.stamp, self.serial)
    }
}

impl Serialize for CheckpointId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How much of a checkpoint `verify` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The manifest's signature, each part's inventory hash, and every
    /// file's presence and size: fast, for listings.
    Quick,
    /// Also every file's SHA-256: before a restore.
    Full,
}

/// What is known of a checkpoint's signature after verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Signature {
    /// Signed, and the signature matches the cluster key.
    Valid,
    /// Not signed; accepted only because no cluster key is configured.
    Unsigned,
    /// Signed, but no cluster key is configured to check it with.
    NotChecked,
}

/// What signs manifests and checks their signatures: the cluster key, or,
/// for a user who cannot read it, the agent of their machine.
pub trait ManifestSigner {
    /// The signature of manifest `m` (whose signature field is empty).
    fn sign(&self, m: &Manifest) -> Result<Vec<u8>, String>;
    /// Whether `m.signature` is the signature of `m`.
    fn verify(&self, m: &Manifest) -> Result<bool, String>;
    /// What signs, for messages: "the cluster key /etc/ckpt/cluster.key".
    fn describe(&self) -> String;
}

impl ManifestSigner for ClusterKey {
    fn sign(&self, m: &Manifest) -> Result<Vec<u8>, String> {
        Ok(ClusterKey::sign(
            self,
            &ckpt_proto::image::manifest_signing_bytes(m),
        ))
    }

    fn verify(&self, m: &Manifest) -> Result<bool, String> {
        Ok(ClusterKey::verify(
            self,
            &ckpt_proto::image::manifest_signing_bytes(m),
            &m.signature,
        ))
    }

    fn describe(&self) -> String {
        format!("the cluster key {}", self.path().display())
    }
}

/// A part as the coordinator knows it once its agent committed its dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedPart {
    pub name: String,
    /// The node the part was dumped on.
    pub node: String,
}

/// A checkpoint directory in the store, committed or not.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: CheckpointId,
    pub dir: PathBuf,
    /// Its manifest exists: the checkpoint exists.
    pub committed: bool,
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Committed checkpoints beyond the number kept.
    pub removed: Vec<CheckpointId>,
    /// Uncommitted directories older than the newest committed checkpoint.
    pub leftovers: Vec<CheckpointId>,
}

/// The checkpoint store rooted at one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store at `root` (nothing is created until a checkpoint begins).
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_owned(),
        }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of job `job`'s checkpoints.
    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.root.join(job)
    }

    /// Jobs that have a directory in the store, sorted by name.
    pub fn jobs(&self) -> Result<Vec<String>, StoreError> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.root)(e)),
        };
        let mut jobs = Vec::new();
        for e in rd {
            let e = e.map_err(io(&self.root))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if check_job_id(&name).is_ok() && e.path().is_dir() {
                jobs.push(name);
            }
        }
        jobs.sort();
        Ok(jobs)
    }

    /// Every checkpoint directory of `job`, committed or not, newest first.
    pub fn entries(&self, job: &str) -> Result<Vec<Entry>, StoreError> {
        check_job_id(job).map_err(StoreError::BadJob)?;
        let dir = self.job_dir(job);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoJob {
                    job: job.to_string(),
                    store: self.root.clone(),
                })
            }
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(io(&dir))?;
            let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<CheckpointId>().ok())
            else {
                continue;
            };
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            out.push(Entry {
                committed: path.join(MANIFEST).is_file(),
                id,
                dir: path,
            });
        }
        out.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(out)
    }

    /// Ids of `job`'s committed checkpoints, newest first.
    pub fn committed(&self, job: &str) -> Result<Vec<CheckpointId>, StoreError> {
        Ok(self
            .entries(job)?
            .into_iter()
            .filter(|e| e.committed)
            .map(|e| e.id)
            .collect())
    }

    /// Opens committed checkpoint `id` of `job` (reads its manifest; see
    /// `Checkpoint::verify` before trusting it).
    pub fn open(&self, job: &str, id: &CheckpointId) -> Result<Checkpoint, StoreError> {
        check_job_id(job).map_err(StoreError::BadJob)?;
        let dir = self.job_dir(job).join(id.to_string());
        let missing = |hint: &str| StoreError::NoCheckpoint {
            job: job.to_string(),
            id: id.to_string(),
            hint: hint.to_string(),
        };
        if !dir.is_dir() {
            if !self.job_dir(job).is_dir() {
                return Err(StoreError::NoJob {
                    job: job.to_string(),
                    store: self.root.clone(),
                });
            }
            return Err(missing(" (`ckpt-coord status JOB` lists them)"));
        }
        if !dir.join(MANIFEST).is_file() {
            return Err(missing(
                ": it was never committed (a checkpoint that failed or is still being written)",
            ));
        }
        let manifest: Manifest = read_image_file(&dir.join(MANIFEST), ImageKind::Manifest)?;
        Ok(Checkpoint {
            job: job.to_string(),
            id: id.clone(),
            dir,
            manifest,
        })
    }

    /// The newest committed checkpoint of `job`, if any.
    pub fn latest(&self, job: &str) -> Result<Option<Checkpoint>, StoreError> {
        match self.committed(job)?.first() {
            Some(id) => self.open(job, id).map(Some),
            None => Ok(None),
        }
    }

    /// Opens a checkpoint named as `JOB/ID`, or as `ID` alone when only one
    /// job has a committed checkpoint of that id.
    pub fn find(&self, name: &str) -> Result<Checkpoint, StoreError> {
        if let Some((job, id)) = name.split_once('/') {
            return self.open(job, &id.parse()?);
        }
        let id: CheckpointId = name.parse()?;
        let mut found = Vec::new();
        for job in self.jobs()? {
            if self.job_dir(&job).join(name).join(MANIFEST).is_file() {
                found.push(job);
            }
        }
        match found.len() {
            0 => Err(StoreError::NoCheckpoint {
                job: "any job".into(),
                id: name.to_string(),
                hint: format!(" in {} (`ckpt-coord list` lists them)", self.root.display()),
            }),
            1 => self.open(&found[0], &id),
            _ => Err(StoreError::Ambiguous {
                id: name.to_string(),
                jobs: found.join(", "),
            }),
        }
    }

    /// Takes job `job`'s lock in the store for one operation (launch,
    /// checkpoint, restart, migrate): two coordinators working on one job
    /// at once would freeze it twice or restore it twice. Held until the
    /// returned guard is dropped; the kernel drops it if this process dies.
    /// Only `launch` makes the job's directory (`create`); the others need
    /// a job that exists.
    pub fn lock_job(&self, job: &str, what: &str, create: bool) -> Result<JobLock, StoreError> {
        check_job_id(job).map_err(StoreError::BadJob)?;
        let job_dir = self.job_dir(job);
        if create {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&job_dir)
                .map_err(io(&job_dir))?;
        } else if !job_dir.is_dir() {
            return Err(StoreError::NoJob {
                job: job.to_string(),
                store: self.root.clone(),
            });
        }
        let path = job_dir.join(JOB_LOCK);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        let mut lock =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = fs::read_to_string(&path).unwrap_or_default();
                    return Err(StoreError::Busy {
                        job: job.to_string(),
                        holder: if holder.trim().is_empty() {
                            "another ckpt-coord works on it".into()
                        } else {
                            holder.trim().to_string()
                        },
                    });
                }
                Err((_, e)) => {
                    return Err(StoreError::Io {
                        path,
                        source: std::io::Error::from(e),
                    })
                }
            };
        {
            use std::io::{Seek, Write};
            let f: &mut fs::File = &mut lock;
            let _ = f.set_len(0);
            let _ = f.rewind();
            let _ = write!(
                f,
                "{what} by ckpt-coord pid {} since {}",
                std::process::id(),
                crate::time::rfc3339_utc(crate::time::now_unix_ms())
            );
        }
        Ok(JobLock { _lock: lock })
    }

    /// Where the job spec of `job` is recorded (`STORE/JOB/job.toml`).
    pub fn spec_path(&self, job: &str) -> PathBuf {
        self.job_dir(job).join(JOB_SPEC)
    }

    /// Records the spec of a job that runs (launched, or adopted after its
    /// parts were started by hand), so that `checkpoint` knows its parts
    /// and their nodes. Written to a temporary file and renamed: a reader
    /// sees the old spec or the new one, never half of one.
    pub fn record_spec(&self, spec: &JobSpec) -> Result<PathBuf, StoreError> {
        check_job_id(&spec.job).map_err(StoreError::BadJob)?;
        let job_dir = self.job_dir(&spec.job);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&job_dir)
            .map_err(io(&job_dir))?;
        let path = self.spec_path(&spec.job);
        let tmp = job_dir.join(format!(".{JOB_SPEC}.{}", std::process::id()));
        {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(spec.to_toml().as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&job_dir)?;
        Ok(path)
    }

    /// The recorded spec of `job` (see [`Store::record_spec`]).
    pub fn job_spec(&self, job: &str) -> Result<JobSpec, StoreError> {
        check_job_id(job).map_err(StoreError::BadJob)?;
        let path = self.spec_path(job);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::BadJob(format!(
                    "job '{job}' has no recorded job spec ({} is missing): start it with \
                     `ckpt-coord launch`, or record the spec of parts started by hand with \
                     `ckpt-coord adopt JOBSPEC --job {job}`",
                    path.display()
                )))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        JobSpec::parse(&text, &path, Some(job))
            .map_err(|e| StoreError::BadJob(format!("recorded job spec: {e}")))
    }

    /// Begins a new checkpoint of `job`: an empty, uncommitted directory
    /// under a fresh id.
    pub fn begin(&self, job: &str) -> Result<PendingCheckpoint, StoreError> {
        check_job_id(job).map_err(StoreError::BadJob)?;
        let job_dir = self.job_dir(job);
        // Checkpoints hold the memory of the job's processes: only their
        // owner (root, the agents) may read them.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&job_dir)
            .map_err(io(&job_dir))?;
        let mut serial = match self.entries(job)?.first() {
            Some(e) => e.id.serial + 1,
            None => 1,
        };
        let started = crate::time::now_unix_ms();
        for _ in 0..1000 {
            let id = CheckpointId {
                serial,
                stamp: crate::time::compact_utc(started),
            };
            let dir = job_dir.join(id.to_string());
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    tracing::info!(job, checkpoint = %id, dir = %dir.display(), "checkpoint begun");
                    return Ok(PendingCheckpoint {
                        job: job.to_string(),
                        id,
                        dir,
                        started_unix_ms: started,
                        done: false,
                    });
                }
                // Another coordinator took this number at the same moment.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => serial += 1,
                Err(e) => return Err(io(&dir)(e)),
            }
        }
        Err(StoreError::Commit {
            checkpoint: format!("{job}/?"),
            reason: "could not find a free checkpoint number".into(),
        })
    }

    /// Keeps the `keep` newest committed checkpoints of `job` and removes
    /// the older ones, and removes uncommitted directories older than the
    /// newest committed checkpoint (failed or abandoned ones; a newer one
    /// may still be being written).
    pub fn prune(&self, job: &str, keep: usize) -> Result<Pruned, StoreError> {
        let keep = keep.max(1);
        let entries = self.entries(job)?;
        let mut out = Pruned::default();
        let newest = entries.iter().find(|e| e.committed).map(|e| e.id.clone());
        let mut kept = 0;
        for e in &entries {
            if e.committed {
                kept += 1;
                if kept <= keep {
                    continue;
                }
                // The manifest goes first: from then on the checkpoint does
                // not exist, whatever happens to the rest of the removal.
                let m = e.dir.join(MANIFEST);
                fs::remove_file(&m).map_err(io(&m))?;
                sync_dir(&e.dir)?;
                fs::remove_dir_all(&e.dir).map_err(io(&e.dir))?;
                tracing::info!(job, checkpoint = %e.id, "pruned");
                out.removed.push(e.id.clone());
            } else if newest.as_ref().is_some_and(|n| e.id < *n) {
                fs::remove_dir_all(&e.dir).map_err(io(&e.dir))?;
                tracing::info!(job, checkpoint = %e.id, "removed an uncommitted leftover");
                out.leftovers.push(e.id.clone());
            }
        }
        Ok(out)
    }
}

/// A checkpoint being written: its directory exists, its manifest does
/// not. Dropped without `commit`, it is removed.
#[derive(Debug)]
pub struct PendingCheckpoint {
    job: String,
    id: CheckpointId,
    dir: PathBuf,
    started_unix_ms: u64,
    done: bool,
}

impl PendingCheckpoint {
    /// Its id.
    pub fn id(&self) -> &CheckpointId {
        &self.id
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image directory of part `part` (created), for its agent's dump.
    pub fn part_dir(&self, part: &str) -> Result<PathBuf, StoreError> {
        if !is_safe_name(part, crate::jobspec::MAX_PART_NAME, &[]) {
            return Err(self.commit_error(format!("'{part}' is not a valid part name")));
        }
        let d = self.dir.join(part_dir_name(part));
        match fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(d),
            Err(e) => Err(io(&d)(e)),
        }
    }

    fn commit_error(&self, reason: String) -> StoreError {
        StoreError::Commit {
            checkpoint: format!("{}/{}", self.job, self.id),
            reason,
        }
    }

    /// Commits the checkpoint once every part's agent committed its dump:
    /// records every part's files with their SHA-256, signs the manifest
    /// with `key` (when set) and writes it last, durably. The manifest
    /// names the calling user as its owner.
    pub fn commit(
        mut self,
        spec: &JobSpec,
        parts: &[DumpedPart],
        options: CheckpointOptions,
        key: Option<&dyn ManifestSigner>,
    ) -> Result<Checkpoint, StoreError> {
        if spec.job != self.job {
            return Err(self.commit_error(format!("the job spec is for job '{}'", spec.job)));
        }
        for p in &spec.parts {
            let n = parts.iter().filter(|d| d.name == p.name).count();
            if n != 1 {
                return Err(self.commit_error(format!(
                    "part '{}' was dumped {n} times (once expected)",
                    p.name
                )));
            }
        }
        if let Some(d) = parts.iter().find(|d| spec.part(&d.name).is_none()) {
            return Err(self.commit_error(format!("'{}' is not a part of the job spec", d.name)));
        }
        let mut mparts = Vec::new();
        for d in parts {
            let name = part_dir_name(&d.name);
            let dir = self.dir.join(&name);
            if !dir.join(INVENTORY).is_file() {
                return Err(self.commit_error(format!(
                    "part '{}' (node {}) has no {INVENTORY}: its dump did not commit",
                    d.name, d.node
                )));
            }
            let files = digest_dir(&dir)?;
            let inventory_sha256 = files
                .iter()
                .find(|f| f.name == INVENTORY)
                .map(|f| f.sha256.clone())
                .expect("the inventory was seen above");
            mparts.push(ManifestPart {
                name: d.name.clone(),
                node: d.node.clone(),
                dir: name,
                inventory_sha256,
                files,
            });
        }
        let mut manifest = Manifest {
            format_version: MANIFEST_FORMAT,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            job_id: self.job.clone(),
            checkpoint_id: self.id.to_string(),
            created_unix_ms: self.started_unix_ms,
            parts: mparts,
            job_spec: spec.to_toml(),
            options: Some(options),
            owner_uid: nix::unistd::getuid().as_raw(),
            signature: Vec::new(),
        };
        if let Some(k) = key {
            manifest.signature = k
                .sign(&manifest)
                .map_err(|e| self.commit_error(format!("signing the manifest: {e}")))?;
        }
        write_image_file(&self.dir.join(MANIFEST), ImageKind::Manifest, &manifest)?;
        // The rename is durable only once the directory is synced.
        sync_dir(&self.dir)?;
        self.done = true;
        tracing::info!(job = %self.job, checkpoint = %self.id, signed = key.is_some(), "checkpoint committed");
        Ok(Checkpoint {
            job: self.job.clone(),
            id: self.id.clone(),
            dir: self.dir.clone(),
            manifest,
        })
    }

    /// Gives the checkpoint up and removes its directory.
    pub fn abort(mut self) -> Result<(), StoreError> {
        self.done = true;
        fs::remove_dir_all(&self.dir).map_err(io(&self.dir))
    }
}

impl Drop for PendingCheckpoint {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                // `prune` removes it after the next commit.
                tracing::warn!(dir = %self.dir.display(), "could not remove an aborted checkpoint: {e}");
            }
        }
    }
}

/// A committed checkpoint and its manifest.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub job: String,
    pub id: CheckpointId,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Checkpoint {
    /// `JOB/ID`, as messages name it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.job, self.id)
    }

    /// The image directory of part `part`.
    pub fn part_dir(&self, part: &str) -> PathBuf {
        self.dir.join(part_dir_name(part))
    }

    /// The options the checkpoint was taken with.
    pub fn options(&self) -> CheckpointOptions {
        self.manifest.options.unwrap_or_default()
    }

    fn refuse(&self, reason: String) -> StoreError {
        StoreError::Refused {
            checkpoint: self.label(),
            reason,
        }
    }

    /// The job spec the checkpoint records.
    pub fn spec(&self) -> Result<JobSpec, StoreError> {
        let label = format!("manifest of {}", self.label());
        JobSpec::parse(&self.manifest.job_spec, Path::new(&label), None)
            .map_err(|e| self.refuse(format!("its job spec does not parse: {e}")))
    }

    /// Checks the manifest's signature (with `key`; required when a key is
    /// set) and every part's files against the manifest.
    pub fn verify(
        &self,
        key: Option<&dyn ManifestSigner>,
        level: Verify,
    ) -> Result<Signature, StoreError> {
        let m = &self.manifest;
        if m.format_version != MANIFEST_FORMAT {
            return Err(self.refuse(format!(
                "manifest format {} (this build reads {MANIFEST_FORMAT})",
                m.format_version
            )));
        }
        let signature = match key {
            Some(k) if m.signature.is_empty() => {
                return Err(self.refuse(format!(
                    "{MANIFEST} is not signed, and a cluster key ({}) is configured",
                    k.describe()
                )))
            }
            Some(k) => {
                let valid = k
                    .verify(m)
                    .map_err(|e| self.refuse(format!("checking its signature: {e}")))?;
                if !valid {
                    return Err(self.refuse(format!(
                        "the signature of {MANIFEST} does not match {}: \
                         the manifest was changed after the commit, or signed with another key",
                        k.describe()
                    )));
                }
                Signature::Valid
            }
            None if m.signature.is_empty() => Signature::Unsigned,
            None => Signature::NotChecked,
        };
        if m.job_id != self.job || m.checkpoint_id != self.id.to_string() {
            return Err(self.refuse(format!(
                "its manifest is that of {}/{} (copied from another checkpoint)",
                m.job_id, m.checkpoint_id
            )));
        }
        if m.parts.is_empty() {
            return Err(self.refuse("its manifest lists no parts".into()));
        }
        let spec = self.spec()?;
        for p in &m.parts {
            if spec.part(&p.name).is_none() {
                return Err(self.refuse(format!("part '{}' is not in its job spec", p.name)));
            }
            if m.parts.iter().filter(|o| o.name == p.name).count() != 1 {
                return Err(self.refuse(format!("part '{}' is listed twice", p.name)));
            }
            self.verify_part(p, level)?;
        }
        if let Some(p) = spec
            .parts
            .iter()
            .find(|s| !m.parts.iter().any(|p| p.name == s.name))
        {
            return Err(self.refuse(format!("part '{}' of its job spec has no images", p.name)));
        }
        tracing::debug!(checkpoint = %self.label(), ?level, ?signature, "verified");
        Ok(signature)
    }

    fn verify_part(&self, p: &ManifestPart, level: Verify) -> Result<(), StoreError> {
        let who = format!("part '{}' (dumped on {})", p.name, p.node);
        // Paths come from the manifest: never follow one out of the checkpoint.
        if !is_safe_name(&p.name, crate::jobspec::MAX_PART_NAME, &[])
            || p.dir != part_dir_name(&p.name)
        {
            return Err(self.refuse(format!(
                "{who}: image directory '{}' is not {}",
                p.dir,
                part_dir_name(&p.name)
            )));
        }
        let dir = self.dir.join(&p.dir);
        if !dir.is_dir() {
            return Err(self.refuse(format!(
                "{who}: its image directory {} is missing",
                dir.display()
            )));
        }
        let inv = dir.join(INVENTORY);
        let inv_hash = match fs::File::open(&inv) {
            Ok(f) => sha256_of(f, &inv)?.1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.refuse(format!("{who}: {} is missing", inv.display())))
            }
            Err(e) => return Err(io(&inv)(e)),
        };
        if inv_hash != p.inventory_sha256 {
            return Err(self.refuse(format!(
                "{who}: {} differs from the manifest (SHA-256): the part's images were changed after the commit",
                inv.display()
            )));
        }
        let listed: BTreeMap<&str, &PartFile> =
            p.files.iter().map(|f| (f.name.as_str(), f)).collect();
        if !listed.contains_key(INVENTORY) {
            return Err(self.refuse(format!("{who}: the manifest does not list its {INVENTORY}")));
        }
        let present = list_files(&dir)?;
        for (name, f) in &listed {
            let path = dir.join(name);
            let Some(&size) = present.get(*name) else {
                return Err(self.refuse(format!("{who}: {} is missing", path.display())));
            };
            if size != f.size {
                return Err(self.refuse(format!(
                    "{who}: {} has {size} bytes, the manifest says {} (truncated or replaced)",
                    path.display(),
                    f.size
                )));
            }
        }
        if let Some(extra) = present.keys().find(|n| !listed.contains_key(n.as_str())) {
            return Err(self.refuse(format!(
                "{who}: {} is not in the manifest (added after the commit)",
                dir.join(extra).display()
            )));
        }
        if level == Verify::Full {
            for (name, f) in &listed {
                let path = dir.join(name);
                let file = fs::File::open(&path).map_err(io(&path))?;
                let (size, hash) = sha256_of(file, &path)?;
                if size != f.size || hash != f.sha256 {
                    return Err(self.refuse(format!(
                        "{who}: {} differs from the manifest (SHA-256): changed after the commit",
                        path.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `part-NAME`: the image directory of a part in a checkpoint.
pub fn part_dir_name(part: &str) -> String {
    format!("part-{part}")
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn sha256_of(mut f: fs::File, path: &Path) -> Result<(u64, Vec<u8>), StoreError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize().to_vec()))
}

/// Every file under `dir` (relative names with '/') and its size; anything
/// but regular files and directories is refused.
fn list_files(dir: &Path) -> Result<BTreeMap<String, u64>, StoreError> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, u64>) -> Result<(), StoreError> {
        let dir = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(rel)
        };
        for e in fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                return Err(StoreError::Io {
                    path: e.path(),
                    source: std::io::Error::other("file name is not UTF-8"),
                });
            };
            let rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::symlink_metadata(e.path()).map_err(io(&e.path()))?;
            if meta.is_dir() {
                walk(root, &rel, out)?;
            } else if meta.is_file() {
                out.insert(rel, meta.len());
            } else {
                return Err(StoreError::Io {
                    path: e.path(),
                    source: std::io::Error::other(
                        "not a regular file (images hold only regular files)",
                    ),
                });
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, "", &mut out)?;
    Ok(out)
}

/// Every file of a part's image directory with its size and SHA-256.
pub fn digest_dir(dir: &Path) -> Result<Vec<PartFile>, StoreError> {
    let mut out = Vec::new();
    for name in list_files(dir)?.into_keys() {
        let path = dir.join(&name);
        let f = fs::File::open(&path).map_err(io(&path))?;
        let (size, sha256) = sha256_of(f, &path)?;
        out.push(PartFile { name, size, sha256 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_proto::image::{FileEntry, Inventory};

    const SPEC: &str = r#"
job = "j1"
[[part]]
name = "a"
node = "n1"
command = "sleep"
[[part]]
name = "b"
node = "n2"
command = "sleep"
"#;

    fn spec() -> JobSpec {
        JobSpec::parse(SPEC, Path::new("spec.toml"), None).unwrap()
    }

    fn key() -> ClusterKey {
        ClusterKey::from_bytes(Path::new("/k"), vec![9; 32])
    }

    /// What an agent leaves in a part's directory: images, then the inventory.
    fn fake_dump(dir: &Path, tag: &str) {
        fs::write(dir.join("core-1.img"), format!("core of {tag}")).unwrap();
        fs::write(dir.join("pages-1.img"), vec![7u8; 10_000]).unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/mnt-0.tar"), b"tar").unwrap();
        let inv = Inventory {
            root_pid: 1,
            files: vec![FileEntry {
                name: "core-1.img".into(),
                size: 9,
                crc32c: 1,
            }],
            ..Default::default()
        };
        write_image_file(&dir.join(INVENTORY), ImageKind::Inventory, &inv).unwrap();
    }

    fn dumped() -> Vec<DumpedPart> {
        vec![
            DumpedPart {
                name: "a".into(),
                node: "n1".into(),
            },
            DumpedPart {
                name: "b".into(),
                node: "n2".into(),
            },
        ]
    }

    fn opts() -> CheckpointOptions {
        CheckpointOptions {
            leave_running: true,
            tcp_established: true,
        }
    }

    fn checkpoint(store: &Store, key: Option<&dyn ManifestSigner>) -> Checkpoint {
        let p = store.begin("j1").unwrap();
        fake_dump(&p.part_dir("a").unwrap(), "a");
        fake_dump(&p.part_dir("b").unwrap(), "b");
        p.commit(&spec(), &dumped(), opts(), key).unwrap()
    }

    fn refused(c: &Checkpoint, key: Option<&dyn ManifestSigner>, level: Verify) -> String {
        c.verify(key, level)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn ids_parse_and_order_by_count() {
        let a: CheckpointId = "20260101T000000-2".parse().unwrap();
        let b: CheckpointId = "20251231T235959-10".parse().unwrap();
        assert_eq!(a.to_string(), "20260101T000000-2");
        assert!(b > a, "the count orders, not the clock");
        for bad in [
            "",
            "x",
            "20260101T000000",
            "20260101T000000-",
            "20260101T000000-0",
            "20260101T000000-01",
            "2026010T1000000-1",
            "20260101X000000-1",
            "../x-1",
        ] {
            assert!(bad.parse::<CheckpointId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn commit_makes_a_checkpoint_exist() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(&t.path().join("store"));
        assert!(store.jobs().unwrap().is_empty());
        let p = store.begin("j1").unwrap();
        assert_eq!(p.id().serial(), 1);
        fake_dump(&p.part_dir("a").unwrap(), "a");
        fake_dump(&p.part_dir("b").unwrap(), "b");
        // Before the commit the checkpoint does not exist.
        assert_eq!(store.jobs().unwrap(), ["j1"]);
        assert!(store.committed("j1").unwrap().is_empty());
        assert!(store.latest("j1").unwrap().is_none());
        let id = p.id().clone();
        let e = store.open("j1", &id).unwrap_err().to_string();
        assert!(e.contains("never committed"), "{e}");
        let c = p.commit(&spec(), &dumped(), opts(), Some(&key())).unwrap();
        assert_eq!(store.committed("j1").unwrap(), std::slice::from_ref(&id));
        let back = store.latest("j1").unwrap().unwrap();
        assert_eq!(back.manifest, c.manifest);
        assert_eq!(back.manifest.parts[1].node, "n2");
        assert_eq!(back.manifest.parts[0].files.len(), 4);
        assert!(back.options().leave_running);
        assert_eq!(back.spec().unwrap(), spec());
        assert_eq!(
            back.verify(Some(&key()), Verify::Full).unwrap(),
            Signature::Valid
        );
        assert_eq!(
            back.verify(None, Verify::Quick).unwrap(),
            Signature::NotChecked
        );
        assert_eq!(store.find(&id.to_string()).unwrap().id, id);
        assert_eq!(store.find(&format!("j1/{id}")).unwrap().id, id);
        // The job's directories are private: they hold process memory.
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(store.job_dir("j1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    #[test]
    fn a_recorded_spec_reads_back_and_is_not_a_checkpoint() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let s = spec();
        let err = store.job_spec(&s.job).unwrap_err().to_string();
        assert!(err.contains("ckpt-coord adopt"), "{err}");
        let path = store.record_spec(&s).unwrap();
        assert_eq!(path, t.path().join(&s.job).join(JOB_SPEC));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(store.job_spec(&s.job).unwrap(), s);
        // Recorded again (re-adopted): replaced whole.
        store.record_spec(&s).unwrap();
        assert_eq!(store.job_spec(&s.job).unwrap(), s);
        assert!(store.entries(&s.job).unwrap().is_empty());
        assert_eq!(store.jobs().unwrap(), vec![s.job.clone()]);
    }

    #[test]
    fn a_dropped_pending_checkpoint_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let p = store.begin("j1").unwrap();
        fake_dump(&p.part_dir("a").unwrap(), "a");
        let dir = p.dir().to_owned();
        drop(p);
        assert!(!dir.exists());
        let p = store.begin("j1").unwrap();
        let dir = p.dir().to_owned();
        p.abort().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn commit_refuses_incomplete_dumps() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let p = store.begin("j1").unwrap();
        fake_dump(&p.part_dir("a").unwrap(), "a");
        p.part_dir("b").unwrap();
        let dir = p.dir().to_owned();
        let e = p
            .commit(&spec(), &dumped(), opts(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("part 'b' (node n2) has no inventory.img"), "{e}");
        assert!(!dir.exists(), "a failed commit removes the checkpoint");
        let p = store.begin("j1").unwrap();
        let e = p
            .commit(&spec(), &dumped()[..1], opts(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("part 'b' was dumped 0 times"), "{e}");
        let p = store.begin("j1").unwrap();
        assert!(p.part_dir("../x").is_err());
    }

    #[test]
    fn uncommitted_checkpoints_are_invisible() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let first = checkpoint(&store, None);
        let p = store.begin("j1").unwrap();
        fake_dump(&p.part_dir("a").unwrap(), "a");
        assert_eq!(p.id().serial(), 2);
        // Simulate a coordinator that died here: its directory stays.
        let half = p.dir().to_owned();
        std::mem::forget(p);
        assert_eq!(
            store.committed("j1").unwrap(),
            std::slice::from_ref(&first.id)
        );
        assert_eq!(store.latest("j1").unwrap().unwrap().id, first.id);
        let entries = store.entries("j1").unwrap();
        assert_eq!(entries.len(), 2);
        assert!(!entries[0].committed && entries[1].committed);
        // A manifest's temporary file does not commit anything either.
        fs::write(half.join("manifest.img.tmp"), b"half").unwrap();
        assert_eq!(store.committed("j1").unwrap().len(), 1);
        // The next checkpoint gets a fresh number.
        assert_eq!(store.begin("j1").unwrap().id().serial(), 3);
    }

    #[test]
    fn tampered_part_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let c = checkpoint(&store, Some(&key()));
        let k = key();
        let k = Some(&k as &dyn ManifestSigner);
        let a = c.part_dir("a");

        // Changed content, same size: only the full check sees it.
        let pages = a.join("pages-1.img");
        let orig = fs::read(&pages).unwrap();
        let mut b = orig.clone();
        b[5000] ^= 1;
        fs::write(&pages, &b).unwrap();
        assert!(c.verify(k, Verify::Quick).is_ok());
        let e = refused(&c, k, Verify::Full);
        assert!(
            e.contains("part 'a' (dumped on n1)")
                && e.contains("pages-1.img differs from the manifest"),
            "{e}"
        );
        // Truncated.
        fs::write(&pages, &orig[..4096]).unwrap();
        let e = refused(&c, k, Verify::Quick);
        assert!(
            e.contains("pages-1.img has 4096 bytes, the manifest says 10000"),
            "{e}"
        );
        // Missing.
        fs::remove_file(&pages).unwrap();
        let e = refused(&c, k, Verify::Quick);
        assert!(
            e.contains("part 'a'") && e.contains("pages-1.img is missing"),
            "{e}"
        );
        fs::write(&pages, &orig).unwrap();
        assert!(c.verify(k, Verify::Full).is_ok());
        // Added.
        fs::write(c.part_dir("b").join("sub/evil"), b"x").unwrap();
        let e = refused(&c, k, Verify::Quick);
        assert!(
            e.contains("part 'b' (dumped on n2)") && e.contains("sub/evil is not in the manifest"),
            "{e}"
        );
        fs::remove_file(c.part_dir("b").join("sub/evil")).unwrap();
        // The inventory itself.
        let inv = a.join(INVENTORY);
        let orig_inv = fs::read(&inv).unwrap();
        let other = Inventory {
            root_pid: 666,
            ..Default::default()
        };
        write_image_file(&inv, ImageKind::Inventory, &other).unwrap();
        let e = refused(&c, k, Verify::Quick);
        assert!(
            e.contains("part 'a'") && e.contains("inventory.img differs from the manifest"),
            "{e}"
        );
        fs::write(&inv, &orig_inv).unwrap();
        // A whole part directory.
        fs::rename(&a, t.path().join("moved")).unwrap();
        let e = refused(&c, k, Verify::Quick);
        assert!(
            e.contains("part 'a'") && e.contains("image directory") && e.contains("missing"),
            "{e}"
        );
        fs::rename(t.path().join("moved"), &a).unwrap();
        assert_eq!(c.verify(k, Verify::Full).unwrap(), Signature::Valid);
    }

    fn rewrite_manifest(c: &Checkpoint, f: impl FnOnce(&mut Manifest)) -> Checkpoint {
        let mut m = c.manifest.clone();
        f(&mut m);
        write_image_file(&c.dir.join(MANIFEST), ImageKind::Manifest, &m).unwrap();
        Store::new(c.dir.parent().unwrap().parent().unwrap())
            .open(&c.job, &c.id)
            .unwrap()
    }

    #[test]
    fn tampered_manifests_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let c = checkpoint(&store, Some(&key()));
        let k = key();
        // The spec, the node, a file's hash: every field is signed.
        let m = rewrite_manifest(&c, |m| m.job_spec = m.job_spec.replace("sleep", "/bin/sh"));
        let e = refused(&m, Some(&k), Verify::Quick);
        assert!(
            e.contains("checkpoint j1/") && e.contains("signature of manifest.img does not match"),
            "{e}"
        );
        let m = rewrite_manifest(&c, |m| m.parts[0].node = "n3".into());
        refused(&m, Some(&k), Verify::Quick);
        let m = rewrite_manifest(&c, |m| m.options.as_mut().unwrap().leave_running = false);
        refused(&m, Some(&k), Verify::Quick);
        // Unsigned while a key is configured.
        let m = rewrite_manifest(&c, |m| m.signature.clear());
        let e = refused(&m, Some(&k), Verify::Quick);
        assert!(e.contains("not signed"), "{e}");
        // Another key.
        let other = ClusterKey::from_bytes(Path::new("/other"), vec![1; 32]);
        let e = refused(&c, Some(&other), Verify::Quick);
        assert!(e.contains("/other"), "{e}");
        // A byte flipped in the file is caught by the framing.
        let mut bytes = fs::read(c.dir.join(MANIFEST)).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        fs::write(c.dir.join(MANIFEST), &bytes).unwrap();
        let e = store.open("j1", &c.id).unwrap_err().to_string();
        assert!(e.contains("manifest.img"), "{e}");
        // Truncated.
        fs::write(c.dir.join(MANIFEST), &bytes[..n - 5]).unwrap();
        assert!(store.open("j1", &c.id).is_err());
    }

    #[test]
    fn a_manifest_moved_to_another_checkpoint_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let old = checkpoint(&store, Some(&key()));
        let new = checkpoint(&store, Some(&key()));
        fs::copy(old.dir.join(MANIFEST), new.dir.join(MANIFEST)).unwrap();
        let c = store.open("j1", &new.id).unwrap();
        let e = refused(&c, Some(&key()), Verify::Quick);
        assert!(e.contains("copied from another checkpoint"), "{e}");
    }

    #[test]
    fn manifest_paths_cannot_leave_the_checkpoint() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let c = checkpoint(&store, None);
        let m = rewrite_manifest(&c, |m| m.parts[0].dir = "../..".into());
        let e = refused(&m, None, Verify::Quick);
        assert!(e.contains("image directory '../..' is not part-a"), "{e}");
    }

    #[test]
    fn unsigned_checkpoints_without_a_key() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let c = checkpoint(&store, None);
        assert!(c.manifest.signature.is_empty());
        assert_eq!(c.verify(None, Verify::Full).unwrap(), Signature::Unsigned);
        assert!(c.verify(Some(&key()), Verify::Quick).is_err());
    }

    #[test]
    fn prune_keeps_the_newest() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let ids: Vec<_> = (0..5).map(|_| checkpoint(&store, None).id).collect();
        // An abandoned one in the middle, and one still being written.
        let p = store.begin("j1").unwrap();
        let abandoned = p.id().clone();
        std::mem::forget(p);
        let newest = checkpoint(&store, None).id;
        let p = store.begin("j1").unwrap();
        let in_progress = p.id().clone();
        let pruned = store.prune("j1", 3).unwrap();
        assert_eq!(
            pruned.removed,
            [ids[2].clone(), ids[1].clone(), ids[0].clone()]
        );
        assert_eq!(pruned.leftovers, [abandoned]);
        assert_eq!(
            store.committed("j1").unwrap(),
            [newest, ids[4].clone(), ids[3].clone()]
        );
        let all: Vec<_> = store
            .entries("j1")
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            all[0], in_progress,
            "a checkpoint being written is left alone"
        );
        assert_eq!(all.len(), 4);
        assert!(p.dir().exists());
        drop(p);
        // keep 0 is taken as 1: pruning never removes the newest.
        assert_eq!(store.prune("j1", 0).unwrap().removed.len(), 2);
        assert_eq!(store.committed("j1").unwrap().len(), 1);
    }

    #[test]
    fn unknown_jobs_and_checkpoints() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let e = store.entries("nope").unwrap_err().to_string();
        assert!(e.contains("no job 'nope'"), "{e}");
        assert!(store.entries("../etc").is_err());
        assert!(store
            .find("zz")
            .unwrap_err()
            .to_string()
            .contains("not a checkpoint id"));
        checkpoint(&store, None);
        let e = store.find("20000101T000000-9").unwrap_err().to_string();
        assert!(e.contains("no checkpoint '20000101T000000-9'"), "{e}");
        // Same id under two jobs.
        let id = store.committed("j1").unwrap()[0].to_string();
        let src = store.job_dir("j1").join(&id);
        let dst = store.job_dir("j2");
        fs::create_dir_all(&dst).unwrap();
        fs::create_dir(dst.join(&id)).unwrap();
        fs::copy(src.join(MANIFEST), dst.join(&id).join(MANIFEST)).unwrap();
        let e = store.find(&id).unwrap_err().to_string();
        assert!(e.contains("several jobs (j1, j2)"), "{e}");
    }
}
