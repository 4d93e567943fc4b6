//! Preview URLs on the process backend end to end (issue 23 with issue 20's isolation):
//! every demo sandbox runs its own "dev server" on port 5173 inside its own network
//! namespace; `preview.ports` are forwarded per sandbox (`backend.expose_ports`), so a
//! preview of alice reaches alice's 5173 and a preview of bob bob's, never the other, and a
//! preview request thaws a frozen sandbox.

use crate::support;

use support::HttpClient;

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt); build.rs probe"
)]
async fn each_sessions_preview_reaches_its_own_sandboxs_port_5173() {
    let dir = std::env::temp_dir().join(format!("aa-preview-process-{}", std::process::id()));
    let server = support::start(&format!(
        "backend:\n  kind: process\n  isolation: namespaces\n  egress: none\n  \
         command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\", \"--dev-port\", \"5173\"]\n  \
         workdir_root: '{}'\n  warm_pool: 0\n  stop_grace: 1s\n\
         idle: {{timeout: 10m, policy: pause}}\nautoscaler: {{enabled: false}}\n\
         preview: {{domain: preview.localhost, ports: [5173], access: public}}\n",
        dir.display()
    ))
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let mut seen = Vec::new();
    for who in ["alice", "bob"] {
        let main = proxy.get_session("/state", who).await;
        assert_eq!(main.status, 200, "{}", main.text());
        let instance = main.json()["instance"].clone();
        let minted = admin
            .call("POST", &format!("/api/sessions/{who}/previews"))
            .await;
        assert_eq!(minted.status, 201, "{}", minted.text());
        let id = minted.json()["preview"].as_str().unwrap().to_owned();
        let host = format!("5173-{id}.preview.localhost");
        let dev = support::eventually(&format!("{who}'s dev server"), || {
            let (proxy, host) = (proxy.clone(), host.clone());
            async move {
                let r = proxy.get("/x", &[("host", &host)]).await;
                (r.status == 200).then(|| r.json())
            }
        })
        .await;
        assert_eq!(dev["port"], 5173, "{dev}");
        assert_eq!(dev["instance"], instance, "{who}'s own sandbox");
        let page = proxy.get("/", &[("host", &host)]).await;
        assert!(
            page.text().contains("dev server on port 5173"),
            "{}",
            page.text()
        );
        seen.push((who, host, instance));
    }
    assert_ne!(seen[0].2, seen[1].2, "two sandboxes");
    // A frozen sandbox is thawed by a preview request, memory intact.
    assert_eq!(
        admin.call("POST", "/api/sessions/alice/pause").await.status,
        200
    );
    let r = proxy.get("/x", &[("host", &seen[0].1)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("resume"));
    assert_eq!(r.json()["instance"], seen[0].2);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
