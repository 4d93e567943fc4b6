//! Issue 20: an isolated sandbox's fork bomb and memory hog stay inside it. Three
//! sandboxes of one running activator (small limits: `pids_max: 32`, `memory_max: 64Mi`):
//! one runs a shell fork bomb, held at its pids limit, while a neighbour keeps answering
//! through the proxy and the admin API keeps serving; another allocates 512 MiB, is
//! OOM-killed, counted in `activator_sandbox_oom_kills_total`, reported as `lost` with
//! reason `oom` on the event stream, and its session answers as `on_sandbox_loss: fail`
//! says (one 502 `sandbox_lost`, then a fresh sandbox). Everything ends with the test.
//!
//! The sandbox is `process_limits`' single-threaded Perl server (exact task counts).

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use agent_activator::session::SessionKey;

use crate::events::subscribe;
use crate::isolation_escape::scratch;
use crate::process_limits::{SERVER, v1_cgroup};
use crate::support;

use support::HttpClient;
use support::procs::group_members;

const PIDS_MAX: usize = 32;

fn yaml(root: &Path) -> String {
    let script = serde_json::to_string(SERVER).unwrap();
    format!(
        "backend:\n  kind: process\n  isolation: namespaces\n  egress: none\n  \
         command: [\"perl\", \"-e\", {script}, \"{{port}}\", \"0\"]\n  workdir_root: '{}'\n  \
         ready_path: /healthz\n  stop_grace: 1s\n  memory_max: 64Mi\n  pids_max: {PIDS_MAX}\n  \
         cpu_weight: 100\nautoscaler:\n  enabled: false\n",
        root.display()
    )
}

/// `max` of the pids cgroup's `pids.events` (refused forks) of the sandbox led by
/// `leader`: v1 hierarchy on hybrid hosts, else the unified one.
fn refused_forks(leader: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{leader}/cgroup")).unwrap_or_default();
    let dir = if own.lines().any(|l| {
        l.split(':')
            .nth(1)
            .is_some_and(|c| c.split(',').any(|c| c == "pids"))
    }) {
        v1_cgroup(leader, "pids")
    } else {
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/");
        Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))
    };
    std::fs::read_to_string(dir.join("pids.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn leader_of(rows: &serde_json::Value, sandbox: &str) -> u32 {
    rows["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == sandbox)
        .and_then(|r| r["pid"].as_u64())
        .expect("the sandbox's leader") as u32
}

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt; /dev/net/tun mode 0666); build.rs probe"
)]
async fn a_fork_bomb_and_a_memory_hog_stay_in_their_sandboxes() {
    let root = scratch("limits");
    let server = support::start(&yaml(&root)).await;
    let c = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    for s in ["neighbour", "bomb", "hog"] {
        let r = c.get_session("/healthz", s).await;
        assert_eq!(r.status, 200, "{s}: {}", r.text());
    }
    let sandbox_of = |s: &str| SessionKey::parse(s, 128).unwrap().short_hash();
    let sessions = admin.get("/api/sessions", &[]).await.json();
    let bound = |s: &str| {
        sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["session"] == sandbox_of(s).as_str())
            .and_then(|r| r["sandbox"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("{s} is bound: {sessions}"))
    };
    let bomb_leader = leader_of(
        &admin.get("/api/sandboxes", &[]).await.json(),
        &bound("bomb"),
    );

    // The fork bomb: held at the limit while the neighbour and the admin API answer.
    assert_eq!(c.get_session("/forkbomb", "bomb").await.status, 200);
    let end = Instant::now() + Duration::from_secs(3);
    let mut most = 0;
    while Instant::now() < end || refused_forks(bomb_leader) == 0 {
        assert!(
            Instant::now() < end + Duration::from_secs(10),
            "the bomb never reached pids_max"
        );
        let tasks = group_members(bomb_leader).len() + 1;
        most = most.max(tasks);
        assert!(tasks <= PIDS_MAX, "{tasks} processes in the bombed sandbox");
        let t = Instant::now();
        let r = c.get_session("/healthz", "neighbour").await;
        assert_eq!(r.status, 200, "neighbour: {}", r.text());
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "neighbour took {:?}",
            t.elapsed()
        );
        assert_eq!(admin.get("/healthz", &[]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused_forks(bomb_leader) > 0,
        "forks were refused at pids_max"
    );

    // The memory hog: OOM-killed inside its sandbox, seen on the event stream.
    let mut events = subscribe(&admin, None).await;
    let hog = c.get_session("/alloc", "hog").await;
    assert_ne!(
        hog.status,
        200,
        "the allocation cannot succeed: {}",
        hog.text()
    );
    let mut seen = None;
    for _ in 0..200 {
        let e = events.next().await;
        if e.data["kind"] == "lost" && e.data["session"] == sandbox_of("hog").as_str() {
            seen = Some(e.data);
            break;
        }
    }
    let lost = seen.expect("a lost event for the hog's session");
    assert_eq!(lost["reason"], "oom", "{lost}");
    let oom_kills = support::eventually("the OOM kill counted", || async {
        let text = admin.get("/metrics", &[]).await.text();
        text.lines()
            .filter(|l| l.starts_with("activator_sandbox_oom_kills_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .find(|v| *v >= 1.0)
    })
    .await;
    assert!(oom_kills >= 1.0);
    // on_sandbox_loss: fail: the session hears of it once, then starts over.
    let after = c.get_session("/healthz", "hog").await;
    assert_eq!(
        (after.status.as_u16(), after.error_code()),
        (502, "sandbox_lost".into())
    );
    assert_eq!(c.get_session("/healthz", "hog").await.status, 200);
    // The neighbour never noticed.
    assert_eq!(c.get_session("/healthz", "neighbour").await.status, 200);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(root);
}
