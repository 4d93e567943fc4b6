//! `PeerCollector`: the leader fetches every other replica's `GET /api/stats`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::cluster::ReplicaId;
use crate::stats::StatsSnapshot;

/// Largest `/api/stats` body accepted from a peer.
const MAX_BODY: usize = 64 * 1024;

/// Scrapes the configured peers; a peer that fails is logged and left out of the sum.
pub struct PeerCollector {
    peers: Vec<String>,
    timeout: Duration,
    own_id: ReplicaId,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `Authorization: Bearer ...` for peers whose admin port needs `admin.auth`.
    authorization: Option<http::HeaderValue>,
    /// With `pools:`, the pool whose signals are collected (`/api/stats?pool=`).
    pool: Option<std::sync::Arc<str>>,
}

impl PeerCollector {
    /// `peers` are `host:port` admin addresses; every address a name resolves to counts.
    /// `own_id` is this replica's, so its own snapshot (reached through the headless
    /// Service like any other) is left out. `token` is the shared `admin.auth` bearer
    /// token, if any.
    pub fn new(
        peers: Vec<String>,
        timeout: Duration,
        own_id: ReplicaId,
        token: Option<String>,
    ) -> PeerCollector {
        PeerCollector {
            peers,
            timeout,
            own_id,
            client: Client::builder(TokioExecutor::new()).build_http(),
            authorization: token.and_then(|t| {
                let mut v = http::HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
                v.set_sensitive(true);
                Some(v)
            }),
            pool: None,
        }
    }

    /// Collects pool `pool`'s signals from every peer instead of the whole replica's.
    pub fn for_pool(mut self, pool: Option<std::sync::Arc<str>>) -> PeerCollector {
        self.pool = pool;
        self
    }

    /// This process's replica ID.
    pub fn own_id(&self) -> &ReplicaId {
        &self.own_id
    }

    /// Every reachable peer's snapshot except this replica's own. Takes at most about two
    /// `peer_timeout`s (resolve, then fetch, each bounded).
    pub async fn collect(&self) -> Vec<StatsSnapshot> {
        if self.peers.is_empty() {
            return Vec::new();
        }
        let resolved = join_all(self.peers.iter().map(|p| self.resolve(p))).await;
        let addrs: BTreeSet<SocketAddr> = resolved.into_iter().flatten().collect();
        let fetched = join_all(addrs.iter().map(|a| self.fetch(*a))).await;
        fetched
            .into_iter()
            .flatten()
            .filter(|s| s.replica_id != self.own_id.as_str())
            .collect()
    }

    async fn resolve(&self, peer: &str) -> Vec<SocketAddr> {
        match tokio::time::timeout(self.timeout, tokio::net::lookup_host(peer)).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                tracing::warn!(peer, error = %e, "cannot resolve autoscaler peer");
                Vec::new()
            }
            Err(_) => {
                tracing::warn!(peer, "resolving autoscaler peer timed out");
                Vec::new()
            }
        }
    }

    async fn fetch(&self, addr: SocketAddr) -> Option<StatsSnapshot> {
        let uri = match &self.pool {
            Some(pool) => format!("http://{addr}/api/stats?pool={pool}"),
            None => format!("http://{addr}/api/stats"),
        };
        let uri: http::Uri = uri.parse().ok()?;
        let exchange = async {
            let mut req = http::Request::get(uri)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            if let Some(a) = &self.authorization {
                req.headers_mut()
                    .insert(http::header::AUTHORIZATION, a.clone());
            }
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()));
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            serde_json::from_slice::<StatsSnapshot>(&body).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(snapshot)) => Some(snapshot),
            Ok(Err(e)) => {
                tracing::warn!(%addr, error = %e, "cannot collect peer stats");
                None
            }
            Err(_) => {
                tracing::warn!(%addr, "collecting peer stats timed out");
                None
            }
        }
    }
}
