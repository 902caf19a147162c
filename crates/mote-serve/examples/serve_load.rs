//! Load generator for `bench/serve-load.sh`: embeddings throughput and latency of a running
//! `mote serve`, next to the engine's offline throughput on the same texts.
//!
//! Usage: `serve_load STORE REF URL [SECONDS]`. The texts are 512 seeded sentences of 4–48
//! words. Measured, each for SECONDS (default 10) after a warm-up:
//! 1. offline: the engine alone, in-process, batches of 32 texts in the given order (what the
//!    server's batcher can at best do), 2 threads;
//! 2. single: one client, one text per request, one request at a time (latency floor);
//! 3. saturation: 64 clients in a closed loop, one text per request (server throughput);
//! 4. half load: Poisson arrivals at 50% of the saturation rate (open loop: latency measured
//!    from the scheduled send time, so a slow server cannot hide its queueing).
//!
//! The client runs on one thread so it takes as little CPU from the server as it can.
//! Prints one JSON line per measurement, then the two ratios the server is judged by, and
//! what queueing alone allows at that load: the p99 of an ideal server (FIFO, batches of
//! whatever is queued up to 32, no CPU shared with clients or HTTP) whose requests cost the
//! measured single-request latencies, less the measured batching gain for batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mote_engine::{EngineOptions, Input, Model, ThreadPool};
use mote_store::Store;
use serde_json::json;

const WORDS: &str = "the a model server answers every request with the exact digest of the weights \
    that produced it small machines run sentence embedders quickly when batches stay full and \
    threads are never multiplied per request password reset weather lovely today train station \
    coffee morning river mountain quiet library window garden kitchen music evening friend \
    letter yellow green blue paper story number market city bridge road winter summer autumn \
    spring holiday computer keyboard memory cache thread kernel vector matrix token sentence \
    meaning search query document answer question please thanks hello goodbye how what why \
    where when who which because therefore however although quickly slowly carefully rarely";

use mote_base::rng::SplitMix64 as Rng;

fn texts(n: usize) -> Vec<String> {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut rng = Rng::new(42);
    (0..n)
        .map(|_| {
            let len = 4 + (rng.next_u64() % 45) as usize;
            (0..len)
                .map(|_| words[(rng.next_u64() % words.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The workspace's one percentile (nearest rank), `p` as a fraction.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    mote_base::stats::percentile_sorted(sorted, p * 100.0)
}

fn report(name: &str, texts_per_s: f64, mut lat_ms: Vec<f64>, errors: usize) -> f64 {
    lat_ms.sort_by(f64::total_cmp);
    let line = json!({
        "scenario": name,
        "texts_per_s": (texts_per_s * 10.0).round() / 10.0,
        "requests": lat_ms.len(),
        "errors": errors,
        "p50_ms": percentile(&lat_ms, 0.50),
        "p90_ms": percentile(&lat_ms, 0.90),
        "p99_ms": percentile(&lat_ms, 0.99),
    });
    println!("{line}");
    texts_per_s
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn embed(client: &Http, url: &str, text: &str) -> bool {
    let body = json!({"model": "bench", "input": text}).to_string();
    let Ok(req) = hyper::Request::post(format!("{url}/v1/embeddings"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
    else {
        return false;
    };
    match client.request(req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            ok && resp.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

/// Closed loop: `clients` tasks, each sending the next text as soon as its last answer came.
async fn closed_loop(
    client: &Http,
    url: &str,
    texts: &Arc<Vec<String>>,
    clients: usize,
    seconds: f64,
) -> (f64, Vec<f64>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, texts, stop, next) = (
            client.clone(),
            url.to_string(),
            texts.clone(),
            stop.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed) % texts.len();
                let t = Instant::now();
                if embed(&client, &url, &texts[i]).await {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    (lat.len() as f64 / elapsed, lat, errors)
}

/// Open loop: Poisson arrivals at `rate` per second; latency from the scheduled time.
async fn open_loop(
    client: &Http,
    url: &str,
    texts: &Arc<Vec<String>>,
    rate: f64,
    seconds: f64,
) -> (f64, Vec<f64>, usize) {
    let mut rng = Rng::new(7);
    let started = Instant::now();
    let mut at = 0.0;
    let mut tasks = Vec::new();
    let mut i = 0;
    while at < seconds {
        at += -(1.0 - rng.next_f64()).ln() / rate;
        let scheduled = started + Duration::from_secs_f64(at);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, url, texts) = (client.clone(), url.to_string(), texts.clone());
        let idx = i % texts.len();
        i += 1;
        tasks.push(tokio::spawn(async move {
            let ok = embed(&client, &url, &texts[idx]).await;
            (ok, scheduled.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (ok, l) = t.await.expect("client task");
        if ok {
            lat.push(l);
        } else {
            errors += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    (lat.len() as f64 / elapsed, lat, errors)
}

fn offline(store: &str, reference: &str, texts: &[String], seconds: f64) -> f64 {
    let store = Store::open(store).expect("open the store");
    let options = EngineOptions {
        pool: Some(ThreadPool::new(2).expect("thread pool")),
        ..Default::default()
    };
    let model = Model::open(&store, &reference.parse().expect("reference"), &options)
        .expect("open the model");
    let pipeline = model.pipeline(None).expect("pipeline");
    let run_all = || {
        for chunk in texts.chunks(32) {
            pipeline
                .run(Input::Texts(chunk.to_vec()))
                .expect("embeddings");
        }
    };
    run_all(); // warm-up
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed().as_secs_f64() < seconds {
        run_all();
        done += texts.len();
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// p99 latency (ms) of an ideal server under Poisson arrivals at `rate` per second: one
/// FIFO queue, batches of everything queued (up to 32) when the server frees up; a request
/// costs a latency drawn from `single` (ms), and a batch of `k` the sum of its requests'
/// costs times `gain + (1 - gain) / k`, `gain` being the cost of a request in a full batch
/// relative to alone (single-request rate / saturation rate). Seeded, 200,000 arrivals.
fn ideal_p99(single: &[f64], gain: f64, rate: f64) -> f64 {
    let mut rng = Rng::new(11);
    let n = 200_000;
    let mut t = 0.0;
    let arrivals: Vec<(f64, f64)> = (0..n)
        .map(|_| {
            t += -(1.0 - rng.next_f64()).ln() / rate * 1e3;
            (t, single[(rng.next_u64() % single.len() as u64) as usize])
        })
        .collect();
    let (mut free, mut i, mut lat) = (0f64, 0, Vec::with_capacity(n));
    while i < n {
        let start = free.max(arrivals[i].0);
        let mut j = i + 1;
        while j < n && j - i < 32 && arrivals[j].0 <= start {
            j += 1;
        }
        let k = (j - i) as f64;
        let cost: f64 = arrivals[i..j].iter().map(|a| a.1).sum::<f64>() * (gain + (1.0 - gain) / k);
        free = start + cost;
        lat.extend(arrivals[i..j].iter().map(|a| free - a.0));
        i = j;
    }
    lat.sort_by(f64::total_cmp);
    percentile(&lat, 0.99)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: serve_load STORE REF URL [SECONDS]");
        std::process::exit(2);
    }
    let seconds: f64 = args.get(4).map_or(10.0, |s| s.parse().expect("seconds"));
    let texts = Arc::new(texts(512));
    let offline_rate = offline(&args[1], &args[2], &texts, seconds);
    report("offline", offline_rate, Vec::new(), 0);

    let url = args[3].trim_end_matches('/').to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client: Http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build_http();
        // Warm-up (connections, the server's first batches).
        closed_loop(&client, &url, &texts, 8, 2.0).await;
        let (single_rate, lat, err) = closed_loop(&client, &url, &texts, 1, seconds).await;
        report("single", single_rate, lat.clone(), err);
        let mut single = lat;
        single.sort_by(f64::total_cmp);
        let single_p50 = percentile(&single, 0.5);
        let single_p99 = percentile(&single, 0.99);
        let (sat, lat, err) = closed_loop(&client, &url, &texts, 64, seconds).await;
        report("saturation_64_clients", sat, lat, err);
        let (rate, lat, err) = open_loop(&client, &url, &texts, sat * 0.5, seconds).await;
        let ideal = ideal_p99(&single, (single_rate / sat).min(1.0), sat * 0.5);
        let mut half = lat.clone();
        report("half_load_poisson", rate, lat, err);
        half.sort_by(f64::total_cmp);
        let p99 = percentile(&half, 0.99);
        println!(
            "saturation / offline throughput: {:.1}% ({sat:.1} vs {offline_rate:.1} texts/s)",
            100.0 * sat / offline_rate
        );
        println!(
            "p99 at 50% load / single-request p50: {:.2}x ({p99:.2} vs {single_p50:.2} ms)",
            p99 / single_p50
        );
        println!(
            "p99 at 50% load / single-request p99: {:.2}x ({p99:.2} vs {single_p99:.2} ms)",
            p99 / single_p99
        );
        println!(
            "queueing alone at 50% load (an ideal FIFO batching server with the single requests' \
             times): p99 {ideal:.2} ms = {:.2}x single p50, {:.2}x single p99; measured / ideal {:.2}",
            ideal / single_p50,
            ideal / single_p99,
            p99 / ideal
        );
    });
}
