//! Calling the node agent from the activator: find the agent pod on a sandbox pod's node
//! (a label selector and `spec.nodeName` in the agent's namespace: no cluster-wide
//! privilege), then freeze, thaw or read the pod with the projected token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde::Deserialize;
use tokio::time::Instant;

use crate::lock::MutexExt;

/// Largest agent answer read (a status is ~100 bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// Where the agents are and how to reach them.
#[derive(Debug, Clone)]
pub struct AgentLocator {
    /// Namespace of the node-agent DaemonSet.
    pub namespace: String,
    /// Label selector of its pods.
    pub selector: String,
    /// Port of the agent API.
    pub port: u16,
    /// File holding the projected ServiceAccount token (re-read on every call: the kubelet
    /// rotates it).
    pub token_path: PathBuf,
    /// Bound on one lookup or call.
    pub timeout: Duration,
    /// How long a found agent address is reused for its node (zero: look up every call).
    /// A call that cannot reach the agent forgets it at once.
    pub address_ttl: Duration,
}

impl AgentLocator {
    /// The locator `backend.kubernetes.node_agent.*` describes.
    pub fn from_config(c: &crate::config::NodeAgentClientConfig) -> AgentLocator {
        AgentLocator {
            namespace: c.namespace.clone(),
            selector: c.selector.clone(),
            port: c.port,
            token_path: c.token_path.clone(),
            timeout: c.timeout.as_duration(),
            address_ttl: c.address_cache_ttl.as_duration(),
        }
    }
}

/// A pod the agent should act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
}

/// The agent's answer about a pod.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AgentPodStatus {
    pub uid: String,
    pub state: String,
    pub memory_bytes: u64,
    pub frozen_seconds: f64,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no ready node agent on node {0}")]
    NoAgent(String),
    #[error("cannot read the node-agent token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node agent call failed: {0}")]
    Transport(String),
    /// No connection could be made to the agent's address.
    #[error("node agent unreachable: {0}")]
    Unreachable(String),
    /// The agent refused: its status and `error.code`.
    #[error("node agent answered {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

/// Finds agents and calls them.
pub struct NodeAgentClient {
    kube: kube::Client,
    locator: AgentLocator,
    http: Client<HttpConnector, Full<Bytes>>,
    /// Node -> its agent's address and when it was found. Std mutex: never held across
    /// an await.
    addresses: Mutex<HashMap<String, (SocketAddr, Instant)>>,
}

impl NodeAgentClient {
    pub fn new(kube: kube::Client, locator: AgentLocator) -> NodeAgentClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(locator.timeout));
        NodeAgentClient {
            kube,
            locator,
            http: Client::builder(TokioExecutor::new()).build(connector),
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// The API address of a ready agent pod on `node`.
    pub async fn agent_for_node(&self, node: &str) -> Result<SocketAddr, ClientError> {
        let api: Api<Pod> = Api::namespaced(self.kube.clone(), &self.locator.namespace);
        let lp = ListParams::default()
            .labels(&self.locator.selector)
            .fields(&format!("spec.nodeName={node}"));
        let pods = tokio::time::timeout(self.locator.timeout, api.list(&lp))
            .await
            .map_err(|_| ClientError::Transport("listing node agents timed out".into()))?
            .map_err(|e| ClientError::Transport(format!("listing node agents: {e}")))?;
        pods.items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                let ready = status
                    .conditions
                    .as_ref()?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let ip: std::net::IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
                ready.then_some(SocketAddr::new(ip, self.locator.port))
            })
            .next()
            .ok_or_else(|| ClientError::NoAgent(node.to_owned()))
    }

    /// The agent on `node`: the cached address while fresh, else a lookup.
    async fn agent_cached(&self, node: &str) -> Result<SocketAddr, ClientError> {
        let ttl = self.locator.address_ttl;
        let cached = self
            .addresses
            .lock_recovered()
            .get(node)
            .filter(|(_, at)| at.elapsed() < ttl)
            .map(|(a, _)| *a);
        if let Some(a) = cached {
            return Ok(a);
        }
        let a = self.agent_for_node(node).await?;
        let mut addresses = self.addresses.lock_recovered();
        // Bounded by the number of nodes; stale entries are dropped on the way.
        addresses.retain(|_, (_, at)| at.elapsed() < ttl);
        addresses.insert(node.to_owned(), (a, Instant::now()));
        Ok(a)
    }

    fn forget(&self, node: &str) {
        self.addresses.lock_recovered().remove(node);
    }

    /// Freezes `pod`; returns once the agent reports it frozen.
    pub async fn freeze(&self, pod: &PodRef) -> Result<AgentPodStatus, ClientError> {
        self.call(pod, "freeze").await
    }

    /// Thaws `pod`; returns once the agent reports it running.
    pub async fn thaw(&self, pod: &PodRef) -> Result<AgentPodStatus, ClientError> {
        self.call(pod, "thaw").await
    }

    /// Reads `pod`'s freezer state.
    pub async fn status(&self, pod: &PodRef) -> Result<AgentPodStatus, ClientError> {
        self.call(pod, "status").await
    }

    async fn call(&self, pod: &PodRef, op: &str) -> Result<AgentPodStatus, ClientError> {
        match self.call_once(pod, op).await {
            // The agent pod may have been replaced (new IP): look it up again, once.
            Err(ClientError::Unreachable(e)) if !self.locator.address_ttl.is_zero() => {
                tracing::debug!(
                    node = pod.node,
                    "node agent unreachable ({e}); looking it up again"
                );
                self.forget(&pod.node);
                self.call_once(pod, op).await
            }
            r => r,
        }
    }

    async fn call_once(&self, pod: &PodRef, op: &str) -> Result<AgentPodStatus, ClientError> {
        let agent = self.agent_cached(&pod.node).await?;
        let token = tokio::fs::read_to_string(&self.locator.token_path)
            .await
            .map_err(|source| ClientError::Token {
                path: self.locator.token_path.clone(),
                source,
            })?;
        let base = format!("http://{agent}/v1/pods/{}/{}", pod.namespace, pod.name);
        let builder = http::Request::builder().header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
        let req = match op {
            "status" => builder
                .method(http::Method::GET)
                .uri(format!("{base}?uid={}", pod.uid))
                .body(Full::new(Bytes::new())),
            _ => builder
                .method(http::Method::POST)
                .uri(format!("{base}/{op}"))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(
                    serde_json::json!({"uid": pod.uid}).to_string(),
                ))),
        }
        .map_err(|e| ClientError::Transport(e.to_string()))?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                if e.is_connect() {
                    ClientError::Unreachable(e.to_string())
                } else {
                    ClientError::Transport(e.to_string())
                }
            })?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.locator.timeout, exchange)
            .await
            .map_err(|_| ClientError::Transport(format!("{op} timed out")))??;
        if status == 200 {
            return serde_json::from_slice(&body)
                .map_err(|e| ClientError::Transport(format!("bad agent answer: {e}")));
        }
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        Err(ClientError::Refused {
            status,
            code: err["error"]["code"].as_str().unwrap_or("").to_owned(),
            message: err["error"]["message"].as_str().unwrap_or("").to_owned(),
        })
    }
}
