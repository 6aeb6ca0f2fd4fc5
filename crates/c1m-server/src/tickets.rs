//! TLS session tickets that every process of a server can read, with keys that roll
//! and are erased.
//!
//! Why: rustls's ticketer keeps a random key per process, so with `--workers` a client
//! resumed only when the kernel gave its reconnect to the worker that issued its
//! ticket: one reconnect in 53 at a million. Here every process of a node seals
//! tickets with the same key: the master makes it and puts it in the scoreboard, and
//! each process takes it from there when it starts.
//!
//! Key rolling and erasure (rustls asks it of a ticketer: a ticket's lifetime is the
//! life of its key, for forward secrecy): wall-clock time is cut into periods of
//! [`ROTATE`]; the key of period n+1 is HKDF-Expand of the key of period n, a one-way
//! step, and a process keeps only the current and the previous period's keys. So a key
//! stolen today opens no ticket sealed two periods ago. Every process steps at the same
//! wall-clock boundaries, so they agree without talking; the master steps its shared
//! copy too (which holds only the current key), for workers started later.
//!
//! A ticket is `period (8 bytes, big-endian) | nonce (12) | AES-256-GCM(state)`, the
//! period being the additional data. Written by hand on ring's AEAD and HKDF because
//! rustls's ticketer cannot be given a key.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// How long one ticket key seals tickets; it opens them for one period more.
pub const ROTATE: Duration = Duration::from_secs(6 * 3600);

/// Steps a process takes at most to catch up with the clock; a key older than that
/// (a clock that jumped by years) is replaced by a fresh random one.
const MAX_STEPS: u64 = 10_000;

const PERIOD_LEN: usize = 8;

/// The key of one period.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKey {
    pub period: u64,
    pub key: [u8; 32],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("TicketKey")
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

/// The period `now` falls in.
pub fn period_at(now: SystemTime) -> u64 {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    secs / ROTATE.as_secs()
}

impl TicketKey {
    /// A fresh random key for `period`.
    pub fn random(period: u64) -> TicketKey {
        let mut key = [0u8; 32];
        // The system's random source failing is not something a server can go on
        // without; ring only fails where getrandom does not exist.
        SystemRandom::new()
            .fill(&mut key)
            .expect("the system's random number generator");
        TicketKey { period, key }
    }

    /// A fresh random key for the period we are in.
    pub fn fresh() -> TicketKey {
        TicketKey::random(period_at(SystemTime::now()))
    }

    /// The key of the next period: one way, so this one cannot be had from it.
    fn next(&self) -> TicketKey {
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &self.key);
        let mut key = [0u8; 32];
        let info = [b"c1m ticket key".as_slice()];
        // Expanding 32 bytes of SHA-256 output cannot fail (the limit is 255 blocks).
        prk.expand(&info, KeyLen)
            .and_then(|okm| okm.fill(&mut key))
            .expect("32 bytes of HKDF-SHA256");
        TicketKey {
            period: self.period + 1,
            key,
        }
    }

    /// This key stepped forward to `period` (itself if `period` is not later).
    pub fn advanced_to(&self, period: u64) -> TicketKey {
        if period <= self.period {
            return self.clone();
        }
        if period - self.period > MAX_STEPS {
            return TicketKey::random(period);
        }
        let mut key = self.clone();
        while key.period < period {
            key = key.next();
        }
        key
    }
}

/// The length of an HKDF output for ring's API.
struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

/// The keys a process holds: the current period's and the previous one's.
struct Keys {
    current: TicketKey,
    previous: Option<TicketKey>,
}

impl Keys {
    /// Steps to `period`, forgetting keys older than the previous period's.
    fn advance(&mut self, period: u64) {
        if period <= self.current.period {
            return;
        }
        let previous = self.current.advanced_to(period - 1);
        self.current = previous.next();
        self.previous = Some(previous);
    }

    fn key_for(&self, period: u64) -> Option<&TicketKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|key| key.period == period)
    }
}

/// A ticketer for rustls ([`rustls::server::ProducesTickets`]) sealing with the
/// node's shared, rolling key.
pub struct SharedTicketer {
    keys: Mutex<Keys>,
    rng: SystemRandom,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer").finish_non_exhaustive()
    }
}

impl SharedTicketer {
    /// A ticketer starting from `key` (the master's, or a single process's own).
    pub fn new(key: TicketKey) -> SharedTicketer {
        SharedTicketer {
            keys: Mutex::new(Keys {
                current: key,
                previous: None,
            }),
            rng: SystemRandom::new(),
        }
    }

    fn keys(&self, period: u64) -> std::sync::MutexGuard<'_, Keys> {
        // A panic while holding the lock cannot leave the keys half-written (they are
        // replaced whole), so a poisoned lock is still good.
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.advance(period);
        keys
    }

    /// Seals `plain` with the key of `period`.
    fn seal_at(&self, plain: &[u8], period: u64) -> Option<Vec<u8>> {
        let key = self.keys(period).current.clone();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let sealing = aead_key(&key)?;
        let header = key.period.to_be_bytes();
        let mut in_out = plain.to_vec();
        sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut in_out,
            )
            .ok()?;
        let mut ticket = Vec::with_capacity(PERIOD_LEN + NONCE_LEN + in_out.len());
        ticket.extend_from_slice(&header);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&in_out);
        Some(ticket)
    }

    /// Opens a ticket sealed in `period` or the one before; anything else is `None`.
    fn open_at(&self, ticket: &[u8], period: u64) -> Option<Vec<u8>> {
        if ticket.len() < PERIOD_LEN + NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return None;
        }
        let (header, rest) = ticket.split_at(PERIOD_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let sealed_in = u64::from_be_bytes(header.try_into().ok()?);
        let key = self.keys(period).key_for(sealed_in)?.clone();
        let opening = aead_key(&key)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = sealed.to_vec();
        let plain = opening
            .open_in_place(nonce, Aad::from(header), &mut in_out)
            .ok()?;
        Some(plain.to_vec())
    }
}

fn aead_key(key: &TicketKey) -> Option<LessSafeKey> {
    Some(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &key.key).ok()?,
    ))
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        ROTATE.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, period_at(SystemTime::now()))
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, period_at(SystemTime::now()))
    }
}

#[cfg(test)]
mod tests;
