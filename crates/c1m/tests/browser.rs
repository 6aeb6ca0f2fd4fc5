//! The pages people look at, rendered in headless Chromium (Debian's `chromium`, which
//! `.ci/run` installs): the HTML report of `c1m report html` and the live `/status`
//! page. Each must load with no console message at all (errors, failed fetches and
//! stray logs all land there) and draw its charts, counted as SVG paths in the DOM
//! after scripts ran. Screenshots go to `target/artifacts/` (CI keeps them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{chromium_command, missing_chromium, run_bench, Server};

/// Where screenshots are kept: `$C1M_ARTIFACTS`, or `target/artifacts` of the workspace.
fn artifacts() -> PathBuf {
    let dir = std::env::var_os("C1M_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/artifacts"));
    std::fs::create_dir_all(&dir).expect("artifacts directory");
    dir
}

/// Runs headless Chromium on `url` with `extra` arguments; returns (stdout, stderr).
/// The flags keep it off the network (this machine has none but loopback) and give it
/// a fresh profile; `--virtual-time-budget` lets a page's timers run ahead.
fn chromium(url: &str, extra: &[&str]) -> (String, String) {
    let (mut command, profile) = chromium_command(url, extra);
    let output = command.output().unwrap_or_else(|e| missing_chromium(e));
    let _ = std::fs::remove_dir_all(&profile);
    let program = command.get_program().to_string_lossy().into_owned();
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The page's DOM after its scripts ran for `budget_ms` of virtual time, checked for
/// console messages; and a screenshot of it saved as `name.png`.
fn render(url: &str, budget_ms: u32, name: &str) -> String {
    let budget = format!("--virtual-time-budget={budget_ms}");
    let (dom, log) = chromium(url, &[&budget, "--dump-dom"]);
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "{name}: console messages: {console:#?}");
    let shot = artifacts().join(format!("{name}.png"));
    let _ = std::fs::remove_file(&shot);
    chromium(
        url,
        &[
            &budget,
            "--window-size=1360,1500",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "{name}: screenshot {} is {size} bytes",
        shot.display()
    );
    dom
}

#[test]
fn the_html_report_draws_every_chart() {
    let server = Server::start(&["--workers", "1", "--interval", "300ms"]);
    let url = server.url("/");
    let (_, json) = run_bench(
        "browser-report",
        &["--url", &url, "-c", "200", "--duration", "2s"],
    );
    let dir = artifacts();
    let result = dir.join("browser-result.json");
    std::fs::write(&result, json).unwrap();
    let costs = dir.join("browser-costs.json");
    std::fs::write(
        &costs,
        r#"{"c1m": {"memory_per_connection_bytes": 70, "cpu_seconds": 1.5}}"#,
    )
    .unwrap();
    let page = dir.join("report.html");
    let status = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args(["report", "html"])
        .arg(format!("c1m={}", result.display()))
        .arg(format!("again={}", result.display()))
        .arg("--server-costs")
        .arg(&costs)
        .arg("-o")
        .arg(&page)
        .status()
        .unwrap();
    assert!(status.success());
    // A costs file that names no result, or has the wrong shape, is refused clearly.
    for (bad, says) in [
        (
            r#"{"nope": {"memory_per_connection_bytes": 1, "cpu_seconds": 1}}"#,
            "nope",
        ),
        (r#"{"c1m": {"memory": 1}}"#, "memory_per_connection_bytes"),
    ] {
        std::fs::write(&costs, bad).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_c1m"))
            .args(["report", "html"])
            .arg(format!("c1m={}", result.display()))
            .arg("--server-costs")
            .arg(&costs)
            .arg("-o")
            .arg(dir.join("refused.html"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
    }
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("<script") && !html.contains(" src="),
        "self-contained"
    );
    let dom = render(&format!("file://{}", page.display()), 1000, "report");
    // Four line charts with a line per result, five comparison charts with a bar each,
    // two server-cost charts with the one cost given.
    assert_eq!(dom.matches("class=\"series\"").count(), 8, "line paths");
    assert_eq!(dom.matches("class=\"bar\"").count(), 12, "bars");
    assert!(!dom.contains("no data"), "every chart had data");
}

#[test]
fn the_status_page_draws_live_numbers() {
    let server = Server::start(&["--workers", "2", "--interval", "300ms"]);
    let url = server.url("/");
    // Clients stay connected while the page polls.
    let mut bench = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args([
            "bench",
            "--url",
            &url,
            "-c",
            "150",
            "--duration",
            "20s",
            "--quiet",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = server.addr;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::stats(addr, "node")["subscriptions"] != 150 {
        assert!(
            std::time::Instant::now() < deadline,
            "clients never all connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let dom = render(&format!("http://{addr}/status"), 4000, "status");
    let _ = bench.kill();
    let _ = bench.wait();
    assert_eq!(
        dom.matches("class=\"series\"").count(),
        3,
        "three charts drawn"
    );
    assert!(dom.contains("id=\"connections\">150<"), "connections shown");
    assert!(dom.contains("<td>time</td><td>150</td>"), "topic table");
    assert!(!dom.contains("class=\"error\""), "no polling error");
}

/// Runs a page in headless Chromium against a server of two workers keeping history,
/// while `feed` gets 60 publications and "end"; the worker holding the page's
/// connection is SIGKILLed after 20, so the page must reconnect. `html(server, report)`
/// writes the page; it POSTs what it saw as JSON to `report` (headless Chromium keeps
/// running until killed, and `--virtual-time-budget` would wait for a stream that
/// never ends). Returns that JSON, having checked it saw every offset once, in order,
/// over at least two connections.
fn page_through_a_worker_kill(
    name: &str,
    html: impl FnOnce(std::net::SocketAddr, std::net::SocketAddr) -> String,
) -> serde_json::Value {
    let server = Server::start(&["--workers", "2", "--api-key", "k", "--history-size", "1000"]);
    let (addr, pid) = (server.addr, server.child.id());
    let report = std::net::TcpListener::bind("127.0.0.1:0").expect("report listener");
    let page = std::env::temp_dir().join(format!("c1m-{name}-{}.html", std::process::id()));
    std::fs::write(&page, html(addr, report.local_addr().unwrap())).unwrap();
    let (mut command, profile) = chromium_command(&format!("file://{}", page.display()), &[]);
    let mut browser = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| missing_chromium(e));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while common::stats(addr, "node")["connections"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: the page never connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    common::publish_through_a_worker_kill(addr, pid, "k", "feed", 60, 20);
    let body = common::await_posted_body(&report, std::time::Duration::from_secs(30));
    let _ = browser.kill();
    let _ = browser.wait();
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(&page);
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("report JSON");
    assert!(
        common::assert_every_offset_once(&seen, "seen") >= 61,
        "{name}: {seen}"
    );
    assert!(
        seen["opens"].as_u64() >= Some(2),
        "{name}: it reconnected: {seen}"
    );
    seen
}

/// Issue 16's SSE acceptance: the browser's own `EventSource`; when its worker dies it
/// reconnects by itself, sending `Last-Event-ID`, to the other worker.
#[test]
fn an_event_source_reconnects_after_the_server_drops_it_and_misses_nothing() {
    let seen = page_through_a_worker_kill("sse", |addr, report| {
        format!(
            r#"<!doctype html><meta charset="utf-8"><script>
const seen = [], answers = [];
let opens = 0;
const es = new EventSource("http://{addr}/sse?topic=feed");
es.onopen = () => opens++;
es.addEventListener("answer", (e) => answers.push(JSON.parse(e.data)));
es.onmessage = (e) => {{
  const envelope = JSON.parse(e.data);
  seen.push(envelope.offset);
  if (envelope.data === "end") {{
    es.close();
    const body = JSON.stringify({{ seen, opens, answers }});
    fetch("http://{report}/", {{ method: "POST", mode: "no-cors", body }});
  }}
}};
</script>"#
        )
    });
    for answer in seen["answers"].as_array().unwrap() {
        assert_eq!(answer["recovered"], true, "{seen}");
    }
}

/// The JavaScript client (`clients/js/index.js`, inlined in the page as a module) with
/// the browser's own WebSocket: it reconnects by itself and resumes from its position.
#[test]
fn the_js_client_in_chromium_resumes_after_its_worker_is_killed() {
    let client = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/js/index.js"),
    )
    .expect("clients/js/index.js");
    let seen = page_through_a_worker_kill("js", |addr, report| {
        format!(
            r#"<!doctype html><meta charset="utf-8"><script type="module">
{client}
const seen = [], recoveries = [], gaps = [];
let opens = 0;
const c = new Client("ws://{addr}/", {{ minDelay: 100, maxDelay: 1000 }});
c.on("open", () => opens++);
c.on("recovery", (r) => recoveries.push(r));
c.on("gap", (g) => gaps.push(g));
c.subscribe("feed", (data, meta) => {{
  seen.push(meta.offset);
  if (data === "end") {{
    c.close();
    const body = JSON.stringify({{ seen, recoveries, gaps, opens }});
    fetch("http://{report}/", {{ method: "POST", mode: "no-cors", body }});
  }}
}});
</script>"#
        )
    });
    assert_eq!(seen["gaps"], serde_json::json!([]), "{seen}");
    let recoveries = seen["recoveries"].as_array().unwrap();
    assert!(!recoveries.is_empty(), "{seen}");
    assert!(recoveries.iter().all(|r| r["recovered"] == true), "{seen}");
}
