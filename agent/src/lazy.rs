//! Lazy restore: the restored tree runs before its private anonymous
//! memory is in. Each process's mappings are registered with a
//! userfaultfd for missing pages (made inside the process, held by the
//! agent); the agent serves each fault from the images and meanwhile
//! copies every remaining page in address order (prefetch), then lets go.
//!
//! The process keeps changing its address space while pages are missing,
//! and the agent hears of it (non-cooperative events): a range dropped
//! (MADV_DONTNEED, munmap) must never be filled with saved content again,
//! a range moved (mremap) is filled at its new address, and a forked child
//! has its own userfaultfd and still misses what its parent missed. Each
//! address space is a [`Space`]: its userfaultfd and its `view`, which
//! image range sits where now. UFFDIO_COPY fails with EAGAIN while an
//! event is pending unread, so no copy ever lands on a range the process
//! changed behind the agent's back.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::pages::Source;
use crate::sys::uffd::{self, UffdEvent, Userfaultfd};

const PAGE: u64 = 4096;

/// The events a lazy restore's userfaultfd must deliver.
pub const FEATURES: u64 = uffd::UFFD_FEATURE_EVENT_FORK
    | uffd::UFFD_FEATURE_EVENT_REMAP
    | uffd::UFFD_FEATURE_EVENT_REMOVE
    | uffd::UFFD_FEATURE_EVENT_UNMAP;

/// One restored process whose pages are to be served.
pub struct LazyProcess {
    pub pid: i32,
    pub uffd: Userfaultfd,
    /// The registered ranges.
    pub ranges: Vec<(u64, u64)>,
    /// Image ranges of MADV_WIPEONFORK mappings: empty in a child.
    pub wipe_on_fork: Vec<(u64, u64)>,
    pub source: Source,
}

/// Where image ranges sit in an address space now: (image start, image
/// end, current start), sorted by image start, not overlapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct View(Vec<(u64, u64, u64)>);

impl View {
    fn identity(ranges: &[(u64, u64)]) -> View {
        View(ranges.iter().map(|&(s, e)| (s, e, s)).collect())
    }

    /// The image address now at `cur`.
    fn image_of(&self, cur: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|&&(s, e, c)| cur >= c && cur < c + (e - s))
            .map(|&(s, _, c)| s + (cur - c))
    }

    /// Where the image range `[s, e)` is now, in pieces: (current start,
    /// image start, length).
    fn current_of(&self, s: u64, e: u64) -> Vec<(u64, u64, u64)> {
        self.0
            .iter()
            .filter(|&&(is, ie, _)| is < e && ie > s)
            .map(|&(is, ie, c)| {
                let (a, b) = (is.max(s), ie.min(e));
                (c + (a - is), a, b - a)
            })
            .collect()
    }

    /// Forgets image range `[s, e)`, wherever it sits.
    fn drop_image(&mut self, s: u64, e: u64) {
        let cur: Vec<(u64, u64)> = self
            .current_of(s, e)
            .into_iter()
            .map(|(c, _, len)| (c, c + len))
            .collect();
        for (a, b) in cur {
            self.drop_current(a, b);
        }
    }

    /// Forgets whatever sits at current addresses `[s, e)` now.
    fn drop_current(&mut self, s: u64, e: u64) {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(is, ie, c) in &self.0 {
            let ce = c + (ie - is);
            if ce <= s || c >= e {
                out.push((is, ie, c));
                continue;
            }
            if c < s {
                out.push((is, is + (s - c), c));
            }
            if ce > e {
                out.push((is + (e - c), ie, e));
            }
        }
        self.0 = out;
    }

    /// `[from, from+len)` moved to `to` (what was at `to` is gone).
    fn moved(&mut self, from: u64, to: u64, len: u64) {
        let moving: Vec<(u64, u64, u64)> = self
            .0
            .iter()
            .filter_map(|&(is, ie, c)| {
                let ce = c + (ie - is);
                let (a, b) = (c.max(from), ce.min(from + len));
                (a < b).then(|| (is + (a - c), is + (b - c), to + (a - from)))
            })
            .collect();
        self.drop_current(from, from + len);
        self.drop_current(to, to + len);
        self.0.extend(moving);
        self.0.sort_unstable();
    }
}

/// An address space being filled.
struct Space {
    pid: i32,
    uffd: Userfaultfd,
    view: View,
    /// Image ranges with content still to prefetch, in address order
    /// (from the back: popped as done).
    todo: Vec<(u64, u64)>,
    /// Image ranges a fork leaves empty in the child.
    wipe_on_fork: Vec<(u64, u64)>,
}

/// What a lazy restore's page server did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LazyReport {
    pub faults: u64,
    pub prefetched_bytes: u64,
    /// From the release of the tree until every page was in.
    pub fill_ms: f64,
}

/// Fault injection for tests: milliseconds to serve faults only, before
/// the prefetch starts.
fn prefetch_delay() -> Duration {
    std::env::var("CKPT_FAULT_LAZY_PREFETCH_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

/// The page server of a lazy restore, on a thread of its own: it serves
/// faults from the moment a process's memory is registered (the restore
/// itself touches some of it: rseq registration reads the thread's area),
/// and prefetches once the tree runs.
pub struct Server {
    tx: Option<std::sync::mpsc::Sender<LazyProcess>>,
    go: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<LazyReport>>>,
}

impl Server {
    /// Starts the server thread, with no process yet.
    pub fn start() -> Server {
        let (tx, rx) = std::sync::mpsc::channel();
        let go = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, st) = (go.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ckpt-lazy-pages".into())
            .spawn(move || serve(rx, &g, &st))
            .expect("spawning the page server thread");
        Server {
            tx: Some(tx),
            go,
            stop,
            thread: Some(thread),
        }
    }

    /// Hands a process whose memory is registered to the server.
    pub fn add(&self, p: LazyProcess) {
        if let Some(tx) = &self.tx {
            // The thread only ends before `finish` on an error, which
            // `finish` or the drop reports.
            let _ = tx.send(p);
        }
    }

    /// Fails if the server has stopped already (on an error, which it
    /// returns): to check before the tree is let go.
    pub fn check(&mut self) -> Result<()> {
        if !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return Ok(());
        }
        let thread = self.thread.take().expect("checked");
        match thread.join().expect("the page server catches its panics") {
            Ok(_) => Err(Error::Refused {
                pid: 0,
                reason: "the lazy page server stopped before the tree ran".into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The tree runs: prefetch everything, and return once every page is
    /// in. On an error the server has killed the tree.
    pub fn finish(mut self) -> Result<LazyReport> {
        self.tx = None;
        self.go.store(true, std::sync::atomic::Ordering::SeqCst);
        let thread = self.thread.take().expect("finished once");
        thread.join().expect("the page server catches its panics")
    }
}

impl Drop for Server {
    /// A restore that failed (before or after the tree ran): the server
    /// kills the tree, whose missing pages would read as zeros, and stops.
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = t.join();
        }
    }
}

/// The server thread: serves faults of the processes it receives, and
/// once `go` is set, prefetches until every page is in (or their
/// processes are gone); the userfaultfds are then closed, which leaves the
/// mappings as plain memory. When it fails (or panics), or is stopped
/// before the end, it kills every process it served and their
/// descendants first: closing the userfaultfds would leave them reading
/// zeros where pages are missing.
fn serve(
    rx: std::sync::mpsc::Receiver<LazyProcess>,
    go: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<LazyReport> {
    let mut sources: Vec<Source> = Vec::new();
    let mut spaces: Vec<(usize, Space)> = Vec::new();
    let mut pids: Vec<i32> = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_loop(&rx, go, stop, &mut sources, &mut spaces, &mut pids)
    }));
    let r = r.unwrap_or_else(|_| {
        Err(Error::Refused {
            pid: pids.first().copied().unwrap_or(0),
            reason: "the lazy page server panicked".into(),
        })
    });
    if r.is_err() || stop.load(std::sync::atomic::Ordering::SeqCst) {
        for &pid in &pids {
            kill_tree(pid);
        }
    }
    drop(spaces);
    r
}

/// SIGKILLs `pid` and its descendants (children first found, then killed
/// with it: a killed process forks no more).
fn kill_tree(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP);
    let tids = crate::proc::tids(pid).unwrap_or_default();
    for &tid in &tids {
        let kids = crate::proc::read(pid, &format!("task/{tid}/children")).unwrap_or_default();
        for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
            kill_tree(k);
        }
    }
    let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    // Before the release the restore still traces the tree, and may be
    // waiting on its leader, which is not reported before its other
    // threads are reaped, by a tracer: reap them here (any thread of the
    // tracer may), or that wait never ends. Not ours after the release.
    crate::seize::collect_killed(tids.into_iter().filter(|&t| t != pid));
}

fn serve_loop(
    rx: &std::sync::mpsc::Receiver<LazyProcess>,
    go: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
    sources: &mut Vec<Source>,
    spaces: &mut Vec<(usize, Space)>,
    pids: &mut Vec<i32>,
) -> Result<LazyReport> {
    use std::sync::atomic::Ordering::SeqCst;
    let delay = prefetch_delay();
    let mut report = LazyReport::default();
    let mut started: Option<Instant> = None;
    loop {
        while let Ok(p) = rx.try_recv() {
            pids.push(p.pid);
            set_nonblocking(&p.uffd, p.pid)?;
            let mut todo: Vec<(u64, u64)> = p
                .source
                .ranges()
                .into_iter()
                .map(|(s, l)| (s, s + l))
                .collect();
            todo.reverse();
            spaces.push((
                sources.len(),
                Space {
                    pid: p.pid,
                    uffd: p.uffd,
                    view: View::identity(&p.ranges),
                    todo,
                    wipe_on_fork: p.wipe_on_fork,
                },
            ));
            sources.push(p.source);
        }
        if stop.load(SeqCst) {
            return Ok(report);
        }
        // Faults and events first: a thread waits on each fault.
        let mut idle = true;
        let mut k = 0;
        while k < spaces.len() {
            let src = spaces[k].0;
            match handle_messages(&mut spaces[k].1, &mut sources[src], &mut report) {
                Ok((busy, forked)) => {
                    idle &= !busy;
                    for child in forked {
                        set_nonblocking(&child.uffd, child.pid)?;
                        spaces.push((src, child));
                    }
                    k += 1;
                }
                Err(Errno::ESRCH) => {
                    debug!(pid = spaces[k].1.pid, "address space gone");
                    spaces.swap_remove(k);
                }
                Err(e) => return Err(Error::sys(spaces[k].1.pid, "serving page faults", e)),
            }
        }
        let since = match (started, go.load(SeqCst)) {
            (Some(t), _) => t,
            (None, true) => *started.insert(Instant::now()),
            (None, false) => {
                if idle {
                    wait_for_messages(spaces, 1);
                }
                continue;
            }
        };
        if since.elapsed() < delay {
            if idle {
                wait_for_messages(spaces, 1);
            }
            continue;
        }
        // Then one chunk of prefetch, from the first space with work left
        // that can be read now (held pages may still be on their way).
        if spaces.iter().all(|(_, s)| s.todo.is_empty()) {
            break;
        }
        let ready =
            |(src, s): &(usize, Space)| s.todo.last().is_some_and(|r| sources[*src].ready(r.0));
        let Some(k) = spaces.iter().position(ready) else {
            // Faults meanwhile.
            wait_for_messages(spaces, 1);
            continue;
        };
        let src = spaces[k].0;
        match prefetch_one(&mut spaces[k].1, &mut sources[src]) {
            Ok(n) => report.prefetched_bytes += n,
            Err(Errno::ESRCH) => {
                spaces.swap_remove(k);
            }
            Err(e) => return Err(Error::sys(spaces[k].1.pid, "prefetching pages", e)),
        }
    }
    report.fill_ms = started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    info!(
        faults = report.faults,
        prefetched = report.prefetched_bytes,
        fill_ms = report.fill_ms,
        "every page is in"
    );
    // Dropping the userfaultfds unregisters the ranges.
    Ok(report)
}

fn set_nonblocking(u: &Userfaultfd, pid: i32) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = fcntl(u.as_fd(), FcntlArg::F_GETFL).map_err(|e| Error::sys(pid, "F_GETFL", e))?;
    let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
    fcntl(u.as_fd(), FcntlArg::F_SETFL(fl)).map_err(|e| Error::sys(pid, "F_SETFL", e))?;
    Ok(())
}

/// Sleeps until a message is pending on one of the spaces (or `ms`).
fn wait_for_messages(spaces: &[(usize, Space)], ms: u16) {
    let mut fds: Vec<PollFd<'_>> = spaces
        .iter()
        .map(|(_, s)| PollFd::new(s.uffd.as_fd(), PollFlags::POLLIN))
        .collect();
    let _ = nix::poll::poll(&mut fds, PollTimeout::from(ms));
}

/// Reads and handles every pending message of a space; returns whether
/// there was any, and the spaces of children forked meanwhile.
fn handle_messages(
    space: &mut Space,
    source: &mut Source,
    report: &mut LazyReport,
) -> std::result::Result<(bool, Vec<Space>), Errno> {
    let mut busy = false;
    let mut forked = Vec::new();
    while let Some(msg) = space.uffd.read_msg()? {
        busy = true;
        match msg {
            UffdEvent::PageFault { address } => {
                report.faults += 1;
                serve_fault(space, source, address & !(PAGE - 1))?;
            }
            UffdEvent::Fork(uffd) => {
                // The child misses what its parent misses now, but for its
                // wipe-on-fork mappings, which it gets empty.
                let mut view = space.view.clone();
                for &(s, e) in &space.wipe_on_fork {
                    view.drop_image(s, e);
                }
                forked.push(Space {
                    pid: space.pid,
                    uffd,
                    view,
                    todo: space.todo.clone(),
                    wipe_on_fork: space.wipe_on_fork.clone(),
                });
                debug!(pid = space.pid, "forked while its pages were coming in");
            }
            UffdEvent::Remap { from, to, len } => space.view.moved(from, to, len),
            UffdEvent::Remove { start, end } | UffdEvent::Unmap { start, end } => {
                space.view.drop_current(start, end)
            }
            UffdEvent::Other(e) => {
                warn!(pid = space.pid, event = e, "unexpected userfaultfd event")
            }
        }
    }
    Ok((busy, forked))
}

/// Fills the faulting page at `addr` (current address) from the images,
/// or with zeros where nothing was saved or the process dropped it.
fn serve_fault(space: &Space, source: &mut Source, addr: u64) -> std::result::Result<(), Errno> {
    let content = match space.view.image_of(addr) {
        Some(img) => source
            .read(img, true)
            .map_err(|e| {
                warn!(pid = space.pid, "cannot read the images: {e}");
                Errno::EIO
            })?
            .map(|b| &b[..PAGE as usize]),
        None => None,
    };
    let r = match content {
        Some(page) => space.uffd.copy_partial(addr, page).0,
        None => space.uffd.zeropage(addr, PAGE),
    };
    match r {
        Ok(()) => Ok(()),
        // Filled meanwhile (prefetch): the faulting thread only needs waking.
        Err(Errno::EEXIST) => space.uffd.wake(addr, PAGE),
        // An event is pending: handled on the next round, and the fault
        // comes again if still needed.
        Err(Errno::EAGAIN) | Err(Errno::ENOENT) => space.uffd.wake(addr, PAGE).or(Ok(())),
        Err(e) => Err(e),
    }
}

/// Copies the next chunk of content of a space's prefetch list; returns
/// the bytes copied.
fn prefetch_one(space: &mut Space, source: &mut Source) -> std::result::Result<u64, Errno> {
    let Some((s, e)) = space.todo.pop() else {
        return Ok(0);
    };
    let mut copied = 0;
    for (cur, img, len) in space.view.current_of(s, e) {
        let data = match source.read(img, false) {
            Ok(Some(d)) => &d[..len as usize],
            Ok(None) => continue,
            Err(err) => {
                warn!(pid = space.pid, "cannot read the images: {err}");
                return Err(Errno::EIO);
            }
        };
        // Page by page once a copy met a mapping boundary: mprotect,
        // mlock or madvise split mappings without any event, and one
        // UFFDIO_COPY must stay inside one mapping.
        let mut single = false;
        let mut at = 0u64;
        while at < len {
            let end = if single { (at + PAGE).min(len) } else { len };
            let (r, n) = space
                .uffd
                .copy_partial(cur + at, &data[at as usize..end as usize]);
            copied += n;
            at += n;
            match r {
                Ok(()) => at = at.max(end),
                // A page there already (served on a fault): skip it.
                Err(Errno::EEXIST) => at += PAGE,
                // The space is changing: the rest of the whole range goes
                // back (the view may change), events first.
                Err(Errno::EAGAIN) => {
                    space.todo.push((img + at, e));
                    return Ok(copied);
                }
                // Not one registered mapping from here: go page by page; a
                // single page refused is no longer registered (unmapped:
                // its event drops it from the view).
                Err(Errno::ENOENT) if !single => single = true,
                Err(Errno::ENOENT) => at += PAGE,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_follows_drops_and_moves() {
        let mut v = View::identity(&[(0x1000, 0x9000)]);
        assert_eq!(v.image_of(0x2000), Some(0x2000));
        v.drop_current(0x3000, 0x4000);
        assert_eq!(v.image_of(0x3000), None);
        assert_eq!(v.image_of(0x4000), Some(0x4000));
        // Pages 0x5000-0x7000 move to 0x20000.
        v.moved(0x5000, 0x20000, 0x2000);
        assert_eq!(v.image_of(0x5000), None);
        assert_eq!(v.image_of(0x21000), Some(0x6000));
        assert_eq!(
            v.current_of(0x1000, 0x9000),
            vec![
                (0x1000, 0x1000, 0x2000),
                (0x4000, 0x4000, 0x1000),
                (0x20000, 0x5000, 0x2000),
                (0x7000, 0x7000, 0x2000),
            ]
        );
        // A move onto a range drops what was there.
        v.moved(0x7000, 0x1000, 0x1000);
        assert_eq!(v.image_of(0x1000), Some(0x7000));
        assert_eq!(v.image_of(0x7000), None);
        assert_eq!(v.image_of(0x2000), Some(0x2000));
        // Dropping by image address follows the move.
        v.drop_image(0x5000, 0x6000);
        assert_eq!(v.image_of(0x20000), None);
        assert_eq!(v.image_of(0x21000), Some(0x6000));
    }
}
