//! Containment of process sandboxes with real processes: release kills a grandchild that
//! ignores SIGTERM (the group is killed while its leader is still unreaped), and the
//! per-sandbox cgroup limits hold: a fork loop stops at `pids_max`, an allocation over
//! `memory_max` is OOM-killed and reported lost, `cpu_weight` lands in the cgroup, and a
//! limit no hierarchy can enforce stops the start naming its key.
//!
//! The limit tests need the memory, pids and cpu controllers (cgroup v1 hierarchies, or the
//! v2 hierarchy with them): without them they are reported ignored, under `CI=true` they
//! run and fail. The sandbox is a small Perl HTTP server (single-threaded, so its task count
//! is exact).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_activator::backend::process::ProcessBackend;
use agent_activator::backend::{BackendEvent, ClaimBudget, SandboxBackend, SandboxId};
use agent_activator::config::Config;
use agent_activator::metrics::Metrics;
use agent_activator::session::SessionKey;
use tokio::time::Instant;

use crate::support;

use support::procs::{alive, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// Forks up to `$ARGV[1]` sleeping children (stopping at the first refused fork), writes how
/// many it got to `forks.txt`, then answers HTTP: `GET /alloc` first allocates 512 MiB,
/// `GET /forkbomb` first starts a shell fork bomb beside the server (`isolation_limits`).
pub(crate) const SERVER: &str = r#"use IO::Socket::INET;
my $n = 0;
for (1..$ARGV[1]) { my $p = fork(); last unless defined $p; if ($p == 0) { sleep 300; exit 0 } $n++ }
open(my $f, '>', 'forks.txt') or die; print $f $n; close $f;
my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $ARGV[0], Listen => 16, ReuseAddr => 1) or die "listen: $!";
while (my $c = $s->accept) {
  my $first = <$c>;
  while (my $l = <$c>) { last if $l =~ /^\r?\n$/ }
  # A variable size: a constant `'x' x N` would be folded (allocated) at compile time.
  if ($first =~ m{^GET /alloc}) { my $mib = 512; my $x = 'x' x ($mib * 1024 * 1024); }
  if ($first =~ m{^GET /forkbomb}) { if (defined(my $p = fork())) { if ($p == 0) { exec('sh', '-c', 'b() { b | b & }; b'); exit 1 } } }
  print $c "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
  close $c;
}"#;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aa-limits-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(yaml: &str) -> Config {
    Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// The Perl sandbox (trying `forks` children) with `extra` backend keys.
fn perl_config(dir: &Path, forks: u32, extra: &str) -> Config {
    let script = serde_json::to_string(SERVER).unwrap();
    config(&format!(
        "backend:\n  kind: process\n  command: [\"perl\", \"-e\", {script}, \"{{port}}\", \"{forks}\"]\n  workdir_root: \"{}\"\n  ready_path: /healthz\n  stop_grace: 2s\n  isolation: none\n{extra}",
        dir.display()
    ))
}

async fn backend(cfg: &Config) -> Arc<ProcessBackend> {
    Arc::new(
        ProcessBackend::new(cfg, Arc::new(Metrics::new()))
            .await
            .unwrap_or_else(|e| panic!("backend: {e}")),
    )
}

fn key(s: &str) -> SessionKey {
    SessionKey::parse(s, 128).unwrap()
}

fn budget() -> ClaimBudget {
    let now = Instant::now();
    ClaimBudget {
        admission_deadline: now + Duration::from_secs(20),
        deadline: now + Duration::from_secs(40),
    }
}

fn leader(b: &ProcessBackend, id: &SandboxId) -> u32 {
    b.sandboxes()
        .into_iter()
        .find(|r| &r.id == id)
        .and_then(|r| r.pid)
        .expect("a running sandbox")
}

/// The directory of `pid`'s cgroup in the v1 hierarchy of `controller`.
pub(crate) fn v1_cgroup(pid: u32, controller: &str) -> PathBuf {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = own
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
        .unwrap_or_else(|| panic!("{pid} has no {controller} cgroup:\n{own}"));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = info
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let post: Vec<&str> = post.split(' ').collect();
            (post[0] == "cgroup" && post[2].split(',').any(|o| o == controller))
                .then(|| pre.split(' ').nth(4).unwrap().to_owned())
        })
        .unwrap();
    PathBuf::from(mount).join(path.trim_start_matches('/'))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

async fn finish(b: &ProcessBackend, dir: &Path) {
    b.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn release_kills_a_grandchild_that_ignores_sigterm() {
    for freezer in ["auto", "signal"] {
        let dir = scratch(&format!("grandchild-{freezer}"));
        let pidfile = dir.join("grandchild.pid");
        // The grandchild ignores SIGTERM (inherited SIG_IGN survives exec); `sh` then execs
        // the demo sandbox, which stays the group leader and exits on SIGTERM.
        let cfg = config(&format!(
            "backend:\n  kind: process\n  command: [\"sh\", \"-c\", \"(trap '' TERM; exec sleep 300) & echo $! > \\\"$2\\\"; exec \\\"$0\\\" demo-sandbox --port \\\"$1\\\"\", \"{BIN}\", \"{{port}}\", \"{}\"]\n  workdir_root: \"{}\"\n  stop_grace: 5s\n  isolation: none\n  freezer: {freezer}\n",
            pidfile.display(),
            dir.join("work").display()
        ));
        let b = backend(&cfg).await;
        let bind = b.claim(&key("g"), budget()).await.unwrap();
        let pid = leader(&b, &bind.sandbox);
        let grandchild: u32 = read(&pidfile).parse().unwrap();
        assert!(alive(grandchild), "{freezer}: the grandchild runs");
        let sigign = std::fs::read_to_string(format!("/proc/{grandchild}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:").map(|v| v.trim().to_owned()))
            .unwrap();
        let ignored = u64::from_str_radix(&sigign, 16).unwrap();
        assert_ne!(
            ignored & (1 << (15 - 1)),
            0,
            "{freezer}: SIGTERM is ignored"
        );
        let started = Instant::now();
        b.release(&key("g"), &bind.sandbox).await.unwrap();
        eventually("leader and SIGTERM-proof grandchild are gone", || {
            !alive(pid) && !alive(grandchild)
        })
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{freezer}: killed right after the leader exited, not after stop_grace"
        );
        eventually("the sandbox left the table", || b.sandboxes().is_empty()).await;
        finish(&b, &dir).await;
    }
}

#[tokio::test]
#[cfg_attr(
    missing_cgroup_limits,
    ignore = "no memory/pids/cpu cgroup controllers (cgroup v1 hierarchies or v2)"
)]
async fn a_fork_loop_stops_at_pids_max_and_cpu_weight_lands_in_the_cgroup() {
    let dir = scratch("pids");
    let b = backend(&perl_config(&dir, 64, "  pids_max: 8\n  cpu_weight: 50\n")).await;
    let bind = b.claim(&key("p"), budget()).await.unwrap();
    let pid = leader(&b, &bind.sandbox);
    let workdir = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    let forks: u32 = read(&workdir.join("forks.txt")).parse().unwrap();
    assert_eq!(forks, 7, "the leader plus 7 children fill pids_max 8");
    let unified = read(Path::new(&format!("/proc/{pid}/cgroup")));
    if Path::new("/sys/fs/cgroup/pids").exists() {
        let pids = v1_cgroup(pid, "pids");
        assert_eq!(read(&pids.join("pids.max")), "8");
        assert_eq!(read(&pids.join("pids.current")), "8");
        let cpu = v1_cgroup(pid, "cpu");
        assert_eq!(
            read(&cpu.join("cpu.shares")),
            "512",
            "weight 50 -> shares 512"
        );
    } else {
        let rel = unified
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .trim_start_matches('/');
        let cg = Path::new("/sys/fs/cgroup").join(rel);
        assert_eq!(read(&cg.join("pids.max")), "8");
        assert_eq!(read(&cg.join("cpu.weight")), "50");
    }
    b.release(&key("p"), &bind.sandbox).await.unwrap();
    eventually("the sandbox left the table", || b.sandboxes().is_empty()).await;
    finish(&b, &dir).await;
}

#[tokio::test]
#[cfg_attr(
    missing_cgroup_limits,
    ignore = "no memory/pids/cpu cgroup controllers (cgroup v1 hierarchies or v2)"
)]
async fn an_allocation_over_memory_max_is_oom_killed_and_reported_lost() {
    let dir = scratch("oom");
    let b = backend(&perl_config(&dir, 0, "  memory_max: 64Mi\n")).await;
    let mut events = b.subscribe();
    let bind = b.claim(&key("m"), budget()).await.unwrap();
    let endpoint = bind.endpoint;
    // The sandbox answers below its limit...
    let ok = tokio::time::timeout(Duration::from_secs(10), raw_get(endpoint, "/healthz"))
        .await
        .unwrap();
    assert_eq!(ok.as_deref().ok(), Some("ok"));
    // ...and dies allocating 512 MiB past its 64 MiB.
    let alloc = tokio::time::timeout(Duration::from_secs(20), raw_get(endpoint, "/alloc"))
        .await
        .expect("the allocation ends");
    assert!(
        alloc.is_err(),
        "no answer from an OOM-killed sandbox: {alloc:?}"
    );
    let lost = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await.unwrap() {
                BackendEvent::Lost { sandbox, reason } if sandbox == bind.sandbox => {
                    return reason;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("a Lost event");
    assert!(lost.contains("SIGKILL"), "{lost}");
    eventually("the dead sandbox left the table", || {
        b.sandboxes().is_empty()
    })
    .await;
    finish(&b, &dir).await;
}

/// One HTTP/1.0-style GET; the body, or the I/O error.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!("no 200: {out:?}"))),
    }
}

#[tokio::test]
async fn a_limit_that_cannot_be_enforced_stops_the_start_naming_its_key() {
    let dir = scratch("unenforceable");
    let cfg = perl_config(&dir, 0, "  freezer: signal\n  memory_max: 64Mi\n");
    let err = ProcessBackend::new(&cfg, Arc::new(Metrics::new()))
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(text.contains("backend.memory_max"), "{text}");
    assert!(text.contains("signal"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
