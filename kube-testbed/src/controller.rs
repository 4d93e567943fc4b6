//! The simulated sandbox controllers: agent-sandbox and OpenKruise agents, step by step.
//!
//! It reconciles straight against the [`Store`] (no HTTP), woken by every write and by a
//! short tick. Each "pod" is a real `demo-sandbox` process on its own loopback address;
//! suspending a sandbox terminates it and resuming starts a new one on a new address, as
//! on a real cluster where the pod is deleted and recreated.
//!
//! Upstream controllers write several fields in several steps (annotation, then owner,
//! then status). The simulation makes the same writes in the same order, one step per
//! object per pass and at least [`ControllerConfig::step_delay`] apart, so clients see the
//! windows between them. Each behaviour cites the upstream file and revision it follows:
//! agent-sandbox `2fd412d55eca` in [`agent_sandbox`], openkruise/agents `0b72c83ae0bc` in
//! [`openkruise`]. Nothing else is simulated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::kubelet_cgroups::PodCgroups;
use crate::selector::Selector;
use crate::store::{ApiError, Store};

pub mod agent_sandbox;
pub mod claim_policy;
pub mod flavour;
pub mod openkruise;
pub mod pods;

pub use flavour::{Flavour, PORT_ANNOTATION};
use pods::PodProcess;

/// How the simulated controller behaves.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The `agent-activator` executable; pods run `BIN demo-sandbox --host IP --port P`.
    pub activator_bin: PathBuf,
    /// How long a new claim waits before the controller first acts on it.
    pub bind_delay: Duration,
    /// Least time between two controller writes to one claim (the adoption steps).
    pub step_delay: Duration,
    /// How long a pod being deleted keeps running (and keeps its IP in status).
    pub terminate_delay: Duration,
    /// The port every pod listens on, like a container port on a cluster. 0: each pod
    /// picks a free port and the testbed writes it into [`PORT_ANNOTATION`].
    pub pod_port: u16,
    /// Pods in kubelet-style cgroups, with core `v1` Pod objects on node [`NODE_NAME`].
    pub pod_cgroups: Option<PodCgroups>,
    /// agent-sandbox's label-domain allowlist for `additionalPodMetadata.labels` (upstream
    /// reads it from the file `/etc/sandbox-config/allowed-label-domains`,
    /// `cmd/agent-sandbox-controller/main.go` @2fd412d55eca). Empty: the controller's own
    /// fallback `sandbox.users.io` (`validateAdditionalPodMetadata`).
    pub allowed_label_domains: Vec<String>,
    /// OpenKruise: how long `runClaimPostProcesses` (runtime init with `envVars`, CSI
    /// `dynamicVolumesMount`) takes for a claim that needs it, between locking the Sandbox
    /// and counting the claim.
    pub post_process_delay: Duration,
}

/// The one node every simulated pod runs on (`spec.nodeName`, Sandbox `status.nodeName`).
pub const NODE_NAME: &str = "kube-testbed";

impl ControllerConfig {
    /// Pods from `activator_bin`, no delays, free ports announced by annotation.
    pub fn new(activator_bin: PathBuf) -> ControllerConfig {
        ControllerConfig {
            activator_bin,
            bind_delay: Duration::ZERO,
            step_delay: Duration::ZERO,
            terminate_delay: Duration::from_millis(50),
            pod_port: 0,
            pod_cgroups: None,
            allowed_label_domains: Vec::new(),
            post_process_delay: Duration::ZERO,
        }
    }
}

/// One pod the controller knows about.
enum Pod {
    /// No node has room ([`Controller::set_capacity`]).
    Unschedulable,
    /// Being started; the generation discards a start that finishes after the pod was
    /// deleted meanwhile.
    Starting(u64),
    Running(PodProcess),
    /// Being deleted: still running, its IP still reported, until the deadline.
    Terminating(PodProcess, Instant),
    /// The process exited by itself (crashed or killed): the pod phase is Failed.
    Failed,
}

/// What a status computation sees of a sandbox's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodView {
    Absent,
    Unschedulable,
    Starting,
    Running(SocketAddr),
    /// Running, but its cgroup is frozen (by the node agent): the kubelet's readiness
    /// probe fails, so the pod reports Ready=False while keeping its IP.
    Frozen(SocketAddr),
    Terminating(SocketAddr),
    Failed,
}

type Key = (Flavour, String, String);

/// A snapshot row of [`Controller::pods`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub flavour: Flavour,
    pub namespace: String,
    pub sandbox: String,
    /// The pod's own address (`podIP:port`).
    pub addr: SocketAddr,
    pub port: u16,
    pub pid: Option<u32>,
    /// The core Pod's UID (with `pod_cgroups` only).
    pub uid: Option<String>,
    /// The pod cgroup (with `pod_cgroups` only).
    pub cgroup: Option<std::path::PathBuf>,
}

/// The controller's own state. Std mutexes: nothing awaits while holding them.
pub struct Controller {
    store: Arc<Store>,
    config: ControllerConfig,
    pods: Mutex<HashMap<Key, Pod>>,
    generation: AtomicU64,
    /// Most pods scheduled at once (usize::MAX: unlimited).
    capacity: AtomicUsize,
    /// When the controller last wrote to a claim, and when it first saw it.
    steps: Mutex<HashMap<Key, Instant>>,
    first_seen: Mutex<HashMap<Key, Instant>>,
    /// Wakes the reconcile loop without a store write (a pod started, capacity changed).
    wake: Notify,
    /// OpenKruise claims being post-processed: the Sandbox locked for them and when the
    /// lock (or, for a new Sandbox, its readiness) was seen.
    pub(crate) post_processing: Mutex<HashMap<Key, openkruise::PostProcess>>,
    /// Make every OpenKruise post-process fail (runtime init / CSI mount errors).
    fail_post_process: std::sync::atomic::AtomicBool,
}

impl Controller {
    pub fn new(store: Arc<Store>, config: ControllerConfig) -> Arc<Controller> {
        Arc::new(Controller {
            store,
            config,
            pods: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            capacity: AtomicUsize::new(usize::MAX),
            steps: Mutex::new(HashMap::new()),
            first_seen: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            post_processing: Mutex::new(HashMap::new()),
            fail_post_process: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Limits how many pods may be scheduled at once; pods beyond it stay Unschedulable
    /// until room frees up (`None`: unlimited).
    pub fn set_capacity(&self, pods: Option<usize>) {
        self.capacity
            .store(pods.unwrap_or(usize::MAX), Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Makes OpenKruise claim post-processing (runtime init, CSI mounts) fail from now on,
    /// or succeed again.
    pub fn fail_post_processing(&self, fail: bool) {
        self.fail_post_process.store(fail, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub(crate) fn post_process_fails(&self) -> bool {
        self.fail_post_process.load(Ordering::SeqCst)
    }

    pub(crate) fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Reconciles on every store write and every 20 ms until `stop` turns true, then
    /// kills every pod.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut events = self.store.subscribe();
        loop {
            self.reconcile_all();
            tokio::select! {
                _ = events.recv() => while events.try_recv().is_ok() {},
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self.pods.lock().expect("pods lock").clear();
    }

    /// One pass over both flavours.
    pub fn reconcile_all(self: &Arc<Self>) {
        for f in Flavour::ALL {
            let Some(res) = f.resources(&self.store) else {
                continue;
            };
            match f {
                Flavour::AgentSandbox => agent_sandbox::reconcile(self, res),
                Flavour::OpenKruise => openkruise::reconcile(self, res),
            }
        }
    }

    /// Running pods.
    pub fn pods(&self) -> Vec<PodInfo> {
        let pods = self.pods.lock().expect("pods lock");
        let mut out: Vec<PodInfo> = pods
            .iter()
            .filter_map(|((f, ns, name), p)| match p {
                Pod::Running(p) => Some(PodInfo {
                    flavour: *f,
                    namespace: ns.clone(),
                    sandbox: name.clone(),
                    addr: p.addr,
                    port: p.addr.port(),
                    pid: p.pid,
                    uid: p.attached.as_ref().map(|a| a.uid.clone()),
                    cgroup: p
                        .attached
                        .as_ref()
                        .and_then(|a| a.cgroup.as_ref())
                        .map(|c| c.pod_dir.clone()),
                }),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
        out
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// All objects of resource `res`.
    pub(crate) fn list(&self, res: usize) -> Vec<Value> {
        let all = Selector::default();
        self.store.list(res, None, &all, &all).0
    }

    /// Creates, runs and deletes pods so each sandbox's pod matches `want_running`, and
    /// returns what each sandbox's pod looks like now. Pods of deleted sandboxes die.
    pub(crate) fn drive_pods(
        self: &Arc<Self>,
        f: Flavour,
        sandboxes: &[Value],
        want_running: impl Fn(&Value) -> bool,
    ) -> HashMap<Key, PodView> {
        let now = Instant::now();
        let capacity = self.capacity.load(Ordering::SeqCst);
        let mut to_start = Vec::new();
        let mut views = HashMap::new();
        let mut pods = self.pods.lock().expect("pods lock");
        pods.retain(|(pf, ns, name), _| {
            *pf != f
                || sandboxes.iter().any(|s| {
                    s["metadata"]["namespace"] == ns.as_str()
                        && s["metadata"]["name"] == name.as_str()
                        && s["metadata"]["deletionTimestamp"].is_null()
                })
        });
        // Pods holding a node slot.
        let mut scheduled = pods
            .values()
            .filter(|p| !matches!(p, Pod::Unschedulable | Pod::Failed))
            .count();
        for s in sandboxes {
            let key = key_of(f, s);
            if !s["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let want = want_running(s);
            let pod = pods.remove(&key);
            let next = match (want, pod) {
                (true, None) | (true, Some(Pod::Unschedulable)) => {
                    if scheduled >= capacity {
                        Some(Pod::Unschedulable)
                    } else {
                        scheduled += 1;
                        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                        to_start.push((key.clone(), g, s.clone()));
                        Some(Pod::Starting(g))
                    }
                }
                (true, Some(Pod::Running(mut p))) => {
                    if p.exited() {
                        Some(Pod::Failed)
                    } else {
                        Some(Pod::Running(p))
                    }
                }
                (false, Some(Pod::Running(p))) => {
                    Some(Pod::Terminating(p, now + self.config.terminate_delay))
                }
                (_, Some(Pod::Terminating(p, until))) if now < until => {
                    Some(Pod::Terminating(p, until))
                }
                // Terminated: dropping the process kills it.
                (_, Some(Pod::Terminating(..))) => None,
                (true, Some(other)) => Some(other),
                // Not wanted and not running: the pod is deleted.
                (false, Some(_)) | (false, None) => None,
            };
            let view = match &next {
                None => PodView::Absent,
                Some(Pod::Unschedulable) => PodView::Unschedulable,
                Some(Pod::Starting(_)) => PodView::Starting,
                Some(Pod::Running(p)) if p.frozen() => PodView::Frozen(p.addr),
                Some(Pod::Running(p)) => PodView::Running(p.addr),
                Some(Pod::Terminating(p, _)) => PodView::Terminating(p.addr),
                Some(Pod::Failed) => PodView::Failed,
            };
            views.insert(key.clone(), view);
            if let Some(p) = next {
                pods.insert(key, p);
            }
        }
        drop(pods);
        for (key, generation, sandbox) in to_start {
            let this = self.clone();
            tokio::spawn(async move { this.start_pod(key, generation, sandbox).await });
        }
        views
    }

    async fn start_pod(self: Arc<Self>, key: Key, generation: u64, sandbox: Value) {
        let result = pods::start(&self.config.activator_bin, &key.2, self.config.pod_port)
            .await
            .and_then(|p| self.attach(&key, &sandbox, p));
        let mut pods = self.pods.lock().expect("pods lock");
        match pods.get(&key) {
            Some(Pod::Starting(g)) if *g == generation => {}
            // Deleted meanwhile: dropping the process kills it.
            _ => return,
        }
        match result {
            Ok(p) => {
                pods.insert(key, Pod::Running(p));
            }
            Err(e) => {
                tracing::warn!(sandbox = key.2, "testbed pod failed to start: {e}");
                pods.insert(key, Pod::Failed);
            }
        }
        drop(pods);
        // Wake the reconcile loop so the status follows at once.
        self.wake.notify_one();
    }

    /// With `pod_cgroups`: gives the process its core Pod object (named after the
    /// Sandbox, controlled by it, on [`NODE_NAME`]) and its kubelet-style cgroup.
    fn attach(
        &self,
        key: &Key,
        sandbox: &Value,
        mut p: PodProcess,
    ) -> Result<PodProcess, pods::PodError> {
        let Some(cgroups) = &self.config.pod_cgroups else {
            return Ok(p);
        };
        let containers: Vec<Value> = key
            .0
            .pod_template(sandbox)
            .and_then(|t| t["spec"]["containers"].as_array().cloned())
            .unwrap_or_default();
        let labels = key.0.pod_labels(&key.2);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let ip = p.addr.ip().to_string();
        let pod = crate::node_pods::create(
            &self.store,
            &crate::node_pods::PodSpec {
                namespace: &key.1,
                name: &key.2,
                node: NODE_NAME,
                labels: &labels,
                containers: containers.clone(),
                pod_ip: Some(ip),
                owners: vec![controller_ref(sandbox, "Sandbox")],
            },
        )
        .map_err(|e| pods::PodError::Attach(format!("pod object: {e:?}")))?;
        let uid = crate::node_pods::uid(&pod);
        let pid = p.pid.ok_or(pods::PodError::Exited)?;
        let cgroup = cgroups
            .place(&uid, kubelet_qos(&containers), pid)
            .map_err(|e| pods::PodError::Attach(format!("pod cgroup: {e}")))?;
        p.attached = Some(pods::Attached {
            store: self.store.clone(),
            namespace: key.1.clone(),
            name: key.2.clone(),
            uid,
            cgroup: Some(cgroup),
        });
        Ok(p)
    }

    /// Keeps [`PORT_ANNOTATION`] equal to the running pod's port (only when pods pick
    /// their own ports): set before the status says Ready, removed when the pod is gone.
    pub(crate) fn sync_port_annotation(&self, sbx: usize, key: &Key, s: &Value, pod: PodView) {
        if self.config.pod_port != 0 {
            return;
        }
        let want = match pod {
            PodView::Running(a) | PodView::Frozen(a) | PodView::Terminating(a) => {
                Some(a.port().to_string())
            }
            _ => None,
        };
        let have = s["metadata"]["annotations"][PORT_ANNOTATION].as_str();
        if have == want.as_deref() {
            return;
        }
        let _ = self.store.update_with(sbx, &key.1, &key.2, None, |old| {
            let mut new = old.clone();
            match &want {
                Some(p) => new["metadata"]["annotations"][PORT_ANNOTATION] = json!(p),
                None => {
                    if let Some(a) = new["metadata"]["annotations"].as_object_mut() {
                        a.remove(PORT_ANNOTATION);
                    }
                }
            }
            Ok(new)
        });
    }

    /// Writes `status` unless it equals the current one (timestamps aside), so the
    /// controller's own writes do not wake it forever. Keeps the `lastTransitionTime` of
    /// conditions whose status did not change (as `meta.SetStatusCondition` does).
    pub(crate) fn set_status(&self, res: usize, key: &Key, status: Value) {
        let _ = self
            .store
            .update_with(res, &key.1, &key.2, Some("status"), |old| {
                let mut new = old.clone();
                if without_times(&old["status"]) != without_times(&status) {
                    new["status"] = keep_transition_times(&old["status"], status);
                }
                Ok(new)
            });
    }

    /// Whether the controller may make its next write to `key` (a claim): the bind delay
    /// has passed since it was first seen and the step delay since its last write.
    pub(crate) fn may_step(&self, key: &Key) -> bool {
        let now = Instant::now();
        let first = *self
            .first_seen
            .lock()
            .expect("first_seen lock")
            .entry(key.clone())
            .or_insert(now);
        if now.duration_since(first) < self.config.bind_delay {
            return false;
        }
        let steps = self.steps.lock().expect("steps lock");
        steps
            .get(key)
            .is_none_or(|t| now.duration_since(*t) >= self.config.step_delay)
    }

    /// Records a write to `key` (starts the next step delay).
    pub(crate) fn stepped(&self, key: &Key) {
        self.steps
            .lock()
            .expect("steps lock")
            .insert(key.clone(), Instant::now());
    }

    /// Forgets the step bookkeeping of claims that no longer exist.
    pub(crate) fn forget_gone(&self, f: Flavour, claims: &[Value]) {
        let alive = |k: &Key| {
            k.0 != f
                || claims.iter().any(|c| {
                    c["metadata"]["namespace"] == k.1.as_str()
                        && c["metadata"]["name"] == k.2.as_str()
                })
        };
        self.steps
            .lock()
            .expect("steps lock")
            .retain(|k, _| alive(k));
        self.first_seen
            .lock()
            .expect("first_seen lock")
            .retain(|k, _| alive(k));
    }

    /// Kubernetes garbage collection: deletes objects of `res` whose controller owner
    /// (of `owner_kind`) no longer exists. (kubernetes/kubernetes
    /// pkg/controller/garbagecollector; upstream relies on it for claim -> Sandbox.)
    pub(crate) fn collect_orphans(
        &self,
        res: usize,
        objects: &[Value],
        owner_kind: &str,
        owners: &[Value],
    ) {
        for s in objects {
            let Some(owner) = controller_of(s).filter(|o| o["kind"] == owner_kind) else {
                continue;
            };
            let ns = s["metadata"]["namespace"].as_str().unwrap_or("");
            let alive = owners
                .iter()
                .any(|c| c["metadata"]["namespace"] == ns && c["metadata"]["uid"] == owner["uid"]);
            if !alive {
                let name = s["metadata"]["name"].as_str().unwrap_or("");
                let _ = self.store.delete(res, ns, name);
            }
        }
    }
}

/// The controller ownerReference of `obj`, if any.
fn kubelet_qos(containers: &[Value]) -> &'static str {
    crate::kubelet_cgroups::qos_class(containers)
}

pub(crate) fn controller_of(obj: &Value) -> Option<&Value> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)
}

/// A controller ownerReference to `owner` (`controllerutil.SetControllerReference`).
pub(crate) fn controller_ref(owner: &Value, kind: &str) -> Value {
    json!({
        "apiVersion": owner["apiVersion"], "kind": kind,
        "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
        "controller": true, "blockOwnerDeletion": true,
    })
}

pub(crate) fn key_of(f: Flavour, obj: &Value) -> Key {
    (
        f,
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        obj["metadata"]["name"].as_str().unwrap_or("").to_owned(),
    )
}

/// Optimistic update from a snapshot: 409 if `snapshot`'s resourceVersion is stale, the
/// way a controller's `Update`/`Patch` with `MergeFromWithOptimisticLock` fails.
pub(crate) fn update_from(
    store: &Store,
    res: usize,
    snapshot: &Value,
    f: impl FnOnce(&mut Value),
) -> Result<Value, ApiError> {
    let ns = snapshot["metadata"]["namespace"].as_str().unwrap_or("");
    let name = snapshot["metadata"]["name"].as_str().unwrap_or("");
    let mut new = snapshot.clone();
    f(&mut new);
    store.replace(res, ns, name, new, None)
}

/// A status without `lastTransitionTime`s, for change detection.
fn without_times(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), without_times(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_times).collect()),
        other => other.clone(),
    }
}

/// `new` with each condition's `lastTransitionTime` taken from `old` when its status is
/// unchanged.
fn keep_transition_times(old: &Value, mut new: Value) -> Value {
    let old_conds = old["conditions"].as_array().cloned().unwrap_or_default();
    if let Some(conds) = new["conditions"].as_array_mut() {
        for c in conds {
            if let Some(o) = old_conds
                .iter()
                .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
            {
                c["lastTransitionTime"] = o["lastTransitionTime"].clone();
            }
        }
    }
    new
}

/// A `metav1.Condition`.
pub(crate) fn condition(
    ty: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: &Value,
) -> Value {
    json!({
        "type": ty,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now(),
    })
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Parses an RFC 3339 time field.
pub(crate) fn parse_time(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    let s = v.as_str()?;
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// True when `v` holds a time that has passed.
pub(crate) fn passed(v: &Value) -> bool {
    parse_time(v).is_some_and(|t| t <= chrono::Utc::now())
}
