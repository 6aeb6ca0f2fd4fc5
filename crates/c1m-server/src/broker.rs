//! Clustering: one connection per node to NATS or Redis pub/sub (`--broker URL`).
//!
//! The event loops stay single-threaded and synchronous; the broker clients (`async-nats`,
//! `redis`) are async, so the link runs them on a thread of its own with a small tokio
//! runtime and talks to its owner (the master, or a single-process server) over two
//! channels: commands in, events out, with a `mio::Waker` to wake the owner's loop.
//!
//! What travels over the broker is the encoded WebSocket frame, so the publishing node
//! encodes once and every node sends the bytes it got. The node subscribes to a topic's
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

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

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

    /// The subject (NATS) or channel (Redis) of node reports.
    fn reports_subject(&self) -> &'static str {
        match self {
            BrokerUrl::Nats(_) => "c1m.nodes",
            BrokerUrl::Redis(_) => "c1m:nodes",
        }
    }

    /// What a message on `subject` is, if it is one of ours.
    fn incoming(&self, subject: &str, payload: Vec<u8>) -> Option<Event> {
        if subject == self.reports_subject() {
            return Some(Event::Report(payload));
        }
        self.topic(subject).map(|topic| Event::Message {
            topic: topic.to_string(),
            frame: payload,
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

/// From the owner to the link.
#[derive(Debug)]
pub enum Command {
    Subscribe(String),
    Unsubscribe(String),
    /// Publish `frame` to `topic` (`""`: every connection); answered with `Published`.
    Publish {
        id: u64,
        topic: String,
        frame: Vec<u8>,
    },
    /// Publish this node's report (JSON, see `node_stats`); dropped while the link is
    /// down, never confirmed: the next one follows within a second.
    Report(Vec<u8>),
}

/// From the link to the owner.
#[derive(Debug)]
pub enum Event {
    /// A publication from any node (this one included).
    Message { topic: String, frame: Vec<u8> },
    /// Whether publish `id` was confirmed by the broker.
    Published { id: u64, ok: bool },
    /// A node report (this node's own included).
    Report(Vec<u8>),
    /// The link went up or down.
    Up(bool),
}

/// The owner's end of a link.
pub struct BrokerLink {
    commands: UnboundedSender<Command>,
    events: mpsc::Receiver<Event>,
}

impl BrokerLink {
    /// Starts the link's thread. `wake` is called after every event is queued.
    pub fn start(
        url: BrokerUrl,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> io::Result<BrokerLink> {
        let (commands, command_rx) = unbounded_channel();
        let (event_tx, events) = mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let out = Out {
            events: event_tx,
            wake: Arc::new(wake),
        };
        std::thread::Builder::new()
            .name("c1m-broker".into())
            .spawn(move || runtime.block_on(run(url, command_rx, out)))?;
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
}

impl Out {
    fn emit(&self, event: Event) {
        if self.events.send(event).is_ok() {
            (self.wake)();
        }
    }
}

async fn run(url: BrokerUrl, commands: UnboundedReceiver<Command>, out: Out) {
    match url {
        BrokerUrl::Nats(_) => run_nats(url, commands, out).await,
        BrokerUrl::Redis(_) => run_redis(url, commands, out).await,
    }
}

/// NATS: async-nats reconnects and resubscribes by itself; its events tell us the state.
async fn run_nats(url: BrokerUrl, mut commands: UnboundedReceiver<Command>, out: Out) {
    let BrokerUrl::Nats(address) = &url else {
        return;
    };
    let up = Arc::new(AtomicBool::new(false));
    let (events_out, events_up) = (out.clone(), Arc::clone(&up));
    let options = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let (out, up) = (events_out.clone(), Arc::clone(&events_up));
            async move {
                let now_up = match event {
                    async_nats::Event::Connected => true,
                    async_nats::Event::Disconnected | async_nats::Event::Closed => false,
                    _ => return,
                };
                if up.swap(now_up, Ordering::SeqCst) != now_up {
                    tracing::warn!(up = now_up, "NATS link");
                    out.emit(Event::Up(now_up));
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
                if let Some(event) =
                    url.incoming(message.subject.as_str(), message.payload.to_vec())
                {
                    out.emit(event);
                }
            }
        })
    };
    subscriptions.insert(BROADCAST.into(), subscribe(url.subject(BROADCAST)));
    // Not in `subscriptions` (keyed by topic): node reports are listened to for good.
    let _reports = subscribe(url.reports_subject().to_string());
    while let Some(command) = commands.recv().await {
        match command {
            Command::Subscribe(topic) => {
                if let std::collections::hash_map::Entry::Vacant(entry) =
                    subscriptions.entry(topic.clone())
                {
                    entry.insert(subscribe(url.subject(&topic)));
                }
            }
            Command::Unsubscribe(topic) => {
                // Dropping the subscriber (with its task) unsubscribes.
                if let Some(task) = subscriptions.remove(&topic) {
                    task.abort();
                }
            }
            Command::Publish { id, topic, frame } => {
                let ok = up.load(Ordering::SeqCst)
                    && tokio::time::timeout(CONFIRM_TIMEOUT, async {
                        client
                            .publish(url.subject(&topic), frame.into())
                            .await
                            .is_ok()
                            && client.flush().await.is_ok()
                    })
                    .await
                    .unwrap_or(false);
                out.emit(Event::Published { id, ok });
            }
            Command::Report(report) => {
                if up.load(Ordering::SeqCst) {
                    let _ = client.publish(url.reports_subject(), report.into()).await;
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
        Command::Publish { id, .. } => out.emit(Event::Published { id, ok: false }),
        Command::Report(_) => {}
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
    sink.subscribe(url.reports_subject()).await?;
    for topic in wanted.iter() {
        sink.subscribe(url.subject(topic)).await?;
    }
    tracing::info!("Redis link up");
    out.emit(Event::Up(true));
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return Err(io::Error::from(io::ErrorKind::ConnectionReset).into());
                };
                if let Some(event) = url.incoming(message.get_channel_name(), message.get_payload_bytes().to_vec()) {
                    out.emit(event);
                }
            }
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(Command::Subscribe(topic)) => {
                    if wanted.insert(topic.clone()) {
                        sink.subscribe(url.subject(&topic)).await?;
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
                    let publish = command.query_async::<i64>(&mut publisher);
                    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Err(error),
                        Err(_) => return Err(timeout("publish")),
                    }
                }
                Some(Command::Publish { id, topic, frame }) => {
                    let mut command = redis::cmd("PUBLISH");
                    command.arg(url.subject(&topic)).arg(frame);
                    let publish = command.query_async::<i64>(&mut publisher);
                    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
                        Ok(Ok(_nodes)) => out.emit(Event::Published { id, ok: true }),
                        Ok(Err(error)) => {
                            out.emit(Event::Published { id, ok: false });
                            return Err(error);
                        }
                        Err(_) => {
                            out.emit(Event::Published { id, ok: false });
                            return Err(timeout("publish"));
                        }
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
