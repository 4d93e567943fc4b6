//! `FakeFleet`: a backend whose warm pool follows the target at once, for loop tests.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::backend::{
    BackendError, BackendEvent, Binding, Capabilities, ClaimBudget, SandboxBackend, SandboxId,
    SandboxInfo, SandboxState,
};
use crate::lock::MutexExt;
use crate::session::SessionKey;

pub struct FakeFleet {
    pub warm: AtomicU32,
    pub bound: AtomicU32,
    pub targets: Mutex<Vec<u32>>,
    events: broadcast::Sender<BackendEvent>,
}

impl FakeFleet {
    pub fn new(bound: u32) -> FakeFleet {
        FakeFleet {
            warm: AtomicU32::new(0),
            bound: AtomicU32::new(bound),
            targets: Mutex::new(Vec::new()),
            events: broadcast::channel(4).0,
        }
    }

    pub fn ready(&self) -> u32 {
        self.warm.load(Ordering::SeqCst) + self.bound.load(Ordering::SeqCst)
    }

    pub fn targets(&self) -> Vec<u32> {
        self.targets.lock_recovered().clone()
    }
}

#[async_trait]
impl SandboxBackend for FakeFleet {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: false,
            pause_keeps: "",
        }
    }

    async fn claim(&self, _: &SessionKey, _: ClaimBudget) -> Result<Binding, BackendError> {
        Err(BackendError::Unsupported("claim"))
    }

    async fn resume(
        &self,
        _: &SandboxId,
        _: Instant,
    ) -> Result<std::net::SocketAddr, BackendError> {
        Err(BackendError::Unsupported("resume"))
    }

    async fn pause(&self, _: &SandboxId) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("pause"))
    }

    async fn release(&self, _: &SessionKey, _: &SandboxId) -> Result<(), BackendError> {
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    fn sandboxes(&self) -> Vec<SandboxInfo> {
        let row = |i: u32, state| SandboxInfo {
            id: SandboxId::new(format!("sbx-{i}")),
            state,
            sessions: Vec::new(),
            endpoint: None,
            pid: None,
            age_seconds: 0.0,
        };
        let bound = self.bound.load(Ordering::SeqCst);
        let warm = self.warm.load(Ordering::SeqCst);
        (0..bound)
            .map(|i| row(i, SandboxState::Bound))
            .chain((bound..bound + warm).map(|i| row(i, SandboxState::Warm)))
            .collect()
    }

    async fn set_warm_pool_target(&self, target: u32) -> Result<(), BackendError> {
        self.targets.lock_recovered().push(target);
        self.warm.store(target, Ordering::SeqCst);
        Ok(())
    }
}
