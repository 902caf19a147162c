//! Load scenarios (MLPerf LoadGen's single-stream, server and offline), the memory run and
//! the soak, each measured against a [`Target`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::inputs::merge;
use crate::policy::{Memory, Offline, Server, SingleStream, Soak};
use crate::report::Check;
use crate::stats::{Summary, Trend, median, seeded, trend};
use crate::target::{Query, Target};

/// How long one load query may take before it counts as an error.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Most latencies kept in a report per run (the summary uses all of them).
const MAX_KEPT: usize = 20_000;
/// A run never lasts longer than this many times its minimum duration (plus a minute).
const MAX_STRETCH: f64 = 20.0;

/// One measured run of queries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyRun {
    /// Latency summary, ms.
    pub summary: Summary,
    /// Queries answered.
    pub queries: usize,
    /// Queries that failed (refused, crashed or timed out).
    pub errors: usize,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Wall time of the run, s.
    pub duration_s: f64,
    /// Answered queries per second.
    pub qps: f64,
    /// Latencies in completion order, ms (at most 20,000).
    pub latencies_ms: Vec<f64>,
}

fn finish(mut lat: Vec<f64>, errors: usize, first_error: Option<String>, wall: f64) -> LatencyRun {
    let summary = Summary::of(&lat);
    let queries = lat.len();
    lat.truncate(MAX_KEPT);
    LatencyRun {
        summary,
        queries,
        errors,
        first_error,
        duration_s: wall,
        qps: queries as f64 / wall.max(1e-9),
        latencies_ms: lat,
    }
}

fn pick(queries: &[Query], i: usize) -> Query {
    queries[i % queries.len()].clone()
}

/// Warm the target up with `n` queries (errors ignored).
pub fn warm_up(target: &dyn Target, queries: &[Query], n: usize) {
    for i in 0..n {
        let _ = target.call(pick(queries, i), QUERY_TIMEOUT);
    }
}

/// Single-stream: one query at a time until both minimums are met.
pub fn single_stream(
    target: &dyn Target,
    queries: &[Query],
    p: &SingleStream,
    tick: &(dyn Fn(u64) + Sync),
) -> LatencyRun {
    warm_up(target, queries, p.warmup);
    run_sequential(target, queries, p.min_queries, p.min_duration_s, tick)
}

/// Queries one after another until `min_queries` and `min_duration_s` are both reached.
pub fn run_sequential(
    target: &dyn Target,
    queries: &[Query],
    min_queries: usize,
    min_duration_s: f64,
    tick: &(dyn Fn(u64) + Sync),
) -> LatencyRun {
    let start = Instant::now();
    let cap = min_duration_s * MAX_STRETCH + 60.0;
    let (mut lat, mut errors, mut first) = (Vec::new(), 0, None);
    let mut i = 0;
    loop {
        let elapsed = start.elapsed().as_secs_f64();
        if (i >= min_queries && elapsed >= min_duration_s) || elapsed > cap {
            break;
        }
        let t = Instant::now();
        match target.call(pick(queries, i), QUERY_TIMEOUT) {
            Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                errors += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        }
        i += 1;
        tick(1);
    }
    finish(lat, errors, first, start.elapsed().as_secs_f64())
}

/// One rate of the server scenario.
#[derive(Clone, Debug, Serialize)]
pub struct ServerRun {
    /// Offered (scheduled) arrival rate, queries/s.
    pub offered_qps: f64,
    /// The rate this run's drawn schedule actually has (queries over the last scheduled
    /// arrival): with a hundred-odd Poisson arrivals it differs from `offered_qps` by
    /// several percent, so achieved throughput is judged against it.
    pub scheduled_qps: f64,
    /// Whether this is the policy's target rate (the thresholds apply to it).
    pub target_rate: bool,
    /// The run.
    pub run: LatencyRun,
}

/// Server: Poisson arrivals at the target rate and at each sweep fraction of it.
pub fn server(
    target: &dyn Target,
    queries: &[Query],
    p: &Server,
    seed: u64,
    tick: &(dyn Fn(u64) + Sync),
) -> Vec<ServerRun> {
    let mut rates: Vec<(f64, bool)> = p.sweep.iter().map(|f| (p.rate * f, false)).collect();
    rates.push((p.rate, true));
    rates.sort_by(|a, b| a.0.total_cmp(&b.0));
    rates.dedup_by(|a, b| {
        (a.0 - b.0).abs() < 1e-9 && {
            b.1 |= a.1;
            true
        }
    });
    warm_up(target, queries, 3);
    rates
        .into_iter()
        .enumerate()
        .map(|(k, (rate, is_target))| {
            let n = p.min_queries.max((rate * p.min_duration_s).ceil() as usize);
            let (run, scheduled_qps) = poisson(
                target,
                queries,
                rate,
                n,
                p.max_in_flight,
                seed.wrapping_add(k as u64),
                tick,
            );
            ServerRun {
                offered_qps: rate,
                scheduled_qps,
                target_rate: is_target,
                run,
            }
        })
        .collect()
}

/// Open-loop Poisson arrivals; latency counts from each query's scheduled arrival, so a
/// query that waits for a free client slot or in the server's queue pays for it.
fn poisson(
    target: &dyn Target,
    queries: &[Query],
    rate: f64,
    n: usize,
    max_in_flight: usize,
    seed: u64,
    tick: &(dyn Fn(u64) + Sync),
) -> (LatencyRun, f64) {
    let mut rng = seeded(seed);
    let mut at = 0.0;
    let schedule: Vec<f64> = (0..n)
        .map(|_| {
            at += rng.exponential(rate);
            at
        })
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<(Vec<f64>, usize, Option<String>)> = Mutex::new((Vec::new(), 0, None));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..max_in_flight.min(n) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let due = start + Duration::from_secs_f64(schedule[i]);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let r = target.call(pick(queries, i), QUERY_TIMEOUT);
                    let lat = due.elapsed().as_secs_f64() * 1e3;
                    let mut g = results.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(_) => g.0.push(lat),
                        Err(e) => {
                            g.1 += 1;
                            g.2.get_or_insert_with(|| e.to_string());
                        }
                    }
                    drop(g);
                    tick(1);
                }
            });
        }
    });
    let (lat, errors, first) = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let scheduled = n as f64 / schedule.last().copied().unwrap_or(0.0).max(1e-9);
    (
        finish(lat, errors, first, start.elapsed().as_secs_f64()),
        scheduled,
    )
}

/// The offline scenario's result.
#[derive(Clone, Debug, Serialize)]
pub struct OfflineRun {
    /// Items per query.
    pub batch: usize,
    /// Items answered.
    pub items: usize,
    /// Items in failed queries.
    pub errors: usize,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Wall time, s.
    pub duration_s: f64,
    /// Items per second.
    pub items_per_s: f64,
}

/// Offline: batches of `batch` items back to back (prompts: `batch` concurrent callers,
/// which the target decodes together).
pub fn offline(
    target: &dyn Target,
    queries: &[Query],
    p: &Offline,
    tick: &(dyn Fn(u64) + Sync),
) -> OfflineRun {
    warm_up(target, queries, 2);
    let start = Instant::now();
    let cap = p.min_duration_s * MAX_STRETCH + 60.0;
    let done = AtomicUsize::new(0);
    let failed: Mutex<(usize, Option<String>)> = Mutex::new((0, None));
    let prompts = matches!(queries.first(), Some(Query::Prompt(_)));
    let enough = |done: usize| {
        let t = start.elapsed().as_secs_f64();
        (done >= p.min_items && t >= p.min_duration_s) || t > cap
    };
    if prompts {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..p.batch {
                s.spawn(|| {
                    while !enough(done.load(Ordering::Relaxed)) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        match target.call(pick(queries, i), QUERY_TIMEOUT) {
                            Ok(_) => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                                f.0 += 1;
                                f.1.get_or_insert_with(|| e.to_string());
                                if f.0 > 100 {
                                    return;
                                }
                            }
                        }
                        tick(1);
                    }
                });
            }
        });
    } else {
        let mut i = 0;
        while !enough(done.load(Ordering::Relaxed)) {
            let group: Vec<Query> = (0..p.batch).map(|k| pick(queries, i + k)).collect();
            i += p.batch;
            let Some(q) = merge(&group) else { break };
            match target.call(q, QUERY_TIMEOUT) {
                Ok(_) => {
                    done.fetch_add(p.batch, Ordering::Relaxed);
                }
                Err(e) => {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    f.0 += p.batch;
                    f.1.get_or_insert_with(|| e.to_string());
                    if f.0 > 100 * p.batch {
                        break;
                    }
                }
            }
            tick(p.batch as u64);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let items = done.into_inner();
    let (errors, first_error) = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    OfflineRun {
        batch: p.batch,
        items,
        errors,
        first_error,
        duration_s: wall,
        items_per_s: items as f64 / wall.max(1e-9),
    }
}

/// The memory run's result.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRun {
    /// Requests in the growth run.
    pub requests: usize,
    /// Failed requests.
    pub errors: usize,
    /// Resident memory after warm-up, KiB.
    pub rss_before_kib: Option<u64>,
    /// Resident memory after the run, KiB.
    pub rss_after_kib: Option<u64>,
    /// Growth per 1,000 requests, KiB (from the least-squares slope of the samples).
    pub growth_kib_per_1000: Option<f64>,
    /// Peak resident memory of the serving process, KiB.
    pub peak_rss_kib: Option<u64>,
    /// (requests done, resident KiB) samples.
    pub samples: Vec<(usize, u64)>,
}

/// Memory: resident memory sampled over `requests` sequential requests after a warm-up.
pub fn memory(
    target: &dyn Target,
    queries: &[Query],
    p: &Memory,
    tick: &(dyn Fn(u64) + Sync),
) -> MemoryRun {
    warm_up(target, queries, queries.len().clamp(1, 50));
    let every = (p.requests / 25).max(1);
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut peak = target.rss_kib();
    if let Some(r) = target.rss_kib() {
        samples.push((0, r));
    }
    for i in 0..p.requests {
        if target.call(pick(queries, i), QUERY_TIMEOUT).is_err() {
            errors += 1;
        }
        if (i + 1) % every == 0
            && let Some(r) = target.rss_kib()
        {
            samples.push((i + 1, r));
            peak = peak.max(Some(r));
        }
        tick(1);
    }
    let x: Vec<f64> = samples.iter().map(|s| s.0 as f64).collect();
    let y: Vec<f64> = samples.iter().map(|s| s.1 as f64).collect();
    MemoryRun {
        requests: p.requests,
        errors,
        rss_before_kib: samples.first().map(|s| s.1),
        rss_after_kib: samples.last().map(|s| s.1),
        growth_kib_per_1000: trend(&x, &y).map(|t| t.slope * 1000.0),
        peak_rss_kib: target.peak_rss_kib().or(peak),
        samples,
    }
}

/// One soak window.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    /// Window end, s from the start.
    pub t_s: f64,
    /// Requests answered in it.
    pub requests: usize,
    /// Median latency in it, ms.
    pub p50_ms: f64,
    /// Resident memory at its end, KiB.
    pub rss_kib: Option<u64>,
}

/// The soak's result.
#[derive(Clone, Debug, Serialize)]
pub struct SoakRun {
    /// Run length, s.
    pub duration_s: f64,
    /// Window length, s.
    pub window_s: f64,
    /// Windows discarded as warm-up.
    pub warmup_windows: usize,
    /// Requests answered.
    pub requests: usize,
    /// Failed requests.
    pub errors: usize,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Per-window medians and memory.
    pub windows: Vec<Window>,
    /// Trend of the window medians (ms per s) after warm-up.
    pub latency_trend: Option<Trend>,
    /// Trend of resident memory (KiB per s) after warm-up.
    pub rss_trend: Option<Trend>,
    /// Fitted latency change over the measured part, percent of the mean.
    pub latency_drift_pct: Option<f64>,
    /// Fitted memory growth, KiB per 1,000 requests.
    pub rss_growth_kib_per_1000: Option<f64>,
    /// Fitted memory growth, KiB per minute.
    pub rss_growth_kib_per_min: Option<f64>,
    /// Fitted memory growth over the span of the memory readings after warm-up, KiB.
    pub rss_growth_kib: Option<f64>,
}

/// The soak's two trend checks. A trend fails only when it is significant and larger than
/// its bound; the memory trend also only when it adds up to more than page and allocator
/// noise (`min_rss_growth_kb` over the fitted span). No trend (too few windows): the check
/// fails on a missing value.
pub fn soak_checks(r: &SoakRun, s: &Soak) -> [Check; 2] {
    let above_noise = r.rss_growth_kib.unwrap_or(f64::MAX) > s.min_rss_growth_kb;
    [
        trend_check(
            ("soak.max_rss_growth_kb_per_1000", "KiB"),
            r.rss_growth_kib_per_1000,
            s.max_rss_growth_kb_per_1000,
            r.rss_trend
                .map(|t| t.p_increasing < s.significance && above_noise),
        ),
        trend_check(
            ("soak.max_latency_drift_pct", "%"),
            r.latency_drift_pct,
            s.max_latency_drift_pct,
            r.latency_trend.map(|t| t.p_increasing < s.significance),
        ),
    ]
}

/// `value <= limit`, except that with a fitted trend it fails only when the trend `counts`
/// (significant, and for memory above noise); with no trend it fails on the missing value.
fn trend_check(
    (name, unit): (&str, &str),
    value: Option<f64>,
    limit: f64,
    counts: Option<bool>,
) -> Check {
    let mut c = Check::at_most(name, value.unwrap_or(f64::NAN), limit, unit);
    if let Some(counts) = counts {
        c.passed = !(counts && c.value.unwrap_or(f64::MAX) > limit);
    }
    c
}

/// Soak: closed loop for `duration`, windows of median latency and memory, trends fitted
/// over the windows after warm-up.
pub fn soak(
    target: &dyn Target,
    queries: &[Query],
    p: &Soak,
    duration_s: f64,
    tick: &(dyn Fn(u64) + Sync),
) -> SoakRun {
    warm_up(target, queries, 3);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(duration_s);
    let done: Mutex<Vec<(f64, f64)>> = Mutex::new(Vec::new());
    let failed: Mutex<(usize, Option<String>)> = Mutex::new((0, None));
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..p.concurrency {
            s.spawn(|| {
                while Instant::now() < end {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let r = target.call(pick(queries, i), QUERY_TIMEOUT);
                    let now = start.elapsed().as_secs_f64();
                    match r {
                        Ok(_) => done
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((now, t.elapsed().as_secs_f64() * 1e3)),
                        Err(e) => {
                            let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                            f.0 += 1;
                            f.1.get_or_insert_with(|| e.to_string());
                        }
                    }
                    tick(1);
                }
            });
        }
        // This thread samples memory at every window boundary.
        let mut k = 1;
        loop {
            let due = start + Duration::from_secs_f64(k as f64 * p.window_s);
            if due > end + Duration::from_millis(1) {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if let Some(r) = target.rss_kib() {
                rss.push((k as f64 * p.window_s, r));
            }
            k += 1;
        }
    });
    let done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    let (errors, first_error) = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    let n_windows = (duration_s / p.window_s).floor().max(1.0) as usize;
    let windows: Vec<Window> = (0..n_windows)
        .map(|w| {
            let (lo, hi) = (w as f64 * p.window_s, (w + 1) as f64 * p.window_s);
            let lat: Vec<f64> = done
                .iter()
                .filter(|(t, _)| *t >= lo && *t < hi)
                .map(|d| d.1)
                .collect();
            Window {
                t_s: hi,
                requests: lat.len(),
                p50_ms: if lat.is_empty() {
                    f64::NAN
                } else {
                    median(&lat)
                },
                rss_kib: rss
                    .iter()
                    .find(|(t, _)| (*t - hi).abs() < p.window_s / 2.0)
                    .map(|r| r.1),
            }
        })
        .collect();
    let warmup = ((n_windows as f64) * p.warmup_fraction).floor() as usize;
    let measured: Vec<&Window> = windows
        .iter()
        .skip(warmup)
        .filter(|w| w.requests > 0)
        .collect();
    let lx: Vec<f64> = measured.iter().map(|w| w.t_s).collect();
    let ly: Vec<f64> = measured.iter().map(|w| w.p50_ms).collect();
    let latency_trend = trend(&lx, &ly);
    let with_rss: Vec<(f64, f64)> = windows
        .iter()
        .skip(warmup)
        .filter_map(|w| Some((w.t_s, w.rss_kib? as f64)))
        .collect();
    let rx: Vec<f64> = with_rss.iter().map(|r| r.0).collect();
    let ry: Vec<f64> = with_rss.iter().map(|r| r.1).collect();
    let rss_trend = trend(&rx, &ry);
    let rss_span = rx.last().zip(rx.first()).map_or(0.0, |(b, a)| b - a);
    let span = lx.last().zip(lx.first()).map_or(0.0, |(b, a)| b - a);
    let measured_requests: usize = measured.iter().map(|w| w.requests).sum();
    let rate = measured_requests as f64 / span.max(p.window_s);
    SoakRun {
        duration_s,
        window_s: p.window_s,
        warmup_windows: warmup,
        requests: done.len(),
        errors,
        first_error,
        latency_drift_pct: latency_trend.map(|t| t.slope * span / t.mean_y * 100.0),
        rss_growth_kib_per_1000: rss_trend.map(|t| t.slope / rate.max(1e-9) * 1000.0),
        rss_growth_kib_per_min: rss_trend.map(|t| t.slope * 60.0),
        rss_growth_kib: rss_trend.map(|t| t.slope * rss_span),
        latency_trend,
        rss_trend,
        windows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Soak {
        toml::from_str("").unwrap()
    }

    /// A soak whose memory readings are `rss` (KiB, one per second) at `rate` requests/s.
    fn run(rss: &[f64], rate: f64) -> SoakRun {
        let x: Vec<f64> = (0..rss.len()).map(|i| i as f64).collect();
        let t = trend(&x, rss).unwrap();
        let span = (rss.len() - 1) as f64;
        SoakRun {
            duration_s: span,
            window_s: 1.0,
            warmup_windows: 0,
            requests: (rate * span) as usize,
            errors: 0,
            first_error: None,
            windows: Vec::new(),
            latency_trend: None,
            rss_trend: Some(t),
            latency_drift_pct: None,
            rss_growth_kib_per_1000: Some(t.slope / rate * 1000.0),
            rss_growth_kib_per_min: Some(t.slope * 60.0),
            rss_growth_kib: Some(t.slope * span),
        }
    }

    #[test]
    fn a_few_pages_over_a_short_soak_of_slow_requests_is_noise() {
        // Measured on the SmolLM2 chat audit: +8 KiB over 6 windows, significant. At the
        // ~1 request/s of a loaded machine that is ~1,700 KiB "per 1,000 requests", yet two
        // pages.
        let r = run(&[145848., 145848., 145852., 145852., 145856., 145856.], 1.0);
        assert!(r.rss_growth_kib_per_1000.unwrap() > policy().max_rss_growth_kb_per_1000);
        assert!(r.rss_trend.unwrap().p_increasing < 0.01);
        let [memory, _] = soak_checks(&r, &policy());
        assert!(memory.passed, "{memory:?}");
    }

    #[test]
    fn a_steady_leak_fails_and_a_flat_line_passes() {
        // 6 KiB per request at 100 requests/s over 8 s: ~4.8 MiB, a leak.
        let leak: Vec<f64> = (0..9)
            .map(|i| 100_000.0 + 600.0 * i as f64 + [0., 40., -40.][i % 3])
            .collect();
        let [memory, _] = soak_checks(&run(&leak, 100.0), &policy());
        assert!(!memory.passed, "{memory:?}");
        assert!(memory.value.unwrap() > 5000.0);

        let flat: Vec<f64> = (0..9).map(|i| 100_000.0 + [0., 4., -4.][i % 3]).collect();
        let [memory, _] = soak_checks(&run(&flat, 100.0), &policy());
        assert!(memory.passed, "{memory:?}");
    }

    #[test]
    fn no_trend_fails_on_the_missing_value() {
        let mut r = run(&[1.0, 2.0, 3.0], 1.0);
        r.rss_trend = None;
        r.rss_growth_kib_per_1000 = None;
        let [memory, latency] = soak_checks(&r, &policy());
        assert!(!memory.passed && memory.value.is_none());
        assert!(!latency.passed && latency.value.is_none());
    }
}
