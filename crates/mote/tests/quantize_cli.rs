//! `mote quantize` end to end: the int8 artifact, its fidelity report, provenance and
//! journal record, the same bits on every ISA level and thread count, and refusals.

mod common;

use common::*;

fn vector(store: &std::path::Path, reference: &str, isa: &str, threads: &str) -> Vec<u32> {
    let (backend, bits) = embedding_bits(store, reference, isa, threads);
    assert_eq!(backend, "native-int8");
    bits
}

#[test]
fn quantize_makes_a_faithful_int8_artifact_with_provenance_and_isa_independent_bits() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let parent = import(&store, &minilm_dir(), "minilm", &[]);
    let out: serde_json::Value = serde_json::from_str(&ok(mote(&store).args([
        "quantize",
        "minilm",
        "--int8",
        "--name",
        "minilm:int8",
        "--threads",
        "2",
        "--json",
    ])))
    .unwrap();
    let r = &out["report"];
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    assert_eq!(out["passed"], true);
    assert!(r["sentences"].as_u64().unwrap() >= 50);
    assert!(r["cosine_min"].as_f64().unwrap() >= 0.995);
    let digest = out["digest"].as_str().unwrap().to_string();

    // Provenance in the artifact, and the report in the journal, both naming the digests.
    let info: serde_json::Value =
        serde_json::from_str(&ok(mote(&store).args(["inspect", "minilm:int8", "--json"]))).unwrap();
    assert_eq!(info["digest"], digest.as_str());
    let prov = &info["settings"]["provenance"];
    assert_eq!(prov["parent"], parent.as_str());
    assert_eq!(prov["method"], "int8-smoothquant");
    assert_eq!(
        prov["details"]["calibration_digest"],
        r["calibration_digest"]
    );
    assert_eq!(info["config"]["config"]["precision"], "int8");
    let journal = ok(mote(&store).args(["journal", "--json"]));
    assert!(
        journal.contains("\"quantize\"") && journal.contains(&digest),
        "{journal}"
    );
    assert!(ok(mote(&store).args(["verify", "minilm:int8"])).contains("ok"));

    // The same bits whatever the ISA level and thread count (integer accumulation).
    let best = vector(&store, "minilm:int8", "", "2");
    assert_eq!(
        best,
        vector(&store, "minilm:int8", "scalar", "1"),
        "scalar differs"
    );
    assert_eq!(best, vector(&store, "minilm:int8", "avx2", "1"));
    // AVX-512 without and with VNNI (capped at the CPU's best level where it lacks them).
    assert_eq!(best, vector(&store, "minilm:int8", "avx512", "2"));
    assert_eq!(best, vector(&store, "minilm:int8", "avx512vnni", "1"));

    // The example fidelity gate (the one onnxruntime's int8 export fails) passes.
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/audit/minilm-int8-fidelity.toml");
    let audit = ok(mote(&store).args([
        "audit",
        "minilm:int8",
        "--baseline",
        "minilm",
        "--policy",
        policy.to_str().unwrap(),
        "--no-store",
        "--out",
        dir.path().join("audit").to_str().unwrap(),
    ]));
    assert!(audit.contains("passed"), "{audit}");

    // A bar the model cannot meet: exit 3, the report printed, nothing stored.
    let o = fails(
        mote(&store).args([
            "quantize",
            "minilm",
            "--int8",
            "--name",
            "minilm:strict",
            "--min-cosine",
            "0.99999",
        ]),
        3,
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("fidelity over"));
    assert!(stderr(&o).contains("--keep-f32"), "{}", stderr(&o));
    fails(mote(&store).args(["inspect", "minilm:strict"]), 1);

    // Models it cannot quantise.
    let o = fails(
        mote(&store).args(["quantize", "minilm:int8", "--int8", "--name", "again"]),
        1,
    );
    assert!(stderr(&o).contains("already quantised"), "{}", stderr(&o));
    import(
        &store,
        &shared_models().join("mobilenetv2.onnx"),
        "mobilenet",
        &["--task", "image-classification"],
    );
    let o = fails(
        mote(&store).args(["quantize", "mobilenet", "--int8", "--name", "m8"]),
        1,
    );
    assert!(
        stderr(&o).contains("text-embedding encoders in safetensors"),
        "{}",
        stderr(&o)
    );
    let o = fails(mote(&store).args(["quantize", "minilm", "--name", "x"]), 2);
    assert!(stderr(&o).contains("--int8"), "{}", stderr(&o));
}
