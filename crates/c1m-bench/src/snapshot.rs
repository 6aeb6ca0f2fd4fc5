//! The measurements of a run, as one mergeable value.
//!
//! A `Snapshot` is cumulative: what a worker has seen since it started. Snapshots of
//! several workers (or several machines' `--json` results) merge exactly: counters and
//! errors add up, HdrHistograms add bucket by bucket, and broadcast rounds are matched
//! by their timestamp.

use std::collections::BTreeMap;

use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::recovery::RecoveryStats;

/// Highest latency the histogram tracks: one hour, in µs (higher values are clamped).
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// One broadcast round, identified by the timestamp in its payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// Deliveries of this round, to any connection.
    pub delivered: u64,
    /// Connections that were open before the round was stamped (so the server had them
    /// when it fanned out) and did not close before receiving it.
    pub expected: u64,
    /// Deliveries to those expected connections.
    pub delivered_expected: u64,
    /// Wall-clock µs of the first and last receive.
    pub first_us: u64,
    pub last_us: u64,
    /// Whether the round is over: every expected connection got it, or a later round was
    /// seen and this one's deliveries stopped a second ago or more. A round still being
    /// delivered when the run ends is not, and its misses don't count.
    pub complete: bool,
}

impl Round {
    /// Connections that should have received this round and did not.
    pub fn missed(&self) -> u64 {
        if self.complete {
            self.expected.saturating_sub(self.delivered_expected)
        } else {
            0
        }
    }

    fn merge(&mut self, other: &Round) {
        let empty = self.delivered == 0;
        self.delivered += other.delivered;
        self.expected += other.expected;
        self.delivered_expected += other.delivered_expected;
        if other.delivered > 0 {
            self.first_us = if empty {
                other.first_us
            } else {
                self.first_us.min(other.first_us)
            };
            self.last_us = self.last_us.max(other.last_us);
        }
        self.complete = self.complete && other.complete;
    }
}

/// Cumulative measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the run started.
    pub elapsed_secs: f64,
    /// Connection attempts started.
    pub attempted: u64,
    /// Of those, reconnects (`--reconnect`).
    #[serde(default)]
    pub reconnects: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections that completed the WebSocket handshake.
    pub established: u64,
    /// Seconds from the start of the run to the latest completed handshake: with
    /// `established`, the setup rate actually reached during the ramp.
    pub ramp_secs: f64,
    /// Messages received.
    pub messages: u64,
    /// Messages whose payload carried no timestamp.
    pub unparsable: u64,
    /// Messages stamped in the future (clocks out of sync); recorded as 0 latency.
    pub clock_skew: u64,
    /// Errors by cause, e.g. `connect.refused`, `handshake.status.503`, `closed.1001`.
    pub errors: BTreeMap<String, u64>,
    /// Latency of every timestamped message, in µs.
    #[serde(with = "histogram_base64")]
    pub latency: Histogram<u64>,
    /// Connect time of every established connection, in µs: from the `connect` call to
    /// the 101 answer (to the TCP connect for `tcp://`). Absent from older results.
    #[serde(default = "new_latency_histogram", with = "histogram_base64")]
    pub connect: Histogram<u64>,
    /// Rounds by stamp (µs since the epoch).
    pub rounds: BTreeMap<u64, Round>,
    /// `--recover`'s resumes, answers, holes and repeats (all 0 without it).
    #[serde(default, skip_serializing_if = "RecoveryStats::is_empty")]
    pub recovery: RecoveryStats,
    /// `wss://`: TLS handshakes completed, and of those, resumed with a ticket.
    #[serde(default)]
    pub tls_handshakes: u64,
    #[serde(default)]
    pub tls_resumed: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            elapsed_secs: 0.0,
            attempted: 0,
            reconnects: 0,
            active: 0,
            established: 0,
            ramp_secs: 0.0,
            messages: 0,
            unparsable: 0,
            clock_skew: 0,
            errors: BTreeMap::new(),
            latency: new_latency_histogram(),
            connect: new_latency_histogram(),
            rounds: BTreeMap::new(),
            recovery: RecoveryStats::default(),
            tls_handshakes: 0,
            tls_resumed: 0,
        }
    }
}

impl Snapshot {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn missed_total(&self) -> u64 {
        self.rounds.values().map(Round::missed).sum()
    }

    /// Adds another worker's (or machine's) measurements to these.
    pub fn merge(&mut self, other: &Snapshot) {
        self.elapsed_secs = self.elapsed_secs.max(other.elapsed_secs);
        self.attempted += other.attempted;
        self.reconnects += other.reconnects;
        self.active += other.active;
        self.established += other.established;
        self.ramp_secs = self.ramp_secs.max(other.ramp_secs);
        self.messages += other.messages;
        self.unparsable += other.unparsable;
        self.clock_skew += other.clock_skew;
        for (cause, n) in &other.errors {
            *self.errors.entry(cause.clone()).or_default() += n;
        }
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.connect.add(&other.connect);
        self.recovery.merge(&other.recovery);
        self.tls_handshakes += other.tls_handshakes;
        self.tls_resumed += other.tls_resumed;
        for (stamp, round) in &other.rounds {
            match self.rounds.get_mut(stamp) {
                Some(mine) => mine.merge(round),
                None => {
                    self.rounds.insert(*stamp, *round);
                }
            }
        }
    }
}

/// Serializes a histogram as base64 of HdrHistogram's compressed V2 format, the format
/// other HdrHistogram tools read.
mod histogram_base64 {
    use super::*;
    use base64::Engine;

    pub fn serialize<S: serde::Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(h, &mut bytes)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(serde::de::Error::custom)?;
        // Re-home into the standard bounds so later merges cannot fail.
        let mut out = new_latency_histogram();
        out.add(&h).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(latencies: &[u64], stamp: u64, delivered: u64) -> Snapshot {
        let mut s = Snapshot::default();
        for l in latencies {
            s.latency.record(*l).unwrap();
            s.connect.record((*l * 2).min(MAX_LATENCY_US)).unwrap();
        }
        s.messages = latencies.len() as u64;
        s.errors.insert("connect.refused".into(), 1);
        s.rounds.insert(
            stamp,
            Round {
                delivered,
                expected: 2,
                delivered_expected: delivered,
                first_us: stamp + 10,
                last_us: stamp + 100 * delivered,
                complete: true,
            },
        );
        s
    }

    #[test]
    fn merge_adds_counts_histograms_and_rounds() {
        let mut a = sample(&[1000, 2000], 5, 2);
        let b = sample(&[3000], 5, 1);
        a.merge(&b);
        assert_eq!(a.messages, 3);
        assert_eq!(a.latency.len(), 3);
        assert_eq!(a.latency.max(), b.latency.max());
        assert_eq!((a.connect.len(), a.connect.max()), (3, b.connect.max()));
        assert_eq!(a.errors["connect.refused"], 2);
        let r = a.rounds[&5];
        assert_eq!((r.delivered, r.expected, r.missed()), (3, 4, 1));
        assert_eq!((r.first_us, r.last_us), (15, 205));
    }

    #[test]
    fn json_round_trip_keeps_the_histogram_exactly() {
        let a = sample(&[1, 999, 1_000_000, MAX_LATENCY_US], 7, 2);
        let json = serde_json::to_string(&a).unwrap();
        let b: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(a.latency, b.latency);
        assert_eq!(a.connect, b.connect);
        assert_eq!(a.rounds, b.rounds);
        // A result written before connect times were recorded still loads.
        let mut old: serde_json::Value = serde_json::to_value(&a).unwrap();
        old.as_object_mut().unwrap().remove("connect");
        let old: Snapshot = serde_json::from_value(old).unwrap();
        assert!(old.connect.is_empty());
    }

    #[test]
    fn corrupt_histogram_is_an_error_not_a_panic() {
        let mut json: serde_json::Value = serde_json::to_value(Snapshot::default()).unwrap();
        json["latency"] = "bm90IGEgaGlzdG9ncmFt".into();
        assert!(serde_json::from_value::<Snapshot>(json).is_err());
    }
}
