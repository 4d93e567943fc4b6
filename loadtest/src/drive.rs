//! The two load loops: closed loop (send, wait, repeat: maximum throughput) and open loop
//! (a constant intended rate, latency from the intended send time), and their tallies.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::latency::{Latencies, OpenLoopSchedule, open_loop_latency};

/// What one request came to.
#[derive(Debug)]
pub enum Outcome {
    /// A correct 2xx answer.
    Ok,
    /// Transport failure, timeout or non-2xx status.
    Error(String),
    /// Answered, but wrongly (another sandbox, lost state): see `probe::Violation`.
    Violation(String),
}

/// One kind of request a load loop repeats (a worker's connection and its sessions).
pub trait LoadRequest {
    /// Sends the next request and reads the whole answer.
    fn fire(&mut self) -> impl Future<Output = Outcome> + Send;
}

/// Counts and latencies of one worker or one segment.
#[derive(Clone, Default)]
pub struct Tally {
    pub latencies: Latencies,
    pub ok: u64,
    pub errors: u64,
    pub violations: u64,
    /// The first few distinct problems, for the report.
    pub samples: Vec<String>,
}

/// Most problem messages kept per tally.
const MAX_SAMPLES: usize = 5;

impl Tally {
    /// Counts `outcome`; its latency is recorded whatever it was (errors take time too).
    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        self.latencies.record(latency);
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Error(e) => {
                self.errors += 1;
                self.note(e);
            }
            Outcome::Violation(v) => {
                self.violations += 1;
                self.note(v);
            }
        }
    }

    fn note(&mut self, msg: String) {
        if self.samples.len() < MAX_SAMPLES && !self.samples.contains(&msg) {
            self.samples.push(msg);
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        self.latencies.merge(&other.latencies);
        self.ok += other.ok;
        self.errors += other.errors;
        self.violations += other.violations;
        for s in &other.samples {
            self.note(s.clone());
        }
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.errors + self.violations
    }
}

/// Takes one unit from a shared request budget; false once it is spent.
pub fn take_budget(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
        .is_ok()
}

/// Closed loop: send, wait for the answer, send again, until `end` or the budget is spent.
/// Latency is from send to complete response.
pub async fn closed_loop<R: LoadRequest>(end: Instant, budget: &AtomicU64, req: &mut R) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < end && take_budget(budget) {
        let t0 = Instant::now();
        let outcome = req.fire().await;
        tally.record(outcome, t0.elapsed());
    }
    tally
}

/// Open loop: request `i` (shared counter `next` over all workers) is intended at
/// `schedule.intended(i)`; stops at `end` or after `cap` requests in all.
///
/// When the worker is free before the intended time it sleeps until then and measures
/// from the moment it actually sends (the timer's own lateness is the harness's, not the
/// target's). When it is still busy at the intended time, the target is behind: latency is
/// measured from the intended time, so queueing is charged to every request that waited.
pub async fn open_loop<R: LoadRequest>(
    schedule: OpenLoopSchedule,
    next: &AtomicU64,
    cap: u64,
    end: Instant,
    req: &mut R,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let intended = schedule.intended(i);
        if i >= cap || intended >= end {
            break;
        }
        let from = if Instant::now() < intended {
            tokio::time::sleep_until(intended).await;
            Instant::now()
        } else {
            intended
        };
        let outcome = req.fire().await;
        tally.record(outcome, open_loop_latency(from, Instant::now()));
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after `slow` for request number `stall`, after `fast` otherwise; fails
    /// request number `fail`.
    struct Scripted {
        sent: u32,
        stall: u32,
        fail: u32,
        slow: Duration,
        fast: Duration,
    }

    impl Scripted {
        fn new(stall: u32, fail: u32, fast_ms: u64) -> Scripted {
            Scripted {
                sent: 0,
                stall,
                fail,
                slow: Duration::from_millis(1000),
                fast: Duration::from_millis(fast_ms),
            }
        }
    }

    impl LoadRequest for Scripted {
        async fn fire(&mut self) -> Outcome {
            let n = self.sent;
            self.sent += 1;
            let d = if n == self.stall {
                self.slow
            } else {
                self.fast
            };
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            if n == self.fail {
                Outcome::Error("boom".into())
            } else {
                Outcome::Ok
            }
        }
    }

    /// One connection at 100 req/s; request 10 stalls for 1 s. Every request intended during
    /// the stall must carry the wait (about 100 of 300 samples), not just the one that hit it.
    #[tokio::test(start_paused = true)]
    async fn open_loop_charges_the_stall_to_every_waiting_request() {
        let start = Instant::now();
        let schedule = OpenLoopSchedule::new(start, 100.0);
        let next = AtomicU64::new(0);
        let mut req = Scripted::new(10, u32::MAX, 1);
        let end = start + Duration::from_secs(3);
        let tally = open_loop(schedule, &next, 300, end, &mut req).await;
        assert_eq!(tally.ok, 300);
        let s = tally.latencies.summary();
        assert!(s.max_us >= 1_000_000, "{s:?}");
        // Intended at 110..1100 ms, sent late: latencies 990 ms down to ~10 ms.
        assert!(s.p90_us >= 100_000, "p90 must show the queueing: {s:?}");
        assert!(
            s.p50_us < 5_000,
            "the backlog drains and p50 stays small: {s:?}"
        );
    }

    /// The same stall in a closed loop shows up once: that is why `hot` reports both.
    #[tokio::test(start_paused = true)]
    async fn closed_loop_sees_the_stall_once_and_respects_the_budget() {
        let budget = AtomicU64::new(300);
        let end = Instant::now() + Duration::from_secs(60);
        let mut req = Scripted::new(10, 20, 1);
        let tally = closed_loop(end, &budget, &mut req).await;
        assert_eq!(tally.requests(), 300, "stops at the request cap");
        assert_eq!(tally.errors, 1);
        assert_eq!(tally.samples, vec!["boom".to_string()]);
        let s = tally.latencies.summary();
        assert!(s.max_us >= 1_000_000);
        assert!(s.p99_us < 5_000, "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn loops_stop_at_the_deadline() {
        let start = Instant::now();
        let end = start + Duration::from_millis(500);
        let next = AtomicU64::new(0);
        let mut instant = Scripted::new(u32::MAX, u32::MAX, 0);
        let schedule = OpenLoopSchedule::new(start, 1000.0);
        let tally = open_loop(schedule, &next, u64::MAX, end, &mut instant).await;
        assert_eq!(tally.ok, 500);
        let budget = AtomicU64::new(u64::MAX);
        let mut ten_ms = Scripted::new(u32::MAX, u32::MAX, 10);
        let end = Instant::now() + Duration::from_millis(500);
        let tally = closed_loop(end, &budget, &mut ten_ms).await;
        assert_eq!(tally.ok, 50);
    }
}
