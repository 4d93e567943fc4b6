//! Real processes for the smoke tests: demo sandboxes, the activator, and the
//! `activator-loadtest` binary itself, each with a bounded wait.

#![allow(dead_code)] // Each test file uses its own subset.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Longest a loadtest invocation may take in a test before it is killed.
const RUN_BOUND: Duration = Duration::from_secs(180);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("loadtest/ sits in the workspace")
        .to_path_buf()
}

/// The `agent-activator` binary: `$AGENT_ACTIVATOR_BIN`, else `target/debug/` of the
/// workspace (or `$CARGO_TARGET_DIR`), always brought up to date with `cargo build` first
/// (a no-op when fresh): a stale binary left from an older checkout would test old code.
pub fn activator_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("AGENT_ACTIVATOR_BIN") {
            return PathBuf::from(p);
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        let bin = target.join("debug").join("agent-activator");
        {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut child = Command::new(cargo)
                .args(["build", "--quiet", "--bin", "agent-activator"])
                .current_dir(workspace_root())
                .spawn()
                .expect("spawn cargo build");
            let status = wait_bounded(&mut child, Duration::from_secs(900))
                .expect("cargo build --bin agent-activator finished within 15 minutes");
            assert!(status.success(), "cargo build --bin agent-activator failed");
        }
        bin
    })
    .clone()
}

/// Waits for `child` up to `bound`; kills it and returns `None` past that.
pub fn wait_bounded(child: &mut Child, bound: Duration) -> Option<std::process::ExitStatus> {
    let step = Duration::from_millis(20);
    for _ in 0..=bound.as_millis() / step.as_millis() {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(step);
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A child that prints `listening on ADDR` when ready; killed on drop.
pub struct Listening {
    child: Child,
    addr: SocketAddr,
}

impl Listening {
    /// Starts `bin args` and waits up to 30 s for its `listening on` line.
    pub fn start(bin: &Path, args: &[&str]) -> Listening {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(addr) = line.trim().strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                    sent = true;
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "{} {args:?} did not say `listening on` within 30 s",
                    bin.display()
                );
            }
        };
        Listening { child, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `agent-activator demo-sandbox --port 0`.
pub struct DemoSandbox(Listening);

impl DemoSandbox {
    pub fn start() -> DemoSandbox {
        DemoSandbox(Listening::start(
            &activator_bin(),
            &["demo-sandbox", "--port", "0"],
        ))
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr()
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// `GET /state` straight from the sandbox (no session header).
    pub fn state(&self) -> Value {
        http_get_json(self.addr(), "/state")
    }
}

/// `agent-activator serve` on loopback ports the kernel picks, with the YAML `body`
/// (everything but `listen`, `admin_listen` and `log`); killed on drop.
pub struct Activator {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Activator {
    /// Starts the activator on port 0 for both listeners and reads the addresses it bound
    /// from its JSON "listening" log line (at most 30 s): no port is guessed in advance, so
    /// parallel tests cannot race for one. Later log lines are drained by a thread.
    pub fn start(body: &str) -> Activator {
        let config = temp_file(
            "activator.yaml",
            &format!(
                "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n\
                 log: {{format: json, level: info, access_log: false}}\n{body}"
            ),
        );
        let mut child = Command::new(activator_bin())
            .args(["serve", "-c", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent-activator serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let json: Value = serde_json::from_str(&line).unwrap_or_default();
                if let (Some(p), Some(a)) =
                    (json["proxy_addr"].as_str(), json["admin_addr"].as_str())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send((p.parse().unwrap(), a.parse().unwrap()));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((addr, admin)) => Activator { child, addr, admin },
            Err(_) => {
                let _ = child.kill();
                let exited = child.wait().ok();
                panic!("agent-activator did not report listening within 30 s (exit: {exited:?})");
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Activator {
    /// SIGTERM first, so a process backend stops its sandboxes; SIGKILL after 10 s.
    fn drop(&mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if term.is_err() || wait_bounded(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A blocking HTTP/1.1 GET with `Connection: close`, bounded by 10 s; returns the JSON body.
pub fn http_get_json(addr: SocketAddr, path: &str) -> Value {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// A fresh file under the temp dir with `contents`.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loadtest-smoke-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, contents).unwrap();
    path
}

/// Runs `activator-loadtest args`; returns (exit code, stdout + stderr).
pub fn run_raw(args: &[&str]) -> (i32, String) {
    let out_file = temp_file("output.txt", "");
    let out = std::fs::File::create(&out_file).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_activator-loadtest"))
        .args(args)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn activator-loadtest");
    let status = wait_bounded(&mut child, RUN_BOUND);
    let text = std::fs::read_to_string(&out_file).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("activator-loadtest ran past {RUN_BOUND:?}:\n{text}"));
    (status.code().unwrap_or(-1), text)
}

/// Runs `activator-loadtest args --json FILE --html FILE`; returns (exit code, the JSON
/// report, the output). Checks the HTML report was written and is self-contained.
pub fn run_loadtest(args: &[&str]) -> (i32, Value, String) {
    let json = temp_file("report.json", "");
    let html = temp_file("report.html", "");
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]);
    let (code, text) = run_raw(&all);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap())
        .unwrap_or_else(|e| panic!("JSON report: {e}\n{text}"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg"), "HTML report has inline plots");
    assert!(
        !page.contains("<script src") && !page.contains("<link "),
        "no external assets"
    );
    (code, report, text)
}

/// Runs `mode` against one target `direct=URL` with `extra` flags (see [`run_loadtest`]).
pub fn run_direct(mode: &str, url: &str, extra: &[&str]) -> (i32, Value, String) {
    let target = format!("direct={url}");
    let mut args = vec![mode, "--target", target.as_str()];
    args.extend_from_slice(extra);
    run_loadtest(&args)
}

/// The section `name` of target `target` in a JSON report.
pub fn section<'a>(report: &'a Value, target: &str, name: &str) -> &'a Value {
    report["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["name"] == target)
        .unwrap_or_else(|| panic!("no target {target}"))["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no section {name} for {target}"))
}
