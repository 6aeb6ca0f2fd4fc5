//! What the bench connects to (`--url`) and from (`--source-ips`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// A parsed `ws://HOST:PORT/PATH` or `wss://HOST:PORT/PATH` URL, or `tcp://HOST:PORT`
/// (the raw-TCP baseline: no handshake, newline-terminated messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header value.
    pub host: String,
    pub path: String,
    /// `wss://`: connect with TLS.
    pub tls: bool,
    /// `tcp://`: no WebSocket at all.
    pub raw: bool,
    /// The host name without port or brackets (for TLS server name checks).
    pub server_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("URL must start with ws://, wss:// or tcp:// (the raw-TCP baseline): {0}")]
    Scheme(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error(
        "invalid source address {0:?}: expected an IP, a range A-B, or a comma-separated list"
    )]
    Source(String),
    #[error("source range {0} has more than 16,777,216 addresses")]
    SourceTooLarge(String),
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let (tls, raw, rest) = if let Some(rest) = url.strip_prefix("ws://") {
            (false, false, rest)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (true, false, rest)
        } else if let Some(rest) = url.strip_prefix("tcp://") {
            (false, true, rest)
        } else {
            return Err(TargetError::Scheme(url.to_string()));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let has_port = match authority.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => authority.contains(':'),
        };
        let with_port = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        let server_name = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6).to_string(),
            None => authority.split(':').next().unwrap_or(authority).to_string(),
        };
        let addr = with_port
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| TargetError::Resolve(authority.to_string()))?;
        Ok(Target {
            addr,
            host: authority.to_string(),
            path: path.to_string(),
            tls,
            raw,
            server_name,
        })
    }
}

/// Parses `--source-ips`: a comma-separated list of addresses and inclusive ranges
/// (`127.0.0.2-127.0.0.254`, `::1`, `fd00::1-fd00::ff`).
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, TargetError> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || TargetError::Source(item.to_string());
        match item.split_once('-') {
            None => out.push(item.parse().map_err(|_| bad())?),
            Some((a, b)) => {
                let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
                let b: IpAddr = b.trim().parse().map_err(|_| bad())?;
                let (lo, hi, v6) = match (a, b) {
                    (IpAddr::V4(a), IpAddr::V4(b)) => {
                        (u32::from(a) as u128, u32::from(b) as u128, false)
                    }
                    (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), true),
                    _ => return Err(bad()),
                };
                if hi < lo {
                    return Err(bad());
                }
                if hi - lo >= 1 << 24 {
                    return Err(TargetError::SourceTooLarge(item.to_string()));
                }
                out.extend((lo..=hi).map(|n| {
                    if v6 {
                        IpAddr::V6(Ipv6Addr::from(n))
                    } else {
                        IpAddr::V4(Ipv4Addr::from(n as u32))
                    }
                }));
            }
        }
    }
    if out.is_empty() {
        return Err(TargetError::Source(spec.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("ws://127.0.0.1:8088/a/b?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8088".parse().unwrap());
        assert_eq!(t.path, "/a/b?x=1");
        assert_eq!(t.host, "127.0.0.1:8088");
        assert_eq!(Target::parse("ws://127.0.0.1").unwrap().addr.port(), 80);
        assert_eq!(
            Target::parse("ws://[::1]:9000").unwrap().addr,
            "[::1]:9000".parse().unwrap()
        );
        let secure = Target::parse("wss://localhost/x").unwrap();
        assert!(secure.tls);
        assert_eq!(secure.addr.port(), 443);
        assert_eq!(secure.server_name, "localhost");
        assert_eq!(
            Target::parse("wss://[::1]:9443").unwrap().server_name,
            "::1"
        );
        assert!(matches!(
            Target::parse("http://x"),
            Err(TargetError::Scheme(_))
        ));
    }

    #[test]
    fn parses_source_ranges_and_lists() {
        let v = parse_sources("127.0.0.2-127.0.0.4, 127.0.1.1").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3], "127.0.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(parse_sources("127.0.0.255-127.0.1.1").unwrap().len(), 3);
        assert_eq!(
            parse_sources("::1").unwrap(),
            vec!["::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(parse_sources("fd00::1-fd00::3").unwrap().len(), 3);
        for bad in [
            "",
            "x",
            "127.0.0.5-127.0.0.1",
            "127.0.0.1-::1",
            "10.0.0.0-10.255.255.255,1.0.0.0-2.0.0.0",
        ] {
            assert!(parse_sources(bad).is_err(), "{bad}");
        }
    }
}
