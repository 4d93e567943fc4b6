//! No orphans: the real `agent-activator serve` with the process backend, stopped with
//! SIGTERM or killed with SIGKILL, leaves no sandbox process behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::support;

use support::HttpClient;
use support::procs::{alive, eventually, group_members};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// True when `pid` was placed in a sandbox cgroup (a cgroup freezer is in force).
fn in_sandbox_cgroup(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.contains("/agent-activator/"))
}

struct Activator {
    child: Child,
    admin: SocketAddr,
}

/// Runs `agent-activator serve` with a warm pool of 2 sandboxes, each of which starts a
/// `sleep` grandchild in its process group (a grandchild gets no parent-death signal).
async fn serve(dir: &Path) -> Activator {
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nlog: {{format: json}}\nbackend:\n  kind: process\n  command: [\"sh\", \"-c\", \"sleep 300 & exec \\\"$0\\\" demo-sandbox --port \\\"$1\\\"\", \"{{self}}\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  warm_pool: 2\n  stop_grace: 2s\n  isolation: none\nautoscaler:\n  enabled: false\n",
        dir.join("work").display()
    );
    let path = dir.join("activator.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (_, admin) = support::listening_addrs(child.stderr.take().unwrap()).await;
    Activator { child, admin }
}

/// Waits for two warm sandboxes; returns every process of their trees.
async fn warm_trees(a: &Activator) -> Vec<u32> {
    let admin = HttpClient::http1(a.admin);
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(a.admin).await.is_err() {
        assert!(
            tokio::time::Instant::now() < end,
            "admin listener not up in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        assert!(tokio::time::Instant::now() < end, "no warm pool in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok(reply) =
            tokio::time::timeout(Duration::from_secs(2), admin.get("/api/sandboxes", &[])).await
        else {
            continue;
        };
        let rows = reply.json()["sandboxes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let warm: Vec<u32> = rows
            .iter()
            .filter(|r| r["state"] == "warm")
            .filter_map(|r| r["pid"].as_u64().map(|p| p as u32))
            .collect();
        if warm.len() == 2 {
            let mut all = warm.clone();
            for pid in warm {
                let members = group_members(pid);
                assert_eq!(members.len(), 1, "the sleep grandchild of {pid}");
                all.extend(members);
            }
            return all;
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aa-orphans-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_stopped_activator_takes_its_sandboxes_with_it() {
    let dir = scratch("term");
    let mut a = serve(&dir).await;
    let procs = warm_trees(&a).await;
    kill(Pid::from_raw(a.child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), a.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    for pid in &procs {
        assert!(!alive(*pid), "{pid} outlived a stopped activator");
    }
    let left: Vec<_> = std::fs::read_dir(dir.join("work")).unwrap().collect();
    assert!(left.is_empty(), "workdirs left: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_killed_activator_takes_its_sandboxes_with_it_and_the_next_run_sweeps_the_rest() {
    let dir = scratch("kill");
    let mut a = serve(&dir).await;
    let procs = warm_trees(&a).await;
    let (leaders, grandchildren) = (&procs[..2], &procs[2..]);
    let cgroups = in_sandbox_cgroup(leaders[0]);
    a.child.kill().await.unwrap(); // SIGKILL: no shutdown code runs
    eventually(
        "the sandboxes die with their parent (PR_SET_PDEATHSIG)",
        || leaders.iter().all(|p| !alive(*p)),
    )
    .await;

    // Grandchildren get no parent-death signal: the reaper kills what was left in the
    // crashed run's cgroups; with signals only, the next run's sweep does.
    if cgroups {
        eventually("the reaper kills the grandchildren too", || {
            grandchildren.iter().all(|p| !alive(*p))
        })
        .await;
    } else {
        assert!(
            grandchildren.iter().all(|p| alive(*p)),
            "without cgroups, grandchildren outlive the crash until swept"
        );
    }
    let mut next = serve(&dir).await;
    let fresh = warm_trees(&next).await;
    eventually("the crashed run's grandchildren are swept", || {
        grandchildren.iter().all(|p| !alive(*p))
    })
    .await;
    let stale: Vec<_> = std::fs::read_dir(dir.join("work"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        stale.len(),
        1,
        "only the running instance's workdir is left: {stale:?}"
    );
    next.child.kill().await.unwrap();
    eventually("the second run's sandboxes die too", || {
        fresh[..2].iter().all(|p| !alive(*p))
    })
    .await;
    // Leave nothing behind for other tests: one more start sweeps the second run.
    let mut last = serve(&dir).await;
    warm_trees(&last).await;
    kill(
        Pid::from_raw(last.child.id().unwrap() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), last.child.wait()).await;
    eventually("swept", || fresh.iter().all(|p| !alive(*p))).await;
    std::fs::remove_dir_all(&dir).unwrap();
}
