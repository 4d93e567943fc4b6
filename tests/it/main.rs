//! The integration tests, one crate: each former `tests/<topic>.rs` is a module here, so the
//! suite links agent-activator into one test binary instead of one per file (issue 11: build
//! time on 2 cores; docs/benchmarks.md has the measurement). Filter by module path:
//! `cargo test --test it kubernetes_freeze::`.
//!
//! All tests run as threads of this one process, in parallel: a test must not change
//! process-wide state (environment, current directory, signal dispositions, a global
//! subscriber); scratch paths carry a test-specific name as well as the process ID.

mod support;
// Also included by benches/ (`#[path]`) under these names at their crate root, where
// `freeze_rig` finds the others as `crate::cgroup_tree`, `crate::kube_support` and
// `crate::node_agent_process`.
#[path = "support/cgroup_tree.rs"]
mod cgroup_tree;
#[path = "support/freeze_rig.rs"]
mod freeze_rig;
#[path = "support/kube.rs"]
mod kube_support;
#[path = "support/node_agent_process.rs"]
mod node_agent_process;

mod access_log_request_id;
mod activation;
mod activation_paths;
mod admin_pagination;
mod cli_check;
mod dashboard;
mod dashboard_scaler;
mod deep_idle;
mod demo_sandbox;
mod deploy_examples;
mod deploy_manifests;
mod deploy_render;
mod documented_behaviours;
mod drain;
mod drain_streams;
mod edge_rules;
mod events;
mod hooks;
mod isolation_escape;
mod isolation_limits;
mod isolation_network;
mod knative_examples;
mod kubernetes_backend;
mod kubernetes_claim_cap;
mod kubernetes_claims;
mod kubernetes_customize;
mod kubernetes_freeze;
mod kubernetes_openkruise_claims;
mod kubernetes_outage;
mod kubernetes_proxy;
mod kubernetes_rbac;
mod kubernetes_rejections;
mod kubernetes_release;
mod kubernetes_stale_claims;
mod kubernetes_testbed;
mod kubernetes_testbed_controller;
mod layers;
mod leader_election;
mod node_agent;
mod pool_metrics;
mod pool_views;
mod pools;
mod pools_kubernetes;
mod preview;
mod preview_browser;
mod preview_deploy;
mod preview_process;
mod process_backend;
mod process_customize;
mod process_full_path;
mod process_isolation;
mod process_limits;
mod process_orphans;
mod promtool;
mod proxy_affinity;
mod proxy_protocols;
mod proxy_sessions;
mod scaling;
mod security_connections;
mod security_requests;
mod security_sessions;
mod session_props;
mod tracing;
mod upstream_h1;
