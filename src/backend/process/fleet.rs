//! `Fleet`: the process backend's table of sandboxes and its warm pool, as plain data.
//!
//! Every method runs under the backend's `std::sync::Mutex` and does no I/O and no
//! `.await`, so the lock is held for microseconds and a warm claim is a queue pop.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::time::Instant;

use super::child::{ExitWatch, Reap};
use super::freezer::SandboxCgroup;
use crate::backend::{ActivationKind, Binding, SandboxId, SandboxInfo, SandboxState};
use crate::session::SessionKey;

/// One sandbox as the table knows it.
pub struct Entry {
    pub state: SandboxState,
    /// Set once the child is running.
    pub pid: Option<u32>,
    pub endpoint: Option<SocketAddr>,
    pub sessions: Vec<SessionKey>,
    pub created: Instant,
    pub cgroup: Option<Arc<SandboxCgroup>>,
    pub workdir: PathBuf,
    pub exit: Option<ExitWatch>,
    /// Keeps the exited leader unreaped until the entry is dropped (after teardown's last
    /// group signal), so the group's ID cannot be recycled under a `killpg`.
    pub reap: Option<Reap>,
    /// Started for one session's customisation (env, volumes): never pooled, never shared.
    pub customized: bool,
    /// `backend.expose_ports`: each sandbox port and the host-loopback address forwarded
    /// to it (isolated sandboxes only).
    pub exposed: Vec<(u16, SocketAddr)>,
}

impl Entry {
    /// The child has exited (its exit watch fired).
    pub fn exited(&self) -> bool {
        self.exit.as_ref().is_some_and(|e| e.borrow().is_some())
    }
}

/// What a claim should do next.
pub enum ClaimStep {
    /// Bound without waiting (warm pool or a shared sandbox with a free slot).
    Bound(Binding),
    /// A slot was reserved for a new sandbox with this id: start it.
    Start(SandboxId),
    /// At `max_sandboxes`: wait for capacity.
    Wait,
}

/// What the refill loop should do now.
pub struct RefillPlan {
    /// Reserved (`Starting`) sandboxes to start for the pool.
    pub starts: Vec<SandboxId>,
    /// Surplus warm sandboxes, already marked `Stopping`, to tear down.
    pub trims: Vec<SandboxId>,
}

/// The sandbox table, the warm queue and the capacity bookkeeping.
pub struct Fleet {
    pub entries: HashMap<SandboxId, Entry>,
    /// Ready, unassigned sandboxes, oldest first.
    pub warm: VecDeque<SandboxId>,
    pub warm_target: u32,
    /// Pool starts in flight.
    pub pool_starting: u32,
    /// Claims waiting for capacity; the pool does not take slots they are waiting for.
    pub waiting_claims: u32,
    /// Consecutive failed pool starts (drives the refill backoff).
    pub pool_failures: u32,
    /// Set by `shutdown`: nothing new starts.
    pub closed: bool,
    max_sandboxes: u32,
    max_sessions: usize,
    workdir_root: PathBuf,
    next_id: u64,
}

impl Fleet {
    pub fn new(
        warm_target: u32,
        max_sandboxes: u32,
        max_sessions: u32,
        workdir_root: PathBuf,
    ) -> Fleet {
        Fleet {
            entries: HashMap::new(),
            warm: VecDeque::new(),
            warm_target,
            pool_starting: 0,
            waiting_claims: 0,
            pool_failures: 0,
            closed: false,
            max_sandboxes,
            max_sessions: max_sessions.max(1) as usize,
            workdir_root,
            next_id: 1,
        }
    }

    /// Free slots under `max_sandboxes` (`u32::MAX` when unlimited). Every entry counts,
    /// stopping ones too: their processes still hold memory until they are gone.
    fn free_slots(&self) -> u32 {
        match self.max_sandboxes {
            0 => u32::MAX,
            max => max.saturating_sub(self.entries.len() as u32),
        }
    }

    /// Inserts a `Starting` entry and returns its id.
    fn reserve(&mut self) -> SandboxId {
        let id = SandboxId::new(format!("sbx-{}", self.next_id));
        self.next_id += 1;
        self.entries.insert(
            id.clone(),
            Entry {
                state: SandboxState::Starting,
                pid: None,
                endpoint: None,
                sessions: Vec::new(),
                created: Instant::now(),
                cgroup: None,
                workdir: self.workdir_root.join(id.as_str()),
                exit: None,
                reap: None,
                customized: false,
                exposed: Vec::new(),
            },
        );
        id
    }

    /// One step of a claim: share, take a warm one, reserve a new one, or wait.
    pub fn claim_step(&mut self, session: &SessionKey) -> ClaimStep {
        if self.max_sessions > 1 {
            let shared = self.entries.iter_mut().find(|(_, e)| {
                e.state == SandboxState::Bound
                    && !e.customized
                    && e.sessions.len() < self.max_sessions
                    && !e.sessions.contains(session)
            });
            if let Some((id, e)) = shared
                && let Some(endpoint) = e.endpoint
            {
                e.sessions.push(session.clone());
                return ClaimStep::Bound(Binding {
                    sandbox: id.clone(),
                    endpoint,
                    kind: ActivationKind::Claim,
                    queued_for_capacity: false,
                });
            }
        }
        while let Some(id) = self.warm.pop_front() {
            if let Some(b) = self.bind(&id, session, ActivationKind::Claim) {
                return ClaimStep::Bound(b);
            }
        }
        if self.free_slots() > 0 {
            return ClaimStep::Start(self.reserve());
        }
        ClaimStep::Wait
    }

    /// One step of a claim whose customisation needs a sandbox of its own: reserve a new
    /// one (marked customised) or wait; warm and shared sandboxes do not qualify.
    pub fn claim_step_customized(&mut self) -> ClaimStep {
        if self.free_slots() == 0 {
            return ClaimStep::Wait;
        }
        let id = self.reserve();
        if let Some(e) = self.entries.get_mut(&id) {
            e.customized = true;
        }
        ClaimStep::Start(id)
    }

    /// Binds a ready sandbox (warm or just started) to `session`.
    pub fn bind(
        &mut self,
        id: &SandboxId,
        session: &SessionKey,
        kind: ActivationKind,
    ) -> Option<Binding> {
        let e = self.entries.get_mut(id)?;
        if !matches!(e.state, SandboxState::Warm | SandboxState::Starting) || e.exited() {
            return None;
        }
        e.state = SandboxState::Bound;
        e.sessions.push(session.clone());
        Some(Binding {
            sandbox: id.clone(),
            endpoint: e.endpoint?,
            kind,
            queued_for_capacity: false,
        })
    }

    /// Puts a ready sandbox in the warm pool.
    pub fn make_warm(&mut self, id: &SandboxId) -> bool {
        match self.entries.get_mut(id) {
            Some(e) if e.state == SandboxState::Starting && !e.exited() && !e.customized => {
                e.state = SandboxState::Warm;
                self.warm.push_back(id.clone());
                true
            }
            _ => false,
        }
    }

    /// Marks a sandbox `Stopping` (dropping it from the warm queue); false if it was
    /// already stopping or unknown.
    pub fn mark_stopping(&mut self, id: &SandboxId) -> bool {
        let Some(e) = self.entries.get_mut(id) else {
            return false;
        };
        if e.state == SandboxState::Stopping {
            return false;
        }
        if e.state == SandboxState::Warm {
            self.warm.retain(|w| w != id);
        }
        e.state = SandboxState::Stopping;
        true
    }

    /// Starts and trims that bring the warm pool to its target within capacity.
    pub fn refill_plan(&mut self) -> RefillPlan {
        let mut plan = RefillPlan {
            starts: Vec::new(),
            trims: Vec::new(),
        };
        if self.closed {
            return plan;
        }
        let have = self.warm.len() as u32 + self.pool_starting;
        if have < self.warm_target {
            let room = self.free_slots().saturating_sub(self.waiting_claims);
            let n = (self.warm_target - have).min(room);
            for _ in 0..n {
                plan.starts.push(self.reserve());
            }
            self.pool_starting += n;
        }
        while self.warm.len() as u32 > self.warm_target {
            // Newest first: the oldest warm sandboxes are claimed first anyway.
            let Some(id) = self.warm.pop_back() else {
                break;
            };
            if let Some(e) = self.entries.get_mut(&id) {
                e.state = SandboxState::Stopping;
            }
            plan.trims.push(id);
        }
        plan
    }

    /// One admin row per sandbox, sorted by id.
    pub fn rows(&self) -> Vec<SandboxInfo> {
        let mut rows: Vec<SandboxInfo> = self
            .entries
            .iter()
            .map(|(id, e)| SandboxInfo {
                id: id.clone(),
                state: e.state,
                sessions: e.sessions.iter().map(SessionKey::short_hash).collect(),
                endpoint: e.endpoint,
                pid: e.pid,
                age_seconds: e.created.elapsed().as_secs_f64(),
            })
            .collect();
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SessionKey {
        SessionKey::parse(s, 128).unwrap()
    }

    fn ready(f: &mut Fleet, id: &SandboxId, port: u16) {
        f.entries.get_mut(id).unwrap().endpoint = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    }

    #[test]
    fn warm_first_then_start_then_wait() {
        let mut f = Fleet::new(1, 2, 1, PathBuf::from("/w"));
        let plan = f.refill_plan();
        assert_eq!(plan.starts.len(), 1);
        let pooled = plan.starts[0].clone();
        ready(&mut f, &pooled, 1);
        f.pool_starting -= 1;
        assert!(f.make_warm(&pooled));
        let ClaimStep::Bound(b) = f.claim_step(&key("a")) else {
            panic!("expected the warm sandbox")
        };
        assert_eq!(b.sandbox, pooled);
        assert!(matches!(f.claim_step(&key("b")), ClaimStep::Start(_)));
        assert!(matches!(f.claim_step(&key("c")), ClaimStep::Wait));
    }

    #[test]
    fn pool_leaves_slots_to_waiting_claims_and_trims_surplus() {
        let mut f = Fleet::new(2, 2, 1, PathBuf::from("/w"));
        f.waiting_claims = 1;
        assert_eq!(f.refill_plan().starts.len(), 1);
        let mut g = Fleet::new(2, 0, 1, PathBuf::from("/w"));
        for id in g.refill_plan().starts {
            ready(&mut g, &id, 1);
            assert!(g.make_warm(&id));
        }
        g.pool_starting = 0;
        g.warm_target = 0;
        let plan = g.refill_plan();
        assert_eq!(plan.trims.len(), 2);
        assert!(g.warm.is_empty());
    }

    #[test]
    fn shared_sandboxes_take_distinct_sessions_up_to_the_limit() {
        let mut f = Fleet::new(0, 1, 2, PathBuf::from("/w"));
        let ClaimStep::Start(id) = f.claim_step(&key("a")) else {
            panic!("expected a start")
        };
        ready(&mut f, &id, 1);
        f.bind(&id, &key("a"), ActivationKind::Create).unwrap();
        assert!(matches!(f.claim_step(&key("b")), ClaimStep::Bound(_)));
        assert!(matches!(f.claim_step(&key("c")), ClaimStep::Wait));
    }

    #[test]
    fn customized_sandboxes_are_never_shared_or_pooled() {
        let mut f = Fleet::new(0, 2, 2, PathBuf::from("/w"));
        let ClaimStep::Start(id) = f.claim_step_customized() else {
            panic!("expected a start")
        };
        ready(&mut f, &id, 1);
        assert!(!f.make_warm(&id));
        f.bind(&id, &key("a"), ActivationKind::Create).unwrap();
        // Sharing is allowed (2 per sandbox), but not of a customised sandbox.
        assert!(matches!(f.claim_step(&key("b")), ClaimStep::Start(_)));
        assert!(matches!(f.claim_step_customized(), ClaimStep::Wait));
    }
}
