//! The node agent as a real process: `agent-activator node-agent --config PATH`, read up to
//! the stdout lines that name its API and metrics addresses. Self-contained (no `crate::`
//! paths) so benches/ include it by `#[path]` too; each includer reads a subset of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a starting agent may take to print both addresses.
const START: Duration = Duration::from_secs(20);

/// A running node agent, killed on drop. Its config must set `node_agent.listen` and
/// `node_agent.metrics_listen` (port 0: the addresses are read, never guessed).
pub struct NodeAgentProcess {
    // Held for `kill_on_drop`.
    _child: Child,
    /// Where its freeze/thaw API listens.
    pub api: SocketAddr,
    /// Where its `/metrics` listens.
    pub metrics: SocketAddr,
}

impl NodeAgentProcess {
    /// Starts the agent and waits for "node-agent listening on ADDR" and "node-agent metrics
    /// on ADDR" (in either order); the rest of stdout is drained in the background so the
    /// agent never blocks on a full pipe.
    pub async fn start(config: &Path) -> NodeAgentProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agent-activator"))
            .args(["node-agent", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node-agent");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut api, mut metrics) = (None::<SocketAddr>, None::<SocketAddr>);
        tokio::time::timeout(START, async {
            while api.is_none() || metrics.is_none() {
                let line = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the node agent exited before printing its addresses");
                if let Some(a) = line.strip_prefix("node-agent listening on ") {
                    api = Some(a.parse().unwrap());
                } else if let Some(a) = line.strip_prefix("node-agent metrics on ") {
                    metrics = Some(a.parse().unwrap());
                }
            }
        })
        .await
        .expect("the node agent printed its addresses within 20 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        NodeAgentProcess {
            _child: child,
            api: api.unwrap(),
            metrics: metrics.unwrap(),
        }
    }
}
