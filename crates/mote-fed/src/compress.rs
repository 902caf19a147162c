//! Update compression: top-k sparsification and int8 quantisation, with error feedback.
//!
//! Wire format of an encoded update (little-endian), which the coordinator parses as
//! untrusted input:
//!
//! ```text
//! "MFU1"  flags:u8 (1 = int8 values, 2 = sparse)  len:u32  nnz:u32
//! sparse: nnz indices as LEB128 gaps (first index, then differences − 1)
//! values: f32 × nnz, or per block of 256: scale:f32 then i8 × (≤ 256)
//! ```
//!
//! Quantisation rounds half to even against a per-block scale `max|v| / 127`; top-k keeps the
//! `k` largest magnitudes, ties broken by the lower index, so encoding is deterministic.

use crate::config::CompressionConfig;
use crate::error::{FedError, Result};

const MAGIC: &[u8; 4] = b"MFU1";
const INT8: u8 = 1;
const SPARSE: u8 = 2;
const BLOCK: usize = 256;

/// Encode `update` (length `d`).
pub fn encode(update: &[f32], cfg: &CompressionConfig) -> Vec<u8> {
    let d = update.len();
    let sparse = cfg.top_k > 0.0 && cfg.top_k < 1.0;
    let indices: Vec<usize> = if sparse {
        let k = ((cfg.top_k * d as f64).ceil() as usize).clamp(1, d.max(1));
        let mut idx: Vec<usize> = (0..d).collect();
        let key = |&i: &usize| (std::cmp::Reverse(update[i].abs().to_bits()), i);
        if k < d {
            idx.select_nth_unstable_by_key(k, key);
            idx.truncate(k);
        }
        idx.sort_unstable();
        idx
    } else {
        (0..d).collect()
    };
    let values: Vec<f32> = indices.iter().map(|&i| update[i]).collect();
    let mut out = Vec::with_capacity(13 + values.len() * 2);
    out.extend_from_slice(MAGIC);
    out.push(if cfg.int8 { INT8 } else { 0 } | if sparse { SPARSE } else { 0 });
    out.extend_from_slice(&(d as u32).to_le_bytes());
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    if sparse {
        let mut prev: Option<usize> = None;
        for &i in &indices {
            let gap = match prev {
                None => i,
                Some(p) => i - p - 1,
            };
            leb128(&mut out, gap as u64);
            prev = Some(i);
        }
    }
    if cfg.int8 {
        for block in values.chunks(BLOCK) {
            let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
            out.extend_from_slice(&scale.to_le_bytes());
            for v in block {
                let q = if scale > 0.0 {
                    (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8
                } else {
                    0
                };
                out.push(q as u8);
            }
        }
    } else {
        for v in &values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn bad(why: impl Into<String>) -> FedError {
    FedError::Protocol(format!("damaged update: {}", why.into()))
}

/// Decode an update that must have `d` values; anything malformed is refused.
pub fn decode(bytes: &[u8], d: usize) -> Result<Vec<f32>> {
    let mut r = Reader { b: bytes, at: 0 };
    if r.take(4)? != MAGIC {
        return Err(bad("wrong magic (not a mote update)"));
    }
    let flags = r.take(1)?[0];
    if flags & !(INT8 | SPARSE) != 0 {
        return Err(bad(format!("unknown flags {flags:#x}")));
    }
    let len = r.u32()? as usize;
    let nnz = r.u32()? as usize;
    if len != d {
        return Err(bad(format!("{len} values, the model has {d}")));
    }
    if nnz > d || (flags & SPARSE == 0 && nnz != d) {
        return Err(bad(format!("{nnz} stored values for {d} coordinates")));
    }
    let indices: Vec<usize> = if flags & SPARSE != 0 {
        let mut idx = Vec::with_capacity(nnz);
        let mut next = 0u64;
        for _ in 0..nnz {
            let i = next
                .checked_add(r.leb128()?)
                .filter(|&i| i < d as u64)
                .ok_or_else(|| bad("a sparse index is out of range"))?;
            idx.push(i as usize);
            next = i + 1;
        }
        idx
    } else {
        (0..d).collect()
    };
    let mut values = Vec::with_capacity(nnz);
    if flags & INT8 != 0 {
        while values.len() < nnz {
            let n = (nnz - values.len()).min(BLOCK);
            let scale = f32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"));
            if !(scale.is_finite() && scale >= 0.0) {
                return Err(bad("a block scale is negative or not finite"));
            }
            values.extend(r.take(n)?.iter().map(|&q| q as i8 as f32 * scale));
        }
    } else {
        for _ in 0..nnz {
            let v = f32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"));
            if !v.is_finite() {
                return Err(bad("a value is not finite"));
            }
            values.push(v);
        }
    }
    if r.at != bytes.len() {
        return Err(bad(format!("{} trailing bytes", bytes.len() - r.at)));
    }
    let mut out = vec![0.0f32; d];
    for (i, v) in indices.into_iter().zip(values) {
        out[i] = v;
    }
    Ok(out)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn leb128(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("an index gap is too long"))
    }
}

/// A client's compressor: adds the residual of earlier rounds (error feedback) before
/// encoding and keeps what the encoding lost.
#[derive(Clone, Debug, Default)]
pub struct Compressor {
    /// What compression dropped so far.
    pub residual: Vec<f32>,
}

impl Compressor {
    /// Encode `update` (+ residual when error feedback is on); returns the bytes to send.
    pub fn compress(&mut self, update: &[f32], cfg: &CompressionConfig) -> Vec<u8> {
        let mut u = update.to_vec();
        if cfg.error_feedback && self.residual.len() == u.len() {
            u.iter_mut().zip(&self.residual).for_each(|(a, r)| *a += r);
        }
        let bytes = encode(&u, cfg);
        if cfg.error_feedback {
            let sent = decode(&bytes, u.len()).expect("own encoding decodes");
            self.residual = u.iter().zip(&sent).map(|(a, s)| a - s).collect();
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(int8: bool, top_k: f64) -> CompressionConfig {
        CompressionConfig {
            int8,
            top_k,
            error_feedback: true,
        }
    }

    proptest! {
        #[test]
        fn roundtrip_within_quantisation_error(v in prop::collection::vec(-10.0f32..10.0, 1..700), int8: bool, k in prop::sample::select(vec![0.0, 0.05, 0.3, 1.0])) {
            let c = cfg(int8, k);
            let bytes = encode(&v, &c);
            let back = decode(&bytes, v.len()).unwrap();
            let kept = back.iter().filter(|x| **x != 0.0).count();
            if k > 0.0 && k < 1.0 {
                prop_assert!(kept <= (k * v.len() as f64).ceil() as usize);
            }
            for (i, (a, b)) in v.iter().zip(&back).enumerate() {
                if *b == 0.0 { continue; }
                let block_max = 10.0f32;
                let tol = if int8 { block_max / 127.0 * 0.5 + 1e-6 } else { 0.0 };
                prop_assert!((a - b).abs() <= tol, "{i}: {a} vs {b}");
            }
            // Every dropped coordinate is no larger than every kept one.
            let min_kept = v.iter().zip(&back).filter(|(_, b)| **b != 0.0).map(|(a, _)| a.abs()).fold(f32::INFINITY, f32::min);
            let max_dropped = v.iter().zip(&back).filter(|(_, b)| **b == 0.0).map(|(a, _)| a.abs()).fold(0.0, f32::max);
            if !int8 { prop_assert!(max_dropped <= min_kept || kept == 0); }
        }

        /// Damaged bytes are refused or decode to something of the right length, never panic.
        #[test]
        fn damaged_bytes_never_panic(v in prop::collection::vec(-1.0f32..1.0, 1..100), cut in 0usize..2000, flip in 0usize..2000, x: u8) {
            let mut bytes = encode(&v, &cfg(true, 0.2));
            if !bytes.is_empty() { let i = flip % bytes.len(); bytes[i] ^= x; }
            bytes.truncate(cut.min(bytes.len()));
            if let Ok(d) = decode(&bytes, v.len()) { prop_assert_eq!(d.len(), v.len()); }
        }
    }

    #[test]
    fn sizes_shrink_and_error_feedback_catches_up() {
        let d = 2410;
        let v: Vec<f32> = (0..d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let dense = encode(&v, &cfg(false, 0.0)).len();
        let small = encode(&v, &cfg(true, 0.1)).len();
        assert!(dense as f64 / small as f64 > 10.0, "{dense} vs {small}");
        // With error feedback the sum of what was sent over many rounds tracks the sum of
        // the updates: the residual stays bounded instead of growing.
        let mut c = Compressor::default();
        let mut sent = vec![0.0f32; d];
        for _ in 0..50 {
            let b = c.compress(&v, &cfg(true, 0.1));
            let s = decode(&b, d).unwrap();
            sent.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
        }
        let err: f32 = sent
            .iter()
            .zip(&v)
            .map(|(s, v)| (s - 50.0 * v).abs())
            .fold(0.0, f32::max);
        assert!(err < 12.0, "{err}");
        assert!(decode(b"MFU1\x00\x05\0\0\0", 5).is_err());
        assert!(
            decode(&encode(&v, &cfg(false, 0.0)), d + 1)
                .unwrap_err()
                .to_string()
                .contains("model has")
        );
    }
}
