//! `Instance`: the name of one process backend (`<pid>-<start time>-<n>`), under which its
//! cgroups and working directories live, and the sweep that removes what a crashed
//! previous activator left behind.
//!
//! Several backends may run at once on one host (tests, a second activator), so a sweep
//! only touches instances whose process is gone: the PID no longer exists or belongs to a
//! process with another start time (PID reuse).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::freezer::{base_dirs, kill_cgroup};

/// One backend's name, unique on the host while its process lives.
#[derive(Debug, Clone)]
pub struct Instance(String);

impl Instance {
    /// A fresh name for a backend in this process.
    pub fn new() -> Instance {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let pid = std::process::id();
        let start = start_time(pid).unwrap_or(0);
        Instance(format!(
            "{pid}-{start}-{}",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Field 22 of `/proc/PID/stat`: the process start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts at field 3 (state), so field 22 is the 20th entry.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// True for a directory name made by [`Instance::new`] whose process is gone.
fn is_stale(name: &str) -> bool {
    let mut parts = name.splitn(3, '-');
    let (Some(pid), Some(start), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(pid), Ok(start), Ok(_)) = (pid.parse::<u32>(), start.parse::<u64>(), n.parse::<u64>())
    else {
        return false;
    };
    start_time(pid) != Some(start)
}

/// Kills and removes everything stale instances left: processes in their cgroups (both
/// hierarchies, whichever freezer they used) and processes whose working directory is in
/// their workdirs (signal mode), then the directories. Blocking: run it off the runtime.
/// Returns how many instances were swept.
pub fn sweep_leftovers(workdir_root: &Path) -> usize {
    let mut swept = 0;
    for (base, mode) in base_dirs() {
        for dir in stale_dirs(&base) {
            kill_cgroup(&dir, mode);
            remove_cgroup_tree(&dir);
            swept += 1;
        }
    }
    for dir in stale_dirs(workdir_root) {
        kill_processes_in(&dir);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "stale workdir not removed");
        }
        swept += 1;
    }
    swept
}

fn stale_dirs(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.file_name().to_str().is_some_and(is_stale))
        .map(|e| e.path())
        .collect()
}

/// Removes a cgroup directory and its children, deepest first, waiting (bounded) for
/// killed processes to leave.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..200 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::warn!(cgroup = %dir.display(), "stale cgroup not removed");
}

/// SIGKILLs every process whose current directory is `dir` or below it.
fn kill_processes_in(dir: &Path) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_instance_is_live_and_unknown_names_are_ignored() {
        let me = Instance::new();
        assert!(!is_stale(me.as_str()));
        assert!(!is_stale("not-an-instance"));
        assert!(!is_stale("sbx-1"));
        // PID 0 never names a user process, so this instance is gone.
        assert!(is_stale("0-12345-1"));
        let pid = std::process::id();
        assert!(
            is_stale(&format!("{pid}-1-1")),
            "another start time = PID reuse"
        );
    }
}
