//! Topics and the publish API, with the real binary: isolation between topics, the
//! subscribe protocol, the API key, broadcasts, and publishes through a multi-process
//! server (relayed by the master to every worker).

mod common;

use std::time::Duration;

use common::{http, publish, Server};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &Server, path: &str) -> Ws {
    tokio_tungstenite::connect_async(server.url(path))
        .await
        .expect("upgrade")
        .0
}

/// The next text message within `wait`, or `None`.
async fn text_within(ws: &mut Ws, wait: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(text) = msg {
            return Some(text.to_string());
        }
    }
}

async fn publish_async(server: &Server, topic: &str, message: &str) -> common::HttpResponse {
    let (addr, topic, message) = (server.addr, topic.to_string(), message.to_string());
    tokio::task::spawn_blocking(move || publish(addr, "k", &topic, &message))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_message_to_one_topic_never_reaches_another() {
    for workers in ["1", "3"] {
        let server = Server::start(&["--connect-only", "--api-key", "k", "--workers", workers]);
        let mut a = connect(&server, "/ws?topic=a").await;
        let mut b = connect(&server, "/topics/b").await;
        let mut both = connect(&server, "/?topic=a&topic=b").await;
        let mut time = connect(&server, "/").await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        let answer = publish_async(&server, "a", "for a").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["delivered"], 2, "workers={workers}: {body}");
        assert_eq!(body["topic"], "a");
        assert_eq!(publish_async(&server, "b", "for b").await.status, 200);

        let short = Duration::from_millis(300);
        assert_eq!(text_within(&mut a, short).await.as_deref(), Some("for a"));
        assert_eq!(text_within(&mut a, short).await, None, "a got b's message");
        assert_eq!(text_within(&mut b, short).await.as_deref(), Some("for b"));
        assert_eq!(text_within(&mut b, short).await, None, "b got a's message");
        assert_eq!(
            text_within(&mut both, short).await.as_deref(),
            Some("for a")
        );
        assert_eq!(
            text_within(&mut both, short).await.as_deref(),
            Some("for b")
        );
        assert_eq!(
            text_within(&mut time, short).await,
            None,
            "time got a topic message"
        );

        // A topic nobody is in: accepted, delivered to no one.
        let body = publish_async(&server, "nobody", "x").await.body;
        assert!(body.contains("\"delivered\":0"), "{body}");
    }
}

#[tokio::test]
async fn clients_subscribe_and_unsubscribe_with_json_commands() {
    let server = Server::start(&["--connect-only", "--api-key", "k", "--workers", "1"]);
    let mut ws = connect(&server, "/").await;
    let wait = Duration::from_secs(2);
    ws.send(Message::Text(r#"{"op":"subscribe","topic":"news"}"#.into()))
        .await
        .unwrap();
    assert_eq!(
        text_within(&mut ws, wait).await.as_deref(),
        Some(r#"{"ok":true,"op":"subscribe","topic":"news"}"#)
    );
    publish_async(&server, "news", "headline").await;
    assert_eq!(
        text_within(&mut ws, wait).await.as_deref(),
        Some("headline")
    );

    ws.send(Message::Text(
        r#"{"op":"unsubscribe","topic":"news"}"#.into(),
    ))
    .await
    .unwrap();
    assert!(text_within(&mut ws, wait)
        .await
        .unwrap()
        .contains("\"ok\":true"));
    let answer = publish_async(&server, "news", "missed").await;
    assert!(answer.body.contains("\"delivered\":0"), "{answer:?}");

    // Bad commands get an explanation, and the connection stays usable.
    for bad in [
        r#"{"op":"subscribe","topic":"no spaces"}"#,
        r#"{"op":"jump"}"#,
        "{",
    ] {
        ws.send(Message::Text(bad.into())).await.unwrap();
        let reply = text_within(&mut ws, wait).await.unwrap();
        assert!(reply.contains("\"ok\":false"), "{bad} → {reply}");
    }
    // A text message over the command size (4 KiB) is refused; an empty one, like any
    // text that is not a JSON object, is ignored without an answer.
    let long = format!(r#"{{"op":"subscribe","topic":"{}"}}"#, "x".repeat(5000));
    ws.send(Message::Text(long)).await.unwrap();
    let reply = text_within(&mut ws, wait).await.unwrap();
    assert!(reply.contains("\"ok\":false"), "{reply}");
    ws.send(Message::Text(String::new())).await.unwrap();
    ws.send(Message::Text(r#"{"op":"subscribe","topic":"news"}"#.into()))
        .await
        .unwrap();
    assert!(text_within(&mut ws, wait)
        .await
        .unwrap()
        .contains("\"ok\":true"));
}

#[test]
fn the_publish_api_needs_the_key() {
    let server = Server::start(&["--connect-only", "--api-key", "s3cret", "--workers", "1"]);
    let body = br#"{"topic":"a","message":"m"}"#;
    let json = "Content-Type: application/json";
    let missing = http(server.addr, "POST", "/publish", &[json], body);
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(
        missing.head.contains("WWW-Authenticate: Bearer"),
        "{}",
        missing.head
    );
    let wrong = http(
        server.addr,
        "POST",
        "/publish",
        &[json, "Authorization: Bearer nope"],
        body,
    );
    assert_eq!(wrong.status, 401);
    let right = http(
        server.addr,
        "POST",
        "/publish",
        &[json, "Authorization: Bearer s3cret"],
        body,
    );
    assert_eq!(right.status, 200, "{right:?}");
    let broadcast = http(
        server.addr,
        "POST",
        "/broadcast",
        &["Authorization: Bearer wrong"],
        b"x",
    );
    assert_eq!(broadcast.status, 401);
    let get = http(server.addr, "GET", "/publish", &[], b"");
    assert_eq!(get.status, 405);
    let bad = http(
        server.addr,
        "POST",
        "/publish",
        &[json, "Authorization: Bearer s3cret"],
        b"{\"message\":1}",
    );
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("missing topic"), "{}", bad.body);

    // Without --api-key the API is off.
    let open = Server::start(&["--connect-only", "--workers", "1"]);
    let off = http(
        open.addr,
        "POST",
        "/publish",
        &[json, "Authorization: Bearer s3cret"],
        body,
    );
    assert_eq!(off.status, 403);
    assert!(off.body.contains("--api-key"), "{}", off.body);
}

#[tokio::test]
async fn broadcast_reaches_every_connection_in_every_worker() {
    let server = Server::start(&["--connect-only", "--api-key", "k", "--workers", "2"]);
    let mut clients = Vec::new();
    for i in 0..20 {
        let path = if i % 2 == 0 { "/" } else { "/?topic=x" };
        clients.push(connect(&server, path).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = server.addr;
    let answer = tokio::task::spawn_blocking(move || {
        http(
            addr,
            "POST",
            "/broadcast",
            &["Authorization: Bearer k"],
            b"to all",
        )
    })
    .await
    .unwrap();
    assert_eq!(answer.body.trim(), r#"{"delivered":20}"#, "{answer:?}");
    for ws in &mut clients {
        assert_eq!(
            text_within(ws, Duration::from_secs(2)).await.as_deref(),
            Some("to all")
        );
    }
}

#[tokio::test]
async fn stats_count_subscribers_over_every_worker() {
    for workers in ["1", "3"] {
        let server = Server::start(&["--connect-only", "--workers", workers]);
        let _clients = [
            connect(&server, "/?topic=a").await,
            connect(&server, "/topics/b").await,
            connect(&server, "/?topic=a&topic=b").await,
            connect(&server, "/").await,
        ];
        // Workers send their topic counts to the master once a second.
        let addr = server.addr;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let node = tokio::task::spawn_blocking(move || loop {
            let stats = common::stats(addr, "node");
            if stats["subscriptions"] == 5 || std::time::Instant::now() > deadline {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(100));
        })
        .await
        .unwrap();
        assert_eq!(node["scope"], "node");
        assert_eq!(node["connections"], 4, "workers={workers}: {node}");
        assert_eq!(node["workers"], workers.parse::<u64>().unwrap(), "{node}");
        assert_eq!(node["topics"]["a"], 2, "{node}");
        assert_eq!(node["topics"]["b"], 2, "{node}");
        assert_eq!(node["topics"]["time"], 1, "{node}");
        assert_eq!(node["topics_truncated"], false, "{node}");
        // Without a broker the cluster is this node alone.
        let cluster = tokio::task::spawn_blocking(move || common::stats(addr, "cluster"))
            .await
            .unwrap();
        assert_eq!(cluster["nodes"], 1, "{cluster}");
        assert_eq!(cluster["topics"], node["topics"], "{cluster}");
        let bad =
            tokio::task::spawn_blocking(move || http(addr, "GET", "/stats?scope=galaxy", &[], b""))
                .await
                .unwrap();
        assert_eq!(bad.status, 400, "{bad:?}");
    }
}
