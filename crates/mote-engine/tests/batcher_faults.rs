//! The batcher's fault isolation on a real model: a request that makes an instance panic
//! fails alone, even when it was merged into one batch with well-behaved requests.
//!
//! Needs the `fault-injection` feature (the workspace's test build has it: `mote`'s tests
//! enable it); without it this file is empty.
#![cfg(feature = "fault-injection")]

use std::sync::Arc;
use std::time::Duration;

use mote_engine::batcher::{BatchLimits, Batcher, NoObserver, PANIC_TEXT};
use mote_engine::{EngineOptions, Input, Model, Output, Pipeline};
use mote_store::{ImportOptions, Store};
use mote_testkit::minilm_dir;

fn pipeline(dir: &std::path::Path) -> Pipeline {
    let store = Store::open(dir.join("store")).unwrap();
    store
        .import(
            &minilm_dir(),
            Some(&"minilm".parse().unwrap()),
            &ImportOptions::default(),
        )
        .unwrap();
    let model = Model::open(
        &store,
        &"minilm".parse().unwrap(),
        &EngineOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    model.pipeline(None).unwrap()
}

fn texts(t: &[&str]) -> Input {
    Input::Texts(t.iter().map(|s| s.to_string()).collect())
}

#[test]
fn a_panicking_request_merged_with_others_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path());
    let (alone, _) = p.run(texts(&["fine", "also fine"])).unwrap();
    // One instance that waits long enough for all three requests to join one batch.
    let limits = BatchLimits {
        max_wait: Duration::from_millis(500),
        ..Default::default()
    };
    let b = Batcher::start("minilm", vec![p], limits, Arc::new(NoObserver), None).unwrap();
    let wait = Duration::from_secs(60);
    let (good1, poison, good2) = std::thread::scope(|s| {
        let g1 = s.spawn(|| b.run(texts(&["fine"]), wait));
        std::thread::sleep(Duration::from_millis(20));
        let bad = s.spawn(|| b.run(texts(&["x", PANIC_TEXT]), wait));
        std::thread::sleep(Duration::from_millis(20));
        let g2 = s.spawn(|| b.run(texts(&["also fine"]), wait));
        (g1.join().unwrap(), bad.join().unwrap(), g2.join().unwrap())
    });
    let embedding = |a: Result<Option<mote_engine::batcher::Answer>, _>| match a {
        Ok(Some(Ok((Output::Embeddings(e), _)))) => e,
        other => panic!(
            "a well-behaved request failed: {:?}",
            other.map(|o| o.map(|r| r.err()))
        ),
    };
    let Output::Embeddings(alone) = alone else {
        panic!("not embeddings")
    };
    // The well-behaved requests get exactly the bits they get on their own.
    assert_eq!(embedding(good1), vec![alone[0].clone()]);
    assert_eq!(embedding(good2), vec![alone[1].clone()]);
    match poison {
        Ok(Some(Err(e))) => assert!(e.to_string().contains("panicked"), "{e}"),
        other => panic!(
            "the panicking request did not fail: {:?}",
            other.map(|o| o.map(|r| r.is_ok()))
        ),
    }
    // Once merged (all three suspects), once alone (the culprit found).
    assert_eq!(b.restarts(), 2);
    assert_eq!(b.depth(), 0);
    // And the batcher serves on.
    assert!(matches!(b.run(texts(&["fine"]), wait), Ok(Some(Ok(_)))));
}
