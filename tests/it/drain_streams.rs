//! Graceful drain with long-lived streams: an open WebSocket and a server-sent-event stream
//! keep working while the activator drains, finish on their own inside the window, or are cut
//! when `proxy.drain_timeout` is over (never before).

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use tokio_tungstenite::tungstenite::Message;

use support::{HttpClient, WAIT, start, static_backend, wait_until};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_ws(proxy: std::net::SocketAddr) -> Ws {
    let url = format!("ws://{proxy}/s/ws-drain/ws");
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("echo in time")
        .expect("stream open")
        .expect("a frame");
    assert_eq!(got.into_text().unwrap().as_str(), text);
}

fn config(drain_timeout: &str, upstreams: &[std::net::SocketAddr]) -> String {
    format!(
        "{}proxy: {{drain_timeout: {drain_timeout}}}\n\
         session: {{sources: [{{header: X-Session-ID}}, {{path_prefix: /s/}}]}}\n",
        static_backend(upstreams)
    )
}

#[tokio::test]
async fn open_streams_keep_working_while_draining_and_end_it_when_they_close() {
    let ups = support::echo_upstreams(2).await;
    let server = start(&config("10s", &[ups[0].addr, ups[1].addr])).await;
    let proxy = server.proxy_addr();
    let mut ws = open_ws(proxy).await;
    let c = HttpClient::http1(proxy);
    let req = c
        .request("GET", "/sse?n=4&interval_ms=150")
        .header("x-session-id", "sse-drain")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let sse = c.send_streaming(req).await;
    assert_eq!(sse.status(), 200);
    let mut sse = sse.into_body();

    let handle = server.shutdown_handle();
    let drain = tokio::spawn(server.shutdown());
    wait_until("draining", || handle.is_draining()).await;
    // Both streams still carry traffic during the drain.
    echo(&mut ws, "during drain").await;
    let mut events = 0;
    while let Some(frame) = tokio::time::timeout(WAIT, sse.frame()).await.unwrap() {
        if frame.unwrap().is_data() {
            events += 1;
        }
    }
    assert_eq!(events, 4, "the SSE stream ran to its end during the drain");
    assert!(!drain.is_finished(), "the open WebSocket holds the drain");
    // The closing handshake, then the client goes away (the relay ends when both sides have).
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    let outcome = tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
    assert!(
        outcome.complete,
        "streams that end inside the window: complete"
    );
    assert_eq!(outcome.cut, 0);
}

#[tokio::test]
async fn streams_still_open_at_drain_timeout_are_cut_then() {
    let ups = support::echo_upstreams(2).await;
    let server = start(&config("1s", &[ups[0].addr, ups[1].addr])).await;
    let proxy = server.proxy_addr();
    let mut ws = open_ws(proxy).await;
    let c = HttpClient::http1(proxy);
    let req = c
        .request("GET", "/sse?n=100000&interval_ms=100")
        .header("x-session-id", "sse-endless")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut sse = c.send_streaming(req).await.into_body();
    assert!(
        tokio::time::timeout(WAIT, sse.frame())
            .await
            .unwrap()
            .is_some(),
        "the SSE stream is flowing"
    );

    let handle = server.shutdown_handle();
    let started = tokio::time::Instant::now();
    let drain = tokio::spawn(server.shutdown());
    wait_until("draining", || handle.is_draining()).await;
    echo(&mut ws, "still relayed").await;

    // The SSE stream ends (cut) once the window is over, not before.
    let sse_end = tokio::time::timeout(WAIT, async {
        loop {
            match sse.frame().await {
                Some(Ok(_)) => continue,
                _ => return started.elapsed(),
            }
        }
    })
    .await
    .expect("the SSE stream is cut within the drain window plus WAIT");
    assert!(
        sse_end >= Duration::from_secs(1),
        "cut after {sse_end:?}, before drain_timeout (1s)"
    );
    // The WebSocket is closed too (EOF, error or a close frame).
    let ws_end = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ws_end.is_ok(), "the WebSocket was not cut");
    let outcome = tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
    assert!(!outcome.complete);
    assert_eq!(outcome.cut, 2, "one WebSocket relay and one SSE connection");
}
