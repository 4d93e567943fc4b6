//! The proxy: session extraction, activation, forwarding, streaming, WebSocket relay.
//!
//! One request's phases (see docs/architecture.md): accept -> extract session ->
//! acquire a lease (claim/resume/wait) -> prepare headers -> forward and await the
//! response head (bounded) -> stream the body back (or relay the upgraded stream) ->
//! complete (metrics, stats, access log, lease dropped). Failures at any phase turn into
//! a response in [`error`]; hyper never sees an `Err`.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Body;
use prometheus::{IntCounter, IntGauge};

use crate::backend::ActivationKind;
use crate::config::Config;
use crate::metrics::{ActivationExemplars, Metrics};
use crate::pool::{Pools, RequestView};
use crate::session::{
    ExtractedSession, SessionAdmission, SessionExtractor, SessionForwarding, SessionOrigin,
    TokenSigner,
};
use crate::shutdown::Shutdown;
use crate::stats::TrafficStats;
use crate::telemetry::Telemetry;

mod activity;
mod body;
mod client_addr;
mod completion;
mod conn_local;
pub mod error;
mod forward;
mod h1;
mod h1client;
mod h1server;
mod listener;
mod preview;
mod relay;
mod request_id;
pub mod rules;
mod tls;
mod upstream;

pub use body::{ClientBody, ProxyBody, RequestBody, RequestBodyError, ResponseBody};
pub use client_addr::{TrustedProxies, client_ip, parse_cidr};
pub use completion::{CLIENT_CLOSED, StatusCounters};
use completion::{Completion, Recorder};
use conn_local::ConnLocal;
use error::ProxyError;
pub use forward::{ClientConn, strip_hop_by_hop};
use forward::{is_upgrade_request, prepare_request_headers, strip_request_hop_by_hop};
pub use listener::serve;
use relay::Relay;
pub use request_id::X_REQUEST_ID;
use rules::{EdgeRules, EdgeViolation};
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
    /// The sandbox pools; a request's session picks one (see [`crate::pool`]).
    pools: Arc<Pools>,
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
    trusted: TrustedProxies,
    /// `proxy.allowed_upgrades`, lower-cased.
    allowed_upgrades: Box<[String]>,
    body_timeout: Duration,
    max_body_bytes: Option<u64>,
    tunnel_idle_timeout: Duration,
    tunnels_closed: IntCounter,
    /// The request-edge rules (CONNECT, look-alike and duplicate fields, Host).
    edge: EdgeRules,
    /// Preview URLs (`preview` of some pool), if any: requests for their hosts take
    /// [`Proxy::forward_preview`] instead of session extraction.
    previews: Option<Arc<crate::preview::Previews>>,
}

impl Proxy {
    /// Builds the proxy from a validated config; `signer` is `session.auth: hmac`'s
    /// (see [`TokenSigner::from_config`]).
    pub fn new(
        config: &Config,
        signer: Option<Arc<TokenSigner>>,
        pools: Arc<Pools>,
        metrics: &Metrics,
        stats: Arc<TrafficStats>,
        shutdown: Shutdown,
    ) -> Proxy {
        let tls = config.tls.is_some();
        Proxy {
            extractor: SessionExtractor::new(&config.session, signer, tls),
            pools,
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
            trusted: TrustedProxies::new(&config.proxy.trusted_proxies),
            allowed_upgrades: config
                .proxy
                .allowed_upgrades
                .iter()
                .map(|u| u.to_ascii_lowercase())
                .collect(),
            body_timeout: config.proxy.body_timeout.as_duration(),
            max_body_bytes: config.proxy.max_body_bytes,
            tunnel_idle_timeout: config.proxy.tunnel_idle_timeout.as_duration(),
            tunnels_closed: metrics
                .client_connections_closed_total
                .with_label_values(&["tunnel_idle_timeout"]),
            edge: EdgeRules::new(config),
            previews: None,
        }
    }

    /// Serves `previews`' hosts (see [`crate::preview`]).
    pub fn with_previews(mut self, previews: Option<Arc<crate::preview::Previews>>) -> Proxy {
        self.previews = previews;
        self
    }

    /// Traces requests with `telemetry` (see [`crate::telemetry`]).
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Proxy {
        self.telemetry = telemetry;
        self
    }

    /// Is `ip` one of `proxy.trusted_proxies`?
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        self.trusted.contains(ip)
    }

    /// The client address of a request: the peer, or behind trusted proxies the
    /// rightmost untrusted `X-Forwarded-For` entry. Per-client limits key on it.
    pub fn client_ip(&self, conn: &ClientConn, headers: &http::HeaderMap) -> std::net::IpAddr {
        client_addr::client_ip(conn, headers, &self.trusted)
    }

    /// Does every protocol the client offers in `Upgrade` appear in
    /// `proxy.allowed_upgrades`? (`h2c` never does: it would become a raw tunnel.)
    fn upgrade_allowed(&self, headers: &http::HeaderMap) -> bool {
        let mut offered = headers
            .get_all(http::header::UPGRADE)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
            .map(|t| t.split('/').next().unwrap_or("").trim())
            .peekable();
        offered.peek().is_some()
            && offered.all(|t| {
                self.allowed_upgrades
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(t))
            })
    }

    /// The request-edge rules, for a path that applies them while it parses (the
    /// HTTP/1.1 fast path) and then calls [`Proxy::handle_checked`].
    pub(crate) fn edge(&self) -> &EdgeRules {
        &self.edge
    }

    /// Proxies one request. Never fails: every failure is a response.
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        conn: &ClientConn,
    ) -> Response<ResponseBody> {
        self.handle_on(req, conn, None).await
    }

    /// [`Proxy::handle`], with the state a fast-path connection keeps between its
    /// requests (`local`: its lease cache and response-head timer) when it has one.
    async fn handle_on(
        &self,
        mut req: Request<ClientBody>,
        conn: &ClientConn,
        local: Option<&mut ConnLocal>,
    ) -> Response<ResponseBody> {
        let authority = req.uri().authority().cloned();
        let (method, version) = (req.method().clone(), req.version());
        let verdict = self.edge.check_request(
            &method,
            version,
            authority.as_ref().map(|a| a.as_str().as_bytes()),
            req.headers_mut(),
        );
        self.handle_checked(req, conn, verdict, local).await
    }

    /// Proxies one request whose fields already went through the edge rules
    /// (`verdict`: refused when `Err`; the fast path applies them while it parses), with
    /// the fast-path connection's `local` state when there is one. Never fails: every
    /// failure is a response.
    pub(crate) async fn handle_checked(
        &self,
        mut req: Request<ClientBody>,
        conn: &ClientConn,
        verdict: Result<(), EdgeViolation>,
        local: Option<&mut ConnLocal>,
    ) -> Response<ResponseBody> {
        let mut completion = Completion::begin(&self.recorder, req.method(), req.uri());
        if self.telemetry.enabled() {
            completion.set_trace(self.telemetry.start_request(req.method(), req.headers()));
        }
        // Hop-by-hop fields go before the proxy adds any of its own, so `Connection` can
        // name none of them (RFC 9110 7.6.1). An upgrade is decided on the fields as sent.
        let upgrade = req.version() <= Version::HTTP_11
            && is_upgrade_request(req.headers())
            && self.upgrade_allowed(req.headers());
        if verdict.is_ok() {
            strip_request_hop_by_hop(req.headers_mut(), upgrade, &self.edge);
        }
        let request_id = request_id::request_id(conn, req.headers());
        req.headers_mut().insert(&X_REQUEST_ID, request_id.clone());
        completion.set_request_id(&request_id);
        let https = conn.https(req.headers());
        let preview = self
            .previews
            .as_ref()
            .and_then(|p| preview::matched(p, req.uri(), req.headers()));
        // A preview host names its session through the preview, never a session source.
        let mut resp = match (verdict, preview) {
            // Refused at the edge: no preview, session or sandbox is looked at.
            (Err(violation), _) => self.failure(violation.into(), &request_id),
            (Ok(()), Some(matched)) => {
                let declared = req.body().size_hint().lower();
                let result = match self.max_body_bytes {
                    Some(max) if declared > max => Err(ProxyError::BodyTooLarge(max)),
                    _ => {
                        self.forward_preview(req, matched, conn, &mut completion, https)
                            .await
                    }
                };
                result.unwrap_or_else(|err| self.failure(err, &request_id))
            }
            (Ok(()), None) => {
                self.forward_session(req, conn, &mut completion, https, &request_id, local)
                    .await
            }
        };
        resp.headers_mut().insert(&X_REQUEST_ID, request_id);
        completion.set_status(resp.status().as_u16());
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, ResponseBody::new(body, completion))
    }

    /// A request on the main route: its session from the configured sources, then
    /// [`Proxy::forward`]; a minted session ID is handed out with the response.
    async fn forward_session(
        &self,
        req: Request<ClientBody>,
        conn: &ClientConn,
        completion: &mut Completion,
        https: bool,
        request_id: &HeaderValue,
        local: Option<&mut ConnLocal>,
    ) -> Response<ProxyBody> {
        let declared = req.body().size_hint().lower();
        let leases = local.as_deref().map(|l| &l.leases);
        let extracted = self
            .extractor
            .extract_reusing(req.uri(), req.headers(), |raw| {
                leases.and_then(|c| c.key(raw))
            });
        match extracted {
            // A declared length over the cap is refused before any sandbox is woken.
            _ if self.max_body_bytes.is_some_and(|max| declared > max) => self.failure(
                ProxyError::BodyTooLarge(self.max_body_bytes.unwrap_or(0)),
                request_id,
            ),
            Err(err) => self.failure(err.into(), request_id),
            Ok(session) => {
                completion.set_session(&session.key, session.rewritten.as_ref());
                let minted = (session.origin == SessionOrigin::Minted).then(|| session.key.clone());
                let mut resp = match self.forward(req, session, conn, completion, local).await {
                    Ok(resp) => resp,
                    Err(err) => self.failure(err, request_id),
                };
                // A minted ID is handed out even on failure, so a retry (503 carries
                // Retry-After) finds the claim that kept running for it.
                if let Some(key) = minted {
                    let value = self.extractor.client_value(&key);
                    let headers = resp.headers_mut();
                    if let Some(cookie) = self.extractor.set_cookie(&value) {
                        headers.append(SET_COOKIE, if https { secure(cookie) } else { cookie });
                    }
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(&X_SESSION_ID, v);
                    }
                }
                resp
            }
        }
    }

    fn failure(&self, err: ProxyError, request_id: &HeaderValue) -> Response<ProxyBody> {
        // The detail (a sandbox's stderr, an API message) is only logged, under the
        // request ID the client also gets.
        let request_id = request_id.to_str().unwrap_or("");
        // Sandbox and upstream faults are worth a warning; capacity and client errors are
        // expected under load and already in the access log.
        if err.status() == StatusCode::BAD_GATEWAY {
            tracing::warn!(code = err.code(), request_id, error = %ErrorChain(&err), "request failed");
        } else {
            tracing::debug!(code = err.code(), request_id, error = %ErrorChain(&err), "request refused");
        }
        err.into_response(&self.retry_after)
    }

    async fn forward(
        &self,
        req: Request<ClientBody>,
        session: ExtractedSession,
        conn: &ClientConn,
        completion: &mut Completion,
        mut local: Option<&mut ConnLocal>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let pool = {
            let path = match &session.rewritten {
                Some(p) => p.path(),
                None => req.uri().path(),
            };
            let view = RequestView::new(req.uri(), req.headers(), path);
            self.pools.route(&session.key, &view)?
        };
        if self.pools.is_named() {
            completion.set_pool_stats(&pool.stats);
        }
        let activator = &pool.activator;
        let ready = match local.as_deref_mut() {
            Some(local) => activator.try_acquire_ready_cached(&session.key, &mut local.leases),
            None => activator.try_acquire_ready(&session.key),
        };
        let lease = match ready {
            Some(lease) => lease,
            None => {
                // A session no pool holds yet is a new one: bounded (server-wide), and
                // customised by its first request's allowlisted headers under its pool's
                // rules (read only here: an existing session keeps what it was created
                // with).
                let spec = if !activator.knows(&session.key) {
                    let spec = activator.claim_spec(req.headers())?;
                    // Behind trusted proxies the limit keys on the real client.
                    let client = self.client_ip(conn, req.headers());
                    self.admission.admit(client, self.pools.session_total())?;
                    spec
                } else {
                    activator.plain_spec()
                };
                let waiting = tokio::time::Instant::now();
                match activator.acquire_with(&session.key, &spec).await {
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
        let target = Target {
            key: &session.key,
            path: session.rewritten,
            endpoint: lease.endpoint,
            pool_key: lease.sandbox.clone(),
        };
        self.dispatch(req, lease, target, conn, completion, local)
            .await
    }

    /// Forwards a leased request to `target` (the lease's sandbox, or one of its other
    /// ports for a preview) and relays the response or the upgraded stream.
    async fn dispatch(
        &self,
        mut req: Request<ClientBody>,
        lease: crate::activation::Permit,
        target: Target<'_>,
        conn: &ClientConn,
        completion: &mut Completion,
        local: Option<&mut ConnLocal>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let endpoint = target.endpoint;
        let traced_sandbox = completion.trace().map(|_| lease.sandbox.clone());
        let activation = lease.activation;
        let state_lost = lease.state_lost;
        let sandbox = target.pool_key;
        completion.hold_lease(lease);

        // An upgrade outside `proxy.allowed_upgrades` is forwarded as a plain request (its
        // `Upgrade`/`Connection` headers were stripped as hop-by-hop in `handle_checked`,
        // which kept exactly those of an allowed one, so this decides the same).
        let upgrade = req.version() <= Version::HTTP_11
            && is_upgrade_request(req.headers())
            && self.upgrade_allowed(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let body = RequestBody::new(body, self.body_timeout, self.max_body_bytes);
        prepare_request_headers(
            &mut parts.headers,
            parts.uri.authority(),
            conn,
            &self.strip,
            self.upstream.is_h2() && !upgrade,
        );
        self.forwarding
            .prepare_request(&mut parts.headers, target.key);
        let path = target.path.or_else(|| parts.uri.path_and_query().cloned());
        let path = self.forwarding.strip_query(path.as_ref()).or(path);
        // Origin-form for the sandbox (the pool adds scheme and authority itself).
        parts.uri = path
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
            .into();
        let span = completion
            .trace()
            .zip(traced_sandbox)
            .map(|(t, sandbox)| t.forward(&mut parts.headers, sandbox.as_str(), parts.uri.path()));
        let req = Request::from_parts(parts, body);
        let sent = if upgrade || self.upstream.is_h2() {
            (self.upstream.send(req, endpoint, upgrade).await).map(|r| r.map(ProxyBody::Upstream))
        } else {
            self.upstream.send_h1(req, &sandbox, endpoint, local).await
        }
        .map_err(ProxyError::blame_request_body);
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
        rules::fix_response_length(resp.status(), resp.headers_mut());
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
            return Ok(resp);
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
            idle_timeout: self.tunnel_idle_timeout,
            idle_closed: self.tunnels_closed.clone(),
        }
        .spawn(self.shutdown.clone());
        Ok(resp.map(|_| ProxyBody::empty()))
    }
}

/// Where [`Proxy::dispatch`] sends a leased request.
struct Target<'a> {
    /// The session (what the sandbox is told, `session.forward_header`).
    key: &'a crate::session::SessionKey,
    /// The path the sandbox sees, when it is not the request's own (a session prefix or
    /// a preview token removed).
    path: Option<PathAndQuery>,
    endpoint: std::net::SocketAddr,
    /// The upstream connection pool's key: the sandbox, or the sandbox and a preview port
    /// (a pool entry holds connections to one endpoint).
    pool_key: crate::backend::SandboxId,
}

/// Adds `Secure` to a minted cookie when the client is on HTTPS behind a trusted
/// TLS-terminating proxy (our own TLS already makes the extractor add it).
fn secure(cookie: HeaderValue) -> HeaderValue {
    if cookie.as_bytes().ends_with(b"; Secure") {
        return cookie;
    }
    let mut v = cookie.as_bytes().to_vec();
    v.extend_from_slice(b"; Secure");
    HeaderValue::from_bytes(&v).unwrap_or(cookie)
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
