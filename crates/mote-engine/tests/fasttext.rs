//! fastText classifiers: Facebook's lid.176.ftz (product-quantised, hierarchical softmax)
//! against the `fasttext` package's own predictions, made once by
//! `scripts/make-fasttext-refs.py` (2,050 Django catalogue messages in 41 languages).

use std::fs;

use mote_engine::{EngineOptions, Input, Model, Output, Pipeline};
use mote_store::{ImportOptions, Store, Task};
use mote_testkit::{fixture, lid176_ftz};

struct Ref {
    text: String,
    labels: Vec<String>,
    probs: Vec<f64>,
}

fn refs() -> Vec<Ref> {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(fixture("fasttext/lid176_refs.json")).unwrap()).unwrap();
    v["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Ref {
            text: r["text"].as_str().unwrap().to_string(),
            labels: serde_json::from_value(r["labels"].clone()).unwrap(),
            probs: serde_json::from_value(r["probs"].clone()).unwrap(),
        })
        .collect()
}

fn open(store: &Store, threads: usize) -> Model {
    Model::open(
        store,
        &"lid".parse().unwrap(),
        &EngineOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap()
}

fn classes(model: &Model, texts: &[String]) -> Vec<Vec<mote_engine::Class>> {
    let Pipeline::TextClassification(p) = model.pipeline(None).unwrap() else {
        panic!("not a text-classification pipeline");
    };
    let (out, _) = Pipeline::TextClassification(p.with_top_k(5))
        .run(Input::Texts(texts.to_vec()))
        .unwrap();
    let Output::Classes(c) = out else {
        panic!("not classes")
    };
    c
}

#[test]
fn lid176_agrees_with_the_fasttext_package_on_2000_texts_in_41_languages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    store
        .import(
            &lid176_ftz(),
            Some(&"lid".parse().unwrap()),
            &ImportOptions::default(),
        )
        .unwrap();
    let model = open(&store, 2);
    assert_eq!(model.task(), Task::TextClassification);
    assert_eq!(model.backend_name(), "native-fasttext");
    let refs = refs();
    assert!(refs.len() >= 2000);
    let texts: Vec<String> = refs.iter().map(|r| r.text.clone()).collect();
    let got = classes(&model, &texts);
    let (mut top1, mut worst, mut swaps, mut worst_log) = (0, 0f64, 0, 0f64);
    for (r, g) in refs.iter().zip(&got) {
        // Up to five: fastText drops labels below exp(-11.5) (its threshold of 0 in log
        // space), and so must mote.
        assert_eq!(g.len(), r.labels.len(), "{}", r.text);
        if g[0].label == r.labels[0] {
            top1 += 1;
        }
        // Every label fastText gives, with the same probability; below the first place,
        // two labels whose probabilities agree within the tolerance may trade places.
        for (i, (l, p)) in r.labels.iter().zip(&r.probs).enumerate() {
            let Some(c) = g.iter().find(|c| &c.label == l) else {
                panic!("{:?}: mote lacks {l} (fastText's place {i})", r.text);
            };
            if g[i].label != *l {
                swaps += 1;
            }
            worst = worst.max((c.score as f64 - p).abs());
            worst_log = worst_log.max((c.logit as f64 - p.ln()).abs());
        }
    }
    println!(
        "lid.176.ftz: top-1 equal on {top1}/{}; max |probability difference| over the top 5: \
         {worst:.2e} (max |log difference| {worst_log:.2e}; {swaps} near-tied places swapped)",
        refs.len()
    );
    assert_eq!(top1, refs.len());
    assert!(worst <= 1e-4, "{worst}");
    assert_eq!(swaps, 0, "labels in another order than fastText's");

    // Bits do not depend on the batch or the thread count.
    let one = open(&store, 1);
    let alone = classes(&one, &texts[17..18]);
    assert_eq!(alone[0], got[17]);
    let again = classes(&one, &texts[..64]);
    assert_eq!(again, got[..64]);
}

#[test]
fn damaged_fasttext_files_are_refused_at_import_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let bytes = fs::read(lid176_ftz()).unwrap();
    for (name, cut) in [("cut.ftz", bytes.len() / 2), ("header.ftz", 30)] {
        let path = dir.path().join(name);
        fs::write(&path, &bytes[..cut]).unwrap();
        let e = store
            .import(&path, None, &ImportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }
    let path = dir.path().join("tail.ftz");
    let mut tail = bytes.clone();
    tail.extend_from_slice(b"extra");
    fs::write(&path, &tail).unwrap();
    let e = store
        .import(&path, None, &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 bytes follow"), "{e}");
    let e = store
        .import(
            &lid176_ftz(),
            None,
            &ImportOptions {
                task: Some(Task::TextEmbedding),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("classifies text"), "{e}");
}

/// Inputs the fuzzer (`model_files`, selector 2) found, each now a model or an error.
#[test]
fn fuzz_found_fasttext_files_load_or_fail_without_panicking() {
    // Label counts above fastText's 1e15 placeholder walked the Huffman build past the
    // end of its tree.
    let bytes = fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fasttext_huffman_overflow.bin"),
    )
    .unwrap();
    let ft = mote_engine::fasttext::FastText::load(&bytes).unwrap();
    for text in ["", "hello world", "a b c d e f g"] {
        let p = ft.predict(text, 3, 0.0).unwrap();
        assert!(p.len() <= 3);
    }
}
