//! Aggregate generation throughput when N sequences are decoded together (continuous
//! batching in one process, no HTTP). Usage: llm_batch MODEL.gguf THREADS N TOKENS
use std::time::Instant;

use mote_engine::llm::{GenerateOptions, SamplingOptions};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (threads, n, tokens): (usize, usize, usize) = (
        a[2].parse().unwrap(),
        a[3].parse().unwrap(),
        a[4].parse().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = mote_store::Store::open(dir.path()).unwrap();
    store
        .import(
            std::path::Path::new(&a[1]),
            Some(&"m:latest".parse().unwrap()),
            &Default::default(),
        )
        .unwrap();
    let model = mote_engine::Model::open(
        &store,
        &"m:latest".parse().unwrap(),
        &mote_engine::EngineOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap();
    let llm = model.llm().unwrap();
    let prompt = llm
        .tokenizer()
        .encode_prompt("Tell me a fact about the sea.")
        .unwrap();
    let prompts: Vec<&[u32]> = (0..n).map(|_| prompt.as_slice()).collect();
    let opts: Vec<GenerateOptions> = (0..n)
        .map(|i| GenerateOptions {
            max_tokens: tokens,
            sampling: SamplingOptions {
                seed: i as u64,
                ..Default::default()
            },
            stop_at_end: false,
            ..Default::default()
        })
        .collect();
    let t = Instant::now();
    let g = llm
        .generate_batch(&prompts, &opts, &mut |_, _| true)
        .unwrap();
    let s = t.elapsed().as_secs_f64();
    let total: usize = g.iter().map(|g| g.tokens.len()).sum();
    println!(
        "{n} sequences x {tokens} tokens, {threads} threads: {s:.2} s, {:.1} tok/s aggregate",
        total as f64 / s
    );
}
