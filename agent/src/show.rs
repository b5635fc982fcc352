//! `ckpt-agent show`: any image file as readable text or JSON.

use std::path::Path;

use crate::error::{Error, Result};

/// Renders the image at `path`: framed images are decoded, raw page and
/// ghost files summarised.
pub fn show(path: &Path, json: bool) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if !bytes.starts_with(ckpt_proto::MAGIC) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let what = if name.starts_with("pages-") {
            "raw page data (see the matching pagemap-PID.img for its index)"
        } else if name.starts_with("ghost-") {
            "content of a file unlinked while open"
        } else {
            return Err(ckpt_proto::FrameError::BadMagic.into());
        };
        let v = serde_json::json!({
            "file": name,
            "kind": "raw",
            "what": what,
            "size": bytes.len(),
            "crc32c": format!("{:08x}", crc32c::crc32c(&bytes)),
        });
        return Ok(render(&v, json));
    }
    let (kind, v) = ckpt_proto::describe(&bytes)?;
    let v = serde_json::json!({ "kind": kind.name(), "image": v });
    Ok(render(&v, json))
}

fn render(v: &serde_json::Value, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(v).expect("JSON value renders");
    }
    let mut out = String::new();
    text(v, 0, &mut out);
    out
}

/// An indented, YAML-like rendering that reads well in a terminal; long
/// byte blobs (hex strings) are shortened.
fn text(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                match val {
                    Value::Object(_) | Value::Array(_) if !is_empty(val) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        text(val, indent + 1, out);
                    }
                    _ => out.push_str(&format!("{pad}{k}: {}\n", scalar(val))),
                }
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                match val {
                    Value::Object(_) | Value::Array(_) => {
                        out.push_str(&format!("{pad}- [{i}]\n"));
                        text(val, indent + 1, out);
                    }
                    _ => out.push_str(&format!("{pad}- {}\n", scalar(val))),
                }
            }
        }
        _ => out.push_str(&format!("{pad}{}\n", scalar(v))),
    }
}

fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => m.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) if s.len() > 96 => {
            format!("{}... ({} hex chars)", &s[..64], s.len())
        }
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(_) => "[]".into(),
        serde_json::Value::Object(_) => "{}".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_proto::image::{Inventory, ThreadCore};
    use ckpt_proto::{encode_image, ImageKind};

    /// A file in a directory of its own, removed with it when dropped.
    struct Tmp(std::path::PathBuf);

    impl Tmp {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn tmp(name: &str, data: &[u8]) -> Tmp {
        let dir =
            std::env::temp_dir().join(format!("ckpt-show-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        Tmp(p)
    }

    #[test]
    fn framed_image_as_text_and_json() {
        let inv = Inventory {
            root_pid: 42,
            pids: vec![42],
            ..Default::default()
        };
        let p = tmp("inventory.img", &encode_image(ImageKind::Inventory, &[inv]));
        let text = show(p.path(), false).unwrap();
        assert!(text.contains("kind: inventory"), "{text}");
        assert!(text.contains("root_pid: 42"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&show(p.path(), true).unwrap()).unwrap();
        assert_eq!(v["image"]["pids"][0], 42);
    }

    #[test]
    fn long_blobs_are_shortened_in_text() {
        let core = ckpt_proto::image::TaskCore {
            threads: vec![ThreadCore {
                xsave: vec![0xab; 2688],
                ..Default::default()
            }],
            ..Default::default()
        };
        let p = tmp("core-1.img", &encode_image(ImageKind::Core, &[core]));
        let text = show(p.path(), false).unwrap();
        assert!(text.contains("(5376 hex chars)"), "{text}");
        let json = show(p.path(), true).unwrap();
        assert!(json.contains(&"ab".repeat(2688)));
    }

    #[test]
    fn raw_and_foreign_files() {
        let p = tmp("pages-7.img", &[1, 2, 3, 4]);
        let v: serde_json::Value = serde_json::from_str(&show(p.path(), true).unwrap()).unwrap();
        assert_eq!(v["kind"], "raw");
        assert_eq!(v["size"], 4);
        let q = tmp("notes.txt", b"hello");
        assert!(show(q.path(), false).is_err());
    }
}
