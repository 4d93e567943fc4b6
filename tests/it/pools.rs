//! Several sandbox pools behind one activator (`pools:`): selection by header, path and
//! default; each pool's own warm pool of real demo-sandbox processes; per-pool metrics,
//! API rows and filters; 409 `pool_mismatch`, 404 `no_pool`; `check` errors naming
//! `pools[i].…`; the single-pool configuration unchanged.

use std::collections::BTreeSet;

use agent_activator::config::Config;
use agent_activator::server::RunningServer;

use crate::support;

use support::{HttpClient, Reply, sample};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// A process pool running the demo sandbox (standing in for a real Python or browser
/// sandbox image), unisolated so pids reported by the sandbox match the backend's rows.
fn process_pool(name: &str, matcher: &str, warm: u32, dir: &std::path::Path) -> String {
    format!(
        "  - name: {name}\n{matcher}    backend:\n      kind: process\n      command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n      workdir_root: \"{}\"\n      stop_grace: 2s\n      isolation: none\n      warm_pool: {warm}\n      max_sandboxes: 4\n",
        dir.join(name).display()
    )
}

const PYTHON_MATCH: &str = "    match:\n      header: {name: X-Sandbox-Template, value: python}\n";
const BROWSER_MATCH: &str = "    match:\n      path_prefix: /browser/\n";

async fn start(pools: &[String]) -> RunningServer {
    let yaml = format!(
        "autoscaler:\n  enabled: true\n  tick_interval: 100ms\npools:\n{}",
        pools.concat()
    );
    support::start(&yaml).await
}

/// A per-process scratch directory for one test's sandboxes.
fn scratch(test: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("aa-pools-{test}-{}", std::process::id()))
}

/// The pids of `pool`'s sandboxes in `state` (`warm`, `bound`, ...), from the admin API.
async fn pids(admin: &HttpClient, pool: &str, state: &str) -> BTreeSet<u64> {
    let rows = admin
        .get(&format!("/api/sandboxes?pool={pool}"), &[])
        .await
        .json();
    rows["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|r| assert_eq!(r["pool"], pool, "row of another pool: {r}"))
        .filter(|r| r["state"] == state)
        // A sandbox still starting may have no process yet.
        .filter_map(|r| r["pid"].as_u64())
        .collect()
}

fn is_alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

async fn send(c: &HttpClient, path: &str, headers: &[(&str, &str)]) -> Reply {
    c.get(path, headers).await
}

#[tokio::test]
async fn two_pools_selected_by_header_and_path_each_keep_their_own_warm_pool() {
    let dir = scratch("two");
    let server = start(&[
        process_pool("python", PYTHON_MATCH, 2, &dir),
        process_pool("browser", BROWSER_MATCH, 1, &dir),
    ])
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());

    // Each pool fills its own warm pool with its own processes.
    let (py_warm, br_warm) = support::eventually("both warm pools are full", || async {
        let py = pids(&admin, "python", "warm").await;
        let br = pids(&admin, "browser", "warm").await;
        (py.len() == 2 && br.len() == 1).then_some((py, br))
    })
    .await;
    assert!(py_warm.is_disjoint(&br_warm));
    assert!(py_warm.iter().chain(&br_warm).all(|p| is_alive(*p)));

    // Selected by header: a python warm sandbox is claimed.
    let a = send(
        &proxy,
        "/hello",
        &[("x-session-id", "alice"), ("x-sandbox-template", "python")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-activator-activation"), Some("claim"));
    let alice_pid = a.json()["pid"].as_u64().unwrap();
    assert!(
        py_warm.contains(&alice_pid),
        "{alice_pid} not in {py_warm:?}"
    );

    // Selected by path: a browser sandbox, the path forwarded unchanged.
    let b = send(&proxy, "/browser/page?x=1", &[("x-session-id", "bob")]).await;
    assert_eq!(b.status, 200, "{}", b.text());
    let bob = b.json();
    assert_eq!(bob["path"], "/browser/page");
    let bob_pid = bob["pid"].as_u64().unwrap();
    assert!(br_warm.contains(&bob_pid), "{bob_pid} not in {br_warm:?}");

    // A bound session needs no selector: it finds its pool.
    let again = send(&proxy, "/other", &[("x-session-id", "alice")]).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["pid"].as_u64(), Some(alice_pid));
    assert_eq!(again.header("x-activator-activation"), Some("none"));

    // Selecting another pool than the session's is refused, and changes nothing.
    let clash = send(&proxy, "/browser/x", &[("x-session-id", "alice")]).await;
    assert_eq!(clash.status, 409);
    assert_eq!(clash.error_code(), "pool_mismatch");
    assert_eq!(
        clash.header("content-type"),
        Some("application/json"),
        "{}",
        clash.text()
    );
    let clash = send(
        &proxy,
        "/x",
        &[("x-session-id", "bob"), ("x-sandbox-template", "python")],
    )
    .await;
    assert_eq!(clash.error_code(), "pool_mismatch");

    // No selector, no session, no default pool: 404 no_pool, and nothing claimed.
    let lost = send(&proxy, "/x", &[("x-session-id", "carol")]).await;
    assert_eq!(lost.status, 404);
    assert_eq!(lost.error_code(), "no_pool");

    // Each warm pool is refilled with its own kind; bound counts are per pool.
    support::eventually("both warm pools refilled", || async {
        let py = pids(&admin, "python", "warm").await;
        let br = pids(&admin, "browser", "warm").await;
        (py.len() == 2 && br.len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        pids(&admin, "python", "bound").await,
        BTreeSet::from([alice_pid])
    );
    assert_eq!(
        pids(&admin, "browser", "bound").await,
        BTreeSet::from([bob_pid])
    );

    // Sessions show and filter by pool.
    let all = admin.get("/api/sessions", &[]).await.json();
    assert_eq!(all["total"], 2, "{all}");
    let py = admin.get("/api/sessions?pool=python", &[]).await.json();
    assert_eq!(py["total"], 1, "{py}");
    assert_eq!(py["sessions"][0]["pool"], "python");
    assert_eq!(py["sessions"][0]["state"], "active");
    let unknown = admin.get("/api/sessions?pool=nope", &[]).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "unknown_pool");

    // Per-pool metrics: the pool is a label on the pool-owned families.
    let text = admin.get("/metrics", &[]).await.text();
    for (pool, warm) in [("python", 2.0), ("browser", 1.0)] {
        assert_eq!(
            sample(
                &text,
                "activator_sandboxes",
                &[("pool", pool), ("state", "bound")]
            ),
            Some(1.0),
            "{pool}\n{text}"
        );
        assert_eq!(
            sample(&text, "activator_warm_pool_ready", &[("pool", pool)]),
            Some(warm),
            "{pool}"
        );
        assert_eq!(
            sample(
                &text,
                "activator_activations_total",
                &[("kind", "claim"), ("pool", pool), ("result", "ok")]
            ),
            Some(1.0),
            "{pool}"
        );
        assert_eq!(
            sample(
                &text,
                "activator_sessions",
                &[("pool", pool), ("state", "active")]
            ),
            Some(1.0),
            "{pool}"
        );
    }
    // One autoscaler decision per pool.
    support::eventually("each pool's autoscaler decided", || async {
        let text = admin.get("/metrics", &[]).await.text();
        let py = sample(&text, "activator_desired_sandboxes", &[("pool", "python")])?;
        let br = sample(&text, "activator_desired_sandboxes", &[("pool", "browser")])?;
        (py >= 1.0 && br >= 1.0).then_some(())
    })
    .await;
    // Server-wide families keep no pool label, and a pool family has no unlabelled series.
    assert!(sample(&text, "activator_requests_total", &[("code", "409")]) == Some(2.0));
    assert!(sample(&text, "activator_requests_total", &[("code", "404")]) == Some(1.0));
    assert_eq!(sample(&text, "activator_warm_pool_ready", &[]), None);

    // Per-pool stats answer `?pool=`.
    let stats = admin.get("/api/stats?pool=browser", &[]).await;
    assert_eq!(stats.status, 200);
    assert!(stats.json()["stable_window_seconds"].as_f64().is_some());

    // One event stream; each event names its pool.
    let events = server.activator().events().subscribe(Some(0)).backlog;
    let claimed: BTreeSet<(String, String)> = events
        .iter()
        .filter(|e| e.kind.as_str() == "claimed")
        .map(|e| {
            let pool = e.pool.as_deref().unwrap_or("-").to_owned();
            (pool, e.session.to_string())
        })
        .collect();
    let hash = |id: &str| {
        agent_activator::session::SessionKey::parse(id, 128)
            .unwrap()
            .short_hash()
    };
    assert_eq!(
        claimed,
        BTreeSet::from([
            ("python".to_owned(), hash("alice")),
            ("browser".to_owned(), hash("bob"))
        ])
    );

    // Listing pages walk both pools' tables in one hash order, each session once.
    for (id, headers) in [
        ("p2", vec![("x-sandbox-template", "python")]),
        ("p3", vec![("x-sandbox-template", "python")]),
    ] {
        let mut h = headers;
        h.push(("x-session-id", id));
        assert_eq!(send(&proxy, "/", &h).await.status, 200);
    }
    assert_eq!(
        send(&proxy, "/browser/", &[("x-session-id", "b2")])
            .await
            .status,
        200
    );
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..5 {
        let page = admin
            .get(&format!("/api/sessions?limit=2&cursor={cursor}"), &[])
            .await
            .json();
        assert_eq!(page["total"], 5, "{page}");
        for row in page["sessions"].as_array().unwrap() {
            seen.push((
                row["pool"].as_str().unwrap().to_owned(),
                row["session"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let mut want: Vec<(String, String)> = [
        ("python", "alice"),
        ("python", "p2"),
        ("python", "p3"),
        ("browser", "bob"),
        ("browser", "b2"),
    ]
    .iter()
    .map(|(p, id)| ((*p).to_owned(), hash(id)))
    .collect();
    want.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(seen, want);

    let mut all_pids = BTreeSet::new();
    for pool in ["python", "browser"] {
        for state in ["warm", "bound", "starting"] {
            all_pids.extend(pids(&admin, pool, state).await);
        }
    }
    assert!(all_pids.contains(&alice_pid) && all_pids.contains(&bob_pid));
    server.shutdown().await;
    for pid in all_pids {
        support::eventually("sandbox processes end with the activator", || async {
            (!is_alive(pid)).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn the_default_pool_takes_requests_that_select_none() {
    let dir = scratch("default");
    let server = start(&[
        process_pool("python", PYTHON_MATCH, 0, &dir),
        process_pool("general", "", 0, &dir),
    ])
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let r = send(&proxy, "/x", &[("x-session-id", "dora")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("create"));
    let rows = admin.get("/api/sessions?pool=general", &[]).await.json();
    assert_eq!(rows["total"], 1, "{rows}");
    let py = admin.get("/api/sessions?pool=python", &[]).await.json();
    assert_eq!(py["total"], 0, "{py}");
    // Another value of the selecting header selects nothing: the default pool again.
    let r = send(
        &proxy,
        "/x",
        &[("x-session-id", "eve"), ("x-sandbox-template", "ruby")],
    )
    .await;
    assert_eq!(r.status, 200);
    let rows = admin.get("/api/sessions?pool=general", &[]).await.json();
    assert_eq!(rows["total"], 2, "{rows}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_single_pool_config_is_unchanged_and_reported_as_default() {
    let upstreams = support::echo_upstreams(1).await;
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let server = support::start(&support::static_backend(&addrs)).await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(proxy.get_session("/a", "s1").await.status, 200);
    let rows = admin.get("/api/sessions", &[]).await.json();
    assert_eq!(rows["sessions"][0]["pool"], "default", "{rows}");
    let text = admin.get("/metrics", &[]).await.text();
    // No `pool` label anywhere: dashboards and alerts written before pools still match.
    assert!(!text.contains("pool=\""), "{text}");
    assert_eq!(
        sample(&text, "activator_sessions", &[("state", "active")]),
        Some(1.0)
    );
    server.shutdown().await;
}

fn check_err(yaml: &str) -> String {
    Config::from_yaml(yaml).unwrap_err().to_string()
}

const GOOD_PROCESS: &str =
    "    backend:\n      kind: process\n      command: [\"/bin/sandbox\", \"{port}\"]\n";

#[test]
fn check_names_the_pool_key_of_every_mistake() {
    let two = |second: &str| {
        format!(
            "pools:\n  - name: python\n    match:\n      header: {{name: X-Sandbox-Template, value: python}}\n{GOOD_PROCESS}{second}"
        )
    };

    let e = check_err(&two(
        "  - name: browser\n    backend:\n      kind: process\n",
    ));
    assert!(e.starts_with("pools[1].backend.command:"), "{e}");

    let e = check_err(&two(&format!("  - name: python\n{GOOD_PROCESS}")));
    assert!(e.starts_with("pools[1].name:"), "{e}");
    assert!(e.contains("pools[0]"), "{e}");

    let e = check_err(&two(&format!(
        "  - name: py2\n    match:\n      header: {{name: x-sandbox-template, value: python}}\n{GOOD_PROCESS}"
    )));
    assert!(e.starts_with("pools[1].match:"), "{e}");
    assert!(e.contains("ambiguous"), "{e}");

    let e = check_err(&two(&format!("  - name: Browser\n{GOOD_PROCESS}")));
    assert!(e.starts_with("pools[1].name:"), "{e}");

    let e = check_err(&two(&format!(
        "  - name: a\n{GOOD_PROCESS}  - name: b\n{GOOD_PROCESS}"
    )));
    assert!(e.starts_with("pools[2].match:"), "{e}");
    assert!(e.contains("only one pool may omit match"), "{e}");

    let e = check_err(&two(&format!(
        "  - name: b\n    match:\n      path_prefix: browser\n{GOOD_PROCESS}"
    )));
    assert!(e.starts_with("pools[1].match.path_prefix:"), "{e}");

    let e = check_err(&two(&format!(
        "  - name: b\n    match:\n      path_prefix: /b/\n      host: b.example\n{GOOD_PROCESS}"
    )));
    assert!(e.starts_with("pools[1].match"), "{e}");

    let e = check_err(&two(&format!(
        "  - name: b\n    match:\n      path_prefix: /b/\n{GOOD_PROCESS}    autoscaler:\n      target: 0\n"
    )));
    assert!(e.starts_with("pools[1].autoscaler.target:"), "{e}");

    let e = check_err(&two(&format!(
        "  - name: b\n    match:\n      path_prefix: /b/\n{GOOD_PROCESS}    idle:\n      timeout: 0s\n"
    )));
    assert!(e.starts_with("pools[1].idle.timeout:"), "{e}");

    let e = check_err(&format!(
        "backend:\n  kind: static\n  endpoints: [\"127.0.0.1:1\"]\n{}",
        two("")
    ));
    assert!(e.starts_with("backend:"), "{e}");

    let kube = |name: &str, prefix: &str| {
        format!(
            "  - name: {name}\n    match:\n      path_prefix: /{name}/\n    backend:\n      kind: kubernetes\n      kubernetes:\n        pool: {name}\n        claim_prefix: {prefix}\n"
        )
    };
    let e = check_err(&format!(
        "pools:\n{}{}",
        kube("py", "sess-"),
        kube("br", "sess-br-")
    ));
    assert!(
        e.starts_with("pools[1].backend.kubernetes.claim_prefix:"),
        "{e}"
    );
    Config::from_yaml(&format!(
        "pools:\n{}{}",
        kube("py", "py-"),
        kube("br", "br-")
    ))
    .expect("distinct prefixes are fine");
}

#[test]
fn per_pool_sections_override_only_what_they_set() {
    let c = Config::from_yaml(&format!(
        "autoscaler:\n  target: 3\n  metric: rps\nidle:\n  timeout: 90s\npools:\n  - name: python\n    match:\n      header: {{name: X-Sandbox-Template, value: python}}\n{GOOD_PROCESS}    autoscaler:\n      target: 10\n  - name: browser\n{GOOD_PROCESS}    idle:\n      timeout: 10m\n      policy: release\n"
    ))
    .unwrap();
    let pools = c.effective_pools();
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0].name, "python");
    assert_eq!(pools[0].config.autoscaler.target, 10.0);
    assert_eq!(
        pools[0].config.autoscaler.metric,
        agent_activator::config::ScalingMetric::Rps
    );
    assert_eq!(pools[0].config.idle.timeout.as_duration().as_secs(), 90);
    assert_eq!(pools[1].config.autoscaler.target, 3.0);
    assert_eq!(pools[1].config.idle.timeout.as_duration().as_secs(), 600);
    assert_eq!(
        pools[1].config.idle.policy,
        Some(agent_activator::config::IdlePolicy::Release)
    );
    assert!(pools[1].matcher.is_none());
}

#[test]
fn the_check_command_exits_64_naming_the_pool_key() {
    let dir = std::env::temp_dir().join(format!("aa-pools-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pools.yaml");
    std::fs::write(
        &file,
        format!("pools:\n  - name: python\n{GOOD_PROCESS}  - name: browser\n    match:\n      path_prefix: /browser/\n    backend:\n      kind: process\n      command: [\"/bin/sandbox\"]\n"),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("pools[1].backend.command"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();

    // The shipped two-pool example is valid.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pools.yaml");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", shipped])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pools = agent_activator::loader::load(std::path::Path::new(shipped))
        .unwrap()
        .effective_pools();
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0].config.autoscaler.target, 10.0);
}

/// A Knative Service running the demo sandbox as a local process (standing in for a
/// sandbox image), with `annotations` added under `metadata.annotations`.
fn knative_manifest(name: &str, annotations: &str, dir: &std::path::Path, extra: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {name}
  annotations:
    serving.knative.dev/workload-type: sandbox
{annotations}    agent-activator.dev/config: |
      autoscaler:
        apply: false
        tick_interval: 100ms
      backend:
        kind: process
        isolation: none
        stop_grace: 2s
        workdir_root: \"{}\"
spec:
  template:
    spec:
{extra}      containers:
        - image: example.com/{name}:latest
          command: [\"{BIN}\"]
          args: [\"demo-sandbox\", \"--port\", \"$(PORT)\"]
",
        dir.display()
    )
}

#[tokio::test]
async fn two_knative_services_are_two_pools() {
    let dir = scratch("knative");
    std::fs::create_dir_all(&dir).unwrap();
    let python = dir.join("python.yaml");
    let browser = dir.join("browser.yaml");
    std::fs::write(
        &python,
        knative_manifest(
            "python",
            "    serving.knative.dev/warm-pool: \"1\"\n    autoscaling.knative.dev/metric: rps\n    autoscaling.knative.dev/target: \"10\"\n    agent-activator.dev/pool-match: \"{header: {name: X-Sandbox-Template, value: python}}\"\n",
            &dir,
            "",
        ),
    )
    .unwrap();
    std::fs::write(
        &browser,
        knative_manifest(
            "browser",
            "    serving.knative.dev/warm-pool: \"2\"\n    agent-activator.dev/pool-match: \"{path_prefix: /browser/}\"\n",
            &dir,
            "",
        ),
    )
    .unwrap();

    // `check` takes both files, as `serve` does.
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&python)
        .arg("--config")
        .arg(&browser)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config = agent_activator::loader::load_all(&[python.clone(), browser.clone()]).unwrap();
    let pools = config.effective_pools();
    let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["python", "browser"]);
    assert_eq!(pools[0].config.autoscaler.target, 10.0);
    assert_eq!(
        pools[0].config.autoscaler.metric,
        agent_activator::config::ScalingMetric::Rps
    );
    assert_eq!(pools[0].config.backend.warm_pool, 1);
    assert_eq!(pools[1].config.backend.warm_pool, 2);
    assert_eq!(
        pools[1].matcher,
        Some(agent_activator::config::PoolMatch::PathPrefix(
            "/browser/".into()
        ))
    );

    let mut config = config;
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    let server = agent_activator::server::start(config).await.unwrap();
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let (py_warm, br_warm) = support::eventually("both warm pools are full", || async {
        let py = pids(&admin, "python", "warm").await;
        let br = pids(&admin, "browser", "warm").await;
        (py.len() == 1 && br.len() == 2).then_some((py, br))
    })
    .await;
    let r = send(
        &proxy,
        "/x",
        &[("x-session-id", "k1"), ("x-sandbox-template", "python")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(py_warm.contains(&r.json()["pid"].as_u64().unwrap()));
    let r = send(&proxy, "/browser/", &[("x-session-id", "k2")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(br_warm.contains(&r.json()["pid"].as_u64().unwrap()));
    server.shutdown().await;

    // A later manifest may not quietly change a server-wide setting.
    std::fs::write(
        &browser,
        knative_manifest(
            "browser",
            "    agent-activator.dev/pool-match: \"{path_prefix: /browser/}\"\n",
            &dir,
            "      timeoutSeconds: 30\n",
        ),
    )
    .unwrap();
    let e = agent_activator::loader::load_all(&[python, browser.clone()])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with(&format!("{}: ", browser.display())), "{e}");
    assert!(e.contains("server-wide proxy"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every file named `name` below `dir`, read.
fn files_named(dir: &std::path::Path, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(files_named(&path, name));
        } else if path.file_name().is_some_and(|n| n == name) {
            out.push(std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    out
}

#[tokio::test]
async fn each_pool_applies_its_own_customize_allowlist() {
    let dir = scratch("customize");
    let _ = std::fs::remove_dir_all(&dir);
    // Each sandbox writes the variables it was given into its working directory, then
    // becomes the demo sandbox.
    let probe = "echo \"${REGION:--} ${THEME:--}\" > \"$PWD/probe\"; exec \"$0\" demo-sandbox --port \"$1\"";
    let pool = |name: &str, matcher: &str, customize: &str| {
        format!(
            "  - name: {name}\n{matcher}    backend:\n      kind: process\n      command: [\"sh\", \"-c\", {probe:?}, \"{BIN}\", \"{{port}}\"]\n      workdir_root: \"{}\"\n      stop_grace: 2s\n      isolation: none\n    customize:\n      header_prefix: x-sandbox-env-\n{customize}",
            dir.join(name).display()
        )
    };
    let server = start(&[
        pool(
            "python",
            PYTHON_MATCH,
            "      env:\n        - {header: X-Sandbox-Env-Region, name: REGION, pattern: \"[a-z]{2}-[a-z]+\"}\n",
        ),
        pool(
            "browser",
            BROWSER_MATCH,
            "      env:\n        - {header: X-Sandbox-Env-Theme, name: THEME, pattern: \"dark|light\"}\n",
        ),
    ])
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());

    let py = send(
        &proxy,
        "/x",
        &[
            ("x-session-id", "c1"),
            ("x-sandbox-template", "python"),
            ("x-sandbox-env-region", "eu-west"),
        ],
    )
    .await;
    assert_eq!(py.status, 200, "{}", py.text());
    assert_eq!(files_named(&dir.join("python"), "probe"), ["eu-west -\n"]);

    // The browser pool's rule is not in the python pool's allowlist.
    let refused = send(
        &proxy,
        "/x",
        &[
            ("x-session-id", "c2"),
            ("x-sandbox-template", "python"),
            ("x-sandbox-env-theme", "dark"),
        ],
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.error_code(), "invalid_customization");
    assert!(
        refused.text().contains("x-sandbox-env-theme"),
        "{}",
        refused.text()
    );

    let br = send(
        &proxy,
        "/browser/",
        &[("x-session-id", "c3"), ("x-sandbox-env-theme", "dark")],
    )
    .await;
    assert_eq!(br.status, 200, "{}", br.text());
    assert_eq!(files_named(&dir.join("browser"), "probe"), ["- dark\n"]);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
