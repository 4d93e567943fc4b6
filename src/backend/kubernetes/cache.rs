//! `Cache`: claims and sandboxes mirrored by kube-runtime watchers, read by every call,
//! waited on through a change counter (woken by watch events, never by polling), and
//! turned into [`BackendEvent`]s when someone else pauses, resumes or deletes a sandbox.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::flavour::{Flavour, SandboxView};
use super::health::ApiHealth;
use crate::backend::{BackendEvent, SandboxId};
use crate::lock::{MutexExt, RwLockExt};

/// Which watched collection an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Claims,
    Sandboxes,
}

/// The last settled state of a sandbox, for event classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Serving(SocketAddr),
    Paused,
    Finished,
}

/// One watched collection: the live map, plus the buffer of a relist in progress.
#[derive(Default)]
struct Collection {
    objects: HashMap<String, Arc<DynamicObject>>,
    relist: Option<HashMap<String, Arc<DynamicObject>>>,
    synced: bool,
}

/// A consistent snapshot reader of the cache.
#[derive(Default)]
pub struct State {
    claims: Collection,
    sandboxes: Collection,
    settled: HashMap<String, Settled>,
    /// Sandbox name -> name of the claim of ours bound to it.
    bound: HashMap<String, String>,
    /// Claim name -> the Sandbox bound to it (the inverse of `bound`).
    by_claim: HashMap<String, String>,
    /// Claim name -> Sandboxes that name it (agent-sandbox controller ownerReference,
    /// OpenKruise `claim-name` label), bound or not.
    naming: HashMap<String, BTreeSet<String>>,
    /// Sandboxes that have been bound to a claim of ours since they were last seen
    /// deleted. The claims and Sandboxes watches are separate streams, so when a bound
    /// Sandbox is deleted the controller's answer on the claim (agent-sandbox clears
    /// `status.sandbox` with `SandboxMissing`) may arrive first and unbind it in `bound`;
    /// the deletion must still be reported as a loss.
    ever_bound: HashSet<String>,
}

impl State {
    pub fn claim(&self, name: &str) -> Option<&Arc<DynamicObject>> {
        self.claims.objects.get(name)
    }

    /// Claims whose name starts with `prefix` (this activator tier's claims).
    pub fn claims_with_prefix(&self, prefix: &str) -> usize {
        self.claims
            .objects
            .keys()
            .filter(|n| n.starts_with(prefix))
            .count()
    }

    pub fn sandbox(&self, name: &str) -> Option<&Arc<DynamicObject>> {
        self.sandboxes.objects.get(name)
    }

    pub fn sandboxes(&self) -> impl Iterator<Item = &Arc<DynamicObject>> {
        self.sandboxes.objects.values()
    }

    /// The claim of ours bound to `sandbox`, if any.
    pub fn claim_of_sandbox(&self, sandbox: &str) -> Option<&str> {
        self.bound.get(sandbox).map(String::as_str)
    }

    /// The Sandbox bound to claim `claim`, if any (see [`Cache`] for what binds).
    pub fn sandbox_of_claim(&self, claim: &str) -> Option<&str> {
        self.by_claim.get(claim).map(String::as_str)
    }

    pub fn synced(&self) -> bool {
        self.claims.synced && self.sandboxes.synced
    }
}

/// The shared cache. Std locks: nothing awaits while holding them.
///
/// A claim is bound to a Sandbox only when both sides agree, so a half-finished adoption
/// or a race lost to another claim never routes a session: agent-sandbox, the claim's
/// `status.sandbox.name` names a Sandbox whose controller ownerReference carries the
/// claim's UID; OpenKruise (whose claims never name their Sandbox), a claim the controller
/// has counted (`status.claimedReplicas` > 0) and a live Sandbox labelled
/// `agents.kruise.io/claim-name=<claim>` whose `agents.kruise.io/owner` is the claim's UID.
pub struct Cache {
    flavour: Flavour,
    port: u16,
    /// Honour [`super::flavour::PORT_ANNOTATION`].
    port_from_annotation: bool,
    state: RwLock<State>,
    changed: watch::Sender<u64>,
    events: broadcast::Sender<BackendEvent>,
    /// Sandboxes with a pause/resume of ours in flight (their transitions are not events).
    own: Mutex<HashMap<String, u32>>,
    /// Sandboxes whose claim we deleted (their deletion is not a loss).
    released: Mutex<HashSet<String>>,
}

/// Marks a sandbox as transitioning by our own hand until dropped.
pub struct OwnTransition<'a> {
    cache: &'a Cache,
    sandbox: String,
}

impl Drop for OwnTransition<'_> {
    fn drop(&mut self) {
        let mut own = self.cache.own.lock_recovered();
        if let Some(n) = own.get_mut(&self.sandbox) {
            *n -= 1;
            if *n == 0 {
                own.remove(&self.sandbox);
            }
        }
    }
}

impl Cache {
    pub fn new(flavour: Flavour, port: u16, port_from_annotation: bool) -> Arc<Cache> {
        Arc::new(Cache {
            flavour,
            port,
            port_from_annotation,
            state: RwLock::new(State::default()),
            changed: watch::channel(0).0,
            events: broadcast::channel(256).0,
            own: Mutex::new(HashMap::new()),
            released: Mutex::new(HashSet::new()),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    /// Runs `f` on the current state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.read_recovered())
    }

    /// Waits until `f` returns `Some`, re-checking after every applied watch event, until
    /// `deadline` (then `None`).
    pub async fn wait_for<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(&State) -> Option<T>,
    ) -> Option<T> {
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(v) = self.read(&mut f) {
                return Some(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Where a sandbox's traffic goes, if it is serving: `podIP:backend.kubernetes.port`,
    /// or the port annotation when `port_from_annotation` allows it.
    pub fn endpoint(&self, view: &SandboxView) -> Option<SocketAddr> {
        let port = match view.port_override {
            Some(p) if self.port_from_annotation => p,
            _ => self.port,
        };
        view.serving().map(|ip| SocketAddr::new(ip, port))
    }

    /// `podIP:port` of a sandbox whatever its readiness (a thawed pod answers at once;
    /// its Ready condition follows at the kubelet's next probe).
    pub fn address(&self, view: &SandboxView) -> Option<SocketAddr> {
        let port = match view.port_override {
            Some(p) if self.port_from_annotation => p,
            _ => self.port,
        };
        view.pod_ip.map(|ip| SocketAddr::new(ip, port))
    }

    pub fn begin_own(&self, sandbox: &str) -> OwnTransition<'_> {
        *self
            .own
            .lock_recovered()
            .entry(sandbox.to_owned())
            .or_insert(0) += 1;
        OwnTransition {
            cache: self,
            sandbox: sandbox.to_owned(),
        }
    }

    pub fn mark_released(&self, sandbox: &str) {
        self.released.lock_recovered().insert(sandbox.to_owned());
    }

    /// Feeds one collection from a kube-runtime watcher until the stream ends (never,
    /// unless aborted: the watcher re-lists on 410 Gone and backs off on errors).
    /// Every event and error is reported to `health` (the API's outage clock).
    pub async fn run_watch(
        self: Arc<Self>,
        kind: Kind,
        api: Api<DynamicObject>,
        cfg: watcher::Config,
        health: Arc<ApiHealth>,
    ) {
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    health.ok();
                    self.apply(kind, ev);
                }
                Err(e) => {
                    health.failed();
                    tracing::warn!(?kind, "kubernetes watch error (retrying): {e}");
                }
            }
        }
    }

    fn apply(&self, kind: Kind, ev: Event<DynamicObject>) {
        let mut events = Vec::new();
        {
            let mut st = self.state.write_recovered();
            let coll = match kind {
                Kind::Claims => &mut st.claims,
                Kind::Sandboxes => &mut st.sandboxes,
            };
            let mut touched: Vec<(String, Option<Arc<DynamicObject>>, bool)> = Vec::new();
            match ev {
                Event::Init => coll.relist = Some(HashMap::new()),
                Event::InitApply(o) => {
                    let o = Arc::new(o);
                    if let Some(buf) = coll.relist.as_mut() {
                        buf.insert(name_of(&o), o);
                    }
                }
                Event::InitDone => {
                    let new = coll.relist.take().unwrap_or_default();
                    let old = std::mem::replace(&mut coll.objects, new);
                    coll.synced = true;
                    for (name, prev) in &old {
                        if !coll.objects.contains_key(name) {
                            touched.push((name.clone(), Some(prev.clone()), true));
                        }
                    }
                    for name in coll.objects.keys() {
                        touched.push((name.clone(), old.get(name).cloned(), false));
                    }
                }
                Event::Apply(o) => {
                    let o = Arc::new(o);
                    let name = name_of(&o);
                    let prev = coll.objects.insert(name.clone(), o);
                    touched.push((name, prev, false));
                }
                Event::Delete(o) => {
                    let name = name_of(&o);
                    let prev = coll.objects.remove(&name);
                    touched.push((name, prev, true));
                }
            }
            let mut gone_claims = Vec::new();
            let mut was_bound = HashSet::new();
            match kind {
                Kind::Claims => {
                    for (claim, _, deleted) in &touched {
                        let old = self.relink(&mut st, claim);
                        if *deleted {
                            gone_claims.push(old);
                        }
                    }
                }
                Kind::Sandboxes => {
                    let mut related = BTreeSet::new();
                    for (name, prev, deleted) in &touched {
                        if st.bound.contains_key(name) {
                            was_bound.insert(name.clone());
                        }
                        self.renaming(&mut st, name, prev.as_deref(), *deleted, &mut related);
                    }
                    for claim in related {
                        self.relink(&mut st, &claim);
                    }
                }
            }
            for (name, _, deleted) in touched {
                if kind == Kind::Sandboxes {
                    let bound = was_bound.contains(&name) || st.bound.contains_key(&name);
                    self.classify_sandbox(&mut st, &name, deleted, bound, &mut events);
                }
            }
            for old in gone_claims {
                self.classify_claim_gone(old, &mut events);
            }
        }
        for e in events {
            // No subscriber is fine.
            let _ = self.events.send(e);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Updates the claim -> naming Sandboxes index for one touched Sandbox and collects
    /// the claims whose binding may have changed.
    fn renaming(
        &self,
        st: &mut State,
        name: &str,
        prev: Option<&DynamicObject>,
        deleted: bool,
        related: &mut BTreeSet<String>,
    ) {
        if let Some(old) = prev.and_then(|p| self.flavour.sandbox_view(p).claim) {
            if let Some(set) = st.naming.get_mut(&old) {
                set.remove(name);
                if set.is_empty() {
                    st.naming.remove(&old);
                }
            }
            related.insert(old);
        }
        if let Some(c) = st.bound.get(name) {
            related.insert(c.clone());
        }
        if deleted {
            return;
        }
        let Some(claim) = st
            .sandboxes
            .objects
            .get(name)
            .and_then(|o| self.flavour.sandbox_view(o).claim)
        else {
            return;
        };
        st.naming
            .entry(claim.clone())
            .or_default()
            .insert(name.to_owned());
        related.insert(claim);
    }

    /// Recomputes the binding of `claim`; returns the Sandbox it was bound to before.
    fn relink(&self, st: &mut State, claim: &str) -> Option<String> {
        let old = st.by_claim.remove(claim);
        if let Some(o) = &old
            && st.bound.get(o).map(String::as_str) == Some(claim)
        {
            st.bound.remove(o);
        }
        if let Some(new) = self.resolve(st, claim) {
            st.ever_bound.insert(new.clone());
            st.bound.insert(new.clone(), claim.to_owned());
            st.by_claim.insert(claim.to_owned(), new);
        }
        old
    }

    /// The Sandbox both sides agree `claim` is bound to (see [`Cache`]).
    fn resolve(&self, st: &State, claim: &str) -> Option<String> {
        let c = st.claims.objects.get(claim)?;
        let uid = c.metadata.uid.as_deref()?;
        let agrees = |name: &str| {
            st.sandboxes.objects.get(name).is_some_and(|s| {
                let v = self.flavour.sandbox_view(s);
                v.claim_uid.as_deref() == Some(uid) && !v.deleting
            })
        };
        match self.flavour.claim_sandbox(c) {
            Some(name) => agrees(&name).then_some(name),
            // Locked is not bound: the claim controller counts the claim only after
            // post-processing (runtime init, CSI mounts) succeeded; until then the
            // Sandbox may lack the session's env and volumes, and a failed post-process
            // deletes it (openkruise/agents 0b72c83ae0bc sandboxcr/claim.go
            // TryClaimSandbox, runClaimPostProcesses, clearFailedSandbox).
            None if self.flavour == Flavour::OpenKruise => {
                if !self.flavour.claim_counted(c) {
                    return None;
                }
                st.naming.get(claim)?.iter().find(|n| agrees(n)).cloned()
            }
            None => None,
        }
    }

    /// Compares a sandbox with its last settled state; queues an event for changes that
    /// are not ours on sandboxes bound to our claims.
    fn classify_sandbox(
        &self,
        st: &mut State,
        name: &str,
        deleted: bool,
        bound: bool,
        out: &mut Vec<BackendEvent>,
    ) {
        let own = self.own.lock_recovered().contains_key(name);
        let id = SandboxId::new(name);
        if deleted {
            st.settled.remove(name);
            let bound = st.ever_bound.remove(name) || bound;
            let released = self.released.lock_recovered().remove(name);
            if bound && !released {
                out.push(BackendEvent::Lost {
                    sandbox: id,
                    reason: "the Sandbox was deleted".into(),
                });
            }
            return;
        }
        let Some(obj) = st.sandboxes.objects.get(name) else {
            return;
        };
        let view = self.flavour.sandbox_view(obj);
        let now = match (self.endpoint(&view), view.pause_done) {
            _ if view.finished => Settled::Finished,
            // Frozen in place by the node agent (`pause: freeze`): its readiness failing
            // meanwhile is expected, not a loss.
            _ if view.frozen.is_some() => Settled::Paused,
            (Some(addr), _) => Settled::Serving(addr),
            (None, true) => Settled::Paused,
            (None, false) => return,
        };
        let before = st.settled.insert(name.to_owned(), now);
        if !bound || before == Some(now) {
            return;
        }
        if now == Settled::Finished {
            // Even during our own transition: the pod ended, the session's state is gone.
            out.push(BackendEvent::Lost {
                sandbox: id,
                reason: "the Sandbox's pod finished (Finished condition)".into(),
            });
            return;
        }
        if own {
            return;
        }
        match (before, now) {
            (Some(Settled::Serving(_)), Settled::Paused) => {
                out.push(BackendEvent::Paused { sandbox: id });
            }
            (Some(_), Settled::Serving(endpoint)) => {
                out.push(BackendEvent::Resumed {
                    sandbox: id,
                    endpoint,
                });
            }
            _ => {}
        }
    }

    /// A claim of ours vanished without our release: its sandbox is lost to us.
    fn classify_claim_gone(&self, prev: Option<String>, out: &mut Vec<BackendEvent>) {
        let Some(sandbox) = prev else {
            return;
        };
        let mut released = self.released.lock_recovered();
        if released.contains(&sandbox) {
            return;
        }
        // Its sandbox's deletion, if it follows, is then not reported twice.
        released.insert(sandbox.clone());
        out.push(BackendEvent::Lost {
            sandbox: SandboxId::new(sandbox),
            reason: "the SandboxClaim was deleted".into(),
        });
    }
}

fn name_of(o: &DynamicObject) -> String {
    o.metadata.name.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).expect("a valid object")
    }

    fn claim(sandbox: Option<&str>) -> DynamicObject {
        let status = match sandbox {
            Some(s) => json!({"sandbox": {"name": s}}),
            // What agent-sandbox writes when the bound Sandbox is gone.
            None => json!({"conditions": [{"type": "Ready", "status": "False",
                "reason": "SandboxMissing"}]}),
        };
        obj(json!({
            "apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
            "metadata": {"name": "c1", "namespace": "default", "uid": "uid-c1"},
            "status": status,
        }))
    }

    fn sandbox() -> DynamicObject {
        obj(json!({
            "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
            "metadata": {"name": "s1", "namespace": "default", "ownerReferences": [{
                "apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
                "name": "c1", "uid": "uid-c1", "controller": true}]},
            "status": {"podIPs": ["127.0.0.2"], "conditions": [
                {"type": "Ready", "status": "True", "reason": "DependenciesReady"}]},
        }))
    }

    fn lost(rx: &mut broadcast::Receiver<BackendEvent>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let BackendEvent::Lost { sandbox, .. } = ev {
                out.push(sandbox.as_str().to_owned());
            }
        }
        out
    }

    /// The claims and Sandboxes watches are separate streams: the controller's
    /// `SandboxMissing` on the claim may be seen before the Sandbox's deletion. The loss
    /// is reported either way, once.
    #[test]
    fn a_deleted_bound_sandbox_is_lost_whichever_watch_reports_first() {
        for claim_first in [false, true] {
            let cache = Cache::new(Flavour::AgentSandbox, 8080, false);
            let mut rx = cache.subscribe();
            cache.apply(Kind::Sandboxes, Event::Apply(sandbox()));
            cache.apply(Kind::Claims, Event::Apply(claim(Some("s1"))));
            assert_eq!(
                cache.read(|st| st.sandbox_of_claim("c1").map(str::to_owned)),
                Some("s1".into())
            );
            if claim_first {
                cache.apply(Kind::Claims, Event::Apply(claim(None)));
                assert_eq!(
                    cache.read(|st| st.sandbox_of_claim("c1").map(str::to_owned)),
                    None
                );
            }
            cache.apply(Kind::Sandboxes, Event::Delete(sandbox()));
            assert_eq!(
                lost(&mut rx),
                vec!["s1".to_owned()],
                "claim_first={claim_first}"
            );
        }
    }

    /// A Sandbox we released is not a loss when it goes, and a warm one never bound is not.
    #[test]
    fn released_and_never_bound_sandboxes_are_not_lost() {
        let cache = Cache::new(Flavour::AgentSandbox, 8080, false);
        let mut rx = cache.subscribe();
        cache.apply(Kind::Sandboxes, Event::Apply(sandbox()));
        cache.apply(Kind::Sandboxes, Event::Delete(sandbox()));
        cache.apply(Kind::Sandboxes, Event::Apply(sandbox()));
        cache.apply(Kind::Claims, Event::Apply(claim(Some("s1"))));
        cache.mark_released("s1");
        cache.apply(Kind::Claims, Event::Delete(claim(Some("s1"))));
        cache.apply(Kind::Sandboxes, Event::Delete(sandbox()));
        assert_eq!(lost(&mut rx), Vec::<String>::new());
    }
}
