//! Server API smoke test: both listeners bind on port 0 and the admin API answers.

mod support;

use support::{EchoUpstream, HttpClient, start, static_backend};

#[tokio::test]
async fn starts_answers_health_and_stops() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let admin = HttpClient::http1(server.admin_addr());
    let r = admin.get("/healthz", &[]).await;
    assert_eq!(r.status, 200);
    let r = admin.get("/readyz", &[]).await;
    assert_eq!(r.status, 200);
    let outcome = server.shutdown().await;
    assert!(outcome.complete);
}
