//! The tasks of one sandbox's life: the warm-pool refill loop, start (spawn + readiness),
//! the exit watcher that reports losses, and teardown (SIGTERM, SIGKILL, cleanup).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::child::{self, ExitWatch};
use super::{KILL_BOUND, Purpose, REFILL_DELAY, Shared, freezer};
use super::{port, user};
use crate::backend::{
    ActivationKind, BackendError, BackendEvent, LOST_OOM, SandboxId, SandboxState,
};

impl Shared {
    /// Keeps the warm pool at its target: starts missing sandboxes, trims surplus ones,
    /// backs off after failed starts. Ends on shutdown.
    pub(super) async fn refill_loop(self: Arc<Self>) {
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
    pub(super) async fn start(self: Arc<Self>, id: SandboxId, purpose: Purpose) {
        let started = Instant::now();
        let deadline = started + self.start_timeout;
        let mut closed = self.closed.subscribe();
        let launch = match &purpose {
            Purpose::Claim { launch, .. } => launch.clone(),
            Purpose::Pool => None,
        };
        let result = tokio::select! {
            r = self.launch_and_wait(&id, launch.as_deref(), deadline) => r,
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
                (Ok(()), Purpose::Claim { session, reply, .. }) if !reply.is_closed() => {
                    match fleet.bind(&id, &session, ActivationKind::Create) {
                        Some(b) => match reply.send(Ok(b)) {
                            Ok(()) => true,
                            Err(Ok(b)) => {
                                // The claim gave up a moment ago: pool it instead
                                // (a customised one is not pooled: it is torn down).
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
        launch: Option<&child::SessionLaunch>,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let workdir = self.workdir.join(id.as_str());
        let user = self.spec.isolation.as_ref().map(|i| i.user);
        std::fs::create_dir_all(&workdir)
            .and_then(|()| user::chown_to(user, &workdir))
            .map_err(|e| {
                BackendError::StartFailed(format!("cannot create {}: {e}", workdir.display()))
            })?;
        let mut cgroup = self
            .freezer
            .create(id.as_str())
            .map_err(|e| BackendError::StartFailed(format!("cannot create cgroup: {e}")))?;
        if let Some(c) = cgroup.as_mut() {
            let applied = self.limits.apply(c, id.as_str());
            if let Err(e) = applied {
                // Recorded nowhere yet: remove what was created before failing the start.
                c.remove(Instant::now() + KILL_BOUND).await;
                return Err(BackendError::StartFailed(format!(
                    "cannot apply limits: {e}"
                )));
            }
        }
        let cgroup = cgroup.map(Arc::new);
        let procs = match &cgroup {
            Some(c) => c.procs_files().map_err(|e| {
                BackendError::StartFailed(format!("cannot open {}: {e}", c.path().display()))
            })?,
            None => Vec::new(),
        };
        // The cgroup is recorded before the spawn so a failed start still removes it; the
        // port is reserved (as the entry's endpoint) under the same lock it is picked
        // under, so no two sandboxes of this backend are handed one port.
        let exposing = match self.spec.isolation {
            Some(_) => &self.spec.expose_ports[..],
            None => &[],
        };
        let (port, endpoint, exposed) = {
            let mut fleet = self.lock();
            let mut taken: HashSet<u16> = fleet
                .entries
                .values()
                .flat_map(|e| e.endpoint.iter().chain(e.exposed.iter().map(|(_, a)| a)))
                .map(|a| a.port())
                .collect();
            let port = port::pick_free(&taken)?;
            taken.insert(port);
            let mut exposed = Vec::with_capacity(exposing.len());
            for &inner in exposing {
                let host = port::pick_free(&taken)?;
                taken.insert(host);
                exposed.push((inner, SocketAddr::from(([127, 0, 0, 1], host))));
            }
            let endpoint = SocketAddr::from(([127, 0, 0, 1], port));
            let e = fleet
                .entries
                .get_mut(id)
                .ok_or_else(|| BackendError::Lost(id.clone()))?;
            e.cgroup = cgroup.clone();
            e.endpoint = Some(endpoint);
            e.exposed.clone_from(&exposed);
            (port, endpoint, exposed)
        };
        let forwards: Vec<(u16, u16)> = exposed.iter().map(|(p, a)| (a.port(), *p)).collect();
        let launched = child::launch(&self.spec, launch, port, &forwards, &workdir, procs).await?;
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
            e.reap = Some(launched.reap);
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
        .await?;
        // Whoever answered the probe must be this sandbox: a process outside it that took
        // the port between pick and bind would otherwise receive this session's traffic.
        // Blocking /proc reads (the TCP table alone is ~10 ms with thousands of sockets):
        // off the runtime's worker threads.
        let leader = launched.pid;
        let held = tokio::task::spawn_blocking(move || {
            let pids = match &cgroup {
                Some(c) => c.pids(),
                None => child::group_members(leader),
            };
            port::held_by(port, &pids)
        })
        .await
        .unwrap_or(false);
        if !held {
            return Err(BackendError::StartFailed(format!(
                "port {port} answered the readiness probe, but no process of the sandbox \
                 listens on it (another process took the port)"
            )));
        }
        Ok(())
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
            let (lost, cgroup) = {
                let mut fleet = this.lock();
                let (state, cgroup) = match fleet.entries.get(&id) {
                    Some(e) => (e.state, e.cgroup.clone()),
                    None => return,
                };
                match state {
                    // Their owners (start, teardown) see the exit themselves.
                    SandboxState::Starting | SandboxState::Stopping => return,
                    s => {
                        fleet.mark_stopping(&id);
                        this.publish(&fleet);
                        (s != SandboxState::Warm, cgroup)
                    }
                }
            };
            let oom = cgroup
                .and_then(|c| this.limits.oom_kills(&c, id.as_str()))
                .filter(|n| *n > 0);
            if lost {
                let reason = match oom {
                    Some(n) => format!(
                        "{LOST_OOM}: {n} process(es) OOM-killed at backend.memory_max ({} \
                         bytes); process {how}",
                        this.limits.memory_max().unwrap_or("?")
                    ),
                    None => format!("process {how}"),
                };
                tracing::warn!(sandbox = %id, exit = %how, oom_kills = oom.unwrap_or(0), "sandbox died");
                let _ = this.events.send(BackendEvent::Lost {
                    sandbox: id.clone(),
                    reason,
                });
            } else {
                tracing::warn!(sandbox = %id, exit = %how, "warm sandbox died; replacing it");
            }
            this.teardown(id).await;
        }
    }

    /// Stops sandbox `id` (SIGTERM to its group, SIGKILL after `stop_grace`), removes its
    /// cgroup and workdir, and drops it from the table.
    pub(super) async fn teardown(self: Arc<Self>, id: SandboxId) {
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
            // Every OOM kill of the sandbox's life, counted once, before its cgroup goes.
            if let Some(n) = self.limits.oom_kills(c, id.as_str()).filter(|n| *n > 0) {
                self.metrics.sandbox_oom_kills_total.inc_by(n);
            }
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
