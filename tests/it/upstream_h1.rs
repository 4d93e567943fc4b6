//! Conformance of the proxy's upstream HTTP/1.1 leg, black box over real sockets: a real
//! client in front (hyper's client connection, or a raw `TcpStream` where the bytes matter),
//! the activator in process, and behind it a scripted raw TCP sandbox that records every
//! request exactly as received and answers exactly the scripted bytes. Asserted: request
//! framing and headers as the sandbox saw them, response framing as the client got it,
//! upstream connection reuse (accepts counted), and the failure statuses and codes.
//!
//! These are the regression net for the upstream client (issue 11): they state what a
//! correct HTTP/1.1 proxy does, not how today's client does it. Where a test records
//! today's behaviour rather than a requirement, a `TODAY:` comment says so.
//! Run them alone with `cargo test --test it upstream_h1::`; the scripted sandbox is
//! `support/h1_wire.rs`.

mod client_gone;
mod failures;
mod keepalive;
mod requests;
mod responses;
mod sessions;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::h1_wire::{
    self, Framing, Head, Received, ScriptedSandbox, Step, Wire, ok, ok_chunked,
};
use crate::support::{self, WAIT, static_backend};
use agent_activator::server::RunningServer;

// === harness ===

type ReqBody = BoxBody<Bytes, Infallible>;

/// A response read to its end by the hyper client.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Got {
    /// `error.code` of a JSON error body.
    fn code(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body))
        });
        json["error"]["code"].as_str().unwrap_or("").to_owned()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 client connection to the proxy (hyper), requests strictly sequential.
struct Client {
    sender: SendRequest<ReqBody>,
}

impl Client {
    async fn open(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect(addr).await.unwrap()).await
    }

    async fn over(stream: TcpStream) -> Client {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    /// Sends `req`; returns the response head (bounded by [`WAIT`]).
    async fn send(&mut self, req: Request<ReqBody>) -> http::Response<Incoming> {
        tokio::time::timeout(WAIT, async {
            self.sender
                .ready()
                .await
                .expect("the client connection stays open");
            self.sender
                .send_request(req)
                .await
                .expect("a response head")
        })
        .await
        .expect("response head within the test bound")
    }

    /// Sends `req`; the response head, or hyper's error if the connection ended first.
    async fn try_send(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, hyper::Error> {
        tokio::time::timeout(WAIT, async {
            self.sender.ready().await?;
            self.sender.send_request(req).await
        })
        .await
        .expect("response head or error within the test bound")
    }

    /// Sends `req` and reads the whole response, trailers included.
    async fn fetch(&mut self, req: Request<ReqBody>) -> Got {
        let resp = self.send(req).await;
        let (parts, body) = resp.into_parts();
        let collected = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("body within the test bound")
            .expect("a complete body");
        let trailers = collected.trailers().cloned();
        Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        }
    }

    async fn get(&mut self, path: &str, session: &str) -> Got {
        self.fetch(get(path, session)).await
    }
}

fn get(path: &str, session: &str) -> Request<ReqBody> {
    Request::get(path)
        .header("host", "app.example")
        .header("x-session-id", session)
        .body(Empty::new().boxed())
        .unwrap()
}

/// The activator in front of `sandboxes` (static backend, one session per sandbox), with
/// `extra` YAML appended.
pub(crate) async fn proxy(sandboxes: &[&ScriptedSandbox], extra: &str) -> RunningServer {
    let addrs: Vec<SocketAddr> = sandboxes.iter().map(|s| s.addr).collect();
    support::start(&format!("{}{extra}", static_backend(&addrs))).await
}

/// Answers every request with `response`.
pub(crate) async fn always(response: &'static [u8]) -> ScriptedSandbox {
    ScriptedSandbox::start(move |_, _| vec![Step::Send(response.to_vec())]).await
}

/// The header fields as a sorted list, with the proxy's random `x-request-id` (checked to
/// be 32 hex digits) replaced by `<request-id>`.
pub(crate) fn field_set(head: &Head) -> Vec<(String, String)> {
    let mut set: Vec<(String, String)> = head
        .headers
        .iter()
        .map(|(n, v)| {
            if n == "x-request-id" {
                assert!(
                    v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()),
                    "x-request-id {v:?}"
                );
                (n.clone(), "<request-id>".to_owned())
            } else {
                (n.clone(), v.clone())
            }
        })
        .collect();
    set.sort();
    set
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

/// What the proxy adds to every request from an untrusted client on loopback, plus the
/// session header and `host` the client sent.
fn forwarded(host: &str, session: &str) -> Vec<(&'static str, String)> {
    vec![
        ("host", host.to_owned()),
        ("x-forwarded-for", "127.0.0.1".to_owned()),
        ("x-forwarded-host", host.to_owned()),
        ("x-forwarded-proto", "http".to_owned()),
        ("x-request-id", "<request-id>".to_owned()),
        ("x-session-id", session.to_owned()),
    ]
}

fn expected_fields(host: &str, session: &str, more: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = forwarded(host, session)
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
    v.extend(pairs(more));
    v.sort();
    v
}

/// The only request the sandbox received.
pub(crate) fn only_request(sandbox: &ScriptedSandbox) -> Received {
    let mut all = sandbox.requests();
    assert_eq!(all.len(), 1, "requests received: {all:#?}");
    all.remove(0)
}

/// A raw client connection to the proxy.
pub(crate) async fn raw(server: &RunningServer) -> Wire {
    Wire::connect(server.proxy_addr()).await
}

pub(crate) async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"))
}

/// `activator_upstream_errors_total{kind}` as the admin `/metrics` shows it now.
async fn upstream_errors(server: &RunningServer, kind: &str) -> f64 {
    let admin = support::HttpClient::http1(server.admin_addr());
    let text = admin.get("/metrics", &[]).await.text();
    support::metric_value(
        &text,
        &format!("activator_upstream_errors_total{{kind=\"{kind}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Sends `request` (raw bytes, a GET for `session`-less framing rules) and checks that the
/// client never gets a complete message: either the connection closes before any
/// response head, or the sandbox's 200 head comes and its body never completes. Then the
/// connection is closed. Both are aborts; a clean short body would not be.
async fn assert_aborted(server: &RunningServer, request: &[u8]) {
    let mut client = raw(server).await;
    client.write(request).await.unwrap();
    match bounded("head or close", client.read_response_head()).await {
        // Closed (or reset) before any head: nothing was relayed.
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "{e:?}"
        ),
        Ok(head) => {
            assert_eq!(head.status, 200, "{:?}", head.start_line);
            let framing = h1_wire::response_framing(&head, "GET");
            let body = bounded("body", client.read_body(framing)).await;
            assert!(
                body.is_err(),
                "a broken body must not look complete ({framing:?}): {body:?}"
            );
            // ... and the connection is closed, not left waiting for the missing bytes.
            let _ = bounded("the close", client.read_until_closed()).await;
        }
    }
}

/// The same through hyper: the request fails, or its body does; never a clean response.
async fn assert_aborted_for_hyper(server: &RunningServer, req: Request<ReqBody>) {
    let mut client = Client::open(server.proxy_addr()).await;
    if let Ok(resp) = client.try_send(req).await {
        assert_eq!(resp.status(), 200);
        let body = bounded("body", resp.into_body().collect()).await;
        assert!(body.is_err(), "{body:?}");
    }
}
