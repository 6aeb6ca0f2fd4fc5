//! Dropwizard-style meters: a count, a mean rate, and 1-, 5- and 15-minute rates as
//! exponentially weighted moving averages ticked every 5 seconds.
//!
//! This follows Dropwizard Metrics' `EWMA` exactly: `alpha = 1 − e^(−5 s / window)`;
//! each tick turns the events counted since the last tick into an instant rate; the
//! first tick sets the average to that rate, later ticks move it by `alpha` of the
//! difference. So at a constant rate the three averages equal that rate from the
//! first tick on, and after a change they approach the new rate with time constants
//! of 1, 5 and 15 minutes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Dropwizard's tick interval.
pub const TICK: Duration = Duration::from_secs(5);

/// One exponentially weighted moving average of a rate, in events per second.
#[derive(Debug, Clone)]
pub struct Ewma {
    alpha: f64,
    rate: Option<f64>,
    uncounted: u64,
}

impl Ewma {
    /// An average over a window of `minutes` minutes.
    pub fn minutes(minutes: f64) -> Ewma {
        Ewma {
            alpha: 1.0 - (-TICK.as_secs_f64() / 60.0 / minutes).exp(),
            rate: None,
            uncounted: 0,
        }
    }

    pub fn update(&mut self, events: u64) {
        self.uncounted += events;
    }

    pub fn tick(&mut self) {
        let instant = self.uncounted as f64 / TICK.as_secs_f64();
        self.uncounted = 0;
        self.rate = Some(match self.rate {
            None => instant,
            Some(rate) => rate + self.alpha * (instant - rate),
        });
    }

    /// Events per second (0 before the first tick).
    pub fn rate(&self) -> f64 {
        self.rate.unwrap_or(0.0)
    }
}

/// A meter fed with a cumulative count, ticked on 5-second boundaries of run time.
#[derive(Debug, Clone)]
pub struct Meter {
    count: u64,
    ticks: u64,
    m1: Ewma,
    m5: Ewma,
    m15: Ewma,
}

/// What a meter shows in a report and in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MeterValues {
    pub count: u64,
    pub mean_rate: f64,
    pub m1_rate: f64,
    pub m5_rate: f64,
    pub m15_rate: f64,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            count: 0,
            ticks: 0,
            m1: Ewma::minutes(1.0),
            m5: Ewma::minutes(5.0),
            m15: Ewma::minutes(15.0),
        }
    }
}

impl Meter {
    /// Brings the meter to a new cumulative `total` observed at run time `elapsed`. Events
    /// since the last call are credited to the current 5-second tick (as Dropwizard's
    /// `mark` does), and every tick boundary passed is ticked.
    pub fn observe(&mut self, total: u64, elapsed: Duration) {
        let new = total.saturating_sub(self.count);
        self.count = total.max(self.count);
        let due_ticks = (elapsed.as_secs_f64() / TICK.as_secs_f64()) as u64;
        for ewma in [&mut self.m1, &mut self.m5, &mut self.m15] {
            ewma.update(new);
        }
        while self.ticks < due_ticks {
            self.ticks += 1;
            for ewma in [&mut self.m1, &mut self.m5, &mut self.m15] {
                ewma.tick();
            }
        }
    }

    pub fn values(&self, elapsed: Duration) -> MeterValues {
        let secs = elapsed.as_secs_f64();
        MeterValues {
            count: self.count,
            mean_rate: if secs > 0.0 {
                self.count as f64 / secs
            } else {
                0.0
            },
            m1_rate: self.m1.rate(),
            m5_rate: self.m5.rate(),
            m15_rate: self.m15.rate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `rate` events/s for `minutes`, ticking every 5 s, after a first tick at 10/s.
    fn after(ewma: &mut Ewma, rate: u64, minutes: u64) -> f64 {
        for _ in 0..minutes * 12 {
            ewma.update(rate * 5);
            ewma.tick();
        }
        ewma.rate()
    }

    #[test]
    fn first_tick_sets_the_instant_rate() {
        // Dropwizard's EWMATest: one mark of 3 events, then a tick: 0.6 events/s.
        for minutes in [1.0, 5.0, 15.0] {
            let mut e = Ewma::minutes(minutes);
            e.update(3);
            e.tick();
            assert!((e.rate() - 0.6).abs() < 1e-12);
        }
    }

    #[test]
    fn decay_matches_dropwizard_published_values() {
        // Dropwizard's EWMATest: after the first tick at 0.6/s, with no further events,
        // the one-minute rate after 1 minute is 0.22072766 and after 5 minutes 0.00404277;
        // the five-minute rate after 1 minute is 0.49123845; fifteen-minute 0.56130419.
        let cases = [
            (1.0, 1, 0.22072766),
            (1.0, 5, 0.00404277),
            (5.0, 1, 0.49123845),
            (15.0, 1, 0.56130419),
        ];
        for (window, minutes, expected) in cases {
            let mut e = Ewma::minutes(window);
            e.update(3);
            e.tick();
            let got = after(&mut e, 0, minutes);
            assert!(
                (got - expected).abs() < 1e-6,
                "{window}-minute after {minutes} min: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn constant_rate_is_reported_exactly_after_1_5_and_15_minutes() {
        for minutes in [1, 5, 15] {
            let mut meter = Meter::default();
            let mut total = 0;
            for second in 1..=minutes * 60 {
                total += 100;
                meter.observe(total, Duration::from_secs(second));
            }
            let v = meter.values(Duration::from_secs(minutes * 60));
            for rate in [v.mean_rate, v.m1_rate, v.m5_rate, v.m15_rate] {
                assert!((rate - 100.0).abs() < 1e-6, "{minutes} min: {v:?}");
            }
        }
    }

    #[test]
    fn a_rate_change_moves_each_average_at_its_own_pace() {
        let mut m = Meter::default();
        let mut total = 0;
        for second in 1..=60 {
            total += if second <= 5 { 100 } else { 0 };
            m.observe(total, Duration::from_secs(second));
        }
        let v = m.values(Duration::from_secs(60));
        assert!(
            v.m1_rate < v.m5_rate && v.m5_rate < v.m15_rate && v.m15_rate < 100.0,
            "{v:?}"
        );
    }
}
