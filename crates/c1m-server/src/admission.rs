//! `--max-accept-rate`: how many upgrades the node admits per second, all workers
//! together. Past it an upgrade is answered at once with 503 and a jittered
//! `Retry-After`, instead of waiting in the accept backlog until it times out: after a
//! restart or a network cut, a million clients coming back at once get a quick answer
//! and a time to come back, spread so they do not return in lockstep.
//!
//! Counted in fixed windows (the second split into windows of at least 100 ms, each
//! with its share of the rate), in one `u64` holding the window's number and how many
//! it admitted, updated by compare-and-swap: exact across processes, without locks. In a
//! multi-process server the word lives in the shared scoreboard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::scoreboard::Scoreboard;

/// Bits of the shared word that count admissions (the rest number the window).
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The range of the `Retry-After` a refused client gets, in seconds.
pub const RETRY_AFTER_SECS: std::ops::RangeInclusive<u64> = 1..=5;

#[derive(Debug)]
pub struct AcceptRate {
    window_ms: u64,
    /// Admissions per window.
    budget: u64,
    word: Word,
}

#[derive(Debug)]
enum Word {
    /// A single-process server.
    Local(AtomicU64),
    /// A worker: the node's word in the scoreboard.
    Shared(Arc<Scoreboard>),
}

impl AcceptRate {
    /// `rate` upgrades per second for this process alone.
    pub fn new(rate: u32) -> AcceptRate {
        AcceptRate::with_word(rate, Word::Local(AtomicU64::new(0)))
    }

    /// `rate` upgrades per second shared by every worker of `board`.
    pub fn shared(rate: u32, board: Arc<Scoreboard>) -> AcceptRate {
        AcceptRate::with_word(rate, Word::Shared(board))
    }

    fn with_word(rate: u32, word: Word) -> AcceptRate {
        let rate = u64::from(rate.max(1));
        // Windows of 100 ms, longer for rates under 10/s (a window admits at least one).
        let window_ms = (1000 / rate).clamp(100, 1000);
        let budget = (rate * window_ms).div_ceil(1000).clamp(1, COUNT_MASK);
        AcceptRate {
            window_ms,
            budget,
            word,
        }
    }

    fn word(&self) -> &AtomicU64 {
        match &self.word {
            Word::Local(word) => word,
            Word::Shared(board) => board.accept_window(),
        }
    }

    /// Whether one more upgrade may be admitted at `now_ms` (a monotonic clock shared by
    /// the node's processes: see [`monotonic_ms`]). Counts it if so.
    pub fn try_admit(&self, now_ms: u64) -> bool {
        let window = (now_ms / self.window_ms) & (u64::MAX >> COUNT_BITS);
        let word = self.word();
        let mut current = word.load(Ordering::Relaxed);
        loop {
            let used = if current >> COUNT_BITS == window {
                current & COUNT_MASK
            } else {
                0 // a new window
            };
            if used >= self.budget {
                return false;
            }
            let next = (window << COUNT_BITS) | (used + 1);
            match word.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// The answer to an upgrade past the rate: 503 with a `Retry-After` drawn from
    /// [`RETRY_AFTER_SECS`].
    pub fn refusal(&self) -> Vec<u8> {
        let secs = rand::thread_rng().gen_range(RETRY_AFTER_SECS).to_string();
        c1m_proto::handshake::http_response(
            503,
            "Service Unavailable",
            &[("Retry-After", &secs)],
            "busy: --max-accept-rate reached, retry after the time given\n",
        )
    }
}

/// Milliseconds of `CLOCK_MONOTONIC`, one clock for every process of the machine.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_admits_its_share_then_refuses_until_the_next() {
        let rate = AcceptRate::new(50); // 5 per 100 ms window
        let t = 10_000;
        assert_eq!((0..8).filter(|_| rate.try_admit(t)).count(), 5);
        assert!(!rate.try_admit(t + 99));
        assert!(rate.try_admit(t + 100), "a new window");
        // Slow rates get longer windows: 2/s is one per 500 ms.
        let slow = AcceptRate::new(2);
        assert!(slow.try_admit(0) && !slow.try_admit(499) && slow.try_admit(500));
    }

    #[test]
    fn workers_share_one_budget() {
        let board = Arc::new(Scoreboard::create(2).unwrap());
        // SAFETY: dup gives a new descriptor owned by the second mapping alone.
        let other = Arc::new(unsafe { Scoreboard::from_fd(libc::dup(board.raw_fd()), 2).unwrap() });
        let a = AcceptRate::shared(30, board); // 3 per window
        let b = AcceptRate::shared(30, other);
        let t = 5_000;
        assert!(a.try_admit(t) && b.try_admit(t) && a.try_admit(t));
        assert!(!b.try_admit(t) && !a.try_admit(t));
    }

    #[test]
    fn the_refusal_says_when_to_come_back() {
        let answer = String::from_utf8(AcceptRate::new(1).refusal()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        let secs: u64 = answer
            .lines()
            .find_map(|l| l.strip_prefix("Retry-After: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a Retry-After in seconds");
        assert!(RETRY_AFTER_SECS.contains(&secs));
    }
}
