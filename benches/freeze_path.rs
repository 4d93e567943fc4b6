//! Freeze and thaw through the activator's whole path on Kubernetes
//! (`backend.kubernetes.pause: freeze`): the activator pauses a session (kube backend ->
//! the node agent on the pod's node, found by label selector -> TokenReview and pod check ->
//! kernel-confirmed cgroup v2 freeze -> the `agent-activator.dev/frozen` annotation on the
//! Sandbox), then the session's next request arrives through the proxy and is held while the
//! activator thaws the pod through the agent, then forwarded: "thaw + first byte" is that
//! request's time to its complete response. kube-testbed is the API server; its pod is a real
//! `demo-sandbox` process in a kubelet-style pod cgroup; the node agent is the real binary.
//! Every answer is checked: activation `resume`, and the sandbox's counter continues (memory
//! kept across every freeze).
//!
//! Run (as root, cgroup v2 writable): `cargo bench --bench freeze_path`
//! Optional: `FREEZE_PATH_BENCH_CYCLES=300` (default 200). Under the test suite
//! (`cargo test --all-targets`, no `--bench`) it runs [`SUITE_CYCLES`] cycles, as criterion
//! runs each benchmark once there: the rig is exercised by CI, and a broken one fails it
//! (issue 26). tests/it/kubernetes_freeze.rs covers the behaviour; this is the timing.

#[path = "../tests/it/support/cgroup_tree.rs"]
mod cgroup_tree;
#[path = "../tests/it/support/freeze_rig.rs"]
mod freeze_rig;
#[path = "../tests/it/support/kube.rs"]
mod kube_support;
#[path = "../tests/it/support/node_agent_process.rs"]
mod node_agent_process;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use freeze_rig::{NS, rig};
use kube_support::{key, wait_pods};
use kube_testbed::kubelet_cgroups::Driver;

/// Cycles under `cargo test --all-targets`: enough to run every step of the rig twice.
const SUITE_CYCLES: usize = 2;

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<28} n={:<5} p50={:>7.3} ms  p90={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms",
        h.len(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.90) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn main() {
    if !std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        && !std::path::Path::new("/sys/fs/cgroup/cgroup.procs").exists()
    {
        println!("freeze_path: 0 cycles: no cgroup v2 hierarchy here; nothing measured");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let cycles: usize = std::env::var("FREEZE_PATH_BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        // `cargo bench` passes `--bench`; the suite runs a couple (see the module doc).
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            200
        } else {
            SUITE_CYCLES
        });
    if cycles == 0 {
        println!("freeze_path: 0 cycles (FREEZE_PATH_BENCH_CYCLES=0); nothing measured");
        return;
    }
    let rig = rig("bench", Driver::Systemd, |tb| {
        tb.seed_agent_sandbox(NS, "default", 1).unwrap()
    })
    .await;
    wait_pods(&rig.tb, 1).await;
    // Idle pausing off: the bench pauses on its own schedule.
    let srv = rig
        .activator("agent-sandbox", "bench", "idle:\n  timeout: 1h\n")
        .await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{}/counter", srv.proxy_addr());
    let post = || {
        let req = http::Request::post(url.as_str())
            .header("x-session-id", "bench")
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(req)
    };
    let read = |resp: http::Response<hyper::body::Incoming>| async move {
        let activation = resp
            .headers()
            .get("x-activator-activation")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let counter = v["counter"].as_u64();
        let counter = counter.unwrap_or_else(|| panic!("{status}: {v}"));
        (activation, counter)
    };
    let (activation, mut counter) = read(post().await.expect("first request")).await;
    assert_eq!(activation, "claim");
    let session = key("bench");
    let mut freeze = Histogram::<u64>::new(3).unwrap();
    let mut thaw = Histogram::<u64>::new(3).unwrap();
    for cycle in 0..cycles {
        let t = Instant::now();
        assert_eq!(
            srv.activator().pause(&session).await.ok(),
            Some(true),
            "paused"
        );
        freeze.record(t.elapsed().as_micros() as u64).unwrap();
        let t = Instant::now();
        let resp = post().await.expect("the thawing request");
        if t.elapsed() > std::time::Duration::from_secs(1) {
            eprintln!("cycle {cycle}: the answer took {:?}", t.elapsed());
        }
        let (activation, n) = read(resp).await;
        thaw.record(t.elapsed().as_micros() as u64).unwrap();
        assert_eq!(activation, "resume", "held for the thaw");
        assert_eq!(n, counter + 1, "memory kept across the freeze");
        counter = n;
    }
    println!(
        "freeze path through the activator, {cycles} cycles of one agent-sandbox pod \
         (kube backend, pause: freeze, cgroup v2 systemd layout):"
    );
    report("pause (freeze + annotation)", &freeze);
    report("thaw + first byte (proxy)", &thaw);
    srv.shutdown().await;
}
