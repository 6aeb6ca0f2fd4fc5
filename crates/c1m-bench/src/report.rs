//! Reports: the console layout of Dropwizard Metrics' `ConsoleReporter` (which the seed's
//! client printed), the JSON result of `--json`, and the merging of several results.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::meter::{Meter, MeterValues};
use crate::recovery::RecoveryStats;
use crate::snapshot::Snapshot;
use hdrhistogram::Histogram;

/// The full result of a run, as written by `--json` and read by `c1m report merge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// The settings of the run (free-form, for the record).
    pub config: serde_json::Value,
    pub message_rate: MeterValues,
    pub setup_rate: MeterValues,
    pub snapshot: Snapshot,
    /// Counters over time, for the setup ramp and message-rate charts of
    /// `c1m report html` (empty in results written before it existed).
    #[serde(default)]
    pub timeline: Vec<Sample>,
}

/// The counters at one moment of a run (summed over workers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    pub established: u64,
    pub active: u64,
    pub messages: u64,
    pub errors: u64,
}

/// Most samples a timeline keeps: past it, every other one is dropped and the spacing
/// doubles, so an hour-long run stays a small file.
const MAX_SAMPLES: usize = 2000;

impl BenchResult {
    /// Merges results of runs made at the same time from several machines: counts,
    /// histograms and rounds add up exactly; rates add up (the loads ran side by side).
    pub fn merge(results: &[BenchResult]) -> Option<BenchResult> {
        let (first, rest) = results.split_first()?;
        let mut merged = first.clone();
        merged.config =
            serde_json::Value::Array(results.iter().map(|r| r.config.clone()).collect());
        for r in rest {
            merged.snapshot.merge(&r.snapshot);
            merged.timeline = merge_timelines(&merged.timeline, &r.timeline);
            for (mine, theirs) in [
                (&mut merged.message_rate, &r.message_rate),
                (&mut merged.setup_rate, &r.setup_rate),
            ] {
                mine.count += theirs.count;
                mine.mean_rate += theirs.mean_rate;
                mine.m1_rate += theirs.m1_rate;
                mine.m5_rate += theirs.m5_rate;
                mine.m15_rate += theirs.m15_rate;
            }
        }
        Some(merged)
    }
}

/// Adds two timelines of runs made side by side: at each time of `a`, `b`'s latest
/// sample at or before it (its counters are cumulative, so that is its value then).
fn merge_timelines(a: &[Sample], b: &[Sample]) -> Vec<Sample> {
    let mut j = 0;
    a.iter()
        .map(|s| {
            while j + 1 < b.len() && b[j + 1].t <= s.t {
                j += 1;
            }
            match b.get(j).filter(|o| o.t <= s.t) {
                Some(o) => Sample {
                    t: s.t,
                    established: s.established + o.established,
                    active: s.active + o.active,
                    messages: s.messages + o.messages,
                    errors: s.errors + o.errors,
                },
                None => *s,
            }
        })
        .collect()
}

/// Counters summed over workers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub messages: u64,
    pub established: u64,
    pub active: u64,
    pub errors: u64,
}

/// Collects the latest cumulative snapshot of each worker and keeps the meters.
#[derive(Debug)]
pub struct Aggregator {
    workers: Vec<Option<Snapshot>>,
    message_rate: Meter,
    setup_rate: Meter,
    timeline: Vec<Sample>,
    /// Spacing of `timeline` samples (doubles when it is thinned).
    sample_every: f64,
}

impl Aggregator {
    pub fn new(workers: usize) -> Aggregator {
        Aggregator {
            workers: vec![None; workers],
            message_rate: Meter::default(),
            setup_rate: Meter::default(),
            timeline: Vec::new(),
            sample_every: 0.2,
        }
    }

    /// Records worker `index`'s latest snapshot and feeds the meters at run time `elapsed`.
    pub fn update(&mut self, index: usize, snapshot: Snapshot, elapsed: Duration) {
        if let Some(slot) = self.workers.get_mut(index) {
            *slot = Some(snapshot);
        }
        let totals = self.totals();
        self.message_rate.observe(totals.messages, elapsed);
        self.setup_rate.observe(totals.established, elapsed);
        self.sample(totals, elapsed.as_secs_f64());
    }

    /// Adds a timeline sample if the last one is `sample_every` old (or replaces the
    /// last one, so the final counters are always in).
    fn sample(&mut self, totals: Totals, t: f64) {
        let sample = Sample {
            t,
            established: totals.established,
            active: totals.active,
            messages: totals.messages,
            errors: totals.errors,
        };
        let keep_last = match self.timeline.as_slice() {
            [.., before, _] => t - before.t < self.sample_every,
            _ => false,
        };
        if keep_last {
            *self.timeline.last_mut().expect("two or more") = sample;
        } else {
            self.timeline.push(sample);
        }
        if self.timeline.len() > MAX_SAMPLES {
            let last = self.timeline.pop();
            let thinned: Vec<Sample> = self.timeline.iter().step_by(2).copied().collect();
            self.timeline = thinned;
            self.timeline.extend(last);
            self.sample_every = (self.sample_every * 2.0).max(0.001);
        }
    }

    /// The plain counters summed over workers: cheap, unlike [`Aggregator::merged`],
    /// which also adds up histograms (done only when a report is printed).
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for s in self.workers.iter().flatten() {
            totals.messages += s.messages;
            totals.established += s.established;
            totals.active += s.active;
            totals.errors += s.error_total();
        }
        totals
    }

    /// Every worker's latest snapshot added up. A round some worker has not reported
    /// yet (it learns every round's stamp from the parent, a moment later) is not
    /// complete: that worker's connections are not counted in it yet.
    pub fn merged(&self) -> Snapshot {
        let mut merged = Snapshot::default();
        for snapshot in self.workers.iter().flatten() {
            merged.merge(snapshot);
        }
        for (stamp, round) in merged.rounds.iter_mut() {
            if self
                .workers
                .iter()
                .flatten()
                .any(|s| !s.rounds.contains_key(stamp))
            {
                round.complete = false;
            }
        }
        merged
    }

    pub fn result(&self, config: serde_json::Value, elapsed: Duration) -> BenchResult {
        let mut snapshot = self.merged();
        snapshot.elapsed_secs = elapsed.as_secs_f64();
        BenchResult {
            config,
            message_rate: self.message_rate.values(elapsed),
            setup_rate: self.setup_rate.values(elapsed),
            snapshot,
            timeline: self.timeline.clone(),
        }
    }
}

/// One histogram in the Dropwizard style: count, min, max, mean, stddev, percentiles.
fn histogram(out: &mut String, name: &str, h: &Histogram<u64>) {
    let _ = writeln!(out, "{name}");
    let _ = writeln!(out, "             count = {}", h.len());
    if !h.is_empty() {
        let _ = writeln!(out, "               min = {}", ms(h.min() as f64));
        let _ = writeln!(out, "               max = {}", ms(h.max() as f64));
        let _ = writeln!(out, "              mean = {}", ms(h.mean()));
        let _ = writeln!(out, "            stddev = {}", ms(h.stdev()));
        for (label, q) in [
            ("median", 0.5),
            ("75%", 0.75),
            ("95%", 0.95),
            ("98%", 0.98),
            ("99%", 0.99),
            ("99.9%", 0.999),
        ] {
            let sign = if label == "median" { "=" } else { "<=" };
            let _ = writeln!(
                out,
                "{label:>18} {sign} {}",
                ms(h.value_at_quantile(q) as f64)
            );
        }
    }
}

fn section(out: &mut String, title: &str) {
    let _ = writeln!(
        out,
        "-- {title} {}",
        "-".repeat(76usize.saturating_sub(title.len()))
    );
}

fn meter(out: &mut String, name: &str, m: &MeterValues) {
    let _ = writeln!(out, "{name}");
    let _ = writeln!(out, "             count = {}", m.count);
    let _ = writeln!(out, "         mean rate = {:.2} events/second", m.mean_rate);
    let _ = writeln!(out, "     1-minute rate = {:.2} events/second", m.m1_rate);
    let _ = writeln!(out, "     5-minute rate = {:.2} events/second", m.m5_rate);
    let _ = writeln!(out, "    15-minute rate = {:.2} events/second", m.m15_rate);
    out.push('\n');
}

/// Formats µs as milliseconds with µs resolution.
fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

/// The console report, in Dropwizard's layout, plus the broadcast-round table.
/// `--recover`'s counters (see [`crate::recovery::RecoveryStats`]).
fn recovery(out: &mut String, r: &RecoveryStats) {
    let _ = writeln!(out, "recovery");
    for (name, n) in [
        ("resumes", r.resumes),
        ("recovered", r.recovered),
        ("not_recovered", r.not_recovered_total()),
    ] {
        let _ = writeln!(out, "{name:>18} = {n}");
    }
    for (reason, n) in &r.not_recovered {
        let _ = writeln!(out, "{:>18} = {n}", format!("  {reason}"));
    }
    for (name, n) in [
        ("replayed", r.replayed),
        ("missed", r.missed),
        ("duplicates", r.duplicates),
        ("without_position", r.without_position),
        ("epoch_unannounced", r.unannounced_epoch_changes),
    ] {
        let _ = writeln!(out, "{name:>18} = {n}");
    }
}

pub fn console(result: &BenchResult, title: &str) -> String {
    let s = &result.snapshot;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{title} {}",
        "=".repeat(79usize.saturating_sub(title.len() + 1))
    );
    out.push('\n');
    section(&mut out, "Counters");
    let _ = writeln!(out, "connections.active\n             count = {}", s.active);
    let _ = writeln!(
        out,
        "connections.errors\n             count = {}",
        s.error_total()
    );
    for (cause, n) in &s.errors {
        let _ = writeln!(out, "{:>18} = {n}", cause);
    }
    let _ = writeln!(
        out,
        "message.missed\n             count = {}",
        s.missed_total()
    );
    if !s.recovery.is_empty() {
        recovery(&mut out, &s.recovery);
    }
    if s.ramp_secs > 0.0 {
        let _ = writeln!(
            out,
            "connections.setup.ramp\n       established = {} in {:.2} s ({:.0} connections/second)",
            s.established,
            s.ramp_secs,
            s.established as f64 / s.ramp_secs
        );
    }
    if s.tls_handshakes > 0 {
        let _ = writeln!(
            out,
            "tls.handshakes\n             count = {} ({} resumed with a ticket)",
            s.tls_handshakes, s.tls_resumed
        );
    }
    if s.unparsable > 0 || s.clock_skew > 0 {
        let _ = writeln!(
            out,
            "message.unparsable\n             count = {}",
            s.unparsable
        );
        let _ = writeln!(
            out,
            "message.clock_skew\n             count = {}",
            s.clock_skew
        );
    }
    out.push('\n');
    section(&mut out, "Histograms");
    histogram(&mut out, "message.latency (ms)", &s.latency);
    if !s.connect.is_empty() {
        histogram(
            &mut out,
            "connection.connect_time (ms, connect to 101)",
            &s.connect,
        );
    }
    out.push('\n');
    section(&mut out, "Meters");
    meter(&mut out, "message.rate", &result.message_rate);
    meter(&mut out, "connections.setup.rate", &result.setup_rate);
    if !s.rounds.is_empty() {
        section(
            &mut out,
            "Broadcast rounds (fan-out = stamp -> last client received)",
        );
        let _ = writeln!(
            out,
            "{:>17} {:>10} {:>10} {:>8} {:>12} {:>13}",
            "stamp (ms)", "delivered", "expected", "missed", "first (ms)", "fan-out (ms)"
        );
        // The last 10 rounds: a long run would print thousands.
        for (stamp, r) in s.rounds.iter().rev().take(10).rev() {
            let missed = if r.complete {
                r.missed().to_string()
            } else {
                "(open)".into()
            };
            let _ = writeln!(
                out,
                "{:>17} {:>10} {:>10} {:>8} {:>12} {:>13}",
                stamp / 1000,
                r.delivered,
                r.expected,
                missed,
                ms(r.first_us.saturating_sub(*stamp) as f64),
                ms(r.last_us.saturating_sub(*stamp) as f64)
            );
        }
        if s.rounds.len() > 10 {
            let _ = writeln!(
                out,
                "({} earlier rounds in the JSON result)",
                s.rounds.len() - 10
            );
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_has_the_dropwizard_sections() {
        let mut agg = Aggregator::new(1);
        let mut snap = Snapshot::default();
        snap.latency.record(50_000).unwrap();
        snap.messages = 1;
        agg.update(0, snap, Duration::from_secs(1));
        let text = console(
            &agg.result(serde_json::json!({}), Duration::from_secs(1)),
            "c1m bench",
        );
        for needle in [
            "-- Counters",
            "connections.active",
            "connections.errors",
            "-- Histograms",
            "message.latency",
            "median = 50.015",
            "99.9% <=",
            "-- Meters",
            "message.rate",
            "15-minute rate",
            "connections.setup.rate",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn merged_results_equal_one_run_over_both() {
        let mut a = Snapshot::default();
        let mut b = Snapshot::default();
        let mut both = Snapshot::default();
        for (i, v) in [100u64, 2_000, 30_000, 400_000, 5_000_000]
            .iter()
            .enumerate()
        {
            let s = if i % 2 == 0 { &mut a } else { &mut b };
            s.latency.record(*v).unwrap();
            both.latency.record(*v).unwrap();
        }
        let r = |s: Snapshot| BenchResult {
            config: serde_json::json!({}),
            message_rate: MeterValues::default(),
            setup_rate: MeterValues::default(),
            snapshot: s,
            timeline: Vec::new(),
        };
        let merged = BenchResult::merge(&[r(a), r(b)]).unwrap();
        assert_eq!(merged.snapshot.latency, both.latency);
    }

    #[test]
    fn timelines_stay_small_and_merge_by_time() {
        let mut agg = Aggregator::new(1);
        let mut snap = Snapshot::default();
        for i in 1..=10 * MAX_SAMPLES as u64 {
            snap.established = i;
            agg.update(0, snap.clone(), Duration::from_millis(250 * i));
        }
        let timeline = agg.result(serde_json::json!({}), Duration::ZERO).timeline;
        assert!(timeline.len() <= MAX_SAMPLES, "{}", timeline.len());
        assert!(timeline.len() > MAX_SAMPLES / 4, "{}", timeline.len());
        assert!(timeline.windows(2).all(|w| w[0].t < w[1].t));
        assert_eq!(
            timeline.last().map(|s| s.established),
            Some(snap.established)
        );

        let at = |t: f64, n: u64| Sample {
            t,
            established: n,
            ..Sample::default()
        };
        let a = [at(1.0, 1), at(2.0, 2), at(3.0, 3)];
        let b = [at(1.5, 10), at(2.5, 20)];
        let sums: Vec<u64> = merge_timelines(&a, &b)
            .iter()
            .map(|s| s.established)
            .collect();
        assert_eq!(sums, [1, 12, 23]);
    }
}
