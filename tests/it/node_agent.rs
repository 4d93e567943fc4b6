//! The node agent as a real process against kube-testbed, freezing real processes in
//! kubelet-style cgroup trees (v2 systemd and cgroupfs drivers, v1 freezer): the kernel
//! confirms the freeze and CPU ticks stop; the UID, node, namespace, label, token and
//! allowlist checks refuse before any cgroup is touched.

use crate::cgroup_tree;
use crate::node_agent_process::NodeAgentProcess;
use crate::support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use cgroup_tree::{Hierarchy, TestRoot, makes_progress};
use kube_testbed::node_pods::{self, PodSpec};
use kube_testbed::{Testbed, TestbedOptions};
use support::{HttpClient, Reply};

const NS: &str = "agents";
const NODE: &str = "node-a";
const AUDIENCE: &str = "agent-activator-node-agent";
const CLIENT_SA: &str = "agent-activator";
const SANDBOX_LABEL: (&str, &str) = ("agents.x-k8s.io/sandbox-name-hash", "5f2a9c1e");
const WINDOW: Duration = Duration::from_millis(300);

/// Where the kubelet puts a pod cgroup, relative to the hierarchy root.
#[derive(Clone, Copy)]
enum Layout {
    SystemdBurstable,
    SystemdGuaranteed,
    CgroupfsBestEffort,
}

impl Layout {
    fn pod_dir(self, uid: &str) -> String {
        let esc = uid.replace('-', "_");
        match self {
            Layout::SystemdBurstable => {
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{esc}.slice")
            }
            Layout::SystemdGuaranteed => format!("kubepods.slice/kubepods-pod{esc}.slice"),
            Layout::CgroupfsBestEffort => format!("kubepods/besteffort/pod{uid}"),
        }
    }

    fn container_dir(self, uid: &str) -> String {
        match self {
            Layout::CgroupfsBestEffort => format!("{}/0f1e2d3c4b5a", self.pod_dir(uid)),
            _ => format!("{}/cri-containerd-0f1e2d3c4b5a.scope", self.pod_dir(uid)),
        }
    }
}

/// A running node agent process and the testbed it asks.
struct Agent {
    _process: NodeAgentProcess,
    api: HttpClient,
    api_addr: SocketAddr,
    metrics: HttpClient,
    tb: Testbed,
    token: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_agent(tb: Testbed, root: &TestRoot) -> Agent {
    let dir = std::env::temp_dir().join(format!(
        "node-agent-test-{}-{}",
        std::process::id(),
        root.path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, tb.kubeconfig(NS)).unwrap();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  level: warn\nnode_agent:\n  listen: 127.0.0.1:0\n  metrics_listen: 127.0.0.1:0\n  \
             node_name: {NODE}\n  cgroup_root: {root}\n  namespaces: [{NS}]\n  \
             allowed_clients: [\"system:serviceaccount:{NS}:{CLIENT_SA}\"]\n  \
             kubeconfig: {kc}\n  freeze_timeout: 3s\n",
            root = root.path.display(),
            kc = kubeconfig.display()
        ),
    )
    .unwrap();
    let agent = NodeAgentProcess::start(&config).await;
    let token = tb.tokens.issue_service_account(NS, CLIENT_SA, &[AUDIENCE]);
    Agent {
        api: HttpClient::http1(agent.api),
        api_addr: agent.api,
        metrics: HttpClient::http1(agent.metrics),
        _process: agent,
        tb,
        token,
        _dir: TempDir(dir),
    }
}

impl Agent {
    async fn call(&self, op: &str, name: &str, uid: &str, token: Option<&str>) -> Reply {
        self.call_ns(op, NS, name, uid, token).await
    }

    async fn call_ns(
        &self,
        op: &str,
        ns: &str,
        name: &str,
        uid: &str,
        token: Option<&str>,
    ) -> Reply {
        let (method, path, body) = match op {
            "status" => (
                "GET",
                format!("/v1/pods/{ns}/{name}?uid={uid}"),
                String::new(),
            ),
            _ => (
                "POST",
                format!("/v1/pods/{ns}/{name}/{op}"),
                format!("{{\"uid\":\"{uid}\"}}"),
            ),
        };
        let mut b = self.api.request(method, &path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        self.api
            .send(b.body(Full::new(Bytes::from(body))).unwrap())
            .await
    }

    fn pod(&self, name: &str, node: &str, labels: &[(&str, &str)]) -> String {
        let pod = node_pods::create(
            &self.tb.store,
            &PodSpec {
                namespace: NS,
                name,
                node,
                labels,
                ..PodSpec::default()
            },
        )
        .unwrap();
        node_pods::uid(&pod)
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics.get("/metrics", &[]).await.text();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }
}

async fn testbed() -> Testbed {
    Testbed::start(TestbedOptions::default())
        .await
        .expect("testbed")
}

/// Creates the sandbox pod, its cgroup and a spinning process in it; freezes it, checks
/// the kernel and the CPU, thaws it. Returns the agent for further checks.
async fn freeze_and_thaw(mut root: TestRoot, layout: Layout) -> (Agent, TestRoot, String, u32) {
    let agent = start_agent(testbed().await, &root).await;
    let uid = agent.pod("sb-1", NODE, &[SANDBOX_LABEL]);
    let pod_dir = layout.pod_dir(&uid);
    let pid = root.spawn_busy(&layout.container_dir(&uid));
    assert!(
        makes_progress(pid, WINDOW),
        "the process spins before the freeze"
    );

    let r = agent.call("freeze", "sb-1", &uid, Some(&agent.token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["state"], "frozen");
    assert_eq!(body["uid"], uid.as_str());
    assert!(body["memory_bytes"].as_u64().unwrap() > 0, "{body}");
    assert!(
        root.kernel_frozen(&pod_dir),
        "the kernel reports the pod cgroup frozen"
    );
    assert!(!makes_progress(pid, WINDOW), "no CPU ticks while frozen");

    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = agent.call("status", "sb-1", &uid, Some(&agent.token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "frozen");
    assert!(r.json()["frozen_seconds"].as_f64().unwrap() >= 0.05);
    assert_eq!(agent.metric("node_agent_frozen_pods").await, 1.0);
    assert!(agent.metric("node_agent_frozen_bytes").await > 0.0);
    assert_eq!(agent.metric("node_agent_freeze_seconds_count").await, 1.0);

    let r = agent.call("thaw", "sb-1", &uid, Some(&agent.token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    assert_eq!(r.json()["frozen_seconds"], 0.0);
    assert!(!root.kernel_frozen(&pod_dir));
    assert!(
        makes_progress(pid, WINDOW),
        "the same process runs again after the thaw"
    );
    assert_eq!(agent.metric("node_agent_frozen_pods").await, 0.0);
    assert_eq!(agent.metric("node_agent_thaw_seconds_count").await, 1.0);
    (agent, root, uid, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn v2_systemd_burstable_pod_frozen_and_thawed_and_every_check_refuses() {
    let Some(root) = TestRoot::or_skip(Hierarchy::V2, "v2_systemd_burstable") else {
        return;
    };
    let (agent, root, uid, pid) = freeze_and_thaw(root, Layout::SystemdBurstable).await;
    let token = agent.token.clone();
    let refused = |r: &Reply, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.error_code(), code, "{}", r.text());
        assert!(
            !root.kernel_frozen(&Layout::SystemdBurstable.pod_dir(&uid)),
            "{code}: untouched"
        );
    };

    // Unauthenticated, wrong audience, revoked, not allowlisted.
    let r = agent.call("freeze", "sb-1", &uid, None).await;
    refused(&r, 401, "unauthenticated");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = agent
        .call("freeze", "sb-1", &uid, Some("not-a-token"))
        .await;
    refused(&r, 401, "unauthenticated");
    let other_audience = agent.tb.tokens.issue_service_account(
        NS,
        CLIENT_SA,
        &["https://kubernetes.default.svc.cluster.local"],
    );
    let r = agent
        .call("freeze", "sb-1", &uid, Some(&other_audience))
        .await;
    refused(&r, 401, "unauthenticated");
    let intruder = agent
        .tb
        .tokens
        .issue_service_account(NS, "intruder", &[AUDIENCE]);
    let r = agent.call("freeze", "sb-1", &uid, Some(&intruder)).await;
    refused(&r, 403, "forbidden");

    // The pod checks.
    let r = agent
        .call(
            "freeze",
            "sb-1",
            "0c4f4d5e-8a43-4a8e-9a0e-6a2b9f0d1c22",
            Some(&token),
        )
        .await;
    refused(&r, 409, "uid_mismatch");
    let elsewhere = agent.pod("sb-elsewhere", "node-b", &[SANDBOX_LABEL]);
    let r = agent
        .call("freeze", "sb-elsewhere", &elsewhere, Some(&token))
        .await;
    refused(&r, 409, "wrong_node");
    let plain = agent.pod("plain", NODE, &[]);
    let r = agent.call("freeze", "plain", &plain, Some(&token)).await;
    refused(&r, 403, "not_a_sandbox");
    let r = agent
        .call_ns("freeze", "kube-system", "sb-1", &uid, Some(&token))
        .await;
    refused(&r, 403, "namespace_not_allowed");
    let r = agent.call("freeze", "missing", &uid, Some(&token)).await;
    refused(&r, 404, "pod_not_found");
    let r = agent
        .call("freeze", "sb-1", "../../etc", Some(&token))
        .await;
    refused(&r, 400, "bad_request");
    // A verified pod whose cgroup is not on this node's tree.
    let kruise = agent.pod(
        "kruise-1",
        NODE,
        &[("agents.kruise.io/created-by", "sandbox")],
    );
    let r = agent
        .call("freeze", "kruise-1", &kruise, Some(&token))
        .await;
    refused(&r, 404, "cgroup_not_found");
    // Malformed bodies are reported only to an authenticated caller.
    let b = agent.api.request("POST", "/v1/pods/agents/sb-1/freeze");
    let r = agent
        .api
        .send(b.body(Full::new(Bytes::from_static(b"{nope"))).unwrap())
        .await;
    refused(&r, 401, "unauthenticated");
    let b = agent
        .api
        .request("POST", "/v1/pods/agents/sb-1/freeze")
        .header("authorization", format!("Bearer {token}"));
    let r = agent
        .api
        .send(b.body(Full::new(Bytes::from_static(b"{nope"))).unwrap())
        .await;
    refused(&r, 400, "bad_request");

    assert!(
        makes_progress(pid, WINDOW),
        "nothing refused froze the process"
    );
    let refusals = agent.metrics.get("/metrics", &[]).await.text();
    assert!(
        refusals
            .contains("node_agent_requests_total{operation=\"freeze\",outcome=\"uid_mismatch\"} 1"),
        "{refusals}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn v2_systemd_guaranteed_pod_directly_under_kubepods_slice() {
    let Some(root) = TestRoot::or_skip(Hierarchy::V2, "v2_systemd_guaranteed") else {
        return;
    };
    freeze_and_thaw(root, Layout::SystemdGuaranteed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn v2_cgroupfs_besteffort_pod() {
    let Some(root) = TestRoot::or_skip(Hierarchy::V2, "v2_cgroupfs_besteffort") else {
        return;
    };
    freeze_and_thaw(root, Layout::CgroupfsBestEffort).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v1_freezer,
    ignore = "no cgroup v1 freezer mounted on this host (build.rs probe)"
)]
async fn v1_freezer_pod() {
    // v1 is optional on a machine: only where a freezer hierarchy is mounted.
    assert!(
        cgroup_tree::mount_point(Hierarchy::V1).is_some(),
        "no cgroup v1 freezer hierarchy is mounted"
    );
    let Some(root) = TestRoot::or_skip(Hierarchy::V1, "v1_freezer") else {
        return;
    };
    freeze_and_thaw(root, Layout::CgroupfsBestEffort).await;
}

/// `check` validates the `node_agent` section and names the key; `node-agent` refuses a
/// file without the section; `serve` refuses a node-agent-only file.
#[test]
fn check_validates_the_node_agent_section() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("node-agent-check-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let run = |args: &[&str], yaml: &str| {
        let file = dir.0.join("c.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agent-activator"))
            .args(args)
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = "node_agent:\n  node_name: n1\n  namespaces: [agents]\n  \
                allowed_clients: [\"system:serviceaccount:agents:agent-activator\"]\n";
    assert_eq!(run(&["check", "--config"], good).0, Some(0));
    let (code, err) = run(
        &["check", "--config"],
        "node_agent:\n  namespaces: [agents]\n",
    );
    assert_eq!(code, Some(64));
    assert!(err.contains("node_agent.allowed_clients:"), "{err}");
    let (code, err) = run(
        &["check", "--config"],
        &good.replace("[agents]", "[Agents_1]"),
    );
    assert_eq!(code, Some(64));
    assert!(err.contains("node_agent.namespaces[0]:"), "{err}");
    let (code, err) = run(
        &["check", "--config"],
        &format!("{good}  cgroup_driver: podman\n"),
    );
    assert_eq!(code, Some(64));
    assert!(err.contains("node_agent.cgroup_driver"), "{err}");
    let (code, err) = run(
        &["node-agent", "--config"],
        "backend:\n  endpoints: [\"127.0.0.1:1\"]\n",
    );
    assert_eq!(code, Some(64));
    assert!(err.contains("node_agent: the section is required"), "{err}");
    let (code, err) = run(&["serve", "--config"], good);
    assert_eq!(code, Some(64));
    assert!(err.contains("run `node-agent`"), "{err}");
}

/// A prerequisite tool the test needed is missing although build.rs found it (or CI=true
/// made the test run anyway): fail, naming it.
fn missing(test: &str, what: &str) -> ! {
    panic!("{test}: {what}");
}

/// deploy/ with the optional node-agent component enabled renders, validates against the
/// Kubernetes schemas, and grants and mounts exactly what the agent needs.
#[test]
#[cfg_attr(
    any(missing_kubectl, missing_kubernetes_validate),
    ignore = "needs kubectl and kubernetes-validate (build.rs probe)"
)]
fn deploy_component_renders_with_least_privilege() {
    let test = "deploy_component_renders_with_least_privilege";
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dir =
        TempDir(std::env::temp_dir().join(format!("node-agent-deploy-{}", std::process::id())));
    let copy = std::process::Command::new("cp")
        .args(["-r"])
        .arg(&src)
        .arg(&dir.0)
        .status()
        .unwrap();
    assert!(copy.success());
    let kz = dir.0.join("kustomization.yaml");
    let text = std::fs::read_to_string(&kz).unwrap();
    assert!(
        text.contains("# components:\n#   - node-agent\n"),
        "the component is offered, off by default"
    );
    std::fs::write(
        &kz,
        text.replace(
            "# components:\n#   - node-agent\n",
            "components:\n  - node-agent\n",
        ),
    )
    .unwrap();
    let out = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir.0)
        .output()
    {
        Ok(o) => o,
        Err(e) => missing(test, &format!("kubectl is not runnable ({e})")),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = rendered
        .split("\n---\n")
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .collect();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} not rendered"))
    };

    let ds = find("DaemonSet", "agent-activator-node-agent");
    assert_eq!(ds["metadata"]["namespace"], "agent-activator-system");
    let pod = &ds["spec"]["template"]["spec"];
    assert_ne!(pod["hostNetwork"], true);
    assert_ne!(pod["hostPID"], true);
    let host_paths: Vec<&serde_json::Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.get("hostPath"))
        .collect();
    assert_eq!(
        host_paths.len(),
        1,
        "only the cgroup tree comes from the host"
    );
    assert_eq!(host_paths[0]["path"], "/sys/fs/cgroup");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_ne!(c["securityContext"]["privileged"], true);

    // RBAC: exactly TokenReview create, and pod get in the sandbox namespace.
    let cr = find("ClusterRole", "agent-activator-node-agent-tokenreview");
    assert_eq!(
        cr["rules"],
        serde_json::json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}])
    );
    let role = find("Role", "agent-activator-node-agent");
    assert_eq!(role["metadata"]["namespace"], NS);
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}])
    );
    let np = find("NetworkPolicy", "agent-activator-node-agent");
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], 9470);
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "agent-activator"
    );
    let rb = find("RoleBinding", "agent-activator-node-agent");
    assert_eq!(rb["subjects"][0]["namespace"], "agent-activator-system");
    // The activator (pause: freeze): get on sandbox pods, list on agent pods, nothing more.
    let read = find("Role", "agent-activator-read-sandbox-pods");
    assert_eq!(read["metadata"]["namespace"], NS);
    assert_eq!(
        read["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}])
    );
    let read_rb = find("RoleBinding", "agent-activator-read-sandbox-pods");
    assert_eq!(read_rb["subjects"][0]["name"], CLIENT_SA);
    let locate = find("Role", "agent-activator-find-node-agent");
    assert_eq!(
        locate["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}])
    );

    // The shipped agent config parses, points at the mounted tree and admits the activator,
    // whose projected token carries the agent's audience.
    let cm = find("ConfigMap", "agent-activator-node-agent");
    let config =
        agent_activator::config::Config::from_yaml(cm["data"]["node-agent.yaml"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
    let agent = config.node_agent.expect("node_agent section");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "cgroup")
        .unwrap();
    assert_eq!(
        mount["mountPath"].as_str().unwrap(),
        agent.cgroup_root.to_str().unwrap()
    );
    assert_eq!(agent.namespaces, vec![NS.to_owned()]);
    assert_eq!(
        agent.allowed_clients,
        vec![format!("system:serviceaccount:{NS}:{CLIENT_SA}")]
    );
    let deployment = find("Deployment", "agent-activator");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        CLIENT_SA
    );
    let projected = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "node-agent-token")
        .expect("projected token volume");
    assert_eq!(
        projected["projected"]["sources"][0]["serviceAccountToken"]["audience"].as_str(),
        Some(agent.audience.as_str())
    );
    // The activator's defaults for backend.kubernetes.node_agent find this deployment.
    let client = agent_activator::config::NodeAgentClientConfig::default();
    assert_eq!(
        client.namespace,
        ds["metadata"]["namespace"].as_str().unwrap()
    );
    let (k, v) = client.selector.split_once('=').unwrap();
    assert_eq!(ds["spec"]["template"]["metadata"]["labels"][k], v);
    assert_eq!(client.port, agent.listen.port());
    let token_mount = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "node-agent-token")
        .expect("token mount");
    assert_eq!(
        client.token_path,
        std::path::Path::new(token_mount["mountPath"].as_str().unwrap()).join(
            projected["projected"]["sources"][0]["serviceAccountToken"]["path"]
                .as_str()
                .unwrap()
        )
    );

    // Built-in kinds against the Kubernetes schemas (strict), as deploy/validate.py does.
    let script = r#"
import sys, yaml
try:
    import kubernetes_validate
except ImportError as e:
    print(f"missing validator: {e}", file=sys.stderr); sys.exit(2)
v = kubernetes_validate.latest_version(); bad = 0; n = 0
for d in yaml.safe_load_all(sys.stdin):
    if not d or d["kind"] in ("ServiceMonitor", "HTTPRoute", "SandboxTemplate", "SandboxWarmPool"):
        continue
    n += 1
    try:
        kubernetes_validate.validate(d, v, strict=True)
    except Exception as e:
        bad += 1; print(f'{d["kind"]}/{d["metadata"]["name"]}: {e}')
print(f"checked {n}")
sys.exit(1 if bad else 0)
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rendered.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => assert!(text.contains("checked"), "{text}"),
        Some(2) => missing(
            test,
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        ),
        _ => panic!("rendered manifests are invalid:\n{text}"),
    }
}

/// The activator-side client finds the agent pod on the sandbox's node by label selector
/// and `spec.nodeName`, presents the token from its file, and gets the agent's answers
/// and refusals back as values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn client_finds_the_agent_on_the_pods_node_and_freezes_through_it() {
    use agent_activator::node_agent::client::{AgentLocator, ClientError, NodeAgentClient, PodRef};
    let Some(mut root) = TestRoot::or_skip(Hierarchy::V2, "client_finds_the_agent") else {
        return;
    };
    let agent = start_agent(testbed().await, &root).await;
    let uid = agent.pod("sb-1", NODE, &[SANDBOX_LABEL]);
    let pid = root.spawn_busy(&Layout::SystemdBurstable.container_dir(&uid));
    // The agent's own pod, as the DaemonSet would create it on node-a.
    let agent_ns = "agent-activator-system";
    let selector = ("app.kubernetes.io/name", "agent-activator-node-agent");
    node_pods::create(
        &agent.tb.store,
        &PodSpec {
            namespace: agent_ns,
            name: "node-agent-x1",
            node: NODE,
            labels: &[selector],
            ..PodSpec::default()
        },
    )
    .unwrap();
    let token_path = agent._dir.0.join("token");
    std::fs::write(&token_path, format!("{}\n", agent.token)).unwrap();
    let kube = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::from_yaml(&agent.tb.kubeconfig(NS)).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let client = NodeAgentClient::new(
        kube,
        AgentLocator {
            namespace: agent_ns.into(),
            selector: "app.kubernetes.io/name=agent-activator-node-agent".into(),
            port: agent.api_addr.port(),
            token_path: token_path.clone(),
            timeout: Duration::from_secs(5),
            address_ttl: Duration::from_secs(30),
        },
    );
    let pod = PodRef {
        namespace: NS.into(),
        name: "sb-1".into(),
        uid: uid.clone(),
        node: NODE.into(),
    };

    let frozen = client.freeze(&pod).await.unwrap();
    assert_eq!(
        (frozen.state.as_str(), frozen.uid.as_str()),
        ("frozen", uid.as_str())
    );
    assert!(root.kernel_frozen(&Layout::SystemdBurstable.pod_dir(&uid)));
    assert!(!makes_progress(pid, WINDOW));
    assert_eq!(client.status(&pod).await.unwrap().state, "frozen");
    assert_eq!(client.thaw(&pod).await.unwrap().state, "running");
    assert!(makes_progress(pid, WINDOW));

    // No agent on node-b; a wrong UID comes back as the agent's refusal.
    let elsewhere = PodRef {
        node: "node-b".into(),
        ..pod.clone()
    };
    assert!(
        matches!(client.freeze(&elsewhere).await, Err(ClientError::NoAgent(n)) if n == "node-b")
    );
    let wrong = PodRef {
        uid: "0c4f4d5e-8a43-4a8e-9a0e-6a2b9f0d1c22".into(),
        ..pod.clone()
    };
    match client.freeze(&wrong).await {
        Err(ClientError::Refused {
            status: 409, code, ..
        }) => assert_eq!(code, "uid_mismatch"),
        other => panic!("expected uid_mismatch, got {other:?}"),
    }
    // A token of another client is refused by the agent, not by the client.
    std::fs::write(
        &token_path,
        agent
            .tb
            .tokens
            .issue_service_account(NS, "intruder", &[AUDIENCE]),
    )
    .unwrap();
    match client.freeze(&pod).await {
        Err(ClientError::Refused {
            status: 403, code, ..
        }) => assert_eq!(code, "forbidden"),
        other => panic!("expected forbidden, got {other:?}"),
    }
    assert!(!root.kernel_frozen(&Layout::SystemdBurstable.pod_dir(&uid)));
}
