//! `telemetry.*`: the admin event stream.

use serde::Deserialize;

use super::{ConfigError, Dur};

/// `telemetry.*`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub events: EventsConfig,
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
        Ok(())
    }
}
