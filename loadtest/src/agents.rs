//! `agents`: agent-shaped sessions. Sessions arrive at a rate; each has conversation turns
//! with think time (plain requests, SSE streams, WebSocket exchanges), some go idle long
//! enough to be frozen and come back. Every answer is checked: same sandbox, nobody else's
//! session, and the counter continuing across the freeze.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::conn::{HttpConn, SESSION_HEADER};
use crate::drive::{Outcome, Tally};
use crate::harness::{Harness, Rng};
use crate::monitor::Gauges;
use crate::probe::{self, CounterReply, SandboxState};
use crate::report::{Section, TargetReport};
use crate::scenario::AgentsScenario;
use crate::target::Target;

/// Section names, in report order.
const SECTIONS: [&str; 6] = ["cold_claim", "turn", "sse", "ws", "resume", "buffered"];

/// Everything one session measured.
#[derive(Default)]
struct SessionTally {
    sections: BTreeMap<&'static str, Tally>,
    counts: BTreeMap<String, u64>,
}

impl SessionTally {
    fn record(&mut self, section: &'static str, outcome: Outcome, latency: Duration) {
        self.sections
            .entry(section)
            .or_default()
            .record(outcome, latency);
    }

    fn count(&mut self, key: impl Into<String>) {
        *self.counts.entry(key.into()).or_default() += 1;
    }

    /// Records an activation header: its kind, and the latency as time buffered.
    fn activation(&mut self, kind: Option<&str>, latency: Duration) {
        let kind = kind.unwrap_or("absent");
        self.count(format!("activation_{kind}"));
        if kind != "none" && kind != "absent" {
            self.record("buffered", Outcome::Ok, latency);
        }
    }

    fn merge(&mut self, other: SessionTally) {
        for (k, t) in other.sections {
            self.sections.entry(k).or_default().merge(&t);
        }
        for (k, n) in other.counts {
            *self.counts.entry(k).or_default() += n;
        }
    }
}

/// One session's connection, identity and expectations.
struct Agent {
    target: Target,
    conn: HttpConn,
    session: String,
    exclusive: bool,
    /// The demo sandbox's `instance` the session is pinned to.
    instance: Option<String>,
    counter: u64,
    timeout: Duration,
    tally: SessionTally,
}

pub async fn run(h: &Harness) -> Result<Vec<TargetReport>> {
    let sc = &h.scenario.agents;
    h.bar.set_length((sc.sessions * h.targets.len()) as u64);
    let mut reports = Vec::new();
    for (ti, target) in h.targets.iter().enumerate() {
        h.status(format!("agents {}", target.name));
        let cpu = h.cpu_meter(&target.name);
        let start = Instant::now();
        let deadline = start + sc.duration;
        let mut rng = Rng::new(h.scenario.seed.wrapping_add(ti as u64));
        let mut tasks = Vec::new();
        for i in 0..sc.sessions {
            let arrive = start + Duration::from_secs_f64(i as f64 / sc.arrival_rate);
            if arrive >= deadline {
                break;
            }
            tokio::time::sleep_until(arrive).await;
            let agent = Agent {
                target: target.clone(),
                conn: HttpConn::new(target, h.scenario.request_timeout),
                session: format!("agent-{}-{ti}-{i}", h.run_id),
                exclusive: sc.exclusive,
                instance: None,
                counter: 0,
                timeout: h.scenario.request_timeout,
                tally: SessionTally::default(),
            };
            let (sc, gauges, bar) = (sc.clone(), h.gauges.clone(), h.bar.clone());
            let rng = Rng::new(rng.next_u64());
            tasks.push(tokio::spawn(async move {
                let t = agent.live(&sc, rng, &gauges).await;
                bar.inc(1);
                t
            }));
        }
        let mut total = SessionTally::default();
        for mut task in tasks {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, &mut task).await {
                Ok(Ok(t)) => total.merge(t),
                Ok(Err(e)) => total.record(
                    "turn",
                    Outcome::Error(format!("session task failed: {e}")),
                    Duration::ZERO,
                ),
                Err(_) => {
                    task.abort();
                    total.record(
                        "turn",
                        Outcome::Error(format!("session unfinished after {:?}", sc.duration)),
                        Duration::ZERO,
                    );
                }
            }
        }
        // Aborted sessions never left their gauges; start the next target from zero.
        for g in [&h.gauges.active, &h.gauges.thinking, &h.gauges.idle] {
            g.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        let wall = cpu.wall_seconds();
        let cpu_seconds = cpu.cpu_seconds();
        let mut sections = Vec::new();
        for name in SECTIONS {
            let tally = total.sections.remove(name).unwrap_or_default();
            let mut s = Section::from_tally(name, &tally, wall);
            if name == "cold_claim" {
                s = s.with_cpu(cpu_seconds);
                s.counts = std::mem::take(&mut total.counts);
            }
            sections.push(s);
        }
        reports.push(TargetReport {
            name: target.name.clone(),
            url: target.url.clone(),
            sections,
        });
    }
    Ok(reports)
}

impl Agent {
    /// The whole life of one session.
    async fn live(mut self, sc: &AgentsScenario, mut rng: Rng, gauges: &Gauges) -> SessionTally {
        gauges.shift(None, Some(&gauges.active));
        if self.cold_claim().await {
            self.turns(sc, sc.turns, &mut rng, gauges).await;
            if rng.unit() < sc.idle_fraction {
                gauges.shift(Some(&gauges.active), Some(&gauges.idle));
                self.tally.count("sessions_idled");
                tokio::time::sleep(sc.idle_time).await;
                gauges.shift(Some(&gauges.idle), Some(&gauges.active));
                if self.come_back().await {
                    self.turns(sc, sc.return_turns, &mut rng, gauges).await;
                }
            }
            self.tally.count("sessions_completed");
        }
        gauges.shift(Some(&gauges.active), None);
        self.tally
    }

    /// First request: `GET /state` must show a sandbox that saw only this session.
    async fn cold_claim(&mut self) -> bool {
        let t0 = Instant::now();
        match self.state().await {
            Ok((state, kind)) => {
                let latency = t0.elapsed();
                self.tally.activation(kind.as_deref(), latency);
                let outcome = self.judge_state(&state, None);
                let ok = matches!(outcome, Outcome::Ok);
                self.tally.record("cold_claim", outcome, latency);
                self.instance = Some(state.instance.clone());
                self.counter = state.counter;
                ok
            }
            Err(e) => {
                let latency = t0.elapsed();
                self.tally
                    .record("cold_claim", Outcome::Error(format!("{e:#}")), latency);
                false
            }
        }
    }

    /// After the idle period: the counter must continue where it was (state carried over a
    /// freeze), on the same process, and the sandbox must still be this session's alone.
    async fn come_back(&mut self) -> bool {
        let t0 = Instant::now();
        let reply = self.conn.post_ok("/counter", Some(&self.session)).await;
        let latency = t0.elapsed();
        let (outcome, ok) = match reply {
            Ok(r) => {
                let kind = r.activation().map(str::to_owned);
                self.tally.activation(kind.as_deref(), latency);
                if kind.as_deref() == Some("resume") {
                    self.tally.count("sessions_resumed");
                }
                let o = self.judge_counter(&r.body);
                let ok = matches!(o, Outcome::Ok);
                (o, ok)
            }
            Err(e) => (Outcome::Error(format!("{e:#}")), false),
        };
        self.tally.record("resume", outcome, latency);
        if !ok {
            return false;
        }
        let t0 = Instant::now();
        let outcome = match self.state().await {
            Ok((state, _)) => self.judge_state(&state, self.instance.as_deref()),
            Err(e) => Outcome::Error(format!("{e:#}")),
        };
        self.tally.record("turn", outcome, t0.elapsed());
        true
    }

    async fn turns(&mut self, sc: &AgentsScenario, n: u32, rng: &mut Rng, gauges: &Gauges) {
        for _ in 0..n {
            gauges.shift(Some(&gauges.active), Some(&gauges.thinking));
            tokio::time::sleep(rng.between(sc.think_min, sc.think_max)).await;
            gauges.shift(Some(&gauges.thinking), Some(&gauges.active));
            let pick = rng.unit();
            let t0 = Instant::now();
            if pick < sc.sse_fraction {
                let path = format!(
                    "/sse?n={}&interval_ms={}",
                    sc.sse_events, sc.sse_interval_ms
                );
                let outcome = match self.conn.get_ok(&path, Some(&self.session)).await {
                    Ok(r) => match probe::check_sse(&r.body, sc.sse_events) {
                        Ok(()) => Outcome::Ok,
                        Err(e) => Outcome::Error(format!("{e:#}")),
                    },
                    Err(e) => Outcome::Error(format!("{e:#}")),
                };
                self.tally.record("sse", outcome, t0.elapsed());
            } else if pick < sc.sse_fraction + sc.ws_fraction {
                let outcome = match self.websocket(sc.ws_messages).await {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Error(format!("{e:#}")),
                };
                self.tally.record("ws", outcome, t0.elapsed());
            } else {
                let outcome = match self.conn.post_ok("/counter", Some(&self.session)).await {
                    Ok(r) => self.judge_counter(&r.body),
                    Err(e) => Outcome::Error(format!("{e:#}")),
                };
                self.tally.record("turn", outcome, t0.elapsed());
            }
        }
    }

    async fn state(&mut self) -> Result<(SandboxState, Option<String>)> {
        let r = self.conn.get_ok("/state", Some(&self.session)).await?;
        let kind = r.activation().map(str::to_owned);
        Ok((probe::parse(&r.body, "/state")?, kind))
    }

    fn judge_state(&self, state: &SandboxState, pinned: Option<&str>) -> Outcome {
        match probe::check_state(&self.session, state, pinned, self.exclusive).first() {
            None => Outcome::Ok,
            Some(v) => Outcome::Violation(v.to_string()),
        }
    }

    /// Checks a `POST /counter` answer and advances the expected counter.
    fn judge_counter(&mut self, body: &[u8]) -> Outcome {
        let c: CounterReply = match probe::parse(body, "/counter") {
            Ok(c) => c,
            Err(e) => return Outcome::Error(format!("{e:#}")),
        };
        if let Some(was) = &self.instance
            && *was != c.instance
        {
            return Outcome::Violation(format!(
                "session {} moved from sandbox {was} to sandbox {}",
                self.session, c.instance
            ));
        }
        let last = self.counter;
        self.counter = c.counter;
        match probe::check_counter(&self.session, last, c.counter, self.exclusive) {
            Ok(()) => Outcome::Ok,
            Err(v) => Outcome::Violation(v.to_string()),
        }
    }

    /// Opens `/ws` with the session header, sends `n` messages, expects each echoed.
    async fn websocket(&self, n: u32) -> Result<()> {
        let mut req = self.target.ws_url("/ws").into_client_request()?;
        req.headers_mut().insert(
            SESSION_HEADER,
            self.session.parse().context("session header")?,
        );
        let exchange = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
            for i in 0..n {
                let text = format!("{}:{i}", self.session);
                ws.send(Message::text(text.clone())).await?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str() == text => break,
                        Some(Ok(Message::Text(t))) => bail!("ws echo {t:?}, expected {text:?}"),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(other)) => bail!("ws: unexpected frame {other:?}"),
                        Some(Err(e)) => return Err(e.into()),
                        None => bail!("ws closed after {i} of {n} echoes"),
                    }
                }
            }
            ws.close(None).await?;
            Ok(())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| anyhow!("ws exchange not done within {:?}", self.timeout))?
    }
}
