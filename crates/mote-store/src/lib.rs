//! `mote-store`: the immutable, content-addressed model store.
//!
//! A model enters mote once, as an OCI image-layout artifact (a ModelPack manifest with one
//! raw layer per file plus mote's settings), and is named from then on by its manifest
//! digest. Tags are the only mutable state; every tag move goes through the hash-chained
//! [`journal`], so `rollback` and `history` work and tampering is detected.
//!
//! The crate depends on nothing else of mote's. Only this crate writes a store.

#![deny(missing_docs)]

mod blobs;
pub mod digest;
mod error;
pub mod formats;
mod import;
pub mod journal;
pub mod oci;
pub mod reference;
pub mod settings;
mod store;

pub use digest::Digest;
pub use error::{Result, StoreError};
pub use import::ImportOptions;
pub use reference::{Reference, ReferenceError, TagRef};
pub use settings::{ImageSettings, Pooling, Provenance, Settings, Task, TextSettings};
pub use store::{
    ArtifactFile, GcReport, HistoryItem, ImportOutcome, ListedModel, MOTE_HOME, Mapped, ModelFile,
    ModelInfo, Referrer, Removed, Store, TagMove, VerifiedModel, VerifyOutcome,
};
