//! Who may connect, to which topics, and who may publish.
//!
//! The [`Gate`] decides an upgrade before the `101` is sent: origin, JWT, requested
//! topics. Rejections are plain HTTP answers (401 for a missing or bad token, 403 for a
//! wrong origin or topic, 400 for a malformed topic list) whose bodies say only the
//! category: what exactly was wrong with a token is logged at debug level, never sent
//! to the client. The publish API's key is checked in constant time.
//!
//! Token checks use the `jsonwebtoken` crate (signatures, `exp`, `nbf`, `aud`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use c1m_proto::handshake::{http_response, PlainRequest, UpgradeRequest};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use subtle::ConstantTimeEq;

use crate::topics::{validate_name, TIME};

/// How client tokens are verified.
#[derive(Debug, Clone)]
pub enum JwtKey {
    /// HS256 with a shared secret.
    Secret(String),
    /// RS256 or ES256 with a public key in a PEM file (the key type picks the algorithm).
    PublicKeyFile(PathBuf),
}

/// The JWT settings of `c1m serve`.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub key: JwtKey,
    /// When set, a token's `aud` must contain this value.
    pub audience: Option<String>,
    /// The claim listing the topics a client may join (an array of names).
    pub topics_claim: String,
}

/// A ready verifier (the key parsed once at start-up).
#[derive(Clone)]
struct Verifier {
    key: DecodingKey,
    validation: Validation,
    topics_claim: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read the JWT key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the JWT key file {path} holds neither an RSA nor an EC (P-256) public key in PEM form"
    )]
    KeyFormat { path: PathBuf },
    #[error("the JWT secret is empty")]
    EmptySecret,
}

impl Verifier {
    fn new(config: &JwtConfig) -> Result<Verifier, AuthConfigError> {
        let (key, algorithm) = match &config.key {
            JwtKey::Secret(secret) if secret.is_empty() => {
                return Err(AuthConfigError::EmptySecret)
            }
            JwtKey::Secret(secret) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            JwtKey::PublicKeyFile(path) => load_public_key(path)?,
        };
        let mut validation = Validation::new(algorithm);
        // Small allowance for clock skew between the token issuer and this server.
        validation.leeway = TOKEN_LEEWAY_SECS;
        validation.validate_nbf = true;
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                // A token without `aud` must not pass a server that asks for one.
                validation.set_required_spec_claims(&["exp", "aud"]);
            }
            None => validation.validate_aud = false,
        }
        Ok(Verifier {
            key,
            validation,
            topics_claim: config.topics_claim.clone(),
        })
    }

    /// The topics the token allows (`None` when it names none: all allowed), and its
    /// `exp` (Unix seconds).
    fn verify(&self, token: &str) -> Result<Verified, jsonwebtoken::errors::Error> {
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)?;
        let expires = data.claims.get("exp").and_then(serde_json::Value::as_u64);
        let topics = data.claims.get(&self.topics_claim).map(|claim| {
            claim
                .as_array()
                .map(|names| {
                    names
                        .iter()
                        .filter_map(|n| n.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default() // a malformed claim allows nothing
        });
        Ok(Verified { topics, expires })
    }
}

fn load_public_key(path: &Path) -> Result<(DecodingKey, Algorithm), AuthConfigError> {
    let pem = std::fs::read(path).map_err(|source| AuthConfigError::KeyFile {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    Err(AuthConfigError::KeyFormat {
        path: path.to_owned(),
    })
}

/// What a verified token says.
struct Verified {
    topics: Option<HashSet<String>>,
    expires: Option<u64>,
}

/// Seconds of clock skew allowed between the token issuer and this server, at the
/// upgrade and for the expiry of open connections alike.
pub const TOKEN_LEEWAY_SECS: u64 = 5;

/// Seconds since the Unix epoch, the clock of a token's `exp`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a fresh token (`{"op":"refresh"}`) grants an open connection.
#[derive(Debug)]
pub struct Grant {
    /// Topics it may join, when the token limits them.
    pub allowed: Option<Box<[Box<str>]>>,
    /// When the connection must close unless refreshed again (Unix seconds).
    pub expires: Option<u64>,
}

/// What an admitted upgrade may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Topics to join now (at least one).
    pub topics: Vec<String>,
    /// Topics the client may join later, when its token limits them.
    pub allowed: Option<Box<[Box<str>]>>,
    /// The token's `exp` (Unix seconds): the connection is closed past it (plus
    /// [`TOKEN_LEEWAY_SECS`]) unless it refreshes its token. `None` without a token.
    pub expires: Option<u64>,
    /// `?envelope=1`, or any `since`: publications come in envelopes.
    pub envelope: bool,
    /// `?since=TOPIC:EPOCH:OFFSET` (repeatable): topics to resume from a position
    /// (they are in `topics` too), as (topic, offset, epoch).
    pub since: Vec<(String, u64, String)>,
    /// A Pusher client (`/app/{key}`, see `pusher`). It joins no topic at connect; its
    /// channels come with `pusher:subscribe`.
    pub pusher: Option<PusherEntry>,
}

/// How a Pusher client's upgrade went: Pusher tells a refused client why on the open
/// connection (a `pusher:error`, then a close with the same code), and pusher-js acts
/// on the code (4001, 4004 and 4007: give up; 4100: come back after a while).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PusherEntry {
    /// The app of this number in the server's list.
    App(usize),
    /// The key names no app here: error 4001.
    UnknownKey,
    /// `?protocol=` names a version c1m does not speak: error 4007.
    UnsupportedProtocol,
    /// The server is at `--max-connections`: error 4100.
    OverCapacity,
}

/// `TOPIC:EPOCH:OFFSET` of `?since=` (a topic name may itself contain `:`).
fn parse_since(value: &str) -> Result<(String, u64, String), String> {
    let mut parts = value.rsplitn(3, ':');
    let (Some(offset), Some(epoch), Some(topic)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("since must be TOPIC:EPOCH:OFFSET, not {value:?}\n"));
    };
    let offset = offset
        .parse()
        .map_err(|_| format!("since: the offset must be a whole number ≥ 0, not {offset:?}\n"))?;
    if epoch.is_empty() || epoch.len() > 64 {
        return Err(format!(
            "since: the epoch must have 1 to 64 characters, not {epoch:?}\n"
        ));
    }
    Ok((topic.to_string(), offset, epoch.to_string()))
}

/// What [`Gate`] reads of an upgrade or a Server-Sent Events request.
struct RequestParts<'a> {
    /// The request target, query included.
    target: &'a str,
    origin: Option<&'a str>,
    authorization: Option<&'a str>,
    last_event_id: Option<&'a str>,
}

/// The upgrade policy: origins, tokens, topics.
#[derive(Debug, Clone)]
pub struct Gate {
    allowed_origins: Option<Vec<String>>,
    verifier: Option<Verifier>,
    pub max_topics: usize,
    /// The keys of the Pusher apps served here (`--pusher-app`).
    pusher_keys: Vec<String>,
}

impl Gate {
    pub fn new(
        allowed_origins: Option<Vec<String>>,
        jwt: Option<&JwtConfig>,
        max_topics: usize,
    ) -> Result<Gate, AuthConfigError> {
        Ok(Gate {
            allowed_origins,
            verifier: jwt.map(Verifier::new).transpose()?,
            max_topics,
            pusher_keys: Vec::new(),
        })
    }

    /// Serves the Pusher protocol on `/app/{key}` for these apps.
    pub fn with_pusher_apps(mut self, apps: &[crate::pusher::App]) -> Gate {
        self.pusher_keys = apps.iter().map(|app| app.key.clone()).collect();
        self
    }

    /// An open gate: any origin, no token, the given topic limit.
    pub fn open(max_topics: usize) -> Gate {
        Gate {
            allowed_origins: None,
            verifier: None,
            max_topics,
            pusher_keys: Vec::new(),
        }
    }

    /// Decides an upgrade. `Err` holds the complete HTTP answer.
    pub fn admit(&self, request: &UpgradeRequest) -> Result<Admission, Vec<u8>> {
        let parts = RequestParts {
            target: &request.path,
            origin: request.origin.as_deref(),
            authorization: request.authorization.as_deref(),
            last_event_id: None,
        };
        self.admit_parts(&parts)
    }

    /// Decides a Server-Sent Events request (`GET /sse?...`) like an upgrade; its
    /// `Last-Event-ID` (an event's `id:`, `TOPIC:EPOCH:OFFSET`) resumes that topic, in
    /// place of a `since` for it in the URL (the browser's is the later position).
    pub fn admit_sse(&self, request: &PlainRequest) -> Result<Admission, Vec<u8>> {
        let parts = RequestParts {
            target: &request.path,
            origin: request.origin.as_deref(),
            authorization: request.authorization.as_deref(),
            last_event_id: request.last_event_id.as_deref().filter(|v| !v.is_empty()),
        };
        self.admit_parts(&parts)
    }

    /// Whether `--allowed-origins` limits who may connect.
    pub fn restricts_origins(&self) -> bool {
        self.allowed_origins.is_some()
    }

    /// Whether a request from `origin` passes `--allowed-origins`.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match &self.allowed_origins {
            None => true,
            Some(origins) => origin.is_some_and(|o| {
                origins
                    .iter()
                    .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(o))
            }),
        }
    }

    fn admit_parts(&self, request: &RequestParts) -> Result<Admission, Vec<u8>> {
        if !self.origin_allowed(request.origin) {
            tracing::debug!(origin = ?request.origin, "origin refused");
            return Err(forbidden());
        }
        let (path, query) = split_target(request.target);
        if let Some(key) = crate::pusher::app_key(path).filter(|_| request.last_event_id.is_none())
        {
            // Pusher's own checks (app key, channel signatures) replace tokens; an
            // unknown key is told so on the open connection (error 4001), as Pusher does.
            return Ok(Admission {
                topics: Vec::new(),
                allowed: None,
                expires: None,
                envelope: false,
                since: Vec::new(),
                pusher: Some(match self.pusher_keys.iter().position(|k| k == key) {
                    Some(_) if !crate::pusher::protocol_supported(query) => {
                        PusherEntry::UnsupportedProtocol
                    }
                    Some(app) => PusherEntry::App(app),
                    None => PusherEntry::UnknownKey,
                }),
            });
        }
        let mut topics = Vec::new();
        if let Some(name) = path.strip_prefix("/topics/") {
            topics.push(name.to_string());
        }
        let mut token = None;
        let mut envelope = false;
        let mut since = Vec::new();
        for (key, value) in query_pairs(query) {
            match key {
                "topic" => topics.push(value.to_string()),
                "token" => token = Some(value.to_string()),
                "envelope" => envelope = matches!(value, "1" | "true" | ""),
                "since" => {
                    let resume = parse_since(value).map_err(|e| bad_request(&e))?;
                    topics.push(resume.0.clone());
                    since.push(resume);
                }
                _ => {}
            }
        }
        if let Some(value) = request.last_event_id {
            let resume =
                parse_since(value).map_err(|e| bad_request(&format!("Last-Event-ID: {e}")))?;
            since.retain(|(topic, ..)| *topic != resume.0);
            topics.push(resume.0.clone());
            since.push(resume);
        }
        since.sort();
        since.dedup_by(|a, b| a.0 == b.0);
        envelope |= !since.is_empty();
        if topics.is_empty() {
            topics.push(TIME.to_string());
        }
        topics.sort_unstable();
        topics.dedup();
        if topics.len() > self.max_topics {
            return Err(bad_request(&format!(
                "at most {} topics per connection\n",
                self.max_topics
            )));
        }
        if let Some(error) = topics.iter().find_map(|t| validate_name(t).err()) {
            return Err(bad_request(&format!("bad topic: {error}\n")));
        }
        let Some(verifier) = &self.verifier else {
            return Ok(Admission {
                topics,
                allowed: None,
                expires: None,
                envelope,
                since,
                pusher: None,
            });
        };
        let token = token.or_else(|| {
            request
                .authorization
                .and_then(|h| h.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string())
        });
        let Some(token) = token else {
            return Err(unauthorized());
        };
        let Verified {
            topics: allowed,
            expires,
        } = match verifier.verify(&token) {
            Ok(verified) => verified,
            Err(error) => {
                tracing::debug!(%error, "token refused");
                return Err(unauthorized());
            }
        };
        if let Some(allowed) = &allowed {
            if !topics.iter().all(|t| allowed.contains(t)) {
                tracing::debug!(?topics, "token does not allow these topics");
                return Err(forbidden());
            }
        }
        Ok(Admission {
            topics,
            allowed: allowed.map(|set| set.into_iter().map(Into::into).collect()),
            expires,
            envelope,
            since,
            pusher: None,
        })
    }

    /// Checks a token an open connection sent to extend its life (see
    /// `commands::Command::Refresh`). `Err` says why it was refused.
    pub fn verify_refresh(&self, token: &str) -> Result<Grant, &'static str> {
        let Some(verifier) = &self.verifier else {
            return Err("this server does not use tokens");
        };
        match verifier.verify(token) {
            Ok(verified) => Ok(Grant {
                allowed: verified
                    .topics
                    .map(|set| set.into_iter().map(Into::into).collect()),
                expires: verified.expires,
            }),
            Err(error) => {
                tracing::debug!(%error, "refresh token refused");
                Err("invalid or expired token")
            }
        }
    }
}

/// Checks `Authorization: Bearer KEY` against the configured API key, in constant time.
pub fn check_api_key(expected: &str, authorization: Option<&str>) -> bool {
    let given = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Splits a request target into path and query string.
pub fn split_target(target: &str) -> (&str, &str) {
    target.split_once('?').unwrap_or((target, ""))
}

/// `key=value` pairs of a query string (no percent-decoding: topic names and tokens
/// use URL-safe characters only).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

pub fn unauthorized() -> Vec<u8> {
    http_response(
        401,
        "Unauthorized",
        &[("WWW-Authenticate", "Bearer")],
        "unauthorized\n",
    )
}

pub fn forbidden() -> Vec<u8> {
    http_response(403, "Forbidden", &[], "forbidden\n")
}

fn bad_request(body: &str) -> Vec<u8> {
    http_response(400, "Bad Request", &[], body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(path: &str) -> UpgradeRequest {
        UpgradeRequest {
            path: path.into(),
            key: String::new(),
            origin: None,
            authorization: None,
            extensions: Vec::new(),
        }
    }

    #[test]
    fn topics_from_path_and_query_default_to_time() {
        let gate = Gate::open(8);
        assert_eq!(gate.admit(&upgrade("/")).unwrap().topics, vec!["time"]);
        assert_eq!(
            gate.admit(&upgrade("/ws?topic=b&topic=a&topic=b"))
                .unwrap()
                .topics,
            vec!["a", "b"]
        );
        assert_eq!(
            gate.admit(&upgrade("/topics/news")).unwrap().topics,
            vec!["news"]
        );
        assert!(gate.admit(&upgrade("/ws?topic=a%20b")).is_err());
        let many: String = (0..9).map(|i| format!("topic=t{i}&")).collect();
        assert!(gate.admit(&upgrade(&format!("/?{many}"))).is_err());
    }

    #[test]
    fn positions_in_the_url_resume_topics_and_turn_envelopes_on() {
        let gate = Gate::open(8);
        let plain = gate.admit(&upgrade("/?topic=a")).unwrap();
        assert!(!plain.envelope && plain.since.is_empty());
        assert!(
            gate.admit(&upgrade("/?topic=a&envelope=1"))
                .unwrap()
                .envelope
        );
        let resumed = gate
            .admit(&upgrade("/?since=eu:prices:abcd0123:41&since=b:e:0"))
            .unwrap();
        assert!(resumed.envelope);
        assert_eq!(
            resumed.topics,
            vec!["b", "eu:prices"],
            "a topic may contain ':'"
        );
        assert_eq!(
            resumed.since,
            vec![
                ("b".to_string(), 0, "e".to_string()),
                ("eu:prices".to_string(), 41, "abcd0123".to_string())
            ]
        );
        for bad in ["x", "x:1", "x:e:-1", "x::1", ":e:1"] {
            assert!(
                gate.admit(&upgrade(&format!("/?since={bad}"))).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn origins_are_checked_when_configured() {
        let gate = Gate::new(Some(vec!["https://ok.test".into()]), None, 8).unwrap();
        let mut req = upgrade("/");
        assert!(gate.admit(&req).is_err(), "no origin");
        req.origin = Some("https://evil.test".into());
        assert!(gate.admit(&req).is_err());
        req.origin = Some("https://OK.test".into());
        assert!(gate.admit(&req).is_ok());
    }

    #[test]
    fn api_key_must_match_exactly() {
        assert!(check_api_key("s3cret", Some("Bearer s3cret")));
        assert!(!check_api_key("s3cret", Some("Bearer s3cre")));
        assert!(!check_api_key("s3cret", Some("s3cret")));
        assert!(!check_api_key("s3cret", None));
        assert!(!check_api_key("", Some("Bearer ")));
    }
}
