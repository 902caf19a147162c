//! A validating reader for GGUF (v2, v3) headers: metadata and tensor infos.
//!
//! GGUF files come from strangers, so every count and length is checked against the bytes
//! that can actually be there before anything is allocated, and every tensor's extent is
//! checked against the file size. The tensor data itself is not read here: the engine
//! memory-maps it from the store blob using [`TensorInfo::offset`] and [`Gguf::data_offset`].

use std::collections::BTreeMap;
use std::io::{self, Read};

/// Magic bytes at the start of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Largest key or string value accepted (bytes).
pub const MAX_STRING: u64 = 16 << 20;
/// Largest metadata array accepted (elements).
pub const MAX_ARRAY: u64 = 16 << 20;
/// Largest number of tensors or metadata entries accepted.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Deepest nesting of arrays accepted.
const MAX_DEPTH: u32 = 2;
/// Largest number of dimensions of a tensor.
pub const MAX_DIMS: u32 = 4;

/// Why a GGUF header cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// I/O failure other than running out of bytes.
    #[error("reading the GGUF file failed: {0}")]
    Io(#[from] io::Error),
    /// Not a GGUF file at all.
    #[error("not a GGUF file (the first bytes are {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    /// A version we do not read.
    #[error(
        "GGUF version {0} is not supported (mote reads versions 2 and 3); re-export the model with a current llama.cpp"
    )]
    Version(u32),
    /// The file ends inside the header.
    #[error(
        "the GGUF file is truncated: it ends inside {0}; the file was probably cut short while copying"
    )]
    Truncated(String),
    /// A count or size beyond the limits or beyond what the file can hold.
    #[error("the GGUF header is corrupt or hostile: {0}")]
    Limit(String),
    /// Structurally invalid content.
    #[error("the GGUF header is invalid: {0}")]
    Invalid(String),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `float32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// `string` (invalid UTF-8 replaced by U+FFFD)
    String(String),
    /// `array`
    Array(Vec<Value>),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float64`
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types, with their block geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

impl GgmlType {
    /// Decode the type id stored in the file.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => Bf16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | Bf16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 | Iq4Nl => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Mxfp4 => (32, 17),
            Q2K => (256, 84),
            Q3K | Iq3S => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            Iq2Xxs | Tq2_0 => (256, 66),
            Iq2Xs => (256, 74),
            Iq3Xxs => (256, 98),
            Iq1S => (256, 50),
            Iq2S => (256, 82),
            Iq4Xs => (256, 136),
            Iq1M => (256, 56),
            Tq1_0 => (256, 54),
        }
    }

    /// Lowercase name as llama.cpp prints it (`q4_1`, `f16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2K => "q2_k",
            Q3K => "q3_k",
            Q4K => "q4_k",
            Q5K => "q5_k",
            Q6K => "q6_k",
            Q8K => "q8_k",
            Iq2Xxs => "iq2_xxs",
            Iq2Xs => "iq2_xs",
            Iq3Xxs => "iq3_xxs",
            Iq1S => "iq1_s",
            Iq4Nl => "iq4_nl",
            Iq3S => "iq3_s",
            Iq2S => "iq2_s",
            Iq4Xs => "iq4_xs",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            Iq1M => "iq1_m",
            Bf16 => "bf16",
            Tq1_0 => "tq1_0",
            Tq2_0 => "tq2_0",
            Mxfp4 => "mxfp4",
        }
    }
}

/// One tensor's description.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to [`Gguf::data_offset`].
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed and validated GGUF header.
#[derive(Clone, Debug)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of tensor data.
    pub alignment: u64,
    /// Absolute file offset where tensor data starts.
    pub data_offset: u64,
}

impl Gguf {
    /// Parse the header from `reader`, given the total file length (used to bound every
    /// count and to check tensor extents).
    pub fn read(reader: impl Read, file_len: u64) -> Result<Self, GgufError> {
        let mut r = Cursor {
            inner: reader,
            pos: 0,
            len: file_len,
        };
        let mut magic = [0u8; 4];
        r.exact(&mut magic, &|| "the magic number".to_string())?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32(&|| "the version".to_string())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = r.u64(&|| "the tensor count".to_string())?;
        let n_kv = r.u64(&|| "the metadata count".to_string())?;
        // Each tensor info takes at least 8+4+8+4+8 bytes, each kv at least 8+4+1.
        for (what, n, min) in [("tensors", n_tensors, 32), ("metadata entries", n_kv, 13)] {
            if n > MAX_ENTRIES {
                return Err(GgufError::Limit(format!(
                    "it declares {n} {what} (limit {MAX_ENTRIES})"
                )));
            }
            if n.saturating_mul(min) > r.remaining() {
                return Err(GgufError::Truncated(format!(
                    "the header, which declares {n} {what} but has only {} bytes left",
                    r.remaining()
                )));
            }
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("the key of metadata entry {i}"))?;
            let key_s = short(&key);
            let ty = r.u32(&|| format!("the type of metadata {key_s}"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Invalid(format!(
                    "metadata key {key_s} appears twice"
                )));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(GgufError::Invalid(format!(
                        "general.alignment must be a power of two up to 65536, found {v:?}"
                    )));
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors.min(4096) as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("the name of tensor {i}"))?;
            let name_s = short(&name);
            let n_dims = r.u32(&|| format!("the rank of tensor {name_s}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Limit(format!(
                    "tensor {name_s} has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut elements: u64 = 1;
            for _ in 0..n_dims {
                let d = r.u64(&|| format!("the shape of tensor {name_s}"))?;
                elements = elements
                    .checked_mul(d)
                    .filter(|&e| e > 0 && e <= 1 << 42)
                    .ok_or_else(|| {
                        GgufError::Limit(format!(
                            "tensor {name_s} has an absurd or zero dimension {d}"
                        ))
                    })?;
                dims.push(d);
            }
            let type_id = r.u32(&|| format!("the type of tensor {name_s}"))?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                GgufError::Invalid(format!(
                    "tensor {name_s} has unknown ggml type {type_id}; this file needs a newer reader"
                ))
            })?;
            let (block_elems, block_bytes) = ggml_type.block();
            if dims[0] % block_elems != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {name_s}: its first dimension {} is not a multiple of the {} block size {block_elems}",
                    dims[0],
                    ggml_type.name()
                )));
            }
            let size = elements / block_elems * block_bytes;
            let offset = r.u64(&|| format!("the offset of tensor {name_s}"))?;
            if offset % alignment != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {name_s} starts at offset {offset}, not a multiple of the alignment {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(GgufError::Invalid(format!("tensor {name_s} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size,
            });
        }
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            if end.is_none_or(|e| e > file_len) {
                return Err(GgufError::Truncated(format!(
                    "the data of tensor {:?} (needs bytes up to {}, the file has {file_len})",
                    t.name,
                    end.map_or("overflow".into(), |e| e.to_string())
                )));
            }
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string metadata value by key.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Total number of weights over all tensors.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::elements).sum()
    }

    /// The tensor type holding most of the weights (what "Q4_1 model" means).
    pub fn dominant_type(&self) -> Option<GgmlType> {
        let mut by_type: BTreeMap<&'static str, (u64, GgmlType)> = BTreeMap::new();
        for t in &self.tensors {
            by_type
                .entry(t.ggml_type.name())
                .or_insert((0, t.ggml_type))
                .0 += t.elements();
        }
        by_type
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, t)| t)
    }
}

struct Cursor<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn exact(&mut self, buf: &mut [u8], what: What<'_>) -> Result<(), GgufError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(GgufError::Truncated(what())),
            Err(e) => Err(e.into()),
        }
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32, GgufError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn bytes(&mut self, n: u64, what: What<'_>) -> Result<Vec<u8>, GgufError> {
        if n > MAX_STRING {
            return Err(GgufError::Limit(format!(
                "{} claims {n} bytes (limit {MAX_STRING})",
                what()
            )));
        }
        if n > self.remaining() {
            return Err(GgufError::Truncated(what()));
        }
        let mut buf = vec![0u8; n as usize];
        self.exact(&mut buf, what)?;
        Ok(buf)
    }

    fn string(&mut self, what: What<'_>) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        let bytes = self.bytes(n, what)?;
        String::from_utf8(bytes)
            .map_err(|_| GgufError::Invalid(format!("{} is not valid UTF-8", what())))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        let key_s = short(key);
        let what = || format!("the value of metadata {key_s}");
        Ok(match ty {
            0 => Value::U8(self.fixed::<1>(&what)?[0]),
            1 => Value::I8(self.fixed::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.fixed(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.fixed(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.fixed(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.fixed(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.fixed(&what)?)),
            7 => match self.fixed::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::Invalid(format!(
                        "metadata {key_s} is a bool with value {b}"
                    )));
                }
            },
            8 => {
                let n = self.u64(&what)?;
                let bytes = self.bytes(n, &what)?;
                Value::String(String::from_utf8_lossy(&bytes).into_owned())
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(GgufError::Limit(format!(
                        "metadata {key_s} nests arrays deeper than {MAX_DEPTH}"
                    )));
                }
                let elem_ty = self.u32(&what)?;
                let n = self.u64(&what)?;
                if n > MAX_ARRAY || n > self.remaining() {
                    return Err(GgufError::Limit(format!(
                        "metadata {key_s} claims an array of {n} elements (limit {MAX_ARRAY}, or more than the file holds)"
                    )));
                }
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.fixed(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.fixed(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.fixed(&what)?)),
            other => {
                return Err(GgufError::Invalid(format!(
                    "metadata {key_s} has unknown value type {other}"
                )));
            }
        })
    }

    fn fixed<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.exact(&mut b, what)?;
        Ok(b)
    }
}

/// What a read is for, formatted only if it fails (a 1 MiB key read a million times must
/// not be formatted a million times).
type What<'a> = &'a dyn Fn() -> String;

/// A key or name as error messages quote it: at most 80 characters.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("{out:?}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_huge_key_over_a_million_element_array_is_read_without_formatting_it_each_time() {
        // 2 MiB: a 1 MiB key whose value is an array of a million u8. Reading it once used
        // to format the key for every element (a terabyte of text); now it is linear.
        let mut f = Vec::new();
        f.extend(b"GGUF");
        f.extend(3u32.to_le_bytes());
        f.extend(0u64.to_le_bytes()); // tensors
        f.extend(1u64.to_le_bytes()); // metadata
        let key = "k".repeat(1 << 20);
        f.extend((key.len() as u64).to_le_bytes());
        f.extend(key.as_bytes());
        f.extend(9u32.to_le_bytes()); // array
        f.extend(0u32.to_le_bytes()); // of u8
        f.extend(1_000_000u64.to_le_bytes());
        f.extend(std::iter::repeat_n(7u8, 1_000_000));
        let g = Gguf::read(&f[..], f.len() as u64).unwrap();
        assert_eq!(g.metadata.len(), 1);
        // Cut off inside the array: the error quotes the key shortened.
        let e = Gguf::read(&f[..f.len() - 10], (f.len() - 10) as u64)
            .unwrap_err()
            .to_string();
        assert!(e.len() < 400, "{} bytes of error", e.len());
    }

    /// Build a small, valid GGUF file in memory.
    pub(crate) fn tiny_gguf() -> Vec<u8> {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend((v.len() as u64).to_le_bytes());
            out.extend(v.as_bytes());
        }
        let mut f = Vec::new();
        f.extend(b"GGUF");
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes()); // tensors
        f.extend(3u64.to_le_bytes()); // kv
        s(&mut f, "general.architecture");
        f.extend(8u32.to_le_bytes());
        s(&mut f, "llama");
        s(&mut f, "tokenizer.chat_template");
        f.extend(8u32.to_le_bytes());
        s(&mut f, "{{ messages }}");
        s(&mut f, "tokenizer.ggml.tokens");
        f.extend(9u32.to_le_bytes());
        f.extend(8u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        s(&mut f, "a");
        s(&mut f, "b");
        s(&mut f, "w");
        f.extend(2u32.to_le_bytes());
        f.extend(32u64.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(2u32.to_le_bytes()); // q4_0
        f.extend(0u64.to_le_bytes());
        while f.len() % 32 != 0 {
            f.push(0);
        }
        f.extend(vec![0u8; 36]);
        f
    }

    #[test]
    fn reads_a_valid_file() {
        let f = tiny_gguf();
        let g = Gguf::read(&f[..], f.len() as u64).unwrap();
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.tensors[0].size, 36);
        assert_eq!(g.parameter_count(), 64);
        assert_eq!(g.dominant_type(), Some(GgmlType::Q4_0));
        assert_eq!(
            g.get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(<[Value]>::len),
            Some(2)
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let f = tiny_gguf();
        for cut in 0..f.len() {
            let err = Gguf::read(&f[..cut], cut as u64).unwrap_err();
            assert!(
                matches!(err, GgufError::Truncated(_) | GgufError::Limit(_)),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn absurd_counts_are_refused_before_allocating() {
        let mut f = tiny_gguf();
        f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Gguf::read(&f[..], f.len() as u64),
            Err(GgufError::Limit(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn corrupted_bytes_never_panic(pos in 0usize..200, byte in proptest::prelude::any::<u8>()) {
            let mut f = tiny_gguf();
            let p = pos % f.len();
            f[p] = byte;
            let _ = Gguf::read(&f[..], f.len() as u64);
        }
    }
}
