//! `Upstream`: pooled HTTP clients to sandboxes (hyper-util legacy client), the connect
//! and response-head timeouts, and classification of their failures.
//!
//! The pool's idle timeout only fires because a timer is installed (`pool_timer`); keep
//! `proxy.pool_idle_timeout` below the sandboxes' keep-alive timeout. WebSocket
//! handshakes always use the HTTP/1.1 client, whatever `upstream_protocol` says.

use std::net::SocketAddr;
use std::time::Duration;

use dashmap::DashMap;
use http::uri::Authority;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntCounter;

use super::body::RequestBody;
use super::error::ProxyError;
use super::forward::endpoint_authority;
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

    /// Sends `req` (absolute URI already set) and waits for the response head, at most
    /// `proxy.request_timeout`. The body is not covered: it streams for as long as it lasts.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
        endpoint: SocketAddr,
        upgrade: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
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
                Err(ProxyError::UpstreamConnect { endpoint, source })
            }
            Ok(Err(source)) if is_unparsable(&source) => {
                self.protocol_errors.inc();
                tracing::warn!(%endpoint, error = %source, "sandbox response is not valid HTTP");
                Err(ProxyError::UpstreamProtocol(
                    "the sandbox's response is not valid HTTP",
                ))
            }
            Ok(Err(source)) => {
                self.reset_errors.inc();
                Err(ProxyError::UpstreamReset { endpoint, source })
            }
            Err(_) => {
                self.timeout_errors.inc();
                Err(ProxyError::UpstreamTimeout {
                    endpoint,
                    timeout: self.request_timeout,
                })
            }
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
