//! Messages between the master and its workers, over one Unix stream per worker.
//!
//! Each message is a little-endian `u32` length, then a kind byte and its fields. The
//! master relays every publication (its own clock ticks, and publishes a worker took
//! over HTTP) to all workers as an already-encoded WebSocket frame, so each message is
//! encoded once per server. Workers answer a relayed publish with how many of their
//! connections it reached; the master sums the answers for the worker that holds the
//! HTTP request, which then answers its client.

use crate::history::{NotRecovered, Position};
use crate::pusher::SocketRef;
use crate::target::{Delivery, Target};

/// Writes as much of `queue` as `out` takes now (non-blocking), removing what was
/// written; `WouldBlock` leaves the rest for the next writable event.
pub fn write_queued(out: &mut impl std::io::Write, queue: &mut Vec<u8>) -> std::io::Result<()> {
    // What was written leaves the queue once, at the end: draining after every write
    // moved the whole rest of a large backlog each time.
    let mut written = 0;
    let result = loop {
        if written == queue.len() {
            break Ok(());
        }
        match out.write(&queue[written..]) {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    queue.drain(..written);
    release_burst(queue);
    result
}

/// A buffer a burst grew (a storm of presence joins, a large recovery) goes back to a
/// small size once it is empty, so the peak is not held for good.
pub fn release_burst(buffer: &mut Vec<u8>) {
    const KEEP: usize = 64 << 10;
    if buffer.is_empty() && buffer.capacity() > 16 * KEEP {
        buffer.shrink_to(KEEP);
    }
}

/// Who waits for the workers' counts of a publication the master sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Nobody: a clock tick. Workers do not answer, and a newer tick replaces one
    /// still queued.
    Clock,
    /// Nobody: an event the master makes itself (a presence member came or went).
    /// Workers do not answer, and never drop it.
    Master,
    /// Worker `index` took it over HTTP as its request `request`.
    Worker { index: u32, request: u32 },
    /// It came from the cluster's broker (the master's relay `relay`): the sum goes
    /// back to the publishing node.
    Broker { relay: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Master → worker: send `frame` to `target`, then (unless `origin` is the clock)
    /// answer with `Delivered`.
    Publish {
        origin: Origin,
        target: Target,
        /// Its position in its topic's history, if the topic keeps one.
        position: Option<Position>,
        /// A Pusher socket to leave out (a trigger's `socket_id`).
        exclude: Option<SocketRef>,
        frame: Vec<u8>,
    },
    /// Worker → master: please relay this publication to every worker.
    Relay {
        request: u32,
        target: Target,
        exclude: Option<SocketRef>,
        frame: Vec<u8>,
    },
    /// Worker → master: how many local connections a relayed publication reached.
    Delivered { origin: Origin, count: u64 },
    /// Master → origin worker: what a relayed publish came to, and the position
    /// history gave it.
    Done {
        request: u32,
        delivery: Delivery,
        position: Option<Position>,
    },
    /// Worker → master: a client resumes `topic` after `offset` in `epoch`; answer
    /// with `Recovered` (see `server/resume.rs`).
    Recover {
        request: u32,
        topic: String,
        offset: u64,
        epoch: String,
    },
    /// Worker → master: a client asked `GET /history` (the query string, checked by
    /// the worker); answered with `Answer`.
    HistoryRequest { request: u32, query: String },
    /// Master → worker: the answer to a `Recover`, sent after every publication it
    /// covers, so the worker has them all (fanned out or queued) when it reads this.
    Recovered {
        request: u32,
        /// The missed publications as (offset, frame), or why they cannot be sent.
        outcome: Result<Vec<(u64, Vec<u8>)>, NotRecovered>,
        /// Where the topic stands, if it has history.
        position: Option<Position>,
    },
    /// Worker → master: the worker has (`on`) or no longer has local subscribers of
    /// `topic` (the master subscribes to the topic on the broker while any worker has).
    Interest { topic: String, on: bool },
    /// Master → worker: the broker link is up or down.
    BrokerUp { up: bool },
    /// Master → worker: the master listens to `topic` on the broker afresh (history in
    /// a cluster): positions relayed from here on are compared with each other only.
    Listening { topic: String },
    /// Worker → master, every `node_stats::REPORT_EVERY`: subscribers per topic (the
    /// JSON of a `node_stats::TopicCounts`), which the master sums for `GET /stats`.
    TopicCounts { json: Vec<u8> },
    /// Master → worker, every second: the topics holding the most history
    /// bytes (JSON `[[topic, bytes], …]`, largest first), for the workers' `/metrics`
    /// (the master keeps the node's history; the scoreboard has only its totals).
    HistoryLargest { json: Vec<u8> },
    /// Worker → master: a client asked `GET /stats` (`cluster`: `?scope=cluster`).
    StatsRequest { request: u32, cluster: bool },
    /// Master → worker: the HTTP answer (status and JSON body) to a `StatsRequest`, or
    /// to a `Relay` that went through the cluster's broker (with its delivery count).
    Answer {
        request: u32,
        status: u16,
        json: Vec<u8>,
    },
    /// Worker → master: a Pusher socket joins a presence channel as the user its
    /// `channel_data` names (signature already checked); answered with `PresenceJoined`.
    PresenceJoin {
        channel: String,
        socket: SocketRef,
        channel_data: String,
    },
    /// Worker → master: a Pusher socket left a presence channel (unsubscribed or gone).
    PresenceLeave { channel: String, socket: SocketRef },
    /// Worker → master: a signed `GET /apps/{id}/channels…` (a `pusher_api::Read` as
    /// JSON); answered with `Answer`.
    PusherRead { request: u32, json: Vec<u8> },
    /// Worker → master: close every connection of the node (and of the cluster) in a
    /// user's channel `topic` (`terminate_connections`); master → worker: close yours.
    Terminate { topic: String },
    /// Worker → master: a Pusher webhook event (JSON) of app number `app` for the
    /// master's batches (the master sends the node's webhooks).
    Webhook { app: u32, json: Vec<u8> },
    /// Master → worker, every second: the node's webhook counters (a
    /// `webhooks::WebhookCounts` as JSON), for the workers' `/metrics`.
    WebhookCounts { json: Vec<u8> },
    /// Master → worker: the answer to a `PresenceJoin` of the socket in `slot`: the
    /// `subscription_succeeded` data (the members), or why it was refused.
    PresenceJoined {
        slot: u32,
        channel: String,
        outcome: Result<String, String>,
    },
}

const PUBLISH: u8 = 1;
const RELAY: u8 = 2;
const DELIVERED: u8 = 3;
const DONE: u8 = 4;
const INTEREST: u8 = 5;
const BROKER_UP: u8 = 6;
const TOPIC_COUNTS: u8 = 7;
const STATS_REQUEST: u8 = 8;
const ANSWER: u8 = 9;
const RECOVER: u8 = 10;
const RECOVERED: u8 = 11;
const HISTORY_REQUEST: u8 = 12;
const LISTENING: u8 = 13;
const HISTORY_LARGEST: u8 = 14;
const PRESENCE_JOIN: u8 = 15;
const PRESENCE_LEAVE: u8 = 16;
const PRESENCE_JOINED: u8 = 17;
const PUSHER_READ: u8 = 18;
const WEBHOOK: u8 = 19;
const WEBHOOK_COUNTS: u8 = 20;
const TERMINATE: u8 = 21;

impl Message {
    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Message::Publish {
                origin,
                target,
                position,
                exclude,
                frame,
            } => {
                out.push(PUBLISH);
                put_origin(out, origin);
                put_bytes(out, target.to_wire().as_bytes());
                put_position(out, position.as_ref());
                put_exclude(out, *exclude);
                out.extend_from_slice(frame);
            }
            Message::Relay {
                request,
                target,
                exclude,
                frame,
            } => {
                out.push(RELAY);
                out.extend_from_slice(&request.to_le_bytes());
                put_bytes(out, target.to_wire().as_bytes());
                put_exclude(out, *exclude);
                out.extend_from_slice(frame);
            }
            Message::Delivered { origin, count } => {
                out.push(DELIVERED);
                put_origin(out, origin);
                out.extend_from_slice(&count.to_le_bytes());
            }
            Message::Done {
                request,
                delivery,
                position,
            } => {
                out.push(DONE);
                out.extend_from_slice(&request.to_le_bytes());
                let (tag, count) = match *delivery {
                    Delivery::Counted {
                        connections,
                        complete: true,
                    } => (0, connections),
                    Delivery::Counted {
                        connections,
                        complete: false,
                    } => (1, connections),
                    Delivery::Refused => (2, 0),
                };
                out.push(tag);
                out.extend_from_slice(&count.to_le_bytes());
                put_position(out, position.as_ref());
            }
            Message::HistoryRequest { request, query } => {
                out.push(HISTORY_REQUEST);
                out.extend_from_slice(&request.to_le_bytes());
                out.extend_from_slice(query.as_bytes());
            }
            Message::Recover {
                request,
                topic,
                offset,
                epoch,
            } => {
                out.push(RECOVER);
                out.extend_from_slice(&request.to_le_bytes());
                put_bytes(out, topic.as_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                put_bytes(out, epoch.as_bytes());
            }
            Message::Recovered {
                request,
                outcome,
                position,
            } => {
                out.push(RECOVERED);
                out.extend_from_slice(&request.to_le_bytes());
                put_position(out, position.as_ref());
                match outcome {
                    Ok(publications) => {
                        out.push(0);
                        out.extend_from_slice(&(publications.len() as u32).to_le_bytes());
                        for (offset, frame) in publications {
                            out.extend_from_slice(&offset.to_le_bytes());
                            out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                            out.extend_from_slice(frame);
                        }
                    }
                    Err(reason) => out.push(1 + *reason as u8),
                }
            }
            Message::Interest { topic, on } => {
                out.push(INTEREST);
                out.push(u8::from(*on));
                put_bytes(out, topic.as_bytes());
            }
            Message::BrokerUp { up } => {
                out.push(BROKER_UP);
                out.push(u8::from(*up));
            }
            Message::Listening { topic } => {
                out.push(LISTENING);
                put_bytes(out, topic.as_bytes());
            }
            Message::TopicCounts { json } => {
                out.push(TOPIC_COUNTS);
                out.extend_from_slice(json);
            }
            Message::HistoryLargest { json } => {
                out.push(HISTORY_LARGEST);
                out.extend_from_slice(json);
            }
            Message::StatsRequest { request, cluster } => {
                out.push(STATS_REQUEST);
                out.extend_from_slice(&request.to_le_bytes());
                out.push(u8::from(*cluster));
            }
            Message::Answer {
                request,
                status,
                json,
            } => {
                out.push(ANSWER);
                out.extend_from_slice(&request.to_le_bytes());
                out.extend_from_slice(&status.to_le_bytes());
                out.extend_from_slice(json);
            }
            Message::PresenceJoin {
                channel,
                socket,
                channel_data,
            } => {
                out.push(PRESENCE_JOIN);
                put_bytes(out, channel.as_bytes());
                put_exclude(out, Some(*socket));
                out.extend_from_slice(channel_data.as_bytes());
            }
            Message::Terminate { topic } => {
                out.push(TERMINATE);
                out.extend_from_slice(topic.as_bytes());
            }
            Message::Webhook { app, json } => {
                out.push(WEBHOOK);
                out.extend_from_slice(&app.to_le_bytes());
                out.extend_from_slice(json);
            }
            Message::WebhookCounts { json } => {
                out.push(WEBHOOK_COUNTS);
                out.extend_from_slice(json);
            }
            Message::PusherRead { request, json } => {
                out.push(PUSHER_READ);
                out.extend_from_slice(&request.to_le_bytes());
                out.extend_from_slice(json);
            }
            Message::PresenceLeave { channel, socket } => {
                out.push(PRESENCE_LEAVE);
                put_bytes(out, channel.as_bytes());
                put_exclude(out, Some(*socket));
            }
            Message::PresenceJoined {
                slot,
                channel,
                outcome,
            } => {
                out.push(PRESENCE_JOINED);
                out.extend_from_slice(&slot.to_le_bytes());
                put_bytes(out, channel.as_bytes());
                let (tag, text) = match outcome {
                    Ok(data) => (0, data),
                    Err(reason) => (1, reason),
                };
                out.push(tag);
                out.extend_from_slice(text.as_bytes());
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Takes every complete message off the front of `buf`.
    pub fn decode_all(buf: &mut Vec<u8>) -> Result<Vec<Message>, String> {
        let mut messages = Vec::new();
        let mut at = 0;
        while let Some(len) = buf.get(at..at + 4) {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let Some(body) = buf.get(at + 4..at + 4 + len) else {
                break;
            };
            messages.push(Message::decode(body)?);
            at += 4 + len;
        }
        buf.drain(..at);
        release_burst(buf);
        Ok(messages)
    }

    fn decode(body: &[u8]) -> Result<Message, String> {
        let mut r = Reader(body);
        let kind = r.u8()?;
        let message = match kind {
            PUBLISH => Message::Publish {
                origin: r.origin()?,
                target: Target::from_wire(r.string()?),
                position: r.position()?,
                exclude: r.exclude()?,
                frame: r.rest(),
            },
            RELAY => Message::Relay {
                request: r.u32()?,
                target: Target::from_wire(r.string()?),
                exclude: r.exclude()?,
                frame: r.rest(),
            },
            DELIVERED => Message::Delivered {
                origin: r.origin()?,
                count: r.u64()?,
            },
            DONE => {
                let request = r.u32()?;
                let tag = r.u8()?;
                let connections = r.u64()?;
                let delivery = match tag {
                    0 | 1 => Delivery::Counted {
                        connections,
                        complete: tag == 0,
                    },
                    2 => Delivery::Refused,
                    other => return Err(format!("unknown delivery kind {other}")),
                };
                Message::Done {
                    request,
                    delivery,
                    position: r.position()?,
                }
            }
            HISTORY_REQUEST => Message::HistoryRequest {
                request: r.u32()?,
                query: String::from_utf8(r.rest()).map_err(|_| "query is not UTF-8")?,
            },
            RECOVER => Message::Recover {
                request: r.u32()?,
                topic: r.string()?,
                offset: r.u64()?,
                epoch: r.string()?,
            },
            RECOVERED => {
                let request = r.u32()?;
                let position = r.position()?;
                let outcome = match r.u8()? {
                    0 => {
                        let count = r.u32()?;
                        let mut publications = Vec::new();
                        for _ in 0..count {
                            let offset = r.u64()?;
                            let len = r.u32()? as usize;
                            publications.push((offset, r.take(len)?.to_vec()));
                        }
                        Ok(publications)
                    }
                    tag => Err(*NotRecovered::ALL
                        .get(usize::from(tag) - 1)
                        .ok_or_else(|| format!("unknown recovery outcome {tag}"))?),
                };
                Message::Recovered {
                    request,
                    outcome,
                    position,
                }
            }
            INTEREST => {
                let on = r.u8()? != 0;
                Message::Interest {
                    topic: r.string()?,
                    on,
                }
            }
            BROKER_UP => Message::BrokerUp { up: r.u8()? != 0 },
            LISTENING => Message::Listening { topic: r.string()? },
            TOPIC_COUNTS => Message::TopicCounts { json: r.rest() },
            HISTORY_LARGEST => Message::HistoryLargest { json: r.rest() },
            STATS_REQUEST => Message::StatsRequest {
                request: r.u32()?,
                cluster: r.u8()? != 0,
            },
            ANSWER => Message::Answer {
                request: r.u32()?,
                status: {
                    let b = r.take(2)?;
                    u16::from_le_bytes([b[0], b[1]])
                },
                json: r.rest(),
            },
            PRESENCE_JOIN => Message::PresenceJoin {
                channel: r.string()?,
                socket: r.socket()?,
                channel_data: r.text()?,
            },
            WEBHOOK => Message::Webhook {
                app: r.u32()?,
                json: r.rest(),
            },
            TERMINATE => Message::Terminate { topic: r.text()? },
            WEBHOOK_COUNTS => Message::WebhookCounts { json: r.rest() },
            PUSHER_READ => Message::PusherRead {
                request: r.u32()?,
                json: r.rest(),
            },
            PRESENCE_LEAVE => Message::PresenceLeave {
                channel: r.string()?,
                socket: r.socket()?,
            },
            PRESENCE_JOINED => {
                let slot = r.u32()?;
                let channel = r.string()?;
                let ok = r.u8()? == 0;
                let text = r.text()?;
                Message::PresenceJoined {
                    slot,
                    channel,
                    outcome: if ok { Ok(text) } else { Err(text) },
                }
            }
            other => return Err(format!("unknown control message kind {other}")),
        };
        Ok(message)
    }
}

fn put_origin(out: &mut Vec<u8>, origin: &Origin) {
    let (tag, a, b) = match *origin {
        Origin::Clock => (0, 0, 0),
        Origin::Master => (3, 0, 0),
        Origin::Worker { index, request } => (1, index, request),
        Origin::Broker { relay } => (2, relay, 0),
    };
    out.push(tag);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
}

fn put_position(out: &mut Vec<u8>, position: Option<&Position>) {
    match position {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            out.extend_from_slice(&p.offset.to_le_bytes());
            put_bytes(out, p.epoch.as_bytes());
        }
    }
}

fn put_exclude(out: &mut Vec<u8>, exclude: Option<SocketRef>) {
    match exclude {
        None => out.push(0),
        Some((token, key)) => {
            out.push(1);
            out.extend_from_slice(&token.to_le_bytes());
            out.extend_from_slice(&key.to_le_bytes());
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("truncated control message".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, String> {
        let b = self.take(2)?;
        let len = u16::from_le_bytes([b[0], b[1]]) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "topic is not UTF-8".into())
    }
    fn position(&mut self) -> Result<Option<Position>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(Position {
                offset: self.u64()?,
                epoch: self.string()?,
            })),
            other => Err(format!("unknown position kind {other}")),
        }
    }
    /// A socket that must be there (written by `put_exclude` with `Some`).
    fn socket(&mut self) -> Result<SocketRef, String> {
        self.exclude()?.ok_or_else(|| "missing socket".to_string())
    }
    /// The rest of the message as UTF-8 text.
    fn text(&mut self) -> Result<String, String> {
        String::from_utf8(self.rest()).map_err(|_| "text is not UTF-8".into())
    }
    fn exclude(&mut self) -> Result<Option<SocketRef>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some((self.u32()?, self.u32()?))),
            other => Err(format!("unknown exclusion kind {other}")),
        }
    }
    fn origin(&mut self) -> Result<Origin, String> {
        let (tag, a, b) = (self.u8()?, self.u32()?, self.u32()?);
        match tag {
            0 => Ok(Origin::Clock),
            1 => Ok(Origin::Worker {
                index: a,
                request: b,
            }),
            2 => Ok(Origin::Broker { relay: a }),
            3 => Ok(Origin::Master),
            other => Err(format!("unknown origin kind {other}")),
        }
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_pieces() {
        let all = vec![
            Message::Publish {
                origin: Origin::Clock,
                target: Target::Topic("time".into()),
                position: None,
                exclude: None,
                frame: vec![0x81, 1, b'7'],
            },
            Message::Publish {
                origin: Origin::Master,
                target: Target::Topic("presence-a".into()),
                position: None,
                exclude: Some((1, 2)),
                frame: vec![0x81, 0],
            },
            Message::Publish {
                origin: Origin::Broker { relay: 7 },
                target: Target::All,
                position: None,
                exclude: Some((7, 9)),
                frame: vec![0x81, 0],
            },
            Message::Publish {
                origin: Origin::Worker {
                    index: 1,
                    request: 2,
                },
                target: Target::Topic("news".into()),
                position: Some(Position {
                    offset: 1 << 33,
                    epoch: "abcd0123".into(),
                }),
                exclude: None,
                frame: vec![0x81, 0],
            },
            Message::HistoryRequest {
                request: 8,
                query: "topic=news&since=3".into(),
            },
            Message::Recover {
                request: 5,
                topic: "news".into(),
                offset: 41,
                epoch: "abcd0123".into(),
            },
            Message::Recovered {
                request: 5,
                outcome: Ok(vec![(42, vec![0x81, 1, b'a']), (43, vec![])]),
                position: Some(Position {
                    offset: 43,
                    epoch: "abcd0123".into(),
                }),
            },
            Message::Recovered {
                request: 6,
                outcome: Err(NotRecovered::TooOld),
                position: None,
            },
            Message::Relay {
                request: 9,
                target: Target::All,
                exclude: Some((u32::MAX, 3)),
                frame: vec![0x82, 0],
            },
            Message::Delivered {
                origin: Origin::Worker {
                    index: 3,
                    request: 9,
                },
                count: 1 << 40,
            },
            Message::Done {
                request: 9,
                delivery: Delivery::whole(5),
                position: Some(Position {
                    offset: 3,
                    epoch: "e".into(),
                }),
            },
            Message::Done {
                request: 10,
                delivery: Delivery::Counted {
                    connections: 2,
                    complete: false,
                },
                position: None,
            },
            Message::Done {
                request: 11,
                delivery: Delivery::Refused,
                position: None,
            },
            Message::Interest {
                topic: "prices".into(),
                on: true,
            },
            Message::BrokerUp { up: false },
            Message::Listening {
                topic: "prices".into(),
            },
            Message::TopicCounts {
                json: br#"{"topics":{"a":1}}"#.to_vec(),
            },
            Message::HistoryLargest {
                json: br#"[["a",120]]"#.to_vec(),
            },
            Message::StatsRequest {
                request: 4,
                cluster: true,
            },
            Message::Answer {
                request: 4,
                status: 503,
                json: b"{}".to_vec(),
            },
            Message::PresenceJoin {
                channel: "presence-room".into(),
                socket: (7, 12),
                channel_data: r#"{"user_id":"u1"}"#.into(),
            },
            Message::PresenceLeave {
                channel: "presence-room".into(),
                socket: (7, 12),
            },
            Message::Webhook {
                app: 2,
                json: br#"{"name":"client_event"}"#.to_vec(),
            },
            Message::Terminate {
                topic: "2~#server-to-user-u@1".into(),
            },
            Message::WebhookCounts {
                json: br#"{"events_sent":1}"#.to_vec(),
            },
            Message::PusherRead {
                request: 3,
                json: br#"{"Users":{"name":"presence-room"}}"#.to_vec(),
            },
            Message::PresenceJoined {
                slot: 12,
                channel: "presence-room".into(),
                outcome: Ok(r#"{"presence":{}}"#.into()),
            },
            Message::PresenceJoined {
                slot: 13,
                channel: "presence-room".into(),
                outcome: Err("full".into()),
            },
        ];
        let mut bytes = Vec::new();
        for m in &all {
            m.encode(&mut bytes);
        }
        // Fed a byte at a time, the decoder yields each message once it is complete.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in bytes {
            buf.push(b);
            got.extend(Message::decode_all(&mut buf).unwrap());
        }
        assert_eq!(got, all);
        assert!(buf.is_empty());
    }

    /// Takes `per_write` bytes a call, `calls` times, then would block (or fails).
    struct Trickle {
        taken: Vec<u8>,
        per_write: usize,
        calls: usize,
        fail: bool,
    }

    impl std::io::Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.calls == 0 {
                return Err(if self.fail {
                    std::io::ErrorKind::BrokenPipe.into()
                } else {
                    std::io::ErrorKind::WouldBlock.into()
                });
            }
            self.calls -= 1;
            let n = buf.len().min(self.per_write);
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn what_was_written_leaves_the_queue_and_the_rest_waits_in_order() {
        let data: Vec<u8> = (0..=255).collect();
        let mut queue = data.clone();
        let mut out = Trickle {
            taken: Vec::new(),
            per_write: 10,
            calls: 3,
            fail: false,
        };
        write_queued(&mut out, &mut queue).unwrap();
        assert_eq!(out.taken, data[..30]);
        assert_eq!(queue, data[30..]);
        out.calls = 3;
        out.fail = true;
        assert!(write_queued(&mut out, &mut queue).is_err());
        assert_eq!(out.taken, data[..60], "what went before the error");
        assert_eq!(queue, data[60..]);
        out.calls = 100;
        write_queued(&mut out, &mut queue).unwrap();
        assert_eq!((out.taken, queue.len()), (data, 0));
    }

    #[test]
    fn a_drained_burst_buffer_shrinks() {
        let mut buffer = Vec::with_capacity(8 << 20);
        buffer.extend_from_slice(&[1; 100]);
        release_burst(&mut buffer);
        assert!(buffer.capacity() >= 8 << 20, "not while it holds bytes");
        buffer.clear();
        release_burst(&mut buffer);
        assert!(buffer.capacity() <= 64 << 10);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut buf = vec![1, 0, 0, 0, 99];
        assert!(Message::decode_all(&mut buf).is_err());
        let mut buf = vec![3, 0, 0, 0, DONE, 1, 2];
        assert!(Message::decode_all(&mut buf).is_err());
        // Unknown tags of the typed fields: an error naming them, never a guess.
        let mut done = vec![DONE, 9, 0, 0, 0, 7];
        done.extend_from_slice(&5u64.to_le_bytes());
        let mut delivered = vec![DELIVERED, 9];
        delivered.extend_from_slice(&[0; 16]);
        for body in [done, delivered] {
            let mut buf = (body.len() as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&body);
            let error = Message::decode_all(&mut buf).unwrap_err();
            assert!(error.contains("unknown"), "{error}");
        }
    }

    proptest::proptest! {
        /// Any message body, framed with its true length: a message or an error.
        #[test]
        fn any_body_decodes_to_a_message_or_an_error(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)
        ) {
            let mut buf = (body.len() as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&body);
            let _ = Message::decode_all(&mut buf);
        }
    }
}
