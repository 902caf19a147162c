//! `mote run` end to end on the three reference models.

mod common;

use std::fs;

use common::*;
use mote_engine::npy;
use mote_testkit::reference;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn run_embeds_classifies_and_returns_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let tok = minilm_dir();
    let tok = tok.to_str().unwrap();
    let digest = import(
        &store,
        &shared_models().join("minilm-l6.onnx"),
        "minilm",
        &["--tokenizer", tok],
    );
    import(
        &store,
        &shared_models().join("minilm-l6.int8.onnx"),
        "minilm-int8",
        &["--tokenizer", tok],
    );
    import(
        &store,
        &shared_models().join("mobilenetv2.onnx"),
        "mobilenet",
        &["--task", "image-classification"],
    );

    // Embeddings: the first reference sentence, against PyTorch's vector.
    let sentence = "The quick brown fox jumps over the lazy dog.";
    let out: serde_json::Value = serde_json::from_str(&ok(mote(&store).args([
        "run",
        "minilm",
        "--text",
        sentence,
        "--json",
        "--threads",
        "2",
    ])))
    .unwrap();
    assert_eq!(out["model"]["digest"], digest.as_str());
    let v: Vec<f32> = out["results"][0]["vector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let want = npy::read(&fs::read(reference("minilm_embeddings.npy")).unwrap()).unwrap();
    let c = cosine(&v, &want.as_f32().unwrap()[..384]);
    assert!(c >= 0.99999, "cosine {c}");
    for key in ["preprocess", "infer", "postprocess"] {
        assert!(out["timings_ms"][key].as_f64().is_some(), "{out}");
    }

    // The int8 model runs too.
    let text = ok(mote(&store).args(["run", "minilm-int8", "--text", sentence]));
    assert!(text.contains("384 dims"), "{text}");

    // An image gets its top-5 classes.
    let png = dir.path().join("cat.png");
    image::RgbImage::from_fn(320, 240, |x, y| {
        image::Rgb([x as u8, y as u8, (x ^ y) as u8])
    })
    .save(&png)
    .unwrap();
    let text = ok(mote(&store)
        .arg("run")
        .arg("mobilenet")
        .arg("--image")
        .arg(&png));
    assert_eq!(
        text.lines().filter(|l| l.contains("% ")).count(),
        5,
        "{text}"
    );

    // The raw tensor pipeline reproduces PyTorch's logits.
    let save = dir.path().join("out");
    ok(mote(&store)
        .args(["run", "mobilenet", "--task", "tensor", "--tensor"])
        .arg(reference("mobilenet_input.npy"))
        .arg("--save")
        .arg(&save));
    let saved = fs::read_dir(&save).unwrap().next().unwrap().unwrap().path();
    let got = npy::read(&fs::read(saved).unwrap()).unwrap();
    let want = npy::read(&fs::read(reference("mobilenet_logits.npy")).unwrap()).unwrap();
    let diff = got
        .as_f32()
        .unwrap()
        .iter()
        .zip(want.as_f32().unwrap())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-4, "{diff}");
}

#[test]
fn run_reports_bad_inputs_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    import(
        &store,
        &shared_models().join("minilm-l6.onnx"),
        "minilm",
        &["--tokenizer", minilm_dir().to_str().unwrap()],
    );
    let jsonl = dir.path().join("in.jsonl");
    fs::write(&jsonl, b"\"fine\"\n{\"text\": \"ok\"}\n\"bad \xff\xfe\"\n").unwrap();
    let out = fails(
        mote(&store).args(["run", "minilm", "--input"]).arg(&jsonl),
        1,
    );
    assert!(
        stderr(&out).contains("line 3 is not valid UTF-8"),
        "{}",
        stderr(&out)
    );
    let out = fails(mote(&store).args(["run", "minilm", "--text", ""]), 1);
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
    let out = fails(mote(&store).args(["run", "minilm"]), 1);
    assert!(stderr(&out).contains("--text"), "{}", stderr(&out));
    let out = fails(
        mote(&store).args(["run", "minilm", "--threads", "0", "--text", "x"]),
        1,
    );
    assert!(stderr(&out).contains("between 1 and"), "{}", stderr(&out));
}

#[test]
fn native_encoder_gives_the_same_bits_on_every_isa_level() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    import(&store, &minilm_dir(), "minilm", &[]);
    let vector = |isa: &str, threads: &str| -> Vec<u32> {
        let (backend, bits) = embedding_bits(&store, "minilm", isa, threads);
        assert_eq!(backend, "native");
        bits
    };
    let best = vector("", "2");
    assert_eq!(
        best,
        vector("scalar", "1"),
        "scalar and the best ISA differ"
    );
    assert_eq!(best, vector("avx2", "1"));
    // On CPUs without AVX-512 these are capped at the best level the CPU has.
    assert_eq!(best, vector("avx512", "1"));
    assert_eq!(best, vector("avx512vnni", "1"));
}
