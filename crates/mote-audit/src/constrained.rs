//! The constrained deployment: the model loaded and run in a child process (the `mote`
//! binary again) with fewer threads and an address-space limit (RLIMIT_AS), so running out
//! of memory — which aborts a process — is observed from outside and reported.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mote_engine::Model;

use crate::inputs::workload;
use crate::policy::{Constrained, Policy};
use crate::report::ConstrainedRun;
use crate::scenarios::{run_sequential, warm_up};
use crate::stats::Summary;
use crate::target::{GenerationSettings, InProcess};

/// In the child, before anything is loaded: cap the address space at `mb` MiB.
pub fn limit_address_space(mb: u64) -> Result<(), String> {
    let bytes = mb.saturating_mul(1 << 20);
    rlimit::setrlimit(rlimit::Resource::AS, bytes, bytes)
        .map_err(|e| format!("cannot set RLIMIT_AS to {mb} MiB: {e}"))
}

/// In the child: open the model, run the constrained single-stream, describe the outcome.
pub fn child_run(
    open: impl FnOnce() -> Result<Model, String>,
    policy: &Policy,
    task: Option<mote_store::Task>,
    c: &Constrained,
) -> ConstrainedRun {
    let mut run = ConstrainedRun {
        threads: c.threads,
        memory_limit_mb: c.memory_limit_mb,
        ..Default::default()
    };
    let t = Instant::now();
    let model = match open() {
        Ok(m) => m,
        Err(e) => {
            run.error = Some(e);
            return run;
        }
    };
    let model_task = task.unwrap_or(model.task());
    let generation = GenerationSettings {
        max_tokens: policy.inputs.max_tokens,
        chat: policy.inputs.chat,
    };
    let target = match InProcess::new(model, Some(model_task), generation) {
        Ok(t) => t,
        Err(e) => {
            run.error = Some(e.to_string());
            return run;
        }
    };
    run.load_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    let queries = match workload(model_task, &policy.inputs, policy.seed) {
        Ok(q) => q,
        Err(e) => {
            run.error = Some(e.to_string());
            return run;
        }
    };
    warm_up(&target, &queries, 2);
    let r = run_sequential(&target, &queries, c.queries, 0.0, &|_| {});
    run.loaded = r.queries > 0;
    run.errors = r.errors;
    if r.queries == 0 {
        run.error = r
            .first_error
            .clone()
            .or(Some("no query was answered".into()));
    }
    run.summary = Some(r.summary).filter(|s: &Summary| s.count > 0);
    run.peak_rss_kib = Some(mote_engine::mem::peak_rss_kib()).filter(|k| *k > 0);
    run
}

/// In the parent: run `cmd` (which writes its [`ConstrainedRun`] as JSON to `out`), wait at
/// most `timeout`, and read what it wrote — or explain why it wrote nothing.
pub fn spawn(mut cmd: Command, out: &Path, c: &Constrained, timeout: Duration) -> ConstrainedRun {
    let failed = |error: String| ConstrainedRun {
        threads: c.threads,
        memory_limit_mb: c.memory_limit_mb,
        error: Some(error),
        ..Default::default()
    };
    let stderr_path = out.with_extension("stderr");
    let stderr = match std::fs::File::create(&stderr_path) {
        Ok(f) => f,
        Err(e) => return failed(format!("cannot create {}: {e}", stderr_path.display())),
    };
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start the child process: {e}")),
    };
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return failed(format!("cannot wait for the child process: {e}")),
        }
    };
    let tail = std::fs::read_to_string(&stderr_path)
        .map(|s| {
            let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        })
        .unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    let Some(status) = status else {
        return failed(format!(
            "the child did not finish within {:.0} s",
            timeout.as_secs_f64()
        ));
    };
    match std::fs::read(out)
        .ok()
        .and_then(|b| serde_json::from_slice::<ConstrainedRun>(&b).ok())
    {
        Some(run) => run,
        None => failed(format!(
            "the child exited with {status} without a result{}",
            if tail.is_empty() {
                String::new()
            } else {
                format!(":\n{tail}")
            }
        )),
    }
}
