//! `backend.isolation: namespaces`: each process sandbox runs under bubblewrap in its own
//! PID, IPC, UTS and mount namespaces. Proven from inside real sandboxes: a sandbox sees only
//! its own processes, only its own working directory under the sandbox root, a private
//! `/tmp` and a read-only host; its state survives pause/resume through the proxy; it dies
//! with the activator (SIGKILL, warm or frozen: pasta and bubblewrap too); an unusable bubblewrap is a startup error naming the key.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use support::procs::{alive, group_members};
use support::{HttpClient, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// What each sandbox records about its own view before it becomes the demo sandbox: the
/// processes it can see, the tree under the sandbox root, `/tmp`, whether `/etc` is writable,
/// its hostname. `$0` is the activator binary, `$1` the port, `$2` the sandbox root.
const PROBE: &str = "ls /proc | grep -E '^[0-9]+$' > procs.txt; \
    ls -R \"$2\" > tree.txt; \
    echo mine > /tmp/marker-$1; ls /tmp > tmp.txt; \
    if touch /etc/aa-isolation-probe 2>/dev/null; then echo writable; else echo readonly; fi > etc.txt; \
    hostname > hostname.txt; \
    exec \"$0\" demo-sandbox --port \"$1\"";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aa-iso-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn yaml(root: &Path, extra: &str) -> String {
    format!(
        "backend:\n  kind: process\n  isolation: namespaces\n  command: [\"sh\", \"-c\", {probe:?}, \"{BIN}\", \"{{port}}\", \"{root}\"]\n  workdir_root: \"{root}\"\n  stop_grace: 2s\n{extra}autoscaler:\n  enabled: false\n",
        probe = PROBE,
        root = root.display(),
    )
}

/// The working directory of the sandbox listening on `port` (its `procs.txt` is there once
/// the probe ran).
fn workdir_of(root: &Path, port: u64) -> PathBuf {
    for instance in std::fs::read_dir(root).unwrap().flatten() {
        for sbx in std::fs::read_dir(instance.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let marker_list = std::fs::read_to_string(sbx.path().join("tmp.txt"));
            if marker_list.is_ok_and(|t| t.contains(&format!("marker-{port}"))) {
                return sbx.path();
            }
        }
    }
    panic!("no workdir under {} for port {port}", root.display());
}

async fn post(c: &HttpClient, path: &str, session: &str) -> Reply {
    c.send(
        c.request("POST", path)
            .header("x-session-id", session)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt; /dev/net/tun mode 0666); build.rs probe"
)]
async fn sandboxes_see_only_themselves_and_keep_state_through_pause() {
    let root = scratch("view");
    let server = support::start(&yaml(&root, "idle:\n  timeout: 1h\n  policy: pause\n")).await;
    let c = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let a = c.get_session("/state", "iso-a").await;
    let b = c.get_session("/state", "iso-b").await;
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (200, 200),
        "{} {}",
        a.text(),
        b.text()
    );
    let (pa, pb) = (
        a.json()["port"].as_u64().unwrap(),
        b.json()["port"].as_u64().unwrap(),
    );
    assert_ne!(pa, pb, "two sandboxes");
    let (wa, wb) = (workdir_of(&root, pa), workdir_of(&root, pb));
    let read = |dir: &Path, f: &str| std::fs::read_to_string(dir.join(f)).unwrap();

    for (me, other, port) in [(&wa, &wb, pa), (&wb, &wa, pb)] {
        // Its own PID namespace: a handful of small pids (bwrap's init, sh, ls, grep), none
        // of the host's (the activator's, the other sandbox's).
        let pids: Vec<u32> = read(me, "procs.txt")
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(
            !pids.is_empty() && pids.len() < 10 && pids.iter().all(|p| *p < 100),
            "{me:?} sees {pids:?}"
        );
        assert!(!pids.contains(&std::process::id()));
        // Under the sandbox root it sees its own directory and nothing of the other's.
        let tree = read(me, "tree.txt");
        let other_name = other.file_name().unwrap().to_str().unwrap();
        let my_name = me.file_name().unwrap().to_str().unwrap();
        assert!(tree.contains(my_name), "{tree}");
        assert!(
            !tree.contains(other_name),
            "{me:?} sees {other_name}: {tree}"
        );
        // A private /tmp: its own marker and nothing of the host's or the other's (the
        // sandbox root shows up when it lives under /tmp: its own workdir is bound there).
        let tmp = read(me, "tmp.txt");
        let markers: Vec<&str> = tmp.lines().filter(|l| l.starts_with("marker-")).collect();
        assert_eq!(markers, vec![format!("marker-{port}")], "{tmp}");
        // The files the command line names are bound read-only (the activator binary may
        // live under /tmp, e.g. a build in a temporary clone): their top directory shows.
        let root_name = root.file_name().unwrap().to_str().unwrap();
        let bin_top = Path::new(BIN)
            .strip_prefix("/tmp")
            .ok()
            .and_then(|rel| rel.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        assert!(
            tmp.lines().all(|l| l.starts_with("marker-")
                || l == root_name
                || bin_top.as_deref() == Some(l)),
            "host /tmp visible: {tmp}"
        );
        assert_eq!(read(me, "etc.txt").trim(), "readonly");
        assert_eq!(read(me, "hostname.txt").trim(), "sandbox");
    }
    // Nothing a sandbox wrote to its /tmp reached the host's.
    assert!(!Path::new(&format!("/tmp/marker-{pa}")).exists());
    assert!(!Path::new("/etc/aa-isolation-probe").exists());

    // The proxy path works as without isolation: state survives a freeze.
    assert_eq!(post(&c, "/counter", "iso-a").await.json()["counter"], 1);
    let pause = admin
        .send(
            admin
                .request("POST", "/api/sessions/iso-a/pause")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(pause.status, 200, "{}", pause.text());
    let resumed = post(&c, "/counter", "iso-a").await;
    assert_eq!(resumed.header("x-activator-activation"), Some("resume"));
    assert_eq!(resumed.json()["counter"], 2, "memory survived the freeze");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(root);
}

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt; /dev/net/tun mode 0666); build.rs probe"
)]
async fn isolated_sandboxes_die_with_a_killed_activator() {
    let root = scratch("kill");
    let path = root.join("activator.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nlog: {{format: json}}\n{}",
            yaml(
                &root.join("work"),
                "  warm_pool: 2\nidle:\n  timeout: 1h\n  policy: pause\n"
            )
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (proxy, admin) = support::listening_addrs(child.stderr.take().unwrap()).await;
    let admin = HttpClient::http1(admin);
    // One sandbox frozen (a frozen pasta and bubblewrap must die too), two warm.
    let c = HttpClient::http1(proxy);
    assert_eq!(c.get_session("/healthz", "frozen").await.status, 200);
    let pause = admin
        .send(
            admin
                .request("POST", "/api/sessions/frozen/pause")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(pause.status, 200, "{}", pause.text());
    // Every process of the paused and the two warm sandboxes, by their process groups
    // (host pids).
    let procs: Vec<u32> = support::eventually("a paused and two warm isolated sandboxes", || {
        let admin = admin.clone();
        async move {
            let rows = admin.get("/api/sandboxes", &[]).await.json();
            let leaders: Vec<u32> = rows["sandboxes"]
                .as_array()?
                .iter()
                .filter(|r| r["state"] == "warm" || r["state"] == "paused")
                .filter_map(|r| r["pid"].as_u64().map(|p| p as u32))
                .collect();
            if leaders.len() < 3 {
                return None;
            }
            let mut all = leaders.clone();
            for l in &leaders {
                all.extend(group_members(*l));
            }
            // pasta, bwrap, its namespace init and the demo sandbox, for each.
            (all.len() >= 12).then_some(all)
        }
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait().await;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while procs.iter().any(|p| alive(*p)) {
        assert!(
            tokio::time::Instant::now() < end,
            "sandbox processes outlived a SIGKILLed activator: {:?}",
            procs.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn an_unusable_bubblewrap_is_a_startup_error_naming_the_key() {
    let root = scratch("nobwrap");
    let path = root.join("activator.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{}",
            yaml(&root.join("work"), "  bwrap: /nonexistent/bwrap\n")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("backend.isolation"), "{stderr}");
    assert!(stderr.contains("/nonexistent/bwrap"), "{stderr}");
    let _ = std::fs::remove_dir_all(root);
}
