//! Claim-time customisation through the process backend, over real sockets and processes:
//! an allowlisted header becomes the sandbox's environment variable, a per-session volume
//! keeps its files across release and a new claim (unisolated and under bubblewrap), refused
//! headers get 400 `invalid_customization` naming the header and start nothing, and a
//! later request's headers never change an existing session.

use crate::support;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Full;

use support::{HttpClient, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// Each sandbox appends one line `<REGION or -> <its working directory>` to its session's
/// volume (found through `ACTIVATOR_VOLUME_WORKSPACE`), then becomes the demo sandbox.
const PROBE: &str = "echo \"${REGION:--} $PWD\" >> \"$ACTIVATOR_VOLUME_WORKSPACE/log\"; \
    exec \"$0\" demo-sandbox --port \"$1\"";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aa-cust-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn yaml(root: &Path, isolation: &str) -> String {
    format!(
        r#"backend:
  kind: process
  isolation: {isolation}
  command: ["sh", "-c", {probe:?}, "{BIN}", "{{port}}"]
  workdir_root: "{root}/work"
  volumes_root: "{root}/volumes"
  stop_grace: 2s
customize:
  header_prefix: x-sandbox-
  env:
    - {{header: X-Sandbox-Env-Region, name: REGION, pattern: "[a-z]{{2}}-[a-z]+"}}
  volumes:
    - {{name: workspace, mount_path: /workspace}}
idle:
  timeout: 1h
autoscaler:
  enabled: false
"#,
        probe = PROBE,
        root = root.display(),
    )
}

/// The host directory of `session`'s `workspace` volume.
fn volume_of(root: &Path, session: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let hash = hex::encode(Sha256::digest(session.as_bytes()));
    root.join("volumes").join(&hash[..32]).join("workspace")
}

async fn get(c: &HttpClient, session: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("x-session-id", session)];
    all.extend_from_slice(headers);
    c.get("/state", &all).await
}

async fn release(admin: &HttpClient, session: &str) {
    let r = admin
        .send(
            admin
                .request("DELETE", &format!("/api/sessions/{session}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(r.status.is_success(), "release {session}: {}", r.text());
}

async fn sandbox_count(admin: &HttpClient) -> usize {
    let r = admin.get("/api/sandboxes", &[]).await;
    let v = r.json();
    v.as_array()
        .or_else(|| v["sandboxes"].as_array())
        .map_or(0, Vec::len)
}

/// The whole customised lifecycle of one session, then a plain session beside it.
async fn env_and_volume_survive_release(isolation: &str) {
    let root = scratch(isolation);
    let server = support::start(&yaml(&root, isolation)).await;
    let c = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let region = [("x-sandbox-env-region", "eu-west")];

    let first = get(&c, "cust-a", &region).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-activator-activation"), Some("create"));
    // The demo sandbox's `instance`, not its pid: under a PID namespace every sandbox is pid 2.
    let first_instance = first.json()["instance"].as_str().unwrap().to_owned();
    // Headers of later requests are ignored: no 400 for a bad value, no new sandbox.
    let later = get(&c, "cust-a", &[("x-sandbox-env-region", "NOT VALID")]).await;
    assert_eq!(later.status, 200, "{}", later.text());
    assert_eq!(later.header("x-activator-activation"), Some("none"));
    assert_eq!(
        later.json()["instance"].as_str(),
        Some(first_instance.as_str())
    );

    let volume = volume_of(&root, "cust-a");
    let log = std::fs::read_to_string(volume.join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].starts_with("eu-west "), "{log}");

    // Release: the sandbox (and its working directory) goes, the volume stays. The next
    // request creates the session anew (its headers customise it again) on a new sandbox
    // that mounts the same volume directory.
    release(&admin, "cust-a").await;
    support::eventually("the released sandbox to stop", || async {
        (sandbox_count(&admin).await == 0).then_some(())
    })
    .await;
    assert_eq!(std::fs::read_to_string(volume.join("log")).unwrap(), log);
    let again = get(&c, "cust-a", &region).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.header("x-activator-activation"), Some("create"));
    assert_ne!(
        again.json()["instance"].as_str(),
        Some(first_instance.as_str())
    );
    let log = std::fs::read_to_string(volume.join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "the new sandbox wrote into the same volume: {log}"
    );
    assert!(lines.iter().all(|l| l.starts_with("eu-west ")), "{log}");
    assert_ne!(
        lines[0], lines[1],
        "two sandboxes, two working directories: {log}"
    );

    // Another session: its own volume, and no REGION (it sent none).
    let other = get(&c, "cust-b", &[]).await;
    assert_eq!(other.status, 200, "{}", other.text());
    let other_log = std::fs::read_to_string(volume_of(&root, "cust-b").join("log")).unwrap();
    assert!(other_log.starts_with("- "), "{other_log}");
    assert_eq!(std::fs::read_to_string(volume.join("log")).unwrap(), log);

    let metrics = admin.get("/metrics", &[]).await.text();
    assert_eq!(
        support::metric_value(&metrics, "activator_customized_claims_total{cold=\"true\"}"),
        Some(3.0),
        "{metrics}"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn env_and_volume_survive_release_unisolated() {
    env_and_volume_survive_release("none").await;
}

#[tokio::test]
#[cfg_attr(
    missing_bwrap,
    ignore = "bubblewrap cannot create namespaces here (apt-get install bubblewrap); build.rs probe"
)]
async fn env_and_volume_survive_release_under_namespaces() {
    env_and_volume_survive_release("namespaces").await;
}

#[tokio::test]
async fn refused_customisations_name_the_header_and_start_nothing() {
    let root = scratch("refused");
    let server = support::start(&yaml(&root, "none")).await;
    let c = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[("x-sandbox-env-region", "EU; rm -rf /")],
            "x-sandbox-env-region",
        ),
        (
            &[("x-sandbox-env-token", "secret-value")],
            "x-sandbox-env-token",
        ),
        (
            &[
                ("x-sandbox-env-region", "eu-west"),
                ("x-sandbox-env-region", "us-east"),
            ],
            "x-sandbox-env-region",
        ),
    ];
    for (i, (headers, named)) in cases.iter().enumerate() {
        let session = format!("refused-{i}");
        let r = get(&c, &session, headers).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.error_code(), "invalid_customization");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(named), "{message}");
        for (_, value) in headers.iter() {
            assert!(!message.contains(value), "{message} echoes {value}");
        }
        assert!(
            !volume_of(&root, &session).exists(),
            "a refused session got a volume"
        );
    }
    assert_eq!(sandbox_count(&admin).await, 0);
    let sessions = admin.get("/api/sessions", &[]).await.json();
    let n = sessions
        .as_array()
        .or_else(|| sessions["sessions"].as_array())
        .map_or(usize::MAX, Vec::len);
    assert_eq!(n, 0, "{sessions}");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
}
