//! `WakeupSender`: how a fired tick reaches the sandbox (HTTP through the activator).

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::Schedule;
use crate::config::SessionSource;

/// Why a scheduled request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Request(String),
}

/// Sends one scheduled request and returns the response status.
#[async_trait]
pub trait WakeupSender: Send + Sync + 'static {
    async fn send(&self, schedule: &Schedule) -> Result<StatusCode, SendError>;
}

/// Sends through the activator's own proxy listener, so the request takes the same path
/// as a client's: session extraction, resume of a paused sandbox, forwarding.
pub struct HttpWakeupSender {
    target: SocketAddr,
    source: SessionSource,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpWakeupSender {
    /// `target` is the proxy listener (an unspecified address is reached via loopback);
    /// the session ID is put where `source` (the first `session.sources` entry) reads it.
    pub fn new(target: SocketAddr, source: SessionSource, timeout: Duration) -> HttpWakeupSender {
        let mut target = target;
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        HttpWakeupSender {
            target,
            source,
            timeout,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The request for `schedule`, with its session ID placed per the session source.
    pub fn request(&self, schedule: &Schedule) -> Request<Full<Bytes>> {
        let session = schedule.session.as_str();
        let mut path = schedule.path.clone();
        match &self.source {
            SessionSource::PathPrefix(prefix) => {
                path = format!("{prefix}{session}{path}");
            }
            SessionSource::Query(name) => {
                let sep = if path.contains('?') { '&' } else { '?' };
                path = format!("{path}{sep}{name}={session}");
            }
            SessionSource::Header(_) | SessionSource::Cookie(_) => {}
        }
        let mut req = Request::new(Full::new(schedule.body.clone()));
        *req.method_mut() = schedule.method.clone();
        *req.uri_mut() = format!("http://{}{path}", self.target)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        let headers = req.headers_mut();
        for (name, value) in &schedule.headers {
            headers.append(name, value.clone());
        }
        let value = |s: String| http::HeaderValue::try_from(s).ok();
        match &self.source {
            SessionSource::Header(name) => {
                if let (Ok(n), Some(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    value(session.to_owned()),
                ) {
                    headers.insert(n, v);
                }
            }
            SessionSource::Cookie(name) => {
                if let Some(v) = value(format!("{name}={session}")) {
                    headers.append(header::COOKIE, v);
                }
            }
            SessionSource::PathPrefix(_) | SessionSource::Query(_) => {}
        }
        if let Some(v) = value(format!("schedule/{}", schedule.name)) {
            headers.insert(header::USER_AGENT, v);
        }
        req
    }
}

#[async_trait]
impl WakeupSender for HttpWakeupSender {
    async fn send(&self, schedule: &Schedule) -> Result<StatusCode, SendError> {
        let req = self.request(schedule);
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SendError::Request(e.to_string()))?;
            let status = resp.status();
            // Read the body so a streaming job runs to its end before the tick counts.
            resp.into_body()
                .collect()
                .await
                .map_err(|e| SendError::Request(e.to_string()))?;
            Ok(status)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| SendError::Timeout(self.timeout))?
    }
}
