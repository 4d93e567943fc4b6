//! Who is calling: the client's projected ServiceAccount token, checked with a TokenReview
//! for the agent's own audience, then against `node_agent.allowed_clients`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::lock::MutexExt;
use http::HeaderValue;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Most tokens remembered at once; the cache is emptied when it is full (a flood of distinct
/// valid tokens only costs TokenReviews, never memory).
const MAX_CACHED: usize = 4096;
/// Longest accepted bearer token (projected tokens are ~1 KiB JWTs).
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a caller was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token was not accepted")]
    Invalid,
    #[error("client {0:?} is not allowed")]
    NotAllowed(String),
    #[error("the API server could not review the token: {0}")]
    Unavailable(String),
}

/// Checks tokens with TokenReview, remembering accepted ones for `ttl`.
pub struct Authenticator {
    client: kube::Client,
    audience: String,
    allowed: HashSet<String>,
    ttl: Duration,
    timeout: Duration,
    /// SHA-256 of a token -> (username, valid until). A std Mutex: no await while held.
    cache: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl Authenticator {
    pub fn new(
        client: kube::Client,
        audience: String,
        allowed: &[String],
        ttl: Duration,
        timeout: Duration,
    ) -> Authenticator {
        Authenticator {
            client,
            audience,
            allowed: allowed.iter().cloned().collect(),
            ttl,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The allowlisted username behind an `Authorization: Bearer` header.
    pub async fn authenticate(&self, header: Option<&HeaderValue>) -> Result<String, AuthError> {
        let token = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Invalid);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((user, until)) = self.lock().get(&key)
            && *until > now
        {
            return Ok(user.clone());
        }
        let user = self.review(token).await?;
        if !self.allowed.contains(&user) {
            return Err(AuthError::NotAllowed(user));
        }
        if !self.ttl.is_zero() {
            let mut cache = self.lock();
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(key, (user.clone(), now + self.ttl));
        }
        Ok(user)
    }

    /// One TokenReview for our audience. The API documents that a client setting
    /// `spec.audiences` must check that `status.audiences` names a compatible audience, so
    /// that an audience-unaware authenticator cannot pass a token minted for someone else
    /// (k8s.io/api authentication/v1 `TokenReviewStatus.Audiences`).
    async fn review(&self, token: &str) -> Result<String, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer =
            tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| AuthError::Unavailable("TokenReview timed out".into()))?
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = answer.status.ok_or(AuthError::Invalid)?;
        if status.authenticated != Some(true) {
            return Err(AuthError::Invalid);
        }
        let audience_ok = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x == &self.audience));
        if !audience_ok {
            return Err(AuthError::Invalid);
        }
        status
            .user
            .and_then(|u| u.username)
            .filter(|u| !u.is_empty())
            .ok_or(AuthError::Invalid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (String, Instant)>> {
        // A panic while holding the lock leaves a consistent map (single inserts/clears).
        self.cache.lock_recovered()
    }
}
