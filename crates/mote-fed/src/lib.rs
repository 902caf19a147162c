//! `mote-fed`: federated learning on CPU clients.
//!
//! A [`coordinator`] serves the gRPC protocol in `proto/mote_fed.proto`, runs rounds (client
//! sampling, deadlines, minimum participation), aggregates updates with a [`strategy`],
//! commits every aggregated model to the store as a new artifact whose provenance names its
//! parent, and checkpoints after each round so a killed coordinator resumes the same run.
//! [`client`]s pull tasks, train with `mote_engine::train` on their private data, and send
//! [`compress`]ed updates. [`simulate`] runs N clients as tasks in one process against a real
//! coordinator on loopback. [`dp`] clips updates and accounts for the noise the coordinator
//! adds.

#![deny(missing_docs)]

pub mod chunks;
pub mod client;
pub mod compress;
pub mod config;
pub mod coordinator;
pub mod dp;
#[cfg(test)]
mod dp_noise_tests;
mod error;
pub mod partition;
pub mod secagg;
pub mod simulate;
pub mod strategy;
pub mod tls;

pub use config::RunConfig;
pub use error::{FedError, Result};

/// The wire protocol's version; every message carries it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Generated gRPC types and stubs.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("mote.fed.v1");
}

/// A 64-bit seed derived from a run seed and labels (round, node id, purpose).
pub fn derive_seed(seed: u64, parts: &[&[u8]]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}
