//! The run's results: per target, per measured section; ratios to the first target; the
//! JSON written by `--json` (the HTML report renders the same structure).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::drive::Tally;
use crate::latency::LatencySummary;
use crate::monitor::Sample;
use crate::scenario::Scenario;

/// Everything one invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    pub machine: Machine,
    pub scenario: Scenario,
    pub targets: Vec<TargetReport>,
    pub timeline: Vec<Sample>,
    /// First failure of the admin API poll, if any.
    pub admin_error: Option<String>,
    /// Highest resident memory of the activator seen by the sampler (`--activator-pid`).
    pub activator_peak_rss_mb: Option<f64>,
    /// True when every check held and errors stayed within `max_errors`.
    pub passed: bool,
    pub failures: Vec<String>,
}

/// Where the figures came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    /// `/proc/loadavg` when the run started: other work on the machine skews every figure.
    pub load_average: String,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }
}

/// One target's sections.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub url: String,
    pub sections: Vec<Section>,
}

impl TargetReport {
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }
}

/// One measured thing (a load phase, or one kind of latency in `agents`/`storm`).
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub name: String,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub violations: u64,
    /// The first few distinct errors or violations.
    pub problems: Vec<String>,
    /// Measured wall time.
    pub seconds: f64,
    /// Correct answers per second of `seconds`.
    pub throughput_rps: f64,
    /// Intended rate of an open-loop phase.
    pub rate: Option<f64>,
    pub latency: LatencySummary,
    /// (percentile, microseconds) for the percentile plot.
    pub curve: Vec<(f64, u64)>,
    /// CPU used by the target's processes while this section ran (when pids are known).
    pub cpu_seconds: Option<f64>,
    pub requests_per_cpu_second: Option<f64>,
    /// Ratios to the same section of the first target.
    pub vs_baseline: Option<Ratios>,
    /// Mode-specific counts (activation kinds, resumed sessions, ...).
    pub counts: BTreeMap<String, u64>,
}

impl Section {
    /// A section from a tally over `seconds` of wall time.
    pub fn from_tally(name: &str, tally: &Tally, seconds: f64) -> Section {
        Section {
            name: name.to_string(),
            requests: tally.requests(),
            ok: tally.ok,
            errors: tally.errors,
            violations: tally.violations,
            problems: tally.samples.clone(),
            seconds,
            throughput_rps: if seconds > 0.0 {
                tally.ok as f64 / seconds
            } else {
                0.0
            },
            rate: None,
            latency: tally.latencies.summary(),
            curve: tally.latencies.percentile_curve(),
            cpu_seconds: None,
            requests_per_cpu_second: None,
            vs_baseline: None,
            counts: BTreeMap::new(),
        }
    }

    /// Sets the CPU the target spent on this section.
    pub fn with_cpu(mut self, cpu_seconds: Option<f64>) -> Section {
        self.cpu_seconds = cpu_seconds;
        self.requests_per_cpu_second = cpu_seconds
            .filter(|c| *c > 0.0)
            .map(|c| self.requests as f64 / c);
        self
    }
}

/// A section's figures divided by the baseline's (1.0 = same).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratios {
    pub throughput: f64,
    pub p50: f64,
    pub p99: f64,
    /// p99 minus the baseline's p99, in microseconds (latency the hop adds).
    pub added_p99_us: i64,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl Report {
    /// Fills `vs_baseline` of every section from the first target's section of that name.
    pub fn compute_ratios(&mut self) {
        let Some(base) = self.targets.first().cloned() else {
            return;
        };
        for t in &mut self.targets {
            for s in &mut t.sections {
                if let Some(b) = base.section(&s.name) {
                    s.vs_baseline = Some(Ratios {
                        throughput: ratio(s.throughput_rps, b.throughput_rps),
                        p50: ratio(s.latency.p50_us as f64, b.latency.p50_us as f64),
                        p99: ratio(s.latency.p99_us as f64, b.latency.p99_us as f64),
                        added_p99_us: s.latency.p99_us as i64 - b.latency.p99_us as i64,
                    });
                }
            }
        }
    }

    /// Collects every failed check; `passed` is true when there is none.
    pub fn judge(&mut self, max_errors: u64) {
        for t in &self.targets {
            let errors: u64 = t.sections.iter().map(|s| s.errors).sum();
            let violations: u64 = t.sections.iter().map(|s| s.violations).sum();
            let first = t
                .sections
                .iter()
                .flat_map(|s| s.problems.iter())
                .next()
                .cloned()
                .unwrap_or_default();
            if violations > 0 {
                self.failures.push(format!(
                    "{}: {violations} correctness violations (e.g. {first})",
                    t.name
                ));
            }
            if errors > max_errors {
                self.failures.push(format!(
                    "{}: {errors} errors (allowed {max_errors}; e.g. {first})",
                    t.name
                ));
            }
        }
        self.passed = self.failures.is_empty();
    }

    /// One row per target and section, cells in [`COLUMNS`] order (text and HTML tables).
    pub fn rows(&self) -> Vec<Vec<String>> {
        let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
        let mut rows = Vec::new();
        for t in &self.targets {
            for s in &t.sections {
                let (xt, xp) = s.vs_baseline.map_or(("-".into(), "-".into()), |r| {
                    (format!("{:.2}", r.throughput), format!("{:.2}", r.p99))
                });
                rows.push(vec![
                    t.name.clone(),
                    s.name.clone(),
                    s.requests.to_string(),
                    format!("{:.0}", s.throughput_rps),
                    ms(s.latency.p50_us),
                    ms(s.latency.p90_us),
                    ms(s.latency.p99_us),
                    ms(s.latency.p999_us),
                    ms(s.latency.max_us),
                    s.requests_per_cpu_second
                        .map_or("-".into(), |r| format!("{r:.0}")),
                    xt,
                    xp,
                    s.errors.to_string(),
                    s.violations.to_string(),
                ]);
            }
        }
        rows
    }

    /// A plain-text table for the terminal.
    pub fn text_table(&self) -> String {
        let widths = [10, 12, 9, 9, 8, 8, 8, 9, 9, 10, 7, 7, 6, 6];
        let line = |cells: &[String]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                if i < 2 {
                    l.push_str(&format!("{c:<w$} "));
                } else {
                    l.push_str(&format!("{c:>w$} "));
                }
            }
            l.trim_end().to_string() + "\n"
        };
        let header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
        let mut out = line(&header);
        for row in self.rows() {
            out.push_str(&line(&row));
        }
        out.push_str(&format!(
            "load average at start: {}\n",
            self.machine.load_average
        ));
        if let Some(mb) = self.activator_peak_rss_mb {
            out.push_str(&format!("activator peak RSS: {mb:.1} MB\n"));
        }
        for f in &self.failures {
            out.push_str(&format!("FAILED: {f}\n"));
        }
        out
    }
}

/// Column names of [`Report::rows`].
pub const COLUMNS: [&str; 14] = [
    "target",
    "section",
    "requests",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "req/cpu-s",
    "x tput",
    "x p99",
    "errors",
    "violations",
];
