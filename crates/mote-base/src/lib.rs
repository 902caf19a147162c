//! `mote-base`: the one implementation of each small thing the other crates share, so
//! that there is one way to do it (and one definition of it) in the whole workspace.
//! - [`fs::write_atomic`]: temp file → fsync → rename → fsync of the directory.
//! - [`stats::percentile_sorted`]: the nearest-rank percentile every report quotes.
//! - [`rng::SplitMix64`]: the seeded generator whose stream never changes between versions
//!   (for reproducible inputs and schedules; never for secrets — those come from the OS).
//! - [`jsonl`]: the JSON-lines reader (one value per line, blank lines skipped, errors
//!   naming the line).
//!
//! It depends on no other mote crate.

#![deny(missing_docs)]

pub mod fs;
pub mod jsonl;
pub mod rng;
pub mod stats;
