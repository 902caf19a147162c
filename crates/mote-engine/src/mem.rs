//! Memory of the current process as the kernel reports it (`/proc/self/status`): what
//! reports, metrics and audits quote. Zero where `/proc` is missing (non-Linux).

/// A `Vm*:` field of `/proc/<pid>/status`, KiB.
fn status_kib(pid: Option<u32>, field: &str) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Resident memory of this process now, KiB.
pub fn rss_kib() -> u64 {
    status_kib(None, "VmRSS")
}

/// Peak resident memory of this process, KiB.
pub fn peak_rss_kib() -> u64 {
    status_kib(None, "VmHWM")
}

/// Resident memory of process `pid` now, KiB (0 when it is gone or unreadable).
pub fn rss_kib_of(pid: u32) -> u64 {
    status_kib(Some(pid), "VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn resident_memory_grows_when_pages_are_touched() {
        let before = rss_kib();
        assert!(before > 0);
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        assert!(rss_kib() >= before + 32 * 1024, "64 MiB touched");
        // Other tests' threads allocate meanwhile under `cargo test`: read the peak (which
        // only grows) after the current value, and compare the two readers loosely.
        let now = rss_kib();
        assert!(peak_rss_kib() >= now);
        let by_pid = rss_kib_of(std::process::id());
        assert!(
            by_pid.abs_diff(rss_kib()) < 16 * 1024,
            "{by_pid} KiB by pid"
        );
    }
}
