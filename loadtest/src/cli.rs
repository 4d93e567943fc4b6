//! Command-line flags; each one overrides the matching key of the scenario file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::scenario::{Phase, Scenario};
use crate::target::Target;

#[derive(Parser, Debug)]
#[command(
    name = "activator-loadtest",
    version,
    about = "Load and correctness harness for agent-activator (loopback targets only)"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every mode takes.
#[derive(Args, Debug)]
pub struct Common {
    /// Scenario file (YAML); flags override its keys.
    #[arg(long, global = true)]
    pub scenario: Option<PathBuf>,
    /// `name=http://127.0.0.1:PORT` (repeatable); the first is the baseline for ratios.
    #[arg(long = "target", global = true, value_name = "NAME=URL")]
    pub targets: Vec<String>,
    /// Activator admin URL, polled for sandbox states and PIDs.
    #[arg(long, global = true, value_name = "URL")]
    pub admin: Option<String>,
    /// The activator's PID: its CPU is charged to the target named `activator`.
    #[arg(long, global = true)]
    pub activator_pid: Option<u32>,
    /// Processes whose CPU is charged to a target: `nginx=123,124` (repeatable).
    #[arg(long = "pid", global = true, value_name = "NAME=PID[,PID]")]
    pub pids: Vec<String>,
    /// Write the JSON report here.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Write the self-contained HTML report here.
    #[arg(long, global = true)]
    pub html: Option<PathBuf>,
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Errors tolerated before the run fails (correctness violations never are).
    #[arg(long, global = true)]
    pub max_errors: Option<u64>,
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub sample_interval: Option<Duration>,
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Load generator threads (keep it small: it shares the cores with the targets).
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Established sessions, small keep-alive GETs: throughput and latency.
    Hot(HotArgs),
    /// Agent-shaped sessions: turns, think time, SSE, WebSocket, idle and return.
    Agents(AgentsArgs),
    /// Many new sessions at once against a smaller warm pool.
    Storm(StormArgs),
}

#[derive(Args, Debug)]
pub struct HotArgs {
    #[arg(long)]
    pub sessions: Option<usize>,
    #[arg(long)]
    pub connections: Option<usize>,
    /// Measured time per target per phase (split over the rounds).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long)]
    pub rounds: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// Phases to run, e.g. `closed,open`.
    #[arg(long, value_delimiter = ',')]
    pub phases: Option<Vec<Phase>>,
    /// Open-loop rate in requests per second (default: a fraction of the lowest
    /// closed-loop throughput).
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long)]
    pub rate_fraction: Option<f64>,
    #[arg(long)]
    pub max_requests: Option<u64>,
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long)]
    pub verify_sessions: Option<usize>,
}

#[derive(Args, Debug)]
pub struct AgentsArgs {
    #[arg(long)]
    pub sessions: Option<usize>,
    #[arg(long)]
    pub arrival_rate: Option<f64>,
    #[arg(long)]
    pub turns: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_time: Option<Duration>,
    #[arg(long)]
    pub idle_fraction: Option<f64>,
    /// Do not require one sandbox per session (for a direct target).
    #[arg(long)]
    pub shared: bool,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct StormArgs {
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Do not require one sandbox per session (for a direct target).
    #[arg(long)]
    pub shared: bool,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

/// Which mode runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Hot,
    Agents,
    Storm,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Hot => "hot",
            Mode::Agents => "agents",
            Mode::Storm => "storm",
        }
    }
}

/// Everything a run needs, resolved and validated.
pub struct Plan {
    pub mode: Mode,
    pub scenario: Scenario,
    pub targets: Vec<Target>,
    pub admin: Option<Target>,
    pub pids: BTreeMap<String, Vec<u32>>,
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

impl Cli {
    /// Reads the scenario, applies the flags, checks targets and bounds.
    pub fn plan(&self) -> Result<Plan> {
        let c = &self.common;
        let mut s = match &c.scenario {
            Some(p) => Scenario::load(p)?,
            None => Scenario::default(),
        };
        if !c.targets.is_empty() {
            s.targets = c.targets.clone();
        }
        if c.admin.is_some() {
            s.admin = c.admin.clone();
        }
        if c.activator_pid.is_some() {
            s.activator_pid = c.activator_pid;
        }
        set(&mut s.request_timeout, c.request_timeout);
        set(&mut s.max_errors, c.max_errors);
        set(&mut s.sample_interval, c.sample_interval);
        set(&mut s.seed, c.seed);
        let mode = match &self.command {
            Command::Hot(a) => {
                let h = &mut s.hot;
                set(&mut h.sessions, a.sessions);
                set(&mut h.connections, a.connections);
                set(&mut h.duration, a.duration);
                set(&mut h.rounds, a.rounds);
                set(&mut h.warmup, a.warmup);
                set(&mut h.phases, a.phases.clone());
                if a.rate.is_some() {
                    h.rate = a.rate;
                }
                set(&mut h.rate_fraction, a.rate_fraction);
                set(&mut h.max_requests, a.max_requests);
                set(&mut h.path, a.path.clone());
                set(&mut h.verify_sessions, a.verify_sessions);
                Mode::Hot
            }
            Command::Agents(a) => {
                let g = &mut s.agents;
                set(&mut g.sessions, a.sessions);
                set(&mut g.arrival_rate, a.arrival_rate);
                set(&mut g.turns, a.turns);
                set(&mut g.idle_time, a.idle_time);
                set(&mut g.idle_fraction, a.idle_fraction);
                set(&mut g.duration, a.duration);
                if a.shared {
                    g.exclusive = false;
                }
                Mode::Agents
            }
            Command::Storm(a) => {
                set(&mut s.storm.sessions, a.sessions);
                set(&mut s.storm.duration, a.duration);
                if a.shared {
                    s.storm.exclusive = false;
                }
                Mode::Storm
            }
        };
        s.validate()?;
        if s.targets.is_empty() {
            bail!(
                "no target: pass --target NAME=http://127.0.0.1:PORT (or `targets:` in the scenario)"
            );
        }
        let targets = s
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| Target::parse(t, i))
            .collect::<Result<Vec<_>>>()?;
        let mut names = std::collections::HashSet::new();
        for t in &targets {
            if !names.insert(t.name.clone()) {
                bail!("target name {:?} is used twice", t.name);
            }
        }
        let admin = match &s.admin {
            Some(url) => Some(Target::parse(&format!("admin={url}"), 0).context("--admin")?),
            None => None,
        };
        let mut pids = BTreeMap::new();
        for spec in &c.pids {
            let (name, list) = spec
                .split_once('=')
                .with_context(|| format!("--pid {spec:?}: expected NAME=PID[,PID]"))?;
            let list = list
                .split(',')
                .map(|p| p.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("--pid {spec:?}: PIDs must be numbers"))?;
            pids.entry(name.to_string())
                .or_insert_with(Vec::new)
                .extend(list);
        }
        if let Some(pid) = s.activator_pid {
            pids.entry("activator".to_string()).or_default().push(pid);
        }
        Ok(Plan {
            mode,
            scenario: s,
            targets,
            admin,
            pids,
            json: c.json.clone(),
            html: c.html.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan> {
        let mut argv = vec!["activator-loadtest"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.plan()
    }

    #[test]
    fn flags_override_the_scenario() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let file = dir.join("hot-quick.yaml");
        let p = plan(&[
            "hot",
            "--scenario",
            file.to_str().unwrap(),
            "--sessions",
            "7",
            "--phases",
            "open",
            "--target",
            "a=http://127.0.0.1:1",
            "--pid",
            "a=1,2",
            "--activator-pid",
            "9",
        ])
        .unwrap();
        assert_eq!(p.mode, Mode::Hot);
        assert_eq!(p.scenario.hot.sessions, 7);
        assert_eq!(p.scenario.hot.phases, vec![Phase::Open]);
        assert_eq!(p.targets.len(), 1);
        assert_eq!(p.pids["a"], vec![1, 2]);
        assert_eq!(p.pids["activator"], vec![9]);
    }

    #[test]
    fn refuses_non_loopback_and_missing_targets() {
        let e = plan(&["hot", "--target", "x=http://10.0.0.1:80"])
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("not a loopback address"), "{e:#}");
        let e = plan(&["storm"]).err().unwrap();
        assert!(format!("{e:#}").contains("no target"), "{e:#}");
        let e = plan(&[
            "hot",
            "--target",
            "x=http://127.0.0.1:1",
            "--admin",
            "http://1.2.3.4:9",
        ])
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("loopback"), "{e:#}");
    }
}
