//! Shared helpers for integration tests: start the activator from YAML, in-process
//! upstream servers, the demo-sandbox process, and an HTTP client.
//!
//! Compiled once into the `it` test crate (tests/it/main.rs); each module uses a subset.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use agent_activator::config::Config;
use agent_activator::server::{self, RunningServer};

pub mod h1_wire;
pub mod procs;
pub mod serve_process;

/// Every wait in a test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` every 5 ms until it holds, at most [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

// === activator ===

/// Parses `yaml` and points both listeners at `127.0.0.1:0`.
pub fn config(yaml: &str) -> Config {
    let mut c = Config::from_yaml(yaml).expect("test config is valid");
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_listen = "127.0.0.1:0".parse().unwrap();
    c
}

/// Starts the activator from YAML text (listeners on ephemeral ports).
pub async fn start(yaml: &str) -> RunningServer {
    server::start(config(yaml)).await.expect("activator starts")
}

/// A `backend:` block for the static backend over `endpoints`.
pub fn static_backend(endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("'{e}'")).collect();
    format!(
        "backend:\n  kind: static\n  endpoints: [{}]\n",
        list.join(", ")
    )
}

// === in-process upstream ===

type UpBody = BoxBody<Bytes, hyper::Error>;

/// An in-process upstream (HTTP/1.1 + h2c, upgrades) whose routes help test the proxy:
///
/// - any path: JSON `{port, session, method, path, version, headers}` (`session` is the
///   `X-Session-ID` it saw; `headers` has the first value of each).
/// - `/slow?ms=N`: the same after N ms.
/// - `/echo`: streams the request body (and its trailers) back.
/// - `/bytes?n=N`: N bytes of `x`, streamed in 64 KiB chunks.
/// - `/sse?n=N&interval_ms=M`: N events `data: i`, M ms apart.
/// - `/trailers`: body `ok` then trailer `x-checksum: abc123`.
/// - `/status?code=N`: an empty response with that status.
/// - `/reset`: the connection is closed without a response.
/// - `/ws`: WebSocket echo.
/// - `/hop`: a response carrying hop-by-hop headers (`Connection: x-hop-resp`,
///   `x-hop-resp`, `keep-alive`) next to an end-to-end `x-kept`.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoUpstream {
    pub async fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (acc, op) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                op.fetch_add(1, Ordering::SeqCst);
                let op = op.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| upstream_route(addr, req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                    op.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        EchoUpstream {
            addr,
            accepted,
            open,
            task,
        }
    }
}

/// Starts `n` echo upstreams.
pub async fn echo_upstreams(n: usize) -> Vec<EchoUpstream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(EchoUpstream::start().await);
    }
    v
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn describe(port: u16, req: &Request<Incoming>) -> UpBody {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .keys()
        .map(|k| {
            let v = req.headers()[k].to_str().unwrap_or("<binary>").to_owned();
            (k.as_str().to_owned(), v.into())
        })
        .collect();
    let session = req
        .headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok());
    full(
        serde_json::json!({
            "port": port,
            "session": session,
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        })
        .to_string(),
    )
}

async fn upstream_route(
    addr: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<UpBody>, std::io::Error> {
    let port = addr.port();
    let resp = match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_param(&req, "ms").unwrap_or(0))).await;
            Response::new(describe(port, &req))
        }
        "/echo" => {
            // Declared request trailers are echoed back as response trailers.
            let declared = req.headers().get("trailer").cloned();
            let mut resp = Response::new(req.into_body().boxed());
            if let Some(t) = declared {
                resp.headers_mut().insert("trailer", t);
            }
            resp
        }
        "/bytes" => {
            let mut left = query_param(&req, "n").unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::poll_fn(move |_| {
                if left == 0 {
                    return std::task::Poll::Ready(None);
                }
                let n = left.min(chunk.len() as u64);
                left -= n;
                std::task::Poll::Ready(Some(Ok::<_, hyper::Error>(Frame::data(
                    chunk.slice(..n as usize),
                ))))
            });
            Response::new(StreamBody::new(stream).boxed())
        }
        "/sse" => {
            let n = query_param(&req, "n").unwrap_or(3);
            let interval = Duration::from_millis(query_param(&req, "interval_ms").unwrap_or(100));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    let event = Frame::data(Bytes::from(format!("data: {i}\n\n")));
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            let mut resp = Response::new(StreamBody::new(stream).boxed());
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            resp
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
            let frames = vec![
                Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"ok"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut resp =
                Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            resp.headers_mut()
                .insert("trailer", HeaderValue::from_static("x-checksum"));
            resp
        }
        "/status" => {
            let code = query_param(&req, "code").unwrap_or(200) as u16;
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap();
            resp
        }
        "/reset" => return Err(std::io::Error::other("reset requested")),
        "/hop" => {
            let mut resp = Response::new(full("hop"));
            let h = resp.headers_mut();
            h.insert("connection", HeaderValue::from_static("x-hop-resp"));
            h.insert("x-hop-resp", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            resp
        }
        "/ws" => websocket_echo(&mut req),
        _ => Response::new(describe(port, &req)),
    };
    Ok(resp)
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<UpBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut resp = Response::new(full("not a websocket handshake"));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return resp;
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        // A received Close is answered by tungstenite on the next poll, which then ends.
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).unwrap(),
    );
    resp
}

/// An address where nothing listens, held for as long as the value lives: the socket is
/// bound (so no other test can be given the port) but never listens, so a connect is
/// refused. Binding, releasing and hoping nobody takes the port races parallel tests.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _bound: tokio::net::TcpSocket,
}

pub async fn closed_port() -> ClosedPort {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    ClosedPort {
        addr: sock.local_addr().unwrap(),
        _bound: sock,
    }
}

/// Reads an activator process's JSON log (`log.format: json`) from its stderr until the
/// "agent-activator listening" line, and returns the proxy and admin addresses it bound
/// (start it with `listen`/`admin_listen` on port 0: no port is guessed in advance). The
/// rest of stderr is drained in the background so the child never blocks on a full pipe;
/// a test that reads the later log uses [`serve_process::listening_lines`] instead.
pub async fn listening_addrs(stderr: tokio::process::ChildStderr) -> (SocketAddr, SocketAddr) {
    let (proxy, admin, mut lines) = serve_process::listening_lines(stderr).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (proxy, admin)
}

// === demo sandbox process ===

/// `agent-activator demo-sandbox --port 0`, killed on drop.
pub struct DemoSandbox {
    pub addr: SocketAddr,
    /// With [`DemoSandbox::start_with_dev`]: the dev-server port's address.
    pub dev_addr: Option<SocketAddr>,
    child: tokio::process::Child,
}

impl DemoSandbox {
    /// Starts the demo sandbox and waits for its `listening on ADDR` line.
    pub async fn start() -> DemoSandbox {
        DemoSandbox::launch(false).await
    }

    /// Also serves its dev-server page on a second free port (`--dev-port 0`).
    pub async fn start_with_dev() -> DemoSandbox {
        DemoSandbox::launch(true).await
    }

    async fn launch(dev: bool) -> DemoSandbox {
        let mut args = vec!["demo-sandbox", "--port", "0"];
        if dev {
            args.extend(["--dev-port", "0"]);
        }
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent-activator"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn demo-sandbox");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let (addr, dev_addr) = tokio::time::timeout(WAIT, async {
            let mut addr = None;
            while let Some(line) = lines.next_line().await.expect("read demo stdout") {
                let line = line.trim();
                let parse = |rest: &str| rest.trim().parse::<SocketAddr>().expect("an address");
                if let Some(rest) = line.strip_prefix("listening on ") {
                    addr = Some(parse(rest));
                    if !dev {
                        return (addr.unwrap(), None);
                    }
                } else if let Some(rest) = line.strip_prefix("dev server on ") {
                    return (addr.expect("the main port first"), Some(parse(rest)));
                }
            }
            panic!("demo-sandbox exited without printing its address");
        })
        .await
        .expect("demo-sandbox ready in time");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        DemoSandbox {
            addr,
            dev_addr,
            child,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

// === HTTP client ===

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `error.code` of an error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// A plain HTTP client (HTTP/1.1 by default, or h2c with prior knowledge).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl HttpClient {
    /// HTTP/1.1 client for `http://{addr}`.
    pub fn http1(addr: SocketAddr) -> HttpClient {
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    /// h2c (prior knowledge) client for `http://{addr}`.
    pub fn h2c(addr: SocketAddr) -> HttpClient {
        HttpClient {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
            base: format!("http://{addr}"),
        }
    }

    /// A request builder for `path` on this client's address.
    pub fn request(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
    }

    /// Sends `req` and reads the whole response (bounded by [`WAIT`]).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        tokio::time::timeout(WAIT, async {
            let resp = self.client.request(req).await.expect("request sent");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("body read").to_bytes();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        })
        .await
        .expect("response in time")
    }

    /// Sends `req` and returns the response head with its streaming body.
    pub async fn send_streaming(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        tokio::time::timeout(WAIT, self.client.request(req))
            .await
            .expect("response head in time")
            .expect("request sent")
    }

    /// `GET path` with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = self.request("GET", path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(Bytes::new())).unwrap()).await
    }

    /// `method path` without a body (admin calls: `POST .../pause`, `DELETE ...`).
    pub async fn call(&self, method: &str, path: &str) -> Reply {
        self.send(
            self.request(method, path)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    /// `GET path` with `X-Session-ID: session`.
    pub async fn get_session(&self, path: &str, session: &str) -> Reply {
        self.get(path, &[("x-session-id", session)]).await
    }
}

// === waiting on state ===

/// Polls `probe` every 50 ms until it returns `Some`, at most [`WAIT`]; panics naming
/// `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"))
}

/// The value of the sample `name{labels}` in a Prometheus text exposition, whatever the
/// label order.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let have: std::collections::BTreeSet<String> = set
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let want: std::collections::BTreeSet<String> =
            labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        (have == want).then(|| value.trim().parse().unwrap())
    })
}

/// The value of sample `name` (with its labels written out, e.g.
/// `activator_schedule_runs_total{result="ok"}`) in a Prometheus text exposition.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
