//! `mote serve` end to end: the real binary on loopback, driven by the real `openai` and
//! `tritonclient` Python packages (installed by scripts/test.sh into target/pyenv), results
//! compared with `mote run`; overload behaviour with many concurrent raw HTTP clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A bare HTTP/1.1 request; returns (status, headers, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn f32_bits(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| (x.as_f64().unwrap() as f32).to_bits())
        .collect()
}

#[test]
fn real_clients_get_what_mote_run_computes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let minilm = import(&store, &minilm_dir(), "minilm", &[]);
    let smollm = import(&store, &smollm2_gguf(), "smollm2", &[]);
    import(
        &store,
        &shared_models().join("mobilenetv2.onnx"),
        "mobilenet",
        &[],
    );
    let server = Server::start(
        &store,
        &["minilm", "smollm2", "mobilenet", "--threads", "2"],
    );
    let out = dir.path().join("clients.json");
    let input = shared_models().join("ref/mobilenet_input.npy");
    let status = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/clients.py"))
        .arg(format!("http://{}", server.addr))
        .arg(&out)
        .arg(&input)
        .status()
        .unwrap();
    assert!(status.success(), "the Python clients failed");
    let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();

    assert_eq!(
        got["models"],
        serde_json::json!(["minilm", "mobilenet", "smollm2"])
    );
    assert_eq!(got["digest_header"], minilm.as_str());
    // Embeddings: bit for bit what `mote run` gives.
    let texts = [
        "How do I reset my password?",
        "The weather is lovely today.",
        "ok",
    ];
    let mut cmd = mote(&store);
    cmd.args(["run", "minilm", "--json"]);
    for t in texts {
        cmd.args(["--text", t]);
    }
    let run: serde_json::Value = serde_json::from_str(&ok(&mut cmd)).unwrap();
    for (i, e) in got["embeddings"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            f32_bits(e),
            f32_bits(&run["results"][i]["vector"]),
            "text {i}"
        );
    }
    assert_eq!(
        f32_bits(&got["embedding_base64_first"]),
        f32_bits(&run["results"][0]["vector"])
    );
    // Chat: coherent, and streaming gives the same text in pieces.
    let chat = got["chat"].as_str().unwrap();
    assert!(chat.contains('4'), "{chat:?}");
    assert_eq!(got["chat_stream"], got["chat"]);
    assert!(got["chat_stream_pieces"].as_u64().unwrap() > 1);
    assert_eq!(got["chat_finish"], "stop");
    // Completion: what `mote run --prompt` prints.
    let run: serde_json::Value = serde_json::from_str(&ok(mote(&store).args([
        "run",
        "smollm2",
        "--prompt",
        "The three primary colors are",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    ])))
    .unwrap();
    assert_eq!(got["completion"], run["text"]);
    assert_eq!(run["model"]["digest"], smollm.as_str());
    assert!(
        got["unknown_model"].as_str().unwrap().contains("no model"),
        "{}",
        got["unknown_model"]
    );
    // tritonclient: health, metadata, MobileNetV2 logits equal to `mote run`'s.
    assert_eq!(got["server_live"], true);
    assert_eq!(got["server_ready"], true);
    assert_eq!(got["server_metadata"]["name"], "mote");
    assert_eq!(got["model_metadata"]["inputs"][0]["name"], "input");
    let run: serde_json::Value = serde_json::from_str(&ok(mote(&store).args([
        "run",
        "mobilenet",
        "--tensor",
        &format!("input={}", input.display()),
        "--json",
    ])))
    .unwrap();
    assert_eq!(
        f32_bits(&got["mobilenet_logits"]),
        f32_bits(&run["results"][0]["data"])
    );
    // Metrics name the digests and count the requests.
    let (status, _, metrics) = http(&server.addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(metrics.contains(&format!(
        "mote_model_info{{model=\"minilm\",digest=\"{minilm}\"}} 1"
    )));
    assert!(
        metrics.contains(
            "mote_requests_total{model=\"minilm\",endpoint=\"embeddings\",status=\"200\"}"
        )
    );
    assert!(metrics.contains("mote_tokens_generated_total{model=\"smollm2\"}"));
    assert!(server.stop().success(), "SIGTERM must drain and exit 0");
}

#[test]
fn overload_gets_429_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &minilm_dir(), "minilm", &[]);
    let server = Server::start(
        &store,
        &[
            "minilm",
            "--max-queue",
            "4",
            "--max-batch-items",
            "2",
            "--threads",
            "1",
        ],
    );
    let long = "word ".repeat(200);
    let body = serde_json::json!({"model": "minilm", "input": vec![long; 8]}).to_string();
    let rss_before = server.rss_kib();
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|_| {
                s.spawn(|| {
                    let (status, head, _) = http(&server.addr, "POST", "/v1/embeddings", &body);
                    (status, head)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let busy: Vec<&String> = results
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, h)| h)
        .collect();
    eprintln!(
        "64 concurrent requests: {ok} answered, {} refused with 429",
        busy.len()
    );
    assert_eq!(ok + busy.len(), 64, "only 200 or 429: {results:?}");
    assert!(ok >= 1 && !busy.is_empty(), "{ok} ok, {} busy", busy.len());
    assert!(
        busy.iter()
            .all(|h| h.to_ascii_lowercase().contains("retry-after: 1")),
        "429 without Retry-After"
    );
    let (status, _, _) = http(&server.addr, "GET", "/v2/health/ready", "");
    assert_eq!(status, 200);
    let (status, _, _) = http(
        &server.addr,
        "POST",
        "/v1/embeddings",
        r#"{"model":"minilm","input":"still here"}"#,
    );
    assert_eq!(status, 200);
    let grown = server.rss_kib().saturating_sub(rss_before);
    eprintln!("RSS growth over the burst: {grown} KiB");
    assert!(grown < 256 * 1024, "RSS grew by {grown} KiB");
    // Bad requests get clear errors, not crashes.
    let (status, _, body) = http(&server.addr, "POST", "/v1/embeddings", "{not json");
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = http(
        &server.addr,
        "POST",
        "/v1/embeddings",
        r#"{"model":"minilm","input":[]}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(server.stop().success());
}

/// The digest a response names.
fn digest_of(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-mote-model-digest")
            .then(|| v.trim().to_string())
    })
}

#[test]
fn moving_the_tag_and_reloading_swaps_the_model_under_load_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let v1 = import(&store, &minilm_dir(), "emb:v1", &[]);
    // A second version: same weights, different settings (so a different digest and
    // visibly different vectors: not normalised).
    let v2 = import(&store, &minilm_dir(), "emb:v2", &["--no-normalize"]);
    assert_ne!(v1, v2);
    ok(mote(&store).args(["tag", "emb:v1", "emb"]));
    // Two instances (one thread each) take batches from one queue: reloads swap both, and
    // both compute the same bits.
    let server = Server::start(&store, &["emb", "--threads", "2", "--instances", "2"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let body = r#"{"model":"emb","input":["the tag moves while we ask","again"]}"#;
    type Seen = (u16, Option<String>, f64, Vec<u32>);
    let seen: Vec<Vec<Seen>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut seen = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let (status, head, body) =
                            http(&server.addr, "POST", "/v1/embeddings", body);
                        let parsed = serde_json::from_str::<serde_json::Value>(&body).ok();
                        let bits = parsed
                            .as_ref()
                            .map(|v| f32_bits(&v["data"][0]["embedding"]))
                            .unwrap_or_default();
                        let norm = parsed
                            .and_then(|v| {
                                let e = v["data"][0]["embedding"].as_array()?.clone();
                                Some(
                                    e.iter()
                                        .map(|x| x.as_f64().unwrap().powi(2))
                                        .sum::<f64>()
                                        .sqrt(),
                                )
                            })
                            .unwrap_or(f64::NAN);
                        seen.push((status, digest_of(&head), norm, bits));
                    }
                    seen
                })
            })
            .collect();
        let pause = || std::thread::sleep(Duration::from_millis(700));
        pause();
        // Move the tag, reload through the API: the answer names the swap.
        ok(mote(&store).args(["tag", "emb:v2", "emb"]));
        let (status, _, answer) = http(&server.addr, "POST", "/admin/reload", "");
        assert_eq!(status, 200, "{answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["swapped"][0]["from"], v1.as_str());
        assert_eq!(answer["swapped"][0]["to"], v2.as_str());
        pause();
        // Roll back, reload by SIGHUP; wait until the server says it serves v1 again.
        ok(mote(&store).args(["rollback", "emb"]));
        Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, _, models) = http(&server.addr, "GET", "/v1/models", "");
            if models.contains(&v1) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "SIGHUP did not reload: {models}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pause();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let total: usize = seen.iter().map(Vec::len).sum();
    eprintln!("{total} requests during the swaps");
    for (i, client) in seen.iter().enumerate() {
        assert!(
            client.iter().all(|(status, ..)| *status == 200),
            "client {i}: a request failed during a swap: {:?}",
            client.iter().filter(|r| r.0 != 200).collect::<Vec<_>>()
        );
        // Each client sees v1, then v2, then v1 again: never a flip back and forth.
        let mut phases: Vec<&str> = Vec::new();
        for (_, d, norm, bits) in client {
            let d = d.as_deref().expect("every response names its digest");
            // Whichever instance answered, a version's vector has the same bits.
            let first = seen
                .iter()
                .flatten()
                .find(|r| r.1.as_deref() == Some(d))
                .expect("this response itself");
            assert_eq!(bits, &first.3, "{d}: instances disagree");
            // The vectors are the named version's: v1 normalised, v2 not.
            assert_eq!((norm - 1.0).abs() < 1e-4, d == v1, "{d}: norm {norm}");
            if phases.last() != Some(&d) {
                phases.push(d);
            }
        }
        assert_eq!(
            phases,
            [v1.as_str(), v2.as_str(), v1.as_str()],
            "client {i}"
        );
    }
    // The swaps are journaled.
    let log = std::fs::read_to_string(store.join("journal.jsonl")).unwrap_or_default();
    assert_eq!(log.matches("serve-reload").count(), 2, "{log}");
    assert!(server.stop().success());
}

#[test]
fn a_fasttext_classifier_answers_tei_predict_and_kserve_as_mote_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let lid = import(&store, &lid176_ftz(), "lid", &[]);
    let server = Server::start(&store, &["lid", "--threads", "2"]);
    let texts = [
        "Bonjour, comment allez-vous ?",
        "Das ist ein kleiner Test.",
        "こんにちは",
    ];
    let mut cmd = mote(&store);
    cmd.args(["run", "lid", "--json"]);
    for t in texts {
        cmd.args(["--text", t]);
    }
    let run: serde_json::Value = serde_json::from_str(&ok(&mut cmd)).unwrap();
    assert_eq!(run["task"], "text-classification");
    assert_eq!(run["results"][0][0]["label"], "fr");
    assert_eq!(run["results"][1][0]["label"], "de");
    assert_eq!(run["results"][2][0]["label"], "ja");
    let pairs = |v: &serde_json::Value| -> Vec<(String, u32)> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|c| {
                (
                    c["label"].as_str().unwrap().to_string(),
                    (c["score"].as_f64().unwrap() as f32).to_bits(),
                )
            })
            .collect()
    };
    let want = |i: usize| pairs(&run["results"][i]);
    // TEI's /predict: one text gives one list, a list (or TEI's list of one-text lists)
    // gives a list of lists; the model may be left out when one classifier is served.
    let (status, head, body) = http(
        &server.addr,
        "POST",
        "/predict",
        &serde_json::json!({"inputs": texts[0]}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    assert!(head.contains(&lid), "{head}");
    assert_eq!(pairs(&serde_json::from_str(&body).unwrap()), want(0));
    for inputs in [
        serde_json::json!(texts),
        serde_json::json!(texts.map(|t| [t])),
    ] {
        let (status, _, body) = http(
            &server.addr,
            "POST",
            "/predict",
            &serde_json::json!({"inputs": inputs, "model": "lid"}).to_string(),
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for i in 0..texts.len() {
            assert_eq!(pairs(&v[i]), want(i), "text {i}");
        }
    }
    // KServe v2: BYTES in, probabilities and labels out.
    let (status, _, body) = http(
        &server.addr,
        "POST",
        "/v2/models/lid/infer",
        &serde_json::json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts}]})
            .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let probs = &v["outputs"][0];
    let labels = &v["outputs"][1];
    assert_eq!(probs["shape"], serde_json::json!([3, 5]));
    // Rows with fewer labels (fastText drops those under exp(-11.5)) are padded.
    for i in 0..texts.len() {
        let got: Vec<(String, u32)> = (0..5)
            .map(|k| {
                (
                    labels["data"][i * 5 + k].as_str().unwrap().to_string(),
                    (probs["data"][i * 5 + k].as_f64().unwrap() as f32).to_bits(),
                )
            })
            .collect();
        let mut padded = want(i);
        padded.resize(5, (String::new(), 0));
        assert_eq!(got, padded, "text {i}");
    }
    assert!(
        want(1).len() < 5,
        "a row with fewer than five labels is checked"
    );
    // Refusals name the problem.
    let (status, _, body) = http(
        &server.addr,
        "POST",
        "/predict",
        &serde_json::json!({"inputs": [["a", "b"]]}).to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("one text"), "{body}");
    let many: Vec<&str> = vec!["x"; 300];
    let (status, _, body) = http(
        &server.addr,
        "POST",
        "/predict",
        &serde_json::json!({ "inputs": many }).to_string(),
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("--max-inputs"), "{body}");
    let (status, _, body) = http(
        &server.addr,
        "POST",
        "/v1/embeddings",
        &serde_json::json!({"model": "lid", "input": "hi"}).to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("text-classification"), "{body}");
    assert!(server.stop().success());
}
