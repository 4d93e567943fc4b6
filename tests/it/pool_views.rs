//! Pools in the admin views (issue 24): `/api/events?pool=` streams one pool's events, and
//! the dashboard's pool picker switches every panel (overview, sessions, events) to a pool.

use crate::dashboard::open_dashboard;
use crate::events::{Sse, subscribe_to};
use crate::support;

use support::{HttpClient, echo_upstreams};

fn hash(id: &str) -> String {
    agent_activator::session::SessionKey::parse(id, 128)
        .unwrap()
        .short_hash()
}

/// Events until the one that claims `session`'s sandbox, inclusive.
async fn until_claimed(sse: &mut crate::events::SseReader, session: &str) -> Vec<Sse> {
    let mut seen = Vec::new();
    loop {
        let m = sse.next().await;
        let done = m.data["kind"] == "claimed" && m.data["session"] == hash(session);
        seen.push(m);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
#[cfg_attr(missing_chromium, ignore = "chromium not found (.ci/run installs it)")]
async fn one_pools_events_on_the_api_and_a_pool_picker_on_the_dashboard() {
    let ups = echo_upstreams(2).await;
    let yaml = format!(
        "session:\n  max_sessions_per_sandbox: 10\npools:\n  - name: a\n    match:\n      header: {{name: X-Pool, value: a}}\n    backend:\n      kind: static\n      endpoints: ['{}']\n  - name: b\n    backend:\n      kind: static\n      endpoints: ['{}']\n",
        ups[0].addr, ups[1].addr
    );
    let server = support::start(&yaml).await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let get = |session: &'static str, pool: Option<&'static str>| {
        let proxy = &proxy;
        async move {
            let mut h = vec![("x-session-id", session)];
            h.extend(pool.map(|p| ("x-pool", p)));
            assert_eq!(proxy.get("/", &h).await.status, 200, "{session}");
        }
    };
    get("sa", Some("a")).await;
    get("sb", None).await;

    // The ring replayed from the start, one pool's events only; then live ones.
    let streaming = HttpClient::http1(server.admin_addr());
    let mut b = subscribe_to(&streaming, "/api/events?pool=b", Some("0")).await;
    let mut seen = until_claimed(&mut b, "sb").await;
    get("sa2", Some("a")).await;
    get("sb2", None).await;
    seen.extend(until_claimed(&mut b, "sb2").await);
    for m in &seen {
        assert_eq!(m.data["pool"], "b", "{:?}", m.data);
    }
    let unknown = admin.get("/api/events?pool=nope", &[]).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "unknown_pool");

    let (_one, browser) = open_dashboard(server.admin_addr()).await;
    browser
        .wait_for(
            "the picker lists both pools, the first shown",
            "!document.querySelector('#pool-pick').hidden && \
             document.querySelectorAll('#pool option').length === 2 && \
             document.querySelector('#pool').value === 'a'",
        )
        .await;
    let (sa, sb) = (hash("sa"), hash("sb"));
    browser
        .wait_for(
            "pool a's sessions",
            &format!(
                "document.querySelector('tr[data-session=\"{sa}\"]') !== null && \
                 document.querySelector('tr[data-session=\"{sb}\"]') === null"
            ),
        )
        .await;
    browser
        .eval(
            "(s => (s.value = 'b', s.dispatchEvent(new Event('change')), true))\
             (document.querySelector('#pool'))",
        )
        .await;
    browser
        .wait_for(
            "pool b's sessions and events only",
            &format!(
                "document.querySelector('tr[data-session=\"{sb}\"]') !== null && \
                 document.querySelector('tr[data-session=\"{sa}\"]') === null && \
                 document.querySelector('#events').textContent.includes('claimed {sb}') && \
                 !document.querySelector('#events').textContent.includes('{sa}')"
            ),
        )
        .await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
    drop(browser);
    server.shutdown().await;
}
