//! The engine's one thread pool. Its size comes from `--threads`, else `MOTE_THREADS`,
//! else the number of physical cores. Every inference of a model runs on the same pool, so
//! concurrent requests share those threads instead of multiplying them.

use std::sync::Arc;

use tract_linalg::multithread::Executor;

use crate::error::{EngineError, Result};

/// Environment variable overriding the thread count.
pub const MOTE_THREADS: &str = "MOTE_THREADS";

/// Physical cores (hyper-threads of one core counted once), at least 1.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::BTreeSet::new();
    let mut physical = "";
    for line in info.lines() {
        if let Some((key, value)) = line.split_once(':') {
            match key.trim() {
                "physical id" => physical = value.trim(),
                "core id" => {
                    cores.insert((physical.to_string(), value.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical).max(1)
    }
}

/// Resolve the thread count: an explicit value, else `MOTE_THREADS`, else physical cores.
pub fn resolve_threads(explicit: Option<usize>) -> Result<usize> {
    if let Some(n) = explicit {
        return check(n, "--threads");
    }
    match std::env::var(MOTE_THREADS) {
        Ok(v) if !v.trim().is_empty() => {
            let n = v.trim().parse::<usize>().map_err(|_| {
                EngineError::input(format!(
                    "MOTE_THREADS={v:?} is not a whole number of threads"
                ))
            })?;
            check(n, "MOTE_THREADS")
        }
        _ => Ok(physical_cores()),
    }
}

fn check(n: usize, what: &str) -> Result<usize> {
    if (1..=1024).contains(&n) {
        Ok(n)
    } else {
        Err(EngineError::input(format!(
            "{what} must be between 1 and 1024, got {n}"
        )))
    }
}

/// A sized pool shared by all inferences of the models that hold it.
#[derive(Clone, Debug)]
pub struct ThreadPool {
    threads: usize,
    executor: Arc<Executor>,
}

impl ThreadPool {
    /// A pool of `threads` threads (1 runs everything on the caller's thread).
    pub fn new(threads: usize) -> ThreadPool {
        let executor = if threads <= 1 {
            Executor::SingleThread
        } else {
            Executor::multithread_with_name(threads, "mote-compute")
        };
        ThreadPool {
            threads,
            executor: Arc::new(executor),
        }
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` with tract's kernels using this pool.
    pub(crate) fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        tract_linalg::multithread::multithread_tract_scope((*self.executor).clone(), f)
    }
}
