//! `Pool` and `Pools`: one activator, backend, traffic stats and autoscaler per kind of
//! sandbox (`pools:` in the configuration), and the router that picks a request's pool.
//!
//! A session is bound to the pool its first request selects and stays there while its
//! entry lives: later requests find it by asking each pool's table (O(pools) lookups of
//! one `DashMap` each). A request that explicitly selects another pool than the one
//! holding its session is refused (409 `pool_mismatch`); one that selects none and has
//! no session goes to the default pool (the one without `match`), or gets 404 `no_pool`.
//! The single-pool configuration is one pool without a selector: routing is free.

use std::sync::{Arc, Mutex};

use http::HeaderMap;

use crate::activation::Activator;
use crate::autoscaler::{Autoscaler, Scaling};
use crate::backend::DynBackend;
use crate::config::PoolMatch;
use crate::lock::MutexExt;
use crate::metrics::Metrics;
use crate::session::SessionKey;
use crate::stats::TrafficStats;

/// One kind of sandbox: its own sandbox source, session table, signals and decisions.
pub struct Pool {
    /// `pools[].name` (`default` without `pools:`).
    pub name: Arc<str>,
    matcher: Option<PoolMatch>,
    pub activator: Arc<Activator>,
    pub backend: DynBackend,
    /// This pool's traffic (the autoscaler's input). Without `pools:` it is the
    /// server-wide one every request feeds.
    pub stats: Arc<TrafficStats>,
    /// The registry this pool's activator, backend and autoscaler write (with `pools:`
    /// every series carries `pool`).
    pub metrics: Arc<Metrics>,
    pub autoscaler: Arc<Autoscaler>,
    /// Taken (and stopped) on shutdown.
    scaling: Mutex<Option<Scaling>>,
}

/// The parts [`Pool::new`] assembles.
pub struct PoolParts {
    pub name: Arc<str>,
    pub matcher: Option<PoolMatch>,
    pub activator: Arc<Activator>,
    pub backend: DynBackend,
    pub stats: Arc<TrafficStats>,
    pub metrics: Arc<Metrics>,
    pub scaling: Scaling,
}

impl Pool {
    pub fn new(p: PoolParts) -> Pool {
        Pool {
            name: p.name,
            matcher: p.matcher,
            activator: p.activator,
            backend: p.backend,
            stats: p.stats,
            metrics: p.metrics,
            autoscaler: p.scaling.autoscaler().clone(),
            scaling: Mutex::new(Some(p.scaling)),
        }
    }

    /// Stops this pool's stats sampler and autoscaler loop (idempotent).
    pub fn stop_scaling(&self) {
        let taken = self.scaling.lock_recovered().take();
        if let Some(s) = taken {
            s.stop();
        }
    }

    /// Does the request explicitly select this pool?
    fn selects(&self, req: &RequestView<'_>) -> bool {
        match &self.matcher {
            None => false,
            Some(PoolMatch::Header { name, value }) => req
                .headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.as_bytes() == value.as_bytes()),
            Some(PoolMatch::PathPrefix(prefix)) => req.path.starts_with(prefix.as_str()),
            Some(PoolMatch::Host(host)) => req.host.is_some_and(|h| h.eq_ignore_ascii_case(host)),
        }
    }
}

/// What pool selection reads of a request.
pub struct RequestView<'a> {
    pub headers: &'a HeaderMap,
    /// The path the sandbox will see (a session path prefix already removed).
    pub path: &'a str,
    /// `Host` or the URI authority, without the port.
    pub host: Option<&'a str>,
}

impl<'a> RequestView<'a> {
    /// The view of a request whose forwarded path is `path`.
    pub fn new(uri: &'a http::Uri, headers: &'a HeaderMap, path: &'a str) -> RequestView<'a> {
        let host = uri.host().or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(strip_port)
        });
        RequestView {
            headers,
            path,
            host,
        }
    }
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// Why no pool takes a request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// The request selects no pool, its session is in none, and there is no default.
    #[error("the request selects no sandbox pool and there is no default pool")]
    NoPool,
    /// The session lives in `bound` but the request selects `selected`.
    #[error("the session belongs to pool {bound}, the request selects pool {selected}")]
    Mismatch { bound: Arc<str>, selected: Arc<str> },
}

/// Every pool, in configuration order, and the request router.
pub struct Pools {
    pools: Box<[Arc<Pool>]>,
    /// The pool without `match`, if any.
    default: Option<usize>,
    /// One pool without a selector: every request goes to it without looking at it.
    single: bool,
    /// `pools:` is configured: names label metrics, API rows and events, and each pool
    /// has its own traffic stats.
    named: bool,
}

impl Pools {
    /// `pools` must not be empty (the configuration always yields at least one); `named`
    /// says `pools:` is configured.
    pub fn new(pools: Vec<Arc<Pool>>, named: bool) -> Pools {
        assert!(!pools.is_empty(), "at least one pool");
        let default = pools.iter().position(|p| p.matcher.is_none());
        let single = pools.len() == 1 && default == Some(0);
        Pools {
            pools: pools.into(),
            default,
            single,
            named,
        }
    }

    /// The pool that serves `key` for this request (see the module docs).
    pub fn route(&self, key: &SessionKey, req: &RequestView<'_>) -> Result<&Arc<Pool>, PoolError> {
        if self.single {
            return Ok(&self.pools[0]);
        }
        let selected = self.pools.iter().find(|p| p.selects(req));
        if let Some(p) = selected
            && p.activator.knows(key)
        {
            return Ok(p);
        }
        let owner = self.owner(key);
        match (selected, owner) {
            (Some(s), Some(o)) => Err(PoolError::Mismatch {
                bound: o.name.clone(),
                selected: s.name.clone(),
            }),
            (Some(p), None) | (None, Some(p)) => Ok(p),
            (None, None) => self
                .default
                .map(|i| &self.pools[i])
                .ok_or(PoolError::NoPool),
        }
    }

    /// The pool whose table holds `key`.
    pub fn owner(&self, key: &SessionKey) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.activator.knows(key))
    }

    /// Sessions in every pool's table (`session.max_sessions` is server-wide).
    pub fn session_total(&self) -> usize {
        self.pools.iter().map(|p| p.activator.session_total()).sum()
    }

    /// The pool named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| &*p.name == name)
    }

    /// The first pool (the only one without `pools:`).
    pub fn first(&self) -> &Arc<Pool> {
        &self.pools[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter()
    }

    /// Whether `pools:` is configured (pool names appear in the API and metrics).
    pub fn is_named(&self) -> bool {
        self.named
    }

    /// Refuses new activations in every pool (the drain).
    pub fn begin_shutdown(&self) {
        for p in self.iter() {
            p.activator.begin_shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn port_is_stripped_from_hosts() {
        assert_eq!(strip_port("python.example:8080"), "python.example");
        assert_eq!(strip_port("python.example"), "python.example");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
