//! A checkpoint directory: image files named after their kind and pid, an
//! inventory of every file with its size and checksum, written last. A
//! directory without an inventory holds no checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ckpt_proto::image::{FileEntry, Inventory, PageMap};
use ckpt_proto::{read_image_file, write_image_file, ImageKind};

use crate::error::{Error, Result};
use crate::pages;
use crate::stream::{Outbox, StreamTo};

/// Name of the inventory file.
pub const INVENTORY: &str = "inventory.img";

/// Name of the image of `kind` for process `pid`.
pub fn image_name(kind: ImageKind, pid: i32) -> String {
    format!("{}-{pid}.img", kind.name())
}

/// Name of the raw pages file of process `pid`.
pub fn pages_name(pid: i32) -> String {
    format!("pages-{pid}.img")
}

/// The process a pages file (its first segment) is named after.
pub fn pages_pid(name: &str) -> Option<i32> {
    name.strip_prefix("pages-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}

/// Writes the files of one checkpoint and remembers them for the inventory.
pub struct ImageWriter {
    dir: PathBuf,
    entries: Mutex<Vec<FileEntry>>,
    /// Streaming to another node's agent: `dir` is then a spool for the
    /// small images, sent at the commit; pages go straight to the stream.
    out: Option<std::sync::Arc<Outbox>>,
    /// Raw files written into `dir` (tmpfs archives, SysV segments): with
    /// a stream, removed from the spool once sent.
    raw: Mutex<Vec<String>>,
}

impl ImageWriter {
    /// Prepares `dir` (created if needed) for a new checkpoint; refuses a
    /// directory that already holds a committed one.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if dir.join(INVENTORY).exists() {
            return Err(Error::BadImages {
                dir: dir.to_owned(),
                reason: "it already holds a checkpoint; choose an empty directory".into(),
            });
        }
        Ok(ImageWriter {
            dir: dir.to_owned(),
            entries: Mutex::new(Vec::new()),
            out: None,
            raw: Mutex::new(Vec::new()),
        })
    }

    /// Prepares a checkpoint streamed to `to` as level `dir`'s name, with
    /// `dir` (on tmpfs) as the spool of its small images: what a later
    /// level of the chain reads of its parent stays there.
    pub fn streaming(dir: &Path, to: &StreamTo) -> Result<Self> {
        let level = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut w = ImageWriter::create(dir)?;
        w.out = Some(std::sync::Arc::new(Outbox::open(to, &level)?));
        Ok(w)
    }

    /// Where the checkpoint goes, for reports: the directory, or the
    /// stream's receiver and its directory there.
    pub fn destination(&self) -> String {
        match &self.out {
            Some(o) => format!("{}:{}", o.peer(), o.dir()),
            None => self.dir.display().to_string(),
        }
    }

    /// The stream the checkpoint goes to, if it is streamed.
    pub fn outbox(&self) -> Option<std::sync::Arc<Outbox>> {
        self.out.clone()
    }

    /// The checkpoint directory (with a stream: its spool).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record(&self, name: &str, size: u64, crc32c: u32) {
        self.entries
            .lock()
            .expect("image list lock")
            .push(FileEntry {
                name: name.to_string(),
                size,
                crc32c,
            });
    }

    /// Writes a framed image holding `msg`.
    pub fn write<M: prost::Message>(&self, name: &str, kind: ImageKind, msg: &M) -> Result<()> {
        let bytes = write_image_file(&self.dir.join(name), kind, msg)?;
        self.record(name, bytes.len() as u64, crc32c::crc32c(&bytes));
        Ok(())
    }

    /// Records a raw file already written into the directory.
    pub fn add_raw(&self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        let (size, crc) = stream_crc(&path)?;
        self.record(name, size, crc);
        self.raw
            .lock()
            .expect("raw list lock")
            .push(name.to_string());
        Ok(())
    }

    /// Records a pages file whose block checksums are in `pm`: its first
    /// segment with the checksum over them, the others with their sizes
    /// (their content is checked through the same block checksums).
    pub fn add_pages(&self, pm: &PageMap) {
        let crc = pages::index_checksum(pm);
        for (k, (name, len)) in pages::segments(pm).into_iter().enumerate() {
            self.record(&name, len, if k == 0 { crc } else { 0 });
        }
    }

    /// Writes the inventory last, which makes the checkpoint exist; signed
    /// with `key` when given.
    pub fn commit(&self, mut inv: Inventory, key: Option<&ckpt_proto::rpc::Key>) -> Result<()> {
        inv.files = self.entries.lock().expect("image list lock").clone();
        if let Some(k) = key {
            inv.signature = k.mac(&[&ckpt_proto::image::inventory_signing_bytes(&inv)]);
        }
        let bytes = write_image_file(&self.dir.join(INVENTORY), ImageKind::Inventory, &inv)?;
        if let Some(out) = &self.out {
            // What is not in the spool (the pages files) went onto the
            // stream as it was copied; the rest follows, the inventory
            // last. (A failure here drops the session, whose discard
            // removes the spool's inventory first.)
            out.finish_level(&self.dir, &inv, &bytes)?;
            // What the next level reads of this one stays; the bulk goes.
            for name in self.raw.lock().expect("raw list lock").drain(..) {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
        let d = std::fs::File::open(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        d.sync_all().map_err(|e| Error::io(&self.dir, e))?;
        Ok(())
    }

    /// Removes every file this writer created (after a failed or aborted
    /// dump), including data files written before they could be recorded;
    /// the inventory first, so that no half-removed checkpoint looks
    /// complete.
    pub fn discard(&self) {
        let inv = self.dir.join(INVENTORY);
        if std::fs::remove_file(&inv).is_ok() {
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        for e in self.entries.lock().expect("image list lock").iter() {
            let _ = std::fs::remove_file(self.dir.join(&e.name));
        }
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = (name.starts_with("pages-") && name.ends_with(".img"))
                || (name.starts_with("mnt-") && name.ends_with(".tar"))
                || (name.starts_with("ipc-") && name.ends_with(".img"));
            if ours {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Size and crc32c of a file, read in chunks: raw files (tmpfs archives,
/// SysV segments) can be far larger than the agent should hold.
fn stream_crc(path: &Path) -> Result<(u64, u32)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok((size, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}

/// Reads a checkpoint's inventory, refusing a directory without one.
pub fn read_inventory(dir: &Path) -> Result<Inventory> {
    let path = dir.join(INVENTORY);
    if !path.exists() {
        return Err(Error::BadImages {
            dir: dir.to_owned(),
            reason: format!("no {INVENTORY}: not a complete checkpoint"),
        });
    }
    Ok(read_image_file(&path, ImageKind::Inventory)?)
}

/// Checks every file the inventory lists (size and checksum) before
/// anything is restored. Pages files are checked block by block in
/// parallel against their index.
pub fn verify(dir: &Path, inv: &Inventory) -> Result<()> {
    verify_with(dir, inv, true)
}

/// Pages files a verification read, mapped, by path: the restore that
/// follows copies from these mappings, whose page tables the checksum pass
/// filled already (mapping a file again and faulting it in costs about 80
/// ms per GiB here, half as much as the checksums).
/// A lazy restore adds the held pages files it fetches (see `held`): their
/// copies in memory, mapped, and the fetches that fill them.
#[derive(Default)]
pub struct Mapped {
    maps: HashMap<PathBuf, Arc<crate::sys::FilesMap>>,
    fetches: HashMap<PathBuf, Arc<crate::held::Fetch>>,
}

impl Mapped {
    /// The mapping of the pages file at `path`, if a verification kept one.
    pub fn get(&self, path: &Path) -> Option<Arc<crate::sys::FilesMap>> {
        self.maps.get(path).cloned()
    }

    /// The fetch bringing in the pages file at `path`, if it is held.
    pub fn fetch(&self, path: &Path) -> Option<Arc<crate::held::Fetch>> {
        self.fetches.get(path).cloned()
    }

    /// Records the fetch of the held pages file at `path`, and the mapping
    /// of its copy.
    pub fn add_fetch(
        &mut self,
        path: PathBuf,
        fetch: crate::held::Fetch,
        map: Option<crate::sys::FilesMap>,
    ) -> Arc<crate::held::Fetch> {
        if let Some(m) = map {
            self.maps.insert(path.clone(), Arc::new(m));
        }
        let fetch = Arc::new(fetch);
        self.fetches.insert(path, fetch.clone());
        fetch
    }
}

/// Like [`verify`]; without `page_content` the pages files are checked
/// only against their indexes' sizes and checksum lists, their blocks
/// left for the lazy restore to check as it reads them.
pub fn verify_with(dir: &Path, inv: &Inventory, page_content: bool) -> Result<()> {
    verify_into(dir, inv, page_content, &mut Mapped::default())
}

/// Like [`verify_with`], keeping in `mapped` the pages files it read.
pub fn verify_into(
    dir: &Path,
    inv: &Inventory,
    page_content: bool,
    mapped: &mut Mapped,
) -> Result<()> {
    let bad = |reason: String| Error::BadImages {
        dir: dir.to_owned(),
        reason,
    };
    let mut page_files = Vec::new();
    let mut later_segments = std::collections::HashSet::new();
    // Pages files held on the node that dumped them (post-copy) are not
    // here: their indexes are checked against the inventory, and each
    // block against its index as it is fetched.
    let held = crate::held::absent(dir, inv)?;
    if page_content && !held.is_empty() {
        return Err(bad(format!(
            "{} is held on the node that dumped it (held.img): fetch it first",
            held[0]
        )));
    }
    for e in &inv.files {
        if !crate::stream::name_ok(&e.name) {
            return Err(bad(format!("it lists a file named {:?}", e.name)));
        }
        let path = dir.join(&e.name);
        if held.contains(&e.name) {
            if pages::is_later_segment(&e.name) {
                later_segments.insert(e.name.as_str());
            } else {
                page_files.push(e);
            }
            continue;
        }
        let md = std::fs::metadata(&path).map_err(|err| Error::io(&path, err))?;
        if md.len() != e.size {
            return Err(bad(format!(
                "{} is {} bytes, the inventory says {}",
                e.name,
                md.len(),
                e.size
            )));
        }
        if pages::is_later_segment(&e.name) {
            // Checked with its first segment, against the same index.
            later_segments.insert(e.name.as_str());
            continue;
        }
        if e.name.starts_with("pages-") {
            page_files.push(e);
            continue;
        }
        if stream_crc(&path)?.1 != e.crc32c {
            return Err(bad(format!(
                "{} fails its checksum: the image is corrupt",
                e.name
            )));
        }
    }
    for e in page_files {
        let pid =
            pages_pid(&e.name).ok_or_else(|| bad(format!("unexpected file name {}", e.name)))?;
        let pm: PageMap = read_image_file(
            &dir.join(image_name(ImageKind::PageMap, pid)),
            ImageKind::PageMap,
        )?;
        let path = dir.join(&e.name);
        for (name, _) in pages::segments(&pm).into_iter().skip(1) {
            if !later_segments.remove(name.as_str()) {
                return Err(bad(format!("{name} is not listed in the inventory")));
            }
        }
        let crc = match page_content {
            _ if held.contains(&e.name) => {
                pages::check_held_index(&pm, &e.name, e.size).map_err(&bad)?;
                pages::index_checksum(&pm)
            }
            true => {
                let (crc, map) = pages::verify(&pm, &path)?;
                if let Some(map) = map {
                    mapped.maps.insert(path, Arc::new(map));
                }
                crc
            }
            false => pages::verify_index(&pm, &path)?,
        };
        if crc != e.crc32c {
            return Err(bad(format!(
                "{} fails its checksum: the image is corrupt",
                e.name
            )));
        }
    }
    Ok(())
}

/// Longest chain of increments restore follows (a loop of parents would
/// otherwise never end).
pub const MAX_CHAIN: usize = 64;

/// crc32c of a checkpoint's inventory file, which a child checkpoint
/// records to pin its parent.
pub fn inventory_crc(dir: &Path) -> Result<u32> {
    Ok(stream_crc(&dir.join(INVENTORY))?.1)
}

/// The path of directory `to` relative to directory `from` (both made
/// absolute), so that a chain of checkpoints can be moved as a whole.
pub fn relative_path(from: &Path, to: &Path) -> Result<PathBuf> {
    let from = from.canonicalize().map_err(|e| Error::io(from, e))?;
    let to = to.canonicalize().map_err(|e| Error::io(to, e))?;
    let (f, t): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Ok(out)
}

/// The directories of a checkpoint and of the checkpoints it is an
/// increment of, the newest first: each parent is checked like the
/// checkpoint itself (every file against its inventory) and against the
/// inventory checksum its child recorded.
pub fn chain(dir: &Path, inv: &Inventory) -> Result<Vec<PathBuf>> {
    chain_with(dir, inv, true, &mut Mapped::default())
}

/// Like [`chain`], checking the parents' pages as [`verify_into`] does.
pub fn chain_with(
    dir: &Path,
    inv: &Inventory,
    page_content: bool,
    mapped: &mut Mapped,
) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![dir.to_owned()];
    let (mut child_dir, mut child) = (dir.to_owned(), inv.clone());
    while !child.parent.is_empty() {
        if dirs.len() >= MAX_CHAIN {
            return Err(Error::BadImages {
                dir: dir.to_owned(),
                reason: format!("more than {MAX_CHAIN} checkpoints in its chain of parents"),
            });
        }
        let parent = child_dir.join(&child.parent);
        let pinv = read_inventory(&parent)?;
        if inventory_crc(&parent)? != child.parent_inventory_crc32c {
            return Err(Error::BadImages {
                dir: child_dir,
                reason: format!(
                    "its parent {} changed since it was dumped: the chain is broken",
                    parent.display()
                ),
            });
        }
        verify_into(&parent, &pinv, page_content, mapped)?;
        dirs.push(parent.clone());
        (child_dir, child) = (parent, pinv);
    }
    Ok(dirs)
}

/// The page indexes of process `pid` along a chain (see [`chain`]), as far
/// as its pages reach: a level is read only when the one before sends
/// pages to it. Pages files found in `mapped` are read from there.
pub fn page_chain(dirs: &[PathBuf], pid: i32, mapped: &Mapped) -> Result<Vec<pages::Level>> {
    let mut levels: Vec<pages::Level> = Vec::new();
    for dir in dirs {
        if levels.last().is_some_and(|l| !pages::needs_parent(&l.pm)) {
            break;
        }
        let pm: PageMap = read_image_file(
            &dir.join(image_name(ImageKind::PageMap, pid)),
            ImageKind::PageMap,
        )?;
        let path = dir.join(pages_name(pid));
        levels.push(pages::Level {
            map: mapped.get(&path),
            fetch: mapped.fetch(&path),
            path,
            pm,
        });
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint of one process whose 3 MiB pages file is not here: held
    /// elsewhere when `held`, else simply missing.
    fn without_pages(held: bool) -> (tempfile::TempDir, Inventory) {
        let dir = tempfile::tempdir().unwrap();
        let pm = PageMap {
            pid: 7,
            page_size: 4096,
            pages_file: pages_name(7),
            pages_file_size: 3 << 20,
            content_size: 3 << 20,
            block_size: pages::BLOCK,
            block_crc32c: vec![1, 2, 3],
            runs: vec![ckpt_proto::image::PageRun {
                vaddr: 0x10000,
                nr_pages: 768,
                offset: 0,
                flags: 1,
            }],
            ..Default::default()
        };
        let w = ImageWriter::create(dir.path()).unwrap();
        w.write(&image_name(ImageKind::PageMap, 7), ImageKind::PageMap, &pm)
            .unwrap();
        w.add_pages(&pm);
        if held {
            let rec = ckpt_proto::image::HeldPages {
                agent: "127.0.0.1:7707".into(),
                hold: "job.0123456789abcdef".into(),
            };
            w.write(crate::held::HELD, ImageKind::Held, &rec).unwrap();
        }
        w.commit(Inventory::default(), None).unwrap();
        let inv = read_inventory(dir.path()).unwrap();
        (dir, inv)
    }

    #[test]
    fn a_held_pages_file_may_be_absent_only_for_a_lazy_restore() {
        let (dir, inv) = without_pages(true);
        assert_eq!(
            crate::held::absent(dir.path(), &inv).unwrap(),
            vec!["pages-7.img".to_string()]
        );
        verify_with(dir.path(), &inv, false).unwrap();
        let e = verify_with(dir.path(), &inv, true).unwrap_err().to_string();
        assert!(e.contains("pages-7.img is held"), "{e}");
        // Without the record, a missing pages file is just missing.
        let (dir, inv) = without_pages(false);
        assert!(crate::held::absent(dir.path(), &inv).unwrap().is_empty());
        let e = verify_with(dir.path(), &inv, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pages-7.img"), "{e}");
    }

    #[test]
    fn relative_paths_between_checkpoints() {
        let base = tempfile::tempdir().unwrap();
        let mk = |p: &str| {
            let d = base.path().join(p);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let (a, b, c) = (mk("job/pre1"), mk("job/dump"), mk("other/x/y"));
        assert_eq!(relative_path(&b, &a).unwrap(), Path::new("../pre1"));
        assert_eq!(relative_path(&a, &c).unwrap(), Path::new("../../other/x/y"));
        assert_eq!(relative_path(&a, &a).unwrap(), Path::new("."));
        // Resolved from the child's directory, it names the parent.
        assert_eq!(
            b.join(relative_path(&b, &a).unwrap())
                .canonicalize()
                .unwrap(),
            a.canonicalize().unwrap()
        );
    }
}
