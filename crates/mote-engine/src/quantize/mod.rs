//! Int8 quantisation of native BERT-family encoders (`mote quantize --int8`).
//!
//! 1. Calibrate: run the float model over a calibration set and record, for every matrix
//!    product, the largest magnitude each input channel reaches.
//! 2. Smooth (SmoothQuant): per input channel `i`, `s_i = a_i^α / w_i^(1-α)` (`a_i` the
//!    activation range, `w_i` the largest weight magnitude in that column), so outlier
//!    channels' range moves from the activations (quantised per token at run time) into the
//!    weights (quantised per output channel, offline). `α = 0` turns smoothing off.
//! 3. Quantise every product's weights to int8 per output channel (see
//!    [`crate::native::int8`]); products named in `keep_f32` stay in float.
//! 4. Measure: embed an evaluation set (disjoint from the calibration set) with both models,
//!    one sentence at a time, and report cosine similarity (min, mean) and the speed ratio.
//!
//! The result is a new safetensors file (int8 weights, f32 scales and smoothing factors,
//! everything else unchanged) and a `config.json` with a `quantization_config` section; the
//! caller stores them as a new artifact whose provenance names the parent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use mote_base::stats::median;
use mote_store::formats::safetensors::Header;
use mote_store::{Digest, Reference, Store, Task};
use serde::Serialize;

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::native::bert::{ActivationRanges, Bert, SITES};
use crate::native::int8::quantize_weights;
use crate::pipeline::TextEmbedding;
use crate::threads::ThreadPool;

/// The built-in calibration sentences (64, varied in topic, language and length).
pub const CALIBRATION: &str = include_str!("calibration.txt");
/// The built-in evaluation sentences (60, none shared with the calibration set).
pub const EVALUATION: &str = include_str!("evaluation.txt");

/// Most sentences read from a calibration or evaluation file.
pub const MAX_SENTENCES: usize = 10_000;

/// What to quantise and how.
#[derive(Clone, Debug)]
pub struct Int8Options {
    /// Calibration sentences.
    pub calibration: Vec<String>,
    /// Evaluation sentences (for the fidelity report).
    pub evaluation: Vec<String>,
    /// SmoothQuant migration strength, `0..=1` (0: no smoothing).
    pub alpha: f32,
    /// Products kept in float, by module name (e.g. `encoder.layer.5.output.dense`).
    pub keep_f32: Vec<String>,
    /// Per product, the input channels with the widest calibrated range (after smoothing)
    /// computed in float instead of int8 (LLM.int8()-style decomposition).
    pub outliers: usize,
    /// Threads.
    pub threads: usize,
}

/// The files of the quantised model and how faithful and fast it is.
#[derive(Debug)]
pub struct Quantized {
    /// `(path, bytes)` of the files that replace the parent's.
    pub files: Vec<(String, Vec<u8>)>,
    /// The fidelity and speed report.
    pub report: FidelityReport,
}

/// How the int8 model compares with its float parent.
#[derive(Clone, Debug, Serialize)]
pub struct FidelityReport {
    /// Evaluation sentences.
    pub sentences: usize,
    /// Lowest cosine similarity between the two models' embeddings.
    pub cosine_min: f64,
    /// Mean cosine similarity.
    pub cosine_mean: f64,
    /// The sentence with the lowest cosine.
    pub worst: String,
    /// Median time to embed one sentence, float model (ms).
    pub fp32_ms: f64,
    /// Median time to embed one sentence, int8 model (ms).
    pub int8_ms: f64,
    /// `fp32_ms / int8_ms`.
    pub speedup: f64,
    /// Size of the float weights file (bytes).
    pub fp32_bytes: u64,
    /// Size of the int8 weights file (bytes).
    pub int8_bytes: u64,
    /// Digest of the calibration sentences (one per line, as used).
    pub calibration_digest: Digest,
    /// Calibration sentences.
    pub calibration_sentences: usize,
    /// Digest of the evaluation sentences.
    pub evaluation_digest: Digest,
    /// Products quantised / kept in float.
    pub int8_products: usize,
    /// Products kept in float.
    pub fp32_products: Vec<String>,
    /// SmoothQuant α.
    pub alpha: f32,
    /// Outlier channels per product computed in float.
    pub outliers: usize,
}

/// Sentences from a text file: one per non-empty line.
pub fn sentences(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Digest of a sentence set as used (one per line, `\n`-terminated).
pub fn digest_of(sentences: &[String]) -> Digest {
    let mut s = String::new();
    for l in sentences {
        s.push_str(l);
        s.push('\n');
    }
    Digest::of(s.as_bytes())
}

/// Quantise the float BERT-family encoder at `reference` to int8.
pub fn quantize_int8(
    store: &Store,
    reference: &Reference,
    opts: &Int8Options,
) -> Result<Quantized> {
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(EngineError::input(format!(
            "--alpha must be between 0 and 1, got {}",
            opts.alpha
        )));
    }
    for (what, set) in [
        ("calibration", &opts.calibration),
        ("evaluation", &opts.evaluation),
    ] {
        if set.is_empty() || set.len() > MAX_SENTENCES {
            return Err(EngineError::input(format!(
                "the {what} set must hold 1..={MAX_SENTENCES} sentences, it has {}",
                set.len()
            )));
        }
    }
    let verified = store.open_model(reference)?;
    let settings = &verified.info.settings;
    if settings.format != "safetensors" || settings.task != Task::TextEmbedding {
        return Err(EngineError::Unsupported(format!(
            "{reference} is a {} {} model; `mote quantize --int8` works on text-embedding \
             encoders in safetensors (BERT, MiniLM, bge/e5-small) that mote runs natively",
            settings.format, settings.task
        )));
    }
    let text = settings.text.clone().ok_or_else(|| {
        EngineError::Model("the artifact has no tokenizer; re-import the model directory".into())
    })?;
    let config_json = verified.read("config.json")?;
    let weights = verified.read(&settings.weights)?;
    let tokenizer = verified.read(&text.tokenizer)?;
    verified.verify_unread()?;
    let pool = ThreadPool::new(opts.threads)?;
    let config: serde_json::Value = serde_json::from_slice(&config_json)
        .map_err(|e| EngineError::Model(format!("config.json does not parse: {e}")))?;
    if config.get("quantization_config").is_some() {
        return Err(EngineError::input(format!(
            "{reference} is already quantised; quantise its float parent instead"
        )));
    }

    // 1. Calibrate.
    let mut recording = Bert::load(&config_json, &weights, pool.clone())?;
    recording.record_activations();
    let recording = Arc::new(recording);
    let embedder = |b: Arc<dyn Backend>| TextEmbedding::new(b, &tokenizer, &text);
    let calib = embedder(recording.clone())?;
    for chunk in opts.calibration.chunks(16) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        calib.embed(&refs)?;
    }
    let ranges = recording
        .activation_ranges()
        .expect("recording was switched on");
    drop(calib);

    // 2, 3. Smooth and quantise.
    let (int8_weights, fp32_products, int8_products) = quantize_weights_file(
        &weights,
        &ranges,
        recording.config().num_hidden_layers,
        opts,
    )?;
    drop(recording);
    let mut config = config;
    config["quantization_config"] = serde_json::json!({
        "quant_method": "mote-int8",
        "weights": "int8 per output channel, symmetric, 7-bit (-63..=63)",
        "activations": "uint8 per token, asymmetric, dynamic",
        "smoothquant_alpha": opts.alpha,
        "outlier_channels_per_product": opts.outliers,
        "fp32_modules": fp32_products,
        "calibration_digest": digest_of(&opts.calibration).to_string(),
    });
    let config_bytes = serde_json::to_vec_pretty(&config).expect("config serialises");

    // 4. Measure.
    let fp32 = embedder(Arc::new(Bert::load(&config_json, &weights, pool.clone())?))?;
    let int8 = embedder(Arc::new(Bert::load(&config_bytes, &int8_weights, pool)?))?;
    let (mut cos, mut t32, mut t8) = (Vec::new(), Vec::new(), Vec::new());
    for s in &opts.evaluation {
        let t = Instant::now();
        let (a, _) = fp32.embed(&[s.as_str()])?;
        t32.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let (b, _) = int8.embed(&[s.as_str()])?;
        t8.push(t.elapsed().as_secs_f64() * 1e3);
        cos.push(cosine(&a[0].vector, &b[0].vector));
    }
    let (worst_i, cosine_min) = cos.iter().copied().enumerate().fold(
        (0, f64::INFINITY),
        |m, (i, c)| if c < m.1 { (i, c) } else { m },
    );
    let (fp32_ms, int8_ms) = (median(&t32), median(&t8));
    let report = FidelityReport {
        sentences: cos.len(),
        cosine_min,
        cosine_mean: cos.iter().sum::<f64>() / cos.len() as f64,
        worst: opts.evaluation[worst_i].clone(),
        fp32_ms,
        int8_ms,
        speedup: fp32_ms / int8_ms,
        fp32_bytes: weights.len() as u64,
        int8_bytes: int8_weights.len() as u64,
        calibration_digest: digest_of(&opts.calibration),
        calibration_sentences: opts.calibration.len(),
        evaluation_digest: digest_of(&opts.evaluation),
        int8_products,
        fp32_products,
        alpha: opts.alpha,
        outliers: opts.outliers,
    };
    Ok(Quantized {
        files: vec![
            ("config.json".into(), config_bytes),
            (settings.weights.clone(), int8_weights),
        ],
        report,
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na * nb)
}

/// One tensor of the output file.
use mote_store::formats::safetensors::{OutTensor as Out, write as write_safetensors};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Rewrite the safetensors file: every product's weight quantised (unless kept), with its
/// scales and smoothing factors; everything else copied. Returns the file, the products kept
/// in float and the number quantised.
fn quantize_weights_file(
    file: &[u8],
    ranges: &ActivationRanges,
    layers: usize,
    opts: &Int8Options,
) -> Result<(Vec<u8>, Vec<String>, usize)> {
    let header =
        Header::read(file, file.len() as u64).map_err(|e| EngineError::Model(e.to_string()))?;
    let prefix = if header
        .tensors
        .contains_key("bert.embeddings.word_embeddings.weight")
    {
        "bert."
    } else {
        ""
    };
    let data = |name: &str| -> Result<(&[u8], Vec<u64>, &str)> {
        let t = header
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::Model(format!("the weights have no tensor {name:?}")))?;
        let at = 8 + header.header_len as usize;
        Ok((
            &file[at + t.data_offsets[0] as usize..at + t.data_offsets[1] as usize],
            t.shape.clone(),
            t.dtype.as_str(),
        ))
    };
    let floats = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    for name in &opts.keep_f32 {
        let known = (0..layers).any(|l| {
            SITES
                .iter()
                .any(|s| *name == format!("encoder.layer.{l}.{s}"))
        });
        if !known {
            return Err(EngineError::input(format!(
                "--keep-f32 {name:?} names no product of this model; use names like \
                 encoder.layer.0.attention.self, encoder.layer.0.attention.output.dense, \
                 encoder.layer.0.intermediate.dense, encoder.layer.0.output.dense"
            )));
        }
    }
    let mut out: BTreeMap<String, Out> = BTreeMap::new();
    let mut replaced = std::collections::BTreeSet::new();
    let (mut kept, mut quantised) = (Vec::new(), 0usize);
    for (l, layer_ranges) in ranges.iter().enumerate().take(layers) {
        for (site, act) in SITES.iter().zip(layer_ranges) {
            let module = format!("encoder.layer.{l}.{site}");
            let members: Vec<String> = if *site == "attention.self" {
                ["query", "key", "value"]
                    .iter()
                    .map(|m| format!("{module}.{m}"))
                    .collect()
            } else {
                vec![module.clone()]
            };
            if opts.keep_f32.contains(&module) {
                kept.push(module);
                continue;
            }
            let mats: Vec<(String, Vec<f32>, Vec<u64>)> = members
                .iter()
                .map(|m| {
                    let name = format!("{prefix}{m}.weight");
                    let (b, shape, dtype) = data(&name)?;
                    if dtype != "F32" || shape.len() != 2 || shape[1] as usize != act.len() {
                        return Err(EngineError::Model(format!(
                            "{name} is {dtype} {shape:?}; expected F32 [_, {}]",
                            act.len()
                        )));
                    }
                    Ok((name, floats(b), shape))
                })
                .collect::<Result<_>>()?;
            let k = act.len();
            // Per input channel: the activation range and the largest weight in the column
            // (over all members, which share the input).
            let smooth: Option<Vec<f32>> = (opts.alpha > 0.0).then(|| {
                (0..k)
                    .map(|i| {
                        let w = mats
                            .iter()
                            .flat_map(|(_, w, _)| w.chunks_exact(k).map(move |r| r[i].abs()))
                            .fold(0f32, f32::max);
                        let a = act[i];
                        let s = a.powf(opts.alpha) / w.powf(1.0 - opts.alpha);
                        if s.is_finite() && s > 0.0 {
                            s.clamp(1e-5, 1e5)
                        } else {
                            1.0
                        }
                    })
                    .collect()
            });
            // The channels whose (smoothed) range is widest go through the float path.
            let mut order: Vec<usize> = (0..k).collect();
            let reach = |i: usize| act[i] / smooth.as_ref().map_or(1.0, |s| s[i]);
            order.sort_by(|&a, &b| reach(b).total_cmp(&reach(a)).then(a.cmp(&b)));
            let mut outliers: Vec<usize> = order.into_iter().take(opts.outliers.min(k)).collect();
            outliers.sort_unstable();
            for (name, mut w, shape) in mats {
                let n = shape[0] as usize;
                let float_w: Vec<f32> = (0..n)
                    .flat_map(|j| outliers.iter().map(move |&c| (j, c)))
                    .map(|(j, c)| w[j * k + c])
                    .collect();
                for j in 0..n {
                    for &c in &outliers {
                        w[j * k + c] = 0.0;
                    }
                }
                let (q, scales) = quantize_weights(&w, k, smooth.as_deref());
                let base = name.trim_end_matches(".weight");
                if !outliers.is_empty() {
                    out.insert(
                        format!("{base}.outlier_channels"),
                        Out {
                            dtype: "I64",
                            shape: vec![outliers.len() as u64],
                            bytes: outliers
                                .iter()
                                .flat_map(|&c| (c as i64).to_le_bytes())
                                .collect(),
                        },
                    );
                    out.insert(
                        format!("{base}.outlier_weight"),
                        Out {
                            dtype: "F32",
                            shape: vec![n as u64, outliers.len() as u64],
                            bytes: f32_bytes(&float_w),
                        },
                    );
                }
                out.insert(
                    name.clone(),
                    Out {
                        dtype: "I8",
                        shape: shape.clone(),
                        bytes: q.iter().map(|&v| v as u8).collect(),
                    },
                );
                out.insert(
                    format!("{base}.weight_scale"),
                    Out {
                        dtype: "F32",
                        shape: vec![shape[0]],
                        bytes: f32_bytes(&scales),
                    },
                );
                if let Some(s) = &smooth {
                    out.insert(
                        format!("{base}.smooth"),
                        Out {
                            dtype: "F32",
                            shape: vec![k as u64],
                            bytes: f32_bytes(s),
                        },
                    );
                }
                replaced.insert(name);
                quantised += 1;
            }
        }
    }
    for (name, t) in &header.tensors {
        if replaced.contains(name) {
            continue;
        }
        let (b, shape, _) = data(name)?;
        let dtype = match t.dtype.as_str() {
            "F32" => "F32",
            "I64" => "I64",
            other => {
                return Err(EngineError::Unsupported(format!(
                    "tensor {name:?} is {other}; quantise a float32 checkpoint"
                )));
            }
        };
        out.insert(
            name.clone(),
            Out {
                dtype,
                shape,
                bytes: b.to_vec(),
            },
        );
    }
    let mut metadata = header.metadata.clone();
    metadata.insert("format".into(), "pt".into());
    metadata.insert("mote.quantization".into(), "int8".into());
    Ok((write_safetensors(&out, &metadata), kept, quantised))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_sets_are_large_enough_and_disjoint() {
        let (c, e) = (sentences(CALIBRATION), sentences(EVALUATION));
        assert!(c.len() >= 50 && e.len() >= 50, "{} {}", c.len(), e.len());
        assert!(c.iter().all(|s| !e.contains(s)));
    }

    /// A one-layer BERT with hidden 8 (2 heads), feed-forward 16, vocabulary 10.
    fn tiny_bert() -> (Vec<u8>, Vec<u8>) {
        let config = br#"{"model_type":"bert","hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":16}"#;
        let mut seed = 7u64;
        let mut t = BTreeMap::new();
        let mut add = |name: &str, shape: &[u64]| {
            let n: u64 = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            t.insert(
                name.to_string(),
                Out {
                    dtype: "F32",
                    shape: shape.to_vec(),
                    bytes: f32_bytes(&v),
                },
            );
        };
        add("embeddings.word_embeddings.weight", &[10, 8]);
        add("embeddings.position_embeddings.weight", &[16, 8]);
        add("embeddings.token_type_embeddings.weight", &[2, 8]);
        for n in [
            "embeddings.LayerNorm",
            "encoder.layer.0.attention.output.LayerNorm",
            "encoder.layer.0.output.LayerNorm",
        ] {
            add(&format!("{n}.weight"), &[8]);
            add(&format!("{n}.bias"), &[8]);
        }
        for (n, o, i) in [
            ("attention.self.query", 8, 8),
            ("attention.self.key", 8, 8),
            ("attention.self.value", 8, 8),
            ("attention.output.dense", 8, 8),
            ("intermediate.dense", 16, 8),
            ("output.dense", 8, 16),
        ] {
            add(&format!("encoder.layer.0.{n}.weight"), &[o, i]);
            add(&format!("encoder.layer.0.{n}.bias"), &[o]);
        }
        (config.to_vec(), write_safetensors(&t, &BTreeMap::new()))
    }

    fn tensors(file: &[u8]) -> BTreeMap<String, Out> {
        let h = Header::read(file, file.len() as u64).unwrap();
        let at = 8 + h.header_len as usize;
        h.tensors
            .iter()
            .map(|(n, t)| {
                let dtype = match t.dtype.as_str() {
                    "F32" => "F32",
                    "I8" => "I8",
                    _ => "I64",
                };
                let b =
                    file[at + t.data_offsets[0] as usize..at + t.data_offsets[1] as usize].to_vec();
                (
                    n.clone(),
                    Out {
                        dtype,
                        shape: t.shape.clone(),
                        bytes: b,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn int8_files_load_and_damaged_ones_are_refused_with_reasons() {
        let (config, file) = tiny_bert();
        let ranges: ActivationRanges =
            vec![[vec![1.0; 8], vec![2.0; 8], vec![1.0; 8], vec![3.0; 16]]];
        let opts = Int8Options {
            calibration: vec!["x".into()],
            evaluation: vec!["x".into()],
            alpha: 0.5,
            keep_f32: Vec::new(),
            outliers: 2,
            threads: 1,
        };
        let (int8, kept, n) = quantize_weights_file(&file, &ranges, 1, &opts).unwrap();
        assert!(kept.is_empty() && n == 6);
        let pool = ThreadPool::new(1).unwrap();
        let bert = Bert::load(&config, &int8, pool.clone()).unwrap();
        assert!(bert.is_int8());
        let damaged = |f: &dyn Fn(&mut BTreeMap<String, Out>)| {
            let mut t = tensors(&int8);
            f(&mut t);
            let file = write_safetensors(&t, &BTreeMap::new());
            match Bert::load(&config, &file, pool.clone()) {
                Ok(_) => panic!("a damaged file loaded"),
                Err(e) => e.to_string(),
            }
        };
        let w = "encoder.layer.0.output.dense";
        let e = damaged(&|t| t.get_mut(&format!("{w}.weight")).unwrap().bytes[0] = 100);
        assert!(e.contains("beyond the 7-bit range"), "{e}");
        let e = damaged(&|t| {
            t.get_mut(&format!("{w}.outlier_channels")).unwrap().bytes =
                [5i64, 3].iter().flat_map(|c| c.to_le_bytes()).collect()
        });
        assert!(e.contains("increasing order"), "{e}");
        let e = damaged(&|t| {
            t.get_mut(&format!("{w}.outlier_channels")).unwrap().bytes =
                [1i64, 99].iter().flat_map(|c| c.to_le_bytes()).collect()
        });
        assert!(e.contains("outside 0..16"), "{e}");
        let e =
            damaged(&|t| t.get_mut(&format!("{w}.smooth")).unwrap().bytes = f32_bytes(&[-1.0; 16]));
        assert!(e.contains("positive finite"), "{e}");
        let e = damaged(&|t| {
            t.remove(&format!("{w}.weight_scale"));
        });
        assert!(e.contains("weight_scale"), "{e}");
        let q = "encoder.layer.0.attention.self.key.smooth";
        let e = damaged(&|t| t.get_mut(q).unwrap().bytes = f32_bytes(&[2.0; 8]));
        assert!(e.contains("share one precision and smoothing"), "{e}");
    }

    #[test]
    fn written_safetensors_read_back() {
        let mut t = BTreeMap::new();
        t.insert(
            "a".to_string(),
            Out {
                dtype: "I8",
                shape: vec![2, 3],
                bytes: vec![1, 2, 3, 4, 5, 255],
            },
        );
        t.insert(
            "b".to_string(),
            Out {
                dtype: "F32",
                shape: vec![1],
                bytes: f32_bytes(&[1.5]),
            },
        );
        let file = write_safetensors(&t, &BTreeMap::new());
        let h = Header::read(&file[..], file.len() as u64).unwrap();
        assert_eq!(h.tensors["a"].dtype, "I8");
        assert_eq!(h.tensors["b"].data_offsets, [6, 10]);
        assert_eq!((8 + h.header_len) % 8, 0);
    }
}
