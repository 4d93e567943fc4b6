//! `Store`: registered resource types, their objects as JSON, and the ordered event history.
//!
//! One global resourceVersion counter (like etcd's revision) orders every write. Watches
//! replay the history from the version they ask for; versions older than the retained
//! history get 410 Gone, as from a compacted etcd.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::selector::Selector;

/// How many events watches can resume from.
const HISTORY: usize = 10_000;

/// One kind of object the server serves, e.g. `agents.x-k8s.io/v1beta1` `sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    pub kind: String,
    /// Lowercase plural used in URLs.
    pub plural: String,
    pub namespaced: bool,
    /// Serves `/scale` from `spec.replicas` / `status.replicas`.
    pub scale: bool,
    /// Has a `/status` subresource: writes to the main resource keep the old status.
    pub status: bool,
}

impl ResourceType {
    /// A namespaced custom resource with a `/status` subresource.
    pub fn namespaced(group: &str, version: &str, kind: &str, plural: &str) -> ResourceType {
        ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced: true,
            scale: false,
            status: true,
        }
    }

    /// Adds the `/scale` subresource.
    pub fn with_scale(mut self) -> ResourceType {
        self.scale = true;
        self
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One write, as watches see it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub rv: u64,
    pub resource: usize,
    pub kind: EventKind,
    pub namespace: String,
    pub object: Arc<Value>,
}

/// A Kubernetes-style failure: HTTP code, `reason`, message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn not_found(what: &str, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{what} \"{name}\" not found"))
    }

    pub fn conflict(what: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {what} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        )
    }

    /// The `v1 Status` body the real API server sends.
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

type ObjectKey = (usize, String, String);

struct Inner {
    rv: u64,
    uid: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<StoredEvent>,
    /// Oldest resourceVersion a watch may resume from.
    floor: u64,
}

/// The object store. Cheap to share behind an `Arc`; a std mutex guards it because no
/// operation awaits while holding it.
pub struct Store {
    inner: Mutex<Inner>,
    /// Watches refused with 410 Gone so far.
    expired: std::sync::atomic::AtomicU64,
    events: broadcast::Sender<StoredEvent>,
}

/// What a new watch starts with: the backlog to replay and the live feed after it.
pub struct WatchStart {
    pub backlog: Vec<StoredEvent>,
    pub live: broadcast::Receiver<StoredEvent>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    pub fn new() -> Store {
        Store {
            inner: Mutex::new(Inner {
                rv: 1,
                uid: 0,
                types: Vec::new(),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                floor: 1,
            }),
            events: broadcast::channel(4096).0,
            expired: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("store lock")
    }

    /// Registers a resource type; returns its index. Registering twice is a no-op.
    pub fn register(&self, ty: ResourceType) -> usize {
        let mut inner = self.lock();
        if let Some(i) = inner.types.iter().position(|t| *t == ty) {
            return i;
        }
        inner.types.push(ty);
        inner.types.len() - 1
    }

    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    /// Finds a type by group, version and plural.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<(usize, ResourceType)> {
        let inner = self.lock();
        inner
            .types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
            .map(|i| (i, inner.types[i].clone()))
    }

    /// Finds a type by group and kind (any version).
    pub fn find_kind(&self, group: &str, kind: &str) -> Option<usize> {
        self.lock()
            .types
            .iter()
            .position(|t| t.group == group && t.kind == kind)
    }

    /// Subscribes to every future write (the simulated controller's feed).
    pub fn subscribe(&self) -> broadcast::Receiver<StoredEvent> {
        self.events.subscribe()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, res: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        let inner = self.lock();
        inner
            .objects
            .get(&(res, ns.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&inner.types[res].plural, name))
    }

    /// Objects of `res` in `ns` (all namespaces when `None`) matching the selectors, and
    /// the resourceVersion the list is consistent with.
    pub fn list(
        &self,
        res: usize,
        ns: Option<&str>,
        labels: &Selector,
        fields: &Selector,
    ) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((r, n, _), _)| *r == res && ns.is_none_or(|ns| ns == n))
            .filter(|(_, o)| labels.matches_labels(o) && fields.matches_fields(o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, inner.rv)
    }

    /// Creates an object; 409 AlreadyExists if the name is taken.
    pub fn create(&self, res: usize, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let ty = inner.types[res].clone();
        let meta = metadata_mut(&mut obj)?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{:05x}", inner.uid + 1),
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        let key = (res, ns.to_owned(), name.clone());
        if inner.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", ty.plural),
            ));
        }
        inner.uid += 1;
        inner.rv += 1;
        let rv = inner.rv;
        meta.insert("name".into(), json!(name));
        if ty.namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert("uid".into(), json!(format!("testbed-{:08x}", inner.uid)));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("generation".into(), json!(1));
        meta.insert(
            "creationTimestamp".into(),
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        set_type_meta(&mut obj, &ty);
        inner.objects.insert(key, obj.clone());
        self.record(&mut inner, res, EventKind::Added, ns, &obj);
        Ok(obj)
    }

    /// Replaces an object. A `metadata.resourceVersion` in `new` must match the stored one
    /// (409 Conflict otherwise). `subresource` is `None`, `Some("status")`.
    pub fn replace(
        &self,
        res: usize,
        ns: &str,
        name: &str,
        new: Value,
        subresource: Option<&str>,
    ) -> Result<Value, ApiError> {
        self.update_with(res, ns, name, subresource, |_| Ok(new))
    }

    /// Read-modify-write under the lock: `f` maps the current object to the new one.
    /// Precondition and status-subresource rules as in [`Store::replace`].
    pub fn update_with(
        &self,
        res: usize,
        ns: &str,
        name: &str,
        subresource: Option<&str>,
        f: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let ty = inner.types[res].clone();
        let key = (res, ns.to_owned(), name.to_owned());
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&ty.plural, name))?;
        let mut new = f(&old)?;
        let old_rv = old["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if let Some(want) = new["metadata"]["resourceVersion"].as_str()
            && !want.is_empty()
            && want != old_rv
        {
            return Err(ApiError::conflict(&ty.plural, name));
        }
        // Subresource semantics: the main resource cannot change status; /status changes
        // only status.
        match subresource {
            Some("status") => {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        new.as_object_mut().map(|o| o.remove("status"));
                    }
                }
            }
            _ if ty.status => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().map(|o| o.remove("status"));
                }
            },
            _ => {}
        }
        // Identity fields are the server's.
        let old_meta = old["metadata"].clone();
        let meta = metadata_mut(&mut new)?;
        for k in ["name", "namespace", "uid", "creationTimestamp"] {
            match old_meta.get(k) {
                Some(v) => meta.insert(k.into(), v.clone()),
                None => meta.remove(k),
            };
        }
        let mut generation = old_meta["generation"].as_i64().unwrap_or(1);
        if old.get("spec") != new.get("spec") {
            generation += 1;
        }
        if content(&new) == content(&old) {
            // Nothing changed: no new version, no event (like the real server).
            return Ok(old);
        }
        inner.rv += 1;
        let rv = inner.rv;
        let meta = metadata_mut(&mut new)?;
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("generation".into(), json!(generation));
        set_type_meta(&mut new, &ty);
        inner.objects.insert(key, new.clone());
        self.record(&mut inner, res, EventKind::Modified, ns, &new);
        Ok(new)
    }

    /// Deletes an object and returns its last state.
    pub fn delete(&self, res: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (res, ns.to_owned(), name.to_owned());
        let Some(mut obj) = inner.objects.remove(&key) else {
            return Err(ApiError::not_found(&inner.types[res].plural, name));
        };
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(&mut inner, res, EventKind::Deleted, ns, &obj);
        Ok(obj)
    }

    /// Starts a watch of `res` from `since` (exclusive). `None` means "now, after an
    /// ADDED for every current object". 410 Gone if `since` predates the kept history.
    pub fn watch(&self, res: usize, since: Option<u64>) -> Result<WatchStart, ApiError> {
        let inner = self.lock();
        let live = self.events.subscribe();
        let backlog = match since {
            Some(rv) if rv < inner.floor => {
                self.expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", inner.floor),
                ));
            }
            Some(rv) => inner
                .history
                .iter()
                .filter(|e| e.resource == res && e.rv > rv)
                .cloned()
                .collect(),
            None => inner
                .objects
                .iter()
                .filter(|((r, _, _), _)| *r == res)
                .map(|((_, ns, _), o)| StoredEvent {
                    rv: inner.rv,
                    resource: res,
                    kind: EventKind::Added,
                    namespace: ns.clone(),
                    object: Arc::new(o.clone()),
                })
                .collect(),
        };
        Ok(WatchStart { backlog, live })
    }

    /// How many watches were refused with 410 Gone (resourceVersion too old).
    pub fn expired_watches(&self) -> u64 {
        self.expired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets the event history, so every watch resuming from an older version gets
    /// 410 Gone and must relist (what etcd compaction does).
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.floor = inner.rv + 1;
    }

    fn record(&self, inner: &mut Inner, res: usize, kind: EventKind, ns: &str, obj: &Value) {
        let ev = StoredEvent {
            rv: inner.rv,
            resource: res,
            kind,
            namespace: ns.to_owned(),
            object: Arc::new(obj.clone()),
        };
        if inner.history.len() == HISTORY
            && let Some(old) = inner.history.pop_front()
        {
            inner.floor = old.rv + 1;
        }
        inner.history.push_back(ev.clone());
        // No subscriber is fine.
        let _ = self.events.send(ev);
    }
}

/// The object without the fields the server maintains, to compare content only.
fn content(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("generation");
    }
    o
}

fn metadata_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let o = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::new(400, "BadRequest", "the body is not a JSON object"))?;
    let meta = o.entry("metadata").or_insert_with(|| json!({}));
    meta.as_object_mut()
        .ok_or_else(|| ApiError::new(400, "BadRequest", "metadata is not an object"))
}

fn set_type_meta(obj: &mut Value, ty: &ResourceType) {
    obj["apiVersion"] = json!(ty.api_version());
    obj["kind"] = json!(ty.kind);
}
