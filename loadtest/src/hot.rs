//! `hot`: N established sessions, small keep-alive GETs; closed-loop maximum throughput and
//! open-loop latency at a constant rate, targets interleaved in rounds.
//!
//! Every response is checked: the demo sandbox echoes its pid and the session header it
//! received, which must match the process the session was pinned to when established.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http::Method;
use tokio::time::Instant;

use crate::conn::{HttpConn, ensure_success};
use crate::drive::{LoadRequest, Outcome, Tally, closed_loop, open_loop};
use crate::harness::Harness;
use crate::latency::OpenLoopSchedule;
use crate::probe::{self, EchoReply, SandboxState};
use crate::report::{Section, TargetReport};
use crate::scenario::Phase;
use crate::target::Target;

/// One worker: its connection and the sessions it cycles through.
struct HotWorker {
    conn: HttpConn,
    path: String,
    sessions: Arc<Vec<String>>,
    pins: Arc<Vec<String>>,
    /// Indexes into `sessions` this worker owns.
    mine: Vec<usize>,
    next: usize,
}

impl LoadRequest for HotWorker {
    async fn fire(&mut self) -> Outcome {
        let idx = self.mine[self.next % self.mine.len()];
        self.next += 1;
        let session = &self.sessions[idx];
        let reply = match self
            .conn
            .send(Method::GET, &self.path, Some(session), Bytes::new())
            .await
        {
            Ok(r) => r,
            Err(e) => return Outcome::Error(format!("{e:#}")),
        };
        if let Err(e) = ensure_success(&reply, &self.path) {
            return Outcome::Error(format!("{e:#}"));
        }
        match probe::parse::<EchoReply>(&reply.body, "hot reply") {
            Ok(echo) => match probe::check_echo(session, &echo, &self.pins[idx]) {
                Ok(()) => Outcome::Ok,
                Err(v) => Outcome::Violation(v.to_string()),
            },
            Err(e) => Outcome::Error(format!("{e:#}")),
        }
    }
}

/// Per-target state kept across rounds.
struct TargetRun {
    target: Target,
    pins: Arc<Vec<String>>,
    workers: Vec<HotWorker>,
    sections: Vec<Section>,
}

/// Runs `hot` against every target; returns one report per target.
pub async fn run(h: &Harness) -> Result<Vec<TargetReport>> {
    let sc = &h.scenario.hot;
    let sessions: Arc<Vec<String>> = Arc::new(
        (0..sc.sessions)
            .map(|i| format!("hot-{}-{i}", h.run_id))
            .collect(),
    );
    let segments = sc.phases.len() as u64 * u64::from(sc.rounds) * h.targets.len() as u64;
    h.bar.set_length(segments + 2 * h.targets.len() as u64);

    let mut runs = Vec::new();
    for target in &h.targets {
        h.status(format!("hot establish {}", target.name));
        let (pins, establish) = establish(h, target, &sessions).await;
        h.bar.inc(1);
        let pins = Arc::new(pins);
        let workers = (0..sc.connections)
            .map(|w| HotWorker {
                conn: HttpConn::new(target, h.scenario.request_timeout),
                path: sc.path.clone(),
                sessions: sessions.clone(),
                pins: pins.clone(),
                mine: (0..sc.sessions.max(sc.connections))
                    .skip(w)
                    .step_by(sc.connections)
                    .map(|i| i % sc.sessions)
                    .collect(),
                next: 0,
            })
            .collect();
        runs.push(TargetRun {
            target: target.clone(),
            pins,
            workers,
            sections: vec![establish],
        });
    }
    if !sc.warmup.is_zero() {
        for run in &mut runs {
            h.status(format!("hot warmup {}", run.target.name));
            let budget = Arc::new(AtomicU64::new(sc.max_requests));
            segment(run, Phase::Closed, sc.warmup, budget, None).await;
        }
    }

    // Every established session counts as active in the timeline while `hot` runs.
    h.gauges
        .active
        .store(sessions.len() as i64, Ordering::Relaxed);
    let mut closed_rates = Vec::new();
    for phase in &sc.phases {
        let rate = match phase {
            Phase::Closed => None,
            Phase::Open => Some(sc.rate.unwrap_or_else(|| {
                let lowest = closed_rates.iter().copied().fold(f64::INFINITY, f64::min);
                if lowest.is_finite() {
                    (lowest * sc.rate_fraction).max(1.0)
                } else {
                    1000.0
                }
            })),
        };
        let per_round = sc.duration / sc.rounds;
        let cap_per_round = (sc.max_requests / u64::from(sc.rounds)).max(1);
        let mut tallies: Vec<(Tally, f64, Option<f64>)> =
            runs.iter().map(|_| (Tally::default(), 0.0, None)).collect();
        for round in 0..sc.rounds as usize {
            // Rotate the starting target so none is always first after a pause.
            for k in 0..runs.len() {
                let i = (round + k) % runs.len();
                let run = &mut runs[i];
                h.status(format!(
                    "hot {phase:?} round {}/{} {}",
                    round + 1,
                    sc.rounds,
                    run.target.name
                ));
                let cpu = h.cpu_meter(&run.target.name);
                let budget = Arc::new(AtomicU64::new(cap_per_round));
                let tally = segment(run, *phase, per_round, budget, rate).await;
                let (total, wall, cpu_sum) = &mut tallies[i];
                total.merge(&tally);
                *wall += cpu.wall_seconds();
                if let Some(c) = cpu.cpu_seconds() {
                    *cpu_sum = Some(cpu_sum.unwrap_or(0.0) + c);
                }
                h.bar.inc(1);
            }
        }
        let name = match phase {
            Phase::Closed => "closed",
            Phase::Open => "open",
        };
        for (run, (tally, wall, cpu)) in runs.iter_mut().zip(tallies) {
            let mut section = Section::from_tally(name, &tally, wall).with_cpu(cpu);
            section.rate = rate;
            if *phase == Phase::Closed {
                closed_rates.push(section.throughput_rps);
            }
            run.sections.push(section);
        }
    }

    let mut reports = Vec::new();
    for run in runs {
        h.status(format!("hot verify {}", run.target.name));
        let verify = verify(h, &run.target, &sessions, &run.pins).await;
        h.bar.inc(1);
        let mut sections = run.sections;
        sections.push(verify);
        reports.push(TargetReport {
            name: run.target.name.clone(),
            url: run.target.url.clone(),
            sections,
        });
    }
    Ok(reports)
}

/// Runs every worker of `run` for `length` in `phase`; workers come back for the next round.
async fn segment(
    run: &mut TargetRun,
    phase: Phase,
    length: Duration,
    budget: Arc<AtomicU64>,
    rate: Option<f64>,
) -> Tally {
    let start = Instant::now();
    let end = start + length;
    let schedule = OpenLoopSchedule::new(start, rate.unwrap_or(1.0));
    let next = Arc::new(AtomicU64::new(0));
    let cap = budget.load(Ordering::Relaxed);
    let tasks: Vec<_> = run
        .workers
        .drain(..)
        .map(|mut w| {
            let (budget, next) = (budget.clone(), next.clone());
            tokio::spawn(async move {
                let tally = match phase {
                    Phase::Closed => closed_loop(end, &budget, &mut w).await,
                    Phase::Open => open_loop(schedule, &next, cap, end, &mut w).await,
                };
                (w, tally)
            })
        })
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok((w, tally)) => {
                total.merge(&tally);
                run.workers.push(w);
            }
            Err(e) => total.record(
                Outcome::Error(format!("load worker failed: {e}")),
                Duration::ZERO,
            ),
        }
    }
    total
}

/// First request of every session through `target`: pins each session to the instance that
/// answered. Runs `connections` at a time.
async fn establish(
    h: &Harness,
    target: &Target,
    sessions: &Arc<Vec<String>>,
) -> (Vec<String>, Section) {
    let sc = &h.scenario.hot;
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let workers = (0..sc.connections.min(sessions.len())).map(|_| {
        let next = &next;
        let mut conn = HttpConn::new(target, h.scenario.request_timeout);
        async move {
            let mut tally = Tally::default();
            let mut pins = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(session) = sessions.get(i) else {
                    break;
                };
                let t0 = Instant::now();
                let result = conn
                    .get_ok(&sc.path, Some(session))
                    .await
                    .and_then(|r| probe::parse::<EchoReply>(&r.body, "hot reply"));
                match result {
                    Ok(echo) => {
                        pins.push((i, echo.instance));
                        tally.record(Outcome::Ok, t0.elapsed());
                    }
                    Err(e) => tally.record(Outcome::Error(format!("{e:#}")), t0.elapsed()),
                }
            }
            (tally, pins)
        }
    });
    let results = futures_util::future::join_all(workers).await;
    let mut pins = vec![String::new(); sessions.len()];
    let mut tally = Tally::default();
    for (t, p) in results {
        tally.merge(&t);
        for (i, instance) in p {
            pins[i] = instance;
        }
    }
    let section = Section::from_tally("establish", &tally, start.elapsed().as_secs_f64());
    (pins, section)
}

/// `GET /state` for the first `verify_sessions` sessions: each must still be on its pinned
/// process, and that process must have seen the session header.
async fn verify(h: &Harness, target: &Target, sessions: &[String], pins: &[String]) -> Section {
    let mut conn = HttpConn::new(target, h.scenario.request_timeout);
    let mut tally = Tally::default();
    let start = Instant::now();
    for (session, pin) in sessions
        .iter()
        .zip(pins)
        .take(h.scenario.hot.verify_sessions)
    {
        let t0 = Instant::now();
        let outcome = match conn
            .get_ok("/state", Some(session))
            .await
            .and_then(|r| probe::parse::<SandboxState>(&r.body, "/state"))
        {
            Ok(state) => {
                match probe::check_state(session, &state, Some(pin.as_str()), false).first() {
                    None => Outcome::Ok,
                    Some(v) => Outcome::Violation(v.to_string()),
                }
            }
            Err(e) => Outcome::Error(format!("{e:#}")),
        };
        tally.record(outcome, t0.elapsed());
    }
    Section::from_tally("verify", &tally, start.elapsed().as_secs_f64())
}
