//! Kubernetes API writes per second at 10,000 active sessions, one replica and two, against
//! kube-testbed (API server only; its audit log counts every create/update/patch/delete).
//!
//! Each active session is reported to the backend once a second per replica, as the
//! activation layer does (`record_activity`); with two replicas every session is active
//! on both (the worst case: each replica's digest lists all of them). Steady state only:
//! the measurement starts after every replica has published its first digest.
//!
//! Run: `cargo bench --bench kube_writes --profile dev` (a count, not a speed: the
//! profile does not matter). `KUBE_WRITES_SECS` sets the measured window (default 30).

use std::time::Duration;

use agent_activator::backend::kubernetes::KubernetesBackend;
use agent_activator::backend::{SandboxBackend, SandboxId};
use agent_activator::cluster::{KubeContext, ReplicaId};
use agent_activator::config::Config;
use agent_activator::session::SessionKey;
use kube_testbed::{Testbed, TestbedOptions};

const SESSIONS: usize = 10_000;

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` (the suite) it is a
    // smoke run: a 3 s window proves the bench still builds and runs.
    let benching = std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("KUBE_WRITES_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benching { 30 } else { 3 });
    println!("sessions,replicas,window_s,writes,writes_per_s,by_resource");
    for replicas in [1, 2] {
        run(replicas, Duration::from_secs(secs)).await;
    }
}

async fn run(replicas: usize, window: Duration) {
    let tb = Testbed::start(TestbedOptions::default())
        .await
        .expect("testbed starts");
    let cfg = Config::from_yaml(
        "backend:\n  kind: kubernetes\n  kubernetes:\n    pool: default\n    namespace: default\n",
    )
    .expect("bench config is valid");
    let backends: Vec<KubernetesBackend> = (0..replicas)
        .map(|i| {
            let client = kube::Client::try_from(kube::Config::new(tb.url().parse().unwrap()))
                .expect("kube client");
            let ctx = KubeContext::new(client, "default", ReplicaId::named(&format!("bench-{i}")));
            KubernetesBackend::new(&ctx, &cfg)
        })
        .collect();
    let sessions: Vec<SessionKey> = (0..SESSIONS)
        .map(|i| SessionKey::parse(&format!("session-{i}"), 128).unwrap())
        .collect();
    let sandbox = SandboxId::new("unused");
    let report = |bs: &[KubernetesBackend]| {
        for b in bs {
            for s in &sessions {
                b.record_activity(s, &sandbox);
            }
        }
    };
    // Warm-up: every session becomes active; the first digests go out.
    report(&backends);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tb.audit.clear();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < window {
        tick.tick().await;
        report(&backends);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let snapshot = tb.audit.snapshot();
    let writes = tb.audit.writes();
    let by: Vec<String> = snapshot
        .iter()
        .filter(|((v, _, _), _)| matches!(v.as_str(), "create" | "update" | "patch" | "delete"))
        .map(|((v, _, r), n)| format!("{v} {r}={n}"))
        .collect();
    println!(
        "{SESSIONS},{replicas},{elapsed:.1},{writes},{:.2},{}",
        writes as f64 / elapsed,
        by.join(" ")
    );
    for b in &backends {
        b.shutdown().await;
    }
}
