//! The demo sandbox over real sockets: state, counter, SSE, WebSocket echo.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

async fn start_demo() -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent-activator"))
        .args(["demo-sandbox", "--port", "0", "--tick-ms", "10"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo-sandbox");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("demo prints its address in time")
        .expect("read stdout")
        .expect("a line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    (child, addr)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    session: &str,
) -> (u16, serde_json::Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("x-session-id", session)
        .body(Empty::new())
        .unwrap();
    let resp = client.request(req).await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).expect("json body"))
}

#[tokio::test]
async fn state_counter_and_sessions() {
    let (child, addr) = start_demo().await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (s, v) = request(&client, "POST", &format!("http://{addr}/counter"), "alpha").await;
    assert_eq!(s, 200);
    assert_eq!(v["counter"], 1);
    let (_, v) = request(&client, "POST", &format!("http://{addr}/counter"), "alpha").await;
    assert_eq!(v["counter"], 2);
    let (_, v) = request(
        &client,
        "GET",
        &format!("http://{addr}/other/path?x=1"),
        "beta",
    )
    .await;
    assert_eq!(v["path"], "/other/path");
    assert_eq!(v["query"], "x=1");
    let (_, state) = request(&client, "GET", &format!("http://{addr}/state"), "alpha").await;
    assert_eq!(state["pid"], child.id().unwrap());
    assert_eq!(state["counter"], 2);
    assert_eq!(state["sessions_seen"], serde_json::json!(["alpha", "beta"]));
    assert!(state["history"].as_array().unwrap().len() >= 4);
}

#[tokio::test]
async fn sse_arrives_event_by_event() {
    let (_child, addr) = start_demo().await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{addr}/sse?n=3&interval_ms=200"))
        .body(Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: token-0\n\n");
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            rest.extend_from_slice(&d);
        }
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.contains("data: token-2\n\n"), "{rest}");
    assert!(rest.ends_with("event: done\ndata: end\n\n"), "{rest}");
}

#[tokio::test]
async fn websocket_echo() {
    let (_child, addr) = start_demo().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("ws connect");
    ws.send(Message::text("hello")).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hello");
    ws.close(None).await.unwrap();
}
