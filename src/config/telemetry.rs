//! `telemetry.*`: the admin event stream and OpenTelemetry trace export.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ConfigError, Dur};

/// `telemetry.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub events: EventsConfig,
    pub otlp: OtlpConfig,
    /// Share of requests without a sampled `traceparent` that are traced, 0.0 ..= 1.0. A
    /// request arriving with a sampled `traceparent` is traced whatever the ratio.
    pub sample_ratio: f64,
    /// `service.name` of exported spans.
    pub service_name: String,
    /// Extra OpenTelemetry resource attributes (`deployment.environment: prod`, ...).
    pub resource_attributes: BTreeMap<String, String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            events: EventsConfig::default(),
            otlp: OtlpConfig::default(),
            sample_ratio: 1.0,
            service_name: "agent-activator".into(),
            resource_attributes: BTreeMap::new(),
        }
    }
}

/// `telemetry.otlp.*`: where spans go. Tracing is off while `endpoint` is unset.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// OTLP/HTTP base URL, e.g. `http://otel-collector:4318`; spans are POSTed as protobuf
    /// to `{endpoint}/v1/traces`.
    pub endpoint: Option<String>,
    /// Extra HTTP headers on every export request (e.g. an API key).
    pub headers: BTreeMap<String, String>,
}

/// `telemetry.events.*`: `GET /api/events` on the admin port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events kept for `Last-Event-ID` resumes; also how far a subscriber may fall behind
    /// before it is dropped.
    pub buffer: usize,
    /// Concurrent `/api/events` streams (503 beyond).
    pub max_subscribers: usize,
    /// A subscriber that takes no data for this long while events wait is disconnected.
    pub stall_timeout: Dur,
    /// A comment line is sent on an idle stream this often, so proxies and
    /// `kubectl port-forward` keep it open.
    pub keepalive: Dur,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            buffer: 4096,
            max_subscribers: 32,
            stall_timeout: Dur::secs(10),
            keepalive: Dur::secs(15),
        }
    }
}

impl TelemetryConfig {
    /// Checks `telemetry.*`; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.events;
        if e.buffer == 0 || e.buffer > 1_000_000 {
            return Err(ConfigError::invalid(
                "telemetry.events.buffer",
                "must be between 1 and 1000000",
            ));
        }
        if e.max_subscribers == 0 || e.max_subscribers > 10_000 {
            return Err(ConfigError::invalid(
                "telemetry.events.max_subscribers",
                "must be between 1 and 10000",
            ));
        }
        if e.stall_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "telemetry.events.stall_timeout",
                "must be greater than 0",
            ));
        }
        if e.keepalive.is_zero() {
            return Err(ConfigError::invalid(
                "telemetry.events.keepalive",
                "must be greater than 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::invalid(
                "telemetry.sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.service_name.is_empty() {
            return Err(ConfigError::invalid(
                "telemetry.service_name",
                "must not be empty",
            ));
        }
        if let Some(url) = &self.otlp.endpoint {
            let ok = url.parse::<http::Uri>().is_ok_and(|u| {
                u.scheme_str() == Some("http") && u.authority().is_some() && u.query().is_none()
            });
            if !ok {
                return Err(ConfigError::invalid(
                    "telemetry.otlp.endpoint",
                    format!("{url:?} is not an http:// URL such as http://otel-collector:4318"),
                ));
            }
        }
        for (name, value) in &self.otlp.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return Err(ConfigError::invalid(
                    format!("telemetry.otlp.headers.{name}"),
                    "not a valid header name and value",
                ));
            }
        }
        Ok(())
    }
}
