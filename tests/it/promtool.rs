//! `/metrics` of a running activator passes `promtool check metrics`.
//!
//! promtool comes from Debian's `prometheus` package (`.ci/run` installs it). Under
//! `CI=true` a missing promtool fails the test; elsewhere the runner reports it ignored
//! with the reason (`build.rs` probes for it).

use crate::support;

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use support::{DemoSandbox, HttpClient, WAIT, start, static_backend};

#[tokio::test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool not installed (apt-get install prometheus); build.rs probe"
)]
async fn metrics_pass_promtool_check() {
    let promtool = Command::new("promtool").arg("--version").output().await;
    assert!(
        promtool.is_ok(),
        "promtool is required (Debian package prometheus; .ci/run installs it)"
    );
    let demo = DemoSandbox::start().await;
    let yaml = format!(
        "{}schedules:\n  - {{name: s, cron: '0 0 0 1 1 *', session: s1, path: /counter}}\n",
        static_backend(&[demo.addr])
    );
    let server = start(&yaml).await;
    // Traffic first, so labelled series (codes, activation kinds) exist.
    let proxy = HttpClient::http1(server.proxy_addr());
    assert_eq!(proxy.get_session("/healthz", "prom-1").await.status, 200);
    assert_eq!(proxy.get("/healthz", &[]).await.status, 400);
    let admin = HttpClient::http1(server.admin_addr());
    let reply = admin.get("/metrics", &[]).await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    for name in [
        "activator_stable_concurrency",
        "activator_panic_concurrency",
        "activator_stable_rps",
        "activator_panic_rps",
        "activator_active_sessions",
        "activator_desired_sandboxes",
        "activator_panic_mode",
        "activator_autoscaler_leader",
    ] {
        assert!(
            text.contains(&format!("\n{name} ")),
            "{name} missing:\n{text}"
        );
    }

    promtool_check(&text).await;
    server.shutdown().await;
}

/// Runs `promtool check metrics` over `text`; fails on an error or any lint finding.
pub async fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn promtool");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(text.as_bytes())
        .await
        .expect("write metrics");
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("promtool finishes in time")
        .expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}\n---\n{text}"
    );
    // promtool also exits 0 with lint warnings; there must be none.
    assert!(
        report.trim().is_empty(),
        "promtool lint findings:\n{report}"
    );
}
