//! `c1m bench --recover`: positions kept per connection across reconnects, and the
//! bookkeeping that proves (or disproves) that a server loses nothing across them.
//!
//! Every connection asks for envelopes (`{"topic","offset","epoch","data"}`) and keeps,
//! per topic, the epoch and offset of the last publication it received. When it comes
//! back after a drop it resumes with `?since=TOPIC:EPOCH:OFFSET`, and the server answers
//! each topic with `recovered: true` (the missed publications follow) or `false` and a
//! reason. Offsets are contiguous per topic and epoch, so what a connection never
//! received is exactly the holes in the offsets it saw: that is what this counts as
//! missed, whether the hole opened while it was away or while it was connected. A
//! position that the server said it could not recover is not counted as missed (the
//! server said so: a real client reloads); it is counted by reason, and the next
//! publication starts a new run of offsets.
//!
//! Sans-I/O: the worker hands every message and every connect to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What `--recover` saw, summed over connections (and worker processes).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryStats {
    /// Connects that resumed at least one topic from a position.
    pub resumes: u64,
    /// Reconnects of connections that had received no publication yet, so had no
    /// position to resume from: whatever was published while they were away is not
    /// counted anywhere (keep publishing steady, or this stays 0).
    pub without_position: u64,
    /// Topics answered `recovered: true`.
    pub recovered: u64,
    /// Topics answered `recovered: false`, by the server's reason.
    pub not_recovered: BTreeMap<String, u64>,
    /// Publications received that were published before the connection opened: the
    /// missed ones a recovery sent (not in the latency histogram, which is of live
    /// deliveries; their wait is the time the connection was away).
    pub replayed: u64,
    /// Publications never received: holes in a topic's offsets within one epoch.
    pub missed: u64,
    /// Publications received twice (an offset at or below one already received).
    pub duplicates: u64,
    /// A topic's epoch changed under a connection without a `recovered: false` answer
    /// telling it so (history lost while it was connected, or a server bug).
    pub unannounced_epoch_changes: u64,
}

impl RecoveryStats {
    pub fn merge(&mut self, other: &RecoveryStats) {
        self.resumes += other.resumes;
        self.without_position += other.without_position;
        self.recovered += other.recovered;
        for (reason, n) in &other.not_recovered {
            *self.not_recovered.entry(reason.clone()).or_default() += n;
        }
        self.replayed += other.replayed;
        self.missed += other.missed;
        self.duplicates += other.duplicates;
        self.unannounced_epoch_changes += other.unannounced_epoch_changes;
    }

    pub fn not_recovered_total(&self) -> u64 {
        self.not_recovered.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        *self == RecoveryStats::default()
    }
}

/// Where one connection stands in one topic.
#[derive(Debug, Clone)]
struct Position {
    topic: Box<str>,
    epoch: Box<str>,
    offset: u64,
    /// The server said it could not recover this topic: the next publication starts a
    /// new run of offsets instead of being checked against this one.
    rebase: bool,
}

/// What a message was, for the caller's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A publication in an envelope, with its payload's stamp if it has one.
    Publication { stamp: Option<u64> },
    /// A command's answer (e.g. a resume's), not a publication.
    Answer,
    /// Neither: not JSON, or JSON without an envelope's fields.
    Other,
}

/// The positions of every connection of one bench worker, by connection index (which
/// a reconnect keeps).
#[derive(Debug, Default)]
pub struct Positions {
    by_index: Vec<Vec<Position>>,
    /// Whether each index has had an open connection before (to tell a reconnect).
    opened_before: Vec<bool>,
    pub stats: RecoveryStats,
}

impl Positions {
    pub fn new(connections: usize) -> Positions {
        Positions {
            by_index: vec![Vec::new(); connections],
            opened_before: vec![false; connections],
            stats: RecoveryStats::default(),
        }
    }

    /// The request path for connection `index`: `path` with envelopes asked for and a
    /// `since` per topic it has a position in. Counts the resume.
    pub fn request_path(&mut self, index: u32, path: &str) -> String {
        let index = index as usize;
        let mut out = String::from(path);
        out.push(if path.contains('?') { '&' } else { '?' });
        out.push_str("envelope=1");
        let positions = self.by_index.get(index).map(Vec::as_slice).unwrap_or(&[]);
        let mut resumed = false;
        for p in positions.iter().filter(|p| !p.rebase) {
            // Topic names and epochs use only URL-safe characters (A-Z a-z 0-9 _ - . :).
            out.push_str(&format!("&since={}:{}:{}", p.topic, p.epoch, p.offset));
            resumed = true;
        }
        let again = self.opened_before.get(index).copied().unwrap_or(false);
        if resumed {
            self.stats.resumes += 1;
        } else if again {
            self.stats.without_position += 1;
        }
        out
    }

    /// Notes that connection `index` is open (so its next connect is a reconnect).
    pub fn opened(&mut self, index: u32) {
        if let Some(flag) = self.opened_before.get_mut(index as usize) {
            *flag = true;
        }
    }

    /// Accounts for one message received by connection `index`; `stamp_of` reads the
    /// stamp out of a publication's `data`.
    pub fn on_message(
        &mut self,
        index: u32,
        text: &[u8],
        stamp_of: impl Fn(&serde_json::Value) -> Option<u64>,
    ) -> Seen {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(text) else {
            return Seen::Other;
        };
        let Some(positions) = self.by_index.get_mut(index as usize) else {
            return Seen::Other;
        };
        let topic = value.get("topic").and_then(|t| t.as_str());
        if let Some(recovered) = value.get("recovered").and_then(|r| r.as_bool()) {
            let topic = topic.unwrap_or_default();
            if recovered {
                self.stats.recovered += 1;
            } else {
                let reason = value
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .unwrap_or("unknown");
                *self.stats.not_recovered.entry(reason.into()).or_default() += 1;
                if let Some(p) = positions.iter_mut().find(|p| &*p.topic == topic) {
                    p.rebase = true;
                }
            }
            return Seen::Answer;
        }
        if value.get("op").is_some() {
            return Seen::Answer;
        }
        let (Some(topic), Some(offset), Some(epoch)) = (
            topic,
            value.get("offset").and_then(|o| o.as_u64()),
            value.get("epoch").and_then(|e| e.as_str()),
        ) else {
            return match topic {
                // An envelope of a topic without history: nothing to check.
                Some(_) => Seen::Publication {
                    stamp: value.get("data").and_then(&stamp_of),
                },
                None => Seen::Other,
            };
        };
        let stamp = value.get("data").and_then(&stamp_of);
        match positions.iter_mut().find(|p| &*p.topic == topic) {
            None => positions.push(Position {
                topic: topic.into(),
                epoch: epoch.into(),
                offset,
                rebase: false,
            }),
            Some(p) if p.rebase || &*p.epoch != epoch => {
                if !p.rebase {
                    self.stats.unannounced_epoch_changes += 1;
                }
                p.epoch = epoch.into();
                p.offset = offset;
                p.rebase = false;
            }
            Some(p) if offset <= p.offset => self.stats.duplicates += 1,
            Some(p) => {
                self.stats.missed += offset - p.offset - 1;
                p.offset = offset;
            }
        }
        Seen::Publication { stamp }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(v: &serde_json::Value) -> Option<u64> {
        v.as_u64()
    }

    fn envelope(topic: &str, epoch: &str, offset: u64) -> Vec<u8> {
        format!(r#"{{"topic":"{topic}","offset":{offset},"epoch":"{epoch}","data":{offset}}}"#)
            .into_bytes()
    }

    #[test]
    fn holes_and_repeats_in_the_offsets_are_counted() {
        let mut p = Positions::new(1);
        for offset in [4, 5, 6, 9, 9, 8, 10] {
            p.on_message(0, &envelope("t", "e1", offset), stamp);
        }
        assert_eq!(p.stats.missed, 2, "7 and 8 came never or late");
        assert_eq!(p.stats.duplicates, 2);
    }

    #[test]
    fn a_reconnect_resumes_from_the_last_position_of_every_topic() {
        let mut p = Positions::new(2);
        assert_eq!(p.request_path(0, "/"), "/?envelope=1");
        p.opened(0);
        p.on_message(0, &envelope("a", "e1", 3), stamp);
        p.on_message(0, &envelope("b:c", "e2", 7), stamp);
        assert_eq!(
            p.request_path(0, "/?topic=a&topic=b:c"),
            "/?topic=a&topic=b:c&envelope=1&since=a:e1:3&since=b:c:e2:7"
        );
        assert_eq!(p.stats.resumes, 1);
        p.opened(1);
        p.request_path(1, "/");
        assert_eq!(p.stats.without_position, 1, "index 1 had nothing to resume");
    }

    #[test]
    fn an_answer_that_cannot_recover_starts_a_new_run_without_counting_a_hole() {
        let mut p = Positions::new(1);
        p.on_message(0, &envelope("a", "e1", 3), stamp);
        let answer =
            br#"{"ok":true,"op":"subscribe","topic":"a","recovered":false,"reason":"too_old","offset":900,"epoch":"e1"}"#;
        assert_eq!(p.on_message(0, answer, stamp), Seen::Answer);
        assert_eq!(p.request_path(0, "/"), "/?envelope=1", "no stale since");
        p.on_message(0, &envelope("a", "e1", 901), stamp);
        p.on_message(0, &envelope("a", "e1", 902), stamp);
        assert_eq!((p.stats.missed, p.stats.duplicates), (0, 0));
        assert_eq!(p.stats.not_recovered.get("too_old"), Some(&1));
    }

    #[test]
    fn an_epoch_change_without_an_answer_is_reported() {
        let mut p = Positions::new(1);
        p.on_message(0, &envelope("a", "e1", 3), stamp);
        p.on_message(0, &envelope("a", "e2", 1), stamp);
        p.on_message(0, &envelope("a", "e2", 2), stamp);
        assert_eq!(p.stats.unannounced_epoch_changes, 1);
        assert_eq!(p.stats.missed, 0);
    }

    #[test]
    fn stamps_come_out_of_data_and_garbage_is_other() {
        let mut p = Positions::new(1);
        assert_eq!(
            p.on_message(0, &envelope("a", "e", 1), stamp),
            Seen::Publication { stamp: Some(1) }
        );
        for garbage in [&b"17956"[..], b"{", b"\xff", b"{\"x\":1}", b"[]"] {
            assert_eq!(p.on_message(0, garbage, stamp), Seen::Other, "{garbage:?}");
        }
        assert_eq!(p.on_message(7, &envelope("a", "e", 2), stamp), Seen::Other);
    }
}
