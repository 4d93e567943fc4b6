//! `ConnLocal`: what one HTTP/1.1 client connection keeps between its requests on the
//! fast path (one request at a time): the response-head timer, the lease cache, and the
//! header maps and field names it reuses, so a proxied request allocates none of them.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::{Instant, Sleep};

use crate::activation::LeaseCache;

/// Per-connection state of the fast path ([`super::h1server`]); the hyper path, which may
/// run requests of one connection concurrently, has none.
#[derive(Default)]
pub struct ConnLocal {
    /// The sessions this connection carried lately (see [`LeaseCache`]).
    pub leases: LeaseCache,
    /// One coarse timer for every request's response-head bound (see [`Self::bounded`]).
    head_timer: Option<Pin<Box<Sleep>>>,
    /// The last request's header map, emptied (its capacity kept) for the next request.
    pub spare_request: Option<HeaderMap>,
    /// The last response's header map, emptied, for the next response head.
    pub spare_response: Option<HeaderMap>,
    /// Field names this connection's requests used, so a custom name (`x-session-id`) is
    /// shared rather than allocated per request; at most [`NAMES_MAX`].
    names: Vec<HeaderName>,
}

/// Field names a connection remembers.
const NAMES_MAX: usize = 32;

/// Returns `map`, emptied, to `slot` for the next message on the connection.
pub fn recycle(slot: &mut Option<HeaderMap>, mut map: HeaderMap) {
    map.clear();
    *slot = Some(map);
}

impl ConnLocal {
    /// The field name `raw` spells (any case), shared with an earlier request's when this
    /// connection sent it before; `None` when it is not a valid name.
    pub fn name(&mut self, raw: &[u8]) -> Option<HeaderName> {
        if let Some(known) = self.names.iter().find(|n| {
            n.as_str().len() == raw.len() && n.as_str().as_bytes().eq_ignore_ascii_case(raw)
        }) {
            return Some(known.clone());
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        if self.names.len() < NAMES_MAX {
            self.names.push(name.clone());
        }
        Some(name)
    }

    /// `fut`'s output if it completes within `limit`, else `None` (it is dropped then):
    /// what `tokio::time::timeout` does, with one timer armed per connection instead of a
    /// timer entry registered and removed per request. The timer's deadline is never later
    /// than the current request's (each request's deadline is later than the last one's),
    /// so when it fires early it is moved to this request's deadline and waited on again;
    /// a quick request leaves it untouched. It is re-armed about once per `limit` on a
    /// busy connection.
    pub async fn bounded<F: Future>(&mut self, limit: Duration, fut: F) -> Option<F::Output> {
        let deadline = Instant::now() + limit;
        let timer = self
            .head_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            // Only when `limit` shrank (a later deadline is corrected when it fires).
            timer.as_mut().reset(deadline);
        }
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                () = timer.as_mut() => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shared_case_insensitively_and_checked() {
        let mut local = ConnLocal::default();
        let a = local.name(b"X-Session-ID").unwrap();
        assert_eq!(a.as_str(), "x-session-id");
        assert_eq!(local.name(b"x-session-id").unwrap(), a);
        assert_eq!(local.name(b"X-SESSION-ID").unwrap(), a);
        assert_eq!(local.name(b"Host").unwrap(), http::header::HOST);
        assert!(local.name(b"bad name").is_none());
        assert!(local.name(b"").is_none());
        for i in 0..NAMES_MAX * 2 {
            assert_eq!(
                local.name(format!("x-{i}").as_bytes()).unwrap().as_str(),
                format!("x-{i}")
            );
        }
        assert_eq!(local.names.len(), NAMES_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_each_request_from_its_own_start() {
        let mut local = ConnLocal::default();
        let limit = Duration::from_secs(10);
        // Quick requests leave the timer armed at the first one's deadline.
        assert_eq!(local.bounded(limit, async { 1 }).await, Some(1));
        tokio::time::advance(Duration::from_secs(8)).await;
        // This one starts at 8 s: the timer fires at 10 s, early for it, and is moved to
        // 18 s; it completes at 17 s.
        let slow = tokio::time::sleep(Duration::from_secs(9));
        assert_eq!(local.bounded(limit, slow).await, Some(()));
        assert_eq!(
            local.head_timer.as_ref().map(|t| t.deadline()),
            Some(Instant::now() + Duration::from_secs(1))
        );
        // Past its own bound: none, at exactly `limit` after its start.
        let start = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(local.bounded(limit, never).await, None);
        assert_eq!(start.elapsed(), limit);
        // A shorter limit pulls the timer in.
        let start = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(local.bounded(Duration::from_secs(2), never).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
