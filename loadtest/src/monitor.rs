//! The run timeline: sessions as the harness sees them, sandbox states from the activator's
//! admin API, and CPU per sandbox state (from `/proc`), sampled at a fixed interval.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::HttpConn;
use crate::procstat;
use crate::target::Target;

/// Session counts the load runners keep up to date for the timeline.
#[derive(Default)]
pub struct Gauges {
    /// Sessions with a request or stream in flight.
    pub active: AtomicI64,
    /// Sessions between turns (think time).
    pub thinking: AtomicI64,
    /// Sessions away long enough to be frozen.
    pub idle: AtomicI64,
    /// What is running now (`hot closed nginx`, ...).
    pub label: Mutex<String>,
}

impl Gauges {
    pub fn set_label(&self, label: impl Into<String>) {
        *self.label.lock().expect("label lock") = label.into();
    }

    /// Moves one session from gauge `from` to gauge `to` (either may be absent).
    pub fn shift(&self, from: Option<&AtomicI64>, to: Option<&AtomicI64>) {
        if let Some(f) = from {
            f.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(t) = to {
            t.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One point of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    pub label: String,
    pub sessions_active: i64,
    pub sessions_thinking: i64,
    pub sessions_idle: i64,
    /// Sandboxes per state (`bound`, `paused`, `warm`, ...) from the admin API.
    pub sandboxes: BTreeMap<String, u32>,
    /// CPU used by the sandboxes in each state over the last interval, in cores.
    pub sandbox_cpu: BTreeMap<String, f64>,
    /// The activator's CPU over the last interval, in cores.
    pub activator_cpu: Option<f64>,
    pub activator_rss_mb: Option<f64>,
}

/// A row of `GET /api/sandboxes` (only the fields the timeline needs).
#[derive(Debug, Clone, Deserialize)]
struct SandboxRow {
    state: String,
    #[serde(default)]
    pid: Option<u32>,
}

/// The background sampler; `stop` returns what it saw.
pub struct Monitor {
    stop: watch::Sender<bool>,
    task: JoinHandle<(Vec<Sample>, Option<String>)>,
}

impl Monitor {
    /// Starts sampling every `interval` until `stop`.
    pub fn start(
        admin: Option<Target>,
        activator_pid: Option<u32>,
        interval: Duration,
        gauges: Arc<Gauges>,
    ) -> Monitor {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut sampler = Sampler::new(admin, activator_pid, interval);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => sampler.sample(&gauges).await,
                    _ = stopped.changed() => break,
                }
            }
            sampler.sample(&gauges).await;
            (sampler.samples, sampler.admin_error)
        });
        Monitor { stop, task }
    }

    /// Stops sampling; returns the samples and the first admin API error, if any.
    pub async fn stop(self) -> (Vec<Sample>, Option<String>) {
        let _ = self.stop.send(true);
        self.task
            .await
            .unwrap_or_else(|e| (Vec::new(), Some(format!("monitor task failed: {e}"))))
    }
}

struct Sampler {
    start: Instant,
    last: Instant,
    admin: Option<HttpConn>,
    admin_error: Option<String>,
    activator_pid: Option<u32>,
    last_cpu: HashMap<u32, Duration>,
    samples: Vec<Sample>,
}

impl Sampler {
    fn new(admin: Option<Target>, activator_pid: Option<u32>, interval: Duration) -> Sampler {
        let now = Instant::now();
        Sampler {
            start: now,
            last: now,
            admin: admin.map(|t| HttpConn::new(&t, interval.max(Duration::from_secs(2)))),
            admin_error: None,
            activator_pid,
            last_cpu: HashMap::new(),
            samples: Vec::new(),
        }
    }

    /// CPU of `pid` since the previous sample, in cores (None on the first sight).
    fn cpu_since_last(&mut self, pid: u32, elapsed: f64) -> Option<f64> {
        let now = procstat::cpu_time(pid)?;
        let before = self.last_cpu.insert(pid, now)?;
        Some(now.saturating_sub(before).as_secs_f64() / elapsed.max(1e-3))
    }

    async fn sandboxes(&mut self) -> Vec<SandboxRow> {
        let Some(conn) = self.admin.as_mut() else {
            return Vec::new();
        };
        match fetch_sandboxes(conn).await {
            Ok(rows) => rows,
            Err(e) => {
                self.admin_error.get_or_insert_with(|| format!("{e:#}"));
                Vec::new()
            }
        }
    }

    async fn sample(&mut self, gauges: &Gauges) {
        let rows = self.sandboxes().await;
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut sandboxes = BTreeMap::new();
        let mut sandbox_cpu = BTreeMap::new();
        for row in rows {
            *sandboxes.entry(row.state.clone()).or_insert(0) += 1;
            if let Some(pid) = row.pid {
                let cpu = self.cpu_since_last(pid, elapsed).unwrap_or(0.0);
                *sandbox_cpu.entry(row.state).or_insert(0.0) += cpu;
            }
        }
        let activator_cpu = self
            .activator_pid
            .and_then(|p| self.cpu_since_last(p, elapsed));
        let activator_rss_mb = self
            .activator_pid
            .and_then(procstat::rss_bytes)
            .map(|b| b as f64 / 1_048_576.0);
        self.samples.push(Sample {
            t: now.duration_since(self.start).as_secs_f64(),
            label: gauges.label.lock().expect("label lock").clone(),
            sessions_active: gauges.active.load(Ordering::Relaxed),
            sessions_thinking: gauges.thinking.load(Ordering::Relaxed),
            sessions_idle: gauges.idle.load(Ordering::Relaxed),
            sandboxes,
            sandbox_cpu,
            activator_cpu,
            activator_rss_mb,
        });
    }
}

/// `GET /api/sandboxes`: a JSON array of rows, or an object holding one under `sandboxes`.
async fn fetch_sandboxes(conn: &mut HttpConn) -> Result<Vec<SandboxRow>> {
    let reply = conn.get_ok("/api/sandboxes", None).await?;
    parse_sandboxes(&reply.body)
}

fn parse_sandboxes(body: &[u8]) -> Result<Vec<SandboxRow>> {
    let value: serde_json::Value = serde_json::from_slice(body)?;
    let list = match value {
        serde_json::Value::Object(mut m) => m
            .remove("sandboxes")
            .unwrap_or(serde_json::Value::Array(Vec::new())),
        other => other,
    };
    Ok(serde_json::from_value(list)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_admin_shapes() {
        let a = br#"[{"id":"s1","state":"paused","pid":12,"sessions":["ab"]},{"id":"s2","state":"warm","pid":null}]"#;
        let rows = parse_sandboxes(a).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].state, "paused");
        assert_eq!(rows[0].pid, Some(12));
        let b = br#"{"sandboxes":[{"id":"s1","state":"bound"}],"count":1}"#;
        assert_eq!(parse_sandboxes(b).unwrap()[0].state, "bound");
        assert!(parse_sandboxes(b"not json").is_err());
    }
}
