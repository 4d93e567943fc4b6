//! `StaticBackend`: a fixed list of endpoints, each serving up to N sessions at once.
//!
//! Claims take the least-loaded endpoint with a free slot; when all are full the claim
//! waits on a `Notify` (woken by every release) until the admission deadline.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::{
    ActivationKind, BackendError, BackendEvent, Binding, Capabilities, ClaimBudget, SandboxBackend,
    SandboxId, SandboxInfo, SandboxState, StateCounts,
};
use crate::config::ConfigError;
use crate::lock::MutexExt;
use crate::session::SessionKey;

/// Fixed endpoints with per-endpoint session slots.
pub struct StaticBackend {
    slots: Mutex<Vec<Slot>>,
    max_per_sandbox: usize,
    freed: Notify,
    events: broadcast::Sender<BackendEvent>,
    started: Instant,
}

struct Slot {
    id: SandboxId,
    addr: SocketAddr,
    /// The sessions bound here, with their short hashes computed once at bind time (the
    /// admin API and `/metrics` list them; hashing 100,000 IDs per scrape would not do).
    sessions: HashMap<SessionKey, String>,
}

impl StaticBackend {
    /// Resolves `endpoints` (`host:port`) once at startup.
    pub fn new(endpoints: &[String], max_per_sandbox: u32) -> Result<StaticBackend, ConfigError> {
        let mut slots = Vec::with_capacity(endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            let addr = e
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        format!("backend.endpoints[{i}]"),
                        format!("{e:?} does not resolve"),
                    )
                })?;
            slots.push(Slot {
                id: SandboxId::new(e.as_str()),
                addr,
                sessions: HashMap::new(),
            });
        }
        Ok(StaticBackend {
            slots: Mutex::new(slots),
            max_per_sandbox: max_per_sandbox as usize,
            freed: Notify::new(),
            events: broadcast::channel(64).0,
            started: Instant::now(),
        })
    }

    /// Binds `session` to the least-loaded endpoint with a free slot, if any.
    fn try_bind(&self, session: &SessionKey) -> Option<Binding> {
        let mut slots = self.slots.lock_recovered();
        let slot = slots
            .iter_mut()
            .filter(|s| s.sessions.len() < self.max_per_sandbox)
            .min_by_key(|s| s.sessions.len())?;
        slot.sessions.insert(session.clone(), session.short_hash());
        Some(Binding {
            sandbox: slot.id.clone(),
            endpoint: slot.addr,
            kind: ActivationKind::Claim,
            queued_for_capacity: false,
        })
    }
}

#[async_trait]
impl SandboxBackend for StaticBackend {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: false,
            pause_keeps: "nothing (static endpoints cannot pause)",
        }
    }

    async fn claim(
        &self,
        session: &SessionKey,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        let mut queued = false;
        loop {
            // Register interest before checking, so a release between the check and the
            // await still wakes us.
            let freed = self.freed.notified();
            if let Some(b) = self.try_bind(session) {
                return Ok(Binding {
                    queued_for_capacity: queued,
                    ..b
                });
            }
            queued = true;
            if tokio::time::timeout_at(budget.admission_deadline, freed)
                .await
                .is_err()
            {
                return Err(BackendError::NoCapacity(
                    "every static endpoint is serving its maximum number of sessions".into(),
                ));
            }
        }
    }

    async fn resume(
        &self,
        sandbox: &SandboxId,
        _deadline: Instant,
    ) -> Result<SocketAddr, BackendError> {
        let slots = self.slots.lock_recovered();
        slots
            .iter()
            .find(|s| &s.id == sandbox)
            .map(|s| s.addr)
            .ok_or_else(|| BackendError::Lost(sandbox.clone()))
    }

    async fn pause(&self, _sandbox: &SandboxId) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("pause"))
    }

    async fn release(&self, session: &SessionKey, sandbox: &SandboxId) -> Result<(), BackendError> {
        {
            let mut slots = self.slots.lock_recovered();
            if let Some(slot) = slots.iter_mut().find(|s| &s.id == sandbox) {
                slot.sessions.remove(session);
            }
        }
        self.freed.notify_waiters();
        // A waiter that registered after notify_waiters still needs a wake-up.
        self.freed.notify_one();
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    /// A static endpoint's host with the other port: the operator runs the sandbox's
    /// other servers next to the configured one.
    fn port_endpoint(&self, sandbox: &SandboxId, port: u16) -> Option<SocketAddr> {
        let slots = self.slots.lock_recovered();
        let slot = slots.iter().find(|s| &s.id == sandbox)?;
        Some(SocketAddr::new(slot.addr.ip(), port))
    }

    fn sandbox_counts(&self) -> StateCounts {
        let slots = self.slots.lock_recovered();
        StateCounts::of(slots.iter().map(|s| {
            if s.sessions.is_empty() {
                SandboxState::Warm
            } else {
                SandboxState::Bound
            }
        }))
    }

    fn sandboxes(&self) -> Vec<SandboxInfo> {
        let slots = self.slots.lock_recovered();
        let age = self.started.elapsed().as_secs_f64();
        slots
            .iter()
            .map(|s| SandboxInfo {
                id: s.id.clone(),
                state: if s.sessions.is_empty() {
                    SandboxState::Warm
                } else {
                    SandboxState::Bound
                },
                sessions: s.sessions.values().cloned().collect(),
                endpoint: Some(s.addr),
                pid: None,
                age_seconds: age,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget(ms: u64) -> ClaimBudget {
        let d = Instant::now() + Duration::from_millis(ms);
        ClaimBudget {
            admission_deadline: d,
            deadline: d,
        }
    }

    fn key(s: &str) -> SessionKey {
        SessionKey::parse(s, 128).unwrap()
    }

    #[tokio::test]
    async fn exclusive_then_waits_then_no_capacity() {
        let b = StaticBackend::new(&["127.0.0.1:1".into()], 1).unwrap();
        let first = b.claim(&key("a"), budget(10)).await.unwrap();
        assert_eq!(first.endpoint.port(), 1);
        let err = b.claim(&key("b"), budget(20)).await.unwrap_err();
        assert!(matches!(err, BackendError::NoCapacity(_)));
    }

    #[tokio::test]
    async fn release_wakes_a_waiter() {
        let b = std::sync::Arc::new(StaticBackend::new(&["127.0.0.1:1".into()], 1).unwrap());
        let first = b.claim(&key("a"), budget(10)).await.unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.claim(&key("b"), budget(5_000)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.release(&key("a"), &first.sandbox).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woke")
            .unwrap()
            .unwrap();
        assert_eq!(got.sandbox, first.sandbox);
    }

    #[tokio::test]
    async fn shared_endpoints_balance() {
        let b = StaticBackend::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()], 2).unwrap();
        let mut ports = Vec::new();
        for s in ["a", "b", "c", "d"] {
            ports.push(b.claim(&key(s), budget(10)).await.unwrap().endpoint.port());
        }
        ports.sort();
        assert_eq!(ports, vec![1, 1, 2, 2]);
        assert!(b.claim(&key("e"), budget(10)).await.is_err());
    }

    #[tokio::test]
    async fn counts_agree_with_the_listing() {
        let b = StaticBackend::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()], 2).unwrap();
        let listed = |b: &StaticBackend| StateCounts::of(b.sandboxes().iter().map(|s| s.state));
        assert_eq!(b.sandbox_counts().get(SandboxState::Warm), 2);
        let got = b.claim(&key("a"), budget(10)).await.unwrap();
        assert_eq!(b.sandbox_counts().get(SandboxState::Bound), 1);
        assert_eq!(b.sandbox_counts().get(SandboxState::Warm), 1);
        assert_eq!(b.sandbox_counts(), listed(&b));
        b.release(&key("a"), &got.sandbox).await.unwrap();
        assert_eq!(b.sandbox_counts().get(SandboxState::Warm), 2);
        assert_eq!(b.sandbox_counts(), listed(&b));
    }
}
