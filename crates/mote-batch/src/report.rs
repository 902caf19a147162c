//! `report.md` in the output directory, rewritten (atomically) at the end of every run:
//! counts, times, token rates, memory, and every failure with its reason.

use std::fmt::Write;

use crate::items::Item;
use crate::journal::{Journal, Status};
use crate::{BatchError, JobModel, JobOptions, Summary};

/// The workspace's one percentile (nearest rank), `q` as a fraction.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    mote_base::stats::percentile_sorted(sorted, q * 100.0)
}

pub fn write(
    dir: &std::path::Path,
    m: &JobModel<'_>,
    opts: &JobOptions,
    items: &[Item],
    journal: &Journal,
    s: &Summary,
) -> Result<(), BatchError> {
    let latest = journal.latest();
    let current: Vec<_> = items
        .iter()
        .filter_map(|i| latest.get(i.id.as_str()).copied())
        .collect();
    let done: Vec<_> = current
        .iter()
        .filter(|r| r.status == Status::Done)
        .collect();
    let failed: Vec<_> = current
        .iter()
        .filter(|r| r.status == Status::Failed)
        .collect();
    let mut times: Vec<f64> = done
        .iter()
        .filter(|r| !r.adopted)
        .map(|r| r.duration_ms / 1e3)
        .collect();
    times.sort_by(f64::total_cmp);
    let mut rates: Vec<f64> = done.iter().filter_map(|r| r.tokens_per_s).collect();
    rates.sort_by(f64::total_cmp);
    let peak = current.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
    let mut md = String::new();
    let _ = writeln!(md, "# Batch report\n");
    let _ = writeln!(
        md,
        "- model: `{}` (`{}`)\n- task: {}\n- input: `{}`\n- job digest: `{}`\n",
        m.reference,
        m.model.digest(),
        opts.task.name(),
        opts.input.display(),
        s.job
    );
    let _ = writeln!(md, "## Items\n");
    let _ = writeln!(md, "| | count |\n|---|---|");
    let _ = writeln!(md, "| found | {} |", items.len());
    let _ = writeln!(md, "| done | {} |", done.len());
    let _ = writeln!(md, "| failed | {} |", failed.len());
    let _ = writeln!(
        md,
        "| not yet processed | {} |",
        items.len() - current.len()
    );
    let _ = writeln!(
        md,
        "| this run: done / adopted / skipped / failed | {} / {} / {} / {} |\n",
        s.done, s.adopted, s.skipped, s.failed
    );
    let _ = writeln!(md, "## Speed and memory\n");
    let _ = writeln!(md, "- this run took {:.1} s", s.seconds);
    if !times.is_empty() {
        let total: f64 = times.iter().sum();
        let _ = writeln!(
            md,
            "- per item (s): total {total:.1}, median {:.2}, p90 {:.2}, max {:.2}",
            quantile(&times, 0.5),
            quantile(&times, 0.9),
            quantile(&times, 1.0)
        );
    }
    if !rates.is_empty() {
        let _ = writeln!(
            md,
            "- generated tokens/s per item: min {:.1}, median {:.1}, p90 {:.1}, max {:.1}",
            quantile(&rates, 0.0),
            quantile(&rates, 0.5),
            quantile(&rates, 0.9),
            quantile(&rates, 1.0)
        );
        let generated: usize = done.iter().map(|r| r.generated_tokens).sum();
        let prompt: usize = done.iter().map(|r| r.prompt_tokens).sum();
        let _ = writeln!(md, "- tokens: {prompt} prompt, {generated} generated");
    }
    let _ = writeln!(
        md,
        "- peak resident memory: {:.1} MiB\n",
        peak as f64 / 1024.0
    );
    let _ = writeln!(md, "## Failures\n");
    if failed.is_empty() {
        let _ = writeln!(md, "None.");
    } else {
        let _ = writeln!(md, "| item | reason |\n|---|---|");
        for r in failed {
            let reason = r.error.as_deref().unwrap_or("").replace('|', "\\|");
            let _ = writeln!(md, "| `{}` | {} |", r.item, reason);
        }
    }
    crate::write_atomic(dir, &dir.join(".mote-tmp"), "report.md", md.as_bytes())?;
    let _ = std::fs::remove_dir_all(dir.join(".mote-tmp"));
    Ok(())
}
