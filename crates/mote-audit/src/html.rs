//! The self-contained HTML report: inline CSS and inline SVG charts (latency CDF, latency
//! and memory over time, throughput against offered load), no scripts, no external
//! references, so it opens anywhere, offline, years later.

use std::fmt::Write;

use crate::report::{Report, fmt};

/// HTML-escape text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step for a range.
fn step(range: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    mag * if n < 1.5 {
        1.0
    } else if n < 3.5 {
        2.0
    } else if n < 7.5 {
        5.0
    } else {
        10.0
    }
}

/// One line of a chart.
pub struct Series<'a> {
    /// Legend name.
    pub name: &'a str,
    /// CSS colour.
    pub color: &'a str,
    /// Points, any order of x is drawn as given.
    pub points: Vec<(f64, f64)>,
}

/// An SVG line chart with axes, ticks and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (640.0, 300.0);
    let (left, right, top, bottom) = (64.0, 16.0, 28.0, 44.0);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY);
    let mut y0 = f64::INFINITY;
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}"><title>{}</title><text x="{}" y="18" class="t">{}</text>"#,
        esc(title),
        left,
        esc(title)
    );
    if !x0.is_finite() {
        svg.push_str(r#"<text x="200" y="150">no data</text></svg>"#);
        return svg;
    }
    // Start the y axis at zero unless the data sits far from it (memory in MiB).
    if y0 > 0.0 && y0 < 0.5 * y1 {
        y0 = 0.0;
    }
    if (y1 - y0).abs() < 1e-12 {
        y1 = y0 + 1.0;
    }
    if (x1 - x0).abs() < 1e-12 {
        x1 = x0 + 1.0;
    }
    let (ys, xs) = (step(y1 - y0), step(x1 - x0));
    y0 = (y0 / ys).floor() * ys;
    y1 = (y1 / ys).ceil() * ys;
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let _ = write!(
        svg,
        r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#444"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="#444"/>"##,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    let mut y = y0;
    while y <= y1 + ys * 0.01 {
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" class="yt">{4}</text>"##,
            py(y),
            w - right,
            left - 6.0,
            py(y) + 4.0,
            fmt(y)
        );
        y += ys;
    }
    let mut x = (x0 / xs).ceil() * xs;
    while x <= x1 + xs * 0.01 {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" class="xt">{}</text>"#,
            px(x),
            h - bottom + 16.0,
            fmt(x)
        );
        x += xs;
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" class="xl">{}</text><text x="14" y="{}" class="yl" transform="rotate(-90 14 {})">{}</text>"#,
        (left + w - right) / 2.0,
        h - 6.0,
        esc(x_label),
        h / 2.0,
        h / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if points.len() == 1 {
            let _ = write!(
                svg,
                r#"<circle cx="{}" r="3" fill="{}" cy="{}"/>"#,
                points[0].split(',').next().unwrap_or("0"),
                s.color,
                points[0].split(',').nth(1).unwrap_or("0")
            );
        }
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"/>"#,
            s.color,
            points.join(" ")
        );
        let ly = top + 4.0 + 16.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="4" fill="{}"/><text x="{}" y="{}" class="lg">{}</text>"#,
            w - right - 170.0,
            ly,
            s.color,
            w - right - 152.0,
            ly + 5.0,
            esc(s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn cdf(lat: &[f64]) -> Vec<(f64, f64)> {
    let mut v = lat.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, x)| (*x, (i + 1) as f64 / n * 100.0))
        .collect()
}

/// Render the report as one HTML document.
pub fn render(r: &Report, markdown_body: &str) -> String {
    let mut charts = Vec::new();
    // Latency CDF: single-stream and the server's target rate.
    let mut cdfs = Vec::new();
    if let Some(s) = &r.single_stream {
        cdfs.push(Series {
            name: "single-stream",
            color: "#1f77b4",
            points: cdf(&s.latencies_ms),
        });
    }
    if let Some(t) = r.server.iter().flatten().find(|s| s.target_rate) {
        cdfs.push(Series {
            name: "server (target rate)",
            color: "#d62728",
            points: cdf(&t.run.latencies_ms),
        });
    }
    if !cdfs.is_empty() {
        charts.push(line_chart(
            "Latency CDF",
            "latency (ms)",
            "% of queries at or below",
            &cdfs,
        ));
    }
    // Latency and memory over time: the soak's windows, else the single-stream sequence
    // and the memory run's samples.
    if let Some(s) = &r.soak {
        let (a, b) = (
            s.windows.get(s.warmup_windows).map_or(0.0, |w| w.t_s),
            s.windows.last().map_or(0.0, |w| w.t_s),
        );
        // One chart per soak series, with its fitted line over the measured windows.
        let mut over_time = |title: &str,
                             label: &str,
                             name: &'static str,
                             color: &'static str,
                             points: Vec<(f64, f64)>,
                             trend: &Option<crate::stats::Trend>,
                             scale: f64| {
            let mut lines = vec![Series {
                name,
                color,
                points,
            }];
            if let Some(t) = trend {
                let at = |x: f64| (t.intercept + t.slope * x) / scale;
                lines.push(Series {
                    name: "trend",
                    color: "#ff7f0e",
                    points: vec![(a, at(a)), (b, at(b))],
                });
            }
            charts.push(line_chart(title, "time (s)", label, &lines));
        };
        let lat = s.windows.iter().map(|w| (w.t_s, w.p50_ms)).collect();
        over_time(
            "Soak: latency over time",
            "median latency (ms)",
            "median latency",
            "#1f77b4",
            lat,
            &s.latency_trend,
            1.0,
        );
        let rss = s
            .windows
            .iter()
            .filter_map(|w| Some((w.t_s, w.rss_kib? as f64 / 1024.0)))
            .collect();
        over_time(
            "Soak: memory over time",
            "RSS (MiB)",
            "resident memory",
            "#2ca02c",
            rss,
            &s.rss_trend,
            1024.0,
        );
    } else if let Some(s) = &r.single_stream {
        let pts: Vec<(f64, f64)> = s
            .latencies_ms
            .iter()
            .enumerate()
            .map(|(i, l)| (i as f64, *l))
            .collect();
        charts.push(line_chart(
            "Latency over the single-stream run",
            "query",
            "latency (ms)",
            &[Series {
                name: "latency",
                color: "#1f77b4",
                points: pts,
            }],
        ));
    }
    if let Some(m) = &r.memory {
        let pts: Vec<(f64, f64)> = m
            .samples
            .iter()
            .map(|(n, k)| (*n as f64, *k as f64 / 1024.0))
            .collect();
        charts.push(line_chart(
            "Memory over the memory run",
            "requests",
            "RSS (MiB)",
            &[Series {
                name: "resident memory",
                color: "#2ca02c",
                points: pts,
            }],
        ));
    }
    if let Some(runs) = &r.server {
        let achieved: Vec<(f64, f64)> = runs.iter().map(|s| (s.offered_qps, s.run.qps)).collect();
        let ideal: Vec<(f64, f64)> = runs
            .iter()
            .map(|s| (s.offered_qps, s.offered_qps))
            .collect();
        charts.push(line_chart(
            "Throughput vs offered load",
            "offered (queries/s)",
            "achieved (queries/s)",
            &[
                Series {
                    name: "achieved",
                    color: "#1f77b4",
                    points: achieved,
                },
                Series {
                    name: "offered",
                    color: "#999",
                    points: ideal,
                },
            ],
        ));
        let p99: Vec<(f64, f64)> = runs
            .iter()
            .map(|s| (s.offered_qps, s.run.summary.p99))
            .collect();
        let p50: Vec<(f64, f64)> = runs
            .iter()
            .map(|s| (s.offered_qps, s.run.summary.p50))
            .collect();
        charts.push(line_chart(
            "Latency vs offered load",
            "offered (queries/s)",
            "latency (ms)",
            &[
                Series {
                    name: "p99",
                    color: "#d62728",
                    points: p99,
                },
                Series {
                    name: "p50",
                    color: "#1f77b4",
                    points: p50,
                },
            ],
        ));
    }
    let verdict = if r.passed {
        ("PASSED", "pass")
    } else {
        ("FAILED", "fail")
    };
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Audit of {model} — {v}</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
h1 .pass{{color:#1a7f37}} h1 .fail{{color:#cf222e}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}
.chart{{display:block;margin:1em 0;border:1px solid #eee;max-width:100%;height:auto}}
.chart text{{font-size:11px;fill:#333}} .chart .t{{font-size:13px;font-weight:600}}
.chart .yt{{text-anchor:end}} .chart .xt,.chart .xl{{text-anchor:middle}} .chart .yl{{text-anchor:middle}}
pre{{background:#f6f8fa;padding:1em;overflow:auto;white-space:pre-wrap}}
</style></head><body>
<h1>Audit of {model} — <span class="{cls}">{v}</span></h1>
<p>Model <code>{digest}</code> · policy {policy} · {target} · {started}</p>
"#,
        model = esc(&r.model.reference),
        v = verdict.0,
        cls = verdict.1,
        digest = esc(&r.model.digest),
        policy = esc(r.policy.name.as_deref().unwrap_or(&r.policy.path)),
        target = esc(&r.target),
        started = esc(&r.started),
    );
    if !r.failures.is_empty() {
        html.push_str("<h2>Failures</h2><ul>");
        for f in &r.failures {
            let _ = write!(html, "<li>{}</li>", esc(f));
        }
        html.push_str("</ul>");
    }
    html.push_str("<h2>Thresholds</h2><table><tr><th>check</th><th>measured</th><th>threshold</th><th></th></tr>");
    for c in &r.checks {
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td>{} {}</td><td>{} {} {}</td><td class=\"{}\">{}</td></tr>",
            esc(&c.name),
            c.value.map_or("—".into(), fmt),
            esc(&c.unit),
            esc(&c.op),
            fmt(c.limit),
            esc(&c.unit),
            if c.passed { "pass" } else { "fail" },
            if c.passed { "ok" } else { "FAILED" }
        );
    }
    html.push_str("</table><h2>Charts</h2>");
    if charts.is_empty() {
        html.push_str("<p>No scenario with time series ran.</p>");
    }
    for c in charts {
        html.push_str(&c);
        html.push('\n');
    }
    let _ = writeln!(
        html,
        "<h2>Full report</h2><pre>{}</pre></body></html>",
        esc(markdown_body)
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round_numbers() {
        assert_eq!(step(10.0), 2.0);
        assert_eq!(step(0.7), 0.1);
        assert_eq!(step(3000.0), 500.0);
    }

    #[test]
    fn a_chart_is_inline_svg_with_its_series_and_escaped_text() {
        let svg = line_chart(
            "a <b>",
            "x",
            "y",
            &[Series {
                name: "s&t",
                color: "#000",
                points: vec![(0.0, 1.0), (1.0, 2.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(
            svg.contains("<polyline") && svg.contains("a &lt;b&gt;") && svg.contains("s&amp;t")
        );
        assert!(!svg.contains("http"));
        let empty = line_chart("e", "x", "y", &[]);
        assert!(empty.contains("no data"));
    }
}
