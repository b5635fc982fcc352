//! ckpt's image messages (generated from `proto/*.proto`) and the framing of
//! image files: a header with magic, format version and kind, length-delimited
//! records each with its own crc32c, and a trailer that seals the file.

pub mod frame;
pub mod rpc;

/// Messages stored in checkpoint images.
pub mod image {
    include!(concat!(env!("OUT_DIR"), "/ckpt.image.rs"));

    /// A checkpoint's manifest in the store (JOB/CHECKPOINT/manifest.img):
    /// written last, its presence is the commit.
    pub const MANIFEST_FILE: &str = "manifest.img";

    /// What a manifest's signature covers: a fixed context (a signature of
    /// one kind of message never passes for another's under the same key),
    /// then the manifest encoded without its signature (prost encodes
    /// fields in field-number order and the manifest has no maps, so the
    /// encoding is canonical).
    pub fn manifest_signing_bytes(m: &Manifest) -> Vec<u8> {
        let mut unsigned = m.clone();
        unsigned.signature.clear();
        signing_bytes(b"ckpt-manifest-v1\0", &unsigned)
    }

    /// What an inventory's signature covers, as for a manifest.
    pub fn inventory_signing_bytes(inv: &Inventory) -> Vec<u8> {
        let mut unsigned = inv.clone();
        unsigned.signature.clear();
        signing_bytes(b"ckpt-inventory-v1\0", &unsigned)
    }

    fn signing_bytes(context: &[u8], m: &impl prost::Message) -> Vec<u8> {
        let mut out = context.to_vec();
        out.extend_from_slice(&m.encode_to_vec());
        out
    }
}

pub use frame::{
    decode_image, decode_one, encode_image, read_image_file, write_image_file, FrameError,
    ImageKind, FORMAT_VERSION, MAGIC,
};

/// Serializes binary blobs as hex strings in JSON output.
pub fn hexbytes<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// Decodes any framed image into its kind and a JSON rendering of its records.
pub fn describe(bytes: &[u8]) -> Result<(ImageKind, serde_json::Value), FrameError> {
    use image::*;
    fn one<M: prost::Message + Default + serde::Serialize>(
        bytes: &[u8],
        kind: ImageKind,
    ) -> Result<serde_json::Value, FrameError> {
        let m: M = decode_one(bytes, kind)?;
        Ok(serde_json::to_value(&m).expect("image messages serialize to JSON"))
    }
    let (kind, _) = frame::decode_image(bytes)?;
    let v = match kind {
        ImageKind::Inventory => one::<Inventory>(bytes, kind)?,
        ImageKind::Core => one::<TaskCore>(bytes, kind)?,
        ImageKind::Mm => one::<MmImage>(bytes, kind)?,
        ImageKind::PageMap => one::<PageMap>(bytes, kind)?,
        ImageKind::Files => one::<FdTable>(bytes, kind)?,
        ImageKind::Node => one::<NodeFingerprint>(bytes, kind)?,
        ImageKind::Ns => one::<NsImage>(bytes, kind)?,
        ImageKind::Ipc => one::<IpcImage>(bytes, kind)?,
        ImageKind::Net => one::<NetImage>(bytes, kind)?,
        ImageKind::Manifest => one::<Manifest>(bytes, kind)?,
        ImageKind::Held => one::<HeldPages>(bytes, kind)?,
    };
    Ok((kind, v))
}
