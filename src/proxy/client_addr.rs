//! The client's address: which peers are trusted proxies (`proxy.trusted_proxies`) and
//! the resolved client IP behind them (rightmost untrusted `X-Forwarded-For` entry).

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use super::forward::{ClientConn, X_FORWARDED_FOR};
pub use crate::cidr::parse_cidr;

/// The networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Box<[IpNet]>,
}

impl TrustedProxies {
    /// From validated `proxy.trusted_proxies` entries (unparsable ones are skipped).
    pub fn new(entries: &[String]) -> TrustedProxies {
        TrustedProxies {
            nets: entries.iter().filter_map(|e| parse_cidr(e)).collect(),
        }
    }

    /// Is `ip` (an IPv4-mapped IPv6 address counts as IPv4) a trusted proxy?
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.nets.is_empty() {
            return false;
        }
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// The address of the client a request came from: the peer itself unless the peer is a
/// trusted proxy, then the rightmost `X-Forwarded-For` entry that is not a trusted proxy
/// (entries further left could have been written by the client). Per-IP limits key on it.
pub fn client_ip(conn: &ClientConn, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    if !conn.trusted {
        return conn.peer.ip();
    }
    let mut resolved = conn.peer.ip();
    // Header lines in order, entries right to left across all of them.
    let lines: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for entry in lines.iter().rev().flat_map(|l| l.rsplit(',')) {
        let Some(ip) = parse_forwarded_ip(entry) else {
            // Garbage from a proxy we trust: stop at the last good address.
            break;
        };
        resolved = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    resolved
}

/// One `X-Forwarded-For` entry: an IP, possibly `[v6]:port` or `v4:port`.
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    e.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cidrs_and_single_addresses() {
        assert!(parse_cidr("10.0.0.0/8").is_some());
        assert!(parse_cidr("192.168.1.7").is_some());
        assert!(parse_cidr("fd00::/8").is_some());
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("gateway").is_none());
        let t = TrustedProxies::new(&["10.0.0.0/8".into()]);
        assert!(t.contains("10.2.3.4".parse().unwrap()));
        assert!(t.contains("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!t.contains("11.2.3.4".parse().unwrap()));
    }

    #[test]
    fn resolves_the_rightmost_untrusted_hop() {
        let t = TrustedProxies::new(&["10.0.0.0/8".into()]);
        let trusted = ClientConn::new("10.0.0.5:1000".parse().unwrap(), false, true);
        let untrusted = ClientConn::new("203.0.113.9:1000".parse().unwrap(), false, false);
        let h = xff(&["6.6.6.6, 198.51.100.7", "10.1.1.1"]);
        assert_eq!(
            client_ip(&trusted, &h, &t),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(
            client_ip(&untrusted, &h, &t),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // Only trusted hops: the leftmost of them.
        let h = xff(&["10.9.9.9"]);
        assert_eq!(
            client_ip(&trusted, &h, &t),
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
        // No header: the peer.
        assert_eq!(
            client_ip(&trusted, &HeaderMap::new(), &t),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        // Ports and brackets are tolerated; garbage stops the walk.
        let h = xff(&["[2001:db8::1]:443, garbage, 198.51.100.8:80"]);
        assert_eq!(
            client_ip(&trusted, &h, &t),
            "198.51.100.8".parse::<IpAddr>().unwrap()
        );
    }
}
