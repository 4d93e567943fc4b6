//! `Cache`: claims and sandboxes mirrored by kube-runtime watchers, read by every call,
//! waited on through a change counter (woken by watch events, never by polling), and
//! turned into [`BackendEvent`]s when someone else pauses, resumes or deletes a sandbox.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::flavour::{Flavour, SandboxView};
use crate::backend::{BackendEvent, SandboxId};

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

    pub fn synced(&self) -> bool {
        self.claims.synced && self.sandboxes.synced
    }
}

/// The shared cache. Std locks: nothing awaits while holding them.
pub struct Cache {
    flavour: Flavour,
    port: u16,
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
        let mut own = self.cache.own.lock().expect("own lock");
        if let Some(n) = own.get_mut(&self.sandbox) {
            *n -= 1;
            if *n == 0 {
                own.remove(&self.sandbox);
            }
        }
    }
}

impl Cache {
    pub fn new(flavour: Flavour, port: u16) -> Arc<Cache> {
        Arc::new(Cache {
            flavour,
            port,
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
        f(&self.state.read().expect("cache lock"))
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

    /// Where a sandbox's traffic goes, if it is serving.
    pub fn endpoint(&self, view: &SandboxView) -> Option<SocketAddr> {
        view.serving()
            .map(|ip| SocketAddr::new(ip, view.port_override.unwrap_or(self.port)))
    }

    pub fn begin_own(&self, sandbox: &str) -> OwnTransition<'_> {
        *self
            .own
            .lock()
            .expect("own lock")
            .entry(sandbox.to_owned())
            .or_insert(0) += 1;
        OwnTransition {
            cache: self,
            sandbox: sandbox.to_owned(),
        }
    }

    pub fn mark_released(&self, sandbox: &str) {
        self.released
            .lock()
            .expect("released lock")
            .insert(sandbox.to_owned());
    }

    /// Feeds one collection from a kube-runtime watcher until the stream ends (never,
    /// unless aborted: the watcher re-lists on 410 Gone and backs off on errors).
    pub async fn run_watch(
        self: Arc<Self>,
        kind: Kind,
        api: Api<DynamicObject>,
        cfg: watcher::Config,
    ) {
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => self.apply(kind, ev),
                Err(e) => tracing::warn!(?kind, "kubernetes watch error (retrying): {e}"),
            }
        }
    }

    fn apply(&self, kind: Kind, ev: Event<DynamicObject>) {
        let mut events = Vec::new();
        {
            let mut st = self.state.write().expect("cache lock");
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
            if kind == Kind::Claims {
                self.reindex(&mut st, &touched);
            }
            for (name, prev, deleted) in touched {
                match kind {
                    Kind::Sandboxes => self.classify_sandbox(&mut st, &name, deleted, &mut events),
                    Kind::Claims if deleted => self.classify_claim_gone(prev, &mut events),
                    Kind::Claims => {}
                }
            }
        }
        for e in events {
            // No subscriber is fine.
            let _ = self.events.send(e);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Updates the sandbox -> claim index for the claims just touched.
    fn reindex(&self, st: &mut State, touched: &[(String, Option<Arc<DynamicObject>>, bool)]) {
        for (claim, prev, _) in touched {
            if let Some(old) = prev.as_ref().and_then(|p| self.flavour.claim_sandbox(p))
                && st.bound.get(&old) == Some(claim)
            {
                st.bound.remove(&old);
            }
            if let Some(sandbox) = st
                .claims
                .objects
                .get(claim)
                .and_then(|c| self.flavour.claim_sandbox(c))
            {
                st.bound.insert(sandbox, claim.clone());
            }
        }
    }

    /// Compares a sandbox with its last settled state; queues an event for changes that
    /// are not ours on sandboxes bound to our claims.
    fn classify_sandbox(
        &self,
        st: &mut State,
        name: &str,
        deleted: bool,
        out: &mut Vec<BackendEvent>,
    ) {
        let bound = st.bound.contains_key(name);
        let own = self.own.lock().expect("own lock").contains_key(name);
        let id = SandboxId::new(name);
        if deleted {
            st.settled.remove(name);
            let released = self.released.lock().expect("released lock").remove(name);
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
        let now = match (self.endpoint(&view), view.spec_paused) {
            (Some(addr), _) => Settled::Serving(addr),
            (None, true) => Settled::Paused,
            (None, false) => return,
        };
        let before = st.settled.insert(name.to_owned(), now);
        if !bound || own || before == Some(now) {
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
    fn classify_claim_gone(&self, prev: Option<Arc<DynamicObject>>, out: &mut Vec<BackendEvent>) {
        let Some(sandbox) = prev.and_then(|c| self.flavour.claim_sandbox(&c)) else {
            return;
        };
        let mut released = self.released.lock().expect("released lock");
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
