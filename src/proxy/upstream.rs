//! `Upstream`: the way to a sandbox: a client connection's dedicated connection (see
//! [`super::affinity`]) or the shared pools (hyper-util legacy client); the connect and
//! response-head timeouts, and classification of their failures.
//!
//! The pool's idle timeout only fires because a timer is installed (`pool_timer`); keep
//! `proxy.pool_idle_timeout` below the sandboxes' keep-alive timeout. WebSocket
//! handshakes always use the HTTP/1.1 client, whatever `upstream_protocol` says.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::affinity::{Affinity, Route, Sender};
use super::body::RequestBody;
use super::error::ProxyError;
use super::forward::{endpoint_authority, upstream_uri};
use crate::backend::SandboxId;
use crate::config::{ProxyConfig, UpstreamProtocol};
use crate::metrics::Metrics;
use crate::session::SessionKey;

/// Beyond this many distinct endpoints the authority cache starts over (process and
/// Kubernetes backends keep minting new addresses).
const AUTHORITY_CACHE_MAX: usize = 4096;

type HttpClient = Client<HttpConnector, RequestBody>;

/// Clients to sandboxes plus per-kind error counters.
pub struct Upstream {
    /// The client for ordinary requests (`upstream_protocol`).
    primary: HttpClient,
    /// HTTP/1.1 client for upgrades (same as `primary` when that is HTTP/1.1).
    http1: HttpClient,
    h2: bool,
    request_timeout: Duration,
    connect_timeout: Duration,
    idle_timeout: Duration,
    authorities: DashMap<SocketAddr, Authority>,
    connect_errors: IntCounter,
    reset_errors: IntCounter,
    protocol_errors: IntCounter,
    timeout_errors: IntCounter,
}

impl Upstream {
    pub fn new(config: &ProxyConfig, metrics: &Metrics) -> Upstream {
        let http1 = build_client(config, false);
        let h2 = config.upstream_protocol == UpstreamProtocol::Http2;
        let primary = if h2 {
            build_client(config, true)
        } else {
            http1.clone()
        };
        let errors = &metrics.upstream_errors_total;
        Upstream {
            primary,
            http1,
            h2,
            request_timeout: config.request_timeout.as_duration(),
            connect_timeout: config.connect_timeout.as_duration(),
            idle_timeout: config.pool_idle_timeout.as_duration(),
            authorities: DashMap::new(),
            connect_errors: errors.with_label_values(&["connect"]),
            reset_errors: errors.with_label_values(&["reset"]),
            protocol_errors: errors.with_label_values(&["protocol"]),
            timeout_errors: errors.with_label_values(&["timeout"]),
        }
    }

    /// Whether ordinary requests go out as HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.h2
    }

    /// The cached `host:port` authority of `endpoint`.
    pub fn authority(&self, endpoint: SocketAddr) -> Authority {
        if let Some(a) = self.authorities.get(&endpoint) {
            return a.clone();
        }
        if self.authorities.len() >= AUTHORITY_CACHE_MAX {
            self.authorities.clear();
        }
        let a = endpoint_authority(endpoint);
        self.authorities.insert(endpoint, a.clone());
        a
    }

    /// Sends an HTTP/1.1 request of `session` (leased to `sandbox` at `endpoint`) on the
    /// client connection's dedicated upstream connection when [`Affinity`] allows, else
    /// through the pool; waits for the response head, at most `proxy.request_timeout`
    /// (connecting included). `req` carries an origin-form URI.
    pub async fn send_affine(
        &self,
        mut req: Request<RequestBody>,
        affinity: &Arc<Affinity>,
        session: &SessionKey,
        sandbox: &SandboxId,
        endpoint: SocketAddr,
    ) -> Result<Response<Incoming>, ProxyError> {
        let sender = match affinity.route(session, sandbox, endpoint, self.idle_timeout) {
            Route::Pool => return self.send(req, endpoint, false).await,
            Route::Dedicated(sender) => sender,
            Route::Open(generation) => match self.open(endpoint, affinity, generation).await {
                Ok(sender) => sender,
                Err(err) => {
                    affinity.forget(session);
                    return Err(err);
                }
            },
        };
        let mut sender = sender;
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(HOST) {
            // What the pooled client's `set_host` does for a client without a host.
            let authority = self.authority(endpoint);
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(HOST, host);
            }
        }
        let sent = sender.try_send_request(req);
        // The request is queued on the connection; the sender goes back at once so a
        // dropped request (client gone) cannot lose the connection with it.
        affinity.put_back(session, sandbox, endpoint, sender);
        match tokio::time::timeout(self.request_timeout, sent).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(mut err)) => match err.take_message() {
                // Never written (the sandbox closed the idle connection): the pool sends
                // it on a fresh connection, as the pooled client retries its own.
                Some(req) => self.send(req, endpoint, false).await,
                None => {
                    let source = err.into_error();
                    if source.is_parse() {
                        return Err(self.protocol_error(endpoint, &source));
                    }
                    Err(self.reset_error(endpoint, source.into()))
                }
            },
            Err(_) => Err(self.timeout_error(endpoint)),
        }
    }

    /// Opens a dedicated HTTP/1.1 connection to `endpoint` (`TCP_NODELAY`, bounded by
    /// `proxy.connect_timeout`). Its connection task ends when the sender is dropped, and
    /// drops it itself (through [`Affinity::expire`]) once it is idle for
    /// `proxy.pool_idle_timeout`.
    async fn open(
        &self,
        endpoint: SocketAddr,
        affinity: &Arc<Affinity>,
        generation: u64,
    ) -> Result<Sender, ProxyError> {
        let connect_error = |source: Box<dyn std::error::Error + Send + Sync>| {
            self.connect_errors.inc();
            ProxyError::UpstreamConnect { endpoint, source }
        };
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(connect_error(e.into())),
                Err(_) => {
                    return Err(connect_error(
                        format!("connect timed out after {:?}", self.connect_timeout).into(),
                    ));
                }
            };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_error(e.into()))?;
        let affinity = Arc::downgrade(affinity);
        let idle_timeout = self.idle_timeout;
        tokio::spawn(async move {
            tokio::pin!(conn);
            let mut check = Some(Instant::now() + idle_timeout);
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%endpoint, error = %e, "dedicated upstream connection ended");
                        }
                        return;
                    }
                    () = sleep_until_some(check) => {
                        // Once the client connection is gone, or this connection left its
                        // slot, its sender is dropped and the connection ends by itself.
                        check = affinity
                            .upgrade()
                            .and_then(|a| a.expire(generation, idle_timeout));
                    }
                }
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI) through the pool and waits for the response head, at
    /// most `proxy.request_timeout`. The body is not covered: it streams for as long as
    /// it lasts.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
        endpoint: SocketAddr,
        upgrade: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
        let path = req.uri().path_and_query().cloned();
        *req.uri_mut() = upstream_uri(self.authority(endpoint), path);
        let client = if upgrade || !self.h2 {
            *req.version_mut() = Version::HTTP_11;
            &self.http1
        } else {
            *req.version_mut() = Version::HTTP_2;
            &self.primary
        };
        match tokio::time::timeout(self.request_timeout, client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(source)) if source.is_connect() => {
                self.connect_errors.inc();
                Err(ProxyError::UpstreamConnect {
                    endpoint,
                    source: source.into(),
                })
            }
            Ok(Err(source)) if is_unparsable(&source) => {
                Err(self.protocol_error(endpoint, &source))
            }
            Ok(Err(source)) => Err(self.reset_error(endpoint, source.into())),
            Err(_) => Err(self.timeout_error(endpoint)),
        }
    }

    // === failures, counted once, the same for the dedicated and the pooled path ===

    /// The sandbox answered bytes that are not HTTP (502 `upstream_protocol`); the detail
    /// goes to the log only.
    fn protocol_error(&self, endpoint: SocketAddr, source: &dyn std::fmt::Display) -> ProxyError {
        self.protocol_errors.inc();
        tracing::warn!(%endpoint, error = %source, "sandbox response is not valid HTTP");
        ProxyError::UpstreamProtocol("the sandbox's response is not valid HTTP")
    }

    /// The sandbox closed or reset the connection before a response head (502).
    fn reset_error(
        &self,
        endpoint: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> ProxyError {
        self.reset_errors.inc();
        ProxyError::UpstreamReset { endpoint, source }
    }

    /// No response head within `proxy.request_timeout` (504).
    fn timeout_error(&self, endpoint: SocketAddr) -> ProxyError {
        self.timeout_errors.inc();
        ProxyError::UpstreamTimeout {
            endpoint,
            timeout: self.request_timeout,
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// True when the sandbox answered bytes that are not an HTTP response (hyper's parse errors
/// anywhere in the chain), as opposed to closing or resetting the connection.
fn is_unparsable(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn build_client(config: &ProxyConfig, h2: bool) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout.as_duration()));
    connector.set_nodelay(true);
    let keepalive = config.tcp_keepalive.as_duration();
    if !keepalive.is_zero() {
        // Same probe schedule as client sockets (see proxy::listener).
        connector.set_keepalive(Some(keepalive));
        connector.set_keepalive_interval(Some((keepalive / 3).max(Duration::from_secs(1))));
        connector.set_keepalive_retries(Some(3));
    }
    connector.enforce_http(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout.as_duration())
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .set_host(true);
    if h2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}
