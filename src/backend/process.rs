//! `ProcessBackend`: sandboxes as local child processes, frozen by cgroup or signal.
//!
//! Each sandbox is a child started from `backend.command` in its own process group, its
//! own cgroup (when one is writable) and its own working directory
//! `backend.workdir_root/<instance>/<id>`. A refill task keeps `warm_pool` ready sandboxes;
//! a watcher task per child turns an unexpected exit into [`BackendEvent::Lost`].
//!
//! Layout: `fleet` is the table (pure data under one mutex), `lifecycle` the tasks that
//! start, watch and stop sandboxes, `child` spawns and probes one process, `freezer`
//! freezes and kills trees, `instance` names this backend and sweeps what a crashed
//! predecessor left.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::{Notify, broadcast, oneshot, watch};
use tokio::time::Instant;

use super::{
    BackendError, BackendEvent, Binding, Capabilities, ClaimBudget, ClaimSpec, DeepPause,
    SandboxBackend, SandboxId, SandboxInfo, SandboxState,
};
use crate::config::{Config, ConfigError, IsolationKind};
use crate::lock::MutexExt;
use crate::metrics::Metrics;
use crate::session::SessionKey;

mod child;
mod claim;
mod fleet;
mod freezer;
mod instance;
mod isolation;
mod lifecycle;
mod limits;
mod network;
mod port;
mod reaper;
mod user;

use child::{LaunchSpec, SessionLaunch};
use fleet::Fleet;
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
    /// Kills the sandboxes' whole trees if this process dies without shutting down;
    /// `None` in signal mode or where `sh` could not be started.
    _reaper: Option<reaper::Reaper>,
}

struct Shared {
    spec: LaunchSpec,
    freezer: freezer::Freezer,
    /// `backend.memory_max`, `pids_max`, `cpu_weight`, and where each is enforced.
    limits: limits::Limits,
    /// `backend.workdir_root/<instance>`.
    workdir: PathBuf,
    /// `backend.volumes_root`: per-session volumes, kept across sandboxes and restarts.
    volumes_root: PathBuf,
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
        /// The session's env and volumes, for a sandbox started for it alone.
        launch: Option<Arc<SessionLaunch>>,
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
        let isolation = match b.isolation {
            IsolationKind::None => None,
            kind => {
                let auto = kind == IsolationKind::Auto;
                let detected = match isolation_settings(config, &workdir) {
                    Ok(settings) => isolation::Isolation::detect(auto, settings)
                        .await
                        .map_err(|e| ConfigError::invalid("backend.isolation", e)),
                    // `auto` degrades where isolation cannot be set up at all (say, not
                    // root and another sandbox user), like a failed trial.
                    Err(e) if auto => {
                        tracing::warn!(reason = %e, "backend.isolation: auto: sandboxes run \
                            without namespace isolation");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                };
                detected.inspect_err(|_| {
                    freezer.remove_instance_dir();
                    let _ = std::fs::remove_dir_all(&workdir);
                })?
            }
        };
        if isolation.is_none() && !exposed_ports(config).is_empty() {
            tracing::warn!(
                "backend.expose_ports: sandboxes are not isolated (no network \
                namespace of their own), so their ports are not forwarded"
            );
        }
        let limits = limits::Limits::detect(
            &limits::Requested::of(b, isolation.is_some()),
            freezer.mode(),
            freezer.instance_dir(),
            instance.as_str(),
        )
        .inspect_err(|_| {
            freezer.remove_instance_dir();
            let _ = std::fs::remove_dir_all(&workdir);
        })?;
        if let Some(iso) = &isolation {
            for (i, v) in config.customize.volumes.iter().enumerate() {
                if !iso.can_mount_at(&v.mount_path) {
                    return Err(ConfigError::invalid(
                        format!("customize.volumes[{i}].mount_path"),
                        format!(
                            "{} does not exist on the host and lies in a read-only part of \
                             the sandbox's view: use a path whose first component is not a \
                             host directory (e.g. /workspace), or create it on the host",
                            v.mount_path
                        ),
                    ));
                }
            }
        }
        if !config.customize.labels.is_empty() {
            tracing::info!("customize.labels: the process backend has no pods to label; ignored");
        }
        let self_exe = std::env::current_exe()
            .map_err(|e| ConfigError::invalid("backend.command", format!("{{self}}: {e}")))?;
        tracing::info!(freezer = freezer.mode().as_str(), workdir = %workdir.display(),
            warm_pool = b.warm_pool, isolated = isolation.is_some(), "process backend ready");
        let shared = Arc::new(Shared {
            spec: LaunchSpec {
                argv: b.command.clone(),
                env: b.env.clone(),
                inherit_env: b.inherit_env,
                ready_path: b.ready_path.clone(),
                self_exe,
                isolation,
                expose_ports: exposed_ports(config),
            },
            freezer,
            limits,
            workdir: workdir.clone(),
            volumes_root: b.volumes_root.clone(),
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
        let reaper = shared.freezer.instance_dir().and_then(|dir| {
            reaper::Reaper::spawn(dir)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "no reaper: if this process is killed, \
                        sandbox subprocesses survive until the next run sweeps them");
                })
                .ok()
        });
        tokio::spawn(shared.clone().refill_loop());
        Ok(ProcessBackend {
            shared,
            _reaper: reaper,
        })
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
        self.fleet.lock_recovered()
    }

    /// Keeps `activator_warm_pool_ready` current between scrapes (the admin server also
    /// refreshes it, with `activator_sandboxes{state}`, at scrape time).
    fn publish(&self, fleet: &Fleet) {
        self.metrics.warm_pool_ready.set(fleet.warm.len() as i64);
    }
}

/// The sandbox ports forwarded per sandbox: `backend.expose_ports` plus this pool's
/// `preview.ports` (a preview URL needs its port reachable), each once.
fn exposed_ports(config: &Config) -> Vec<u16> {
    let mut ports = config.backend.expose_ports.clone();
    for p in config.preview.iter().flat_map(|p| &p.ports) {
        if !ports.contains(p) {
            ports.push(*p);
        }
    }
    ports
}

/// What isolation needs from the config: the sandbox user, network, read-only additions
/// and the activator's secret files (never bound into a sandbox).
fn isolation_settings<'a>(
    config: &'a Config,
    instance_dir: &'a std::path::Path,
) -> Result<isolation::IsolationSettings<'a>, ConfigError> {
    let b = &config.backend;
    let user = user::SandboxUser::resolve(&b.sandbox_user)
        .map_err(|e| ConfigError::invalid("backend.sandbox_user", e))?;
    let network = network::Network::new(&b.pasta, b.egress)
        .map_err(|e| ConfigError::invalid("backend.egress", e))?;
    let denied: Vec<PathBuf> = config
        .session
        .hmac
        .keys
        .iter()
        .map(|k| k.secret_file.clone())
        .chain(config.admin.auth.bearer_token_file.clone())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .collect();
    for (i, p) in b.ro_paths.iter().enumerate() {
        let key = format!("backend.ro_paths[{i}]");
        let real = std::fs::canonicalize(p)
            .map_err(|e| ConfigError::invalid(&key, format!("{}: {e}", p.display())))?;
        if let Some(secret) = denied.iter().find(|d| d.starts_with(&real)) {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{} holds the activator's secret {}: sandboxes must never see it",
                    p.display(),
                    secret.display()
                ),
            ));
        }
    }
    Ok(isolation::IsolationSettings {
        bwrap: &b.bwrap,
        network,
        user,
        ro_paths: &b.ro_paths,
        denied,
        instance_dir,
    })
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
        self.shared.claim(session, None, budget).await
    }

    /// Env and volumes need a sandbox started for the session (`ActivationKind::Create`);
    /// labels and sidecars mean nothing locally, so a spec with only those claims plainly.
    async fn claim_with(
        &self,
        session: &SessionKey,
        spec: &ClaimSpec,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        if !spec.forces_cold_start() {
            return self.shared.claim(session, None, budget).await;
        }
        let launch = self.shared.session_launch(session, spec).await?;
        self.shared
            .claim(session, Some(Arc::new(launch)), budget)
            .await
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

    /// Stops the paused process (its memory goes with it) and waits until it is gone;
    /// the session's next request gets a new sandbox.
    async fn deep_pause(
        &self,
        session: &SessionKey,
        sandbox: &SandboxId,
    ) -> Result<DeepPause, BackendError> {
        let s = &self.shared;
        let stop = {
            let mut fleet = s.lock();
            let Some(e) = fleet.entries.get_mut(sandbox) else {
                return Err(BackendError::Lost(sandbox.clone()));
            };
            e.sessions.retain(|k| k != session);
            e.sessions.is_empty() && matches!(e.state, SandboxState::Bound | SandboxState::Paused)
        };
        if stop {
            s.clone().teardown(sandbox.clone()).await;
        }
        Ok(DeepPause::Stopped)
    }

    /// `backend.expose_ports`: the per-sandbox host-loopback port forwarded to `port` in
    /// the sandbox's network namespace; `None` for a port not exposed or a sandbox not
    /// running (or not isolated).
    fn port_endpoint(&self, sandbox: &SandboxId, port: u16) -> Option<SocketAddr> {
        let fleet = self.shared.lock();
        let e = fleet.entries.get(sandbox)?;
        if e.pid.is_none() || e.state == SandboxState::Stopping {
            return None;
        }
        e.exposed
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, addr)| *addr)
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
        s.limits.remove_instance_dirs();
        // Empty by now but for the generated /etc of isolated sandboxes.
        let _ = std::fs::remove_dir_all(s.workdir.join("etc"));
        let _ = std::fs::remove_dir(&s.workdir);
    }
}
