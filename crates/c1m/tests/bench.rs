//! Integration tests of `c1m bench` as a measuring instrument: against the real
//! `c1m serve` with injected faults, and against small hand-written hostile servers.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::time::Duration;

use c1m_bench::report::BenchResult;
use common::{json_path, Server};

/// Runs `c1m bench ARGS --json FILE` and returns its output and parsed result.
fn bench(name: &str, args: &[&str]) -> (Output, BenchResult) {
    let (output, json) = common::run_bench(name, args);
    (output, serde_json::from_str(&json).expect("valid result"))
}

fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}/")
}

#[test]
fn latency_percentiles_match_an_injected_delay() {
    let server = Server::start(&[
        "--interval",
        "200ms",
        "--total",
        "50",
        "--fault-stamp-offset",
        "50ms",
    ]);
    let (output, result) = bench(
        "latency",
        &["--url", &server.url("/"), "-c", "50", "--messages", "5"],
    );
    let h = &result.snapshot.latency;
    assert_eq!(h.len(), 250, "50 connections x 5 messages");
    let p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
    let p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
    // The stamp is in whole milliseconds, so up to 1 ms of truncation adds to the delay.
    assert!((50.0..56.0).contains(&p50_ms), "p50 {p50_ms} ms");
    assert!((50.0..70.0).contains(&p99_ms), "p99 {p99_ms} ms");
    assert_eq!(result.snapshot.missed_total(), 0);
    assert_eq!(
        result.snapshot.error_total(),
        0,
        "{:?}",
        result.snapshot.errors
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("message.latency") && report.contains("connections.setup.rate"),
        "{report}"
    );
}

#[test]
fn missed_deliveries_are_detected() {
    // The server skips every 10th connection in each broadcast: 5 of 50 per round
    // (one worker process, so "every 10th" counts over all 50).
    let server = Server::start(&[
        "--workers",
        "1",
        "--interval",
        "200ms",
        "--total",
        "50",
        "--fault-skip-every",
        "10",
    ]);
    let (_, result) = bench(
        "missed",
        &["--url", &server.url("/"), "-c", "50", "--duration", "2s"],
    );
    assert_complete_rounds_miss(&result, 50, 5);
}

/// At least three rounds completed, each expected at `expected` connections and missed
/// by `missed` of them.
fn assert_complete_rounds_miss(result: &BenchResult, expected: u64, missed: u64) {
    let complete: Vec<_> = result
        .snapshot
        .rounds
        .values()
        .filter(|r| r.complete)
        .collect();
    assert!(complete.len() >= 3, "rounds: {:?}", result.snapshot.rounds);
    for round in complete {
        assert_eq!(round.expected, expected, "{round:?}");
        assert_eq!(round.missed(), missed, "{round:?}");
    }
}

/// With `--procs 2` each bench worker has its own source address; the server skips
/// every message to one of them. That worker never sees a round, yet its connections
/// were open at every stamp: they must count as missed, 10 of 20 per round.
#[test]
fn a_bench_worker_that_receives_nothing_counts_every_round_as_missed() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--interval",
        "300ms",
        "--total",
        "20",
        "--fault-skip-source",
        "127.0.0.3",
    ]);
    let (_, result) = bench(
        "missed-procs",
        &[
            "--url",
            &server.url("/"),
            "-c",
            "20",
            "--procs",
            "2",
            "--source-ips",
            "127.0.0.2-127.0.0.3",
            "--duration",
            "3s",
        ],
    );
    assert_complete_rounds_miss(&result, 20, 10);
}

#[test]
fn connect_refused_is_counted() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_, result) = bench(
        "refused",
        &["--url", &url(port), "-c", "5", "--duration", "2s"],
    );
    assert_eq!(
        result.snapshot.errors.get("connect.refused"),
        Some(&5),
        "{:?}",
        result.snapshot.errors
    );
    assert_eq!(result.snapshot.established, 0);
}

/// How a fake server treats one connection.
type Handler = fn(std::net::TcpStream);

/// A hand-written server: each accepted connection is handled by `handle` on a thread.
fn fake_server(handle: Handler) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || handle(stream));
        }
    });
    addr
}

/// Reads the request head and answers a valid 101 (the key is taken from the request).
fn accept_upgrade(stream: &mut std::net::TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut key = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Sec-WebSocket-Key: ") {
            key = v.trim().to_string();
        }
    }
    let accept = c1m_proto::handshake::accept_key(&key);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).unwrap();
}

/// Keeps the connection until the client goes away.
fn drain(mut stream: std::net::TcpStream) {
    let mut buf = [0u8; 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// A server that refuses every upgrade with 503 and `Retry-After: 2`: with
/// `--reconnect`, the bench comes back no sooner than asked, so in 3 s one connection
/// tries twice (at 0 s and 2 s), not the ~7 times its own backoff would allow.
#[test]
fn reconnects_honour_retry_after() {
    let addr = fake_server(|mut s| {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n",
        );
    });
    let (_, result) = bench(
        "retry-after",
        &[
            "--url",
            &url(addr),
            "-c",
            "1",
            "--reconnect",
            "--duration",
            "3s",
        ],
    );
    let refused = result.snapshot.errors.get("handshake.status.503").copied();
    assert_eq!(refused, Some(2), "{:?}", result.snapshot.errors);
}

/// Against the real server's `--max-accept-rate`: a burst of 40 is mostly refused, and
/// every client gets in by coming back when asked.
#[test]
fn every_client_gets_in_through_an_accept_rate_by_retrying() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--connect-only",
        "--max-accept-rate",
        "50",
    ]);
    let (_, result) = bench(
        "accept-rate",
        &[
            "--url",
            &server.url("/"),
            "-c",
            "40",
            "--reconnect",
            "--duration",
            "12s",
        ],
    );
    let s = &result.snapshot;
    assert_eq!(s.active, 40, "{:?}", s.errors);
    let refused = s.errors.get("handshake.status.503").copied().unwrap_or(0);
    assert!(
        refused >= 10,
        "most of the burst was refused first: {:?}",
        s.errors
    );
    assert_eq!(s.error_total(), refused, "no other error: {:?}", s.errors);
}

#[test]
fn each_error_cause_is_counted() {
    let cases: Vec<(&str, Handler, &str)> = vec![
        (
            "rejected",
            |mut s| {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ =
                    s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            },
            "handshake.status.503",
        ),
        (
            "protocol",
            |mut s| {
                accept_upgrade(&mut s);
                // A masked frame from a server is a protocol error (RFC 6455 §5.1).
                let _ = s.write_all(&[0x81, 0x81, 1, 2, 3, 4, b'x' ^ 1]);
                drain(s);
            },
            "protocol.1002",
        ),
        (
            "closed",
            |mut s| {
                accept_upgrade(&mut s);
                let _ = s.write_all(&[0x88, 0x02, 0x03, 0xF3]); // close 1011
                drain(s);
            },
            "closed.1011",
        ),
        (
            "eof",
            |mut s| {
                accept_upgrade(&mut s);
                std::thread::sleep(Duration::from_millis(100));
            },
            "io.eof_without_close",
        ),
        (
            "silent",
            |s| {
                std::thread::sleep(Duration::from_secs(3));
                drop(s);
            },
            "handshake.timeout",
        ),
    ];
    for (name, handler, cause) in cases {
        let addr = fake_server(handler);
        let (_, result) = bench(
            name,
            &[
                "--url",
                &url(addr),
                "-c",
                "4",
                "--duration",
                "1500ms",
                "--connect-timeout",
                "500ms",
            ],
        );
        assert_eq!(
            result.snapshot.errors.get(cause),
            Some(&4),
            "{name}: {:?}",
            result.snapshot.errors
        );
        assert_eq!(
            result.snapshot.error_total(),
            4,
            "{name}: {:?}",
            result.snapshot.errors
        );
    }
}

#[test]
fn connect_timeout_is_counted() {
    // A listener that never accepts, with a backlog of 1: once its queue is full the kernel
    // drops further SYNs, so those connects hang until the bench's timeout. The ones that
    // got into the queue connect, and then time out waiting for the handshake.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(1).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let (_, result) = bench(
        "connect-timeout",
        &[
            "--url",
            &url(addr),
            "-c",
            "8",
            "--duration",
            "1500ms",
            "--connect-timeout",
            "400ms",
        ],
    );
    let errors = &result.snapshot.errors;
    let timeouts = errors.get("connect.timeout").copied().unwrap_or(0);
    assert!(timeouts >= 4, "{errors:?}");
    assert_eq!(
        timeouts + errors.get("handshake.timeout").copied().unwrap_or(0),
        8,
        "{errors:?}"
    );
    drop(socket);
}

#[test]
fn garbage_payloads_are_counted_not_fatal() {
    let addr = fake_server(|mut s| {
        accept_upgrade(&mut s);
        for payload in [&b"hello"[..], b"-5", b"{\"ts\":\"x\"}", b"\x00\x01"] {
            let mut frame = vec![0x82, payload.len() as u8];
            frame.extend_from_slice(payload);
            let _ = s.write_all(&frame);
        }
        drain(s);
    });
    let (_, result) = bench(
        "garbage",
        &["--url", &url(addr), "-c", "3", "--messages", "4"],
    );
    assert_eq!(result.snapshot.messages, 12);
    assert_eq!(result.snapshot.unparsable, 12);
    assert_eq!(result.snapshot.latency.len(), 0);
}

#[test]
fn server_shutdown_counts_closed_1001() {
    let mut server = Server::start(&["--connect-only"]);
    let url = server.url("/");
    let runner = std::thread::spawn(move || {
        bench("shutdown", &["--url", &url, "-c", "20", "--duration", "3s"])
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(server.terminate().success());
    let (_, result) = runner.join().unwrap();
    assert_eq!(
        result.snapshot.errors.get("closed.1001"),
        Some(&20),
        "{:?}",
        result.snapshot.errors
    );
}

#[test]
fn worker_processes_and_merge_add_up() {
    let server = Server::start(&["--interval", "200ms"]);
    let args = |procs: &'static str| {
        vec![
            "--url".to_string(),
            server.url("/"),
            "-c".into(),
            "40".into(),
            "--procs".into(),
            procs.into(),
            "--messages".into(),
            "3".into(),
        ]
    };
    let a_args = args("2");
    let (_, a) = bench(
        "procs-a",
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(a.snapshot.established, 40);
    assert!(a.snapshot.messages >= 120, "{}", a.snapshot.messages);
    assert_eq!(a.snapshot.latency.len(), a.snapshot.messages);

    let b_args = args("1");
    let (_, b) = bench(
        "procs-b",
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (pa, pb, merged) = (json_path("m-a"), json_path("m-b"), json_path("m-out"));
    std::fs::write(&pa, serde_json::to_string(&a).unwrap()).unwrap();
    std::fs::write(&pb, serde_json::to_string(&b).unwrap()).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args(["report", "merge"])
        .args([&pa, &pb])
        .arg("--json")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let m: BenchResult = serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    let mut both = a.snapshot.latency.clone();
    both.add(&b.snapshot.latency).unwrap();
    assert_eq!(
        m.snapshot.latency, both,
        "merged histogram equals one over both runs"
    );
    assert_eq!(
        m.snapshot.messages,
        a.snapshot.messages + b.snapshot.messages
    );
    assert_eq!(m.snapshot.established, 80);
    for p in [pa, pb, merged] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn bad_flags_are_refused_clearly() {
    for (args, needle) in [
        (vec!["--url", "http://x/"], "ws://"),
        (vec!["--connections", "0"], "--connections"),
        (vec!["--source-ips", "127.0.0.9-127.0.0.1"], "source"),
        (vec!["--procs", "5", "-c", "2"], "--procs"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_c1m"))
            .arg("bench")
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn ipv6_and_ipv4_source_addresses_work() {
    for (listen, sources) in [
        ("[::1]:0", "::1"),
        ("127.0.0.1:0", "127.0.0.2-127.0.0.4,127.0.0.9"),
    ] {
        let server = Server::start_on(listen, &["--workers", "1", "--interval", "200ms"]);
        let (_, result) = bench(
            "sources",
            &[
                "--url",
                &server.url("/"),
                "-c",
                "40",
                "--messages",
                "2",
                "--source-ips",
                sources,
            ],
        );
        assert_eq!(
            result.snapshot.established, 40,
            "{sources}: {:?}",
            result.snapshot.errors
        );
        assert_eq!(result.snapshot.missed_total(), 0);
    }
}

#[test]
fn lifetime_churn_with_reconnect_keeps_every_connection_up() {
    let server = Server::start(&["--workers", "1", "--connect-only"]);
    let (_, result) = bench(
        "churn",
        &[
            "--url",
            &server.url("/"),
            "-c",
            "50",
            "--lifetime",
            "300ms",
            "--reconnect",
            "--duration",
            "2s",
        ],
    );
    let s = &result.snapshot;
    assert_eq!(s.error_total(), 0, "{:?}", s.errors);
    assert!(
        s.reconnects >= 100,
        "each connection lived ~0.3 s of 2 s: {} reconnects",
        s.reconnects
    );
    // Attempts still in flight when the run stops are neither established nor errors.
    assert!(
        s.established <= 50 + s.reconnects && s.established + 50 >= 50 + s.reconnects,
        "{} established",
        s.established
    );
    // At the moment the run stops a few are between their close and their replacement.
    assert!(s.active >= 40, "held at the end: {}", s.active);
}

#[test]
fn clients_reconnect_after_a_server_restart() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Server::start_on(
        &listen,
        &[
            "--workers",
            "1",
            "--connect-only",
            "--close-timeout",
            "200ms",
        ],
    );
    let url = format!("ws://{listen}/");
    let runner = std::thread::spawn(move || {
        bench(
            "restart",
            &["--url", &url, "-c", "50", "--reconnect", "--duration", "4s"],
        )
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(server.terminate().success());
    std::thread::sleep(Duration::from_millis(700));
    let _server = Server::start_on(&listen, &["--workers", "1", "--connect-only"]);
    let (_, result) = runner.join().unwrap();
    let s = &result.snapshot;
    assert_eq!(s.active, 50, "every client is back: {:?}", s.errors);
    assert_eq!(s.errors.get("closed.1001"), Some(&50), "{:?}", s.errors);
    for cause in s.errors.keys() {
        assert!(
            cause == "closed.1001" || cause == "connect.refused",
            "unexpected error {cause}: {:?}",
            s.errors
        );
    }
}

/// Thousands of connects and closes per second while a bystander keeps receiving.
#[test]
fn connect_close_storm_spares_other_clients() {
    let server = Server::start(&["--workers", "1", "--interval", "100ms"]);
    let bystander_url = server.url("/");
    let bystander = std::thread::spawn(move || {
        bench(
            "bystander",
            &["--url", &bystander_url, "-c", "5", "--duration", "2500ms"],
        )
    });
    let (_, storm) = bench(
        "storm",
        &[
            "--url",
            &server.url("/"),
            "-c",
            "300",
            "--rate",
            "100000",
            "--lifetime",
            "40ms",
            "--reconnect",
            "--duration",
            "2s",
        ],
    );
    let (_, calm) = bystander.join().unwrap();
    let s = &storm.snapshot;
    assert!(
        s.established >= 4000,
        "a storm of {} connections in 2 s",
        s.established
    );
    assert_eq!(s.error_total(), 0, "{:?}", s.errors);
    // The bystanders got every broadcast, on time, throughout.
    let c = &calm.snapshot;
    assert_eq!(c.error_total(), 0, "{:?}", c.errors);
    assert_eq!(c.missed_total(), 0);
    assert!(c.messages >= 5 * 20, "{} messages", c.messages);
    assert!(
        c.latency.value_at_quantile(0.99) < 100_000,
        "p99 {} µs",
        c.latency.value_at_quantile(0.99)
    );
}

#[test]
fn raw_tcp_lines_are_measured_like_messages() {
    // The raw-TCP baseline of bench/compare: no handshake, one timestamp per line, here
    // split across writes so lines arrive in pieces.
    let addr = fake_server(|mut stream| {
        for _ in 0..3 {
            let line = format!("{}\n", common::now_ms());
            let (head, tail) = line.split_at(4);
            let _ = stream.write_all(head.as_bytes());
            std::thread::sleep(Duration::from_millis(20));
            let _ = stream.write_all(tail.as_bytes());
            std::thread::sleep(Duration::from_millis(100));
        }
        drain(stream);
    });
    let (out, result) = bench(
        "raw-tcp",
        &[
            "--url",
            &format!("tcp://{addr}"),
            "-c",
            "20",
            "--messages",
            "3",
            "--duration",
            "10s",
        ],
    );
    let s = &result.snapshot;
    assert_eq!(
        s.established,
        20,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(s.messages, 60);
    assert_eq!(s.unparsable, 0);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    // Each line's second half came ≥ 20 ms after the stamp was taken.
    assert!(s.latency.min() >= 15_000, "min {} µs", s.latency.min());
    assert!(s.latency.max() < 1_000_000, "max {} µs", s.latency.max());
}
