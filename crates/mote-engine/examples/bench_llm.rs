//! LLM speed on the shared prompt (see bench/llm.sh): imports a GGUF file into a temporary
//! store, then for the given thread count measures prompt processing (the 128 prompt ids of
//! `ref/smollm2_tokens.json`, a fresh sequence each run) and greedy generation of 128 tokens
//! after it. Prints one JSON line with medians and the process's peak RSS.
//!
//! Usage: bench_llm SHARED_MODELS_DIR MODEL.gguf THREADS

use std::path::PathBuf;
use std::time::Instant;

use mote_engine::llm::{GenerateOptions, SamplingOptions};
use mote_engine::{EngineOptions, Model};
use mote_store::Store;

const RUNS: usize = 7;
const GENERATE: usize = 128;

fn rss_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert!(
        args.len() == 4,
        "usage: bench_llm SHARED_MODELS_DIR MODEL.gguf THREADS"
    );
    let shared = PathBuf::from(&args[1]);
    let threads: usize = args[3].parse().expect("THREADS is a number");
    let tokens: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared.join("ref/smollm2_tokens.json")).expect("ref/smollm2_tokens.json"),
    )
    .unwrap();
    let prompt: Vec<u32> = tokens["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    store
        .import(
            std::path::Path::new(&args[2]),
            Some(&"bench:llm".parse().unwrap()),
            &Default::default(),
        )
        .unwrap();
    let base_rss = rss_kib("VmRSS:");
    let model = Model::open(
        &store,
        &"bench:llm".parse().unwrap(),
        &EngineOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap();
    let llm = model.llm().expect("a GGUF language model").clone();
    if std::env::var_os("BENCH_RSS_TRACE").is_some() {
        eprintln!(
            "rss after open: {} KiB (base {base_rss}), hwm {}",
            rss_kib("VmRSS:"),
            rss_kib("VmHWM:")
        );
    }
    let lm = llm.model();
    // Warm-up (pages the weights in).
    let mut s = lm.sequence();
    lm.forward(&mut [&mut s], &[&prompt], false).unwrap();
    if std::env::var_os("BENCH_RSS_TRACE").is_some() {
        eprintln!(
            "rss after warm-up: {} KiB, hwm {}",
            rss_kib("VmRSS:"),
            rss_kib("VmHWM:")
        );
    }
    let mut prompt_tps = Vec::new();
    let prompt_runs = if std::env::var_os("BENCH_GEN_ONLY").is_some() {
        1
    } else {
        RUNS
    };
    for _ in 0..prompt_runs {
        let mut s = lm.sequence();
        let t = Instant::now();
        lm.forward(&mut [&mut s], &[&prompt], false).unwrap();
        prompt_tps.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    let mut gen_tps = Vec::new();
    let opts = GenerateOptions {
        max_tokens: GENERATE,
        sampling: SamplingOptions::greedy(),
        stop_at_end: false,
        ..Default::default()
    };
    let mut same_as_llama_cpp = None;
    let gen_runs = if std::env::var_os("BENCH_GEN_ONLY").is_some() {
        6
    } else {
        3
    };
    for _ in 0..gen_runs {
        let g = llm.generate(&prompt, &opts, &mut |_| true).unwrap();
        gen_tps.push(g.tokens_per_second());
        let want: Vec<u32> = tokens["greedy_ids_128"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = g
            .tokens
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        same_as_llama_cpp = Some(n);
    }
    println!(
        "{}",
        serde_json::json!({
            "engine": "mote", "threads": threads,
            "prompt_tokens": prompt.len(), "prompt_tok_s": median(prompt_tps),
            "generated_tokens": GENERATE, "gen_tok_s": median(gen_tps),
            "peak_rss_mib": rss_kib("VmHWM:") as f64 / 1024.0,
            "model_rss_mib": (rss_kib("VmHWM:").saturating_sub(base_rss)) as f64 / 1024.0,
            "greedy_prefix_equal_to_llama_cpp": same_as_llama_cpp,
        })
    );
}
