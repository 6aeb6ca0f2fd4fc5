//! Topic history with the real binary: positions in publish answers, `GET /history`,
//! its errors, and the start-up checks of the `--history-*` flags.

mod common;

use std::time::Duration;

use common::{history, http, next_json, page_offsets, publish, Server, Ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

async fn connect(server: &Server, path: &str) -> Ws {
    tokio_tungstenite::connect_async(server.url(path))
        .await
        .expect("upgrade")
        .0
}

async fn publish_async(server: &Server, topic: &str, message: &str) -> Value {
    let (addr, topic, message) = (server.addr, topic.to_string(), message.to_string());
    let answer = tokio::task::spawn_blocking(move || publish(addr, "k", &topic, &message))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    json(&answer.body)
}

const KEY: &str = "Authorization: Bearer k";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn publications_get_contiguous_offsets_and_history_lists_them() {
    let server = Server::start(&["--workers", "1", "--api-key", "k", "--history-size", "3"]);
    let mut epoch = String::new();
    for (i, message) in ["one", r#"{"n":2}"#, "three", "four"].iter().enumerate() {
        let answer = publish(server.addr, "k", "news", message);
        assert_eq!(answer.status, 200, "{answer:?}");
        let body = json(&answer.body);
        assert_eq!(body["offset"], i as u64 + 1, "{body}");
        let e = body["epoch"].as_str().expect("an epoch").to_string();
        if i > 0 {
            assert_eq!(e, epoch, "one epoch while the server runs");
        }
        epoch = e;
    }
    // Size 3: offsets 2..=4 are kept.
    let (status, page) = history(server.addr, "topic=news");
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        (page["offset"].as_u64(), page["epoch"].as_str()),
        (Some(4), Some(epoch.as_str()))
    );
    assert_eq!(page_offsets(&page), [2, 3, 4]);
    // The JSON message is data as JSON; the others are strings.
    assert_eq!(page["publications"][0]["data"], json(r#"{"n":2}"#));
    assert_eq!(page["publications"][1]["data"], "three");

    let (_, page) = history(
        server.addr,
        &format!("topic=news&since=3&epoch={epoch}&limit=5"),
    );
    assert_eq!(page["publications"].as_array().unwrap().len(), 1, "{page}");
    let (_, page) = history(server.addr, "topic=news&since=0&limit=1");
    assert_eq!(
        page["publications"][0]["offset"], 2,
        "a page is cut at its limit"
    );

    // Topics without history (the clock's, or never published) and wrong positions.
    assert_eq!(history(server.addr, "topic=time").0, 404);
    assert_eq!(history(server.addr, "topic=other").0, 404);
    let (status, body) = history(server.addr, "topic=news&epoch=00000000");
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("epoch_changed")),
        "{body}"
    );
    let (status, body) = history(server.addr, "topic=news&since=99");
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("offset_ahead")),
        "{body}"
    );

    let metrics = http(server.addr, "GET", "/metrics", &[], b"").body;
    for line in [
        "c1m_history_topics 1",
        "c1m_history_publications 3",
        "c1m_recoveries_total{outcome=\"recovered\"} 0",
        "c1m_history_topic_bytes{topic=\"news\"}",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[test]
fn bad_history_requests_get_clear_errors() {
    let server = Server::start(&["--workers", "1", "--api-key", "k", "--history-size", "3"]);
    for query in [
        "",
        "topic=",
        "topic=news&since=-1",
        "topic=news&since=x",
        "topic=news&limit=0",
        "topic=news&limit=1001",
        "topic=news&limit=99999999999999999999",
        "topic=news&colour=red",
    ] {
        let (status, body) = history(server.addr, query);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{query}: {body}"
        );
    }
    let no_key = http(server.addr, "GET", "/history?topic=news", &[], b"");
    assert_eq!(no_key.status, 401, "{no_key:?}");
}

#[test]
fn without_history_publishes_have_no_position_and_history_says_how_to_turn_it_on() {
    let server = Server::start(&["--workers", "1", "--api-key", "k"]);
    let body = json(&publish(server.addr, "k", "news", "x").body);
    assert!(
        body.get("offset").is_none() && body.get("epoch").is_none(),
        "{body}"
    );
    let (status, body) = history(server.addr, "topic=news");
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().contains("--history-size"),
        "{body}"
    );
}

#[test]
fn history_flags_are_checked_at_start_up() {
    for (args, says) in [
        (
            &["--history-for", "prices", "--workers", "1"][..],
            "PATTERN=SIZE",
        ),
        (
            &["--history-for", "a=5/soon", "--workers", "1"][..],
            "a=5/soon",
        ),
        (
            &["--history-max-bytes", "10", "--workers", "1"][..],
            "history-max-bytes",
        ),
        (
            &["--recovery-limit", "0", "--workers", "1"][..],
            "recovery-limit",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_c1m"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("run c1m");
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_client_resumes_from_its_position_at_connect_or_with_subscribe() {
    let server = Server::start(&["--workers", "1", "--api-key", "k", "--history-size", "10"]);
    let first = publish_async(&server, "news", "m1").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    publish_async(&server, "news", "m2").await;

    // Envelopes on request: topic, position, data.
    let mut live = connect(&server, "/?topic=news&envelope=1").await;
    publish_async(&server, "news", "m3").await;
    let got = next_json(&mut live).await;
    assert_eq!(
        got,
        json(&format!(
            r#"{{"topic":"news","offset":3,"epoch":"{epoch}","data":"m3"}}"#
        ))
    );

    // Resume in the URL: the answer, then 2 and 3, then live ones.
    let mut back = connect(&server, &format!("/?since=news:{epoch}:1")).await;
    let answer = next_json(&mut back).await;
    assert_eq!(
        (
            answer["ok"].as_bool(),
            answer["recovered"].as_bool(),
            answer["offset"].as_u64()
        ),
        (Some(true), Some(true), Some(3)),
        "{answer}"
    );
    assert_eq!(next_json(&mut back).await["data"], "m2");
    assert_eq!(next_json(&mut back).await["data"], "m3");
    publish_async(&server, "news", "m4").await;
    assert_eq!(next_json(&mut back).await["offset"], 4);

    // Resume with a subscribe command, on a connection that started on the clock.
    let mut later = connect(&server, "/").await;
    let since =
        format!(r#"{{"op":"subscribe","topic":"news","since":{{"offset":2,"epoch":"{epoch}"}}}}"#);
    later.send(Message::text(since.clone())).await.unwrap();
    let answer = next_json(&mut later).await;
    assert_eq!(answer["recovered"], true, "{answer}");
    let offsets = [
        next_json(&mut later).await["offset"].clone(),
        next_json(&mut later).await["offset"].clone(),
    ];
    assert_eq!(offsets, [json("3"), json("4")]);
    // Asking again while subscribed is refused (it could repeat what is on its way).
    later.send(Message::text(since)).await.unwrap();
    let again = next_json(&mut later).await;
    assert_eq!(again["ok"], false, "{again}");
}

#[tokio::test]
async fn a_client_is_told_when_it_cannot_recover() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--api-key",
        "k",
        "--history-size",
        "3",
        "--recovery-limit",
        "5",
    ]);
    let mut epoch = String::new();
    for i in 1..=8 {
        epoch = publish_async(&server, "news", &format!("m{i}")).await["epoch"]
            .as_str()
            .unwrap()
            .to_string();
    }
    // Kept: 6, 7, 8.
    for (since, reason) in [
        (format!("news:{epoch}:4"), "too_old"),
        (format!("news:{epoch}:1"), "over_recovery_limit"),
        ("news:00000000:7".to_string(), "epoch_changed"),
        (format!("news:{epoch}:999"), "offset_ahead"),
        (format!("other:{epoch}:0"), "epoch_changed"),
    ] {
        let mut ws = connect(&server, &format!("/?since={since}")).await;
        let answer = next_json(&mut ws).await;
        assert_eq!(answer["recovered"], false, "{since}: {answer}");
        assert_eq!(answer["reason"], reason, "{since}: {answer}");
        // Still subscribed: live publications come.
        let topic = since.split(':').next().unwrap().to_string();
        let published = publish_async(&server, &topic, "live").await;
        let got = next_json(&mut ws).await;
        assert_eq!(got["offset"], published["offset"], "{since}: {got}");
    }
    // A malformed position is refused at the upgrade with a reason.
    for bad in ["news", "news:e", "news:e:-1", "news::1", "news:e:x"] {
        let (status, body) = common::upgrade_status(server.addr, &format!("/?since={bad}"), &[]);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("since"), "{bad}: {body}");
    }
    // And in a command, with an error answer on an open connection.
    let mut ws = connect(&server, "/").await;
    ws.send(Message::text(
        r#"{"op":"subscribe","topic":"news","since":{"offset":"x"}}"#,
    ))
    .await
    .unwrap();
    let answer = next_json(&mut ws).await;
    assert_eq!(answer["ok"], false, "{answer}");
    // Without history, a position gets recovered: false, no_history.
}

#[tokio::test]
async fn resuming_while_publishing_goes_on_gives_every_publication_once_in_order() {
    let server = Server::start(&["--workers", "1", "--api-key", "k", "--history-size", "1000"]);
    common::clients_resume_while_publishing(&[&server], &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_workers_resuming_while_publishing_gives_every_publication_once_in_order() {
    // The master keeps the history; each worker asks it and joins the client when
    // the answer comes (behind every publication it covers).
    let server = Server::start(&["--workers", "3", "--api-key", "k", "--history-size", "1000"]);
    common::clients_resume_while_publishing(&[&server], &server).await;
    // Any worker answers GET /history from the master's store, the same way.
    for _ in 0..6 {
        let (status, page) = history(server.addr, "topic=feed&since=295&limit=3");
        assert_eq!(status, 200, "{page}");
        assert_eq!(page_offsets(&page), [296, 297, 298], "{page}");
        let (status, body) = history(server.addr, "topic=feed&epoch=00000000");
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("epoch_changed"))
        );
        assert_eq!(history(server.addr, "topic=none").0, 404);
    }
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("c1m_recoveries_total{outcome=\"recovered\"}"),
        "{metrics}"
    );
}

/// A publisher keeps publishing while clients come and go, each resuming from the last
/// offset it saw: every client must see 1..=N exactly once, in order.

#[tokio::test]
async fn without_history_a_position_is_answered_with_no_history() {
    let server = Server::start(&["--workers", "1", "--api-key", "k"]);
    let mut ws = connect(&server, "/?since=news:abcd:3").await;
    let answer = next_json(&mut ws).await;
    assert_eq!(
        (answer["recovered"].as_bool(), answer["reason"].as_str()),
        (Some(false), Some("no_history"))
    );
    publish_async(&server, "news", "x").await;
    let got = next_json(&mut ws).await;
    assert_eq!(
        got,
        json(r#"{"topic":"news","data":"x"}"#),
        "an envelope without a position"
    );
}

/// `POST /publish` that reports a failure instead of panicking (the worker that took
/// it may be killed): the answer's JSON, or `None`.
fn try_publish(addr: std::net::SocketAddr, topic: &str, message: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let body = serde_json::json!({ "topic": topic, "message": message }).to_string();
    let request = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| json(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_worker_resume_and_miss_nothing() {
    const CLIENTS: usize = 30;
    let server = Server::start(&["--workers", "3", "--api-key", "k", "--history-size", "1000"]);
    let (addr, pid) = (server.addr, server.child.id());
    let epoch = publish_async(&server, "feed", "start").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = server.url("/");
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let mut seen: Vec<u64> = vec![1];
                let mut sessions = 0;
                'session: loop {
                    sessions += 1;
                    assert!(sessions < 50, "too many reconnects");
                    let last = *seen.last().unwrap();
                    let url = format!("{url}?since=feed:{epoch}:{last}");
                    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    loop {
                        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                            .await
                            .expect("a message or the end within 10 s");
                        let Some(Ok(Message::Text(text))) = next else {
                            continue 'session; // the worker died: come back
                        };
                        let value = json(&text);
                        if value.get("op").is_some() {
                            assert_eq!(value["recovered"], true, "{value}");
                            continue;
                        }
                        seen.push(value["offset"].as_u64().expect("an offset"));
                        if value["data"] == "end" {
                            return (seen, sessions);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publisher = tokio::task::spawn_blocking(move || {
        for i in 0..300 {
            if i == 100 {
                // The worker holding the most sockets: with 30 clients they may all
                // be on one (a worker takes connections up to the mean + 64).
                let worker = common::children_of(pid)
                    .into_iter()
                    .max_by_key(|&w| common::tcp_sockets(w))
                    .expect("a worker");
                // SAFETY: kill(2) on a worker of the server this test started.
                unsafe { libc::kill(worker as i32, libc::SIGKILL) };
            }
            // A publish that a dying worker took may fail: publish again (a new
            // offset; clients must still see every offset once, in order).
            while try_publish(addr, "feed", &i.to_string()).is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        while try_publish(addr, "feed", "end").is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    publisher.await.unwrap();
    let mut moved = 0;
    for client in clients {
        let (seen, sessions) = client.await.unwrap();
        let expected: Vec<u64> = (1..=*seen.last().unwrap()).collect();
        assert_eq!(seen, expected, "every offset once, in order");
        moved += usize::from(sessions > 1);
    }
    assert!(moved > 0, "some clients were on the killed worker");
    drop(server);
}

/// Issue 16's first acceptance test: 10,000 clients of `c1m bench --reconnect
/// --recover` on three workers under a steady clock with history; one worker is
/// SIGKILLed once all are in. Every client is back at the end, those of the killed
/// worker resumed and were sent what they missed, and no publication was missed or
/// received twice by anyone (the bench checks every offset of every connection).
#[test]
fn ten_thousand_bench_clients_recover_everything_when_a_worker_is_killed() {
    const CLIENTS: u64 = 10_000;
    let server = Server::start(&[
        "--workers",
        "3",
        "--interval",
        "200ms",
        "--delay",
        "0",
        "--history-for",
        "time=1000",
    ]);
    let (addr, pid) = (server.addr, server.child.id());
    let url = server.url("/");
    let bench = std::thread::spawn(move || {
        common::run_bench(
            "recover-kill",
            &[
                "--url",
                &url,
                "--connections",
                &CLIENTS.to_string(),
                "--rate",
                "5000",
                "--reconnect",
                "--recover",
                "--duration",
                "20s",
            ],
        )
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while common::stats(addr, "node")["connections"] != CLIENTS {
        assert!(std::time::Instant::now() < deadline, "all clients in");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1)); // steady publishing, everyone has a position
    let worker = common::children_of(pid)
        .into_iter()
        .max_by_key(|&w| common::tcp_sockets(w))
        .expect("a worker");
    // SAFETY: kill(2) on a worker of the server this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let (output, text) = bench.join().expect("bench thread");
    let result = json(&text);
    let snapshot = &result["snapshot"];
    let recovery = &snapshot["recovery"];
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        snapshot["active"], CLIENTS,
        "every client is back:\n{report}"
    );
    let resumes = recovery["resumes"].as_u64().unwrap_or(0);
    assert!(
        resumes >= 1000,
        "the killed worker's clients resumed:\n{report}"
    );
    assert_eq!(
        recovery["recovered"], resumes,
        "every resume recovered:\n{report}"
    );
    assert!(recovery["replayed"].as_u64() > Some(0), "{report}");
    for zero in [
        "missed",
        "duplicates",
        "without_position",
        "unannounced_epoch_changes",
    ] {
        assert_eq!(recovery[zero], 0, "{zero}:\n{report}");
    }
    assert!(
        recovery["not_recovered"].as_object().unwrap().is_empty(),
        "{report}"
    );
    drop(server);
}

/// With a `--history-for time=…` rule the clock's ticks are publications with positions,
/// in one process and with workers (where the master keeps the history).
#[tokio::test]
async fn clock_ticks_get_positions_when_time_keeps_history() {
    for workers in ["1", "2"] {
        let server = Server::start(&[
            "--workers",
            workers,
            "--interval",
            "100ms",
            "--delay",
            "0",
            "--history-for",
            "time=5",
        ]);
        let mut ws = connect(&server, "/?envelope=1").await;
        let first = next_json(&mut ws).await;
        let second = next_json(&mut ws).await;
        assert_eq!(first["topic"], "time", "workers={workers}: {first}");
        let offset = first["offset"].as_u64().expect("an offset");
        assert_eq!(second["offset"].as_u64(), Some(offset + 1), "{second}");
        assert_eq!(first["epoch"], second["epoch"]);
        assert!(first["data"].as_u64().is_some(), "the stamp: {first}");
        // A resume from the first gets the ticks after it.
        let epoch = first["epoch"].as_str().unwrap();
        let mut back = connect(&server, &format!("/?since=time:{epoch}:{offset}")).await;
        let answer = next_json(&mut back).await;
        assert_eq!(answer["recovered"], true, "{answer}");
        let replayed = next_json(&mut back).await;
        assert_eq!(replayed["offset"].as_u64(), Some(offset + 1), "{replayed}");
    }
}

/// With workers the master keeps the store; any worker's `/metrics` shows its totals
/// (published by the master through the scoreboard once a second) and its largest
/// topics (sent to every worker once a second).
#[test]
fn with_workers_metrics_show_the_masters_history() {
    let server = Server::start(&["--workers", "2", "--api-key", "k", "--history-size", "5"]);
    for i in 0..7 {
        publish(server.addr, "k", "a", &format!("\"{i}\""));
    }
    publish(server.addr, "k", "b", "\"x\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = http(server.addr, "GET", "/metrics", &[], b"").body;
        let value = |name| common::metric_value(&metrics, name);
        let a = value("c1m_history_topic_bytes{topic=\"a\"}");
        if value("c1m_history_publications") == Some(6.0) && a.is_some() {
            assert_eq!(value("c1m_history_topics"), Some(2.0), "{metrics}");
            let b = value("c1m_history_topic_bytes{topic=\"b\"}");
            assert!(a > b && b > Some(0.0), "5 kept against 1: {metrics}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A worker that stops reading its master's channel is skipped past 16 MiB queued: its
/// clients would silently lack those publications. When the next one arrives with a
/// jump in offsets, the worker closes its clients of the topic that keep positions with
/// 1013, and they resume and recover what was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_worker_skipped_by_its_master_are_told_to_resume() {
    // The test reads its client only at the end: room for what is queued meanwhile.
    let server = Server::start(&[
        "--workers",
        "2",
        "--api-key",
        "k",
        "--history-size",
        "1000",
        "--max-pending-bytes",
        "268435456",
    ]);
    let mut ws = connect(&server, "/?topic=big&envelope=1").await;
    let first = publish_async(&server, "big", "0").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    assert_eq!(next_json(&mut ws).await["offset"], 1);
    let client_port = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.local_addr().unwrap().port(),
        _ => unreachable!("ws://"),
    };
    let worker = common::worker_serving(server.child.id(), server.addr.port(), client_port);
    common::stop_process(worker);
    // Publish to a worker that reads nothing until the master skips it (past 16 MiB
    // queued, beyond what the socket buffers took); each publish is answered once the
    // other worker counted it, or after the relay wait. The skip is counted in the
    // stopped worker's slot, which any worker's /metrics sums.
    let addr = server.addr;
    let big = serde_json::Value::from("a".repeat(900_000)).to_string();
    let skipped = move || {
        let metrics = http(addr, "GET", "/metrics", &[], b"").body;
        common::metric_value(&metrics, "c1m_publications_skipped_total").is_some_and(|v| v > 0.0)
    };
    let mut batches = 0;
    while !tokio::task::spawn_blocking(skipped).await.unwrap() {
        batches += 1;
        assert!(batches <= 12, "the master never skipped the stopped worker");
        let publishers: Vec<_> = (0..8)
            .map(|_| {
                let big = big.clone();
                std::thread::spawn(move || publish(addr, "k", "big", &big).status)
            })
            .collect();
        for publisher in publishers {
            assert_eq!(publisher.join().unwrap(), 200);
        }
    }
    common::resume_process(worker);
    // Small publications until the client is told to resume: the first one the worker
    // gets after the skip shows the jump.
    let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = tokio::spawn({
        let (addr, told) = (server.addr, std::sync::Arc::clone(&told));
        async move {
            let mut latest = 0;
            for _ in 0..40 {
                if told.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let answer =
                    tokio::task::spawn_blocking(move || publish(addr, "k", "big", "\"after\""))
                        .await
                        .unwrap();
                latest = json(&answer.body)["offset"].as_u64().unwrap();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            latest
        }
    });
    let mut seen = vec![1];
    let code = loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message or the close")
            .expect("open")
            .expect("no error");
        match msg {
            Message::Text(text) => seen.push(json(&text)["offset"].as_u64().unwrap()),
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            _ => {}
        }
    };
    told.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(code, Some(1013), "told to resume after {seen:?}");
    let latest = publisher.await.unwrap();
    let from = *seen.last().unwrap();
    let mut back = connect(&server, &format!("/?since=big:{epoch}:{from}")).await;
    assert_eq!(next_json(&mut back).await["recovered"], true);
    for offset in from + 1..=latest {
        assert_eq!(next_json(&mut back).await["offset"], offset);
    }
}

/// Issue 16's acceptance (4) with the real binary: the size and age limits are honoured,
/// and a flood of publications to 100,000 topics stays within `--history-max-bytes`
/// (the oldest go first, counted in `c1m_history_evicted_total`).
#[test]
fn limits_age_and_a_flood_of_topics_stay_within_bounds() {
    const MAX_BYTES: u64 = 1 << 19;
    let server = Server::start(&[
        "--workers",
        "1",
        "--api-key",
        "k",
        "--history-size",
        "3",
        "--history-for",
        "brief=3/300ms",
        "--history-max-bytes",
        &MAX_BYTES.to_string(),
    ]);
    let addr = server.addr;
    for i in 1..=5 {
        publish(addr, "k", "sized", &i.to_string());
        publish(addr, "k", "brief", &i.to_string());
    }
    let (_, page) = history(server.addr, "topic=sized");
    assert_eq!(page_offsets(&page), [3, 4, 5], "the last 3: {page}");
    std::thread::sleep(Duration::from_millis(600));
    let (_, page) = history(server.addr, "topic=brief");
    assert_eq!(page_offsets(&page), Vec::<u64>::new(), "aged out: {page}");
    assert_eq!(
        page["offset"], 5,
        "the topic keeps its position and epoch: {page}"
    );

    // The flood, over one kept-alive connection.
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let payload = serde_json::Value::from("x".repeat(64)).to_string();
    for t in 0..100_000 {
        let body = format!(r#"{{"topic":"flood-{t}","message":{payload}}}"#);
        let request = format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\n{KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(request.as_bytes()).unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        common::read_body(&mut reader);
    }
    let metrics = http(addr, "GET", "/metrics", &[], b"").body;
    let value = |name| {
        common::metric_value(&metrics, name).unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(value("c1m_history_bytes") <= MAX_BYTES as f64, "{metrics}");
    assert!(value("c1m_history_evicted_total") > 5_000.0, "{metrics}");
    assert!(value("c1m_history_topics") < 100_000.0, "{metrics}");
}
