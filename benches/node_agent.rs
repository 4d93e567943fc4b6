//! Freeze and thaw latency through the node agent's whole path: HTTP request with a bearer
//! token, (cached) TokenReview and pod check, kernel-confirmed cgroup freeze; and thaw +
//! first byte: the thaw request, then the first response byte from the sandbox process
//! that was frozen. A real `agent-activator demo-sandbox` process in a kubelet-style cgroup
//! v2 tree (systemd driver) under the real cgroup filesystem, the agent as a real process,
//! kube-testbed as the API server.
//!
//! Run (as root, cgroup v2 writable): `cargo bench --bench node_agent`
//! Optional: `NODE_AGENT_BENCH_CYCLES=500` (default 300).

#[path = "../tests/it/support/cgroup_tree.rs"]
mod cgroup_tree;
#[path = "../tests/it/support/node_agent_process.rs"]
mod node_agent_process;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

use cgroup_tree::{Hierarchy, TestRoot};
use kube_testbed::node_pods::{self, PodSpec};
use kube_testbed::{Testbed, TestbedOptions};
use node_agent_process::NodeAgentProcess;

const NS: &str = "agents";
const NODE: &str = "node-a";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn lines_until(child: &mut tokio::process::Child, prefixes: &[&str]) -> Vec<String> {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut found = vec![String::new(); prefixes.len()];
    tokio::time::timeout(Duration::from_secs(30), async {
        while found.iter().any(String::is_empty) {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("process exited early");
            for (i, p) in prefixes.iter().enumerate() {
                if let Some(rest) = line.strip_prefix(p) {
                    found[i] = rest.trim().to_owned();
                }
            }
        }
    })
    .await
    .expect("addresses printed");
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

async fn post(
    client: &HttpClient,
    url: String,
    token: &str,
    uid: &str,
) -> (u16, serde_json::Value) {
    let req = hyper::Request::post(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(format!("{{\"uid\":\"{uid}\"}}"))))
        .unwrap();
    let resp = client.request(req).await.expect("agent answers");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<24} n={:<5} p50={:>7.3} ms  p90={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms",
        h.len(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.90) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let cycles: usize = std::env::var("NODE_AGENT_BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        // `cargo bench` passes `--bench`; under the suite (`cargo test --all-targets`) a
        // short smoke run.
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            300
        } else {
            20
        });
    if cfg!(missing_cgroup_v2) {
        println!("node_agent bench: not run: no writable cgroup v2 hierarchy (build.rs probe)");
        return;
    }
    let Some(root) = TestRoot::or_skip(Hierarchy::V2, "node_agent bench") else {
        return;
    };
    let tb = Testbed::start(TestbedOptions::default()).await.unwrap();
    let pod = node_pods::create(
        &tb.store,
        &PodSpec {
            namespace: NS,
            name: "sb-1",
            node: NODE,
            labels: &[("agents.x-k8s.io/sandbox-name-hash", "5f2a9c1e")],
            ..PodSpec::default()
        },
    )
    .unwrap();
    let uid = node_pods::uid(&pod);
    let esc = uid.replace('-', "_");
    let container = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{esc}.slice/cri-containerd-bench.scope"
    );
    let bin = env!("CARGO_BIN_EXE_agent-activator");

    // The sandbox: a demo-sandbox process moved into the pod's container cgroup.
    let cg = root.mkdir(&container);
    let mut sandbox = Command::new(bin)
        .args(["demo-sandbox", "--port", "0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    std::fs::write(cg.join("cgroup.procs"), sandbox.id().unwrap().to_string()).unwrap();
    let sandbox_addr: SocketAddr = lines_until(&mut sandbox, &["listening on "]).await[0]
        .parse()
        .unwrap();

    let dir = std::env::temp_dir().join(format!("node-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kubeconfig"), tb.kubeconfig(NS)).unwrap();
    std::fs::write(
        dir.join("agent.yaml"),
        format!(
            "log:\n  level: warn\nnode_agent:\n  listen: 127.0.0.1:0\n  metrics_listen: 127.0.0.1:0\n  \
             node_name: {NODE}\n  cgroup_root: {}\n  namespaces: [{NS}]\n  \
             allowed_clients: [\"system:serviceaccount:{NS}:agent-activator\"]\n  kubeconfig: {}\n",
            root.path.display(),
            dir.join("kubeconfig").display()
        ),
    )
    .unwrap();
    let agent = NodeAgentProcess::start(&dir.join("agent.yaml")).await;
    let (api, metrics) = (agent.api, agent.metrics);
    let token =
        tb.tokens
            .issue_service_account(NS, "agent-activator", &["agent-activator-node-agent"]);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let freeze_url = format!("http://{api}/v1/pods/{NS}/sb-1/freeze");
    let thaw_url = format!("http://{api}/v1/pods/{NS}/sb-1/thaw");
    let sandbox_url = format!("http://{sandbox_addr}/healthz");

    // Warm up: connections, token and pod caches, the sandbox's first response.
    for _ in 0..5 {
        assert_eq!(post(&client, freeze_url.clone(), &token, &uid).await.0, 200);
        assert_eq!(post(&client, thaw_url.clone(), &token, &uid).await.0, 200);
    }
    let mut freeze = Histogram::<u64>::new(3).unwrap();
    let mut thaw = Histogram::<u64>::new(3).unwrap();
    let mut thaw_first_byte = Histogram::<u64>::new(3).unwrap();
    let mut frozen_bytes = 0u64;
    for _ in 0..cycles {
        let t = Instant::now();
        let (status, body) = post(&client, freeze_url.clone(), &token, &uid).await;
        freeze.record(t.elapsed().as_micros() as u64).unwrap();
        assert_eq!((status, body["state"].as_str()), (200, Some("frozen")));
        frozen_bytes = body["memory_bytes"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(2)).await;

        let t = Instant::now();
        let (status, body) = post(&client, thaw_url.clone(), &token, &uid).await;
        thaw.record(t.elapsed().as_micros() as u64).unwrap();
        assert_eq!((status, body["state"].as_str()), (200, Some("running")));
        let resp = client
            .request(
                hyper::Request::get(&sandbox_url)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .expect("sandbox answers after the thaw");
        assert!(resp.status().is_success());
        let mut body = resp.into_body();
        let _first = body.frame().await;
        thaw_first_byte
            .record(t.elapsed().as_micros() as u64)
            .unwrap();
        let _ = body.collect().await;
    }
    println!(
        "node agent, {cycles} freeze/thaw cycles of one demo-sandbox pod (cgroup v2, systemd layout):"
    );
    report("freeze (HTTP, kernel ok)", &freeze);
    report("thaw (HTTP, kernel ok)", &thaw);
    report("thaw + first byte", &thaw_first_byte);
    println!("memory_bytes reported while frozen: {frozen_bytes}");
    let text = client
        .request(
            hyper::Request::get(format!("http://{metrics}/metrics"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    for line in String::from_utf8_lossy(&text).lines() {
        if line.starts_with("node_agent_freeze_seconds_sum")
            || line.starts_with("node_agent_thaw_seconds_sum")
            || line.starts_with("node_agent_freeze_seconds_count")
        {
            println!("  {line}");
        }
    }
    drop(agent);
    drop(sandbox);
    let _ = std::fs::remove_dir_all(&dir);
}
