//! Topic history: the last publications of each topic, so a client that was away can
//! get what it missed.
//!
//! Every publication to a topic with history gets an **offset**, contiguous per topic
//! from 1, so a client can tell a gap from silence; the topic has an **epoch**, a short
//! random name for one unbroken run of offsets. The epoch changes whenever the history
//! behind the offsets is lost (this process restarted, or the topic was dropped to stay
//! within `--history-max-bytes`), so a position from before the loss can never be
//! mistaken for one after it. A client resumes with the last position it saw; it gets
//! the publications after it ([`Recovery::Recovered`]) or is told why not
//! ([`NotRecovered`]), and then reloads from its own source of truth.
//!
//! Bounds, all from the command line: at most `size` publications per topic, none older
//! than `ttl`, and at most `max_bytes` for the whole store (payloads, plus a fixed
//! estimate per publication and per topic): past it the oldest publications of all
//! topics go first, and a topic whose last publication goes is forgotten with its epoch.
//! A topic whose publications expire by age keeps its epoch and offset (a few dozen
//! bytes), so quiet topics do not change epoch under their clients.
//!
//! Sans-I/O (no sockets, the caller passes the time), so it is tested alone. Who owns
//! it: the one process that orders a node's publications (the single process, or the
//! master of workers), so that offsets are assigned in delivery order.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bytes counted per kept publication besides its payload: its entry (offset, time,
/// `Bytes`: 56), its slot in the eviction queue (24), the allocator's rounding of the
/// payload. Set from `bench/history.sh`, so that `--history-max-bytes` bounds what the
/// process really holds: at 100,000 topics x 3 publications of 64 bytes the resident
/// memory grew 310 B per publication against 150 B counted with 48 and 96 here.
const PER_PUBLICATION: usize = 112;

/// How many of the largest topics `/metrics` names (`c1m_history_topic_bytes`).
pub const REPORTED_LARGEST: usize = 10;
/// Bytes counted per topic besides its name: the map entry, the epoch, the limits, the
/// per-topic queue (which grows by doubling).
const PER_TOPIC: usize = 320;

/// Publications kept per topic, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Publications kept per topic; 0: the topic keeps no history (no offsets either).
    pub size: usize,
    /// How long a publication is kept; `None`: until `size` pushes it out.
    pub ttl: Option<Duration>,
}

/// A `--history-for PATTERN=SIZE[/TTL]` rule: topics whose name matches `pattern` (`*`
/// matches any run of characters) get `limits` instead of the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub limits: Limits,
}

/// The whole history configuration of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub default: Limits,
    /// The first rule that matches a topic decides its limits.
    pub rules: Vec<Rule>,
    /// The most the store may hold, payloads and bookkeeping.
    pub max_bytes: usize,
    /// The most publications one recovery may send (Centrifugo's default is 300 too);
    /// a client further behind is told to reload.
    pub recovery_limit: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default: Limits { size: 0, ttl: None },
            rules: Vec::new(),
            max_bytes: 64 << 20,
            recovery_limit: 300,
        }
    }
}

impl Policy {
    /// The limits of `topic`. The clock's topic keeps nothing unless a rule says so
    /// (a late time is worthless).
    pub fn limits(&self, topic: &str) -> Limits {
        match self
            .rules
            .iter()
            .find(|rule| glob_match(&rule.pattern, topic))
        {
            Some(rule) => rule.limits,
            None if topic == crate::topics::TIME => Limits { size: 0, ttl: None },
            None => self.default,
        }
    }

    /// Whether any topic can have history.
    pub fn enabled(&self) -> bool {
        self.default.size > 0 || self.rules.iter().any(|r| r.limits.size > 0)
    }
}

/// Whether a `GET /history` page after `since` (in `epoch`, if given) can be cut from a
/// topic standing at `position`: the same rule for a node's store and the broker's.
pub fn check_page(
    position: &Position,
    epoch: Option<&str>,
    since: u64,
) -> Result<(), NotRecovered> {
    if epoch.is_some_and(|e| e != position.epoch) {
        return Err(NotRecovered::EpochChanged);
    }
    if since > position.offset {
        return Err(NotRecovered::AheadOfTopic);
    }
    Ok(())
}

/// `*` matches any run of characters (also none); everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: an exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Where a topic's stream stands: the offset of its latest publication (0 before the
/// first) in the run named `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// Why missed publications cannot be sent; the client must reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRecovered {
    /// The topic keeps no history.
    NoHistory,
    /// The position is from another epoch: the history behind it was lost.
    EpochChanged,
    /// Publications after the position are no longer kept (size, age or memory).
    TooOld,
    /// More publications were missed than `recovery_limit`.
    OverLimit,
    /// The position is ahead of the topic: not one this server gave.
    AheadOfTopic,
    /// In a cluster: the broker that keeps the history could not be asked (down, or
    /// too slow).
    BrokerUnavailable,
}

impl NotRecovered {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [NotRecovered; 6] = [
        NotRecovered::NoHistory,
        NotRecovered::EpochChanged,
        NotRecovered::TooOld,
        NotRecovered::OverLimit,
        NotRecovered::AheadOfTopic,
        NotRecovered::BrokerUnavailable,
    ];

    /// The reason as clients and logs see it.
    pub fn as_str(self) -> &'static str {
        match self {
            NotRecovered::NoHistory => "no_history",
            NotRecovered::EpochChanged => "epoch_changed",
            NotRecovered::TooOld => "too_old",
            NotRecovered::OverLimit => "over_recovery_limit",
            NotRecovered::AheadOfTopic => "offset_ahead",
            NotRecovered::BrokerUnavailable => "broker_unavailable",
        }
    }
}

/// The answer to "what did I miss since this position?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The publications after the position, oldest first (maybe none), and where the
    /// topic stands after them.
    Recovered {
        publications: Vec<(u64, Bytes)>,
        position: Position,
    },
    /// Nothing can be sent; `position` is where the topic stands (if it has history),
    /// for the client to continue from after it reloads.
    NotRecovered {
        reason: NotRecovered,
        position: Option<Position>,
    },
}

#[derive(Debug)]
struct Kept {
    offset: u64,
    at: Instant,
    payload: Bytes,
}

#[derive(Debug)]
struct Topic {
    epoch: String,
    /// The offset of the latest publication (0: none yet).
    offset: u64,
    limits: Limits,
    kept: VecDeque<Kept>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub topics: usize,
    pub publications: usize,
    pub bytes: usize,
    /// Publications dropped to stay within `max_bytes` (not counting size and age).
    pub evicted: u64,
}

/// The history of every topic of a node.
#[derive(Debug)]
pub struct History {
    policy: Policy,
    /// Topic names are shared with `order` (a reference count, not a copy per
    /// publication).
    topics: HashMap<Rc<str>, Topic>,
    /// Every kept publication, oldest first, as (topic, offset): what goes first when
    /// the store is over `max_bytes`. Entries whose publication already went (by size
    /// or age) are skipped when reached.
    order: VecDeque<(Rc<str>, u64)>,
    bytes: usize,
    publications: usize,
    evicted: u64,
    epochs: RandomState,
    epochs_made: u64,
}

impl History {
    pub fn new(policy: Policy) -> History {
        History {
            policy,
            topics: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            publications: 0,
            evicted: 0,
            epochs: RandomState::new(),
            epochs_made: 0,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Keeps a publication of `payload` to `topic`; its position, or `None` when the
    /// topic keeps no history.
    pub fn append(&mut self, topic: &str, payload: Bytes, now: Instant) -> Option<Position> {
        let limits = self.policy.limits(topic);
        if limits.size == 0 {
            return None;
        }
        if !self.topics.contains_key(topic) {
            let epoch = self.new_epoch();
            self.bytes += PER_TOPIC + topic.len();
            let fresh = Topic {
                epoch,
                offset: 0,
                limits,
                kept: VecDeque::new(),
            };
            self.topics.insert(topic.into(), fresh);
        }
        self.keep(topic, payload, now)
    }

    /// Keeps a publication whose position someone else gave (a cluster's broker, which
    /// orders every node's publications). Publications come in offset order, but a
    /// node may miss some (its broker link was down): a jump, or a new epoch, starts
    /// the topic's kept run afresh, so a recovery here never spans a hole (an older
    /// position is then `TooOld` here, and the caller asks the broker). A repeat of an
    /// offset already kept is ignored. Returns whether it was kept.
    pub fn record(
        &mut self,
        topic: &str,
        position: &Position,
        payload: Bytes,
        now: Instant,
    ) -> bool {
        let limits = self.policy.limits(topic);
        if limits.size == 0 || position.offset == 0 {
            return false;
        }
        let fresh_run = match self.topics.get(topic) {
            None => true,
            Some(t) if t.epoch != position.epoch => true,
            Some(t) if position.offset <= t.offset => return false,
            Some(t) => position.offset > t.offset + 1,
        };
        if fresh_run {
            while self.topics.get(topic).is_some_and(|t| !t.kept.is_empty()) {
                self.drop_oldest_of(topic);
            }
            if !self.topics.contains_key(topic) {
                self.bytes += PER_TOPIC + topic.len();
            }
            let run = Topic {
                epoch: position.epoch.clone(),
                offset: position.offset - 1,
                limits,
                kept: VecDeque::new(),
            };
            self.topics.insert(topic.into(), run);
        }
        self.keep(topic, payload, now);
        true
    }

    /// Forgets what is kept of `topic` (a cluster node that stopped listening to it:
    /// its copy would go stale, see `server/cluster_resume.rs`).
    pub fn forget(&mut self, topic: &str) {
        while self.topics.get(topic).is_some_and(|t| !t.kept.is_empty()) {
            self.drop_oldest_of(topic);
        }
        if self.topics.remove(topic).is_some() {
            self.bytes -= PER_TOPIC + topic.len();
        }
    }

    /// Adds the next publication of `topic` (which exists) at its offset + 1, then
    /// applies the bounds.
    fn keep(&mut self, topic: &str, payload: Bytes, now: Instant) -> Option<Position> {
        let name = Rc::clone(self.topics.get_key_value(topic)?.0);
        let entry = self.topics.get_mut(topic)?;
        entry.offset += 1;
        let offset = entry.offset;
        let position = Position {
            offset,
            epoch: entry.epoch.clone(),
        };
        self.bytes += PER_PUBLICATION + payload.len();
        self.publications += 1;
        entry.kept.push_back(Kept {
            offset,
            at: now,
            payload,
        });
        self.order.push_back((name, offset));
        while self
            .topics
            .get(topic)
            .is_some_and(|t| t.kept.len() > t.limits.size)
        {
            self.drop_oldest_of(topic);
        }
        self.expire_topic(topic, now);
        self.enforce_max_bytes(topic);
        Some(position)
    }

    /// Where `topic` stands, if it has history.
    pub fn position(&self, topic: &str) -> Option<Position> {
        self.topics.get(topic).map(|t| Position {
            offset: t.offset,
            epoch: t.epoch.clone(),
        })
    }

    /// The publications of `topic` after `since` (an offset in `epoch`), at most
    /// `recovery_limit` of them.
    pub fn recover(&mut self, topic: &str, epoch: &str, since: u64, now: Instant) -> Recovery {
        let limit = self.policy.recovery_limit;
        self.since(topic, epoch, since, limit, now)
            .unwrap_or_else(|reason| Recovery::NotRecovered {
                reason,
                position: self.position(topic),
            })
    }

    /// The kept publications of `topic` after `since` in `epoch` (all of them with
    /// `epoch` `None`), at most `limit`: for `GET /history`. Unlike a recovery, a
    /// longer history is not an error: the page is cut at `limit`.
    pub fn page(
        &mut self,
        topic: &str,
        epoch: Option<&str>,
        since: u64,
        limit: usize,
        now: Instant,
    ) -> Result<(Vec<(u64, Bytes)>, Position), NotRecovered> {
        self.expire_topic(topic, now);
        let t = self.topics.get(topic).ok_or(NotRecovered::NoHistory)?;
        let position = Position {
            offset: t.offset,
            epoch: t.epoch.clone(),
        };
        check_page(&position, epoch, since)?;
        let page = t
            .kept
            .iter()
            .filter(|k| k.offset > since)
            .take(limit)
            .map(|k| (k.offset, k.payload.clone()))
            .collect();
        Ok((page, position))
    }

    fn since(
        &mut self,
        topic: &str,
        epoch: &str,
        since: u64,
        limit: usize,
        now: Instant,
    ) -> Result<Recovery, NotRecovered> {
        self.expire_topic(topic, now);
        if self.policy.limits(topic).size == 0 {
            return Err(NotRecovered::NoHistory);
        }
        let Some(t) = self.topics.get(topic) else {
            // History is on for this topic but nothing was published since this
            // process started: any position from before is from a lost epoch.
            return Err(NotRecovered::EpochChanged);
        };
        if epoch != t.epoch {
            return Err(NotRecovered::EpochChanged);
        }
        if since > t.offset {
            return Err(NotRecovered::AheadOfTopic);
        }
        let missed = t.offset - since;
        if missed > limit as u64 {
            return Err(NotRecovered::OverLimit);
        }
        let oldest = t.kept.front().map_or(t.offset + 1, |k| k.offset);
        if missed > 0 && oldest > since + 1 {
            return Err(NotRecovered::TooOld);
        }
        let publications = t
            .kept
            .iter()
            .filter(|k| k.offset > since)
            .map(|k| (k.offset, k.payload.clone()))
            .collect();
        Ok(Recovery::Recovered {
            publications,
            position: Position {
                offset: t.offset,
                epoch: t.epoch.clone(),
            },
        })
    }

    /// Drops publications past their topic's age limit, everywhere. Call it now and
    /// then (the store also expires a topic whenever it is used).
    pub fn expire(&mut self, now: Instant) {
        let aged: Vec<Rc<str>> = self
            .topics
            .iter()
            .filter(|(_, t)| is_expired(t, now))
            .map(|(name, _)| name.clone())
            .collect();
        for topic in aged {
            self.expire_topic(&topic, now);
        }
        // Keep the eviction queue from growing with entries that already went.
        if self.order.len() > 2 * self.publications + 1024 {
            let topics = &self.topics;
            self.order.retain(|(name, offset)| {
                topics
                    .get(name)
                    .is_some_and(|t| t.kept.front().is_some_and(|k| k.offset <= *offset))
            });
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            topics: self.topics.len(),
            publications: self.publications,
            bytes: self.bytes,
            evicted: self.evicted,
        }
    }

    /// The topics holding the most bytes, largest first, as (name, publications, bytes)
    /// (`/metrics` names [`REPORTED_LARGEST`] of them).
    pub fn largest(&self, n: usize) -> Vec<(&str, usize, usize)> {
        let mut all: Vec<(&str, usize, usize)> = self
            .topics
            .iter()
            .map(|(name, t)| {
                let bytes = t
                    .kept
                    .iter()
                    .map(|k| PER_PUBLICATION + k.payload.len())
                    .sum();
                (&**name, t.kept.len(), bytes)
            })
            .collect();
        all.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
        all.truncate(n);
        all
    }

    fn expire_topic(&mut self, topic: &str, now: Instant) {
        while self.topics.get(topic).is_some_and(|t| is_expired(t, now)) {
            self.drop_oldest_of(topic);
        }
    }

    fn drop_oldest_of(&mut self, topic: &str) {
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        if let Some(gone) = t.kept.pop_front() {
            self.bytes -= PER_PUBLICATION + gone.payload.len();
            self.publications -= 1;
        }
    }

    /// Over `max_bytes`: the oldest publications of any topic go, and a topic left
    /// without publications is forgotten (its epoch with it), except `keep`, the
    /// topic just published to.
    fn enforce_max_bytes(&mut self, keep: &str) {
        while self.bytes > self.policy.max_bytes {
            let Some((name, offset)) = self.order.pop_front() else {
                break;
            };
            let Some(t) = self.topics.get(&name) else {
                continue;
            };
            if t.kept.front().is_none_or(|k| k.offset != offset) {
                continue; // already gone by size or age
            }
            if &*name == keep && t.kept.len() == 1 {
                // The store cannot hold even this one publication beside the others'
                // topics: keep it (the bound is exceeded by at most one payload).
                self.order.push_front((name, offset));
                break;
            }
            self.drop_oldest_of(&name);
            self.evicted += 1;
            if self.topics.get(&name).is_some_and(|t| t.kept.is_empty()) && &*name != keep {
                self.topics.remove(&name);
                self.bytes -= PER_TOPIC + name.len();
            }
        }
    }

    fn new_epoch(&mut self) -> String {
        self.epochs_made += 1;
        let random = self.epochs.hash_one(self.epochs_made);
        format!("{:08x}", random as u32)
    }
}

fn is_expired(t: &Topic, now: Instant) -> bool {
    match (t.limits.ttl, t.kept.front()) {
        (Some(ttl), Some(oldest)) => now.saturating_duration_since(oldest.at) > ttl,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
