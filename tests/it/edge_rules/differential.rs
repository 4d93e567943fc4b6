//! Differential fuzz of the two HTTP/1.1 server paths: proptest generates request heads
//! full of edge cases (look-alike, duplicate and hop-by-hop fields, Host variants,
//! absolute-form, bare LF, bodies), and each goes, on a new connection, to two activators
//! that differ only in `proxy.http1_fast_path` (the fast path vs hyper's server), each in
//! front of its own recording sandbox. Both must forward the same bytes (request line,
//! fields in order, body; the random `x-request-id` aside) or refuse with the same status
//! and code.
//!
//! The suite runs 64 cases (about a second); a longer run is
//! `PROPTEST_CASES=5000 cargo test --test it edge_rules::differential`
//! (docs/security.md records its last result).

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

use crate::support::h1_wire::{Received, ScriptedSandbox, Step, Wire, ok};
use crate::support::{self, static_backend};
use agent_activator::server::RunningServer;

/// A generated request: method, target, field lines (each without its line ending),
/// the line ending between fields, and a body sent with a matching `content-length`.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    target: &'static str,
    fields: Vec<String>,
    bare_lf: bool,
    body: Vec<u8>,
}

impl Case {
    fn bytes(&self) -> Vec<u8> {
        let eol = if self.bare_lf { "\n" } else { "\r\n" };
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        for f in &self.fields {
            head.push_str(f);
            head.push_str(eol);
        }
        if !self.body.is_empty() {
            head.push_str(&format!("content-length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// Field lines the fuzz mixes in: every rule of `proxy/rules.rs` and the fast path's
/// hand-off triggers, next to generated end-to-end fields.
fn field() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "X_Session_ID: s2",
        "x-session_id: fz",
        "x-session-id: fz",
        "X-Session-ID: other",
        "host: b.example",
        "Host: A.EXAMPLE",
        "host: a@b",
        "Content_Length: 3",
        "Transfer_Encoding: chunked",
        "X_Forwarded_For: 10.9.9.9",
        "x_custom: 1",
        "connection: x-request-id",
        "connection: host, x-hop",
        "connection: close",
        "connection: keep-alive, x-session-id",
        "x-hop: 1",
        "te: trailers",
        "te: gzip",
        "trailer: x-sum",
        "cookie: a=1",
        "cookie: b=2",
        "keep-alive: timeout=5",
        "proxy-authorization: Basic eA==",
        "proxy-connection: keep-alive",
        "x-forwarded-for: 1.2.3.4",
        "x-forwarded-host: forged.example",
        "forwarded: for=1.2.3.4",
        "x-real-ip: 1.2.3.4",
        "x-request-id: client-chosen",
        "upgrade: h2c",
        "expect: 100-continue",
    ])
    .prop_map(str::to_owned);
    let generated = ("[a-z]{1,6}(-[a-z_]{1,6})?", "[\t -~]{0,16}")
        .prop_map(|(name, value)| format!("x-{name}: {}", value.trim()));
    prop_oneof![2 => fixed, 1 => generated]
}

fn case() -> impl Strategy<Value = Case> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]);
    let target = prop::sample::select(vec![
        "/",
        "/a?b=1",
        "/s/fz/x",
        "/%41/../b",
        "http://a.example/abs",
        "http://b.example/abs",
    ]);
    (
        method,
        target,
        prop::option::weighted(0.9, Just("host: a.example".to_owned())),
        prop::option::weighted(0.9, Just("x-session-id: fz".to_owned())),
        prop::collection::vec(field(), 0..6),
        prop::bool::weighted(0.1),
        prop::collection::vec(any::<u8>(), 0..12),
    )
        .prop_map(|(method, target, host, session, extra, bare_lf, body)| {
            let mut fields: Vec<String> = host.into_iter().chain(session).collect();
            fields.extend(extra);
            Case {
                method,
                target,
                fields,
                bare_lf,
                body: if method == "POST" || method == "PUT" {
                    body
                } else {
                    Vec::new()
                },
            }
        })
}

/// A request as the sandbox got it: request line, fields (`x-request-id` masked), body.
type Forwarded = (String, Vec<(String, String)>, Vec<u8>);

/// What one activator did with a case.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Response status, fields (sorted; `date` and `x-request-id` aside) and, for a
    /// JSON error, its code.
    status: u16,
    fields: Vec<(String, String)>,
    code: String,
    /// Request line, fields (`x-request-id` masked) and body as the sandbox got them.
    forwarded: Vec<Forwarded>,
}

struct Side {
    server: RunningServer,
    sandbox: ScriptedSandbox,
}

impl Side {
    async fn start(fast_path: bool) -> Side {
        let sandbox = ScriptedSandbox::start(|req, _| {
            vec![Step::Send(if req.head.method() == "HEAD" {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n".to_vec()
            } else {
                ok(b"ok")
            })]
        })
        .await;
        // Any session the fuzz names shares the one sandbox.
        let server = support::start(&format!(
            "{}session:\n  max_sessions_per_sandbox: 1000\nproxy:\n  http1_fast_path: {fast_path}\n",
            static_backend(&[sandbox.addr])
        ))
        .await;
        Side { server, sandbox }
    }

    async fn run(&self, case: &Case) -> Outcome {
        let before = self.sandbox.requests().len();
        let mut client = Wire::connect(self.server.proxy_addr()).await;
        client.write(&case.bytes()).await.unwrap();
        let resp = tokio::time::timeout(support::WAIT, client.read_response(case.method))
            .await
            .expect("a response in time")
            .expect("a response");
        let code = serde_json::from_slice::<serde_json::Value>(&resp.body.data)
            .ok()
            .and_then(|j| j["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let forwarded = self.sandbox.requests()[before..]
            .iter()
            .map(masked)
            .collect();
        let mut fields: Vec<(String, String)> = resp
            .head
            .headers
            .iter()
            .filter(|(n, _)| n != "date" && n != "x-request-id")
            .cloned()
            .collect();
        fields.sort();
        Outcome {
            status: resp.head.status,
            fields,
            code,
            forwarded,
        }
    }
}

fn masked(r: &Received) -> Forwarded {
    let fields = r
        .head
        .headers
        .iter()
        .map(|(n, v)| {
            let v = if n == "x-request-id" {
                "<id>"
            } else {
                v.as_str()
            };
            (n.clone(), v.to_owned())
        })
        .collect();
    (r.head.start_line.clone(), fields, r.body.data.clone())
}

#[test]
fn fast_path_and_hyper_path_forward_or_refuse_alike() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (fast, hyper) = rt.block_on(async { (Side::start(true).await, Side::start(false).await) });
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&case(), |case| {
        let (a, b) = rt.block_on(async { (fast.run(&case).await, hyper.run(&case).await) });
        if a != b {
            return Err(TestCaseError::fail(format!(
                "{:?}\nfast path: {a:#?}\nhyper: {b:#?}",
                String::from_utf8_lossy(&case.bytes())
            )));
        }
        Ok(())
    });
    rt.block_on(async {
        fast.server.shutdown().await;
        hyper.server.shutdown().await;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
