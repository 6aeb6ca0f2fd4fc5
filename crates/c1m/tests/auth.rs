//! Client authentication with the real binary: JWTs (HS256, ES256, RS256; expiry,
//! not-before, audience, signature, topic claims) and allowed origins. Every rejection
//! is an HTTP answer before the upgrade that says only "unauthorized" or "forbidden".

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{upgrade_status, Server};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn valid_claims() -> Value {
    json!({ "sub": "user-1", "exp": now() + 600 })
}

#[test]
fn hs256_tokens_are_checked_before_the_upgrade() {
    let server = Server::start(&["--connect-only", "--workers", "1", "--jwt-secret", "s3cret"]);
    let status = |path: &str, headers: &[&str]| upgrade_status(server.addr, path, headers);
    let good = hs256("s3cret", &valid_claims());

    assert_eq!(
        status(&format!("/?token={good}"), &[]).0,
        101,
        "token in the query"
    );
    let bearer = format!("Authorization: Bearer {good}");
    assert_eq!(status("/", &[&bearer]).0, 101, "token in the header");

    let (code, body) = status("/", &[]);
    assert_eq!((code, body.as_str()), (401, "unauthorized\n"), "no token");
    let expired = hs256("s3cret", &json!({ "exp": now() - 3600 }));
    assert_eq!(
        status(&format!("/?token={expired}"), &[]),
        (401, "unauthorized\n".into()),
        "expired"
    );
    let early = hs256(
        "s3cret",
        &json!({ "exp": now() + 7200, "nbf": now() + 3600 }),
    );
    assert_eq!(
        status(&format!("/?token={early}"), &[]).0,
        401,
        "not valid yet"
    );
    let forged = hs256("other-secret", &valid_claims());
    assert_eq!(
        status(&format!("/?token={forged}"), &[]).0,
        401,
        "wrong signature"
    );
    let no_exp = hs256("s3cret", &json!({ "sub": "x" }));
    assert_eq!(
        status(&format!("/?token={no_exp}"), &[]).0,
        401,
        "exp is required"
    );
    assert_eq!(status("/?token=not.a.jwt", &[]).0, 401, "garbage");
}

#[test]
fn the_topics_claim_limits_what_a_client_may_join() {
    let server = Server::start(&[
        "--connect-only",
        "--workers",
        "1",
        "--jwt-secret",
        "s3cret",
        "--jwt-audience",
        "c1m",
    ]);
    let token = |claims: Value| hs256("s3cret", &claims);
    let limited = token(json!({ "exp": now() + 600, "aud": "c1m", "topics": ["a", "time"] }));
    let status = |path: String| upgrade_status(server.addr, &path, &[]);
    assert_eq!(status(format!("/?topic=a&token={limited}")).0, 101);
    assert_eq!(
        status(format!("/?token={limited}")).0,
        101,
        "time is listed"
    );
    let (code, body) = status(format!("/?topic=b&token={limited}"));
    assert_eq!(
        (code, body.as_str()),
        (403, "forbidden\n"),
        "b is not listed"
    );
    assert_eq!(status(format!("/?topic=a&topic=b&token={limited}")).0, 403);
    let any_topic = token(json!({ "exp": now() + 600, "aud": "c1m" }));
    assert_eq!(
        status(format!("/?topic=b&token={any_topic}")).0,
        101,
        "no claim: any topic"
    );
    let other_aud = token(json!({ "exp": now() + 600, "aud": "someone-else" }));
    assert_eq!(
        status(format!("/?token={other_aud}")).0,
        401,
        "wrong audience"
    );
    let no_aud = token(json!({ "exp": now() + 600 }));
    assert_eq!(
        status(format!("/?token={no_aud}")).0,
        401,
        "audience required"
    );
}

#[tokio::test]
async fn a_limited_token_cannot_subscribe_later_either() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = Server::start(&["--connect-only", "--workers", "1", "--jwt-secret", "s3cret"]);
    let token = hs256(
        "s3cret",
        &json!({ "exp": now() + 600, "topics": ["a", "b"] }),
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(server.url(&format!("/?topic=a&token={token}")))
            .await
            .unwrap();
    for (topic, ok) in [("b", true), ("c", false)] {
        let command = json!({ "op": "subscribe", "topic": topic }).to_string();
        ws.send(Message::Text(command)).await.unwrap();
        let reply = loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => break t.to_string(),
                _ => continue,
            }
        };
        assert_eq!(reply.contains("\"ok\":true"), ok, "{topic}: {reply}");
    }
}

/// Writes `pem` to a fresh file under the target directory and returns its path.
fn key_file(name: &str, pem: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[test]
fn es256_tokens_with_a_public_key_file() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = key_file("es256.pem", &pair.public_key_pem());
    let server = Server::start(&[
        "--connect-only",
        "--workers",
        "1",
        "--jwt-public-key",
        public.to_str().unwrap(),
    ]);
    let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let good = encode(&Header::new(Algorithm::ES256), &valid_claims(), &signing).unwrap();
    assert_eq!(
        upgrade_status(server.addr, &format!("/?token={good}"), &[]).0,
        101
    );
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
    let forged = encode(&Header::new(Algorithm::ES256), &valid_claims(), &other).unwrap();
    assert_eq!(
        upgrade_status(server.addr, &format!("/?token={forged}"), &[]).0,
        401
    );
    // An HS256 token "signed" with the public key must not pass (algorithm confusion).
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &valid_claims(),
        &EncodingKey::from_secret(pair.public_key_pem().as_bytes()),
    )
    .unwrap();
    assert_eq!(
        upgrade_status(server.addr, &format!("/?token={confused}"), &[]).0,
        401
    );
}

#[test]
fn rs256_tokens_with_a_public_key_file() {
    // rcgen cannot make RSA keys; openssl (in Debian's base system) can.
    let dir = key_file("unused", "").parent().unwrap().to_path_buf();
    let private = dir.join("rsa.pem");
    let public = dir.join("rsa.pub.pem");
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    let server = Server::start(&[
        "--connect-only",
        "--workers",
        "1",
        "--jwt-public-key",
        public.to_str().unwrap(),
    ]);
    let signing = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
    let good = encode(&Header::new(Algorithm::RS256), &valid_claims(), &signing).unwrap();
    assert_eq!(
        upgrade_status(server.addr, &format!("/?token={good}"), &[]).0,
        101
    );
    let expired = encode(
        &Header::new(Algorithm::RS256),
        &json!({ "exp": now() - 3600 }),
        &signing,
    )
    .unwrap();
    assert_eq!(
        upgrade_status(server.addr, &format!("/?token={expired}"), &[]).0,
        401
    );
}

#[test]
fn a_bad_key_file_stops_start_up_with_a_clear_message() {
    let path = key_file("garbage.pem", "not a key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_c1m"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--jwt-public-key",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("neither an RSA nor an EC"), "{err}");
}

#[test]
fn only_allowed_origins_may_connect() {
    let server = Server::start(&[
        "--connect-only",
        "--workers",
        "1",
        "--allowed-origins",
        "https://app.example,https://admin.example",
    ]);
    let status = |headers: &[&str]| upgrade_status(server.addr, "/", headers).0;
    assert_eq!(status(&["Origin: https://app.example"]), 101);
    assert_eq!(status(&["Origin: https://admin.example"]), 101);
    assert_eq!(status(&["Origin: https://evil.example"]), 403);
    assert_eq!(status(&[]), 403, "no Origin at all");
}

/// A connection does not outlive its token: past `exp` (and the 5 s of clock-skew
/// allowance the upgrade gets too) it is closed with 4001, unless it sent a fresh token
/// with `{"op":"refresh","token":...}`.
#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires_unless_refreshed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    let server = Server::start(&["--connect-only", "--workers", "1", "--jwt-secret", "s3cret"]);
    let short = hs256("s3cret", &json!({ "exp": now() + 1 }));
    let url = server.url(&format!("/?token={short}"));
    let (mut stale, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut fresh, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    async fn reply(
        ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    ) -> Value {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => break serde_json::from_str(&t).unwrap(),
                _ => continue,
            }
        }
    }
    // A token that does not verify changes nothing.
    let forged = hs256("wrong", &json!({ "exp": now() + 600 }));
    let refresh =
        |token: &str| Message::Text(json!({ "op": "refresh", "token": token }).to_string());
    fresh.send(refresh(&forged)).await.unwrap();
    let answer = reply(&mut fresh).await;
    assert_eq!(answer["ok"], false, "{answer}");
    let long = hs256("s3cret", &json!({ "exp": now() + 600 }));
    fresh.send(refresh(&long)).await.unwrap();
    let answer = reply(&mut fresh).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["op"], "refresh", "{answer}");

    let started = std::time::Instant::now();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(12), stale.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(close.code, CloseCode::from(4001), "{close:?}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // The refreshed connection is still served.
    let subscribe = json!({ "op": "subscribe", "topic": "a" }).to_string();
    fresh.send(Message::Text(subscribe)).await.unwrap();
    assert_eq!(reply(&mut fresh).await["ok"], true);
}
