//! `TickStore`: where the last fired tick of each schedule is recorded, in a local file or
//! in an annotation on the leader-election Lease.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

use super::lease::{CONFLICT_ATTEMPTS, is_conflict};
use crate::lock::MutexExt;

/// Annotation on the Lease holding the schedules' last fired ticks (JSON name -> RFC 3339).
pub const TICKS_ANNOTATION: &str = "agent-activator.dev/schedule-ticks";

/// File under `backend.workdir_root` that records fired schedule ticks without Kubernetes.
pub const SCHEDULE_STATE_FILE: &str = "schedule-state.json";

/// Why a tick could not be recorded (the tick is then not fired).
#[derive(Debug, thiserror::Error)]
pub enum TickStoreError {
    #[error("schedule state file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("schedule state in the Lease: {0}")]
    Lease(String),
}

/// Records fired ticks so each fires once, across restarts and leader changes.
#[async_trait]
pub trait TickStore: Send + Sync + 'static {
    /// Records `tick` as fired for `schedule`. Returns false, recording nothing, when this
    /// tick or a later one is already recorded.
    async fn claim(&self, schedule: &str, tick: DateTime<Utc>) -> Result<bool, TickStoreError>;
}

/// The last fired tick per schedule name, as stored: a JSON object name -> RFC 3339 time.
pub type FiredTicks = BTreeMap<String, String>;

/// Decides a claim against the recorded ticks, updating them when it succeeds. An entry
/// that does not parse counts as absent (and is overwritten).
pub fn claim_in(fired: &mut FiredTicks, schedule: &str, tick: DateTime<Utc>) -> bool {
    let last = fired
        .get(schedule)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
    match last {
        Some(last) if last >= tick => false,
        _ => {
            fired.insert(schedule.to_owned(), tick.to_rfc3339());
            true
        }
    }
}

/// A JSON file (`<backend.workdir_root>/schedule-state.json`) written by
/// write-to-temporary-then-rename, so a crash leaves the old or the new state, never half.
pub struct FileTickStore {
    path: PathBuf,
    /// Serialises read-modify-write cycles of this process. A std mutex taken only
    /// inside the blocking task, never across an await.
    lock: Arc<Mutex<()>>,
}

impl FileTickStore {
    pub fn new(path: PathBuf) -> FileTickStore {
        FileTickStore {
            path,
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// The recorded ticks (empty when the file does not exist yet).
    pub fn load(&self) -> Result<FiredTicks, TickStoreError> {
        load(&self.path)
    }
}

fn file_error(path: &Path, message: impl ToString) -> TickStoreError {
    TickStoreError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn load(path: &Path) -> Result<FiredTicks, TickStoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| file_error(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FiredTicks::new()),
        Err(e) => Err(file_error(path, e)),
    }
}

fn claim_in_file(path: &Path, schedule: &str, tick: DateTime<Utc>) -> Result<bool, TickStoreError> {
    let mut fired = load(path)?;
    if !claim_in(&mut fired, schedule, tick) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_error(path, e))?;
    }
    let json = serde_json::to_vec_pretty(&fired).map_err(|e| file_error(path, e))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| file_error(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))?;
    Ok(true)
}

#[async_trait]
impl TickStore for FileTickStore {
    async fn claim(&self, schedule: &str, tick: DateTime<Utc>) -> Result<bool, TickStoreError> {
        let (path, lock, schedule) = (self.path.clone(), self.lock.clone(), schedule.to_owned());
        tokio::task::spawn_blocking(move || {
            let _guard = lock.lock_recovered();
            claim_in_file(&path, &schedule, tick)
        })
        .await
        .map_err(|e| file_error(&self.path, e))?
    }
}

/// Fired ticks in [`TICKS_ANNOTATION`] on the election Lease: shared by every replica and
/// kept across restarts. Every write is a `replace` carrying the `resourceVersion` read, so
/// two replicas racing for one tick cannot both record it.
pub struct LeaseTickStore {
    api: Api<Lease>,
    name: String,
}

impl LeaseTickStore {
    pub fn new(api: Api<Lease>, name: &str) -> LeaseTickStore {
        LeaseTickStore {
            api,
            name: name.to_owned(),
        }
    }

    async fn attempt(&self, schedule: &str, tick: DateTime<Utc>) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            // The elector creates the Lease; without it nobody leads yet.
            return Ok(false);
        };
        let annotations = lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        let mut fired: FiredTicks = annotations
            .get(TICKS_ANNOTATION)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if !claim_in(&mut fired, schedule, tick) {
            return Ok(false);
        }
        let json = serde_json::to_string(&fired).unwrap_or_else(|_| "{}".into());
        annotations.insert(TICKS_ANNOTATION.to_owned(), json);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    }
}

#[async_trait]
impl TickStore for LeaseTickStore {
    async fn claim(&self, schedule: &str, tick: DateTime<Utc>) -> Result<bool, TickStoreError> {
        for _ in 0..CONFLICT_ATTEMPTS {
            match self.attempt(schedule, tick).await {
                Ok(claimed) => return Ok(claimed),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(TickStoreError::Lease(e.to_string())),
            }
        }
        Err(TickStoreError::Lease(format!(
            "{}: still conflicting after {CONFLICT_ATTEMPTS} attempts",
            self.name
        )))
    }
}
