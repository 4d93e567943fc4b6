//! "Pods": real local `agent-activator demo-sandbox` processes standing in for sandbox pods.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running demo-sandbox process; killed when dropped.
#[derive(Debug)]
pub struct PodProcess {
    pub port: u16,
    pub pid: Option<u32>,
    _child: Child,
}

/// Why a pod could not start.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("cannot spawn {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pod process did not print `listening on ADDR` within {0:?}")]
    NotReady(Duration),
    #[error("the pod process exited before it was ready")]
    Exited,
}

/// How long a process may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts `bin demo-sandbox --port 0` and waits for `listening on 127.0.0.1:PORT`.
pub async fn start(bin: &Path, sandbox: &str) -> Result<PodProcess, PodError> {
    let mut child = Command::new(bin)
        .args(["demo-sandbox", "--port", "0"])
        .env("SANDBOX_NAME", sandbox)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| PodError::Spawn {
            path: bin.to_owned(),
            source,
        })?;
    let stdout = child.stdout.take().ok_or(PodError::Exited)?;
    let mut lines = BufReader::new(stdout).lines();
    let port = tokio::time::timeout(START_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(port) = parse_listening(&line) {
                return Some(port);
            }
        }
        None
    })
    .await
    .map_err(|_| PodError::NotReady(START_TIMEOUT))?
    .ok_or(PodError::Exited)?;
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(PodProcess {
        port,
        pid: child.id(),
        _child: child,
    })
}

/// `listening on 127.0.0.1:PORT` -> PORT.
fn parse_listening(line: &str) -> Option<u16> {
    let addr = line.trim().strip_prefix("listening on ")?;
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_ready_line() {
        assert_eq!(
            super::parse_listening("listening on 127.0.0.1:4312\n"),
            Some(4312)
        );
        assert_eq!(super::parse_listening("starting"), None);
    }
}
