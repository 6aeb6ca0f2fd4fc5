//! The Pusher Channels protocol (issue 17) against real, unmodified clients from npm:
//! `pusher-js` (its Node build) and Laravel Echo's Pusher connector subscribe to public
//! channels and to private ones (signed by the SDK's `authorizeChannel`), and the
//! `pusher` server SDK sends events through the signed HTTP API
//! (`tests/pusher/public.mjs`; the packages, pinned by its `package-lock.json`, are
//! installed with `npm ci` on first use), presence channels and client events
//! (`presence.mjs`, Laravel Echo's `join`/`whisper` in `echo_presence.mjs`, the browser
//! build in headless Chromium), the read API, user sign-in and `terminate_connections`
//! (`users.mjs`), webhooks checked by the SDK's validator (`webhooks.mjs`), and
//! reconnecting after the server, a worker or a node goes (`reconnect.mjs`, and the same
//! page in Chromium). On one process, on two workers, and across a three-node cluster.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{free_port, Broker, Server};
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
    run_script("public.mjs", port, api_port)
}

/// Runs one of the Node scripts: its steps, one JSON object per line.
fn run_script(script: &str, port: u16, api_port: u16) -> Vec<Value> {
    run_script_with(script, port, &[api_port])
}

/// [`run_script`] with further port arguments after the app.
fn run_script_with(script: &str, port: u16, more: &[u16]) -> Vec<Value> {
    let mut args = vec![
        port.to_string(),
        APP[0].into(),
        APP[1].into(),
        APP[2].into(),
    ];
    args.extend(more.iter().map(u16::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_node(script, &args)
}

/// Runs a Node script of `tests/pusher` with `args`: its steps.
fn run_node(script: &str, args: &[&str]) -> Vec<Value> {
    let dir = npm_packages();
    let output = Command::new("node")
        .arg(script)
        .args(args)
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
    let batch = step(steps, "batch");
    assert_eq!(batch["status"], 200, "{batch}");
    assert_eq!(
        batch["got"],
        serde_json::json!([
            {"channel": "news", "data": {"n": 1}},
            {"channel": "sports", "data": {"n": 2}}
        ])
    );
    let forged = step(steps, "forged");
    assert_eq!(forged["status"], 401, "a wrong secret is refused: {forged}");
    assert_eq!(step(steps, "unknown_key")["code"], 4001);
    assert_eq!(
        step(steps, "private_signed")["succeeded"],
        true,
        "{steps:?}"
    );
    assert_eq!(
        step(steps, "private_event")["data"]["level"],
        3,
        "{steps:?}"
    );
    let excluded = step(steps, "excluded");
    assert_eq!(excluded["other_got"]["x"], 1, "{excluded}");
    assert_eq!(
        excluded["sender_got"], 0,
        "the socket_id's own connection is left out: {excluded}"
    );
    let forged = step(steps, "private_forged");
    assert_eq!(
        forged["error"]["status"], 401,
        "a signature for another socket: {forged}"
    );
    let stale = step(steps, "stale");
    assert_eq!(stale["status"], 401, "signed 700 s ago: {stale}");
    assert!(
        stale["body"]
            .as_str()
            .is_some_and(|b| b.contains("auth_timestamp")),
        "the refusal names the timestamp: {stale}"
    );
    let oversized = step(steps, "oversized");
    assert_eq!(oversized["status"], 413, "{oversized}");
    assert_eq!(
        step(steps, "encrypted_signed")["succeeded"],
        true,
        "{steps:?}"
    );
    let encrypted = step(steps, "encrypted_event");
    assert_eq!(
        encrypted["data"],
        serde_json::json!({"pin": 1234}),
        "pusher-js opened the SDK's sealed event: {encrypted}"
    );
    // What crossed the server (as pusher-js parsed it before opening): the SDK's nonce
    // and ciphertext, nothing in the clear.
    let sealed = &encrypted["wire"][0];
    assert!(
        sealed["nonce"].is_string()
            && sealed["ciphertext"].is_string()
            && !sealed.to_string().contains("1234"),
        "the server passes the ciphertext through: {encrypted}"
    );
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
    let (server, port) = pusher_server("1");
    assert_public_channels_work(&run_public(port, port));
    drop(server);
}

#[test]
fn pusher_js_and_the_pusher_sdk_on_two_workers() {
    let (server, port) = pusher_server("2");
    assert_public_channels_work(&run_public(port, port));
    drop(server);
}

/// What `presence.mjs` saw: members as pusher-js holds them, member events once per
/// user (not per socket), client events with the sender's user id and not to the
/// sender, the rate limit, a public channel refused, a forged member refused.
fn assert_presence_works(steps: &[Value]) {
    let alice = serde_json::json!({"id": "alice", "info": {"name": "Alice"}});
    let bob = serde_json::json!({"id": "bob", "info": {"name": "Bob"}});
    let joined = step(steps, "alice_joined");
    assert_eq!(joined["members"], serde_json::json!([alice]), "{joined}");
    assert_eq!(joined["me"], alice, "{joined}");
    assert_eq!(joined["count"], 1, "{joined}");
    let bob_joined = step(steps, "bob_joined");
    assert_eq!(
        bob_joined["members"],
        serde_json::json!([alice, bob]),
        "{bob_joined}"
    );
    assert_eq!(bob_joined["count"], 2, "{bob_joined}");
    assert_eq!(step(steps, "alice_saw_bob")["member"], bob);
    let again = step(steps, "bob_again");
    assert_eq!(
        again["count"], 2,
        "a second socket is the same user: {again}"
    );
    assert_eq!(again["alice_extra_adds"], 0, "{again}");
    let read = step(steps, "read_api");
    assert_eq!(
        read["channel"],
        serde_json::json!({"occupied": true, "user_count": 2, "subscription_count": 3}),
        "{read}"
    );
    assert_eq!(
        read["listed"],
        serde_json::json!({"channels": {"presence-room": {"user_count": 2}}}),
        "{read}"
    );
    assert_eq!(
        read["users"],
        serde_json::json!({"users": [{"id": "alice"}, {"id": "bob"}]}),
        "{read}"
    );
    assert_eq!(read["refusal"], 400, "users of a public channel: {read}");
    let event = step(steps, "client_event");
    assert_eq!(
        event["data"],
        serde_json::json!({"typing": true}),
        "{event}"
    );
    assert_eq!(event["user_id"], "alice", "{event}");
    assert_eq!(event["both"], true, "{event}");
    assert_eq!(event["sender_got"], 0, "not back to the sender: {event}");
    let limited = step(steps, "rate_limited");
    assert_eq!(limited["code"], 4301, "{limited}");
    assert_eq!(limited["delivered"], 10, "10 a second pass: {limited}");
    let public = step(steps, "public_client_event");
    assert_eq!(public["code"], 4301, "{public}");
    assert!(
        public["message"]
            .as_str()
            .unwrap_or("")
            .contains("private and presence"),
        "{public}"
    );
    let forged = step(steps, "forged_member");
    assert_eq!(forged["error"]["status"], 401, "{forged}");
    let left = step(steps, "bob_left");
    assert_eq!(
        left["after_first_socket"], 0,
        "Bob still has a socket: {left}"
    );
    assert_eq!(left["member"], bob, "{left}");
    assert_eq!(left["count"], 1, "{left}");
    step(steps, "done");
}

/// A server with the test app and client events on `workers` workers, and its port.
fn presence_server(workers: &str) -> (Server, u16) {
    pusher_server_with(workers, &["--pusher-client-events"])
}

#[test]
fn presence_channels_and_client_events_on_one_process() {
    let (server, port) = presence_server("1");
    assert_presence_works(&run_script("presence.mjs", port, port));
    drop(server);
}

#[test]
fn presence_channels_and_client_events_on_two_workers() {
    let (server, port) = presence_server("2");
    assert_presence_works(&run_script("presence.mjs", port, port));
    drop(server);
}

/// What `echo_presence.mjs` saw: Echo's `here`, `joining`, `leaving` and `whisper`.
fn assert_echo_presence_works(steps: &[Value]) {
    let ben = serde_json::json!({"id": 2, "name": "Ben"});
    assert_eq!(step(steps, "ann_here")["names"], serde_json::json!(["Ann"]));
    assert_eq!(
        step(steps, "ben_here")["names"],
        serde_json::json!(["Ann", "Ben"])
    );
    assert_eq!(step(steps, "ann_saw_joining")["user"], ben);
    assert_eq!(
        step(steps, "whisper")["got"],
        serde_json::json!({"name": "Ben"})
    );
    assert_eq!(step(steps, "ann_saw_leaving")["user"], ben);
    step(steps, "done");
}

#[test]
fn laravel_echo_joins_a_presence_channel_and_whispers_on_one_process_and_two_workers() {
    for workers in ["1", "2"] {
        let (server, port) = presence_server(workers);
        assert_echo_presence_works(&run_script("echo_presence.mjs", port, port));
        drop(server);
    }
}

/// A server with the test app on `workers` workers, and its port.
fn pusher_server(workers: &str) -> (Server, u16) {
    pusher_server_with(workers, &[])
}

/// [`pusher_server`] with more flags.
fn pusher_server_with(workers: &str, extra: &[&str]) -> (Server, u16) {
    let mut args = pusher_args(workers);
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let port = server.addr.port();
    (server, port)
}

/// Laravel Echo's Pusher connector: `channel(…).listen("OrderShipped")` (Laravel's
/// namespaced event name) and `private(…).listen(".invoice.paid")` (signed by the SDK's
/// `authorizeChannel`), on one process, on two workers, and on a three-node cluster
/// (the events sent to another node than Echo's).
#[test]
fn laravel_echo_listens_on_public_and_private_channels() {
    let assert_received = |steps: Vec<Value>| {
        let received = step(&steps, "received");
        assert_eq!(received["order"]["id"], 1, "{received}");
        assert_eq!(received["invoice"]["amount"], 12, "{received}");
        step(&steps, "done");
    };
    for workers in ["1", "2"] {
        let (server, port) = pusher_server(workers);
        assert_received(run_script("echo.mjs", port, port));
        drop(server);
    }
    let redis = Broker::start("redis", free_port());
    let nodes = three_nodes(&redis, &[]);
    let port = |i: usize| nodes[i].addr.port();
    assert_received(run_script("echo.mjs", port(1), port(0)));
    assert_received(run_script("echo.mjs", port(0), port(2)));
}

/// A node of a cluster on `broker` serving the test app on `workers` workers, once
/// ready.
fn node(broker: &Broker, workers: &str, extra: &[&str]) -> Server {
    let mut args = pusher_args(workers);
    args.extend(extra.iter().map(|a| a.to_string()));
    node_with(broker, args)
}

/// A three-node cluster on `broker` serving the test app with `extra` flags: a
/// single-process node and two nodes of two workers.
fn three_nodes(broker: &Broker, extra: &[&str]) -> [Server; 3] {
    ["1", "2", "2"].map(|workers| node(broker, workers, extra))
}

/// A node of a cluster on `broker` started with `args`, once ready.
fn node_with(broker: &Broker, mut args: Vec<String>) -> Server {
    args.extend(["--broker".to_string(), broker.url()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Server::start(&args);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while common::http(node.addr, "GET", "/readyz", &[], b"").status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "a node never got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    node
}

/// Presence and client events across a three-node cluster over Redis (a single-process
/// node and two 2-worker nodes): pusher-js's Alice on one node, Bob's two sockets on
/// another; Laravel Echo's Ann on the third, Ben on the first.
#[test]
fn presence_and_client_events_across_a_three_node_cluster() {
    let redis = Broker::start("redis", free_port());
    let events = ["--pusher-client-events"];
    let nodes = three_nodes(&redis, &events);
    let port = |i: usize| nodes[i].addr.port();
    assert_presence_works(&run_script("presence.mjs", port(0), port(1)));
    assert_presence_works(&run_script("presence.mjs", port(1), port(0)));
    assert_echo_presence_works(&run_script("echo_presence.mjs", port(2), port(0)));
}

/// What `users.mjs` saw: sign-in, `sendToUser`, a forged sign-in refused, and
/// `terminate_connections` closing the user's connection and no other.
fn assert_users_work(steps: &[Value]) {
    let signed = step(steps, "signed_in");
    assert_eq!(signed["user"]["id"], "carol", "{signed}");
    assert_eq!(
        step(steps, "sent_to_user")["got"],
        serde_json::json!({"text": "hi"})
    );
    let forged = step(steps, "forged_signin");
    assert_eq!(forged["error"]["code"], 4009, "{forged}");
    assert_eq!(forged["state"], "connected", "{forged}");
    let terminated = step(steps, "terminated");
    assert_eq!(terminated["status"], 200, "{terminated}");
    assert_eq!(terminated["error"]["code"], 4009, "{terminated}");
    assert_ne!(terminated["carol"], "connected", "{terminated}");
    assert_eq!(terminated["mallory"], "connected", "{terminated}");
    step(steps, "done");
}

#[test]
fn user_signin_send_to_user_and_terminate_on_one_process_and_two_workers() {
    for workers in ["1", "2"] {
        let (server, port) = pusher_server(workers);
        assert_users_work(&run_script("users.mjs", port, port));
        let metrics = common::http(server.addr, "GET", "/metrics", &[], b"").body;
        assert!(metrics.contains("c1m_pusher_signins_total"), "{metrics}");
    }
}

/// What `webhooks.mjs` received: every event valid by the SDK's validator, and each
/// of the channel's life once (occupied, two members in and out, the client event,
/// vacated), whichever process or node sent it.
fn assert_webhooks_work(steps: &[Value]) {
    let got = step(steps, "webhooks");
    assert_eq!(got["invalid"], 0, "{got}");
    let events = got["events"].as_array().expect("events");
    let count = |name: &str, user: Option<&str>| {
        events
            .iter()
            .filter(|e| {
                e["name"] == name
                    && e["channel"] == "presence-hooks"
                    && user.is_none_or(|u| e["user_id"] == u)
            })
            .count()
    };
    for (name, user) in [
        ("channel_occupied", None),
        ("member_added", Some("alice")),
        ("member_added", Some("bob")),
        ("member_removed", Some("bob")),
        ("member_removed", Some("alice")),
        ("channel_vacated", None),
    ] {
        assert_eq!(count(name, user), 1, "{name} {user:?}: {got}");
    }
    let client_event = events
        .iter()
        .find(|e| e["name"] == "client_event")
        .unwrap_or_else(|| panic!("no client_event: {got}"));
    assert_eq!(client_event["event"], "client-ping", "{got}");
    assert_eq!(
        client_event["data"], r#"{"n":1}"#,
        "data as a string: {got}"
    );
    assert_eq!(client_event["user_id"], "alice", "{got}");
    assert!(client_event["socket_id"].is_string(), "{got}");
    assert_eq!(events.len(), 7, "nothing else, nothing twice: {got}");
    step(steps, "done");
}

fn webhook_args(hook_port: u16) -> Vec<String> {
    vec![
        "--pusher-client-events".into(),
        "--pusher-webhook".into(),
        format!("http://127.0.0.1:{hook_port}/"),
    ]
}

#[test]
fn webhooks_on_one_process_and_on_two_workers() {
    for workers in ["1", "2"] {
        let hook_port = free_port();
        let extra = webhook_args(hook_port);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (server, port) = pusher_server_with(workers, &extra);
        assert_webhooks_work(&run_script_with("webhooks.mjs", port, &[port, hook_port]));
        let metrics = common::http(server.addr, "GET", "/metrics", &[], b"").body;
        let sent = common::metric_value(&metrics, "c1m_pusher_webhook_events_sent_total");
        if workers == "1" {
            assert_eq!(sent, Some(7.0), "{metrics}");
        } else {
            // A worker shows the master's counts as of its last second.
            assert!(sent.is_some(), "{metrics}");
        }
    }
}

/// Across a three-node cluster (a single-process node and two 2-worker nodes):
/// webhooks with Alice on one node and Bob on another, still each event once (the
/// nodes tell each other which channels they have); users signed in on one node while
/// the SDK calls another; public and private channels with the SDK on another node.
#[test]
fn webhooks_users_and_channels_across_a_three_node_cluster() {
    let redis = Broker::start("redis", free_port());
    let hook_port = free_port();
    let args = webhook_args(hook_port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nodes = three_nodes(&redis, &args);
    let port = |i: usize| nodes[i].addr.port();
    assert_webhooks_work(&run_script_with(
        "webhooks.mjs",
        port(0),
        &[port(2), hook_port],
    ));
    assert_users_work(&run_script("users.mjs", port(1), port(0)));
    assert_users_work(&run_script("users.mjs", port(0), port(2)));
    assert_public_channels_work(&run_public(port(2), port(1)));
}

/// Two apps on one server (two workers): the same channel names, each app's events,
/// members, read API, client-event switch and webhooks its own.
#[test]
fn two_apps_on_one_server_keep_to_themselves() {
    let hook_port = free_port();
    let second = format!(
        "7:other-key:other-secret?client_events=true&webhook=http%3A%2F%2F127.0.0.1%3A{hook_port}%2F"
    );
    let first = APP.join(":");
    let server = Server::start(&[
        "--workers",
        "2",
        "--pusher-app",
        &first,
        "--pusher-app",
        &second,
    ]);
    let port = server.addr.port().to_string();
    let hook = hook_port.to_string();
    let args = [
        port.as_str(),
        APP[0],
        APP[1],
        APP[2],
        "7",
        "other-key",
        "other-secret",
        hook.as_str(),
    ];
    let steps = run_node("apps.mjs", &args);
    assert_eq!(step(&steps, "members")["one"], 1, "{steps:?}");
    assert_eq!(step(&steps, "members")["two"], 1, "{steps:?}");
    assert_eq!(
        step(&steps, "events")["a"],
        serde_json::json!(["one"]),
        "{steps:?}"
    );
    assert_eq!(
        step(&steps, "events")["b"],
        serde_json::json!(["two"]),
        "{steps:?}"
    );
    let read = step(&steps, "read");
    let listed = serde_json::json!({"channels": {"news": {}, "presence-room": {}}});
    assert_eq!(read["one"], listed, "{read}");
    assert_eq!(read["two"], listed, "{read}");
    let client_events = step(&steps, "client_events");
    assert_eq!(client_events["one"]["code"], 4301, "{client_events}");
    assert_eq!(client_events["two_sent"], true, "{client_events}");
    let hooks = step(&steps, "webhooks")["hooks"]
        .as_array()
        .expect("hooks")
        .clone();
    assert!(!hooks.is_empty());
    for hook in &hooks {
        assert_eq!(
            hook["valid_for_two"], true,
            "signed with app 2's secret: {hook}"
        );
        assert_eq!(hook["valid_for_one"], false, "{hook}");
        for event in hook["events"].as_array().expect("events") {
            assert!(
                !event["channel"].as_str().unwrap_or("").contains('~'),
                "channel names as the app knows them: {event}"
            );
        }
    }
    let left = step(&steps, "left");
    assert_eq!(left["users"], serde_json::json!([]), "{left}");
    assert_eq!(left["removed"], true, "{left}");
    step(&steps, "done");
}

/// `limits.mjs` in `mode` (quota or capacity) against `ports` (its first two
/// clients' servers; the third goes to the first), checked.
fn assert_limit_holds(mode: &str, ports: [u16; 2]) {
    let [a, b] = ports.map(|p| p.to_string());
    let steps = run_node("limits.mjs", &[mode, &a, &b, APP[1]]);
    let refused = step(&steps, "refused");
    match mode {
        "quota" => {
            assert_eq!(refused["code"], 4004, "{steps:?}");
            let gave_up = step(&steps, "gave_up");
            assert_eq!(gave_up["state"], "disconnected", "no retry: {gave_up}");
            assert_eq!(gave_up["errors"], serde_json::json!([4004]), "{gave_up}");
            step(&steps, "room_again");
        }
        _ => {
            assert_eq!(refused["code"], 4100, "{steps:?}");
            let back = step(&steps, "came_back");
            assert!(back["socket_id"].is_string(), "{back}");
        }
    }
    step(&steps, "done");
}

/// Limits in Pusher's words, with pusher-js: an app's `max_connections` (error 4004:
/// pusher-js gives up, and gets in once there is room and it is told to connect) on
/// one process, two workers (the count is the node's) and two nodes of a cluster
/// (the count is the cluster's); the server's `--max-connections` (error 4100:
/// pusher-js retries by itself and gets in once a place is free).
#[test]
fn an_apps_quota_and_the_servers_capacity_are_told_in_pushers_codes() {
    let quota = format!("{}?max_connections=2", APP.join(":"));
    let args = |workers: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["--workers", workers, "--pusher-app", &quota]
            .map(str::to_string)
            .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    for workers in ["1", "2"] {
        let server = Server::start(
            &args(workers, &[])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        let port = server.addr.port();
        assert_limit_holds("quota", [port, port]);
    }
    let redis = Broker::start("redis", free_port());
    let nodes = [
        node_with(&redis, args("2", &[])),
        node_with(&redis, args("1", &[])),
    ];
    assert_limit_holds("quota", [nodes[0].addr.port(), nodes[1].addr.port()]);
    drop(nodes);
    for workers in ["1", "2"] {
        let (server, port) = pusher_server_with(workers, &["--max-connections", "2"]);
        assert_limit_holds("capacity", [port, port]);
        drop(server);
    }
}

/// A Pusher client of the test app on `addr`: connected, its socket id read.
async fn pusher_client(addr: std::net::SocketAddr) -> (common::Ws, String) {
    let url = format!("ws://{addr}/app/{}", APP[1]);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    let hello = common::next_json(&mut ws).await;
    let data: Value = serde_json::from_str(hello["data"].as_str().expect("data string"))
        .expect("connection data");
    let socket_id = data["socket_id"].as_str().expect("socket id").to_string();
    (ws, socket_id)
}

/// Joins `channel` as `user`, signed as the app's auth endpoint would: the members
/// (`presence.hash`) the server answered with.
async fn join_presence(ws: &mut common::Ws, socket_id: &str, channel: &str, user: &str) -> Value {
    use futures_util::SinkExt;
    let app = c1m_server::pusher::App::parse(&APP.join(":")).expect("app");
    let channel_data =
        serde_json::json!({"user_id": user, "user_info": {"name": user}}).to_string();
    let auth = c1m_server::pusher::sign_channel(&app, socket_id, channel, Some(&channel_data));
    let subscribe = serde_json::json!({"event": "pusher:subscribe", "data": {
        "channel": channel, "auth": auth, "channel_data": channel_data}});
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        subscribe.to_string(),
    ))
    .await
    .expect("send");
    loop {
        let message = common::next_json(ws).await;
        if message["event"] == "pusher_internal:subscription_succeeded" {
            let data: Value =
                serde_json::from_str(message["data"].as_str().expect("data")).expect("members");
            return data["presence"]["hash"].clone();
        }
        assert_ne!(message["event"], "pusher:subscription_error", "{message}");
    }
}

/// The next message on `ws` that is event `event`, skipping others (bounded by
/// `within`).
async fn next_event(ws: &mut common::Ws, event: &str, within: std::time::Duration) -> Value {
    tokio::time::timeout(within, async {
        loop {
            let message = common::next_json(ws).await;
            if message["event"] == event {
                return message;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {event} within {within:?}"))
}

/// A node that joins the cluster late learns the members already there (the others
/// answer its announcement with their state); a node that dies takes its members with
/// it (the others notice its silence within `STALE_AFTER` and tell their members).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_nodes_that_come_late_and_nodes_that_die_over_redis() {
    presence_follows_nodes("redis").await;
}

/// The same over NATS (the presence subject, not Redis's channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_nodes_that_come_late_and_nodes_that_die_over_nats() {
    presence_follows_nodes("nats").await;
}

async fn presence_follows_nodes(kind: &'static str) {
    let broker = Broker::start(kind, free_port());
    let first = tokio::task::block_in_place(|| node(&broker, "2", &[]));
    let (mut xavier, xavier_id) = pusher_client(first.addr).await;
    let members = join_presence(&mut xavier, &xavier_id, "presence-hall", "xavier").await;
    assert_eq!(members, serde_json::json!({"xavier": {"name": "xavier"}}));

    let late = tokio::task::block_in_place(|| node(&broker, "1", &[]));
    let (mut yara, yara_id) = pusher_client(late.addr).await;
    let members = join_presence(&mut yara, &yara_id, "presence-hall", "yara").await;
    assert_eq!(
        members,
        serde_json::json!({"xavier": {"name": "xavier"}, "yara": {"name": "yara"}}),
        "the late node knows who was there"
    );
    let added = next_event(&mut xavier, "pusher_internal:member_added", SECONDS_5).await;
    let data: Value = serde_json::from_str(added["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["user_id"], "yara", "{added}");

    // The late node dies without a word: Xavier is told Yara left.
    let mut late = late;
    let _ = late.child.kill();
    let _ = late.child.wait();
    let removed = next_event(
        &mut xavier,
        "pusher_internal:member_removed",
        std::time::Duration::from_secs(10),
    )
    .await;
    assert_eq!(removed["channel"], "presence-hall");
    let data: Value = serde_json::from_str(removed["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, serde_json::json!({"user_id": "yara"}), "{removed}");
    drop(first);
}

const SECONDS_5: std::time::Duration = std::time::Duration::from_secs(5);

/// Bad input from a Pusher client gets the protocol's error and touches nobody else;
/// the HTTP API refuses unknown apps and unsigned requests.
#[tokio::test]
async fn bad_input_gets_the_protocols_errors_and_no_one_else_notices() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut args = pusher_args("1");
    args.extend(["--api-key".to_string(), "k".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let mut bystander = upgrade(&server, "/app/app-key").await;
    assert_eq!(
        common::next_json(&mut bystander).await["event"],
        "pusher:connection_established"
    );
    let subscribe = r#"{"event":"pusher:subscribe","data":{"channel":"news"}}"#;
    bystander.send(Message::text(subscribe)).await.unwrap();
    assert_eq!(
        common::next_json(&mut bystander).await["event"],
        "pusher_internal:subscription_succeeded"
    );

    // Pusher's channel names take `= @ , ;` (not c1m's native topic names).
    let odd = r#"{"event":"pusher:subscribe","data":{"channel":"room=1@eu,a;b"}}"#;
    bystander.send(Message::text(odd)).await.unwrap();
    let answer = common::next_json(&mut bystander).await;
    assert_eq!(
        (&answer["event"], &answer["channel"]),
        (
            &"pusher_internal:subscription_succeeded".into(),
            &"room=1@eu,a;b".into()
        ),
        "{answer}"
    );

    let mut rogue = upgrade(&server, "/app/app-key").await;
    common::next_json(&mut rogue).await;
    for (bad, says) in [
        ("not json", "pusher:error"),
        (r#"{"event":"pusher:subscribe","data":{}}"#, "pusher:error"),
        (
            r#"{"event":"pusher:subscribe","data":{"channel":"bad name!"}}"#,
            "pusher:subscription_error",
        ),
        (
            r#"{"event":"pusher:subscribe","data":{"channel":"private-x","auth":"app-key:00"}}"#,
            "pusher:subscription_error",
        ),
        (
            r#"{"event":"client-typing","channel":"news","data":{}}"#,
            "pusher:error",
        ),
        // Client events are off on this server (no --pusher-client-events).
        (
            r#"{"event":"client-typing","channel":"private-x","data":{}}"#,
            "pusher:error",
        ),
        // Presence: no channel_data, channel_data that is not JSON or names no user, a
        // signature that is not the app's.
        (
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-x","auth":"app-key:00"}}"#,
            "pusher:subscription_error",
        ),
        (
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-x","auth":"app-key:00","channel_data":"{"}}"#,
            "pusher:subscription_error",
        ),
        (
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-x","auth":"app-key:00","channel_data":"{\"user_info\":{}}"}}"#,
            "pusher:subscription_error",
        ),
        (
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-x","auth":"app-key:00","channel_data":"{\"user_id\":\"u\"}"}}"#,
            "pusher:subscription_error",
        ),
    ] {
        rogue.send(Message::text(bad)).await.unwrap();
        let answer = common::next_json(&mut rogue).await;
        assert_eq!(answer["event"], says, "{bad}: {answer}");
    }
    let oversized = format!(r#"{{"event":"pusher:ping","data":"{}"}}"#, "x".repeat(5000));
    rogue.send(Message::text(oversized)).await.unwrap();
    let answer = common::next_json(&mut rogue).await;
    assert_eq!(
        answer["event"], "pusher:error",
        "an oversized message: {answer}"
    );
    // Still open, and it still answers.
    rogue
        .send(Message::text(r#"{"event":"pusher:ping","data":{}}"#))
        .await
        .unwrap();
    assert_eq!(common::next_json(&mut rogue).await["event"], "pusher:pong");

    // The HTTP API: an unknown app, a missing signature.
    let addr = server.addr;
    let (unknown, unsigned) = tokio::task::spawn_blocking(move || {
        let body = br#"{"name":"e","channels":["news"],"data":"x"}"#;
        let json = ["Content-Type: application/json"];
        (
            common::http(addr, "POST", "/apps/7/events", &json, body),
            common::http(addr, "POST", "/apps/42/events", &json, body),
        )
    })
    .await
    .unwrap();
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unsigned.status, 401, "{unsigned:?}");
    let metrics = common::http(server.addr, "GET", "/metrics", &[], b"").body;
    for (name, value) in [
        ("c1m_pusher_connections_opened_total", 2.0),
        ("c1m_pusher_subscriptions_refused_total", 6.0),
        ("c1m_pusher_client_events_refused_total", 2.0),
        ("c1m_pusher_presence_joins_total", 0.0),
        ("c1m_pusher_api_refused_total", 2.0),
        ("c1m_pusher_api_events_total", 0.0),
    ] {
        assert_eq!(
            common::metric_value(&metrics, name),
            Some(value),
            "{name}: {metrics}"
        );
    }

    // A native publish to the channel reaches the bystander, wrapped as a Pusher event.
    let addr = server.addr;
    let published =
        tokio::task::spawn_blocking(move || common::publish(addr, "k", "news", "plain text"))
            .await
            .unwrap();
    assert_eq!(published.status, 200, "{published:?}");
    let event = common::next_json(&mut bystander).await;
    assert_eq!(
        (&event["event"], &event["channel"], &event["data"]),
        (&"message".into(), &"news".into(), &"plain text".into()),
        "{event}"
    );
}

/// A server shutting down tells its Pusher clients to come back at once (close code
/// 4200, which pusher-js reconnects on without backoff), and native clients 1001.
#[tokio::test]
async fn pusher_clients_are_told_to_reconnect_when_the_server_stops() {
    let (server, _) = pusher_server("1");
    let (mut pusher, _) = tokio_tungstenite::connect_async(server.url("/app/app-key"))
        .await
        .expect("upgrade");
    common::next_json(&mut pusher).await;
    let (mut native, _) = tokio_tungstenite::connect_async(server.url("/"))
        .await
        .expect("upgrade");
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    assert_eq!(close_code(&mut pusher).await, Some(4200));
    assert_eq!(close_code(&mut native).await, Some(1001));
}

/// A client asking for a protocol version c1m does not speak gets error 4007 (and
/// close 4007, which pusher-js does not retry); a silent Pusher client is closed with
/// 4201 ("pong reply not received": reconnect at once), a native one with 1001.
#[tokio::test]
async fn unsupported_protocol_versions_and_silent_clients_get_pushers_codes() {
    let (server, _) = pusher_server_with("1", &["--ping-interval", "0", "--idle-timeout", "1s"]);
    let mut old = upgrade(&server, "/app/app-key?protocol=4&client=js").await;
    let error = common::next_json(&mut old).await;
    assert_eq!(error["event"], "pusher:error", "{error}");
    assert_eq!(error["data"]["code"], 4007, "{error}");
    assert_eq!(close_code(&mut old).await, Some(4007));

    let mut pusher = upgrade(&server, "/app/app-key?protocol=7&client=js&version=8.6.0").await;
    let established = common::next_json(&mut pusher).await;
    assert_eq!(
        established["event"], "pusher:connection_established",
        "{established}"
    );
    let mut native = upgrade(&server, "/").await;
    assert_eq!(close_code(&mut pusher).await, Some(4201));
    assert_eq!(close_code(&mut native).await, Some(1001));
    // The refused client was never counted open, so it is not uncounted either.
    let addr = server.addr;
    let metrics =
        tokio::task::spawn_blocking(move || common::http(addr, "GET", "/metrics", &[], b"").body)
            .await
            .unwrap();
    assert_eq!(
        common::metric_value(&metrics, "c1m_connections"),
        Some(0.0),
        "{metrics}"
    );
}

/// A WebSocket client of `server` on `path`, once upgraded.
async fn upgrade(server: &Server, path: &str) -> common::Ws {
    tokio_tungstenite::connect_async(server.url(path))
        .await
        .expect("upgrade")
        .0
}

/// The code of the close frame `ws` gets next (other messages skipped; at most 20).
async fn close_code(ws: &mut common::Ws) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    for _ in 0..20 {
        match tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
    panic!("no close frame among 20 messages")
}

/// `c1m bench --protocol pusher` measures Pusher clients like native ones: every
/// connection subscribed (to the clock's channel `time` by default), every tick of the
/// clock received as a Pusher event and its stamp read, and the protocol's own
/// messages not counted. Pusher flags without the protocol are refused.
#[test]
fn the_bench_speaks_pusher() {
    let mut args = pusher_args("1");
    args.extend(["--interval", "300ms", "--total", "100"].map(str::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let url = server.url("/app/app-key");
    let refused = Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args(["bench", "--url", &url, "--pusher-secret", "s", "-c", "1"])
        .output()
        .expect("run c1m bench");
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--protocol pusher"), "{said}");
    let (_, json) = common::run_bench(
        "pusher-bench",
        &[
            "--url",
            &url,
            "--protocol",
            "pusher",
            "-c",
            "100",
            "--messages",
            "3",
        ],
    );
    let result: c1m_bench::report::BenchResult = serde_json::from_str(&json).expect("a result");
    let snap = &result.snapshot;
    assert_eq!(snap.established, 100, "{json}");
    assert_eq!(
        snap.messages, 300,
        "3 ticks each, nothing else counted: {json}"
    );
    assert_eq!(snap.unparsable, 0, "{json}");
    assert_eq!(snap.latency.len(), 300, "every event's stamp read");
}

/// `c1m bench` on presence channels: each connection signs its subscription with the
/// app's secret (in 2 bench processes), one member per connection, spread over 3
/// channels: the server took all 60 joins and refused none.
#[test]
fn the_bench_joins_presence_channels_signed() {
    let (server, _) = pusher_server("1");
    let url = server.url("/app/app-key");
    let (_, json) = common::run_bench(
        "pusher-presence-bench",
        &[
            "--url",
            &url,
            "--pusher-channel",
            "presence-bench",
            "--pusher-channels",
            "3",
            "--pusher-secret",
            APP[2],
            "-c",
            "60",
            "--procs",
            "2",
            "--messages",
            "0",
            "--duration",
            "2s",
        ],
    );
    let result: c1m_bench::report::BenchResult = serde_json::from_str(&json).expect("a result");
    assert_eq!(result.snapshot.established, 60, "{json}");
    assert!(result.snapshot.errors.is_empty(), "{json}");
    // The bench ends a `--messages 0` run only once every subscription is answered,
    // so the server has counted every join by now.
    let metrics = common::http(server.addr, "GET", "/metrics", &[], b"").body;
    let value = |name| common::metric_value(&metrics, name);
    assert_eq!(
        value("c1m_pusher_presence_joins_total"),
        Some(60.0),
        "{metrics}"
    );
    assert_eq!(
        value("c1m_pusher_subscriptions_refused_total"),
        Some(0.0),
        "{metrics}"
    );
}

/// pusher-js comes back by itself and gets its channel's events again, both its Node
/// build and its browser build in headless Chromium: after its one-process server
/// restarts on the same port (it is told 4200 as the server stops), after the worker
/// holding it is SIGKILLed (two workers), and after its node of a three-node cluster
/// restarts (the events published on another node).
#[test]
fn pusher_js_in_node_and_chromium_reconnects_after_its_server_worker_or_node_goes() {
    for client in [PusherJs::Node, PusherJs::Chromium] {
        reconnects_after_its_server_worker_or_node_goes(client);
    }
}

/// Which build of pusher-js a test drives.
#[derive(Clone, Copy, Debug)]
enum PusherJs {
    /// `tests/pusher/reconnect.mjs` in Node.js.
    Node,
    /// The same, as a page of the browser build in headless Chromium.
    Chromium,
}

fn reconnects_after_its_server_worker_or_node_goes(client: PusherJs) {
    let mut args = pusher_args("1");
    args.extend(["--api-key".to_string(), "k".to_string()]);
    let start = |listen: &str, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_on(listen, &args)
    };

    // One process, restarted on its port.
    let mut server = start("127.0.0.1:0", &args);
    let addr = server.addr;
    let seen = pusher_js_reconnects(client, addr, addr, || {
        server.terminate();
        server = start(&addr.to_string(), &args);
    });
    assert_reconnected(client, &seen);
    drop(server);

    // Two workers, the client's worker SIGKILLed (every worker: only this test's).
    args[1] = "2".into();
    let server = start("127.0.0.1:0", &args);
    let (addr, pid) = (server.addr, server.child.id());
    let seen = pusher_js_reconnects(client, addr, addr, || {
        for worker in common::children_of(pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &worker.to_string()])
                .status();
        }
    });
    assert_reconnected(client, &seen);
    drop(server);

    // A cluster: the client's node (one process) restarts; events come from another.
    let redis = Broker::start("redis", free_port());
    args[1] = "1".into();
    let mut nodes = [
        node_with(&redis, args.clone()),
        node_with(&redis, {
            let mut a = args.clone();
            a[1] = "2".into();
            a
        }),
        node_with(&redis, args.clone()),
    ];
    let (client_addr, publish_addr) = (nodes[0].addr, nodes[1].addr);
    let mut restart_args = args.clone();
    restart_args.extend(["--broker".to_string(), redis.url()]);
    let seen = pusher_js_reconnects(client, client_addr, publish_addr, || {
        nodes[0].terminate();
        nodes[0] = start(&client_addr.to_string(), &restart_args);
    });
    assert_reconnected(client, &seen);
}

/// What [`pusher_js_reconnects`]'s client reported: the event before and the one
/// after, over two connections at least.
fn assert_reconnected(client: PusherJs, seen: &Value) {
    assert_eq!(
        seen["got"],
        serde_json::json!([{"n": "before"}, {"n": "end"}]),
        "{client:?}: {seen}"
    );
    assert!(
        seen["connects"].as_u64() >= Some(2),
        "{client:?} reconnected: {seen}"
    );
}

/// The page of [`PusherJs::Chromium`]: what `reconnect.mjs` does, in the browser.
fn reconnect_page(client_addr: std::net::SocketAddr, report_addr: std::net::SocketAddr) -> String {
    let bundle = std::fs::read_to_string(
        npm_packages().join("node_modules/pusher-js/dist/web/pusher.min.js"),
    )
    .expect("pusher-js's browser build");
    let key = APP[1];
    format!(
        r#"<!doctype html><meta charset="utf-8"><script>{bundle}</script><script>
const got = [];
let connects = 0;
const pusher = new Pusher("{key}", {{ cluster: "mt1", wsHost: "127.0.0.1", wsPort: {port},
  forceTLS: false, enabledTransports: ["ws"], disableStats: true }});
pusher.connection.bind("connected", () => connects++);
pusher.subscribe("news").bind("greet", (data) => {{
  if (got.some((g) => g.n === data.n)) return;
  got.push(data);
  if (data.n === "end") {{
    const body = JSON.stringify({{ got, connects }});
    fetch("http://{report_addr}/", {{ method: "POST", mode: "no-cors", body }});
  }}
}});
</script>"#,
        port = client_addr.port()
    )
}

/// pusher-js (`client`) subscribes to `news` on `client_addr`; an event published on
/// `publish_addr` reaches it, then `disrupt` runs, and events are published until the
/// client reports one that came after: its report.
fn pusher_js_reconnects(
    client: PusherJs,
    client_addr: std::net::SocketAddr,
    publish_addr: std::net::SocketAddr,
    disrupt: impl FnOnce(),
) -> Value {
    let report = std::net::TcpListener::bind("127.0.0.1:0").expect("report listener");
    let report_addr = report.local_addr().unwrap();
    // The client's process, and what to remove after it.
    let (mut command, leftovers) = match client {
        PusherJs::Node => {
            let mut command = Command::new("node");
            command
                .arg("reconnect.mjs")
                .args([&client_addr.port().to_string(), APP[1]])
                .arg(report_addr.to_string())
                .current_dir(npm_packages());
            (command, vec![])
        }
        PusherJs::Chromium => {
            let page = std::env::temp_dir().join(format!(
                "c1m-pusher-{}-{}.html",
                std::process::id(),
                client_addr.port()
            ));
            std::fs::write(&page, reconnect_page(client_addr, report_addr)).unwrap();
            let (command, profile) =
                common::chromium_command(&format!("file://{}", page.display()), &[]);
            (command, vec![page, profile])
        }
    };
    let mut process = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| match client {
            PusherJs::Node => panic!("node is needed for this test: {e}"),
            PusherJs::Chromium => common::missing_chromium(e),
        });
    // An event as the Pusher API sends it, published natively (it passes as is).
    let send = |n: &str| {
        let event = serde_json::json!({
            "event": "greet", "channel": "news", "data": serde_json::json!({"n": n}).to_string()
        });
        common::http(
            publish_addr,
            "POST",
            "/publish?topic=news",
            &["Authorization: Bearer k", "Content-Type: text/plain"],
            event.to_string().as_bytes(),
        )
    };
    // Subscribed where the event is published from (in a cluster: the client's node's
    // report, a second old at most, says so).
    let scope = if client_addr == publish_addr {
        "node"
    } else {
        "cluster"
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while common::stats(publish_addr, scope)["topics"]["news"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{client:?} never subscribed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(send("before").status, 200);
    // The event reaches the client before it is cut off (it reports only on "end").
    std::thread::sleep(std::time::Duration::from_millis(500));
    disrupt();
    // Until the client reports: it subscribes again on its own schedule, and an event
    // sent before that reaches nobody (the client reports on the first "end" it gets).
    let reported = std::sync::atomic::AtomicBool::new(false);
    let body = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !reported.load(std::sync::atomic::Ordering::SeqCst) {
                send("end");
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        });
        let body = common::await_posted_body(&report, std::time::Duration::from_secs(30));
        reported.store(true, std::sync::atomic::Ordering::SeqCst);
        body
    });
    let _ = process.kill();
    let _ = process.wait();
    for path in leftovers {
        let _ = std::fs::remove_dir_all(&path);
        let _ = std::fs::remove_file(&path);
    }
    serde_json::from_slice(&body).expect("report JSON")
}

/// pusher-js's browser build in headless Chromium on presence and private channels: two
/// users (signed in the page with WebCrypto, as the app's auth endpoint would sign
/// them) see each other come and go, a client event on the private channel and one on
/// the presence channel (with the sender's user id) reach the other; on one process,
/// on two workers, and across a three-node cluster (Alice and Bob on different nodes).
#[test]
fn pusher_js_in_chromium_on_presence_and_private_channels_with_client_events() {
    for workers in ["1", "2"] {
        let (server, port) = presence_server(workers);
        assert_browser_users_meet(&browser_users_meet([port, port]));
        drop(server);
    }
    let redis = Broker::start("redis", free_port());
    let events = ["--pusher-client-events"];
    let nodes = three_nodes(&redis, &events);
    let port = |i: usize| nodes[i].addr.port();
    assert_browser_users_meet(&browser_users_meet([port(1), port(2)]));
    assert_browser_users_meet(&browser_users_meet([port(2), port(0)]));
}

/// What the page of [`browser_users_meet`] reported.
fn assert_browser_users_meet(seen: &Value) {
    assert_eq!(seen["bob_count"], 2, "{seen}");
    assert_eq!(
        seen["member"],
        serde_json::json!({"id": "bob", "info": {"name": "bob"}}),
        "{seen}"
    );
    assert_eq!(seen["note"], serde_json::json!({"from": "bob"}), "{seen}");
    assert_eq!(
        seen["wave"],
        serde_json::json!({"data": {"hello": "bob"}, "user_id": "alice"}),
        "{seen}"
    );
    assert_eq!(seen["left"]["id"], "bob", "{seen}");
    assert_eq!(seen["alice_count"], 1, "{seen}");
}

/// Runs a page in headless Chromium where Alice (on `ports[0]`) and Bob (on
/// `ports[1]`) meet on `presence-browser` and `private-notes`; returns its report.
fn browser_users_meet(ports: [u16; 2]) -> Value {
    let bundle = std::fs::read_to_string(
        npm_packages().join("node_modules/pusher-js/dist/web/pusher.min.js"),
    )
    .expect("pusher-js's browser build");
    let report = std::net::TcpListener::bind("127.0.0.1:0").expect("report listener");
    let report_addr = report.local_addr().unwrap();
    let page = std::env::temp_dir().join(format!(
        "c1m-presence-{}-{}.html",
        std::process::id(),
        ports[0]
    ));
    let (key, secret) = (APP[1], APP[2]);
    let [alice_port, bob_port] = ports;
    std::fs::write(
        &page,
        format!(
            r#"<!doctype html><meta charset="utf-8"><script>{bundle}</script><script>
const enc = new TextEncoder();
async function sign(text) {{
  const k = await crypto.subtle.importKey("raw", enc.encode("{secret}"),
    {{ name: "HMAC", hash: "SHA-256" }}, false, ["sign"]);
  const sig = new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode(text)));
  return Array.from(sig, (b) => b.toString(16).padStart(2, "0")).join("");
}}
function client(user, port) {{
  return new Pusher("{key}", {{ cluster: "mt1", wsHost: "127.0.0.1", wsPort: port,
    forceTLS: false, enabledTransports: ["ws"], disableStats: true,
    channelAuthorization: {{ customHandler: ({{ socketId, channelName }}, callback) => {{
      if (!channelName.startsWith("presence-")) {{
        sign(`${{socketId}}:${{channelName}}`).then((s) => callback(null, {{ auth: "{key}:" + s }}));
        return;
      }}
      const channel_data = JSON.stringify({{ user_id: user, user_info: {{ name: user }} }});
      sign(`${{socketId}}:${{channelName}}:${{channel_data}}`)
        .then((s) => callback(null, {{ auth: "{key}:" + s, channel_data }}));
    }} }} }});
}}
const report = (body) => fetch("http://{report_addr}/",
  {{ method: "POST", mode: "no-cors", body: JSON.stringify(body) }});
const joined = (channel) => new Promise((resolve, reject) => {{
  channel.bind("pusher:subscription_succeeded", resolve);
  channel.bind("pusher:subscription_error", (e) => reject(JSON.stringify(e)));
}});
(async () => {{
  const alicePusher = client("alice", {alice_port});
  const alice = alicePusher.subscribe("presence-browser");
  const aliceNotes = alicePusher.subscribe("private-notes");
  await Promise.all([joined(alice), joined(aliceNotes)]);
  const added = new Promise((resolve) => alice.bind("pusher:member_added", resolve));
  const bobPusher = client("bob", {bob_port});
  const bob = bobPusher.subscribe("presence-browser");
  const bobNotes = bobPusher.subscribe("private-notes");
  const [bobMembers] = await Promise.all([joined(bob), joined(bobNotes)]);
  const bobCount = bobMembers.count;
  const member = await added;
  const noted = new Promise((resolve) => aliceNotes.bind("client-note", resolve));
  bobNotes.trigger("client-note", {{ from: "bob" }});
  const note = await noted;
  const waved = new Promise((resolve) => bob.bind("client-wave", (data, meta) =>
    resolve({{ data, user_id: meta && meta.user_id }})));
  alice.trigger("client-wave", {{ hello: "bob" }});
  const wave = await waved;
  const removed = new Promise((resolve) => alice.bind("pusher:member_removed", resolve));
  bobPusher.disconnect();
  const left = await removed;
  report({{ bob_count: bobCount, member, note, wave, left, alice_count: alice.members.count }});
  alicePusher.disconnect();
}})().catch((e) => report({{ error: String(e) }}));
</script>"#
        ),
    )
    .unwrap();
    let (mut command, profile) =
        common::chromium_command(&format!("file://{}", page.display()), &[]);
    let mut browser = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| common::missing_chromium(e));
    let body = common::await_posted_body(&report, std::time::Duration::from_secs(30));
    let _ = browser.kill();
    let _ = browser.wait();
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(&page);
    serde_json::from_slice(&body).expect("report JSON")
}
