//! One keep-alive HTTP/1.1 client connection to a target (hyper), reconnected on failure.
//!
//! Each load worker owns its connection, so concurrency is exactly the connection count
//! and no pool sits between the measurement and the wire.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::target::Target;

/// The session header every request carries.
pub const SESSION_HEADER: &str = "x-session-id";
/// Response header the activator uses to say what a request waited for.
pub const ACTIVATION_HEADER: &str = "x-activator-activation";

/// A complete response: status, headers and the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// `X-Activator-Activation` (`claim`, `create`, `resume`, `none`), if present.
    pub fn activation(&self) -> Option<&str> {
        self.headers
            .get(ACTIVATION_HEADER)
            .and_then(|v| v.to_str().ok())
    }
}

/// A keep-alive connection to one target.
pub struct HttpConn {
    target: Target,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpConn {
    /// A connection that dials lazily on first use; every request is bounded by `timeout`.
    pub fn new(target: &Target, timeout: Duration) -> HttpConn {
        HttpConn {
            target: target.clone(),
            timeout,
            sender: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.target.addr)
            .await
            .with_context(|| format!("connect {}", self.target.addr))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            // The connection ends when the sender is dropped or the peer closes; either
            // way the next request reconnects, so the error itself needs no handling here.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one request with `session` in `X-Session-ID` and reads the whole response.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        session: Option<&str>,
        body: Bytes,
    ) -> Result<Reply> {
        let mut req = Request::builder()
            .method(method)
            .uri(self.target.path(path))
            .header(http::header::HOST, &self.target.authority);
        if let Some(s) = session {
            req = req.header(SESSION_HEADER, s);
        }
        let req = req.body(Full::new(body))?;
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(req)).await {
            Ok(r) => r,
            Err(_) => {
                self.sender = None;
                Err(anyhow!("no complete response within {timeout:?}"))
            }
        }
    }

    async fn exchange(&mut self, req: Request<Full<Bytes>>) -> Result<Reply> {
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let (parts, body): (_, Incoming) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        // Only keep a connection whose response ended cleanly.
        self.sender = Some(sender);
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `GET path` that must answer 2xx.
    pub async fn get_ok(&mut self, path: &str, session: Option<&str>) -> Result<Reply> {
        let r = self.send(Method::GET, path, session, Bytes::new()).await?;
        ensure_success(&r, path)?;
        Ok(r)
    }

    /// `POST path` that must answer 2xx.
    pub async fn post_ok(&mut self, path: &str, session: Option<&str>) -> Result<Reply> {
        let r = self.send(Method::POST, path, session, Bytes::new()).await?;
        ensure_success(&r, path)?;
        Ok(r)
    }
}

/// Turns a non-2xx reply into an error that carries the status and the start of the body.
pub fn ensure_success(r: &Reply, path: &str) -> Result<()> {
    if r.status.is_success() {
        return Ok(());
    }
    let body = String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).into_owned();
    bail!("{path}: HTTP {} {body}", r.status.as_u16())
}
