//! Activation latency by path (issue 24): `activator_request_held_seconds{waited_for}`
//! observes each held request once, labelled by what it waited for (a warm claim, a cold
//! create, a frozen or a suspended sandbox's resume, a wait for capacity), per pool; the
//! dashboard draws it beside the sandbox timeline.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

use agent_activator::backend::{ActivationKind, DeepPause};
use agent_activator::metrics::Metrics;
use agent_activator::server;
use agent_activator::testing::ScriptedBackend;

use crate::dashboard::{open_dashboard, output_dir};
use crate::support;

use support::{EchoUpstream, HttpClient, eventually, metric_value, sample};

const PATHS: [&str; 5] = [
    "warm_claim",
    "cold_create",
    "resume_frozen",
    "resume_suspended",
    "queued_no_capacity",
];

#[tokio::test]
#[cfg_attr(missing_chromium, ignore = "chromium not found (.ci/run installs it)")]
async fn each_held_request_is_observed_once_by_what_it_waited_for_and_drawn_beside_the_timeline() {
    let up = EchoUpstream::start().await;
    let backend = Arc::new(ScriptedBackend::new(true).one_sandbox("box", up.addr));
    {
        let mut s = backend.script();
        s.claim_bindings = [
            (ActivationKind::Claim, false),
            (ActivationKind::Create, false),
            (ActivationKind::Claim, true),
        ]
        .into();
        s.deep_pause = Some(DeepPause::Suspended);
    }
    // The config names a process backend (one that can pause) only to validate; the
    // scripted one replaces it.
    let config = support::config(
        "backend:\n  kind: process\n  command: [\"/bin/true\", \"{port}\"]\n\
         idle:\n  timeout: 10m\n  policy: pause\n  deep_after: 1s\n  sweep_interval: 50ms\n\
         autoscaler:\n  enabled: false\n",
    );
    let server = server::start_with_backend(config, backend, Arc::new(Metrics::new()))
        .await
        .unwrap();
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let get = |session: &'static str| {
        let proxy = &proxy;
        async move {
            let r = proxy.get("/", &[("x-session-id", session)]).await;
            assert_eq!(r.status, 200, "{session}: {}", r.text());
            r.header("x-activator-activation").unwrap_or("").to_owned()
        }
    };
    let pause = |session: &'static str| {
        let admin = &admin;
        async move {
            let req = admin
                .request("POST", &format!("/api/sessions/{session}/pause"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = admin.send(req).await;
            assert_eq!(r.status, 200, "pause {session}: {}", r.text());
        }
    };

    assert_eq!(get("warm").await, "claim");
    assert_eq!(get("cold").await, "create");
    assert_eq!(get("queued").await, "claim");
    // Ready sessions are not held: no observation.
    assert_eq!(get("warm").await, "none");
    pause("warm").await;
    assert_eq!(get("warm").await, "resume");
    pause("cold").await;
    eventually("the deep tier suspends the paused session", || {
        let admin = &admin;
        async move {
            let text = admin.get("/metrics", &[]).await.text();
            (metric_value(&text, r#"activator_deep_pauses_total{result="suspended"}"#) == Some(1.0))
                .then_some(())
        }
    })
    .await;
    assert_eq!(get("cold").await, "resume");

    let text = admin.get("/metrics", &[]).await.text();
    for path in PATHS {
        assert_eq!(
            sample(
                &text,
                "activator_request_held_seconds_count",
                &[("waited_for", path)]
            ),
            Some(1.0),
            "{path}:\n{text}"
        );
    }
    let ov = admin.get("/api/overview", &[]).await.json();
    for path in PATHS {
        assert_eq!(ov["held"][path]["count"], 1, "{path}: {ov}");
    }

    let (_one, browser) = open_dashboard(server.admin_addr()).await;
    browser
        .wait_for(
            "a line per path",
            "document.querySelectorAll('#held-text [data-path]').length === 5",
        )
        .await;
    for path in PATHS {
        let line = browser
            .eval(&format!(
                "document.querySelector('#held-text [data-path={path}]').textContent"
            ))
            .await;
        let line = line.as_str().unwrap_or_default().to_owned();
        assert!(line.starts_with(&format!("{path}: n=1 p50<=")), "{line}");
    }
    assert_eq!(
        browser
            .eval(
                "document.querySelector('#timeline').closest('.row')\
                 .contains(document.querySelector('#ch-held'))"
            )
            .await,
        true,
        "drawn beside the timeline"
    );
    browser
        .screenshot(&output_dir().join("dashboard-held.png"), 1280, 1300)
        .await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
    drop(browser);
    server.shutdown().await;
}
