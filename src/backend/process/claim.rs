//! The process backend's claim: warm or shared when nothing is customised, a sandbox of
//! its own (with the session's env and volumes) when something is.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::child::{SessionLaunch, VolumeMount};
use super::fleet::ClaimStep;
use super::user::{SandboxUser, chown_to};
use super::{Purpose, Shared, WaitingClaim};
use crate::backend::{BackendError, Binding, ClaimBudget, ClaimSpec};
use crate::customize::VOLUME_HASH_CHARS;
use crate::session::SessionKey;

impl Shared {
    /// Binds a sandbox to `session`: with `launch`, a new one started with it; without, a
    /// warm or shared one first. Waits for capacity until `budget.admission_deadline`.
    pub(super) async fn claim(
        self: &Arc<Self>,
        session: &SessionKey,
        mut launch: Option<Arc<SessionLaunch>>,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        let s = self;
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
                let step = match &launch {
                    Some(_) => fleet.claim_step_customized(),
                    None => fleet.claim_step(session),
                };
                s.publish(&fleet);
                step
            };
            match step {
                ClaimStep::Bound(b) => {
                    s.refill.notify_one();
                    return Ok(Binding {
                        queued_for_capacity: waiting.is_some(),
                        ..b
                    });
                }
                ClaimStep::Start(id) => {
                    drop(waiting.take());
                    let (reply, rx) = oneshot::channel();
                    let purpose = Purpose::Claim {
                        session: session.clone(),
                        launch: launch.take(),
                        reply,
                    };
                    tokio::spawn(s.clone().start(id, purpose));
                    let budget_len = budget.deadline.saturating_duration_since(Instant::now());
                    let queued = waiting.is_some();
                    return match tokio::time::timeout_at(budget.deadline, rx).await {
                        Ok(Ok(result)) => result.map(|b| Binding {
                            queued_for_capacity: queued,
                            ..b
                        }),
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

    /// The session's env and volumes; creates its volume directories (kept after release:
    /// the next sandbox of the session gets the same files).
    pub(super) async fn session_launch(
        &self,
        session: &SessionKey,
        spec: &ClaimSpec,
    ) -> Result<SessionLaunch, BackendError> {
        let dir = self
            .volumes_root
            .join(&session.sha256_hex()[..VOLUME_HASH_CHARS]);
        let mut volumes = Vec::with_capacity(spec.volumes.len());
        let user = self.spec.isolation.as_ref().map(|i| i.user);
        for v in &spec.volumes {
            let host = dir.join(&v.name);
            create_private_dir(&host, &dir, user).await?;
            volumes.push(VolumeMount {
                env: volume_env(&v.name),
                host,
                mount_path: v.mount_path.clone(),
            });
        }
        Ok(SessionLaunch {
            env: spec
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect(),
            volumes,
        })
    }
}

/// `ACTIVATOR_VOLUME_<NAME>`: the volume's name upper-cased, `-` as `_`.
pub(super) fn volume_env(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| match c {
            '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("ACTIVATOR_VOLUME_{upper}")
}

/// Creates `dir` (and its parents) readable by its owner only; isolated, the session's
/// directory `session_dir` and the volume belong to the sandbox user (which reaches them
/// only through its own bind mounts: other sandboxes never see `backend.volumes_root`).
async fn create_private_dir(
    dir: &Path,
    session_dir: &Path,
    user: Option<SandboxUser>,
) -> Result<(), BackendError> {
    let path = dir.to_path_buf();
    let session_dir = session_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::DirBuilderExt;
        // `volumes_root` itself with the default mode: the sandbox user (bubblewrap binds
        // as that user) must traverse it; the per-session directories are private.
        if let Some(root) = session_dir.parent() {
            std::fs::create_dir_all(root)
                .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .and_then(|()| chown_to(user, &session_dir))
            .and_then(|()| chown_to(user, &path))
            .map_err(|e| format!("cannot create volume {}: {e}", path.display()))
    })
    .await
    .map_err(|e| BackendError::StartFailed(e.to_string()))?
    .map_err(BackendError::StartFailed)
}
