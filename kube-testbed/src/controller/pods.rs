//! "Pods": real local `agent-activator demo-sandbox` processes standing in for sandbox pods.
//!
//! Each pod gets its own loopback address (the whole 127.0.0.0/8 routes to `lo` on Linux),
//! so pods can listen on the *same* port as on a cluster and a client dials `podIP:port`.
//! A new pod gets a new address, like a recreated pod on a real cluster.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::kubelet_cgroups::PodCgroup;
use crate::store::Store;

/// A running demo-sandbox process; killed when dropped.
#[derive(Debug)]
pub struct PodProcess {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    child: Child,
    /// Its core Pod object and pod cgroup (`pod_cgroups` only); removed after the kill.
    pub attached: Option<Attached>,
}

/// What a pod process has besides the process, with `pod_cgroups`.
pub struct Attached {
    pub store: Arc<Store>,
    pub namespace: String,
    pub name: String,
    /// The core Pod's UID.
    pub uid: String,
    pub cgroup: Option<PodCgroup>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("pod", &format_args!("{}/{}", self.namespace, self.name))
            .field("uid", &self.uid)
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl Drop for Attached {
    /// The Pod object goes with the process (the cgroup right after, by its own drop).
    fn drop(&mut self) {
        crate::node_pods::delete_if(&self.store, &self.namespace, &self.name, &self.uid);
    }
}

impl PodProcess {
    /// True once the process has exited (it crashed or someone killed it).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Its pod cgroup is frozen (kernel-confirmed).
    pub fn frozen(&self) -> bool {
        self.attached
            .as_ref()
            .and_then(|a| a.cgroup.as_ref())
            .is_some_and(|c| c.frozen())
    }
}

impl Drop for PodProcess {
    /// A pod is gone only once its process is: kill it and wait (at most 2 s) for the exit,
    /// so its socket is closed before the controller reports the pod terminated (a kill that
    /// is merely sent left the old pod accepting connections after `PodTerminated`).
    fn drop(&mut self) {
        // A process frozen by cgroup v1 cannot die until thawed.
        if let Some(cg) = self.attached.as_ref().and_then(|a| a.cgroup.as_ref()) {
            cg.thaw();
        }
        let _ = self.child.start_kill();
        for _ in 0..2000 {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
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
    #[error("cannot attach the pod process: {0}")]
    Attach(String),
}

/// How long a process may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Addresses tried before giving up (a bind can fail when another process holds ip:port).
const BIND_ATTEMPTS: u32 = 5;

/// Pod address counter: a random start per process, so test binaries running side by side
/// rarely meet on one address.
static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// The next pod address: `127.a.b.c` with `a` in 1..=254 and `c` in 1..=254, never
/// `127.0.0.1` (where the API server and the activator under test listen).
pub fn next_pod_ip() -> IpAddr {
    if NEXT_IP.load(Ordering::Relaxed) == 0 {
        let seed = std::process::id().wrapping_mul(2_654_435_761) | 1;
        let _ = NEXT_IP.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
        let c = n as u8;
        if c == 0 || c == 255 {
            continue;
        }
        let a = 1 + ((n >> 16) % 254) as u8;
        return IpAddr::V4(Ipv4Addr::new(127, a, (n >> 8) as u8, c));
    }
}

/// Starts `bin demo-sandbox --host IP --port PORT` on a fresh pod address and waits for
/// `listening on IP:PORT`. `port` 0 lets the process pick one.
pub async fn start(bin: &Path, sandbox: &str, port: u16) -> Result<PodProcess, PodError> {
    let mut last = PodError::Exited;
    for _ in 0..BIND_ATTEMPTS {
        match start_on(bin, sandbox, next_pod_ip(), port).await {
            Ok(p) => return Ok(p),
            // The address was taken (the process exits at once): try another one.
            Err(PodError::Exited) => last = PodError::Exited,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

async fn start_on(
    bin: &Path,
    sandbox: &str,
    ip: IpAddr,
    port: u16,
) -> Result<PodProcess, PodError> {
    let mut child = Command::new(bin)
        .args([
            "demo-sandbox",
            "--host",
            &ip.to_string(),
            "--port",
            &port.to_string(),
        ])
        .env("SANDBOX_NAME", sandbox)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| PodError::Spawn {
            path: bin.to_owned(),
            source,
        })?;
    let stdout = child.stdout.take().ok_or(PodError::Exited)?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(START_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = parse_listening(&line) {
                return Some(addr);
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
        addr,
        pid: child.id(),
        child,
        attached: None,
    })
}

/// `listening on 127.1.2.3:PORT` -> the address.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix("listening on ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ready_line() {
        assert_eq!(
            parse_listening("listening on 127.3.0.9:4312\n"),
            Some("127.3.0.9:4312".parse().unwrap())
        );
        assert_eq!(parse_listening("starting"), None);
    }

    #[test]
    fn pod_addresses_are_distinct_loopback_addresses_never_127_0_0_1() {
        let ips: Vec<IpAddr> = (0..600).map(|_| next_pod_ip()).collect();
        let unique: std::collections::HashSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), ips.len());
        for ip in ips {
            let IpAddr::V4(v4) = ip else { panic!("{ip}") };
            assert!(v4.is_loopback(), "{ip}");
            assert_ne!(v4.octets()[1], 0, "{ip}");
            assert_ne!(v4.octets()[3], 0, "{ip}");
            assert_ne!(v4.octets()[3], 255, "{ip}");
        }
    }
}
