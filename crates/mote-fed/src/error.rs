//! The crate's error type.

/// What can go wrong in a federated run.
#[derive(Debug, thiserror::Error)]
pub enum FedError {
    /// The run configuration is unusable.
    #[error("federated run configuration: {0}")]
    Config(String),
    /// Training or evaluation failed.
    #[error(transparent)]
    Engine(#[from] mote_engine::EngineError),
    /// The model store refused an operation.
    #[error(transparent)]
    Store(#[from] mote_store::StoreError),
    /// The peer broke the protocol or sent damaged data.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A gRPC call failed.
    #[error("the coordinator call failed: {0}")]
    Rpc(#[from] tonic::Status),
    /// Connecting to the coordinator failed.
    #[error(
        "cannot reach the coordinator at {url}: {reason}; is `mote fed coordinator` running there?"
    )]
    Connect {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Secure aggregation could not recover the sum.
    #[error("secure aggregation: {0}")]
    SecAgg(String),
}

/// Result with [`FedError`].
pub type Result<T, E = FedError> = std::result::Result<T, E>;
