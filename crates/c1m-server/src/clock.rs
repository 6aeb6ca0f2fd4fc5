//! The seed's clock broadcast: when to push, and the frame to push.
//!
//! The timestamp is taken once per broadcast, *before* the fan-out starts, and the
//! frame is encoded once and shared by every connection. (The original servers took
//! the time per connection inside the loop, which hid the fan-out time from the
//! client's latency figure; see `SEED-NOTES.md`.)

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use c1m_proto::{encode_frame, OpCode};

use crate::config::{Precision, ServeConfig};

/// Decides when broadcasts are due.
#[derive(Debug)]
pub struct Clock {
    /// When the next broadcast is due; `None` in connect-only mode.
    next: Option<Instant>,
    interval: Duration,
    precision: Precision,
    /// Connections needed before the first broadcast; `None` once the gate has opened.
    gate: Option<usize>,
    /// Test fault: stamp this far in the past.
    stamp_offset: Duration,
}

impl Clock {
    pub fn new(config: &ServeConfig, start: Instant) -> Clock {
        Clock {
            next: (!config.connect_only).then(|| start + config.delay),
            interval: config.interval,
            precision: config.precision,
            gate: config.total,
            stamp_offset: config.faults.stamp_offset,
        }
    }

    /// When the event loop must wake up for the clock.
    pub fn deadline(&self) -> Option<Instant> {
        self.next
    }

    /// Whether a broadcast is due now to `open` connections. Advances the schedule, so
    /// it says yes once per tick. Ticks before the `--total` gate opens are skipped.
    pub fn due(&mut self, now: Instant, open: usize) -> bool {
        let Some(next) = self.next else { return false };
        if now < next {
            return false;
        }
        // Skip ticks missed while busy instead of bursting to catch up.
        let mut following = next + self.interval;
        while following <= now {
            following += self.interval;
        }
        self.next = Some(following);
        match self.gate {
            Some(total) if open < total => false,
            Some(_) => {
                self.gate = None;
                true
            }
            None => true,
        }
    }

    /// Stamps a broadcast now: the timestamp and the complete, shared text frame.
    pub fn stamp(&self) -> (u64, Bytes) {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(self.stamp_offset);
        let value = match self.precision {
            Precision::Millis => since_epoch.as_millis() as u64,
            Precision::Micros => since_epoch.as_micros() as u64,
        };
        let mut frame = Vec::with_capacity(24);
        encode_frame(OpCode::Text, value.to_string().as_bytes(), None, &mut frame);
        (value, Bytes::from(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(delay_ms: u64, interval_ms: u64, total: Option<usize>) -> ServeConfig {
        ServeConfig {
            delay: Duration::from_millis(delay_ms),
            interval: Duration::from_millis(interval_ms),
            total,
            ..ServeConfig::default()
        }
    }

    #[test]
    fn first_tick_after_delay_then_every_interval() {
        let t0 = Instant::now();
        let mut clock = Clock::new(&config(100, 50, None), t0);
        assert!(!clock.due(t0, 1));
        assert!(clock.due(t0 + Duration::from_millis(100), 1));
        assert!(!clock.due(t0 + Duration::from_millis(120), 1));
        assert!(clock.due(t0 + Duration::from_millis(150), 1));
        // A long stall skips the missed ticks rather than bursting.
        assert!(clock.due(t0 + Duration::from_millis(400), 1));
        assert!(!clock.due(t0 + Duration::from_millis(420), 1));
        assert_eq!(clock.deadline(), Some(t0 + Duration::from_millis(450)));
    }

    #[test]
    fn gate_holds_until_total_then_stays_open() {
        let t0 = Instant::now();
        let mut clock = Clock::new(&config(0, 10, Some(3)), t0);
        assert!(!clock.due(t0, 2));
        assert!(clock.due(t0 + Duration::from_millis(10), 3));
        assert!(
            clock.due(t0 + Duration::from_millis(20), 1),
            "gate stays open once reached"
        );
    }

    #[test]
    fn connect_only_never_ticks() {
        let t0 = Instant::now();
        let cfg = ServeConfig {
            connect_only: true,
            ..config(0, 10, None)
        };
        let mut clock = Clock::new(&cfg, t0);
        assert_eq!(clock.deadline(), None);
        assert!(!clock.due(t0 + Duration::from_secs(5), 10));
    }

    #[test]
    fn stamp_is_a_decimal_text_frame() {
        let clock = Clock::new(&ServeConfig::default(), Instant::now());
        let (value, frame) = clock.stamp();
        assert_eq!(frame[0], 0x81);
        assert_eq!(&frame[2..], value.to_string().as_bytes());
        assert!(
            value > 1_600_000_000_000 && value < 10_000_000_000_000,
            "ms since epoch: {value}"
        );
    }
}
