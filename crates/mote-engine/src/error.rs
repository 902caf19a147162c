//! The engine's error type: what failed, and what the caller can do about it.

use mote_store::StoreError;

/// Errors of `mote-engine`.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Opening or verifying the model in the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller's input is unusable (empty text, wrong shape, corrupt image, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// The model cannot be run by any backend of this build.
    #[error("{0}")]
    Unsupported(String),
    /// The model's files are inconsistent with its settings.
    #[error("the model is unusable: {0}")]
    Model(String),
    /// The backend failed while running.
    #[error("inference failed: {0}")]
    Backend(String),
}

impl EngineError {
    /// An input error.
    pub fn input(msg: impl Into<String>) -> Self {
        EngineError::Input(msg.into())
    }

    /// True when the caller's input is at fault (HTTP 400 rather than 500).
    pub fn is_input_error(&self) -> bool {
        matches!(self, EngineError::Input(_))
    }

    /// The same error again, for another caller that shares it (one batch failing for
    /// several requests); a store error becomes a model error with its message.
    pub fn duplicate(&self) -> EngineError {
        match self {
            EngineError::Store(e) => EngineError::Model(e.to_string()),
            EngineError::Input(m) => EngineError::Input(m.clone()),
            EngineError::Unsupported(m) => EngineError::Unsupported(m.clone()),
            EngineError::Model(m) => EngineError::Model(m.clone()),
            EngineError::Backend(m) => EngineError::Backend(m.clone()),
        }
    }
}

/// The message of a caught panic's payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Shorthand for results of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
