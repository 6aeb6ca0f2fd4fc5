//! Server-Sent Events with the real binary: `GET /sse` streams, `id:` positions,
//! resuming with `Last-Event-ID` (in one process and across workers), the same token
//! check as an upgrade, clear errors for bad input, heartbeats.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{http, publish, Server};
use serde_json::Value;

const KEY: &str = "k";

/// One event of a stream: its `event:` name, `id:` and `data:` (lines joined).
#[derive(Debug, Default, PartialEq)]
struct Event {
    name: Option<String>,
    id: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// An open event stream, read line by line.
struct Stream {
    reader: BufReader<TcpStream>,
    head: String,
}

impl Stream {
    /// `GET PATH` with extra header lines; panics unless the answer is 200.
    fn open(addr: SocketAddr, path: &str, headers: &[&str]) -> Stream {
        let (status, stream) = Stream::request(addr, path, headers);
        assert_eq!(status, 200, "{}", stream.head);
        stream
    }

    fn request(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, Stream) {
        let mut socket = TcpStream::connect(addr).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n");
        for h in headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).expect("send");
        let mut reader = BufReader::new(socket);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).expect("read head") == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, Stream { reader, head })
    }

    /// The next event, skipping comments and the `retry:` field.
    fn next(&mut self) -> Event {
        let mut event = Event::default();
        let mut data: Vec<String> = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read an event");
            assert!(n > 0, "the stream ended");
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if data.is_empty() {
                    continue; // a comment's or retry's blank line
                }
                event.data = data.join("\n");
                return event;
            }
            match line.split_once(": ") {
                Some(("event", v)) => event.name = Some(v.into()),
                Some(("id", v)) => event.id = Some(v.into()),
                Some(("data", v)) => data.push(v.into()),
                _ => {} // ":" comments, "retry: 1000"
            }
        }
    }

    /// The next raw line (for heartbeats).
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a line");
        line
    }
}

fn publish_ok(addr: SocketAddr, topic: &str, message: &str) -> Value {
    let answer = publish(addr, KEY, topic, message);
    assert_eq!(answer.status, 200, "{answer:?}");
    serde_json::from_str(&answer.body).expect("publish answer")
}

/// Publishes and reads back: each publication is one event whose data is its envelope
/// and whose id is its position; a reconnect with `Last-Event-ID` gets the missed
/// ones after an `answer` event, then live ones.
fn stream_and_resume(server: &Server) {
    let addr = server.addr;
    let mut stream = Stream::open(addr, "/sse?topic=news", &[]);
    assert!(
        stream.head.contains("Content-Type: text/event-stream"),
        "{}",
        stream.head
    );
    let first = publish_ok(addr, "news", r#"{"n":1}"#);
    let epoch = first["epoch"].as_str().expect("an epoch").to_string();
    let event = stream.next();
    assert_eq!(event.id.as_deref(), Some(&*format!("news:{epoch}:1")));
    let envelope = event.json();
    assert_eq!(
        (
            &envelope["topic"],
            &envelope["offset"],
            &envelope["data"]["n"]
        ),
        (&Value::from("news"), &Value::from(1), &Value::from(1))
    );
    let last_id = event.id.unwrap();
    drop(stream);
    for n in 2..=3 {
        publish_ok(addr, "news", &format!(r#"{{"n":{n}}}"#));
    }
    let mut back = Stream::open(
        addr,
        "/sse?topic=news",
        &[&format!("Last-Event-ID: {last_id}")],
    );
    let answer = back.next();
    assert_eq!(answer.name.as_deref(), Some("answer"), "{answer:?}");
    assert_eq!(answer.json()["recovered"], true, "{answer:?}");
    for n in 2..=3u64 {
        let event = back.next();
        assert_eq!(event.id, Some(format!("news:{epoch}:{n}")));
        assert_eq!(event.json()["data"]["n"], n);
    }
    publish_ok(addr, "news", r#"{"n":4}"#);
    assert_eq!(back.next().json()["offset"], 4, "then live");
}

#[test]
fn events_carry_positions_and_last_event_id_resumes_in_one_process() {
    let server = Server::start(&["--workers", "1", "--api-key", KEY, "--history-size", "10"]);
    stream_and_resume(&server);
}

#[test]
fn events_carry_positions_and_last_event_id_resumes_across_workers() {
    let server = Server::start(&["--workers", "2", "--api-key", KEY, "--history-size", "10"]);
    stream_and_resume(&server);
}

#[test]
fn a_stream_without_a_topic_gets_the_clock_and_topics_without_history_have_no_id() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--api-key",
        KEY,
        "--interval",
        "100ms",
        "--delay",
        "0",
    ]);
    let mut clock = Stream::open(server.addr, "/sse", &[]);
    let tick = clock.next();
    assert_eq!(tick.id, None);
    assert_eq!(tick.json()["topic"], "time");
    assert!(tick.json()["data"].as_u64().is_some(), "{tick:?}");
    let mut news = Stream::open(server.addr, "/sse?topic=news", &[]);
    publish_ok(server.addr, "news", "\"plain\"");
    let event = news.next();
    assert_eq!(
        (&event.id, &event.json()["data"]),
        (&None, &Value::from("plain"))
    );
}

#[test]
fn bad_positions_and_missing_tokens_get_clear_answers() {
    let server = Server::start(&["--workers", "1", "--history-size", "10"]);
    for (header, why) in [
        ("Last-Event-ID: news:abc", "Last-Event-ID"),
        ("Last-Event-ID: news:e:-1", "offset"),
    ] {
        let (status, _) = Stream::request(server.addr, "/sse?topic=news", &[header]);
        assert_eq!(status, 400, "{header} ({why})");
    }
    let answer = http(server.addr, "GET", "/sse?topic=no%20way", &[], b"");
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("bad topic"), "{answer:?}");

    // The same token check as an upgrade, token in the query or the header.
    let jwt = Server::start(&["--workers", "1", "--jwt-secret", "s3cret"]);
    let (status, _) = Stream::request(jwt.addr, "/sse?topic=a", &[]);
    assert_eq!(status, 401);
    let token = hs256("s3cret");
    Stream::open(jwt.addr, &format!("/sse?topic=a&token={token}"), &[]);
    Stream::open(
        jwt.addr,
        "/sse?topic=a",
        &[&format!("Authorization: Bearer {token}")],
    );
}

#[test]
fn idle_streams_get_comment_heartbeats_and_count_as_connections() {
    let server = Server::start(&["--workers", "1", "--ping-interval", "1s"]);
    let mut stream = Stream::open(server.addr, "/sse?topic=quiet", &[]);
    assert_eq!(stream.line(), "retry: 1000\n");
    assert_eq!(stream.line(), "\n");
    assert_eq!(stream.line(), ":\n", "a heartbeat");
    assert_eq!(common::stats(server.addr, "node")["connections"], 1);
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("c1m_sse_streams_opened_total 1"),
        "{metrics}"
    );
}

fn hs256(secret: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": "user-1", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}
