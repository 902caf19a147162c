//! Hostile clients against the real `mote serve` on loopback. Each scenario is refused or
//! served while (1) the server's peak resident memory during it stays under its idle
//! resident memory + 512 MiB, and (2) a well-behaved client on its own kept-alive
//! connection keeps its p99 latency under 5× the p99 it had just before, unloaded, in the
//! same test (ratios of the same run, no absolute times). Every loop here is bounded in
//! count and time, and only loopback is touched.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The engine's fault-injection text (compiled into test builds only).
const PANIC_TEXT: &str = "\u{1}mote-fault-injection:panic";

/// A kept-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
    addr: String,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(s),
            addr: addr.to_string(),
        }
    }

    /// Send a request and read the response (Content-Length bodies only).
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let head = request_head(method, path, &self.addr, body.len(), headers, false);
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        self.read_response()
    }

    fn read_response(&mut self) -> (u16, String) {
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// A request head (JSON unless `headers` name another Content-Type).
fn request_head(
    method: &str,
    path: &str,
    addr: &str,
    len: usize,
    headers: &[(&str, &str)],
    close: bool,
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {len}\r\n");
    if close {
        head.push_str("Connection: close\r\n");
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// One request on a fresh connection that is closed after it (the client may be cut off
/// while it still writes: the server answers early and closes).
fn once(addr: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, String) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = request_head("POST", path, addr, body.len(), headers, true);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        for chunk in body.chunks(1 << 20) {
            if w.write_all(chunk).is_err() {
                return;
            }
        }
    });
    let mut reader = BufReader::new(s);
    let mut raw = Vec::new();
    let _ = reader.read_to_end(&mut raw);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

const EMBED: &[u8] = br#"{"model":"minilm","input":"How do I reset my password?"}"#;

/// Latencies of `n` well-behaved embedding requests, sequential on one connection.
fn latencies(conn: &mut Conn, n: usize, stop: Option<&AtomicBool>) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..n {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) && out.len() >= 20 {
            break;
        }
        let t = Instant::now();
        let (status, body) = conn.request("POST", "/v1/embeddings", &[], EMBED);
        assert_eq!(status, 200, "the well-behaved request failed: {body}");
        out.push(t.elapsed().as_secs_f64());
    }
    out
}

/// The 99th percentile (the one definition: nearest rank).
fn p99(v: &[f64]) -> f64 {
    mote_base::stats::percentile(v, 99.0)
}

/// Watches the server's resident memory while a scenario runs: the kernel's peak (VmHWM,
/// reset at the start through /proc/PID/clear_refs) and a 5 ms sampler as a fallback.
struct Memory {
    pid: u32,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
    hwm_reset: bool,
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

impl Memory {
    fn watch(pid: u32) -> Memory {
        let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        let peak = Arc::new(AtomicU64::new(status_kib(pid, "VmRSS:")));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Memory {
            pid,
            peak,
            stop,
            sampler: Some(sampler),
            hwm_reset,
        }
    }

    /// Peak resident KiB since `watch`.
    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            t.join().unwrap();
        }
        let sampled = self.peak.load(Ordering::Relaxed);
        if self.hwm_reset {
            sampled.max(status_kib(self.pid, "VmHWM:"))
        } else {
            sampled
        }
    }
}

struct Hostile {
    _dir: tempfile::TempDir,
    server: Server,
    idle_kib: u64,
}

/// A server with MiniLM and SmolLM2 on one engine thread (the attacks' parsing gets the
/// other core, so the ratios measure the server's design, not the core count), bodies up
/// to 128 MiB accepted so the deeper limits are the ones tested, and a 2 s header timeout.
fn hostile_server(extra: &[&str]) -> Hostile {
    hostile_server_on(&["--threads", "1"], extra)
}

fn hostile_server_on(threads: &[&str], extra: &[&str]) -> Hostile {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &minilm_dir(), "minilm", &[]);
    import(&store, &smollm2_gguf(), "smollm2", &[]);
    let mut args = vec!["minilm", "smollm2"];
    args.extend_from_slice(threads);
    args.extend_from_slice(&["--max-body-mib", "128", "--header-timeout-s", "2"]);
    args.extend_from_slice(extra);
    let server = Server::start(&store, &args);
    // Warm the path once, then take the idle figure.
    let mut c = Conn::open(&server.addr);
    latencies(&mut c, 5, None);
    let idle_kib = server.rss_kib();
    Hostile {
        _dir: dir,
        server,
        idle_kib,
    }
}

impl Hostile {
    /// Run `attack` while a well-behaved client keeps sending; check memory and latency.
    fn check(&self, name: &str, attack: impl FnOnce(&str) + Send) {
        self.check_after(name, |_| {}, attack);
    }

    /// [`check`], with `before` run after the unloaded measurement and before the loaded
    /// one (memory is watched from `before` on).
    fn check_after(&self, name: &str, before: impl FnOnce(&str), attack: impl FnOnce(&str) + Send) {
        let addr = self.server.addr.clone();
        let mut good = Conn::open(&addr);
        let unloaded = latencies(&mut good, 60, None);
        let memory = Memory::watch(self.server.pid());
        before(&addr);
        let done = AtomicBool::new(false);
        let loaded = std::thread::scope(|s| {
            let a = s.spawn(|| {
                attack(&addr);
                done.store(true, Ordering::Relaxed);
            });
            // Keep the well-behaved client going at least as long as the attack runs.
            let mut all = Vec::new();
            let until = Instant::now() + Duration::from_secs(120);
            while !(done.load(Ordering::Relaxed) && all.len() >= 60) && Instant::now() < until {
                all.extend(latencies(&mut good, 20, Some(&done)));
            }
            a.join().unwrap();
            all
        });
        let peak = memory.peak();
        let (u, l) = (p99(&unloaded), p99(&loaded));
        eprintln!(
            "{name}: idle RSS {} MiB, peak during {} MiB; well-behaved p99 unloaded {:.2} ms, \
             under attack {:.2} ms ({:.2}x, {} requests)",
            self.idle_kib / 1024,
            peak / 1024,
            u * 1e3,
            l * 1e3,
            l / u,
            loaded.len()
        );
        assert!(
            peak < self.idle_kib + 512 * 1024,
            "{name}: peak RSS {peak} KiB vs idle {} KiB",
            self.idle_kib
        );
        assert!(
            l < 5.0 * u,
            "{name}: the well-behaved client's p99 went from {u:.4} s to {l:.4} s"
        );
        // And the server still answers.
        let (status, _) = good.request("POST", "/v1/embeddings", &[], EMBED);
        assert_eq!(
            status, 200,
            "{name}: the server does not answer after the attack"
        );
    }

    fn metric(&self, name: &str) -> f64 {
        let (status, text) = Conn::open(&self.server.addr).request("GET", "/metrics", &[], b"");
        assert_eq!(status, 200);
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

#[test]
fn hostile_a_64_mib_of_tiny_texts_is_refused_by_the_input_limit() {
    let h = hostile_server(&[]);
    let mut body = br#"{"model":"minilm","input":["#.to_vec();
    while body.len() < 64 << 20 {
        body.extend_from_slice(br#""a b c","#);
    }
    body.extend_from_slice(br#""end"]}"#);
    h.check("(a) 64 MiB of tiny texts", move |addr| {
        let (status, resp) = once(addr, "/v1/embeddings", &[], body);
        assert_eq!(status, 413, "{resp}");
        assert!(resp.contains("--max-inputs"), "{resp}");
    });
    // The default body limit refuses the same body from its Content-Length, unread.
    let (status, resp) = once(
        &h.server.addr,
        "/v1/embeddings",
        &[],
        vec![b' '; (128 << 20) + 1],
    );
    assert_eq!(status, 413, "{resp}");
    assert!(resp.contains("--max-body-mib"), "{resp}");
}

#[test]
fn hostile_b_a_kserve_bytes_input_declaring_ten_million_elements_is_refused() {
    let h = hostile_server(&[]);
    h.check("(b) KServe BYTES of 10^7 declared elements", |addr| {
        let body = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[10000000],"data":["a","b"]}]}"#;
        let (status, resp) = once(addr, "/v2/models/minilm/infer", &[], body.to_vec());
        assert_eq!(status, 413, "{resp}");
        assert!(resp.contains("--max-inputs"), "{resp}");
        // Declared small, sent large: refused at the first element past the shape.
        let mut big = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],"data":["#.to_vec();
        for _ in 0..1_000_000 {
            big.extend_from_slice(br#""x","#);
        }
        big.extend_from_slice(br#""x"]}]}"#);
        let (status, resp) = once(addr, "/v2/models/minilm/infer", &[], big);
        assert_eq!(status, 400, "{resp}");
        assert!(resp.contains("more elements than its shape"), "{resp}");
    });
}

#[test]
fn hostile_c_two_concurrent_60_mb_chat_prompts_are_refused_before_tokenising() {
    let h = hostile_server(&[]);
    let prompt = "lorem ipsum ".repeat(5 << 20);
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
    }))
    .unwrap();
    assert!(body.len() > 60_000_000);
    h.check("(c) two concurrent 60 MB chat prompts", move |addr| {
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..2)
                .map(|_| s.spawn(|| once(addr, "/v1/chat/completions", &[], body.clone())))
                .collect();
            for r in runs {
                let (status, resp) = r.join().unwrap();
                assert_eq!(status, 413, "{resp}");
                assert!(resp.contains("--max-prompt-bytes"), "{resp}");
            }
        });
    });
    // A body small enough to be read is parsed off the async threads, and its prompt is
    // measured before templating.
    let small = serde_json::to_vec(&serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "lorem ipsum ".repeat(200_000)}],
    }))
    .unwrap();
    let (status, resp) = once(&h.server.addr, "/v1/chat/completions", &[], small);
    assert_eq!(status, 413, "{resp}");
    assert!(resp.contains("bytes of prompt text"), "{resp}");
}

#[test]
fn hostile_d_two_thousand_half_open_connections_are_timed_out_and_capped() {
    // A limit well below 2,000, so that the cap is reached however fast the kernel hands
    // the connections over (the 2 s header timeout frees slots as they come).
    let h = hostile_server(&["--max-connections", "256"]);
    let refused_before = h.metric("mote_connections_refused_total");
    let held: std::sync::Mutex<Vec<TcpStream>> = std::sync::Mutex::new(Vec::new());
    h.check("(d) 2,000 idle half-open connections", |addr| {
        let mut v = Vec::new();
        for _ in 0..2000 {
            let Ok(mut s) = TcpStream::connect(addr) else {
                continue;
            };
            // Half a request head, never finished.
            let _ = s.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n");
            v.push(s);
        }
        *held.lock().unwrap() = v;
    });
    let conns = held.into_inner().unwrap();
    assert_eq!(
        conns.len(),
        2000,
        "every connection was at least accepted by the kernel"
    );
    // Past the 2 s header timeout every one has been closed by the server.
    std::thread::sleep(Duration::from_secs(4));
    let mut still_open = 0;
    for mut s in conns {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(_) => {} // an error response, then closed
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(_) => still_open += 1,
        }
    }
    assert_eq!(
        still_open, 0,
        "half-open connections still held after the header timeout"
    );
    // 2,000 exceeded the limit of 256 open connections: the rest were closed at once.
    let refused = h.metric("mote_connections_refused_total") - refused_before;
    eprintln!("(d) connections closed at once past --max-connections 256: {refused}");
    assert!(refused > 0.0);
}

#[test]
fn hostile_e_ten_thousand_stop_strings_are_refused() {
    let h = hostile_server(&[]);
    let stops: Vec<String> = (0..10_000).map(|i| format!("stop-{i}")).collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 4, "stop": stops,
    }))
    .unwrap();
    h.check("(e) 10,000 stop strings", move |addr| {
        let (status, resp) = once(addr, "/v1/completions", &[], body);
        assert_eq!(status, 422, "{resp}");
        assert!(resp.contains("--max-stop"), "{resp}");
        let long = serde_json::to_vec(&serde_json::json!({
            "model": "smollm2", "prompt": "Once", "stop": ["x".repeat(100_000)],
        }))
        .unwrap();
        let (status, resp) = once(addr, "/v1/completions", &[], long);
        assert_eq!(status, 422, "{resp}");
        assert!(resp.contains("--max-stop-bytes"), "{resp}");
    });
}

#[test]
fn hostile_f_work_of_a_client_that_disconnects_mid_batch_is_dropped() {
    let h = hostile_server(&[]);
    let before = h.metric("mote_items_dropped_total");
    let text = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let texts: Vec<&str> = (0..256).map(|_| text.as_str()).collect();
    let body = serde_json::to_vec(&serde_json::json!({"model": "minilm", "input": texts})).unwrap();
    // 256 texts of 256 tokens: tens of seconds of work on one thread, abandoned after
    // 300 ms; then the piece being computed finishes (a batch is at most
    // --max-batch-tokens), and the well-behaved client measures while the rest of that
    // work would still be running had it not been dropped.
    h.check_after(
        "(f) a client that disconnects mid-batch",
        |addr| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(
                s,
                "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
            .unwrap();
            s.write_all(&body).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop(s);
            std::thread::sleep(Duration::from_millis(1500));
        },
        |_| std::thread::sleep(Duration::from_secs(1)),
    );
    let dropped = h.metric("mote_items_dropped_total") - before;
    eprintln!("(f) items of the abandoned request dropped uncomputed: {dropped}");
    assert!(
        dropped >= 200.0,
        "only {dropped} items of the abandoned request were dropped"
    );
}

#[test]
fn hostile_g_a_panicking_worker_is_rebuilt_and_unready_meanwhile() {
    // Two instances: while one is rebuilt, the other keeps serving.
    let h = hostile_server_on(&["--threads", "2", "--instances", "2"], &[]);
    let addr = h.server.addr.clone();
    let ready = |path: &str| Conn::open(&addr).request("GET", path, &[], b"").0;
    assert_eq!(ready("/v2/health/ready"), 200);
    let restarts = h.metric("mote_worker_restarts_total");
    let mut seen_unready = (false, false);
    let mut back_after = None;
    h.check("(g) a request that makes a worker panic", |addr| {
        let body = serde_json::to_vec(&serde_json::json!({
            "model": "minilm", "input": ["fine", format!("{PANIC_TEXT}:600")],
        }))
        .unwrap();
        let (status, resp) = once(addr, "/v1/embeddings", &[], body);
        let failed_at = Instant::now();
        assert_eq!(status, 500, "{resp}");
        assert!(
            resp.contains("minilm") && resp.contains("panicked"),
            "{resp}"
        );
        // Unready while it is rebuilt; serving again within 2 s.
        while failed_at.elapsed() < Duration::from_secs(5) {
            if ready("/v2/health/ready") == 503 {
                seen_unready.0 = true;
            }
            if ready("/v2/models/minilm/ready") == 503 {
                seen_unready.1 = true;
            }
            let (status, _) = Conn::open(addr).request("POST", "/v1/embeddings", &[], EMBED);
            if status == 200 && seen_unready.0 && ready("/v2/health/ready") == 200 {
                back_after = Some(failed_at.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert_eq!(
        seen_unready,
        (true, true),
        "readiness never said the model was down"
    );
    let back = back_after.expect("the model serves again");
    eprintln!("(g) serving again {back:?} after the panicked request's 500");
    assert!(back < Duration::from_secs(2), "{back:?}");
    // One restart, or two when the panicking request shared a batch with a well-behaved
    // one (the batch's requests then run again alone and the culprit panics once more);
    // the well-behaved client never saw a failure (`latencies` asserts each answer).
    let after = h.metric("mote_worker_restarts_total");
    assert!(
        after == restarts + 1.0 || after == restarts + 2.0,
        "{restarts} restarts before, {after} after"
    );
}

#[test]
fn hostile_h_cross_origin_and_rebinding_requests_without_a_key_are_refused() {
    let h = hostile_server(&[]);
    h.check("(h) cross-origin text/plain POST without a key", |addr| {
        let (status, resp) = once(
            addr,
            "/v1/embeddings",
            &[
                ("Origin", "http://evil.example"),
                ("Content-Type", "text/plain"),
            ],
            EMBED.to_vec(),
        );
        assert_eq!(status, 403, "{resp}");
        assert!(resp.contains("--cors-origin"), "{resp}");
        // DNS rebinding: the page's own name in Host.
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/embeddings HTTP/1.1\r\nHost: evil.example:8080\r\nContent-Type: \
             text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            EMBED.len()
        )
        .unwrap();
        s.write_all(EMBED).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
        // The server's own origin is fine.
        let own = format!("http://{addr}");
        let (status, _) = once(
            addr,
            "/v1/embeddings",
            &[("Origin", own.as_str())],
            EMBED.to_vec(),
        );
        assert_eq!(status, 200);
    });
}

#[test]
fn an_allowed_origin_gets_cors_headers_and_the_api_key_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &minilm_dir(), "minilm", &[]);
    let server = Server::start(
        &store,
        &[
            "minilm",
            "--cors-origin",
            "http://app.example",
            "--api-key",
            "s3cret",
        ],
    );
    let addr = server.addr.clone();
    let (status, _) = Conn::open(&addr).request("POST", "/v1/embeddings", &[], EMBED);
    assert_eq!(status, 401);
    let (status, _) = Conn::open(&addr).request(
        "POST",
        "/v1/embeddings",
        &[("Authorization", "Bearer s3cre")],
        EMBED,
    );
    assert_eq!(status, 401);
    let (status, _) = Conn::open(&addr).request(
        "POST",
        "/v1/embeddings",
        &[
            ("Authorization", "Bearer s3cret"),
            ("Origin", "http://app.example"),
        ],
        EMBED,
    );
    assert_eq!(status, 200);
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "OPTIONS /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://app.example\r\n\
         Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: \
         authorization,content-type\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.to_ascii_lowercase()
            .contains("access-control-allow-origin: http://app.example"),
        "{resp}"
    );
}

#[test]
fn the_thread_count_follows_the_cgroup_cpu_quota() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    import(&store, &minilm_dir(), "minilm", &[]);
    let quota = dir.path().join("cpu.max");
    std::fs::write(&quota, "100000 100000\n").unwrap();
    let server = Server::start_env(
        &store,
        &["minilm"],
        &[
            ("MOTE_CGROUP_CPU_MAX", quota.to_str().unwrap()),
            ("MOTE_THREADS", ""),
        ],
    );
    let (status, text) = Conn::open(&server.addr).request("GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    assert!(
        text.contains("mote_engine_threads{source=\"cgroup cpu quota\"} 1"),
        "{text}"
    );
}
