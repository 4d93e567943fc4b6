//! `Audit`: every API request as a Kubernetes RBAC verb on a resource, like an API
//! server's audit log. Tests compare it with the Role the activator ships, and the write
//! benchmark counts writes from it.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// One `(verb, group, resource)` triple, e.g. `("patch", "extensions.agents.x-k8s.io",
/// "sandboxwarmpools/scale")`. The core group is `""`.
pub type Access = (String, String, String);

/// Counts of requests by [`Access`]. Std mutex: held only to increment or copy.
#[derive(Default)]
pub struct Audit {
    seen: Mutex<BTreeMap<Access, u64>>,
    bodies: Mutex<Vec<(Access, serde_json::Value)>>,
}

impl Audit {
    /// Records one request; `path` is the URL path, `watch` whether it asked to watch.
    pub(crate) fn record(&self, method: &str, path: &str, watch: bool) {
        let Some((group, resource, named)) = parse(path) else {
            return;
        };
        let verb = match (method, named, watch) {
            (_, _, true) => "watch",
            ("GET", true, _) => "get",
            ("GET", false, _) => "list",
            ("POST", _, _) => "create",
            ("PUT", _, _) => "update",
            ("PATCH", _, _) => "patch",
            ("DELETE", true, _) => "delete",
            ("DELETE", false, _) => "deletecollection",
            _ => return,
        };
        *self
            .seen
            .lock()
            .expect("audit lock")
            .entry((verb.into(), group, resource))
            .or_insert(0) += 1;
    }

    /// Records the JSON body of a write (create, update, patch) to `path`.
    pub(crate) fn record_body(&self, method: &str, path: &str, body: &[u8]) {
        let verb = match method {
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            _ => return,
        };
        let (Some((group, resource, _)), Ok(v)) = (parse(path), serde_json::from_slice(body))
        else {
            return;
        };
        self.bodies
            .lock()
            .expect("audit lock")
            .push(((verb.into(), group, resource), v));
    }

    /// Every write body recorded so far, with its access.
    pub fn bodies(&self) -> Vec<(Access, serde_json::Value)> {
        self.bodies.lock().expect("audit lock").clone()
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> BTreeMap<Access, u64> {
        self.seen.lock().expect("audit lock").clone()
    }

    /// Requests that change state (create, update, patch, delete) so far.
    pub fn writes(&self) -> u64 {
        self.seen
            .lock()
            .expect("audit lock")
            .iter()
            .filter(|((v, _, _), _)| {
                matches!(
                    v.as_str(),
                    "create" | "update" | "patch" | "delete" | "deletecollection"
                )
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Forgets everything recorded.
    pub fn clear(&self) {
        self.seen.lock().expect("audit lock").clear();
        self.bodies.lock().expect("audit lock").clear();
    }
}

/// `(group, resource[/subresource], names one object)` of a resource URL.
fn parse(path: &str) -> Option<(String, String, bool)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        _ => rest,
    };
    match rest {
        [p] => Some((group.into(), (*p).into(), false)),
        [p, _n] => Some((group.into(), (*p).into(), true)),
        [p, _n, s] => Some((group.into(), format!("{p}/{s}"), true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_become_rbac_verbs() {
        let a = Audit::default();
        a.record(
            "GET",
            "/apis/agents.x-k8s.io/v1beta1/namespaces/d/sandboxes",
            false,
        );
        a.record(
            "GET",
            "/apis/agents.x-k8s.io/v1beta1/namespaces/d/sandboxes",
            true,
        );
        a.record(
            "GET",
            "/apis/agents.x-k8s.io/v1beta1/namespaces/d/sandboxes/x",
            false,
        );
        a.record("PATCH", "/apis/g/v1/namespaces/d/pools/p/scale", false);
        a.record("POST", "/api/v1/namespaces/d/configmaps", false);
        a.record("DELETE", "/api/v1/namespaces/d/configmaps/c", false);
        a.record("GET", "/apis", false);
        let s = a.snapshot();
        let has = |v: &str, g: &str, r: &str| s.contains_key(&(v.into(), g.into(), r.into()));
        assert!(has("list", "agents.x-k8s.io", "sandboxes"));
        assert!(has("watch", "agents.x-k8s.io", "sandboxes"));
        assert!(has("get", "agents.x-k8s.io", "sandboxes"));
        assert!(has("patch", "g", "pools/scale"));
        assert!(has("create", "", "configmaps"));
        assert!(has("delete", "", "configmaps"));
        assert_eq!(s.len(), 6, "discovery is not a resource access: {s:?}");
        assert_eq!(a.writes(), 3);
    }
}
