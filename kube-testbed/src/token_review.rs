//! `authentication.k8s.io/v1` TokenReview: tokens the test issues, reviewed with the
//! audience semantics of the real API server.
//!
//! As documented on `TokenReviewStatus.audiences` (k8s.io/api authentication/v1): the
//! status carries the intersection of the review's `spec.audiences` and the token's
//! audiences, and a token is authenticated only when that intersection is not empty. An
//! empty `spec.audiences` means the API server's own audience.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::store::ApiError;

/// The API server's own audience, used when a review names none.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Who a token stands for.
#[derive(Debug, Clone)]
pub struct TokenIdentity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub audiences: Vec<String>,
}

/// Issued tokens. Tokens are opaque strings; only this registry knows them.
#[derive(Debug, Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, TokenIdentity>>,
    next: AtomicU64,
    reviews: AtomicU64,
}

impl Tokens {
    /// Issues a token for ServiceAccount `namespace/name`, valid for `audiences`.
    pub fn issue_service_account(&self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        self.issue(TokenIdentity {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            uid: format!("sa-uid-{namespace}-{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        })
    }

    /// Issues a token for any identity.
    pub fn issue(&self, identity: TokenIdentity) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let token = format!("kube-testbed-token.{n:x}.{nanos:08x}");
        self.lock().insert(token.clone(), identity);
        token
    }

    /// Makes a token invalid from now on (a deleted ServiceAccount).
    pub fn revoke(&self, token: &str) {
        self.lock().remove(token);
    }

    /// How many TokenReviews were answered.
    pub fn reviews(&self) -> u64 {
        self.reviews.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TokenIdentity>> {
        self.issued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers `POST /apis/authentication.k8s.io/v1/tokenreviews`.
    pub(crate) fn review(&self, body: &Value) -> Result<Value, ApiError> {
        self.reviews.fetch_add(1, Ordering::Relaxed);
        let spec = body
            .get("spec")
            .ok_or_else(|| ApiError::new(422, "Invalid", "spec: Required value"))?;
        let token = spec
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::new(422, "Invalid", "spec.token: Required value"))?;
        let wanted: Vec<String> = match spec.get("audiences").and_then(Value::as_array) {
            Some(a) if !a.is_empty() => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => vec![API_SERVER_AUDIENCE.to_owned()],
        };
        let identity = self.lock().get(token).cloned();
        let status = match identity {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some(id) => {
                let common: Vec<&String> =
                    wanted.iter().filter(|a| id.audiences.contains(a)).collect();
                if common.is_empty() {
                    json!({"authenticated": false,
                           "error": "token audiences is invalid for the target audiences"})
                } else {
                    json!({
                        "authenticated": true,
                        "user": {"username": id.username, "uid": id.uid, "groups": id.groups},
                        "audiences": common,
                    })
                }
            }
        };
        Ok(json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        }))
    }
}
