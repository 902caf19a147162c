//! Dequantisation of ggml block formats against the `gguf` Python package (llama.cpp's
//! reference implementation), using `tests/fixtures/quant_fixture.gguf` (written by
//! `tests/fixtures/make_quant_fixture.py`), and the integer kernels against dequantised
//! float arithmetic on the same data.

use std::path::Path;

use mote_engine::llm::quant::{self, Q8Block, QType};
use mote_store::formats::gguf::{GgmlType, Gguf};

fn fixture() -> (Gguf, Vec<u8>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant_fixture.gguf");
    let bytes = std::fs::read(path).unwrap();
    let g = Gguf::read(&bytes[..], bytes.len() as u64).unwrap();
    (g, bytes)
}

fn tensor<'a>(g: &Gguf, bytes: &'a [u8], name: &str) -> (GgmlType, &'a [u8], usize) {
    let t = g.tensors.iter().find(|t| t.name == name).unwrap();
    let at = (g.data_offset + t.offset) as usize;
    (
        t.ggml_type,
        &bytes[at..at + t.size as usize],
        t.elements() as usize,
    )
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn dequantized(ty: QType, blocks: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    quant::dequantize_row(ty, blocks, &mut out);
    out
}

#[test]
fn dequantisation_matches_the_gguf_package_bit_for_bit() {
    let (g, bytes) = fixture();
    for name in [
        "q4_0", "q4_1", "q8_0", "q5_0", "q4_k", "q6_k", "f16", "bf16",
    ] {
        let (ty, data, n) = tensor(&g, &bytes, name);
        let (_, expected, _) = tensor(&g, &bytes, &format!("{name}.expected"));
        let want = f32s(expected);
        let got = match ty {
            GgmlType::F16 => quant::f16_to_f32(data),
            GgmlType::Bf16 => quant::bf16_to_f32(data),
            // The k-quants run repacked: dequantising the repacked blocks must give the
            // package's values.
            GgmlType::Q4K => dequantized(QType::Q4K, &quant::repack_q4_k(data), n),
            GgmlType::Q6K => dequantized(QType::Q6K, &quant::repack_q6_k(data), n),
            q => {
                let qt = match q {
                    GgmlType::Q4_0 => QType::Q4_0,
                    GgmlType::Q4_1 => QType::Q4_1,
                    GgmlType::Q8_0 => QType::Q8_0,
                    GgmlType::Q5_0 => QType::Q5_0,
                    other => panic!("unexpected type {other:?}"),
                };
                let mut out = vec![0f32; n];
                quant::dequantize_row(qt, data, &mut out);
                out
            }
        };
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
        }
    }
}

/// Activations (token rows of whole 32-blocks) quantised, and their dequantised values.
fn activations(x: &[f32]) -> (Vec<Q8Block>, Vec<f32>) {
    let mut qx = vec![Q8Block::default(); x.len() / 32];
    quant::quantize_row(x, &mut qx);
    let xq = qx
        .iter()
        .flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d))
        .collect();
    (qx, xq)
}

/// Two weight rows (`w`, kernel layout; `wf`, the package's dequantisation) × two token rows:
/// the integer kernel against exact float arithmetic on the same values. `min(r, b)` is the
/// minimum of row `r`'s block `b` for the types that have one: that term takes each
/// activation block's own `s` (llama.cpp's block_q8_1), not `d·Σq` with the f16-rounded `d`.
fn check_kernel(
    name: &str,
    qt: QType,
    w: &[u8],
    wf: &[f32],
    (qx, xq): &(Vec<Q8Block>, Vec<f32>),
    min: impl Fn(usize, usize) -> f32,
) {
    let cols = wf.len() / 2;
    let stride = cols / 32 * qt.block_bytes();
    let mut out = vec![0f32; 4];
    quant::matmul_rows(qt, w, stride, 2, qx, cols / 32, &mut out);
    for r in 0..2 {
        for t in 0..2 {
            let mut exact: f64 = (0..cols)
                .map(|i| wf[r * cols + i] as f64 * xq[t * cols + i] as f64)
                .sum();
            if qt.has_min() {
                for b in 0..cols / 32 {
                    let xb = &qx[t * cols / 32 + b];
                    let sum: i32 = xb.qs.iter().map(|&q| i32::from(q)).sum();
                    exact += min(r, b) as f64 * (xb.s as f64 - xb.d as f64 * sum as f64);
                }
            }
            let mag: f64 = (0..cols)
                .map(|i| (wf[r * cols + i] as f64 * xq[t * cols + i] as f64).abs())
                .sum();
            let got = out[r * 2 + t] as f64;
            assert!(
                (got - exact).abs() <= 1e-5 * mag + 1e-6,
                "{name} row {r} token {t}: {got} vs {exact}"
            );
        }
    }
}

#[test]
fn integer_kernels_agree_with_dequantised_arithmetic_on_reference_blocks() {
    let (g, bytes) = fixture();
    let x = activations(&f32s(tensor(&g, &bytes, "input").1));
    for (name, qt) in [
        ("q4_0", QType::Q4_0),
        ("q4_1", QType::Q4_1),
        ("q8_0", QType::Q8_0),
        ("q5_0", QType::Q5_0),
    ] {
        let (_, w, _) = tensor(&g, &bytes, name);
        let wf = f32s(tensor(&g, &bytes, &format!("{name}.expected")).1);
        let (bb, stride) = (qt.block_bytes(), w.len() / 2);
        check_kernel(name, qt, w, &wf, &x, |r, b| {
            // The f16 minimum of a Q4_1 block (the only type here with one).
            let wb = &w[r * stride + b * bb..];
            half::f16::from_le_bytes([wb[2], wb[3]]).to_f32()
        });
    }
}

#[test]
fn k_quant_kernels_agree_with_dequantised_arithmetic_on_reference_blocks() {
    let (g, bytes) = fixture();
    // Two token rows of 512 with a wide dynamic range.
    let x: Vec<f32> = (0..2 * 512)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 37) as f32))
        .collect();
    let x = activations(&x);
    for (name, qt) in [("q4_k", QType::Q4K), ("q6_k", QType::Q6K)] {
        let (_, raw, _) = tensor(&g, &bytes, name);
        let w = match qt {
            QType::Q4K => quant::repack_q4_k(raw),
            _ => quant::repack_q6_k(raw),
        };
        let wf = f32s(tensor(&g, &bytes, &format!("{name}.expected")).1);
        let (bb, stride) = (qt.block_bytes(), w.len() / 2);
        check_kernel(name, qt, &w, &wf, &x, |r, b| {
            let wb = &w[r * stride + b * bb..];
            f32::from_le_bytes(wb[4..8].try_into().unwrap())
        });
    }
}
