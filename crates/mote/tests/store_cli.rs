//! End-to-end tests of the store commands on the real test models, driving the `mote`
//! binary as a user would (and skopeo, as another OCI tool would).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn all_three(store: &Path) -> Vec<String> {
    vec![
        import(store, &minilm_dir(), "minilm", &[]),
        import(store, &smollm2_gguf(), "smollm2", &[]),
        import(
            store,
            &shared_models().join("mobilenetv2.onnx"),
            "mobilenetv2",
            &[],
        ),
    ]
}

#[test]
fn the_same_models_get_the_same_digests_in_two_fresh_stores() {
    let dir = tempfile::tempdir().unwrap();
    let a = all_three(&dir.path().join("a"));
    let b = all_three(&dir.path().join("b"));
    assert_eq!(a, b);
    let out = ok(mote(&dir.path().join("a")).args(["verify", "--all"]));
    assert!(out.contains("3 models verified, 0 failed"), "{out}");
    let ls: serde_json::Value =
        serde_json::from_str(&ok(mote(&dir.path().join("b")).args(["ls", "--json"]))).unwrap();
    let tasks: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks.len(), 3);
    assert!(
        tasks.contains(&"text-embedding") && tasks.contains(&"text-generation"),
        "{tasks:?}"
    );
    let info: serde_json::Value = serde_json::from_str(&ok(
        mote(&dir.path().join("a")).args(["inspect", "smollm2", "--json"])
    ))
    .unwrap();
    assert_eq!(info["config"]["config"]["quantization"], "q4_1");
    assert_eq!(info["config"]["config"]["format"], "gguf");
}

fn blob_files(store: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(store.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    let i = (at as usize) % bytes.len();
    bytes[i] ^= 0x40;
    let mut perms = fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(path, perms.clone()).unwrap();
    fs::write(path, bytes).unwrap();
    perms.set_readonly(true);
    fs::set_permissions(path, perms).unwrap();
}

#[test]
fn flipping_one_byte_of_any_blob_fails_verification_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    import(&store, &smollm2_gguf(), "smollm2", &[]);
    import(
        &store,
        &shared_models().join("mobilenetv2.onnx"),
        "mobilenetv2",
        &[],
    );
    let index = fs::read(store.join("index.json")).unwrap();
    let journal = fs::read(store.join("journal.jsonl")).unwrap();
    for (n, blob) in blob_files(&store).iter().enumerate() {
        let hex = blob.file_name().unwrap().to_str().unwrap().to_string();
        flip(blob, 7 + n as u64 * 131);
        let out = fails(mote(&store).args(["verify", "--all"]), 1);
        let err = stderr(&out);
        assert!(
            err.contains("corrupt") && (err.contains(&hex) || err.contains("does not parse")),
            "blob {hex}: {err}"
        );
        if !err.contains("does not parse") {
            assert!(
                err.contains("should have digest") && err.contains("but has"),
                "{err}"
            );
        }
        // Using the model fails the same way as verifying it.
        let tagged = if err.contains("smollm2") {
            "smollm2"
        } else {
            "mobilenetv2"
        };
        let out = fails(mote(&store).args(["verify", tagged]), 1);
        assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
        if tagged == "smollm2" {
            // Opening it to run it too (each file hashed as the load reads it, the rest after).
            let out = fails(
                mote(&store).args(["run", tagged, "--prompt", "Hi", "--max-tokens", "1"]),
                1,
            );
            let err = stderr(&out);
            assert!(
                err.contains("corrupt") || err.contains("does not parse"),
                "{err}"
            );
        }
        assert_eq!(fs::read(store.join("index.json")).unwrap(), index);
        assert_eq!(fs::read(store.join("journal.jsonl")).unwrap(), journal);
        assert!(blob.exists(), "verification deleted a blob");
        flip(blob, 7 + n as u64 * 131);
    }
    ok(mote(&store).args(["verify", "--all"]));
}

#[test]
fn skopeo_copies_a_model_out_with_the_same_manifest_digest() {
    let have = Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have,
        "skopeo is needed for this test: `apt-get install skopeo` (scripts/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let digest = import(&store, &minilm_dir(), "minilm:v1", &[]);
    let other = dir.path().join("copy");
    let status = Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:minilm:v1", store.display()))
        .arg(format!("oci:{}:minilm:v1", other.display()))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(other.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "minilm:v1"
    );
    // The copy is itself a store mote can verify.
    let out = ok(mote(&other).args(["verify", "minilm:v1"]));
    assert!(out.contains(&digest), "{out}");
}

#[test]
fn rollback_restores_the_first_digest_and_history_and_journal_record_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let first = import(
        &store,
        &shared_models().join("mobilenetv2.onnx"),
        "net:prod",
        &[],
    );
    let second = import(
        &store,
        &shared_models().join("minilm-l6.int8.onnx"),
        "net:prod",
        &[],
    );
    assert_ne!(first, second);
    let out = ok(mote(&store).args(["rollback", "net:prod", "--json"]));
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["to"], first.as_str());
    assert_eq!(m["from"], second.as_str());
    let info: serde_json::Value =
        serde_json::from_str(&ok(mote(&store).args(["inspect", "net:prod", "--json"]))).unwrap();
    assert_eq!(info["digest"], first.as_str());
    let h: serde_json::Value =
        serde_json::from_str(&ok(mote(&store).args(["history", "net:prod", "--json"]))).unwrap();
    let moves: Vec<(String, String)> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["reason"].as_str().unwrap().into(),
                i["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        vec![
            ("import".into(), first.clone()),
            ("import".into(), second.clone()),
            ("rollback".into(), first.clone())
        ]
    );
    let text = ok(mote(&store).args(["history", "net:prod"]));
    assert!(
        text.contains(&first[7..19]) && text.contains(&second[7..19]),
        "{text}"
    );

    ok(mote(&store).args(["journal", "verify"]));
    let journal = store.join("journal.jsonl");
    let original = fs::read_to_string(&journal).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    for target in 0..lines.len() {
        let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        // Change one character of the entry's time.
        edited[target] = edited[target].replacen("\"time\":\"2", "\"time\":\"3", 1);
        fs::write(&journal, edited.join("\n") + "\n").unwrap();
        let out = fails(mote(&store).args(["journal", "verify"]), 1);
        assert!(
            stderr(&out).contains(&format!("journal entry {} ", target + 1)),
            "edit of entry {} not named: {}",
            target + 1,
            stderr(&out)
        );
    }
    fs::write(&journal, original).unwrap();
    ok(mote(&store).args(["journal", "verify"]));
}

/// Check that every blob's content matches its name and every model verifies.
fn assert_consistent(store: &Path) {
    for blob in blob_files(store) {
        let name = blob.file_name().unwrap().to_str().unwrap().to_string();
        let out = Command::new("sha256sum").arg(&blob).output().unwrap();
        let actual = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        assert_eq!(name, actual, "partial or corrupt blob {}", blob.display());
    }
    ok(mote(store).args(["verify", "--all"]));
    ok(mote(store).args(["journal", "verify"]));
}

#[test]
fn kill_9_during_import_never_leaves_a_partial_blob_or_dangling_tag() {
    let dir = tempfile::tempdir().unwrap();
    // Time one uninterrupted import to spread the kill points over it.
    let probe = dir.path().join("probe");
    let start = Instant::now();
    let expected = import(&probe, &minilm_dir(), "minilm", &[]);
    let span = start.elapsed().as_micros().max(2_000) as u64;
    let store = dir.path().join("s");
    import(&store, &smollm2_gguf(), "minilm", &[]); // an earlier model under the same tag
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("kill-9 seed {seed}, import takes {span} us");
    for round in 0..12 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_micros((seed >> 33) % (span + span / 4));
        let mut child = mote(&store)
            .arg("import")
            .arg(minilm_dir())
            .args(["--name", "minilm"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        println!("round {round}: killed after {delay:?}, status {status}");
        assert_consistent(&store);
        // The tag points at a complete model: the old one or the new one, never anything else.
        let info: serde_json::Value =
            serde_json::from_str(&ok(mote(&store).args(["inspect", "minilm", "--json"]))).unwrap();
        let task = info["settings"]["task"].as_str().unwrap();
        assert!(
            task == "text-generation" || info["digest"] == expected.as_str(),
            "{info}"
        );
        if info["digest"] == expected.as_str() {
            // Completed before the kill: move the tag back so later rounds test again.
            ok(mote(&store).args(["rollback", "minilm"]));
        }
    }
    assert_eq!(import(&store, &minilm_dir(), "minilm", &[]), expected);
    assert_consistent(&store);
    let gc: serde_json::Value =
        serde_json::from_str(&ok(mote(&store).args(["gc", "--json"]))).unwrap();
    println!("gc after the kills: {gc}");
    assert_consistent(&store);
}

#[test]
fn malformed_inputs_give_clear_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    // Truncated GGUF: inside the header, and inside the tensor data.
    let gguf = fs::read(smollm2_gguf()).unwrap();
    for (cut, want) in [(100usize, "truncated"), (2_000_000, "truncated")] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        fs::write(&p, &gguf[..cut]).unwrap();
        let out = fails(mote(&store).arg("import").arg(&p).args(["--name", "x"]), 1);
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
    // Truncated safetensors header in an otherwise complete directory.
    let hf = dir.path().join("minilm-cut");
    fs::create_dir(&hf).unwrap();
    for f in ["config.json", "tokenizer.json", "modules.json"] {
        fs::copy(minilm_dir().join(f), hf.join(f)).unwrap();
    }
    let st = fs::read(minilm_dir().join("model.safetensors")).unwrap();
    fs::write(hf.join("model.safetensors"), &st[..5000]).unwrap();
    let out = fails(mote(&store).arg("import").arg(&hf), 1);
    assert!(
        stderr(&out).contains("safetensors") && stderr(&out).contains("truncated"),
        "{}",
        stderr(&out)
    );
    // A directory without weights.
    fs::remove_file(hf.join("model.safetensors")).unwrap();
    let out = fails(mote(&store).arg("import").arg(&hf), 1);
    assert!(stderr(&out).contains("no weights"), "{}", stderr(&out));
    // Digests with path tricks.
    for bad in ["sha256:../../../../etc/passwd", "sha256:../blobs", "../x"] {
        let out = fails(mote(&store).args(["inspect", bad]), 1);
        assert!(stderr(&out).contains("invalid"), "{bad}: {}", stderr(&out));
    }
    // Unknown task.
    let out = fails(
        mote(&store)
            .arg("import")
            .arg(smollm2_gguf())
            .args(["--task", "summarise"]),
        1,
    );
    assert!(
        stderr(&out).contains("unknown task") && stderr(&out).contains("text-generation"),
        "{}",
        stderr(&out)
    );
    // Usage errors exit 2.
    fails(mote(&store).args(["import"]), 2);
    fails(mote(&store).args(["verify"]), 2);
    // Nothing was stored by any of the failures.
    let ls = ok(mote(&store).args(["ls", "--json"]));
    assert_eq!(ls.trim(), "[]");
}
