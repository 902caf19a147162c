//! A small owned tensor type: what pipelines exchange with backends and what the `tensor`
//! pipeline takes from users (KServe v2 clients, `.npy` files).

use std::fmt;

use crate::error::{EngineError, Result};

/// Element types mote accepts at its boundary (named as in the KServe v2 protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float (`FP32`).
    F32,
    /// 64-bit float (`FP64`).
    F64,
    /// 64-bit signed integer (`INT64`).
    I64,
    /// 32-bit signed integer (`INT32`).
    I32,
    /// 8-bit unsigned integer (`UINT8`).
    U8,
    /// 8-bit signed integer (`INT8`).
    I8,
    /// Boolean (`BOOL`).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::U8 | DType::I8 | DType::Bool => 1,
        }
    }

    /// The KServe v2 datatype name.
    pub fn kserve_name(self) -> &'static str {
        match self {
            DType::F32 => "FP32",
            DType::F64 => "FP64",
            DType::I64 => "INT64",
            DType::I32 => "INT32",
            DType::U8 => "UINT8",
            DType::I8 => "INT8",
            DType::Bool => "BOOL",
        }
    }

    /// Parse a KServe v2 datatype name.
    pub fn from_kserve_name(name: &str) -> Option<DType> {
        Some(match name {
            "FP32" => DType::F32,
            "FP64" => DType::F64,
            "INT64" => DType::I64,
            "INT32" => DType::I32,
            "UINT8" => DType::U8,
            "INT8" => DType::I8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kserve_name())
    }
}

/// Tensor elements, row-major.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    Bool(Vec<bool>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::U8(_) => DType::U8,
            TensorData::I8(_) => DType::I8,
            TensorData::Bool(_) => DType::Bool,
        }
    }
}

/// A named or anonymous n-dimensional array.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Build a tensor, checking that the element count matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor> {
        let expected = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| EngineError::input(format!("shape {shape:?} overflows")))?;
        if expected != data.len() {
            return Err(EngineError::input(format!(
                "shape {shape:?} needs {expected} elements but {} were given",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Take the elements.
    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Bytes of element data.
    pub fn byte_len(&self) -> usize {
        self.data.len() * self.dtype().size()
    }

    /// The elements as f32, if that is the type.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Rows `start..start + n` along the first axis.
    pub fn rows(&self, start: usize, n: usize) -> Result<Tensor> {
        let Some(&total) = self.shape.first() else {
            return Err(EngineError::input(
                "a scalar tensor has no rows; give it at least one dimension",
            ));
        };
        if start + n > total {
            return Err(EngineError::input(format!(
                "rows {start}..{} of a tensor with {total} rows",
                start + n
            )));
        }
        let per: usize = self.shape[1..].iter().product();
        let (a, b) = (start * per, (start + n) * per);
        let data = match &self.data {
            TensorData::F32(v) => TensorData::F32(v[a..b].to_vec()),
            TensorData::F64(v) => TensorData::F64(v[a..b].to_vec()),
            TensorData::I64(v) => TensorData::I64(v[a..b].to_vec()),
            TensorData::I32(v) => TensorData::I32(v[a..b].to_vec()),
            TensorData::U8(v) => TensorData::U8(v[a..b].to_vec()),
            TensorData::I8(v) => TensorData::I8(v[a..b].to_vec()),
            TensorData::Bool(v) => TensorData::Bool(v[a..b].to_vec()),
        };
        let mut shape = self.shape.clone();
        shape[0] = n;
        Tensor::new(shape, data)
    }

    /// Stack tensors of the same type and trailing shape along the first axis.
    pub fn concat_rows(parts: Vec<Tensor>) -> Result<Tensor> {
        let mut parts = parts.into_iter();
        let first = parts
            .next()
            .ok_or_else(|| EngineError::input("nothing to concatenate"))?;
        let mut shape = first.shape.clone();
        if shape.is_empty() {
            return Err(EngineError::input(
                "scalar tensors cannot be stacked into rows; give them at least one dimension",
            ));
        }
        let mut data = first.data;
        for t in parts {
            if t.shape.is_empty() || t.shape.get(1..) != shape.get(1..) || t.dtype() != data.dtype()
            {
                return Err(EngineError::Backend(format!(
                    "rows of shapes {:?} and {:?} cannot be stacked",
                    shape, t.shape
                )));
            }
            shape[0] += t.shape[0];
            match (&mut data, t.data) {
                (TensorData::F32(a), TensorData::F32(b)) => a.extend(b),
                (TensorData::F64(a), TensorData::F64(b)) => a.extend(b),
                (TensorData::I64(a), TensorData::I64(b)) => a.extend(b),
                (TensorData::I32(a), TensorData::I32(b)) => a.extend(b),
                (TensorData::U8(a), TensorData::U8(b)) => a.extend(b),
                (TensorData::I8(a), TensorData::I8(b)) => a.extend(b),
                (TensorData::Bool(a), TensorData::Bool(b)) => a.extend(b),
                _ => unreachable!("types were compared above"),
            }
        }
        Tensor::new(shape, data)
    }

    /// The tensor as a KServe v2 / Open Inference Protocol JSON tensor (`name`, `datatype`,
    /// `shape`, flat `data`), as `mote run --json` and the server print it.
    pub fn to_kserve_json(&self, name: &str) -> serde_json::Value {
        use serde_json::json;
        let data = match self.data() {
            TensorData::F32(v) => json!(v),
            TensorData::F64(v) => json!(v),
            TensorData::I64(v) => json!(v),
            TensorData::I32(v) => json!(v),
            TensorData::U8(v) => json!(v),
            TensorData::I8(v) => json!(v),
            TensorData::Bool(v) => json!(v),
        };
        json!({"name": name, "datatype": self.dtype().kserve_name(), "shape": self.shape(), "data": data})
    }

    /// Fail on the first NaN or infinity, naming its position.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        let bad = match &self.data {
            TensorData::F32(v) => v
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| (i, v[i] as f64)),
            TensorData::F64(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
            _ => None,
        };
        match bad {
            None => Ok(()),
            Some((i, x)) => Err(EngineError::input(format!(
                "input {name:?} holds {x} at flat index {i}; mote rejects NaN and infinite inputs because they poison every output they touch"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_tensors_are_refused_where_rows_are_needed_not_a_panic() {
        let scalar = Tensor::new(vec![], TensorData::F32(vec![1.0])).unwrap();
        assert!(scalar.rows(0, 0).is_err());
        assert!(scalar.rows(0, 1).is_err());
        assert!(Tensor::concat_rows(vec![scalar.clone(), scalar.clone()]).is_err());
        let row = Tensor::new(vec![1], TensorData::F32(vec![2.0])).unwrap();
        assert!(Tensor::concat_rows(vec![row.clone(), scalar]).is_err());
        let two = Tensor::concat_rows(vec![row.clone(), row]).unwrap();
        assert_eq!(two.shape(), &[2]);
        assert_eq!(two.rows(1, 1).unwrap().as_f32(), Some(&[2.0f32][..]));
    }
}
