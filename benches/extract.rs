//! Session-key extraction cost per source: what the proxy pays before it can look up a
//! session. Run: `cargo bench --bench extract`.

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Uri};
use std::hint::black_box;

use agent_activator::config::Config;
use agent_activator::session::SessionExtractor;

fn extractor(sources: &str, on_missing: &str) -> SessionExtractor {
    let yaml = format!(
        "backend: {{kind: static, endpoints: ['127.0.0.1:1']}}\n\
         session: {{on_missing: {on_missing}, sources: {sources}}}"
    );
    let config = Config::from_yaml(&yaml).expect("bench config");
    SessionExtractor::new(&config.session, None, false)
}

const ID: &str = "3f6c1c0e9a2b4d7e8f901234abcdef56";

fn typical_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("agents.example.com"));
    h.insert("user-agent", HeaderValue::from_static("agent-sdk/1.4"));
    h.insert("accept", HeaderValue::from_static("text/event-stream"));
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("extract");

    let e = extractor("[{header: X-Session-ID}]", "reject");
    let uri: Uri = "/v1/chat".parse().unwrap();
    let mut h = typical_headers();
    h.insert("x-session-id", HeaderValue::from_static(ID));
    g.bench_function("header", |b| {
        b.iter(|| e.extract(black_box(&uri), black_box(&h)).unwrap())
    });

    let e = extractor("[{header: X-Session-ID}, {cookie: sid}]", "reject");
    let mut h = typical_headers();
    h.insert(
        "cookie",
        HeaderValue::from_str(&format!("_ga=GA1.2.3; theme=dark; sid={ID}; lang=en")).unwrap(),
    );
    g.bench_function("cookie_after_header_miss", |b| {
        b.iter(|| e.extract(black_box(&uri), black_box(&h)).unwrap())
    });

    let e = extractor("[{path_prefix: /s/}]", "reject");
    let uri: Uri = format!("/s/{ID}/v1/chat?stream=true").parse().unwrap();
    let h = typical_headers();
    g.bench_function("path_prefix_rewrite", |b| {
        b.iter(|| e.extract(black_box(&uri), black_box(&h)).unwrap())
    });

    let e = extractor("[{query: session}]", "reject");
    let uri: Uri = format!("/v1/chat?stream=true&session={ID}")
        .parse()
        .unwrap();
    g.bench_function("query", |b| {
        b.iter(|| e.extract(black_box(&uri), black_box(&h)).unwrap())
    });

    let e = extractor("[{header: X-Session-ID}]", "reject");
    let uri: Uri = "/v1/chat".parse().unwrap();
    let mut h = typical_headers();
    h.insert(
        "x-session-id",
        HeaderValue::from_static("bad id with spaces"),
    );
    g.bench_function("invalid_rejected", |b| {
        b.iter(|| e.extract(black_box(&uri), black_box(&h)).unwrap_err())
    });

    let e = extractor("[{header: X-Session-ID}]", "create");
    let h = typical_headers();
    g.bench_function("missing_minted", |b| {
        b.iter(|| e.extract(black_box(&uri), black_box(&h)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
