//! Clustering over real brokers (Debian's `nats-server` and `redis-server`, started here on
//! ephemeral ports): three c1m nodes on loopback, one single-process and two with worker
//! processes, so both owners of the broker link are covered.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, http, next_json, publish, Broker, RawClient, Server};

/// Three nodes on the broker: one single process, two with 2 workers each.
fn nodes(broker: &Broker) -> Vec<Server> {
    let url = broker.url();
    let base = ["--connect-only", "--api-key", "k", "--broker", url.as_str()];
    let nodes = vec![
        Server::start(&[&base[..], &["--workers", "1"]].concat()),
        Server::start(&[&base[..], &["--workers", "2"]].concat()),
        Server::start(&[&base[..], &["--workers", "2"]].concat()),
    ];
    for node in &nodes {
        wait_ready(node, true);
    }
    nodes
}

/// `count` nodes started with `args`, each ready.
fn ready_nodes(args: &[&str], count: usize) -> Vec<Server> {
    let nodes: Vec<Server> = (0..count).map(|_| Server::start(args)).collect();
    for node in &nodes {
        wait_ready(node, true);
    }
    nodes
}

/// Polls /readyz until it says `ready` (bounded).
fn wait_ready(node: &Server, ready: bool) {
    let want = if ready { 200 } else { 503 };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(node.addr, "GET", "/readyz", &[], b"").status != want {
        assert!(Instant::now() < deadline, "/readyz never answered {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn client(node: &Server, path: &str) -> RawClient {
    let mut client = RawClient::connect(node.addr).await;
    client
        .send(common::UPGRADE.replace("/ws", path).as_bytes())
        .await;
    let head = client.read_http_head().await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client
}

/// The next text frame within `wait`, or `None`.
async fn text_within(client: &mut RawClient, wait: Duration) -> Option<String> {
    let frame = tokio::time::timeout(wait, client.read_frame())
        .await
        .ok()??;
    assert_eq!(frame.opcode, 1, "a text frame");
    Some(String::from_utf8(frame.payload).unwrap())
}

async fn publish_on(node: &Server, topic: &str, message: &str) -> common::HttpResponse {
    let (addr, topic, message) = (node.addr, topic.to_string(), message.to_string());
    tokio::task::spawn_blocking(move || publish(addr, "k", &topic, &message))
        .await
        .unwrap()
}

async fn every_node_gets_it_once(kind: &'static str) {
    let broker = Broker::start(kind, free_port());
    let mut nodes = nodes(&broker);
    let mut in_a = Vec::new();
    let mut in_b = Vec::new();
    for node in &nodes {
        for _ in 0..3 {
            in_a.push(client(node, "/?topic=a").await);
        }
        in_b.push(client(node, "/?topic=b").await);
    }
    // Subscriptions travel worker → master → broker: give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Any node sums the cluster: 3 nodes, 5 worker processes, 12 clients (the numbers
    // travel in reports once a second: wait for them).
    // A publisher expects the nodes its own view knows to have subscribers (see
    // `publish_acks`), so every node must have heard every report before the publishes
    // below: wait until each one sums the whole cluster.
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let cluster = tokio::task::spawn_blocking(move || {
        let mut last = serde_json::Value::Null;
        for addr in addrs {
            last = loop {
                let stats = common::stats(addr, "cluster");
                if stats["nodes"] == 3 && stats["subscriptions"] == 12 || Instant::now() > deadline
                {
                    break stats;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
        }
        last
    })
    .await
    .unwrap();
    assert_eq!(cluster["nodes"], 3, "{kind}: {cluster}");
    assert_eq!(cluster["workers"], 5, "{kind}: {cluster}");
    assert_eq!(cluster["connections"], 12, "{kind}: {cluster}");
    assert_eq!(cluster["topics"]["a"], 9, "{kind}: {cluster}");
    assert_eq!(cluster["topics"]["b"], 3, "{kind}: {cluster}");
    assert_eq!(cluster["per_node"].as_array().map(Vec::len), Some(3));
    let node = common::stats(nodes[1].addr, "node");
    assert_eq!(
        (&node["connections"], &node["topics"]["a"]),
        (&4.into(), &3.into()),
        "{node}"
    );
    // Every node counts its deliveries back to the publisher: 9 clients of a, 3 of b.
    let answer = publish_on(&nodes[0], "a", "to a from node 1").await;
    assert_eq!(answer.status, 200, "{kind}: {answer:?}");
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["published"], true, "{body}");
    assert_eq!(body["delivered"], 9, "{kind}: {body}");
    assert_eq!(body["nodes"], 3, "{kind}: {body}");
    assert_eq!(body["complete"], true, "{kind}: {body}");
    let answer = publish_on(&nodes[2], "b", "to b from node 3").await;
    assert_eq!(answer.status, 200, "{kind}: {answer:?}");
    assert!(
        answer.body.contains("\"delivered\":3"),
        "{kind}: {}",
        answer.body
    );
    // A topic nobody is in, on any node: no node gets it, none is waited for.
    let started = Instant::now();
    let answer = publish_on(&nodes[1], "nobody", "x").await;
    assert!(
        answer.body.contains("\"delivered\":0"),
        "{kind}: {}",
        answer.body
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let short = Duration::from_millis(400);
    for (i, c) in in_a.iter_mut().enumerate() {
        let got = text_within(c, Duration::from_secs(5)).await;
        assert_eq!(
            got.as_deref(),
            Some("to a from node 1"),
            "{kind}: a-client {i}"
        );
        assert_eq!(
            text_within(c, short).await,
            None,
            "{kind}: a-client {i} got a second message"
        );
    }
    for (i, c) in in_b.iter_mut().enumerate() {
        let got = text_within(c, Duration::from_secs(5)).await;
        assert_eq!(
            got.as_deref(),
            Some("to b from node 3"),
            "{kind}: b-client {i}"
        );
        assert_eq!(
            text_within(c, short).await,
            None,
            "{kind}: b-client {i} got a's message"
        );
    }
    // A node dies: a publish waits for its count at most publish_acks::ACK_WAIT (5 s),
    // then answers with the nodes that counted, never pretending the count is whole.
    let _ = nodes[2].child.kill();
    let _ = nodes[2].child.wait();
    let started = Instant::now();
    let answer = publish_on(&nodes[0], "a", "after node 3 died").await;
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["delivered"], 6, "{kind}: {body}");
    assert_eq!(body["nodes"], 2, "{kind}: {body}");
    assert_eq!(body["nodes_expected"], 3, "{kind}: {body}");
    assert_eq!(body["complete"], false, "{kind}: {body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publish_reaches_every_node_exactly_once() {
    every_node_gets_it_once("nats").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publish_reaches_every_node_exactly_once() {
    every_node_gets_it_once("redis").await;
}

async fn outage_and_recovery(kind: &'static str) {
    let port = free_port();
    let mut broker = Broker::start(kind, port);
    let nodes = nodes(&broker);
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(client(node, "/?topic=a").await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.stop();
    for node in &nodes {
        wait_ready(node, false);
    }
    // Cluster numbers are unknown during the outage, and said so.
    for node in &nodes {
        let answer = http(node.addr, "GET", "/stats?scope=cluster", &[], b"");
        assert_eq!(answer.status, 503, "{kind}: {answer:?}");
        assert!(answer.body.contains("broker is down"), "{}", answer.body);
    }
    // Every publish during the outage is refused, on every node, with a reason.
    for node in &nodes {
        for _ in 0..3 {
            let answer = publish_on(node, "a", "lost?").await;
            assert_eq!(answer.status, 503, "{kind}: {answer:?}");
            assert!(
                answer.body.contains("broker is unavailable"),
                "{}",
                answer.body
            );
        }
    }
    // Clients stayed connected: each still answers a ping.
    for c in &mut clients {
        c.send(&common::client_frame(0x89, b"alive?", true)).await;
        let pong = c.read_frame().await.expect("still connected");
        assert_eq!(
            (pong.opcode, pong.payload.as_slice()),
            (0xA, &b"alive?"[..]),
            "{kind}"
        );
    }
    // The broker comes back on the same port: the nodes reconnect and resubscribe.
    let _broker = Broker::start(kind, port);
    for node in &nodes {
        wait_ready(node, true);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = publish_on(&nodes[1], "a", "after the outage").await;
    assert_eq!(answer.status, 200, "{kind}: {answer:?}");
    for (i, c) in clients.iter_mut().enumerate() {
        let got = text_within(c, Duration::from_secs(5)).await;
        assert_eq!(
            got.as_deref(),
            Some("after the outage"),
            "{kind}: client {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_refuses_publishes_and_recovers() {
    outage_and_recovery("nats").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_refuses_publishes_and_recovers() {
    outage_and_recovery("redis").await;
}

#[test]
fn a_bad_broker_url_names_the_flag_and_a_dead_broker_is_an_outage() {
    let out = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--broker",
            "kafka://x:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--broker") && err.contains("nats://"), "{err}");
    // Nothing listens on this port: the node serves, but is not ready and refuses publishes.
    let url = format!("redis://127.0.0.1:{}", free_port());
    let node = Server::start(&[
        "--connect-only",
        "--workers",
        "1",
        "--api-key",
        "k",
        "--broker",
        &url,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http(node.addr, "GET", "/readyz", &[], b"").status, 503);
    assert_eq!(http(node.addr, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(publish(node.addr, "k", "a", "m").status, 503);
    let metrics = http(node.addr, "GET", "/metrics", &[], b"").body;
    assert!(metrics.contains("c1m_broker_up 0"), "{metrics}");
}

/// Issue 16 over Redis: positions are the broker's (a Redis stream per topic), so a
/// client that leaves node 1 resumes on node 2, which never had the topic, and misses
/// nothing; and after node 2 is killed and a fresh node takes its place (an empty
/// store), the client resumes there from Redis too. Single-process nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_history_a_client_resumes_on_any_node_and_after_a_restart() {
    resume_on_any_node("redis", "1").await;
}

/// The same with nodes of two workers (the master keeps the node's copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_history_and_workers_a_client_resumes_on_any_node() {
    resume_on_any_node("redis", "2").await;
}

/// The same over NATS with JetStream (a stream per topic): single-process nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_history_a_client_resumes_on_any_node_and_after_a_restart() {
    resume_on_any_node("jetstream", "1").await;
}

/// Over JetStream with nodes of two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_history_and_workers_a_client_resumes_on_any_node() {
    resume_on_any_node("jetstream", "2").await;
}

/// JetStream keeps the history on disk and each node follows a topic with an ordered
/// consumer: across a restart of nats-server, a client that stayed connected gets every
/// publication once, in order, in the same epoch, and the history is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_history_a_broker_restart_loses_nothing() {
    let broker = Broker::start("jetstream", free_port());
    let args = history_node_args(&broker, "2", 100);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nodes = ready_nodes(&args, 2);
    let (mut ws, _) = tokio_tungstenite::connect_async(nodes[0].url("/?topic=feed&envelope=1"))
        .await
        .expect("upgrade");
    tokio::time::sleep(Duration::from_millis(300)).await; // node 1 follows the stream
    let mut epochs = Vec::new();
    for n in 1..=3 {
        let answer = publish_on(&nodes[1], "feed", &format!("\"m{n}\"")).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["offset"], n, "{body}");
        epochs.push(body["epoch"].clone());
    }
    let broker = broker.restart();
    for node in &nodes {
        wait_ready(node, true);
    }
    for n in 4..=6 {
        // The link may say it is up a moment before JetStream answers again.
        let deadline = Instant::now() + Duration::from_secs(10);
        let body = loop {
            let answer = publish_on(&nodes[1], "feed", &format!("\"m{n}\"")).await;
            if answer.status == 200 {
                break serde_json::from_str::<serde_json::Value>(&answer.body).unwrap();
            }
            assert!(Instant::now() < deadline, "{answer:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(body["offset"], n, "{body}");
        epochs.push(body["epoch"].clone());
    }
    assert!(
        epochs.iter().all(|e| *e == epochs[0]),
        "one epoch: {epochs:?}"
    );
    for n in 1..=6 {
        let got = next_json(&mut ws).await;
        assert_eq!(
            (got["offset"].as_u64(), &got["epoch"]),
            (Some(n), &epochs[0]),
            "{got}"
        );
    }
    let addr = nodes[0].addr;
    let (status, page) = tokio::task::spawn_blocking(move || common::history(addr, "topic=feed"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{page}");
    assert_eq!(common::page_offsets(&page), [1, 2, 3, 4, 5, 6], "{page}");
    drop(broker);
}

/// The flags of a node with `workers` workers, history of `size` per topic, on `broker`.
fn history_node_args(broker: &Broker, workers: &str, size: usize) -> Vec<String> {
    let size = size.to_string();
    [
        "--workers",
        workers,
        "--connect-only",
        "--api-key",
        "k",
        "--broker",
        &broker.url(),
        "--history-size",
        &size,
    ]
    .map(str::to_string)
    .to_vec()
}

async fn resume_on_any_node(kind: &'static str, workers: &str) {
    let broker = Broker::start(kind, free_port());
    let args = history_node_args(&broker, workers, 100);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut nodes = ready_nodes(&args, 3);
    let connect = |node: &Server, path: &str| {
        let url = node.url(path);
        async move {
            tokio_tungstenite::connect_async(url)
                .await
                .expect("upgrade")
                .0
        }
    };
    let mut ws = connect(&nodes[0], "/?topic=feed&envelope=1").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // node 1 subscribes on Redis
    let mut epoch = String::new();
    for n in 1..=3 {
        let answer = publish_on(&nodes[2], "feed", &format!("\"m{n}\"")).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["offset"], n, "the broker's position: {body}");
        epoch = body["epoch"].as_str().expect("an epoch").to_string();
    }
    for n in 1..=3 {
        let got = next_json(&mut ws).await;
        assert_eq!(
            (got["offset"].as_u64(), got["epoch"].as_str()),
            (Some(n), Some(&*epoch))
        );
    }
    drop(ws);
    for n in 4..=6 {
        publish_on(&nodes[2], "feed", &format!("\"m{n}\"")).await;
    }
    // Node 2 has never seen `feed`: the broker's history answers, GET /history too.
    let history_on = |node: &Server, query: &str| {
        let (addr, query) = (node.addr, query.to_string());
        tokio::task::spawn_blocking(move || common::history(addr, &query))
    };
    let (status, page) = history_on(&nodes[1], "topic=feed&since=3").await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert_eq!(common::page_offsets(&page), [4, 5, 6], "{page}");
    assert_eq!(
        (&page["offset"], page["epoch"].as_str()),
        (&6.into(), Some(&*epoch))
    );
    let mut back = connect(&nodes[1], &format!("/?since=feed:{epoch}:3")).await;
    let answer = next_json(&mut back).await;
    assert_eq!(answer["recovered"], true, "{answer}");
    for n in 4..=6 {
        assert_eq!(next_json(&mut back).await["offset"], n);
    }
    publish_on(&nodes[0], "feed", "\"m7\"").await;
    assert_eq!(next_json(&mut back).await["offset"], 7, "then live");
    drop(back);
    // Node 2 dies; two more while the client is away; a fresh node (an empty store)
    // takes the client back from Redis.
    nodes.remove(1);
    for n in 8..=9 {
        publish_on(&nodes[1], "feed", &format!("\"m{n}\"")).await;
    }
    let fresh = Server::start(&args);
    wait_ready(&fresh, true);
    let mut again = connect(&fresh, &format!("/?since=feed:{epoch}:7")).await;
    assert_eq!(next_json(&mut again).await["recovered"], true);
    for n in 8..=9 {
        assert_eq!(next_json(&mut again).await["offset"], n);
    }
    // GET /history on every node answers alike, from the broker.
    for node in [&nodes[0], &nodes[1], &fresh] {
        let (status, page) = history_on(node, "topic=feed&limit=2").await.unwrap();
        assert_eq!(status, 200, "{page}");
        assert_eq!(common::page_offsets(&page), [1, 2], "{page}");
        assert_eq!(page["offset"], 9, "{page}");
    }
    let (status, page) = history_on(&fresh, "topic=feed&epoch=00000000")
        .await
        .unwrap();
    assert_eq!(
        (status, &page["error"]),
        (409, &"epoch_changed".into()),
        "{page}"
    );
    let (status, page) = history_on(&fresh, "topic=feed&since=10").await.unwrap();
    assert_eq!((status, &page["offset"]), (409, &9.into()), "{page}");
    let (status, page) = history_on(&fresh, "topic=never").await.unwrap();
    assert_eq!(status, 404, "{page}");
    // A position from an epoch Redis never had: told so.
    let mut stale = connect(&fresh, "/?since=feed:00000000:2").await;
    let answer = next_json(&mut stale).await;
    assert_eq!(
        (&answer["recovered"], &answer["reason"]),
        (
            &serde_json::Value::from(false),
            &serde_json::Value::from("epoch_changed")
        ),
        "{answer}"
    );
    // The broker down: publishes are refused, and a resume the node cannot answer
    // alone says why instead of guessing.
    drop((again, stale));
    let mut broker = broker;
    broker.stop();
    wait_ready(&nodes[0], false);
    assert_eq!(publish_on(&nodes[0], "feed", "\"lost\"").await.status, 503);
    let (status, page) = history_on(&nodes[0], "topic=feed").await.unwrap();
    assert_eq!(
        (status, &page["error"]),
        (503, &"broker_unavailable".into()),
        "{page}"
    );
    let mut down = connect(&nodes[0], &format!("/?since=feed:{epoch}:1")).await;
    let answer = next_json(&mut down).await;
    assert_eq!(
        (&answer["recovered"], &answer["reason"]),
        (
            &serde_json::Value::from(false),
            &serde_json::Value::from("broker_unavailable")
        ),
        "{answer}"
    );
}

/// Over Redis, clients resuming on two nodes in turn while a third publishes get every
/// publication once, in order (the race between the broker's history and the live
/// stream is closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_history_resuming_while_another_node_publishes_misses_nothing() {
    resume_while_publishing("redis", "1").await;
}

/// The same with nodes of two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_history_and_workers_resuming_while_publishing_misses_nothing() {
    resume_while_publishing("redis", "2").await;
}

/// The same over NATS with JetStream (the consumer's progress plays the marker's part).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_history_resuming_while_another_node_publishes_misses_nothing() {
    resume_while_publishing("jetstream", "1").await;
}

/// Over JetStream with nodes of two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_history_and_workers_resuming_while_publishing_misses_nothing() {
    resume_while_publishing("jetstream", "2").await;
}

async fn resume_while_publishing(kind: &'static str, workers: &str) {
    let broker = Broker::start(kind, free_port());
    let args = history_node_args(&broker, workers, 1000);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nodes = ready_nodes(&args, 3);
    // Each client comes back to the other of two nodes every time: some resumes find
    // a node that listens to the topic (its own copy answers), some one that does not
    // (the broker's history answers).
    common::clients_resume_while_publishing(&[&nodes[0], &nodes[1]], &nodes[2]).await;
}
