//! The hash-chained, append-only journal (`journal.jsonl` in the store root).
//!
//! Each line is one JSON object whose last member is `"hash":"sha256:…"`, the SHA-256 of the
//! line without that member; the `prev` member of the next line repeats it. Editing, removing
//! or reordering any line breaks the chain at that line, and [`Journal::verify`] names it.
//! (An attacker who rewrites the whole tail consistently is not detected by the chain alone:
//! anchor the head hash elsewhere — e.g. in an audit report — when that matters.)
//!
//! Tag moves are written here *before* `index.json` is rewritten, so the journal is the
//! authority on tags and the index is a view of it that can be rebuilt by replay.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};

/// The `prev` of the first entry.
pub const GENESIS: Digest = Digest::from_bytes([0u8; 32]);

const HASH_SUFFIX_LEN: usize = ",\"hash\":\"sha256:\"}".len() + 64;

/// Why a tag moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagReason {
    /// `mote import --name`.
    Import,
    /// `mote tag`.
    Tag,
    /// `mote rollback`.
    Rollback,
    /// A derived artifact committed by mote (quantisation, federated round, ...).
    Commit,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    /// A model manifest entered the index.
    Import {
        /// Manifest digest.
        digest: Digest,
        /// Manifest size in bytes.
        size: u64,
        /// Manifest artifact type.
        artifact_type: String,
        /// The source as the user gave it (informational; not part of the digest).
        source: String,
        /// For referrers (audit reports, ...): the model manifest the artifact is about.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<Digest>,
    },
    /// A tag now points at `to`.
    Tag {
        /// `name:tag`.
        tag: String,
        /// Previous digest, if the tag existed.
        from: Option<Digest>,
        /// New digest.
        to: Digest,
        /// Why.
        reason: TagReason,
    },
    /// A tag was removed.
    Untag {
        /// `name:tag`.
        tag: String,
        /// The digest it pointed to.
        from: Digest,
    },
    /// A model manifest left the index (its blobs go at the next `gc`).
    Remove {
        /// Manifest digest.
        digest: Digest,
    },
    /// Unreferenced blobs were deleted.
    Gc {
        /// Number of blobs deleted.
        blobs: u64,
        /// Bytes freed.
        bytes: u64,
    },
    /// Anything another component records against a model (server start, audit, round).
    Record {
        /// Kind, e.g. `serve-start`, `audit`, `fed-round`.
        kind: String,
        /// The model digest it concerns.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<Digest>,
        /// Free-form details.
        #[serde(default)]
        detail: serde_json::Value,
    },
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// 1-based sequence number.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// User who ran the command.
    pub user: String,
    /// Host it ran on.
    pub host: String,
    /// What happened.
    pub event: Event,
    /// Hash of the previous entry ([`GENESIS`] for the first).
    pub prev: Digest,
    /// Hash of this entry without this member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<Digest>,
}

/// The journal file of a store.
#[derive(Clone, Debug)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub(crate) fn new(path: PathBuf) -> Self {
        Journal { path }
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read every entry, checking the whole chain. The first broken line is an error.
    pub fn verify(&self) -> Result<Vec<Entry>> {
        self.read_entries()
    }

    /// Read every entry (the chain is checked as it is read).
    pub fn entries(&self) -> Result<Vec<Entry>> {
        self.read_entries()
    }

    fn read_entries(&self) -> Result<Vec<Entry>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).at("cannot open the journal", &self.path),
        };
        let mut out: Vec<Entry> = Vec::new();
        let mut prev = GENESIS;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.at("cannot read the journal", &self.path)?;
            let broken = |reason: String| StoreError::JournalBroken {
                path: self.path.clone(),
                line: i + 1,
                reason,
            };
            let entry = parse_line(&line).map_err(broken)?;
            if entry.prev != prev {
                return Err(broken(format!(
                    "its prev hash {} does not match the hash {prev} of the entry before it",
                    entry.prev
                )));
            }
            let expected_seq = out.len() as u64 + 1;
            if entry.seq != expected_seq {
                return Err(broken(format!(
                    "its sequence number is {} where {expected_seq} was expected",
                    entry.seq
                )));
            }
            prev = entry.hash.expect("parse_line sets the hash");
            out.push(entry);
        }
        Ok(out)
    }

    /// Append one event. The caller holds the store's index lock. Returns the new entry.
    pub(crate) fn append(&self, last: Option<&Entry>, event: Event) -> Result<Entry> {
        let mut entry = Entry {
            seq: last.map_or(1, |e| e.seq + 1),
            time: now_rfc3339(),
            user: whoami(),
            host: hostname(),
            event,
            prev: last.map_or(GENESIS, |e| e.hash.expect("read entries carry their hash")),
            hash: None,
        };
        let body = serde_json::to_string(&entry).expect("journal entries serialise");
        let hash = Digest::of(body.as_bytes());
        let mut line = body;
        line.pop(); // the closing brace
        line.push_str(&format!(",\"hash\":\"{hash}\"}}\n"));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .at("cannot open the journal", &self.path)?;
        // One write call: an interrupted process leaves a whole line or none.
        file.write_all(line.as_bytes())
            .at("cannot append to the journal", &self.path)?;
        file.sync_data().at("cannot sync the journal", &self.path)?;
        entry.hash = Some(hash);
        Ok(entry)
    }
}

/// Parse one journal line as `journal verify` does (for the fuzz target `store_files`):
/// `Ok` only for a line whose content hashes to its claimed digest.
#[doc(hidden)]
pub fn parse_untrusted_journal_line(line: &str) -> Result<(), String> {
    parse_line(line).map(|_| ())
}

fn parse_line(line: &str) -> Result<Entry, String> {
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.ends_with("\"}") {
        return Err("it does not end with its hash member".into());
    }
    let split = line.len() - HASH_SUFFIX_LEN;
    // A tampered line can put a multi-byte character across the split: not a hash member.
    let Some((body, suffix)) = line.split_at_checked(split) else {
        return Err("it does not end with its hash member".into());
    };
    let Some(hash) = suffix
        .strip_prefix(",\"hash\":\"")
        .and_then(|s| s.strip_suffix("\"}"))
    else {
        return Err("it does not end with its hash member".into());
    };
    let claimed: Digest = hash.parse().map_err(|e| format!("{e}"))?;
    let canonical = format!("{body}}}");
    let actual = Digest::of(canonical.as_bytes());
    if actual != claimed {
        return Err(format!(
            "its content hashes to {actual} but it claims {claimed}"
        ));
    }
    let mut entry: Entry =
        serde_json::from_str(&canonical).map_err(|e| format!("it is not a valid entry: {e}"))?;
    entry.hash = Some(claimed);
    Ok(entry)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

fn whoami() -> String {
    if let Ok(user) = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        return user;
    }
    // No login environment (services, CI): map our uid through /etc/passwd.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) {
            let name = std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|passwd| {
                    passwd.lines().find_map(|l| {
                        let mut f = l.split(':');
                        let name = f.next()?;
                        (f.nth(1)? == uid.to_string()).then(|| name.to_string())
                    })
                });
            return name.unwrap_or_else(|| format!("uid {uid}"));
        }
    }
    "unknown".into()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_with_a_multibyte_character_across_the_hash_split_is_refused_not_a_panic() {
        // The hash member is 84 bytes; put a 4-byte character across that boundary.
        let tail = format!("\u{1F600}{}\"}}", "x".repeat(HASH_SUFFIX_LEN - 4));
        let line = format!("{{\"seq\":1,\"a\":\"{tail}");
        assert!(!line.is_char_boundary(line.len() - HASH_SUFFIX_LEN));
        assert_eq!(
            parse_line(&line).unwrap_err(),
            "it does not end with its hash member"
        );
        for cut in 0..line.len() {
            if let Some(prefix) = line.get(..cut) {
                let _ = parse_line(prefix);
            }
        }
    }

    /// Every journal line parser on untrusted text (for the fuzz target).
    #[test]
    fn parse_untrusted_never_panics_on_odd_lines() {
        for l in ["", "}", "\"}", "{\"hash\":\"\"}", &"é".repeat(60)] {
            let _ = parse_untrusted_journal_line(l);
        }
    }

    fn sample(dir: &Path, n: usize) -> Journal {
        let j = Journal::new(dir.join("journal.jsonl"));
        let mut last = None;
        for i in 0..n {
            let e = j
                .append(
                    last.as_ref(),
                    Event::Gc {
                        blobs: i as u64,
                        bytes: 0,
                    },
                )
                .unwrap();
            last = Some(e);
        }
        j
    }

    #[test]
    fn chain_verifies_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let j = sample(dir.path(), 4);
        let entries = j.verify().unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].prev, GENESIS);
        assert_eq!(entries[3].prev, entries[2].hash.unwrap());
    }

    #[test]
    fn any_edit_names_the_edited_line() {
        let dir = tempfile::tempdir().unwrap();
        let j = sample(dir.path(), 5);
        let original = std::fs::read_to_string(j.path()).unwrap();
        for target in 0..5 {
            let mut lines: Vec<String> = original.lines().map(String::from).collect();
            lines[target] = lines[target].replacen("\"blobs\":", "\"blobs\":1", 1);
            std::fs::write(j.path(), lines.join("\n") + "\n").unwrap();
            match j.verify() {
                Err(StoreError::JournalBroken { line, .. }) => assert_eq!(line, target + 1),
                other => panic!("edit of line {} not detected: {other:?}", target + 1),
            }
        }
    }

    #[test]
    fn removed_line_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let j = sample(dir.path(), 3);
        let original = std::fs::read_to_string(j.path()).unwrap();
        let lines: Vec<&str> = original.lines().collect();
        std::fs::write(j.path(), format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        assert!(matches!(
            j.verify(),
            Err(StoreError::JournalBroken { line: 2, .. })
        ));
    }
}
