//! The job's journal: `journal.jsonl` in the output directory, one JSON record per line,
//! each appended and fsynced after the item's output is in place. A line torn by a crash is
//! cut off when the journal is next opened. The latest record of an item is its state.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::BatchError;

/// How an item ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Output written.
    Done,
    /// Not processed; `error` says why.
    Failed,
}

/// One item's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Item id (relative path or line id).
    pub item: String,
    /// `sha256:` of the input bytes (empty when the input could not be read).
    pub input_digest: String,
    /// Digest of the job's settings (model digest, task, prompts, limits).
    pub job: String,
    /// Outcome.
    pub status: Status,
    /// Output file, relative to the output directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// `sha256:` of the item's output (the file, or its line for embeddings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    /// Wall time of the item, ms.
    pub duration_ms: f64,
    /// Prompt tokens processed (generation) or tokens embedded.
    #[serde(default)]
    pub prompt_tokens: usize,
    /// Tokens generated.
    #[serde(default)]
    pub generated_tokens: usize,
    /// Generated tokens per second (generation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// How many chunks a long note was split into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<usize>,
    /// Peak resident memory of the process so far, KiB.
    #[serde(default)]
    pub peak_rss_kib: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// `true` when an output found in place (written just before a crash) was adopted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

/// The open journal.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Every record, in order.
    pub records: Vec<Record>,
}

/// The records of a journal's bytes, and how many bytes they span (a torn last line, one
/// without its newline, is left out).
pub fn parse(data: &[u8]) -> Result<(Vec<Record>, usize), String> {
    let good = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut records = Vec::new();
    for (n, line) in data[..good].split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let r: Record = serde_json::from_slice(line).map_err(|e| {
            format!(
                "line {} is not a journal record ({e}); the journal was edited or belongs to \
                 another tool — use a new --output directory",
                n + 1
            )
        })?;
        records.push(r);
    }
    Ok((records, good))
}

impl Journal {
    /// Open (or create) `dir/journal.jsonl`, dropping a torn last line.
    pub fn open(dir: &Path) -> Result<Journal, BatchError> {
        let path = dir.join("journal.jsonl");
        let io = |e: std::io::Error| BatchError::Io {
            path: path.clone(),
            source: e,
        };
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let (records, good) = parse(&data).map_err(|reason| BatchError::Journal {
            path: path.clone(),
            reason,
        })?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        if good < data.len() {
            // A crash tore the last line: cut it off so appends start on a line boundary.
            file.set_len(good as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(Journal {
            path,
            file,
            records,
        })
    }

    /// The latest record of every item.
    pub fn latest(&self) -> HashMap<&str, &Record> {
        let mut m = HashMap::new();
        for r in &self.records {
            m.insert(r.item.as_str(), r);
        }
        m
    }

    /// Append one record durably.
    pub fn append(&mut self, record: Record) -> Result<(), BatchError> {
        self.append_all(vec![record])
    }

    /// Append records durably, with one write and one fsync.
    pub fn append_all(&mut self, records: Vec<Record>) -> Result<(), BatchError> {
        let mut lines = Vec::new();
        for r in &records {
            lines.extend(serde_json::to_vec(r).expect("records serialise"));
            lines.push(b'\n');
        }
        let io = |e: std::io::Error| BatchError::Io {
            path: self.path.clone(),
            source: e,
        };
        self.file.write_all(&lines).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.records.extend(records);
        Ok(())
    }
}
