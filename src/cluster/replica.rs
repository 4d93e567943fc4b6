//! `ReplicaId`: the one name this activator process goes by in its cluster.

use std::fmt;
use std::sync::Arc;

/// This process's identity among the activator replicas: `<pod>_<8 hex>`, where `<pod>` is
/// `POD_NAME` (downward API), else `HOSTNAME`, else `agent-activator`, and the suffix is
/// random per process start (as client-go's leader election does), so a restarted replica
/// never mistakes its predecessor's Lease record or activity stamps for its own, and two
/// processes sharing a host name stay distinct.
///
/// The same value is the Lease holder identity, the author of activity stamps on claims and
/// the `replica_id` in `GET /api/stats` (peers skip themselves by it). It contains no
/// whitespace: stamps are `<time> <replica>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ReplicaId(Arc<str>);

impl ReplicaId {
    /// A fresh identity from the environment (see the type's documentation).
    pub fn from_env() -> ReplicaId {
        let host = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .ok();
        ReplicaId::with_host(host.as_deref())
    }

    /// A fresh identity for `host` (`None` or blank: `agent-activator`).
    pub fn with_host(host: Option<&str>) -> ReplicaId {
        let host: String = host
            .map(|h| h.chars().filter(|c| !c.is_whitespace()).collect())
            .filter(|h: &String| !h.is_empty())
            .unwrap_or_else(|| "agent-activator".into());
        let suffix: [u8; 4] = rand::random();
        ReplicaId(format!("{host}_{}", hex::encode(suffix)).into())
    }

    /// An identity taken as given (tests, embedders that name their replicas).
    pub fn named(name: &str) -> ReplicaId {
        ReplicaId(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_plus_a_random_suffix_without_whitespace() {
        let a = ReplicaId::with_host(Some("activator-7d9f"));
        let b = ReplicaId::with_host(Some("activator-7d9f"));
        assert_ne!(a, b, "two processes on one host differ");
        let (host, suffix) = a.as_str().rsplit_once('_').unwrap();
        assert_eq!(host, "activator-7d9f");
        assert_eq!(suffix.len(), 8);
        assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()));
        let blank = ReplicaId::with_host(Some(" \t"));
        assert!(blank.as_str().starts_with("agent-activator_"), "{blank}");
        let spaced = ReplicaId::with_host(Some("a b"));
        assert!(spaced.as_str().starts_with("ab_"), "{spaced}");
    }
}
