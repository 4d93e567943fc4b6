//! Preview hosts: `{port}-{preview-id}.{domain}`, matched by suffix and parsed strictly.

use super::ID_LEN;

/// What a host under a preview domain names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMatch {
    /// `{port}-{id}`: the sandbox port and the preview ID (lowercased).
    Preview { port: u16, id: PreviewId },
    /// Under the domain but not `{port}-{id}` (400 `invalid_preview_host`).
    Malformed,
}

/// A preview ID as read from a host, lowercased (hosts are case-insensitive).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PreviewId([u8; ID_LEN]);

impl PreviewId {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl std::fmt::Debug for PreviewId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreviewId({})", self.as_str())
    }
}

/// Matches `host` (port already stripped) against `domain` (lowercase): `None` when the
/// host is not strictly under it.
pub fn parse_host(host: &str, domain: &str) -> Option<HostMatch> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.len() <= domain.len() + 1 {
        return None;
    }
    let (label, rest) = host.split_at(host.len() - domain.len() - 1);
    if !rest.as_bytes()[0].eq(&b'.') || !rest[1..].eq_ignore_ascii_case(domain) {
        return None;
    }
    Some(parse_label(label).unwrap_or(HostMatch::Malformed))
}

/// `{port}-{id}`: a port without leading zeros, `-`, [`ID_LEN`] hex digits.
fn parse_label(label: &str) -> Option<HostMatch> {
    let (port, id) = label.split_once('-')?;
    if port.is_empty() || port.len() > 5 || port.starts_with('0') {
        return None;
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if id.len() != ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; ID_LEN];
    for (o, b) in out.iter_mut().zip(id.bytes()) {
        *o = b.to_ascii_lowercase();
    }
    Some(HostMatch::Preview {
        port,
        id: PreviewId(out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn parsed(host: &str) -> Option<(u16, String)> {
        match parse_host(host, "preview.example.com")? {
            HostMatch::Preview { port, id } => Some((port, id.as_str().to_owned())),
            HostMatch::Malformed => Some((0, String::new())),
        }
    }

    #[test]
    fn hosts_under_the_domain_parse_strictly() {
        let ok = format!("5173-{ID}.preview.example.com");
        assert_eq!(parsed(&ok), Some((5173, ID.to_owned())));
        let upper = format!("3000-{}.Preview.Example.COM.", ID.to_uppercase());
        assert_eq!(parsed(&upper), Some((3000, ID.to_owned())));
        // Not under the domain at all: the main route.
        assert_eq!(parsed("preview.example.com"), None);
        assert_eq!(parsed("example.com"), None);
        assert_eq!(parsed(&format!("5173-{ID}.xpreview.example.com")), None);
        assert_eq!(parsed(&format!("5173-{ID}preview.example.com")), None);
        // Under it but malformed.
        for bad in [
            format!("{ID}.preview.example.com"),
            format!("05173-{ID}.preview.example.com"),
            format!("70000-{ID}.preview.example.com"),
            format!("5173-{}.preview.example.com", &ID[1..]),
            format!("5173-{ID}.x.preview.example.com"),
            "5173-zz.preview.example.com".to_owned(),
            format!("-{ID}.preview.example.com"),
        ] {
            assert_eq!(parsed(&bad), Some((0, String::new())), "{bad}");
        }
    }
}
