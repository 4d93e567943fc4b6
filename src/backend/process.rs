//! `ProcessBackend`: sandboxes as local child processes, frozen by cgroup or signal.
//!
//! Each sandbox is a child started from `backend.command` in its own process group, its
//! own cgroup (when one is writable) and its own working directory
//! `backend.workdir_root/<instance>/<id>`. A refill task keeps `warm_pool` ready sandboxes;
//! a watcher task per child turns an unexpected exit into [`BackendEvent::Lost`].
//!
//! Layout: [`fleet`] is the table (pure data under one mutex), [`child`] spawns and probes
//! one process, [`freezer`] freezes and kills trees, [`instance`] names this backend and
//! sweeps what a crashed predecessor left.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::{Notify, broadcast, oneshot, watch};
use tokio::time::Instant;

use super::{
    ActivationKind, BackendError, BackendEvent, Binding, Capabilities, ClaimBudget, SandboxBackend,
    SandboxId, SandboxInfo, SandboxState,
};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::session::SessionKey;

mod child;
mod fleet;
mod freezer;
mod instance;

use child::{ExitWatch, LaunchSpec};
use fleet::{ClaimStep, Fleet};
pub use freezer::FreezerMode;
use instance::Instance;

/// How long a freeze may take before the pause is abandoned (and the sandbox thawed).
const FREEZE_BOUND: Duration = Duration::from_secs(5);
/// Pause between a claim and the refill it triggers.
const REFILL_DELAY: Duration = Duration::from_millis(50);
/// How long a SIGKILLed tree may take to disappear.
const KILL_BOUND: Duration = Duration::from_secs(5);

/// Local child processes as sandboxes.
pub struct ProcessBackend {
    shared: Arc<Shared>,
}

struct Shared {
    spec: LaunchSpec,
    freezer: freezer::Freezer,
    /// `backend.workdir_root/<instance>`.
    workdir: PathBuf,
    /// Bound on one sandbox start when no claim is waiting for it (`activation.timeout`).
    start_timeout: Duration,
    stop_grace: Duration,
    fleet: Mutex<Fleet>,
    /// Capacity freed or a warm sandbox appeared: waiting claims re-check.
    freed: Notify,
    /// The pool may be below (or above) its target.
    refill: Notify,
    closed: watch::Sender<bool>,
    events: broadcast::Sender<BackendEvent>,
    metrics: Arc<Metrics>,
}

/// Why a sandbox is being started.
enum Purpose {
    Pool,
    Claim {
        session: SessionKey,
        reply: oneshot::Sender<Result<Binding, BackendError>>,
    },
}

impl ProcessBackend {
    /// Sweeps leftovers of crashed predecessors, picks the freezer (`backend.freezer`),
    /// creates this instance's working directory and starts the warm-pool refill task.
    /// Must be called inside a Tokio runtime.
    pub async fn new(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<ProcessBackend, ConfigError> {
        let b = &config.backend;
        let root = b.workdir_root.clone();
        let sweep_root = root.clone();
        let swept = tokio::task::spawn_blocking(move || instance::sweep_leftovers(&sweep_root))
            .await
            .unwrap_or(0);
        if swept > 0 {
            tracing::warn!(swept, "killed sandboxes left by a previous activator run");
        }
        let instance = Instance::new();
        let freezer = freezer::Freezer::detect(b.freezer, instance.as_str())
            .map_err(|e| ConfigError::invalid("backend.freezer", e))?;
        let workdir = root.join(instance.as_str());
        std::fs::create_dir_all(&workdir).map_err(|e| {
            ConfigError::invalid(
                "backend.workdir_root",
                format!("cannot create {}: {e}", workdir.display()),
            )
        })?;
        let self_exe = std::env::current_exe()
            .map_err(|e| ConfigError::invalid("backend.command", format!("{{self}}: {e}")))?;
        tracing::info!(freezer = freezer.mode().as_str(), workdir = %workdir.display(),
            warm_pool = b.warm_pool, "process backend ready");
        let shared = Arc::new(Shared {
            spec: LaunchSpec {
                argv: b.command.clone(),
                env: b.env.clone(),
                ready_path: b.ready_path.clone(),
                self_exe,
            },
            freezer,
            workdir: workdir.clone(),
            start_timeout: config.activation.timeout.as_duration(),
            stop_grace: b.stop_grace.as_duration(),
            fleet: Mutex::new(Fleet::new(
                b.warm_pool,
                b.max_sandboxes,
                config.session.max_sessions_per_sandbox,
                workdir,
            )),
            freed: Notify::new(),
            refill: Notify::new(),
            closed: watch::channel(false).0,
            events: broadcast::channel(256).0,
            metrics,
        });
        tokio::spawn(shared.clone().refill_loop());
        Ok(ProcessBackend { shared })
    }

    /// The freeze mechanism in force.
    pub fn freezer_mode(&self) -> FreezerMode {
        self.shared.freezer.mode()
    }

    /// Whether the freezer reports `sandbox` frozen (`None` if unknown or not running).
    pub fn is_frozen(&self, sandbox: &SandboxId) -> Option<bool> {
        let (cgroup, pid) = {
            let fleet = self.shared.lock();
            let e = fleet.entries.get(sandbox)?;
            (e.cgroup.clone(), e.pid?)
        };
        Some(freezer::is_frozen(cgroup.as_deref(), pid))
    }
}

impl Drop for ProcessBackend {
    /// Backstop for a backend dropped without `shutdown()`: SIGKILL every sandbox tree so
    /// nothing outlives it (workdirs stay until the next sweep after this process ends).
    fn drop(&mut self) {
        let mut fleet = self.shared.lock();
        if fleet.closed {
            return;
        }
        fleet.closed = true;
        for e in fleet.entries.values() {
            if let Some(pid) = e.pid {
                child::signal_group(pid, Signal::SIGKILL);
            }
            if let Some(c) = &e.cgroup {
                c.kill_all();
            }
        }
        self.shared.closed.send_replace(true);
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Fleet> {
        // Nothing panics while holding the lock; recover the data if something did.
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `activator_warm_pool_ready` current between scrapes (the admin server also
    /// refreshes it, with `activator_sandboxes{state}`, at scrape time).
    fn publish(&self, fleet: &Fleet) {
        self.metrics.warm_pool_ready.set(fleet.warm.len() as i64);
    }

    /// Keeps the warm pool at its target: starts missing sandboxes, trims surplus ones,
    /// backs off after failed starts. Ends on shutdown.
    async fn refill_loop(self: Arc<Self>) {
        let mut closed = self.closed.subscribe();
        loop {
            let failures = self.lock().pool_failures;
            if failures > 0 {
                let backoff = Duration::from_millis(100 << failures.min(7));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closed.wait_for(|c| *c) => return,
                }
            }
            let plan = self.lock().refill_plan();
            for id in plan.starts {
                tokio::spawn(self.clone().start(id, Purpose::Pool));
            }
            for id in plan.trims {
                tokio::spawn(self.clone().teardown(id));
            }
            self.publish(&self.lock());
            let notified = tokio::select! {
                _ = self.refill.notified() => true,
                // Re-check now and then: a failed start or a missed wake-up heals here.
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                _ = closed.wait_for(|c| *c) => return,
            };
            if notified {
                // Let the request that just claimed get its first response before new
                // children start competing for CPU (a start costs milliseconds of CPU;
                // a burst of claims coalesces into one plan).
                tokio::time::sleep(REFILL_DELAY).await;
            }
        }
    }

    /// Starts sandbox `id` (reserved as `Starting`) and hands it to `purpose` when ready.
    async fn start(self: Arc<Self>, id: SandboxId, purpose: Purpose) {
        let started = Instant::now();
        let deadline = started + self.start_timeout;
        let mut closed = self.closed.subscribe();
        let result = tokio::select! {
            r = self.launch_and_wait(&id, deadline) => r,
            _ = closed.wait_for(|c| *c) => Err(BackendError::NoCapacity("shutting down".into())),
        };
        let is_pool = matches!(purpose, Purpose::Pool);
        let handed = {
            let mut fleet = self.lock();
            if is_pool {
                fleet.pool_starting = fleet.pool_starting.saturating_sub(1);
            }
            let outcome = match (&result, purpose) {
                (Err(e), Purpose::Claim { reply, .. }) => {
                    let _ = reply.send(Err(e.clone()));
                    false
                }
                (Err(_), Purpose::Pool) => false,
                (Ok(()), _) if fleet.closed => false,
                (Ok(()), Purpose::Claim { session, reply }) if !reply.is_closed() => {
                    match fleet.bind(&id, &session, ActivationKind::Create) {
                        Some(b) => match reply.send(Ok(b)) {
                            Ok(()) => true,
                            Err(Ok(b)) => {
                                // The claim gave up a moment ago: pool it instead.
                                if let Some(e) = fleet.entries.get_mut(&b.sandbox) {
                                    e.state = SandboxState::Starting;
                                    e.sessions.clear();
                                }
                                fleet.make_warm(&id)
                            }
                            Err(Err(_)) => false,
                        },
                        None => {
                            let _ = reply.send(Err(BackendError::StartFailed(
                                "the sandbox exited right after becoming ready".into(),
                            )));
                            false
                        }
                    }
                }
                // A pool start, or a claim that timed out meanwhile: keep it warm.
                (Ok(()), _) => fleet.make_warm(&id),
            };
            match (&result, is_pool) {
                (Ok(()), true) if outcome => fleet.pool_failures = 0,
                (Err(_), true) => fleet.pool_failures += 1,
                _ => {}
            }
            self.publish(&fleet);
            outcome
        };
        match &result {
            Ok(()) if handed => {
                tracing::debug!(sandbox = %id, took = ?started.elapsed(), "sandbox ready");
                self.freed.notify_waiters();
            }
            _ => {
                match &result {
                    Err(_) if *closed.borrow() => {}
                    Err(e) => tracing::warn!(sandbox = %id, error = %e, "sandbox start failed"),
                    Ok(()) => {}
                }
                self.teardown(id).await;
            }
        }
    }

    /// Creates the workdir and cgroup, spawns the child, records it, and probes it ready.
    async fn launch_and_wait(
        self: &Arc<Self>,
        id: &SandboxId,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let workdir = self.workdir.join(id.as_str());
        std::fs::create_dir_all(&workdir).map_err(|e| {
            BackendError::StartFailed(format!("cannot create {}: {e}", workdir.display()))
        })?;
        let cgroup = self
            .freezer
            .create(id.as_str())
            .map_err(|e| BackendError::StartFailed(format!("cannot create cgroup: {e}")))?
            .map(Arc::new);
        let procs = match &cgroup {
            Some(c) => Some(c.procs_file().map_err(|e| {
                BackendError::StartFailed(format!("cannot open {}: {e}", c.path().display()))
            })?),
            None => None,
        };
        // Recorded before the spawn so a failed start still removes the cgroup.
        if let Some(e) = self.lock().entries.get_mut(id) {
            e.cgroup = cgroup;
        }
        let port = child::pick_port()?;
        let endpoint = SocketAddr::from(([127, 0, 0, 1], port));
        let launched = child::launch(&self.spec, port, &workdir, procs).await?;
        let mut exit = launched.exit.clone();
        {
            let mut fleet = self.lock();
            let e = fleet
                .entries
                .get_mut(id)
                .ok_or_else(|| BackendError::Lost(id.clone()))?;
            e.pid = Some(launched.pid);
            e.endpoint = Some(endpoint);
            e.exit = Some(launched.exit.clone());
        }
        tokio::spawn(self.watch_exit(id.clone(), launched.exit));
        child::wait_ready(
            endpoint,
            &self.spec.ready_path,
            &mut exit,
            &workdir,
            deadline,
            self.start_timeout,
        )
        .await
    }

    /// Waits for the child of `id` to exit; an exit nobody asked for is a loss.
    fn watch_exit(
        self: &Arc<Self>,
        id: SandboxId,
        mut exit: ExitWatch,
    ) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        async move {
            let how = match exit.wait_for(Option::is_some).await {
                Ok(how) => how.clone().unwrap_or_default(),
                Err(_) => "exit watcher dropped".into(),
            };
            let lost = {
                let mut fleet = this.lock();
                let state = fleet.entries.get(&id).map(|e| e.state);
                match state {
                    // Their owners (start, teardown) see the exit themselves.
                    None | Some(SandboxState::Starting | SandboxState::Stopping) => return,
                    Some(s) => {
                        fleet.mark_stopping(&id);
                        this.publish(&fleet);
                        s != SandboxState::Warm
                    }
                }
            };
            if lost {
                tracing::warn!(sandbox = %id, exit = %how, "sandbox died");
                let _ = this.events.send(BackendEvent::Lost {
                    sandbox: id.clone(),
                    reason: format!("process {how}"),
                });
            } else {
                tracing::warn!(sandbox = %id, exit = %how, "warm sandbox died; replacing it");
            }
            this.teardown(id).await;
        }
    }

    /// Stops sandbox `id` (SIGTERM to its group, SIGKILL after `stop_grace`), removes its
    /// cgroup and workdir, and drops it from the table.
    async fn teardown(self: Arc<Self>, id: SandboxId) {
        let (pid, cgroup, exit, workdir, paused) = {
            let mut fleet = self.lock();
            let Some(e) = fleet.entries.get(&id) else {
                return;
            };
            let paused = e.state == SandboxState::Paused;
            let taken = (
                e.pid,
                e.cgroup.clone(),
                e.exit.clone(),
                e.workdir.clone(),
                paused,
            );
            fleet.mark_stopping(&id);
            self.publish(&fleet);
            taken
        };
        if let Some(pid) = pid {
            if paused {
                // A frozen process cannot act on SIGTERM.
                let _ = freezer::thaw(cgroup.as_deref(), pid);
            }
            child::signal_group(pid, Signal::SIGTERM);
            let gone = wait_exit(exit.clone(), self.stop_grace).await;
            // Always: the group or cgroup may hold grandchildren after the leader exits.
            child::signal_group(pid, Signal::SIGKILL);
            if let Some(c) = &cgroup {
                c.kill_all();
            }
            if !gone && !wait_exit(exit, KILL_BOUND).await {
                tracing::error!(sandbox = %id, pid, "sandbox survived SIGKILL");
            }
            if cgroup.is_none() {
                // Signal mode: wait (bounded) for the rest of the group to die too. In
                // cgroup modes removing the cgroup below waits for it to empty.
                let end = Instant::now() + KILL_BOUND;
                while !child::group_gone(pid) && Instant::now() < end {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        if let Some(c) = &cgroup {
            c.remove(Instant::now() + KILL_BOUND).await;
        }
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(workdir)).await;
        {
            let mut fleet = self.lock();
            fleet.entries.remove(&id);
            self.publish(&fleet);
        }
        self.freed.notify_waiters();
        self.refill.notify_one();
    }
}

/// Waits until the exit watch fires, at most `bound`. True if the process is gone.
async fn wait_exit(exit: Option<ExitWatch>, bound: Duration) -> bool {
    let Some(mut exit) = exit else { return true };
    tokio::time::timeout(bound, exit.wait_for(Option::is_some))
        .await
        .is_ok()
}

/// Builds the backend from `backend.*` (the `BackendKind::Process` arm of `backend::build`).
pub async fn build(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Arc<ProcessBackend>, ConfigError> {
    ProcessBackend::new(config, metrics.clone())
        .await
        .map(Arc::new)
}

/// Decrements the waiting-claims count when a waiting claim ends, however it ends.
struct WaitingClaim<'a>(&'a Shared);

impl Drop for WaitingClaim<'_> {
    fn drop(&mut self) {
        let mut fleet = self.0.lock();
        fleet.waiting_claims = fleet.waiting_claims.saturating_sub(1);
    }
}

#[async_trait]
impl SandboxBackend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            pause_keeps: "memory, open files, listening port, working directory",
        }
    }

    async fn claim(
        &self,
        session: &SessionKey,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        let s = &self.shared;
        let mut waiting: Option<WaitingClaim<'_>> = None;
        loop {
            // Register for wake-ups before looking, so a release in between is not missed.
            let freed = s.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let step = {
                let mut fleet = s.lock();
                if fleet.closed {
                    return Err(BackendError::NoCapacity(
                        "the backend is shutting down".into(),
                    ));
                }
                let step = fleet.claim_step(session);
                s.publish(&fleet);
                step
            };
            match step {
                ClaimStep::Bound(b) => {
                    s.refill.notify_one();
                    return Ok(b);
                }
                ClaimStep::Start(id) => {
                    drop(waiting.take());
                    let (reply, rx) = oneshot::channel();
                    let purpose = Purpose::Claim {
                        session: session.clone(),
                        reply,
                    };
                    tokio::spawn(s.clone().start(id, purpose));
                    let budget_len = budget.deadline.saturating_duration_since(Instant::now());
                    return match tokio::time::timeout_at(budget.deadline, rx).await {
                        Ok(Ok(result)) => result,
                        Ok(Err(_)) => Err(BackendError::StartFailed("start task ended".into())),
                        Err(_) => Err(BackendError::Timeout(budget_len)),
                    };
                }
                ClaimStep::Wait => {
                    if waiting.is_none() {
                        s.lock().waiting_claims += 1;
                        waiting = Some(WaitingClaim(s));
                    }
                    if tokio::time::timeout_at(budget.admission_deadline, freed)
                        .await
                        .is_err()
                    {
                        return Err(BackendError::NoCapacity(
                            "backend.max_sandboxes reached and none freed in time".into(),
                        ));
                    }
                }
            }
        }
    }

    async fn resume(
        &self,
        sandbox: &SandboxId,
        _deadline: Instant,
    ) -> Result<SocketAddr, BackendError> {
        let s = &self.shared;
        let mut fleet = s.lock();
        let lost = || BackendError::Lost(sandbox.clone());
        let e = fleet.entries.get_mut(sandbox).ok_or_else(lost)?;
        let endpoint = e.endpoint.ok_or_else(lost)?;
        match e.state {
            SandboxState::Bound => Ok(endpoint),
            SandboxState::Paused => {
                let pid = e.pid.ok_or_else(lost)?;
                // Thawing is one cgroupfs write (or a signal): done under the lock so a
                // concurrent pause cannot interleave; it takes microseconds.
                freezer::thaw(e.cgroup.as_deref(), pid).map_err(BackendError::ControlPlane)?;
                e.state = SandboxState::Bound;
                s.publish(&fleet);
                Ok(endpoint)
            }
            SandboxState::Starting | SandboxState::Warm | SandboxState::Stopping => Err(lost()),
        }
    }

    async fn pause(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let s = &self.shared;
        let lost = || BackendError::Lost(sandbox.clone());
        let (cgroup, pid) = {
            let fleet = s.lock();
            let e = fleet.entries.get(sandbox).ok_or_else(lost)?;
            match e.state {
                SandboxState::Paused => return Ok(()),
                SandboxState::Bound => (e.cgroup.clone(), e.pid.ok_or_else(lost)?),
                _ => return Err(lost()),
            }
        };
        freezer::freeze(cgroup.as_deref(), pid, Instant::now() + FREEZE_BOUND)
            .await
            .map_err(|e| BackendError::ControlPlane(format!("freezing {sandbox}: {e}")))?;
        let mut fleet = s.lock();
        match fleet.entries.get_mut(sandbox) {
            Some(e) if e.state == SandboxState::Bound => {
                e.state = SandboxState::Paused;
                s.publish(&fleet);
                Ok(())
            }
            // Released or died while freezing: the teardown owns it now.
            _ => Err(lost()),
        }
    }

    async fn release(&self, session: &SessionKey, sandbox: &SandboxId) -> Result<(), BackendError> {
        let s = &self.shared;
        let stop = {
            let mut fleet = s.lock();
            let Some(e) = fleet.entries.get_mut(sandbox) else {
                return Ok(());
            };
            e.sessions.retain(|k| k != session);
            // A sandbox that served a session is never pooled again: its state is dirty.
            e.sessions.is_empty() && matches!(e.state, SandboxState::Bound | SandboxState::Paused)
        };
        if stop {
            tokio::spawn(s.clone().teardown(sandbox.clone()));
        }
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.shared.events.subscribe()
    }

    fn sandboxes(&self) -> Vec<SandboxInfo> {
        self.shared.lock().rows()
    }

    async fn set_warm_pool_target(&self, target: u32) -> Result<(), BackendError> {
        self.shared.lock().warm_target = target;
        self.shared.refill.notify_one();
        Ok(())
    }

    async fn shutdown(&self) {
        let s = &self.shared;
        let running: Vec<SandboxId> = {
            let mut fleet = s.lock();
            fleet.closed = true;
            fleet
                .entries
                .iter()
                .filter(|(_, e)| e.state != SandboxState::Starting)
                .map(|(id, _)| id.clone())
                .collect()
        };
        // Starts in flight see `closed` and tear themselves down.
        s.closed.send_replace(true);
        futures_util::future::join_all(running.into_iter().map(|id| s.clone().teardown(id))).await;
        let deadline = Instant::now() + s.stop_grace + KILL_BOUND;
        loop {
            let freed = s.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if s.lock().entries.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                tracing::error!("sandboxes still stopping at the end of shutdown");
                break;
            }
        }
        s.freezer.remove_instance_dir();
        let _ = std::fs::remove_dir(&s.workdir);
    }
}
