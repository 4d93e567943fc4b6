//! The access log line carries the request's `X-Request-ID`: the value a trusted proxy sent,
//! else the generated one, and in every case the same value the client got back and the
//! sandbox received. Runs the real binary with JSON logs; the untrusted client is a socket
//! bound to 127.0.0.2, while 127.0.0.1 is the trusted proxy.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use tokio::net::TcpSocket;

use crate::support;

use support::serve_process::{ServeProcess, access_lines};
use support::{EchoUpstream, WAIT};

/// One HTTP/1.1 request over a socket bound to `from`: (status, `X-Request-ID`, body).
async fn get_from(
    from: &str,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(to).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", "test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        WAIT,
        sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer to {path} in time"))
    .unwrap();
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .expect("an x-request-id")
        .to_str()
        .unwrap()
        .to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, id, String::from_utf8_lossy(&body).into_owned())
}

/// What the echo sandbox saw as `x-request-id`.
fn sandbox_id(body: &str) -> String {
    let j: serde_json::Value = serde_json::from_str(body).unwrap();
    j["headers"]["x-request-id"].as_str().unwrap().to_owned()
}

fn is_generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn access_lines_carry_the_request_id_the_client_and_sandbox_saw() {
    let up = EchoUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("aa-reqid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("activator.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n\
             log: {{format: json, level: info}}\n\
             proxy:\n  trusted_proxies: [127.0.0.1/32]\n\
             session:\n  max_sessions_per_sandbox: 10\n{}",
            support::static_backend(&[up.addr])
        ),
    )
    .unwrap();
    let activator = ServeProcess::start(&path).await;
    let proxy = activator.proxy;

    // A trusted proxy's ID is kept end to end.
    let (status, id, body) = get_from(
        "127.0.0.1",
        proxy,
        "/trusted",
        &[("x-session-id", "s1"), ("x-request-id", "gw-4711")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(id, "gw-4711");
    assert_eq!(sandbox_id(&body), "gw-4711");

    // An untrusted client's ID is replaced by a generated one, everywhere.
    let (status, generated, body) = get_from(
        "127.0.0.2",
        proxy,
        "/untrusted",
        &[("x-session-id", "s2"), ("x-request-id", "forged-id")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(is_generated(&generated), "{generated}");
    assert_eq!(sandbox_id(&body), generated);

    // A refused request (no session) still has an ID on its response and its line.
    let (status, refused_id, body) = get_from("127.0.0.1", proxy, "/refused", &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(is_generated(&refused_id), "{refused_id}");

    let (exit, logged) = activator.stop(Signal::SIGTERM).await;
    assert_eq!(exit.code(), Some(0));
    let mut by_path = std::collections::HashMap::new();
    for j in access_lines(&logged) {
        let p = j["path"].as_str().unwrap().to_owned();
        assert!(by_path.insert(p, j).is_none(), "one line per request");
    }
    assert_eq!(by_path.len(), 3, "{by_path:?}");
    assert_eq!(by_path["/trusted"]["request_id"], "gw-4711");
    assert_eq!(by_path["/untrusted"]["request_id"], generated.as_str());
    assert_eq!(by_path["/refused"]["request_id"], refused_id.as_str());
    assert_eq!(by_path["/refused"]["status"], 400);
    let _ = std::fs::remove_dir_all(dir);
}
