//! Activation latency through the real proxy with the process backend (demo sandboxes):
//! warm claim (first request of a new session) and resume (request to a frozen session),
//! time to the response head, at concurrency 1, 8 and 32.
//!
//! Run: `cargo bench --bench activation`. Prints a markdown table (see docs/benchmarks.md).
//! "added" subtracts the median of the same request sent straight to a sandbox.
//! `AA_BENCH_ISOLATION=none` (default `namespaces`) measures unisolated sandboxes, for the
//! cost of isolation (issue 20).

use std::net::SocketAddr;
use std::time::Duration;

use agent_activator::backend::{ActivationKind, ClaimBudget, SandboxState};
use agent_activator::config::Config;
use agent_activator::server::{self, RunningServer};
use agent_activator::session::SessionKey;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

const LEVELS: [usize; 3] = [1, 8, 32];

fn config(workdir: &std::path::Path) -> Config {
    let bin = env!("CARGO_BIN_EXE_agent-activator");
    let isolation = std::env::var("AA_BENCH_ISOLATION").unwrap_or_else(|_| "namespaces".to_owned());
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nlog:\n  access_log: false\nidle:\n  timeout: 1h\n  policy: pause\nbackend:\n  kind: process\n  command: [\"{bin}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  stop_grace: 1s\n  isolation: {isolation}\nautoscaler:\n  enabled: false\n",
        workdir.display()
    );
    Config::from_yaml(&yaml).expect("bench config")
}

/// `GET /healthz` with an optional session; the time to the response head.
async fn timed_get(c: &HttpClient, addr: SocketAddr, session: Option<&str>) -> Duration {
    let mut req = http::Request::get(format!("http://{addr}/healthz"));
    if let Some(s) = session {
        req = req.header("x-session-id", s);
    }
    let req = req.body(Empty::new()).unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .expect("answer in time")
        .expect("request");
    let took = start.elapsed();
    assert!(
        session.is_none() || resp.status().is_success(),
        "status {}",
        resp.status()
    );
    let _ = resp.into_body().collect().await;
    took
}

/// Sends `sessions` concurrently and records each time to the response head.
async fn burst(c: &HttpClient, addr: SocketAddr, sessions: &[String], h: &mut Histogram<u64>) {
    let times = futures_util::future::join_all(
        sessions
            .iter()
            .map(|s| timed_get(c, addr, Some(s.as_str()))),
    )
    .await;
    for t in times {
        h.record(t.as_micros() as u64).unwrap();
    }
}

/// Opens `n` keep-alive connections to the proxy (sessionless requests get a fast 400).
async fn warm_connections(c: &HttpClient, addr: SocketAddr, n: usize) {
    futures_util::future::join_all((0..n).map(|_| timed_get(c, addr, None))).await;
}

async fn wait_warm(server: &RunningServer, n: usize) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = server.backend().sandboxes();
        let warm = rows
            .iter()
            .filter(|r| r.state == SandboxState::Warm)
            .count();
        let stopping = rows.iter().any(|r| r.state == SandboxState::Stopping);
        if warm >= n && !stopping {
            return;
        }
        assert!(Instant::now() < end, "warm pool of {n} not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key(s: &str) -> SessionKey {
    SessionKey::parse(s, 128).unwrap()
}

struct Row {
    what: &'static str,
    level: usize,
    h: Histogram<u64>,
}

async fn run() -> Vec<Row> {
    let dir = std::env::temp_dir().join(format!("aa-bench-{}", std::process::id()));
    let server = server::start(config(&dir)).await.expect("activator starts");
    let proxy = server.proxy_addr();
    let c: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let mut rows = Vec::new();

    // Baseline: the same request straight to one sandbox over a kept-alive connection.
    server.backend().set_warm_pool_target(1).await.unwrap();
    wait_warm(&server, 1).await;
    let direct_addr = server.backend().sandboxes()[0].endpoint.unwrap();
    let mut direct = Histogram::<u64>::new(3).unwrap();
    for _ in 0..2000 {
        let t = timed_get(&c, direct_addr, None).await;
        direct.record(t.as_micros() as u64).unwrap();
    }
    rows.push(Row {
        what: "direct",
        level: 1,
        h: direct,
    });

    // The backend's own share of a warm claim: `SandboxBackend::claim` called in-process.
    const CLAIMS: usize = 40;
    server
        .backend()
        .set_warm_pool_target(CLAIMS as u32)
        .await
        .unwrap();
    wait_warm(&server, CLAIMS).await;
    server.backend().set_warm_pool_target(0).await.unwrap();
    let mut backend_claim = Histogram::<u64>::new(3).unwrap();
    let mut bound = Vec::new();
    for i in 0..CLAIMS {
        let k = key(&format!("direct-claim-{i}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        let budget = ClaimBudget {
            admission_deadline: deadline,
            deadline,
        };
        let start = Instant::now();
        let b = server.backend().claim(&k, budget).await.unwrap();
        backend_claim
            .record(start.elapsed().as_nanos() as u64)
            .unwrap();
        assert_eq!(b.kind, ActivationKind::Claim);
        bound.push((k, b.sandbox));
    }
    for (k, id) in bound {
        server.backend().release(&k, &id).await.unwrap();
    }
    println!(
        "backend claim (in-process, warm, {CLAIMS} samples): p50 {} ns, p99 {} ns, max {} ns",
        backend_claim.value_at_quantile(0.5),
        backend_claim.value_at_quantile(0.99),
        backend_claim.max()
    );

    for &level in &LEVELS {
        warm_connections(&c, proxy, level).await;
        // Warm claim: `level` new sessions at once, each taking a pooled sandbox.
        let rounds = (240 / level).clamp(6, 60);
        let mut claim = Histogram::<u64>::new(3).unwrap();
        server
            .backend()
            .set_warm_pool_target(level as u32)
            .await
            .unwrap();
        for r in 0..rounds {
            wait_warm(&server, level).await;
            let sessions: Vec<String> = (0..level)
                .map(|i| format!("claim-{level}-{r}-{i}"))
                .collect();
            burst(&c, proxy, &sessions, &mut claim).await;
            for s in &sessions {
                server.activator().release(&key(s)).await.unwrap();
            }
        }
        rows.push(Row {
            what: "warm claim",
            level,
            h: claim,
        });

        // Resume: `level` frozen sessions, each woken by one request.
        wait_warm(&server, level).await;
        let sessions: Vec<String> = (0..level).map(|i| format!("resume-{level}-{i}")).collect();
        burst(&c, proxy, &sessions, &mut Histogram::new(3).unwrap()).await;
        let mut resume = Histogram::<u64>::new(3).unwrap();
        for _ in 0..(600 / level).clamp(20, 200) {
            futures_util::future::join_all(sessions.iter().map(|s| {
                let a = server.activator().clone();
                async move { assert!(a.pause(&key(s)).await.unwrap()) }
            }))
            .await;
            burst(&c, proxy, &sessions, &mut resume).await;
        }
        rows.push(Row {
            what: "resume",
            level,
            h: resume,
        });
        for s in &sessions {
            server.activator().release(&key(s)).await.unwrap();
        }
    }
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported here.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows = rt.block_on(run());
    let ms = |us: u64| us as f64 / 1000.0;
    let base = rows[0].h.value_at_quantile(0.5);
    println!(
        "| measurement | concurrency | samples | p50 ms | p99 ms | p50 added ms | p99 added ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (p50, p99) = (r.h.value_at_quantile(0.5), r.h.value_at_quantile(0.99));
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.what,
            r.level,
            r.h.len(),
            ms(p50),
            ms(p99),
            ms(p50.saturating_sub(base)),
            ms(p99.saturating_sub(base)),
        );
    }
}
