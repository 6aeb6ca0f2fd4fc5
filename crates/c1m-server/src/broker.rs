//! Clustering: one connection per node to NATS or Redis pub/sub (`--broker URL`).
//!
//! The event loops stay single-threaded and synchronous; the broker clients (`async-nats`,
//! `redis`) are async, so the link runs them on a thread of its own with a small tokio
//! runtime and talks to its owner (the master, or a single-process server) over two
//! channels: commands in, events out, with a `mio::Waker` to wake the owner's loop.
//!
//! What travels over the broker is the encoded WebSocket frame, so the publishing node
//! encodes once and every node sends the bytes it got. The frame is wrapped with the
//! publisher's reply address and publish id ([`wrap`]): every node that delivers it
//! answers on the publisher's acks subject with how many connections it reached, so a
//! publish through the cluster is answered with a delivery count like on one node. The node subscribes to a topic's
//! subject while it has local subscribers (the owner says so with `Subscribe` and
//! `Unsubscribe`), plus the broadcast subject always: broker subscriptions grow with
//! topics, never with connections.
//!
//! Every node also publishes its numbers on a reports subject once a second and
//! listens to everyone's (see `node_stats`), for the cluster-wide `GET /stats`.
//!
//! Faults: publishes are refused (never queued) while the link is down, and a publish
//! counts as done only once the broker confirmed it (NATS: a flush; Redis: the PUBLISH
//! reply), within [`CONFIRM_TIMEOUT`]. The link reconnects by itself with backoff and
//! subscribes again to every wanted subject.
//!
//! Topic history (`--history-*`): the broker gives the positions, so they are the same
//! on every node. Redis: one Lua script per publish and a stream per topic
//! ([`REDIS_PUBLISH`]); NATS: a JetStream stream per topic (`broker/jetstream.rs`).

mod jetstream;

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::history::Position;
use crate::pusher::SocketRef;

/// A publish not confirmed by the broker within this time is reported as failed.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// The topic name that stands for "every connection" (`POST /broadcast`).
const BROADCAST: &str = "";

/// A parsed `--broker` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerUrl {
    Nats(String),
    Redis(String),
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("{url:?} is not a URL: expected nats://HOST:PORT or redis://HOST:PORT")
        })?;
        let authority = rest.split('/').next().unwrap_or("");
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("{url:?}: expected HOST:PORT after {scheme}://"));
        }
        match scheme {
            "nats" => Ok(BrokerUrl::Nats(url.to_string())),
            "redis" => Ok(BrokerUrl::Redis(url.to_string())),
            other => Err(format!(
                "unsupported broker scheme {other:?}: use nats:// or redis://"
            )),
        }
    }

    /// The broker subject (NATS) or channel (Redis) of a topic.
    fn subject(&self, topic: &str) -> String {
        match (self, topic) {
            (BrokerUrl::Nats(_), BROADCAST) => "c1m.broadcast".into(),
            (BrokerUrl::Nats(_), t) => format!("c1m.t.{t}"),
            (BrokerUrl::Redis(_), BROADCAST) => "c1m:broadcast".into(),
            (BrokerUrl::Redis(_), t) => format!("c1m:t:{t}"),
        }
    }

    /// The subject (NATS) or channel (Redis) on which node `token` hears delivery counts.
    fn acks_subject(&self, token: &str) -> String {
        match self {
            BrokerUrl::Nats(_) => format!("c1m.acks.{token}"),
            BrokerUrl::Redis(_) => format!("c1m:acks:{token}"),
        }
    }

    /// The subject (NATS) or channel (Redis) of node reports.
    fn reports_subject(&self) -> &'static str {
        match self {
            BrokerUrl::Nats(_) => "c1m.nodes",
            BrokerUrl::Redis(_) => "c1m:nodes",
        }
    }

    /// The subject (NATS) or channel (Redis) of presence membership changes (see
    /// `cluster_presence`).
    fn presence_subject(&self) -> &'static str {
        match self {
            BrokerUrl::Nats(_) => "c1m.presence",
            BrokerUrl::Redis(_) => "c1m:presence",
        }
    }

    /// What a message on `subject` is, if it is one of ours (`acks`: this node's acks
    /// subject). A malformed publication or ack is logged and dropped.
    fn incoming(&self, subject: &str, acks: &str, payload: Vec<u8>) -> Option<Event> {
        if subject == self.reports_subject() {
            return Some(Event::Report(payload));
        }
        if subject == self.presence_subject() {
            return Some(Event::Presence(payload));
        }
        if subject == acks {
            let ack = serde_json::from_slice::<AckBody>(&payload);
            return match ack {
                Ok(AckBody {
                    node,
                    id,
                    delivered,
                }) => Some(Event::Ack {
                    id,
                    node,
                    delivered,
                }),
                Err(error) => {
                    tracing::warn!(%error, "ignoring a malformed delivery count from the broker");
                    None
                }
            };
        }
        let topic = self.topic(subject)?;
        let Some(Unwrapped {
            reply,
            position,
            exclude,
            frame,
        }) = unwrap(&payload)
        else {
            tracing::warn!(topic, "ignoring a malformed publication from the broker");
            return None;
        };
        Some(Event::Message {
            topic: topic.to_string(),
            frame,
            reply,
            position,
            exclude,
        })
    }

    /// The topic of a subject, if it is one of ours.
    fn topic<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let (all, prefix) = match self {
            BrokerUrl::Nats(_) => ("c1m.broadcast", "c1m.t."),
            BrokerUrl::Redis(_) => ("c1m:broadcast", "c1m:t:"),
        };
        if subject == all {
            return Some(BROADCAST);
        }
        subject.strip_prefix(prefix)
    }
}

/// Where a node answers how many connections a publication reached: the publisher's
/// acks token and its publish id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub to: String,
    pub id: u64,
}

/// The JSON of a delivery count on an acks subject.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AckBody {
    node: String,
    id: u64,
    delivered: u64,
}

/// Version byte of the publication wrapper: 1 without a position, 2 with one.
const WIRE_VERSION: u8 = 1;
const WIRE_WITH_POSITION: u8 = 2;

/// Bit of the version byte: an 8-byte exclusion follows the publish id.
const WIRE_EXCLUDE: u8 = 0x80;

/// A publication as it travels over the broker: version, the publisher's acks token
/// (u16 length + bytes), the publish id (u64 LE), then the WebSocket frame. Version 2
/// (written by the Redis script of a topic with history, see [`REDIS_PUBLISH`]) has
/// the position between the id and the frame: a length byte, then `OFFSET EPOCH` in
/// ASCII (text, because the script builds it). With [`WIRE_EXCLUDE`] set in the
/// version byte, a Pusher socket to leave out (process token and slab key, u32 LE
/// each) follows the id.
fn wrap(reply: &Reply, exclude: Option<SocketRef>, frame: &[u8]) -> Vec<u8> {
    let mut out = wrap_head(WIRE_VERSION, reply, exclude);
    out.extend_from_slice(frame);
    out
}

/// The wrapper up to the frame (or, for version 2, up to the position).
fn wrap_head(version: u8, reply: &Reply, exclude: Option<SocketRef>) -> Vec<u8> {
    let mut out = Vec::with_capacity(reply.to.len() + 64);
    out.push(version | if exclude.is_some() { WIRE_EXCLUDE } else { 0 });
    out.extend_from_slice(&(reply.to.len() as u16).to_le_bytes());
    out.extend_from_slice(reply.to.as_bytes());
    out.extend_from_slice(&reply.id.to_le_bytes());
    if let Some((token, key)) = exclude {
        out.extend_from_slice(&token.to_le_bytes());
        out.extend_from_slice(&key.to_le_bytes());
    }
    out
}

/// A publication as [`unwrap`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unwrapped {
    reply: Reply,
    position: Option<Position>,
    exclude: Option<SocketRef>,
    frame: Vec<u8>,
}

/// The inverse of [`wrap`] (and of the script's version 2); `None` for anything else.
fn unwrap(payload: &[u8]) -> Option<Unwrapped> {
    let (&flags, rest) = payload.split_first()?;
    let version = flags & !WIRE_EXCLUDE;
    if !(version == WIRE_VERSION || version == WIRE_WITH_POSITION) || rest.len() < 2 {
        return None;
    }
    let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
    let to = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_string();
    let id = u64::from_le_bytes(rest.get(2 + len..10 + len)?.try_into().ok()?);
    let mut rest = rest.get(10 + len..)?;
    let mut exclude = None;
    if flags & WIRE_EXCLUDE != 0 {
        let token = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        let key = u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?);
        exclude = Some((token, key));
        rest = rest.get(8..)?;
    }
    let mut position = None;
    if version == WIRE_WITH_POSITION {
        let (&n, after) = rest.split_first()?;
        let text = std::str::from_utf8(after.get(..n as usize)?).ok()?;
        let (offset, epoch) = text.split_once(' ')?;
        position = Some(Position {
            offset: offset.parse().ok()?,
            epoch: epoch.to_string(),
        });
        rest = after.get(n as usize..)?;
    }
    Some(Unwrapped {
        reply: Reply { to, id },
        position,
        exclude,
        frame: rest.to_vec(),
    })
}

/// How a topic with history is kept in the broker (Redis: a stream per topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Publications kept (the stream's MAXLEN).
    pub size: usize,
    /// How long the stream lives after its latest publication (`None`: for good).
    pub ttl: Option<Duration>,
}

impl Keep {
    /// How `topic` is kept under this node's history policy (`None`: no history).
    pub fn for_topic(policy: &crate::history::Policy, topic: &str) -> Option<Keep> {
        let limits = policy.limits(topic);
        (limits.size > 0).then_some(Keep {
            size: limits.size,
            ttl: limits.ttl,
        })
    }
}

/// What the broker holds of a topic's history (see [`Command::Recover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// `None`: the broker keeps no history of the topic (never published with
    /// history, or lost: a Redis restart without persistence).
    pub epoch: Option<String>,
    /// The topic's latest offset.
    pub offset: u64,
    /// The kept publications after the asked position, oldest first, at most the
    /// asked number: (offset, WebSocket frame).
    pub publications: Vec<(u64, Vec<u8>)>,
}

/// A publish to a topic with history, atomically in Redis: the topic's epoch (made on
/// first use: when Redis lost the topic, its offsets restart in a new epoch, and the
/// stream of the lost one is dropped), the next offset, the stream entry (id
/// `OFFSET-0`, trimmed to the size, expiring `ttl` after the latest), and the
/// publication to every node in the same step, so that every node sees the topic's
/// publications in offset order.
/// KEYS: the topic's meta hash, its stream. ARGV: channel, a fresh epoch, size, ttl in
/// ms (0: none), the wrapper head (version 2), the frame.
const REDIS_PUBLISH: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'f', ARGV[6])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
local position = offset .. ' ' .. epoch
redis.call('PUBLISH', ARGV[1], ARGV[5] .. string.char(#position) .. position .. ARGV[6])
return {offset, epoch}
";

/// A topic's history after a position, in one step: epoch, latest offset, and at most
/// COUNT entries from offset FROM on. KEYS: meta hash, stream. ARGV: from, count.
const REDIS_RECOVER: &str = r"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
if not meta[1] then return {} end
local entries = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
local out = {meta[1], meta[2]}
for _, entry in ipairs(entries) do
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2][2]
end
return out
";

/// A node's acks token: its name with what a NATS subject token cannot hold replaced.
pub fn ack_token(node: &str) -> String {
    node.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | ':' | '/' => c,
            _ => '_',
        })
        .collect()
}

/// From the owner to the link.
#[derive(Debug)]
pub enum Command {
    Subscribe(String),
    Unsubscribe(String),
    /// Publish `frame` to `topic` (`""`: every connection); answered with `Published`.
    /// With `keep`, the broker keeps it in the topic's history and gives it its
    /// position (Redis only; the owner never asks NATS).
    Publish {
        id: u64,
        topic: String,
        frame: Vec<u8>,
        keep: Option<Keep>,
        /// A Pusher socket to leave out, on whichever node it is.
        exclude: Option<SocketRef>,
    },
    /// What the broker keeps of `topic` after offset `since`, at most `limit`
    /// publications; answered with `Stored`. With `sync` (a resume), the answer is held
    /// until every publication it covers reached the owner live (see `SYNC`); without
    /// (`GET /history`, a snapshot for a back-end), it goes out as soon as it is read.
    Recover {
        id: u64,
        topic: String,
        since: u64,
        limit: usize,
        sync: bool,
    },
    /// Publish this node's report (JSON, see `node_stats`); dropped while the link is
    /// down, never confirmed: the next one follows within a second.
    Report(Vec<u8>),
    /// Publish a presence membership change of this node's (JSON, see
    /// `cluster_presence`); dropped while the link is down (the node announces its
    /// whole state when the link comes back).
    Presence(Vec<u8>),
    /// Tell a publisher how many of this node's connections its publication reached
    /// (best effort, like a report).
    Ack {
        reply: Reply,
        delivered: u64,
    },
}

/// From the link to the owner.
#[derive(Debug)]
pub enum Event {
    /// A publication from any node (this one included); answer with `Command::Ack`.
    /// `position`: where the broker put it in the topic's history, if it keeps one.
    Message {
        topic: String,
        frame: Vec<u8>,
        reply: Reply,
        position: Option<Position>,
        /// A Pusher socket to leave out (see `fanout::EnvelopeFields::exclude`).
        exclude: Option<SocketRef>,
    },
    /// Node `node` delivered this node's publish `id` to `delivered` connections.
    Ack {
        id: u64,
        node: String,
        delivered: u64,
    },
    /// Whether publish `id` was confirmed by the broker, and where it went in the
    /// topic's history (with `keep`).
    Published {
        id: u64,
        ok: bool,
        position: Option<Position>,
    },
    /// The answer to `Command::Recover` `id`; `None`: the broker could not say (down).
    Stored { id: u64, stored: Option<Stored> },
    /// The broker confirmed a subscription to `topic` (Redis): every `Message` of the
    /// topic after this event comes from it, none from an earlier one, so a gap in
    /// offsets across it is no loss (the node was not listening).
    Subscribed(String),
    /// A node report (this node's own included).
    Report(Vec<u8>),
    /// A presence membership change (this node's own included).
    Presence(Vec<u8>),
    /// The link went up or down.
    Up(bool),
}

/// The owner's end of a link.
pub struct BrokerLink {
    commands: UnboundedSender<Command>,
    events: mpsc::Receiver<Event>,
}

impl BrokerLink {
    /// Starts the link's thread for node `node` (its name in acks and reports). `wake`
    /// is called after every event is queued.
    /// `history`: the node's history policy, if it keeps any (NATS follows a topic with
    /// history through JetStream instead of a core subscription).
    pub fn start(
        url: BrokerUrl,
        node: &str,
        history: Option<crate::history::Policy>,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> io::Result<BrokerLink> {
        let (commands, command_rx) = unbounded_channel();
        let (event_tx, events) = mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let token = ack_token(node);
        let out = Out {
            events: event_tx,
            wake: Arc::new(wake),
            node: Arc::from(node),
            acks: Arc::from(url.acks_subject(&token)),
            token: Arc::from(token),
        };
        std::thread::Builder::new()
            .name("c1m-broker".into())
            .spawn(move || runtime.block_on(run(url, history, command_rx, out)))?;
        Ok(BrokerLink { commands, events })
    }

    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// The next event, if any (non-blocking).
    pub fn next_event(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

#[derive(Clone)]
struct Out {
    events: mpsc::Sender<Event>,
    wake: Arc<dyn Fn() + Send + Sync>,
    /// This node's name, its acks token, and the subject where it hears delivery counts.
    node: Arc<str>,
    token: Arc<str>,
    acks: Arc<str>,
}

impl Out {
    fn emit(&self, event: Event) {
        if self.events.send(event).is_ok() {
            (self.wake)();
        }
    }

    /// The reply address of this node's publish `id`.
    fn reply(&self, id: u64) -> Reply {
        Reply {
            to: self.token.to_string(),
            id,
        }
    }

    /// The JSON of a delivery count from this node.
    fn ack_body(&self, reply: &Reply, delivered: u64) -> Vec<u8> {
        serde_json::to_vec(&AckBody {
            node: self.node.to_string(),
            id: reply.id,
            delivered,
        })
        .unwrap_or_default()
    }
}

async fn run(
    url: BrokerUrl,
    history: Option<crate::history::Policy>,
    commands: UnboundedReceiver<Command>,
    out: Out,
) {
    match url {
        BrokerUrl::Nats(_) => run_nats(url, history, commands, out).await,
        BrokerUrl::Redis(_) => run_redis(url, commands, out).await,
    }
}

/// NATS: async-nats reconnects and resubscribes by itself; its events tell us the state.
/// Topics with history go through JetStream (`broker/jetstream.rs`).
async fn run_nats(
    url: BrokerUrl,
    history: Option<crate::history::Policy>,
    mut commands: UnboundedReceiver<Command>,
    out: Out,
) {
    let BrokerUrl::Nats(address) = &url else {
        return;
    };
    let up = Arc::new(AtomicBool::new(false));
    let followed = jetstream::Followed::default();
    let (events_out, events_up, events_followed) = (out.clone(), Arc::clone(&up), followed.clone());
    let options = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let (out, up, followed) = (
                events_out.clone(),
                Arc::clone(&events_up),
                events_followed.clone(),
            );
            async move {
                let now_up = match event {
                    async_nats::Event::Connected => true,
                    async_nats::Event::Disconnected | async_nats::Event::Closed => false,
                    _ => return,
                };
                if up.swap(now_up, Ordering::SeqCst) != now_up {
                    tracing::warn!(up = now_up, "NATS link");
                    out.emit(Event::Up(now_up));
                    if now_up {
                        followed.say_subscribed(&out);
                    }
                }
            }
        });
    let client = match options.connect(address.as_str()).await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot set up the NATS client");
            return;
        }
    };
    let mut subscriptions: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let subscribe = |subject: String| {
        let (client, url, out) = (client.clone(), url.clone(), out.clone());
        tokio::spawn(async move {
            let mut subscriber = match client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(%error, subject, "NATS subscribe failed");
                    return;
                }
            };
            while let Some(message) = subscriber.next().await {
                let payload = message.payload.to_vec();
                if let Some(event) = url.incoming(message.subject.as_str(), &out.acks, payload) {
                    out.emit(event);
                }
            }
        })
    };
    let mut jetstream = history
        .map(|policy| jetstream::JetStream::new(client.clone(), policy, out.clone(), followed));
    subscriptions.insert(BROADCAST.into(), subscribe(url.subject(BROADCAST)));
    // Not in `subscriptions` (keyed by topic): reports and acks are listened to for good.
    let _reports = subscribe(url.reports_subject().to_string());
    let _presence = subscribe(url.presence_subject().to_string());
    let _acks = subscribe(out.acks.to_string());
    while let Some(command) = commands.recv().await {
        match command {
            Command::Subscribe(topic) => {
                if let Some((js, keep)) = jetstream
                    .as_mut()
                    .and_then(|js| js.keep(&topic).map(|keep| (js, keep)))
                {
                    js.follow(topic, keep);
                } else if let std::collections::hash_map::Entry::Vacant(entry) =
                    subscriptions.entry(topic.clone())
                {
                    entry.insert(subscribe(url.subject(&topic)));
                }
            }
            Command::Unsubscribe(topic) => {
                if jetstream.as_mut().is_some_and(|js| js.unfollow(&topic)) {
                    continue;
                }
                // Dropping the subscriber (with its task) unsubscribes.
                if let Some(task) = subscriptions.remove(&topic) {
                    task.abort();
                }
            }
            Command::Recover {
                id,
                topic,
                since,
                limit,
                sync,
            } => match &jetstream {
                Some(js) => js.recover(id, topic, since, limit, sync),
                None => out.emit(Event::Stored { id, stored: None }),
            },
            Command::Publish {
                id,
                topic,
                frame,
                keep: Some(keep),
                exclude,
            } if jetstream.is_some() => {
                let position = match jetstream.as_mut() {
                    Some(js) if up.load(Ordering::SeqCst) => {
                        let payload = wrap(&out.reply(id), exclude, &frame);
                        tokio::time::timeout(CONFIRM_TIMEOUT, js.publish(&topic, payload, keep))
                            .await
                            .map_err(|_| "timed out".into())
                            .and_then(|published| published)
                            .inspect_err(
                                |error| tracing::warn!(%error, topic, "JetStream publish failed"),
                            )
                            .ok()
                    }
                    _ => None,
                };
                out.emit(Event::Published {
                    id,
                    ok: position.is_some(),
                    position,
                });
            }
            Command::Publish {
                id,
                topic,
                frame,
                exclude,
                ..
            } => {
                let ok = up.load(Ordering::SeqCst)
                    && tokio::time::timeout(CONFIRM_TIMEOUT, async {
                        let payload = wrap(&out.reply(id), exclude, &frame);
                        client
                            .publish(url.subject(&topic), payload.into())
                            .await
                            .is_ok()
                            && client.flush().await.is_ok()
                    })
                    .await
                    .unwrap_or(false);
                out.emit(Event::Published {
                    id,
                    ok,
                    position: None,
                });
            }
            Command::Report(report) => {
                if up.load(Ordering::SeqCst) {
                    let _ = client.publish(url.reports_subject(), report.into()).await;
                }
            }
            Command::Presence(change) => {
                if up.load(Ordering::SeqCst) {
                    let _ = client.publish(url.presence_subject(), change.into()).await;
                }
            }
            Command::Ack { reply, delivered } => {
                if up.load(Ordering::SeqCst) {
                    let body = out.ack_body(&reply, delivered);
                    let _ = client
                        .publish(url.acks_subject(&reply.to), body.into())
                        .await;
                }
            }
        }
    }
}

/// Redis: one connection for PUBLISH, one for SUBSCRIBE; on any error both are dropped
/// and made again after a backoff, and every wanted channel is subscribed again.
async fn run_redis(url: BrokerUrl, mut commands: UnboundedReceiver<Command>, out: Out) {
    let BrokerUrl::Redis(address) = &url else {
        return;
    };
    let mut wanted: HashSet<String> = HashSet::from([BROADCAST.to_string()]);
    let mut attempt = 0u32;
    loop {
        match redis_session(address, &url, &mut wanted, &mut commands, &out).await {
            Ok(()) => return, // the owner is gone
            Err(error) => tracing::warn!(%error, "Redis link down"),
        }
        out.emit(Event::Up(false));
        // Back off (0.1 s doubling to 5 s), answering commands meanwhile: publishes fail
        // at once, subscriptions are remembered for the next session.
        let delay = Duration::from_millis(100 * (1 << attempt.min(6))).min(Duration::from_secs(5));
        attempt += 1;
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => remember(command, &mut wanted, &out),
                },
            }
        }
    }
}

fn remember(command: Command, wanted: &mut HashSet<String>, out: &Out) {
    match command {
        Command::Subscribe(topic) => {
            wanted.insert(topic);
        }
        Command::Unsubscribe(topic) => {
            wanted.remove(&topic);
        }
        Command::Publish { id, .. } => out.emit(Event::Published {
            id,
            ok: false,
            position: None,
        }),
        Command::Recover { id, .. } => out.emit(Event::Stored { id, stored: None }),
        Command::Report(_) | Command::Presence(_) | Command::Ack { .. } => {}
    }
}

async fn redis_session(
    address: &str,
    url: &BrokerUrl,
    wanted: &mut HashSet<String>,
    commands: &mut UnboundedReceiver<Command>,
    out: &Out,
) -> redis::RedisResult<()> {
    let client = redis::Client::open(address)?;
    let timeout = |e| redis::RedisError::from(io::Error::new(io::ErrorKind::TimedOut, e));
    let mut publisher =
        tokio::time::timeout(CONFIRM_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| timeout("connect"))??;
    let pubsub = tokio::time::timeout(CONFIRM_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| timeout("connect"))??;
    let (mut sink, mut stream) = pubsub.split();
    // History answers held until the pubsub stream caught up with them (see below).
    let mut synced: HashMap<u64, Stored> = HashMap::new();
    sink.subscribe(url.reports_subject()).await?;
    sink.subscribe(url.presence_subject()).await?;
    sink.subscribe(out.acks.to_string()).await?;
    for topic in wanted.iter() {
        sink.subscribe(url.subject(topic)).await?;
        out.emit(Event::Subscribed(topic.clone()));
    }
    tracing::info!("Redis link up");
    out.emit(Event::Up(true));
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return Err(io::Error::from(io::ErrorKind::ConnectionReset).into());
                };
                let payload = message.get_payload_bytes().to_vec();
                let channel = message.get_channel_name();
                if channel == &*out.acks {
                    if let Some(id) = payload.strip_prefix(SYNC).and_then(|id| std::str::from_utf8(id).ok()?.parse().ok()) {
                        if let Some(stored) = synced.remove(&id) {
                            out.emit(Event::Stored { id, stored: Some(stored) });
                        }
                        continue;
                    }
                }
                if let Some(event) = url.incoming(channel, &out.acks, payload) {
                    out.emit(event);
                }
            }
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(Command::Subscribe(topic)) => {
                    if wanted.insert(topic.clone()) {
                        sink.subscribe(url.subject(&topic)).await?;
                        out.emit(Event::Subscribed(topic));
                    }
                }
                Some(Command::Unsubscribe(topic)) => {
                    if wanted.remove(&topic) {
                        sink.unsubscribe(url.subject(&topic)).await?;
                    }
                }
                Some(Command::Report(report)) => {
                    let mut command = redis::cmd("PUBLISH");
                    command.arg(url.reports_subject()).arg(report);
                    best_effort(command, &mut publisher).await?;
                }
                Some(Command::Presence(change)) => {
                    let mut command = redis::cmd("PUBLISH");
                    command.arg(url.presence_subject()).arg(change);
                    best_effort(command, &mut publisher).await?;
                }
                Some(Command::Ack { reply, delivered }) => {
                    let mut command = redis::cmd("PUBLISH");
                    command.arg(url.acks_subject(&reply.to)).arg(out.ack_body(&reply, delivered));
                    best_effort(command, &mut publisher).await?;
                }
                Some(Command::Publish { id, topic, frame, keep, exclude }) => {
                    let head = (out.reply(id), exclude);
                    let publish = redis_publish(&mut publisher, url, &head, &topic, &frame, keep);
                    let failed = |id| Event::Published { id, ok: false, position: None };
                    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
                        Ok(Ok(position)) => out.emit(Event::Published { id, ok: true, position }),
                        Ok(Err(error)) => {
                            out.emit(failed(id));
                            return Err(error);
                        }
                        Err(_) => {
                            out.emit(failed(id));
                            return Err(timeout("publish"));
                        }
                    }
                }
                Some(Command::Recover { id, topic, since, limit, sync }) => {
                    let read = redis_recover(&mut publisher, &topic, since, limit);
                    match tokio::time::timeout(CONFIRM_TIMEOUT, read).await {
                        Ok(Ok(stored)) if !sync => out.emit(Event::Stored { id, stored: Some(stored) }),
                        Ok(Ok(stored)) => {
                            // Publications up to the answer's last offset may still be on
                            // their way on the pubsub connection (published after this
                            // node subscribed, before the read). A marker published now
                            // arrives after all of them: the answer goes out then, so the
                            // owner has every one of them before it (see
                            // `server/cluster_resume.rs`).
                            synced.insert(id, stored);
                            let mut marker = redis::cmd("PUBLISH");
                            marker.arg(&*out.acks).arg([SYNC, id.to_string().as_bytes()].concat());
                            best_effort(marker, &mut publisher).await?;
                        }
                        Ok(Err(error)) => {
                            out.emit(Event::Stored { id, stored: None });
                            return Err(error);
                        }
                        Err(_) => {
                            out.emit(Event::Stored { id, stored: None });
                            return Err(timeout("recover"));
                        }
                    }
                }
            },
        }
    }
}

/// The Redis keys of a topic's history: its meta hash (epoch, latest offset) and its
/// stream. The `{…}` hash tag keeps both on one Redis Cluster slot.
fn redis_history_keys(topic: &str) -> (String, String) {
    (
        format!("c1m:h:{{{topic}}}:meta"),
        format!("c1m:h:{{{topic}}}:stream"),
    )
}

/// A publish: a plain PUBLISH, or with `keep` the history script; the position given.
/// `head`: the publisher's reply address, and a Pusher socket to leave out.
async fn redis_publish(
    publisher: &mut redis::aio::MultiplexedConnection,
    url: &BrokerUrl,
    (reply, exclude): &(Reply, Option<SocketRef>),
    topic: &str,
    frame: &[u8],
    keep: Option<Keep>,
) -> redis::RedisResult<Option<Position>> {
    let Some(keep) = keep else {
        let mut command = redis::cmd("PUBLISH");
        command
            .arg(url.subject(topic))
            .arg(wrap(reply, *exclude, frame));
        command.query_async::<i64>(publisher).await?;
        return Ok(None);
    };
    let (meta, stream) = redis_history_keys(topic);
    let fresh_epoch = format!("{:08x}", rand_u32());
    let ttl_ms = keep.ttl.map_or(0, |t| t.as_millis().max(1) as u64);
    let (offset, epoch): (u64, String) = redis::Script::new(REDIS_PUBLISH)
        .key(meta)
        .key(stream)
        .arg(url.subject(topic))
        .arg(fresh_epoch)
        .arg(keep.size.max(1))
        .arg(ttl_ms)
        .arg(wrap_head(WIRE_WITH_POSITION, reply, *exclude))
        .arg(frame)
        .invoke_async(publisher)
        .await?;
    Ok(Some(Position { offset, epoch }))
}

/// A topic's history after `since`, at most `limit` publications.
async fn redis_recover(
    publisher: &mut redis::aio::MultiplexedConnection,
    topic: &str,
    since: u64,
    limit: usize,
) -> redis::RedisResult<Stored> {
    let (meta, stream) = redis_history_keys(topic);
    let values: Vec<redis::Value> = redis::Script::new(REDIS_RECOVER)
        .key(meta)
        .key(stream)
        .arg(since + 1)
        .arg(limit.max(1))
        .invoke_async(publisher)
        .await?;
    let text = |v: &redis::Value| -> Option<String> { redis::from_redis_value(v).ok() };
    let mut fields = values.iter();
    let Some(epoch) = fields.next().and_then(text) else {
        return Ok(Stored {
            epoch: None,
            offset: 0,
            publications: Vec::new(),
        });
    };
    let offset = fields
        .next()
        .and_then(text)
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let mut publications = Vec::new();
    while let (Some(id), Some(frame)) = (fields.next(), fields.next()) {
        // Entry ids are `OFFSET-0` (see `REDIS_PUBLISH`).
        let entry_offset = text(id).and_then(|id| id.split('-').next()?.parse().ok());
        let frame: Option<Vec<u8>> = redis::from_redis_value(frame).ok();
        if let (Some(entry_offset), Some(frame)) = (entry_offset, frame) {
            publications.push((entry_offset, frame));
        }
    }
    Ok(Stored {
        epoch: Some(epoch),
        offset,
        publications,
    })
}

/// The prefix of a sync marker on a node's own acks channel (see `Command::Recover`).
const SYNC: &[u8] = b"sync:";

/// A random epoch's bits (a new epoch must not repeat an old one).
fn rand_u32() -> u32 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    std::collections::hash_map::RandomState::new().hash_one(nanos) as u32
}

/// Sends a PUBLISH whose answer nobody waits for (reports, acks); an error or no
/// answer within `CONFIRM_TIMEOUT` ends the session like any other.
async fn best_effort(
    command: redis::Cmd,
    publisher: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<()> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, command.query_async::<i64>(publisher)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "publish").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publications_are_wrapped_with_their_reply_address() {
        let reply = Reply {
            to: ack_token("host.example:8088/42"),
            id: 7,
        };
        assert_eq!(reply.to, "host_example:8088/42");
        let wrapped = wrap(&reply, None, b"\x81\x02hi");
        let plain = Unwrapped {
            reply: reply.clone(),
            position: None,
            exclude: None,
            frame: b"\x81\x02hi".to_vec(),
        };
        assert_eq!(unwrap(&wrapped), Some(plain.clone()));
        let excluding = wrap(&reply, Some((7, 9)), b"\x81\x02hi");
        assert_eq!(
            unwrap(&excluding),
            Some(Unwrapped {
                exclude: Some((7, 9)),
                ..plain
            })
        );
        // Version 2, as the Redis script writes it: the position before the frame.
        let mut with_position = wrap_head(WIRE_WITH_POSITION, &reply, Some((1, 2)));
        with_position.push(11);
        with_position.extend_from_slice(b"42 9f2c01ab\x81\x02hi");
        let position = Position {
            offset: 42,
            epoch: "9f2c01ab".into(),
        };
        assert_eq!(
            unwrap(&with_position),
            Some(Unwrapped {
                reply,
                position: Some(position),
                exclude: Some((1, 2)),
                frame: b"\x81\x02hi".to_vec(),
            })
        );
        for bad in [
            &b""[..],
            b"\x02\x00\x00",
            b"\x01\x05\x00ab",
            b"\x01\x01\x00a\x01",
        ] {
            assert_eq!(unwrap(bad), None, "{bad:?}");
        }
        let nats = BrokerUrl::parse("nats://127.0.0.1:4222").unwrap();
        let acks = nats.acks_subject("n");
        let ack = br#"{"node":"n2","id":3,"delivered":10}"#.to_vec();
        assert!(matches!(
            nats.incoming(&acks, &acks, ack),
            Some(Event::Ack {
                id: 3,
                delivered: 10,
                ..
            })
        ));
        assert!(nats.incoming(&acks, &acks, b"{".to_vec()).is_none());
        assert!(nats
            .incoming("c1m.t.a", &acks, b"raw frame".to_vec())
            .is_none());
    }

    proptest::proptest! {
        // What comes from the broker is network input: any bytes on a topic or acks
        // subject give an event or nothing, never a panic, and a wrapped publication
        // comes back whole.
        #[test]
        fn broker_input_never_panics(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let nats = BrokerUrl::parse("nats://127.0.0.1:4222").unwrap();
            let acks = nats.acks_subject("me");
            let _ = nats.incoming("c1m.t.a", &acks, payload.clone());
            let _ = nats.incoming(&acks, &acks, payload.clone());
            let _ = unwrap(&payload);
        }

        #[test]
        fn wrap_round_trips(to in "[a-z:/_0-9]{0,40}", id in proptest::num::u64::ANY,
                            exclude in proptest::option::of((proptest::num::u32::ANY, proptest::num::u32::ANY)),
                            frame in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let reply = Reply { to, id };
            let expected = Unwrapped { reply: reply.clone(), position: None, exclude, frame: frame.clone() };
            proptest::prop_assert_eq!(unwrap(&wrap(&reply, exclude, &frame)), Some(expected));
        }
    }

    #[test]
    fn urls_and_subjects() {
        let nats = BrokerUrl::parse("nats://127.0.0.1:4222").unwrap();
        assert_eq!(nats.subject("prices"), "c1m.t.prices");
        assert_eq!(nats.topic("c1m.t.prices"), Some("prices"));
        assert_eq!(nats.topic(&nats.subject(BROADCAST)), Some(BROADCAST));
        let redis = BrokerUrl::parse("redis://localhost:6379").unwrap();
        assert_eq!(redis.topic(&redis.subject("a:b")), Some("a:b"));
        assert_eq!(redis.topic("other"), None);
        for bad in [
            "",
            "127.0.0.1:4222",
            "kafka://h:1",
            "nats://",
            "nats://host",
            "redis://h:port",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
