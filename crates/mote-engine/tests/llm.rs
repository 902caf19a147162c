//! The GGUF language-model path against llama.cpp's reference outputs (in
//! `shared/models/ref`), determinism across threads, batching and ISA, and bad inputs.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use mote_engine::llm::{ChatMessage, GenerateOptions, Llm, SamplingOptions};
use mote_engine::{EngineOptions, Model, npy};
use mote_store::{ImportOptions, Reference, Store};
use mote_testkit::{reference, smollm2_gguf};

fn open(dir: &Path, threads: usize) -> Model {
    let store = Store::open(dir.join("store")).unwrap();
    let r: Reference = "smollm2:test".parse().unwrap();
    if store.resolve(&r).is_err() {
        store
            .import(
                &smollm2_gguf(),
                Some(&"smollm2:test".parse().unwrap()),
                &ImportOptions::default(),
            )
            .unwrap();
    }
    Model::open(
        &store,
        &r,
        &EngineOptions {
            threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap()
}

fn llm(model: &Model) -> Arc<Llm> {
    model.llm().expect("a language model").clone()
}

fn ref_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&fs::read(reference(name)).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_round_trips_llama_cpp_prompt_ids() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), 1);
    let llm = llm(&m);
    let want = ids(&ref_json("smollm2_tokens.json")["prompt_ids"]);
    let tok = llm.tokenizer();
    let text = tok.decode(&want);
    assert_eq!(tok.encode_prompt(&text).unwrap(), want, "text: {text:?}");
}

#[test]
fn logits_and_teacher_forced_argmax_match_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), 2);
    let llm = llm(&m);
    let tf = ref_json("smollm2_teacher_forced.json");
    let all = ids(&tf["ids"]);
    let want_argmax = ids(&tf["teacher_forced_argmax"]);
    let prompt = ids(&ref_json("smollm2_tokens.json")["prompt_ids"]);
    let model = llm.model();
    let mut seq = model.sequence();
    let logits = model
        .forward(&mut [&mut seq], &[&all], true)
        .unwrap()
        .remove(0);
    let vocab = model.config().vocab;
    // Last prompt position against llama.cpp's logits.
    let want_t =
        npy::read(&fs::read(reference("smollm2_prompt_last_logits.npy")).unwrap()).unwrap();
    let want = want_t.as_f32().expect("reference logits are f32");
    let got = &logits[(prompt.len() - 1) * vocab..prompt.len() * vocab];
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("max |logit - llama.cpp| at the last prompt position: {max_diff}");
    let agree = (0..all.len())
        .filter(|&i| {
            mote_engine::llm::sample::argmax(&logits[i * vocab..(i + 1) * vocab]) == want_argmax[i]
        })
        .count();
    let rate = agree as f64 / all.len() as f64;
    eprintln!(
        "teacher-forced argmax agreement: {agree}/{} = {rate:.4}",
        all.len()
    );
    // mote evaluates every row as llama.cpp's CPU backend evaluates a prompt (Q8_1
    // activations, f16 attention in tinyBLAS order, its SIMD expf, libm RoPE angles), so
    // on x86-64 with glibc it reproduces the references bit for bit (max 0, 256/256). The
    // bars are the issue's: a wrong rounding anywhere drifts past them within 30 layers.
    let mean_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / got.len() as f32;
    eprintln!("mean |logit - llama.cpp|: {mean_diff}");
    assert!(rate >= 0.98, "agreement {rate}");
    assert!(max_diff <= 0.25, "max abs logit difference {max_diff}");
    assert!(mean_diff <= 0.05, "mean abs logit difference {mean_diff}");
}

#[test]
fn generation_is_identical_across_threads_batching_and_chunking() {
    let dir = tempfile::tempdir().unwrap();
    let one = llm(&open(dir.path(), 1));
    let two = llm(&open(dir.path(), 2));
    let tok = one.tokenizer();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
    ]
    .iter()
    .map(|p| tok.encode_prompt(p).unwrap())
    .collect();
    let opts = GenerateOptions {
        max_tokens: 24,
        sampling: SamplingOptions {
            seed: 7,
            ..Default::default()
        },
        stop_at_end: false,
        ..Default::default()
    };
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| one.generate(p, &opts, &mut |_| true).unwrap().tokens)
        .collect();
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let batch = two
        .generate_batch(&refs, &vec![opts.clone(); 3], &mut |_, _| true)
        .unwrap();
    for (a, b) in alone.iter().zip(&batch) {
        assert_eq!(a, &b.tokens);
        assert_eq!(a.len(), 24);
    }
    // Token-by-token prompt processing gives the same logits bits as one pass.
    let model = two.model();
    let mut s1 = model.sequence();
    let l1 = model
        .forward(&mut [&mut s1], &[&prompts[2]], false)
        .unwrap();
    let mut s2 = model.sequence();
    let mut last = Vec::new();
    for t in &prompts[2] {
        last = model.forward(&mut [&mut s2], &[&[*t]], false).unwrap();
    }
    assert!(
        l1[0]
            .iter()
            .zip(&last[0])
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

#[test]
fn chat_answers_with_the_models_template() {
    let dir = tempfile::tempdir().unwrap();
    let llm = llm(&open(dir.path(), 2));
    let ids = llm
        .chat_tokens(&[ChatMessage::new("user", "What is 2 plus 2?")], true)
        .unwrap();
    let text = llm.tokenizer().decode(&ids);
    // SmolLM2's template: a default system turn, the user turn, the assistant turn opened.
    assert!(
        text.starts_with("system\nYou are a helpful AI assistant"),
        "{text:?}"
    );
    assert!(
        text.ends_with("user\nWhat is 2 plus 2?\nassistant\n"),
        "{text:?}"
    );
    assert_eq!(
        ids.iter().filter(|&&t| t == 1).count(),
        3,
        "three <|im_start|> tokens"
    );
    let g = llm
        .generate(
            &ids,
            &GenerateOptions {
                max_tokens: 40,
                sampling: SamplingOptions::greedy(),
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
    eprintln!("answer: {:?}", g.text);
    assert!(g.text.contains('4'), "{:?}", g.text);
    assert_eq!(g.finish_reason, mote_engine::llm::FinishReason::Stop);
}

#[test]
fn bad_inputs_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let llm = llm(&open(dir.path(), 1));
    let model = llm.model();
    let mut s = model.sequence();
    let e = model
        .forward(&mut [&mut s], &[&[49152]], false)
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let e = llm
        .generate(&[], &GenerateOptions::default(), &mut |_| true)
        .unwrap_err();
    assert!(e.to_string().contains("prompt is empty"), "{e}");
    let long = vec![504u32; model.config().context];
    let e = llm
        .generate(&long, &GenerateOptions::default(), &mut |_| true)
        .unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    let bad = GenerateOptions {
        sampling: SamplingOptions {
            top_p: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = llm.generate(&[504], &bad, &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
}
