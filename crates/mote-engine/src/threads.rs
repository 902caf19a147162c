//! The engine's one thread pool. Its size comes from `--threads`, else `MOTE_THREADS`,
//! else what the container allows: the smallest of the physical cores, the CPUs of the
//! process's cpuset (affinity) and the CPU quota of its cgroup (v2 `cpu.max`, v1
//! `cpu.cfs_quota_us`/`cpu.cfs_period_us`, up the hierarchy), rounded down, at least 1. A
//! container limited to one CPU of a 64-core host gets one thread, not 64 that the kernel
//! throttles. Every inference of a model runs on the same pool, so concurrent requests
//! share those threads instead of multiplying them.

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

/// Environment variable naming a file to read as the cgroup v2 `cpu.max` instead of the
/// process's own (for tests, and for hosts that mount cgroups elsewhere).
pub const MOTE_CGROUP_CPU_MAX: &str = "MOTE_CGROUP_CPU_MAX";

/// Resolve the thread count: an explicit value, else `MOTE_THREADS`, else what the
/// container allows (see the module docs).
pub fn resolve_threads(explicit: Option<usize>) -> Result<usize> {
    resolve_threads_with_source(explicit).map(|(n, _)| n)
}

/// [`resolve_threads`], and what chose the number: `--threads`, `MOTE_THREADS`,
/// `cgroup cpu quota`, `cpuset` or `physical cores`.
pub fn resolve_threads_with_source(explicit: Option<usize>) -> Result<(usize, &'static str)> {
    if let Some(n) = explicit {
        return check(n, "--threads").map(|n| (n, "--threads"));
    }
    match std::env::var(MOTE_THREADS) {
        Ok(v) if !v.trim().is_empty() => {
            let n = v.trim().parse::<usize>().map_err(|_| {
                EngineError::input(format!(
                    "MOTE_THREADS={v:?} is not a whole number of threads"
                ))
            })?;
            check(n, "MOTE_THREADS").map(|n| (n, "MOTE_THREADS"))
        }
        _ => Ok(container_threads()),
    }
}

/// The smallest of physical cores, cpuset size and cgroup quota, with its source.
fn container_threads() -> (usize, &'static str) {
    let mut best = (physical_cores(), "physical cores");
    if let Some(n) = cpuset_size()
        && n < best.0
    {
        best = (n, "cpuset");
    }
    if let Some(n) = cgroup_quota()
        && n < best.0
    {
        best = (n, "cgroup cpu quota");
    }
    (best.0.max(1), best.1)
}

/// CPUs the process may run on (`Cpus_allowed_list` of `/proc/self/status`).
fn cpuset_size() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(list.trim())
}

/// Count the CPUs of a list such as `0-3,8,10-11`.
fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.trim().parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

/// A cgroup v2 `cpu.max` line (`max 100000` or `150000 100000`) as whole CPUs, rounded
/// down, at least 1; `None` for no limit or an unreadable line.
fn parse_cpu_max(line: &str) -> Option<usize> {
    let mut it = line.split_whitespace();
    let quota = it.next()?;
    let period: u64 = it.next().unwrap_or("100000").parse().ok()?;
    if quota == "max" || period == 0 {
        return None;
    }
    let quota: u64 = quota.parse().ok()?;
    Some(((quota / period) as usize).max(1))
}

/// The tightest CPU quota of the process's cgroup and its ancestors.
fn cgroup_quota() -> Option<usize> {
    if let Ok(path) = std::env::var(MOTE_CGROUP_CPU_MAX) {
        return parse_cpu_max(std::fs::read_to_string(path).ok()?.trim());
    }
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<usize> = None;
    let mut keep = |n: Option<usize>| {
        if let Some(n) = n {
            best = Some(best.map_or(n, |b| b.min(n)));
        }
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next()?, parts.next()?);
        let mut dir = std::path::PathBuf::from(path.trim_start_matches('/'));
        if controllers.is_empty() {
            // cgroup v2: cpu.max in the process's group and every parent.
            loop {
                let file = std::path::Path::new("/sys/fs/cgroup")
                    .join(&dir)
                    .join("cpu.max");
                keep(
                    std::fs::read_to_string(file)
                        .ok()
                        .and_then(|s| parse_cpu_max(s.trim())),
                );
                if !dir.pop() {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            // cgroup v1: cfs quota and period.
            let base = std::path::Path::new("/sys/fs/cgroup").join(controllers);
            loop {
                let read = |f: &str| {
                    std::fs::read_to_string(base.join(&dir).join(f))
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok())
                };
                if let (Some(q), Some(p)) = (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"))
                    && q > 0
                    && p > 0
                {
                    keep(Some(((q / p) as usize).max(1)));
                }
                if !dir.pop() {
                    break;
                }
            }
        }
    }
    best
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

#[cfg(test)]
mod tests {
    use super::{parse_cpu_list, parse_cpu_max};

    #[test]
    fn cgroup_quotas_and_cpu_lists_are_read_as_whole_cpus() {
        assert_eq!(parse_cpu_max("max 100000"), None);
        assert_eq!(parse_cpu_max("100000 100000"), Some(1));
        assert_eq!(parse_cpu_max("150000 100000"), Some(1));
        assert_eq!(parse_cpu_max("400000 100000"), Some(4));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("200000"), Some(2));
        assert_eq!(parse_cpu_max("junk 100000"), None);
        assert_eq!(parse_cpu_max("100 0"), None);
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
    }
}
