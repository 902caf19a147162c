//! The realistic inputs of the load scenarios: the policy's files, or built-in ones for the
//! task (varied sentences, seeded synthetic images, short instructions).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use mote_engine::{Tensor, npy};
use mote_store::Task;

use crate::error::{AuditError, Result};
use crate::policy::Inputs;
use crate::stats::{SplitMix64, seeded};
use crate::target::Query;

/// Largest input file read.
const MAX_INPUT_FILE: u64 = 256 << 20;

/// Sentences of many kinds and lengths, used when a policy names no texts.
pub const BUILTIN_SENTENCES: &[&str] = &[
    "The cat sat quietly on the warm windowsill.",
    "Quarterly revenue grew 12% year over year, driven by subscriptions.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Die Bahn hat heute wegen eines Signalfehlers Verspätung.",
    "Le musée ouvre ses portes à neuf heures du matin.",
    "El tren sale de la estación central a las ocho.",
    "Please find attached the signed contract and the invoice for March.",
    "fn main() { println!(\"hello\"); }",
    "Error: connection refused (os error 111) while contacting the database.",
    "A short one.",
    "Yes",
    "The mitochondria is the powerhouse of the cell, a phrase every student remembers.",
    "Turn left at the second roundabout, then continue for about 300 metres.",
    "Customers who bought this item also bought a charging cable and a case.",
    "Rain is expected tomorrow afternoon with winds up to 40 km/h.",
    "The committee postponed the vote until more data on the budget is available.",
    "I absolutely loved the film, although the ending felt a little rushed.",
    "This product broke after two days and support never answered my emails.",
    "Gradient descent updates parameters in the direction of the negative gradient.",
    "東京は日本の首都です。",
    "Сегодня хорошая погода для прогулки в парке.",
    "Meeting moved to 3pm — bring the Q3 numbers and the hiring plan.",
    "SELECT name, count(*) FROM orders GROUP BY name HAVING count(*) > 10;",
    "The patient reported mild headaches and occasional dizziness over two weeks.",
    "Bake at 180°C for 25 minutes or until golden brown.",
    "Who won the football world cup in 2014?",
    "Symptoms include fever, cough and fatigue lasting more than a week.",
    "The server returned HTTP 503 during the deployment window.",
    "A journey of a thousand miles begins with a single step.",
    "Our new policy allows employees to work remotely two days a week, provided their \
     team agrees on shared office days and core hours remain covered for customers in \
     every time zone we serve.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong became the first person to \
     walk on its surface, watched live on television by hundreds of millions of people.",
    "The quick brown fox jumps over the lazy dog.",
    "Invoice #4411 is overdue by 30 days; a reminder has been sent.",
    "Can you recommend a good book about the history of mathematics?",
    "Battery life is excellent: two full days of normal use on one charge.",
    "Heavy snowfall closed the mountain pass overnight.",
    "The function returns None when the key is missing from the dictionary.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Shipping to Norway takes five to seven business days.",
];

/// Instructions for language models, used when a policy names no prompts.
pub const BUILTIN_PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three fruits.",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Give me a name for a small grey cat.",
    "What is 2 + 3?",
    "Summarise: The meeting was moved from Monday to Wednesday because the room was booked.",
];

/// Read a text list: `.jsonl` (strings or objects with `field`), `.json` (array of strings),
/// or plain text (one per line). Empty lines are skipped.
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<String>> {
    let text = read_limited(path)?;
    let bad = |reason: String| AuditError::Data {
        path: path.to_path_buf(),
        reason,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let texts: Vec<String> = match ext {
        "json" => {
            // An array of strings, or an object holding one (e.g. {"sentences": [...]}).
            let v: serde_json::Value =
                serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
            let strings = |a: &serde_json::Value| -> Option<Vec<String>> {
                a.as_array()?
                    .iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect()
            };
            strings(&v)
                .or_else(|| v.as_object()?.values().find_map(strings))
                .ok_or_else(|| {
                    bad("expected a JSON array of strings, or an object holding one".into())
                })?
        }
        "jsonl" => {
            let mut out = Vec::new();
            for (n, v) in mote_base::jsonl::values(&text).map_err(|e| bad(e.to_string()))? {
                match v.as_str().or(v[field].as_str()) {
                    Some(t) => out.push(t.to_string()),
                    None => {
                        return Err(bad(format!(
                            "line {n} is neither a string nor an object with {field:?}"
                        )));
                    }
                }
            }
            out
        }
        _ => String::from_utf8(text)
            .map_err(|e| bad(format!("not UTF-8: {e}")))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
    };
    if texts.is_empty() {
        return Err(bad("it holds no texts".into()));
    }
    Ok(texts)
}

/// Read a file of at most 256 MiB.
pub fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let bad = |reason: String| AuditError::Data {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    if meta.len() > MAX_INPUT_FILE {
        return Err(bad(format!(
            "it has {} bytes, more than the {MAX_INPUT_FILE} an audit input may have",
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))
}

/// Read a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    npy::read(&read_limited(path)?).map_err(|e| AuditError::Data {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Images (`.png`, `.jpg`, `.jpeg`) of a directory, sorted by name.
fn read_images(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let bad = |reason: String| AuditError::Data {
        path: dir.to_path_buf(),
        reason,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(format!("cannot list it: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(bad("it holds no .png or .jpg images".into()));
    }
    paths.iter().map(|p| read_limited(p)).collect()
}

/// A synthetic image: smooth colour fields with a few shapes, like a photo's statistics
/// more than noise does, encoded as PNG or JPEG.
pub fn synthetic_image(rng: &mut SplitMix64, width: u32, height: u32, jpeg: bool) -> Vec<u8> {
    let (r0, g0, b0) = (
        rng.next_f64() * 255.0,
        rng.next_f64() * 255.0,
        rng.next_f64() * 255.0,
    );
    let (cx, cy, rad) = (
        rng.next_f64() * width as f64,
        rng.next_f64() * height as f64,
        (0.1 + rng.next_f64() * 0.3) * width.min(height) as f64,
    );
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f64 / width as f64, y as f64 / height as f64);
        let inside = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt() < rad;
        let shade = if inside { 0.4 } else { 1.0 };
        image::Rgb([
            ((r0 * (1.0 - fx) + 60.0 * fy) * shade).clamp(0.0, 255.0) as u8,
            ((g0 * fy + 40.0 * fx) * shade).clamp(0.0, 255.0) as u8,
            ((b0 * (0.5 + 0.5 * fx * fy)) * shade).clamp(0.0, 255.0) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    let format = if jpeg {
        image::ImageFormat::Jpeg
    } else {
        image::ImageFormat::Png
    };
    img.write_to(&mut out, format).expect("encoding to memory");
    out.into_inner()
}

/// The load scenarios' queries, one item each, in a seeded order.
pub fn workload(task: Task, inputs: &Inputs, seed: u64) -> Result<Vec<Query>> {
    let mut rng = seeded(seed);
    let mut queries: Vec<Query> = match task {
        Task::TextEmbedding | Task::TextClassification => match &inputs.texts {
            Some(p) => read_texts(p, "text")?,
            None => BUILTIN_SENTENCES.iter().map(|s| s.to_string()).collect(),
        }
        .into_iter()
        .map(|t| Query::Texts(vec![t]))
        .collect(),
        Task::TextGeneration => match &inputs.prompts {
            Some(p) => read_texts(p, "prompt")?,
            None => BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect(),
        }
        .into_iter()
        .map(Query::Prompt)
        .collect(),
        Task::ImageClassification => match &inputs.images {
            Some(dir) => read_images(dir)?,
            None => (0..16)
                .map(|i| {
                    let (w, h) = [(224, 224), (320, 240), (640, 480), (256, 384)][i % 4];
                    synthetic_image(&mut rng, w, h, i % 2 == 1)
                })
                .collect(),
        }
        .into_iter()
        .map(|i| Query::Images(vec![i]))
        .collect(),
        Task::Tensor => {
            if inputs.tensors.is_empty() {
                return Err(AuditError::Setup(
                    "the tensor task has no built-in inputs: name .npy files under [inputs] tensors".into(),
                ));
            }
            let named: Vec<(String, Tensor)> = inputs
                .tensors
                .iter()
                .map(|(n, p)| Ok((n.clone(), read_npy(p)?)))
                .collect::<Result<_>>()?;
            let rows = named[0].1.shape().first().copied().unwrap_or(0);
            if rows == 0 || named.iter().any(|(_, t)| t.shape().first() != Some(&rows)) {
                return Err(AuditError::Setup(
                    "[inputs] tensors must share a non-empty first axis (one query per row)".into(),
                ));
            }
            (0..rows)
                .map(|r| {
                    named
                        .iter()
                        .map(|(n, t)| Ok((n.clone(), t.rows(r, 1)?)))
                        .collect::<Result<Vec<_>>>()
                        .map(Query::Tensors)
                })
                .collect::<Result<_>>()?
        }
    };
    // Seeded shuffle (Fisher-Yates) so runs with one seed see one order.
    for i in (1..queries.len()).rev() {
        let j = rng.below(i + 1);
        queries.swap(i, j);
    }
    Ok(queries)
}

/// Merge single-item queries into one query of all their items (texts, images, tensors).
pub fn merge(queries: &[Query]) -> Option<Query> {
    match queries.first()? {
        Query::Texts(_) => Some(Query::Texts(
            queries
                .iter()
                .flat_map(|q| match q {
                    Query::Texts(t) => t.clone(),
                    _ => Vec::new(),
                })
                .collect(),
        )),
        Query::Images(_) => Some(Query::Images(
            queries
                .iter()
                .flat_map(|q| match q {
                    Query::Images(i) => i.clone(),
                    _ => Vec::new(),
                })
                .collect(),
        )),
        Query::Tensors(first) => {
            let mut out = Vec::new();
            for (k, (name, _)) in first.iter().enumerate() {
                let parts: Vec<Tensor> = queries
                    .iter()
                    .filter_map(|q| match q {
                        Query::Tensors(t) => t.get(k).map(|(_, t)| t.clone()),
                        _ => None,
                    })
                    .collect();
                out.push((name.clone(), Tensor::concat_rows(parts).ok()?));
            }
            Some(Query::Tensors(out))
        }
        _ => None,
    }
}
