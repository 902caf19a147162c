//! Engine latency on the shared benchmark inputs (see bench/engine.sh): imports the ONNX
//! fixtures into a temporary store, runs each case through the tensor pipeline at 1 and 2
//! threads, and prints one JSON line per case with p50/p95 and the fastest run in milliseconds
//! (the fastest is the steadiest figure for comparing two builds on a noisy machine).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mote_engine::{EngineOptions, Model, Pipeline, Tensor, npy};
use mote_store::{ImportOptions, Store, Task};

/// Named inputs of one case.
type Inputs = Vec<(String, Tensor)>;

/// Runs per case at least (`BENCH_MIN_RUNS`, default 20) and time per case at least
/// (`BENCH_BUDGET_S`, default 3 s); bench/engine.sh lowers both when it interleaves rounds.
fn limits() -> (usize, Duration) {
    let env = |k: &str, d: f64| std::env::var(k).map_or(d, |v| v.parse().expect(k));
    (
        env("BENCH_MIN_RUNS", 20.0) as usize,
        Duration::from_secs_f64(env("BENCH_BUDGET_S", 3.0)),
    )
}

fn load(path: &Path) -> Tensor {
    npy::read(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn first_rows(t: &Tensor, n: usize) -> Tensor {
    let per: usize = t.shape()[1..].iter().product();
    let mut shape = t.shape().to_vec();
    shape[0] = n;
    Tensor::new(
        shape,
        mote_engine::TensorData::F32(t.as_f32().unwrap()[..n * per].to_vec()),
    )
    .unwrap()
}

fn main() {
    let shared = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: bench_engine SHARED_MODELS_DIR [MINILM_SAFETENSORS_DIR]"),
    );
    let native_dir = std::env::args().nth(2).map(PathBuf::from);
    let refdir = shared.join("ref");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    for (file, name) in [
        ("minilm-l6.onnx", "minilm"),
        ("mobilenetv2.onnx", "mobilenet"),
    ] {
        store
            .import(
                &shared.join(file),
                Some(&name.parse().unwrap()),
                &ImportOptions::default(),
            )
            .unwrap();
    }
    if let Some(dir) = &native_dir {
        store
            .import(
                dir,
                Some(&"minilm-native".parse().unwrap()),
                &ImportOptions::default(),
            )
            .unwrap();
        // The int8 artifact `mote quantize --int8` makes (built-in calibration set).
        let q = mote_engine::quantize::quantize_int8(
            &store,
            &"minilm-native".parse().unwrap(),
            &mote_engine::quantize::Int8Options {
                calibration: mote_engine::quantize::sentences(mote_engine::quantize::CALIBRATION),
                evaluation: mote_engine::quantize::sentences(mote_engine::quantize::EVALUATION),
                alpha: 0.5,
                keep_f32: Vec::new(),
                outliers: std::env::var("BENCH_OUTLIERS")
                    .map_or(4, |v| v.parse().expect("BENCH_OUTLIERS")),
                threads: 2,
            },
        )
        .unwrap();
        store
            .derive(
                &"minilm-native".parse().unwrap(),
                &q.files,
                Default::default(),
                |_| {},
                Some(&"minilm-int8".parse().unwrap()),
            )
            .unwrap();
    }
    let minilm = |b: usize, s: usize| -> Inputs {
        ["input_ids", "attention_mask", "token_type_ids"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    load(&refdir.join(format!("bench_minilm_b{b}_s{s}_{n}.npy"))),
                )
            })
            .collect()
    };
    let images = load(&refdir.join("bench_mobilenet_b16.npy"));
    let mut cases: Vec<(&str, &str, Inputs)> = vec![
        ("minilm_b1_s16", "minilm", minilm(1, 16)),
        ("minilm_b1_s128", "minilm", minilm(1, 128)),
        ("minilm_b32_s128", "minilm", minilm(32, 128)),
        (
            "mobilenet_b1",
            "mobilenet",
            vec![(String::new(), first_rows(&images, 1))],
        ),
        (
            "mobilenet_b16",
            "mobilenet",
            vec![(String::new(), images.clone())],
        ),
    ];
    if native_dir.is_some() {
        cases.extend([
            ("minilm_native_b1_s16", "minilm-native", minilm(1, 16)),
            ("minilm_native_b1_s128", "minilm-native", minilm(1, 128)),
            ("minilm_native_b32_s128", "minilm-native", minilm(32, 128)),
            ("minilm_int8_b1_s16", "minilm-int8", minilm(1, 16)),
            ("minilm_int8_b1_s128", "minilm-int8", minilm(1, 128)),
            ("minilm_int8_b32_s128", "minilm-int8", minilm(32, 128)),
        ]);
    }
    // BENCH_ONLY=substring runs only the matching cases; BENCH_THREADS=2 only that count.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    cases.retain(|(case, _, _)| case.contains(only.as_str()));
    let thread_counts: Vec<usize> = match std::env::var("BENCH_THREADS") {
        Ok(t) => vec![t.parse().expect("BENCH_THREADS is a number")],
        Err(_) => vec![1, 2],
    };
    for threads in thread_counts {
        for (case, model, inputs) in &cases {
            let m = Model::open(
                &store,
                &model.parse().unwrap(),
                &EngineOptions {
                    threads: Some(threads),
                    ..Default::default()
                },
            )
            .unwrap();
            let Pipeline::Tensor(p) = m.pipeline(Some(Task::Tensor)).unwrap() else {
                unreachable!()
            };
            let run = || p.run(inputs.clone()).unwrap();
            // Warm up for 3 runs and at least a second: allocator thresholds and page
            // faults settle (the first second of a fresh process is measurably slower).
            let warm = Instant::now();
            for i in 0.. {
                if i >= 3 && warm.elapsed() >= Duration::from_secs(1) {
                    break;
                }
                run();
            }
            let mut times = Vec::new();
            let start = Instant::now();
            let (min_runs, budget) = limits();
            while times.len() < min_runs || start.elapsed() < budget {
                let t = Instant::now();
                run();
                times.push(t.elapsed().as_secs_f64() * 1e3);
                if times.len() >= 2000 {
                    break;
                }
            }
            times.sort_by(f64::total_cmp);
            let p50 = times[times.len() / 2];
            let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
            println!(
                "{{\"engine\":\"mote\",\"case\":\"{case}\",\"threads\":{threads},\"p50_ms\":{p50:.4},\"p95_ms\":{p95:.4},\"min_ms\":{:.4},\"runs\":{}}}",
                times[0],
                times.len()
            );
        }
    }
}
