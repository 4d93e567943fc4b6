//! What signed session tokens cost: one verification, and one request through the
//! activator on the fast path with `session.auth: none` versus `hmac`.
//! Run: `cargo bench --bench session_auth`.

use std::hint::black_box;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use agent_activator::config::Config;
use agent_activator::server;
use agent_activator::session::{SessionKey, TokenSigner};

#[path = "support/ok_sandbox.rs"]
mod ok_sandbox;
use ok_sandbox::sandbox;

const SECRET: &[u8] = b"bench-secret-0123456789abcdef0123456789";
const ID: &str = "3f6c1c0e9a2b4d7e8f901234abcdef56";

fn verify(c: &mut Criterion) {
    let signer = TokenSigner::new(&[("k2", SECRET), ("k1", SECRET)], 3600, 128).unwrap();
    let token = signer.mint(&SessionKey::parse(ID, 128).unwrap());
    let mut g = c.benchmark_group("token");
    g.bench_function("verify", |b| {
        b.iter(|| signer.verify(black_box(token.as_bytes())).unwrap())
    });
    let forged = token.replacen('3', "4", 1);
    g.bench_function("verify_forged", |b| {
        b.iter(|| signer.verify(black_box(forged.as_bytes())).unwrap_err())
    });
    g.finish();
}

fn hop(c: &mut Criterion) {
    // One thread runs client, activator and sandbox, as in benches/proxy_hop.rs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key_file = std::env::temp_dir().join(format!("aa-bench-key-{}", std::process::id()));
    std::fs::write(&key_file, SECRET).unwrap();
    let (none, hmac, _servers) = rt.block_on(async {
        let up = sandbox().await;
        let start = |session: String| async move {
            let mut config = Config::from_yaml(&format!(
                "backend: {{kind: static, endpoints: ['{up}']}}\nlog: {{access_log: false}}\n\
                 autoscaler: {{enabled: false}}\n{session}"
            ))
            .unwrap();
            config.listen = "127.0.0.1:0".parse().unwrap();
            config.admin_listen = "127.0.0.1:0".parse().unwrap();
            server::start(config).await.unwrap()
        };
        let none = start(String::new()).await;
        let hmac = start(format!(
            "session: {{auth: hmac, hmac: {{keys: [{{id: k1, secret_file: '{}'}}]}}}}\n",
            key_file.display()
        ))
        .await;
        (none.proxy_addr(), hmac.proxy_addr(), (none, hmac))
    });
    let signer = TokenSigner::new(&[("k1", SECRET)], 3600, 128).unwrap();
    let token = signer.mint(&SessionKey::parse(ID, 128).unwrap());
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |addr: SocketAddr, value: String| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{addr}/v1/chat"))
                .header("x-session-id", value)
                .body(Empty::new())
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            resp.into_body().collect().await.unwrap();
        }
    };
    // Bind both sessions before measuring: the fast path only.
    rt.block_on(get(none, ID.to_owned()));
    rt.block_on(get(hmac, token.clone()));

    let mut g = c.benchmark_group("auth_hop");
    g.bench_function("none", |b| b.iter(|| rt.block_on(get(none, ID.to_owned()))));
    g.bench_function("hmac", |b| b.iter(|| rt.block_on(get(hmac, token.clone()))));
    g.finish();
    let _ = std::fs::remove_file(&key_file);
}

criterion_group!(benches, verify, hop);
criterion_main!(benches);
