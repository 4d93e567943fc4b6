//! Sandbox ports: picking one no other sandbox of this backend holds, and proving after
//! readiness that the process answering on it is really the sandbox's.
//!
//! Ports are picked by binding 127.0.0.1:0 and releasing it before the child binds, so two
//! concurrent starts can be handed the same port (the kernel gives a just-released port
//! out again), and a foreign process may take it in between. The loser of such a race
//! exits, but the winner answers the readiness probe, and without a check both sandboxes
//! would be declared ready on one address: two sessions sharing one sandbox. Hence the
//! reservation against the fleet's own endpoints and the ownership check below.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use crate::backend::BackendError;

/// How many kernel-picked ports are tried before giving up.
const PICK_ATTEMPTS: usize = 32;

/// Picks a free port on 127.0.0.1 that is not in `taken` (ports of this backend's other
/// sandboxes, reserved from pick time on).
pub fn pick_free(taken: &HashSet<u16>) -> Result<u16, BackendError> {
    for _ in 0..PICK_ATTEMPTS {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| BackendError::StartFailed(format!("no free port on 127.0.0.1: {e}")))?;
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
    Err(BackendError::StartFailed(format!(
        "no port outside the {} held by other sandboxes after {PICK_ATTEMPTS} tries",
        taken.len()
    )))
}

/// True when one of `pids` holds a listening TCP socket on `port` (IPv4 or IPv6).
/// Reads `/proc/net/tcp{,6}` for the socket inodes, then the processes' fd tables.
pub fn held_by(port: u16, pids: &[u32]) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    pids.iter().any(|pid| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|target| socket_inode(&target))
                .is_some_and(|inode| inodes.contains(&inode))
        })
    })
}

/// Inodes of sockets in state LISTEN (`0A`) on local `port`.
fn listening_inodes(port: u16) -> HashSet<u64> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        out.extend(parse_listening(&text, port));
    }
    out
}

/// Parses a `/proc/net/tcp`-format table: `sl local_address rem_address st ... inode`.
fn parse_listening(text: &str, port: u16) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let listening = *cols.get(3)? == "0A";
            (listening && u16::from_str_radix(hex_port, 16).ok()? == port)
                .then(|| cols.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// `socket:[12345]` -> 12345.
fn socket_inode(target: &Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_only_listening_sockets_on_the_port() {
        assert_eq!(parse_listening(TABLE, 8080), vec![4242]);
        assert_eq!(parse_listening(TABLE, 8081), vec![4444]);
        assert!(parse_listening(TABLE, 9999).is_empty());
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode(Path::new("socket:[77]")), Some(77));
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
    }

    #[test]
    fn a_listener_of_this_process_is_held_and_picks_avoid_taken_ports() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(held_by(port, &[std::process::id()]));
        assert!(!held_by(port, &[u32::MAX]));
        drop(l);
        assert!(!held_by(port, &[std::process::id()]));
        let taken: HashSet<u16> = [port].into_iter().collect();
        assert_ne!(pick_free(&taken).unwrap(), port);
    }
}
