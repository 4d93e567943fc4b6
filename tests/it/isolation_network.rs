//! Issue 20: each isolated sandbox has its own network namespace. With `egress: internet`
//! it reaches a test host through pasta's NAT but not a link-local address or the host's
//! loopback (the admin port); with `egress: none` it reaches nothing but itself. The
//! exposed ports of `backend.expose_ports` are forwarded per sandbox (`port_endpoint`):
//! two sandboxes both listening on port 3000 are each reached at their own address.
//!
//! Network safety: the only outside host is one this test makes, a network namespace with
//! a veth pair and addresses from the benchmarking range 198.18.0.0/15 and a link-local
//! /32, removed when the test ends (also on panic).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use agent_activator::backend::process::ProcessBackend;
use agent_activator::backend::{ClaimBudget, SandboxBackend};
use agent_activator::config::Config;
use agent_activator::metrics::Metrics;
use agent_activator::session::SessionKey;

use crate::isolation_escape::{BIN, PRELUDE, attack, outcome, sandboxes, scratch, waiter_command};
use crate::support;

use support::HttpClient;

/// Where the test host listens, in its own namespace.
const HOST_PORT: u16 = 18080;

/// A host in a network namespace of the test's own: `addr` (198.18.k.2) and a
/// link-local `link_local` (169.254.k.2) on a veth pair to the host, both serving the demo
/// sandbox on [`HOST_PORT`].
struct TestHost {
    ns: String,
    addr: Ipv4Addr,
    link_local: Ipv4Addr,
    server: Option<std::process::Child>,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    fn new(tag: u8) -> TestHost {
        let k = (std::process::id() % 100) as u8 * 2 + tag;
        let ns = format!("aa-iso-{tag}-{}", std::process::id());
        let (vh, vn) = (format!("aaih{k}"), format!("aain{k}"));
        let addr = Ipv4Addr::new(198, 18, k, 2);
        let link_local = Ipv4Addr::new(169, 254, k, 2);
        let mut host = TestHost {
            ns: ns.clone(),
            addr,
            link_local,
            server: None,
        };
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &vh, "type", "veth", "peer", "name", &vn, "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("198.18.{k}.1/30"), "dev", &vh]);
        ip(&["link", "set", &vh, "up"]);
        ip(&["route", "add", &format!("{link_local}/32"), "dev", &vh]);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/30"), "dev", &vn]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{link_local}/32"),
            "dev",
            &vn,
        ]);
        ip(&["-n", &ns, "link", "set", &vn, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "dev", &vn]);
        host.server = Some(
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    BIN,
                    "demo-sandbox",
                    "--host",
                    "0.0.0.0",
                ])
                .args(["--port", &HOST_PORT.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        host
    }

    /// Both addresses answer from the host itself (the control for "blocked").
    async fn wait_serving(&self) {
        for a in [self.addr, self.link_local] {
            let to = SocketAddr::from((a, HOST_PORT));
            support::eventually(&format!("the test host on {to}"), || async move {
                tokio::net::TcpStream::connect(to).await.ok().map(|_| ())
            })
            .await;
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Deleting the namespace deletes its veth end, and so the pair and its routes.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

async fn egress_probe(egress: &str, tag: u8) -> String {
    let host = TestHost::new(tag);
    host.wait_serving().await;
    let root = scratch(&format!("egress-{egress}"));
    let server = support::start(&format!(
        "backend:\n  kind: process\n  isolation: namespaces\n  egress: {egress}\n  {cmd}\n  \
         workdir_root: '{work}'\n  warm_pool: 1\n  stop_grace: 1s\nautoscaler:\n  enabled: false\n",
        cmd = waiter_command(),
        work = root.join("work").display(),
    ))
    .await;
    let admin = HttpClient::http1(server.admin_addr());
    let sbx = sandboxes(&admin, &[], &root.join("work"), "warm", 1).await;
    let script = format!(
        "{PRELUDE}\
         try own_port connect 127.0.0.1 \"$PORT\"\n\
         try test_host connect {addr} {HOST_PORT}\n\
         try link_local connect {ll} {HOST_PORT}\n\
         try admin_port connect 127.0.0.1 {admin_port}\n\
         try admin_port_v6 connect ::1 {admin_port}\n",
        addr = host.addr,
        ll = host.link_local,
        admin_port = server.admin_addr().port(),
    );
    let out = attack(&sbx[0].workdir, &script).await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(root);
    drop(host);
    out
}

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt; /dev/net/tun mode 0666); build.rs probe"
)]
async fn egress_internet_reaches_a_host_but_not_link_local_or_host_loopback() {
    let out = egress_probe("internet", 0).await;
    for (probe, want) in [
        ("own_port", "reached"),
        ("test_host", "reached"),
        ("link_local", "blocked"),
        ("admin_port", "blocked"),
        ("admin_port_v6", "blocked"),
    ] {
        assert_eq!(outcome(&out, probe), want, "{probe}:\n{out}");
    }
}

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt; /dev/net/tun mode 0666); build.rs probe"
)]
async fn egress_none_reaches_nothing_outside_the_sandbox() {
    let out = egress_probe("none", 1).await;
    for (probe, want) in [
        ("own_port", "reached"),
        ("test_host", "blocked"),
        ("link_local", "blocked"),
        ("admin_port", "blocked"),
    ] {
        assert_eq!(outcome(&out, probe), want, "{probe}:\n{out}");
    }
}

/// `GET /state` over HTTP/1.0, `None` until something answers 200 (the port-3000 server
/// may still be starting: pasta accepts and closes until it listens).
async fn try_state(addr: SocketAddr) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /state HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200"))
        .then(|| serde_json::from_str(body).ok())
        .flatten()
}

fn key(s: &str) -> SessionKey {
    SessionKey::parse(s, 128).unwrap()
}

fn budget() -> ClaimBudget {
    let now = tokio::time::Instant::now();
    ClaimBudget {
        admission_deadline: now + Duration::from_secs(20),
        deadline: now + Duration::from_secs(30),
    }
}

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt; /dev/net/tun mode 0666); build.rs probe"
)]
async fn exposed_ports_reach_each_sandbox_in_its_own_namespace() {
    let root = scratch("expose");
    // Each sandbox serves its {port} and, like a dev server, a fixed port 3000.
    let cfg = Config::from_yaml(&format!(
        "backend:\n  kind: process\n  isolation: namespaces\n  egress: none\n  \
         command: [\"sh\", \"-c\", \"\\\"$0\\\" demo-sandbox --port 3000 & exec \\\"$0\\\" demo-sandbox --port \\\"$1\\\"\", \"{BIN}\", \"{{port}}\"]\n  \
         workdir_root: '{}'\n  expose_ports: [3000]\n  stop_grace: 1s\n",
        root.display()
    ))
    .unwrap();
    let b = Arc::new(
        ProcessBackend::new(&cfg, Arc::new(Metrics::new()))
            .await
            .unwrap(),
    );
    let one = b.claim(&key("p1"), budget()).await.unwrap();
    let two = b.claim(&key("p2"), budget()).await.unwrap();
    let (e1, e2) = (
        b.port_endpoint(&one.sandbox, 3000).expect("exposed"),
        b.port_endpoint(&two.sandbox, 3000).expect("exposed"),
    );
    assert_ne!(e1, e2, "one host port per sandbox");
    assert!(e1.ip().is_loopback() && e2.ip().is_loopback());
    assert_eq!(b.port_endpoint(&one.sandbox, 3001), None, "not exposed");
    let mut instances = Vec::new();
    for e in [e1, e2] {
        let state = support::eventually(&format!("port 3000 via {e}"), || try_state(e)).await;
        assert_eq!(state["port"], 3000, "{state}");
        instances.push(state["instance"].clone());
    }
    assert_ne!(instances[0], instances[1], "each sandbox's own port 3000");
    // The main port is still the sandbox's own.
    let main = HttpClient::http1(one.endpoint)
        .get("/state", &[])
        .await
        .json();
    assert_eq!(main["port"], one.endpoint.port());
    b.shutdown().await;
    assert_eq!(
        b.port_endpoint(&one.sandbox, 3000),
        None,
        "gone with the sandbox"
    );
    let _ = std::fs::remove_dir_all(root);
}
