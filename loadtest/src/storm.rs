//! `storm`: K new sessions at once (one connection each) against a warm pool smaller than
//! K. Every session must be served, on its own sandbox when `exclusive`, with zero errors;
//! the claim latency is measured from the moment the storm was released.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::conn::HttpConn;
use crate::drive::{Outcome, Tally};
use crate::harness::Harness;
use crate::probe::{self, CounterReply, SandboxState};
use crate::report::{Section, TargetReport};

/// What one storm session saw.
struct StormSession {
    claim: Tally,
    follow_up: Tally,
    activation: Option<String>,
    /// The demo sandbox's `instance` that served it.
    instance: Option<String>,
}

pub async fn run(h: &Harness) -> Result<Vec<TargetReport>> {
    let sc = &h.scenario.storm;
    h.bar.set_length((sc.sessions * h.targets.len()) as u64);
    let mut reports = Vec::new();
    for (ti, target) in h.targets.iter().enumerate() {
        h.status(format!("storm {} x{}", target.name, sc.sessions));
        let cpu = h.cpu_meter(&target.name);
        let barrier = Arc::new(Barrier::new(sc.sessions + 1));
        let released = Arc::new(std::sync::OnceLock::<Instant>::new());
        let mut tasks = Vec::with_capacity(sc.sessions);
        for i in 0..sc.sessions {
            let session = format!("storm-{}-{ti}-{i}", h.run_id);
            let mut conn = HttpConn::new(target, h.scenario.request_timeout);
            let (barrier, released) = (barrier.clone(), released.clone());
            let exclusive = sc.exclusive;
            let bar = h.bar.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let start = *released.get_or_init(Instant::now);
                let s = storm_session(&mut conn, &session, start, exclusive).await;
                bar.inc(1);
                s
            }));
        }
        barrier.wait().await;
        let _ = released.get_or_init(Instant::now);
        let deadline = Instant::now() + sc.duration;
        let mut claim = Tally::default();
        let mut follow_up = Tally::default();
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        let mut owners: HashMap<String, u64> = HashMap::new();
        for mut task in tasks {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let joined = tokio::time::timeout(remaining, &mut task).await;
            if joined.is_err() {
                task.abort();
            }
            match joined {
                Ok(Ok(s)) => {
                    claim.merge(&s.claim);
                    follow_up.merge(&s.follow_up);
                    if let Some(k) = s.activation {
                        *kinds.entry(format!("activation_{k}")).or_default() += 1;
                    }
                    if let Some(instance) = s.instance {
                        *owners.entry(instance).or_default() += 1;
                    }
                }
                Ok(Err(e)) => claim.record(
                    Outcome::Error(format!("storm session failed: {e}")),
                    sc.duration,
                ),
                Err(_) => claim.record(
                    Outcome::Error(format!("session not served within {:?}", sc.duration)),
                    sc.duration,
                ),
            }
        }
        if sc.exclusive {
            for (instance, n) in owners.iter().filter(|(_, n)| **n > 1) {
                claim.record(
                    Outcome::Violation(format!("{n} storm sessions share sandbox {instance}")),
                    std::time::Duration::ZERO,
                );
            }
        }
        let wall = cpu.wall_seconds();
        let mut claim_section =
            Section::from_tally("claim", &claim, wall).with_cpu(cpu.cpu_seconds());
        kinds.insert("sandboxes".into(), owners.len() as u64);
        claim_section.counts = kinds;
        reports.push(TargetReport {
            name: target.name.clone(),
            url: target.url.clone(),
            sections: vec![
                claim_section,
                Section::from_tally("follow_up", &follow_up, wall),
            ],
        });
    }
    Ok(reports)
}

/// First request (`GET /state`: the claim) from the storm's release, then `POST /counter`
/// on the same sandbox.
async fn storm_session(
    conn: &mut HttpConn,
    session: &str,
    released: Instant,
    exclusive: bool,
) -> StormSession {
    let mut out = StormSession {
        claim: Tally::default(),
        follow_up: Tally::default(),
        activation: None,
        instance: None,
    };
    let state = match conn.get_ok("/state", Some(session)).await {
        Ok(r) => {
            out.activation = r.activation().map(str::to_owned);
            probe::parse::<SandboxState>(&r.body, "/state")
        }
        Err(e) => Err(e),
    };
    let state = match state {
        Ok(s) => {
            let outcome = match probe::check_state(session, &s, None, exclusive).first() {
                None => Outcome::Ok,
                Some(v) => Outcome::Violation(v.to_string()),
            };
            out.claim.record(outcome, released.elapsed());
            s
        }
        Err(e) => {
            out.claim
                .record(Outcome::Error(format!("{e:#}")), released.elapsed());
            return out;
        }
    };
    out.instance = Some(state.instance.clone());
    let t0 = Instant::now();
    let outcome = match conn
        .post_ok("/counter", Some(session))
        .await
        .and_then(|r| probe::parse::<CounterReply>(&r.body, "/counter"))
    {
        Ok(c) if c.instance != state.instance => Outcome::Violation(format!(
            "session {session} moved from sandbox {} to {}",
            state.instance, c.instance
        )),
        Ok(c) => match probe::check_counter(session, state.counter, c.counter, exclusive) {
            Ok(()) => Outcome::Ok,
            Err(v) => Outcome::Violation(v.to_string()),
        },
        Err(e) => Outcome::Error(format!("{e:#}")),
    };
    out.follow_up.record(outcome, t0.elapsed());
    out
}
