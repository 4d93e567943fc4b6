//! Test kit (feature `test-util`): [`ScriptedBackend`], the one scripted `SandboxBackend`.
//!
//! Unit tests reach it as `crate::testing`; integration tests enable the feature through
//! the crate's dev-dependency on itself (Cargo.toml). It replaces the hand-written fakes
//! that each test file used to carry: one backend whose claims, resumes and pauses take a
//! scripted (paused-clock) time and return scripted outcomes, whose spontaneous events a
//! test sends itself, and whose warm pool follows the autoscaler's target.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::backend::{
    ActivationKind, BackendError, BackendEvent, Binding, Capabilities, ClaimBudget, DeepPause,
    RecoveredBinding, SandboxBackend, SandboxId, SandboxInfo, SandboxState,
};
use crate::lock::MutexExt;
use crate::session::SessionKey;

/// What a scripted call does instead of succeeding.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Fails with this error (after the call's delay).
    Fail(BackendError),
    /// Never finishes: the caller's own deadline has to end the wait.
    Hang,
}

/// Scripted results and delays, set by a test before (or while) it runs. An empty result
/// queue means success.
#[derive(Default)]
pub struct Script {
    pub claim_delay: Duration,
    pub resume_delay: Duration,
    pub pause_delay: Duration,
    /// Popped by each claim, in order.
    pub claim_results: VecDeque<Result<(), BackendError>>,
    /// Popped by each resume, in order.
    pub resume_results: VecDeque<Result<(), BackendError>>,
    /// Popped by each pause, in order.
    pub pause_results: VecDeque<Result<(), BackendError>>,
    /// Claims of sessions whose ID starts with the prefix end this way (first match wins;
    /// checked before `claim_results`).
    pub claim_by_prefix: Vec<(String, Outcome)>,
    /// Returned (once) by `recover`.
    pub recovered: Vec<RecoveredBinding>,
    /// Popped by each successful claim: its binding's `kind` and `queued_for_capacity`
    /// (empty: the backend's kind, no wait for capacity).
    pub claim_bindings: VecDeque<(ActivationKind, bool)>,
    /// What `deep_pause` does; `None`: the deep tier is unsupported.
    pub deep_pause: Option<DeepPause>,
    /// `port_endpoint(sandbox, port)`: where each sandbox's other ports are served (a
    /// test points them at real upstreams); absent = unreachable.
    pub ports: BTreeMap<(String, u16), SocketAddr>,
}

/// Where claimed sandboxes live.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Claim `n` gets a new sandbox `sbx-n` at [`ScriptedBackend::endpoint_of`]`(n)`.
    Fresh,
    /// Every claim binds to this one sandbox (tests that point it at a real upstream).
    One(SocketAddr),
    /// Claim `n` gets a new sandbox `sbx-n` served at `list[n % len]` (several real
    /// upstreams, one per sandbox).
    List(&'static [SocketAddr]),
}

/// The warm pool the autoscaler steers: `set_warm_pool_target` records the target and the
/// pool follows it at once; `bound` counts sandboxes in use that were not claimed through
/// this backend (a test moving sandboxes from warm to bound by hand).
#[derive(Default)]
pub struct Pool {
    pub warm: AtomicU32,
    pub bound: AtomicU32,
    targets: Mutex<Vec<u32>>,
}

impl Pool {
    /// Ready sandboxes: warm plus bound.
    pub fn ready(&self) -> u32 {
        self.warm.load(Ordering::SeqCst) + self.bound.load(Ordering::SeqCst)
    }

    /// Every target the autoscaler applied, in order.
    pub fn targets(&self) -> Vec<u32> {
        self.targets.lock_recovered().clone()
    }
}

/// A claimed, not yet released sandbox.
struct Live {
    endpoint: SocketAddr,
    paused: bool,
    sessions: Vec<String>,
    since: Instant,
}

/// An in-memory `SandboxBackend` driven by a [`Script`]. Every call is counted.
pub struct ScriptedBackend {
    can_pause: bool,
    placement: Placement,
    sandbox_name: String,
    kind: ActivationKind,
    resume_endpoint: Option<SocketAddr>,
    script: Mutex<Script>,
    live: Mutex<BTreeMap<SandboxId, Live>>,
    next: AtomicUsize,
    /// Calls of `claim` / `resume` / `pause` (a pause on a backend without pause is not
    /// counted) and `record_activity`.
    pub claims: AtomicUsize,
    pub resumes: AtomicUsize,
    pub pauses: AtomicUsize,
    pub activity: AtomicUsize,
    /// Every `release` call, in order.
    pub released: Mutex<Vec<(SessionKey, SandboxId)>>,
    /// Send a [`BackendEvent`] here to make it happen "spontaneously".
    pub events: broadcast::Sender<BackendEvent>,
    /// The warm pool the autoscaler steers.
    pub pool: Pool,
}

impl ScriptedBackend {
    /// Fresh sandboxes `sbx-N` per claim (kind `claim`), pause supported if `can_pause`.
    pub fn new(can_pause: bool) -> ScriptedBackend {
        ScriptedBackend {
            can_pause,
            placement: Placement::Fresh,
            sandbox_name: "sbx".to_owned(),
            kind: ActivationKind::Claim,
            resume_endpoint: None,
            script: Mutex::new(Script::default()),
            live: Mutex::new(BTreeMap::new()),
            next: AtomicUsize::new(0),
            claims: AtomicUsize::new(0),
            resumes: AtomicUsize::new(0),
            pauses: AtomicUsize::new(0),
            activity: AtomicUsize::new(0),
            released: Mutex::new(Vec::new()),
            events: broadcast::channel(64).0,
            pool: Pool::default(),
        }
    }

    /// Every claim binds to the one sandbox `name` served at `endpoint`.
    pub fn one_sandbox(mut self, name: &str, endpoint: SocketAddr) -> ScriptedBackend {
        self.placement = Placement::One(endpoint);
        self.sandbox_name = name.to_owned();
        self
    }

    /// Claim `n` gets a new sandbox `sbx-n` served at `endpoints[n % len]` (each a real
    /// upstream); `endpoints` must not be empty.
    pub fn sandboxes_at(mut self, endpoints: Vec<SocketAddr>) -> ScriptedBackend {
        assert!(!endpoints.is_empty(), "at least one endpoint");
        self.placement = Placement::List(endpoints.leak());
        self
    }

    /// The activation kind claims report (`claim` by default).
    pub fn claims_as(mut self, kind: ActivationKind) -> ScriptedBackend {
        self.kind = kind;
        self
    }

    /// A resumed sandbox comes back at `endpoint` (a resumed pod gets a new address),
    /// instead of where it was claimed.
    pub fn resumes_at(mut self, endpoint: SocketAddr) -> ScriptedBackend {
        self.resume_endpoint = Some(endpoint);
        self
    }

    /// Serves port `port` of sandbox `sandbox` (e.g. `sbx-0`) at `addr`
    /// ([`SandboxBackend::port_endpoint`]).
    pub fn expose(&self, sandbox: &str, port: u16, addr: SocketAddr) {
        self.script().ports.insert((sandbox.to_owned(), port), addr);
    }

    /// The script, to change outcomes and delays.
    pub fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock_recovered()
    }

    /// Reads one of the call counters.
    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    /// The endpoint fresh sandbox `sbx-N` is served at (nothing listens there).
    pub fn endpoint_of(n: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 20_000 + (n % 40_000) as u16))
    }

    fn claim_outcome(&self, session: &SessionKey) -> (Duration, Option<Outcome>) {
        let mut s = self.script();
        let by_prefix = s
            .claim_by_prefix
            .iter()
            .find(|(prefix, _)| session.as_str().starts_with(prefix.as_str()))
            .map(|(_, outcome)| outcome.clone());
        let outcome = match by_prefix {
            Some(o) => Some(o),
            None => s
                .claim_results
                .pop_front()
                .and_then(|r| r.err())
                .map(Outcome::Fail),
        };
        (s.claim_delay, outcome)
    }

    fn place(&self) -> (SandboxId, SocketAddr) {
        match self.placement {
            Placement::One(endpoint) => (SandboxId::new(self.sandbox_name.as_str()), endpoint),
            Placement::Fresh => {
                let n = self.next.fetch_add(1, Ordering::SeqCst);
                (
                    SandboxId::new(format!("{}-{n}", self.sandbox_name)),
                    ScriptedBackend::endpoint_of(n),
                )
            }
            Placement::List(list) => {
                let n = self.next.fetch_add(1, Ordering::SeqCst);
                (
                    SandboxId::new(format!("{}-{n}", self.sandbox_name)),
                    list[n % list.len()],
                )
            }
        }
    }

    /// Where `sandbox` is served once resumed.
    fn resumed_endpoint(&self, sandbox: &SandboxId) -> SocketAddr {
        if let Some(endpoint) = self.resume_endpoint {
            return endpoint;
        }
        if let Some(live) = self.live.lock_recovered().get(sandbox) {
            return live.endpoint;
        }
        // A sandbox this backend never claimed (a recovered binding): its name says where.
        match self.placement {
            Placement::One(endpoint) => endpoint,
            Placement::Fresh | Placement::List(_) => {
                let n: usize = sandbox
                    .as_str()
                    .rsplit('-')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                match self.placement {
                    Placement::List(list) => list[n % list.len()],
                    _ => ScriptedBackend::endpoint_of(n),
                }
            }
        }
    }

    fn set_paused(&self, sandbox: &SandboxId, paused: bool, endpoint: Option<SocketAddr>) {
        if let Some(live) = self.live.lock_recovered().get_mut(sandbox) {
            live.paused = paused;
            if let Some(e) = endpoint {
                live.endpoint = e;
            }
        }
    }
}

/// Waits `delay`, then ends the way `outcome` says.
async fn play(delay: Duration, outcome: Option<Outcome>) -> Result<(), BackendError> {
    tokio::time::sleep(delay).await;
    match outcome {
        None => Ok(()),
        Some(Outcome::Fail(e)) => Err(e),
        Some(Outcome::Hang) => std::future::pending().await,
    }
}

#[async_trait]
impl SandboxBackend for ScriptedBackend {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: self.can_pause,
            pause_keeps: "everything (scripted)",
        }
    }

    async fn claim(
        &self,
        session: &SessionKey,
        _budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let (delay, outcome) = self.claim_outcome(session);
        play(delay, outcome).await?;
        let (kind, queued_for_capacity) = self
            .script()
            .claim_bindings
            .pop_front()
            .unwrap_or((self.kind, false));
        let (sandbox, endpoint) = self.place();
        let mut live = self.live.lock_recovered();
        let entry = live.entry(sandbox.clone()).or_insert_with(|| Live {
            endpoint,
            paused: false,
            sessions: Vec::new(),
            since: Instant::now(),
        });
        entry.sessions.push(session.short_hash());
        Ok(Binding {
            sandbox,
            endpoint: entry.endpoint,
            kind,
            queued_for_capacity,
        })
    }

    async fn resume(
        &self,
        sandbox: &SandboxId,
        _deadline: Instant,
    ) -> Result<SocketAddr, BackendError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        let (delay, result) = {
            let mut s = self.script();
            (s.resume_delay, s.resume_results.pop_front())
        };
        play(delay, result.and_then(|r| r.err()).map(Outcome::Fail)).await?;
        let endpoint = self.resumed_endpoint(sandbox);
        self.set_paused(sandbox, false, Some(endpoint));
        Ok(endpoint)
    }

    async fn pause(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        if !self.can_pause {
            return Err(BackendError::Unsupported("pause"));
        }
        self.pauses.fetch_add(1, Ordering::SeqCst);
        let (delay, result) = {
            let mut s = self.script();
            (s.pause_delay, s.pause_results.pop_front())
        };
        play(delay, result.and_then(|r| r.err()).map(Outcome::Fail)).await?;
        self.set_paused(sandbox, true, None);
        Ok(())
    }

    async fn deep_pause(
        &self,
        _session: &SessionKey,
        sandbox: &SandboxId,
    ) -> Result<DeepPause, BackendError> {
        let done = self.script().deep_pause;
        let done = done.ok_or(BackendError::Unsupported("the deep idle tier"))?;
        self.set_paused(sandbox, true, None);
        Ok(done)
    }

    async fn release(&self, session: &SessionKey, sandbox: &SandboxId) -> Result<(), BackendError> {
        self.released
            .lock_recovered()
            .push((session.clone(), sandbox.clone()));
        let mut live = self.live.lock_recovered();
        if let Some(l) = live.get_mut(sandbox) {
            let hash = session.short_hash();
            l.sessions.retain(|s| *s != hash);
            if l.sessions.is_empty() {
                live.remove(sandbox);
            }
        }
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    /// Claimed sandboxes (bound or paused), then the pool's bound and warm rows.
    fn sandboxes(&self) -> Vec<SandboxInfo> {
        let row = |id: SandboxId, state, endpoint, sessions, since: Option<Instant>| SandboxInfo {
            id,
            state,
            sessions,
            endpoint,
            pid: None,
            age_seconds: since.map_or(0.0, |s| s.elapsed().as_secs_f64()),
        };
        let mut rows: Vec<SandboxInfo> = self
            .live
            .lock_recovered()
            .iter()
            .map(|(id, l)| {
                let state = if l.paused {
                    SandboxState::Paused
                } else {
                    SandboxState::Bound
                };
                row(
                    id.clone(),
                    state,
                    Some(l.endpoint),
                    l.sessions.clone(),
                    Some(l.since),
                )
            })
            .collect();
        let bound = self.pool.bound.load(Ordering::SeqCst);
        let warm = self.pool.warm.load(Ordering::SeqCst);
        for i in 0..bound + warm {
            let state = if i < bound {
                SandboxState::Bound
            } else {
                SandboxState::Warm
            };
            let id = SandboxId::new(format!("pool-{i}"));
            rows.push(row(id, state, None, Vec::new(), None));
        }
        rows
    }

    async fn set_warm_pool_target(&self, target: u32) -> Result<(), BackendError> {
        self.pool.targets.lock_recovered().push(target);
        self.pool.warm.store(target, Ordering::SeqCst);
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<RecoveredBinding>, BackendError> {
        Ok(std::mem::take(&mut self.script().recovered))
    }

    fn record_activity(&self, _session: &SessionKey, _sandbox: &SandboxId) {
        self.activity.fetch_add(1, Ordering::SeqCst);
    }

    fn port_endpoint(&self, sandbox: &SandboxId, port: u16) -> Option<SocketAddr> {
        let key = (sandbox.as_str().to_owned(), port);
        self.script().ports.get(&key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SessionKey {
        SessionKey::parse(s, 128).expect("valid session id")
    }

    fn budget() -> ClaimBudget {
        let deadline = Instant::now() + Duration::from_secs(1);
        ClaimBudget {
            admission_deadline: deadline,
            deadline,
        }
    }

    fn states(b: &ScriptedBackend) -> Vec<(String, SandboxState)> {
        b.sandboxes()
            .into_iter()
            .map(|r| (r.id.to_string(), r.state))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn listing_follows_claims_pauses_resumes_and_releases() {
        let b = ScriptedBackend::new(true);
        let first = b.claim(&key("a"), budget()).await.expect("claim a");
        let second = b.claim(&key("b"), budget()).await.expect("claim b");
        assert_eq!(first.sandbox.as_str(), "sbx-0");
        assert_eq!(second.endpoint, ScriptedBackend::endpoint_of(1));
        b.pause(&first.sandbox).await.expect("pause");
        assert_eq!(
            states(&b),
            vec![
                ("sbx-0".to_owned(), SandboxState::Paused),
                ("sbx-1".to_owned(), SandboxState::Bound),
            ]
        );
        let back = b.resume(&first.sandbox, Instant::now()).await;
        assert_eq!(back.expect("resume"), first.endpoint);
        b.release(&key("b"), &second.sandbox)
            .await
            .expect("release");
        assert_eq!(states(&b), vec![("sbx-0".to_owned(), SandboxState::Bound)]);
        b.set_warm_pool_target(2).await.expect("target");
        assert_eq!(b.sandboxes().len(), 3);
        assert_eq!(b.pool.targets(), vec![2]);
        assert_eq!(ScriptedBackend::count(&b.claims), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_outcomes_by_prefix_then_in_order() {
        let up = SocketAddr::from(([127, 0, 0, 1], 9));
        let b = ScriptedBackend::new(false).one_sandbox("only", up);
        b.script().claim_by_prefix = vec![(
            "cp-".into(),
            Outcome::Fail(BackendError::Timeout(Duration::ZERO)),
        )];
        b.script()
            .claim_results
            .push_back(Err(BackendError::StartFailed("once".into())));
        let cp = b.claim(&key("cp-1"), budget()).await;
        assert!(matches!(cp, Err(BackendError::Timeout(_))), "{cp:?}");
        let once = b.claim(&key("x"), budget()).await;
        assert!(
            matches!(once, Err(BackendError::StartFailed(_))),
            "{once:?}"
        );
        let ok = b.claim(&key("x"), budget()).await.expect("then success");
        assert_eq!((ok.sandbox.as_str(), ok.endpoint), ("only", up));
        assert!(matches!(
            b.pause(&ok.sandbox).await,
            Err(BackendError::Unsupported(_))
        ));
        b.script().claim_by_prefix = vec![("hang-".into(), Outcome::Hang)];
        let hang = key("hang-1");
        let hung = tokio::time::timeout(Duration::from_secs(60), b.claim(&hang, budget())).await;
        assert!(hung.is_err(), "a hanging claim never finishes");
    }
}
