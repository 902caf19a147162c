//! `quantize_int8` on the real MiniLM: fidelity to the float model on the built-in
//! evaluation set and to PyTorch's reference embeddings, provenance, and bit-identity of the
//! int8 artifact alone, in batches and across thread counts.

use std::fs;

use mote_engine::quantize::{self, Int8Options};
use mote_engine::{EngineOptions, Model, Pipeline, npy};
use mote_store::{ImportOptions, Reference, Store};
use mote_testkit::{minilm_dir, reference};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn options() -> Int8Options {
    Int8Options {
        calibration: quantize::sentences(quantize::CALIBRATION),
        evaluation: quantize::sentences(quantize::EVALUATION),
        alpha: 0.5,
        keep_f32: Vec::new(),
        outliers: 4,
        threads: 2,
    }
}

fn embedder(store: &Store, r: &Reference, threads: usize) -> mote_engine::pipeline::TextEmbedding {
    let m = Model::open(
        store,
        r,
        &EngineOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.backend_name(), "native-int8");
    match m.pipeline(None).unwrap() {
        Pipeline::TextEmbedding(p) => *p,
        _ => panic!("not a text-embedding pipeline"),
    }
}

#[test]
fn int8_minilm_keeps_fidelity_and_gives_the_same_bits_in_any_batch_and_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let parent = store
        .import(
            &minilm_dir(),
            Some(&"minilm".parse().unwrap()),
            &ImportOptions::default(),
        )
        .unwrap()
        .digest;
    let fp32: Reference = "minilm".parse().unwrap();
    let q = quantize::quantize_int8(&store, &fp32, &options()).unwrap();
    let r = &q.report;
    println!(
        "int8 vs fp32 over {} sentences: cosine min {:.5} mean {:.5}; {:.2} ms -> {:.2} ms; {} -> {} bytes",
        r.sentences, r.cosine_min, r.cosine_mean, r.fp32_ms, r.int8_ms, r.fp32_bytes, r.int8_bytes
    );
    assert!(r.sentences >= 50);
    assert!(r.cosine_min >= 0.995, "cosine min {}", r.cosine_min);
    assert!(
        r.cosine_mean < 1.0,
        "an int8 model identical to fp32 means nothing was quantised"
    );
    assert_eq!(r.int8_products, 36);
    assert!(r.int8_bytes < r.fp32_bytes * 7 / 10);
    let out = store
        .derive(
            &fp32,
            &q.files,
            mote_store::Provenance {
                method: Some("int8-smoothquant".into()),
                ..Default::default()
            },
            |t| t.precision = Some("int8".into()),
            Some(&"minilm:int8".parse().unwrap()),
        )
        .unwrap();
    let int8: Reference = "minilm:int8".parse().unwrap();
    let info = store.inspect(&int8).unwrap();
    assert_eq!(info.digest, out.digest);
    assert_eq!(
        info.settings.provenance.as_ref().unwrap().parent,
        Some(parent)
    );
    // The tokenizer is the parent's blob, shared, not copied.
    let tok = |i: &mote_store::ModelInfo| i.file("tokenizer.json").unwrap().digest;
    assert_eq!(tok(&info), tok(&store.inspect(&fp32).unwrap()));

    // Against PyTorch's fp32 reference embeddings too, including "ok" (3 tokens: very short
    // inputs average the quantisation noise over few tokens; 0.996 with 4 outlier channels
    // per product in float, 0.992 without).
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(reference("minilm_sentences.json")).unwrap()).unwrap();
    let texts: Vec<String> = v["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let expected = npy::read(&fs::read(reference("minilm_embeddings.npy")).unwrap()).unwrap();
    let expected = expected.as_f32().unwrap();
    let one = embedder(&store, &int8, 1);
    let two = embedder(&store, &int8, 2);
    let (emb, _) = two.embed(&refs).unwrap();
    for (i, e) in emb.iter().enumerate() {
        let c = cosine(&e.vector, &expected[i * 384..(i + 1) * 384]);
        println!("int8 sentence {i}: cosine to PyTorch fp32 {c:.6}");
        let bar = if texts[i].split_whitespace().count() < 3 {
            0.99
        } else {
            0.995
        };
        assert!(c >= bar, "sentence {i}: {c}");
    }

    // Bit-identical alone, in batches of 7 and 32, with 1 and 2 threads.
    let mut pool: Vec<String> = quantize::sentences(quantize::EVALUATION);
    pool.truncate(40);
    let target = "Rust is a systems programming language focused on safety and speed.";
    let (alone, _) = one.embed(&[target]).unwrap();
    for (batch, p) in [(7, &one), (32, &one), (7, &two), (32, &two)] {
        let mut b: Vec<&str> = pool[..batch].iter().map(String::as_str).collect();
        b.insert(batch / 2, target);
        let (got, _) = p.embed(&b).unwrap();
        assert_eq!(got[batch / 2].vector, alone[0].vector, "batch of {batch}");
    }
    let (alone2, _) = two.embed(&[target]).unwrap();
    assert_eq!(alone2[0].vector, alone[0].vector, "1 and 2 threads differ");
}

#[test]
fn quantize_refuses_what_it_cannot_do_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    store
        .import(
            &minilm_dir(),
            Some(&"minilm".parse().unwrap()),
            &ImportOptions::default(),
        )
        .unwrap();
    let fp32: Reference = "minilm".parse().unwrap();
    let err = |o: Int8Options| {
        quantize::quantize_int8(&store, &fp32, &o)
            .unwrap_err()
            .to_string()
    };
    let e = err(Int8Options {
        alpha: 1.5,
        ..options()
    });
    assert!(e.contains("--alpha must be between 0 and 1"), "{e}");
    let e = err(Int8Options {
        keep_f32: vec!["encoder.layer.9.output.dense".into()],
        ..options()
    });
    assert!(e.contains("names no product of this model"), "{e}");
    let e = err(Int8Options {
        calibration: Vec::new(),
        ..options()
    });
    assert!(e.contains("calibration set must hold"), "{e}");
    // Keeping one product in float works and is reported.
    let q = quantize::quantize_int8(
        &store,
        &fp32,
        &Int8Options {
            keep_f32: vec!["encoder.layer.5.output.dense".into()],
            ..options()
        },
    )
    .unwrap();
    assert_eq!(q.report.int8_products, 35);
    assert_eq!(q.report.fp32_products, ["encoder.layer.5.output.dense"]);
    store
        .derive(
            &fp32,
            &q.files,
            Default::default(),
            |_| {},
            Some(&"m:mixed".parse().unwrap()),
        )
        .unwrap();
    // An int8 artifact is not quantised again.
    let e = quantize::quantize_int8(&store, &"m:mixed".parse().unwrap(), &options())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already quantised"), "{e}");
}
