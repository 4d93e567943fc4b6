//! `Upstream`: the way to a sandbox: HTTP/1.1 requests through the inline client and its
//! per-sandbox pool ([`super::h1client`]), HTTP/2 requests and WebSocket handshakes through
//! hyper-util's pooled client; the connect and response-head timeouts, and classification
//! of their failures (the same for both).
//!
//! Keep `proxy.pool_idle_timeout` below the sandboxes' keep-alive timeout. The hyper
//! pool's idle timeout only fires because a timer is installed (`pool_timer`). WebSocket
//! handshakes always use hyper's HTTP/1.1 client, whatever `upstream_protocol` says.

use std::net::SocketAddr;
use std::time::Duration;

use dashmap::DashMap;
use http::header::HOST;
use http::uri::Authority;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntCounter;

use super::body::{ProxyBody, RequestBody};
use super::conn_local::{self, ConnLocal};
use super::error::ProxyError;
use super::forward::{endpoint_authority, upstream_uri};
use super::h1client::{H1Client, H1Error, H1Pool};
use super::listener::tcp_keepalive;
use crate::backend::SandboxId;
use crate::config::{ProxyConfig, UpstreamProtocol};
use crate::metrics::Metrics;

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
    /// The inline HTTP/1.1 client for ordinary requests to HTTP/1.1 sandboxes.
    h1: H1Client,
    h2: bool,
    request_timeout: Duration,
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
            h1: H1Client::new(
                H1Pool::new(
                    config.pool_max_idle_per_host,
                    config.pool_idle_timeout.as_duration(),
                ),
                config.connect_timeout.as_duration(),
                tcp_keepalive(config.tcp_keepalive.as_duration()),
            ),
            h2,
            request_timeout: config.request_timeout.as_duration(),
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

    /// Sends an HTTP/1.1 request (origin-form URI) to `sandbox` at `endpoint` with the
    /// inline client ([`super::h1client`]): a pooled connection of that sandbox or a new
    /// one. Waits for the response head at most `proxy.request_timeout` (connecting
    /// included), on `local`'s timer when the connection has one; the body then streams
    /// for as long as it lasts.
    pub async fn send_h1(
        &self,
        req: Request<RequestBody>,
        sandbox: &SandboxId,
        endpoint: SocketAddr,
        local: Option<&mut ConnLocal>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        // What the pooled client's `set_host` does for a client without a host.
        let authority;
        let host = if parts.headers.contains_key(HOST) {
            ""
        } else {
            authority = self.authority(endpoint);
            authority.as_str()
        };
        // A fast-path connection bounds it with its one timer (otherwise a timer per
        // request), lends its spare map to the response head, and gets the request's map
        // back, emptied, for its next request.
        let bounded = match local {
            Some(local) => {
                let spare = local.spare_response.take();
                let sent = self.h1.send(&parts, body, sandbox, endpoint, host, spare);
                let bounded = local.bounded(self.request_timeout, sent).await.ok_or(());
                conn_local::recycle(&mut local.spare_request, parts.headers);
                bounded
            }
            None => {
                let sent = self.h1.send(&parts, body, sandbox, endpoint, host, None);
                tokio::time::timeout(self.request_timeout, sent)
                    .await
                    .map_err(|_| ())
            }
        };
        let (head, body) = match bounded {
            Ok(Ok(sent)) => sent,
            Ok(Err(H1Error::Connect(source))) => {
                self.connect_errors.inc();
                return Err(ProxyError::UpstreamConnect { endpoint, source });
            }
            Ok(Err(H1Error::Reset(source))) => return Err(self.reset_error(endpoint, source)),
            Ok(Err(H1Error::Protocol(m))) => return Err(self.protocol_error(endpoint, &m)),
            // The client's fault, not the sandbox's: `blame_request_body` names it.
            Ok(Err(H1Error::Body(b))) => {
                return Err(ProxyError::UpstreamReset {
                    endpoint,
                    source: Box::new(b),
                });
            }
            Err(_) => return Err(self.timeout_error(endpoint)),
        };
        let mut resp = Response::new(ProxyBody::H1(body));
        *resp.status_mut() = head.status;
        // The version stays the proxy's own (HTTP/1.1), not the sandbox's: RFC 9110 6.2,
        // an intermediary sends its own version; the sandbox's is hop-by-hop.
        *resp.headers_mut() = head.headers;
        Ok(resp)
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
