//! OpenTelemetry traces: W3C `traceparent`/`tracestate` in, spans for the request, the
//! activation wait and the upstream forward, the context propagated to the sandbox, and
//! OTLP/HTTP (protobuf) export.
//!
//! Off by default (`telemetry.otlp.endpoint` unset): then [`Telemetry::start_request`] is
//! one branch on a bool. With export on, a request that is not sampled (no sampled
//! incoming `traceparent` and `telemetry.sample_ratio` says no, or the ratio is 0) costs a
//! header lookup and the sampling decision; nothing is allocated for it and its
//! `traceparent`, if any, passes to the sandbox untouched. Spans carry the session's
//! short hash, never the raw ID.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::config::{ConfigError, TelemetryConfig};

mod export;

static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The tracer, or nothing when export is off.
pub struct Telemetry {
    inner: Option<Inner>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// `telemetry.sample_ratio == 0`: only requests with a sampled parent are traced.
    parent_only: bool,
    propagator: TraceContextPropagator,
    backend_kind: &'static str,
}

impl Telemetry {
    /// No tracing at all.
    pub fn disabled() -> Telemetry {
        Telemetry { inner: None }
    }

    /// From `telemetry.*`; export starts when `telemetry.otlp.endpoint` is set. Call inside
    /// the Tokio runtime (the exporter sends through it).
    pub fn new(
        config: &TelemetryConfig,
        backend_kind: &'static str,
    ) -> Result<Telemetry, ConfigError> {
        let Some(endpoint) = &config.otlp.endpoint else {
            return Ok(Telemetry::disabled());
        };
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
        let provider = export::provider(config, endpoint, sampler)?;
        let tracer = provider.tracer("agent-activator");
        Ok(Telemetry {
            inner: Some(Inner {
                provider,
                tracer,
                parent_only: config.sample_ratio == 0.0,
                propagator: TraceContextPropagator::new(),
                backend_kind,
            }),
        })
    }

    /// Export is configured.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts the request span if this request is traced; `None` costs nothing more.
    #[inline]
    pub fn start_request(
        &self,
        method: &http::Method,
        headers: &HeaderMap,
    ) -> Option<RequestTrace> {
        let inner = self.inner.as_ref()?;
        inner.start_request(method, headers)
    }

    /// Exports what is buffered and stops the exporter (bounded by the SDK's timeouts).
    pub async fn shutdown(&self) {
        if let Some(inner) = &self.inner {
            let provider = inner.provider.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = provider.shutdown() {
                    tracing::warn!(error = %e, "trace exporter shutdown");
                }
            })
            .await;
        }
    }
}

impl Inner {
    fn start_request(&self, method: &http::Method, headers: &HeaderMap) -> Option<RequestTrace> {
        let has_parent = headers.contains_key(&TRACEPARENT);
        if self.parent_only && !has_parent {
            return None;
        }
        let parent = if has_parent {
            self.propagator.extract(&HeaderExtractor(headers))
        } else {
            Context::new()
        };
        let parent_span = parent.span();
        let parent_sc = parent_span.span_context();
        if parent_sc.is_valid() && !parent_sc.is_sampled() {
            // The caller decided: not traced. Its traceparent passes through untouched.
            return None;
        }
        // The SDK samples (parent-based, then the ratio); an unsampled span records nothing.
        // Named by method only: the path may still hold a session ID (`/s/{id}/...`); the
        // forwarded path is added by `RequestTrace::forward`.
        let builder = self.tracer.span_builder(span_name(method));
        let span = builder
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("http.request.method", method.to_string())])
            .start_with_context(&self.tracer, &parent);
        let cx = parent.with_span(span);
        if !cx.span().span_context().is_sampled() {
            return None;
        }
        Some(RequestTrace {
            cx,
            tracer: self.tracer.clone(),
            propagator: self.propagator.clone(),
            backend_kind: self.backend_kind,
        })
    }
}

/// A static span name for the common methods (no allocation), `HTTP` for the rest.
fn span_name(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "HTTP",
    }
}

/// One traced request: its span (the parent of the others) and what child spans need.
pub struct RequestTrace {
    cx: Context,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    backend_kind: &'static str,
}

impl RequestTrace {
    /// The trace ID, lowercase hex (access log, exemplars).
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    /// Names the session (its short hash only) on the request span.
    pub fn set_session(&self, hash: &str) {
        self.cx
            .span()
            .set_attribute(KeyValue::new("session.hash", hash.to_owned()));
    }

    /// Records the activation wait that just ended: `kind` claim/create/resume, `outcome`
    /// `ok` or the error code, over the last `waited`.
    pub fn activation(
        &self,
        kind: &'static str,
        outcome: &'static str,
        waited: Duration,
        sandbox: Option<&str>,
    ) {
        let end = SystemTime::now();
        let mut attrs = vec![
            KeyValue::new("activation.kind", kind),
            KeyValue::new("activation.outcome", outcome),
            KeyValue::new("backend.kind", self.backend_kind),
        ];
        if let Some(s) = sandbox {
            attrs.push(KeyValue::new("sandbox.id", s.to_owned()));
        }
        let mut span = self
            .tracer
            .span_builder("activation")
            .with_kind(SpanKind::Internal)
            .with_start_time(end.checked_sub(waited).unwrap_or(end))
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &self.cx);
        if outcome != "ok" {
            span.set_status(Status::error(outcome));
        }
        span.end_with_timestamp(end);
    }

    /// Starts the upstream-forward span and writes its context into the request headers
    /// for the sandbox (`traceparent`, `tracestate`): the sandbox's spans become its
    /// children.
    pub fn forward(&self, headers: &mut HeaderMap, sandbox: &str, path: &str) -> UpstreamSpan {
        self.cx
            .span()
            .set_attribute(KeyValue::new("url.path", path.to_owned()));
        let span = self
            .tracer
            .span_builder("forward")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("sandbox.id", sandbox.to_owned()),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start_with_context(&self.tracer, &self.cx);
        let cx = self.cx.with_span(span);
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
        UpstreamSpan(cx)
    }

    /// Ends the request span with the response status.
    pub fn finish(self, status: u16) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            span.set_status(Status::error(format!("HTTP {status}")));
        }
        span.end();
    }
}

/// The upstream forward span; ends when the response head arrived (or failed).
pub struct UpstreamSpan(Context);

impl UpstreamSpan {
    /// Ends the span with the upstream's status, or the failure's error code.
    pub fn finish(self, outcome: Result<u16, &'static str>) {
        let span = self.0.span();
        match outcome {
            Ok(status) => span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            )),
            Err(code) => span.set_status(Status::error(code)),
        }
        span.end();
    }
}
