//! Scenario files (`loadtest/scenarios/*.yaml`): every knob of a run, with bounded defaults.
//! Command-line flags override individual keys after the file is read.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Hard ceiling on any single phase's duration, whatever a file or flag says.
pub const MAX_PHASE: Duration = Duration::from_secs(600);

/// A whole run's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// `name=URL` targets; the first is the baseline for ratios.
    pub targets: Vec<String>,
    /// Activator admin base URL (`http://127.0.0.1:9091`) polled for sandbox states.
    pub admin: Option<String>,
    /// The activator's PID, for requests per CPU-second.
    pub activator_pid: Option<u32>,
    /// Bound on any one request (connect to complete body).
    #[serde(with = "humantime_serde_dur")]
    pub request_timeout: Duration,
    /// Errors tolerated before the run counts as failed (violations are never tolerated).
    pub max_errors: u64,
    /// How often sandbox states and CPU are sampled.
    #[serde(with = "humantime_serde_dur")]
    pub sample_interval: Duration,
    /// Seed of the think-time and turn-kind choices.
    pub seed: u64,
    pub hot: HotScenario,
    pub agents: AgentsScenario,
    pub storm: StormScenario,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            targets: Vec::new(),
            admin: None,
            activator_pid: None,
            request_timeout: Duration::from_secs(10),
            max_errors: 0,
            sample_interval: Duration::from_millis(500),
            seed: 1,
            hot: HotScenario::default(),
            agents: AgentsScenario::default(),
            storm: StormScenario::default(),
        }
    }
}

/// Which load loops `hot` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Closed loop: maximum throughput.
    Closed,
    /// Open loop at a constant rate: latency free of coordinated omission.
    Open,
}

/// `hot:` established sessions, small keep-alive GETs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotScenario {
    /// Sessions established before measuring; requests cycle over them.
    pub sessions: usize,
    /// Concurrent keep-alive connections (one worker each).
    pub connections: usize,
    /// Measured time per target per phase, split evenly over `rounds`.
    #[serde(with = "humantime_serde_dur")]
    pub duration: Duration,
    /// Interleaving rounds: each round visits every target once (start rotating).
    pub rounds: u32,
    /// Unmeasured closed-loop time per target before the first round.
    #[serde(with = "humantime_serde_dur")]
    pub warmup: Duration,
    pub phases: Vec<Phase>,
    /// Open-loop rate (req/s); unset = `rate_fraction` x the lowest closed-loop throughput.
    pub rate: Option<f64>,
    pub rate_fraction: f64,
    /// Request cap per target per phase.
    pub max_requests: u64,
    /// Path of the hot request (the demo sandbox echoes any unrouted path with its pid).
    pub path: String,
    /// Sessions whose `GET /state` is checked before and after (pinned, seen).
    pub verify_sessions: usize,
}

impl Default for HotScenario {
    fn default() -> Self {
        HotScenario {
            sessions: 64,
            connections: 16,
            duration: Duration::from_secs(10),
            rounds: 3,
            warmup: Duration::from_secs(1),
            phases: vec![Phase::Closed, Phase::Open],
            rate: None,
            rate_fraction: 0.5,
            max_requests: 5_000_000,
            path: "/hot".into(),
            verify_sessions: 64,
        }
    }
}

/// `agents:` agent-shaped sessions with turns, streams, idle periods.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsScenario {
    /// Sessions started in all, per target.
    pub sessions: usize,
    /// New sessions per second.
    pub arrival_rate: f64,
    /// Conversation turns before the idle period.
    pub turns: u32,
    /// Think time between turns: uniform in [min, max].
    #[serde(with = "humantime_serde_dur")]
    pub think_min: Duration,
    #[serde(with = "humantime_serde_dur")]
    pub think_max: Duration,
    /// Share of turns that stream SSE (`GET /sse`).
    pub sse_fraction: f64,
    /// Share of turns that use a WebSocket (`/ws` echo).
    pub ws_fraction: f64,
    pub sse_events: u64,
    pub sse_interval_ms: u64,
    pub ws_messages: u32,
    /// Share of sessions that go idle (long enough to be frozen) and come back.
    pub idle_fraction: f64,
    /// How long an idle session stays away; set it above the activator's `idle.timeout`.
    #[serde(with = "humantime_serde_dur")]
    pub idle_time: Duration,
    /// Turns after coming back.
    pub return_turns: u32,
    /// Each session has its own sandbox (activator targets); relax for a direct target.
    pub exclusive: bool,
    /// Bound on the whole mode per target.
    #[serde(with = "humantime_serde_dur")]
    pub duration: Duration,
}

impl Default for AgentsScenario {
    fn default() -> Self {
        AgentsScenario {
            sessions: 20,
            arrival_rate: 5.0,
            turns: 4,
            think_min: Duration::from_millis(100),
            think_max: Duration::from_millis(500),
            sse_fraction: 0.25,
            ws_fraction: 0.25,
            sse_events: 5,
            sse_interval_ms: 10,
            ws_messages: 3,
            idle_fraction: 0.5,
            idle_time: Duration::from_secs(3),
            return_turns: 2,
            exclusive: true,
            duration: Duration::from_secs(120),
        }
    }
}

/// `storm:` K new sessions at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StormScenario {
    pub sessions: usize,
    /// Each session has its own sandbox (activator targets).
    pub exclusive: bool,
    /// Bound on the whole storm per target.
    #[serde(with = "humantime_serde_dur")]
    pub duration: Duration,
}

impl Default for StormScenario {
    fn default() -> Self {
        StormScenario {
            sessions: 100,
            exclusive: true,
            duration: Duration::from_secs(120),
        }
    }
}

impl Scenario {
    /// Reads a scenario file; unknown keys and bad values are errors naming the key.
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        Scenario::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Scenario> {
        let s: Scenario = serde_yaml_ng::from_str(text)?;
        Ok(s)
    }

    /// Checks ranges and bounds (after flags are applied).
    pub fn validate(&self) -> Result<()> {
        let h = &self.hot;
        if h.sessions == 0 || h.connections == 0 || h.rounds == 0 {
            bail!("hot.sessions, hot.connections and hot.rounds must be at least 1");
        }
        if !(h.rate_fraction > 0.0 && h.rate_fraction <= 1.0) {
            bail!(
                "hot.rate_fraction must be in (0, 1], got {}",
                h.rate_fraction
            );
        }
        if h.rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
            bail!("hot.rate must be positive");
        }
        if h.phases.is_empty() {
            bail!("hot.phases must name at least one of closed, open");
        }
        if !h.path.starts_with('/') {
            bail!("hot.path must start with '/', got {:?}", h.path);
        }
        let a = &self.agents;
        if !a.arrival_rate.is_finite() || a.arrival_rate <= 0.0 {
            bail!("agents.arrival_rate must be positive");
        }
        if a.think_min > a.think_max {
            bail!("agents.think_min must not exceed agents.think_max");
        }
        for (key, v) in [
            ("agents.sse_fraction", a.sse_fraction),
            ("agents.ws_fraction", a.ws_fraction),
            ("agents.idle_fraction", a.idle_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key} must be in [0, 1], got {v}");
            }
        }
        if a.sse_fraction + a.ws_fraction > 1.0 {
            bail!("agents.sse_fraction + agents.ws_fraction must not exceed 1");
        }
        for (key, d) in [
            ("hot.duration", h.duration),
            ("hot.warmup", h.warmup),
            ("agents.duration", a.duration),
            ("storm.duration", self.storm.duration),
            ("request_timeout", self.request_timeout),
        ] {
            if d > MAX_PHASE {
                bail!("{key} is {d:?}; the bound is {MAX_PHASE:?}");
            }
            if d.is_zero() && key != "hot.warmup" {
                bail!("{key} must be positive");
            }
        }
        if self.sample_interval < Duration::from_millis(50) {
            bail!("sample_interval must be at least 50ms");
        }
        Ok(())
    }
}

/// Durations written as humantime strings (`500ms`, `10s`, `2m`).
mod humantime_serde_dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| D::Error::custom(format!("{text:?} is not a duration like 10s: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_shipped_scenario() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let s = Scenario::load(&path).unwrap();
                s.validate()
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(
            n >= 3,
            "expected the shipped scenarios in {}",
            dir.display()
        );
    }

    #[test]
    fn defaults_and_overrides() {
        let s = Scenario::parse(
            "targets: [direct=http://127.0.0.1:1]\nhot:\n  sessions: 5\n  duration: 2s\n  phases: [open]\n  rate: 100\n",
        )
        .unwrap();
        assert_eq!(s.hot.sessions, 5);
        assert_eq!(s.hot.duration, Duration::from_secs(2));
        assert_eq!(s.hot.phases, vec![Phase::Open]);
        assert_eq!(s.hot.connections, HotScenario::default().connections);
        assert_eq!(s.request_timeout, Duration::from_secs(10));
        s.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let e = Scenario::parse("hot:\n  sesions: 5\n").unwrap_err();
        assert!(format!("{e:#}").contains("sesions"), "{e:#}");
        let e = Scenario::parse("hot:\n  duration: soon\n").unwrap_err();
        assert!(format!("{e:#}").contains("not a duration"), "{e:#}");
        let mut s = Scenario::default();
        s.hot.duration = Duration::from_secs(3600);
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("hot.duration"));
        let mut s = Scenario::default();
        s.agents.sse_fraction = 0.8;
        s.agents.ws_fraction = 0.5;
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("sse_fraction"));
    }
}
