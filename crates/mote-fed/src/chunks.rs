//! Content-addressed chunks: payloads (models, updates) travel as pieces named by their
//! SHA-256, so a resent or duplicated chunk is harmless and a damaged one is detected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::error::{FedError, Result};

/// Largest chunk sent or accepted.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Most chunk bytes a coordinator holds for updates not yet submitted.
pub const MAX_PENDING_BYTES: usize = 1 << 30;

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Split a payload into chunks with their digests.
pub fn split(payload: &[u8]) -> Vec<(String, Arc<Vec<u8>>)> {
    if payload.is_empty() {
        return vec![(digest(&[]), Arc::new(Vec::new()))];
    }
    payload
        .chunks(CHUNK_BYTES)
        .map(|c| (digest(c), Arc::new(c.to_vec())))
        .collect()
}

/// Chunks by digest, whether each was uploaded by a peer (vs. made here), total bytes.
type Table = HashMap<String, (Arc<Vec<u8>>, bool)>;

/// A thread-safe chunk table with a byte budget.
#[derive(Default)]
pub struct ChunkTable {
    /// Chunks by digest, and their total size.
    inner: Mutex<(Table, usize)>,
}

impl ChunkTable {
    /// Add an uploaded chunk after checking its digest; adding one already present is a
    /// no-op (two peers may upload identical bytes). Uploaded chunks stay until
    /// [`ChunkTable::clear_uploads`].
    pub fn put(&self, digest_str: &str, data: Vec<u8>) -> Result<()> {
        if data.len() > CHUNK_BYTES {
            return Err(FedError::Protocol(format!(
                "chunk of {} bytes exceeds the {CHUNK_BYTES}-byte limit",
                data.len()
            )));
        }
        if digest(&data) != digest_str {
            return Err(FedError::Protocol(format!(
                "chunk content does not match its digest {digest_str}; resend it"
            )));
        }
        let mut g = self.inner.lock().expect("chunk table");
        if g.0.contains_key(digest_str) {
            return Ok(());
        }
        if g.1 + data.len() > MAX_PENDING_BYTES {
            return Err(FedError::Protocol(
                "the coordinator holds too many pending chunks; retry later".into(),
            ));
        }
        g.1 += data.len();
        g.0.insert(digest_str.to_string(), (Arc::new(data), true));
        Ok(())
    }

    /// Add chunks made by [`split`] (trusted: made here).
    pub fn put_own(&self, chunks: &[(String, Arc<Vec<u8>>)]) {
        let mut g = self.inner.lock().expect("chunk table");
        for (d, c) in chunks {
            if g.0.insert(d.clone(), (c.clone(), false)).is_none() {
                g.1 += c.len();
            }
        }
    }

    /// A chunk by digest.
    pub fn get(&self, digest: &str) -> Option<Arc<Vec<u8>>> {
        self.inner
            .lock()
            .expect("chunk table")
            .0
            .get(digest)
            .map(|c| c.0.clone())
    }

    /// Concatenate chunks in order (each must be present), up to `limit` bytes.
    pub fn assemble(&self, digests: &[String], limit: usize) -> Result<Vec<u8>> {
        let g = self.inner.lock().expect("chunk table");
        let mut out = Vec::new();
        for d in digests {
            let c =
                g.0.get(d)
                    .ok_or_else(|| FedError::Protocol(format!("chunk {d} was never uploaded")))?;
            if out.len() + c.0.len() > limit {
                return Err(FedError::Protocol(format!(
                    "the payload exceeds {limit} bytes"
                )));
            }
            out.extend_from_slice(&c.0);
        }
        Ok(out)
    }

    /// Drop chunks.
    pub fn remove(&self, digests: &[String]) {
        let mut g = self.inner.lock().expect("chunk table");
        for d in digests {
            if let Some(c) = g.0.remove(d) {
                g.1 -= c.0.len();
            }
        }
    }

    /// Drop every uploaded chunk (when a round closes).
    pub fn clear_uploads(&self) {
        let mut g = self.inner.lock().expect("chunk table");
        let (table, bytes) = &mut *g;
        table.retain(|_, (c, uploaded)| {
            if *uploaded {
                *bytes -= c.len();
            }
            !*uploaded
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_checked_and_idempotent() {
        let t = ChunkTable::default();
        let payload: Vec<u8> = (0..(CHUNK_BYTES + 10)).map(|i| i as u8).collect();
        let parts = split(&payload);
        assert_eq!(parts.len(), 2);
        for (d, c) in &parts {
            t.put(d, c.to_vec()).unwrap();
            t.put(d, c.to_vec()).unwrap();
        }
        let ds: Vec<String> = parts.iter().map(|p| p.0.clone()).collect();
        assert_eq!(t.assemble(&ds, usize::MAX).unwrap(), payload);
        assert!(t.assemble(&ds, 100).is_err());
        assert!(
            t.put(&ds[0], vec![1, 2, 3])
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
        t.remove(&ds);
        assert!(
            t.assemble(&ds, usize::MAX)
                .unwrap_err()
                .to_string()
                .contains("never uploaded")
        );
    }
}
