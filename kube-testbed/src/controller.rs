//! The simulated sandbox controller: warm pools, claim binding, suspend/resume, pods.
//!
//! It reconciles straight against the [`Store`] (no HTTP), woken by every write and by a
//! short tick for delayed binds. Each "pod" is a real `demo-sandbox` process; suspending a
//! sandbox kills it, resuming starts a new one on a new port, as on a real cluster where
//! the pod is deleted and recreated with a new IP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::selector::Selector;
use crate::store::Store;

pub mod flavour;
pub mod pods;

pub use flavour::{Flavour, PORT_ANNOTATION};
use pods::PodProcess;

/// How the simulated controller behaves.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The `agent-activator` executable; pods run `BIN demo-sandbox --port 0`.
    pub activator_bin: PathBuf,
    /// How long a new claim waits before it is bound (simulated controller latency).
    pub bind_delay: Duration,
}

/// One pod the controller knows about. `Starting` holds a generation so a start that
/// finishes after the sandbox was suspended again is discarded.
enum Pod {
    Starting(u64),
    Running(PodProcess),
    Failed,
}

type Key = (Flavour, String, String);

/// A snapshot row of [`Controller::pods`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub flavour: Flavour,
    pub namespace: String,
    pub sandbox: String,
    pub port: u16,
    pub pid: Option<u32>,
}

/// The controller's own state. Std mutexes: nothing awaits while holding them.
pub struct Controller {
    store: Arc<Store>,
    config: ControllerConfig,
    pods: Mutex<HashMap<Key, Pod>>,
    generation: Mutex<u64>,
    first_seen: Mutex<HashMap<Key, Instant>>,
}

impl Controller {
    pub fn new(store: Arc<Store>, config: ControllerConfig) -> Arc<Controller> {
        Arc::new(Controller {
            store,
            config,
            pods: Mutex::new(HashMap::new()),
            generation: Mutex::new(0),
            first_seen: Mutex::new(HashMap::new()),
        })
    }

    /// Reconciles on every store write and every 20 ms until `stop` turns true, then
    /// kills every pod.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut events = self.store.subscribe();
        loop {
            for f in Flavour::ALL {
                self.reconcile(f);
            }
            tokio::select! {
                _ = events.recv() => while events.try_recv().is_ok() {},
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self.pods.lock().expect("pods lock").clear();
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
                    port: p.port,
                    pid: p.pid,
                }),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
        out
    }

    fn reconcile(self: &Arc<Self>, f: Flavour) {
        let [sbx_ty, claim_ty, pool_ty] = f.types();
        let (Some((sbx, _)), Some((claim, _)), Some((pool, _))) = (
            self.store
                .find(&sbx_ty.group, &sbx_ty.version, &sbx_ty.plural),
            self.store
                .find(&claim_ty.group, &claim_ty.version, &claim_ty.plural),
            self.store
                .find(&pool_ty.group, &pool_ty.version, &pool_ty.plural),
        ) else {
            return;
        };
        let all = Selector::default();
        let (claims, _) = self.store.list(claim, None, &all, &all);
        let (sandboxes, _) = self.store.list(sbx, None, &all, &all);
        self.collect_orphans(f, sbx, &claims, &sandboxes);
        self.drive_pods(f, sbx, &sandboxes);
        let (pools, _) = self.store.list(pool, None, &all, &all);
        for p in &pools {
            self.fill_pool(f, sbx, pool, p, &sandboxes);
        }
        for c in &claims {
            self.bind_claim(f, sbx, claim, c, &sandboxes, &pools);
        }
    }

    /// Deletes sandboxes whose owning claim is gone (Kubernetes garbage collection).
    fn collect_orphans(&self, f: Flavour, sbx: usize, claims: &[Value], sandboxes: &[Value]) {
        for s in sandboxes {
            let Some(owner) = s["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["kind"] == "SandboxClaim")
            else {
                continue;
            };
            let ns = s["metadata"]["namespace"].as_str().unwrap_or("");
            let alive = claims
                .iter()
                .any(|c| c["metadata"]["namespace"] == ns && c["metadata"]["uid"] == owner["uid"]);
            if !alive {
                let name = s["metadata"]["name"].as_str().unwrap_or("");
                tracing::debug!(?f, ns, name, "deleting orphaned sandbox");
                let _ = self.store.delete(sbx, ns, name);
            }
        }
    }

    /// Starts pods for sandboxes that want to run, stops the others and forgets pods of
    /// deleted sandboxes.
    fn drive_pods(self: &Arc<Self>, f: Flavour, sbx: usize, sandboxes: &[Value]) {
        let mut to_start = Vec::new();
        {
            let mut pods = self.pods.lock().expect("pods lock");
            pods.retain(|(pf, ns, name), _| {
                *pf != f
                    || sandboxes.iter().any(|s| {
                        s["metadata"]["namespace"] == ns.as_str()
                            && s["metadata"]["name"] == name.as_str()
                    })
            });
            for s in sandboxes {
                let key = key_of(f, s);
                let want = f.wants_running(s);
                match (want, pods.contains_key(&key)) {
                    (true, false) => {
                        let mut g = self.generation.lock().expect("generation lock");
                        *g += 1;
                        pods.insert(key.clone(), Pod::Starting(*g));
                        to_start.push((key.clone(), *g, s.clone()));
                    }
                    (false, true) => {
                        pods.remove(&key);
                    }
                    _ => {}
                }
                if !want {
                    self.set_stopped(f, sbx, &key, s);
                }
            }
        }
        for (key, generation, s) in to_start {
            let was_stopped = !s["status"].is_null() && !f.sandbox_ready(&s);
            self.set_status(sbx, &key, f.status_starting(&s, was_stopped));
            let this = self.clone();
            tokio::spawn(async move { this.start_pod(f, sbx, key, generation).await });
        }
    }

    async fn start_pod(self: Arc<Self>, f: Flavour, sbx: usize, key: Key, generation: u64) {
        let result = pods::start(&self.config.activator_bin, &key.2).await;
        let port = {
            let mut pods = self.pods.lock().expect("pods lock");
            match pods.get(&key) {
                Some(Pod::Starting(g)) if *g == generation => {}
                // Suspended or deleted meanwhile: dropping the process kills it.
                _ => return,
            }
            match result {
                Ok(p) => {
                    let port = p.port;
                    pods.insert(key.clone(), Pod::Running(p));
                    Ok(port)
                }
                Err(e) => {
                    pods.insert(key.clone(), Pod::Failed);
                    Err(e)
                }
            }
        };
        match port {
            Ok(port) => {
                // The port first, then Ready: a reader that sees Ready sees the port.
                let _ = self.store.update_with(sbx, &key.1, &key.2, None, |old| {
                    let mut new = old.clone();
                    new["metadata"]["annotations"][PORT_ANNOTATION] = json!(port.to_string());
                    Ok(new)
                });
                if let Ok(old) = self.store.get(sbx, &key.1, &key.2) {
                    self.set_status(sbx, &key, f.status_running(&old, &key.2, &key.1));
                }
            }
            Err(e) => {
                tracing::warn!(sandbox = key.2, "testbed pod failed: {e}");
                self.set_status(sbx, &key, f.status_failed(&e.to_string()));
            }
        }
    }

    fn set_stopped(&self, f: Flavour, sbx: usize, key: &Key, s: &Value) {
        self.set_status(sbx, key, f.status_stopped());
        if s["metadata"]["annotations"].get(PORT_ANNOTATION).is_some() {
            let _ = self.store.update_with(sbx, &key.1, &key.2, None, |old| {
                let mut new = old.clone();
                if let Some(a) = new["metadata"]["annotations"].as_object_mut() {
                    a.remove(PORT_ANNOTATION);
                }
                Ok(new)
            });
        }
    }

    /// Writes `status` unless it equals the current one (timestamps aside), so the
    /// controller's own writes do not wake it forever.
    fn set_status(&self, res: usize, key: &Key, status: Value) {
        let _ = self
            .store
            .update_with(res, &key.1, &key.2, Some("status"), |old| {
                let mut new = old.clone();
                if without_times(&old["status"]) != without_times(&status) {
                    new["status"] = status;
                }
                Ok(new)
            });
    }

    /// Keeps `spec.replicas` unclaimed sandboxes in the pool and publishes its status.
    /// The SandboxTemplate an agent-sandbox warm pool names in `spec.sandboxTemplateRef`
    /// (OpenKruise SandboxSets carry their template inline, so they have none).
    fn pool_template(&self, pool: &Value, ns: &str) -> Option<Value> {
        let name = pool["spec"]["sandboxTemplateRef"]["name"].as_str()?;
        let res = self
            .store
            .find_kind("extensions.agents.x-k8s.io", "SandboxTemplate")?;
        self.store.get(res, ns, name).ok()
    }

    fn fill_pool(
        &self,
        f: Flavour,
        sbx: usize,
        pool_res: usize,
        pool: &Value,
        sandboxes: &[Value],
    ) {
        let ns = pool["metadata"]["namespace"].as_str().unwrap_or("");
        let name = pool["metadata"]["name"].as_str().unwrap_or("");
        let want = pool["spec"]["replicas"].as_u64().unwrap_or(0) as usize;
        let mut members: Vec<&Value> = sandboxes
            .iter()
            .filter(|s| {
                s["metadata"]["namespace"] == ns && s["metadata"]["labels"][f.pool_label()] == name
            })
            .collect();
        members.sort_by_key(|s| s["metadata"]["name"].as_str().unwrap_or("").to_owned());
        if members.len() < want {
            let template = self.pool_template(pool, ns);
            for _ in members.len()..want {
                let obj = json!({
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "labels": {f.pool_label(): name},
                    },
                    "spec": f.sandbox_spec(pool, template.as_ref()),
                });
                let _ = self.store.create(sbx, ns, obj);
            }
        } else if members.len() > want {
            // Scale down: drop the not-ready ones first, then the newest.
            members.sort_by_key(|s| f.sandbox_ready(s));
            for s in &members[..members.len() - want] {
                let _ = self
                    .store
                    .delete(sbx, ns, s["metadata"]["name"].as_str().unwrap_or(""));
            }
        }
        let ready = members.iter().filter(|s| f.sandbox_ready(s)).count();
        let status = json!({
            "replicas": members.len().min(want.max(members.len())),
            "readyReplicas": ready,
            "selector": format!("{}={name}", f.pool_label()),
        });
        self.set_status(pool_res, &(f, ns.to_owned(), name.to_owned()), status);
    }

    /// Binds an unbound claim after the bind delay (warm sandbox, else cold create) and
    /// mirrors a bound sandbox's readiness into the claim's status.
    fn bind_claim(
        &self,
        f: Flavour,
        sbx: usize,
        claim_res: usize,
        claim: &Value,
        sandboxes: &[Value],
        pools: &[Value],
    ) {
        let key = key_of(f, claim);
        let (ns, name) = (key.1.as_str(), key.2.as_str());
        if let Some(bound) = f.claim_sandbox(claim) {
            let s = sandboxes.iter().find(|s| {
                s["metadata"]["namespace"] == ns && s["metadata"]["name"] == bound.as_str()
            });
            self.set_status(claim_res, &key, f.claim_status(&bound, s));
            return;
        }
        let seen = *self
            .first_seen
            .lock()
            .expect("first_seen lock")
            .entry(key.clone())
            .or_insert_with(Instant::now);
        if seen.elapsed() < self.config.bind_delay {
            return;
        }
        let Some(pool_name) = f.claim_pool(claim) else {
            return;
        };
        let owner = json!([{
            "apiVersion": claim["apiVersion"], "kind": "SandboxClaim",
            "name": name, "uid": claim["metadata"]["uid"], "controller": true,
        }]);
        let warm = sandboxes.iter().find(|s| {
            s["metadata"]["namespace"] == ns
                && s["metadata"]["labels"][f.pool_label()] == pool_name.as_str()
                && f.sandbox_ready(s)
        });
        let chosen = if let Some(s) = warm {
            let sname = s["metadata"]["name"].as_str().unwrap_or("").to_owned();
            let adopted = self.store.update_with(sbx, ns, &sname, None, |old| {
                let mut new = old.clone();
                // Optimistic lock: lose the race if someone else adopted it.
                new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                if let Some(l) = new["metadata"]["labels"].as_object_mut() {
                    l.remove(f.pool_label());
                }
                new["metadata"]["ownerReferences"] = owner.clone();
                Ok(new)
            });
            if adopted.is_err() {
                return;
            }
            sname
        } else if f.claim_may_create(claim) {
            let template = pools.iter().find(|p| {
                p["metadata"]["namespace"] == ns && p["metadata"]["name"] == pool_name.as_str()
            });
            let spec = match template {
                Some(p) => f.sandbox_spec(p, self.pool_template(p, ns).as_ref()),
                None => f.sandbox_spec(&json!({}), None),
            };
            let obj = json!({
                "metadata": {"name": name, "ownerReferences": owner},
                "spec": spec,
            });
            match self.store.create(sbx, ns, obj) {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(_) => return,
            }
            name.to_owned()
        } else {
            return;
        };
        if f == Flavour::AgentSandbox {
            let _ = self.store.update_with(claim_res, ns, name, None, |old| {
                let mut new = old.clone();
                new["metadata"]["annotations"]["agents.x-k8s.io/sandbox-name"] = json!(chosen);
                Ok(new)
            });
        }
        let s = self.store.get(sbx, ns, &chosen).ok();
        self.set_status(claim_res, &key, f.claim_status(&chosen, s.as_ref()));
        self.first_seen
            .lock()
            .expect("first_seen lock")
            .remove(&key);
    }
}

fn key_of(f: Flavour, obj: &Value) -> Key {
    (
        f,
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        obj["metadata"]["name"].as_str().unwrap_or("").to_owned(),
    )
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
