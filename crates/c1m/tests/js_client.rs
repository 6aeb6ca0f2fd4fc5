//! The JavaScript client (`clients/js/`) against the real binary: its unit tests, and
//! in Node.js (its built-in WebSocket, `--experimental-websocket` on Node 20) a client
//! whose worker is SIGKILLed while publishing goes on: it reconnects by itself, resumes
//! from its position and hands over every publication once, in order. The same in
//! headless Chromium is in `browser.rs`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Server;

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/js")
}

fn node() -> Command {
    let mut command = Command::new("node");
    command
        .arg("--experimental-websocket")
        .current_dir(client_dir());
    command
}

#[test]
fn the_client_unit_tests_pass() {
    let output = node()
        .args(["--test", "test/"])
        .output()
        .unwrap_or_else(|e| panic!("node is needed for this test: {e}"));
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn in_node_a_client_of_a_killed_worker_resumes_and_misses_nothing() {
    let server = Server::start(&["--workers", "2", "--api-key", "k", "--history-size", "1000"]);
    let mut child = node()
        .args(["interop/resume.mjs", &server.url("/"), "feed"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("node is needed for this test: {e}"));
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    assert_eq!(lines.next().expect("a line").expect("text"), "ready");
    common::publish_through_a_worker_kill(server.addr, server.child.id(), "k", "feed", 60, 20);
    let report = lines.next().expect("the report").expect("text");
    let _ = child.wait();
    let report: serde_json::Value = serde_json::from_str(&report).expect("JSON");
    assert!(
        common::assert_every_offset_once(&report, "seen") >= 61,
        "{report}"
    );
    assert!(
        report["opens"].as_u64() >= Some(2),
        "it reconnected: {report}"
    );
    assert_eq!(report["gaps"], serde_json::json!([]), "{report}");
    let recoveries = report["recoveries"].as_array().unwrap();
    assert!(!recoveries.is_empty(), "{report}");
    assert!(
        recoveries.iter().all(|r| r["recovered"] == true),
        "{report}"
    );
}
