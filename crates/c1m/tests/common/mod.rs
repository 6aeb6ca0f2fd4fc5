//! Test helpers: start the real `c1m` binary and talk to it over loopback.

#![allow(dead_code)]

mod broker;
#[allow(unused_imports)] // (not every test binary runs a broker)
pub use broker::{free_port, Broker};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running `c1m serve`, stopped (SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `c1m serve --listen 127.0.0.1:0 ARGS…` and waits for its address.
    pub fn start(args: &[&str]) -> Server {
        Server::start_on("127.0.0.1:0", args)
    }

    /// Starts `c1m serve --listen LISTEN ARGS…` and waits for its address.
    pub fn start_on(listen: &str, args: &[&str]) -> Server {
        // C1M_TEST_SERVER_LOG=FILE keeps the servers' logs (appended) for debugging.
        let stderr = match std::env::var_os("C1M_TEST_SERVER_LOG") {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
            None => Stdio::null(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_c1m"))
            .args(["serve", "--listen", listen])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start c1m serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        Server { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status. The bound is above the
    /// master's own (close timeout + 2 s, after which it kills what is left).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not exit within 10 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-rolled client, independent of c1m's own codec, for sending raw and hostile bytes.
pub struct RawClient {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
}

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: a permessage-deflate compressed message.
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

pub const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and completes the upgrade, checking the accept key of RFC 6455's example.
    pub async fn upgraded(addr: SocketAddr) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client.send(UPGRADE.as_bytes()).await;
        let head = client.read_http_head().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head}"
        );
        client
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no data from server within 5 s"),
        }
    }

    /// Reads an HTTP response head (up to the blank line) and returns it as text.
    pub async fn read_http_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8(head).expect("utf-8 head");
            }
            assert!(
                self.fill().await,
                "connection closed before the response head"
            );
        }
    }

    /// Reads everything until the server closes the connection.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// Reads one frame; `None` when the connection ended first.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads frames until a close frame arrives; returns its code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        while let Some(frame) = self.read_frame().await {
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
        panic!("connection ended without a close frame");
    }
}

/// Parses one unmasked server frame from the start of `buf`.
fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, start) = match buf[1] & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(start..start + len)?.to_vec();
    Some((
        Frame {
            fin: buf[0] & 0x80 != 0,
            rsv1: buf[0] & 0x40 != 0,
            opcode: buf[0] & 0x0F,
            payload,
        },
        start + len,
    ))
}

/// Encodes a client frame by hand: `first_byte` is FIN/RSV/opcode as sent.
pub fn client_frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first_byte];
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// PIDs of the processes whose parent is `parent` (read from /proc).
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may contain spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
            == Some(parent)
        {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Number of TCP sockets a process holds.
pub fn tcp_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

/// A response to [`http`]: status code, headers (lower-cased names) and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// One blocking HTTP/1.1 request on its own connection (the server closes it after
/// answering). `headers` are complete header lines without CRLF.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> HttpResponse {
    let response = exchange(addr, method, path, headers, body).expect("an HTTP exchange");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// `GET /stats?scope=SCOPE`, which must answer 200 with JSON.
pub fn stats(addr: SocketAddr, scope: &str) -> serde_json::Value {
    let answer = http(addr, "GET", &format!("/stats?scope={scope}"), &[], b"");
    assert_eq!(answer.status, 200, "{answer:?}");
    serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.body))
}

/// `POST /publish` of a JSON message to a topic with an API key.
/// `GET /history?{query}` with the API key `k`: the status and the JSON body.
pub fn history(addr: SocketAddr, query: &str) -> (u16, serde_json::Value) {
    let answer = http(
        addr,
        "GET",
        &format!("/history?{query}"),
        &["Authorization: Bearer k"],
        b"",
    );
    let body =
        serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.body));
    (answer.status, body)
}

/// The offsets of a `GET /history` page's publications.
pub fn page_offsets(page: &serde_json::Value) -> Vec<u64> {
    page["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("an offset"))
        .collect()
}

pub fn publish(addr: SocketAddr, key: &str, topic: &str, message: &str) -> HttpResponse {
    let auth = format!("Authorization: Bearer {key}");
    let body = serde_json::json!({ "topic": topic, "message": message }).to_string();
    http(
        addr,
        "POST",
        "/publish",
        &[&auth, "Content-Type: application/json"],
        body.as_bytes(),
    )
}

/// Sends an upgrade request for `path` with extra header lines; returns the status of
/// the answer and its body (empty for 101).
pub fn upgrade_status(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the answer: {e}"),
        }
        if response.starts_with(b"HTTP/1.1 101") && response.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, if status == 101 { String::new() } else { body })
}

/// Time since the Unix epoch (for timestamps carried in messages).
pub fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
}

/// A per-test-process temporary file for a JSON result.
pub fn json_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("c1m-test-{}-{name}.json", std::process::id()))
}

/// Runs `c1m bench ARGS --quiet --json FILE` (which must succeed); returns its output and
/// the JSON result as text. `name` keeps parallel tests' files apart.
pub fn run_bench(name: &str, args: &[&str]) -> (std::process::Output, String) {
    let path = json_path(name);
    let output = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .arg("bench")
        .args(args)
        .args(["--quiet", "--json"])
        .arg(&path)
        .output()
        .expect("run c1m bench");
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = std::fs::read_to_string(&path).expect("json written");
    let _ = std::fs::remove_file(&path);
    (output, json)
}

/// Resident memory of a process, in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Stops process `pid` (SIGSTOP) and waits until it is stopped: `kill` returns before
/// the target has stopped, and a worker still running could take one more connection
/// (and then stop with it unanswered).
pub fn stop_process(pid: u32) {
    // SAFETY: kill(2) on a process the calling test started.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    for _ in 0..500 {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
            });
        if state.as_deref() == Some("T") {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("process {pid} did not stop within 5 s");
}

/// Lets a stopped process run again (SIGCONT).
pub fn resume_process(pid: u32) {
    // SAFETY: kill(2) on a process the calling test started.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

/// Publishes `"0"`, `"1"`, … (`count` JSON strings) to `topic` every 40 ms, then
/// `"end"`; before publication `kill_at` it SIGKILLs the worker of server `pid` holding
/// the most sockets (a client's), so that client's connection drops mid-stream. A
/// publish the dying worker took may fail: it is published again (a new offset:
/// clients must still see every offset once, in order).
pub fn publish_through_a_worker_kill(
    addr: SocketAddr,
    pid: u32,
    key: &str,
    topic: &str,
    count: usize,
    kill_at: usize,
) {
    let publish = |message: &str| {
        for _ in 0..500 {
            let body = serde_json::json!({ "topic": topic, "message": message }).to_string();
            if try_http(
                addr,
                "POST",
                "/publish",
                &[&format!("Authorization: Bearer {key}")],
                body.as_bytes(),
            )
            .is_some_and(|status| status == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("publish of {message} never succeeded");
    };
    for i in 0..count {
        if i == kill_at {
            let worker = children_of(pid)
                .into_iter()
                .max_by_key(|&w| tcp_sockets(w))
                .expect("a worker");
            // SAFETY: kill(2) on a worker of a server the test started.
            unsafe { libc::kill(worker as i32, libc::SIGKILL) };
        }
        publish(&i.to_string());
        std::thread::sleep(Duration::from_millis(40));
    }
    publish("end");
}

/// The status of one JSON request, or `None` if the connection failed (a worker that
/// died under it).
fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Option<u16> {
    let mut with_type = vec!["Content-Type: application/json"];
    with_type.extend_from_slice(headers);
    let response = exchange(addr, method, path, &with_type, body).ok()?;
    std::str::from_utf8(response.get(9..12)?).ok()?.parse().ok()
}

/// Sends one HTTP/1.1 request on its own connection (`Connection: close`) and reads
/// the whole response. `headers` are complete header lines without CRLF.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(response)
}

/// Waits (up to `timeout`) for one HTTP request on `listener` (a page reporting what
/// it saw with `fetch`) and returns its body.
pub fn await_posted_body(listener: &std::net::TcpListener, timeout: Duration) -> Vec<u8> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + timeout;
    let (socket, _) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("nothing was posted within {timeout:?}: {e}"),
        }
    };
    socket.set_nonblocking(false).expect("blocking");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(socket);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).expect("request line");
    read_body(&mut reader)
}

/// Reads the rest of an HTTP message's head (after its first line) and its
/// `Content-Length` body.
pub fn read_body(reader: &mut impl BufRead) -> Vec<u8> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("a head line");
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().expect("a length");
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("the body");
    body
}

/// The offsets a client reported (`report[field]`), checked to be 1, 2, … without a
/// gap or a repeat; returns the last.
pub fn assert_every_offset_once(report: &serde_json::Value, field: &str) -> u64 {
    let offsets: Vec<u64> = report[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
        .iter()
        .map(|o| o.as_u64().expect("an offset"))
        .collect();
    let last = offsets.last().copied().unwrap_or(0);
    assert_eq!(
        offsets,
        (1..=last).collect::<Vec<_>>(),
        "every offset once: {report}"
    );
    last
}

/// The worker of server `server` (listening on `server_port`) holding the server end
/// of the TCP connection whose client end is local port `client_port`: its socket
/// inode from `/proc/net/tcp` (an established entry; old ones of the same ports linger
/// in TIME_WAIT with inode 0), then the worker with that inode among its descriptors.
/// Retried briefly (a connection just accepted may not be listed yet).
pub fn worker_serving(server: u32, server_port: u16, client_port: u16) -> u32 {
    let port = |address: &str| {
        address
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    for _ in 0..100 {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let inode = table.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let ours = port(fields.get(1)?)? == server_port
                && port(fields.get(2)?)? == client_port
                && *fields.get(3)? == "01"
                && *fields.get(9)? != "0";
            ours.then(|| format!("socket:[{}]", fields[9]))
        });
        if let Some(inode) = inode {
            let holder = children_of(server).into_iter().find(|&w| {
                std::fs::read_dir(format!("/proc/{w}/fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| {
                        std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == inode)
                    })
            });
            if let Some(worker) = holder {
                return worker;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no worker of {server} holds the connection from port {client_port}");
}

/// A tokio-tungstenite client connection.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text message as JSON, within 5 s.
pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("connection open")
            .expect("no error");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = msg {
            return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        }
    }
}

/// Eight clients resume `feed` again and again (a few publications per connection, each
/// time on the next server of `resume_at`) while four publishers send 300 publications
/// to `publish_to` at once, so publications wait in queues while clients resume (the
/// race a recovery must close): each must see every offset once, in order.
pub async fn clients_resume_while_publishing(resume_at: &[&Server], publish_to: &Server) {
    const N: u64 = 300;
    let addr = publish_to.addr;
    let first = tokio::task::spawn_blocking(move || publish(addr, "k", "feed", "1"))
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    let first: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    let epoch = first["epoch"].as_str().expect("an epoch").to_string();
    // Four publishers at once, so publications wait in the server's queue while
    // clients resume (the race the recovery bound closes).
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            tokio::task::spawn_blocking(move || {
                for i in (2..=N).filter(|i| i % 4 == p) {
                    let answer = publish(addr, "k", "feed", &i.to_string());
                    assert_eq!(answer.status, 200, "{answer:?}");
                }
            })
        })
        .collect();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let urls: Vec<String> = resume_at.iter().map(|s| s.url("/")).collect();
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let mut seen: Vec<u64> = Vec::new();
                let mut session = 0u64;
                while seen.last() != Some(&N) {
                    let last = seen.last().copied().unwrap_or(0);
                    let url = &urls[(c as usize + session as usize) % urls.len()];
                    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
                        "{url}?since=feed:{epoch}:{last}"
                    ))
                    .await
                    .expect("upgrade");
                    let answer = next_json(&mut ws).await;
                    assert_eq!(answer["recovered"], true, "client {c}: {answer}");
                    // Stay for a few publications, then drop the connection.
                    let stay = 5 + (c + session) % 20;
                    for _ in 0..stay {
                        let got = next_json(&mut ws).await;
                        seen.push(got["offset"].as_u64().expect("an offset"));
                        if seen.last() == Some(&N) {
                            break;
                        }
                    }
                    session += 1;
                }
                seen
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.await.unwrap();
        let expected: Vec<u64> = (1..=N).collect();
        assert_eq!(
            seen, expected,
            "client {c}: every publication once, in order"
        );
    }
}

/// The value of an unlabelled metric in a `/metrics` text, if it is there.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// Headless Chromium on `url` with a fresh profile (returned, for removal): the flags
/// keep it off the network (this machine has none but loopback).
pub fn chromium_command(url: &str, extra: &[&str]) -> (Command, std::path::PathBuf) {
    let profile = std::env::temp_dir().join(format!(
        "c1m-chromium-{}-{}",
        std::process::id(),
        since_epoch().as_nanos()
    ));
    let program = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let mut command = Command::new(program);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url);
    (command, profile)
}

pub fn missing_chromium(e: std::io::Error) -> ! {
    panic!("chromium is needed for this test ({e}); .ci/run installs it (apt-get install chromium)")
}
