//! Short runs of every mode against real processes (demo sandboxes, the activator), with
//! small counts: they assert correctness (zero errors, sessions pinned), never speed.

#[path = "support/processes.rs"]
mod support;

use serde_json::Value;

use support::{DemoSandbox, run_direct, run_loadtest, section};

/// A short `hot` run: 4 connections, 2 rounds of 0.5 s per phase.
const SMALL_HOT: [&str; 8] = [
    "--connections",
    "4",
    "--duration",
    "1s",
    "--rounds",
    "2",
    "--warmup",
    "100ms",
];

#[test]
fn hot_pins_every_session_on_two_direct_targets() {
    let a = DemoSandbox::start();
    let b = DemoSandbox::start();
    let (a_target, b_target) = (format!("a={}", a.url()), format!("b={}", b.url()));
    let a_pid = format!("a={}", a.pid());
    let mut args = vec!["hot", "--target", &a_target, "--target", &b_target];
    args.extend(["--sessions", "8", "--pid", &a_pid]);
    args.extend(SMALL_HOT);
    let (code, report, out) = run_loadtest(&args);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["passed"], Value::Bool(true), "{out}");
    for t in ["a", "b"] {
        for s in ["establish", "closed", "open", "verify"] {
            let sec = section(&report, t, s);
            assert_eq!(sec["errors"], 0, "{t} {s}: {out}");
            assert_eq!(sec["violations"], 0, "{t} {s}: {out}");
            assert!(sec["ok"].as_u64().unwrap() > 0, "{t} {s}: {out}");
        }
        assert_eq!(section(&report, t, "verify")["ok"], 8, "{out}");
    }
    assert!(
        section(&report, "a", "closed")["requests_per_cpu_second"].is_number(),
        "CPU is charged to a target with --pid: {out}"
    );
    let ratio = &section(&report, "b", "closed")["vs_baseline"]["throughput"];
    assert!(ratio.as_f64().unwrap() > 0.0, "{out}");
    // Each direct sandbox saw all eight sessions: the hot path really went there.
    assert_eq!(a.state()["sessions_seen"].as_array().unwrap().len(), 8);
}

#[test]
fn agents_turns_streams_and_idle_return_on_a_direct_sandbox() {
    let sandbox = DemoSandbox::start();
    let scenario = support::temp_file(
        "agents.yaml",
        "seed: 3\nagents:\n  sessions: 3\n  arrival_rate: 20\n  turns: 6\n  think_min: 10ms\n  \
         think_max: 30ms\n  sse_fraction: 0.4\n  ws_fraction: 0.4\n  sse_events: 3\n  \
         sse_interval_ms: 5\n  idle_fraction: 1.0\n  idle_time: 300ms\n  return_turns: 2\n  \
         exclusive: false\n  duration: 30s\n",
    );
    let (code, report, out) = run_direct(
        "agents",
        &sandbox.url(),
        &["--scenario", scenario.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["passed"], Value::Bool(true), "{out}");
    assert_eq!(section(&report, "direct", "cold_claim")["ok"], 3, "{out}");
    assert_eq!(section(&report, "direct", "resume")["ok"], 3, "{out}");
    for s in ["turn", "sse", "ws"] {
        assert!(
            section(&report, "direct", s)["ok"].as_u64().unwrap() > 0,
            "{s}: {out}"
        );
    }
    let counts = &section(&report, "direct", "cold_claim")["counts"];
    assert_eq!(counts["sessions_completed"], 3, "{out}");
    assert_eq!(counts["sessions_idled"], 3, "{out}");
}

#[test]
fn agents_exclusive_session_keeps_its_counter_on_a_fresh_sandbox() {
    let sandbox = DemoSandbox::start();
    let (code, report, out) = run_direct(
        "agents",
        &sandbox.url(),
        &[
            "--sessions",
            "1",
            "--turns",
            "3",
            "--idle-time",
            "200ms",
            "--idle-fraction",
            "1",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(section(&report, "direct", "resume")["ok"], 1, "{out}");
    let state = sandbox.state();
    assert_eq!(state["sessions_seen"].as_array().unwrap().len(), 1);
}

#[test]
fn storm_serves_every_session() {
    let sandbox = DemoSandbox::start();
    let (code, report, out) =
        run_direct("storm", &sandbox.url(), &["--sessions", "25", "--shared"]);
    assert_eq!(code, 0, "{out}");
    let claim = section(&report, "direct", "claim");
    assert_eq!(claim["ok"], 25, "{out}");
    assert_eq!(claim["errors"], 0, "{out}");
    assert_eq!(section(&report, "direct", "follow_up")["ok"], 25, "{out}");
}

#[test]
fn storm_exclusive_flags_shared_sandboxes() {
    // Without an activator every session lands on the one sandbox: the exclusivity check
    // must catch it and fail the run.
    let sandbox = DemoSandbox::start();
    let (code, report, out) = run_direct("storm", &sandbox.url(), &["--sessions", "5"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(report["passed"], Value::Bool(false), "{out}");
    assert!(
        section(&report, "direct", "claim")["violations"]
            .as_u64()
            .unwrap()
            > 0,
        "{out}"
    );
}

#[test]
fn refuses_a_target_off_loopback() {
    let (code, out) = support::run_raw(&["hot", "--target", "x=http://10.1.2.3:80"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a loopback address"), "{out}");
}

/// The static backend over two demo sandboxes, shared by up to `per_sandbox` sessions.
fn static_activator(sandboxes: &[&DemoSandbox], per_sandbox: u32) -> support::Activator {
    let endpoints: String = sandboxes
        .iter()
        .map(|s| format!("    - {}\n", s.addr()))
        .collect();
    support::Activator::start(&format!(
        "session:\n  max_sessions_per_sandbox: {per_sandbox}\n\
         idle:\n  timeout: 1h\n  policy: keep\nbackend:\n  kind: static\n  endpoints:\n{endpoints}"
    ))
}

#[test]
fn hot_through_the_activator_keeps_sessions_on_their_sandbox() {
    let a = DemoSandbox::start();
    let b = DemoSandbox::start();
    let act = static_activator(&[&a, &b], 100);
    let (code, report, out) = run_loadtest(
        &[
            "hot",
            "--target",
            &format!("direct={}", a.url()),
            "--target",
            &format!("activator={}", act.url()),
            "--admin",
            &act.admin_url(),
            "--activator-pid",
            &act.pid().to_string(),
            "--sessions",
            "16",
            "--sample-interval",
            "100ms",
        ]
        .into_iter()
        .chain(SMALL_HOT)
        .collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{out}");
    for s in ["establish", "closed", "open", "verify"] {
        let sec = section(&report, "activator", s);
        assert_eq!(sec["errors"], 0, "{s}: {out}");
        assert_eq!(sec["violations"], 0, "{s}: {out}");
    }
    assert!(
        section(&report, "activator", "closed")["requests_per_cpu_second"].is_number(),
        "{out}"
    );
    // The admin API was polled: the timeline shows both sandboxes bound.
    let timeline = report["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|s| s["sandboxes"]["bound"] == 2),
        "{out}"
    );
    assert!(report["admin_error"].is_null(), "{out}");
    // Sixteen sessions spread over the two sandboxes, each seen by exactly one of them
    // (the direct target also sent all sixteen to `a`, so count on `b`).
    let on_b = b.state()["sessions_seen"].as_array().unwrap().len();
    assert!(on_b > 0 && on_b < 16, "{on_b}");
}

#[test]
fn storm_through_the_activator_gives_each_session_its_own_sandbox() {
    let sandboxes: Vec<DemoSandbox> = (0..3).map(|_| DemoSandbox::start()).collect();
    let act = static_activator(&sandboxes.iter().collect::<Vec<_>>(), 1);
    let (code, report, out) = support::run_direct("storm", &act.url(), &["--sessions", "3"]);
    assert_eq!(code, 0, "{out}");
    let claim = section(&report, "direct", "claim");
    assert_eq!(claim["ok"], 3, "{out}");
    assert_eq!(claim["counts"]["sandboxes"], 3, "{out}");
    assert_eq!(claim["counts"]["activation_claim"], 3, "{out}");
}

/// The process backend: one demo-sandbox process per session from a warm pool of 2;
/// sessions idle for 1 s are frozen and resume on their next request.
fn process_activator(max_sandboxes: u32) -> support::Activator {
    let bin = support::activator_bin();
    // Its own work directory: a process activator sweeps sandboxes left under its root,
    // and tests run in parallel.
    let workdir = support::temp_file("sandboxes/.keep", "");
    let workdir = workdir.parent().unwrap();
    support::Activator::start(&format!(
        "idle:\n  timeout: 1s\n  policy: pause\n  sweep_interval: 100ms\n\
         activation:\n  timeout: 20s\nsession:\n  admission_timeout: 20s\n\
         backend:\n  kind: process\n  command: [\"{}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  \
         ready_path: /healthz\n  warm_pool: 2\n  max_sandboxes: {max_sandboxes}\n  stop_grace: 1s\n  \
         workdir_root: {}\n",
        bin.display(),
        workdir.display()
    ))
}

#[test]
fn agents_through_the_activator_resume_frozen_sandboxes_with_their_state() {
    let act = process_activator(10);
    let scenario = support::temp_file(
        "agents.yaml",
        "seed: 5\nsample_interval: 100ms\nagents:\n  sessions: 3\n  arrival_rate: 10\n  turns: 3\n  \
         think_min: 10ms\n  think_max: 50ms\n  sse_fraction: 0.3\n  ws_fraction: 0.3\n  \
         sse_events: 3\n  sse_interval_ms: 5\n  idle_fraction: 1.0\n  idle_time: 3s\n  \
         return_turns: 1\n  exclusive: true\n  duration: 60s\n",
    );
    let (code, report, out) = run_loadtest(&[
        "agents",
        "--scenario",
        scenario.to_str().unwrap(),
        "--target",
        &format!("activator={}", act.url()),
        "--admin",
        &act.admin_url(),
        "--activator-pid",
        &act.pid().to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["passed"], Value::Bool(true), "{out}");
    assert_eq!(
        section(&report, "activator", "cold_claim")["ok"],
        3,
        "{out}"
    );
    assert_eq!(section(&report, "activator", "resume")["ok"], 3, "{out}");
    let counts = &section(&report, "activator", "cold_claim")["counts"];
    assert_eq!(counts["sessions_completed"], 3, "{out}");
    assert_eq!(
        counts["sessions_resumed"], 3,
        "every idle session came back to a frozen sandbox: {out}"
    );
    assert!(
        section(&report, "activator", "buffered")["ok"]
            .as_u64()
            .unwrap()
            >= 6,
        "{out}"
    );
    let timeline = report["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|s| s["sandboxes"]["paused"] == 3),
        "the timeline shows the three sandboxes frozen: {out}"
    );
}

#[test]
fn storm_through_the_activator_outgrows_the_warm_pool_without_errors() {
    let act = process_activator(12);
    let (code, report, out) = support::run_direct("storm", &act.url(), &["--sessions", "8"]);
    assert_eq!(code, 0, "{out}");
    let claim = section(&report, "direct", "claim");
    assert_eq!(claim["ok"], 8, "{out}");
    assert_eq!(claim["errors"], 0, "{out}");
    assert_eq!(
        claim["counts"]["sandboxes"], 8,
        "one sandbox per session: {out}"
    );
    assert_eq!(section(&report, "direct", "follow_up")["ok"], 8, "{out}");
}
