//! The items of a job: each `.md`/`.txt` file under a directory (recursive, hidden files
//! and directories skipped, sorted by path), or each non-blank line of a JSONL file.
//! Reading an item never fails the job: a problem becomes that item's failure reason.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::BatchError;

/// Largest item read (bytes); bigger files fail with a reason instead of filling memory.
pub const MAX_ITEM_BYTES: u64 = 16 << 20;

/// Where an item comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A file (absolute path).
    File(PathBuf),
    /// A line of a JSONL file (1-based), with its raw bytes.
    Line(usize, Vec<u8>),
}

/// One unit of work.
#[derive(Clone, Debug)]
pub struct Item {
    /// Stable identity: the path relative to the input directory, or `line-N` (or the
    /// line's `"id"` field).
    pub id: String,
    /// Where it comes from.
    pub source: Source,
}

/// An item's content, read and checked.
pub struct Loaded {
    /// `sha256:<hex>` of the raw bytes.
    pub digest: String,
    /// The text (UTF-8, not empty), or why it cannot be used.
    pub text: Result<String, String>,
}

/// List the items of `input`.
pub fn discover(input: &Path) -> Result<Vec<Item>, BatchError> {
    let meta = std::fs::metadata(input).map_err(|e| BatchError::Input {
        path: input.to_path_buf(),
        reason: e.to_string(),
    })?;
    if meta.is_dir() {
        let mut files = Vec::new();
        walk(input, input, &mut files)?;
        files.sort();
        Ok(files
            .into_iter()
            .map(|(id, path)| Item {
                id,
                source: Source::File(path),
            })
            .collect())
    } else {
        let data = std::fs::read(input).map_err(|e| BatchError::Input {
            path: input.to_path_buf(),
            reason: e.to_string(),
        })?;
        jsonl_items(&data).map_err(|reason| BatchError::Input {
            path: input.to_path_buf(),
            reason,
        })
    }
}

/// The items of a JSONL file's bytes: one per non-blank line, named by its `"id"` (a
/// string of at most 200 bytes, or a number) or `line-N`; duplicate ids are refused.
pub fn jsonl_items(data: &[u8]) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let id = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| match &v["id"] {
                serde_json::Value::String(s) if !s.is_empty() && s.len() <= 200 => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| format!("line-{}", i + 1));
        items.push(Item {
            id,
            source: Source::Line(i + 1, line.to_vec()),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for it in &items {
        if !seen.insert(it.id.as_str()) {
            return Err(format!(
                "two lines have the id {:?}; ids must be unique",
                it.id
            ));
        }
    }
    Ok(items)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), BatchError> {
    let entries = std::fs::read_dir(dir).map_err(|e| BatchError::Input {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| BatchError::Input {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue; // not representable as an id; see the README
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| BatchError::Input {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("md" | "txt")
        ) {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, path));
        }
    }
    Ok(())
}

/// Read an item and check it is usable text. `field` picks the text of a JSON line.
pub fn load(item: &Item, field: &str) -> Loaded {
    let raw = match &item.source {
        Source::File(p) => read_limited(p),
        Source::Line(_, bytes) => Ok(bytes.clone()),
    };
    let raw = match raw {
        Ok(r) => r,
        Err(reason) => {
            return Loaded {
                digest: String::new(),
                text: Err(reason),
            };
        }
    };
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&raw)));
    let text = match &item.source {
        Source::File(_) => text_of(&raw),
        Source::Line(..) => line_text(&raw, field),
    };
    Loaded { digest, text }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut raw = Vec::new();
    f.take(MAX_ITEM_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if raw.len() as u64 > MAX_ITEM_BYTES {
        return Err(format!(
            "the file is larger than {} MiB; split it",
            MAX_ITEM_BYTES >> 20
        ));
    }
    Ok(raw)
}

/// A note file's text: UTF-8 without NULs, BOM removed, not blank.
pub fn text_of(raw: &[u8]) -> Result<String, String> {
    if raw.contains(&0) {
        return Err("binary file (it contains NUL bytes), not a text note".into());
    }
    let text = std::str::from_utf8(raw).map_err(|e| {
        format!(
            "not valid UTF-8 (first bad byte at offset {}); convert the note to UTF-8",
            e.valid_up_to()
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err("empty note: nothing to process".into());
    }
    Ok(text.to_string())
}

/// A JSONL line's text: the line itself when it is a JSON string, else its `field`.
pub fn line_text(raw: &[u8], field: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| format!("not a JSON value: {e}"))?;
    let text = match &v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => match o.get(field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => return Err(format!("the line has no string field {field:?}")),
        },
        _ => {
            return Err(format!(
                "the line is neither a string nor an object with {field:?}"
            ));
        }
    };
    if text.trim().is_empty() {
        return Err(format!("{field:?} is empty: nothing to process"));
    }
    Ok(text)
}
