//! IP networks as operators write them (`proxy.trusted_proxies`): CIDR or a single address.

use std::net::IpAddr;

use ipnet::IpNet;

/// Parses `10.0.0.0/8`, `fd00::/8` or a single address (`/32`, `/128`).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}
