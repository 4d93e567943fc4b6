//! agent-activator: a session-aware L7 activator proxy for AI-agent sandboxes.
//!
//! # Layout
//!
//! The modules stand on floors and import only downward (docs/architecture.md, "Module map";
//! `tests/it/layers.rs` holds them there).
//!
//! - [`config`]: the YAML configuration, defaults and validation.
//! - [`loader`]: reads configuration files: native YAML, Knative manifests, several as pools.
//! - [`sandbox`], [`cidr`], [`error_body`]: small shared types on the ground floor (a
//!   sandbox's name, a network as operators write it, the JSON error body).
//! - [`session`]: session keys (validation, hashing) and their extraction from requests.
//! - [`activation`]: the session table; single-flight claim/resume, the bounded wait queue,
//!   idle pause/release.
//! - [`pool`]: one activator, backend, stats and autoscaler per kind of sandbox, and the
//!   router that binds a session to its pool.
//! - [`backend`]: the `SandboxBackend` trait and its implementations (static endpoints,
//!   local processes, Kubernetes).
//! - [`customize`]: claim-time customisation: allowlisted headers of a new session become
//!   its sandbox's env, volumes, sidecars and labels (`ClaimSpec`).
//! - [`preview`]: preview URLs for a sandbox's own ports (minted IDs, tokens, cookies).
//! - [`proxy`]: the listener, forwarding, WebSocket relay, and the one place errors become
//!   responses.
//! - [`admin`]: metrics, health and the session/sandbox API on a separate listener.
//! - [`metrics`]: every Prometheus metric.
//! - [`events`]: the transition event stream (bounded ring, non-blocking fan-out).
//! - [`stats`]: traffic counters and windows that feed the autoscaler.
//! - [`autoscaler`]: the scaling decision (Knative KPA semantics) and its loop.
//! - [`cluster`]: this replica among the others: its one identity, the one kube client,
//!   leader election, and where schedule ticks are recorded.
//! - [`knative`]: a Knative Service manifest (annotations, container) as the configuration.
//! - [`schedule`]: cron-scheduled wake-up requests, each tick fired once.
//! - [`shutdown`]: signal handling and graceful drain.
//! - [`server`]: wires everything into a running server (`server::start`).
//! - [`logging`]: tracing setup and the access log.
//! - [`lock`]: the one lock-poisoning policy (a poisoned std lock is recovered).
//! - [`telemetry`]: OpenTelemetry spans, W3C trace context, OTLP export.
//! - `testing` (feature `test-util`): the test kit, one scripted `SandboxBackend`.
//! - [`demo`]: the stateful demo sandbox (`agent-activator demo-sandbox`).
//! - [`node_agent`]: the node agent (`agent-activator node-agent`) that freezes sandbox
//!   pods' cgroups in place on Kubernetes nodes.

// Outside tests nothing unwraps: a failure is an error value (or a documented `expect` on an
// invariant). Tests unwrap freely. (The workspace-wide lints live in Cargo.toml `[lints]`.)
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod activation;
pub mod admin;
pub mod autoscaler;
pub mod backend;
pub mod cidr;
pub mod cluster;
pub mod config;
pub mod customize;
pub mod demo;
pub mod error_body;
pub mod events;
pub mod knative;
pub mod loader;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod node_agent;
pub mod pool;
pub mod preview;
pub mod proxy;
pub mod sandbox;
pub mod schedule;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
