//! Every Prometheus metric the activator exports, registered in one place.
//!
//! Labels are bounded: status codes, fixed state/kind/result names. Session IDs never
//! become labels. Gauges that describe tables (`activator_sessions`, `activator_sandboxes`)
//! are refreshed at scrape time by the admin server, so the hot path does not maintain them.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

mod openmetrics;

use crate::lock::RwLockExt;

pub use openmetrics::ActivationExemplars;

/// Latency buckets from 100 us to 5 min: proxy overhead and long agent turns both fit.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The activator's metrics and the registry they live in. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// With `pools:`, the pools' registries (const label `pool`), merged at encode time:
    /// every family a pool registry has is exported from the pools, with `pool`.
    pools: std::sync::RwLock<Vec<Registry>>,
    /// `activator_requests_total{code}`: finished requests by response status.
    pub requests_total: IntCounterVec,
    /// `activator_request_duration_seconds`: request start to response body end.
    pub request_duration: Histogram,
    /// `activator_requests_in_flight`: counted until the response body ends.
    pub requests_in_flight: IntGauge,
    /// `activator_websockets_open`: upgraded connections currently relayed.
    pub websockets_open: IntGauge,
    /// `activator_sessions{state}`: active | paused | activating | lost (refreshed at scrape).
    pub sessions: IntGaugeVec,
    /// `activator_sandboxes{state}`: starting | warm | bound | paused | stopping (at scrape).
    pub sandboxes: IntGaugeVec,
    /// `activator_queued_requests`: requests held while their session activates.
    pub queued_requests: IntGauge,
    /// `activator_admission_wait_seconds`: time a new session waited for capacity.
    pub admission_wait: Histogram,
    /// `activator_waiting_sessions`: new sessions currently waiting for capacity.
    pub waiting_sessions: IntGauge,
    /// `activator_activations_total{kind,result}`: claim | create | resume x ok | error | timeout.
    pub activations_total: IntCounterVec,
    /// `activator_customized_claims_total{cold}`: successful claims that carried a
    /// customisation; `cold="true"` when it forced a new sandbox (`kind="create"`).
    pub customized_claims_total: IntCounterVec,
    /// `activator_activation_duration_seconds{kind}`: start of claim/resume to ready.
    pub activation_duration: HistogramVec,
    /// `activator_request_held_seconds{waited_for}`: how long a request was held before it
    /// was forwarded (or refused for capacity), by what it waited for: warm_claim |
    /// cold_create | resume_frozen | resume_suspended | queued_no_capacity.
    pub request_held: HistogramVec,
    /// `activator_pauses_total{result}`: idle or admin pauses.
    pub pauses_total: IntCounterVec,
    /// `activator_deep_pauses_total{result}`: the deep idle tier (`idle.deep_after`).
    pub deep_pauses_total: IntCounterVec,
    /// `activator_preview_requests_total{result}`: requests on preview hosts: `forwarded`,
    /// `exchanged` (token -> cookie redirect), or the refusal's error code.
    pub preview_requests_total: IntCounterVec,
    /// `activator_hook_calls_total{hook,result}`: pause/resume hooks (`before_pause`,
    /// `after_resume`) by result: ok | status | error | timeout.
    pub hook_calls_total: IntCounterVec,
    /// `activator_releases_total{reason}`: idle | ttl | admin | lost | shutdown.
    pub releases_total: IntCounterVec,
    /// `activator_sessions_lost_total`: sessions whose sandbox died.
    pub sessions_lost_total: IntCounter,
    /// `activator_sandbox_oom_kills_total`: processes the kernel OOM-killed inside process
    /// sandboxes at `backend.memory_max`.
    pub sandbox_oom_kills_total: IntCounter,
    /// `activator_warm_pool_ready`: ready, unassigned sandboxes.
    pub warm_pool_ready: IntGauge,
    /// `activator_upstream_errors_total{kind}`: connect | reset | protocol | timeout.
    pub upstream_errors_total: IntCounterVec,
    /// `activator_stable_concurrency`: time-weighted average in-flight over the stable window.
    pub stable_concurrency: Gauge,
    /// `activator_panic_concurrency`: the same over the panic window.
    pub panic_concurrency: Gauge,
    /// `activator_stable_rps`: requests per second over the stable window.
    pub stable_rps: Gauge,
    /// `activator_panic_rps`: requests per second over the panic window.
    pub panic_rps: Gauge,
    /// `activator_active_sessions`: bound sessions with traffic in flight or inside their
    /// idle window.
    pub active_sessions: IntGauge,
    /// `activator_desired_sandboxes`: the autoscaler's latest decision.
    pub desired_sandboxes: IntGauge,
    /// `activator_panic_mode`: 1 while the autoscaler is in panic mode.
    pub panic_mode: IntGauge,
    /// `activator_warm_pool_target`: the warm-pool size the decision translates to
    /// (desired minus sandboxes bound to sessions); what HPA/KEDA set when `apply: false`.
    pub warm_pool_target: IntGauge,
    /// `activator_autoscaler_leader`: 1 on the replica that makes decisions.
    pub autoscaler_leader: IntGauge,
    /// `activator_schedule_runs_total{result}`: ok | error | skipped.
    pub schedule_runs_total: IntCounterVec,
    /// `activator_events_total{kind}`: transitions published on the event stream.
    pub events_total: IntCounterVec,
    /// `activator_event_subscribers`: open `GET /api/events` streams.
    pub event_subscribers: IntGauge,
    /// `activator_event_subscribers_dropped_total{reason}`: streams cut for being too
    /// slow (`lagged`: fell a whole ring behind; `stalled`: took no data for
    /// `telemetry.events.stall_timeout`).
    pub event_subscribers_dropped: IntCounterVec,
    /// Trace IDs attached to `activator_activation_duration_seconds` buckets in the
    /// OpenMetrics exposition.
    pub activation_exemplars: std::sync::Arc<ActivationExemplars>,
    /// `activator_client_connections`: client connections open now (upgraded ones too).
    pub client_connections: IntGauge,
    /// `activator_client_connections_refused_total`: closed at accept by `proxy.max_connections`.
    pub client_connections_refused_total: IntCounter,
    /// `activator_client_connections_closed_total{reason}`: closed by the activator:
    /// header_timeout | idle_timeout | tunnel_idle_timeout | tls_handshake.
    pub client_connections_closed_total: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let m = Metrics::with_registry(Registry::new());
        m.register_all();
        m
    }

    /// One pool's metrics: every series carries `pool="{name}"`. Its registry holds the
    /// families a pool writes ([`Metrics::pool_collectors`]) and any a caller registers
    /// with [`Metrics::register`]. Attach it to the server-wide registry with
    /// [`Metrics::attach_pool`].
    pub fn for_pool(name: &str) -> Metrics {
        let labels = std::collections::HashMap::from([("pool".to_owned(), name.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("valid const label");
        let m = Metrics::with_registry(registry);
        m.register_each(m.pool_collectors());
        m
    }

    /// Makes every family `pool`'s registry has part of this registry's exposition, with
    /// its `pool` label (and this registry's own copies of the pool families leave it: the
    /// pools own them).
    pub fn attach_pool(&self, pool: &Metrics) {
        self.pools.write_recovered().push(pool.registry.clone());
    }

    /// Registers one more family in this registry; in a pool's, it is exported with the
    /// pool's label like every other family there. Fails on a name already registered.
    pub fn register(&self, family: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(family)
    }

    fn with_registry(registry: Registry) -> Metrics {
        Metrics {
            pools: std::sync::RwLock::default(),
            requests_total: IntCounterVec::new(
                Opts::new(
                    "activator_requests_total",
                    "Requests by response status code.",
                ),
                &["code"],
            )
            .expect("valid metric"),
            request_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "activator_request_duration_seconds",
                    "Time from request arrival to the end of the response body.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            requests_in_flight: IntGauge::new(
                "activator_requests_in_flight",
                "Requests whose response body has not ended yet.",
            )
            .expect("valid metric"),
            websockets_open: IntGauge::new(
                "activator_websockets_open",
                "Upgraded (WebSocket) connections being relayed.",
            )
            .expect("valid metric"),
            sessions: IntGaugeVec::new(
                Opts::new("activator_sessions", "Sessions in the table by state."),
                &["state"],
            )
            .expect("valid metric"),
            sandboxes: IntGaugeVec::new(
                Opts::new("activator_sandboxes", "Sandboxes by state."),
                &["state"],
            )
            .expect("valid metric"),
            queued_requests: IntGauge::new(
                "activator_queued_requests",
                "Requests held while their session's sandbox is claimed or resumed.",
            )
            .expect("valid metric"),
            admission_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "activator_admission_wait_seconds",
                    "Time a new session waited for sandbox capacity.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            waiting_sessions: IntGauge::new(
                "activator_waiting_sessions",
                "New sessions waiting for sandbox capacity.",
            )
            .expect("valid metric"),
            activations_total: IntCounterVec::new(
                Opts::new(
                    "activator_activations_total",
                    "Sandbox claims, creations and resumes by result.",
                ),
                &["kind", "result"],
            )
            .expect("valid metric"),
            customized_claims_total: IntCounterVec::new(
                Opts::new(
                    "activator_customized_claims_total",
                    "Successful claims carrying a claim-time customisation, by whether it \
                     forced a cold start.",
                ),
                &["cold"],
            )
            .expect("valid metric"),
            activation_duration: HistogramVec::new(
                HistogramOpts::new(
                    "activator_activation_duration_seconds",
                    "Time from starting a claim, creation or resume to a ready sandbox.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["kind"],
            )
            .expect("valid metric"),
            request_held: HistogramVec::new(
                HistogramOpts::new(
                    "activator_request_held_seconds",
                    "Time a request was held before it was forwarded, by what it waited for.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["waited_for"],
            )
            .expect("valid metric"),
            pauses_total: IntCounterVec::new(
                Opts::new("activator_pauses_total", "Sandbox pauses by result."),
                &["result"],
            )
            .expect("valid metric"),
            preview_requests_total: IntCounterVec::new(
                Opts::new(
                    "activator_preview_requests_total",
                    "Requests on preview hosts by result (forwarded, exchanged, or the refusal's code).",
                ),
                &["result"],
            )
            .expect("valid metric"),
            hook_calls_total: IntCounterVec::new(
                Opts::new(
                    "activator_hook_calls_total",
                    "Pause/resume hook calls into sandboxes by hook and result.",
                ),
                &["hook", "result"],
            )
            .expect("valid metric"),
            deep_pauses_total: IntCounterVec::new(
                Opts::new(
                    "activator_deep_pauses_total",
                    "Deep idle tier runs (idle.deep_after) by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
            releases_total: IntCounterVec::new(
                Opts::new("activator_releases_total", "Session releases by reason."),
                &["reason"],
            )
            .expect("valid metric"),
            sessions_lost_total: IntCounter::new(
                "activator_sessions_lost_total",
                "Sessions whose pinned sandbox died.",
            )
            .expect("valid metric"),
            sandbox_oom_kills_total: IntCounter::new(
                "activator_sandbox_oom_kills_total",
                "Processes OOM-killed inside process sandboxes at backend.memory_max.",
            )
            .expect("valid metric"),
            warm_pool_ready: IntGauge::new(
                "activator_warm_pool_ready",
                "Ready, unassigned sandboxes in the warm pool.",
            )
            .expect("valid metric"),
            upstream_errors_total: IntCounterVec::new(
                Opts::new(
                    "activator_upstream_errors_total",
                    "Failures talking to sandboxes by kind.",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            stable_concurrency: Gauge::new(
                "activator_stable_concurrency",
                "Time-weighted average concurrency over the stable window.",
            )
            .expect("valid metric"),
            panic_concurrency: Gauge::new(
                "activator_panic_concurrency",
                "Time-weighted average concurrency over the panic window.",
            )
            .expect("valid metric"),
            stable_rps: Gauge::new(
                "activator_stable_rps",
                "Requests per second over the stable window.",
            )
            .expect("valid metric"),
            panic_rps: Gauge::new(
                "activator_panic_rps",
                "Requests per second over the panic window.",
            )
            .expect("valid metric"),
            active_sessions: IntGauge::new(
                "activator_active_sessions",
                "Bound sessions with a request in flight or inside their idle window.",
            )
            .expect("valid metric"),
            desired_sandboxes: IntGauge::new(
                "activator_desired_sandboxes",
                "Sandboxes the autoscaler wants.",
            )
            .expect("valid metric"),
            panic_mode: IntGauge::new(
                "activator_panic_mode",
                "1 while the autoscaler is in panic mode.",
            )
            .expect("valid metric"),
            warm_pool_target: IntGauge::new(
                "activator_warm_pool_target",
                "Warm-pool size the autoscaler's decision translates to.",
            )
            .expect("valid metric"),
            autoscaler_leader: IntGauge::new(
                "activator_autoscaler_leader",
                "1 on the replica whose autoscaler decides.",
            )
            .expect("valid metric"),
            schedule_runs_total: IntCounterVec::new(
                Opts::new(
                    "activator_schedule_runs_total",
                    "Scheduled wake-up requests by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
            events_total: IntCounterVec::new(
                Opts::new(
                    "activator_events_total",
                    "Session and sandbox transitions published on the event stream.",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            event_subscribers: IntGauge::new(
                "activator_event_subscribers",
                "Open GET /api/events streams.",
            )
            .expect("valid metric"),
            event_subscribers_dropped: IntCounterVec::new(
                Opts::new(
                    "activator_event_subscribers_dropped_total",
                    "Event streams disconnected for not keeping up.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            activation_exemplars: std::sync::Arc::default(),
            client_connections: IntGauge::new(
                "activator_client_connections",
                "Client connections open now, upgraded (WebSocket) ones included.",
            )
            .expect("valid metric"),
            client_connections_refused_total: IntCounter::new(
                "activator_client_connections_refused_total",
                "Client connections closed at accept because proxy.max_connections were open.",
            )
            .expect("valid metric"),
            client_connections_closed_total: IntCounterVec::new(
                Opts::new(
                    "activator_client_connections_closed_total",
                    "Client connections the activator closed, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            registry,
        }
    }

    /// The server-wide registry: every family.
    fn register_all(&self) {
        self.register_each(self.server_collectors());
        self.register_each(self.pool_collectors());
    }

    fn register_each(&self, collectors: Vec<Box<dyn prometheus::core::Collector>>) {
        for c in collectors {
            self.registry.register(c).expect("metric registered once");
        }
    }

    /// Families the proxy, the connections, schedules and event subscribers write: counted
    /// before a request's pool is known, so never per pool.
    fn server_collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.requests_total.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.requests_in_flight.clone()),
            Box::new(self.websockets_open.clone()),
            Box::new(self.upstream_errors_total.clone()),
            Box::new(self.schedule_runs_total.clone()),
            Box::new(self.event_subscribers.clone()),
            Box::new(self.event_subscribers_dropped.clone()),
            Box::new(self.client_connections.clone()),
            Box::new(self.client_connections_refused_total.clone()),
            Box::new(self.client_connections_closed_total.clone()),
        ]
    }

    /// Families a pool's activator, backend, stats sampler and autoscaler write: with
    /// `pools:` each pool's registry has them, with the `pool` label.
    fn pool_collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.sessions.clone()),
            Box::new(self.sandboxes.clone()),
            Box::new(self.queued_requests.clone()),
            Box::new(self.admission_wait.clone()),
            Box::new(self.waiting_sessions.clone()),
            Box::new(self.activations_total.clone()),
            Box::new(self.activation_duration.clone()),
            Box::new(self.customized_claims_total.clone()),
            Box::new(self.request_held.clone()),
            Box::new(self.pauses_total.clone()),
            Box::new(self.deep_pauses_total.clone()),
            Box::new(self.preview_requests_total.clone()),
            Box::new(self.hook_calls_total.clone()),
            Box::new(self.releases_total.clone()),
            Box::new(self.sessions_lost_total.clone()),
            Box::new(self.sandbox_oom_kills_total.clone()),
            Box::new(self.warm_pool_ready.clone()),
            Box::new(self.stable_concurrency.clone()),
            Box::new(self.panic_concurrency.clone()),
            Box::new(self.stable_rps.clone()),
            Box::new(self.panic_rps.clone()),
            Box::new(self.active_sessions.clone()),
            Box::new(self.desired_sandboxes.clone()),
            Box::new(self.panic_mode.clone()),
            Box::new(self.warm_pool_target.clone()),
            Box::new(self.autoscaler_leader.clone()),
            Box::new(self.events_total.clone()),
        ]
    }

    /// The OpenMetrics 1.0 exposition, with activation-latency exemplars.
    pub fn encode_openmetrics(&self) -> String {
        openmetrics::to_openmetrics(&self.encode(), &self.activation_exemplars)
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Metrics {
    /// This registry's families, with every family of the pools' registries merged in by
    /// name (the pools own those: this registry's copies leave the exposition).
    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let pools = self.pools.read_recovered();
        if pools.is_empty() {
            return self.registry.gather();
        }
        let from_pools: Vec<_> = pools.iter().flat_map(Registry::gather).collect();
        // A pool family nobody wrote yet has no series (so no gathered family): its
        // server-wide copy leaves too, by the pools' collectors' names.
        let mut owned: std::collections::HashSet<String> = self
            .pool_collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect();
        owned.extend(from_pools.iter().map(|f| f.name().to_owned()));
        let mut families: Vec<_> = self
            .registry
            .gather()
            .into_iter()
            .filter(|f| !owned.contains(f.name()))
            .collect();
        for mut family in from_pools {
            match families.iter_mut().find(|f| f.name() == family.name()) {
                Some(f) => f.mut_metric().append(family.mut_metric()),
                None => families.push(family),
            }
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
