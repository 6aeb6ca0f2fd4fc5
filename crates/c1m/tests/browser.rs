//! The pages people look at, rendered in headless Chromium (Debian's `chromium`, which
//! `.ci/run` installs): the HTML report of `c1m report html` and the live `/status`
//! page. Each must load with no console message at all (errors, failed fetches and
//! stray logs all land there) and draw its charts, counted as SVG paths in the DOM
//! after scripts ran. Screenshots go to `target/artifacts/` (CI keeps them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run_bench, Server};

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
    let profile = std::env::temp_dir().join(format!(
        "c1m-chromium-{}-{}",
        std::process::id(),
        common::since_epoch().as_nanos()
    ));
    let program = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let output = Command::new(&program)
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
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is needed for this test ({e}); .ci/run installs it (apt-get install chromium)")
        });
    let _ = std::fs::remove_dir_all(&profile);
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
