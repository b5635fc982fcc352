//! Image file framing.
//!
//! ```text
//! header  : magic "CKPTIMG\0" (8) | format version u32 LE | kind u32 LE | reserved u64
//! record* : length u32 LE | crc32c(payload) u32 LE | payload (protobuf)
//! trailer : 0xFFFF_FFFF u32 | record count u32 | crc32c of every byte before the trailer u32
//! ```
//! A file without its trailer was cut short and is refused: an image is
//! either whole or rejected.

use std::io::Write;
use std::path::{Path, PathBuf};

/// First eight bytes of every framed image file.
pub const MAGIC: &[u8; 8] = b"CKPTIMG\0";
/// Version of the image format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const TRAILER_MARK: u32 = u32::MAX;
const TRAILER_LEN: usize = 12;
/// Largest record we accept; guards against a corrupt length field.
const MAX_RECORD: usize = 1 << 30;

/// What an image file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ImageKind {
    Inventory = 1,
    Core = 2,
    Mm = 3,
    PageMap = 4,
    Files = 5,
    Node = 6,
    /// Namespaces of a job: which are its own, UTS names, mounts.
    Ns = 7,
    /// Contents of a job's IPC namespace: SysV objects, POSIX queues.
    Ipc = 8,
    /// A job's network namespace: interfaces, addresses, routes.
    Net = 9,
    /// A coordinated checkpoint of all parts of a job (the coordinator's).
    Manifest = 10,
    /// Where a level's pages files are held (a post-copy migration).
    Held = 11,
}

impl ImageKind {
    /// Parses the kind field of a header.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Inventory,
            2 => Self::Core,
            3 => Self::Mm,
            4 => Self::PageMap,
            5 => Self::Files,
            6 => Self::Node,
            7 => Self::Ns,
            8 => Self::Ipc,
            9 => Self::Net,
            10 => Self::Manifest,
            11 => Self::Held,
            _ => return None,
        })
    }

    /// Short lower-case name, as used in file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Core => "core",
            Self::Mm => "mm",
            Self::PageMap => "pagemap",
            Self::Files => "files",
            Self::Node => "node",
            Self::Ns => "ns",
            Self::Ipc => "ipc",
            Self::Net => "net",
            Self::Manifest => "manifest",
            Self::Held => "held",
        }
    }
}

/// Why an image could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a ckpt image (bad magic)")]
    BadMagic,
    #[error(
        "image format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version { found: u32 },
    #[error("unknown image kind {0}")]
    UnknownKind(u32),
    #[error("expected a {expected:?} image, found {found:?}")]
    WrongKind {
        expected: ImageKind,
        found: ImageKind,
    },
    #[error("image truncated at byte {at} (no trailer: the file was cut short)")]
    Truncated { at: usize },
    #[error("record {index} at byte {at}: checksum mismatch (image corrupt)")]
    RecordChecksum { index: usize, at: usize },
    #[error("trailer checksum mismatch (image corrupt)")]
    FileChecksum,
    #[error("trailer says {expected} records, found {found}")]
    RecordCount { expected: u32, found: u32 },
    #[error("expected exactly one record, found {0}")]
    NotOneRecord(usize),
    #[error("record {index}: {source}")]
    Decode {
        index: usize,
        source: prost::DecodeError,
    },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        source: Box<FrameError>,
    },
}

impl FrameError {
    fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (FrameError::Io { .. } | FrameError::InFile { .. }) => e,
            e => FrameError::InFile {
                path: path.to_owned(),
                source: Box::new(e),
            },
        }
    }
}

/// Encodes messages into one framed image.
pub fn encode_image<M: prost::Message>(kind: ImageKind, msgs: &[M]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + TRAILER_LEN + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u32).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    for m in msgs {
        let payload = m.encode_to_vec();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&TRAILER_MARK.to_le_bytes());
    out.extend_from_slice(&(msgs.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

/// Checks an image's framing and returns its kind and raw record payloads.
pub fn decode_image(bytes: &[u8]) -> Result<(ImageKind, Vec<&[u8]>), FrameError> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated { at: bytes.len() });
    }
    let version = u32_at(bytes, 8).expect("header length checked");
    if version != FORMAT_VERSION {
        return Err(FrameError::Version { found: version });
    }
    let kind_raw = u32_at(bytes, 12).expect("header length checked");
    let kind = ImageKind::from_u32(kind_raw).ok_or(FrameError::UnknownKind(kind_raw))?;
    let mut at = HEADER_LEN;
    let mut records = Vec::new();
    loop {
        let len = u32_at(bytes, at).ok_or(FrameError::Truncated { at })?;
        if len == TRAILER_MARK {
            let count = u32_at(bytes, at + 4).ok_or(FrameError::Truncated { at })?;
            let crc = u32_at(bytes, at + 8).ok_or(FrameError::Truncated { at })?;
            if crc32c::crc32c(&bytes[..at]) != crc {
                return Err(FrameError::FileChecksum);
            }
            if count as usize != records.len() {
                return Err(FrameError::RecordCount {
                    expected: count,
                    found: records.len() as u32,
                });
            }
            return Ok((kind, records));
        }
        let len = len as usize;
        let crc = u32_at(bytes, at + 4).ok_or(FrameError::Truncated { at })?;
        let start = at + 8;
        if len > MAX_RECORD || start + len > bytes.len() {
            return Err(FrameError::Truncated { at });
        }
        let payload = &bytes[start..start + len];
        if crc32c::crc32c(payload) != crc {
            return Err(FrameError::RecordChecksum {
                index: records.len(),
                at,
            });
        }
        records.push(payload);
        at = start + len;
    }
}

/// Decodes an image that holds exactly one message of the expected kind.
pub fn decode_one<M: prost::Message + Default>(
    bytes: &[u8],
    expected: ImageKind,
) -> Result<M, FrameError> {
    let (kind, records) = decode_image(bytes)?;
    if kind != expected {
        return Err(FrameError::WrongKind {
            expected,
            found: kind,
        });
    }
    if records.len() != 1 {
        return Err(FrameError::NotOneRecord(records.len()));
    }
    M::decode(records[0]).map_err(|source| FrameError::Decode { index: 0, source })
}

/// Reads and checks an image file holding one message.
pub fn read_image_file<M: prost::Message + Default>(
    path: &Path,
    kind: ImageKind,
) -> Result<M, FrameError> {
    let bytes = std::fs::read(path).map_err(|source| FrameError::Io {
        path: path.to_owned(),
        source,
    })?;
    decode_one(&bytes, kind).map_err(|e| e.in_file(path))
}

/// Writes one message as an image file and returns the bytes written (for
/// the inventory's size and checksum). The file appears under its name only
/// once complete (written to a temporary name, synced, renamed).
pub fn write_image_file<M: prost::Message>(
    path: &Path,
    kind: ImageKind,
    msg: &M,
) -> Result<Vec<u8>, FrameError> {
    let bytes = encode_image(kind, std::slice::from_ref(msg));
    let io = |source| FrameError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("img.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_data().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{FileEntry, Inventory};

    fn sample() -> Inventory {
        Inventory {
            format_version: FORMAT_VERSION,
            tool_version: "test".into(),
            root_pid: 42,
            pids: vec![42, 43],
            files: vec![FileEntry {
                name: "core-42.img".into(),
                size: 10,
                crc32c: 7,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn roundtrip() {
        let bytes = encode_image(ImageKind::Inventory, &[sample()]);
        let back: Inventory = decode_one(&bytes, ImageKind::Inventory).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn several_records() {
        let bytes = encode_image(ImageKind::Inventory, &[sample(), Inventory::default()]);
        let (kind, recs) = decode_image(&bytes).unwrap();
        assert_eq!(kind, ImageKind::Inventory);
        assert_eq!(recs.len(), 2);
        assert!(matches!(
            decode_one::<Inventory>(&bytes, ImageKind::Inventory),
            Err(FrameError::NotOneRecord(2))
        ));
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = encode_image(ImageKind::Inventory, &[sample()]);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                decode_one::<Inventory>(&b, ImageKind::Inventory).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_is_caught() {
        let bytes = encode_image(ImageKind::Inventory, &[sample()]);
        for len in 0..bytes.len() {
            assert!(
                decode_image(&bytes[..len]).is_err(),
                "cut at {len} accepted"
            );
        }
    }

    #[test]
    fn wrong_kind_and_version() {
        let bytes = encode_image(ImageKind::Core, &[sample()]);
        assert!(matches!(
            decode_one::<Inventory>(&bytes, ImageKind::Inventory),
            Err(FrameError::WrongKind { .. })
        ));
        let mut b = encode_image(ImageKind::Inventory, &[sample()]);
        b[8] = 9;
        assert!(matches!(
            decode_image(&b),
            Err(FrameError::Version { found: 9 })
        ));
        assert!(matches!(
            decode_image(b"hello world"),
            Err(FrameError::BadMagic)
        ));
    }

    #[test]
    fn describe_renders_json() {
        let bytes = encode_image(ImageKind::Inventory, &[sample()]);
        let (kind, v) = crate::describe(&bytes).unwrap();
        assert_eq!(kind, ImageKind::Inventory);
        assert_eq!(v["root_pid"], 42);
        assert_eq!(v["files"][0]["name"], "core-42.img");
    }

    #[test]
    fn manifest_describes_with_hex_digests() {
        use crate::image::{Manifest, ManifestPart, PartFile};
        let m = Manifest {
            job_id: "j1".into(),
            checkpoint_id: "20260101T000000-1".into(),
            parts: vec![ManifestPart {
                name: "a".into(),
                node: "n1".into(),
                dir: "part-a".into(),
                inventory_sha256: vec![0xab; 32],
                files: vec![PartFile {
                    name: "inventory.img".into(),
                    size: 3,
                    sha256: vec![0xcd; 32],
                }],
            }],
            signature: vec![1, 2],
            ..Default::default()
        };
        let bytes = encode_image(ImageKind::Manifest, std::slice::from_ref(&m));
        let back: Manifest = decode_one(&bytes, ImageKind::Manifest).unwrap();
        assert_eq!(back, m);
        let (kind, v) = crate::describe(&bytes).unwrap();
        assert_eq!((kind, kind.name()), (ImageKind::Manifest, "manifest"));
        assert_eq!(v["parts"][0]["node"], "n1");
        assert_eq!(v["parts"][0]["inventory_sha256"], "ab".repeat(32));
        assert_eq!(v["parts"][0]["files"][0]["sha256"], "cd".repeat(32));
        assert_eq!(v["signature"], "0102");
    }

    #[test]
    fn kinds_round_trip_and_net_describes() {
        for k in 1..=11 {
            let kind = ImageKind::from_u32(k).expect("known kind");
            assert_eq!(kind as u32, k);
        }
        assert_eq!(ImageKind::from_u32(12), None);
        let net = crate::image::NetImage {
            links: vec![crate::image::NetLink {
                name: "eth0".into(),
                kind: "veth".into(),
                bridge: "br0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (kind, v) = crate::describe(&encode_image(ImageKind::Net, &[net])).unwrap();
        assert_eq!((kind, kind.name()), (ImageKind::Net, "net"));
        assert_eq!(v["links"][0]["bridge"], "br0");
    }
}
