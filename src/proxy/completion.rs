//! `Completion`: what happens when a request is over (its response body ended, its
//! upgraded stream closed, or the client went away): metrics, traffic stats, the access
//! log line, and dropping the activation [`Permit`].
//!
//! It is created when a request arrives and travels with the response body, so
//! `activator_requests_in_flight` counts a request until its last byte, as the autoscaler
//! needs. A request abandoned before any response is recorded as status 499.

use std::sync::{Arc, OnceLock};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Uri};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use tokio::time::Instant;

use crate::activation::Permit;
use crate::config::SessionIdLogging;
use crate::metrics::Metrics;
use crate::session::SessionKey;
use crate::stats::TrafficStats;
use crate::telemetry::RequestTrace;

/// Recorded when the client goes away before a response was produced (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// `activator_requests_total{code}` children, created on first use and then cached, so
/// the hot path neither formats the code nor takes the vector's lock.
pub struct StatusCounters {
    vec: IntCounterVec,
    by_code: Box<[OnceLock<IntCounter>]>,
}

impl StatusCounters {
    pub fn new(vec: IntCounterVec) -> StatusCounters {
        StatusCounters {
            vec,
            by_code: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The counter for `code` (100..=599; anything else is counted as 500).
    pub fn get(&self, code: u16) -> &IntCounter {
        let code = if (100..600).contains(&code) {
            code
        } else {
            500
        };
        self.by_code[usize::from(code - 100)]
            .get_or_init(|| self.vec.with_label_values(&[code.to_string().as_str()]))
    }
}

/// The shared sinks every completion writes to.
pub struct Recorder {
    pub status: StatusCounters,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    pub stats: Arc<TrafficStats>,
    /// `log.access_log`.
    pub access_log: bool,
    /// `log.session_ids`.
    pub session_ids: SessionIdLogging,
}

impl Recorder {
    pub fn new(
        metrics: &Metrics,
        stats: Arc<TrafficStats>,
        access_log: bool,
        session_ids: SessionIdLogging,
    ) -> Recorder {
        Recorder {
            status: StatusCounters::new(metrics.requests_total.clone()),
            duration: metrics.request_duration.clone(),
            in_flight: metrics.requests_in_flight.clone(),
            stats,
            access_log,
            session_ids,
        }
    }
}

/// What the access log line needs; captured only when `log.access_log` is on.
struct AccessEntry {
    method: Method,
    /// The forwarded path: for a `path_prefix` session, without `/s/{id}`, so raw IDs
    /// never reach the log.
    path: PathAndQuery,
    session: Option<SessionKey>,
    /// `X-Request-ID` (kept from a trusted proxy or generated): the same value the client,
    /// the sandbox and a failure's log line see.
    request_id: Option<HeaderValue>,
}

struct Open {
    recorder: Arc<Recorder>,
    start: Instant,
    status: u16,
    lease: Option<Permit>,
    access: Option<AccessEntry>,
    /// The request's span when it is traced (`telemetry`); ended at completion.
    trace: Option<RequestTrace>,
    /// With `pools:`, the traffic stats of the request's pool (its autoscaler's input),
    /// counted from the moment the pool is known.
    pool_stats: Option<Arc<TrafficStats>>,
}

/// One request's end-of-life bookkeeping; runs once, on drop.
pub struct Completion(Option<Open>);

impl Completion {
    /// A request arrived: counts it as in flight.
    pub fn begin(recorder: &Arc<Recorder>, method: &Method, uri: &Uri) -> Completion {
        recorder.in_flight.inc();
        recorder.stats.request_started();
        let access = recorder.access_log.then(|| AccessEntry {
            method: method.clone(),
            path: uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            session: None,
            request_id: None,
        });
        Completion(Some(Open {
            recorder: recorder.clone(),
            start: Instant::now(),
            status: CLIENT_CLOSED,
            lease: None,
            access,
            trace: None,
            pool_stats: None,
        }))
    }

    /// Names the session in the access log, and the rewritten path if the session came
    /// from a path prefix.
    pub fn set_session(&mut self, key: &SessionKey, rewritten: Option<&PathAndQuery>) {
        if let Some(entry) = self.0.as_mut().and_then(|o| o.access.as_mut()) {
            entry.session = Some(key.clone());
            if let Some(path) = rewritten {
                entry.path = path.clone();
            }
        }
    }

    /// Names the request in the access log by its `X-Request-ID`.
    pub fn set_request_id(&mut self, id: &HeaderValue) {
        if let Some(entry) = self.0.as_mut().and_then(|o| o.access.as_mut()) {
            entry.request_id = Some(id.clone());
        }
    }

    /// Attaches the request's span (ended, with the status, when the request is over).
    pub fn set_trace(&mut self, trace: Option<RequestTrace>) {
        if let Some(open) = self.0.as_mut() {
            open.trace = trace;
        }
    }

    /// The request's span, if it is traced.
    pub fn trace(&self) -> Option<&RequestTrace> {
        self.0.as_ref().and_then(|o| o.trace.as_ref())
    }

    /// Counts the request in its pool's traffic stats too, until it is over.
    pub fn set_pool_stats(&mut self, stats: &Arc<TrafficStats>) {
        if let Some(open) = self.0.as_mut()
            && open.pool_stats.is_none()
        {
            stats.request_started();
            open.pool_stats = Some(stats.clone());
        }
    }

    /// Keeps the lease until the request is over.
    pub fn hold_lease(&mut self, lease: Permit) {
        if let Some(open) = self.0.as_mut() {
            open.lease = Some(lease);
        }
    }

    pub fn set_status(&mut self, status: u16) {
        if let Some(open) = self.0.as_mut() {
            open.status = status;
        }
    }

    /// Moves the bookkeeping out (to a stream relay), leaving an inert completion.
    pub fn take(&mut self) -> Completion {
        Completion(self.0.take())
    }

    /// Records now instead of at drop.
    pub fn finish(mut self) {
        self.record();
    }

    fn record(&mut self) {
        let Some(open) = self.0.take() else { return };
        let r = &open.recorder;
        let elapsed = open.start.elapsed();
        r.in_flight.dec();
        r.stats.request_finished();
        if let Some(stats) = &open.pool_stats {
            stats.request_finished();
        }
        r.status.get(open.status).inc();
        r.duration.observe(elapsed.as_secs_f64());
        if let Some(entry) = &open.access {
            let (sandbox, activation) = match &open.lease {
                Some(l) => (l.sandbox.as_str(), l.activation.as_str()),
                None => ("-", "-"),
            };
            let session = SessionField {
                key: entry.session.as_ref(),
                cached_hash: open.lease.as_ref().map(Permit::session_hash),
                full: r.session_ids == SessionIdLogging::Full,
            };
            let trace_id = open.trace.as_ref().map(RequestTrace::trace_id);
            tracing::info!(
                target: "access",
                method = %entry.method,
                path = entry.path.path(),
                status = open.status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                session = %session,
                sandbox,
                activation,
                trace_id = trace_id.as_deref().unwrap_or("-"),
                request_id = entry
                    .request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-"),
            );
        }
        if let Some(trace) = open.trace {
            trace.finish(open.status);
        }
        // The lease drops here, after the request is recorded.
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.record();
    }
}

/// A session as it appears in logs: its short hash (the lease's cached one when the
/// request got a sandbox), or the raw ID with `session_ids: full`.
struct SessionField<'a> {
    key: Option<&'a SessionKey>,
    cached_hash: Option<&'a str>,
    full: bool,
}

impl std::fmt::Display for SessionField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.key, self.full, self.cached_hash) {
            (None, _, _) => f.write_str("-"),
            (Some(k), true, _) => f.write_str(k.as_str()),
            (Some(_), false, Some(hash)) => f.write_str(hash),
            (Some(k), false, None) => std::fmt::Display::fmt(k, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_until_dropped_and_by_status() {
        let metrics = Metrics::new();
        let stats = Arc::new(TrafficStats::new());
        let r = Arc::new(Recorder::new(
            &metrics,
            stats.clone(),
            false,
            SessionIdLogging::Hash,
        ));
        let uri: Uri = "/x".parse().unwrap();
        let mut c = Completion::begin(&r, &Method::GET, &uri);
        assert_eq!(metrics.requests_in_flight.get(), 1);
        assert_eq!(stats.in_flight(), 1);
        c.set_status(201);
        let moved = c.take();
        drop(c);
        assert_eq!(
            metrics.requests_in_flight.get(),
            1,
            "the inert half records nothing"
        );
        drop(moved);
        assert_eq!(metrics.requests_in_flight.get(), 0);
        assert_eq!(stats.in_flight(), 0);
        assert_eq!(metrics.requests_total.with_label_values(&["201"]).get(), 1);
        assert_eq!(metrics.request_duration.get_sample_count(), 1);

        drop(Completion::begin(&r, &Method::GET, &uri));
        assert_eq!(metrics.requests_total.with_label_values(&["499"]).get(), 1);
        assert_eq!(
            r.status.get(42).get(),
            0,
            "out-of-range codes fold into 500"
        );
    }
}
