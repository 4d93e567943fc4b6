//! `activator-loadtest`: load and correctness harness for agent-activator, side by side
//! with the direct path and other proxies.
//!
//! # Layout
//!
//! - [`cli`]: flags, and how they override a scenario file.
//! - [`scenario`]: the YAML scenario (`loadtest/scenarios/*.yaml`).
//! - [`target`]: `name=URL` targets and the loopback-only rule.
//! - [`conn`]: one keep-alive hyper connection.
//! - [`drive`]: closed-loop and open-loop request loops and their tallies.
//! - [`latency`]: HdrHistogram and the open-loop schedule (no coordinated omission).
//! - [`probe`]: the demo sandbox's self-report and the correctness checks.
//! - [`hot`], [`agents`], [`storm`]: the three modes.
//! - [`monitor`], [`procstat`]: sandbox states, CPU and memory over time.
//! - [`report`], [`html`]: JSON and the self-contained HTML report.

mod agents;
mod cli;
mod conn;
mod drive;
mod harness;
mod hot;
mod html;
mod latency;
mod monitor;
mod probe;
mod procstat;
mod report;
mod scenario;
mod storm;
mod target;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Cli, Mode};
use crate::harness::Harness;
use crate::monitor::Monitor;
use crate::report::{Machine, Report};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("activator-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("activator-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one mode; `Ok(false)` when a check failed.
async fn run(cli: Cli) -> Result<bool> {
    let plan = cli.plan()?;
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let scenario = plan.scenario.clone();
    let machine = Machine::detect();
    let harness = Harness::new(plan.scenario, plan.targets, plan.pids);
    let monitor = Monitor::start(
        plan.admin,
        scenario.activator_pid,
        scenario.sample_interval,
        harness.gauges.clone(),
    );
    let result = match plan.mode {
        Mode::Hot => hot::run(&harness).await,
        Mode::Agents => agents::run(&harness).await,
        Mode::Storm => storm::run(&harness).await,
    };
    harness.bar.finish_and_clear();
    let (timeline, admin_error) = monitor.stop().await;
    let targets = result?;
    let activator_peak_rss_mb = timeline
        .iter()
        .filter_map(|s| s.activator_rss_mb)
        .reduce(f64::max);
    let mut report = Report {
        mode: plan.mode.name().to_string(),
        started_unix,
        machine,
        scenario: scenario.clone(),
        targets,
        timeline,
        admin_error,
        activator_peak_rss_mb,
        passed: false,
        failures: Vec::new(),
    };
    report.compute_ratios();
    report.judge(scenario.max_errors);
    print!("{}", report.text_table());
    if let Some(path) = &plan.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &plan.html {
        std::fs::write(path, html::render(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.passed)
}
