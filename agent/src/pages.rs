//! The page store: page contents of a process in one raw file, indexed by
//! a `PageMap` (pagemap.proto) of runs of virtual pages with their offsets,
//! checked by a crc32c per block.
//!
//! Copying is parallel (rayon) in chunks aligned to the crc blocks, each
//! worker reusing one chunk-sized buffer: the agent's memory stays bounded
//! whatever the size of the process.

use std::fs::File;
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ckpt_proto::image::{Compression, Frame, PageMap, PageRun};
use nix::sys::uio::{process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::progress::Progress;

/// Flag of a `PageRun` whose content is in the pages file.
pub const PAGE_PRESENT: u32 = 1;
/// Flag of a `PageRun` whose content is unchanged since the parent
/// checkpoint, found there.
pub const PAGE_IN_PARENT: u32 = 4;
/// Size of a checksummed block of the pages file.
pub const BLOCK: u64 = 1 << 20;
/// Size of one copy job: a multiple of `BLOCK`, small enough for the
/// bounce buffer to stay in L2 between the read, the checksum and the write.
pub const CHUNK: u64 = 1 << 20;
/// Most remote iovecs one process_vm_* call takes (IOV_MAX).
const MAX_IOV: usize = 1024;
/// Most files one pages file is split into, and the smallest of them.
const MAX_SEGMENTS: u64 = 16;
const SEGMENT_MIN: u64 = 64 << 20;
/// Most segment files a dump keeps open at once, over all its processes
/// (a node of 64 ranks of 1 GiB would otherwise need 1024): processes
/// written in parallel spread the writes over files anyway.
const SEGMENT_FILES: u64 = 256;

/// How long each segment of an uncompressed pages file of `total` bytes
/// is, in at most `most` files; 0: one file. Buffered writes into one file
/// are serialised by its inode lock (tmpfs, ext4 and xfs alike): copy
/// threads writing different files run in parallel (two threads into two
/// tmpfs files: 6.7 GB/s, into one: 3.3 GB/s here). Whole chunks, so no
/// copy job crosses one.
fn segment_size(total: u64, most: u64) -> u64 {
    let n = (total / SEGMENT_MIN).min(most.min(MAX_SEGMENTS));
    if n < 2 {
        return 0;
    }
    total.div_ceil(n).div_ceil(CHUNK) * CHUNK
}

/// The name of segment `k` of pages file `name` ("pages-7.img" ->
/// "pages-7.s1.img"); segment 0 is the file itself.
pub fn segment_name(name: &str, k: usize) -> String {
    match k {
        0 => name.to_string(),
        _ => format!("{}.s{k}.img", name.trim_end_matches(".img")),
    }
}

/// Whether `name` is a segment after the first of a split pages file
/// ("pages-PID.sK.img", K from 1, in plain digits).
pub fn is_later_segment(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_suffix(".img")
        .and_then(|n| n.strip_prefix("pages-"))
        .and_then(|n| n.split_once(".s"))
        .is_some_and(|(pid, k)| digits(pid) && digits(k) && !k.starts_with('0'))
}

/// The files of the pages file of `pm`, as (name, length), in order.
pub fn segments(pm: &PageMap) -> Vec<(String, u64)> {
    segment_lengths(pm.pages_file_size, pm.segment_size)
        .into_iter()
        .enumerate()
        .map(|(k, len)| (segment_name(&pm.pages_file, k), len))
        .collect()
}

/// The lengths of the files `total` bytes are split into, in segments of
/// `segment` bytes (0: one file).
fn segment_lengths(total: u64, segment: u64) -> Vec<u64> {
    if segment == 0 || total == 0 {
        return vec![total];
    }
    (0..total.div_ceil(segment))
        .map(|k| segment.min(total - k * segment))
        .collect()
}

/// How a checkpoint's page content is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// As is: the pages file is the content.
    #[default]
    None,
    /// lz4 blocks.
    Lz4,
    /// zstd at this level.
    Zstd(i32),
}

/// zstd's level when none is given: its fastest standard one, whose
/// ratio on memory images is close to its default's at several times
/// the speed.
const ZSTD_DEFAULT_LEVEL: i32 = 1;

impl std::str::FromStr for Codec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd(ZSTD_DEFAULT_LEVEL)),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(l)) if (1..=19).contains(&l) => Ok(Codec::Zstd(l)),
                _ => Err(format!(
                    "unknown compression '{s}': use none, lz4, zstd or zstd:LEVEL (1-19)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::None => write!(f, "none"),
            Codec::Lz4 => write!(f, "lz4"),
            Codec::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

impl Codec {
    fn proto(self) -> Compression {
        match self {
            Codec::None => Compression::None,
            Codec::Lz4 => Compression::Lz4,
            Codec::Zstd(_) => Compression::Zstd,
        }
    }
}

/// Size of a copy thread's compression buffer: lz4's worst case for a
/// chunk.
const PACKED_LEN: usize = lz4_flex::block::get_maximum_output_size(CHUNK as usize);

/// A compressor for one copy thread.
enum Packer {
    None,
    Lz4,
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

impl Packer {
    fn new(codec: Codec) -> std::io::Result<Packer> {
        Ok(match codec {
            Codec::None => Packer::None,
            Codec::Lz4 => Packer::Lz4,
            Codec::Zstd(level) => Packer::Zstd(Box::new(zstd::bulk::Compressor::new(level)?)),
        })
    }

    /// Compresses `src` into `dst` (`PACKED_LEN` bytes): the compressed
    /// length, or None when it would not shrink.
    fn pack(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        let n = match self {
            Packer::None => None,
            // lz4_flex wants room for the worst case up front.
            Packer::Lz4 => lz4_flex::block::compress_into(src, dst).ok(),
            // zstd stops when the output would not shrink.
            Packer::Zstd(z) => z
                .compress_to_buffer(src, &mut dst[..src.len().saturating_sub(1)])
                .ok(),
        }?;
        (n < src.len()).then_some(n)
    }
}

/// Decompresses a frame stored with `compression` into `dst` (its exact
/// length).
fn unpack(compression: Compression, src: &[u8], dst: &mut [u8]) -> std::result::Result<(), String> {
    let n = match compression {
        Compression::None => return Err("a compressed frame in an uncompressed file".into()),
        Compression::Lz4 => {
            lz4_flex::block::decompress_into(src, dst).map_err(|e| e.to_string())?
        }
        Compression::Zstd => {
            zstd::bulk::decompress_to_buffer(src, dst).map_err(|e| e.to_string())?
        }
    };
    if n != dst.len() {
        return Err(format!(
            "a frame decompressed to {n} bytes, not {}",
            dst.len()
        ));
    }
    Ok(())
}

/// A range of virtual memory whose content must be saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub end: u64,
    /// Private memory a fork copies on write: a snapshot child has it as
    /// it was at the fork (shared memory it would see change).
    pub cow: bool,
}

/// A piece of copy work: a contiguous range of the pages file and the
/// virtual ranges that fill it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    file_off: u64,
    len: u64,
    iov: Vec<(u64, u64)>,
    /// Every range of the job is copy-on-write memory.
    cow: bool,
}

/// Lays extents out in the pages file and cuts the result into jobs that
/// never cross a `CHUNK` boundary of the file (so block checksums can be
/// computed by the job that owns the block).
fn plan(extents: &[Extent]) -> (Vec<PageRun>, Vec<Job>, u64) {
    let mut runs = Vec::with_capacity(extents.len());
    let mut jobs: Vec<Job> = Vec::new();
    let mut off = 0u64;
    for e in extents {
        let page = 4096;
        runs.push(PageRun {
            vaddr: e.start,
            nr_pages: (e.end - e.start) / page,
            offset: off,
            flags: PAGE_PRESENT,
        });
        let mut va = e.start;
        while va < e.end {
            let chunk_end = (off / CHUNK + 1) * CHUNK;
            let n = (e.end - va).min(chunk_end - off);
            match jobs.last_mut() {
                Some(j)
                    if j.file_off + j.len == off
                        && !off.is_multiple_of(CHUNK)
                        && j.iov.len() < MAX_IOV
                        && j.cow == e.cow =>
                {
                    j.len += n;
                    j.iov.push((va, n));
                }
                _ => jobs.push(Job {
                    file_off: off,
                    len: n,
                    iov: vec![(va, n)],
                    cow: e.cow,
                }),
            }
            va += n;
            off += n;
        }
    }
    (runs, jobs, off)
}

/// Reads a job's memory through /proc/PID/mem (`mem`), not with
/// process_vm_readv: that pins pages, and the kernel copies a page shared
/// copy-on-write (after a fork: between the processes of a tree, with a
/// snapshot child) before pinning it, so reading a tree that way doubled
/// its shared memory and could take it past its memory limit.
/// /proc/PID/mem reads pages in place, also PROT_NONE ones.
fn read_job(pid: i32, mem: &File, job: &Job, buf: &mut [u8]) -> Result<()> {
    let mut at = 0usize;
    for &(va, len) in &job.iov {
        mem.read_exact_at(&mut buf[at..at + len as usize], va)
            .map_err(|e| Error::sys(pid, format!("reading memory at {va:#x}+{len:#x}"), e))?;
        at += len as usize;
    }
    Ok(())
}

/// Checksums one job's bytes, a piece per block it touches, for
/// `block_sums`.
fn job_pieces(job: &Job, b: &[u8]) -> Vec<(u64, u32, u64)> {
    let mut out = Vec::new();
    let mut s = job.file_off;
    let end = job.file_off + job.len;
    while s < end {
        let e = ((s / BLOCK + 1) * BLOCK).min(end);
        let piece = &b[(s - job.file_off) as usize..(e - job.file_off) as usize];
        out.push((s, crc32c::crc32c(piece), e - s));
        s = e;
    }
    out
}

/// Checksums of pieces of the pages file: (offset, crc32c, length).
type Pieces = Vec<(u64, u32, u64)>;

/// What a copy job stored: checksummed pieces of an uncompressed file, or
/// a frame of a compressed one.
enum Stored {
    Pieces(Pieces),
    Frame(Frame),
}

/// Folds per-piece checksums into one checksum per block.
fn block_sums(mut pieces: Vec<(u64, u32, u64)>, total: u64) -> Vec<u32> {
    pieces.sort_unstable_by_key(|p| p.0);
    let mut sums = vec![0u32; total.div_ceil(BLOCK) as usize];
    for (off, crc, len) in pieces {
        let b = (off / BLOCK) as usize;
        // Combining costs ~90 us; a piece that starts its block is its sum.
        sums[b] = if off % BLOCK == 0 {
            crc
        } else {
            crc32c::crc32c_combine(sums[b], crc, len as usize)
        };
    }
    sums
}

/// The pages of one process to save.
pub struct DumpItem<'a> {
    pub pid: i32,
    /// Page-aligned, sorted ranges with content.
    pub extents: &'a [Extent],
    pub path: std::path::PathBuf,
    pub name: String,
    /// The stream the pages file goes to instead of `path`, if any.
    pub stream: Option<std::sync::Arc<crate::stream::Outbox>>,
    /// A stopped copy-on-write child of the process, forked while it was
    /// frozen: its copy-on-write extents are read from there, once the
    /// process runs again.
    pub snapshot: Option<i32>,
    /// Sorted ranges whose content is in the parent checkpoint.
    pub in_parent: &'a [(u64, u64)],
    /// The write tracker this dump reset, recorded for the next one.
    pub tracking: Option<ckpt_proto::image::Tracking>,
}

/// Where the copy threads write a pages file: a file here, or the same
/// file of a checkpoint streamed to another node.
/// A file split into segments (see [`segment_size`]) is written segment
/// by segment; no write crosses one.
pub enum PagesOut {
    File {
        /// The segments, with their paths.
        files: Vec<(File, std::path::PathBuf)>,
        segment: u64,
    },
    Stream {
        outbox: std::sync::Arc<crate::stream::Outbox>,
        name: String,
        segment: u64,
    },
}

impl PagesOut {
    /// The segment that offset `at` falls in, and the offset there.
    fn locate(segment: u64, at: u64) -> (usize, u64) {
        match segment {
            0 => (0, at),
            s => ((at / s) as usize, at % s),
        }
    }

    fn write_all_at(&self, data: &[u8], at: u64) -> Result<()> {
        match self {
            PagesOut::File { files, segment } => {
                let (k, off) = Self::locate(*segment, at);
                let (file, path) = &files[k];
                file.write_all_at(data, off).map_err(|e| Error::io(path, e))
            }
            PagesOut::Stream {
                outbox,
                name,
                segment,
            } => {
                let (k, off) = Self::locate(*segment, at);
                outbox.write_at(&segment_name(name, k), off, data)
            }
        }
    }

    /// Sizes the files to hold `len` bytes up front (a stream's files grow
    /// by their chunks, which cover them).
    fn set_len(&self, len: u64) -> Result<()> {
        let PagesOut::File { files, segment } = self else {
            return Ok(());
        };
        for ((file, path), n) in files.iter().zip(segment_lengths(len, *segment)) {
            file.set_len(n).map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }
}

/// One process's pages file being filled.
struct Out {
    runs: Vec<PageRun>,
    jobs: Vec<Job>,
    /// Bytes of page content.
    total: u64,
    /// Segment length of its pages file (0: one file).
    segment: u64,
    file: PagesOut,
    mem: File,
    /// Compressed: where the next frame goes in the file.
    stored: std::sync::atomic::AtomicU64,
}

/// The copy of the pages of several processes into their pages files, laid
/// out while they are frozen and run in two phases: what must be copied
/// frozen, then what their snapshots hold. Each phase runs all jobs of all
/// processes in one parallel pool (so small processes do not leave cores
/// idle).
pub struct PageCopy<'a> {
    items: &'a [DumpItem<'a>],
    outs: Vec<Out>,
    pieces: Vec<Pieces>,
    frames: Vec<Vec<Frame>>,
    codec: Codec,
}

impl<'a> PageCopy<'a> {
    /// Lays out and creates the pages file of every item, its content
    /// stored as `codec` says.
    pub fn new(items: &'a [DumpItem<'a>], codec: Codec) -> Result<Self> {
        let mut outs = Vec::with_capacity(items.len());
        let most = SEGMENT_FILES / items.len().max(1) as u64;
        for it in items {
            let (runs, jobs, total) = plan(it.extents);
            // Compressed frames go where the file ends: one file.
            let segment = match codec {
                Codec::None => segment_size(total, most),
                _ => 0,
            };
            let file = match &it.stream {
                Some(outbox) => {
                    // The file exists there even if nothing is copied into
                    // it (a process that changed nothing since the parent).
                    outbox.write_at(&it.name, 0, &[])?;
                    PagesOut::Stream {
                        outbox: outbox.clone(),
                        name: it.name.clone(),
                        segment,
                    }
                }
                None => {
                    let n = segment_lengths(total, segment).len();
                    let mut files = Vec::with_capacity(n);
                    for k in 0..n {
                        let path = it.path.with_file_name(segment_name(&it.name, k));
                        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                        files.push((f, path));
                    }
                    PagesOut::File { files, segment }
                }
            };
            if codec == Codec::None {
                file.set_len(total)?;
            }
            let mem_path = format!("/proc/{}/mem", it.pid);
            let mem = File::open(&mem_path).map_err(|e| Error::io(&mem_path, e))?;
            outs.push(Out {
                runs,
                jobs,
                total,
                segment,
                file,
                mem,
                stored: std::sync::atomic::AtomicU64::new(0),
            });
        }
        Ok(PageCopy {
            items,
            pieces: vec![Vec::new(); items.len()],
            frames: vec![Vec::new(); items.len()],
            outs,
            codec,
        })
    }

    /// Copies what cannot wait for the processes to run again: everything
    /// of a process without a snapshot, the shared memory of one with.
    /// Returns the bytes copied.
    pub fn copy_frozen(&mut self, progress: &dyn Progress) -> Result<u64> {
        let reads: Vec<i32> = self.items.iter().map(|it| it.pid).collect();
        let mems: Vec<Option<File>> = self.items.iter().map(|_| None).collect();
        self.run(
            "copying pages",
            |it, j| it.snapshot.is_none() || !j.cow,
            &reads,
            &mems,
            progress,
        )
    }

    /// Copies the copy-on-write memory of processes with a snapshot, from
    /// the snapshot. Returns the bytes copied.
    pub fn copy_snapshots(&mut self, progress: &dyn Progress) -> Result<u64> {
        let reads: Vec<i32> = self
            .items
            .iter()
            .map(|it| it.snapshot.unwrap_or(it.pid))
            .collect();
        let mut mems = Vec::with_capacity(self.items.len());
        for it in self.items {
            mems.push(match it.snapshot {
                Some(child) => {
                    let path = format!("/proc/{child}/mem");
                    Some(File::open(&path).map_err(|e| Error::io(&path, e))?)
                }
                None => None,
            });
        }
        self.run(
            "copying pages from the snapshot",
            |it, j| it.snapshot.is_some() && j.cow,
            &reads,
            &mems,
            progress,
        )
    }

    /// Runs the jobs `pick` selects, reading process `reads[i]` through
    /// `mems[i]` if given, else the item's own /proc mem.
    fn run(
        &mut self,
        what: &str,
        pick: impl Fn(&DumpItem<'_>, &Job) -> bool + Sync,
        reads: &[i32],
        mems: &[Option<File>],
        progress: &dyn Progress,
    ) -> Result<u64> {
        let (items, outs, codec) = (self.items, &self.outs, self.codec);
        let work: Vec<(usize, &Job)> = outs
            .iter()
            .enumerate()
            .flat_map(|(i, o)| o.jobs.iter().map(move |j| (i, j)))
            .filter(|&(i, j)| pick(&items[i], j))
            .collect();
        let bytes = work.iter().map(|(_, j)| j.len).sum();
        if bytes == 0 {
            return Ok(0);
        }
        progress.start(what, bytes);
        let done: Vec<(usize, Stored)> = work
            .par_iter()
            .map_init(
                || {
                    let packer = Packer::new(codec);
                    let packed = match codec {
                        Codec::None => Vec::new(),
                        _ => vec![0u8; PACKED_LEN],
                    };
                    (vec![0u8; CHUNK as usize], packed, packer)
                },
                |(buf, packed, packer), &(i, job)| -> Result<(usize, Stored)> {
                    let (it, o) = (&items[i], &outs[i]);
                    let b = &mut buf[..job.len as usize];
                    read_job(reads[i], mems[i].as_ref().unwrap_or(&o.mem), job, b)?;
                    let stored = if codec == Codec::None {
                        o.file.write_all_at(b, job.file_off)?;
                        // Checksum while the chunk is still in cache.
                        Stored::Pieces(job_pieces(job, b))
                    } else {
                        let packer = packer.as_mut().map_err(|e| {
                            Error::io(&it.path, std::io::Error::new(e.kind(), e.to_string()))
                        })?;
                        let data: &[u8] = match packer.pack(b, packed) {
                            Some(n) => &packed[..n],
                            None => b,
                        };
                        let at = o
                            .stored
                            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        o.file.write_all_at(data, at)?;
                        Stored::Frame(Frame {
                            offset: job.file_off,
                            len: job.len as u32,
                            stored_at: at,
                            stored_len: data.len() as u32,
                            crc32c: crc32c::crc32c(data),
                        })
                    };
                    progress.advance(job.len);
                    Ok((i, stored))
                },
            )
            .collect::<Result<_>>()?;
        progress.finish();
        for (i, s) in done {
            match s {
                Stored::Pieces(p) => self.pieces[i].extend(p),
                Stored::Frame(f) => self.frames[i].push(f),
            }
        }
        Ok(bytes)
    }

    /// The index of every pages file, in the order of the items.
    pub fn finish(self) -> Vec<PageMap> {
        let codec = self.codec;
        self.outs
            .into_iter()
            .zip(self.pieces)
            .zip(self.frames)
            .zip(self.items)
            .map(|(((o, p), mut frames), it)| {
                frames.sort_unstable_by_key(|f| f.offset);
                let compressed = codec != Codec::None;
                PageMap {
                    pid: it.pid,
                    page_size: 4096,
                    pages_file: it.name.clone(),
                    pages_file_size: match compressed {
                        true => o.stored.into_inner(),
                        false => o.total,
                    },
                    block_size: BLOCK,
                    block_crc32c: match compressed {
                        true => Vec::new(),
                        false => block_sums(p, o.total),
                    },
                    runs: with_parent_runs(o.runs, it.in_parent),
                    tracking: it.tracking,
                    compression: codec.proto() as i32,
                    frames,
                    content_size: o.total,
                    segment_size: o.segment,
                }
            })
            .collect()
    }
}

/// Adds runs for `in_parent` ranges to the runs of a pages file, in
/// address order (the two never overlap).
fn with_parent_runs(mut runs: Vec<PageRun>, in_parent: &[(u64, u64)]) -> Vec<PageRun> {
    if in_parent.is_empty() {
        return runs;
    }
    runs.extend(in_parent.iter().map(|&(s, e)| PageRun {
        vaddr: s,
        nr_pages: (e - s) / 4096,
        offset: 0,
        flags: PAGE_IN_PARENT,
    }));
    runs.sort_unstable_by_key(|r| r.vaddr);
    runs
}

/// Copies the pages of processes that stay frozen throughout, and returns
/// their indexes in the same order.
pub fn dump_all(
    items: &[DumpItem<'_>],
    codec: Codec,
    progress: &dyn Progress,
) -> Result<Vec<PageMap>> {
    let mut copy = PageCopy::new(items, codec)?;
    copy.copy_frozen(progress)?;
    copy.copy_snapshots(progress)?;
    Ok(copy.finish())
}

/// The pages file of `pm` at `path` (its first segment) mapped as one
/// range, all its segments in order; None when it is empty.
pub fn map_pages(pm: &PageMap, path: &Path) -> Result<Option<crate::sys::FilesMap>> {
    if pm.pages_file_size == 0 {
        return Ok(None);
    }
    let mut files = Vec::new();
    for (name, len) in segments(pm) {
        let p = path.with_file_name(&name);
        files.push((File::open(&p).map_err(|e| Error::io(&p, e))?, len));
    }
    let refs: Vec<(&File, u64)> = files.iter().map(|(f, l)| (f, *l)).collect();
    crate::sys::mmap_files(&refs)
        .map(Some)
        .map_err(|e| Error::io(path, e))
}

/// Checks every block of a pages file against its index, before anything
/// is restored from it, and returns the file's checksum (see
/// `file_checksum`) and the mapping it read (none for an empty file).
pub fn verify(pm: &PageMap, path: &Path) -> Result<(u32, Option<crate::sys::FilesMap>)> {
    let len = check_size(pm, path)?;
    let map = map_pages(pm, path)?;
    let bad = |reason: String| Error::BadImages {
        dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
        reason,
    };
    if compression(pm) != Compression::None {
        check_frames(pm).map_err(bad)?;
        let Some(map) = map else {
            return Ok((index_checksum(pm), None));
        };
        let broken = pm.frames.par_iter().position_any(|f| {
            let at = f.stored_at as usize;
            crc32c::crc32c(&map[at..at + f.stored_len as usize]) != f.crc32c
        });
        if let Some(i) = broken {
            let f = &pm.frames[i];
            return Err(bad(format!(
                "{}: the frame stored at bytes {}..{} fails its checksum: the image is corrupt",
                pm.pages_file,
                f.stored_at,
                f.stored_at + f.stored_len as u64
            )));
        }
        return Ok((index_checksum(pm), Some(map)));
    }
    let sums: Vec<u32> = match &map {
        Some(m) => m.par_chunks(BLOCK as usize).map(crc32c::crc32c).collect(),
        None => Vec::new(),
    };
    if sums.len() != pm.block_crc32c.len() {
        return Err(bad(format!("{}: block count mismatch", pm.pages_file)));
    }
    if let Some(i) = sums.iter().zip(&pm.block_crc32c).position(|(a, b)| a != b) {
        return Err(bad(format!(
            "{}: block {i} (bytes {}..{}) fails its checksum: the image is corrupt",
            pm.pages_file,
            i as u64 * BLOCK,
            ((i as u64 + 1) * BLOCK).min(len)
        )));
    }
    Ok((file_checksum(&sums), map))
}

/// The checksum the inventory records for a pages file: the crc32c of its
/// block checksums (each block is checked against its own), which costs
/// nothing to compute, unlike combining block checksums into a whole-file one.
pub fn file_checksum(blocks: &[u32]) -> u32 {
    let bytes: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
    crc32c::crc32c(&bytes)
}

/// Checks that an index names pages file `name` (a plain name, never a
/// path) and splits it sanely into segments.
fn check_layout(pm: &PageMap, name: &std::ffi::OsStr) -> std::result::Result<(), String> {
    let plain = pm.pages_file.starts_with("pages-")
        && pm.pages_file.ends_with(".img")
        && !pm.pages_file.contains('/');
    if !plain || name != std::ffi::OsStr::new(&pm.pages_file) {
        return Err(format!(
            "its index names pages file {:?}, not {}",
            pm.pages_file,
            name.to_string_lossy()
        ));
    }
    if !pm.segment_size.is_multiple_of(4096) || pm.segment_size.checked_mul(MAX_SEGMENTS).is_none()
    {
        return Err(format!(
            "{}: segments of {} bytes",
            pm.pages_file, pm.segment_size
        ));
    }
    if pm.segment_size != 0 && pm.pages_file_size.div_ceil(pm.segment_size) > MAX_SEGMENTS {
        return Err(format!(
            "{}: more than {MAX_SEGMENTS} segments",
            pm.pages_file
        ));
    }
    Ok(())
}

/// Checks that an index's checksums fit its pages file's size: a block
/// checksum per block, or frames that tile the content.
fn check_shape(pm: &PageMap) -> std::result::Result<(), String> {
    match compression(pm) {
        Compression::None => {
            if pm.block_crc32c.len() as u64 != pm.pages_file_size.div_ceil(BLOCK) {
                return Err(format!("{}: block count mismatch", pm.pages_file));
            }
            Ok(())
        }
        _ => check_frames(pm),
    }
}

/// Checks that a pages file (each of its segments) has the size its index
/// says; returns its whole size.
fn check_size(pm: &PageMap, path: &Path) -> Result<u64> {
    let bad = |reason: String| Error::BadImages {
        dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
        reason,
    };
    check_layout(pm, path.file_name().unwrap_or_default()).map_err(bad)?;
    for (name, want) in segments(pm) {
        let p = path.with_file_name(&name);
        let len = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
        if len != want {
            return Err(bad(format!("{name} is {len} bytes, its index says {want}")));
        }
    }
    Ok(pm.pages_file_size)
}

/// Checks a pages file against its index without reading its content:
/// its size, the shape of its frames; returns the checksum the inventory
/// records. Its blocks are checked as they are read ([`Source`], and
/// [`restore`] with `lazy`).
pub fn verify_index(pm: &PageMap, path: &Path) -> Result<u32> {
    check_size(pm, path)?;
    check_shape(pm).map_err(|reason| Error::BadImages {
        dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
        reason,
    })?;
    Ok(index_checksum(pm))
}

/// Checks the index of pages file `name`, held on the node that dumped it
/// (not here), as [`verify_index`] does but for the files' sizes: the
/// inventory says its first segment is `first_len` bytes.
pub fn check_held_index(
    pm: &PageMap,
    name: &str,
    first_len: u64,
) -> std::result::Result<(), String> {
    check_layout(pm, std::ffi::OsStr::new(name))?;
    // Fetched a block at a time: no block may straddle two segments.
    if !pm.segment_size.is_multiple_of(BLOCK) {
        return Err(format!(
            "{name}: segments of {} bytes, not whole MiB",
            pm.segment_size
        ));
    }
    let want = segment_lengths(pm.pages_file_size, pm.segment_size)[0];
    if want != first_len {
        return Err(format!(
            "{name} is {first_len} bytes in the inventory, its index says {want}"
        ));
    }
    check_shape(pm)
}

/// Checks the stored bytes that content range `[off, off+len)` of level
/// `pm` (mapped as `map`) comes from: the blocks it touches, or frame
/// `frame` of a compressed file.
fn check_stored(
    pm: &PageMap,
    map: &[u8],
    off: u64,
    len: u64,
    frame: Option<usize>,
) -> std::result::Result<(), String> {
    let corrupt = |from: u64, to: u64| {
        format!(
            "{}: bytes {from}..{to} fail their checksum: the image is corrupt",
            pm.pages_file
        )
    };
    if let Some(i) = frame {
        let f = &pm.frames[i];
        let (a, b) = (f.stored_at, f.stored_at + f.stored_len as u64);
        if crc32c::crc32c(&map[a as usize..b as usize]) != f.crc32c {
            return Err(corrupt(a, b));
        }
        return Ok(());
    }
    for blk in off / BLOCK..(off + len).div_ceil(BLOCK) {
        let (a, b) = (blk * BLOCK, ((blk + 1) * BLOCK).min(map.len() as u64));
        let want = pm.block_crc32c.get(blk as usize);
        if a >= b || want != Some(&crc32c::crc32c(&map[a as usize..b as usize])) {
            return Err(corrupt(a, b));
        }
    }
    Ok(())
}

/// The checksum the inventory records for the pages file of `pm`: over its
/// blocks' checksums, or its frames' for a compressed one.
pub fn index_checksum(pm: &PageMap) -> u32 {
    match compression(pm) {
        Compression::None => file_checksum(&pm.block_crc32c),
        _ => file_checksum(&pm.frames.iter().map(|f| f.crc32c).collect::<Vec<_>>()),
    }
}

/// How the pages file of `pm` is stored (an unknown value reads as a
/// compression this agent does not know: refused by `check_frames`).
fn compression(pm: &PageMap) -> Compression {
    Compression::try_from(pm.compression).unwrap_or(Compression::Zstd)
}

/// Checks that the frames of a compressed pages file tile its content in
/// order, each within one copy chunk and stored inside the file.
fn check_frames(pm: &PageMap) -> std::result::Result<(), String> {
    if Compression::try_from(pm.compression).is_err() {
        return Err(format!(
            "{}: unknown compression {}: written by a newer ckpt?",
            pm.pages_file, pm.compression
        ));
    }
    let mut at = 0u64;
    for f in &pm.frames {
        let bad = |why: &str| format!("{}: frame at {}: {why}", pm.pages_file, f.offset);
        if f.offset != at {
            return Err(bad("the frames do not tile the content"));
        }
        let last = f.offset + (f.len as u64).max(1) - 1;
        if f.len == 0 || f.offset / CHUNK != last / CHUNK {
            return Err(bad("it crosses a chunk"));
        }
        let stored_end = f.stored_at.checked_add(f.stored_len as u64);
        if f.stored_len == 0
            || f.stored_len > f.len
            || stored_end.is_none_or(|e| e > pm.pages_file_size)
        {
            return Err(bad("stored outside the file"));
        }
        at += f.len as u64;
    }
    if at != pm.content_size {
        return Err(format!(
            "{}: the frames do not cover the content",
            pm.pages_file
        ));
    }
    Ok(())
}

/// Bytes of page content in the pages file of `pm`.
fn content_size(pm: &PageMap) -> u64 {
    match compression(pm) {
        Compression::None => pm.pages_file_size,
        _ => pm.content_size,
    }
}

/// One checkpoint of a chain as the restore of a process reads it: the
/// process's page index there and its pages file.
#[derive(Debug, Clone)]
pub struct Level {
    pub pm: PageMap,
    pub path: std::path::PathBuf,
    /// The pages file, mapped already by the verification before the
    /// restore; mapped at its first use otherwise.
    pub map: Option<std::sync::Arc<crate::sys::FilesMap>>,
    /// A pages file held on the node that dumped it: `map` is its copy in
    /// memory, which this brings in (see `held`).
    pub fetch: Option<std::sync::Arc<crate::held::Fetch>>,
}

impl Level {
    /// The stored bytes content range `[off, off+len)` comes from: the
    /// range itself, or frame `frame` of a compressed file.
    fn stored(&self, off: u64, len: u64, frame: Option<usize>) -> (u64, u64) {
        match frame {
            Some(i) => {
                let f = &self.pm.frames[i];
                (f.stored_at, f.stored_at + f.stored_len as u64)
            }
            None => (off, off + len),
        }
    }

    /// Brings in what content range `[off, off+len)` is stored in, if the
    /// pages file is held elsewhere: at once when `urgent`, else as the
    /// background fetch gets there.
    fn ensure(&self, off: u64, len: u64, frame: Option<usize>, urgent: bool) -> Result<()> {
        match &self.fetch {
            Some(f) => {
                let (a, b) = self.stored(off, len, frame);
                f.ensure(a, b, urgent)
            }
            None => Ok(()),
        }
    }

    /// Whether content range `[off, off+len)` can be read without waiting.
    fn ready(&self, off: u64, len: u64, frame: Option<usize>) -> bool {
        self.fetch.as_ref().is_none_or(|f| {
            let (a, b) = self.stored(off, len, frame);
            f.ready(a, b)
        })
    }

    /// This level's pages file mapped (None when it is empty).
    fn mapped(&self) -> Result<Option<std::sync::Arc<crate::sys::FilesMap>>> {
        if let Some(map) = &self.map {
            return Ok(Some(map.clone()));
        }
        Ok(map_pages(&self.pm, &self.path)?.map(std::sync::Arc::new))
    }

    /// Decompresses frame `i` of this level's pages file (mapped as `map`)
    /// into `out`, its exact length.
    fn unpack_frame(&self, map: &[u8], i: usize, out: &mut [u8]) -> Result<()> {
        let f = &self.pm.frames[i];
        let stored = &map[f.stored_at as usize..][..f.stored_len as usize];
        unpack(compression(&self.pm), stored, out).map_err(|r| Error::BadImages {
            dir: self.path.parent().unwrap_or(Path::new(".")).to_owned(),
            reason: format!("{}: frame at {}: {r}", self.pm.pages_file, f.offset),
        })
    }
}

/// Whether a page index sends some pages to the parent checkpoint.
pub fn needs_parent(pm: &PageMap) -> bool {
    pm.runs.iter().any(|r| r.flags & PAGE_IN_PARENT != 0)
}

/// Bytes of memory with content an index describes, here or in parents.
pub fn content_bytes(pm: &PageMap) -> u64 {
    pm.runs
        .iter()
        .filter(|r| r.flags & (PAGE_PRESENT | PAGE_IN_PARENT) != 0)
        .map(|r| r.nr_pages * pm.page_size as u64)
        .sum()
}

/// A range of memory to fill, and where its content is: at `off` in the
/// pages file of level `level` of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    va: u64,
    len: u64,
    level: usize,
    off: u64,
}

/// Checks that an index describes its pages file: runs in address order,
/// not overlapping, the present ones inside the file and covering it.
fn check_index(pm: &PageMap) -> std::result::Result<(), String> {
    if pm.page_size != 4096 {
        return Err(format!("{}: page size {}", pm.pages_file, pm.page_size));
    }
    let mut end = 0u64;
    let mut present = 0u64;
    for r in &pm.runs {
        // Values from a file: no arithmetic on them may wrap.
        let (len, run_end, off_end) = r
            .nr_pages
            .checked_mul(4096)
            .and_then(|len| Some((len, r.vaddr.checked_add(len)?, r.offset.checked_add(len)?)))
            .ok_or_else(|| format!("{}: the run at {:#x} is too long", pm.pages_file, r.vaddr))?;
        if r.vaddr % 4096 != 0 || (r.flags & PAGE_PRESENT != 0 && r.offset % 4096 != 0) {
            return Err(format!(
                "{}: the run at {:#x} is not page-aligned",
                pm.pages_file, r.vaddr
            ));
        }
        if r.vaddr < end {
            return Err(format!("{}: runs overlap at {:#x}", pm.pages_file, r.vaddr));
        }
        end = run_end;
        if r.flags & PAGE_PRESENT != 0 {
            if off_end > content_size(pm) {
                return Err(format!(
                    "{}: the run at {:#x} ends past the pages file",
                    pm.pages_file, r.vaddr
                ));
            }
            present += len;
        }
    }
    if present != content_size(pm) {
        return Err(format!(
            "{}: index does not cover the pages file",
            pm.pages_file
        ));
    }
    Ok(())
}

/// Where each saved page of `[start, end)` is, from level `lvl` of a chain
/// of indexes (the newest first): runs in the parent are looked up in the
/// next index. Pages no index has stay zero.
fn resolve(
    maps: &[&PageMap],
    lvl: usize,
    start: u64,
    end: u64,
    out: &mut Vec<Piece>,
) -> std::result::Result<(), String> {
    let runs = &maps[lvl].runs;
    let run_end = |r: &PageRun| r.vaddr + r.nr_pages * 4096;
    let mut i = runs.partition_point(|r| run_end(r) <= start);
    while let Some(r) = runs.get(i).filter(|r| r.vaddr < end) {
        let (s, e) = (r.vaddr.max(start), run_end(r).min(end));
        if r.flags & PAGE_PRESENT != 0 {
            out.push(Piece {
                va: s,
                len: e - s,
                level: lvl,
                off: r.offset + (s - r.vaddr),
            });
        } else if r.flags & PAGE_IN_PARENT != 0 {
            if lvl + 1 >= maps.len() {
                return Err(format!(
                    "{}: pages at {s:#x} are in a parent checkpoint that is not there",
                    maps[lvl].pages_file
                ));
            }
            resolve(maps, lvl + 1, s, e, out)?;
        }
        i += 1;
    }
    Ok(())
}

/// Checks the indexes of a chain (the newest first) and resolves where
/// each saved page of the process is.
fn resolve_chain(chain: &[Level]) -> Result<Vec<Piece>> {
    let bad = |path: &Path, reason: String| Error::BadImages {
        dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
        reason,
    };
    for l in chain {
        check_index(&l.pm).map_err(|r| bad(&l.path, r))?;
        if compression(&l.pm) != Compression::None {
            check_frames(&l.pm).map_err(|r| bad(&l.path, r))?;
        }
    }
    let maps: Vec<&PageMap> = chain.iter().map(|l| &l.pm).collect();
    let mut pieces = Vec::new();
    resolve(&maps, 0, 0, u64::MAX, &mut pieces).map_err(|r| bad(&chain[0].path, r))?;
    Ok(pieces)
}

/// Cuts pieces so that none is longer than a copy job.
fn cut(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        let mut done = 0;
        while done < p.len {
            let n = (p.len - done).min(CHUNK);
            out.push(Piece {
                va: p.va + done,
                len: n,
                level: p.level,
                off: p.off + done,
            });
            done += n;
        }
    }
    out
}

/// Writes the saved pages into process `pid`, whose mappings must already
/// exist and be writable, from a chain of checkpoints (the newest first;
/// one level for a full checkpoint): through `filler` where it has
/// registered the memory, with process_vm_writev elsewhere. With `lazy`,
/// what the filler registered is left for the page server; `verified`
/// says whether page content was checked up front (a lazy restore's is
/// checked here, each block as it is copied).
pub fn restore(
    pid: i32,
    chain: &[Level],
    progress: &dyn Progress,
    filler: Option<&UffdFiller>,
    lazy: bool,
    verified: bool,
) -> Result<()> {
    let bad = |path: &Path, reason: String| Error::BadImages {
        dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
        reason,
    };
    let mut pieces = resolve_chain(chain)?;
    let maps: Vec<&PageMap> = chain.iter().map(|l| &l.pm).collect();
    let ranges = filler.map_or(&[][..], |f| &f.ranges[..]);
    if lazy {
        // What the filler's ranges hold is served later, on demand.
        pieces = pieces
            .into_iter()
            .flat_map(|p| {
                split_by(p.va, p.va + p.len, ranges)
                    .into_iter()
                    .filter(|&(_, _, by_uffd)| !by_uffd)
                    .map(move |(s, e, _)| Piece {
                        va: s,
                        len: e - s,
                        level: p.level,
                        off: p.off + (s - p.va),
                    })
            })
            .collect();
    }
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    if total == 0 {
        return Ok(());
    }
    let jobs = restore_jobs(&maps, pieces);
    let files = chain
        .iter()
        .map(Level::mapped)
        .collect::<Result<Vec<_>>>()?;
    progress.start("restoring pages", total);
    let r = jobs.par_iter().try_for_each_init(
        || vec![0u8; CHUNK as usize],
        |buf, job| -> Result<()> {
            let level = &chain[job.level];
            let map = files[job.level]
                .as_ref()
                .ok_or_else(|| bad(&level.path, "a run points into an empty pages file".into()))?;
            for p in &job.parts {
                // Before the tree runs: nothing to wait for but this.
                level.ensure(p.off, p.len, job.frame, true)?;
            }
            if !verified {
                // Not checked up front (see `verify_index`).
                for p in &job.parts {
                    check_stored(&level.pm, map, p.off, p.len, job.frame)
                        .map_err(|r| bad(&level.path, r))?;
                }
            }
            let (data, base): (&[u8], u64) = match job.frame {
                None => (&map[..], 0),
                Some(fi) => {
                    let f = &level.pm.frames[fi];
                    if f.stored_len == f.len {
                        (&map[f.stored_at as usize..][..f.len as usize], f.offset)
                    } else {
                        let out = &mut buf[..f.len as usize];
                        level.unpack_frame(map, fi, out)?;
                        (&*out, f.offset)
                    }
                }
            };
            for p in &job.parts {
                let src = &data[(p.off - base) as usize..][..p.len as usize];
                write_piece(pid, p.va, src, ranges, filler, lazy)?;
                progress.advance(p.len);
            }
            Ok(())
        },
    );
    progress.finish();
    r
}

/// A process's saved pages, read by address: what a lazy restore serves.
pub struct Source {
    /// Pieces of content in address order, each within one frame of a
    /// compressed file or one chunk of an uncompressed one.
    chunks: Vec<(Piece, Option<usize>)>,
    chain: Vec<Level>,
    files: Vec<Option<std::sync::Arc<crate::sys::FilesMap>>>,
    /// The last frame decompressed: (level, frame, content).
    cache: Option<(usize, usize, Vec<u8>)>,
    /// Chunks whose stored bytes were checked already.
    checked: Vec<bool>,
}

impl Source {
    /// Checks the indexes of a process's chain and maps its pages files.
    pub fn open(chain: Vec<Level>) -> Result<Source> {
        let pieces = resolve_chain(&chain)?;
        let maps: Vec<&PageMap> = chain.iter().map(|l| &l.pm).collect();
        let mut chunks: Vec<(Piece, Option<usize>)> = restore_jobs(&maps, pieces)
            .into_iter()
            .flat_map(|j| j.parts.into_iter().map(move |p| (p, j.frame)))
            .collect();
        chunks.sort_unstable_by_key(|(p, _)| p.va);
        let files = chain
            .iter()
            .map(Level::mapped)
            .collect::<Result<Vec<_>>>()?;
        Ok(Source {
            checked: vec![false; chunks.len()],
            chunks,
            chain,
            files,
            cache: None,
        })
    }

    /// The ranges with content, as (address, length), in address order;
    /// none crosses a piece that `read` takes in one go.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.chunks.iter().map(|(p, _)| (p.va, p.len)).collect()
    }

    /// The chunk holding saved address `va`, if any.
    fn chunk(&self, va: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|(p, _)| p.va + p.len <= va);
        self.chunks.get(i).filter(|(p, _)| p.va <= va).map(|_| i)
    }

    /// Whether the content at `va` can be read without waiting for a
    /// background fetch of held pages (see `read`).
    pub fn ready(&self, va: u64) -> bool {
        self.chunk(va).is_none_or(|i| {
            let (p, frame) = self.chunks[i];
            self.checked[i] || self.chain[p.level].ready(p.off, p.len, frame)
        })
    }

    /// The content of the saved page range starting at `va` (a start
    /// `ranges` gave, or any page inside one), to its range's end; None
    /// where nothing was saved (the page is zero). Held pages not in yet
    /// are fetched at once when `urgent` (a fault), else waited for.
    pub fn read(&mut self, va: u64, urgent: bool) -> Result<Option<&[u8]>> {
        let Some(i) = self.chunk(va) else {
            return Ok(None);
        };
        let (p, frame) = self.chunks[i];
        let skip = (va - p.va) as usize;
        let level = &self.chain[p.level];
        let map = self.files[p.level]
            .as_ref()
            .expect("a level with content has its file mapped");
        if !self.checked[i] {
            level.ensure(p.off, p.len, frame, urgent)?;
            check_stored(&level.pm, map, p.off, p.len, frame).map_err(|reason| {
                Error::BadImages {
                    dir: level.path.parent().unwrap_or(Path::new(".")).to_owned(),
                    reason,
                }
            })?;
            self.checked[i] = true;
        }
        let Some(fi) = frame else {
            let at = p.off as usize + skip;
            return Ok(Some(&map[at..p.off as usize + p.len as usize]));
        };
        let f = &level.pm.frames[fi];
        let stored = &map[f.stored_at as usize..][..f.stored_len as usize];
        let base = (p.off - f.offset) as usize;
        if f.stored_len == f.len {
            return Ok(Some(&stored[base + skip..base + p.len as usize]));
        }
        if !matches!(self.cache, Some((l, c, _)) if l == p.level && c == fi) {
            let mut out = vec![0u8; f.len as usize];
            level.unpack_frame(map, fi, &mut out)?;
            self.cache = Some((p.level, fi, out));
        }
        let data = &self.cache.as_ref().expect("just filled").2;
        Ok(Some(&data[base + skip..base + p.len as usize]))
    }
}

/// A piece of restore work: parts of one level's content, from one frame
/// of a compressed pages file (decompressed once) or straight from an
/// uncompressed one.
struct RestoreJob {
    level: usize,
    frame: Option<usize>,
    parts: Vec<Piece>,
}

/// Cuts resolved pieces into restore jobs: at most a chunk each from an
/// uncompressed file; from a compressed one, every part of a frame in one
/// job.
fn restore_jobs(maps: &[&PageMap], pieces: Vec<Piece>) -> Vec<RestoreJob> {
    let mut raw = Vec::new();
    let mut framed: Vec<(usize, Piece)> = Vec::new();
    for p in pieces {
        let frames = &maps[p.level].frames;
        if compression(maps[p.level]) == Compression::None {
            raw.push(p);
            continue;
        }
        let mut done = 0;
        while done < p.len {
            let off = p.off + done;
            let i = frames.partition_point(|f| f.offset + f.len as u64 <= off);
            let f = &frames[i];
            let n = (p.len - done).min(f.offset + f.len as u64 - off);
            framed.push((
                i,
                Piece {
                    va: p.va + done,
                    len: n,
                    level: p.level,
                    off,
                },
            ));
            done += n;
        }
    }
    framed.sort_unstable_by_key(|(i, p)| (p.level, *i, p.va));
    let mut jobs: Vec<RestoreJob> = cut(raw)
        .into_iter()
        .map(|p| RestoreJob {
            level: p.level,
            frame: None,
            parts: vec![p],
        })
        .collect();
    for (i, p) in framed {
        match jobs.last_mut() {
            Some(j) if j.frame == Some(i) && j.level == p.level => j.parts.push(p),
            _ => jobs.push(RestoreJob {
                level: p.level,
                frame: Some(i),
                parts: vec![p],
            }),
        }
    }
    jobs
}

/// Writes `src` at `va` of process `pid`: through `filler` where it has
/// registered the memory (or not at all when `lazy`: those pages are
/// served on demand later), with process_vm_writev elsewhere.
fn write_piece(
    pid: i32,
    va: u64,
    src: &[u8],
    ranges: &[(u64, u64)],
    filler: Option<&UffdFiller>,
    lazy: bool,
) -> Result<()> {
    let mut at = 0usize;
    for (start, end, by_uffd) in split_by(va, va + src.len() as u64, ranges) {
        let n = (end - start) as usize;
        let part = &src[at..at + n];
        match (by_uffd, filler) {
            (true, Some(_)) if lazy => {}
            (true, Some(f)) => f
                .copy(start, part)
                .map_err(|e| Error::sys(pid, format!("UFFDIO_COPY at {start:#x}+{n:#x}"), e))?,
            _ => write_remote(pid, start, part)?,
        }
        at += n;
    }
    Ok(())
}

/// Fills fresh anonymous memory of a process being restored through its
/// userfaultfd: UFFDIO_COPY puts our data straight into new pages, where
/// process_vm_writev would first fault in zeroed pages and then copy.
pub struct UffdFiller {
    uffd: crate::sys::uffd::Userfaultfd,
    /// Registered ranges, sorted.
    ranges: Vec<(u64, u64)>,
}

impl UffdFiller {
    /// Registers `ranges` (whole mappings, so none is split) of the process
    /// behind `uffd` for missing-page filling, with `features` (the events
    /// a lazy restore must hear of).
    pub fn new(
        pid: i32,
        uffd: crate::sys::uffd::Userfaultfd,
        mut ranges: Vec<(u64, u64)>,
        features: u64,
    ) -> Result<Self> {
        uffd.api(features)
            .map_err(|e| Error::sys(pid, "UFFDIO_API", e))?;
        ranges.sort_unstable();
        for &(s, e) in &ranges {
            uffd.register(s, e - s, crate::sys::uffd::UFFDIO_REGISTER_MODE_MISSING)
                .map_err(|err| Error::sys(pid, format!("UFFDIO_REGISTER {s:#x}-{e:#x}"), err))?;
        }
        Ok(UffdFiller { uffd, ranges })
    }

    fn copy(&self, dst: u64, src: &[u8]) -> std::result::Result<(), nix::errno::Errno> {
        self.uffd.copy(dst, src)
    }

    /// The userfaultfd and its registered ranges, for a lazy restore's
    /// page server.
    pub fn into_parts(self) -> (crate::sys::uffd::Userfaultfd, Vec<(u64, u64)>) {
        (self.uffd, self.ranges)
    }

    /// Unregisters every range, leaving the mappings as they were.
    pub fn finish(self, pid: i32) -> Result<()> {
        for &(s, e) in &self.ranges {
            self.uffd
                .unregister(s, e - s)
                .map_err(|err| Error::sys(pid, format!("UFFDIO_UNREGISTER {s:#x}-{e:#x}"), err))?;
        }
        Ok(())
    }
}

/// Cuts `[start, end)` into pieces inside and outside the filler's ranges.
fn split_by(start: u64, end: u64, ranges: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut cur = start;
    while cur < end {
        let i = ranges.partition_point(|r| r.1 <= cur);
        match ranges.get(i) {
            Some(&(s, e)) if s <= cur => {
                let stop = e.min(end);
                out.push((cur, stop, true));
                cur = stop;
            }
            Some(&(s, _)) => {
                let stop = s.min(end);
                out.push((cur, stop, false));
                cur = stop;
            }
            None => {
                out.push((cur, end, false));
                cur = end;
            }
        }
    }
    out
}

fn write_remote(pid: i32, addr: u64, src: &[u8]) -> Result<()> {
    let n = process_vm_writev(
        Pid::from_raw(pid),
        &[IoSlice::new(src)],
        &[RemoteIoVec {
            base: addr as usize,
            len: src.len(),
        }],
    )
    .map_err(|e| Error::sys(pid, format!("process_vm_writev at {addr:#x}"), e))?;
    if n != src.len() {
        return Err(Error::Refused {
            pid,
            reason: format!(
                "short write of pages at {addr:#x}: {n} of {} bytes",
                src.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_respects_chunks_and_order() {
        let ex = [
            Extent {
                start: 0x1000,
                end: 0x3000,
                cow: false,
            },
            Extent {
                start: 0x10000,
                end: 0x10000 + 2 * CHUNK,
                cow: false,
            },
        ];
        let (runs, jobs, total) = plan(&ex);
        assert_eq!(total, 0x2000 + 2 * CHUNK);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].offset, 0x2000);
        // Jobs tile the file exactly, in order, none crossing a chunk edge.
        let mut off = 0;
        for j in &jobs {
            assert_eq!(j.file_off, off);
            assert_eq!(j.iov.iter().map(|i| i.1).sum::<u64>(), j.len);
            assert_eq!(j.file_off / CHUNK, (j.file_off + j.len - 1) / CHUNK);
            off += j.len;
        }
        assert_eq!(off, total);
    }

    #[test]
    fn jobs_never_mix_snapshot_and_frozen_memory() {
        let ex = [
            Extent {
                start: 0x1000,
                end: 0x3000,
                cow: true,
            },
            Extent {
                start: 0x3000,
                end: 0x5000,
                cow: false,
            },
            Extent {
                start: 0x8000,
                end: 0x9000,
                cow: true,
            },
        ];
        let (runs, jobs, total) = plan(&ex);
        assert_eq!((runs.len(), total), (3, 0x5000));
        assert_eq!(
            jobs.iter().map(|j| (j.file_off, j.cow)).collect::<Vec<_>>(),
            vec![(0, true), (0x2000, false), (0x4000, true)]
        );
    }

    fn run(vaddr: u64, pages: u64, offset: u64, flags: u32) -> PageRun {
        PageRun {
            vaddr,
            nr_pages: pages,
            offset,
            flags,
        }
    }

    fn index(runs: Vec<PageRun>) -> PageMap {
        let size = runs
            .iter()
            .filter(|r| r.flags & PAGE_PRESENT != 0)
            .map(|r| r.nr_pages * 4096)
            .sum();
        PageMap {
            page_size: 4096,
            pages_file: "pages-1.img".into(),
            pages_file_size: size,
            runs,
            ..Default::default()
        }
    }

    #[test]
    fn a_chain_resolves_each_page_to_the_newest_copy() {
        const P: u64 = 4096;
        // Oldest: pages 0-9 saved. Middle: page 2 changed, 0-1 and 3-9
        // unchanged, 20 new. Newest: page 5 changed, 0-4 and 6-9 and 20
        // unchanged; page 2 is no more (freed since).
        let old = index(vec![run(0, 10, 0, PAGE_PRESENT)]);
        let mid = index(vec![
            run(0, 2, 0, PAGE_IN_PARENT),
            run(2 * P, 1, 0, PAGE_PRESENT),
            run(3 * P, 7, 0, PAGE_IN_PARENT),
            run(20 * P, 1, P, PAGE_PRESENT),
        ]);
        let new = index(vec![
            run(0, 2, 0, PAGE_IN_PARENT),
            run(3 * P, 2, 0, PAGE_IN_PARENT),
            run(5 * P, 1, 0, PAGE_PRESENT),
            run(6 * P, 4, 0, PAGE_IN_PARENT),
            run(20 * P, 1, 0, PAGE_IN_PARENT),
        ]);
        for pm in [&old, &mid, &new] {
            check_index(pm).unwrap();
        }
        let mut out = Vec::new();
        resolve(&[&new, &mid, &old], 0, 0, u64::MAX, &mut out).unwrap();
        let piece = |va: u64, pages: u64, level: usize, off: u64| Piece {
            va: va * P,
            len: pages * P,
            level,
            off: off * P,
        };
        assert_eq!(
            out,
            vec![
                piece(0, 2, 2, 0),
                piece(3, 2, 2, 3),
                piece(5, 1, 0, 0),
                piece(6, 4, 2, 6),
                piece(20, 1, 1, 1),
            ]
        );
        // Without the oldest level the chain is incomplete.
        let err = resolve(&[&new, &mid], 0, 0, u64::MAX, &mut Vec::new()).unwrap_err();
        assert!(err.contains("parent checkpoint that is not there"), "{err}");
    }

    #[test]
    fn bad_indexes_are_refused() {
        let overlap = index(vec![
            run(0, 2, 0, PAGE_PRESENT),
            run(4096, 1, 0, PAGE_IN_PARENT),
        ]);
        assert!(check_index(&overlap).unwrap_err().contains("overlap"));
        let mut past = index(vec![run(0, 2, 4096, PAGE_PRESENT)]);
        assert!(check_index(&past)
            .unwrap_err()
            .contains("past the pages file"));
        past.runs[0].offset = 0;
        past.pages_file_size += 4096;
        assert!(check_index(&past).unwrap_err().contains("does not cover"));
    }

    #[test]
    fn cut_pieces_fit_a_job() {
        let p = Piece {
            va: 0x1000,
            len: 2 * CHUNK + 0x2000,
            level: 1,
            off: 0x3000,
        };
        let parts = cut(vec![p]);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|q| q.len <= CHUNK && q.level == 1));
        assert_eq!(parts.iter().map(|q| q.len).sum::<u64>(), p.len);
        assert_eq!(parts[2].off - parts[0].off, parts[2].va - parts[0].va);
    }

    #[test]
    fn parent_runs_interleave_in_address_order() {
        let runs = with_parent_runs(
            vec![run(0x5000, 1, 0, PAGE_PRESENT)],
            &[(0x1000, 0x3000), (0x8000, 0x9000)],
        );
        let addrs: Vec<(u64, u64, u32)> = runs
            .iter()
            .map(|r| (r.vaddr, r.nr_pages, r.flags))
            .collect();
        assert_eq!(
            addrs,
            vec![
                (0x1000, 2, PAGE_IN_PARENT),
                (0x5000, 1, PAGE_PRESENT),
                (0x8000, 1, PAGE_IN_PARENT)
            ]
        );
    }

    #[test]
    fn codecs_parse_and_print() {
        for (text, codec) in [
            ("none", Codec::None),
            ("lz4", Codec::Lz4),
            ("zstd", Codec::Zstd(ZSTD_DEFAULT_LEVEL)),
            ("zstd:7", Codec::Zstd(7)),
        ] {
            assert_eq!(text.parse::<Codec>().unwrap(), codec);
            assert_eq!(codec.to_string().parse::<Codec>().unwrap(), codec);
        }
        for bad in ["gzip", "zstd:0", "zstd:20", "zstd:x", "lz4:1"] {
            assert!(bad
                .parse::<Codec>()
                .unwrap_err()
                .contains("unknown compression"));
        }
    }

    #[test]
    fn frames_round_trip_and_incompressible_data_is_stored_as_is() {
        let mut page = vec![0u8; 64 * 1024];
        page[100] = 7;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                // xorshift64: incompressible enough.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        for codec in [Codec::Lz4, Codec::Zstd(1), Codec::Zstd(9)] {
            let mut packer = Packer::new(codec).unwrap();
            let mut packed = vec![0u8; PACKED_LEN];
            let n = packer.pack(&page, &mut packed).expect("zeros shrink");
            assert!(n < page.len() / 10);
            let mut out = vec![0u8; page.len()];
            unpack(codec.proto(), &packed[..n], &mut out).unwrap();
            assert_eq!(out, page);
            // A wrong length is an error, not a silent short frame.
            assert!(unpack(codec.proto(), &packed[..n], &mut out[..1000]).is_err());
            assert_eq!(packer.pack(&noise, &mut packed), None, "{codec}");
        }
    }

    #[test]
    fn restore_jobs_decompress_each_frame_once() {
        const P: u64 = 4096;
        // Content of 3 pages in two frames (2 + 1 pages); the process's
        // pages interleave with a raw parent.
        let frames = vec![
            Frame {
                offset: 0,
                len: 2 * P as u32,
                stored_at: 10,
                stored_len: 100,
                crc32c: 0,
            },
            Frame {
                offset: 2 * P,
                len: P as u32,
                stored_at: 0,
                stored_len: 10,
                crc32c: 0,
            },
        ];
        let top = PageMap {
            compression: Compression::Lz4 as i32,
            frames,
            content_size: 3 * P,
            pages_file_size: 110,
            ..Default::default()
        };
        check_frames(&top).unwrap();
        let parent = PageMap::default();
        let piece = |va: u64, len: u64, level: usize, off: u64| Piece {
            va: va * P,
            len: len * P,
            level,
            off: off * P,
        };
        // Page 0 and 2 of the content at addresses 10 and 12, page 1 at
        // 20 (after a parent piece), and content 2 at 30.
        let pieces = vec![
            piece(10, 1, 0, 0),
            piece(11, 1, 1, 0),
            piece(12, 2, 0, 1),
            piece(30, 1, 1, 5),
        ];
        let jobs = restore_jobs(&[&top, &parent], pieces);
        /// A job as (level, frame, [(page, content page)]).
        type Shape = (usize, Option<usize>, Vec<(u64, u64)>);
        let shape: Vec<Shape> = jobs
            .iter()
            .map(|j| {
                let parts = j.parts.iter().map(|p| (p.va / P, p.off / P)).collect();
                (j.level, j.frame, parts)
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (1, None, vec![(11, 0)]),
                (1, None, vec![(30, 5)]),
                (0, Some(0), vec![(10, 0), (12, 1)]),
                (0, Some(1), vec![(13, 2)]),
            ]
        );
        // Frames that leave a hole, or run past the file, are refused.
        let mut holed = top.clone();
        holed.frames[1].offset += P;
        assert!(check_frames(&holed).unwrap_err().contains("tile"));
        let mut outside = top.clone();
        outside.frames[0].stored_len = 200;
        assert!(check_frames(&outside).unwrap_err().contains("outside"));
    }

    #[test]
    fn split_by_ranges() {
        assert_eq!(split_by(0, 10, &[]), vec![(0, 10, false)]);
        let r = [(10, 20), (30, 40)];
        assert_eq!(
            split_by(5, 35, &r),
            vec![
                (5, 10, false),
                (10, 20, true),
                (20, 30, false),
                (30, 35, true)
            ]
        );
        assert_eq!(split_by(12, 18, &r), vec![(12, 18, true)]);
        assert_eq!(split_by(40, 50, &r), vec![(40, 50, false)]);
    }

    #[test]
    fn file_checksum_follows_every_block() {
        let a = file_checksum(&[1, 2, 3]);
        assert_ne!(a, file_checksum(&[1, 2, 4]));
        assert_ne!(a, file_checksum(&[1, 2]));
        assert_eq!(a, file_checksum(&[1, 2, 3]));
    }

    #[test]
    fn large_files_are_split_into_whole_chunks() {
        assert_eq!(segment_size(0, 16), 0);
        assert_eq!(segment_size(2 * SEGMENT_MIN - 4096, 16), 0);
        assert_eq!(segment_size(2 * SEGMENT_MIN, 16), SEGMENT_MIN);
        let big = 4u64 << 30;
        assert_eq!(segment_size(big, 100), big / MAX_SEGMENTS);
        assert_eq!(segment_size(big, 4), big / 4);
        assert_eq!(segment_size(big, 1), 0);
        let odd = 3 * SEGMENT_MIN + 5 * 4096;
        let s = segment_size(odd, 16);
        assert_eq!(s % CHUNK, 0);
        assert!(odd.div_ceil(s) <= 3 && s * 3 >= odd);
        assert_eq!(segment_name("pages-7.img", 0), "pages-7.img");
        assert_eq!(segment_name("pages-7.img", 12), "pages-7.s12.img");
        assert!(is_later_segment("pages-7.s12.img"));
        assert!(!is_later_segment("pages-7.img"));
        assert!(!is_later_segment("mm-7.s1.img"));
        let pm = PageMap {
            pages_file: "pages-7.img".into(),
            pages_file_size: 10 * 4096,
            segment_size: 4 * 4096,
            ..Default::default()
        };
        assert_eq!(
            segments(&pm),
            vec![
                ("pages-7.img".to_string(), 4 * 4096),
                ("pages-7.s1.img".to_string(), 4 * 4096),
                ("pages-7.s2.img".to_string(), 2 * 4096),
            ]
        );
    }

    #[test]
    fn segments_read_as_one_file_and_each_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..10 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let pm = PageMap {
            pages_file: "pages-7.img".into(),
            page_size: 4096,
            pages_file_size: content.len() as u64,
            segment_size: 4 * 4096,
            block_size: BLOCK,
            block_crc32c: vec![crc32c::crc32c(&content)],
            content_size: content.len() as u64,
            ..Default::default()
        };
        for (k, (name, _)) in segments(&pm).iter().enumerate() {
            let part = &content[k * 4 * 4096..((k + 1) * 4 * 4096).min(content.len())];
            std::fs::write(dir.path().join(name), part).unwrap();
        }
        let path = dir.path().join("pages-7.img");
        let (crc, map) = verify(&pm, &path).unwrap();
        assert_eq!(crc, index_checksum(&pm));
        assert_eq!(&map.unwrap()[..], &content[..]);
        // A byte changed in a later segment, then that segment cut short.
        let last = dir.path().join("pages-7.s2.img");
        let mut bytes = std::fs::read(&last).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&last, &bytes).unwrap();
        let e = verify(&pm, &path).unwrap_err().to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        std::fs::write(&last, &bytes[..4096]).unwrap();
        let e = verify(&pm, &path).unwrap_err().to_string();
        assert!(e.contains("pages-7.s2.img is 4096 bytes"), "{e}");
    }
}
