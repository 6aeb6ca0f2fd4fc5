//! Integration tests of `c1m serve`: the real binary on an ephemeral port, driven by an
//! independent client (tokio-tungstenite) and by hand-made raw frames.

mod common;

use std::time::Duration;

use common::{client_frame, now_ms, RawClient, Server, UPGRADE};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &Server, path: &str) -> Ws {
    let (ws, response) = tokio_tungstenite::connect_async(server.url(path))
        .await
        .expect("upgrade");
    assert_eq!(response.status(), 101);
    ws
}

/// Reads the next text message, answering nothing else.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("stream open")
            .expect("valid message");
        match msg {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_receive_every_broadcast() {
    const CLIENTS: usize = 1000;
    const ROUNDS: usize = 5;
    // The gate makes the first broadcast wait until every client is connected.
    let server = Server::start(&["--interval", "200ms", "--total", &CLIENTS.to_string()]);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(connect(&server, &format!("/any/path/{i}")).await);
    }
    let mut tasks = Vec::new();
    for mut ws in clients {
        tasks.push(tokio::spawn(async move {
            let mut stamps = Vec::new();
            for _ in 0..ROUNDS {
                stamps.push(
                    next_text(&mut ws)
                        .await
                        .parse::<u64>()
                        .expect("decimal timestamp"),
                );
            }
            stamps
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.expect("client task"));
    }
    let first = &all[0];
    assert!(
        first.windows(2).all(|w| w[1] > w[0]),
        "timestamps increase: {first:?}"
    );
    for stamp in first {
        assert!(
            stamp.abs_diff(now_ms()) < 60_000,
            "milliseconds since the epoch: {stamp}"
        );
    }
    assert!(
        all.iter().all(|s| s == first),
        "every client got the same broadcasts"
    );
}

#[tokio::test]
async fn microsecond_precision() {
    let server = Server::start(&["--interval", "100ms", "--precision", "us"]);
    let mut ws = connect(&server, "/").await;
    let stamp: u64 = next_text(&mut ws).await.parse().unwrap();
    assert!(
        stamp.abs_diff(now_ms() * 1000) < 60_000_000,
        "µs since the epoch: {stamp}"
    );
}

#[tokio::test]
async fn connect_only_pushes_nothing() {
    let server = Server::start(&["--interval", "50ms", "--connect-only"]);
    let mut ws = connect(&server, "/").await;
    let got = tokio::time::timeout(Duration::from_millis(400), ws.next()).await;
    assert!(got.is_err(), "no message expected, got {got:?}");
}

#[tokio::test]
async fn ping_gets_pong_and_close_gets_close() {
    let server = Server::start(&["--connect-only"]);
    let mut ws = connect(&server, "/").await;
    ws.send(Message::Ping(b"are you there".to_vec()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec()));

    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match reply {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected close, got {other:?}"),
    }
    // Then the server ends the TCP connection.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

#[tokio::test]
async fn client_data_messages_are_accepted_fragmented_or_not() {
    let server = Server::start(&["--connect-only"]);
    let mut raw = RawClient::upgraded(server.addr).await;
    // Text "Hello" in two fragments with a ping in between, then a binary message.
    let mut bytes = client_frame(0x01, b"Hel", true);
    bytes.extend(client_frame(0x89, b"mid", true));
    bytes.extend(client_frame(0x80, b"lo", true));
    bytes.extend(client_frame(0x82, &[0, 1, 2], true));
    bytes.extend(client_frame(0x89, b"end", true));
    raw.send(&bytes).await;
    let pong1 = raw.read_frame().await.unwrap();
    let pong2 = raw.read_frame().await.unwrap();
    assert_eq!((pong1.opcode, pong1.payload.as_slice()), (0xA, &b"mid"[..]));
    assert_eq!((pong2.opcode, pong2.payload.as_slice()), (0xA, &b"end"[..]));
}

/// Each hostile frame gets its close code, while a bystander keeps receiving broadcasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_their_close_codes_and_spare_other_clients() {
    let server = Server::start(&["--interval", "50ms", "--max-message-size", "1024"]);
    let mut bystander = connect(&server, "/").await;
    next_text(&mut bystander).await;

    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", client_frame(0x81, b"hi", false), 1002),
        ("reserved bit", client_frame(0xC1, b"hi", true), 1002),
        ("reserved opcode", client_frame(0x83, b"hi", true), 1002),
        ("fragmented ping", client_frame(0x09, b"hi", true), 1002),
        ("long ping", client_frame(0x89, &[0; 126], true), 1002),
        ("stray continuation", client_frame(0x80, b"hi", true), 1002),
        (
            "invalid utf-8",
            client_frame(
                0x81,
                &[0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xED, 0xA0, 0x80],
                true,
            ),
            1007,
        ),
        (
            "invalid utf-8 in a fragment",
            client_frame(0x01, &[0xFF], true),
            1007,
        ),
        (
            "oversized message",
            client_frame(0x82, &[0; 1025], true),
            1009,
        ),
        (
            "bad close code",
            client_frame(0x88, &[0x03, 0xEC], true),
            1002,
        ),
        (
            "2^63-byte header",
            {
                let mut f = vec![0x82, 0xFF];
                f.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
                f.extend_from_slice(&[1, 2, 3, 4]);
                f
            },
            1009,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut raw = RawClient::upgraded(server.addr).await;
        raw.send(&bytes).await;
        assert_eq!(raw.expect_close().await, Some(code), "{name}");
        // The bystander still gets broadcasts.
        next_text(&mut bystander).await;
    }
}

#[tokio::test]
async fn plain_http_and_bad_handshakes_get_proper_responses() {
    let server = Server::start(&["--connect-only"]);
    let cases: Vec<(String, &str)> = vec![
        // `Connection: close`: a plain request is answered on a kept connection otherwise.
        (
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
            "HTTP/1.1 200 ",
        ),
        (
            "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
            "HTTP/1.1 404 ",
        ),
        (
            "DELETE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
            "HTTP/1.1 405 ",
        ),
        (
            UPGRADE.replace("Version: 13", "Version: 7"),
            "HTTP/1.1 426 ",
        ),
        (
            UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            "HTTP/1.1 400 ",
        ),
        (
            format!("GET / HTTP/1.1\r\nX-Huge: {}\r\n\r\n", "a".repeat(10_000)),
            "HTTP/1.1 431 ",
        ),
        (
            "\x16\x03\x01 not http at all\r\n\r\n".into(),
            "HTTP/1.1 400 ",
        ),
    ];
    for (request, expected) in cases {
        let mut raw = RawClient::connect(server.addr).await;
        raw.send(request.as_bytes()).await;
        let response = String::from_utf8_lossy(&raw.read_to_end().await).to_string();
        assert!(
            response.starts_with(expected),
            "{request:?} -> {response:?}"
        );
    }
    let mut raw = RawClient::connect(server.addr).await;
    raw.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await; // HTTP/1.0: closed after
    let page = String::from_utf8_lossy(&raw.read_to_end().await).to_string();
    assert!(page.contains("WebSocket push server"), "{page}");
}

#[tokio::test]
async fn silent_connection_is_dropped_after_the_handshake_timeout() {
    let server = Server::start(&["--connect-only", "--handshake-timeout", "300ms"]);
    let mut raw = RawClient::connect(server.addr).await;
    raw.send(b"GET / HTTP/1.1\r\n").await; // never finishes the head
    let started = std::time::Instant::now();
    raw.read_to_end().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
}

/// A client that floods pings and never reads its pongs is disconnected once its
/// queued output passes the bound; a bystander keeps receiving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_from_a_client_that_never_reads_is_bounded() {
    let server = Server::start(&["--interval", "50ms", "--max-pending-bytes", "65536"]);
    let mut bystander = connect(&server, "/").await;
    let mut flooder = RawClient::upgraded(server.addr).await;
    let ping = client_frame(0x89, &[7; 125], true);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    let mut disconnected = false;
    for _ in 0..400 {
        // 400 bursts of 1000 pings = 52 MB of pongs owed, far past kernel buffers + bound.
        let write = tokio::io::AsyncWriteExt::write_all(&mut flooder.stream, &burst);
        match tokio::time::timeout(Duration::from_secs(5), write).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                disconnected = true;
                break;
            }
            Err(_) => panic!("server stopped reading the flood but did not disconnect"),
        }
    }
    assert!(
        disconnected,
        "server kept accepting pings without reading limits"
    );
    next_text(&mut bystander).await;
    next_text(&mut bystander).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_connection_with_1001() {
    let mut server = Server::start(&["--connect-only"]);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(connect(&server, "/").await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = tokio::spawn(async move {
        let mut codes = Vec::new();
        for mut ws in clients {
            let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Message::Close(Some(frame)) = msg {
                codes.push(u16::from(frame.code));
            }
        }
        codes
    });
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(waiter.await.unwrap(), vec![1001; 20]);
}

#[tokio::test]
async fn echo_mode_returns_each_message_whole() {
    let server = Server::start(&["--connect-only", "--echo", "--workers", "1"]);
    let mut ws = connect(&server, "/").await;
    ws.send(Message::Text("héllo".into())).await.unwrap();
    ws.send(Message::Binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "héllo");
    let binary = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(binary, Message::Binary(vec![1, 2, 3]));

    // A fragmented message with a ping inside comes back as the pong, then the message.
    let mut raw = RawClient::upgraded(server.addr).await;
    let mut bytes = client_frame(0x01, b"frag", true);
    bytes.extend(client_frame(0x89, b"p", true));
    bytes.extend(client_frame(0x80, b"mented", true));
    raw.send(&bytes).await;
    let pong = raw.read_frame().await.unwrap();
    let echo = raw.read_frame().await.unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"p"[..]));
    assert_eq!(
        (echo.opcode, echo.fin, echo.payload.as_slice()),
        (0x1, true, &b"fragmented"[..])
    );
}

#[tokio::test]
async fn without_echo_plain_client_messages_are_ignored() {
    let server = Server::start(&["--connect-only", "--workers", "1"]);
    let mut ws = connect(&server, "/").await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(got.is_err(), "nothing comes back: {got:?}");
}

#[test]
fn bad_flags_and_a_busy_port_are_refused_clearly() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--interval", "0s"], "greater than zero"),
        (vec!["--interval", "soon"], "expected e.g."),
        (vec!["--workers", "0"], "auto"),
        (vec!["--listen", "nowhere"], "--listen"),
        (vec!["--precision", "ns"], "--precision"),
        (
            vec!["--listen", &busy_addr, "--workers", "1"],
            "cannot listen on",
        ),
        (
            vec!["--listen", &busy_addr, "--workers", "2"],
            "cannot listen on",
        ),
    ];
    for (args, needle) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_c1m"))
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Connects from `source` (a loopback address) and sends an upgrade; returns the status
/// line's code and the socket (kept open by the caller).
fn upgrade_from(server: &Server, source: &str) -> (u16, std::net::TcpStream) {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let source: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(UPGRADE.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    let code = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
    (code, stream)
}

#[test]
fn per_address_connection_limit() {
    let server = Server::start(&[
        "--connect-only",
        "--workers",
        "1",
        "--max-connections-per-ip",
        "3",
    ]);
    let mut held: Vec<_> = (0..3).map(|_| upgrade_from(&server, "127.0.0.1")).collect();
    assert!(held.iter().all(|(code, _)| *code == 101));
    let (code, refused) = upgrade_from(&server, "127.0.0.1");
    assert_eq!(code, 429, "a fourth from the same address");
    let (code, _other) = upgrade_from(&server, "127.0.0.2");
    assert_eq!(code, 101, "another address is not affected");
    // One leaves (and the refused socket, which counted until it closed): room for one.
    held.pop();
    drop(refused);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(upgrade_from(&server, "127.0.0.1").0, 101);
}

/// A client that goes silent (as the far end of a half-open connection does: no data,
/// no pongs) is closed by the idle timeout and its socket released after the close
/// timeout, while a normal client on the same server keeps receiving.
#[tokio::test]
async fn silent_and_half_open_connections_are_reaped() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--interval",
        "100ms",
        "--ping-interval",
        "100ms",
        "--idle-timeout",
        "500ms",
        "--close-timeout",
        "300ms",
    ]);
    let pid = server.child.id();
    let before = common::tcp_sockets(pid);
    // Ten silent clients that never read nor write again after their upgrade.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(RawClient::upgraded(server.addr).await);
    }
    let mut ws = connect(&server, "/").await;
    assert_eq!(common::tcp_sockets(pid), before + 11);
    // The bystander keeps getting the clock (and answers pings as it reads).
    let started = std::time::Instant::now();
    let mut received = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let text = next_text(&mut ws).await;
        assert!(text.parse::<u64>().is_ok());
        received += 1;
    }
    assert!(received >= 10, "{received} broadcasts");
    // Idle timeout (≤ 0.6 s) + close timeout (0.3 s) have passed: only the bystander is left,
    // although the silent clients' sockets are still open on their side.
    assert_eq!(
        common::tcp_sockets(pid),
        before + 1,
        "silent sockets released"
    );
    drop(silent);
}

/// Upgrades with a permessage-deflate offer; returns the client and the 101's head.
async fn upgraded_with_deflate(server: &Server) -> (RawClient, String) {
    let mut client = RawClient::connect(server.addr).await;
    let request = UPGRADE.replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    );
    client.send(request.as_bytes()).await;
    let head = client.read_http_head().await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (client, head)
}

#[tokio::test]
async fn deflate_compresses_a_broadcast_once_for_those_who_asked() {
    use c1m_proto::deflate::{compress, Inflater};
    let server = Server::start(&[
        "--connect-only",
        "--workers",
        "1",
        "--deflate",
        "--api-key",
        "k",
    ]);
    let (mut compressed, head) = upgraded_with_deflate(&server).await;
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "{head}"
    );
    let mut plain = RawClient::upgraded(server.addr).await;
    let message = "the same words again and again; ".repeat(200);
    let addr = server.addr;
    let sent = message.clone();
    tokio::task::spawn_blocking(move || {
        let answer = common::publish(addr, "k", "time", &sent);
        assert!(answer.body.contains("\"delivered\":2"), "{answer:?}");
    })
    .await
    .unwrap();
    let frame = compressed.read_frame().await.unwrap();
    assert!(frame.rsv1 && frame.opcode == 1, "compressed text frame");
    assert!(
        frame.payload.len() < message.len() / 10,
        "{} bytes",
        frame.payload.len()
    );
    let mut out = Vec::new();
    Inflater::default()
        .inflate(&frame.payload, 1 << 20, &mut out)
        .unwrap();
    assert_eq!(out, message.as_bytes());
    let frame = plain.read_frame().await.unwrap();
    assert!(!frame.rsv1, "no offer, no compression");
    assert_eq!(frame.payload, message.as_bytes());

    // The client may send compressed commands too.
    let command = compress(br#"{"op":"subscribe","topic":"news"}"#);
    let frame = client_frame(0xC1, &command, true); // FIN + RSV1 + text
    compressed.send(&frame).await;
    let reply = compressed.read_frame().await.unwrap();
    let text = if reply.rsv1 {
        Inflater::default()
            .inflate(&reply.payload, 1 << 20, &mut out)
            .unwrap();
        out.clone()
    } else {
        reply.payload
    };
    assert_eq!(text, br#"{"ok":true,"op":"subscribe","topic":"news"}"#);
}

#[tokio::test]
async fn a_compression_bomb_gets_1009_and_bad_data_1007() {
    use c1m_proto::deflate::compress;
    let server = Server::start(&["--connect-only", "--workers", "1", "--deflate", "--echo"]);
    let bystander = upgraded_with_deflate(&server).await.0;
    // 10 MiB of zeros in about 48 KB: under --max-message-size (1 MiB) on the wire,
    // over it inflated.
    let bomb = compress(&vec![0u8; 10 << 20]);
    let (mut client, _) = upgraded_with_deflate(&server).await;
    client.send(&client_frame(0xC2, &bomb, true)).await;
    assert_eq!(client.expect_close().await, Some(1009));
    let (mut client, _) = upgraded_with_deflate(&server).await;
    client.send(&client_frame(0xC2, &[0xff; 32], true)).await;
    assert_eq!(client.expect_close().await, Some(1007));
    // Compressed text that inflates to invalid UTF-8.
    let (mut client, _) = upgraded_with_deflate(&server).await;
    client
        .send(&client_frame(0xC1, &compress(&[0xc3, 0x28]), true))
        .await;
    assert_eq!(client.expect_close().await, Some(1007));
    // RSV1 on a continuation frame is a protocol error.
    let (mut client, _) = upgraded_with_deflate(&server).await;
    let mut frames = client_frame(0x42, &compress(b"part"), true); // RSV1, no FIN
    frames.extend(client_frame(0xC0, b"more", true)); // continuation with RSV1
    client.send(&frames).await;
    assert_eq!(client.expect_close().await, Some(1002));
    // The bystander still echoes.
    let mut bystander = bystander;
    bystander
        .send(&client_frame(0x81, b"still here", true))
        .await;
    let echo = bystander.read_frame().await.unwrap();
    let mut out = Vec::new();
    let text = if echo.rsv1 {
        c1m_proto::deflate::Inflater::default()
            .inflate(&echo.payload, 1000, &mut out)
            .unwrap();
        out
    } else {
        echo.payload
    };
    assert_eq!(text, b"still here");
}

/// Reads one HTTP response (head and a `Content-Length` body) from a kept connection.
fn read_response(reader: &mut std::io::BufReader<std::net::TcpStream>) -> (String, String) {
    use std::io::{BufRead, Read};
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "closed mid-head: {head}"
        );
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Content-Length");
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn http_keeps_the_connection_for_the_next_request() {
    use std::io::{Read, Write};
    for workers in ["1", "2"] {
        let server = Server::start(&[
            "--connect-only",
            "--api-key",
            "k",
            "--workers",
            workers,
            "--handshake-timeout",
            "500ms",
        ]);
        let mut subscriber = RawClient::connect(server.addr).await;
        subscriber
            .send(UPGRADE.replace("/ws", "/?topic=a").as_bytes())
            .await;
        assert!(subscriber
            .read_http_head()
            .await
            .starts_with("HTTP/1.1 101"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let addr = server.addr;
        tokio::task::spawn_blocking(move || {
            let stream = std::net::TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = std::io::BufReader::new(stream);
            // Several requests, publishes included (answered after the master's count in a
            // multi-process server), on one connection.
            for i in 0..3 {
                let body = format!(r#"{{"topic":"a","message":"m{i}"}}"#);
                write!(
                    writer,
                    "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let (head, body) = read_response(&mut reader);
                assert!(head.contains("Connection: keep-alive"), "{head}");
                assert_eq!(body.trim(), r#"{"delivered":1,"topic":"a"}"#, "workers={workers}");
                writer.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                assert_eq!(read_response(&mut reader).1, "ok\n");
            }
            // `Connection: close` ends it after the answer.
            writer
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let (head, _) = read_response(&mut reader);
            assert!(head.contains("Connection: close"), "{head}");
            let mut rest = Vec::new();
            assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0, "closed");

            // Pipelined requests are not served: the first is answered, then a close.
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut all = String::new();
            stream.read_to_string(&mut all).unwrap();
            assert_eq!(all.matches("HTTP/1.1 200").count(), 1, "{all}");

            // An idle kept connection is closed after the handshake timeout.
            let stream = std::net::TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = std::io::BufReader::new(stream);
            writer.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            read_response(&mut reader);
            let started = std::time::Instant::now();
            let mut rest = Vec::new();
            assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0);
            assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        })
        .await
        .unwrap();
    }
}
