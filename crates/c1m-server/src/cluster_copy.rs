//! A cluster node's copy of the broker's topic history, and the resumes it cannot
//! answer alone: the state behind `server/cluster_resume.rs` (a single-process node)
//! and the master of a multi-process node, so both follow one set of rules.
//!
//! - A node's copy of a topic is whole only for what it heard since the broker
//!   confirmed its subscription (`Subscribed`), and only while it stays subscribed:
//!   [`ClusterCopy::start`] and [`ClusterCopy::stop`].
//! - A resume the copy cannot answer (the node does not listen, lacks the epoch or the
//!   publications after the position, or has not heard of the position yet) asks the
//!   broker; its answer ([`ClusterCopy::stored`]) is judged like a local recovery, and
//!   the missed publications are the broker's part followed by the copy's after it.
//!
//! - `GET /history` in a cluster reads the broker (a snapshot: no subscription, no
//!   wait for live publications): [`HistoryReads`].
//!
//! No I/O: the owner sends the broker commands and answers its clients.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::broker::Stored;
use crate::history::{History, NotRecovered, Position, Recovery};
use crate::http::HistoryQuery;

/// Longest a resume waits for the broker's answer.
pub const BROKER_RESUME_WAIT: Duration = Duration::from_secs(3);

/// How long a topic stays subscribed after a resume was answered, for the client's
/// join to reach the subscription's owner (a worker tells its master).
pub const RELEASE_AFTER: Duration = Duration::from_secs(2);

/// What a resume comes to: the missed publications, or why not; and where the topic
/// stands.
pub type Outcome = (Result<Vec<(u64, Vec<u8>)>, NotRecovered>, Option<Position>);

#[derive(Debug)]
struct Pending<W> {
    who: W,
    topic: String,
    since: u64,
    epoch: String,
    deadline: Instant,
}

/// See the module doc. `W` is who waits for a resume's answer.
#[derive(Debug)]
pub struct ClusterCopy<W> {
    listening: HashSet<String>,
    /// The latest position heard of each topic listened to.
    latest: HashMap<String, Position>,
    pending: HashMap<u64, Pending<W>>,
    /// Holds to end: (when, topic).
    releases: Vec<(Instant, String)>,
}

impl<W> Default for ClusterCopy<W> {
    fn default() -> Self {
        ClusterCopy {
            listening: HashSet::new(),
            latest: HashMap::new(),
            pending: HashMap::new(),
            releases: Vec::new(),
        }
    }
}

impl<W> ClusterCopy<W> {
    /// The broker confirmed the node's subscription to `topic`: the copy starts afresh.
    pub fn start(&mut self, topic: String, history: &mut History) {
        self.latest.remove(&topic);
        history.forget(&topic);
        self.listening.insert(topic);
    }

    /// The node is no longer subscribed to `topic`: its copy would go stale.
    pub fn stop(&mut self, topic: &str, history: &mut History) {
        if self.listening.remove(topic) {
            self.latest.remove(topic);
            history.forget(topic);
        }
    }

    /// Whether the node listens to `topic` (its copy of it is whole).
    pub fn listens(&self, topic: &str) -> bool {
        self.listening.contains(topic)
    }

    /// The broker link went down: what the node hears again after it is back (each
    /// subscription confirmed anew) starts fresh copies; until then it knows nothing
    /// whole, and every resume asks the broker (answered `broker_unavailable`).
    pub fn stop_all(&mut self, history: &mut History) {
        for topic in std::mem::take(&mut self.listening) {
            history.forget(&topic);
        }
        self.latest.clear();
    }

    /// A publication heard from the broker at `position`; kept if the node listens
    /// to its topic (else it is in flight from a subscription that ended).
    pub fn heard(
        &mut self,
        topic: &str,
        position: &Position,
        frame: &Bytes,
        history: &mut History,
        now: Instant,
    ) {
        if self.listening.contains(topic) {
            self.latest.insert(topic.to_string(), position.clone());
            history.record(topic, position, frame.clone(), now);
        }
    }

    /// Whether a resume of `topic` from `since` in `epoch` needs the broker.
    pub fn needs_broker(
        &self,
        topic: &str,
        since: u64,
        epoch: &str,
        history: &mut History,
        now: Instant,
    ) -> bool {
        if !self.listening.contains(topic) {
            return true;
        }
        matches!(
            history.recover(topic, epoch, since, now),
            Recovery::NotRecovered {
                // Ahead here may only mean that this node lags the one the client came
                // from: the broker knows.
                reason: NotRecovered::EpochChanged
                    | NotRecovered::TooOld
                    | NotRecovered::AheadOfTopic,
                ..
            }
        )
    }

    /// A resume asked of the broker as request `id`.
    pub fn wait(&mut self, id: u64, who: W, topic: &str, since: u64, epoch: String, now: Instant) {
        let pending = Pending {
            who,
            topic: topic.to_string(),
            since,
            epoch,
            deadline: now + BROKER_RESUME_WAIT,
        };
        self.pending.insert(id, pending);
    }

    /// The broker answered request `id` (`None`: it could not): who waits, the topic,
    /// and the resume's outcome. The topic's hold ends [`RELEASE_AFTER`] from now.
    pub fn stored(
        &mut self,
        id: u64,
        stored: Option<Stored>,
        history: &mut History,
        limit: usize,
        now: Instant,
    ) -> Option<(W, String, Outcome)> {
        let pending = self.pending.remove(&id)?;
        let outcome = match stored {
            None => (Err(NotRecovered::BrokerUnavailable), None),
            Some(stored) => self.judge(&pending, stored, history, limit as u64, now),
        };
        self.releases
            .push((now + RELEASE_AFTER, pending.topic.clone()));
        Some((pending.who, pending.topic, outcome))
    }

    fn judge(
        &self,
        pending: &Pending<W>,
        stored: Stored,
        history: &mut History,
        limit: u64,
        now: Instant,
    ) -> Outcome {
        let since = pending.since;
        let broker_position = stored.epoch.clone().map(|epoch| Position {
            offset: stored.offset,
            epoch,
        });
        let reason = match &broker_position {
            None => Some(NotRecovered::EpochChanged),
            Some(p) if p.epoch != pending.epoch => Some(NotRecovered::EpochChanged),
            Some(p) if since > p.offset => Some(NotRecovered::AheadOfTopic),
            Some(p) if p.offset - since > limit => Some(NotRecovered::OverLimit),
            Some(p)
                if p.offset > since
                    && stored.publications.first().map(|e| e.0) != Some(since + 1) =>
            {
                Some(NotRecovered::TooOld)
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            return (Err(reason), broker_position);
        }
        // Where the topic stands: the latest this node heard, else the broker's.
        let latest = self
            .latest
            .get(&pending.topic)
            .filter(|p| p.epoch == pending.epoch);
        let position = latest
            .filter(|p| p.offset > stored.offset)
            .cloned()
            .or(broker_position);
        let publications = broker_and_copy(pending, stored.publications, latest, history, now);
        (publications, position)
    }

    /// Resumes past [`BROKER_RESUME_WAIT`]: who waits and the topic (answer them
    /// `broker_unavailable`).
    pub fn expired(&mut self, now: Instant) -> Vec<(W, String)> {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        let mut out = Vec::new();
        for id in late {
            if let Some(p) = self.pending.remove(&id) {
                self.releases.push((now, p.topic.clone()));
                out.push((p.who, p.topic));
            }
        }
        out
    }

    /// Topics whose hold ends now (call `ClusterNode::release` for each).
    pub fn due_releases(&mut self, now: Instant) -> Vec<String> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.releases)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.releases = later;
        due.into_iter().map(|(_, topic)| topic).collect()
    }

    /// The earliest deadline of a resume or a release.
    pub fn next_deadline(&self) -> Option<Instant> {
        let resumes = self.pending.values().map(|p| p.deadline);
        let releases = self.releases.iter().map(|(at, _)| *at);
        resumes.chain(releases).min()
    }
}

/// `GET /history` reads of the broker (`ClusterNode::read_history`) and who waits for
/// each: answered when the broker answers, or `broker_unavailable` at
/// [`BROKER_RESUME_WAIT`].
#[derive(Debug)]
pub struct HistoryReads<W> {
    pending: HashMap<u64, (W, HistoryQuery, Instant)>,
}

impl<W> Default for HistoryReads<W> {
    fn default() -> Self {
        HistoryReads {
            pending: HashMap::new(),
        }
    }
}

impl<W> HistoryReads<W> {
    /// `who` waits for read `id` of `query`.
    pub fn wait(&mut self, id: u64, who: W, query: HistoryQuery, now: Instant) {
        self.pending
            .insert(id, (who, query, now + BROKER_RESUME_WAIT));
    }

    /// Whether broker answer `id` is for a read (else it is for a resume).
    pub fn waits_for(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// The broker answered read `id`: who waits, and the status and body to answer.
    pub fn answered(
        &mut self,
        id: u64,
        stored: Option<Stored>,
    ) -> Option<(W, (u16, serde_json::Value))> {
        let (who, query, _) = self.pending.remove(&id)?;
        Some((who, crate::http::history_answer_from_broker(&query, stored)))
    }

    /// Reads past their deadline, answered `broker_unavailable`.
    pub fn expired(&mut self, now: Instant) -> Vec<(W, (u16, serde_json::Value))> {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (_, _, deadline))| *deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        late.into_iter()
            .filter_map(|id| self.answered(id, None))
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|(_, _, deadline)| *deadline)
            .min()
    }
}

/// The missed publications: the broker's part, then what the copy holds after it
/// (heard live meanwhile), contiguous (a hole is `TooOld`).
fn broker_and_copy<W>(
    pending: &Pending<W>,
    mut publications: Vec<(u64, Vec<u8>)>,
    latest: Option<&Position>,
    history: &mut History,
    now: Instant,
) -> Result<Vec<(u64, Vec<u8>)>, NotRecovered> {
    let mut last = publications.last().map_or(pending.since, |p| p.0);
    let live = latest.map_or(last, |p| p.offset);
    if live > last {
        let (page, _) = history
            .page(&pending.topic, Some(&pending.epoch), last, usize::MAX, now)
            .map_err(|_| NotRecovered::TooOld)?;
        for (offset, frame) in page {
            if offset != last + 1 {
                return Err(NotRecovered::TooOld);
            }
            publications.push((offset, frame.to_vec()));
            last = offset;
        }
        if last < live {
            return Err(NotRecovered::TooOld);
        }
    }
    Ok(publications)
}
