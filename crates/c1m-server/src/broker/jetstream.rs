//! Topic history in a cluster over NATS: JetStream (`nats-server -js`), the broker's own
//! ordered, durable primitive, plays the part the Lua script and Redis streams play
//! for Redis.
//!
//! - A topic with history is a stream of its own ([`stream_name`], subject
//!   `c1m.h.TOPIC`, file storage, `max_msgs` the topic's size, `max_age` its TTL). The
//!   stream sequence is the offset (contiguous: one stream per topic), and the stream's
//!   creation time is the epoch: a stream deleted and made again restarts its sequence
//!   in a new epoch.
//! - A publish is a JetStream publish; the stream's acknowledgement gives its offset.
//! - A node follows each such topic it listens to with an ordered push consumer from the
//!   stream's next sequence, instead of a core subscription: every node gets a topic's
//!   publications in offset order, with their offsets (async-nats remakes the consumer
//!   from the last delivered sequence after a gap or a reconnect). After the link was
//!   down, the node says `Subscribed` again for each topic it follows ([`Followed`]):
//!   its copies were dropped while it could not hear.
//! - A resume's read (`Command::Recover` with `sync`) waits until the node follows the
//!   topic, reads the stream, and is answered only once the node's consumer delivered
//!   every publication up to the read's last offset, so they all reached the owner
//!   before the answer (what the marker does for Redis, see `broker.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::{unwrap, Event, Keep, Out, Stored, Unwrapped, CONFIRM_TIMEOUT};
use crate::history::{Policy, Position};

/// How long a failed follow waits before it tries again.
const RETRY_FOLLOW: Duration = Duration::from_secs(1);

/// The subject a topic with history is published on (never subscribed to directly: a
/// node follows the topic's stream).
fn subject(topic: &str) -> String {
    format!("c1m.h.{topic}")
}

/// The stream of a topic: JetStream names allow no `.` (topic names do), and are
/// kept short; `_` escapes the characters outside `A-Z a-z 0-9 -` by their hex code,
/// and a name past 200 characters is cut and ends with a hash of the topic.
pub(super) fn stream_name(topic: &str) -> String {
    let mut name = String::from("C1M_H_");
    for b in topic.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' => name.push(b as char),
            _ => name.push_str(&format!("_{b:02X}")),
        }
    }
    if name.len() > 200 {
        // FNV-1a: stable across processes (nodes must agree on the name).
        let hash = topic.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        name.truncate(183);
        name.push_str(&format!("_{hash:016x}"));
    }
    name
}

/// A stream's epoch: its creation time, which every node reads alike.
fn epoch_of(info: &stream::Info) -> String {
    format!("{:x}", info.created.unix_timestamp_nanos() as u64)
}

/// The topics whose consumer is set up, shared with the link's connection callback:
/// when the link comes back up it says `Subscribed` for each of them again.
#[derive(Clone, Default)]
pub(super) struct Followed(Arc<Mutex<HashSet<String>>>);

impl Followed {
    fn set(&self, topic: &str, on: bool) {
        let mut topics = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            topics.insert(topic.to_string());
        } else {
            topics.remove(topic);
        }
    }

    /// Tells the owner again that each followed topic is subscribed (the link is
    /// back up: every publication from here on reaches this node).
    pub fn say_subscribed(&self, out: &Out) {
        let topics: Vec<String> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        for topic in topics {
            out.emit(Event::Subscribed(topic));
        }
    }
}

/// Where a followed topic stands: `None` until its consumer is set up; then its epoch
/// and the last offset delivered to the owner.
type FollowState = Option<(String, u64)>;

/// The JetStream side of a NATS link (see the module doc).
pub(super) struct JetStream {
    context: jetstream::Context,
    client: async_nats::Client,
    policy: Policy,
    out: Out,
    /// Topics this node follows: the follow task and its progress.
    follows: HashMap<String, (tokio::task::JoinHandle<()>, watch::Receiver<FollowState>)>,
    /// The streams this node published to: their epoch and the last sequence it got.
    epochs: HashMap<String, (String, u64)>,
    followed: Followed,
}

impl JetStream {
    pub fn new(
        client: async_nats::Client,
        policy: Policy,
        out: Out,
        followed: Followed,
    ) -> JetStream {
        JetStream {
            context: jetstream::new(client.clone()),
            client,
            policy,
            out,
            follows: HashMap::new(),
            epochs: HashMap::new(),
            followed,
        }
    }

    /// How `topic` is kept (`None`: no history, a core subject as usual).
    pub fn keep(&self, topic: &str) -> Option<Keep> {
        Keep::for_topic(&self.policy, topic)
    }

    /// Starts following `topic` (it has history): `Event::Subscribed` once its consumer
    /// is set up, then its publications with their positions.
    pub fn follow(&mut self, topic: String, keep: Keep) {
        if self.follows.contains_key(&topic) {
            return;
        }
        let (state, progress) = watch::channel(None);
        let (context, client, out) = (self.context.clone(), self.client.clone(), self.out.clone());
        let followed = self.followed.clone();
        let name = topic.clone();
        let task = tokio::spawn(async move {
            loop {
                let follow = follow_once(&context, &client, &out, &followed, &name, keep, &state);
                if let Err(error) = follow.await {
                    tracing::warn!(%error, topic = name, "following the topic's JetStream stream");
                }
                followed.set(&name, false);
                state.send_replace(None);
                tokio::time::sleep(RETRY_FOLLOW).await;
            }
        });
        self.follows.insert(topic, (task, progress));
    }

    /// Stops following `topic`; whether it was followed.
    pub fn unfollow(&mut self, topic: &str) -> bool {
        match self.follows.remove(topic) {
            Some((task, _)) => {
                task.abort();
                self.followed.set(topic, false);
                true
            }
            None => false,
        }
    }

    /// Publishes `payload` (a wrapped frame) to `topic`'s stream; its position.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        keep: Keep,
    ) -> Result<Position, async_nats::Error> {
        if !self.epochs.contains_key(topic) {
            self.learn_epoch(topic, keep).await?;
        }
        let sequence = match self.send(topic, payload.clone()).await {
            Ok(sequence) => sequence,
            Err(error) => {
                // The stream may be gone (deleted): make it again, in a new epoch.
                tracing::warn!(%error, topic, "JetStream publish failed; checking the stream");
                self.learn_epoch(topic, keep).await?;
                self.send(topic, payload).await?
            }
        };
        if self
            .epochs
            .get(topic)
            .is_some_and(|(_, last)| sequence <= *last)
        {
            // The sequence went back: the stream was made again (by another node) since
            // this node learned its epoch.
            self.learn_epoch(topic, keep).await?;
        }
        let (epoch, last) = self
            .epochs
            .get_mut(topic)
            .ok_or("the stream's epoch is unknown")?;
        *last = sequence;
        Ok(Position {
            offset: sequence,
            epoch: epoch.clone(),
        })
    }

    /// One JetStream publish; the sequence the stream gave it.
    async fn send(&self, topic: &str, payload: Vec<u8>) -> Result<u64, async_nats::Error> {
        let ack = self.context.publish(subject(topic), payload.into()).await?;
        Ok(ack.await?.sequence)
    }

    /// Makes sure `topic`'s stream exists, and remembers its epoch and last sequence.
    async fn learn_epoch(&mut self, topic: &str, keep: Keep) -> Result<(), async_nats::Error> {
        let (_, epoch, last) = open_stream(&self.context, topic, keep).await?;
        self.epochs.insert(topic.to_string(), (epoch, last));
        Ok(())
    }

    /// Answers `Command::Recover` `id` (see the module doc), in a task of its own so
    /// that the link goes on meanwhile.
    pub fn recover(&self, id: u64, topic: String, since: u64, limit: usize, sync: bool) {
        let (context, out) = (self.context.clone(), self.out.clone());
        // A resume's read needs the topic followed (`ClusterNode::recover` subscribes
        // first); a snapshot does not.
        let progress = match (sync, self.follows.get(&topic)) {
            (false, _) => Ok(None),
            (true, Some((_, progress))) => Ok(Some(progress.clone())),
            (true, None) => Err(()),
        };
        tokio::spawn(async move {
            let Ok(progress) = progress else {
                tracing::warn!(
                    topic,
                    "a resume's read of a topic this node does not follow"
                );
                return out.emit(Event::Stored { id, stored: None });
            };
            let answer = tokio::time::timeout(
                CONFIRM_TIMEOUT,
                recover(&context, &topic, since, limit, progress),
            )
            .await;
            let stored = match answer {
                Ok(Ok(stored)) => Some(stored),
                Ok(Err(error)) => {
                    tracing::warn!(%error, topic, "reading the topic's JetStream stream");
                    None
                }
                Err(_) => {
                    tracing::warn!(topic, "no answer from JetStream in time");
                    None
                }
            };
            out.emit(Event::Stored { id, stored });
        });
    }
}

/// A topic's stream configuration.
fn config(topic: &str, keep: Keep) -> stream::Config {
    stream::Config {
        name: stream_name(topic),
        subjects: vec![subject(topic)],
        max_messages: keep.size.max(1) as i64,
        max_age: keep.ttl.unwrap_or_default(),
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        num_replicas: 1,
        ..Default::default()
    }
}

/// `topic`'s stream, made if it does not exist yet, with its epoch and last sequence.
async fn open_stream(
    context: &jetstream::Context,
    topic: &str,
    keep: Keep,
) -> Result<(stream::Stream, String, u64), async_nats::Error> {
    let mut stream = context.get_or_create_stream(config(topic, keep)).await?;
    let info = stream.info().await?;
    let (epoch, last) = (epoch_of(info), info.state.last_sequence);
    Ok((stream, epoch, last))
}

/// Follows `topic` until its consumer fails: sets up an ordered consumer from the
/// stream's next sequence, says `Subscribed`, and hands over each publication with its
/// position; `state` says how far it got.
async fn follow_once(
    context: &jetstream::Context,
    client: &async_nats::Client,
    out: &Out,
    followed: &Followed,
    topic: &str,
    keep: Keep,
    state: &watch::Sender<FollowState>,
) -> Result<(), async_nats::Error> {
    let (stream, epoch, last) =
        tokio::time::timeout(CONFIRM_TIMEOUT, open_stream(context, topic, keep)).await??;
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    state.send_replace(Some((epoch.clone(), last)));
    out.emit(Event::Subscribed(topic.to_string()));
    followed.set(topic, true);
    while let Some(message) = messages.next().await {
        let message = message?;
        let offset = message.info()?.stream_sequence;
        match unwrap(&message.payload) {
            Some(Unwrapped {
                reply,
                exclude,
                frame,
                ..
            }) => out.emit(Event::Message {
                topic: topic.to_string(),
                frame,
                reply,
                position: Some(Position {
                    offset,
                    epoch: epoch.clone(),
                }),
                exclude,
            }),
            None => tracing::warn!(topic, "ignoring a malformed publication in JetStream"),
        }
        // After the event: a resume waiting for this offset is answered behind it.
        state.send_replace(Some((epoch.clone(), offset)));
    }
    Err("the consumer ended".into())
}

/// What `topic`'s stream holds after `since` (at most `limit`). With `progress` (a
/// resume's read), first waits until the node follows the topic, and at the end until
/// its consumer delivered up to the read's last offset.
async fn recover(
    context: &jetstream::Context,
    topic: &str,
    since: u64,
    limit: usize,
    progress: Option<watch::Receiver<FollowState>>,
) -> Result<Stored, async_nats::Error> {
    let mut progress = progress;
    if let Some(progress) = progress.as_mut() {
        progress.wait_for(Option::is_some).await?;
    }
    let mut stream = match context.get_stream(stream_name(topic)).await {
        Ok(stream) => stream,
        Err(error) if is_stream_not_found(&error) => {
            return Ok(Stored {
                epoch: None,
                offset: 0,
                publications: Vec::new(),
            })
        }
        Err(error) => return Err(error.into()),
    };
    let info = stream.info().await?;
    let (epoch, last, first) = (
        epoch_of(info),
        info.state.last_sequence,
        info.state.first_sequence,
    );
    let mut publications = Vec::new();
    let end = last.min(since.saturating_add(limit.max(1) as u64));
    for offset in (since + 1).max(first)..=end {
        match stream.get_raw_message(offset).await {
            Ok(message) => {
                if let Some(publication) = unwrap(&message.payload) {
                    publications.push((offset, publication.frame));
                }
            }
            // Aged out since the stream's info: the ones after it are still there.
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
            Err(error) => return Err(error.into()),
        }
    }
    if let Some(progress) = progress.as_mut() {
        // The consumer started after `last`, or delivered up to it; a new epoch (the
        // stream made again) is the judge's to see.
        progress
            .wait_for(|state| match state {
                Some((followed, delivered)) => *followed != epoch || *delivered >= last,
                None => false,
            })
            .await?;
    }
    Ok(Stored {
        epoch: Some(epoch),
        offset: last,
        publications,
    })
}

fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_valid_and_distinct() {
        assert_eq!(stream_name("prices.eur-usd"), "C1M_H_prices_2Eeur-usd");
        assert_eq!(stream_name("a:b_c"), "C1M_H_a_3Ab_5Fc");
        assert_ne!(stream_name("a.b"), stream_name("a_b"));
        let long = "x.".repeat(64);
        let name = stream_name(&long);
        assert!(name.len() <= 200, "{}", name.len());
        assert_ne!(name, stream_name(&"x.".repeat(63)));
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    }
}
