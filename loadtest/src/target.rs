//! Targets (`name=URL`) and the loopback-only rule every address must pass.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail};
use http::Uri;
use serde::Serialize;

/// One endpoint under test: where to connect and what to call it in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Short label (`direct`, `activator`, `nginx`, ...).
    pub name: String,
    /// The URL as given.
    pub url: String,
    /// Resolved socket address (always loopback).
    pub addr: SocketAddr,
    /// `Host` header value: `host:port` as written in the URL.
    #[serde(skip)]
    pub authority: String,
    /// Path prefix from the URL, without a trailing slash (usually empty).
    #[serde(skip)]
    pub base_path: String,
}

impl Target {
    /// Parses `name=http://127.0.0.1:8080[/prefix]`; a bare URL is named `target<index>`.
    pub fn parse(spec: &str, index: usize) -> Result<Target> {
        let (name, url) = match spec.split_once('=') {
            Some((n, u)) if !n.is_empty() && !n.contains(':') && !n.contains('/') => {
                (n.to_string(), u)
            }
            _ => (format!("target{index}"), spec),
        };
        let (addr, authority, base_path) =
            parse_loopback_url(url).with_context(|| format!("target {name:?}"))?;
        Ok(Target {
            name,
            url: url.to_string(),
            addr,
            authority,
            base_path,
        })
    }

    /// The request path for `path_and_query` under this target's base path.
    pub fn path(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base_path, path_and_query)
    }

    /// The `ws://` URL for `path` on this target.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.authority, self.path(path))
    }
}

/// Checks `url` is `http://` on a loopback host; returns (address, authority, base path).
pub fn parse_loopback_url(url: &str) -> Result<(SocketAddr, String, String)> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL (expected http://127.0.0.1:PORT)"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("{url:?}: scheme {other:?} is not supported (use http://)"),
        None => bail!("{url:?}: missing scheme (expected http://127.0.0.1:PORT)"),
    }
    let host = uri
        .host()
        .with_context(|| format!("{url:?}: missing host"))?;
    let ip = loopback_ip(host).with_context(|| {
        format!(
            "{url:?}: {host} is not a loopback address; activator-loadtest only sends \
             traffic to 127.0.0.0/8, ::1 or localhost"
        )
    })?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok((SocketAddr::new(ip, port), authority, base_path))
}

/// The loopback IP `host` names, or `None` when it is anything else (no DNS lookups).
pub fn loopback_ip(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = bare.parse().ok()?;
    ip.is_loopback().then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_forms() {
        let t = Target::parse("direct=http://127.0.0.1:8080", 0).unwrap();
        assert_eq!(t.name, "direct");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.authority, "127.0.0.1:8080");
        let t = Target::parse("http://localhost:9000/base/", 3).unwrap();
        assert_eq!(t.name, "target3");
        assert_eq!(t.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(t.path("/state"), "/base/state");
        let t = Target::parse("v6=http://[::1]:7000", 0).unwrap();
        assert_eq!(t.addr, "[::1]:7000".parse().unwrap());
        let t = Target::parse("lo=http://127.3.4.5:81", 0).unwrap();
        assert_eq!(t.addr.ip(), "127.3.4.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "x=http://10.0.0.1:80",
            "x=http://192.168.1.2:80",
            "x=http://8.8.8.8:80",
            "x=http://example.com:80",
            "x=http://[2001:db8::1]:80",
            "x=https://127.0.0.1:443",
            "x=127.0.0.1:80",
        ] {
            let err = format!("{:#}", Target::parse(bad, 0).unwrap_err());
            assert!(
                err.contains("loopback") || err.contains("scheme"),
                "{bad}: {err}"
            );
        }
        let err = format!(
            "{:#}",
            Target::parse("x=http://10.1.2.3:80", 0).unwrap_err()
        );
        assert!(err.contains("not a loopback address"), "{err}");
    }
}
