//! Store behaviour on small synthetic models: digests, tags, rollback, crash replay, gc,
//! corruption and concurrency. (Real models are exercised end to end in `crates/mote/tests`.)

use std::fs;
use std::path::{Path, PathBuf};

use mote_store::{ImportOptions, Reference, Store, StoreError, TagRef, Task};

/// A minimal GGUF v3 file with a vocabulary and one Q8_0 tensor; `seed` varies the weights.
fn gguf(dir: &Path, name: &str, seed: u8) -> PathBuf {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let mut f = b"GGUF".to_vec();
    f.extend(3u32.to_le_bytes());
    f.extend(1u64.to_le_bytes());
    f.extend(2u64.to_le_bytes());
    s(&mut f, "general.architecture");
    f.extend(8u32.to_le_bytes());
    s(&mut f, "llama");
    s(&mut f, "tokenizer.ggml.tokens");
    f.extend(9u32.to_le_bytes());
    f.extend(8u32.to_le_bytes());
    f.extend(1u64.to_le_bytes());
    s(&mut f, "hello");
    s(&mut f, "output.weight");
    f.extend(1u32.to_le_bytes());
    f.extend(32u64.to_le_bytes());
    f.extend(8u32.to_le_bytes());
    f.extend(0u64.to_le_bytes());
    while !f.len().is_multiple_of(32) {
        f.push(0);
    }
    f.extend(vec![seed; 34]);
    let path = dir.join(name);
    fs::write(&path, f).unwrap();
    path
}

fn tag(s: &str) -> TagRef {
    s.parse().unwrap()
}

fn reference(s: &str) -> Reference {
    s.parse().unwrap()
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

#[test]
fn same_files_give_the_same_digest_in_two_stores() {
    let (dir, a) = store();
    let b = Store::open(dir.path().join("other")).unwrap();
    let src = gguf(dir.path(), "m.gguf", 1);
    let da = a
        .import(&src, Some(&tag("m")), &ImportOptions::default())
        .unwrap();
    let db = b.import(&src, None, &ImportOptions::default()).unwrap();
    assert_eq!(da.digest, db.digest);
    let info = a.inspect(&reference("m")).unwrap();
    assert_eq!(info.settings.task, Task::TextGeneration);
    assert_eq!(info.config.modelfs.diff_ids.len(), info.files.len());
}

#[test]
fn settings_are_part_of_the_identity() {
    let (dir, s) = store();
    let src = gguf(dir.path(), "m.gguf", 1);
    let gen_ = s.import(&src, None, &ImportOptions::default()).unwrap();
    let tensor = s
        .import(
            &src,
            None,
            &ImportOptions {
                task: Some(Task::Tensor),
                ..Default::default()
            },
        )
        .unwrap();
    assert_ne!(gen_.digest, tensor.digest);
}

#[test]
fn rollback_walks_back_and_history_shows_every_move() {
    let (dir, s) = store();
    let t = tag("model:prod");
    let d1 = s
        .import(
            &gguf(dir.path(), "a.gguf", 1),
            Some(&t),
            &Default::default(),
        )
        .unwrap()
        .digest;
    let d2 = s
        .import(
            &gguf(dir.path(), "b.gguf", 2),
            Some(&t),
            &Default::default(),
        )
        .unwrap()
        .digest;
    let d3 = s
        .import(
            &gguf(dir.path(), "c.gguf", 3),
            Some(&t),
            &Default::default(),
        )
        .unwrap()
        .digest;
    assert_eq!(s.resolve(&reference("model:prod")).unwrap(), d3);
    assert_eq!(s.rollback(&t).unwrap().to, d2);
    assert_eq!(s.rollback(&t).unwrap().to, d1);
    let err = s.rollback(&t).unwrap_err().to_string();
    assert!(err.contains("no earlier digest"), "{err}");
    assert_eq!(s.resolve(&reference("model:prod")).unwrap(), d1);
    let h = s.history(&t).unwrap();
    let moves: Vec<_> = h
        .iter()
        .map(|i| (i.from, i.to, i.reason.as_str()))
        .collect();
    assert_eq!(
        moves,
        vec![
            (None, Some(d1), "import"),
            (Some(d1), Some(d2), "import"),
            (Some(d2), Some(d3), "import"),
            (Some(d3), Some(d2), "rollback"),
            (Some(d2), Some(d1), "rollback"),
        ]
    );
    // Older models stay listed (untagged) so rollback can reach them.
    assert_eq!(s.list().unwrap().len(), 3);
    s.journal().verify().unwrap();
}

#[test]
fn tag_moves_survive_a_crash_between_journal_and_index() {
    let (dir, s) = store();
    let t = tag("m");
    s.import(
        &gguf(dir.path(), "a.gguf", 1),
        Some(&t),
        &Default::default(),
    )
    .unwrap();
    let index = s.root().join("index.json");
    let before = fs::read(&index).unwrap();
    let d2 = s
        .import(
            &gguf(dir.path(), "b.gguf", 2),
            Some(&t),
            &Default::default(),
        )
        .unwrap()
        .digest;
    // Simulate a process killed after the journal append, before index.json was replaced.
    fs::write(&index, before).unwrap();
    assert_eq!(
        s.resolve(&reference("m")).unwrap(),
        d2,
        "readers replay the journal"
    );
    let d3 = s
        .import(
            &gguf(dir.path(), "c.gguf", 3),
            Some(&tag("other")),
            &Default::default(),
        )
        .unwrap()
        .digest;
    let text = fs::read_to_string(&index).unwrap();
    assert!(
        text.contains(&d2.to_string()) && text.contains(&d3.to_string()),
        "{text}"
    );
}

#[test]
fn gc_keeps_everything_reachable_and_frees_removed_models() {
    let (dir, s) = store();
    let keep = s
        .import(
            &gguf(dir.path(), "a.gguf", 1),
            Some(&tag("keep")),
            &Default::default(),
        )
        .unwrap();
    let drop = s
        .import(
            &gguf(dir.path(), "b.gguf", 2),
            Some(&tag("drop")),
            &Default::default(),
        )
        .unwrap();
    fs::write(s.root().join("tmp").join(".blob-leftover.partial"), b"x").unwrap();
    let r = s.gc().unwrap();
    assert_eq!((r.blobs, r.temp_files), (0, 1));
    s.remove(&reference("drop")).unwrap();
    assert_eq!(
        s.gc().unwrap().blobs,
        0,
        "an untagged model is still in the store"
    );
    s.remove(&Reference::Digest(drop.digest)).unwrap();
    let r = s.gc().unwrap();
    assert!(
        r.blobs >= 2,
        "the removed model's manifest and weights go: {r:?}"
    );
    s.verify(&Reference::Digest(keep.digest)).unwrap();
    assert!(matches!(
        s.verify(&Reference::Digest(drop.digest)),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn gc_refuses_to_run_when_a_manifest_cannot_be_read_and_deletes_nothing() {
    let (dir, s) = store();
    let m = s
        .import(
            &gguf(dir.path(), "a.gguf", 1),
            Some(&tag("a")),
            &Default::default(),
        )
        .unwrap();
    let hex = m.digest.to_string()["sha256:".len()..].to_string();
    let manifest = s.root().join("blobs/sha256").join(&hex);
    let before = walk(&s.root().join("blobs"));
    make_writable(&manifest);
    fs::write(&manifest, b"{ not a manifest").unwrap();
    let err = s.gc().unwrap_err().to_string();
    assert!(err.contains(&m.digest.to_string()), "{err}");
    assert!(err.contains("deletes nothing"), "{err}");
    let after = walk(&s.root().join("blobs"));
    assert_eq!(
        before.len(),
        after.len(),
        "gc deleted blobs of a model it could not read"
    );
    fs::remove_file(&manifest).unwrap();
    let err = s.gc().unwrap_err().to_string();
    assert!(err.contains("is missing"), "{err}");
    assert_eq!(walk(&s.root().join("blobs")).len() + 1, before.len());
}

#[test]
fn a_flipped_byte_fails_verification_naming_file_and_digests_and_changes_nothing() {
    let (dir, s) = store();
    let out = s
        .import(
            &gguf(dir.path(), "m.gguf", 1),
            Some(&tag("m")),
            &Default::default(),
        )
        .unwrap();
    let info = s.inspect(&reference("m")).unwrap();
    let weights = info.file("m.gguf").unwrap().clone();
    let blob = &weights.blob;
    let mut bytes = fs::read(blob).unwrap();
    bytes[100] ^= 1;
    make_writable(blob);
    fs::write(blob, &bytes).unwrap();
    let listing = |root: &Path| {
        let mut v: Vec<_> = walk(root);
        v.sort();
        v
    };
    let before = listing(s.root());
    let is_named_corruption = |err: StoreError| {
        match &err {
            StoreError::Corrupt {
                model,
                file,
                expected,
                actual,
            } => {
                assert!(model.contains("m:latest") && model.contains(&out.digest.to_string()));
                assert_eq!(file, "m.gguf");
                assert_eq!(*expected, weights.digest);
                assert_ne!(actual, expected);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("re-import"), "{msg}");
    };
    // `mote verify` hashes everything at once.
    is_named_corruption(s.verify(&reference("m")).unwrap_err());
    // Opening checks sizes only (same size here); each use hashes what it hands out, and
    // `verify_unread` the files nobody used.
    let opened = s.open_model(&reference("m")).unwrap();
    is_named_corruption(opened.map("m.gguf").unwrap_err());
    is_named_corruption(opened.read("m.gguf").unwrap_err());
    is_named_corruption(opened.verify_unread().unwrap_err());
    assert_eq!(before, listing(s.root()), "verification modified the store");
}

#[test]
fn opening_a_model_with_a_missing_or_truncated_blob_fails_at_once() {
    let (dir, s) = store();
    s.import(
        &gguf(dir.path(), "m.gguf", 1),
        Some(&tag("m")),
        &Default::default(),
    )
    .unwrap();
    let weights = s
        .inspect(&reference("m"))
        .unwrap()
        .file("m.gguf")
        .unwrap()
        .clone();
    let blob = &weights.blob;
    let bytes = fs::read(blob).unwrap();
    make_writable(blob);
    fs::write(blob, &bytes[..bytes.len() - 1]).unwrap();
    match s.open_model(&reference("m")).unwrap_err() {
        StoreError::Damaged { reason, .. } => {
            let want = format!(
                "m.gguf has {} bytes where the manifest says {}",
                bytes.len() - 1,
                bytes.len()
            );
            assert!(reason.contains(&want), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    fs::remove_file(blob).unwrap();
    match s.open_model(&reference("m")).unwrap_err() {
        StoreError::MissingBlob { file, digest, .. } => {
            assert_eq!(file, "m.gguf");
            assert_eq!(digest, weights.digest);
        }
        other => panic!("unexpected {other:?}"),
    }
    // Intact again: opens, and every file verifies, each once.
    fs::write(blob, &bytes).unwrap();
    let opened = s.open_model(&reference("m")).unwrap();
    assert_eq!(&opened.read("m.gguf").unwrap(), &bytes);
    opened.verify_unread().unwrap();
}

/// Let a test damage a blob (the store makes them read-only).
fn make_writable(blob: &Path) {
    let mut perms = fs::metadata(blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(blob, perms).unwrap();
}

fn walk(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push((p.clone(), fs::read(&p).unwrap()));
        }
    }
    out
}

#[test]
fn concurrent_imports_and_tag_moves_keep_the_store_consistent() {
    let (dir, s) = store();
    let sources: Vec<PathBuf> = (0..6)
        .map(|i| gguf(dir.path(), &format!("m{i}.gguf"), i))
        .collect();
    std::thread::scope(|scope| {
        for (i, src) in sources.iter().enumerate() {
            let s = s.clone();
            scope.spawn(move || {
                for round in 0..3 {
                    let t = tag(&format!("m{}", (i + round) % 3));
                    s.import(src, Some(&t), &Default::default()).unwrap();
                }
            });
        }
    });
    let entries = s.journal().verify().unwrap();
    assert!(entries.len() >= 6);
    for o in s.verify_all().unwrap() {
        o.result.unwrap();
    }
    assert_eq!(s.list().unwrap().len(), 6);
}

#[cfg(unix)]
#[test]
fn import_follows_links_only_inside_the_source_and_never_in_cycles() {
    use std::os::unix::fs::symlink;
    let (dir, s) = store();
    let weights = fs::read(gguf(dir.path(), "w.gguf", 3)).unwrap();
    let make = |name: &str| {
        let d = dir.path().join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("config.json"), "{}").unwrap();
        fs::write(d.join("model.gguf"), &weights).unwrap();
        d
    };
    // A link to a secret outside the directory: refused, naming the link and its target.
    let secret = dir.path().join("secret.key");
    fs::write(&secret, b"do not copy me").unwrap();
    let out = make("out");
    symlink(&secret, out.join("notes.txt")).unwrap();
    let e = s
        .import(&out, None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("notes.txt") && e.contains("outside the model directory"),
        "{e}"
    );
    // A directory link back up the tree: a cycle, refused.
    let cyc = make("cyc");
    symlink(&cyc, cyc.join("again")).unwrap();
    let e = s
        .import(&cyc, None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cycle"), "{e}");
    // A link within the tree is followed: the import gets past the walk (and stops later
    // only because these test directories hold no safetensors weights).
    let walked = |d: &Path| {
        let e = s
            .import(d, None, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no weights"), "{e}");
    };
    let inside = make("inside");
    symlink(inside.join("config.json"), inside.join("alias.json")).unwrap();
    walked(&inside);
    // A Hugging Face cache snapshot links into its repository's blobs/: followed.
    let repo = dir.path().join("hub/models--org--m");
    let snap = repo.join("snapshots/abc");
    fs::create_dir_all(&snap).unwrap();
    fs::create_dir_all(repo.join("blobs")).unwrap();
    fs::write(repo.join("blobs/1"), "{}").unwrap();
    fs::write(repo.join("blobs/2"), &weights).unwrap();
    symlink(repo.join("blobs/1"), snap.join("config.json")).unwrap();
    symlink(repo.join("blobs/2"), snap.join("model.gguf")).unwrap();
    walked(&snap);
}

#[test]
fn malformed_sources_give_clear_errors() {
    let (dir, s) = store();
    let good = fs::read(gguf(dir.path(), "g.gguf", 1)).unwrap();
    fs::write(dir.path().join("trunc.gguf"), &good[..40]).unwrap();
    let e = s
        .import(&dir.path().join("trunc.gguf"), None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");

    let hf = dir.path().join("hf");
    fs::create_dir(&hf).unwrap();
    fs::write(hf.join("config.json"), "{}").unwrap();
    let e = s
        .import(&hf, None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no weights"), "{e}");

    fs::write(
        hf.join("model.safetensors"),
        [200u8, 0, 0, 0, 0, 0, 0, 0, b'{'],
    )
    .unwrap();
    let e = s
        .import(&hf, None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");

    let e = s
        .import(&dir.path().join("missing.onnx"), None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.onnx"), "{e}");

    fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let e = s
        .import(&dir.path().join("notes.txt"), None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unrecognised"), "{e}");
    assert_eq!(s.list().unwrap().len(), 0);
}

#[test]
fn references_are_resolved_by_unique_prefix_only() {
    let (dir, s) = store();
    let d = s
        .import(&gguf(dir.path(), "a.gguf", 1), None, &Default::default())
        .unwrap()
        .digest;
    let prefix = format!("sha256:{}", &d.hex()[..12]);
    assert_eq!(s.resolve(&reference(&prefix)).unwrap(), d);
    assert!(matches!(
        s.resolve(&reference("sha256:000000000000")),
        Err(StoreError::NotFound { .. })
    ));
    assert!("sha256:../../../etc/passwd".parse::<Reference>().is_err());
}

#[test]
fn a_tampered_journal_blocks_writes_but_not_reads() {
    let (dir, s) = store();
    s.import(
        &gguf(dir.path(), "a.gguf", 1),
        Some(&tag("a")),
        &Default::default(),
    )
    .unwrap();
    let path = s.journal().path().to_path_buf();
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replacen("llama", "llamb", 1)
            .replacen("\"a:latest\"", "\"b:latest\"", 1),
    )
    .unwrap();
    let e = s.journal().verify().unwrap_err();
    assert!(
        matches!(e, StoreError::JournalBroken { line: 2, .. }),
        "{e}"
    );
    assert!(
        s.resolve(&reference("a")).is_ok(),
        "reads fall back to index.json"
    );
    let e = s.tag(&reference("a"), &tag("c")).unwrap_err();
    assert!(matches!(e, StoreError::JournalBroken { .. }), "{e}");
}

#[test]
fn a_directory_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("precious.txt"), "data").unwrap();
    let e = Store::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not a mote store"), "{e}");
}

#[test]
fn referrers_attach_to_a_model_survive_gc_and_go_with_it() {
    use mote_store::ArtifactFile;
    use std::collections::BTreeMap;
    let (dir, s) = store();
    let model = s
        .import(
            &gguf(dir.path(), "a.gguf", 1),
            Some(&tag("m")),
            &Default::default(),
        )
        .unwrap();
    let files = [
        ArtifactFile {
            name: "report.json".into(),
            media_type: "application/json".into(),
            bytes: b"{\"passed\":true}".to_vec(),
        },
        ArtifactFile {
            name: "report.md".into(),
            media_type: "text/markdown".into(),
            bytes: b"# ok\n".to_vec(),
        },
    ];
    let kind = mote_store::oci::ARTIFACT_TYPE_AUDIT;
    let annotations = BTreeMap::from([(
        "org.opencontainers.image.created".to_string(),
        "2026-01-01T00:00:00Z".to_string(),
    )]);
    let r = s
        .attach(&reference("m"), kind, &files, annotations.clone())
        .unwrap();
    // Attaching the same bytes again is a no-op (same digest, no second index entry).
    assert_eq!(
        s.attach(&reference("m"), kind, &files, annotations)
            .unwrap(),
        r
    );
    let info = s.inspect(&reference("m")).unwrap();
    assert_eq!(info.referrers.len(), 1);
    assert_eq!(info.referrers[0].digest, r);
    let listed = s.referrers(&reference("m"), Some(kind)).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        s.read_referrer_file(&listed[0], "report.md").unwrap(),
        b"# ok\n"
    );
    assert!(
        s.referrers(&reference("m"), Some("other/type"))
            .unwrap()
            .is_empty()
    );
    // The report is not a model: not listed, not verified as one.
    assert_eq!(s.list().unwrap().len(), 1);
    assert_eq!(s.verify_all().unwrap().len(), 1);
    // It is journaled with its subject, and gc keeps its blobs.
    let journal = fs::read_to_string(s.root().join("journal.jsonl")).unwrap();
    assert!(journal.contains(&format!("\"subject\":\"{}\"", model.digest)));
    assert_eq!(s.gc().unwrap().blobs, 0);
    assert_eq!(
        s.read_referrer_file(&listed[0], "report.json").unwrap(),
        b"{\"passed\":true}"
    );
    // Removing the model removes its referrers; gc then frees their blobs.
    s.remove(&Reference::Digest(model.digest)).unwrap();
    let index = fs::read_to_string(s.root().join("index.json")).unwrap();
    assert!(!index.contains(&r.to_string()), "{index}");
    assert!(s.gc().unwrap().blobs >= 5);
    s.journal().verify().unwrap();
}

/// Several processes (here threads) opening a store that does not exist yet all succeed:
/// none mistakes the half-created store of another for a foreign directory.
#[test]
fn concurrent_first_opens_all_succeed() {
    for _ in 0..20 {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let root = root.clone();
                std::thread::spawn(move || Store::open(&root).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }
}
