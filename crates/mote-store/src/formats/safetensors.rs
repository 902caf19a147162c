//! A validating reader for safetensors headers (the 8-byte length and the JSON table).
//!
//! The import path only needs the tensor table (to count parameters, find the precision and
//! reject a truncated file early); the engine maps the data itself.

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde::Deserialize;

/// Largest header accepted (the reference implementation's limit).
pub const MAX_HEADER: u64 = 100 << 20;

/// Why a safetensors header cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// I/O failure.
    #[error("reading the safetensors file failed: {0}")]
    Io(#[from] io::Error),
    /// The file ends inside the header or inside tensor data.
    #[error(
        "the safetensors file is truncated: {0}; the file was probably cut short while copying"
    )]
    Truncated(String),
    /// Structurally invalid.
    #[error("the safetensors header is invalid: {0}")]
    Invalid(String),
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TensorEntry {
    /// Element type, e.g. `F32`, `F16`, `BF16`, `I8`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// `[start, end)` relative to the data section.
    pub data_offsets: [u64; 2],
}

/// A parsed, validated header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Length of the JSON header in bytes (data starts at `8 + header_len`).
    pub header_len: u64,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The free-form `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

/// A tensor to write with [`write`].
#[derive(Clone, Debug)]
pub struct OutTensor {
    /// Element type, e.g. `F32`, `I8`.
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<u64>,
    /// Little-endian element bytes.
    pub bytes: Vec<u8>,
}

/// Serialise tensors as a safetensors file: header padded to 8 bytes, data in name order,
/// so the same tensors always give the same bytes.
pub fn write(
    tensors: &BTreeMap<String, OutTensor>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut offset = 0u64;
    for (name, t) in tensors {
        let end = offset + t.bytes.len() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).expect("header serialises");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut file = Vec::with_capacity(8 + json.len() + offset as usize);
    file.extend_from_slice(&(json.len() as u64).to_le_bytes());
    file.extend_from_slice(&json);
    for t in tensors.values() {
        file.extend_from_slice(&t.bytes);
    }
    file
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

impl Header {
    /// Read and validate the header of a file of `file_len` bytes.
    pub fn read(mut reader: impl Read, file_len: u64) -> Result<Self, SafetensorsError> {
        let mut len = [0u8; 8];
        read_exact(&mut reader, &mut len, "the header length")?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER {
            return Err(SafetensorsError::Invalid(format!(
                "header length {header_len} exceeds the {MAX_HEADER}-byte limit"
            )));
        }
        if 8 + header_len > file_len {
            return Err(SafetensorsError::Truncated(format!(
                "the header claims {header_len} bytes but the file has {file_len}"
            )));
        }
        let mut json = vec![0u8; header_len as usize];
        read_exact(&mut reader, &mut json, "the JSON header")?;
        let raw: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&json).map_err(|e| {
                SafetensorsError::Invalid(format!("the JSON header does not parse: {e}"))
            })?;
        let data_len = file_len - 8 - header_len;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value).map_err(|e| {
                    SafetensorsError::Invalid(format!("__metadata__ is not a string map: {e}"))
                })?;
                continue;
            }
            let t: TensorEntry = serde_json::from_value(value).map_err(|e| {
                SafetensorsError::Invalid(format!("tensor {name:?} has a malformed entry: {e}"))
            })?;
            let size = dtype_size(&t.dtype).ok_or_else(|| {
                SafetensorsError::Invalid(format!(
                    "tensor {name:?} has unknown dtype {:?}",
                    t.dtype
                ))
            })?;
            let bytes = t
                .shape
                .iter()
                .try_fold(size, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    SafetensorsError::Invalid(format!("tensor {name:?}: shape overflows"))
                })?;
            let [start, end] = t.data_offsets;
            if end < start || end - start != bytes {
                return Err(SafetensorsError::Invalid(format!(
                    "tensor {name:?}: offsets {start}..{end} do not match its {bytes}-byte shape"
                )));
            }
            if end > data_len {
                return Err(SafetensorsError::Truncated(format!(
                    "tensor {name:?} ends at byte {end} of a {data_len}-byte data section"
                )));
            }
            tensors.insert(name, t);
        }
        Ok(Header {
            header_len,
            tensors,
            metadata,
        })
    }

    /// Total number of elements over all tensors.
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| t.shape.iter().product::<u64>())
            .sum()
    }

    /// The dtype holding most elements (e.g. `F32`).
    pub fn dominant_dtype(&self) -> Option<&str> {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for t in self.tensors.values() {
            *counts.entry(&t.dtype).or_default() += t.shape.iter().product::<u64>();
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), SafetensorsError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            SafetensorsError::Truncated(format!("it ends inside {what}"))
        }
        _ => SafetensorsError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Vec<u8> {
        let header = br#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend(header);
        f.extend([0u8; 16]);
        f
    }

    #[test]
    fn reads_valid() {
        let f = tiny();
        let h = Header::read(&f[..], f.len() as u64).unwrap();
        assert_eq!(h.parameter_count(), 4);
        assert_eq!(h.dominant_dtype(), Some("F32"));
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let f = tiny();
        for cut in 0..f.len() {
            assert!(Header::read(&f[..cut], cut as u64).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn absurd_header_length_is_refused() {
        let mut f = tiny();
        f[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Header::read(&f[..], f.len() as u64).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
}
