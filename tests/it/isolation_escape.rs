//! Issue 20: untrusted code in an isolated process sandbox tries to escape, from inside
//! real sandboxes of a running activator, and fails: it cannot read a mode-0600 host file
//! (even in a directory bound into it), `/etc/shadow`, the activator's HMAC key and admin
//! token files, another pool's volume by host path or another sandbox's working directory;
//! it cannot connect to another sandbox's port, the proxy or the admin port on 127.0.0.1;
//! its processes run as the unprivileged sandbox user on the host, never uid 0. Positive
//! controls in the same script (its own port, a readable file of `backend.ro_paths`, its
//! own workdir) prove each probe can succeed where it should.
//!
//! The helpers here (`Rig`, `attack`) are shared by `isolation_network` and
//! `isolation_limits`: each sandbox waits (bounded) for an `attack.sh` the test drops in
//! its working directory, runs it and leaves `result.txt` next to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_activator::backend::process::ProcessBackend;
use agent_activator::metrics::Metrics;
use agent_activator::server::RunningServer;

use crate::support;

use support::HttpClient;
use support::procs::group_members;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// Each sandbox's command: a bounded background wait (30 s) for `attack.sh` in its working
/// directory, run as the sandbox would run any code, then the demo sandbox on `$1`.
pub(crate) const WAITER: &str = "( i=0; while [ ! -e attack.sh ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; \
    [ -e attack.sh ] && sh attack.sh > attack.out 2>&1; mv attack.out result.txt ) & \
    exec \"$0\" demo-sandbox --port \"$1\"";

/// The argv line (`command: [...]`) that runs [`WAITER`].
pub(crate) fn waiter_command() -> String {
    format!(
        "command: [\"sh\", \"-c\", {:?}, \"{BIN}\", \"{{port}}\"]",
        WAITER
    )
}

/// A scratch directory (mode 0755, so the sandbox user may traverse what is bound).
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aa-isox-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One running sandbox as the admin API lists it, with its working directory.
#[derive(Debug, Clone)]
pub(crate) struct Sbx {
    pub port: u16,
    pub pid: u32,
    pub workdir: PathBuf,
}

/// `n` sandboxes in state `state` from `GET /api/sandboxes`, their workdirs found under
/// `workdir_root/<instance>/<id>`.
pub(crate) async fn sandboxes(
    admin: &HttpClient,
    auth: &[(&str, &str)],
    workdir_root: &Path,
    state: &str,
    n: usize,
) -> Vec<Sbx> {
    support::eventually(&format!("{n} {state} sandboxes"), || async {
        let rows = admin.get("/api/sandboxes", auth).await.json();
        let mut out = Vec::new();
        for r in rows["sandboxes"].as_array()? {
            if r["state"] != state {
                continue;
            }
            let id = r["id"].as_str()?;
            let port = r["endpoint"].as_str()?.rsplit(':').next()?.parse().ok()?;
            let pid = r["pid"].as_u64()? as u32;
            let workdir = std::fs::read_dir(workdir_root)
                .ok()?
                .flatten()
                .map(|i| i.path().join(id))
                .find(|p| p.is_dir())?;
            out.push(Sbx { port, pid, workdir });
        }
        (out.len() >= n).then_some(out)
    })
    .await
}

/// Runs `script` inside the sandbox of `workdir` (see [`WAITER`]) and returns its output.
pub(crate) async fn attack(workdir: &Path, script: &str) -> String {
    let tmp = workdir.join("attack.sh.tmp");
    std::fs::write(&tmp, script).unwrap();
    std::fs::rename(&tmp, workdir.join("attack.sh")).unwrap();
    let result = workdir.join("result.txt");
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&result) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no result from the sandbox in {}",
            workdir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shell prelude of an attack: `try NAME CMD...` prints `NAME: reached` or
/// `NAME: blocked`; `connect HOST PORT` is a bounded TCP connect (bash's /dev/tcp).
pub(crate) const PRELUDE: &str = "try() { name=$1; shift; if \"$@\" >/dev/null 2>&1; then echo \"$name: reached\"; else echo \"$name: blocked\"; fi; }\n\
    connect() { timeout 3 bash -c \"echo > /dev/tcp/$1/$2\"; }\n";

/// The outcome line of probe `name` in `out`.
pub(crate) fn outcome<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} line in:\n{out}"))
}

/// `(real, effective, saved, fs)` uids of `pid`.
pub(crate) fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The activator's secrets and a host file the sandbox must not read, beside a file of
/// `backend.ro_paths` it may.
struct Secrets {
    dir: PathBuf,
}

impl Secrets {
    fn new(dir: &Path) -> Secrets {
        use std::os::unix::fs::PermissionsExt;
        let private = |p: PathBuf, body: &str| {
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        private(
            dir.join("keys/hmac.key"),
            "hmac-secret-0123456789abcdefghijklmnopqrstuvwxyz",
        );
        private(dir.join("keys/admin.token"), "admin-token-0123456789");
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        std::fs::write(dir.join("shared/readable.txt"), "public").unwrap();
        private(dir.join("shared/secret-0600"), "host secret");
        // Another pool's session volume, laid out as the backend makes one: a 0700
        // directory per session hash, owned by the sandbox user (uid 65534, as here).
        let volume = dir.join("other-pool-volumes/0123456789abcdef/work");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(volume.join("data.txt"), "other pool's data").unwrap();
        for p in [volume.parent().unwrap(), &volume] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(p, Some(65534.into()), Some(65534.into())).unwrap();
        }
        Secrets {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }
}

fn escape_yaml(root: &Path, s: &Secrets) -> String {
    format!(
        "session:\n  auth: hmac\n  hmac:\n    keys:\n      - {{id: k1, secret_file: '{key}'}}\n\
         admin:\n  auth:\n    bearer_token_file: '{token}'\n\
         backend:\n  kind: process\n  isolation: namespaces\n  {cmd}\n  workdir_root: '{work}'\n  \
         volumes_root: '{vols}'\n  ro_paths: ['{shared}']\n  warm_pool: 2\n  stop_grace: 1s\n\
         autoscaler:\n  enabled: false\n",
        key = s.path("keys/hmac.key"),
        token = s.path("keys/admin.token"),
        cmd = waiter_command(),
        work = root.join("work").display(),
        vols = root.join("volumes").display(),
        shared = s.path("shared"),
    )
}

async fn start(yaml: &str) -> RunningServer {
    support::start(yaml).await
}

#[tokio::test]
#[cfg_attr(
    any(missing_bwrap, missing_pasta),
    ignore = "bubblewrap or pasta cannot make a sandbox here (apt-get install bubblewrap passt; /dev/net/tun mode 0666); build.rs probe"
)]
async fn untrusted_code_cannot_reach_host_secrets_other_sandboxes_or_the_admin_port() {
    let root = scratch("escape");
    let secrets = Secrets::new(&root);
    let server = start(&escape_yaml(&root, &secrets)).await;
    let admin = HttpClient::http1(server.admin_addr());
    let bearer = format!("Bearer {}", "admin-token-0123456789");
    let auth = [("authorization", bearer.as_str())];
    let sbx = sandboxes(&admin, &auth, &root.join("work"), "warm", 2).await;
    let (a, b) = (&sbx[0], &sbx[1]);

    let script = format!(
        "{PRELUDE}\
         try shadow cat /etc/shadow\n\
         try etc_passwd_host grep -q '^root:x:0:0:root:/root:/bin/bash' /etc/passwd\n\
         try secret_0600 cat '{secret}'\n\
         try ro_path_readable cat '{readable}'\n\
         try hmac_key cat '{key}'\n\
         try admin_token cat '{token}'\n\
         try other_pool_volume cat '{volume}'\n\
         try other_pool_volumes_root ls '{volumes_root}'\n\
         try other_workdir ls '{other_workdir}'\n\
         try own_workdir_writable touch own-file\n\
         try root_home ls /root\n\
         try etc_writable touch /etc/escape\n\
         try own_port connect 127.0.0.1 \"$PORT\"\n\
         try other_sandbox_port connect 127.0.0.1 {other_port}\n\
         try admin_port connect 127.0.0.1 {admin_port}\n\
         try proxy_port connect 127.0.0.1 {proxy_port}\n\
         echo \"inner_uid: $(id -u)\"\n",
        secret = secrets.path("shared/secret-0600"),
        readable = secrets.path("shared/readable.txt"),
        key = secrets.path("keys/hmac.key"),
        token = secrets.path("keys/admin.token"),
        volume = secrets.path("other-pool-volumes/0123456789abcdef/work/data.txt"),
        volumes_root = secrets.path("other-pool-volumes"),
        other_workdir = b.workdir.display(),
        other_port = b.port,
        admin_port = server.admin_addr().port(),
        proxy_port = server.proxy_addr().port(),
    );
    // Host uids of every process of both sandboxes (pasta, bubblewrap, its init, the
    // command and the waiter), read before the attack ends any of them.
    let mut pids = vec![a.pid, b.pid];
    pids.extend(group_members(a.pid));
    pids.extend(group_members(b.pid));
    let out = attack(&a.workdir, &script).await;

    for reached in ["ro_path_readable", "own_workdir_writable", "own_port"] {
        assert_eq!(
            outcome(&out, reached),
            "reached",
            "control {reached}:\n{out}"
        );
    }
    for blocked in [
        "shadow",
        "etc_passwd_host",
        "secret_0600",
        "hmac_key",
        "admin_token",
        "other_pool_volume",
        "other_pool_volumes_root",
        "other_workdir",
        "root_home",
        "etc_writable",
        "other_sandbox_port",
        "admin_port",
        "proxy_port",
    ] {
        assert_eq!(outcome(&out, blocked), "blocked", "{blocked}:\n{out}");
    }
    assert_eq!(outcome(&out, "inner_uid"), "1000", "{out}");
    assert!(
        pids.len() >= 6,
        "pasta, bwrap, init and command each: {pids:?}"
    );
    for pid in pids {
        let ids = uids(pid);
        // A process may have ended meanwhile (the waiter's sleep): then no line.
        if !ids.is_empty() {
            assert!(
                ids.iter().all(|&u| u == 65534),
                "host uids of {pid}: {ids:?} (want the sandbox user 65534, never 0)"
            );
        }
    }
    assert!(
        std::fs::metadata(a.workdir.join("own-file")).is_ok(),
        "the write landed in the host workdir"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(root);
}

/// An operator cannot bind a directory holding the activator's secrets into sandboxes,
/// and the sandbox user is never root.
#[tokio::test]
async fn ro_paths_with_a_secret_and_a_root_sandbox_user_are_startup_errors() {
    let root = scratch("ropaths");
    let secrets = Secrets::new(&root);
    let yaml = escape_yaml(&root, &secrets).replace(&secrets.path("shared"), &secrets.path("keys"));
    let cfg = agent_activator::config::Config::from_yaml(&yaml).unwrap();
    let err = ProcessBackend::new(&cfg, Arc::new(Metrics::new()))
        .await
        .err()
        .expect("a secret under ro_paths is refused")
        .to_string();
    assert!(err.contains("backend.ro_paths[0]"), "{err}");
    assert!(
        err.contains("hmac.key") || err.contains("admin.token"),
        "{err}"
    );
    let yaml = escape_yaml(&root, &secrets).replace("  warm_pool: 2\n", "  sandbox_user: root\n");
    let cfg = agent_activator::config::Config::from_yaml(&yaml).unwrap();
    let err = ProcessBackend::new(&cfg, Arc::new(Metrics::new()))
        .await
        .err()
        .expect("root is refused")
        .to_string();
    assert!(err.contains("backend.sandbox_user"), "{err}");
    let _ = std::fs::remove_dir_all(root);
}
