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
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl ThreadPool {
    /// A pool of `threads` threads (1 runs everything on the caller's thread).
    pub fn new(threads: usize) -> Result<ThreadPool> {
        let pool = if threads <= 1 {
            None
        } else {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("mote-compute-{i}"))
                .build()
                .map_err(|e| {
                    EngineError::Backend(format!("cannot start {threads} threads: {e}"))
                })?;
            Some(Arc::new(pool))
        };
        Ok(ThreadPool { threads, pool })
    }

    /// No threads of its own: everything runs on the caller's thread (for work that is
    /// already one task of a parallel loop).
    pub(crate) fn serial() -> ThreadPool {
        ThreadPool {
            threads: 1,
            pool: None,
        }
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` with tract's kernels spreading one computation over this pool.
    pub(crate) fn intra_op<R>(&self, f: impl FnOnce() -> R) -> R {
        let executor = match &self.pool {
            Some(p) => Executor::MultiThread(p.clone()),
            None => Executor::SingleThread,
        };
        tract_linalg::multithread::multithread_tract_scope(executor, f)
    }

    /// Run `f` on one of the pool's threads, so that the parallel loops inside it are split
    /// among threads that are already awake instead of being handed over from outside.
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Call `f(index, chunk)` for every `chunk`-sized piece of `data`, in parallel on the
    /// pool. Each piece is written by exactly one call.
    pub(crate) fn for_each_chunk<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync + Send,
    ) {
        use rayon::prelude::*;
        match &self.pool {
            Some(p) => p.install(|| {
                data.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(i, c)| f(i, c))
            }),
            None => data
                .chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, c)| f(i, c)),
        }
    }

    /// Call `f(i)` for every `i` in `0..n`, in parallel on the pool.
    pub(crate) fn for_each_index(&self, n: usize, f: impl Fn(usize) + Sync + Send) {
        use rayon::prelude::*;
        match &self.pool {
            Some(p) => p.install(|| (0..n).into_par_iter().for_each(&f)),
            None => (0..n).for_each(f),
        }
    }

    /// Map `f` over `items` on the pool, one item per worker at a time (each item runs
    /// single-threaded kernels), keeping input order.
    pub(crate) fn map<T: Send, R: Send>(&self, items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
        use rayon::prelude::*;
        match &self.pool {
            Some(p) => p.install(|| items.into_par_iter().map(&f).collect()),
            None => items.into_iter().map(f).collect(),
        }
    }
}
