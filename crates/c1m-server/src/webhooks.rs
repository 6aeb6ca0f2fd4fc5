//! Pusher webhooks (`--pusher-webhook URL`): the app's back end is told when channels
//! become occupied or vacated, when presence members come and go, and of client
//! events.
//!
//! The event loop never waits on the app: [`Webhooks::push`] only appends to a batch;
//! a batch goes out when it holds [`MAX_BATCH`] events or [`BATCH_WAIT`] after its
//! first, through a bounded queue ([`QUEUE_BATCHES`]) to a thread of its own that
//! POSTs it, signed as Pusher signs (`X-Pusher-Key`, `X-Pusher-Signature` = hex
//! HMAC-SHA256(secret, body)), and retries a failure with backoff ([`RETRIES`] times,
//! doubling from [`FIRST_RETRY`]). A full queue or a batch that never got through
//! drops its events, counted in [`WebhookStats`] (`/metrics`), never blocking clients.
//!
//! [`AppWebhooks`] holds a server's senders, one per app with a webhook URL, and
//! routes each event to the app whose channel it is about. Who sends which event, so
//! that each is sent once per cluster: see `server/pusher_webhooks.rs` and
//! `master/presence.rs`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::pusher::App;

/// Most events in one webhook request.
pub const MAX_BATCH: usize = 100;
/// Longest an event waits for others to share its request.
pub const BATCH_WAIT: Duration = Duration::from_millis(250);
/// Batches waiting for the sender thread; past it, new batches are dropped.
pub const QUEUE_BATCHES: usize = 1000;
/// Attempts after the first failed one.
pub const RETRIES: u32 = 4;
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the webhooks did, for `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Events delivered (a 2xx answer to their request).
    pub events_sent: AtomicU64,
    /// Requests that failed (each attempt).
    pub failed_attempts: AtomicU64,
    /// Events given up on: the queue was full, or every attempt failed.
    pub events_dropped: AtomicU64,
}

/// A snapshot of [`WebhookStats`] (what a master passes to its workers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WebhookCounts {
    pub events_sent: u64,
    pub failed_attempts: u64,
    pub events_dropped: u64,
}

impl WebhookStats {
    pub fn snapshot(&self) -> WebhookCounts {
        WebhookCounts {
            events_sent: self.events_sent.load(Relaxed),
            failed_attempts: self.failed_attempts.load(Relaxed),
            events_dropped: self.events_dropped.load(Relaxed),
        }
    }
}

impl WebhookCounts {
    /// The counts of every app's webhooks together.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Webhooks>) -> Option<WebhookCounts> {
        let mut total: Option<WebhookCounts> = None;
        for webhooks in all {
            let c = webhooks.stats.snapshot();
            let t = total.get_or_insert_with(WebhookCounts::default);
            t.events_sent += c.events_sent;
            t.failed_attempts += c.failed_attempts;
            t.events_dropped += c.events_dropped;
        }
        total
    }

    /// The `/metrics` lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in [
            (
                "c1m_pusher_webhook_events_sent_total",
                "Pusher webhook events the app's endpoint took (a 2xx answer).",
                self.events_sent,
            ),
            (
                "c1m_pusher_webhook_failed_attempts_total",
                "Pusher webhook requests that failed (each attempt; retried with backoff).",
                self.failed_attempts,
            ),
            (
                "c1m_pusher_webhook_events_dropped_total",
                "Pusher webhook events given up on (queue full, or every attempt failed).",
                self.events_dropped,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        out
    }
}

/// The webhook senders of a server's apps, by app number (an app without a webhook
/// URL has none), kept by whoever sends the node's webhooks: the single process or the
/// master (a worker's is empty).
#[derive(Default)]
pub struct AppWebhooks {
    senders: Vec<Option<Webhooks>>,
}

impl AppWebhooks {
    /// A sender for each app of `apps` with a webhook URL.
    pub fn for_apps(apps: &[App]) -> std::io::Result<AppWebhooks> {
        let senders = apps
            .iter()
            .map(|app| {
                app.webhook
                    .as_deref()
                    .map(|url| Webhooks::start(url, app))
                    .transpose()
            })
            .collect::<std::io::Result<_>>()?;
        Ok(AppWebhooks { senders })
    }

    /// Whether any app has webhooks here.
    pub fn any(&self) -> bool {
        self.senders.iter().any(Option::is_some)
    }

    /// Sends `event` with the webhooks of app number `app`, if it has them.
    pub fn push(&mut self, app: usize, event: Value, now: Instant) {
        if let Some(Some(webhooks)) = self.senders.get_mut(app) {
            webhooks.push(event, now);
        }
    }

    /// Sends the event `make` writes for the channel of `topic` with the webhooks of
    /// the topic's app (of `apps`), if it has them.
    pub fn push_for(
        &mut self,
        apps: &[App],
        topic: &str,
        make: impl FnOnce(&str) -> Value,
        now: Instant,
    ) {
        let app = crate::pusher::app_of(apps, topic);
        if let Some(app) = app.filter(|&app| matches!(self.senders.get(app), Some(Some(_)))) {
            self.push(app, make(crate::pusher::channel_of(topic)), now);
        }
    }

    /// What the apps are told of other nodes that went silent (by the node that speaks
    /// for the cluster): their members left, their channels were vacated.
    pub fn push_expired(
        &mut self,
        apps: &[App],
        expired: &crate::cluster_presence::Expired,
        now: Instant,
    ) {
        for (topic, change) in &expired.changes {
            self.push_for(apps, topic, |channel| event::member(channel, change), now);
        }
        for topic in &expired.vacated {
            self.push_for(apps, topic, event::channel_vacated, now);
        }
    }

    /// Hands the batches that waited long enough to their senders.
    pub fn flush_due(&mut self, now: Instant) {
        for webhooks in self.senders.iter_mut().flatten() {
            webhooks.flush_due(now);
        }
    }

    /// When the oldest waiting batch is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.senders
            .iter()
            .flatten()
            .filter_map(Webhooks::next_deadline)
            .min()
    }

    /// Every app's counts together (`None` without webhooks).
    pub fn counts(&self) -> Option<WebhookCounts> {
        WebhookCounts::sum(self.senders.iter().flatten())
    }
}

/// One app's webhook batches and its sender thread.
pub struct Webhooks {
    pending: Vec<Value>,
    first_pending: Option<Instant>,
    queue: SyncSender<(Vec<u8>, u64)>,
    pub stats: Arc<WebhookStats>,
}

impl Webhooks {
    /// Starts the sender thread for `app`'s webhooks to `url`.
    pub fn start(url: &str, app: &App) -> std::io::Result<Webhooks> {
        let (queue, batches) = sync_channel(QUEUE_BATCHES);
        let stats = Arc::new(WebhookStats::default());
        let sender = Sender {
            url: url.to_string(),
            key: app.key.clone(),
            secret: app.secret.clone(),
            stats: Arc::clone(&stats),
            agent: ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).build(),
        };
        std::thread::Builder::new()
            .name("c1m-webhooks".into())
            .spawn(move || sender.run(batches))?;
        Ok(Webhooks {
            pending: Vec::new(),
            first_pending: None,
            queue,
            stats,
        })
    }

    /// Adds an event to the current batch.
    pub fn push(&mut self, event: Value, now: Instant) {
        self.first_pending.get_or_insert(now);
        self.pending.push(event);
        if self.pending.len() >= MAX_BATCH {
            self.send_batch();
        }
    }

    /// Sends the batch if it waited [`BATCH_WAIT`] (call on every loop turn).
    pub fn flush_due(&mut self, now: Instant) {
        if self
            .first_pending
            .is_some_and(|at| now.saturating_duration_since(at) >= BATCH_WAIT)
        {
            self.send_batch();
        }
    }

    /// When the current batch is due, if there is one.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.first_pending.map(|at| at + BATCH_WAIT)
    }

    fn send_batch(&mut self) {
        self.first_pending = None;
        let events = std::mem::take(&mut self.pending);
        let count = events.len() as u64;
        if count == 0 {
            return;
        }
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let body = json!({"time_ms": time_ms, "events": events}).to_string();
        match self.queue.try_send((body.into_bytes(), count)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                tracing::warn!(count, "webhook queue full: events dropped");
                self.stats.events_dropped.fetch_add(count, Relaxed);
            }
        }
    }
}

/// The sender thread's side.
struct Sender {
    url: String,
    key: String,
    secret: String,
    stats: Arc<WebhookStats>,
    agent: ureq::Agent,
}

impl Sender {
    fn run(self, batches: Receiver<(Vec<u8>, u64)>) {
        for (body, count) in batches {
            if self.deliver(&body) {
                self.stats.events_sent.fetch_add(count, Relaxed);
            } else {
                tracing::warn!(count, url = %self.url, "webhook batch given up after retries");
                self.stats.events_dropped.fetch_add(count, Relaxed);
            }
        }
    }

    /// POSTs one batch, retrying with backoff; whether it got through.
    fn deliver(&self, body: &[u8]) -> bool {
        let signature = sign(&self.secret, body);
        let mut wait = FIRST_RETRY;
        for attempt in 0..=RETRIES {
            let answer = self
                .agent
                .post(&self.url)
                .set("Content-Type", "application/json")
                .set("X-Pusher-Key", &self.key)
                .set("X-Pusher-Signature", &signature)
                .send_bytes(body);
            match answer {
                Ok(_) => return true,
                Err(error) => {
                    self.stats.failed_attempts.fetch_add(1, Relaxed);
                    tracing::debug!(attempt, %error, "webhook attempt failed");
                }
            }
            if attempt < RETRIES {
                std::thread::sleep(wait);
                wait *= 2;
            }
        }
        false
    }
}

/// Pusher's webhook signature: hex HMAC-SHA256(secret, body).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, body))
}

/// Whether `topic` is a channel the app hears about: not the clock's topic (it exists
/// from the start, subscribers or not) nor a user's own channel (`#server-to-user-…`).
pub fn is_app_channel(topic: &str) -> bool {
    topic != crate::topics::TIME && !topic.starts_with('#')
}

/// Checks a webhook URL at start-up: `http://` or `https://` and a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("a webhook URL starts with http:// or https://, not {url:?}"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("a webhook URL names a host: {url:?}"));
    }
    Ok(())
}

/// The events, as Pusher writes them.
pub mod event {
    use serde_json::{json, Value};

    pub fn channel_occupied(channel: &str) -> Value {
        json!({"name": "channel_occupied", "channel": channel})
    }

    pub fn channel_vacated(channel: &str) -> Value {
        json!({"name": "channel_vacated", "channel": channel})
    }

    /// `member_added` / `member_removed` for a presence change (its `user_id` as a
    /// string, as Pusher sends it).
    pub fn member(channel: &str, change: &crate::presence::Change) -> Value {
        let name = match change {
            crate::presence::Change::Added(_) => "member_added",
            crate::presence::Change::Removed(_) => "member_removed",
        };
        let user_id = serde_json::from_str::<Value>(change.data())
            .ok()
            .and_then(|data| data.get("user_id").cloned())
            .map(|id| match id {
                Value::String(id) => id,
                other => other.to_string(),
            })
            .unwrap_or_default();
        json!({"name": name, "channel": channel, "user_id": user_id})
    }

    /// A client event: `data` as a string, the sender's socket id, and on a presence
    /// channel its user id.
    pub fn client_event(
        channel: &str,
        event: &str,
        data: &Value,
        socket_id: &str,
        user_id: Option<&Value>,
    ) -> Value {
        let data = match data {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let mut out = json!({
            "name": "client_event", "channel": channel, "event": event,
            "data": data, "socket_id": socket_id,
        });
        if let Some(user_id) = user_id {
            out["user_id"] = match user_id {
                Value::String(id) => Value::String(id.clone()),
                other => Value::String(other.to_string()),
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://127.0.0.1:8080/hooks").is_ok());
        assert!(check_url("https://example.com/pusher").is_ok());
        for bad in ["", "ftp://x", "http://", "http:///x", "127.0.0.1:80"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_have_pushers_shapes() {
        let added = crate::presence::Change::Added(r#"{"user_id":7,"user_info":{}}"#.into());
        assert_eq!(
            event::member("presence-a", &added),
            json!({"name": "member_added", "channel": "presence-a", "user_id": "7"})
        );
        let e = event::client_event("private-a", "client-x", &json!({"k": 1}), "1.2", None);
        assert_eq!(e["data"], r#"{"k":1}"#);
        assert_eq!(sign("s", b"body").len(), 64);
    }

    #[test]
    fn a_dead_endpoint_costs_retries_then_drops_the_batch_never_the_caller() {
        // Nobody listens on this port: every attempt fails at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let app = App::parse("1:k:s").unwrap();
        let mut hooks = Webhooks::start(&format!("http://127.0.0.1:{port}/"), &app).unwrap();
        let start = Instant::now();
        hooks.push(event::channel_occupied("a"), start);
        hooks.flush_due(start + BATCH_WAIT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while hooks.stats.snapshot().events_dropped == 0 {
            assert!(Instant::now() < deadline, "{:?}", hooks.stats.snapshot());
            std::thread::sleep(Duration::from_millis(50));
        }
        let counts = hooks.stats.snapshot();
        assert_eq!(counts.failed_attempts, u64::from(RETRIES) + 1);
        assert_eq!((counts.events_sent, counts.events_dropped), (0, 1));
    }
}
