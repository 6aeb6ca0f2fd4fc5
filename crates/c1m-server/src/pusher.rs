//! The Pusher Channels protocol (version 7), sans-I/O: what existing `pusher-js` and
//! Laravel Echo apps speak, so they can move to c1m by changing a host.
//!
//! - WebSocket on `/app/{key}`: the server opens with `pusher:connection_established`
//!   (its `data` is a JSON *string*, as the protocol has it), the client subscribes to
//!   channels (c1m topics: one channel name is one topic, shared with the native
//!   protocol), and every event reaches it as `{"event":E,"channel":C,"data":D}`, `D` a
//!   string. [`ClientMessage`] reads what a client sends; the functions below write what
//!   the server answers.
//! - The HTTP API (`POST /apps/{id}/events`) is signed: [`verify_signature`] checks
//!   Pusher's scheme (HMAC-SHA256 over method, path and the sorted query; `body_md5`;
//!   a timestamp within 600 s).
//!
//! - Private and presence channels are checked here ([`channel_kind`], the auth
//!   signatures, `channel_data`); `private-encrypted-` ones are private channels whose
//!   events the server passes through sealed (it never holds the key). Presence tables
//!   are in `presence`, the read API in `pusher_api`, webhooks in `webhooks`; the server
//!   carries them out in `server/pusher_clients.rs`.
//!
//! Hand-written rather than from a crate: no maintained Rust crate implements the
//! server side of this protocol; the cryptography is `ring`'s HMAC and RustCrypto's MD5.

use serde::Deserialize;
use serde_json::{json, Value};

/// Seconds of silence after which a client pings (`activity_timeout` in the
/// connection message; pusher-js uses it as is).
pub const ACTIVITY_TIMEOUT_SECS: u64 = 120;

/// How far a signed request's `auth_timestamp` may be from our clock.
pub const MAX_CLOCK_SKEW_SECS: u64 = 600;

/// Most channels one `POST /apps/{id}/events` may name (Pusher's limit).
pub const MAX_CHANNELS_PER_EVENT: usize = 100;

/// Longest channel name (Pusher's limit).
pub const MAX_CHANNEL_NAME: usize = 164;

/// Checks a channel name as Pusher does: 1 to 164 characters from
/// `A-Z a-z 0-9 _ - = @ , . ;` (and `:`, which c1m's own topic names use). A channel is
/// a topic; names with `= @ , ;` are for Pusher clients only (the native protocol's
/// topic names, and comma-separated topic lists, do not take them).
pub fn validate_channel(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
        return Err(format!(
            "a channel name has 1 to {MAX_CHANNEL_NAME} characters"
        ));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-=@,.;:".contains(&b);
    if !name.bytes().all(allowed) {
        return Err("a channel name uses only A-Z a-z 0-9 _ - = @ , . ; :".into());
    }
    Ok(())
}

/// One application: clients connect with its `key`, the HTTP API is signed with its
/// `secret`; its options say whether its clients may send client events (and how
/// many a second), where its webhooks go, and how many connections it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
    pub client_events: bool,
    pub webhook: Option<String>,
    /// Client events one connection may send per second (a burst of as many, then
    /// refilled at that rate); past it they are refused with error 4301.
    pub client_events_per_second: u32,
    /// The app's connection quota over the whole cluster: a connection past it gets
    /// error 4004 and is closed with 4004 (pusher-js does not retry it).
    pub max_connections: Option<u64>,
}

/// Client events one connection may send per second unless its app says otherwise
/// (Pusher's limit).
pub const CLIENT_EVENTS_PER_SECOND: u32 = 10;

impl App {
    /// Reads `ID:KEY:SECRET`, optionally followed by `?OPTION=VALUE&…` with
    /// `client_events=true|false`, `client_events_per_second=N`, `max_connections=N`
    /// and `webhook=URL` (`--pusher-app`).
    pub fn parse(value: &str) -> Result<App, String> {
        let (value, options) = value.split_once('?').unwrap_or((value, ""));
        let mut parts = value.splitn(3, ':');
        let mut app = match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(key), Some(secret))
                if !id.is_empty() && !key.is_empty() && !secret.is_empty() =>
            {
                let plain = |s: &str| {
                    s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                };
                if !plain(id) || !plain(key) {
                    return Err(format!(
                        "a Pusher app's id and key use only A-Z a-z 0-9 - _ . ({value:?})"
                    ));
                }
                App {
                    id: id.into(),
                    key: key.into(),
                    secret: secret.into(),
                    client_events: false,
                    webhook: None,
                    client_events_per_second: CLIENT_EVENTS_PER_SECOND,
                    max_connections: None,
                }
            }
            _ => {
                return Err(format!(
                    "a Pusher app is ID:KEY:SECRET[?OPTIONS], not {value:?}"
                ))
            }
        };
        for (name, option) in form_urlencoded::parse(options.as_bytes()) {
            match (name.as_ref(), option.as_ref()) {
                ("client_events", "true") => app.client_events = true,
                ("client_events", "false") => app.client_events = false,
                ("webhook", url) => {
                    crate::webhooks::check_url(url)?;
                    app.webhook = Some(url.to_string());
                }
                ("client_events_per_second", n) => {
                    app.client_events_per_second = match n.parse() {
                        Ok(n) if n > 0 => n,
                        _ => return Err(format!("client_events_per_second is a number above 0, not {n:?}")),
                    }
                }
                ("max_connections", n) => {
                    app.max_connections = match n.parse() {
                        Ok(n) => Some(n),
                        _ => return Err(format!("max_connections is a number, not {n:?}")),
                    }
                }
                (name, option) => {
                    return Err(format!(
                        "unknown Pusher app option {name}={option} (client_events=true|false, client_events_per_second=N, max_connections=N, webhook=URL)"
                    ))
                }
            }
        }
        Ok(app)
    }
}

/// Between an app's id and a channel name in the topic of every app but the first
/// (`APP_ID~CHANNEL`): in neither a channel's nor a native topic's alphabet, so no
/// client can name another app's topics.
pub const NAMESPACE: char = '~';

/// The topic of `channel` in app number `app` of the server's list: the channel's own
/// name for the first app (its channels are shared with native clients), the app's
/// namespace for the others.
pub fn topic_of(apps: &[App], app: usize, channel: &str) -> String {
    match apps.get(app) {
        Some(named) if app > 0 => format!("{}{NAMESPACE}{channel}", named.id),
        _ => channel.to_string(),
    }
}

/// The channel a topic stands for (its name without an app's namespace).
pub fn channel_of(topic: &str) -> &str {
    topic
        .split_once(NAMESPACE)
        .map_or(topic, |(_, channel)| channel)
}

/// Which app of `apps` a topic belongs to (the first app's have no namespace).
pub fn app_of(apps: &[App], topic: &str) -> Option<usize> {
    match topic.split_once(NAMESPACE) {
        None => (!apps.is_empty()).then_some(0),
        Some((id, _)) => apps.iter().position(|app| app.id == id).filter(|&i| i > 0),
    }
}

/// The protocol's error codes that c1m sends (4000–4099: do not reconnect as is;
/// 4200–4299: reconnect at once).
pub mod code {
    /// The key names no app here.
    pub const UNKNOWN_APP: u16 = 4001;
    /// The app is at its connection quota (`max_connections`).
    pub const OVER_QUOTA: u16 = 4004;
    /// The client speaks a protocol version c1m does not.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    /// Not allowed (e.g. a private channel without a valid signature).
    pub const UNAUTHORIZED: u16 = 4009;
    /// The server is at `--max-connections`: come back after a while.
    pub const OVER_CAPACITY: u16 = 4100;
    /// The server is shutting down or restarting: reconnect.
    pub const RECONNECT: u16 = 4200;
    /// No pong in time.
    pub const PONG_TIMEOUT: u16 = 4201;
    /// A generic protocol error on an open connection (malformed message).
    pub const GENERIC: u16 = 4301;
}

/// A connection as a socket id names it: (process token, slab key).
pub type SocketRef = (u32, u32);

/// This process's part of its connections' socket ids: random, drawn once, so that
/// ids are unique across the processes of a node and the nodes of a cluster (a pid
/// would repeat across machines and containers).
pub fn process_token() -> u32 {
    static TOKEN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *TOKEN.get_or_init(|| rand::random::<u32>().max(1))
}

/// The socket id of a connection: derived from where it lives (this process's token
/// and its slab key), never stored.
pub fn socket_id(key: usize) -> String {
    format!("{}.{key}", process_token())
}

/// The connection a socket id names, if it is well formed.
pub fn parse_socket_id(id: &str) -> Option<SocketRef> {
    let (token, key) = id.split_once('.')?;
    Some((token.parse().ok()?, key.parse().ok()?))
}

/// Reads `/app/{key}?protocol=7&…`: the app key, if the path is Pusher's.
pub fn app_key(path: &str) -> Option<&str> {
    let key = path.strip_prefix("/app/")?;
    (!key.is_empty() && !key.contains('/')).then_some(key)
}

/// The protocol versions c1m takes in `?protocol=`: it speaks 7 (every current client
/// library asks for it) and serves clients of 5 and 6 the same messages.
pub const PROTOCOL_VERSIONS: std::ops::RangeInclusive<u32> = 5..=7;

/// Whether an upgrade's query asks for a protocol version c1m speaks. A query without
/// `protocol` is taken as the current one; anything else outside
/// [`PROTOCOL_VERSIONS`] gets error 4007.
pub fn protocol_supported(query: &str) -> bool {
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("protocol="))
        .all(|version| {
            version
                .parse::<u32>()
                .is_ok_and(|v| PROTOCOL_VERSIONS.contains(&v))
        })
}

/// What a Pusher client sent over its WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Ping,
    Pong,
    /// `auth`: for a private or presence channel, `KEY:SIGNATURE` from the app's auth
    /// endpoint; `channel_data`: for a presence channel, the user (signed with it).
    Subscribe {
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    /// `pusher:signin`: the user the app's user-authentication endpoint signed.
    Signin {
        auth: String,
        user_data: String,
    },
    /// A `client-*` event to the other members of `channel`; `data` as sent.
    ClientEvent {
        event: String,
        channel: Option<String>,
        data: Value,
    },
    /// Anything else: answered with an error, the connection stays.
    Unknown(String),
}

#[derive(Deserialize)]
struct Wire {
    event: String,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    channel: Option<String>,
}

impl ClientMessage {
    /// Reads a client's text message; `Err` holds the `pusher:error` to send back.
    pub fn parse(text: &str) -> Result<ClientMessage, String> {
        let wire: Wire = serde_json::from_str(text)
            .map_err(|_| error(code::GENERIC, "expected {\"event\":NAME,\"data\":…}"))?;
        if wire.event.starts_with("client-") {
            return Ok(ClientMessage::ClientEvent {
                event: wire.event,
                channel: wire.channel,
                data: wire.data,
            });
        }
        // `data` is an object in pusher-js's subscribe, a string in some clients.
        let data = match wire.data {
            Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::Null),
            other => other,
        };
        let channel = || {
            data.get("channel")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| error(code::GENERIC, "missing data.channel"))
        };
        Ok(match wire.event.as_str() {
            "pusher:ping" => ClientMessage::Ping,
            "pusher:pong" => ClientMessage::Pong,
            "pusher:subscribe" => ClientMessage::Subscribe {
                channel: channel()?,
                auth: data.get("auth").and_then(Value::as_str).map(str::to_string),
                channel_data: data
                    .get("channel_data")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            },
            "pusher:signin" => {
                let field = |name: &str| {
                    data.get(name)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| error(code::GENERIC, &format!("missing data.{name}")))
                };
                ClientMessage::Signin {
                    auth: field("auth")?,
                    user_data: field("user_data")?,
                }
            }
            "pusher:unsubscribe" => ClientMessage::Unsubscribe {
                channel: channel()?,
            },
            other => ClientMessage::Unknown(other.to_string()),
        })
    }
}

/// Checks a private or presence channel's `auth` (`KEY:SIGNATURE`, made by the app's
/// auth endpoint with its secret): SIGNATURE = hex HMAC-SHA256(secret,
/// "SOCKET_ID:CHANNEL"), with ":CHANNEL_DATA" after it for a presence channel.
pub fn channel_auth_ok(
    app: &App,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let Some((key, signature)) = auth.split_once(':') else {
        return false;
    };
    let Ok(signature) = hex::decode(signature) else {
        return false;
    };
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app.secret.as_bytes());
    let signed = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    // `verify` compares in constant time.
    key == app.key && ring::hmac::verify(&hmac, signed.as_bytes(), &signature).is_ok()
}

/// What an app's auth endpoint answers for a private or presence channel: the `auth`
/// string `KEY:SIGNATURE` (see [`channel_auth_ok`]). For clients c1m drives itself
/// (the bench, tests); apps use their Pusher SDK.
pub fn sign_channel(
    app: &App,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app.secret.as_bytes());
    let signed = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    let signature = hex::encode(ring::hmac::sign(&hmac, signed.as_bytes()));
    format!("{}:{signature}", app.key)
}

/// The channel through which a signed-in user gets the app's `sendToUser` events;
/// the user's id follows.
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

/// Checks a user sign-in: `auth` is `KEY:SIGNATURE`, SIGNATURE = hex
/// HMAC-SHA256(secret, "SOCKET_ID::user::USER_DATA"), and USER_DATA a JSON object
/// with a non-empty string `id`. `Ok`: the user's id.
pub fn signin_user(
    app: &App,
    socket_id: &str,
    user_data: &str,
    auth: &str,
) -> Result<String, String> {
    let signed = format!("{socket_id}::user::{user_data}");
    let Some((key, signature)) = auth.split_once(':') else {
        return Err("auth must be KEY:SIGNATURE".into());
    };
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app.secret.as_bytes());
    let valid = hex::decode(signature)
        .is_ok_and(|sig| ring::hmac::verify(&hmac, signed.as_bytes(), &sig).is_ok());
    if key != app.key || !valid {
        return Err("invalid signature: auth must be KEY:HMAC-SHA256(secret, \"SOCKET_ID::user::USER_DATA\")".into());
    }
    let user: Value =
        serde_json::from_str(user_data).map_err(|_| "user_data is not JSON".to_string())?;
    match user.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() && check_user_id(id).is_ok() => Ok(id.to_string()),
        _ => Err("user_data needs an id: a non-empty string of at most 164 characters from A-Z a-z 0-9 _ - = @ , . ; :".into()),
    }
}

/// Checks a user id (what goes after [`USER_CHANNEL_PREFIX`]).
pub fn check_user_id(id: &str) -> Result<(), String> {
    validate_channel(id).map_err(|_| format!("bad user id {id:?}"))
}

/// `pusher:signin_success` (its data a JSON string holding the signed user data).
pub fn signin_success(user_data: &str) -> String {
    let data = json!({ "user_data": user_data });
    json!({"event": "pusher:signin_success", "data": data.to_string()}).to_string()
}

/// What kind of channel a name is (its prefix decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    Presence,
    Encrypted,
}

/// What every presence channel's name starts with.
pub const PRESENCE_PREFIX: &str = "presence-";

pub fn channel_kind(name: &str) -> ChannelKind {
    if name.starts_with("private-encrypted-") {
        ChannelKind::Encrypted
    } else if name.starts_with("private-") {
        ChannelKind::Private
    } else if name.starts_with(PRESENCE_PREFIX) {
        ChannelKind::Presence
    } else {
        ChannelKind::Public
    }
}

/// `pusher:connection_established`, its data a JSON string.
pub fn connection_established(socket_id: &str) -> String {
    let data = json!({"socket_id": socket_id, "activity_timeout": ACTIVITY_TIMEOUT_SECS});
    json!({"event": "pusher:connection_established", "data": data.to_string()}).to_string()
}

pub fn pong() -> String {
    json!({"event": "pusher:pong", "data": "{}"}).to_string()
}

pub fn subscription_succeeded(channel: &str) -> String {
    subscription_succeeded_with(channel, "{}")
}

/// `subscription_succeeded` with its data string (a presence channel's members).
pub fn subscription_succeeded_with(channel: &str, data: &str) -> String {
    json!({"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": data})
        .to_string()
}

/// A client event as the channel's other members get it: `data` as the sender gave it,
/// and on a presence channel the sender's `user_id`.
pub fn client_event(event: &str, channel: &str, data: &Value, user_id: Option<&Value>) -> String {
    let mut message = json!({"event": event, "channel": channel, "data": data});
    if let Some(user_id) = user_id {
        message["user_id"] = user_id.clone();
    }
    message.to_string()
}

/// `pusher:subscription_error` (what pusher-js reports as a failed subscription).
pub fn subscription_error(channel: &str, status: u16, message: &str) -> String {
    let data = json!({"type": "AuthError", "error": message, "status": status});
    json!({"event": "pusher:subscription_error", "channel": channel, "data": data}).to_string()
}

/// `pusher:error` with a code and a message (the connection may stay or close: the
/// caller decides).
pub fn error(code: u16, message: &str) -> String {
    json!({"event": "pusher:error", "data": {"code": code, "message": message}}).to_string()
}

/// An event as clients get it: `data` is a string (JSON text is passed as the string
/// it is, as Pusher does).
pub fn event(event: &str, channel: &str, data: &str) -> String {
    json!({"event": event, "channel": channel, "data": data}).to_string()
}

/// `text` as one unmasked WebSocket text frame.
pub fn text_frame(text: &str) -> bytes::Bytes {
    let mut out = Vec::with_capacity(text.len() + 10);
    c1m_proto::frame::encode_frame(c1m_proto::OpCode::Text, text.as_bytes(), None, &mut out);
    out.into()
}

/// The frame telling a presence channel's subscribers (of `topic`, namespaced or
/// not) that a member came or went.
pub fn member_event_frame(topic: &str, change: &crate::presence::Change) -> bytes::Bytes {
    text_frame(&event(change.event(), channel_of(topic), change.data()))
}

/// What a Pusher client of `channel` gets for a publication of `frame` (made once per
/// publication): the frame itself when its payload is already a Pusher event for that
/// channel (what the HTTP API publishes, so native clients of the topic get the same
/// event), else the payload wrapped as event `message` (text as is, binary in base64).
pub fn frame_for(channel: &str, frame: &bytes::Bytes) -> bytes::Bytes {
    use base64::Engine;
    use c1m_proto::OpCode;
    let Some((opcode, payload)) = c1m_proto::frame::split_frame(frame) else {
        return frame.clone();
    };
    let text = (opcode == OpCode::Text)
        .then(|| std::str::from_utf8(payload).ok())
        .flatten();
    if let Some(text) = text {
        let is_event_here = serde_json::from_str::<Value>(text).is_ok_and(|v| {
            v.get("event").is_some_and(Value::is_string)
                && v.get("channel").and_then(Value::as_str) == Some(channel)
        });
        if is_event_here {
            return frame.clone();
        }
    }
    let data = match text {
        Some(text) => text.to_string(),
        None => base64::engine::general_purpose::STANDARD.encode(payload),
    };
    text_frame(&event("message", channel, &data))
}

/// The body of `POST /apps/{id}/events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub name: String,
    pub channels: Vec<String>,
    /// Already a string (the SDKs serialise objects before sending).
    pub data: String,
    /// A socket to leave out (the sender's own, usually).
    pub socket_id: Option<SocketRef>,
}

#[derive(Deserialize)]
struct TriggerWire {
    name: String,
    data: Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
}

/// Most events one `POST /apps/{id}/batch_events` may carry (Pusher's limit).
pub const MAX_BATCH: usize = 10;

#[derive(Deserialize)]
struct BatchWire {
    batch: Vec<TriggerWire>,
}

impl Trigger {
    /// Reads a trigger body; `Err` is the message of a 400 answer.
    pub fn parse(body: &[u8], max_data_bytes: usize) -> Result<Trigger, String> {
        let wire: TriggerWire = serde_json::from_slice(body)
            .map_err(|e| format!("expected {{\"name\",\"data\",\"channels\"}}: {e}"))?;
        Trigger::check(wire, max_data_bytes)
    }

    /// Reads a `batch_events` body: 1 to [`MAX_BATCH`] events, each to one `channel`.
    pub fn parse_batch(body: &[u8], max_data_bytes: usize) -> Result<Vec<Trigger>, String> {
        let wire: BatchWire = serde_json::from_slice(body).map_err(|e| {
            format!("expected {{\"batch\":[{{\"channel\",\"name\",\"data\"}},…]}}: {e}")
        })?;
        if wire.batch.is_empty() || wire.batch.len() > MAX_BATCH {
            return Err(format!("a batch holds 1 to {MAX_BATCH} events"));
        }
        wire.batch
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                if event.channels.is_some() {
                    return Err(format!("batch event {i}: one \"channel\" per batch event"));
                }
                Trigger::check(event, max_data_bytes).map_err(|e| format!("batch event {i}: {e}"))
            })
            .collect()
    }

    fn check(wire: TriggerWire, max_data_bytes: usize) -> Result<Trigger, String> {
        let channels = match (wire.channels, wire.channel) {
            (Some(channels), None) => channels,
            (None, Some(channel)) => vec![channel],
            _ => return Err("give either \"channels\" or \"channel\"".into()),
        };
        if channels.is_empty() || channels.len() > MAX_CHANNELS_PER_EVENT {
            return Err(format!(
                "an event goes to 1 to {MAX_CHANNELS_PER_EVENT} channels"
            ));
        }
        for channel in &channels {
            match channel.strip_prefix(USER_CHANNEL_PREFIX) {
                // `sendToUser`: the user's own channel.
                Some(user) => check_user_id(user),
                None => validate_channel(channel),
            }
            .map_err(|e| format!("channel {channel:?}: {e}"))?;
        }
        let data = match wire.data {
            Value::String(text) => text,
            other => other.to_string(),
        };
        if data.len() > max_data_bytes {
            return Err(format!(
                "the event's data is {} bytes, over the limit of {max_data_bytes}",
                data.len()
            ));
        }
        if wire.name.is_empty() || wire.name.len() > 200 {
            return Err("an event name has 1 to 200 characters".into());
        }
        let socket_id = match wire.socket_id.as_deref() {
            None => None,
            Some(id) => Some(
                parse_socket_id(id)
                    .ok_or_else(|| format!("socket_id {id:?} is not NUMBER.NUMBER"))?,
            ),
        };
        Ok(Trigger {
            name: wire.name,
            channels,
            data,
            socket_id,
        })
    }
}

/// Why a signed request was refused: the HTTP status and the message.
pub type Refusal = (u16, String);

/// Checks Pusher's request signature: `auth_key` is the app's key, `auth_timestamp`
/// within [`MAX_CLOCK_SKEW_SECS`] of `now_unix`, `body_md5` the body's (when there is
/// a body), and `auth_signature` = hex HMAC-SHA256(secret, "METHOD\nPATH\nQUERY"),
/// QUERY being every other parameter as `key=value`, sorted by key, joined by `&`.
/// `query` is the raw query string (percent-encoded).
pub fn verify_signature(
    app: &App,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now_unix: u64,
) -> Result<(), Refusal> {
    // Decoded (`%XX`, `+`) as the SDKs encode them before signing the plain values.
    let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let get = |params: &[(String, String)], name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let unauthorized = |message: &str| Err((401, message.to_string()));
    let Some(signature) = get(&params, "auth_signature") else {
        return unauthorized("missing auth_signature");
    };
    if get(&params, "auth_key").as_deref() != Some(app.key.as_str()) {
        return unauthorized("auth_key does not name this app's key");
    }
    let Some(timestamp) = get(&params, "auth_timestamp").and_then(|t| t.parse::<u64>().ok()) else {
        return unauthorized("missing or malformed auth_timestamp");
    };
    if timestamp.abs_diff(now_unix) > MAX_CLOCK_SKEW_SECS {
        return unauthorized(&format!(
            "auth_timestamp is more than {MAX_CLOCK_SKEW_SECS} s from the server's clock \
             (server time {now_unix}): check the clocks"
        ));
    }
    if !body.is_empty() {
        use md5::Digest;
        let md5 = hex::encode(md5::Md5::digest(body));
        if get(&params, "body_md5").as_deref() != Some(md5.as_str()) {
            return unauthorized("body_md5 does not match the body");
        }
    }
    params.retain(|(k, _)| k != "auth_signature");
    params.sort();
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let signed = format!("{method}\n{path}\n{}", query.join("&"));
    let Ok(signature) = hex::decode(signature.to_ascii_lowercase()) else {
        return unauthorized("auth_signature is not hex");
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app.secret.as_bytes());
    // `verify` compares in constant time.
    ring::hmac::verify(&key, signed.as_bytes(), &signature)
        .or_else(|_| unauthorized("invalid signature: check the app's secret"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App::parse("123:the-key:the-secret").unwrap()
    }

    /// Signs like the `pusher` SDK does.
    fn sign(app: &App, method: &str, path: &str, params: &[(&str, &str)]) -> String {
        let mut sorted: Vec<_> = params.to_vec();
        sorted.sort();
        let query: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let signed = format!("{method}\n{path}\n{}", query.join("&"));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, app.secret.as_bytes());
        let signature = hex::encode(ring::hmac::sign(&key, signed.as_bytes()));
        format!("{}&auth_signature={signature}", query.join("&"))
    }

    #[test]
    fn protocol_versions_five_to_seven_are_spoken() {
        for query in [
            "",
            "protocol=7&client=js&version=8.4.0",
            "protocol=5",
            "x=1&protocol=6",
        ] {
            assert!(protocol_supported(query), "{query}");
        }
        for query in [
            "protocol=4",
            "protocol=8",
            "protocol=",
            "protocol=seven",
            "protocol=7&protocol=9",
        ] {
            assert!(!protocol_supported(query), "{query}");
        }
    }

    #[test]
    fn apps_parse_and_refuse_bad_shapes() {
        assert_eq!(app().key, "the-key");
        assert_eq!(
            App::parse("1:k:s:with:colons").unwrap().secret,
            "s:with:colons"
        );
        for bad in ["", "1:k", "1::s", "1:k/x:s", "a b:k:s"] {
            assert!(App::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signed_requests_pass_and_tampered_ones_do_not() {
        let app = app();
        let body = br#"{"name":"e","channels":["c"],"data":"x"}"#;
        use md5::Digest;
        let md5 = hex::encode(md5::Md5::digest(body));
        let params = [
            ("auth_key", "the-key"),
            ("auth_timestamp", "1000"),
            ("auth_version", "1.0"),
            ("body_md5", md5.as_str()),
        ];
        let query = sign(&app, "POST", "/apps/123/events", &params);
        let path = "/apps/123/events";
        assert_eq!(
            verify_signature(&app, "POST", path, &query, body, 1000),
            Ok(())
        );
        assert_eq!(
            verify_signature(&app, "POST", path, &query, body, 1500),
            Ok(())
        );
        // The SDKs sign plain values and send them encoded (`,` as %2C, a space as +).
        let info = [
            ("auth_key", "the-key"),
            ("auth_timestamp", "1000"),
            ("auth_version", "1.0"),
            ("info", "user_count,subscription_count"),
            ("filter", "a b"),
        ];
        let signed = sign(&app, "GET", "/apps/123/channels", &info);
        let encoded = signed.replace(',', "%2C").replace(' ', "+");
        assert_eq!(
            verify_signature(&app, "GET", "/apps/123/channels", &encoded, b"", 1000),
            Ok(())
        );
        let status = |r: Result<(), Refusal>| r.unwrap_err().0;
        assert_eq!(
            status(verify_signature(&app, "POST", path, &query, body, 1601)),
            401
        );
        assert_eq!(
            status(verify_signature(&app, "POST", path, &query, b"{}", 1000)),
            401
        );
        assert_eq!(
            status(verify_signature(&app, "GET", path, &query, body, 1000)),
            401
        );
        let other = App {
            secret: "wrong".into(),
            ..app.clone()
        };
        assert_eq!(
            status(verify_signature(&other, "POST", path, &query, body, 1000)),
            401
        );
        let unsigned = query.split("&auth_signature").next().unwrap();
        assert_eq!(
            status(verify_signature(&app, "POST", path, unsigned, body, 1000)),
            401
        );
    }

    #[test]
    fn client_messages_parse_and_bad_ones_get_an_error() {
        assert_eq!(
            ClientMessage::parse(
                r#"{"event":"pusher:subscribe","data":{"auth":"","channel":"c"}}"#
            ),
            Ok(ClientMessage::Subscribe {
                channel: "c".into(),
                auth: Some(String::new()),
                channel_data: None,
            })
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"event":"client-typing","channel":"private-c","data":{"who":1}}"#
            ),
            Ok(ClientMessage::ClientEvent {
                event: "client-typing".into(),
                channel: Some("private-c".into()),
                data: json!({"who": 1}),
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"event":"pusher:unsubscribe","data":"{\"channel\":\"c\"}"}"#),
            Ok(ClientMessage::Unsubscribe {
                channel: "c".into()
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"event":"pusher:ping","data":{}}"#),
            Ok(ClientMessage::Ping)
        );
        for bad in ["", "{", "[]", r#"{"event":"pusher:subscribe","data":{}}"#] {
            let answer = ClientMessage::parse(bad).unwrap_err();
            assert!(answer.contains("pusher:error"), "{bad}: {answer}");
        }
    }

    #[test]
    fn the_connection_message_carries_its_data_as_a_string() {
        let message: Value = serde_json::from_str(&connection_established("12.34")).unwrap();
        let data: Value = serde_json::from_str(message["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["socket_id"], "12.34");
        assert_eq!(app_key("/app/abc"), Some("abc"));
        assert_eq!(app_key("/app/"), None);
        assert_eq!(app_key("/ws"), None);
    }

    #[test]
    fn pusher_clients_get_events_as_they_are_and_other_payloads_wrapped() {
        let own = text_frame(&event("e", "c", "x"));
        assert_eq!(
            frame_for("c", &own),
            own,
            "an event for its channel passes as is"
        );
        let elsewhere = frame_for("d", &own);
        let (_, payload) = c1m_proto::frame::split_frame(&elsewhere).unwrap();
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["channel"].as_str()),
            (Some("message"), Some("d"))
        );
        let bare = frame_for("c", &text_frame("12345"));
        let (_, payload) = c1m_proto::frame::split_frame(&bare).unwrap();
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["data"], "12345");
    }

    #[test]
    fn private_channel_auth_is_the_apps_signature_of_socket_and_channel() {
        let app = app();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"the-secret");
        let sig = hex::encode(ring::hmac::sign(&key, b"1.2:private-a"));
        let auth = format!("the-key:{sig}");
        let ok =
            |socket, channel, data, auth: &str| channel_auth_ok(&app, socket, channel, data, auth);
        assert!(ok("1.2", "private-a", None, &auth));
        assert!(!ok("1.3", "private-a", None, &auth), "another socket");
        assert!(!ok("1.2", "private-b", None, &auth), "another channel");
        assert!(!ok("1.2", "private-a", None, &format!("other:{sig}")));
        assert!(!ok("1.2", "private-a", None, "garbage"));
        // A presence channel signs the channel data too.
        let data = r#"{"user_id":"u1"}"#;
        let sig = hex::encode(ring::hmac::sign(
            &key,
            format!("1.2:presence-a:{data}").as_bytes(),
        ));
        let auth = format!("the-key:{sig}");
        assert!(ok("1.2", "presence-a", Some(data), &auth));
        assert!(
            !ok("1.2", "presence-a", Some(r#"{"user_id":"u2"}"#), &auth),
            "another user"
        );
        assert!(!ok("1.2", "presence-a", None, &auth));
    }

    #[test]
    fn apps_parse_with_options_and_namespace_their_channels() {
        let app =
            App::parse("7:k:s?client_events=true&webhook=http%3A%2F%2F127.0.0.1%3A9%2Fh").unwrap();
        assert!(app.client_events);
        assert_eq!(app.webhook.as_deref(), Some("http://127.0.0.1:9/h"));
        assert_eq!(app.client_events_per_second, CLIENT_EVENTS_PER_SECOND);
        assert_eq!(app.max_connections, None);
        let limited = App::parse("7:k:s?max_connections=0&client_events_per_second=3").unwrap();
        assert_eq!(limited.max_connections, Some(0));
        assert_eq!(limited.client_events_per_second, 3);
        for bad in [
            "7:k",
            "7:k:s?bogus=1",
            "7:k:s?webhook=ftp://x",
            "a b:k:s",
            "7:k:s?max_connections=-1",
            "7:k:s?max_connections=lots",
            "7:k:s?client_events_per_second=0",
        ] {
            assert!(App::parse(bad).is_err(), "{bad}");
        }
        let apps = [App::parse("1:a:s").unwrap(), App::parse("2:b:s").unwrap()];
        assert_eq!(topic_of(&apps, 0, "news"), "news");
        assert_eq!(topic_of(&apps, 1, "news"), "2~news");
        assert_eq!(channel_of("2~news"), "news");
        assert_eq!(channel_of("news"), "news");
        assert_eq!(app_of(&apps, "2~news"), Some(1));
        assert_eq!(app_of(&apps, "news"), Some(0));
        assert_eq!(app_of(&apps, "9~news"), None);
    }

    #[test]
    fn channel_names_follow_pushers_rules() {
        for good in [
            "a",
            "private-a=b@c,d.e;f",
            "presence-room:1",
            &"x".repeat(164),
        ] {
            assert!(validate_channel(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a#b", "a/b", "é", &"x".repeat(165)] {
            assert!(validate_channel(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn triggers_are_checked() {
        let t =
            Trigger::parse(br#"{"name":"e","channels":["a","b"],"data":{"x":1}}"#, 100).unwrap();
        assert_eq!((t.channels.len(), t.data.as_str()), (2, r#"{"x":1}"#));
        for bad in [
            &br#"{"name":"e","data":"x"}"#[..],
            br#"{"name":"e","channels":[],"data":"x"}"#,
            br#"{"name":"e","channels":["a b"],"data":"x"}"#,
            br#"{"name":"","channels":["a"],"data":"x"}"#,
            br#"{"name":"e","channels":["a"],"data":"0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789x"}"#,
        ] {
            assert!(Trigger::parse(bad, 100).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let batch = Trigger::parse_batch(
            br#"{"batch":[{"channel":"a","name":"e","data":"1"},{"channel":"b","name":"f","data":"2"}]}"#,
            100,
        )
        .unwrap();
        assert_eq!((batch.len(), batch[1].channels[0].as_str()), (2, "b"));
        for bad in [
            &br#"{"batch":[]}"#[..],
            br#"{"batch":[{"channels":["a"],"name":"e","data":"1"}]}"#,
            br#"{"batch":[{"channel":"a b","name":"e","data":"1"}]}"#,
        ] {
            assert!(Trigger::parse_batch(bad, 100).is_err());
        }
    }

    proptest::proptest! {
        /// Whatever a client or an operator sends: a value or an error, never a panic.
        #[test]
        fn any_input_parses_or_is_refused(text in ".{0,200}") {
            let _ = ClientMessage::parse(&text);
            let _ = App::parse(&text);
            let _ = parse_socket_id(&text);
            let _ = validate_channel(&text);
            let _ = Trigger::parse(text.as_bytes(), 100);
            let _ = Trigger::parse_batch(text.as_bytes(), 100);
            let _ = crate::presence::Member::parse(&text);
        }

        /// JSON-shaped client messages with any fields: the same.
        #[test]
        fn any_json_message_parses_or_is_refused(
            event in "(pusher:(subscribe|unsubscribe|signin|ping)|client-[a-z]{0,5}|[a-z]{0,5})",
            data in proptest::option::of(".{0,40}"),
            channel in proptest::option::of("[a-z-]{0,12}"),
        ) {
            let message = json!({"event": event, "data": data, "channel": channel});
            let _ = ClientMessage::parse(&message.to_string());
            let nested = json!({"event": event, "data": {"channel": channel, "auth": data, "channel_data": data, "user_data": data}});
            let _ = ClientMessage::parse(&nested.to_string());
        }
    }
}
