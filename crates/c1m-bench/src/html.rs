//! `c1m report html`: one self-contained HTML page of one or more bench results.
//!
//! Everything is inline (CSS and SVG, no script, no fetch), so the file can be mailed,
//! attached to CI, or opened offline. Charts: latency by percentile (HdrHistogram's
//! plot, log scale of 1/(1−q)), the setup ramp, the message rate over time, fan-out
//! time per broadcast round, and, given several results, bars comparing them.

use std::fmt::Write as _;

use crate::report::BenchResult;
use crate::summary::{fanout_ms, Summary};
use crate::svg::{bar_chart, escape, line_chart, Series, XAxis};

/// One result to show, with the name it is shown under (e.g. the server's).
pub struct Labelled<'a> {
    pub label: String,
    pub result: &'a BenchResult,
    /// What the server cost during the run, measured outside the bench (bench/compare).
    pub server: Option<ServerCost>,
}

/// A server's cost during a run: `c1m report html --server-costs FILE` reads these per
/// label (bench/compare writes the file).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCost {
    /// Growth of the server's resident memory over its idle start, per connection.
    pub memory_per_connection_bytes: f64,
    /// User + system CPU seconds the server used during the run.
    pub cpu_seconds: f64,
}

/// The percentile curve: x = log10(1/(1−q)) up to what the count supports.
fn percentile_points(r: &BenchResult) -> Vec<(f64, f64)> {
    let h = &r.snapshot.latency;
    if h.is_empty() {
        return Vec::new();
    }
    let x_max = (h.len() as f64).log10().clamp(1.0, 6.0);
    (0..=200)
        .map(|i| {
            let x = x_max * i as f64 / 200.0;
            let q = 1.0 - 10f64.powf(-x);
            (x, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

/// Established connections over time, from (0, 0): a run starts with none.
fn ramp_points(r: &BenchResult) -> Vec<(f64, f64)> {
    let samples = r.timeline.iter().map(|s| (s.t, s.established as f64));
    match r.timeline.is_empty() {
        true => Vec::new(),
        false => std::iter::once((0.0, 0.0)).chain(samples).collect(),
    }
}

fn rate_points(r: &BenchResult) -> Vec<(f64, f64)> {
    r.timeline
        .windows(2)
        .filter(|w| w[1].t > w[0].t)
        .map(|w| {
            let rate = w[1].messages.saturating_sub(w[0].messages) as f64 / (w[1].t - w[0].t);
            (w[1].t, rate)
        })
        .collect()
}

const STYLE: &str =
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1340px}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px}\
table{border-collapse:collapse;font-variant-numeric:tabular-nums}\
th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}\
th:first-child,td:first-child{text-align:left}\
.charts{display:flex;flex-wrap:wrap;gap:16px}\
svg.chart{background:#fff;border:1px solid #e4e4e4}\
.title{font-size:14px;font-weight:600}.legend,.tick{font-size:11px;fill:#444}\
.axis-title{font-size:11px;fill:#666}.grid{stroke:#eee}.axis{stroke:#999}.empty{fill:#999}\
.note{color:#666;font-size:12px}code{word-break:break-all}";

/// The whole page.
pub fn render(results: &[Labelled<'_>], title: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body><h1>{t}</h1>",
        t = escape(title)
    );
    out.push_str("<h2>Summary</h2><table><thead><tr><th>result</th><th>connections</th><th>errors</th><th>setup /s</th><th>messages</th><th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>rounds</th><th>fan-out p50 ms</th><th>fan-out max ms</th><th>missed</th></tr></thead><tbody>");
    let summaries: Vec<Summary> = results.iter().map(|l| Summary::of(l.result)).collect();
    for (l, s) in results.iter().zip(&summaries) {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
            escape(&l.label),
            s.established,
            s.errors,
            s.setup_rate,
            s.messages,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            s.rounds,
            s.fanout_p50_ms,
            s.fanout_max_ms,
            s.missed
        );
    }
    out.push_str("</tbody></table><p class=\"note\">Latency: server stamp → client receive, every message. Fan-out: stamp → the last client's receive, per broadcast round. Setup /s: connections established ÷ time to the last handshake.</p>");

    let series = |points: &dyn Fn(&BenchResult) -> Vec<(f64, f64)>| -> Vec<Series> {
        results
            .iter()
            .map(|l| Series {
                label: l.label.clone(),
                points: points(l.result),
            })
            .collect()
    };
    out.push_str("<h2>Charts</h2><div class=\"charts\">");
    out.push_str(&line_chart(
        "Latency by percentile",
        "percentile",
        "latency (ms)",
        &series(&percentile_points),
        XAxis::Percentile,
    ));
    out.push_str(&line_chart(
        "Setup ramp",
        "time (s)",
        "connections established",
        &series(&ramp_points),
        XAxis::Linear,
    ));
    out.push_str(&line_chart(
        "Message rate",
        "time (s)",
        "messages / s",
        &series(&rate_points),
        XAxis::Linear,
    ));
    out.push_str(&line_chart(
        "Fan-out time per round",
        "round",
        "stamp → last client (ms)",
        &series(&|r| {
            fanout_ms(r)
                .into_iter()
                .enumerate()
                .map(|(i, ms)| ((i + 1) as f64, ms))
                .collect()
        }),
        XAxis::Linear,
    ));
    out.push_str("</div>");
    if results.len() > 1 {
        let bars = |f: &dyn Fn(&Summary) -> f64| -> Vec<(String, f64)> {
            results
                .iter()
                .zip(&summaries)
                .map(|(l, s)| (l.label.clone(), f(s)))
                .collect()
        };
        out.push_str("<h2>Comparison</h2><div class=\"charts\">");
        out.push_str(&bar_chart("Setup rate", "conn/s", &bars(&|s| s.setup_rate)));
        out.push_str(&bar_chart(
            "Fan-out time, median round",
            "ms",
            &bars(&|s| s.fanout_p50_ms),
        ));
        out.push_str(&bar_chart("Latency p50", "ms", &bars(&|s| s.p50_ms)));
        out.push_str(&bar_chart("Latency p99", "ms", &bars(&|s| s.p99_ms)));
        out.push_str(&bar_chart(
            "Missed deliveries",
            "",
            &bars(&|s| s.missed as f64),
        ));
        out.push_str("</div>");
    }
    let costs: Vec<(&str, ServerCost)> = results
        .iter()
        .filter_map(|l| l.server.map(|c| (l.label.as_str(), c)))
        .collect();
    if !costs.is_empty() {
        let bars = |f: &dyn Fn(&ServerCost) -> f64| -> Vec<(String, f64)> {
            costs.iter().map(|(l, c)| (l.to_string(), f(c))).collect()
        };
        out.push_str("<h2>Server cost</h2><div class=\"charts\">");
        out.push_str(&bar_chart(
            "Server memory per connection (RSS growth)",
            "B",
            &bars(&|c| c.memory_per_connection_bytes),
        ));
        out.push_str(&bar_chart(
            "Server CPU over the run",
            "s",
            &bars(&|c| c.cpu_seconds),
        ));
        out.push_str("</div><p class=\"note\">Measured outside the bench: the server's resident memory and CPU time, from /proc.</p>");
    }
    out.push_str("<h2>Runs</h2><ul>");
    for l in results {
        let _ = write!(
            out,
            "<li><b>{}</b>: <code>{}</code></li>",
            escape(&l.label),
            escape(&l.result.config.to_string())
        );
    }
    out.push_str("</ul></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Sample;
    use crate::snapshot::{Round, Snapshot};

    fn result(scale: u64) -> BenchResult {
        let mut snapshot = Snapshot {
            established: 100,
            ramp_secs: 0.5,
            ..Snapshot::default()
        };
        for v in 1..=1000u64 {
            snapshot.latency.record(v * scale).unwrap();
        }
        snapshot.messages = 1000;
        snapshot.rounds.insert(
            1_000_000,
            Round {
                delivered: 100,
                expected: 100,
                delivered_expected: 100,
                first_us: 1_000_100,
                last_us: 1_004_000,
                complete: true,
            },
        );
        BenchResult {
            config: serde_json::json!({"url": "ws://127.0.0.1:1/<x>"}),
            message_rate: Default::default(),
            setup_rate: Default::default(),
            snapshot,
            timeline: (0..10)
                .map(|i| Sample {
                    t: i as f64 * 0.25,
                    established: 10 * i,
                    active: 10 * i,
                    messages: 100 * i,
                    errors: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn one_line_per_result_in_each_chart_and_bars_for_several() {
        let (a, b) = (result(1), result(3));
        let one = render(
            &[Labelled {
                label: "c1m".into(),
                result: &a,
                server: None,
            }],
            "t",
        );
        assert_eq!(one.matches("class=\"series\"").count(), 4);
        assert!(!one.contains("Comparison") && !one.contains("Server cost"));
        assert!(one.contains("&lt;x&gt;"), "config is escaped");
        let two = render(
            &[
                Labelled {
                    label: "c1m".into(),
                    result: &a,
                    server: Some(ServerCost {
                        memory_per_connection_bytes: 70.0,
                        cpu_seconds: 3.0,
                    }),
                },
                Labelled {
                    label: "peer".into(),
                    result: &b,
                    server: None,
                },
            ],
            "t",
        );
        assert_eq!(two.matches("class=\"series\"").count(), 8);
        // Five comparison charts of two bars, two cost charts of the one known cost.
        assert_eq!(two.matches("class=\"bar\"").count(), 12);
        assert!(two.contains("70 B"), "the cost is written on its bar");
        assert!(!two.contains("<script"), "no script");
        assert!(!two.contains("src="), "no external resource");
    }

    #[test]
    fn fanout_and_percentiles() {
        let r = result(1);
        assert_eq!(fanout_ms(&r), [4.0]);
        let points = percentile_points(&r);
        assert_eq!(points.first().map(|p| p.0), Some(0.0));
        assert!(points.windows(2).all(|w| w[0].1 <= w[1].1), "monotonic");
        assert_eq!(rate_points(&r)[0], (0.25, 400.0));
    }
}
