//! Accuracy on labelled data, and fidelity to a baseline artifact.

use std::collections::BTreeMap;
use std::path::Path;

use mote_engine::{Tensor, TensorData};
use serde::Serialize;
use serde_json::Value;

use crate::error::{AuditError, Result};
use crate::inputs::{merge, read_limited, read_npy, read_texts};
use crate::policy::{Accuracy, Fidelity};
use crate::scenarios::QUERY_TIMEOUT;
use crate::stats::{cosine, spearman};
use crate::target::{Answer, Query, Target};

/// Measures of one accuracy or fidelity run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measures {
    /// Items scored.
    pub items: usize,
    /// Items whose query failed (each counts as wrong).
    pub errors: usize,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Named measures (cosine_min, cosine_mean, spearman, top1, top5, exact_match,
    /// contains, max_abs_diff, top1_agreement, agreement).
    pub values: BTreeMap<String, f64>,
    /// The worst items (index and what went wrong), at most 10.
    pub worst: Vec<String>,
}

fn data_err(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Data {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Run queries in groups of `group` (merged when the kind allows); one answer per item.
fn answers(
    target: &dyn Target,
    queries: Vec<Query>,
    group: usize,
    m: &mut Measures,
) -> Vec<Option<Answer>> {
    let mut out = Vec::with_capacity(queries.len());
    for chunk in queries.chunks(group.max(1)) {
        let merged = if chunk.len() > 1 { merge(chunk) } else { None };
        match merged {
            Some(q) => match target.call(q, QUERY_TIMEOUT) {
                Ok(a) => out.extend(split_answer(a, chunk.len())),
                Err(e) => {
                    m.errors += chunk.len();
                    m.first_error.get_or_insert_with(|| e.to_string());
                    out.extend(std::iter::repeat_n(None, chunk.len()));
                }
            },
            None => {
                for q in chunk {
                    match target.call(q.clone(), QUERY_TIMEOUT) {
                        Ok(a) => out.push(Some(a)),
                        Err(e) => {
                            m.errors += 1;
                            m.first_error.get_or_insert_with(|| e.to_string());
                            out.push(None);
                        }
                    }
                }
            }
        }
    }
    out
}

fn split_answer(a: Answer, n: usize) -> Vec<Option<Answer>> {
    match a {
        Answer::Embeddings(e) if e.len() == n => e
            .into_iter()
            .map(|v| Some(Answer::Embeddings(vec![v])))
            .collect(),
        Answer::Classes(c) if c.len() == n => c
            .into_iter()
            .map(|v| Some(Answer::Classes(vec![v])))
            .collect(),
        Answer::Tensors(t) => (0..n)
            .map(|i| {
                t.iter()
                    .map(|(name, t)| Some((name.clone(), t.rows(i, 1).ok()?)))
                    .collect::<Option<Vec<_>>>()
                    .map(Answer::Tensors)
            })
            .collect(),
        _ => vec![None; n],
    }
}

fn first_vector(a: &Answer) -> Option<Vec<f32>> {
    match a {
        Answer::Embeddings(e) => e.first().cloned(),
        Answer::Tensors(t) => match t.first()?.1.data() {
            TensorData::F32(v) => Some(v.clone()),
            _ => None,
        },
        Answer::Classes(c) => Some(c.first()?.iter().map(|x| x.1).collect()),
        Answer::Text { .. } => None,
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |x| x.0)
}

fn cosines(m: &mut Measures, pairs: impl Iterator<Item = (usize, Option<f64>)>) {
    let mut all = Vec::new();
    let mut scored: Vec<(usize, f64)> = Vec::new();
    for (i, c) in pairs {
        let c = c.unwrap_or(f64::NAN);
        all.push(if c.is_nan() { -1.0 } else { c });
        scored.push((i, c));
    }
    if all.is_empty() {
        return;
    }
    scored.sort_by(|a, b| a.1.total_cmp(&b.1));
    m.worst = scored
        .iter()
        .take(5)
        .map(|(i, c)| format!("item {i}: cosine {c:.6}"))
        .collect();
    m.values.insert(
        "cosine_min".into(),
        all.iter().copied().fold(f64::INFINITY, f64::min),
    );
    m.values.insert(
        "cosine_mean".into(),
        all.iter().sum::<f64>() / all.len() as f64,
    );
}

/// Accuracy of the target on the policy's labelled data.
pub fn accuracy(target: &dyn Target, p: &Accuracy) -> Result<Measures> {
    let mut m = Measures::default();
    if let Some(expected) = &p.expected_npy {
        let want = read_npy(expected)?;
        let rows = want.shape().first().copied().unwrap_or(0);
        let queries: Vec<Query> = if let Some(texts) = &p.texts {
            read_texts(texts, "text")?
                .into_iter()
                .map(|t| Query::Texts(vec![t]))
                .collect()
        } else if !p.inputs_npy.is_empty() {
            let named: Vec<(String, Tensor)> = p
                .inputs_npy
                .iter()
                .map(|(n, path)| Ok((n.clone(), read_npy(path)?)))
                .collect::<Result<_>>()?;
            (0..rows)
                .map(|r| {
                    named
                        .iter()
                        .map(|(n, t)| t.rows(r, 1).map(|t| (n.clone(), t)))
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map(Query::Tensors)
                        .map_err(|e| {
                            data_err(expected, format!("inputs do not have {rows} rows: {e}"))
                        })
                })
                .collect::<Result<_>>()?
        } else {
            return Err(AuditError::Setup(
                "accuracy.expected_npy needs `texts` or `inputs_npy` beside it".into(),
            ));
        };
        if queries.len() != rows {
            return Err(data_err(
                expected,
                format!("it has {rows} rows but there are {} inputs", queries.len()),
            ));
        }
        let TensorData::F32(want_data) = want.data() else {
            return Err(data_err(expected, "expected values must be float32"));
        };
        let per = want_data.len() / rows.max(1);
        let got = answers(target, queries, 8, &mut m);
        m.items = rows;
        let mut max_abs = 0.0f64;
        let mut agree = 0usize;
        let mut pairs = Vec::new();
        for (i, a) in got.iter().enumerate() {
            let w = &want_data[i * per..(i + 1) * per];
            let v = a
                .as_ref()
                .and_then(first_vector)
                .filter(|v| v.len() == w.len());
            if let Some(v) = &v {
                for (x, y) in v.iter().zip(w) {
                    max_abs = max_abs.max((x - y).abs() as f64);
                }
                if argmax(v) == argmax(w) {
                    agree += 1;
                }
            } else {
                max_abs = f64::INFINITY;
            }
            pairs.push((i, v.map(|v| cosine(&v, w))));
        }
        cosines(&mut m, pairs.into_iter());
        m.values.insert("max_abs_diff".into(), max_abs);
        m.values
            .insert("top1_agreement".into(), agree as f64 / rows.max(1) as f64);
        return Ok(m);
    }
    let path = p.data.as_ref().expect("policy check: data or expected_npy");
    let text = read_limited(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let lines: Vec<Value> = mote_base::jsonl::values(&text)
        .map_err(|e| data_err(path, e.to_string()))?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    if lines.is_empty() {
        return Err(data_err(path, "it holds no labelled items"));
    }
    let first = &lines[0];
    if first.get("a").is_some() {
        // Pair similarity: Spearman of cos(a, b) against the human scores.
        let mut queries = Vec::new();
        let mut scores = Vec::new();
        for (n, l) in lines.iter().enumerate() {
            let (Some(a), Some(b), Some(s)) =
                (l["a"].as_str(), l["b"].as_str(), l["score"].as_f64())
            else {
                return Err(data_err(
                    path,
                    format!("line {} needs \"a\", \"b\" and a numeric \"score\"", n + 1),
                ));
            };
            queries.push(Query::Texts(vec![a.into()]));
            queries.push(Query::Texts(vec![b.into()]));
            scores.push(s);
        }
        let got = answers(target, queries, 32, &mut m);
        let sims: Vec<f64> = got
            .chunks(2)
            .map(|p| {
                match (
                    p[0].as_ref().and_then(first_vector),
                    p[1].as_ref().and_then(first_vector),
                ) {
                    (Some(a), Some(b)) => cosine(&a, &b),
                    _ => f64::NAN,
                }
            })
            .collect();
        m.items = scores.len();
        m.values.insert("spearman".into(), spearman(&sims, &scores));
    } else if first.get("text").is_some() {
        let mut queries = Vec::new();
        let mut want = Vec::new();
        for (n, l) in lines.iter().enumerate() {
            let (Some(t), Some(e)) = (l["text"].as_str(), l["expected"].as_array()) else {
                return Err(data_err(
                    path,
                    format!("line {} needs \"text\" and an \"expected\" vector", n + 1),
                ));
            };
            queries.push(Query::Texts(vec![t.into()]));
            want.push(
                e.iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                    .collect::<Vec<f32>>(),
            );
        }
        let got = answers(target, queries, 32, &mut m);
        m.items = want.len();
        let pairs: Vec<(usize, Option<f64>)> = got
            .iter()
            .zip(&want)
            .enumerate()
            .map(|(i, (a, w))| (i, a.as_ref().and_then(first_vector).map(|v| cosine(&v, w))))
            .collect();
        cosines(&mut m, pairs.into_iter());
    } else if first.get("image").is_some() {
        let mut queries = Vec::new();
        let mut labels = Vec::new();
        for (n, l) in lines.iter().enumerate() {
            let (Some(img), Some(label)) = (l["image"].as_str(), l["label"].as_str()) else {
                return Err(data_err(
                    path,
                    format!("line {} needs \"image\" (a path) and \"label\"", n + 1),
                ));
            };
            queries.push(Query::Images(vec![read_limited(&dir.join(img))?]));
            labels.push(label.to_string());
        }
        let got = answers(target, queries, 16, &mut m);
        m.items = labels.len();
        let (mut top1, mut top5) = (0, 0);
        for (i, (a, want)) in got.iter().zip(&labels).enumerate() {
            let classes = match a {
                Some(Answer::Classes(c)) => c.first().cloned().unwrap_or_default(),
                _ => Vec::new(),
            };
            let pos = classes.iter().position(|(l, _)| l == want);
            top1 += usize::from(pos == Some(0));
            top5 += usize::from(pos.is_some_and(|p| p < 5));
            if pos != Some(0) && m.worst.len() < 10 {
                m.worst.push(format!(
                    "item {i}: expected {want:?}, got {:?}",
                    classes
                        .first()
                        .map(|c| c.0.as_str())
                        .unwrap_or("(no answer)")
                ));
            }
        }
        m.values.insert("top1".into(), top1 as f64 / m.items as f64);
        m.values.insert("top5".into(), top5 as f64 / m.items as f64);
    } else if first.get("prompt").is_some() {
        let mut queries = Vec::new();
        for (n, l) in lines.iter().enumerate() {
            let Some(p) = l["prompt"].as_str() else {
                return Err(data_err(path, format!("line {} needs \"prompt\"", n + 1)));
            };
            queries.push(Query::Prompt(p.into()));
        }
        // Prompts are sent one per query but together, so the target decodes them in a batch.
        let got: Vec<Option<Answer>> = std::thread::scope(|s| {
            let handles: Vec<_> = queries
                .into_iter()
                .map(|q| s.spawn(move || target.call(q, QUERY_TIMEOUT)))
                .collect();
            handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(Ok(a)) => Some(a),
                    Ok(Err(e)) => {
                        m.errors += 1;
                        m.first_error.get_or_insert_with(|| e.to_string());
                        None
                    }
                    Err(_) => None,
                })
                .collect()
        });
        m.items = lines.len();
        let (mut exact, mut exact_n, mut contains, mut contains_n) = (0, 0, 0, 0);
        for (i, (a, l)) in got.iter().zip(&lines).enumerate() {
            let text = match a {
                Some(Answer::Text { text, .. }) => text.trim().to_string(),
                _ => String::new(),
            };
            if let Some(e) = l["expected"].as_str() {
                exact_n += 1;
                let ok = text == e.trim();
                exact += usize::from(ok);
                if !ok && m.worst.len() < 10 {
                    m.worst
                        .push(format!("item {i}: expected {e:?}, got {text:?}"));
                }
            }
            let wanted: Vec<&str> = match &l["contains"] {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !wanted.is_empty() {
                contains_n += 1;
                let lower = text.to_lowercase();
                let ok = wanted.iter().all(|w| lower.contains(&w.to_lowercase()));
                contains += usize::from(ok);
                if !ok && m.worst.len() < 10 {
                    m.worst.push(format!(
                        "item {i}: expected to contain {wanted:?}, got {text:?}"
                    ));
                }
            }
        }
        if exact_n > 0 {
            m.values
                .insert("exact_match".into(), exact as f64 / exact_n as f64);
        }
        if contains_n > 0 {
            m.values
                .insert("contains".into(), contains as f64 / contains_n as f64);
        }
    } else {
        return Err(data_err(
            path,
            "its lines have none of the known shapes: {\"text\",\"expected\"}, {\"a\",\"b\",\"score\"}, {\"image\",\"label\"}, {\"prompt\",\"expected\"|\"contains\"}",
        ));
    }
    Ok(m)
}

/// Fidelity: the same inputs through the target and the baseline.
pub fn fidelity(
    target: &dyn Target,
    baseline: &dyn Target,
    workload: &[Query],
    p: &Fidelity,
) -> Measures {
    let mut m = Measures::default();
    let queries: Vec<Query> = workload.iter().take(p.items).cloned().collect();
    let group = if matches!(queries.first(), Some(Query::Prompt(_))) {
        1
    } else {
        16
    };
    let a = answers(target, queries.clone(), group, &mut m);
    let b = answers(baseline, queries, group, &mut m);
    m.items = a.len();
    let mut agree = 0usize;
    let mut pairs = Vec::new();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let same = match (x, y) {
            (Some(Answer::Text { text: s, .. }), Some(Answer::Text { text: t, .. })) => s == t,
            (Some(Answer::Classes(c)), Some(Answer::Classes(d))) => {
                c.first().and_then(|c| c.first()).map(|c| &c.0)
                    == d.first().and_then(|d| d.first()).map(|d| &d.0)
            }
            (Some(x), Some(y)) => match (first_vector(x), first_vector(y)) {
                (Some(u), Some(v)) => argmax(&u) == argmax(&v),
                _ => false,
            },
            _ => false,
        };
        agree += usize::from(same);
        if let (Some(u), Some(v)) = (
            x.as_ref().and_then(first_vector),
            y.as_ref().and_then(first_vector),
        ) {
            pairs.push((i, Some(cosine(&u, &v))));
        }
    }
    cosines(&mut m, pairs.into_iter());
    // The argmax of an embedding means nothing: agreement is for classes, logits and text.
    if !matches!(a.iter().flatten().next(), Some(Answer::Embeddings(_))) {
        m.values
            .insert("agreement".into(), agree as f64 / m.items.max(1) as f64);
    }
    m
}
