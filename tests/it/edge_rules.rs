//! The request-edge rules (issue 25), black box over raw sockets: each ambiguity a client
//! can put in a request head (CONNECT, look-alike and duplicate fields, Host, HTTP/2
//! cookies, trailers, `Connection` naming the proxy's fields, 204/304 lengths) is sent over
//! the HTTP/1.1 fast path, the hyper path and HTTP/2 where it applies, and what the
//! scripted sandbox (`support/h1_wire.rs`) receives is asserted byte for byte. The
//! differential fuzz over both HTTP/1.1 paths is `edge_rules/differential.rs`.

mod differential;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use tokio::net::TcpStream;

use crate::support::h1_wire::{RawResponse, ScriptedSandbox, Step, ok};
use crate::upstream_h1::{always, bounded, only_request, proxy, raw};
use agent_activator::server::RunningServer;

/// Which server path a raw HTTP/1.1 request takes in the activator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The built-in fast path (plain requests).
    Fast,
    /// hyper's server: the same head with an empty chunked body, which the fast path
    /// always hands over.
    Hyper,
}

const PATHS: [Path; 2] = [Path::Fast, Path::Hyper];

/// `head` (a complete request head, blank line included) as sent on `path`.
fn on(path: Path, head: &str) -> Vec<u8> {
    assert!(head.ends_with("\r\n\r\n"), "{head:?}");
    match path {
        Path::Fast => head.as_bytes().to_vec(),
        Path::Hyper => {
            let fields = &head[..head.len() - 2];
            format!("{fields}transfer-encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes()
        }
    }
}

/// Sends `bytes` on a new connection and reads one response to `method`.
async fn exchange(server: &RunningServer, bytes: &[u8], method: &str) -> RawResponse {
    let mut client = raw(server).await;
    client.write(bytes).await.unwrap();
    bounded("response", client.read_response(method))
        .await
        .unwrap_or_else(|e| panic!("a response to {:?}: {e}", String::from_utf8_lossy(bytes)))
}

/// `error.code` of a JSON error body.
fn code(resp: &RawResponse) -> String {
    let json: serde_json::Value = serde_json::from_slice(&resp.body.data).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&resp.body.data)
        )
    });
    json["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// Asserts `resp` is `status` with JSON error `code`.
fn refused(resp: &RawResponse, status: u16, expected: &str, what: &str) {
    assert_eq!(
        resp.head.status, status,
        "{what}: {:?}",
        resp.head.start_line
    );
    assert_eq!(code(resp), expected, "{what}");
}

// === HTTP/2 (the h2 crate: it sends exactly the fields given, `host` included) ===

/// A response read by the HTTP/2 client.
struct H2Got {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl H2Got {
    fn code(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        json["error"]["code"].as_str().unwrap_or("").to_owned()
    }
}

/// Sends `req` over a new h2c (prior knowledge) connection, with `trailers` after an
/// optional body, and reads the whole response.
async fn h2_send(
    server: &RunningServer,
    req: Request<()>,
    body: Option<&'static [u8]>,
    trailers: Option<HeaderMap>,
) -> H2Got {
    bounded("an HTTP/2 exchange", async {
        let tcp = TcpStream::connect(server.proxy_addr()).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let end = body.is_none() && trailers.is_none();
        let (resp, mut stream) = client.send_request(req, end).unwrap();
        if let Some(body) = body {
            stream
                .send_data(Bytes::from_static(body), trailers.is_none())
                .unwrap();
        }
        if let Some(t) = trailers {
            stream.send_trailers(t).unwrap();
        }
        let resp = resp.await.unwrap();
        let status = resp.status().as_u16();
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        H2Got {
            status,
            headers: parts.headers,
            body: data.into(),
        }
    })
    .await
}

fn h2_get(authority: &str) -> http::request::Builder {
    Request::get(format!("http://{authority}/h2"))
}

// === 1. CONNECT ===

#[tokio::test]
async fn connect_is_refused_with_405_and_reaches_no_sandbox() {
    let sandbox = always(b"HTTP/1.1 200 Connection Established\r\ncontent-length: 0\r\n\r\n").await;
    let server = proxy(&[&sandbox], "").await;
    let connect =
        "CONNECT t.example:443 HTTP/1.1\r\nhost: t.example:443\r\nx-session-id: c1\r\n\r\n";
    // CONNECT never looks plain to the fast path: hyper parses it, the rules refuse it.
    let resp = exchange(&server, connect.as_bytes(), "CONNECT").await;
    refused(&resp, 405, "method_not_allowed", "CONNECT");
    assert!(
        resp.head
            .get("allow")
            .is_some_and(|a| !a.contains("CONNECT"))
    );
    let got = h2_send(
        &server,
        Request::connect("t.example:443").body(()).unwrap(),
        None,
        None,
    )
    .await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (405, "method_not_allowed")
    );
    assert!(sandbox.requests().is_empty(), "{:#?}", sandbox.requests());
    // The session's next request is an ordinary one on an ordinary connection.
    let resp = exchange(
        &server,
        b"GET /after HTTP/1.1\r\nhost: a\r\nx-session-id: c1\r\n\r\n",
        "GET",
    )
    .await;
    assert_eq!(resp.head.status, 200);
    assert_eq!(only_request(&sandbox).target(), "/after");
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_switched_protocols_is_never_reused() {
    // A 101 to a request that asked for no upgrade: refused (502), and the connection is
    // not pooled: the next request opens a new one.
    let sandbox = ScriptedSandbox::start(|req, _| {
        if req.target() == "/switch" {
            vec![Step::Send(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\nTUNNEL"
                    .to_vec(),
            )]
        } else {
            vec![Step::Send(ok(b"fresh"))]
        }
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    for path in PATHS {
        let resp = exchange(
            &server,
            &on(
                path,
                "GET /switch HTTP/1.1\r\nhost: a\r\nx-session-id: u1\r\n\r\n",
            ),
            "GET",
        )
        .await;
        assert_eq!(resp.head.status, 502, "{path:?}");
        let resp = exchange(
            &server,
            &on(
                path,
                "GET /next HTTP/1.1\r\nhost: a\r\nx-session-id: u1\r\n\r\n",
            ),
            "GET",
        )
        .await;
        assert_eq!(resp.body.data, b"fresh", "{path:?}");
    }
    // No request ever follows a 101 on its connection.
    let requests = sandbox.requests();
    for (i, r) in requests.iter().enumerate() {
        if r.target() == "/switch" {
            assert!(
                requests[i + 1..].iter().all(|later| later.conn != r.conn),
                "{requests:#?}"
            );
        }
    }
    server.shutdown().await;
}

// === 2. look-alike names ===

#[tokio::test]
async fn underscore_lookalikes_of_routing_and_framing_fields_are_refused() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "").await;
    for path in PATHS {
        for field in [
            "X_Session_ID: s2",
            "x-session_id: s2",
            "Content_Length: 5",
            "Transfer_Encoding: chunked",
            "X_Forwarded_For: 10.0.0.1",
        ] {
            let head = format!("GET / HTTP/1.1\r\nhost: a\r\nx-session-id: s1\r\n{field}\r\n\r\n");
            let resp = exchange(&server, &on(path, &head), "GET").await;
            refused(&resp, 400, "lookalike_header", &format!("{path:?} {field}"));
        }
    }
    assert!(sandbox.requests().is_empty(), "{:#?}", sandbox.requests());
    // Other names with '_' are forwarded as sent.
    for path in PATHS {
        let head = "GET / HTTP/1.1\r\nhost: a\r\nx-session-id: s1\r\nx_trace_tag: t\r\n\r\n";
        let resp = exchange(&server, &on(path, head), "GET").await;
        assert_eq!(resp.head.status, 200, "{path:?}");
    }
    for r in sandbox.requests() {
        assert_eq!(r.head.get("x_trace_tag"), Some("t"));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn underscore_names_are_dropped_when_configured() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "proxy:\n  underscore_headers: drop\n").await;
    for path in PATHS {
        let head = "GET / HTTP/1.1\r\nhost: a\r\nx-session-id: s1\r\nX_Session_ID: s2\r\n\
                    x_trace_tag: t\r\nx-kept: k\r\n\r\n";
        let resp = exchange(&server, &on(path, head), "GET").await;
        assert_eq!(resp.head.status, 200, "{path:?}");
    }
    let requests = sandbox.requests();
    assert_eq!(requests.len(), 2);
    for r in requests {
        assert!(
            r.head.headers.iter().all(|(n, _)| !n.contains('_')),
            "{:?}",
            r.head.headers
        );
        assert_eq!((r.session(), r.head.get("x-kept")), ("s1", Some("k")));
    }
    server.shutdown().await;
}

// === 3. duplicate session header ===

#[tokio::test]
async fn a_duplicate_session_header_is_refused() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "").await;
    for path in PATHS {
        for head in [
            "GET / HTTP/1.1\r\nhost: a\r\nx-session-id: s1\r\nX-Session-ID: s2\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\nx-session-id: s1\r\nx-session-id: s1\r\n\r\n",
            // Split by a bare LF: still two fields.
            "GET / HTTP/1.1\r\nhost: a\r\nx-session-id: s1\nx-session-id: s2\r\n\r\n",
        ] {
            let resp = exchange(&server, &on(path, head), "GET").await;
            refused(
                &resp,
                400,
                "duplicate_session_header",
                &format!("{path:?} {head:?}"),
            );
        }
    }
    let got = h2_send(
        &server,
        h2_get("a")
            .header("x-session-id", "s1")
            .header("x-session-id", "s2")
            .body(())
            .unwrap(),
        None,
        None,
    )
    .await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (400, "duplicate_session_header")
    );
    assert!(sandbox.requests().is_empty(), "{:#?}", sandbox.requests());
    server.shutdown().await;
}

// === 4. Host ===

#[tokio::test]
async fn ambiguous_or_missing_hosts_are_refused() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "").await;
    for path in PATHS {
        for head in [
            "GET / HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\nx-session-id: h1\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a.example\r\nhost: a.example\r\nx-session-id: h1\r\n\r\n",
            "GET / HTTP/1.1\r\nx-session-id: h1\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a@b.example\r\nx-session-id: h1\r\n\r\n",
            // Absolute-form (always hyper's): the target's authority against Host.
            "GET http://b.example/x HTTP/1.1\r\nhost: a.example\r\nx-session-id: h1\r\n\r\n",
        ] {
            let resp = exchange(&server, &on(path, head), "GET").await;
            refused(&resp, 400, "invalid_host", &format!("{path:?} {head:?}"));
        }
    }
    // HTTP/2: `host` differing from `:authority`.
    let got = h2_send(
        &server,
        h2_get("a.example")
            .header("host", "evil.example")
            .header("x-session-id", "h1")
            .body(())
            .unwrap(),
        None,
        None,
    )
    .await;
    assert_eq!((got.status, got.code().as_str()), (400, "invalid_host"));
    // (An HTTP/2 request with neither cannot be built with `http::Uri`, which wants an
    // authority beside a scheme; the rule is unit-tested in `proxy/rules/tests.rs`.)
    assert!(sandbox.requests().is_empty(), "{:#?}", sandbox.requests());

    // What agrees is forwarded: absolute-form with the same host (origin-form upstream),
    // HTTP/2 with a matching `host`, HTTP/1.0 without Host.
    let resp = exchange(
        &server,
        b"GET http://a.example/abs HTTP/1.1\r\nhost: A.example\r\nx-session-id: h1\r\n\r\n",
        "GET",
    )
    .await;
    assert_eq!(resp.head.status, 200);
    let got = h2_send(
        &server,
        Request::get("http://a.example/h2")
            .header("host", "a.example")
            .header("x-session-id", "h1")
            .body(())
            .unwrap(),
        None,
        None,
    )
    .await;
    assert_eq!(got.status, 200);
    let resp = exchange(
        &server,
        b"GET /old HTTP/1.0\r\nx-session-id: h1\r\n\r\n",
        "GET",
    )
    .await;
    assert_eq!(resp.head.status, 200);
    let seen: Vec<(String, Option<String>)> = sandbox
        .requests()
        .iter()
        .map(|r| (r.target().to_owned(), r.head.get("host").map(str::to_owned)))
        .collect();
    assert_eq!(seen[0], ("/abs".to_owned(), Some("A.example".to_owned())));
    assert_eq!(seen[1], ("/h2".to_owned(), Some("a.example".to_owned())));
    assert_eq!(seen[2].0, "/old");
    server.shutdown().await;
}

// === 5. HTTP/2 cookies ===

#[tokio::test]
async fn http2_cookie_crumbs_reach_the_sandbox_as_one_field() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "").await;
    let got = h2_send(
        &server,
        h2_get("a.example")
            .header("x-session-id", "k1")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("cookie", "c=3")
            .body(())
            .unwrap(),
        None,
        None,
    )
    .await;
    assert_eq!(got.status, 200);
    let r = only_request(&sandbox);
    let cookies: Vec<&str> = r
        .head
        .headers
        .iter()
        .filter(|(n, _)| n == "cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
    server.shutdown().await;
}

// === 6. trailers ===

#[tokio::test]
async fn forbidden_trailer_fields_are_dropped_both_ways() {
    let sandbox = ScriptedSandbox::start(|_, _| {
        vec![Step::Send(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
              trailer: x-sum, content-length, set-cookie, host\r\n\r\n\
              2\r\nok\r\n0\r\nx-sum: 7\r\ncontent-length: 99\r\nset-cookie: s=evil\r\nhost: evil\r\n\r\n"
                .to_vec(),
        )]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    // Response trailers, both paths (the client asks for them with `TE: trailers`).
    for path in PATHS {
        let head = "GET /t HTTP/1.1\r\nhost: a\r\nx-session-id: t1\r\nte: trailers\r\n\r\n";
        let resp = exchange(&server, &on(path, head), "GET").await;
        assert_eq!(resp.body.data, b"ok", "{path:?}");
        assert_eq!(
            resp.body.trailers,
            [("x-sum".to_owned(), "7".to_owned())],
            "{path:?}"
        );
    }
    // Request trailers: HTTP/1.1 chunked (hyper's path) and HTTP/2.
    let upload = "POST /up HTTP/1.1\r\nhost: a\r\nx-session-id: t1\r\n\
                  trailer: x-sum, content-length, host\r\ntransfer-encoding: chunked\r\n\r\n\
                  2\r\nhi\r\n0\r\nx-sum: 1\r\ncontent-length: 99\r\nhost: evil\r\n\r\n";
    exchange(&server, upload.as_bytes(), "POST").await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", "2".parse().unwrap());
    trailers.insert("content-length", "99".parse().unwrap());
    trailers.insert("host", "evil".parse().unwrap());
    let got = h2_send(
        &server,
        Request::post("http://a/up2")
            .header("x-session-id", "t1")
            .header("trailer", "x-sum, content-length, host")
            .body(())
            .unwrap(),
        Some(b"hi"),
        Some(trailers),
    )
    .await;
    assert_eq!(got.status, 200);
    let uploads: Vec<_> = sandbox
        .requests()
        .into_iter()
        .filter(|r| r.head.method() == "POST")
        .collect();
    assert_eq!(uploads.len(), 2);
    for (r, sum) in uploads.iter().zip(["1", "2"]) {
        assert_eq!(r.body.data, b"hi");
        assert_eq!(
            r.body.trailers,
            [("x-sum".to_owned(), sum.to_owned())],
            "{}",
            r.target()
        );
    }
    server.shutdown().await;
}

// === 7. `Connection` cannot remove the proxy's own fields ===

#[tokio::test]
async fn connection_options_cannot_remove_the_proxys_fields() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "").await;
    for path in PATHS {
        let head = "GET / HTTP/1.1\r\nhost: app.example\r\nx-session-id: n1\r\n\
                    connection: X-Request-ID, Host, X-Forwarded-Host, x-hop\r\nx-hop: 1\r\n\r\n";
        let resp = exchange(&server, &on(path, head), "GET").await;
        assert_eq!(resp.head.status, 200, "{path:?}");
        let id = resp.head.get("x-request-id").unwrap().to_owned();
        let r = sandbox.requests().pop().unwrap();
        let h = &r.head;
        assert_eq!(h.get("x-request-id"), Some(id.as_str()), "{path:?}");
        assert_eq!(h.get("host"), Some("app.example"), "{path:?}");
        assert_eq!(h.get("x-forwarded-host"), Some("app.example"), "{path:?}");
        assert!(
            !h.has("x-hop") && !h.has("connection"),
            "{path:?}: {:?}",
            h.headers
        );
    }
    server.shutdown().await;
}

// === 8. 204/304 never carry Content-Length ===

#[tokio::test]
async fn no_content_and_not_modified_carry_no_length_on_any_path() {
    let sandbox = ScriptedSandbox::start(|req, _| {
        let bytes: &[u8] = match req.target() {
            "/204" => b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            "/304" => b"HTTP/1.1 304 Not Modified\r\netag: \"v\"\r\ncontent-length: 50\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n",
        };
        vec![Step::Send(bytes.to_vec())]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    for path in PATHS {
        for (target, status) in [("/204", 204), ("/304", 304)] {
            let head = format!("GET {target} HTTP/1.1\r\nhost: a\r\nx-session-id: l1\r\n\r\n");
            let resp = exchange(&server, &on(path, &head), "GET").await;
            assert_eq!(resp.head.status, status, "{path:?}");
            assert!(
                !resp.head.has("content-length") && !resp.head.has("transfer-encoding"),
                "{path:?} {target}: {:?}",
                resp.head.headers
            );
        }
        // A response to HEAD keeps the length it describes.
        let head = "HEAD /head HTTP/1.1\r\nhost: a\r\nx-session-id: l1\r\n\r\n";
        let resp = exchange(&server, &on(path, head), "HEAD").await;
        assert_eq!(resp.head.get("content-length"), Some("50"), "{path:?}");
    }
    let got = h2_send(
        &server,
        Request::builder()
            .method(Method::GET)
            .uri("http://a/204")
            .header("x-session-id", "l1")
            .body(())
            .unwrap(),
        None,
        None,
    )
    .await;
    assert_eq!(got.status, 204);
    assert!(
        !got.headers.contains_key("content-length"),
        "{:?}",
        got.headers
    );
    server.shutdown().await;
}
