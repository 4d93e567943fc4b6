//! `ApiHealth`: how long the Kubernetes API has been failing without a success in between,
//! so a new session fails fast with `control_plane` during an outage instead of waiting
//! out its whole budget, while a single transient error is still retried.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The API's recent record, fed by every watch event and by the calls that report to it.
pub struct ApiHealth {
    /// The current run of failures: when it started and when the last one was seen
    /// (`None`: the last call succeeded).
    state: watch::Sender<Option<(Instant, Instant)>>,
    /// `backend.kubernetes.api_outage_after`.
    bound: Duration,
}

impl ApiHealth {
    pub fn new(bound: Duration) -> ApiHealth {
        ApiHealth {
            state: watch::channel(None).0,
            bound,
        }
    }

    /// The outage bound (`backend.kubernetes.api_outage_after`).
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// A call failed transiently (5xx, 429, transport error, no answer in time).
    pub fn failed(&self) {
        self.failed_since(Instant::now());
    }

    /// A call started at `started` failed: the API has been failing since then at the
    /// latest (a call that hangs, or that the client retried internally, fails late).
    pub fn failed_since(&self, started: Instant) {
        let now = Instant::now();
        self.state.send_modify(|s| {
            *s = Some(match *s {
                Some((since, _)) => (since.min(started), now),
                None => (started, now),
            });
        });
    }

    /// A call (or a watch event) succeeded: the API answers.
    pub fn ok(&self) {
        self.state.send_if_modified(|s| s.take().is_some());
    }

    /// How long the API has been failing, when that is at least the bound and the last
    /// failure is recent (within the bound): an old run of failures nobody has retried
    /// since says nothing about now, so the next call gets its chance.
    pub fn outage(&self) -> Option<Duration> {
        let (since, last) = (*self.state.borrow())?;
        let now = Instant::now();
        (now - since >= self.bound && now - last <= self.bound).then(|| now - since)
    }

    /// Resolves once [`ApiHealth::outage`] holds with a failure seen at or after `from`
    /// (never, if the API keeps answering): a caller starting at `from` gets its own
    /// attempt first, so the first session after the API came back is served.
    pub async fn outage_reached(&self, from: Instant) -> Duration {
        let mut rx = self.state.subscribe();
        loop {
            let fresh = (*rx.borrow_and_update()).is_some_and(|(_, last)| last >= from);
            if fresh && let Some(d) = self.outage() {
                return d;
            }
            let state = *rx.borrow();
            // Without a new report, an outage can only begin when the run reaches the
            // bound (its last failure is then within the bound by construction).
            let wake = match state {
                Some((since, _)) if Instant::now() < since + self.bound => Some(since + self.bound),
                _ => None,
            };
            let changed = match wake {
                Some(t) => tokio::select! {
                    _ = tokio::time::sleep_until(t) => Ok(()),
                    r = rx.changed() => r,
                },
                None => rx.changed().await,
            };
            if changed.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_a_run_of_failures_lasting_the_bound() {
        let h = ApiHealth::new(Duration::from_secs(5));
        h.failed();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(h.outage().is_none());
        // A success in between starts the clock again.
        h.ok();
        h.failed();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(h.outage().is_none());
        // A caller starting now fails too: its wait ends when the run reaches 5 s.
        let from = Instant::now();
        h.failed();
        let d = tokio::time::timeout(Duration::from_secs(3), h.outage_reached(from))
            .await
            .expect("reached after 5 s of failures");
        assert!(d >= Duration::from_secs(5));
        assert!(h.outage().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_nobody_retried_are_not_an_outage() {
        let h = ApiHealth::new(Duration::from_secs(5));
        h.failed();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(h.outage().is_none());
        // The next call fails too: the run (20 s long) is an outage at once.
        h.failed();
        assert!(h.outage().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn no_outage_while_the_api_answers() {
        let h = ApiHealth::new(Duration::from_secs(1));
        h.failed();
        h.ok();
        assert!(
            tokio::time::timeout(Duration::from_secs(10), h.outage_reached(Instant::now()))
                .await
                .is_err()
        );
    }
}
