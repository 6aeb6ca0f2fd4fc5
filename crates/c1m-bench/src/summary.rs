//! The headline numbers of a bench result: what `c1m report summary` prints, the HTML
//! report's table and comparison bars, and `bench/compare`'s table read.

use serde::Serialize;

use crate::report::BenchResult;

/// One result in a few numbers (times in ms).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub established: u64,
    pub errors: u64,
    /// Connections established ÷ time to the last handshake.
    pub setup_rate: f64,
    pub messages: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub rounds: usize,
    /// Median and worst fan-out time over the rounds (stamp → last client).
    pub fanout_p50_ms: f64,
    pub fanout_max_ms: f64,
    pub missed: u64,
    /// Connect time (connect call to 101) median, p99 and max; 0 in older results.
    pub connect_p50_ms: f64,
    pub connect_p99_ms: f64,
    pub connect_max_ms: f64,
}

impl Summary {
    pub fn of(r: &BenchResult) -> Summary {
        let s = &r.snapshot;
        let q = |q: f64| s.latency.value_at_quantile(q) as f64 / 1000.0;
        let mut fanouts = fanout_ms(r);
        fanouts.sort_by(f64::total_cmp);
        Summary {
            established: s.established,
            errors: s.error_total(),
            setup_rate: if s.ramp_secs > 0.0 {
                s.established as f64 / s.ramp_secs
            } else {
                0.0
            },
            messages: s.messages,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: s.latency.max() as f64 / 1000.0,
            rounds: s.rounds.len(),
            fanout_p50_ms: fanouts.get(fanouts.len() / 2).copied().unwrap_or(0.0),
            fanout_max_ms: fanouts.last().copied().unwrap_or(0.0),
            missed: s.missed_total(),
            connect_p50_ms: s.connect.value_at_quantile(0.5) as f64 / 1000.0,
            connect_p99_ms: s.connect.value_at_quantile(0.99) as f64 / 1000.0,
            connect_max_ms: s.connect.max() as f64 / 1000.0,
        }
    }
}

/// Fan-out time of each round that reached anyone, in order: stamp → last client
/// received, in ms.
pub fn fanout_ms(r: &BenchResult) -> Vec<f64> {
    r.snapshot
        .rounds
        .iter()
        .filter(|(_, round)| round.delivered > 0)
        .map(|(stamp, round)| round.last_us.saturating_sub(*stamp) as f64 / 1000.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Round, Snapshot};

    #[test]
    fn numbers_of_a_small_result() {
        let mut snapshot = Snapshot {
            established: 100,
            ramp_secs: 0.5,
            ..Snapshot::default()
        };
        for v in 1..=1000u64 {
            snapshot.latency.record(v).unwrap();
        }
        for (stamp, last) in [
            (1_000_000, 1_004_000),
            (2_000_000, 2_002_000),
            (3_000_000, 3_009_000),
        ] {
            snapshot.rounds.insert(
                stamp,
                Round {
                    delivered: 100,
                    expected: 100,
                    delivered_expected: 99,
                    first_us: stamp + 10,
                    last_us: last,
                    complete: true,
                },
            );
        }
        let r = BenchResult {
            config: serde_json::json!({}),
            message_rate: Default::default(),
            setup_rate: Default::default(),
            snapshot,
            timeline: Vec::new(),
        };
        let s = Summary::of(&r);
        assert_eq!(s.setup_rate, 200.0);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{}", s.p50_ms);
        assert_eq!((s.fanout_p50_ms, s.fanout_max_ms), (4.0, 9.0));
        assert_eq!(s.missed, 3);
    }
}
