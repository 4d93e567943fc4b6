//! The process backend with real child processes (the demo sandbox): pool, capacity,
//! freezing, crash detection, group kill, and no orphans.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agent_activator::backend::process::{FreezerMode, ProcessBackend};
use agent_activator::backend::{
    ActivationKind, BackendError, BackendEvent, ClaimBudget, SandboxBackend, SandboxId,
    SandboxState,
};
use agent_activator::config::Config;
use agent_activator::metrics::Metrics;
use agent_activator::session::SessionKey;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::support;

use support::procs::{alive, cpu_ticks, eventually, group_members, proc_state};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// A fresh directory for one test's sandboxes.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "aa-test-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8) & 0xffff_ffff
}

/// A process config running the demo sandbox (ticking every 10 ms) with `extra` YAML.
/// These tests examine the process tree itself (group members, pids, CPU ticks), so they
/// run unisolated; tests/it/process_isolation.rs covers the same lifecycle under bubblewrap.
fn config(workdir: &std::path::Path, extra: &str) -> Config {
    let yaml = format!(
        "backend:\n  kind: process\n  command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\", \"--tick-ms\", \"10\"]\n  workdir_root: \"{}\"\n  stop_grace: 2s\n  isolation: none\n{extra}",
        workdir.display()
    );
    Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// Like [`config`], but the sandbox also starts a CPU-burning grandchild in its group
/// (`sh` execs the demo, so the demo stays the group leader). The burner runs at nice 10 so
/// it does not starve the timing-sensitive tests that share the machine's two cores; the
/// assertions wait (bounded) for its CPU time to move instead of assuming a fixed rate.
fn config_with_busy_child(workdir: &std::path::Path, extra: &str) -> Config {
    let yaml = format!(
        "backend:\n  kind: process\n  command: [\"sh\", \"-c\", \"nice -n 10 sh -c 'while :; do :; done' & exec \\\"$0\\\" demo-sandbox --port \\\"$1\\\" --tick-ms 10\", \"{BIN}\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  stop_grace: 2s\n  isolation: none\n{extra}",
        workdir.display()
    );
    Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

async fn backend(cfg: &Config) -> Arc<ProcessBackend> {
    Arc::new(
        ProcessBackend::new(cfg, Arc::new(Metrics::new()))
            .await
            .unwrap(),
    )
}

/// Shuts the backend down and removes the test directory, which must be empty by then:
/// every sandbox's workdir and the instance directory are gone.
async fn finish(b: &ProcessBackend, dir: &std::path::Path) {
    b.shutdown().await;
    std::fs::remove_dir(dir).unwrap_or_else(|e| panic!("{} not clean: {e}", dir.display()));
}

fn key(s: &str) -> SessionKey {
    SessionKey::parse(s, 128).unwrap()
}

fn budget(admission: Duration) -> ClaimBudget {
    let now = Instant::now();
    ClaimBudget {
        admission_deadline: now + admission,
        deadline: now + admission + Duration::from_secs(20),
    }
}

/// The v2 (`0::`) or v1 freezer cgroup of `pid`, as a path under the mount.
fn cgroup_dir(pid: u32, mode: FreezerMode) -> PathBuf {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (prefix, mount) = match mode {
        FreezerMode::CgroupV2 => ("0::", mount_of("cgroup2", None)),
        _ => ("", mount_of("cgroup", Some("freezer"))),
    };
    let path = own
        .lines()
        .find_map(|l| match mode {
            FreezerMode::CgroupV2 => l.strip_prefix(prefix).map(str::to_owned),
            _ => l.split_once(":freezer:").map(|(_, p)| p.to_owned()),
        })
        .unwrap();
    PathBuf::from(mount).join(path.trim_start_matches('/'))
}

fn mount_of(fstype: &str, option: Option<&str>) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let post: Vec<&str> = post.split(' ').collect();
            let ok = post[0] == fstype && option.is_none_or(|o| post[2].split(',').any(|x| x == o));
            ok.then(|| pre.split(' ').nth(4).unwrap().to_owned())
        })
        .unwrap()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(c: &HttpClient, method: &str, url: String, session: &str) -> serde_json::Value {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("x-session-id", session)
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("sandbox answers in time")
        .expect("request");
    assert!(resp.status().is_success(), "status {}", resp.status());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn row_pid(b: &ProcessBackend, id: &SandboxId) -> u32 {
    b.sandboxes()
        .into_iter()
        .find(|r| &r.id == id)
        .unwrap()
        .pid
        .unwrap()
}

fn count(b: &ProcessBackend, state: SandboxState) -> usize {
    b.sandboxes().iter().filter(|r| r.state == state).count()
}

/// Waits (at most 10 s) until `pid` has used at least two more clock ticks of CPU.
async fn cpu_moves(pid: u32, what: &str) {
    let before = cpu_ticks(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cpu_ticks(pid) < before + 2 {
        assert!(Instant::now() < deadline, "{what}: no CPU time in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pause, check the tree is really frozen, resume, check the state continued. `expect` is
/// the freezer the backend must have picked for `freezer`: a silent fallback (say, to
/// signals) would otherwise leave the cgroup branch untested while green.
async fn pause_resume_roundtrip(freezer: &str, expect: FreezerMode) {
    let dir = scratch(freezer);
    let cfg = config_with_busy_child(&dir, &format!("  freezer: {freezer}\n  warm_pool: 1\n"));
    let b = backend(&cfg).await;
    assert_eq!(b.freezer_mode(), expect, "freezer {freezer}");
    let c = client();
    let bind = b
        .claim(&key("alpha"), budget(Duration::from_secs(20)))
        .await
        .unwrap();
    let url = |p: &str| format!("http://{}{p}", bind.endpoint);
    for want in 1..=2 {
        let v = call(&c, "POST", url("/counter"), "alpha").await;
        assert_eq!(v["counter"], want);
    }
    let pid = row_pid(&b, &bind.sandbox);
    let busy = group_members(pid);
    assert_eq!(
        busy.len(),
        1,
        "the busy grandchild runs in the sandbox's group"
    );
    let busy = busy[0];
    cpu_moves(busy, "the busy loop burns CPU while running").await;
    b.pause(&bind.sandbox).await.unwrap();
    assert_eq!(count(&b, SandboxState::Paused), 1);
    assert_eq!(b.is_frozen(&bind.sandbox), Some(true));
    match b.freezer_mode() {
        FreezerMode::CgroupV2 => {
            let events = std::fs::read_to_string(
                cgroup_dir(pid, FreezerMode::CgroupV2).join("cgroup.events"),
            )
            .unwrap();
            assert!(events.contains("frozen 1"), "{events}");
        }
        FreezerMode::CgroupV1 => {
            let state = std::fs::read_to_string(
                cgroup_dir(pid, FreezerMode::CgroupV1).join("freezer.state"),
            )
            .unwrap();
            assert_eq!(state.trim(), "FROZEN");
        }
        FreezerMode::Signal => {
            assert_eq!(proc_state(pid), 'T');
            assert_eq!(proc_state(busy), 'T');
        }
    }
    // The whole tree is frozen: the busy grandchild accumulates no CPU time.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = (cpu_ticks(pid), cpu_ticks(busy));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (cpu_ticks(pid), cpu_ticks(busy)),
        before,
        "a frozen sandbox used CPU"
    );
    let endpoint = b
        .resume(&bind.sandbox, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(endpoint, bind.endpoint, "the listening port survives");
    assert_eq!(b.is_frozen(&bind.sandbox), Some(false));
    let v = call(&c, "POST", url("/counter"), "alpha").await;
    assert_eq!(v["counter"], 3, "memory survives the pause");
    assert_eq!(v["pid"], pid);
    cpu_moves(busy, "the thawed tree runs again").await;
    finish(&b, &dir).await;
    assert!(!alive(pid) && !alive(busy), "shutdown stops the whole tree");
}

/// `auto` takes the first writable of v2, v1, signals: on a machine with a writable unified
/// hierarchy that must be v2 (under `CI=true` the machine must have one).
#[tokio::test]
async fn pause_resume_keeps_state_with_the_auto_freezer() {
    let expect = if cfg!(missing_cgroup_v2) {
        if cfg!(missing_cgroup_v1_freezer) {
            FreezerMode::Signal
        } else {
            FreezerMode::CgroupV1
        }
    } else {
        FreezerMode::CgroupV2
    };
    pause_resume_roundtrip("auto", expect).await;
}

#[tokio::test]
async fn pause_resume_keeps_state_with_signals() {
    pause_resume_roundtrip("signal", FreezerMode::Signal).await;
}

#[tokio::test]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn pause_resume_keeps_state_with_the_cgroup_v2_freezer() {
    pause_resume_roundtrip("cgroup_v2", FreezerMode::CgroupV2).await;
}

#[tokio::test]
#[cfg_attr(
    missing_cgroup_v1_freezer,
    ignore = "no cgroup v1 freezer mounted on this host (build.rs probe)"
)]
async fn pause_resume_keeps_state_with_the_cgroup_v1_freezer() {
    pause_resume_roundtrip("cgroup_v1", FreezerMode::CgroupV1).await;
}

#[tokio::test]
async fn release_kills_the_whole_group_and_removes_the_workdir() {
    for freezer in ["auto", "signal"] {
        let dir = scratch("release");
        let b = backend(&config_with_busy_child(
            &dir,
            &format!("  freezer: {freezer}\n"),
        ))
        .await;
        let bind = b
            .claim(&key("a"), budget(Duration::from_secs(20)))
            .await
            .unwrap();
        let pid = row_pid(&b, &bind.sandbox);
        let busy = group_members(pid);
        assert_eq!(busy.len(), 1);
        let workdir = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert!(workdir.starts_with(&dir) && workdir.ends_with(bind.sandbox.as_str()));
        // Paused first: release must thaw before SIGTERM can be acted on.
        b.pause(&bind.sandbox).await.unwrap();
        b.release(&key("a"), &bind.sandbox).await.unwrap();
        eventually("leader and grandchild are gone", || {
            !alive(pid) && !alive(busy[0])
        })
        .await;
        eventually("the sandbox left the table", || b.sandboxes().is_empty()).await;
        assert!(!workdir.exists(), "{freezer}: workdir removed");
        finish(&b, &dir).await;
    }
}

#[tokio::test]
async fn pool_refills_after_a_claim_and_replaces_a_dead_warm_sandbox() {
    let dir = scratch("pool");
    let b = backend(&config(&dir, "  warm_pool: 2\n")).await;
    eventually("two warm sandboxes", || count(&b, SandboxState::Warm) == 2).await;
    let bind = b
        .claim(&key("a"), budget(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(bind.kind, ActivationKind::Claim);
    eventually("the pool refilled", || count(&b, SandboxState::Warm) == 2).await;
    assert_eq!(count(&b, SandboxState::Bound), 1);

    let warm = b
        .sandboxes()
        .into_iter()
        .find(|r| r.state == SandboxState::Warm)
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(warm.pid.unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the dead warm sandbox is replaced", || {
        let rows = b.sandboxes();
        rows.iter().all(|r| r.id != warm.id)
            && rows
                .iter()
                .filter(|r| r.state == SandboxState::Warm)
                .count()
                == 2
    })
    .await;
    b.set_warm_pool_target(0).await.unwrap();
    eventually("the pool drained to its new target", || {
        count(&b, SandboxState::Warm) == 0
    })
    .await;
    finish(&b, &dir).await;
}

#[tokio::test]
async fn max_sandboxes_blocks_then_fails_then_admits_after_a_release() {
    let dir = scratch("capacity");
    let b = backend(&config(&dir, "  max_sandboxes: 1\n")).await;
    let first = b
        .claim(&key("a"), budget(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        first.kind,
        ActivationKind::Create,
        "no pool: created on demand"
    );
    let started = Instant::now();
    let err = b
        .claim(&key("b"), budget(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::NoCapacity(_)), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waited for capacity"
    );

    let b2 = b.clone();
    let waiter =
        tokio::spawn(async move { b2.claim(&key("c"), budget(Duration::from_secs(20))).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "the claim waits while the sandbox is taken"
    );
    b.release(&key("a"), &first.sandbox).await.unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_ne!(
        got.sandbox, first.sandbox,
        "a released sandbox is never reused"
    );
    finish(&b, &dir).await;
}

#[tokio::test]
async fn two_sessions_never_share_a_sandbox() {
    let dir = scratch("isolation");
    let b = backend(&config(&dir, "  warm_pool: 1\n")).await;
    let c = client();
    let x = b
        .claim(&key("x"), budget(Duration::from_secs(20)))
        .await
        .unwrap();
    let y = b
        .claim(&key("y"), budget(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_ne!(x.sandbox, y.sandbox);
    for _ in 0..3 {
        call(&c, "POST", format!("http://{}/counter", x.endpoint), "x").await;
        call(&c, "POST", format!("http://{}/counter", y.endpoint), "y").await;
    }
    let sx = call(&c, "GET", format!("http://{}/state", x.endpoint), "x").await;
    let sy = call(&c, "GET", format!("http://{}/state", y.endpoint), "y").await;
    assert_eq!(sx["sessions_seen"], serde_json::json!(["x"]));
    assert_eq!(sy["sessions_seen"], serde_json::json!(["y"]));
    assert_ne!(sx["pid"], sy["pid"]);
    finish(&b, &dir).await;
}

/// Concurrent cold starts pick their ports at the same moment; the kernel may hand a
/// just-released port out again (the loadtest storm of 1,000 found 87 shared sandboxes
/// before ports were reserved). This checks the outcome under concurrency; the race is
/// rare at this size, so the mechanism itself is pinned down deterministically by
/// `a_port_answered_by_a_process_outside_the_sandbox_fails_the_start` and the unit tests
/// of `backend/process/port.rs` (`pick_free` skips reserved ports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_starts_each_answer_on_their_own_port() {
    let dir = scratch("port-race");
    let b = backend(&config(
        &dir,
        "  warm_pool: 0
  max_sandboxes: 40
",
    ))
    .await;
    let claims = (0..24).map(|i| {
        let b = b.clone();
        async move {
            let k = format!("race-{i}");
            let bind = b
                .claim(&key(&k), budget(Duration::from_secs(60)))
                .await
                .unwrap();
            (k, bind)
        }
    });
    let binds = futures_util::future::join_all(claims).await;
    let ports: std::collections::HashSet<u16> =
        binds.iter().map(|(_, b)| b.endpoint.port()).collect();
    assert_eq!(ports.len(), binds.len(), "two sandboxes share a port");
    let c = client();
    for (k, bind) in &binds {
        let state = call(&c, "GET", format!("http://{}/state", bind.endpoint), k).await;
        assert_eq!(
            state["pid"],
            row_pid(&b, &bind.sandbox),
            "the process answering is not the sandbox's own"
        );
        assert_eq!(state["sessions_seen"], serde_json::json!([k]));
    }
    finish(&b, &dir).await;
}

#[tokio::test]
async fn a_crash_of_a_bound_sandbox_is_reported_lost() {
    let dir = scratch("crash");
    let b = backend(&config(&dir, "")).await;
    let mut events = b.subscribe();
    let bind = b
        .claim(&key("a"), budget(Duration::from_secs(20)))
        .await
        .unwrap();
    let pid = row_pid(&b, &bind.sandbox);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        BackendEvent::Lost { sandbox, reason } => {
            assert_eq!(sandbox, bind.sandbox);
            assert!(
                reason.contains("SIGKILL") || reason.contains('9'),
                "{reason}"
            );
        }
        other => panic!("expected Lost, got {other:?}"),
    }
    let err = b
        .resume(&bind.sandbox, Instant::now() + Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Lost(_)));
    eventually("the dead sandbox is gone from the table", || {
        b.sandboxes().is_empty()
    })
    .await;
    finish(&b, &dir).await;
}

#[tokio::test]
async fn a_child_that_exits_before_ready_fails_with_its_stderr() {
    let dir = scratch("startfail");
    let yaml = format!(
        "backend:\n  kind: process\n  command: [\"sh\", \"-c\", \"echo boom-{{port}} >&2; exit 3\"]\n  workdir_root: \"{}\"\n",
        dir.display()
    );
    let b = backend(&Config::from_yaml(&yaml).unwrap()).await;
    let err = b
        .claim(&key("a"), budget(Duration::from_secs(5)))
        .await
        .unwrap_err();
    let BackendError::StartFailed(msg) = err else {
        panic!("{err:?}")
    };
    assert!(
        msg.contains("exit status: 3") && msg.contains("boom-"),
        "{msg}"
    );
    finish(&b, &dir).await;
}

/// The process answering the readiness probe must belong to the sandbox. Here the child
/// starts the server in a new session (outside its process group, which is the sandbox in
/// signal mode), as a foreign process that took the port would be: the start must fail
/// instead of routing a session to it. Unisolated: an isolated sandbox's port lives in its
/// own network namespace, where no foreign process can take it.
#[tokio::test]
async fn a_port_answered_by_a_process_outside_the_sandbox_fails_the_start() {
    let dir = scratch("foreign-port");
    let yaml = format!(
        "backend:\n  kind: process\n  freezer: signal\n  isolation: none\n  command: [\"sh\", \"-c\", \"setsid timeout 20 \\\"$0\\\" demo-sandbox --port \\\"$1\\\" & sleep 30\", \"{BIN}\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  stop_grace: 1s\n",
        dir.display()
    );
    let b = backend(&Config::from_yaml(&yaml).unwrap()).await;
    let err = b
        .claim(&key("a"), budget(Duration::from_secs(10)))
        .await
        .unwrap_err();
    let BackendError::StartFailed(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("no process of the sandbox listens"), "{msg}");
    finish(&b, &dir).await;
}
