//! The node agent's Prometheus metrics, served on `node_agent.metrics_listen`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Latency buckets from 100 us to 5 s: a cgroup v2 freeze of an idle pod takes well under a
/// millisecond, a busy v1 pod can take seconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Every node-agent metric.
pub struct AgentMetrics {
    registry: Registry,
    /// Pods this agent froze and has not thawed.
    pub frozen_pods: IntGauge,
    /// Memory held by those pods, refreshed at each scrape.
    pub frozen_bytes: IntGauge,
    /// From the freeze request to the kernel reporting the pod frozen.
    pub freeze_seconds: Histogram,
    /// From the thaw request to the kernel reporting the pod running.
    pub thaw_seconds: Histogram,
    /// API requests by operation and outcome (`ok` or the error code).
    pub requests: IntCounterVec,
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let registry = Registry::new();
        let m = AgentMetrics {
            registry,
            frozen_pods: IntGauge::new(
                "node_agent_frozen_pods",
                "Pods frozen by this node agent and not thawed since.",
            )
            .expect("valid metric"),
            frozen_bytes: IntGauge::new(
                "node_agent_frozen_bytes",
                "Memory held by pods frozen by this node agent, in bytes.",
            )
            .expect("valid metric"),
            freeze_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "node_agent_freeze_seconds",
                    "Time from a freeze request to the kernel reporting the pod frozen.",
                )
                .buckets(BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            thaw_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "node_agent_thaw_seconds",
                    "Time from a thaw request to the kernel reporting the pod running.",
                )
                .buckets(BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            requests: IntCounterVec::new(
                Opts::new(
                    "node_agent_requests_total",
                    "Node agent API requests by operation and outcome.",
                ),
                &["operation", "outcome"],
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.frozen_pods.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.frozen_bytes.clone()),
            Box::new(m.freeze_seconds.clone()),
            Box::new(m.thaw_seconds.clone()),
            Box::new(m.requests.clone()),
        ] {
            m.registry.register(c).expect("metric registered once");
        }
        m
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}
