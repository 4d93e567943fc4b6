//! One request through the activator versus straight to the sandbox, in-process over
//! loopback: the proxy's added latency on the fast path (session bound and ready), with
//! tracing off and with OTLP export on at sample ratio 0 and 1 (to an in-process sink).
//! Run: `cargo bench --bench proxy_hop`.

use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use agent_activator::config::Config;
use agent_activator::server;

#[path = "support/ok_sandbox.rs"]
mod ok_sandbox;
use ok_sandbox::sandbox;

/// Starts an activator in front of `up`; `telemetry` is extra YAML under `telemetry:`.
async fn activator(up: SocketAddr, telemetry: &str) -> (SocketAddr, server::RunningServer) {
    let mut config = Config::from_yaml(&format!(
        "backend: {{kind: static, endpoints: ['{up}']}}\nlog: {{access_log: false}}\n\
         autoscaler: {{enabled: false}}\n{telemetry}"
    ))
    .unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    let server = server::start(config).await.unwrap();
    (server.proxy_addr(), server)
}

fn bench(c: &mut Criterion) {
    // One thread runs client, activator and sandbox: the figure is CPU work per request
    // (three sockets' worth of syscalls plus the proxy's own), free of cross-thread
    // wake-up noise on a shared machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (direct, proxied, ratio0, ratio1, _servers) = rt.block_on(async {
        let up = sandbox().await;
        // The OTLP collector stand-in: any 200 will do (the sandbox answers every path).
        let sink = sandbox().await;
        let (proxied, s0) = activator(up, "").await;
        let (ratio0, s1) = activator(
            up,
            &format!("telemetry: {{otlp: {{endpoint: 'http://{sink}'}}, sample_ratio: 0.0}}\n"),
        )
        .await;
        let (ratio1, s2) = activator(
            up,
            &format!("telemetry: {{otlp: {{endpoint: 'http://{sink}'}}, sample_ratio: 1.0}}\n"),
        )
        .await;
        (up, proxied, ratio0, ratio1, [s0, s1, s2])
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |addr: SocketAddr| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{addr}/v1/chat"))
                .header("x-session-id", "bench-session")
                .body(Empty::new())
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert!(resp.status().is_success());
            resp.into_body().collect().await.unwrap();
        }
    };
    // Bind the session before measuring: the fast path only.
    for addr in [proxied, ratio0, ratio1] {
        rt.block_on(get(addr));
    }

    let mut g = c.benchmark_group("hop");
    g.bench_function("direct", |b| b.iter(|| rt.block_on(get(direct))));
    g.bench_function("through_activator", |b| {
        b.iter(|| rt.block_on(get(proxied)))
    });
    g.bench_function("telemetry_ratio_0", |b| b.iter(|| rt.block_on(get(ratio0))));
    g.bench_function("telemetry_ratio_1", |b| b.iter(|| rt.block_on(get(ratio1))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
