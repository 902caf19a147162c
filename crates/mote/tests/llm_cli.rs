//! `mote run --prompt` and `mote chat` with the SmolLM2 GGUF artifact, through the real binary.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::*;

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn chat(store: &std::path::Path, threads: &str, input: &str) -> Vec<serde_json::Value> {
    let mut child = mote(store)
        .args([
            "chat",
            "smollm2",
            "--json",
            "--seed",
            "42",
            "--temperature",
            "0.3",
        ])
        .args(["--max-tokens", "24", "--threads", threads])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&String::from_utf8(out.stdout).unwrap())
}

#[test]
fn chat_answers_and_is_reproducible_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &smollm2_gguf(), "smollm2", &[]);
    let input = "What is 2 plus 2?\n/reset\nWhat is 2 plus 2?\n";
    let one = chat(&store, "1", input);
    let two = chat(&store, "2", input);
    assert_eq!(one.len(), 2, "{one:?}");
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a["ids"], b["ids"], "tokens differ between 1 and 2 threads");
        assert_eq!(a["text"], b["text"]);
    }
    let answer = one[0]["text"].as_str().unwrap();
    assert!(answer.contains('4'), "{answer:?}");
    // After /reset the same question is asked afresh (same prompt length), with the
    // second turn's seed.
    assert_eq!(one[0]["prompt_tokens"], one[1]["prompt_tokens"]);
}

#[test]
fn run_completes_a_prompt_identically_on_every_isa_level() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let digest = import(&store, &smollm2_gguf(), "smollm2", &[]);
    let run = |isa: &str, threads: &str| -> serde_json::Value {
        serde_json::from_str(&ok(mote(&store).env("MOTE_ISA", isa).args([
            "run",
            "smollm2",
            "--prompt",
            "The three primary colors are",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--threads",
            threads,
            "--json",
        ])))
        .unwrap()
    };
    let avx = run("avx2", "2");
    let scalar = run("scalar", "1");
    assert_eq!(avx["ids"], scalar["ids"]);
    // VNNI's lane sums (capped at the CPU's best level where it has no AVX-512 VNNI).
    assert_eq!(run("avx512vnni", "1")["ids"], scalar["ids"]);
    assert_eq!(avx["ids"].as_array().unwrap().len(), 8);
    assert_eq!(avx["model"]["digest"], digest.as_str());
    assert_eq!(avx["finish_reason"], "length");
    // Without --json, stdout holds only the generated text (timings go to stderr).
    let out = ok(mote(&store).args([
        "run",
        "smollm2",
        "--prompt",
        "The three primary colors are",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]));
    assert_eq!(out.trim_end_matches('\n'), avx["text"].as_str().unwrap());
}

#[test]
fn generation_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &smollm2_gguf(), "smollm2", &[]);
    import(&store, &minilm_dir(), "minilm", &[]);
    let e = stderr(&fails(mote(&store).args(["run", "smollm2"]), 1));
    assert!(e.contains("--prompt"), "{e}");
    let e = stderr(&fails(
        mote(&store).args(["run", "smollm2", "--text", "hello"]),
        1,
    ));
    assert!(e.contains("language model"), "{e}");
    let e = stderr(&fails(
        mote(&store).args(["run", "minilm", "--prompt", "hello"]),
        1,
    ));
    assert!(e.contains("--prompt is for language models"), "{e}");
    let e = stderr(&fails(
        mote(&store).args(["run", "smollm2", "--prompt", "hi", "--top-p", "2"]),
        1,
    ));
    assert!(e.contains("top_p"), "{e}");
    let e = stderr(&fails(
        mote(&store).args(["run", "smollm2", "--prompt", ""]),
        1,
    ));
    assert!(e.contains("prompt is empty"), "{e}");
    let mut child = mote(&store)
        .args(["chat", "minilm"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(child.status.code(), Some(1));
    let e = String::from_utf8_lossy(&std::mem::take(&mut child.stderr)).into_owned();
    assert!(e.contains("not a language model"), "{e}");
}
