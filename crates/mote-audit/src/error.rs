//! Why an audit could not run (as opposed to an audit that ran and found a failure, which
//! is a [`crate::Report`] with `passed = false`).

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The policy file is unreadable or invalid.
    #[error("policy {path}: {reason}")]
    Policy {
        /// The policy file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An input or reference file named by the policy is unusable.
    #[error("{path}: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The audit cannot be run as asked (e.g. a scenario the target cannot do).
    #[error("{0}")]
    Setup(String),
    /// The model could not be opened or run.
    #[error(transparent)]
    Engine(#[from] mote_engine::EngineError),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] mote_store::StoreError),
    /// A report file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result with [`AuditError`].
pub type Result<T> = std::result::Result<T, AuditError>;
