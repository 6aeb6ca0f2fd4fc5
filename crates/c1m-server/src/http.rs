//! Plain HTTP on the WebSocket port: the info page, the publish API, metrics, health.
//!
//! A connection is kept for the next request when the client asks (HTTP/1.1's default;
//! see `Connection::answer_http`), so a publisher need not connect per message;
//! requests are not pipelined (one at a time per connection, as HTTP clients send
//! them). The request body has been read whole (bounded by `--max-message-size`)
//! before [`route`] sees it. See `docs/openapi.yaml`.

use bytes::Bytes;
use c1m_proto::handshake::{http_response, http_response_typed, PlainRequest};
use c1m_proto::{encode_frame, OpCode};
use serde_json::{json, Value};

use crate::auth::{check_api_key, query_pairs, split_target, unauthorized};
use crate::broker::Stored;
use crate::envelope;
use crate::history::{History, NotRecovered, Position};
use crate::target::{Delivery, Target};
use crate::topics::validate_name;

/// What the server must do with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Send this complete response.
    Respond(Vec<u8>),
    /// Publish `frame` to `target`, then answer with [`published`].
    Publish { target: Target, frame: Bytes },
    /// Answer with this node's numbers, or (`cluster`) the whole cluster's: see
    /// `node_stats`.
    Stats { cluster: bool },
    /// `GET /history`: the kept publications of a topic (see [`HistoryQuery`]).
    History(HistoryQuery),
    /// `POST /apps/{id}/events` or `/batch_events` (Pusher's HTTP API), signature
    /// checked: send each event to its channels.
    PusherEvents(usize, Vec<crate::pusher::Trigger>),
    /// `POST /apps/{id}/users/{user}/terminate_connections`, signature checked: the
    /// user's channel (its topic in the app).
    PusherTerminate(String),
    /// `GET /apps/{id}/channels…` (Pusher's read API) of app number `.0`, signature
    /// checked.
    PusherRead(usize, crate::pusher_api::Read),
}

/// The most publications one `GET /history` answer holds.
pub const MAX_HISTORY_PAGE: usize = 1000;

/// `GET /history?topic=T[&since=OFFSET][&epoch=E][&limit=N]`: the publications of `T`
/// after `since` (0 by default: all kept), at most `limit` (100 by default, at most
/// [`MAX_HISTORY_PAGE`]); with `epoch`, only if the topic is still in that epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    pub topic: String,
    pub since: u64,
    pub epoch: Option<String>,
    pub limit: usize,
}

/// The answer to a request to an API that needs `--api-key` (`api` names it) when the
/// API is off or the request's key is wrong; `None` lets it through.
fn refuse_without_key(cx: &Context<'_>, request: &PlainRequest, api: &str) -> Option<Outcome> {
    let Some(key) = cx.api_key else {
        let error = format!("the {api} API is off: start the server with --api-key");
        return Some(Outcome::Respond(json_response(
            403,
            "Forbidden",
            &json!({ "error": error }),
        )));
    };
    if !check_api_key(key, request.authorization.as_deref()) {
        return Some(Outcome::Respond(unauthorized()));
    }
    None
}

/// 400 with a JSON explanation.
fn bad_request(error: &str) -> Vec<u8> {
    json_response(400, "Bad Request", &json!({ "error": error }))
}

pub fn parse_history_query(query: &str) -> Result<HistoryQuery, String> {
    let mut topic = None;
    let mut since = 0;
    let mut epoch = None;
    let mut limit = 100;
    for (key, value) in query_pairs(query) {
        match key {
            "topic" => topic = Some(value.to_string()),
            "since" => {
                since = value.parse().map_err(|_| {
                    format!("since must be an offset (a whole number ≥ 0), not {value:?}")
                })?
            }
            "epoch" => epoch = Some(value.to_string()),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_HISTORY_PAGE).contains(n))
                    .ok_or_else(|| {
                        format!(
                        "limit must be a whole number from 1 to {MAX_HISTORY_PAGE}, not {value:?}"
                    )
                    })?
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: topic, since, epoch, limit"
                ))
            }
        }
    }
    let topic = topic.ok_or("missing topic: GET /history?topic=NAME")?;
    validate_name(&topic)?;
    Ok(HistoryQuery {
        topic,
        since,
        epoch,
        limit,
    })
}

/// Server state a route may need.
pub struct Context<'a> {
    /// The publish API's key; `None` turns the API off.
    pub api_key: Option<&'a str>,
    /// Whether the server takes new connections (for `/readyz`).
    pub ready: bool,
    /// Renders `/metrics` (only called for that path).
    pub metrics: &'a dyn Fn() -> String,
    /// The Pusher apps served here (`--pusher-app`), for `/apps/{id}/…`.
    pub pusher_apps: &'a [crate::pusher::App],
    /// The largest event the Pusher API takes (its data), in bytes.
    pub max_event_bytes: usize,
}

pub fn route(request: &PlainRequest, body: &[u8], cx: &Context<'_>) -> Outcome {
    let (path, query) = split_target(&request.path);
    let respond = Outcome::Respond;
    match (request.method.as_str(), path) {
        ("GET", "/") => respond(http_response(200, "OK", &[], INFO)),
        ("GET", "/healthz") => respond(http_response(200, "OK", &[], "ok\n")),
        ("GET", "/readyz") if cx.ready => respond(http_response(200, "OK", &[], "ready\n")),
        ("GET", "/readyz") => respond(http_response(
            503,
            "Service Unavailable",
            &[],
            "not ready: shutting down, full, or the cluster broker is down\n",
        )),
        ("GET", "/metrics") => respond(http_response_typed(
            200,
            "OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &[],
            (cx.metrics)().as_bytes(),
        )),
        ("GET", "/status") => respond(http_response_typed(
            200,
            "OK",
            "text/html; charset=utf-8",
            &[],
            STATUS_PAGE.as_bytes(),
        )),
        ("GET", "/stats") => {
            match query_pairs(query)
                .find(|(k, _)| *k == "scope")
                .map(|(_, v)| v)
            {
                None | Some("node") => Outcome::Stats { cluster: false },
                Some("cluster") => Outcome::Stats { cluster: true },
                Some(_) => respond(json_response(
                    400,
                    "Bad Request",
                    &json!({"error": "scope must be node (the default) or cluster"}),
                )),
            }
        }
        ("POST", "/publish") | ("POST", "/broadcast") => {
            if let Some(refusal) = refuse_without_key(cx, request, "publish") {
                return refusal;
            }
            match parse_publish(path == "/broadcast", request, query, body) {
                Ok((target, frame)) => Outcome::Publish { target, frame },
                Err(error) => respond(bad_request(&error)),
            }
        }
        ("POST", path)
            if path.starts_with("/apps/")
                && (path.ends_with("/events") || path.ends_with("/batch_events"))
                && !path.contains("/users/") =>
        {
            pusher_events(request, path, query, body, cx).unwrap_or_else(|refusal| refusal)
        }
        ("POST", path)
            if path.starts_with("/apps/") && path.ends_with("/terminate_connections") =>
        {
            pusher_terminate(request, path, query, body, cx).unwrap_or_else(|refusal| refusal)
        }
        ("GET", path) if path.starts_with("/apps/") => {
            pusher_read(request, path, query, cx).unwrap_or_else(|refusal| refusal)
        }
        ("GET", "/history") => {
            if let Some(refusal) = refuse_without_key(cx, request, "history") {
                return refusal;
            }
            match parse_history_query(query) {
                Ok(query) => Outcome::History(query),
                Err(error) => respond(bad_request(&error)),
            }
        }
        (_, "/publish" | "/broadcast") => respond(http_response(
            405,
            "Method Not Allowed",
            &[("Allow", "POST")],
            "use POST\n",
        )),
        ("GET", _) => respond(http_response(
            404,
            "Not Found",
            &[],
            "not found: connect with a WebSocket client, or see GET /\n",
        )),
        _ => respond(http_response(
            405,
            "Method Not Allowed",
            &[("Allow", "GET")],
            "method not allowed\n",
        )),
    }
}

/// The answer to a publish to `target`: how many connections it reached (with
/// `"complete": false` when some worker did not count in time), or 503 if the
/// cluster's broker did not take it.
pub fn published(target: &Target, position: Option<&Position>, delivery: Delivery) -> Vec<u8> {
    let (delivered, complete) = match delivery {
        Delivery::Refused => return broker_refusal(),
        Delivery::Counted {
            connections,
            complete,
        } => (connections, complete),
    };
    let mut body = json!({ "delivered": delivered });
    if let Target::Topic(name) = target {
        body["topic"] = name.as_str().into();
    }
    if !complete {
        body["complete"] = false.into();
    }
    if let Some(position) = position {
        body["offset"] = position.offset.into();
        body["epoch"] = position.epoch.as_str().into();
    }
    json_response(200, "OK", &body)
}

/// The answer to a publish the cluster's broker did not take.
pub fn broker_refusal() -> Vec<u8> {
    json_response(
        503,
        "Service Unavailable",
        &json!({ "error": "the broker is unavailable: the message was not published" }),
    )
}

/// A publish that found this process's fan-out queue full
/// (`server::delivery::MAX_QUEUED_PUBLICATIONS`): not published, retry shortly.
pub fn fan_out_busy() -> Vec<u8> {
    let mut text =
        json!({ "error": "the fan-out queue is full: the message was not published; retry later" })
            .to_string();
    text.push('\n');
    http_response_typed(
        503,
        "Service Unavailable",
        "application/json",
        &[("Retry-After", "1")],
        text.as_bytes(),
    )
}

/// `POST /apps/{id}/events` and `/batch_events` (Pusher's HTTP API): the app, its
/// signature, the events.
/// A JSON `{"error": …}` answer with `status` (400, 401 or 404).
fn json_refusal(status: u16, error: &str) -> Outcome {
    let reason = match status {
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Bad Request",
    };
    Outcome::Respond(json_response(status, reason, &json!({ "error": error })))
}

/// Finds app `id` and checks the request's signature: the app's number; `Err`: the
/// answer.
fn pusher_signed(
    request: &PlainRequest,
    id: &str,
    path: &str,
    query: &str,
    body: &[u8],
    cx: &Context<'_>,
) -> Result<usize, Outcome> {
    let Some(index) = cx.pusher_apps.iter().position(|app| app.id == id) else {
        let error =
            format!("unknown app id {id:?}: start the server with --pusher-app ID:KEY:SECRET");
        return Err(json_refusal(404, &error));
    };
    let app = &cx.pusher_apps[index];
    let now = crate::auth::unix_now();
    if let Err((status, error)) =
        crate::pusher::verify_signature(app, &request.method, path, query, body, now)
    {
        return Err(json_refusal(status, &error));
    }
    Ok(index)
}

/// `GET /apps/{id}/channels`, `/channels/{name}`, `/channels/{name}/users` (Pusher's
/// read API): the app, its signature, the parameters.
/// (`Err`, here and in the other `pusher_*` routes: the refusal to answer with.)
fn pusher_read(
    request: &PlainRequest,
    path: &str,
    query: &str,
    cx: &Context<'_>,
) -> Result<Outcome, Outcome> {
    let rest = path.strip_prefix("/apps/").unwrap_or_default();
    let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let app = pusher_signed(request, id, path, query, &[], cx)?;
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let read = crate::pusher_api::Read::parse(rest, &params)
        .map_err(|(status, error)| json_refusal(status, &error))?;
    Ok(Outcome::PusherRead(app, read))
}

/// `POST /apps/{id}/users/{user}/terminate_connections`: the app, its signature, the
/// user.
fn pusher_terminate(
    request: &PlainRequest,
    path: &str,
    query: &str,
    body: &[u8],
    cx: &Context<'_>,
) -> Result<Outcome, Outcome> {
    let rest = path.strip_prefix("/apps/").unwrap_or_default();
    let parts: Vec<&str> = rest.split('/').collect();
    let [id, "users", user, "terminate_connections"] = parts[..] else {
        return Err(json_refusal(
            404,
            "expected /apps/ID/users/USER/terminate_connections",
        ));
    };
    let app = pusher_signed(request, id, path, query, body, cx)?;
    crate::pusher::check_user_id(user).map_err(|error| json_refusal(400, &error))?;
    let channel = format!("{}{user}", crate::pusher::USER_CHANNEL_PREFIX);
    Ok(Outcome::PusherTerminate(crate::pusher::topic_of(
        cx.pusher_apps,
        app,
        &channel,
    )))
}

fn pusher_events(
    request: &PlainRequest,
    path: &str,
    query: &str,
    body: &[u8],
    cx: &Context<'_>,
) -> Result<Outcome, Outcome> {
    let rest = path.strip_prefix("/apps/").unwrap_or_default();
    let (id, batch) = match rest.strip_suffix("/batch_events") {
        Some(id) => (id, true),
        None => (rest.strip_suffix("/events").unwrap_or_default(), false),
    };
    let app = pusher_signed(request, id, path, query, body, cx)?;
    let triggers = if batch {
        crate::pusher::Trigger::parse_batch(body, cx.max_event_bytes)
    } else {
        crate::pusher::Trigger::parse(body, cx.max_event_bytes).map(|t| vec![t])
    };
    let triggers = triggers.map_err(|error| json_refusal(400, &error))?;
    Ok(Outcome::PusherEvents(app, triggers))
}

/// An answer composed elsewhere (the master's `GET /stats` or `GET /history`, a
/// publish through the cluster), with the reason phrase of its status.
pub fn json_answer(status: u16, body: &Value) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Service Unavailable",
    };
    json_response(status, reason, body)
}

/// The status and JSON body of `GET /history` (see [`HistoryQuery`]), from the
/// node's history: a page of the topic's kept publications, or why not.
pub fn history_answer(
    history: Option<&mut History>,
    query: &HistoryQuery,
    now: std::time::Instant,
) -> (u16, Value) {
    let Some(history) = history else {
        let error =
            "no topic keeps history: start the server with --history-size N (or --history-for)";
        return (404, json!({ "error": error }));
    };
    let page = history.page(
        &query.topic,
        query.epoch.as_deref(),
        query.since,
        query.limit,
        now,
    );
    let position = page
        .is_err()
        .then(|| history.position(&query.topic))
        .flatten();
    page_answer(&query.topic, page, position)
}

/// `GET /history` in a cluster over Redis, from what the broker keeps (`None`: the
/// broker could not say): the same answers as [`history_answer`] on one node, since
/// a cluster's positions are the broker's and a node's own copy holds only the topics
/// it listens to.
pub fn history_answer_from_broker(query: &HistoryQuery, stored: Option<Stored>) -> (u16, Value) {
    let Some(stored) = stored else {
        return page_answer::<Vec<u8>>(&query.topic, Err(NotRecovered::BrokerUnavailable), None);
    };
    let Some(epoch) = stored.epoch else {
        return page_answer::<Vec<u8>>(&query.topic, Err(NotRecovered::NoHistory), None);
    };
    let position = Position {
        offset: stored.offset,
        epoch,
    };
    let page =
        crate::history::check_page(&position, query.epoch.as_deref(), query.since).map(|()| {
            let mut publications = stored.publications;
            publications.retain(|(offset, _)| *offset > query.since);
            publications.truncate(query.limit);
            (publications, position.clone())
        });
    page_answer(&query.topic, page, Some(position))
}

/// A page of `topic`'s publications as `GET /history` answers it, or why not (with
/// where the topic stands, when known).
fn page_answer<F: AsRef<[u8]>>(
    topic: &str,
    page: Result<(Vec<(u64, F)>, Position), NotRecovered>,
    position: Option<Position>,
) -> (u16, Value) {
    match page {
        Ok((publications, position)) => {
            let publications: Vec<Value> = publications
                .iter()
                .map(|(offset, frame)| {
                    let mut object = serde_json::Map::new();
                    object.insert("offset".into(), (*offset).into());
                    envelope::put_payload(&mut object, frame.as_ref());
                    object.into()
                })
                .collect();
            let mut body = serde_json::Map::new();
            body.insert("topic".into(), topic.into());
            envelope::put_position(&mut body, &position);
            body.insert("publications".into(), publications.into());
            (200, body.into())
        }
        Err(reason) => {
            let status = match reason {
                NotRecovered::NoHistory => 404,
                NotRecovered::BrokerUnavailable => 503,
                _ => 409,
            };
            let mut body = json!({"topic": topic, "error": reason.as_str()});
            if let Some(position) = position {
                body["offset"] = position.offset.into();
                body["epoch"] = position.epoch.into();
            }
            (status, body)
        }
    }
}

/// The answer to a request that waited for another process longer than `bound`.
pub fn no_answer_in_time(bound: std::time::Duration) -> Vec<u8> {
    json_response(
        504,
        "Gateway Timeout",
        &json!({ "error": format!("the master process did not answer within {} s", bound.as_secs()) }),
    )
}

pub fn json_response(status: u16, reason: &str, body: &Value) -> Vec<u8> {
    let mut text = body.to_string();
    text.push('\n');
    http_response_typed(status, reason, "application/json", &[], text.as_bytes())
}

/// Reads a publish request: a JSON body `{"topic": ..., "message": ...}`, or any other
/// body as the message itself with the topic in the query (`?topic=NAME`). Returns the
/// topic and the encoded frame: text for a JSON string or UTF-8 body, binary otherwise.
fn parse_publish(
    broadcast: bool,
    request: &PlainRequest,
    query: &str,
    body: &[u8],
) -> Result<(Target, Bytes), String> {
    let is_json = request
        .content_type
        .as_deref()
        .is_some_and(|t| t.trim_start().starts_with("application/json"));
    let (topic, text, payload): (Option<String>, bool, Vec<u8>) = if is_json {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
        let topic = match value.get("topic") {
            None => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(_) => return Err("\"topic\" must be a string".into()),
        };
        let message = match value.get("message") {
            None => return Err("missing \"message\"".into()),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        (topic, true, message.into_bytes())
    } else {
        let topic = query_pairs(query)
            .find(|(k, _)| *k == "topic")
            .map(|(_, v)| v.to_string());
        let text = std::str::from_utf8(body).is_ok();
        (topic, text, body.to_vec())
    };
    let target = if broadcast {
        Target::All
    } else {
        let topic = topic.ok_or("missing topic: give \"topic\" in the JSON body or ?topic=NAME")?;
        validate_name(&topic)?;
        Target::Topic(topic)
    };
    let mut frame = Vec::with_capacity(payload.len() + 10);
    let opcode = if text { OpCode::Text } else { OpCode::Binary };
    encode_frame(opcode, &payload, None, &mut frame);
    Ok((target, Bytes::from(frame)))
}

const INFO: &str = "c1m: a WebSocket push server.\n\
Connect with a WebSocket client on any path (for example ws://HOST:PORT/) to receive\n\
the server's clock (topic `time`), in milliseconds since the Unix epoch, at every broadcast;\n\
ws://HOST:PORT/?topic=NAME or /topics/NAME joins other topics instead.\n\
HTTP: POST /publish, POST /broadcast (Authorization: Bearer API_KEY), GET /metrics,\n\
GET /stats (?scope=cluster), GET /status (a live page), GET /healthz, GET /readyz.\n";

/// `GET /status`: a page for a person watching a run; its script polls `/stats`.
const STATUS_PAGE: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn post(path: &str, content_type: Option<&str>, key: Option<&str>) -> PlainRequest {
        PlainRequest {
            method: "POST".into(),
            path: path.into(),
            authorization: key.map(|k| format!("Bearer {k}")),
            content_type: content_type.map(str::to_string),
            content_length: 0,
            keep_alive: true,
            ..PlainRequest::default()
        }
    }

    fn cx() -> Context<'static> {
        Context {
            api_key: Some("k"),
            ready: true,
            metrics: &|| String::new(),
            pusher_apps: &[],
            max_event_bytes: 1 << 16,
        }
    }

    fn status(outcome: &Outcome) -> u16 {
        match outcome {
            Outcome::Respond(bytes) => std::str::from_utf8(&bytes[9..12]).unwrap().parse().unwrap(),
            Outcome::Publish { .. }
            | Outcome::Stats { .. }
            | Outcome::History(_)
            | Outcome::PusherEvents(..)
            | Outcome::PusherRead(..)
            | Outcome::PusherTerminate(_) => 0,
        }
    }

    #[test]
    fn publish_needs_the_key() {
        let body = br#"{"topic":"a","message":"hi"}"#;
        let json = Some("application/json");
        assert_eq!(
            status(&route(&post("/publish", json, None), body, &cx())),
            401
        );
        assert_eq!(
            status(&route(&post("/publish", json, Some("x")), body, &cx())),
            401
        );
        match route(&post("/publish", json, Some("k")), body, &cx()) {
            Outcome::Publish { target, frame } => {
                assert_eq!(target, Target::Topic("a".into()));
                assert_eq!(&frame[..], b"\x81\x02hi");
            }
            other => panic!("{other:?}"),
        }
        let off = Context {
            api_key: None,
            ..cx()
        };
        assert_eq!(
            status(&route(&post("/publish", json, Some("k")), body, &off)),
            403
        );
    }

    #[test]
    fn publish_answers_say_what_was_counted() {
        let body = |answer: Vec<u8>| {
            let text = String::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            (head[9..12].to_string(), body.trim().to_string())
        };
        let topic = Target::Topic("a".into());
        assert_eq!(
            body(published(&topic, None, Delivery::whole(3))),
            ("200".into(), r#"{"delivered":3,"topic":"a"}"#.into())
        );
        let partial = Delivery::Counted {
            connections: 2,
            complete: false,
        };
        assert_eq!(
            body(published(&Target::All, None, partial)),
            ("200".into(), r#"{"complete":false,"delivered":2}"#.into())
        );
        assert_eq!(body(published(&topic, None, Delivery::Refused)).0, "503");
    }

    #[test]
    fn stats_scopes() {
        let get = |path: &str| PlainRequest {
            method: "GET".into(),
            path: path.into(),
            authorization: None,
            content_type: None,
            content_length: 0,
            keep_alive: true,
            ..PlainRequest::default()
        };
        for (path, cluster) in [
            ("/stats", false),
            ("/stats?scope=node", false),
            ("/stats?scope=cluster", true),
        ] {
            match route(&get(path), b"", &cx()) {
                Outcome::Stats { cluster: c } => assert_eq!(c, cluster, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        assert_eq!(status(&route(&get("/stats?scope=world"), b"", &cx())), 400);
    }

    #[test]
    fn raw_bodies_and_bad_requests() {
        match route(
            &post("/publish?topic=b", None, Some("k")),
            &[0xff, 0],
            &cx(),
        ) {
            Outcome::Publish { target, frame } => {
                assert_eq!(target, Target::Topic("b".into()));
                assert_eq!(
                    &frame[..],
                    b"\x82\x02\xff\x00",
                    "non-UTF-8 goes out as binary"
                );
            }
            other => panic!("{other:?}"),
        }
        let json = Some("application/json");
        for body in [
            &b"{"[..],
            br#"{"topic":"a"}"#,
            br#"{"message":"m"}"#,
            br#"{"topic":"a b","message":"m"}"#,
        ] {
            assert_eq!(
                status(&route(&post("/publish", json, Some("k")), body, &cx())),
                400
            );
        }
        match route(
            &post("/broadcast", json, Some("k")),
            br#"{"message":{"n":1}}"#,
            &cx(),
        ) {
            Outcome::Publish { target, frame } => {
                assert_eq!(target, Target::All);
                assert_eq!(&frame[2..], br#"{"n":1}"#);
            }
            other => panic!("{other:?}"),
        }
    }
}
