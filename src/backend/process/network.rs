//! Each isolated sandbox's own network: a user and network namespace made by pasta
//! (Debian `passt`), which forwards the sandbox's port (and `backend.expose_ports`) from
//! per-sandbox host-loopback ports and, with `egress: internet`, NATs outbound traffic.
//!
//! Why pasta: it is the maintained user-mode network tool Podman uses for rootless
//! containers; it runs as the sandbox user (no root helper), stays in the sandbox's process
//! group and cgroup (frozen, limited and killed with it), and forwards local connections
//! by splicing sockets between the namespaces (no user-mode TCP stack on the hot path).
//!
//! What the options below guarantee, from `man pasta` (passt 0.0~git20230309, Debian
//! bookworm): `-T none -U none` (default `auto`) so no host port is mirrored into the
//! namespace, which would let the sandbox reach host loopback services (the admin port,
//! other sandboxes); `--no-map-gw` so the gateway address is not remapped to the host's
//! loopback; `-t 127.0.0.1/HOST:SANDBOX` binds the host side on loopback only (this
//! release refuses `ADDR/PORT` without the `:TARGET` part, hence always both). Without
//! `--config-net` the namespace keeps only `lo`: no route leaves it (`egress: none`).
//! With it, addresses and routes copy the host's, and a prelude in the namespace makes
//! link-local `169.254.0.0/16` (cloud metadata) unreachable before the sandbox starts;
//! the sandbox, in a nested user namespace without capabilities, cannot change routes.

use std::path::{Path, PathBuf};

use crate::config::Egress;

/// How sandboxes get their network namespace.
#[derive(Debug, Clone)]
pub struct Network {
    pasta: PathBuf,
    /// `ip` (iproute2), for the link-local block; `None` with `egress: none`.
    ip: Option<PathBuf>,
    egress: Egress,
}

/// Where `ip` may live (Debian: /usr/sbin/ip, /bin/ip on merged-/usr hosts).
const IP_PATHS: &[&str] = &["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];

/// Address ranges the sandbox must not reach with `egress: internet` (the host's own
/// loopback is never routed out of the namespace; its `127.0.0.0/8` is its own).
pub const BLOCKED_V4: &[&str] = &["169.254.0.0/16"];

impl Network {
    /// `Err` names what is missing, for a message naming `backend.egress`/`backend.pasta`.
    pub fn new(pasta: &Path, egress: Egress) -> Result<Network, String> {
        let ip = match egress {
            Egress::None => None,
            Egress::Internet => Some(
                IP_PATHS
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
                    .ok_or("egress: internet needs iproute2's `ip` (apt-get install iproute2)")?,
            ),
        };
        Ok(Network {
            pasta: pasta.to_path_buf(),
            ip,
            egress,
        })
    }

    /// The argv that runs `inner` in a new network namespace with each `(host, sandbox)`
    /// port pair forwarded from `127.0.0.1:host` to the sandbox's own `sandbox` port.
    pub fn wrap(&self, forwards: &[(u16, u16)], inner: Vec<String>) -> Vec<String> {
        let mut argv: Vec<String> = vec![self.pasta.to_string_lossy().into_owned()];
        // Foreground: pasta stays the process-group leader the freezer and kills address,
        // and dies with the activator (the spawner's parent-death signal).
        argv.extend(["--quiet", "--foreground"].map(str::to_owned));
        if self.egress == Egress::Internet {
            argv.push("--config-net".into());
        }
        for (host, sandbox) in forwards {
            argv.extend(["-t".to_owned(), format!("127.0.0.1/{host}:{sandbox}")]);
        }
        argv.extend(
            [
                "-u",
                "none",
                "-T",
                "none",
                "-U",
                "none",
                "--no-map-gw",
                "--no-dhcp",
                "--no-dhcpv6",
                "--no-ra",
            ]
            .map(str::to_owned),
        );
        argv.push("--".into());
        if let Some(ip) = &self.ip {
            // Runs as root of pasta's user namespace (capable in the sandbox's network
            // namespace only), then execs bubblewrap, which drops that for good.
            let ip = ip.to_string_lossy();
            let blocks: Vec<String> = BLOCKED_V4
                .iter()
                .map(|net| format!("{ip} route add unreachable {net} && "))
                .collect();
            argv.extend([
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                format!("{}exec \"$@\"", blocks.concat()),
                "sh".to_owned(),
            ]);
        }
        argv.extend(inner);
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_on_loopback_only_and_mirrors_nothing_back() {
        let net = Network {
            pasta: "/usr/bin/pasta".into(),
            ip: Some("/usr/sbin/ip".into()),
            egress: Egress::Internet,
        };
        let argv = net.wrap(&[(40000, 40000), (40001, 3000)], vec!["bwrap".into()]);
        let text = argv.join(" ");
        assert!(text.starts_with("/usr/bin/pasta --quiet --foreground --config-net"));
        assert!(text.contains("-t 127.0.0.1/40000:40000 -t 127.0.0.1/40001:3000"));
        assert!(text.contains("-T none -U none --no-map-gw"), "{text}");
        assert!(
            text.contains("route add unreachable 169.254.0.0/16"),
            "{text}"
        );
        assert!(text.ends_with("exec \"$@\" sh bwrap"), "{text}");
        let none = Network {
            egress: Egress::None,
            ip: None,
            ..net
        };
        let text = none.wrap(&[(1, 2)], vec!["bwrap".into()]).join(" ");
        assert!(!text.contains("--config-net"), "{text}");
        assert!(text.ends_with("-- bwrap"), "{text}");
    }
}
