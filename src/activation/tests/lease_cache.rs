//! The per-connection lease cache answers exactly as the table probe does.

use super::*;
use crate::activation::LeaseCache;

/// The cached fast path and the plain one agree on every state a session goes through.
fn agree(r: &Rig, k: &SessionKey, cache: &mut LeaseCache) -> Option<Permit> {
    let cached = r.activator.try_acquire_ready_cached(k, cache);
    let plain = r.activator.try_acquire_ready(k);
    assert_eq!(
        cached.as_ref().map(|p| (p.endpoint, p.sandbox.clone())),
        plain.as_ref().map(|p| (p.endpoint, p.sandbox.clone())),
        "cached and probed leases differ"
    );
    cached
}

#[tokio::test(start_paused = true)]
async fn a_cached_lease_follows_pause_release_and_a_new_binding() {
    let r = rig();
    let mut cache = LeaseCache::default();
    let k = key("cached");
    assert!(agree(&r, &k, &mut cache).is_none(), "unknown session");
    drop(ready(&r, &k).await);
    let first = agree(&r, &k, &mut cache).expect("ready: served from the table");
    let sandbox = first.sandbox.clone();
    drop(first);
    assert!(agree(&r, &k, &mut cache).is_some(), "served from the cache");

    // Paused: the cached entry is found, and its phase refuses the fast path.
    assert!(r.activator.pause(&k).await.unwrap());
    assert!(agree(&r, &k, &mut cache).is_none());

    // Released and claimed again: the old entry left the table; the cache must not serve
    // it (nor its old binding), and it picks up the new entry.
    assert!(r.activator.release(&k).await.unwrap());
    assert!(agree(&r, &k, &mut cache).is_none());
    drop(ready(&r, &k).await);
    let again = agree(&r, &k, &mut cache).expect("the new entry");
    assert_ne!(again.sandbox, sandbox, "a release frees the old sandbox");
    drop(again);

    // More sessions than the cache holds, interleaved: every answer still agrees.
    let keys: Vec<SessionKey> = (0..20).map(|i| key(&format!("many-{i}"))).collect();
    for k in &keys {
        drop(ready(&r, k).await);
    }
    for _ in 0..3 {
        for k in &keys {
            assert!(agree(&r, k, &mut cache).is_some());
        }
    }
}
