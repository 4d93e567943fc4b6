//! OpenTelemetry over real sockets: an in-process OTLP/HTTP receiver decodes what the
//! activator exports while it proxies to demo-sandbox processes: the request span under
//! the caller's `traceparent`, the activation span (claim, then resume after a pause), the
//! forward span whose context the sandbox receives, hashed sessions only.

use std::sync::{Arc, Mutex};

use agent_activator::lock::MutexExt;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::support;

use support::HttpClient;
use support::serve_process::{ServeProcess, access_lines};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// What the receiver got: each span with its resource's attributes.
type Received = Arc<Mutex<Vec<(Vec<KeyValue>, Span)>>>;

/// An OTLP/HTTP receiver on 127.0.0.1: decodes `POST /v1/traces` protobuf bodies.
async fn receiver() -> (std::net::SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Received = Arc::default();
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        assert_eq!(req.headers()["x-api-key"], "k1");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        for rs in export.resource_spans {
                            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                            for ss in rs.scope_spans {
                                for span in ss.spans {
                                    sink.lock_recovered().push((attrs.clone(), span));
                                }
                            }
                        }
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

async fn get(c: &HttpClient, session: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let mut all = vec![("x-session-id", session)];
    all.extend_from_slice(headers);
    let r = c.get("/work", &all).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[tokio::test]
async fn spans_are_exported_with_parent_links_and_the_sandbox_gets_the_context() {
    let (otlp, received) = receiver().await;
    let dir = std::env::temp_dir().join(format!("aa-trace-{}", std::process::id()));
    let yaml = format!(
        "backend:\n  kind: process\n  command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  stop_grace: 2s\n  warm_pool: 1\nidle:\n  timeout: 10m\n  policy: pause\nautoscaler:\n  enabled: false\ntelemetry:\n  otlp:\n    endpoint: http://{otlp}\n    headers: {{x-api-key: k1}}\n  sample_ratio: 1.0\n  service_name: activator-under-test\n  resource_attributes: {{deployment.environment: test}}\n",
        dir.display()
    );
    let server = support::start(&yaml).await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    support::wait_until("a warm sandbox", || {
        server
            .backend()
            .sandboxes()
            .iter()
            .any(|s| s.state == agent_activator::backend::SandboxState::Warm)
    })
    .await;

    // 1. A traced caller: its span is the parent of ours; the sandbox sees our forward span.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let first = get(
        &proxy,
        "alice",
        &[("traceparent", &traceparent), ("tracestate", "vendor=1")],
    )
    .await;
    let seen = first["traceparent"]
        .as_str()
        .expect("the sandbox got a traceparent");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", caller_trace, "01"),
        "{seen}"
    );
    assert_ne!(
        parts[2], caller_span,
        "the proxy's span is the sandbox's parent"
    );
    let forwarded_parent = parts[2].to_owned();

    // 2. Paused, then resumed by a request that starts a new trace (ratio 1).
    let paused = admin
        .send(
            admin
                .request("POST", "/api/sessions/alice/pause")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(paused.status, 200, "{}", paused.text());
    let second = get(&proxy, "alice", &[]).await;
    let resumed_trace = second["traceparent"]
        .as_str()
        .unwrap()
        .split('-')
        .nth(1)
        .unwrap()
        .to_owned();
    assert_ne!(resumed_trace, caller_trace);

    // 3. A caller that says "not sampled" is not traced; its header passes untouched.
    let unsampled = format!("00-{}-{caller_span}-00", "1".repeat(32));
    let third = get(&proxy, "alice", &[("traceparent", &unsampled)]).await;
    assert_eq!(third["traceparent"], unsampled);

    // OpenMetrics scrape: activation-latency buckets carry the traces as exemplars.
    let om = admin
        .get(
            "/metrics",
            &[("accept", "application/openmetrics-text; version=1.0.0")],
        )
        .await;
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = om.text();
    assert!(text.ends_with("# EOF\n"));
    assert!(
        text.contains("# TYPE activator_requests counter\n"),
        "counter family without _total"
    );
    let exemplar_of = |kind: &str| -> Vec<String> {
        text.lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "activator_activation_duration_seconds_bucket{{kind=\"{kind}\""
                ))
            })
            .filter_map(|l| {
                l.split_once(" # {trace_id=\"")
                    .map(|(_, r)| r[..32].to_owned())
            })
            .collect()
    };
    assert_eq!(exemplar_of("claim"), [caller_trace.to_owned()], "{text}");
    assert_eq!(exemplar_of("resume"), std::slice::from_ref(&resumed_trace));
    // The classic text format stays as it was, without exemplars.
    let plain = admin.get("/metrics", &[]).await.text();
    assert!(!plain.contains("trace_id") && !plain.contains("# EOF"));

    server.shutdown().await; // flushes the exporter
    let spans = received.lock_recovered().clone();
    assert!(!spans.is_empty(), "nothing exported");
    let (resource, _) = &spans[0];
    assert_eq!(
        str_attr(resource, "service.name").as_deref(),
        Some("activator-under-test")
    );
    assert_eq!(
        str_attr(resource, "deployment.environment").as_deref(),
        Some("test")
    );

    let hex = |b: &[u8]| hex::encode(b);
    let in_trace = |t: &str| -> Vec<Span> {
        spans
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == t)
            .map(|(_, s)| s.clone())
            .collect()
    };
    let by_name = |list: &[Span], name: &str| -> Span {
        list.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span in {:?}",
                    list.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
            .clone()
    };
    let alice = agent_activator::session::SessionKey::parse("alice", 128)
        .unwrap()
        .short_hash();

    let first_trace = in_trace(caller_trace);
    let request = by_name(&first_trace, "GET");
    assert_eq!(
        hex(&request.parent_span_id),
        caller_span,
        "linked to the caller's span"
    );
    assert_eq!(request.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(
        str_attr(&request.attributes, "session.hash"),
        Some(alice.clone())
    );
    assert_eq!(
        str_attr(&request.attributes, "url.path").as_deref(),
        Some("/work")
    );
    assert_eq!(request.trace_state, "vendor=1");
    let activation = by_name(&first_trace, "activation");
    assert_eq!(activation.parent_span_id, request.span_id);
    assert_eq!(
        str_attr(&activation.attributes, "activation.kind").as_deref(),
        Some("claim")
    );
    assert_eq!(
        str_attr(&activation.attributes, "activation.outcome").as_deref(),
        Some("ok")
    );
    assert_eq!(
        str_attr(&activation.attributes, "backend.kind").as_deref(),
        Some("process")
    );
    let forward = by_name(&first_trace, "forward");
    assert_eq!(forward.parent_span_id, request.span_id);
    assert_eq!(
        hex(&forward.span_id),
        forwarded_parent,
        "the sandbox's parent is the forward span"
    );
    assert!(activation.end_time_unix_nano <= forward.start_time_unix_nano);

    let second_trace = in_trace(&resumed_trace);
    let request2 = by_name(&second_trace, "GET");
    assert!(request2.parent_span_id.is_empty(), "a root span");
    let resume = by_name(&second_trace, "activation");
    assert_eq!(
        str_attr(&resume.attributes, "activation.kind").as_deref(),
        Some("resume")
    );
    assert_eq!(resume.parent_span_id, request2.span_id);

    assert!(
        in_trace(&"1".repeat(32)).is_empty(),
        "unsampled callers are not traced"
    );
    for (_, s) in &spans {
        for kv in &s.attributes {
            let v = format!("{:?}", kv.value);
            assert!(
                !v.contains("\"alice\""),
                "raw session ID in {}: {v}",
                kv.key
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The access log names the trace of a traced request and `-` for an untraced one: the
/// binary with JSON logs and `sample_ratio: 0`, so only a caller's sampled `traceparent`
/// makes a request traced. The logged ID is the one exported.
#[tokio::test]
async fn the_access_log_carries_the_trace_id_of_traced_requests_only() {
    let (otlp, received) = receiver().await;
    let up = support::EchoUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("aa-trace-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("activator.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n\
             log: {{format: json, level: info}}\n\
             session: {{max_sessions_per_sandbox: 10}}\n\
             telemetry:\n  otlp:\n    endpoint: http://{otlp}\n    headers: {{x-api-key: k1}}\n  \
             sample_ratio: 0.0\n{}",
            support::static_backend(&[up.addr])
        ),
    )
    .unwrap();
    let activator = ServeProcess::start(&path).await;

    let c = HttpClient::http1(activator.proxy);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let sampled = format!("00-{trace}-b7ad6b7169203331-01");
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    for (path, headers) in [
        ("/traced", vec![("traceparent", sampled.as_str())]),
        ("/untraced", vec![]),
        ("/unsampled-parent", vec![("traceparent", unsampled)]),
    ] {
        let mut all = vec![("x-session-id", "logged-session")];
        all.extend(headers);
        let r = c.get(path, &all).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }

    let (status, logged) = activator.stop(Signal::SIGINT).await;
    assert_eq!(status.code(), Some(0));
    let access: std::collections::BTreeMap<_, _> = access_lines(&logged)
        .into_iter()
        .map(|j| (j["path"].as_str().unwrap_or("?").to_owned(), j))
        .collect();
    assert_eq!(access.len(), 3, "one access line per request: {access:#?}");
    assert_eq!(access["/traced"]["trace_id"], trace, "{access:#?}");
    assert_eq!(access["/untraced"]["trace_id"], "-", "{access:#?}");
    assert_eq!(access["/unsampled-parent"]["trace_id"], "-", "{access:#?}");

    // The logged ID is the exported trace's (flushed at shutdown); nothing else was exported.
    let spans = received.lock_recovered().clone();
    assert!(!spans.is_empty(), "the traced request was exported");
    for (_, span) in &spans {
        assert_eq!(
            hex::encode(&span.trace_id),
            trace,
            "only the traced request's spans"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
