//! Metrics per pool by mechanism (issue 24): every family a pool's registry has is on
//! `/metrics` with that pool's `pool` label, a family registered in a pool later included;
//! server-wide families keep no `pool`; promtool passes with three pools.

use crate::promtool::promtool_check;
use crate::support;

use prometheus::IntCounter;

use support::{HttpClient, echo_upstreams, metric_value, sample};

#[tokio::test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool not installed (apt-get install prometheus); build.rs probe"
)]
async fn every_family_of_a_pool_registry_is_exported_with_its_pool_label() {
    let ups = echo_upstreams(3).await;
    let pool = |name: &str, matcher: &str, up: &support::EchoUpstream| {
        format!(
            "  - name: {name}\n{matcher}    backend:\n      kind: static\n      endpoints: ['{}']\n",
            up.addr
        )
    };
    let yaml = format!(
        "pools:\n{}{}{}",
        pool(
            "a",
            "    match:\n      header: {name: X-Pool, value: a}\n",
            &ups[0]
        ),
        pool(
            "b",
            "    match:\n      header: {name: X-Pool, value: b}\n",
            &ups[1]
        ),
        pool("c", "", &ups[2]),
    );
    let server = support::start(&yaml).await;
    let proxy = HttpClient::http1(server.proxy_addr());
    for (i, p) in ["a", "b", "c"].into_iter().enumerate() {
        let session = format!("pm-{i}");
        let reply = proxy
            .get("/", &[("X-Session-ID", &session), ("X-Pool", p)])
            .await;
        assert_eq!(reply.status, 200, "pool {p}");
    }

    // A family no list names: registered in pool b's registry after start.
    let pools = server.pools();
    let b = &pools.get("b").expect("pool b").metrics;
    let extra =
        IntCounter::new("activator_test_extra_total", "A family added to one pool.").unwrap();
    b.register(Box::new(extra.clone())).unwrap();
    extra.inc_by(2);
    // Families the old hand-kept list had forgotten (issue 24: they vanished with pools).
    let a = &pools.get("a").expect("pool a").metrics;
    a.customized_claims_total
        .with_label_values(&["false"])
        .inc();
    a.deep_pauses_total.with_label_values(&["ok"]).inc();

    let admin = HttpClient::http1(server.admin_addr());
    let text = admin.get("/metrics", &[]).await.text();
    assert_eq!(
        sample(&text, "activator_test_extra_total", &[("pool", "b")]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "activator_customized_claims_total",
            &[("cold", "false"), ("pool", "a")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "activator_deep_pauses_total",
            &[("pool", "a"), ("result", "ok")]
        ),
        Some(1.0),
        "{text}"
    );
    // One claim per pool, each counted in its own pool's series.
    for p in ["a", "b", "c"] {
        assert_eq!(
            sample(
                &text,
                "activator_activations_total",
                &[("kind", "claim"), ("pool", p), ("result", "ok")]
            ),
            Some(1.0),
            "pool {p}:\n{text}"
        );
    }
    // Server-wide families have no pool label; pool families no unlabelled series.
    assert_eq!(
        metric_value(&text, r#"activator_requests_total{code="200"}"#),
        Some(3.0),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("activator_sessions{") && !l.contains("pool=")),
        "a pool family kept a server-wide series:\n{text}"
    );
    promtool_check(&text).await;
    server.shutdown().await;
}
