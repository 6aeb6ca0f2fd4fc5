//! The opening handshake (RFC 6455 §4): parsing a client's HTTP upgrade request and
//! writing the server's answer, and the client's side of the same exchange.
//!
//! HTTP parsing is done by `httparse` (zero-copy, no allocation); this module adds the
//! WebSocket rules on top and maps every rejection to an HTTP status, so the server
//! answers malformed or hostile requests with a proper response instead of silence.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID every server appends to the client's key (RFC 6455 §1.3).
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Most headers a request may carry before it is rejected with 431.
pub const MAX_HEADERS: usize = 64;

/// A complete, well-formed HTTP request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A valid WebSocket upgrade (on any path).
    Upgrade(UpgradeRequest),
    /// A plain HTTP request, without an upgrade (its body, if any, follows the head).
    Plain(PlainRequest),
}

/// What the server needs from a plain HTTP request (the info page, the publish API,
/// metrics and health checks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlainRequest {
    pub method: String,
    /// The request target, query string included.
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// The body's length from `Content-Length` (0 without the header).
    pub content_length: usize,
    /// Whether the client wants the connection kept for another request: HTTP/1.1
    /// without `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Origin`, for the server's origin check and CORS answer (Server-Sent Events).
    pub origin: Option<String>,
    /// `Last-Event-ID`: where a reconnecting `EventSource` left off.
    pub last_event_id: Option<String>,
}

/// What the server needs from a valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub path: String,
    pub key: String,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    /// Every `Sec-WebSocket-Extensions` header value, in order.
    pub extensions: Vec<String>,
}

/// Why a request was refused, with the HTTP status to answer it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("websocket upgrade must use GET")]
    MethodNotGet,
    #[error("websocket upgrade needs HTTP/1.1")]
    OldHttpVersion,
    #[error("missing or invalid {0} header")]
    BadHeader(&'static str),
    #[error("unsupported Sec-WebSocket-Version (only 13 is supported)")]
    UnsupportedVersion,
    #[error("a request body needs a Content-Length header (chunked bodies are not supported)")]
    LengthRequired,
}

impl HandshakeError {
    /// The HTTP status code and reason phrase to answer with.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HandshakeError::HeadTooLarge { .. } | HandshakeError::TooManyHeaders => {
                (431, "Request Header Fields Too Large")
            }
            HandshakeError::MethodNotGet => (405, "Method Not Allowed"),
            HandshakeError::UnsupportedVersion => (426, "Upgrade Required"),
            HandshakeError::LengthRequired => (411, "Length Required"),
            _ => (400, "Bad Request"),
        }
    }
}

/// Tries to parse a request head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete (and still within `max_head_bytes`),
/// or the request and the number of bytes it took (anything after it is the client's
/// first frames, which may legally arrive in the same packet).
pub fn parse_request(
    buf: &[u8],
    max_head_bytes: usize,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_head_bytes {
                return Err(HandshakeError::HeadTooLarge {
                    limit: max_head_bytes,
                });
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    if head_len > max_head_bytes {
        return Err(HandshakeError::HeadTooLarge {
            limit: max_head_bytes,
        });
    }
    let method = req.method.unwrap_or_default();
    let path = req.path.unwrap_or("/").to_string();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };

    // A request that does not ask for an upgrade is plain HTTP.
    if header("Upgrade").is_none() && header("Sec-WebSocket-Key").is_none() {
        if header("Transfer-Encoding").is_some() {
            return Err(HandshakeError::LengthRequired);
        }
        let content_length = match header("Content-Length") {
            None => 0,
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map_err(|_| HandshakeError::BadHeader("Content-Length"))?,
        };
        return Ok(Some((
            Request::Plain(PlainRequest {
                method: method.to_string(),
                path,
                authorization: header("Authorization").map(str::to_string),
                content_type: header("Content-Type").map(str::to_string),
                content_length,
                keep_alive: match req.version {
                    Some(1) => !has_token("Connection", "close"),
                    _ => has_token("Connection", "keep-alive"),
                },
                origin: header("Origin").map(str::to_string),
                last_event_id: header("Last-Event-ID").map(str::to_string),
            }),
            head_len,
        )));
    }
    if method != "GET" {
        return Err(HandshakeError::MethodNotGet);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::OldHttpVersion);
    }
    if !has_token("Upgrade", "websocket") {
        return Err(HandshakeError::BadHeader("Upgrade"));
    }
    if !has_token("Connection", "upgrade") {
        return Err(HandshakeError::BadHeader("Connection"));
    }
    if header("Host").is_none() {
        return Err(HandshakeError::BadHeader("Host"));
    }
    if header("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = header("Sec-WebSocket-Key")
        .map(str::trim)
        .filter(|k| BASE64.decode(k).map(|raw| raw.len() == 16).unwrap_or(false))
        .ok_or(HandshakeError::BadHeader("Sec-WebSocket-Key"))?;
    Ok(Some((
        Request::Upgrade(UpgradeRequest {
            path,
            key: key.to_string(),
            origin: header("Origin").map(str::to_string),
            authorization: header("Authorization").map(str::to_string),
            extensions: req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Extensions"))
                .filter_map(|h| std::str::from_utf8(h.value).ok())
                .map(str::to_string)
                .collect(),
        }),
        head_len,
    )))
}

/// The `Sec-WebSocket-Accept` value for a client's key.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// The server's `101 Switching Protocols` answer to an upgrade with this key.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    switching_protocols_with(key, &[])
}

/// The `101 Switching Protocols` answer with extra headers (a negotiated extension).
pub fn switching_protocols_with(key: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A complete plain-text HTTP/1.1 response that closes the connection.
pub fn http_response(
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    http_response_typed(
        status,
        reason,
        "text/plain; charset=utf-8",
        extra_headers,
        body.as_bytes(),
    )
}

/// A complete HTTP/1.1 response with a body of the given content type, that closes the
/// connection.
pub fn http_response_typed(
    status: u16,
    reason: &str,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Turns a response of [`http_response_typed`] into one that keeps the connection:
/// its `Connection: close` header becomes `Connection: keep-alive`.
pub fn keeping_alive(mut response: Vec<u8>) -> Vec<u8> {
    const CLOSE: &[u8] = b"\r\nConnection: close\r\n";
    const KEEP: &[u8] = b"\r\nConnection: keep-alive\r\n";
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |i| i + 2);
    if let Some(at) = response[..head_end]
        .windows(CLOSE.len())
        .position(|w| w == CLOSE)
    {
        response.splice(at..at + CLOSE.len(), KEEP.iter().copied());
    }
    response
}

/// The response to a refused handshake.
pub fn rejection(error: &HandshakeError) -> Vec<u8> {
    let (status, reason) = error.status();
    let extra: &[(&str, &str)] = match error {
        HandshakeError::UnsupportedVersion => &[("Sec-WebSocket-Version", "13")],
        HandshakeError::MethodNotGet => &[("Allow", "GET")],
        _ => &[],
    };
    http_response(status, reason, extra, &format!("{error}\n"))
}

// ---- client side ----

/// Encodes 16 random bytes as a `Sec-WebSocket-Key`.
pub fn client_key(random: [u8; 16]) -> String {
    BASE64.encode(random)
}

/// A client's upgrade request.
pub fn client_request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Why a server's answer to an upgrade was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientHandshakeError {
    #[error("server answered HTTP {code} instead of 101")]
    Status {
        code: u16,
        /// The answer's `Retry-After`, in seconds (its delta-seconds form; an HTTP
        /// date is ignored): how long the server asks the client to wait.
        retry_after: Option<u64>,
    },
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("response head exceeds {0} bytes")]
    HeadTooLarge(usize),
    #[error("missing or wrong Sec-WebSocket-Accept")]
    BadAccept,
}

/// Tries to parse the server's answer to a request sent with `key`. Returns the head's
/// length once complete (frames may follow it in the same read).
pub fn parse_response(
    buf: &[u8],
    key: &str,
    max_head_bytes: usize,
) -> Result<Option<usize>, ClientHandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head_bytes => {
            return Err(ClientHandshakeError::HeadTooLarge(max_head_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ClientHandshakeError::Malformed(e.to_string())),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let retry_after = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("Retry-After"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(|v| v.trim().parse().ok());
        return Err(ClientHandshakeError::Status { code, retry_after });
    }
    let expected = accept_key(key);
    let accepted = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("Sec-WebSocket-Accept") && h.value == expected.as_bytes()
    });
    if !accepted {
        return Err(ClientHandshakeError::BadAccept);
    }
    Ok(Some(head_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 8192;

    fn upgrade(extra: &str) -> String {
        format!(
            "GET /any/path?x=1 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_an_upgrade_on_any_path_with_trailing_frames() {
        let mut bytes = upgrade("Origin: http://example.test\r\n").into_bytes();
        let head = bytes.len();
        bytes.extend_from_slice(&[0x89, 0x80, 1, 2, 3, 4]);
        let (req, used) = parse_request(&bytes, MAX).unwrap().unwrap();
        assert_eq!(used, head);
        assert_eq!(
            req,
            Request::Upgrade(UpgradeRequest {
                path: "/any/path?x=1".into(),
                key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
                origin: Some("http://example.test".into()),
                authorization: None,
                extensions: Vec::new(),
            })
        );
    }

    #[test]
    fn incomplete_head_waits_for_more() {
        let bytes = upgrade("");
        for cut in 0..bytes.len() {
            assert_eq!(
                parse_request(&bytes.as_bytes()[..cut], MAX),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let (req, _) = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", MAX)
            .unwrap()
            .unwrap();
        assert_eq!(
            req,
            Request::Plain(PlainRequest {
                method: "GET".into(),
                path: "/".into(),
                authorization: None,
                content_type: None,
                content_length: 0,
                keep_alive: true,
                ..PlainRequest::default()
            })
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        let keep = |head: &[u8]| match parse_request(head, MAX).unwrap().unwrap().0 {
            Request::Plain(plain) => plain.keep_alive,
            other => panic!("{other:?}"),
        };
        assert!(keep(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!keep(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!keep(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(keep(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        let kept = keeping_alive(http_response(200, "OK", &[], "Connection: close\r\n"));
        let text = String::from_utf8(kept).unwrap();
        assert!(text.contains("\r\nConnection: keep-alive\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\nConnection: close\r\n"),
            "the body is untouched"
        );
    }

    #[test]
    fn plain_post_carries_its_body_length_and_credentials() {
        let head = b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 5\r\n\r\nhello";
        let (req, used) = parse_request(head, MAX).unwrap().unwrap();
        let Request::Plain(plain) = req else {
            panic!("not plain: {req:?}")
        };
        assert_eq!(plain.content_length, 5);
        assert_eq!(plain.authorization.as_deref(), Some("Bearer k"));
        assert_eq!(&head[used..], b"hello");
        let chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_request(chunked, MAX),
            Err(HandshakeError::LengthRequired)
        );
        let bad = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(
            parse_request(bad, MAX),
            Err(HandshakeError::BadHeader("Content-Length"))
        );
    }

    #[test]
    fn bad_upgrades_get_the_right_status() {
        let cases = [
            (upgrade("").replace("Version: 13", "Version: 8"), 426),
            (upgrade("").replace("GET", "POST"), 405),
            (upgrade("").replace("HTTP/1.1", "HTTP/1.0"), 400),
            (
                upgrade("").replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
                400,
            ),
            (
                upgrade("").replace("Connection: keep-alive, Upgrade", "Connection: keep-alive"),
                400,
            ),
            (upgrade("").replace("Host: localhost\r\n", ""), 400),
            (
                upgrade("").replace("Upgrade: websocket", "Upgrade: h2c"),
                400,
            ),
            ("GET / HTTP/1.1\r\nHo st: x\r\n\r\n".to_string(), 400),
        ];
        for (request, status) in cases {
            let err = parse_request(request.as_bytes(), MAX).unwrap_err();
            assert_eq!(err.status().0, status, "{request:?} -> {err}");
            let response = String::from_utf8(rejection(&err)).unwrap();
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status} ")),
                "{response}"
            );
        }
    }

    #[test]
    fn oversized_and_crowded_heads_get_431() {
        let huge = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n", "a".repeat(MAX));
        assert_eq!(
            parse_request(huge.as_bytes(), MAX).unwrap_err().status().0,
            431
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_request(req.as_bytes(), 1 << 20)
                .unwrap_err()
                .status()
                .0,
            431
        );
    }

    #[test]
    fn client_and_server_agree() {
        let key = client_key([7; 16]);
        let request = client_request("127.0.0.1:8088", "/", &key);
        let (req, _) = parse_request(&request, MAX).unwrap().unwrap();
        let Request::Upgrade(up) = req else {
            panic!("not an upgrade")
        };
        let mut response = switching_protocols(&up.key);
        let head = response.len();
        response.extend_from_slice(b"\x81\x01x");
        assert_eq!(parse_response(&response, &key, MAX), Ok(Some(head)));
        assert_eq!(parse_response(&response[..head - 1], &key, MAX), Ok(None));
        assert_eq!(
            parse_response(&response, &client_key([8; 16]), MAX),
            Err(ClientHandshakeError::BadAccept)
        );
        let refused = http_response(503, "Service Unavailable", &[], "full");
        assert_eq!(
            parse_response(&refused, &key, MAX),
            Err(ClientHandshakeError::Status {
                code: 503,
                retry_after: None
            })
        );
        let later = http_response(503, "Service Unavailable", &[("Retry-After", "3")], "later");
        assert_eq!(
            parse_response(&later, &key, MAX),
            Err(ClientHandshakeError::Status {
                code: 503,
                retry_after: Some(3)
            })
        );
        let dated = http_response(
            429,
            "Too Many Requests",
            &[("Retry-After", "Wed, 21 Oct 2026 07:28:00 GMT")],
            "",
        );
        assert_eq!(
            parse_response(&dated, &key, MAX),
            Err(ClientHandshakeError::Status {
                code: 429,
                retry_after: None
            })
        );
    }

    proptest! {
        #[test]
        fn hostile_requests_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&bytes, 512);
            let _ = parse_response(&bytes, "x", 512);
        }
    }
}
