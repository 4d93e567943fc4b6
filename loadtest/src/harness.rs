//! What every mode shares while it runs: the scenario, the targets, the progress bar,
//! the timeline gauges, and the processes whose CPU is charged to each target.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

use crate::monitor::Gauges;
use crate::procstat;
use crate::scenario::Scenario;
use crate::target::Target;

/// The shared state of one invocation.
pub struct Harness {
    pub scenario: Scenario,
    pub targets: Vec<Target>,
    pub gauges: Arc<Gauges>,
    pub bar: ProgressBar,
    /// Processes whose CPU is charged to a target, by target name.
    pub pids: BTreeMap<String, Vec<u32>>,
    /// Distinguishes this run's session IDs from earlier runs' (sandboxes remember them).
    pub run_id: String,
}

impl Harness {
    pub fn new(
        scenario: Scenario,
        targets: Vec<Target>,
        pids: BTreeMap<String, Vec<u32>>,
    ) -> Harness {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .expect("static progress template is valid"),
        );
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
                ^ u64::from(std::process::id())
        );
        Harness {
            scenario,
            targets,
            gauges: Arc::new(Gauges::default()),
            bar,
            pids,
            run_id,
        }
    }

    /// Says what runs now, on the progress bar and in the timeline.
    pub fn status(&self, msg: String) {
        self.gauges.set_label(msg.clone());
        self.bar.set_message(msg);
    }

    /// Starts a CPU measurement of `target`'s processes (if any are known).
    pub fn cpu_meter(&self, target: &str) -> CpuMeter {
        let pids = self.pids.get(target).cloned().unwrap_or_default();
        let start = procstat::cpu_time_sum(&pids);
        CpuMeter {
            pids,
            start,
            wall: Instant::now(),
        }
    }
}

/// CPU used by a set of processes since the meter started.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Duration,
    wall: Instant,
}

impl CpuMeter {
    /// CPU seconds used so far, or `None` when no process is known.
    pub fn cpu_seconds(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        Some(
            procstat::cpu_time_sum(&self.pids)
                .saturating_sub(self.start)
                .as_secs_f64(),
        )
    }

    /// Wall seconds since the meter started.
    pub fn wall_seconds(&self) -> f64 {
        self.wall.elapsed().as_secs_f64()
    }
}

/// A small deterministic PRNG (SplitMix64) for think times and turn kinds, so a scenario
/// with a seed replays the same choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi].
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + (hi.saturating_sub(lo)).mul_f64(self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let lo = Duration::from_millis(100);
        let hi = Duration::from_millis(200);
        for _ in 0..1000 {
            let x = a.between(lo, hi);
            assert_eq!(x, b.between(lo, hi));
            assert!(x >= lo && x <= hi);
        }
    }
}
