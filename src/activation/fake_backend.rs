//! `ScriptedBackend`: an in-memory `SandboxBackend` for the activation unit tests.
//!
//! Every call is counted; claims, resumes and pauses take a configurable (paused-clock)
//! time and pop scripted results, succeeding when the script is empty.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::backend::{
    ActivationKind, BackendError, BackendEvent, Binding, Capabilities, ClaimBudget,
    RecoveredBinding, SandboxBackend, SandboxId, SandboxInfo,
};
use crate::lock::MutexExt;
use crate::session::SessionKey;

/// Scripted results and delays, set by a test before (or while) it runs.
#[derive(Default)]
pub(crate) struct Script {
    pub claim_delay: Duration,
    pub resume_delay: Duration,
    pub pause_delay: Duration,
    pub claim_results: VecDeque<Result<(), BackendError>>,
    pub resume_results: VecDeque<Result<(), BackendError>>,
    pub pause_results: VecDeque<Result<(), BackendError>>,
    pub recovered: Vec<RecoveredBinding>,
}

pub(crate) struct ScriptedBackend {
    pub can_pause: bool,
    pub script: Mutex<Script>,
    pub claims: AtomicUsize,
    pub resumes: AtomicUsize,
    pub pauses: AtomicUsize,
    pub activity: AtomicUsize,
    pub released: Mutex<Vec<(SessionKey, SandboxId)>>,
    pub events: broadcast::Sender<BackendEvent>,
    next: AtomicUsize,
}

impl ScriptedBackend {
    pub(crate) fn new(can_pause: bool) -> ScriptedBackend {
        ScriptedBackend {
            can_pause,
            script: Mutex::new(Script::default()),
            claims: AtomicUsize::new(0),
            resumes: AtomicUsize::new(0),
            pauses: AtomicUsize::new(0),
            activity: AtomicUsize::new(0),
            released: Mutex::new(Vec::new()),
            events: broadcast::channel(64).0,
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock_recovered()
    }

    pub(crate) fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    /// The endpoint sandbox `sbx-N` is served at.
    pub(crate) fn endpoint_of(n: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 20_000 + n as u16))
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
        _session: &SessionKey,
        _budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let (delay, result) = {
            let mut s = self.script();
            (s.claim_delay, s.claim_results.pop_front().unwrap_or(Ok(())))
        };
        tokio::time::sleep(delay).await;
        result?;
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        Ok(Binding {
            sandbox: SandboxId::new(format!("sbx-{n}")),
            endpoint: ScriptedBackend::endpoint_of(n),
            kind: ActivationKind::Claim,
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
            (
                s.resume_delay,
                s.resume_results.pop_front().unwrap_or(Ok(())),
            )
        };
        tokio::time::sleep(delay).await;
        result?;
        let n: usize = sandbox
            .as_str()
            .trim_start_matches("sbx-")
            .parse()
            .unwrap_or(0);
        Ok(ScriptedBackend::endpoint_of(n))
    }

    async fn pause(&self, _sandbox: &SandboxId) -> Result<(), BackendError> {
        if !self.can_pause {
            return Err(BackendError::Unsupported("pause"));
        }
        self.pauses.fetch_add(1, Ordering::SeqCst);
        let (delay, result) = {
            let mut s = self.script();
            (s.pause_delay, s.pause_results.pop_front().unwrap_or(Ok(())))
        };
        tokio::time::sleep(delay).await;
        result
    }

    async fn release(&self, session: &SessionKey, sandbox: &SandboxId) -> Result<(), BackendError> {
        self.released
            .lock_recovered()
            .push((session.clone(), sandbox.clone()));
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    fn sandboxes(&self) -> Vec<SandboxInfo> {
        Vec::new()
    }

    async fn recover(&self) -> Result<Vec<RecoveredBinding>, BackendError> {
        Ok(std::mem::take(&mut self.script().recovered))
    }

    fn record_activity(&self, _session: &SessionKey, _sandbox: &SandboxId) {
        self.activity.fetch_add(1, Ordering::SeqCst);
    }
}
