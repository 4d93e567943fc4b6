//! `Reaper`: a watchdog process that kills this backend's sandboxes when the activator
//! dies, however it dies (SIGKILL and OOM included).
//!
//! `PR_SET_PDEATHSIG` kills each sandbox's first process with the activator, but not what
//! that process started (a shell's children, an agent's tool processes). The reaper is a
//! small `sh` that blocks reading a pipe whose only writer is the activator; the kernel
//! closes that pipe when the activator exits, the read returns, and the reaper kills every
//! process in this instance's cgroups (`cgroup.kill` where the kernel has it, else SIGKILL
//! to each member, then thaw so frozen members act on it). It runs in its own process
//! group, so a Ctrl-C meant for the activator's terminal does not take it down first.
//! Signal mode has no cgroups to enumerate: there, leftovers wait for the next run's sweep.

use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, ChildStdin, Command};

/// Kills every member of every sandbox cgroup below `$1` once stdin reaches EOF.
const SCRIPT: &str = r#"cat >/dev/null
for cg in "$1"/*/; do
  [ -d "$cg" ] || continue
  [ -e "$cg/cgroup.kill" ] && echo 1 > "$cg/cgroup.kill"
  for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  [ -e "$cg/cgroup.freeze" ] && echo 0 > "$cg/cgroup.freeze"
  [ -e "$cg/freezer.state" ] && echo THAWED > "$cg/freezer.state"
done
exit 0
"#;

/// The watchdog of one backend; dropping it (or the activator dying) triggers it.
pub struct Reaper {
    /// The write end of the pipe; never written, only closed.
    _pipe: ChildStdin,
    /// Kept so tokio reaps the process after it exits.
    _child: Child,
}

impl Reaper {
    /// Starts the watchdog over the sandbox cgroups below `instance_dir`.
    pub fn spawn(instance_dir: &Path) -> std::io::Result<Reaper> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("agent-activator-reaper")
            .arg(instance_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        let pipe = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("reaper has no stdin pipe"))?;
        Ok(Reaper {
            _pipe: pipe,
            _child: child,
        })
    }
}
