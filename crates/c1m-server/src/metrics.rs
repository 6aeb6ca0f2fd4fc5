//! `GET /metrics` in the Prometheus text format (version 0.0.4).
//!
//! Written by hand rather than with a metrics crate: the event loop is single-threaded
//! and already counts everything in plain integers ([`Counters`]), so all that is needed is
//! to print them, plus two fixed-bucket histograms. A registry with atomics and its own
//! collection machinery would add cost to the hot path for nothing.
//!
//! In a multi-process server the connection and message totals are summed over every
//! worker from the scoreboard; the histograms and per-topic gauges are those of the
//! worker that answered the scrape, labelled with its index.

use std::fmt::Write;
use std::time::Duration;

use crate::counters::Counters;
use crate::scoreboard::{Scoreboard, Slot};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Picks one counter out of a worker's scoreboard slot.
type Field = fn(&Slot) -> &AtomicU64;

/// A Prometheus histogram with fixed bucket bounds (seconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// `counts[i]` = observations ≤ `bounds[i]` and > `bounds[i-1]`; the last is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Bucket bounds for durations from 100 µs to 60 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: Duration) {
        let v = value.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Everything `/metrics` shows.
pub struct View<'a> {
    pub counters: &'a Counters,
    /// (topic, subscribers, messages published) in this process.
    pub topics: Vec<(&'a str, usize, u64)>,
    pub fanout: &'a Histogram,
    pub publish: &'a Histogram,
    pub rss_bytes: u64,
    /// Set in a worker process: its index, and the shared counters of all workers.
    pub worker: Option<(usize, &'a Scoreboard)>,
    /// With `--broker`: whether the cluster link is up.
    pub broker_up: Option<bool>,
    /// HTTP requests waiting for another process's answer (a worker's relayed
    /// publishes and `/stats`).
    pub waiting_requests: usize,
    /// Whether the server speaks TLS (`--tls-cert`): then its TLS counters are shown.
    pub tls: bool,
}

fn counter(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

pub fn render(view: &View<'_>) -> String {
    let mut out = String::with_capacity(4096);
    let s = view.counters;
    let sum = |own: u64, field: Field| server_wide(view, own, field);
    counter(
        &mut out,
        "c1m_connections",
        "Upgraded WebSocket connections open now.",
        "gauge",
        sum(s.open as u64, |x| &x.open),
    );
    counter(
        &mut out,
        "c1m_accepted_total",
        "TCP connections accepted.",
        "counter",
        sum(s.accepted, |x| &x.accepted),
    );
    counter(
        &mut out,
        "c1m_messages_out_total",
        "Messages handed to the kernel or queued for it (one per connection reached).",
        "counter",
        sum(s.frames_out, |x| &x.frames_out),
    );
    counter(
        &mut out,
        "c1m_bytes_out_total",
        "Bytes of those messages.",
        "counter",
        sum(s.bytes_out, |x| &x.bytes_out),
    );
    counter(
        &mut out,
        "c1m_messages_in_total",
        "Messages received from clients.",
        "counter",
        sum(s.messages_in, |x| &x.messages_in),
    );
    counter(
        &mut out,
        "c1m_publishes_total",
        "Publications fanned out (clock ticks, publishes, broadcasts).",
        "counter",
        sum(s.broadcasts, |x| &x.broadcasts),
    );
    counter(
        &mut out,
        "c1m_dropped_messages_total",
        "Messages skipped for slow consumers (--slow-consumer drop).",
        "counter",
        sum(s.dropped, |x| &x.dropped),
    );
    counter(
        &mut out,
        "c1m_rejected_full_total",
        "Upgrades refused with 503 at --max-connections.",
        "counter",
        sum(s.rejected_full, |x| &x.rejected_full),
    );
    counter(
        &mut out,
        "c1m_rejected_rate_total",
        "Upgrades refused with 503 and Retry-After by --max-accept-rate.",
        "counter",
        sum(s.rejected_rate, |x| &x.rejected_rate),
    );
    counter(
        &mut out,
        "c1m_clock_ticks_coalesced_total",
        "Clock ticks not sent because a newer one was queued behind them (a busy worker sends only the newest).",
        "counter",
        sum(s.ticks_coalesced, |x| &x.ticks_coalesced),
    );
    counter(
        &mut out,
        "c1m_publish_refused_busy_total",
        "POST /publish refused with 503 because the fan-out queue was full.",
        "counter",
        sum(s.publishes_refused_busy, |x| &x.publishes_refused_busy),
    );
    counter(
        &mut out,
        "c1m_publications_queued",
        "Publications being fanned out or waiting for it (at most 257 per process).",
        "gauge",
        sum(s.publications_queued, |x| &x.publications_queued),
    );
    if let Some((_, board)) = view.worker {
        let skipped: u64 = board
            .slots()
            .iter()
            .map(|x| {
                x.publications_skipped
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        counter(
            &mut out,
            "c1m_publications_skipped_total",
            "Publications the master did not queue for a worker that stopped reading (past 16 MiB queued).",
            "counter",
            skipped,
        );
    }
    counter(
        &mut out,
        "c1m_handshake_rejects_total",
        "Upgrade requests refused (malformed, unauthorized, forbidden).",
        "counter",
        sum(s.handshake_rejects, |x| &x.handshake_rejects),
    );
    let _ = writeln!(out, "# HELP c1m_disconnects_total Connections ended, by reason.\n# TYPE c1m_disconnects_total counter");
    let reasons: [(&str, u64, Field); 6] = [
        ("peer_closed", s.peer_closed, |x| &x.peer_closed),
        ("io_error", s.io_errors, |x| &x.io_errors),
        ("protocol_error", s.protocol_errors, |x| &x.protocol_errors),
        ("slow_consumer", s.slow_consumers, |x| &x.slow_consumers),
        ("idle_timeout", s.idle_timeouts, |x| &x.idle_timeouts),
        ("handshake_timeout", s.handshake_timeouts, |x| {
            &x.handshake_timeouts
        }),
    ];
    for (reason, own, field) in reasons {
        let _ = writeln!(
            out,
            "c1m_disconnects_total{{reason=\"{reason}\"}} {}",
            sum(own, field)
        );
    }
    if view.tls {
        tls_metrics(&mut out, view);
    }
    counter(
        &mut out,
        "c1m_resident_memory_bytes",
        "Resident memory of the server (all processes).",
        "gauge",
        sum(view.rss_bytes, |x| &x.rss_bytes),
    );
    counter(
        &mut out,
        "c1m_requests_waiting",
        "HTTP requests of this process waiting for another process's answer.",
        "gauge",
        view.waiting_requests,
    );
    if let Some(up) = view.broker_up {
        counter(
            &mut out,
            "c1m_broker_up",
            "1 while the cluster's broker link is up.",
            "gauge",
            u8::from(up),
        );
    }
    let labels = match view.worker {
        None => String::new(),
        Some((index, _)) => format!("worker=\"{index}\""),
    };
    let sep = if labels.is_empty() { "" } else { "," };
    let _ = writeln!(out, "# HELP c1m_topic_subscribers Connections subscribed to a topic.\n# TYPE c1m_topic_subscribers gauge");
    for (topic, subscribers, _) in &view.topics {
        let _ = writeln!(
            out,
            "c1m_topic_subscribers{{{labels}{sep}topic=\"{topic}\"}} {subscribers}"
        );
    }
    let _ = writeln!(out, "# HELP c1m_topic_publishes_total Messages published to a topic.\n# TYPE c1m_topic_publishes_total counter");
    for (topic, _, published) in &view.topics {
        let _ = writeln!(
            out,
            "c1m_topic_publishes_total{{{labels}{sep}topic=\"{topic}\"}} {published}"
        );
    }
    view.fanout.render(
        &mut out,
        "c1m_fanout_seconds",
        "Time to hand one publication to every subscriber.",
        &labels,
    );
    view.publish.render(
        &mut out,
        "c1m_publish_seconds",
        "Time from a publish request to its answer.",
        &labels,
    );
    out
}

/// TLS handshakes (full and resumed) and failures by cause, server-wide.
fn tls_metrics(out: &mut String, view: &View<'_>) {
    let s = view.counters;
    let handshakes = server_wide(view, s.tls_handshakes, |x| &x.tls_handshakes);
    let resumed = server_wide(view, s.tls_resumed, |x| &x.tls_resumed);
    let _ = writeln!(
        out,
        "# HELP c1m_tls_handshakes_total TLS handshakes completed, full or resumed with a session ticket.\n# TYPE c1m_tls_handshakes_total counter\nc1m_tls_handshakes_total{{resumed=\"false\"}} {}\nc1m_tls_handshakes_total{{resumed=\"true\"}} {resumed}",
        handshakes.saturating_sub(resumed)
    );
    let _ = writeln!(
        out,
        "# HELP c1m_tls_handshakes_in_progress TLS handshakes under way now (at most --max-tls-handshakes per process).\n# TYPE c1m_tls_handshakes_in_progress gauge\nc1m_tls_handshakes_in_progress {}",
        server_wide(view, s.tls_handshaking as u64, |x| &x.tls_handshaking)
    );
    let _ = writeln!(out, "# HELP c1m_tls_failures_total TLS connections that failed, by cause.\n# TYPE c1m_tls_failures_total counter");
    for failure in crate::counters::TlsFailure::ALL {
        let i = failure as usize;
        let _ = writeln!(
            out,
            "c1m_tls_failures_total{{cause=\"{}\"}} {}",
            failure.as_str(),
            server_wide(view, s.tls_failures[i], |x| &x.tls_failures[i])
        );
    }
}

/// A server-wide value: this process's own (`own`), or in a worker the sum of `field`
/// over every worker's scoreboard slot.
fn server_wide(view: &View<'_>, own: u64, field: impl Fn(&Slot) -> &AtomicU64) -> u64 {
    match view.worker {
        None => own,
        Some((_, board)) => board
            .slots()
            .iter()
            .map(|slot| field(slot).load(Relaxed))
            .sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x", "help", "");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
