//! The freeze rig shared by tests/it/kubernetes_freeze.rs and benches/freeze_path.rs: a
//! kube-testbed whose pods run in kubelet-style pod cgroups under a cgroup v2 test root, a
//! real node agent process serving them, and the ServiceAccount token the activator
//! presents. The including crate declares `cgroup_tree`, `kube_support` and
//! `node_agent_process` (tests/it/support) at its root.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use agent_activator::config::{Config, PauseMode};
use agent_activator::server::{self, RunningServer};
use kube_testbed::kubelet_cgroups::{Driver, PodCgroups};
use kube_testbed::node_pods::{self, PodSpec};
use kube_testbed::{PodInfo, Testbed};

use crate::cgroup_tree::{Hierarchy, TestRoot};
use crate::kube_support::*;
use crate::node_agent_process::NodeAgentProcess;

pub const NS: &str = "default";
pub const AGENT_NS: &str = "agent-activator-system";
pub const AGENT_SELECTOR: (&str, &str) = ("app.kubernetes.io/name", "agent-activator-node-agent");
pub const AUDIENCE: &str = "agent-activator-node-agent";
pub const FROZEN: &str = "agent-activator.dev/frozen";

/// A testbed whose pods live in pod cgroups under `root`, a node agent serving them, and
/// the token the activator presents.
pub struct Rig {
    // Dropped in this order: the testbed stops (its controller kills the pods and removes
    // their cgroups, on another runtime worker), then the root waits for that and goes.
    pub tb: Testbed,
    _agent: NodeAgentProcess,
    pub agent_port: u16,
    pub dir: PathBuf,
    _root: RootGuard,
}

/// Removes the test root once the testbed's pods have left it.
struct RootGuard(TestRoot);

impl Drop for RootGuard {
    fn drop(&mut self) {
        // At most 5 s (250 x 20 ms).
        for _ in 0..250 {
            if !has_pod_cgroups(&self.0.path) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn has_pod_cgroups(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_type().is_ok_and(|t| t.is_dir())
                && (e.file_name().to_string_lossy().contains("pod") || has_pod_cgroups(&e.path()))
        })
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn rig(name: &str, driver: Driver, seed: impl FnOnce(&Testbed)) -> Rig {
    let root = TestRoot::or_skip(Hierarchy::V2, name).expect("cgroup v2 test root");
    let cgroups = PodCgroups {
        root: root.path.clone(),
        driver,
    };
    let tb = testbed_with(|o| o.pod_cgroups = Some(cgroups)).await;
    seed(&tb);
    let dir = std::env::temp_dir().join(format!("aa-freeze-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, tb.kubeconfig(NS)).unwrap();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  level: warn\nnode_agent:\n  listen: 127.0.0.1:0\n  metrics_listen: 127.0.0.1:0\n  \
             node_name: {node}\n  cgroup_root: {root}\n  namespaces: [{NS}]\n  \
             allowed_clients: [\"system:serviceaccount:{NS}:agent-activator\"]\n  \
             kubeconfig: {kc}\n  freeze_timeout: 3s\n  pod_cache_ttl: 0s\n",
            node = kube_testbed::controller::NODE_NAME,
            root = root.path.display(),
            kc = kubeconfig.display()
        ),
    )
    .unwrap();
    let agent = NodeAgentProcess::start(&config).await;
    let agent_port = agent.api.port();
    // The agent's own pod on the sandboxes' node, as its DaemonSet would make it.
    node_pods::create(
        &tb.store,
        &PodSpec {
            namespace: AGENT_NS,
            name: "node-agent-x1",
            node: kube_testbed::controller::NODE_NAME,
            labels: &[AGENT_SELECTOR],
            ..PodSpec::default()
        },
    )
    .unwrap();
    let token = tb
        .tokens
        .issue_service_account(NS, "agent-activator", &[AUDIENCE]);
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    Rig {
        tb,
        _agent: agent,
        agent_port,
        dir,
        _root: RootGuard(root),
    }
}

impl Rig {
    /// The activator config: kubernetes backend on the testbed, `pause: freeze`.
    pub fn config(&self, api: &str, replica: &str, extra: &str) -> Config {
        let path = self.dir.join(format!("kubeconfig-{replica}"));
        std::fs::write(&path, self.tb.kubeconfig(NS)).unwrap();
        let mut cfg = config(api, "default", extra);
        let k = &mut cfg.backend.kubernetes;
        k.kubeconfig = Some(path);
        k.pause = PauseMode::Freeze;
        k.node_agent.namespace = AGENT_NS.into();
        k.node_agent.port = self.agent_port;
        k.node_agent.token_path = self.dir.join("token");
        k.node_agent.timeout = agent_activator::config::Dur::secs(10);
        cfg
    }

    pub async fn activator(&self, api: &str, replica: &str, extra: &str) -> RunningServer {
        server::start(self.config(api, replica, extra))
            .await
            .expect("activator starts")
    }

    pub fn sandbox(&self, group: &str, name: &str) -> Value {
        object(&self.tb, group, "Sandbox", name).expect("the Sandbox exists")
    }

    /// The running pod of `sandbox`.
    pub fn pod(&self, sandbox: &str) -> PodInfo {
        self.tb
            .pods()
            .into_iter()
            .find(|p| p.sandbox == sandbox)
            .unwrap_or_else(|| panic!("no running pod for {sandbox}"))
    }
}
