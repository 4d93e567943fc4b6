//! `GET /api/sessions?limit=&cursor=` over a real admin socket: a walk lists every session
//! exactly once, also while sessions are created and released between pages; malformed
//! `limit`/`cursor` (and the retired `offset`) are 400 `invalid_query` with a JSON body.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use http_body_util::Full;

use agent_activator::server::RunningServer;
use agent_activator::session::SessionKey;

use crate::support;

use support::HttpClient;

struct Fixture {
    server: RunningServer,
    proxy: HttpClient,
    admin: HttpClient,
    _upstream: support::EchoUpstream,
}

async fn fixture() -> Fixture {
    let upstream = support::EchoUpstream::start().await;
    let yaml = format!(
        "{}session:\n  max_sessions_per_sandbox: 100000\nautoscaler:\n  enabled: false\n",
        support::static_backend(&[upstream.addr])
    );
    let server = support::start(&yaml).await;
    Fixture {
        proxy: HttpClient::http1(server.proxy_addr()),
        admin: HttpClient::http1(server.admin_addr()),
        server,
        _upstream: upstream,
    }
}

fn hash(id: &str) -> String {
    SessionKey::parse(id, 128).unwrap().short_hash()
}

async fn open(f: &Fixture, id: &str) {
    let r = f.proxy.get("/", &[("x-session-id", id)]).await;
    assert_eq!(r.status, 200, "session {id}: {}", r.text());
}

async fn release(f: &Fixture, id: &str) {
    let req = f
        .admin
        .request("DELETE", &format!("/api/sessions/{id}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = f.admin.send(req).await;
    assert_eq!(r.status, 200, "release {id}: {}", r.text());
}

/// One page: its rows (short hashes, in order) and its `next_cursor`.
async fn page(f: &Fixture, limit: usize, cursor: Option<&str>) -> (Vec<String>, Option<String>) {
    let path = match cursor {
        Some(c) => format!("/api/sessions?limit={limit}&cursor={c}"),
        None => format!("/api/sessions?limit={limit}"),
    };
    let r = f.admin.get(&path, &[]).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let body = r.json();
    assert_eq!(body["limit"], limit, "{body}");
    let rows: Vec<String> = body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session"].as_str().unwrap().to_owned())
        .collect();
    assert!(rows.len() <= limit, "{body}");
    assert!(
        rows.windows(2).all(|w| w[0] < w[1]),
        "a page is ordered by hash: {rows:?}"
    );
    let next = body["next_cursor"].as_str().map(str::to_owned);
    if let Some(c) = &next {
        assert_eq!(c.len(), 64, "{c}");
        assert_eq!(
            &c[..12],
            rows.last().unwrap().as_str(),
            "the cursor follows the last row"
        );
    }
    (rows, next)
}

#[tokio::test]
async fn a_walk_lists_every_session_exactly_once() {
    let f = fixture().await;
    let ids: Vec<String> = (0..237).map(|i| format!("walk-{i}")).collect();
    for id in &ids {
        open(&f, id).await;
    }
    let first = f.admin.get("/api/sessions", &[]).await.json();
    assert_eq!(first["total"], 237, "{first}");
    assert_eq!(first["limit"], 100, "the default page");
    assert_eq!(first["sessions"].as_array().unwrap().len(), 100);

    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let (rows, next) = page(&f, 50, cursor.as_deref()).await;
        if let (Some(prev), Some(first)) = (seen.last(), rows.first()) {
            assert!(
                prev < first,
                "pages continue the order: {prev} then {first}"
            );
        }
        seen.extend(rows);
        pages += 1;
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 5, "237 rows in pages of 50");
    let expected: BTreeSet<String> = ids.iter().map(|i| hash(i)).collect();
    assert_eq!(seen.len(), 237, "no row twice");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), expected);

    // A page of exactly the remainder ends the walk: no cursor to an empty page.
    let (rows, next) = page(&f, 1000, None).await;
    assert_eq!(rows.len(), 237);
    assert_eq!(next, None);
    f.server.shutdown().await;
}

#[tokio::test]
async fn a_walk_stays_exact_while_sessions_come_and_go() {
    let f = fixture().await;
    let mut live: Vec<String> = (0..160).map(|i| format!("churn-{i}")).collect();
    for id in &live {
        open(&f, id).await;
    }
    let mut removed: HashMap<String, String> = HashMap::new(); // hash -> id
    let mut added: BTreeSet<String> = BTreeSet::new();
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut round = 0;
    loop {
        let (rows, next) = page(&f, 30, cursor.as_deref()).await;
        for r in &rows {
            assert!(
                !removed.contains_key(r),
                "{r} was released before this page and is still listed"
            );
        }
        seen.extend(rows);
        let Some(c) = next else { break };
        cursor = Some(c);
        // Between pages: release three sessions (some already listed, some not yet) and
        // create three new ones (which land before or after the cursor by their hash).
        for _ in 0..3 {
            let id = live.remove((round * 7 + 11) % live.len());
            release(&f, &id).await;
            removed.insert(hash(&id), id);
        }
        for j in 0..3 {
            let id = format!("late-{round}-{j}");
            open(&f, &id).await;
            added.insert(hash(&id));
            live.push(id);
        }
        round += 1;
    }
    assert!(round >= 5, "the walk spanned several pages ({round})");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no row twice: {seen:?}");
    // Every session present for the whole walk was listed.
    for id in live.iter().filter(|id| !id.starts_with("late-")) {
        assert!(unique.contains(&hash(id)), "{id} was never listed");
    }
    // Rows are only ever sessions that existed at some point of the walk.
    for r in &unique {
        let original = (0..160).any(|i| hash(&format!("churn-{i}")) == *r);
        assert!(
            original || added.contains(r),
            "{r} is no session of this test"
        );
    }
    f.server.shutdown().await;
}

#[tokio::test]
async fn malformed_limits_and_cursors_are_400_json() {
    let f = fixture().await;
    open(&f, "only").await;
    let upper = "A".repeat(64);
    let short = "0".repeat(63);
    let nonhex = "g".repeat(64);
    for bad in [
        "limit=0".to_owned(),
        "limit=1001".to_owned(),
        "limit=-1".to_owned(),
        "limit=ten".to_owned(),
        "limit=".to_owned(),
        format!("cursor={upper}"),
        format!("cursor={short}"),
        format!("cursor={nonhex}"),
        "cursor=%2e%2e".to_owned(),
        "offset=3".to_owned(),
    ] {
        let path = format!("/api/sessions?{bad}");
        let r = f.admin.get(&path, &[]).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
        assert_eq!(r.error_code(), "invalid_query", "{path}");
    }
    // The largest page is accepted; a cursor past every hash is an empty last page.
    let (rows, next) = page(&f, 1000, None).await;
    assert_eq!(rows, vec![hash("only")]);
    assert_eq!(next, None);
    let (rows, next) = page(&f, 1, Some(&"f".repeat(64))).await;
    assert!(rows.is_empty());
    assert_eq!(next, None);
    f.server.shutdown().await;
}
