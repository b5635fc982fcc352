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
