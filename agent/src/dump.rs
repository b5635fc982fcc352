//! `ckpt-agent dump`: checkpoint a process tree into an image directory.
//!
//! Order matters: seize and stop every thread of every process of the tree
//! (looping until no new child appears); then, process by process, read
//! what ptrace shows;
//! make the task tell what only it knows (signal handlers, timers, its
//! alternate stacks) through injected system calls in a scratch page that
//! is gone again before the address space is read; copy the pages in
//! parallel; write the images; commit the inventory; then kill or release.
//! Any failure before the commit releases every process untouched.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use ckpt_proto::image::{DumpOptions, Inventory};
use ckpt_proto::{ImageKind, FORMAT_VERSION};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::cgroup::JobCgroup;
use crate::error::{Error, Result};
use crate::images::{image_name, pages_name, ImageWriter};
use crate::inject::{Remote, Scratch};
use crate::netlock::{NetLock, Netns};
use crate::ns;
use crate::progress::{Progress, Quiet};
use crate::seize::{check_target, Seized};
use crate::snapshot::Snapshot;
use crate::track::Tracker;
use crate::{files, mm, pages, proc, task};
use ckpt_proto::image::Tracking;

/// What to dump and how.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    pub pid: i32,
    pub images: PathBuf,
    pub leave_running: bool,
    /// Copy the pages of all processes at once (the default); off dumps
    /// one process at a time, for comparison in benchmarks.
    pub tasks_in_parallel: bool,
    /// Accept unix sockets connected to named sockets outside the tree.
    pub ext_unix_sk: bool,
    /// The tree runs on the caller's terminal: its terminals outside the
    /// tree are recorded as "the restorer's terminal" instead of refused.
    pub shell_job: bool,
    /// Dump established TCP connections (in repair mode) instead of
    /// refusing them.
    pub tcp_established: bool,
    /// Let the tree run on while its private memory is copied, from a
    /// copy-on-write snapshot of each process: it stands still only while
    /// its state is captured. For dumps that leave the tree running.
    pub snapshot: bool,
    /// Memory only, for a later dump that writes what changed since
    /// (`ckpt-agent pre-dump`): the tree runs on; its memory is tracked.
    pub pre_dump: bool,
    /// Write only the pages changed since this checkpoint (a pre-dump or a
    /// dump of the same processes, taken here); the rest stays there.
    pub parent: Option<PathBuf>,
    /// Track which pages the tree writes from now on, for a later dump
    /// with this one as its parent (always on for a pre-dump).
    pub track_mem: bool,
    /// How page content is stored (compressed in parallel by the copy).
    pub compress: pages::Codec,
    /// Sign the inventory with this cluster key (the service's dumps): an
    /// agent restores a user's part only from images an agent wrote.
    pub key: Option<ckpt_proto::rpc::Key>,
    /// Stream the checkpoint into another node's agent: `images` is then
    /// the spool (on tmpfs) of its small images, and its name the level's
    /// name there.
    pub stream: Option<crate::stream::StreamTo>,
    /// With a stream: keep the page content in this hold here instead of
    /// streaming it (post-copy, see `held`); the level records where.
    pub hold: Option<crate::held::Hold>,
}

/// What a dump did, for the command line and benchmarks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub threads: usize,
    pub images: PathBuf,
    /// Where the checkpoint was streamed to (the receiver and its
    /// directory there); `images` then only holds the spool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_to: Option<String>,
    /// Bytes of page content saved.
    pub pages_bytes: u64,
    /// What they take in the pages files (less when compressed).
    pub stored_bytes: u64,
    /// Of `pages_bytes`, those copied after the tree ran on again (from
    /// snapshots).
    pub snapshot_bytes: u64,
    pub frozen_ms: f64,
    pub pages_ms: f64,
    pub total_ms: f64,
}

const SCRATCH_LEN: u64 = 64 * 1024;

/// Least private memory worth a snapshot: less is copied frozen in about a
/// millisecond, sooner than the fork, and the later stop to reap it, cost.
const SNAPSHOT_MIN: u64 = 2 << 20;

/// The checkpoint a dump is an increment of.
struct Parent {
    dir: PathBuf,
    /// Its path relative to the new checkpoint's directory.
    relative: PathBuf,
    inventory_crc32c: u32,
}

impl Parent {
    fn open(dir: &std::path::Path, images: &std::path::Path) -> Result<Parent> {
        crate::images::read_inventory(dir)?;
        Ok(Parent {
            dir: dir.to_owned(),
            relative: crate::images::relative_path(images, dir)?,
            inventory_crc32c: crate::images::inventory_crc(dir)?,
        })
    }

    /// What the parent recorded of process `pid`'s (as the job sees it)
    /// write tracker.
    fn tracking(&self, pid: i32) -> Option<Tracking> {
        let path = self.dir.join(image_name(ImageKind::PageMap, pid));
        let pm: ckpt_proto::image::PageMap =
            ckpt_proto::read_image_file(&path, ImageKind::PageMap).ok()?;
        pm.tracking
    }
}

/// How a dump uses the write tracker of one process.
struct TrackPlan {
    /// Install a tracker in a process without one.
    install: bool,
    /// Read (and so reset) the process's tracker.
    read: bool,
    /// What the parent checkpoint recorded of it.
    parent: Option<Tracking>,
}

impl TrackPlan {
    fn new(req: &DumpRequest, parent: Option<&Parent>, inner_pid: i32) -> TrackPlan {
        TrackPlan {
            install: req.pre_dump || req.track_mem,
            read: req.pre_dump || req.track_mem || parent.is_some(),
            parent: parent.and_then(|p| p.tracking(inner_pid)),
        }
    }
}

/// The tracker of a stopped process as `plan` wants it, found or
/// installed, with whether it was last reset by the parent checkpoint.
fn tracker_for(pid: i32, main: &Remote, plan: &TrackPlan) -> Result<Option<(Tracker, bool)>> {
    if !plan.read {
        return Ok(None);
    }
    let tracker = match Tracker::find(pid)? {
        Some(t) => Some(t),
        None if plan.install => Tracker::install(pid, main)?,
        None => None,
    };
    Ok(tracker.map(|t| {
        let continues = plan.parent.as_ref().is_some_and(|p| t.continues(p));
        if plan.parent.is_some() && !continues {
            info!(
                pid,
                "its memory tracker was reset after the parent checkpoint: memory saved whole"
            );
        }
        (t, continues)
    }))
}

/// Reads a stopped process's address space with its tracker per `plan`
/// (resetting it), and forks its snapshot when `snapshot` asks and it has
/// enough copy-on-write memory. Runs on the ptrace thread (injections);
/// `beside` runs meanwhile on it, for what else needs ptrace.
///
/// `read_ahead`: the process's mappings and flags read before the freeze
/// (its layout checked since). Their flags are checked here against the
/// snapshot child's layout, and once it runs on against the child's smaps
/// (the returned child pid: [`confirm_flags`]); without a snapshot against
/// smaps now.
fn capture_memory<T>(
    pid: i32,
    main: &Remote,
    plan: &TrackPlan,
    mm_args: (u64, Option<(u64, u64)>, &ImageWriter),
    snapshot: bool,
    read_ahead: Option<Vec<proc::MapEntry>>,
    beside: impl FnOnce() -> Result<T>,
) -> Result<Captured<T>> {
    let t0 = Instant::now();
    let mut tracker = tracker_for(pid, main, plan)?;
    let tracking = tracker
        .as_mut()
        .map(|(t, _)| t.next_generation())
        .transpose()?;
    let track = tracker.as_ref().map(|(t, c)| mm::Track {
        tracker: t,
        since_parent: *c,
    });
    let (brk, skip, writer) = mm_args;
    let ahead = read_ahead.is_some();
    let (mm, other) = std::thread::scope(|s| {
        // Reading the address space (smaps, page scans: tens of ms per
        // GiB) needs no ptrace: it runs beside what does.
        let mm = s.spawn(|| {
            let r = mm::dump(pid, brk, skip, Some(writer), track.as_ref(), read_ahead);
            debug!(pid, ms = ms_since(t0), "address space read");
            r
        });
        let other = beside();
        // The fork holds the address space's lock while it copies the page
        // tables; the reader needs it too.
        (
            mm.join().expect("the address space reader does not panic"),
            other,
        )
    });
    let (mut mm, other) = (mm?, other?);
    let snap = match snapshot && mm.cow_bytes() >= SNAPSHOT_MIN {
        true => match crate::snapshot::take(main) {
            Ok(s) => Some(s),
            Err(e @ Error::Remote { .. }) => {
                warn!(pid, "no snapshot, its memory is copied frozen: {e}");
                None
            }
            Err(e) => return Err(e),
        },
        false => None,
    };
    debug!(pid, ms = ms_since(t0), "snapshot forked");
    let mut confirm_on = None;
    if ahead {
        // The child has every mapping but the MADV_DONTFORK ones; if that
        // is not what the flags read ahead say, or there is no child to
        // check them on later, they are checked against smaps now.
        let forked = snap
            .as_ref()
            .map(|s| proc::maps(s.child))
            .transpose()?
            .filter(|child| {
                mm.image.vmas.iter().all(|v| {
                    child.iter().any(|c| c.start == v.start && c.end == v.end) != dont_fork(v)
                })
            });
        match (forked, &snap) {
            (Some(_), Some(s)) => confirm_on = Some(s.child),
            _ => confirm_frozen(pid, &mut mm.image)?,
        }
        debug!(pid, ms = ms_since(t0), "flags read ahead checked");
    }
    Ok(Captured {
        mm,
        tracking,
        snap,
        other,
        confirm_on,
    })
}

/// What `capture_memory` captured of a process.
struct Captured<T> {
    mm: mm::MmDump,
    /// The tracker it reset.
    tracking: Option<Tracking>,
    snap: Option<Snapshot>,
    /// What ran beside it returned.
    other: T,
    /// The snapshot child to check the flags read ahead against.
    confirm_on: Option<i32>,
}

/// Checks the mapping flags a process's image took from before the freeze
/// against its snapshot child `child`, which has them as they were at
/// the fork (the process itself runs on). See [`mm::reconcile_flags`].
fn confirm_flags(
    image: &mut ckpt_proto::image::MmImage,
    pid: i32,
    child: i32,
    smaps: &mut HashMap<i32, Result<Vec<proc::MapEntry>>>,
) -> Result<()> {
    let actual = smaps.remove(&child).unwrap_or_else(|| proc::smaps(child))?;
    mm::reconcile_flags(pid, image, &actual, &mm::NOT_INHERITED, dont_fork)?;
    debug!(pid, "flags read ahead confirmed");
    Ok(())
}

/// Checks the flags read ahead of stopped process `pid` against its smaps
/// now (no snapshot child to check them on).
fn confirm_frozen(pid: i32, image: &mut ckpt_proto::image::MmImage) -> Result<()> {
    mm::reconcile_flags(pid, image, &proc::smaps(pid)?, &mm::UFFD_FLAGS, |_| false)
}

/// Whether a mapping had MADV_DONTFORK (a snapshot child lacks it).
fn dont_fork(v: &ckpt_proto::image::Vma) -> bool {
    v.vm_flags.iter().any(|f| f == "dc")
}

/// Reads the smaps of snapshot children `children` (for
/// [`confirm_flags`]): they never run, so any time before they are
/// killed gives their flags as at the fork.
fn children_smaps(children: Vec<i32>) -> HashMap<i32, Result<Vec<proc::MapEntry>>> {
    let t0 = Instant::now();
    let out = children.into_iter().map(|c| (c, proc::smaps(c))).collect();
    debug!(ms = ms_since(t0), "snapshot children's smaps read");
    out
}

/// Checks the flags read ahead for process `pid` against its smaps now,
/// frozen, if its snapshot child `confirm_on` was dropped (its memory is
/// copied frozen after all).
fn confirm_if_dropped(
    pid: i32,
    image: &mut ckpt_proto::image::MmImage,
    confirm_on: &mut Option<i32>,
    kept: &[Snapshot],
) -> Result<()> {
    if confirm_on.is_some_and(|c| !kept.iter().any(|s| s.child == c)) {
        confirm_frozen(pid, image)?;
        *confirm_on = None;
    }
    Ok(())
}

/// What a dump knows of its tree from before the freeze.
struct Before<'a> {
    /// The checkpoint this one is an increment of.
    parent: Option<&'a Parent>,
    /// Mappings read ahead, by pid.
    ahead: &'a HashMap<i32, ReadAhead>,
}

/// What a snapshot dump reads of a process before its freeze.
struct ReadAhead {
    /// Field 22 of /proc/PID/stat: tells a reused pid apart.
    start_time: u64,
    maps: Vec<proc::MapEntry>,
}

/// Reads smaps of `root` and its descendants as they run: smaps walks
/// every page to count them (about 40 ms per 4 GiB of 4 KiB pages), time
/// a snapshot dump need not spend frozen.
fn read_ahead(root: i32) -> HashMap<i32, ReadAhead> {
    let mut out = HashMap::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        let (Ok(st), Ok(maps)) = (proc::stat(pid, None), proc::smaps(pid)) else {
            continue;
        };
        out.insert(
            pid,
            ReadAhead {
                start_time: st.field(22),
                maps,
            },
        );
        queue.extend(children(pid));
    }
    out
}

/// The flags read ahead for `pid`, if they still describe it: same
/// process, same layout (`now`, /proc/PID/maps read frozen), nothing
/// locked (mlock flags do not reach a snapshot child to be checked).
fn still_valid(
    pid: i32,
    ahead: Option<&ReadAhead>,
    now: &[proc::MapEntry],
) -> Option<Vec<proc::MapEntry>> {
    let a = ahead?;
    let layout = |m: &proc::MapEntry| {
        (
            m.start,
            m.end,
            m.perms.clone(),
            m.offset,
            m.dev_major,
            m.dev_minor,
            m.inode,
            m.path.clone(),
        )
    };
    let same =
        a.maps.len() == now.len() && a.maps.iter().zip(now).all(|(x, y)| layout(x) == layout(y));
    let st = proc::stat(pid, None).ok()?;
    let locked = proc::read(pid, "status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .map(|v| v.trim() != "0 kB")?;
    let flagged = a.maps.iter().any(|m| m.has_flag("lo") || m.has_flag("lf"));
    (same && st.field(22) == a.start_time && !locked && !flagged).then(|| a.maps.clone())
}

/// A process of the tree being dumped.
enum Member {
    Live(Seized),
    /// Exited, not yet reaped by its parent: only its identity and status.
    Zombie(Box<ckpt_proto::image::TaskCore>),
}

impl Member {
    fn pid(&self) -> i32 {
        match self {
            Member::Live(s) => s.pid,
            Member::Zombie(c) => c.pid,
        }
    }
}

/// The child processes of `pid` (of all its threads).
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for tid in proc::tids(pid).unwrap_or_default() {
        let kids = proc::read(pid, &format!("task/{tid}/children")).unwrap_or_default();
        out.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok()),
        );
    }
    out
}

fn zombie_core(pid: i32) -> Result<ckpt_proto::image::TaskCore> {
    let st = proc::stat(pid, None)?;
    Ok(ckpt_proto::image::TaskCore {
        pid,
        ppid: st.field(4) as i32,
        pgid: st.field(5) as i32,
        sid: st.field(6) as i32,
        comm: st.comm.clone(),
        state: "Z".into(),
        // The wait status, as waitpid would report it.
        exit_code: st.field(52) as i32,
        ..Default::default()
    })
}

/// Stops every process of the tree rooted at `root`, parents before
/// children. Stopped processes cannot fork, so re-listing children until
/// nothing new appears catches every fork that raced the seizing.
fn seize_tree(root: i32) -> Result<Vec<Member>> {
    let mut members: Vec<Member> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut queue = std::collections::VecDeque::from([root]);
    seen.insert(root);
    loop {
        while let Some(pid) = queue.pop_front() {
            let st = proc::stat(pid, None)?;
            if st.state() == 'Z' {
                members.push(Member::Zombie(Box::new(zombie_core(pid)?)));
                continue;
            }
            members.push(Member::Live(Seized::process(pid)?));
            for c in children(pid) {
                if seen.insert(c) {
                    queue.push_back(c);
                }
            }
        }
        let late: Vec<i32> = members
            .iter()
            .filter(|m| matches!(m, Member::Live(_)))
            .flat_map(|m| children(m.pid()))
            .filter(|c| !seen.contains(c))
            .collect();
        if late.is_empty() {
            return Ok(members);
        }
        for c in late {
            seen.insert(c);
            queue.push_back(c);
        }
    }
}

/// Dumps a process and all its descendants into `req.images`.
pub fn dump(req: &DumpRequest) -> Result<DumpReport> {
    dump_with_progress(req, &Quiet)
}

/// Like `dump`, reporting the page copy to `progress`.
pub fn dump_with_progress(req: &DumpRequest, progress: &dyn Progress) -> Result<DumpReport> {
    let mut session = DumpSession::prepare(req)?;
    session.dump(progress)?;
    session.finish(!req.leave_running)
}

/// A dump in its phases, as a two-phase checkpoint of a job spread over
/// nodes drives it: [`DumpSession::prepare`] stops the tree and blocks its
/// network (every node does so before any dumps: the barrier),
/// [`DumpSession::dump`] writes the images and commits this part,
/// [`DumpSession::finish`] resumes or stops the tree once the whole
/// checkpoint is committed. Dropped before `finish`, it aborts: the images
/// are discarded, the network unblocked, and every task runs on as before.
pub struct DumpSession {
    req: DumpRequest,
    t0: Instant,
    frozen_at: Instant,
    writer: ImageWriter,
    node: Option<ckpt_proto::image::NodeFingerprint>,
    cgroup: Option<JobCgroup>,
    tree: Vec<Member>,
    own_net: bool,
    lock: Option<NetLock>,
    /// Threads of the live processes of the tree.
    threads: usize,
    /// Snapshots being copied (dropped after the tree is released).
    snapshots: Vec<Snapshot>,
    /// Mappings of the tree's processes read before the freeze.
    ahead: HashMap<i32, ReadAhead>,
    /// Set when the tree ran on before the end of the dump: how long it
    /// stood still.
    resumed_ms: Option<f64>,
    /// Set by `dump`.
    dumped: Option<Written>,
    parent: Option<Parent>,
    finished: bool,
}

/// What `DumpSession::dump` wrote.
struct Written {
    pages_bytes: u64,
    stored_bytes: u64,
    snapshot_bytes: u64,
    pages_ms: f64,
}

impl DumpSession {
    /// Stops every task of the tree (its cgroup frozen first, for a job, so
    /// that nothing forks or exits meanwhile) and blocks its TCP traffic.
    pub fn prepare(req: &DumpRequest) -> Result<DumpSession> {
        let t0 = Instant::now();
        let pid = req.pid;
        check_target(pid)?;
        let writer = match &req.stream {
            Some(to) => ImageWriter::streaming(&req.images, to)?,
            None => ImageWriter::create(&req.images)?,
        };
        let parent = req
            .parent
            .as_deref()
            .map(|p| Parent::open(p, &req.images))
            .transpose()?;
        // Before the freeze: nothing about the node changes during it.
        let node = crate::check::fingerprint()
            .map_err(|e| tracing::warn!("checkpoint will not name its node: {e}"))
            .ok();
        // A job's cgroup is frozen first, so no fork, clone or exit races
        // the seizing; the seized tasks stay stopped by ptrace once it is
        // thawed (injected calls need them able to run).
        let cgroup = JobCgroup::of_pid(pid)?;
        // What an agent that died mid-way left is undone first.
        crate::cgroup::recover_frozen()?;
        crate::netlock::recover(None)?;
        crate::track::prune();
        let own = ns::own_namespaces(pid)?;
        let ahead = match req.snapshot {
            true => read_ahead(pid),
            false => HashMap::new(),
        };
        // Fault injection for tests: a window between the read ahead and
        // the freeze, to change the tree's mappings in.
        fault_hold("CKPT_FAULT_HOLD_READ_AHEAD_MS");
        let frozen = cgroup.as_ref().map(JobCgroup::freeze).transpose()?;
        if frozen.is_some() {
            // Fault injection for tests: widen the frozen window so that a
            // test can kill the agent inside it.
            fault_hold("CKPT_FAULT_HOLD_FROZEN_MS");
        }
        let frozen_at = Instant::now();
        if let Some(cg) = &cgroup {
            // A task frozen by the v1 freezer reaches its ptrace stop only
            // once thawed: seize and interrupt every thread now, while
            // nothing can fork, and collect the stops after the thaw.
            for tid in cg.threads()? {
                crate::seize::seize_and_interrupt(tid, tid)?;
            }
        }
        drop(frozen);
        let tree = seize_tree(pid)?;
        if let Some(cg) = &cgroup {
            let procs = cg.procs()?;
            if let Some(stray) = procs.iter().find(|p| !tree.iter().any(|m| m.pid() == **p)) {
                return Err(Error::Refused {
                    pid: *stray,
                    reason: format!(
                        "it is in job {}'s cgroup but not a descendant of {pid}: the job would be incomplete",
                        cg.job
                    ),
                });
            }
        }
        let own_net = own & libc::CLONE_NEWNET as u64 != 0;
        // The root of a tree with its own PID namespace is its init.
        let inner_root = if own & libc::CLONE_NEWPID as u64 != 0 {
            1
        } else {
            pid
        };
        let name = lock_name(cgroup.as_ref().map_or("", |c| c.job.as_str()), inner_root);
        // A pre-dump reads no socket.
        let lock = match req.pre_dump {
            true => None,
            false => lock_network(&tree, &name, own_net)?,
        };
        let threads = tree
            .iter()
            .map(|m| match m {
                Member::Live(s) => s.threads.len(),
                Member::Zombie(_) => 0,
            })
            .sum();
        Ok(DumpSession {
            req: req.clone(),
            t0,
            frozen_at,
            writer,
            node,
            cgroup,
            tree,
            own_net,
            lock,
            threads,
            snapshots: Vec::new(),
            ahead,
            resumed_ms: None,
            dumped: None,
            parent,
            finished: false,
        })
    }

    /// Writes every image of the stopped tree and commits this checkpoint
    /// (its inventory). The tree stays stopped, unless the request asked
    /// for snapshots: then it runs on as soon as its state is captured,
    /// while its private memory is copied from the snapshots.
    pub fn dump(&mut self, progress: &dyn Progress) -> Result<()> {
        if self.req.pre_dump {
            return self.pre_dump(progress);
        }
        let host_pids: Vec<i32> = self.tree.iter().map(Member::pid).collect();
        debug!(ms = ms_since(self.frozen_at), "tree stopped");
        let nsd = ns::dump(&host_pids, &self.writer)?;
        debug!(ms = ms_since(self.frozen_at), "namespaces captured");
        let dumped = capture_tree(
            &self.tree,
            &self.writer,
            &self.req,
            &nsd,
            self.lock.as_mut(),
            Before {
                parent: self.parent.as_ref(),
                ahead: &self.ahead,
            },
            &mut self.snapshots,
        )?;
        // Known now: the tree and its lock may be gone before the commit.
        let needs_features = needed_features(&nsd.image, self.lock.as_ref());
        let owner_uid = crate::proc::owner(self.req.pid)?;
        debug!(ms = ms_since(self.frozen_at), "processes captured");
        // Those dropped end now, their parents still held.
        let cow: Vec<(i32, u64)> = dumped
            .iter()
            .map(|d| (d.core.pid, d.mm.cow_bytes()))
            .collect();
        self.snapshots = keep_snapshots(std::mem::take(&mut self.snapshots), &cow)?;
        let mut dumped = dumped;
        for d in &mut dumped {
            confirm_if_dropped(
                d.core.pid,
                &mut d.mm.image,
                &mut d.confirm_on,
                &self.snapshots,
            )?;
        }
        let tp = Instant::now();
        let ids = &nsd.pids;
        let items: Vec<pages::DumpItem<'_>> = dumped
            .iter()
            .map(|d| self.item(d.core.pid, ids.inner(d.core.pid), &d.mm, d.tracking))
            .collect();
        let children = dumped.iter().filter_map(|d| d.confirm_on).collect();
        let (pms, snapshot_bytes, mut smaps) = self.copy_pages(&items, progress, children)?;
        let pages_ms = tp.elapsed().as_secs_f64() * 1e3;
        drop(items);
        for d in &mut dumped {
            if let Some(child) = d.confirm_on {
                confirm_flags(&mut d.mm.image, d.core.pid, child, &mut smaps)?;
            }
        }
        self.kill_snapshots();
        let (pages_bytes, stored_bytes) = write_images(dumped, pms, ids, &self.writer)?;
        if let Some(hold) = &self.req.hold {
            self.writer
                .write(crate::held::HELD, ImageKind::Held, &hold.record())?;
        }
        let pids: Vec<i32> = host_pids.iter().map(|p| nsd.pids.inner(*p)).collect();
        let inv = self.inventory(
            nsd.pids.inner(self.req.pid),
            pids,
            needs_features,
            owner_uid,
        );
        self.commit(
            inv,
            Written {
                pages_bytes,
                stored_bytes,
                snapshot_bytes,
                pages_ms,
            },
        )
    }

    /// The hold this dump keeps its page content in, if any.
    pub fn hold(&self) -> Option<&crate::held::Hold> {
        self.req.hold.as_ref()
    }

    /// Kills the snapshot children, whose copy is over: their address
    /// spaces are torn down while the images are written and committed;
    /// `commit` collects them.
    fn kill_snapshots(&self) {
        for s in &self.snapshots {
            s.kill();
        }
    }

    /// Commits this checkpoint (its inventory, signed with the request's
    /// key if any) and records what it wrote.
    fn commit(&mut self, inv: Inventory, written: Written) -> Result<()> {
        self.writer.commit(inv, self.req.key.as_ref())?;
        for s in std::mem::take(&mut self.snapshots) {
            s.end();
        }
        self.dumped = Some(written);
        Ok(())
    }

    /// What the page copy needs of process `pid` (`inner`: as the job
    /// sees it, naming its files).
    fn item<'m>(
        &self,
        pid: i32,
        inner: i32,
        mm: &'m mm::MmDump,
        tracking: Option<Tracking>,
    ) -> pages::DumpItem<'m> {
        // Held pages stay here, beside nothing else of the level.
        let (dir, stream) = match &self.req.hold {
            Some(h) => (h.dir.as_path(), None),
            None => (self.writer.dir(), self.writer.outbox()),
        };
        pages::DumpItem {
            pid,
            extents: &mm.extents,
            path: dir.join(pages_name(inner)),
            name: pages_name(inner),
            stream,
            snapshot: self
                .snapshots
                .iter()
                .find(|s| s.parent == pid)
                .map(|s| s.child),
            in_parent: &mm.in_parent,
            tracking,
        }
    }

    /// The inventory of this checkpoint, its files listed at the commit.
    fn inventory(
        &self,
        root_pid: i32,
        pids: Vec<i32>,
        needs_features: Vec<String>,
        owner_uid: u32,
    ) -> Inventory {
        let req = &self.req;
        Inventory {
            format_version: FORMAT_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            root_pid,
            pids,
            node: self.node.clone(),
            files: Vec::new(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            options: Some(DumpOptions {
                leave_running: req.leave_running,
                tcp_established: req.tcp_established,
                ext_unix_sk: req.ext_unix_sk,
                shell_job: req.shell_job,
            }),
            needs_features,
            owner_uid,
            signature: Vec::new(),
            parent: self
                .parent
                .as_ref()
                .map(|p| p.relative.to_string_lossy().into_owned())
                .unwrap_or_default(),
            parent_inventory_crc32c: self.parent.as_ref().map_or(0, |p| p.inventory_crc32c),
            pre_dump: req.pre_dump,
        }
    }

    /// Copies the pages of `items`: what must be copied frozen, then (the
    /// tree running on, if it has snapshots) what the snapshots hold,
    /// reading meanwhile the smaps of snapshot children `children` (a page
    /// walk each, 50 ms per 4 GiB: for [`confirm_flags`]). Returns the
    /// indexes, the bytes copied from snapshots and the children's smaps.
    #[allow(clippy::type_complexity)]
    fn copy_pages(
        &mut self,
        items: &[pages::DumpItem<'_>],
        progress: &dyn Progress,
        children: Vec<i32>,
    ) -> Result<(
        Vec<ckpt_proto::image::PageMap>,
        u64,
        HashMap<i32, Result<Vec<proc::MapEntry>>>,
    )> {
        Ok(if self.req.tasks_in_parallel {
            let mut copy = pages::PageCopy::new(items, self.req.compress)?;
            copy.copy_frozen(progress)?;
            debug!(ms = ms_since(self.frozen_at), "frozen copy done");
            self.hold_locked();
            if !self.snapshots.is_empty() {
                self.run_on()?;
                // Fault injection for tests: a window, with the tree
                // running and its snapshots held, to kill the agent in.
                fault_hold("CKPT_FAULT_HOLD_RUNNING_MS");
            }
            // Once the tree runs: not to slow the frozen copy.
            let (bytes, smaps) = std::thread::scope(|s| {
                let smaps = s.spawn(|| children_smaps(children));
                let bytes = copy.copy_snapshots(progress);
                (bytes, smaps.join().expect("reading smaps does not panic"))
            });
            (copy.finish(), bytes?, smaps)
        } else {
            // One process at a time, frozen: for comparison in benchmarks.
            let mut v = Vec::new();
            for it in items {
                v.extend(pages::dump_all(
                    std::slice::from_ref(it),
                    self.req.compress,
                    progress,
                )?);
            }
            self.hold_locked();
            (v, 0, children_smaps(children))
        })
    }

    /// A pre-dump: the memory of every live process, read and its write
    /// tracker reset while the tree is stopped, copied (mostly from
    /// snapshots) once it runs on; committed as memory only.
    fn pre_dump(&mut self, progress: &dyn Progress) -> Result<()> {
        let live: Vec<i32> = self
            .tree
            .iter()
            .filter(|m| matches!(m, Member::Live(_)))
            .map(Member::pid)
            .collect();
        let ids = ns::PidMap::of_tree(&live)?;
        let owner_uid = crate::proc::owner(self.req.pid)?;
        let mut mems = Vec::with_capacity(live.len());
        let mut snaps = Vec::new();
        for m in &self.tree {
            let Member::Live(s) = m else { continue };
            let plan = TrackPlan::new(&self.req, self.parent.as_ref(), ids.inner(s.pid));
            s.block_signals()?;
            let main = Remote::new(Pid::from_raw(s.pid), mm::find_syscall_gadget(s.pid)?)?;
            let read_ahead = still_valid(s.pid, self.ahead.get(&s.pid), &proc::maps(s.pid)?);
            let r = capture_memory(
                s.pid,
                &main,
                &plan,
                (0, None, &self.writer),
                self.req.snapshot,
                read_ahead,
                || Ok(()),
            );
            s.reset()?;
            let c = r?;
            snaps.extend(c.snap);
            mems.push((s.pid, c.mm, c.tracking, c.confirm_on));
        }
        debug!(ms = ms_since(self.frozen_at), "memory captured");
        let cow: Vec<(i32, u64)> = mems
            .iter()
            .map(|(p, m, _, _)| (*p, m.cow_bytes()))
            .collect();
        self.snapshots = keep_snapshots(snaps, &cow)?;
        for (pid, mm, _, confirm_on) in &mut mems {
            confirm_if_dropped(*pid, &mut mm.image, confirm_on, &self.snapshots)?;
        }
        let tp = Instant::now();
        let items: Vec<pages::DumpItem<'_>> = mems
            .iter()
            .map(|(pid, mm, tracking, _)| self.item(*pid, ids.inner(*pid), mm, *tracking))
            .collect();
        let children = mems.iter().filter_map(|m| m.3).collect();
        let (pms, snapshot_bytes, mut smaps) = self.copy_pages(&items, progress, children)?;
        let pages_ms = tp.elapsed().as_secs_f64() * 1e3;
        drop(items);
        // A pre-dump writes no address space image, but pages it saved
        // from the wrong source would stay in the chain.
        for (pid, mm, _, confirm_on) in &mut mems {
            if let Some(child) = *confirm_on {
                confirm_flags(&mut mm.image, *pid, child, &mut smaps)?;
            }
        }
        self.kill_snapshots();
        let (mut pages_bytes, mut stored_bytes) = (0, 0);
        for pm in pms {
            let pm = ckpt_proto::image::PageMap {
                pid: ids.inner(pm.pid),
                ..pm
            };
            self.writer.add_pages(&pm);
            self.writer.write(
                &image_name(ImageKind::PageMap, pm.pid),
                ImageKind::PageMap,
                &pm,
            )?;
            pages_bytes += pm.content_size;
            stored_bytes += pm.pages_file_size;
        }
        let pids = live.iter().map(|p| ids.inner(*p)).collect();
        let inv = self.inventory(ids.inner(self.req.pid), pids, Vec::new(), owner_uid);
        self.commit(
            inv,
            Written {
                pages_bytes,
                stored_bytes,
                snapshot_bytes,
                pages_ms,
            },
        )
    }

    /// Fault injection for tests: a window, with the tree stopped and its
    /// network locked, to kill the agent in.
    fn hold_locked(&self) {
        if self.lock.is_some() {
            fault_hold("CKPT_FAULT_HOLD_LOCKED_MS");
        }
    }

    /// Lets the tree run on before the dump is over: its state is
    /// captured and what is left to copy is in snapshots.
    fn run_on(&mut self) -> Result<()> {
        for m in std::mem::take(&mut self.tree) {
            if let Member::Live(s) = m {
                s.release()?;
            }
        }
        if let Some(l) = self.lock.take() {
            l.release()?;
        }
        let ms = self.frozen_at.elapsed().as_secs_f64() * 1e3;
        self.resumed_ms = Some(ms);
        info!(
            pid = self.req.pid,
            frozen_ms = ms,
            "running on while its memory is copied"
        );
        Ok(())
    }

    /// Host PIDs of the processes this session holds.
    pub fn pids(&self) -> Vec<i32> {
        self.tree.iter().map(Member::pid).collect()
    }

    /// Bytes of pages the dump wrote (None before `dump`).
    pub fn pages_bytes(&self) -> Option<u64> {
        self.dumped.as_ref().map(|d| d.pages_bytes)
    }

    /// Of those, the bytes copied from snapshots after the tree ran on.
    pub fn snapshot_bytes(&self) -> Option<u64> {
        self.dumped.as_ref().map(|d| d.snapshot_bytes)
    }

    /// Lets the tree run on (`stop` false) or kills it (`stop` true: the
    /// job has left this node; its cgroup goes, and its network lock stays
    /// until the restore when its addresses stay on this node).
    pub fn finish(self, stop: bool) -> Result<DumpReport> {
        let (mut report, departure) = self.end(stop, false)?;
        if let Some(d) = departure {
            // A killed tree is frozen until it is gone, and the dump ends
            // then.
            let t = Instant::now();
            d.complete()?;
            report.frozen_ms += ms_since(t);
            report.total_ms += ms_since(t);
        }
        Ok(report)
    }

    /// [`DumpSession::finish`] stopping the tree, except that the tree is
    /// only killed: it never runs again, but waiting for its exit (its
    /// memory freed), closing its sockets and removing its cgroup are left
    /// to the returned [`Departure`], so that a migration's target can
    /// restore the job meanwhile. Its tasks are moved into a cgroup set
    /// aside first, so that the job's own name is free at once; when that
    /// fails, the departure is completed here (None).
    pub fn finish_departing(self) -> Result<(DumpReport, Option<Departure>)> {
        self.end(true, true)
    }

    fn end(mut self, stop: bool, depart: bool) -> Result<(DumpReport, Option<Departure>)> {
        let Some(w) = self.dumped.take() else {
            return Err(Error::Refused {
                pid: self.req.pid,
                reason: "finish before the dump was written".into(),
            });
        };
        if stop && self.resumed_ms.is_some() {
            return Err(Error::Refused {
                pid: self.req.pid,
                reason: "it already runs on (the dump used snapshots); kill it instead".into(),
            });
        }
        self.finished = true;
        let live: Vec<Seized> = std::mem::take(&mut self.tree)
            .into_iter()
            .filter_map(|m| match m {
                Member::Live(s) => Some(s),
                Member::Zombie(_) => None,
            })
            .collect();
        let lock = self.lock.take();
        let pid = self.req.pid;
        let departure = if !stop {
            for s in live {
                s.release()?;
            }
            if let Some(l) = lock {
                l.release()?;
            }
            None
        } else {
            let mut lock = lock;
            if let Some(l) = lock.as_mut() {
                // Closed in repair mode, whoever closes them last (the
                // agent or the dying tasks): no FIN, no reset.
                l.repair_for_close()?;
            }
            let mut cgroup = self.cgroup.take();
            let departing = depart && {
                // Out of its cgroup the tree would pass for gone: an agent
                // dying from here on must not let it run on.
                Seized::exit_kill(&live)?;
                match cgroup.as_mut().map(|cg| cg.set_aside()) {
                    Some(Err(e)) => {
                        warn!(pid, "{e}: the answer waits for the killed tree to go");
                        false
                    }
                    _ => true,
                }
            };
            if let (true, Some(l), false) = (departing, lock.as_mut(), self.own_net) {
                // Not a reason to let the tree run on outside its cgroup:
                // the lock is kept at the end of the departure all the same.
                if let Err(e) = l.mark_kept() {
                    warn!(pid, "{e}");
                }
            }
            let departure = Departure {
                pid,
                killed: Seized::kill_all_now(live)?,
                lock,
                own_net: self.own_net,
                cgroup,
            };
            if departing {
                Some(departure)
            } else {
                departure.complete()?;
                None
            }
        };
        let frozen_ms = self
            .resumed_ms
            .unwrap_or_else(|| self.frozen_at.elapsed().as_secs_f64() * 1e3);
        info!(pid, pages_bytes = w.pages_bytes, frozen_ms, "dump complete");
        let report = DumpReport {
            pid,
            threads: self.threads,
            images: self.req.images.clone(),
            streamed_to: self.writer.outbox().map(|_| self.writer.destination()),
            pages_bytes: w.pages_bytes,
            stored_bytes: w.stored_bytes,
            snapshot_bytes: w.snapshot_bytes,
            frozen_ms,
            pages_ms: w.pages_ms,
            total_ms: self.t0.elapsed().as_secs_f64() * 1e3,
        };
        Ok((report, departure))
    }
}

/// A tree killed by [`DumpSession::finish_departing`] on its way out of this
/// node: what is left is to wait for its tasks' exit and to clear what
/// the job held here.
pub struct Departure {
    pid: i32,
    killed: crate::seize::Killed,
    lock: Option<NetLock>,
    own_net: bool,
    cgroup: Option<JobCgroup>,
}

impl Departure {
    /// Waits until every task has exited, then drops the agent's copies of
    /// the sockets, keeps or releases the network lock, and removes the
    /// job's cgroup. Runs on any thread of the agent.
    /// Each step is taken whatever the one before gave (a lock dropped
    /// unkept would take the sockets out of repair mode); the first error
    /// is returned.
    pub fn complete(self) -> Result<()> {
        fault_hold("CKPT_FAULT_HOLD_DEPARTURE_MS");
        let t = Instant::now();
        let mut first = self.killed.wait().err();
        if let Some(mut l) = self.lock {
            if let Err(e) = l.drop_sockets() {
                first.get_or_insert(e);
            }
            let r = if self.own_net {
                // The namespace went with the job, and its rules with it.
                l.release()
            } else {
                // The job's addresses stay on this node: a peer's
                // retransmission must not meet a reset before the restore.
                l.keep()
            };
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        // The job has left this node.
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        debug!(pid = self.pid, ms = ms_since(t), "killed tree gone");
        first.map_or(Ok(()), Err)
    }
}

impl Drop for DumpSession {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Aborted: nothing may look like a checkpoint; sockets out of repair
        // mode and unlocked before the tasks run again as they were.
        self.writer.discard();
        if let Some(hold) = &self.req.hold {
            hold.remove();
        }
        drop(self.lock.take());
        self.tree.clear();
        // After the tree's release: reaping a snapshot stops its parent
        // for a moment.
        self.snapshots.clear();
    }
}

/// Sleeps for the milliseconds environment variable `var` names, if set:
/// tests widen a window of the dump to kill the agent in it.
fn fault_hold(var: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        tracing::info!("fault injection: holding {var} for {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The kernel features a restore of this dump needs: its namespaces', and
/// those that rebuild and lock its TCP endpoints.
fn needed_features(ns_img: &ckpt_proto::image::NsImage, lock: Option<&NetLock>) -> Vec<String> {
    let mut v = ns::needed_features(ns_img);
    if let Some(l) = lock {
        v.push("nftables".into());
        if l.has_connections() {
            v.push("tcp_repair".into());
        }
    }
    v
}

/// The name a checkpoint's network lock goes by: the job's, or the root
/// process's for a tree that is not a job.
pub fn lock_name(job: &str, root: i32) -> String {
    if job.is_empty() {
        format!("pid{root}")
    } else {
        job.to_string()
    }
}

/// Blocks the tree's TCP traffic before any socket is read, in the
/// namespace the sockets live in (the job's own when `own_net`). None when
/// the tree has no TCP socket.
fn lock_network(tree: &[Member], name: &str, own_net: bool) -> Result<Option<NetLock>> {
    let live: Vec<i32> = tree
        .iter()
        .filter(|m| matches!(m, Member::Live(_)))
        .map(Member::pid)
        .collect();
    let conns = crate::inet::live_conns(&live)?;
    if conns.is_empty() {
        return Ok(None);
    }
    let ns = if own_net {
        Netns::Of(tree[0].pid())
    } else {
        Netns::Agent
    };
    NetLock::take(name, ns, conns).map(Some)
}

/// What one live process's dump produced before its pages are copied; the
/// fd tables of all processes are written once linked with each other.
struct Dumped {
    core: ckpt_proto::image::TaskCore,
    fds: ckpt_proto::image::FdTable,
    mm: mm::MmDump,
    /// The write tracker this dump reset, for the page index.
    tracking: Option<Tracking>,
    /// The snapshot child to check the mapping flags read ahead against.
    confirm_on: Option<i32>,
}

/// Captures every live process of the tree, one after the other (ptrace
/// requests must come from the tracing thread): its state, files and
/// address space, and links the fd tables of all with each other. Writes
/// the cores of zombies.
fn capture_tree(
    tree: &[Member],
    writer: &ImageWriter,
    req: &DumpRequest,
    nsd: &ns::NsDump,
    mut lock: Option<&mut NetLock>,
    before: Before<'_>,
    snapshots: &mut Vec<Snapshot>,
) -> Result<Vec<Dumped>> {
    let Before { parent, ahead } = before;
    let ids = &nsd.pids;
    let mut dumped = Vec::with_capacity(tree.len());
    for m in tree {
        match m {
            Member::Live(s) => {
                let mut net = crate::inet::DumpCtx {
                    tcp_established: req.tcp_established,
                    lock: lock.as_deref_mut(),
                };
                let plan = TrackPlan::new(req, parent, ids.inner(s.pid));
                let (d, snap) = dump_seized(
                    s,
                    writer,
                    nsd.image.own,
                    &mut net,
                    &plan,
                    req.snapshot,
                    ahead.get(&s.pid),
                )?;
                dumped.push(d);
                snapshots.extend(snap);
            }
            Member::Zombie(core) => {
                let mut core = (**core).clone();
                ids.core(&mut core);
                writer.write(
                    &image_name(ImageKind::Core, core.pid),
                    ImageKind::Core,
                    &core,
                )?;
            }
        }
    }
    check_groups(tree, &dumped)?;
    check_sharing(&mut dumped)?;
    let mut tables: Vec<_> = dumped
        .iter_mut()
        .map(|d| std::mem::take(&mut d.fds))
        .collect();
    // Snapshot children share their parents' fd tables: not outside.
    let children: Vec<i32> = snapshots.iter().map(|s| s.child).collect();
    let tree: std::collections::HashSet<i32> = tables
        .iter()
        .map(|t| t.pid)
        .chain(children.iter().copied())
        .collect();
    files::link_tree(&mut tables, req.ext_unix_sk, &|ino| {
        crate::proc::pipe_held_outside(ino, &tree)
    })?;
    crate::tty::link(&mut tables, req.shell_job, &children)?;
    for (d, fds) in dumped.iter_mut().zip(tables) {
        d.fds = fds;
    }
    Ok(dumped)
}

/// Keeps the snapshots worth copying from: those of processes with
/// copy-on-write memory to save, unless copying on write could take the
/// job past its memory limit.
/// `cow`: each process's pid with its bytes of copy-on-write memory.
fn keep_snapshots(snaps: Vec<Snapshot>, cow: &[(i32, u64)]) -> Result<Vec<Snapshot>> {
    if snaps.is_empty() {
        return Ok(snaps);
    }
    // Each page the job writes before it is copied gets copied on write,
    // charged to the job: in the worst case all of them. A job that could
    // meet its memory limit that way is copied frozen instead of risking
    // its OOM kill.
    let need: u64 = cow
        .iter()
        .filter(|(pid, _)| snaps.iter().any(|s| s.parent == *pid))
        .map(|(_, bytes)| bytes)
        .sum();
    let mut room: Option<u64> = None;
    for &(pid, _) in cow {
        if let Some(r) = crate::cgroup::memory_headroom(pid)? {
            room = Some(room.map_or(r, |l| l.min(r)));
        }
    }
    if let Some(room) = room.filter(|&r| r < need) {
        info!(
            pid = cow.first().map_or(0, |c| c.0),
            room, need, "copying frozen: copy-on-write could take the job past its memory limit"
        );
        return Ok(Vec::new());
    }
    Ok(snaps
        .into_iter()
        .filter(|s| cow.iter().any(|&(pid, b)| pid == s.parent && b > 0))
        .collect())
}

/// Writes the images of every captured process, with the index of its
/// pages file; returns the bytes of page content, and those stored.
fn write_images(
    dumped: Vec<Dumped>,
    pms: Vec<ckpt_proto::image::PageMap>,
    ids: &ns::PidMap,
    writer: &ImageWriter,
) -> Result<(u64, u64)> {
    let (mut bytes, mut stored) = (0, 0);
    // Images name every process as the job sees it (the PIDs restore
    // recreates); only the copy needed the agent's view.
    for (mut d, pm) in dumped.into_iter().zip(pms) {
        let pid = ids.inner(d.core.pid);
        ids.core(&mut d.core);
        ids.fds(&mut d.fds);
        d.mm.image.pid = pid;
        let pm = ckpt_proto::image::PageMap { pid, ..pm };
        writer.add_pages(&pm);
        writer.write(&image_name(ImageKind::Mm, pid), ImageKind::Mm, &d.mm.image)?;
        writer.write(
            &image_name(ImageKind::PageMap, pid),
            ImageKind::PageMap,
            &pm,
        )?;
        writer.write(&image_name(ImageKind::Core, pid), ImageKind::Core, &d.core)?;
        writer.write(&image_name(ImageKind::Files, pid), ImageKind::Files, &d.fds)?;
        bytes += pm.content_size;
        stored += pm.pages_file_size;
    }
    Ok((bytes, stored))
}

/// Restore recreates sessions and process groups from their leaders; one
/// whose leader is gone (or outside the tree, other than the root's own,
/// which the restored root takes from its new parent) cannot be rebuilt.
fn check_groups(tree: &[Member], dumped: &[Dumped]) -> Result<()> {
    let mut ids: Vec<(i32, i32, i32)> = dumped
        .iter()
        .map(|d| (d.core.pid, d.core.pgid, d.core.sid))
        .collect();
    for m in tree {
        if let Member::Zombie(c) = m {
            ids.push((c.pid, c.pgid, c.sid));
        }
    }
    let root = tree[0].pid();
    let (_, root_pgid, root_sid) = *ids
        .iter()
        .find(|i| i.0 == root)
        .expect("the root was dumped");
    let in_tree = |p: i32| ids.iter().any(|i| i.0 == p);
    for &(pid, pgid, sid) in &ids {
        for (what, id, roots) in [
            ("process group", pgid, root_pgid),
            ("session", sid, root_sid),
        ] {
            if !in_tree(id) && id != roots {
                return Err(Error::Refused {
                    pid,
                    reason: format!(
                        "its {what} {id} is led by a process outside the tree (or gone); not supported yet"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Processes that share an address space (vfork in progress, CLONE_VM)
/// would come back as separate copies: refused. Processes that share an fd
/// table (CLONE_FILES) keep sharing it: the first of each group (in tree
/// order, so a parent before its children) owns the table, the others
/// record whose table they share and dump none; each of them must have
/// its parent in the group, which creates it with CLONE_FILES on restore.
fn check_sharing(dumped: &mut [Dumped]) -> Result<()> {
    use crate::sys::pidfd::{kcmp_shares, Shared};
    for i in 0..dumped.len() {
        for j in i + 1..dumped.len() {
            let (pa, pb) = (dumped[i].core.pid, dumped[j].core.pid);
            if kcmp_shares(pa, pb, Shared::Vm).map_err(|e| Error::sys(pb, "kcmp", e))? {
                return Err(Error::Refused {
                    pid: pb,
                    reason: format!(
                        "it shares its address space with process {pa} (CLONE_VM without a thread group); not supported yet"
                    ),
                });
            }
            if dumped[j].core.fd_table_of == 0
                && dumped[i].core.fd_table_of == 0
                && kcmp_shares(pa, pb, Shared::Files).map_err(|e| Error::sys(pb, "kcmp", e))?
            {
                dumped[j].core.fd_table_of = pa;
            }
        }
    }
    for d in dumped.iter() {
        let owner = d.core.fd_table_of;
        if owner == 0 {
            continue;
        }
        let parent = d.core.ppid;
        let group_of_parent = dumped.iter().find(|p| p.core.pid == parent).map(|p| {
            if p.core.fd_table_of != 0 {
                p.core.fd_table_of
            } else {
                p.core.pid
            }
        });
        if group_of_parent != Some(owner) {
            return Err(Error::Refused {
                pid: d.core.pid,
                reason: format!(
                    "it shares the fd table of process {owner} but its parent {parent} does not: \
                     it could not be recreated with CLONE_FILES; not supported"
                ),
            });
        }
    }
    for d in dumped.iter_mut().filter(|d| d.core.fd_table_of != 0) {
        d.fds.fds.clear();
        d.fds.files.clear();
    }
    Ok(())
}

/// The part of a process's dump that needs ptrace: its state, injected
/// queries, files, and its address space with the pages to save; with
/// `snapshot`, also the process's snapshot (None if it could not fork).
/// `own`: the tree's namespaces apart from the agent's (every process of
/// the tree shares the root's: `ns::dump` checked).
fn dump_seized(
    seized: &Seized,
    writer: &ImageWriter,
    own: u64,
    net: &mut crate::inet::DumpCtx<'_>,
    plan: &TrackPlan,
    snapshot: bool,
    ahead: Option<&ReadAhead>,
) -> Result<(Dumped, Option<Snapshot>)> {
    let pid = seized.pid;
    let t0 = Instant::now();
    let mut threads = Vec::with_capacity(seized.threads.len());
    for t in &seized.threads {
        threads.push(task::dump_thread_outside(pid, t.tid, &t.regs)?);
    }
    seized.block_signals()?;
    let gadget = mm::find_syscall_gadget(pid)?;
    let main = Remote::new(Pid::from_raw(pid), gadget)?;
    // The scratch area sits in a gap with free pages on both sides, so it
    // merges with no mapping and can be left out of the image.
    let maps = proc::maps(pid)?;
    let read_ahead = still_valid(pid, ahead, &maps);
    let busy: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    let want = mm::find_gap(&busy, SCRATCH_LEN).ok_or_else(|| Error::Refused {
        pid,
        reason: "no free address range for the agent's scratch area".into(),
    })?;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let addr = main.syscall(
        libc::SYS_mmap,
        &[want, SCRATCH_LEN, prot, flags, u64::MAX, 0],
    )?;
    let mut scratch = Scratch::new(pid, addr, SCRATCH_LEN);
    let result = (|| -> Result<_> {
        let mut core = task::dump_process(pid, own, &main, &mut scratch)?;
        for (th, t) in threads.iter_mut().zip(&seized.threads) {
            let r = Remote::new(Pid::from_raw(t.tid), gadget)?;
            task::dump_thread_inside(th, &r, &mut scratch)?;
        }
        core.threads = std::mem::take(&mut threads);
        let brk = mm::current_brk(&main)?;
        debug!(pid, ms = ms_since(t0), "task state captured");
        let skip = Some((addr, addr + SCRATCH_LEN));
        let args = (brk, skip, writer);
        let c = capture_memory(pid, &main, plan, args, snapshot, read_ahead, || {
            let fds = files::dump(pid, writer, own, net);
            debug!(pid, ms = ms_since(t0), "files captured");
            fds
        })?;
        Ok((
            Dumped {
                core,
                fds: c.other,
                mm: c.mm,
                tracking: c.tracking,
                confirm_on: c.confirm_on,
            },
            c.snap,
        ))
    })();
    // The scratch area is outside every extent to copy: it can go now, and
    // the threads get their own registers back for the long page copy.
    main.syscall(libc::SYS_munmap, &[addr, SCRATCH_LEN])?;
    seized.reset()?;
    result
}

/// Milliseconds since `t`, for the logs of the frozen window's phases.
fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
