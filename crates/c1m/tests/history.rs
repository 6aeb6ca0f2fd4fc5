//! Topic history with the real binary: positions in publish answers, `GET /history`,
//! its errors, and the start-up checks of the `--history-*` flags.

mod common;

use common::{http, publish, Server};
use serde_json::Value;

const KEY: &str = "Authorization: Bearer k";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn history(server: &Server, query: &str) -> (u16, Value) {
    let answer = http(
        server.addr,
        "GET",
        &format!("/history?{query}"),
        &[KEY],
        b"",
    );
    (answer.status, json(&answer.body))
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
    let (status, page) = history(&server, "topic=news");
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        (page["offset"].as_u64(), page["epoch"].as_str()),
        (Some(4), Some(epoch.as_str()))
    );
    let offsets: Vec<u64> = page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3, 4]);
    // The JSON message is data as JSON; the others are strings.
    assert_eq!(page["publications"][0]["data"], json(r#"{"n":2}"#));
    assert_eq!(page["publications"][1]["data"], "three");

    let (_, page) = history(
        &server,
        &format!("topic=news&since=3&epoch={epoch}&limit=5"),
    );
    assert_eq!(page["publications"].as_array().unwrap().len(), 1, "{page}");
    let (_, page) = history(&server, "topic=news&since=0&limit=1");
    assert_eq!(
        page["publications"][0]["offset"], 2,
        "a page is cut at its limit"
    );

    // Topics without history (the clock's, or never published) and wrong positions.
    assert_eq!(history(&server, "topic=time").0, 404);
    assert_eq!(history(&server, "topic=other").0, 404);
    let (status, body) = history(&server, "topic=news&epoch=00000000");
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("epoch_changed")),
        "{body}"
    );
    let (status, body) = history(&server, "topic=news&since=99");
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("offset_ahead")),
        "{body}"
    );
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
        let (status, body) = history(&server, query);
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
    let (status, body) = history(&server, "topic=news");
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
            &["--history-size", "5", "--workers", "2"][..],
            "--workers 1",
        ),
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
