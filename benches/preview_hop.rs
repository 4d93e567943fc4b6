//! One request through a preview host versus the same request on the main route, in-process
//! over loopback (the setup of `proxy_hop`): what a preview hop adds on top of the session's
//! fast path. Cases: `main_route` (`X-Session-ID`), `public` (`access: public`: host parse,
//! preview lookup, allowlist, session-entry check, `port_endpoint`) and `cookie`
//! (`access: token`, the preview cookie verified on every request: one HMAC-SHA256).
//! Run: `cargo bench --bench preview_hop` (goal: `public` and `cookie` within 5 % of
//! `main_route`; docs/benchmarks.md).

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

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// `GET http://{addr}{path}` with `headers`; the response read to the end.
async fn get(client: &Http, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Bytes {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert!(
        status.is_success() || status.is_redirection(),
        "{status}: {body:?}"
    );
    if let Some(c) = parts.headers.get("set-cookie") {
        return Bytes::copy_from_slice(c.as_bytes());
    }
    body
}

/// An activator in front of `up` whose preview (`access`) allows `up`'s own port (the
/// static backend reaches a preview port at the endpoint's host), a bound session `bench`
/// and one minted preview: (proxy, admin, preview host, token).
async fn activator(
    client: &Http,
    up: SocketAddr,
    access: &str,
) -> (SocketAddr, String, Option<String>, server::RunningServer) {
    let mut config = Config::from_yaml(&format!(
        "backend: {{kind: static, endpoints: ['{up}']}}\nlog: {{access_log: false}}\n\
         autoscaler: {{enabled: false}}\n\
         preview: {{domain: preview.bench, ports: [{}], access: {access}}}\n",
        up.port()
    ))
    .unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    let server = server::start(config).await.unwrap();
    let proxy = server.proxy_addr();
    get(client, proxy, "/", &[("x-session-id", "bench")]).await;
    let req = Request::post(format!(
        "http://{}/api/sessions/bench/previews",
        server.admin_addr()
    ))
    .body(Empty::new())
    .unwrap();
    let body = client.request(req).await.unwrap().into_body();
    let minted: serde_json::Value =
        serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap();
    let host = format!(
        "{}-{}.preview.bench",
        up.port(),
        minted["preview"].as_str().unwrap()
    );
    let token = minted["token"].as_str().map(str::to_owned);
    (proxy, host, token, server)
}

fn bench(c: &mut Criterion) {
    // One thread for client, activator and sandbox, as in `proxy_hop`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client: Http = Client::builder(TokioExecutor::new()).build_http();
    let (public, token, _servers) = rt.block_on(async {
        let up = sandbox().await;
        let public = activator(&client, up, "public").await;
        let token = activator(&client, up, "token").await;
        (public, token, ())
    });
    let (public_proxy, public_host, _, _s1) = public;
    let (token_proxy, token_host, token, _s2) = token;
    // The cookie the token is exchanged for.
    let set_cookie = rt.block_on(get(
        &client,
        token_proxy,
        &format!("/?preview_token={}", token.unwrap()),
        &[("host", &token_host)],
    ));
    let cookie = String::from_utf8_lossy(&set_cookie)
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("activator-preview="), "{cookie}");
    // Warm every path once (pooled upstream connections on both keys).
    rt.block_on(get(
        &client,
        public_proxy,
        "/v1/chat",
        &[("host", &public_host)],
    ));
    rt.block_on(get(
        &client,
        token_proxy,
        "/v1/chat",
        &[("host", &token_host), ("cookie", &cookie)],
    ));

    let mut g = c.benchmark_group("preview");
    g.bench_function("main_route", |b| {
        b.iter(|| {
            rt.block_on(get(
                &client,
                public_proxy,
                "/v1/chat",
                &[("x-session-id", "bench")],
            ))
        })
    });
    g.bench_function("public", |b| {
        b.iter(|| {
            rt.block_on(get(
                &client,
                public_proxy,
                "/v1/chat",
                &[("host", &public_host)],
            ))
        })
    });
    g.bench_function("cookie", |b| {
        b.iter(|| {
            rt.block_on(get(
                &client,
                token_proxy,
                "/v1/chat",
                &[("host", &token_host), ("cookie", &cookie)],
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
