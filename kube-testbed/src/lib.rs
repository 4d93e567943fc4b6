//! kube-testbed: a test double of the Kubernetes REST API with a simulated sandbox controller.
//!
//! **This is not Kubernetes.** It speaks enough of the API server's HTTP protocol for a
//! real `kube::Client` (discovery, get, list, watch with resourceVersion, bookmarks and
//! 410 Gone, create, merge/JSON patch, replace with optimistic concurrency, delete,
//! `/status` and `/scale`) over a generic in-memory store, and runs a controller that
//! imitates agent-sandbox and OpenKruise with real local processes as pods.
//!
//! # Layout
//!
//! - [`store`]: resource types, objects, resourceVersions and the watch history.
//! - [`http`]: the REST routes; [`discovery`]: discovery documents and `/scale`.
//! - [`faults`]: error injection (fail next N requests, drop watches).
//! - [`controller`]: agent-sandbox and OpenKruise controllers step by step (each
//!   behaviour cites its upstream file and revision), pods as local processes.
//! - [`token_review`]: TokenReview of tokens the test issues; [`node_pods`]: core Pods
//!   bound to nodes, for the node agent; [`kubelet_cgroups`]: pod cgroups laid out as the
//!   kubelet's, holding the pods' processes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod audit;
pub mod controller;
pub mod discovery;
pub mod faults;
pub mod http;
pub mod kubelet_cgroups;
pub mod node_pods;
pub mod selector;
pub mod store;
pub mod token_review;

pub use controller::{Controller, ControllerConfig, Flavour, PORT_ANNOTATION, PodInfo, PodView};
pub use faults::Faults;
pub use store::{ApiError, ResourceType, Store};

/// How to start a [`Testbed`].
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// Where the API server listens; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// Run the simulated controller with pods from this `agent-activator` binary.
    /// `None`: API server only (objects just sit there).
    pub activator_bin: Option<PathBuf>,
    /// Simulated delay before the controller first acts on a claim.
    pub bind_delay: Duration,
    /// Least time between two controller writes to one claim (exposes the windows between
    /// the upstream controllers' adoption steps).
    pub step_delay: Duration,
    /// How long a deleted pod keeps running with its IP in status.
    pub terminate_delay: Duration,
    /// Port every pod listens on (on its own loopback IP); 0: free ports, announced in
    /// the `agent-activator.dev/port` annotation.
    pub pod_port: u16,
    /// Bookmark period of idle watches that asked for bookmarks.
    pub bookmark_interval: Duration,
    /// Run each sandbox pod's process in a kubelet-style pod cgroup under this root (and
    /// give it a core `v1` Pod object), so a real node agent can freeze it. `None`: plain
    /// processes, no Pod objects.
    pub pod_cgroups: Option<kubelet_cgroups::PodCgroups>,
    /// agent-sandbox's label-domain allowlist (empty: upstream's `sandbox.users.io`).
    pub allowed_label_domains: Vec<String>,
    /// OpenKruise claim post-processing time (runtime init, CSI mounts).
    pub post_process_delay: Duration,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            activator_bin: None,
            bind_delay: Duration::ZERO,
            step_delay: Duration::ZERO,
            terminate_delay: Duration::from_millis(50),
            pod_port: 0,
            bookmark_interval: Duration::from_secs(1),
            pod_cgroups: None,
            allowed_label_domains: Vec::new(),
            post_process_delay: Duration::ZERO,
        }
    }
}

/// A running API server (and controller). Stops everything, pods included, when dropped.
pub struct Testbed {
    pub store: Arc<Store>,
    pub faults: Arc<Faults>,
    /// Every API request as an RBAC verb on a resource.
    pub audit: Arc<audit::Audit>,
    /// Tokens TokenReview accepts.
    pub tokens: Arc<token_review::Tokens>,
    pub controller: Option<Arc<Controller>>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Testbed {
    /// Binds the listener, registers the default resource types and starts serving.
    pub async fn start(opts: TestbedOptions) -> std::io::Result<Testbed> {
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::new());
        register_defaults(&store);
        let faults = Arc::new(Faults::default());
        let audit = Arc::new(audit::Audit::default());
        let tokens = Arc::new(token_review::Tokens::default());
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(http::Shared {
            store: store.clone(),
            faults: faults.clone(),
            audit: audit.clone(),
            tokens: tokens.clone(),
            bookmark_interval: opts.bookmark_interval,
        });
        tokio::spawn(http::serve(listener, shared, stop_rx.clone()));
        let controller = opts.activator_bin.map(|bin| {
            let c = Controller::new(
                store.clone(),
                ControllerConfig {
                    activator_bin: bin,
                    bind_delay: opts.bind_delay,
                    step_delay: opts.step_delay,
                    terminate_delay: opts.terminate_delay,
                    pod_port: opts.pod_port,
                    pod_cgroups: opts.pod_cgroups,
                    allowed_label_domains: opts.allowed_label_domains,
                    post_process_delay: opts.post_process_delay,
                },
            );
            tokio::spawn(c.clone().run(stop_rx));
            c
        });
        Ok(Testbed {
            store,
            faults,
            audit,
            tokens,
            controller,
            addr,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server (no credentials), default namespace `namespace`.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-testbed\n  cluster:\n    server: {url}\n\
             users:\n- name: kube-testbed\n  user: {{}}\ncontexts:\n- name: kube-testbed\n  context:\n    \
             cluster: kube-testbed\n    user: kube-testbed\n    namespace: {namespace}\n\
             current-context: kube-testbed\n",
            url = self.url()
        )
    }

    /// Pods currently running (empty without a controller).
    pub fn pods(&self) -> Vec<PodInfo> {
        self.controller
            .as_ref()
            .map(|c| c.pods())
            .unwrap_or_default()
    }

    /// Index of the resource `kind` in `group`; panics on an unregistered type (tests).
    pub fn resource(&self, group: &str, kind: &str) -> usize {
        self.store
            .find_kind(group, kind)
            .unwrap_or_else(|| panic!("{group} {kind} is not registered"))
    }

    /// agent-sandbox fixtures: a SandboxTemplate and a SandboxWarmPool of `replicas`.
    pub fn seed_agent_sandbox(&self, ns: &str, pool: &str, replicas: u32) -> Result<(), ApiError> {
        let tpl = self.resource("extensions.agents.x-k8s.io", "SandboxTemplate");
        self.store.create(
            tpl,
            ns,
            json!({
                "metadata": {"name": pool},
                "spec": {"podTemplate": {"spec": {"containers": [{
                    "name": "sandbox", "image": "agent-activator:dev",
                    "args": ["demo-sandbox", "--port", "8080"],
                }]}}},
            }),
        )?;
        let wp = self.resource("extensions.agents.x-k8s.io", "SandboxWarmPool");
        self.store.create(
            wp,
            ns,
            json!({
                "metadata": {"name": pool},
                "spec": {"replicas": replicas, "sandboxTemplateRef": {"name": pool}},
            }),
        )?;
        Ok(())
    }

    /// Sets the SandboxTemplate `name`'s injection policies (`envVarsInjectionPolicy`,
    /// `volumeClaimTemplatesPolicy`: `Disallowed`, the upstream default, `Allowed` or
    /// `Overrides`), as deploy/sandboxtemplate.yaml does.
    pub fn set_template_policies(
        &self,
        ns: &str,
        name: &str,
        env: &str,
        volumes: &str,
    ) -> Result<(), ApiError> {
        let tpl = self.resource("extensions.agents.x-k8s.io", "SandboxTemplate");
        self.store.update_with(tpl, ns, name, None, |old| {
            let mut new = old.clone();
            new["spec"]["envVarsInjectionPolicy"] = json!(env);
            new["spec"]["volumeClaimTemplatesPolicy"] = json!(volumes);
            Ok(new)
        })?;
        Ok(())
    }

    /// OpenKruise fixtures: a SandboxSet of `replicas`.
    pub fn seed_openkruise(&self, ns: &str, set: &str, replicas: u32) -> Result<(), ApiError> {
        let res = self.resource("agents.kruise.io", "SandboxSet");
        self.store.create(
            res,
            ns,
            json!({
                "metadata": {"name": set},
                "spec": {"replicas": replicas, "template": {"spec": {"containers": [{
                    "name": "sandbox", "image": "agent-activator:dev",
                }]}}},
            }),
        )?;
        Ok(())
    }

    /// All objects of `kind` in `group` and namespace `ns`.
    pub fn list(&self, group: &str, kind: &str, ns: &str) -> Vec<Value> {
        let res = self.resource(group, kind);
        let all = selector::Selector::default();
        self.store.list(res, Some(ns), &all, &all).0
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Registers agent-sandbox, OpenKruise, `coordination.k8s.io/v1` Lease and core `v1`
/// ConfigMap resources.
pub fn register_defaults(store: &Store) {
    for f in Flavour::ALL {
        for ty in f.types() {
            store.register(ty);
        }
    }
    let mut tpl = ResourceType::namespaced(
        "extensions.agents.x-k8s.io",
        "v1beta1",
        "SandboxTemplate",
        "sandboxtemplates",
    );
    tpl.status = false;
    store.register(tpl);
    let mut lease = ResourceType::namespaced("coordination.k8s.io", "v1", "Lease", "leases");
    lease.status = false;
    store.register(lease);
    // The activator's activity digests.
    let mut cm = ResourceType::namespaced("", "v1", "ConfigMap", "configmaps");
    cm.status = false;
    store.register(cm);
    node_pods::register(store);
}
