//! Scheduled wake-ups: `schedules:` entries send a request through the activator's own
//! listener on a cron schedule, each tick once.
//!
//! Exactly-once per tick rests on two things: only the replica that leads
//! ([`Leadership`]) fires, and before firing it records the tick in a [`TickStore`]
//! (a state file locally, the leader-election Lease on Kubernetes; both from
//! [`crate::cluster`]). A tick already recorded
//! (by a previous run of this process or by a former leader) is skipped. Recording comes
//! first, so a crash between record and request loses that one tick rather than sending
//! it twice: at most once, never twice. Ticks missed while no replica ran are not
//! replayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::{Leadership, TickStore};
use crate::config::{Config, ConfigError, ScheduleConfig, SessionSource};
use crate::metrics::Metrics;
use crate::session::SessionKey;

mod sender;

pub use sender::{HttpWakeupSender, WakeupSender};

/// Starts the `schedules:` of `config`, sending through the proxy listener at
/// `proxy_addr`; abort the handles to stop. None configured: no tasks.
pub fn start(
    config: &Config,
    store: Arc<dyn TickStore>,
    leader: Arc<dyn Leadership>,
    metrics: Arc<Metrics>,
    proxy_addr: SocketAddr,
) -> Result<Vec<JoinHandle<()>>, ConfigError> {
    if config.schedules.is_empty() {
        return Ok(Vec::new());
    }
    let schedules = config
        .schedules
        .iter()
        .enumerate()
        .map(|(i, s)| s.parse(i, config.session.max_id_length))
        .collect::<Result<Vec<_>, _>>()?;
    let source = config
        .session
        .sources
        .first()
        .cloned()
        .unwrap_or_else(|| SessionSource::Header("X-Session-ID".into()));
    let timeout =
        config.proxy.request_timeout.as_duration() + config.activation.timeout.as_duration();
    let sender = Arc::new(HttpWakeupSender::new(proxy_addr, source, timeout));
    let scheduler = Scheduler::new(schedules, store, leader, sender, metrics, WallClock::System);
    Ok(scheduler.spawn())
}

/// A validated `schedules[i]` entry.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub cron: cron::Schedule,
    pub timezone: Tz,
    pub session: SessionKey,
    pub method: Method,
    /// Path and query, starting with `/`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl Schedule {
    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .after(&after.with_timezone(&self.timezone))
            .next()
            .map(|t| t.with_timezone(&Utc))
    }
}

impl ScheduleConfig {
    /// Checks the entry at `schedules[index]`, naming the offending key.
    pub fn validate(&self, index: usize, max_id_length: usize) -> Result<(), ConfigError> {
        self.parse(index, max_id_length).map(drop)
    }

    /// Parses the entry at `schedules[index]`, naming the offending key.
    pub fn parse(&self, index: usize, max_id_length: usize) -> Result<Schedule, ConfigError> {
        let key = |field: &str| format!("schedules[{index}].{field}");
        if self.name.is_empty() {
            return Err(ConfigError::invalid(key("name"), "must not be empty"));
        }
        let cron: cron::Schedule = self.cron.parse().map_err(|e| {
            ConfigError::invalid(
                key("cron"),
                format!(
                    "{:?} is not a cron expression with seconds \
                     (sec min hour day-of-month month day-of-week): {e}",
                    self.cron
                ),
            )
        })?;
        let timezone: Tz = self.timezone.parse().map_err(|_| {
            ConfigError::invalid(
                key("timezone"),
                format!("{:?} is not an IANA time zone", self.timezone),
            )
        })?;
        let session = SessionKey::parse(&self.session, max_id_length)
            .map_err(|e| ConfigError::invalid(key("session"), e.to_string()))?;
        let method = Method::from_bytes(self.method.as_bytes()).map_err(|_| {
            ConfigError::invalid(key("method"), format!("{:?} is not a method", self.method))
        })?;
        if !self.path.starts_with('/') || self.path.parse::<http::Uri>().is_err() {
            return Err(ConfigError::invalid(
                key("path"),
                "must be a path starting with '/'",
            ));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let k = format!("{}[{name}]", key("headers"));
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConfigError::invalid(k.clone(), "not a valid header name"))?;
            let v = HeaderValue::from_str(value)
                .map_err(|_| ConfigError::invalid(k, "not a valid header value"))?;
            headers.append(n, v);
        }
        Ok(Schedule {
            name: self.name.clone(),
            cron,
            timezone,
            session,
            method,
            path: self.path.clone(),
            headers,
            body: bytes::Bytes::from(self.body.clone().unwrap_or_default()),
        })
    }
}

/// Wall-clock time for the scheduler. `Anchored` derives it from tokio's clock, so tests on
/// paused time see schedules fire; `System` reads the system clock.
#[derive(Debug, Clone, Copy)]
pub enum WallClock {
    System,
    /// `wall` was the time at `at`; now is `wall + (Instant::now() - at)`.
    Anchored {
        wall: DateTime<Utc>,
        at: Instant,
    },
}

/// Longest single sleep, so a wall-clock step is noticed within a minute.
const MAX_SLEEP: Duration = Duration::from_secs(60);

impl WallClock {
    /// Tokio-clock-derived wall time starting at `wall` now.
    pub fn anchored(wall: DateTime<Utc>) -> WallClock {
        WallClock::Anchored {
            wall,
            at: Instant::now(),
        }
    }

    /// The current wall-clock time.
    pub fn now(&self) -> DateTime<Utc> {
        match *self {
            WallClock::System => Utc::now(),
            WallClock::Anchored { wall, at } => {
                let elapsed = Instant::now().saturating_duration_since(at);
                wall + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
            }
        }
    }

    /// Sleeps until the wall clock reads `at` or later.
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        loop {
            let left = match (at - self.now()).to_std() {
                Ok(d) if !d.is_zero() => d,
                _ => return,
            };
            tokio::time::sleep(left.min(MAX_SLEEP)).await;
        }
    }
}

/// How a fired tick ended, the `result` label of `activator_schedule_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    Ok,
    Error,
    /// Not the leader, or the tick was already fired.
    Skipped,
}

impl RunResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Error => "error",
            RunResult::Skipped => "skipped",
        }
    }
}

/// Runs every schedule: one task each, sleeping until its next tick.
pub struct Scheduler {
    schedules: Vec<Schedule>,
    store: Arc<dyn TickStore>,
    leader: Arc<dyn Leadership>,
    sender: Arc<dyn WakeupSender>,
    metrics: Arc<Metrics>,
    clock: WallClock,
}

impl Scheduler {
    pub fn new(
        schedules: Vec<Schedule>,
        store: Arc<dyn TickStore>,
        leader: Arc<dyn Leadership>,
        sender: Arc<dyn WakeupSender>,
        metrics: Arc<Metrics>,
        clock: WallClock,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            schedules,
            store,
            leader,
            sender,
            metrics,
            clock,
        })
    }

    /// Starts one task per schedule; abort the handles to stop.
    pub fn spawn(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        (0..self.schedules.len())
            .map(|i| {
                let scheduler = self.clone();
                tokio::spawn(async move { scheduler.run(i).await })
            })
            .collect()
    }

    async fn run(&self, index: usize) {
        let schedule = &self.schedules[index];
        let mut after = self.clock.now();
        loop {
            let Some(tick) = schedule.next_after(after) else {
                tracing::info!(schedule = %schedule.name, "schedule has no further ticks");
                return;
            };
            self.clock.sleep_until(tick).await;
            after = tick;
            self.fire(schedule, tick).await;
        }
    }

    /// Fires `tick` of `schedule` if this replica leads and nobody fired it yet.
    pub async fn fire(&self, schedule: &Schedule, tick: DateTime<Utc>) -> RunResult {
        let result = self.try_fire(schedule, tick).await;
        self.metrics
            .schedule_runs_total
            .with_label_values(&[result.as_str()])
            .inc();
        result
    }

    async fn try_fire(&self, schedule: &Schedule, tick: DateTime<Utc>) -> RunResult {
        let name = &schedule.name;
        if !self.leader.is_leader() {
            tracing::debug!(schedule = %name, %tick, "not the leader; another replica fires");
            return RunResult::Skipped;
        }
        match self.store.claim(name, tick).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(schedule = %name, %tick, "tick already fired; skipped");
                return RunResult::Skipped;
            }
            Err(e) => {
                tracing::warn!(schedule = %name, %tick, error = %e, "cannot record the tick; not fired");
                return RunResult::Error;
            }
        }
        let started = Instant::now();
        match self.sender.send(schedule).await {
            Ok(status) if status.is_success() => {
                tracing::info!(schedule = %name, %tick, %status, elapsed = ?started.elapsed(), "scheduled request done");
                RunResult::Ok
            }
            Ok(status) => {
                tracing::warn!(schedule = %name, %tick, %status, "scheduled request failed");
                RunResult::Error
            }
            Err(e) => {
                tracing::warn!(schedule = %name, %tick, error = %e, "scheduled request failed");
                RunResult::Error
            }
        }
    }
}

#[cfg(test)]
mod tests;
