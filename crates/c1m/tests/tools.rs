//! Integration tests of `c1m demo` and `c1m tune`.

mod common;

use std::process::Command;

use common::children_of;

#[test]
fn demo_at_small_scale_succeeds_and_leaves_no_process() {
    let child = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args([
            "demo",
            "--connections",
            "600",
            "--rounds",
            "2",
            "--interval",
            "500ms",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("message.latency") && stdout.contains("per connection"),
        "{stdout}"
    );
    assert!(
        stdout.contains("message.missed\n             count = 0"),
        "{stdout}"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(children_of(pid), Vec::<u32>::new(), "processes left behind");
    // No c1m process of ours is left that was started by the demo's children either:
    // every server and bench process had the demo as parent or grandparent.
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|c| c.contains("--total\u{0}600"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn tune_reports_sane_limits_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args(["tune", "--connections", "1000000", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let checks = checks.as_array().expect("a list");
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for needed in [
        "nofile (per process)",
        "fs.file-max",
        "fs.nr_open",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_mem",
        "memory available",
    ] {
        assert!(names.contains(&needed), "missing {needed}: {names:?}");
    }
    for c in checks {
        assert!(c["ok"].is_boolean());
        assert!(!c["current"].as_str().unwrap().is_empty());
        let name = c["name"].as_str().unwrap();
        if c["ok"] == false && name == "net.ipv4.tcp_ehash_entries" {
            // Read-only: sized at boot, or per network namespace made after a sysctl.
            assert!(c["fix"].as_str().unwrap().contains("thash_entries="), "{c}");
        } else if c["ok"] == false && name.starts_with("net.") {
            assert!(c["fix"].as_str().unwrap().starts_with("sysctl -w "), "{c}");
        }
    }
    let nofile = checks
        .iter()
        .find(|c| c["name"] == "nofile (per process)")
        .unwrap();
    assert!(nofile["current"].as_str().unwrap().starts_with("soft "));
}

#[test]
fn tune_table_names_the_fix() {
    let out = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args(["tune", "--connections", "5000", "--role", "server"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("net.core.somaxconn") && text.contains("memory available"),
        "{text}"
    );
    assert!(
        !text.contains("ip_local_port_range"),
        "client checks left out for --role server"
    );
}

#[test]
fn demo_interrupted_cleans_up_every_process() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args([
            "demo",
            "--connections",
            "3000",
            "--rounds",
            "50",
            "--interval",
            "1s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let demo = child.id();
    let mut started: Vec<u32> = children_of(demo);
    for pid in started.clone() {
        started.extend(children_of(pid));
    }
    assert!(started.len() >= 2, "server and bench running: {started:?}");
    // SAFETY: kill(2) on the demo process this test started.
    unsafe { libc::kill(demo as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted demo reports failure");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let alive: Vec<u32> = started
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| !s.contains(") Z "))
        })
        .collect();
    assert!(alive.is_empty(), "left running: {alive:?}");
}
