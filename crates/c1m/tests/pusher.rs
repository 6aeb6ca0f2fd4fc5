//! The Pusher Channels protocol (issue 17) against real, unmodified clients from npm:
//! `pusher-js` (its Node build) subscribes to public channels, and the `pusher` server
//! SDK sends an event to two of them through the signed HTTP API
//! (`tests/pusher/public.mjs`; the packages, pinned by its `package-lock.json`, are
//! installed with `npm ci` on first use). On one process, on two workers, and across a
//! cluster (the event sent to another node).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::Server;
use serde_json::Value;

const APP: [&str; 3] = ["42", "app-key", "app-secret"];

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher")
}

/// Installs the npm packages once per test run (`npm ci`: exactly the locked versions).
fn npm_packages() -> &'static Path {
    static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = interop_dir();
        if !dir.join("node_modules/pusher-js").exists() {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .unwrap_or_else(|e| panic!("npm (Node.js 20+) is needed for this test: {e}"));
            assert!(status.success(), "npm ci in {} failed", dir.display());
        }
        dir
    })
}

/// Runs `public.mjs` with pusher-js on `port` and the SDK on `api_port`: its steps.
fn run_public(port: u16, api_port: u16) -> Vec<Value> {
    let dir = npm_packages();
    let output = Command::new("node")
        .arg("public.mjs")
        .args([
            &port.to_string(),
            APP[0],
            APP[1],
            APP[2],
            &api_port.to_string(),
        ])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("node is needed for this test: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
}

fn assert_public_channels_work(steps: &[Value]) {
    let socket_id = step(steps, "connected")["socket_id"]
        .as_str()
        .expect("a socket id");
    assert!(
        socket_id.split('.').count() == 2 && socket_id.split('.').all(|p| p.parse::<u64>().is_ok()),
        "pusher-js checks the shape NUMBER.NUMBER: {socket_id}"
    );
    let triggered = step(steps, "triggered");
    assert_eq!(triggered["status"], 200, "{triggered}");
    let got = &step(steps, "received")["got"];
    let expected: Value = serde_json::json!([
        {"channel": "news", "data": {"hello": "world"}},
        {"channel": "sports", "data": {"hello": "world"}}
    ]);
    assert_eq!(got, &expected);
    let forged = step(steps, "forged");
    assert_eq!(forged["status"], 401, "a wrong secret is refused: {forged}");
    assert_eq!(step(steps, "unknown_key")["code"], 4001);
    let private = &step(steps, "private")["refused"];
    assert!(private.get("succeeded").is_none(), "{private}");
    step(steps, "done");
}

fn pusher_args(workers: &str) -> Vec<String> {
    let app = APP.join(":");
    ["--workers", workers, "--pusher-app", &app]
        .map(str::to_string)
        .to_vec()
}

#[test]
fn pusher_js_and_the_pusher_sdk_on_one_process() {
    let args = pusher_args("1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let port = server.addr.port();
    assert_public_channels_work(&run_public(port, port));
}

#[test]
fn pusher_js_and_the_pusher_sdk_on_two_workers() {
    let args = pusher_args("2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let port = server.addr.port();
    assert_public_channels_work(&run_public(port, port));
}

/// A Pusher event sent to one node of a cluster (over Redis) reaches a pusher-js client
/// on another, like any publication.
#[test]
fn pusher_js_on_one_node_gets_events_sent_to_another() {
    let redis_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut redis = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &redis_port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server is needed for this test ({e})"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut args = pusher_args("2");
    args.extend([
        "--broker".to_string(),
        format!("redis://127.0.0.1:{redis_port}"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nodes = [Server::start(&args), Server::start(&args)];
    for node in &nodes {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while common::http(node.addr, "GET", "/readyz", &[], b"").status != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "a node never got ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let steps = run_public(nodes[0].addr.port(), nodes[1].addr.port());
    let _ = redis.kill();
    let _ = redis.wait();
    assert_public_channels_work(&steps);
}
