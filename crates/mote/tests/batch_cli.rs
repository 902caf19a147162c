//! `mote batch` end to end with the real binary and real models: a folder of varied notes
//! summarised by SmolLM2 (outputs, recorded failures, report, resume, redo of an edited
//! note), a job killed with SIGKILL at random points and resumed, and a JSONL file embedded
//! by MiniLM (vectors equal to `mote run`'s).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn sha256_file(p: &Path) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
    )
}

fn journal(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every journal line is a record"))
        .collect()
}

/// The batch command, without network access when the machine allows a private network
/// namespace (`unshare -rn`), else with the proxy variables removed.
fn batch(store: &Path, args: &[&str]) -> Command {
    let offline = Command::new("unshare")
        .args(["-rn", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if offline {
        let mut c = Command::new("unshare");
        c.args(["-rn", env!("CARGO_BIN_EXE_mote")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_mote"))
    };
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "MOTE_HOME",
    ] {
        cmd.env_remove(v);
    }
    cmd.arg("--store").arg(store).arg("batch").args(args);
    cmd
}

fn write_notes(dir: &Path) -> Vec<&'static str> {
    let short = [
        (
            "groceries.txt",
            "Buy milk, eggs, spinach and coffee. The shop closes at 8 pm on Sundays.",
        ),
        (
            "dentist.md",
            "# Dentist\n\nAppointment moved to March 3rd at 10:30. Bring the insurance card and arrive early to fill in the new forms.",
        ),
        (
            "work/standup.md",
            "Standup: Ana finished the export feature. Ben is blocked on the API keys. Release is planned for Thursday if the tests pass.",
        ),
        (
            "work/retro.txt",
            "Retro: deployments were slow because the CI cache was cold. Action: pin the toolchain and cache dependencies.",
        ),
        (
            "ideas.md",
            "Idea: a small app that reminds me to water the plants, with a photo log of each plant every week.",
        ),
        (
            "travel.txt",
            "Trip to Lisbon: flight on May 2, hotel near Alfama, want to visit the tile museum and eat pastéis de nata.",
        ),
        (
            "books.md",
            "Finished reading a novel about a lighthouse keeper. Slow start, beautiful ending. Next: a history of bridges.",
        ),
        (
            "car.txt",
            "The car needs new tyres before winter. Quote from the garage: 420 euros including fitting and balancing.",
        ),
        (
            "garden/plan.md",
            "Garden plan: tomatoes along the south wall, beans on the fence, herbs in pots near the kitchen door.",
        ),
        (
            "health.txt",
            "Ran 5 km in 31 minutes. Knee felt fine. Goal for next month: three runs a week and more stretching.",
        ),
        (
            "budget.md",
            "Budget for April: rent 900, food 350, transport 80, savings 300. Cut streaming subscriptions to one.",
        ),
        (
            "call.txt",
            "Call with the bank: the new card arrives in 5 days. The old one is blocked. Online banking still works.",
        ),
        (
            "recipe.md",
            "Lentil soup: onion, carrot, celery, red lentils, cumin, stock. Simmer 25 minutes, blend half, add lemon.",
        ),
        (
            "meeting.txt",
            "Neighbourhood meeting decided to plant trees on the main street in autumn and to repair the playground.",
        ),
    ];
    let mut good: Vec<&'static str> = short.iter().map(|(n, _)| *n).collect();
    for (name, text) in short {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    // Non-English notes.
    std::fs::write(dir.join("marche.md"), "Marché de samedi : acheter des pommes, du pain et du fromage. Appeler Marie pour le dîner de dimanche.").unwrap();
    std::fs::write(dir.join("einkauf.txt"), "Einkaufsliste für die Woche: Brot, Käse, Äpfel und Kaffee. Am Freitag kommt der Handwerker um neun Uhr.").unwrap();
    good.extend(["marche.md", "einkauf.txt"]);
    // A long note: several chunks at --chunk-tokens 128.
    let long: Vec<String> = (1..=8)
        .map(|w| format!("Week {w} of the garden project: we dug {w} new beds, moved the compost bin, planted {} rows of onions and fixed the fence on the north side after the storm. The neighbours lent us a wheelbarrow and the rain barrel is finally connected.", w + 2))
        .collect();
    std::fs::write(dir.join("long.md"), long.join("\n\n")).unwrap();
    good.push("long.md");
    // Three that must fail, and files that are not notes at all.
    std::fs::write(dir.join("empty.md"), "  \n").unwrap();
    std::fs::write(
        dir.join("binary.txt"),
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    )
    .unwrap();
    std::fs::write(dir.join("latin1.txt"), b"Caf\xe9 cr\xe8me br\xfbl\xe9e").unwrap();
    std::fs::write(dir.join(".hidden.md"), "never read").unwrap();
    std::fs::write(dir.join("photo.png"), b"not a note").unwrap();
    good
}

fn output_of(out: &Path, id: &str) -> PathBuf {
    if id.ends_with(".md") {
        out.join(id)
    } else {
        out.join(format!("{id}.md"))
    }
}

#[test]
fn a_folder_of_notes_is_summarised_resumed_and_redone_only_where_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let smollm = import(&store, &smollm2_gguf(), "smollm2", &[]);
    let notes = dir.path().join("notes");
    let out = dir.path().join("out");
    let good = write_notes(&notes);
    let args = [
        "smollm2",
        "--input",
        notes.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-tokens",
        "32",
        "--chunk-tokens",
        "128",
        "--json",
    ];
    let run = batch(&store, &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(1),
        "failures make the exit code 1: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["items"], 20, "{summary}");
    assert_eq!(summary["done"], 17, "{summary}");
    assert_eq!(summary["failed"], 3, "{summary}");
    // 17 outputs, each with front matter naming the model and the input digests.
    for id in &good {
        let md =
            std::fs::read_to_string(output_of(&out, id)).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(md.starts_with("---\n"), "{id}: {md}");
        assert!(
            md.contains(&format!("model_digest: \"{smollm}\"")),
            "{id}: {md}"
        );
        let input = sha256_file(&notes.join(id));
        assert!(
            md.contains(&format!("source_digest: \"{input}\"")),
            "{id}: {md}"
        );
        let body = md.split("\n---\n").nth(1).unwrap().trim();
        assert!(!body.is_empty(), "{id}: empty summary");
    }
    let long = std::fs::read_to_string(out.join("long.md")).unwrap();
    let chunks: usize = long
        .lines()
        .find_map(|l| l.strip_prefix("chunks: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(chunks >= 2, "the long note was not chunked: {long}");
    let mds = walk_md(&out);
    assert_eq!(mds.len(), 17 + 1, "17 outputs and report.md: {mds:?}");
    // Three recorded failures, with reasons; the report lists them.
    let records = journal(&out);
    assert_eq!(records.len(), 20);
    let failed: HashMap<String, String> = records
        .iter()
        .filter(|r| r["status"] == "failed")
        .map(|r| {
            (
                r["item"].as_str().unwrap().to_string(),
                r["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(failed["empty.md"].contains("empty"), "{failed:?}");
    assert!(failed["binary.txt"].contains("binary"), "{failed:?}");
    assert!(failed["latin1.txt"].contains("UTF-8"), "{failed:?}");
    for r in records.iter().filter(|r| r["status"] == "done") {
        assert!(r["duration_ms"].as_f64().unwrap() > 0.0);
        assert!(r["generated_tokens"].as_u64().unwrap() > 0);
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["peak_rss_kib"].as_u64().unwrap() > 0);
        let file = out.join(r["output"].as_str().unwrap());
        assert_eq!(r["output_digest"].as_str().unwrap(), sha256_file(&file));
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| done | 17 |") && report.contains("| failed | 3 |"),
        "{report}"
    );
    assert!(
        report.contains("binary file") && report.contains("tokens/s"),
        "{report}"
    );

    // Re-running a finished job does nothing.
    let before: Vec<(PathBuf, String)> = mds
        .iter()
        .filter(|p| !p.ends_with("report.md"))
        .map(|p| (p.clone(), sha256_file(p)))
        .collect();
    let again = batch(&store, &args).output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (summary["done"].as_u64(), summary["skipped"].as_u64()),
        (Some(0), Some(20)),
        "{summary}"
    );
    assert_eq!(journal(&out).len(), 20);
    for (p, d) in &before {
        assert_eq!(&sha256_file(p), d, "{} changed", p.display());
    }
    // Editing one note redoes only that note.
    std::fs::write(
        notes.join("car.txt"),
        "The car passed its inspection. Next service in 12 months.",
    )
    .unwrap();
    let third = batch(&store, &args).output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&third.stdout).unwrap();
    assert_eq!(
        (summary["done"].as_u64(), summary["skipped"].as_u64()),
        (Some(1), Some(19)),
        "{summary}"
    );
    let records = journal(&out);
    assert_eq!(records.len(), 21);
    assert_eq!(records[20]["item"], "car.txt");
    for (p, d) in &before {
        let same = &sha256_file(p) == d;
        assert_eq!(same, !p.ends_with("car.txt.md"), "{}", p.display());
    }
}

fn walk_md(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_job_killed_at_random_points_resumes_with_every_output_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &smollm2_gguf(), "smollm2", &[]);
    let notes = dir.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    for i in 0..10 {
        std::fs::write(
            notes.join(format!("note{i:02}.txt")),
            format!("Note {i}: call the plumber about the leak in room {i}, then order {} new chairs for the office and book the meeting room for Friday.", i + 2),
        )
        .unwrap();
    }
    let out = dir.path().join("out");
    let args = [
        "smollm2",
        "--input",
        notes.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-tokens",
        "24",
        "--json",
    ];
    // Seeded delays (the one seeded generator): the kills land before, during and after
    // items.
    let mut rng = mote_base::rng::SplitMix64::new(0x5eed);
    // Kill once while the model loads, then each time a few more items are journaled, after
    // a random extra delay (so kills land mid-generation, between the output's rename and
    // its journal line, or just after).
    for (kill, after_records) in [0usize, 1, 3, 5, 7].into_iter().enumerate() {
        let mut child = batch(&store, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while journal(&out).len() < after_records && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let ms = 50 + rng.next_u64() % 400;
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        eprintln!(
            "kill {kill} {ms} ms after {after_records}+ records: {} journal records",
            journal(&out).len()
        );
    }
    let last = batch(&store, &args).output().unwrap();
    assert_eq!(
        last.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    let records = journal(&out);
    // Every note done exactly once (an output found in place after a kill is adopted, not
    // rewritten), every output matching its record, nothing partial or temporary left.
    let mut per_item: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        assert_eq!(r["status"], "done", "{r}");
        *per_item.entry(r["item"].as_str().unwrap()).or_default() += 1;
        let file = out.join(r["output"].as_str().unwrap());
        assert_eq!(
            r["output_digest"].as_str().unwrap(),
            sha256_file(&file),
            "{r}"
        );
    }
    assert_eq!(per_item.len(), 10, "{per_item:?}");
    assert!(
        per_item.values().all(|&n| n == 1),
        "an output was written twice: {per_item:?}"
    );
    assert!(
        !out.join(".mote-tmp").exists(),
        "temporary files left behind"
    );
    let files: Vec<PathBuf> = walk_md(&out);
    assert_eq!(files.len(), 11, "10 outputs and report.md: {files:?}");
    for f in files.iter().filter(|f| !f.ends_with("report.md")) {
        let md = std::fs::read_to_string(f).unwrap();
        assert!(
            md.starts_with("---\n") && md.ends_with('\n') && md.contains("\n---\n\n"),
            "partial: {md}"
        );
    }
}

#[test]
fn a_jsonl_file_is_embedded_with_the_vectors_mote_run_gives() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &minilm_dir(), "minilm", &[]);
    let input = dir.path().join("texts.jsonl");
    let mut lines: Vec<String> = (0..150)
        .map(|i| serde_json::json!({"id": format!("t{i}"), "text": format!("sentence number {i} about {}", ["rivers", "cities", "music", "code"][i % 4])}).to_string())
        .collect();
    lines.push(r#"{"id": "blank", "text": "   "}"#.into());
    lines.push("not json at all".into());
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let args = [
        "minilm",
        "--task",
        "embed",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--json",
    ];
    let run = batch(&store, &args).output().unwrap();
    assert_eq!(
        run.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        (summary["done"].as_u64(), summary["failed"].as_u64()),
        (Some(150), Some(2)),
        "{summary}"
    );
    let npy = mote_engine::npy::read(&std::fs::read(out.join("embeddings.npy")).unwrap()).unwrap();
    assert_eq!(npy.shape(), &[150, 384]);
    let jsonl = std::fs::read_to_string(out.join("embeddings.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 150);
    assert_eq!(rows[7]["id"], "t7");
    // Bit for bit what `mote run` gives for the same text, alone.
    let alone: serde_json::Value = serde_json::from_str(&ok(mote(&store).args([
        "run",
        "minilm",
        "--json",
        "--text",
        "sentence number 7 about code",
    ])))
    .unwrap();
    let bits = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| (x.as_f64().unwrap() as f32).to_bits())
            .collect()
    };
    assert_eq!(
        bits(&rows[7]["vector"]),
        bits(&alone["results"][0]["vector"])
    );
    let flat = npy.as_f32().unwrap();
    assert_eq!(
        flat[7 * 384..8 * 384]
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        bits(&alone["results"][0]["vector"])
    );
    let records = journal(&out);
    let failed: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["status"] == "failed").collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .any(|r| r["item"] == "blank" && r["error"].as_str().unwrap().contains("empty"))
    );
    assert!(
        failed
            .iter()
            .any(|r| r["error"].as_str().unwrap().contains("not a JSON value"))
    );
    // Resuming does nothing.
    let again = batch(&store, &args).output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(summary["done"], 0, "{summary}");
    assert_eq!(journal(&out).len(), 152);
}
