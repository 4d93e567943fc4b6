//! The node agent (`agent-activator node-agent`): freezes and thaws sandbox pods' cgroups
//! in place on its node, so a paused sandbox keeps its memory, IP and files.
//!
//! # Layout
//!
//! - [`config`]: the `node_agent.*` section.
//! - [`cgroup`]: the kubelet's pod cgroup layout (v2 systemd / cgroupfs, v1 freezer) and
//!   the kernel-confirmed freeze and thaw.
//! - [`auth`]: TokenReview of the caller's projected token, then the client allowlist.
//! - [`pods`]: the pod must exist with the named UID, on this node, in an allowed
//!   namespace, with sandbox labels.
//! - [`api`]: the HTTP API and the one place errors become responses.
//! - [`metrics`]: frozen pods and bytes, freeze and thaw latency.
//! - [`client`]: the caller's side: find the agent on a pod's node, freeze, thaw.
//!
//! Every request is authenticated first, then the pod verified, and only then is a cgroup
//! path derived (from the verified UID) and touched.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub mod api;
pub mod auth;
pub mod cgroup;
pub mod client;
pub mod metrics;
pub mod pods;

/// The `node_agent.*` section lives with the rest of the configuration (floor 0).
pub use crate::config::node_agent as config;

use crate::config::ConfigError;
use crate::lock::MutexExt;
use auth::{AuthError, Authenticator};
use cgroup::{CgroupError, CgroupLayout, FreezeState, PodCgroup};
pub use config::NodeAgentConfig;
use metrics::AgentMetrics;
use pods::{PodError, PodVerifier};

/// Striped per-pod locks: freeze and thaw of one pod never interleave, and the lock table
/// has a fixed size whatever the number of pods.
const LOCK_STRIPES: usize = 64;

/// What a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Freeze,
    Thaw,
    Status,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Freeze => "freeze",
            Operation::Thaw => "thaw",
            Operation::Status => "status",
        }
    }
}

/// The answer to every pod request.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub uid: String,
    pub state: &'static str,
    pub memory_bytes: u64,
    /// Seconds since this agent froze the pod (or first saw it frozen, after a restart);
    /// 0 when not frozen.
    pub frozen_seconds: f64,
}

/// Why a request failed; [`api`] maps each to a status and code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Pod(#[from] PodError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    BadRequest(String),
    #[error("too many requests in flight")]
    Overloaded,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's state: its checks, the cgroup layout, and the pods it froze.
pub struct NodeAgent {
    layout: CgroupLayout,
    auth: Authenticator,
    pods: PodVerifier,
    pub metrics: AgentMetrics,
    freeze_timeout: Duration,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// uid -> (its cgroup, frozen since). A std Mutex: no await while held.
    frozen: Mutex<HashMap<String, (PodCgroup, Instant)>>,
    permits: Semaphore,
}

impl NodeAgent {
    /// Builds the agent: detects the cgroup layout and connects the kube client. Errors name
    /// the configuration key at fault.
    pub async fn new(cfg: &NodeAgentConfig) -> Result<NodeAgent, ConfigError> {
        let node = cfg.effective_node_name()?;
        let layout = CgroupLayout::detect(&cfg.cgroup_root, cfg.cgroup_driver)
            .map_err(|e| ConfigError::invalid("node_agent.cgroup_root", e.to_string()))?;
        let client = client(cfg.kubeconfig.as_deref()).await?;
        Ok(NodeAgent {
            layout,
            auth: Authenticator::new(
                client.clone(),
                cfg.audience.clone(),
                &cfg.allowed_clients,
                cfg.token_cache_ttl.into(),
                cfg.api_timeout.into(),
            ),
            pods: PodVerifier::new(
                client,
                node,
                &cfg.namespaces,
                cfg.pod_cache_ttl.into(),
                cfg.api_timeout.into(),
            ),
            metrics: AgentMetrics::new(),
            freeze_timeout: cfg.freeze_timeout.into(),
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            frozen: Mutex::new(HashMap::new()),
            permits: Semaphore::new(cfg.max_concurrent_requests),
        })
    }

    /// Authenticates, verifies the pod, then runs `op` on its cgroup.
    pub async fn handle(
        &self,
        op: Operation,
        authorization: Option<&http::HeaderValue>,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<PodStatus, AgentError> {
        let _permit = self
            .permits
            .try_acquire()
            .map_err(|_| AgentError::Overloaded)?;
        self.auth.authenticate(authorization).await?;
        cgroup::validate_uid(uid)?;
        self.pods.verify(namespace, name, uid).await?;
        let cg = self.layout.locate(uid)?;
        let _guard = self.locks[stripe(uid)].lock().await;
        match op {
            Operation::Freeze => {
                let started = Instant::now();
                cg.freeze(started + self.freeze_timeout).await?;
                self.metrics
                    .freeze_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.lock_frozen()
                    .entry(uid.to_owned())
                    .or_insert_with(|| (cg.clone(), started));
                tracing::info!(pod = %format!("{namespace}/{name}"), uid, "frozen");
            }
            Operation::Thaw => {
                let started = Instant::now();
                cg.thaw(started + self.freeze_timeout).await?;
                self.metrics
                    .thaw_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.lock_frozen().remove(uid);
                tracing::info!(pod = %format!("{namespace}/{name}"), uid, "thawed");
            }
            Operation::Status => {}
        }
        self.status(uid, &cg)
    }

    /// Authentication alone, for requests refused as malformed once the caller is known.
    pub async fn authenticate_only(
        &self,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<(), AgentError> {
        self.auth.authenticate(authorization).await?;
        Ok(())
    }

    fn status(&self, uid: &str, cg: &PodCgroup) -> Result<PodStatus, AgentError> {
        let state = cg.state()?;
        let frozen_seconds = if state == FreezeState::Frozen {
            let now = Instant::now();
            let mut frozen = self.lock_frozen();
            let since = frozen
                .entry(uid.to_owned())
                .or_insert_with(|| (cg.clone(), now))
                .1;
            now.duration_since(since).as_secs_f64()
        } else {
            0.0
        };
        self.metrics
            .frozen_pods
            .set(self.lock_frozen().len() as i64);
        Ok(PodStatus {
            uid: uid.to_owned(),
            state: state.as_str(),
            memory_bytes: cg.memory_bytes(),
            frozen_seconds,
        })
    }

    /// Refreshes the gauges (pods deleted while frozen are forgotten) and encodes metrics.
    pub fn encode_metrics(&self) -> String {
        let cgroups: Vec<PodCgroup> = {
            let mut frozen = self.lock_frozen();
            frozen.retain(|_, (cg, _)| cg.path().is_dir());
            frozen.values().map(|(cg, _)| cg.clone()).collect()
        };
        let bytes: u64 = cgroups.iter().map(PodCgroup::memory_bytes).sum();
        self.metrics.frozen_pods.set(cgroups.len() as i64);
        self.metrics
            .frozen_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metrics.encode()
    }

    fn lock_frozen(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PodCgroup, Instant)>> {
        // Single inserts/removes: the map is consistent even after a panic elsewhere.
        self.frozen.lock_recovered()
    }
}

fn stripe(uid: &str) -> usize {
    uid.bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % LOCK_STRIPES
}

/// The kube client `node_agent.kubeconfig` asks for: that file, else the in-cluster service
/// account, else `KUBECONFIG` / `~/.kube/config`.
async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ConfigError> {
    let key = "node_agent.kubeconfig";
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ConfigError::invalid(key, e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| ConfigError::invalid(key, e.to_string()))?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(_) => kube::Config::infer().await.map_err(|e| {
                ConfigError::invalid(
                    key,
                    format!("not in a cluster and no usable kubeconfig: {e}"),
                )
            })?,
        },
    };
    kube::Client::try_from(config).map_err(|e| ConfigError::invalid(key, e.to_string()))
}

/// Runs the agent until `shutdown` completes: binds both listeners (printing
/// `node-agent listening on ADDR` and `node-agent metrics on ADDR`), then serves.
pub async fn run(
    cfg: NodeAgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let agent = std::sync::Arc::new(NodeAgent::new(&cfg).await?);
    let bind = |addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(cfg.listen).await?;
    let metrics_listener = bind(cfg.metrics_listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.metrics_listen,
            source,
        })?;
    println!("node-agent listening on {addr}");
    println!("node-agent metrics on {metrics_addr}");
    tracing::info!(%addr, %metrics_addr, "node agent started");
    let api = tokio::spawn(api::serve(listener, agent.clone(), api::Surface::Api));
    let metrics = tokio::spawn(api::serve(metrics_listener, agent, api::Surface::Metrics));
    shutdown.await;
    api.abort();
    metrics.abort();
    Ok(())
}
