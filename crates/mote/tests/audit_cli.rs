//! `mote audit` end to end with the real binary and real models: the CI gate (the committed
//! MiniLM policy), the example policies of every task (reports written, abnormal battery
//! clean), thresholds that fail, fidelity against a baseline, a memory-limited child, and
//! the soak's leak detection against a leaking process and the real server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/audit")
}

/// `mote audit` with the reference data directory the example policies name.
fn audit(store: &Path, args: &[&str]) -> Command {
    let mut cmd = mote(store);
    cmd.env("MOTE_REF_DIR", shared_models().join("ref"))
        .arg("audit")
        .args(args);
    cmd
}

fn report(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

/// The three files exist, the HTML is self-contained and holds at least `charts` SVG charts.
fn check_files(dir: &Path, charts: usize) {
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.starts_with("# Audit of "), "{md}");
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    let svgs = html.matches("<svg").count();
    assert!(svgs >= charts, "{svgs} charts, expected {charts}");
    assert_eq!(svgs, html.matches("</svg>").count());
    assert!(html.contains("<polyline"), "charts have lines");
    for external in [
        "src=", "href=", "url(", "@import", "<script", "<link", "<iframe",
    ] {
        assert!(
            !html.contains(external),
            "the HTML references something external: {external}"
        );
    }
}

/// Every abnormal-input case ended in a clean refusal or a valid output.
fn check_abnormal(r: &Value, min_cases: usize) {
    let cases = r["abnormal"].as_array().expect("the battery ran");
    assert!(cases.len() >= min_cases, "{} cases", cases.len());
    for c in cases {
        assert_eq!(c["passed"], true, "abnormal case failed: {c}");
        assert!(
            ["output", "refused"].contains(&c["outcome"].as_str().unwrap()),
            "{c}"
        );
    }
    assert!(
        cases.iter().any(|c| c["outcome"] == "refused"),
        "some inputs must be refused"
    );
}

#[test]
fn ci_gate_minilm_audit_passes_and_is_bound_to_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let digest = import(&store, &minilm_dir(), "minilm", &[]);
    let out = dir.path().join("report");
    let policy = examples().join("minilm-ci.toml");
    let stdout = ok(audit(
        &store,
        &["minilm", "--policy", policy.to_str().unwrap(), "--out"],
    )
    .arg(&out));
    assert!(stdout.contains("audit of minilm passed"), "{stdout}");
    check_files(&out, 4);
    let r = report(&out);
    assert_eq!(r["schema"], "mote.audit.report/v1");
    assert_eq!(r["passed"], true, "{:#}", r["failures"]);
    assert_eq!(r["model"]["digest"], digest.as_str());
    assert_eq!(r["model"]["backend"], "native");
    assert!(r["accuracy"]["values"]["cosine_min"].as_f64().unwrap() >= 0.9999);
    assert_eq!(r["constrained"]["loaded"], true);
    check_abnormal(&r, 10);
    let stored = stdout.trim().rsplit(' ').next().unwrap().to_string();
    assert!(stored.starts_with("sha256:"), "{stdout}");

    // Bound to the model: a referrer of its manifest, journaled, readable back.
    let info: Value =
        serde_json::from_str(&ok(mote(&store).args(["inspect", "minilm", "--json"]))).unwrap();
    let referrers = info["referrers"].as_array().unwrap();
    assert_eq!(referrers.len(), 1);
    assert_eq!(referrers[0]["digest"], stored.as_str());
    assert_eq!(
        referrers[0]["artifactType"],
        "application/vnd.mote.audit.report.v1+json"
    );
    let shown = ok(mote(&store).args(["audit", "show", "minilm"]));
    assert_eq!(
        shown,
        std::fs::read_to_string(out.join("report.md")).unwrap()
    );
    let listed = ok(mote(&store).args(["audit", "show", "minilm", "--all"]));
    assert!(
        listed.contains(&stored) && listed.contains("passed"),
        "{listed}"
    );
    assert!(ok(mote(&store).args(["journal", "verify"])).starts_with("journal ok"));
    let journal: Value =
        serde_json::from_str(&ok(mote(&store).args(["journal", "--json"]))).unwrap();
    let record = journal
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"]["kind"] == "audit")
        .expect("an audit record");
    assert_eq!(record["event"]["subject"], digest.as_str());
    assert_eq!(record["event"]["detail"]["report"], stored.as_str());
    assert_eq!(record["event"]["detail"]["passed"], true);
    // The stored report.json is the one on disk, byte for byte (its digest is journaled).
    let json = std::fs::read(out.join("report.json")).unwrap();
    let want = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&json))
    );
    assert_eq!(record["event"]["detail"]["report_json"], want.as_str());
    // Removing the model removes its audits; gc frees them.
    ok(mote(&store).args(["rm", &digest]));
    ok(mote(&store).args(["gc"]));
    assert!(ok(mote(&store).args(["ls"])).lines().count() <= 1);
}

/// Import `source` as `name`, audit it with the example `policy` (a soak of `soak_s`
/// seconds: LLM windows need a few answers each), and check
/// what every example audit must give: the three files with `charts` charts, an abnormal
/// battery of at least `cases` cases without a crash, and — if it failed — only speed
/// thresholds failing (the machine may be slow or busy).
fn audit_example(
    soak_s: &str,
    source: &Path,
    name: &str,
    import_args: &[&str],
    policy: &str,
    charts: usize,
    cases: usize,
) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, source, name, import_args);
    let out = dir.path().join("report");
    let run = audit(
        &store,
        &[
            name,
            "--policy",
            examples().join(policy).to_str().unwrap(),
            "--duration",
            soak_s,
            "--out",
        ],
    )
    .arg(&out)
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        matches!(run.status.code(), Some(0 | 3)),
        "{policy}: exit {:?}\n{stderr}",
        run.status
    );
    assert!(!stderr.contains("panicked"), "{policy}: {stderr}");
    check_files(&out, charts);
    let r = report(&out);
    check_abnormal(&r, cases);
    if run.status.code() == Some(3) {
        for f in r["failures"].as_array().unwrap() {
            let f = f.as_str().unwrap();
            assert!(
                f.contains("_ms")
                    || f.contains("items_per_s")
                    || f.contains("achieved")
                    || f.contains("latency_drift"),
                "{policy}: {f}"
            );
        }
    }
    r
}

#[test]
fn example_audit_of_the_onnx_minilm() {
    // The ONNX MiniLM through the CI gate's policy (the full minilm.toml takes a minute;
    // its pair-similarity accuracy is exercised in the threshold test below).
    let tok = minilm_dir();
    let r = audit_example(
        "4",
        &shared_models().join("minilm-l6.onnx"),
        "minilm",
        &["--tokenizer", tok.to_str().unwrap()],
        "minilm-ci.toml",
        4,
        10,
    );
    assert_eq!(r["model"]["backend"], "tract");
    assert!(r["accuracy"]["values"]["cosine_min"].as_f64().unwrap() >= 0.9999);
}

#[test]
fn example_audit_of_mobilenet_images() {
    let r = audit_example(
        "4",
        &shared_models().join("mobilenetv2.onnx"),
        "mobilenet",
        &["--task", "image-classification"],
        "mobilenet.toml",
        6,
        10,
    );
    assert!(
        r["abnormal"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "png-bomb" && c["outcome"] == "refused")
    );
    // A 4000x2 image would be resized to 512000x256 (hundreds of MB): refused up front.
    assert!(
        r["abnormal"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "extreme-aspect" && c["outcome"] == "refused")
    );
}

#[test]
fn example_audit_of_mobilenet_tensors_matches_pytorch() {
    let r = audit_example(
        "4",
        &shared_models().join("mobilenetv2.onnx"),
        "mobilenet",
        &[],
        "mobilenet-tensor.toml",
        2,
        8,
    );
    assert_eq!(r["passed"], true, "{:#}", r["failures"]);
    assert!(r["accuracy"]["values"]["max_abs_diff"].as_f64().unwrap() < 1e-3);
}

#[test]
fn example_audit_of_smollm2() {
    let r = audit_example("8", &smollm2_gguf(), "smollm2", &[], "smollm2.toml", 6, 10);
    assert!(
        r["accuracy"]["values"]["contains"].as_f64().unwrap() >= 0.5,
        "{:#}",
        r["accuracy"]
    );
    assert!(
        r["abnormal"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "max-length+1" && c["outcome"] == "refused")
    );
}

#[test]
fn every_example_policy_parses() {
    // Parsing is all `mote audit` does before opening the model: a missing model after a
    // valid policy proves the policy was accepted.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = fails(
                audit(
                    &dir.path().join("s"),
                    &["absent", "--policy", path.to_str().unwrap()],
                )
                .arg("--no-store"),
                1,
            );
            assert!(
                stderr(&out).contains("cannot find absent"),
                "{}: {}",
                path.display(),
                stderr(&out)
            );
        }
    }
}

#[test]
fn failing_thresholds_fidelity_and_memory_limits_exit_non_zero_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let tok = minilm_dir();
    let tok = tok.to_str().unwrap();
    import(
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
    let policy = dir.path().join("p.toml");
    let run = |policy_text: &str, extra: &[&str]| {
        std::fs::write(&policy, policy_text).unwrap();
        let out = dir.path().join("out");
        let mut cmd = audit(
            &store,
            &[
                "--policy",
                policy.to_str().unwrap(),
                "--no-store",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        cmd.args(extra);
        (cmd, out)
    };

    // An impossible latency bound fails and is named; a passing one exits 0.
    let (mut cmd, _) = run(
        "[single_stream]\nmin_queries = 10\nmin_duration_s = 0.1\np99_ms = 0.0001\n",
        &["minilm"],
    );
    let failed = fails(&mut cmd, 3);
    assert!(
        stderr(&failed).contains("single_stream.p99_ms"),
        "{}",
        stderr(&failed)
    );
    let sts = examples().join("data/sts-pairs.jsonl");
    let (mut cmd, out) = run(
        &format!(
            "[single_stream]\nmin_queries = 10\nmin_duration_s = 0.1\np99_ms = 60000\n\
             [accuracy]\ndata = {:?}\nspearman_min = 0.7\n",
            sts.to_str().unwrap()
        ),
        &["minilm"],
    );
    ok(&mut cmd);
    let r = report(&out);
    assert_eq!(r["passed"], true, "{:#}", r["failures"]);
    let rho = r["accuracy"]["values"]["spearman"].as_f64().unwrap();
    assert!(rho > 0.7 && rho < 1.0, "Spearman {rho}");
    assert_eq!(r["accuracy"]["items"], 32);

    // onnxruntime's default int8 export against its fp32 parent: the audit catches the loss.
    let fidelity = examples().join("minilm-int8-fidelity.toml");
    let out = dir.path().join("fid");
    let mut cmd = audit(
        &store,
        &[
            "minilm-int8",
            "--baseline",
            "minilm",
            "--no-store",
            "--policy",
            fidelity.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let failed = fails(&mut cmd, 3);
    assert!(
        stderr(&failed).contains("fidelity.cosine_min"),
        "{}",
        stderr(&failed)
    );
    let r = report(&out);
    let min = r["fidelity"]["values"]["cosine_min"].as_f64().unwrap();
    assert!(
        min > 0.5 && min < 0.995,
        "int8 vs fp32 minimum cosine {min}"
    );
    assert_eq!(r["baseline"]["reference"], "minilm");
    // [fidelity] without a baseline is a usage error, not a pass.
    let (mut cmd, _) = run("[fidelity]\ncosine_min = 0.9\n", &["minilm"]);
    assert!(stderr(&fails(&mut cmd, 1)).contains("--baseline"));

    // A 64 MiB address space cannot hold the model: the child fails to load, reported.
    let (mut cmd, out) = run(
        "[constrained]\nthreads = 1\nmemory_limit_mb = 64\nqueries = 3\n",
        &["minilm"],
    );
    let failed = fails(&mut cmd, 3);
    assert!(
        stderr(&failed).contains("constrained"),
        "{}",
        stderr(&failed)
    );
    let r = report(&out);
    assert_eq!(r["constrained"]["loaded"], false);
    assert!(!r["constrained"]["error"].as_str().unwrap().is_empty());

    // Policy mistakes are refused before anything runs, naming the key.
    let (mut cmd, _) = run("[single_stream]\np99 = 5\n", &["minilm"]);
    assert!(stderr(&fails(&mut cmd, 1)).contains("p99"));
}

/// Start the leaking helper; returns it and its URL.
fn leaky_server(name: &str, digest: &str) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/leaky_server.py"))
        .args([name, digest, "6144"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let url = line
        .strip_prefix("listening on ")
        .expect("helper prints its address")
        .to_string();
    (child, url)
}

#[test]
fn the_soak_catches_a_leaking_process_and_passes_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let digest = import(&store, &minilm_dir(), "minilm", &[]);
    let policy = dir.path().join("soak.toml");
    // The memory trend is what is under test: the latency-drift bound is set out of reach
    // because other tests share the CPUs.
    std::fs::write(
        &policy,
        "[soak]\nduration_s = 10\nwindow_s = 0.25\nmax_latency_drift_pct = 100000\n",
    )
    .unwrap();
    let soak = |url: &str, out: &Path| {
        let mut cmd = audit(
            &store,
            &[
                "minilm",
                "--url",
                url,
                "--no-store",
                "--policy",
                policy.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        cmd.output().unwrap()
    };

    // A process that keeps 6 KiB of every request: the soak fails, naming the memory trend.
    let (mut helper, url) = leaky_server("minilm", &digest);
    let out = dir.path().join("leaky");
    let run = soak(&url, &out);
    let _ = helper.kill();
    let _ = helper.wait();
    assert_eq!(
        run.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("soak.max_rss_growth_kb_per_1000"));
    let r = report(&out);
    let growth = r["soak"]["rss_growth_kib_per_1000"].as_f64().unwrap();
    assert!(
        growth > 3000.0,
        "fitted growth {growth} KiB per 1000 requests"
    );
    assert!(r["soak"]["rss_trend"]["p_increasing"].as_f64().unwrap() < 0.01);

    // The real server over the same duration passes.
    let server = Server::start(&store, &["minilm", "--threads", "2"]);
    let out = dir.path().join("real");
    let run = soak(&format!("http://{}", server.addr), &out);
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let r = report(&out);
    assert!(
        r["soak"]["requests"].as_u64().unwrap() > 100,
        "{:#}",
        r["soak"]["requests"]
    );
    assert_eq!(r["soak"]["errors"], 0);
    check_files(&out, 2);
    assert_eq!(server.stop().code(), Some(0));
}
