//! The proxy: session extraction, activation, forwarding, streaming, WebSocket relay.
//!
//! One request's phases (see docs/architecture.md): accept -> extract session ->
//! acquire a lease (claim/resume/wait) -> prepare headers -> forward and await the
//! response head (bounded) -> stream the body back (or relay the upgraded stream) ->
//! complete (metrics, stats, access log, lease dropped). Failures at any phase turn into
//! a response in [`error`]; hyper never sees an `Err`.

use std::sync::Arc;

use http::header::{HeaderName, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use prometheus::IntGauge;

use crate::activation::Activator;
use crate::backend::ActivationKind;
use crate::config::Config;
use crate::metrics::{ActivationExemplars, Metrics};
use crate::session::{
    ExtractedSession, SessionAdmission, SessionExtractor, SessionForwarding, SessionOrigin,
    TokenSigner,
};
use crate::shutdown::Shutdown;
use crate::stats::TrafficStats;
use crate::telemetry::Telemetry;

mod body;
mod completion;
pub mod error;
mod forward;
mod listener;
mod relay;
mod tls;
mod upstream;

pub use body::{ProxyBody, ResponseBody};
pub use completion::{CLIENT_CLOSED, StatusCounters};
use completion::{Completion, Recorder};
use error::ProxyError;
pub use forward::{ClientConn, strip_hop_by_hop};
use forward::{is_upgrade_request, prepare_request_headers, upstream_uri};
pub use listener::serve;
use relay::Relay;
pub use tls::{TlsError, acceptor as tls_acceptor};
use upstream::Upstream;

/// `X-Activator-Activation`: what the request waited for (claim|create|resume|none).
pub static X_ACTIVATOR_ACTIVATION: HeaderName = HeaderName::from_static("x-activator-activation");
/// `X-Activator-State-Lost: true`: the session's previous sandbox died; this one is fresh.
pub static X_ACTIVATOR_STATE_LOST: HeaderName = HeaderName::from_static("x-activator-state-lost");
/// `X-Session-ID`: on responses when `on_missing: create` made a session, what the client
/// presents from then on (the ID, or its token with `session.auth: hmac`).
pub static X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");

/// Everything a request needs, shared by every connection.
pub struct Proxy {
    extractor: SessionExtractor,
    activator: Arc<Activator>,
    upstream: Upstream,
    recorder: Arc<Recorder>,
    strip: Box<[HeaderName]>,
    retry_after: HeaderValue,
    /// What the sandbox sees of the session (`session.forward_header`, hidden tokens) and
    /// which of its `Set-Cookie` lines are dropped.
    forwarding: SessionForwarding,
    /// `session.max_sessions` and `session.create_rate`, asked only for new sessions.
    admission: SessionAdmission,
    websockets_open: IntGauge,
    shutdown: Shutdown,
    /// OpenTelemetry spans (off unless `telemetry.otlp.endpoint` is set).
    telemetry: Arc<Telemetry>,
    /// Where traced activations leave their trace ID for `/metrics` (OpenMetrics).
    exemplars: Arc<ActivationExemplars>,
}

impl Proxy {
    /// Builds the proxy from a validated config; `signer` is `session.auth: hmac`'s
    /// (see [`TokenSigner::from_config`]).
    pub fn new(
        config: &Config,
        signer: Option<Arc<TokenSigner>>,
        activator: Arc<Activator>,
        metrics: &Metrics,
        stats: Arc<TrafficStats>,
        shutdown: Shutdown,
    ) -> Proxy {
        let tls = config.tls.is_some();
        Proxy {
            extractor: SessionExtractor::new(&config.session, signer, tls),
            activator,
            upstream: Upstream::new(&config.proxy, metrics),
            recorder: Arc::new(Recorder::new(
                metrics,
                stats,
                config.log.access_log,
                config.log.session_ids,
            )),
            strip: config
                .proxy
                .strip_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            retry_after: error::retry_after_value(config.activation.retry_after.as_duration()),
            forwarding: SessionForwarding::new(&config.session),
            admission: SessionAdmission::new(&config.session),
            websockets_open: metrics.websockets_open.clone(),
            shutdown,
            telemetry: Arc::new(Telemetry::disabled()),
            exemplars: metrics.activation_exemplars.clone(),
        }
    }

    /// Traces requests with `telemetry` (see [`crate::telemetry`]).
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Proxy {
        self.telemetry = telemetry;
        self
    }

    /// Proxies one request. Never fails: every failure is a response.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &ClientConn,
    ) -> Response<ResponseBody> {
        let mut completion = Completion::begin(&self.recorder, req.method(), req.uri());
        if self.telemetry.enabled() {
            completion.set_trace(self.telemetry.start_request(req.method(), req.headers()));
        }
        let resp = match self.extractor.extract(req.uri(), req.headers()) {
            Err(err) => self.failure(err.into()),
            Ok(session) => {
                completion.set_session(&session.key, session.rewritten.as_ref());
                let minted = (session.origin == SessionOrigin::Minted).then(|| session.key.clone());
                let mut resp = match self.forward(req, session, conn, &mut completion).await {
                    Ok(resp) => resp,
                    Err(err) => self.failure(err),
                };
                // A minted ID is handed out even on failure, so a retry (503 carries
                // Retry-After) finds the claim that kept running for it.
                if let Some(key) = minted {
                    let value = self.extractor.client_value(&key);
                    let headers = resp.headers_mut();
                    if let Some(cookie) = self.extractor.set_cookie(&value) {
                        headers.append(SET_COOKIE, cookie);
                    }
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(&X_SESSION_ID, v);
                    }
                }
                resp
            }
        };
        completion.set_status(resp.status().as_u16());
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, ResponseBody::new(body, completion))
    }

    fn failure(&self, err: ProxyError) -> Response<ProxyBody> {
        // Sandbox and upstream faults are worth a warning; capacity and client errors are
        // expected under load and already in the access log.
        if err.status() == StatusCode::BAD_GATEWAY {
            tracing::warn!(code = err.code(), error = %ErrorChain(&err), "request failed");
        } else {
            tracing::debug!(code = err.code(), error = %ErrorChain(&err), "request refused");
        }
        err.into_response(&self.retry_after)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        session: ExtractedSession,
        conn: &ClientConn,
        completion: &mut Completion,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let lease = match self.activator.try_acquire_ready(&session.key) {
            Some(lease) => lease,
            None => {
                // A session the table does not hold yet is a new one: bounded.
                if !self.activator.knows(&session.key) {
                    self.admission
                        .admit(conn.peer.ip(), self.activator.session_total())?;
                }
                let waiting = tokio::time::Instant::now();
                match self.activator.acquire(&session.key).await {
                    Ok(lease) => lease,
                    Err(e) => {
                        let err = ProxyError::from(e);
                        if let Some(trace) = completion.trace() {
                            trace.activation("wait", err.code(), waiting.elapsed(), None);
                        }
                        return Err(err);
                    }
                }
            }
        };
        if let Some(trace) = completion.trace() {
            trace.set_session(lease.session_hash());
            if lease.activation != ActivationKind::None {
                let sandbox = Some(lease.sandbox.as_str());
                trace.activation(lease.activation.as_str(), "ok", lease.waited, sandbox);
                self.exemplars.record(
                    lease.activation.as_str(),
                    lease.waited.as_secs_f64(),
                    trace.trace_id(),
                );
            }
        }
        let endpoint = lease.endpoint;
        let traced_sandbox = completion.trace().map(|_| lease.sandbox.clone());
        let activation = lease.activation;
        let state_lost = lease.state_lost;
        completion.hold_lease(lease);

        let upgrade = req.version() <= Version::HTTP_11 && is_upgrade_request(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        prepare_request_headers(
            &mut parts.headers,
            parts.uri.authority(),
            conn,
            &self.strip,
            upgrade,
            self.upstream.is_h2() && !upgrade,
        );
        self.forwarding
            .prepare_request(&mut parts.headers, &session.key);
        let path = session
            .rewritten
            .or_else(|| parts.uri.path_and_query().cloned());
        let path = self.forwarding.strip_query(path.as_ref()).or(path);
        parts.uri = upstream_uri(self.upstream.authority(endpoint), path);
        let span = completion
            .trace()
            .zip(traced_sandbox)
            .map(|(t, sandbox)| t.forward(&mut parts.headers, sandbox.as_str(), parts.uri.path()));
        let sent = self
            .upstream
            .send(Request::from_parts(parts, body), endpoint, upgrade)
            .await;
        if let Some(span) = span {
            span.finish(
                sent.as_ref()
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.code()),
            );
        }
        let mut resp = sent?;

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(resp.headers_mut(), switching);
        self.forwarding.filter_response(resp.headers_mut());
        let headers = resp.headers_mut();
        headers.insert(
            &X_ACTIVATOR_ACTIVATION,
            HeaderValue::from_static(activation.as_str()),
        );
        if state_lost {
            headers.insert(&X_ACTIVATOR_STATE_LOST, HeaderValue::from_static("true"));
        }
        if !switching {
            return Ok(resp.map(ProxyBody::Upstream));
        }
        let Some(client) = client_upgrade else {
            return Err(ProxyError::UpstreamProtocol(
                "the sandbox switched protocols on a request that did not ask to",
            ));
        };
        completion.set_status(StatusCode::SWITCHING_PROTOCOLS.as_u16());
        Relay {
            client,
            upstream: hyper::upgrade::on(&mut resp),
            completion: completion.take(),
            track: self.shutdown.tracker().track(),
            open_gauge: self.websockets_open.clone(),
        }
        .spawn(self.shutdown.clone());
        Ok(resp.map(|_| ProxyBody::empty()))
    }
}

/// Displays an error with its `source()` chain, for logs.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
