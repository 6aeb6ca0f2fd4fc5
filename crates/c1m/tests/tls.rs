//! `wss://` with the real binary: a TLS round trip with a self-signed certificate made
//! in the test, certificate reload on SIGHUP (through the master of a multi-process
//! server), and a client that does not speak TLS; interop with other TLS stacks
//! (OpenSSL's `s_client`, headless Chromium, tokio-tungstenite over rustls), key
//! updates from the client, and resumption with the server's session tickets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Server, UPGRADE};
use rustls::pki_types::{CertificateDer, ServerName};

/// A fresh self-signed certificate for `localhost`, written to `dir` as cert.pem and
/// key.pem; returns its DER for the client's trust store.
fn make_cert(dir: &Path) -> CertificateDer<'static> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    certified.cert.der().clone()
}

fn cert_dir(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A client configuration trusting only `trusted` (it keeps session tickets: a second
/// connection with the same configuration may resume).
fn client_config(trusted: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Connects over TLS trusting only `trusted`, and completes the WebSocket upgrade.
fn wss_connect(server: &Server, trusted: &CertificateDer<'static>) -> TlsStream {
    wss_connect_with(server, &client_config(trusted))
}

/// [`wss_connect`] with a given client configuration.
fn wss_connect_with(server: &Server, config: &Arc<rustls::ClientConfig>) -> TlsStream {
    let name = ServerName::try_from("localhost").unwrap();
    let session = rustls::ClientConnection::new(Arc::clone(config), name).unwrap();
    let socket = TcpStream::connect(server.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(session, socket);
    tls.write_all(UPGRADE.as_bytes())
        .expect("TLS handshake and request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tls
}

/// Reads one small unmasked server frame: (opcode, payload).
fn read_frame(tls: &mut TlsStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 2];
    tls.read_exact(&mut header).expect("frame header");
    let len = (header[1] & 0x7f) as usize;
    assert!(len < 126, "small frames only here");
    let mut payload = vec![0u8; len];
    tls.read_exact(&mut payload).unwrap();
    (header[0] & 0x0f, payload)
}

#[test]
fn wss_round_trip_with_a_self_signed_certificate() {
    let dir = cert_dir("round-trip");
    let cert = make_cert(&dir);
    let server = Server::start(&[
        "--workers",
        "1",
        "--interval",
        "100ms",
        "--tls-cert",
        dir.join("cert.pem").to_str().unwrap(),
        "--tls-key",
        dir.join("key.pem").to_str().unwrap(),
    ]);
    let mut clients: Vec<TlsStream> = (0..20).map(|_| wss_connect(&server, &cert)).collect();
    for tls in &mut clients {
        for _ in 0..3 {
            let (opcode, payload) = read_frame(tls);
            assert_eq!(opcode, 1);
            let stamp: u64 = String::from_utf8(payload).unwrap().parse().unwrap();
            assert!(stamp.abs_diff(common::now_ms()) < 2000);
        }
    }
    // A ping over TLS gets its pong; a close gets its echo.
    let tls = &mut clients[0];
    tls.write_all(&common::client_frame(0x89, b"tls?", true))
        .unwrap();
    let pong = loop {
        let (opcode, payload) = read_frame(tls);
        if opcode == 0xA {
            break payload;
        }
    };
    assert_eq!(pong, b"tls?");

    // A client that speaks plain HTTP to the TLS port is refused; the server carries on.
    let mut plain = TcpStream::connect(server.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain.write_all(UPGRADE.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 101"));
    let mut again = wss_connect(&server, &cert);
    assert_eq!(read_frame(&mut again).0, 1);
}

#[test]
fn sighup_reloads_the_certificate_in_every_worker() {
    let (mut server, old, dir) = tls_server_with_workers("reload", "2", &["--connect-only"]);
    let before = wss_connect(&server, &old);
    let new = make_cert(&dir);
    assert_ne!(old, new);
    // SAFETY: kill(2) on the PID of a child we started and have not reaped.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    // Every new connection (whichever worker takes it) presents the new certificate.
    for _ in 0..6 {
        let tls = wss_connect(&server, &new);
        let presented = tls.conn.peer_certificates().unwrap()[0].clone();
        assert_eq!(presented, new);
    }
    // The TLS counters are the whole server's, whichever worker answers.
    let metrics = metrics_over_https(&server, &new);
    let full = tls_count(&metrics, r#"c1m_tls_handshakes_total{resumed="false"}"#);
    assert!(full >= 7.0, "{metrics}");
    drop(before);
    assert!(server.terminate().success());
}

#[test]
fn a_bad_certificate_stops_start_up_with_a_clear_message() {
    let dir = cert_dir("bad");
    make_cert(&dir);
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    for workers in ["1", "2"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_c1m"))
            .args(["serve", "--listen", "127.0.0.1:0", "--workers", workers])
            .args(["--tls-cert", dir.join("cert.pem").to_str().unwrap()])
            .args(["--tls-key", dir.join("key.pem").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot read a private key from"), "{err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert", "x.pem"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key"), "{err}");
}

/// Runs `c1m bench ARGS --quiet --json FILE`; returns the parsed result.
fn bench_json(name: &str, args: &[&str]) -> serde_json::Value {
    let (_, json) = common::run_bench(&format!("tls-{name}"), args);
    serde_json::from_str(&json).unwrap()
}

#[test]
fn the_bench_measures_wss_and_checks_certificates() {
    let dir = cert_dir("bench-server");
    make_cert(&dir);
    let server = Server::start(&[
        "--workers",
        "1",
        "--interval",
        "200ms",
        "--tls-cert",
        dir.join("cert.pem").to_str().unwrap(),
        "--tls-key",
        dir.join("key.pem").to_str().unwrap(),
    ]);
    let url = format!("wss://localhost:{}/", server.addr.port());
    let cert = dir.join("cert.pem");
    let trusted = bench_json(
        "trusted",
        &[
            "--url",
            &url,
            "-c",
            "200",
            "--procs",
            "2",
            "--messages",
            "3",
            "--ca-cert",
            cert.to_str().unwrap(),
        ],
    );
    let s = &trusted["snapshot"];
    assert_eq!(s["established"], 200, "{s}");
    assert_eq!(s["errors"], serde_json::json!({}));
    // Each of the 200 got its 3 (one that connected before a tick the last ones
    // missed gets a fourth while they wait for their third: TLS handshakes under load
    // can spread the ramp over a tick).
    assert!(s["messages"].as_u64() >= Some(600), "{s}");
    assert_eq!(trusted["config"]["tls_insecure"], false);

    let insecure = bench_json(
        "insecure",
        &[
            "--url",
            &url,
            "-c",
            "20",
            "--procs",
            "2",
            "--messages",
            "1",
            "--insecure",
        ],
    );
    assert_eq!(insecure["snapshot"]["established"], 20);
    assert_eq!(insecure["config"]["tls_insecure"], true);

    // Trusting another certificate: every handshake fails, and says why.
    let other = cert_dir("bench-other");
    make_cert(&other);
    let untrusted = bench_json(
        "untrusted",
        &[
            "--url",
            &url,
            "-c",
            "5",
            "--duration",
            "1s",
            "--ca-cert",
            other.join("cert.pem").to_str().unwrap(),
        ],
    );
    assert_eq!(untrusted["snapshot"]["established"], 0);
    assert_eq!(
        untrusted["snapshot"]["errors"]["tls.bad_certificate"], 5,
        "{}",
        untrusted["snapshot"]["errors"]
    );
}

/// A server on one process with a fresh certificate, and the certificate's DER and
/// directory.
fn tls_server(name: &str, extra: &[&str]) -> (Server, CertificateDer<'static>, PathBuf) {
    tls_server_with_workers(name, "1", extra)
}

/// [`tls_server`] with `--workers workers`.
fn tls_server_with_workers(
    name: &str,
    workers: &str,
    extra: &[&str],
) -> (Server, CertificateDer<'static>, PathBuf) {
    let dir = cert_dir(name);
    let cert = make_cert(&dir);
    let mut args = vec![
        "--workers".to_string(),
        workers.into(),
        "--tls-cert".into(),
        dir.join("cert.pem").to_str().unwrap().into(),
        "--tls-key".into(),
        dir.join("key.pem").to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Server::start(&args), cert, dir)
}

/// A client's KeyUpdate (rustls asks the server to update its own key too): the server
/// reads what follows with the new key, answers with its own, and keeps sending; and a
/// second connection resumes the first one's session with its ticket.
#[test]
fn key_updates_and_resumed_sessions_work() {
    let (server, cert, _dir) = tls_server("keyupdate", &["--interval", "50ms"]);
    let config = client_config(&cert);
    let mut tls = wss_connect_with(&server, &config);
    assert_eq!(tls.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
    for round in 0..3u8 {
        tls.conn.refresh_traffic_keys().unwrap();
        let ping = [b'k', round];
        tls.write_all(&common::client_frame(0x89, &ping, true))
            .unwrap();
        let pong = loop {
            let (opcode, payload) = read_frame(&mut tls);
            if opcode == 0xA {
                break payload;
            }
        };
        assert_eq!(pong, ping, "round {round}");
        // The ticks keep coming under the server's new key.
        assert_eq!(read_frame(&mut tls).0, 1);
    }
    let mut again = wss_connect_with(&server, &config);
    assert_eq!(
        again.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert_eq!(read_frame(&mut again).0, 1);
}

/// OpenSSL's `s_client`, over TLS 1.3 and over TLS 1.2: the upgrade is answered and
/// the clock's ticks arrive.
#[test]
fn openssl_s_client_gets_the_upgrade_and_the_ticks() {
    let (server, _cert, _dir) = tls_server("openssl", &["--interval", "50ms"]);
    for version in ["-tls1_3", "-tls1_2"] {
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-quiet", version, "-servername", "localhost"])
            .args(["-connect", &server.addr.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl (.ci/run installs it)");
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(UPGRADE.as_bytes())
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&chunk[..n]);
                // The response head and then two tick frames (0x81, a length, digits).
                let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n");
                if let Some(end) = head_end {
                    let ticks = seen[end..].iter().filter(|&&b| b == 0x81).count();
                    if ticks >= 2 {
                        let _ = tx.send(seen.clone());
                        break;
                    }
                }
            }
        });
        let seen = rx.recv_timeout(Duration::from_secs(10));
        let _ = child.kill();
        let _ = child.wait();
        let seen = seen.unwrap_or_else(|_| panic!("{version}: no upgrade and ticks"));
        assert!(seen.starts_with(b"HTTP/1.1 101"), "{version}: {seen:?}");
    }
}

/// Headless Chromium opens `wss://localhost:PORT/` (the test certificate, accepted
/// with `--ignore-certificate-errors`) and gets ticks; a tokio-tungstenite client over
/// rustls does too.
#[test]
fn chromium_and_tokio_tungstenite_speak_wss() {
    let (server, cert, _dir) = tls_server("interop", &["--interval", "50ms"]);
    let port = server.addr.port();
    let report = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let report_addr = report.local_addr().unwrap();
    let page = std::env::temp_dir().join(format!("c1m-wss-{}.html", std::process::id()));
    std::fs::write(
        &page,
        format!(
            r#"<!doctype html><meta charset="utf-8"><script>
const got = [];
const ws = new WebSocket("wss://localhost:{port}/");
ws.onmessage = (m) => {{
  got.push(m.data);
  if (got.length === 3) fetch("http://{report_addr}/", {{ method: "POST", mode: "no-cors", body: JSON.stringify(got) }});
}};
ws.onerror = () => fetch("http://{report_addr}/", {{ method: "POST", mode: "no-cors", body: "error" }});
</script>"#
        ),
    )
    .unwrap();
    let (mut command, profile) = common::chromium_command(
        &format!("file://{}", page.display()),
        &["--ignore-certificate-errors"],
    );
    let mut browser = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| common::missing_chromium(e));
    let body = common::await_posted_body(&report, Duration::from_secs(30));
    let _ = browser.kill();
    let _ = browser.wait();
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(&page);
    let ticks: Vec<String> = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&body)));
    for tick in &ticks {
        let stamp: u64 = tick.parse().unwrap();
        assert!(stamp.abs_diff(common::now_ms()) < 10_000);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use futures_util::StreamExt;
        let url = format!("wss://localhost:{port}/");
        let connector = tokio_tungstenite::Connector::Rustls(client_config(&cert));
        let (mut ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
                .await
                .expect("tokio-tungstenite over rustls");
        for _ in 0..3 {
            let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a tick")
                .expect("open")
                .expect("a message");
            assert!(message.is_text(), "{message:?}");
        }
    });
}

/// Opens a TLS connection to `server` (trusting `trusted`) and sends `request`.
fn https(server: &Server, trusted: &CertificateDer<'static>, request: &str) -> TlsStream {
    let name = ServerName::try_from("localhost").unwrap();
    let session = rustls::ClientConnection::new(client_config(trusted), name).unwrap();
    let socket = TcpStream::connect(server.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(session, socket);
    tls.write_all(request.as_bytes()).unwrap();
    tls
}

/// Reads from `tls` until `want` shows up (bounded by the read timeout).
fn read_until(tls: &mut TlsStream, want: &str) -> String {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(want) {
        let n = tls.read(&mut chunk).expect("more");
        assert!(
            n > 0,
            "ended before {want:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// The publish API and Server-Sent Events over HTTPS: a stream opened over TLS gets
/// what an HTTPS `POST /publish` sent.
#[test]
fn the_publish_api_and_event_streams_work_over_https() {
    let (server, cert, _dir) = tls_server("https", &["--api-key", "k", "--connect-only"]);
    let mut stream = https(
        &server,
        &cert,
        "GET /sse?topic=news HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n",
    );
    read_until(&mut stream, "text/event-stream");
    let body = "over https";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut publish = https(
            &server,
            &cert,
            &format!(
                "POST /publish?topic=news HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        let answer = read_until(&mut publish, "\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The stream's subscription is in once a publication reaches one subscriber.
        if answer.contains("\"delivered\":1") || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = read_until(&mut stream, body);
    assert!(
        events.contains(&format!("data: {{\"data\":\"{body}\"")),
        "{events}"
    );
}

/// The bench's reconnects resume their TLS sessions with the server's tickets, and the
/// result counts them.
#[test]
fn the_benchs_reconnects_resume_their_tls_sessions() {
    let (server, _cert, dir) = tls_server("bench-resume", &["--interval", "200ms"]);
    let url = format!("wss://localhost:{}/", server.addr.port());
    let result = bench_json(
        "resume",
        &[
            "--url",
            &url,
            "-c",
            "20",
            "--duration",
            "3s",
            "--lifetime",
            "400ms",
            "--reconnect",
            "--ca-cert",
            dir.join("cert.pem").to_str().unwrap(),
        ],
    );
    let s = &result["snapshot"];
    let handshakes = s["tls_handshakes"].as_u64().unwrap();
    let resumed = s["tls_resumed"].as_u64().unwrap();
    assert!(handshakes > 40, "{s}");
    // The first connection of each client is a full handshake; most later ones resume.
    assert!(
        resumed >= (handshakes - 20) / 2,
        "{handshakes} handshakes, {resumed} resumed"
    );
}

/// `/metrics` of a TLS server, read over HTTPS (a full handshake of its own).
fn metrics_over_https(server: &Server, cert: &CertificateDer<'static>) -> String {
    let mut tls = https(
        server,
        cert,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    let mut text = Vec::new();
    // The server ends with close_notify; an error would only shorten the text, which
    // the caller's checks then catch.
    let _ = tls.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

/// One TLS counter of `/metrics` (labels included in `name`).
fn tls_count(metrics: &str, name: &str) -> f64 {
    common::metric_value(metrics, name).unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

/// Sends `bytes` on a fresh TCP connection, then waits for the server to end it.
fn send_raw_and_wait_for_the_end(server: &Server, bytes: &[u8]) {
    let mut socket = TcpStream::connect(server.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket.write_all(bytes).unwrap();
    let mut sink = Vec::new();
    let _ = socket.read_to_end(&mut sink);
}

/// `/metrics` counts TLS handshakes (full and resumed) and failures by cause: not TLS
/// at all, a fatal alert, a client gone before the handshake ended, a silent one past
/// `--handshake-timeout`, and a damaged record after the handshake.
#[test]
fn tls_metrics_count_handshakes_resumptions_and_failures_by_cause() {
    let (server, cert, _dir) = tls_server("metrics", &["--handshake-timeout", "1s"]);
    let before = metrics_over_https(&server, &cert);
    let resumed_name = r#"c1m_tls_handshakes_total{resumed="true"}"#;
    let full_name = r#"c1m_tls_handshakes_total{resumed="false"}"#;
    let cause = |c: &str| format!("c1m_tls_failures_total{{cause=\"{c}\"}}");

    let config = client_config(&cert);
    let _full = wss_connect_with(&server, &config);
    let again = wss_connect_with(&server, &config);
    assert_eq!(
        again.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    send_raw_and_wait_for_the_end(&server, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    // A fatal handshake_failure alert (level 2, description 40) instead of a ClientHello.
    send_raw_and_wait_for_the_end(&server, &[0x15, 3, 3, 0, 2, 2, 40]);
    drop(TcpStream::connect(server.addr).unwrap());
    let silent = TcpStream::connect(server.addr).unwrap();
    let mut damaged = wss_connect(&server, &cert);
    let mut record = vec![0x17, 3, 3, 0, 32];
    record.extend_from_slice(&[0xAB; 32]);
    damaged.sock.write_all(&record).unwrap();

    let wanted = [
        (cause("handshake"), 1.0),
        (cause("alert"), 1.0),
        (cause("closed_in_handshake"), 1.0),
        (cause("handshake_timeout"), 1.0),
        (cause("bad_record"), 1.0),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let after = loop {
        let now = metrics_over_https(&server, &cert);
        let done = wanted
            .iter()
            .all(|(name, more)| tls_count(&now, name) >= tls_count(&before, name) + more);
        if done || std::time::Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(silent);
    for (name, more) in &wanted {
        let grew = tls_count(&after, name) - tls_count(&before, name);
        // A connection that only probes the port (the harness's readiness check) counts
        // as closed in the handshake too, so that one may grow by more.
        if name.contains("closed_in_handshake") {
            assert!(grew >= *more, "{name} grew by {grew}:\n{after}");
        } else {
            assert_eq!(grew, *more, "{name}:\n{after}");
        }
    }
    assert_eq!(
        tls_count(&after, resumed_name) - tls_count(&before, resumed_name),
        1.0,
        "{after}"
    );
    // Every scrape and both wss connections but the resumed one were full handshakes.
    assert!(
        tls_count(&after, full_name) - tls_count(&before, full_name) >= 3.0,
        "{after}"
    );
    // Each failure left the handshakes-in-progress gauge (only `silent` may be in it).
    assert!(
        tls_count(&after, "c1m_tls_handshakes_in_progress") <= 1.0,
        "{after}"
    );
}

/// `--max-tls-handshakes 1`: while one client stalls in its handshake the server
/// takes no other connection (they wait in the kernel's accept queue, where the
/// handshake timeout does not run); once the stalled one times out, the waiting
/// client is served, and the gauge of handshakes in progress never passed 1.
#[test]
fn max_tls_handshakes_holds_new_clients_in_the_accept_queue() {
    let (server, cert, _dir) = tls_server(
        "max-handshakes",
        &["--max-tls-handshakes", "1", "--handshake-timeout", "2s"],
    );
    // Stalls: a TCP connection that never sends its ClientHello.
    let stalled = TcpStream::connect(server.addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let waiting = std::thread::spawn({
        let addr = server.addr;
        let config = client_config(&cert);
        move || {
            let name = ServerName::try_from("localhost").unwrap();
            let session = rustls::ClientConnection::new(config, name).unwrap();
            let socket = TcpStream::connect(addr).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut tls = rustls::StreamOwned::new(session, socket);
            tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .expect("handshake and request");
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer);
            String::from_utf8_lossy(&answer).into_owned()
        }
    });
    let answer = waiting.join().unwrap();
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Served only once the stalled handshake ended (2 s after it was accepted).
    assert!(
        waited >= Duration::from_millis(1200),
        "served after {waited:?}"
    );
    drop(stalled);
    let metrics = metrics_over_https(&server, &cert);
    assert_eq!(
        tls_count(
            &metrics,
            r#"c1m_tls_failures_total{cause="handshake_timeout"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        tls_count(&metrics, "c1m_tls_handshakes_in_progress") <= 1.0,
        "{metrics}"
    );
}

/// Every worker seals session tickets with the node's key: a ticket issued by one
/// worker resumes on workers started after it (both of the server's workers are
/// SIGKILLed and replaced by the master before the client comes back).
#[test]
fn tickets_resume_on_any_worker_even_one_started_later() {
    let (server, cert, _dir) = tls_server_with_workers("shared-tickets", "2", &["--connect-only"]);
    let config = client_config(&cert);
    let first = wss_connect_with(&server, &config);
    assert_eq!(
        first.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    drop(first);
    let master = server.child.id();
    let old = common::children_of(master);
    assert_eq!(old.len(), 2, "{old:?}");
    for &worker in &old {
        // SAFETY: kill(2) on a worker of a server the test started.
        unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = common::children_of(master);
        if now.len() == 2 && now.iter().all(|pid| !old.contains(pid)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "workers not replaced: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..4 {
        let again = wss_connect_with(&server, &config);
        assert_eq!(
            again.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
    }
}
