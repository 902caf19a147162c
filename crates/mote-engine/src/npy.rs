//! Reading and writing NumPy `.npy` files (C order, little-endian), for the `tensor`
//! pipeline's file inputs and for comparing with reference outputs.

use crate::error::{EngineError, Result};
use crate::tensor::{Tensor, TensorData};

/// Largest header accepted.
const MAX_HEADER: usize = 1 << 16;

/// Parse a `.npy` file.
pub fn read(bytes: &[u8]) -> Result<Tensor> {
    let bad = |m: &str| EngineError::input(format!("not a valid .npy file: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("it does not start with the NumPy magic bytes"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported version {v}"))),
    };
    if header_len > MAX_HEADER || start + header_len > bytes.len() {
        return Err(bad("the header is truncated or too long"));
    }
    let header = std::str::from_utf8(&bytes[start..start + header_len])
        .map_err(|_| bad("the header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad("no descr"))?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(bad(
            "Fortran order is not supported; save with np.ascontiguousarray",
        ));
    }
    let shape_text = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad("a shape entry is not a number"))
        })
        .collect::<Result<_>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("the shape overflows"))?;
    let body = &bytes[start + header_len..];
    let take = |size: usize| -> Result<&[u8]> {
        let need = count
            .checked_mul(size)
            .ok_or_else(|| bad("the shape overflows"))?;
        body.get(..need)
            .ok_or_else(|| bad("the data is shorter than the shape says"))
    };
    macro_rules! le {
        ($t:ty, $n:expr) => {
            take($n)?
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")))
                .collect()
        };
    }
    let data = match descr {
        "<f4" => TensorData::F32(le!(f32, 4)),
        "<f8" => TensorData::F64(le!(f64, 8)),
        "<i8" => TensorData::I64(le!(i64, 8)),
        "<i4" => TensorData::I32(le!(i32, 4)),
        "|u1" => TensorData::U8(take(1)?.to_vec()),
        "|i1" => TensorData::I8(take(1)?.iter().map(|&b| b as i8).collect()),
        "|b1" => TensorData::Bool(take(1)?.iter().map(|&b| b != 0).collect()),
        other => return Err(bad(&format!("element type {other:?} is not supported"))),
    };
    Tensor::new(shape, data)
}

/// Serialise a tensor as a version-1 `.npy` file.
pub fn write(tensor: &Tensor) -> Vec<u8> {
    let (descr, body): (&str, Vec<u8>) = match tensor.data() {
        TensorData::F32(v) => ("<f4", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::F64(v) => ("<f8", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I64(v) => ("<i8", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I32(v) => ("<i4", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::U8(v) => ("|u1", v.clone()),
        TensorData::I8(v) => ("|i1", v.iter().map(|&x| x as u8).collect()),
        TensorData::Bool(v) => ("|b1", v.iter().map(|&x| x as u8).collect()),
    };
    let shape = match tensor.shape() {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let t = Tensor::new(vec![2, 3], TensorData::F32(vec![1., 2., 3., 4., 5., 6.])).unwrap();
        assert_eq!(read(&write(&t)).unwrap(), t);
        let t = Tensor::new(vec![4], TensorData::I64(vec![1, -2, 3, 4])).unwrap();
        assert_eq!(read(&write(&t)).unwrap(), t);
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend(data);
            let _ = read(&bytes);
        }
    }
}
