//! The real binary as `agent-activator serve` with JSON logs (`log.format: json`) on stderr:
//! started, read up to its listening line, and stopped by a signal with the rest of its log.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr};

/// How long a starting activator may take to log its listening line, and a signalled one to
/// exit (a drain included).
const START_STOP: Duration = Duration::from_secs(30);

/// The stderr of an activator process, line by line.
pub type LogLines = Lines<BufReader<ChildStderr>>;

/// Reads `stderr` up to the "agent-activator listening" JSON line and returns the proxy and
/// admin addresses it names (no port is guessed in advance: listen on port 0) with the line
/// reader, positioned after that line, for a test that asserts on what is logged later.
pub async fn listening_lines(stderr: ChildStderr) -> (SocketAddr, SocketAddr, LogLines) {
    let mut lines = BufReader::new(stderr).lines();
    let (proxy, admin) = until_listening(&mut lines, &mut Vec::new()).await;
    (proxy, admin, lines)
}

/// Reads `lines` up to the listening line (kept in `seen` with every line before it).
async fn until_listening(lines: &mut LogLines, seen: &mut Vec<String>) -> (SocketAddr, SocketAddr) {
    tokio::time::timeout(START_STOP, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the activator exited before listening");
            let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            seen.push(line);
            if let (Some(p), Some(a)) = (json["proxy_addr"].as_str(), json["admin_addr"].as_str()) {
                return (p.parse().unwrap(), a.parse().unwrap());
            }
        }
    })
    .await
    .expect("the activator logged its listening line within 30 s")
}

/// `agent-activator serve --config PATH` (with `RUST_LOG` unset, so the config's `log`
/// section decides), killed on drop. The config must set `log.format: json`.
pub struct ServeProcess {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    lines: LogLines,
    /// stderr up to and including the listening line.
    seen: Vec<String>,
}

impl ServeProcess {
    /// Starts the binary and waits for its listening line.
    pub async fn start(config: &Path) -> ServeProcess {
        Self::start_with(config, &[]).await
    }

    /// [`ServeProcess::start`] with more command-line arguments after `--config PATH`.
    pub async fn start_with(config: &Path, args: &[&str]) -> ServeProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent-activator"))
            .args(["serve", "--config"])
            .arg(config)
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn agent-activator serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let (proxy, admin) = until_listening(&mut lines, &mut seen).await;
        ServeProcess {
            child,
            proxy,
            admin,
            lines,
            seen,
        }
    }

    /// Sends `signal`, waits (bounded) for the exit, and returns the exit status and every
    /// line the process wrote to stderr, in order (read to its end).
    pub async fn stop(mut self, signal: Signal) -> (ExitStatus, Vec<String>) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().expect("still running") as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let status = tokio::time::timeout(START_STOP, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{signal} stops the activator within 30 s"))
            .unwrap();
        let mut logged = self.seen;
        tokio::time::timeout(START_STOP, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                logged.push(line);
            }
        })
        .await
        .expect("the exited activator's stderr closes");
        (status, logged)
    }
}

/// The access log lines (JSON, `target: access`) among `logged`, in order.
pub fn access_lines(logged: &[String]) -> Vec<serde_json::Value> {
    logged
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| j["target"] == "access")
        .collect()
}
