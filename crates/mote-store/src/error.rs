//! The store's error type. Every message says what failed and what the user can do.

use std::io;
use std::path::PathBuf;

use crate::digest::{Digest, DigestParseError};
use crate::formats::{gguf::GgufError, safetensors::SafetensorsError};
use crate::reference::ReferenceError;
use crate::settings::UnknownTask;

/// Errors of `mote-store`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot read".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A reference that does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A digest that does not parse.
    #[error(transparent)]
    Digest(#[from] DigestParseError),
    /// An unknown task name.
    #[error(transparent)]
    Task(#[from] UnknownTask),
    /// Nothing in the store matches the reference.
    #[error(
        "no model {reference} in the store at {store}; `mote ls` lists the models, `mote import` adds one"
    )]
    NotFound {
        /// The reference as given.
        reference: String,
        /// The store root.
        store: PathBuf,
    },
    /// A digest prefix matching several models.
    #[error("the digest prefix {prefix} matches {count} models; give more hex digits")]
    Ambiguous {
        /// The prefix.
        prefix: String,
        /// How many models match.
        count: usize,
    },
    /// A blob's content does not match its digest.
    #[error(
        "model {model} is corrupt: {file} should have digest {expected} but has {actual}; the store was not changed; re-import the model from its source (or restore the blob) and run `mote verify` again"
    )]
    Corrupt {
        /// The model (reference and digest).
        model: String,
        /// The file inside the model (or "manifest"/"config").
        file: String,
        /// The digest the manifest names.
        expected: Digest,
        /// The digest of the bytes on disk.
        actual: Digest,
    },
    /// A blob the model needs is missing.
    #[error(
        "model {model} is incomplete: {file} (blob {digest}) is missing from the store; re-import the model from its source"
    )]
    MissingBlob {
        /// The model.
        model: String,
        /// The file inside the model.
        file: String,
        /// Its digest.
        digest: Digest,
    },
    /// The source given to `import` is not usable.
    #[error("cannot import {path}: {reason}")]
    Import {
        /// The source path.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A GGUF file that does not parse.
    #[error("cannot import {path}: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: GgufError,
    },
    /// A safetensors file that does not parse.
    #[error("cannot import {path}: {source}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: SafetensorsError,
    },
    /// The store's own files are malformed.
    #[error("the store at {path} is damaged: {reason}")]
    Damaged {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The journal's hash chain is broken.
    #[error(
        "journal entry {line} of {path} is broken: {reason}; the journal was edited or damaged after it was written"
    )]
    JournalBroken {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What does not match.
        reason: String,
    },
    /// A rollback with nothing to roll back to.
    #[error("cannot roll back {tag}: {reason}")]
    Rollback {
        /// The tag.
        tag: String,
        /// Why.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attach a path and an action to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            action,
            path: path.into(),
            source,
        })
    }
}
