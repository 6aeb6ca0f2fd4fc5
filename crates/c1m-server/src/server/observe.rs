//! What this process tells the outside: its counters (a stats line, or the shared
//! scoreboard in a worker), `/metrics`, and its numbers for `GET /stats`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde_json::Value;

use crate::counters::rss_bytes;
use crate::metrics;
use crate::node_stats::{self, NodeReport, TopicCounts};
use crate::upstream::Upstream;

use super::Server;

impl Server {
    /// Publishes counters: to the scoreboard (a worker, every loop turn: the master's
    /// gate and every worker's `--max-connections` check read it), or as a stats line.
    pub(super) fn publish_counters(&mut self, now: Instant) {
        let due = now >= self.timers.next_stats;
        if due {
            self.timers.next_stats = now + self.config.stats_interval;
        }
        let sockets = self.registry.conns.len();
        let s = &mut self.registry.counters;
        s.publications_queued = self.publications.len() as u64;
        let Upstream::ViaMaster(link) = &self.upstream else {
            if due {
                s.log_line(now, sockets);
            }
            return;
        };
        let slot = link.scoreboard.slot(link.index);
        slot.open.store(s.open as u64, Relaxed);
        slot.other_sockets.store((sockets - s.open) as u64, Relaxed);
        slot.frames_out.store(s.frames_out, Relaxed);
        slot.broadcasts.store(s.broadcasts, Relaxed);
        slot.last_fanout_us
            .store(s.last_fanout.as_micros() as u64, Relaxed);
        slot.rejected_full.store(s.rejected_full, Relaxed);
        slot.accepted.store(s.accepted, Relaxed);
        slot.bytes_out.store(s.bytes_out, Relaxed);
        slot.messages_in.store(s.messages_in, Relaxed);
        slot.dropped.store(s.dropped, Relaxed);
        slot.handshake_rejects.store(s.handshake_rejects, Relaxed);
        slot.peer_closed.store(s.peer_closed, Relaxed);
        slot.io_errors.store(s.io_errors, Relaxed);
        slot.protocol_errors.store(s.protocol_errors, Relaxed);
        slot.slow_consumers.store(s.slow_consumers, Relaxed);
        slot.idle_timeouts.store(s.idle_timeouts, Relaxed);
        slot.handshake_timeouts.store(s.handshake_timeouts, Relaxed);
        slot.rejected_per_ip.store(s.rejected_per_ip, Relaxed);
        slot.rejected_rate.store(s.rejected_rate, Relaxed);
        slot.ticks_coalesced.store(s.ticks_coalesced, Relaxed);
        slot.publishes_refused_busy
            .store(s.publishes_refused_busy, Relaxed);
        slot.publications_queued
            .store(s.publications_queued, Relaxed);
        slot.tls_handshakes.store(s.tls_handshakes, Relaxed);
        slot.tls_resumed.store(s.tls_resumed, Relaxed);
        slot.tls_handshaking
            .store(s.tls_handshaking as u64, Relaxed);
        for (shared, own) in slot.tls_failures.iter().zip(s.tls_failures) {
            shared.store(own, Relaxed);
        }
        if due || slot.rss_bytes.load(Relaxed) == 0 {
            slot.rss_bytes.store(rss_bytes().unwrap_or(0), Relaxed);
        }
    }

    pub(super) fn render_metrics(&self) -> String {
        let (worker, parked) = match &self.upstream {
            Upstream::ViaMaster(link) => (Some((link.index, &*link.scoreboard)), link.parked()),
            _ => (None, 0),
        };
        let mut text = metrics::render(&metrics::View {
            counters: &self.registry.counters,
            topics: self.registry.topics.summary(),
            fanout: &self.fanout_seconds,
            publish: &self.publish_seconds,
            rss_bytes: rss_bytes().unwrap_or(0),
            worker,
            broker_up: self.upstream.cluster_up(),
            waiting_requests: parked,
            tls: self.config.tls.is_some(),
        });
        let c = &self.registry.counters;
        for (name, help, value) in [
            (
                "c1m_pusher_connections_opened_total",
                "Pusher clients upgraded on /app/KEY (open ones count in c1m_connections).",
                c.pusher_opened,
            ),
            (
                "c1m_pusher_api_events_total",
                "Events taken by the Pusher HTTP API, one per event and channel.",
                c.pusher_api_events,
            ),
            (
                "c1m_pusher_api_refused_total",
                "Pusher HTTP API requests refused (signature, app, body).",
                c.pusher_api_refused,
            ),
            (
                "c1m_pusher_subscriptions_refused_total",
                "Pusher subscriptions refused (name, signature, channel kind not served).",
                c.pusher_subscriptions_refused,
            ),
            (
                "c1m_pusher_presence_joins_total",
                "Pusher sockets that joined a presence channel (signed channel_data).",
                c.pusher_presence_joins,
            ),
            (
                "c1m_pusher_signins_total",
                "Pusher sockets signed in as a user (pusher:signin).",
                c.pusher_signins,
            ),
            (
                "c1m_pusher_terminated_total",
                "Pusher connections closed by the app (terminate_connections).",
                c.pusher_terminated,
            ),
            (
                "c1m_pusher_over_quota_total",
                "Pusher connections refused with 4004: the app was at its max_connections.",
                c.pusher_over_quota,
            ),
            (
                "c1m_pusher_client_events_total",
                "Pusher client events (client-*) passed on to a channel's other subscribers.",
                c.pusher_client_events,
            ),
            (
                "c1m_pusher_client_events_refused_total",
                "Pusher client events refused (not enabled, channel kind, rate limit, size).",
                c.pusher_client_events_refused,
            ),
        ] {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        let webhook_counts = match &self.upstream {
            Upstream::ViaMaster(link) => link.webhook_counts,
            _ => self.webhooks.counts(),
        };
        if let Some(counts) = webhook_counts {
            text.push_str(&counts.render());
        }
        text.push_str(&format!(
            "# HELP c1m_sse_streams_opened_total Server-Sent Events streams opened (GET /sse); open ones count in c1m_connections.\n# TYPE c1m_sse_streams_opened_total counter\nc1m_sse_streams_opened_total {}\n",
            self.registry.counters.sse_opened
        ));
        if self.config.history.enabled() {
            // A worker has no store: its master keeps the node's, publishes its
            // totals in the scoreboard and sends its largest topics every second.
            let (usage, largest) = match (&self.history, &self.upstream) {
                (Some(history), _) => (
                    Some(history.usage()),
                    history
                        .largest(crate::history::REPORTED_LARGEST)
                        .into_iter()
                        .map(|(topic, _, bytes)| (topic, bytes))
                        .collect(),
                ),
                (None, Upstream::ViaMaster(link)) => (
                    Some(link.scoreboard.history_usage()),
                    link.history_largest
                        .iter()
                        .map(|(topic, bytes)| (topic.as_str(), *bytes))
                        .collect(),
                ),
                (None, _) => (None, Vec::new()),
            };
            text.push_str(&history_metrics(usage, &largest, &self.registry.counters));
        }
        text
    }

    /// This process's numbers for `GET /stats` (a single-process server: the node's).
    pub(super) fn node_report(&self) -> NodeReport {
        let stats = &self.registry.counters;
        NodeReport {
            node: self.node.clone(),
            connections: stats.open as u64,
            workers: 1,
            messages_out: stats.frames_out,
            last_fanout_us: stats.last_fanout.as_micros() as u64,
            rss_bytes: rss_bytes().unwrap_or(0),
            pusher_apps: crate::app_connections::by_app_id(&self.config.pusher_apps, |app| {
                self.registry.app_connections.on_node(app)
            }),
            counts: self.topic_counts(),
        }
    }

    pub(super) fn topic_counts(&self) -> TopicCounts {
        TopicCounts::largest(self.registry.topics.subscriber_counts())
    }

    /// `GET /stats` answered by this process (a single process, with or without a
    /// cluster; a worker asks its master instead).
    pub(super) fn node_stats(&mut self, cluster: bool, now: Instant) -> (u16, Value) {
        let local = self.node_report();
        match &mut self.upstream {
            Upstream::ViaBroker(node) => node.stats(&local, cluster, now),
            _ => node_stats::answer(&local, cluster, None, now),
        }
    }
}

/// Topic history in `/metrics`: this process's recoveries by outcome; the node's store
/// totals (`usage`); and the topics holding the most bytes (`largest`: name, bytes).
fn history_metrics(
    usage: Option<crate::history::Usage>,
    largest: &[(&str, usize)],
    counters: &crate::counters::Counters,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP c1m_recoveries_total Subscribes with a position, by outcome (recovered, or the reason it could not be).\n# TYPE c1m_recoveries_total counter\nc1m_recoveries_total{{outcome=\"recovered\"}} {}",
        counters.recoveries
    );
    for reason in crate::history::NotRecovered::ALL {
        let n = counters.not_recovered[reason as usize];
        let _ = writeln!(
            out,
            "c1m_recoveries_total{{outcome=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP c1m_resumes_forced_total Clients keeping positions closed with 1013 to resume, because their worker was skipped for a publication of their topic.\n# TYPE c1m_resumes_forced_total counter\nc1m_resumes_forced_total {}",
        counters.resumes_forced
    );
    let Some(usage) = usage else {
        return out;
    };
    for (name, kind, help, value) in [
        ("c1m_history_topics", "gauge", "Topics with history held.", usage.topics as u64),
        ("c1m_history_publications", "gauge", "Publications held in topic history.", usage.publications as u64),
        ("c1m_history_bytes", "gauge", "Bytes held by topic history (payloads and bookkeeping; bounded by --history-max-bytes).", usage.bytes as u64),
        ("c1m_history_evicted_total", "counter", "Publications dropped from history to stay within --history-max-bytes.", usage.evicted),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    let _ = writeln!(
        out,
        "# HELP c1m_history_topic_bytes Bytes of history held by the largest topics.\n# TYPE c1m_history_topic_bytes gauge"
    );
    for (topic, bytes) in largest {
        let label = topic.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(out, "c1m_history_topic_bytes{{topic=\"{label}\"}} {bytes}");
    }
    out
}
