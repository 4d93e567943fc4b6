//! Freezing a sandbox's whole process tree: cgroup v2 `cgroup.freeze`, the cgroup v1
//! freezer, or SIGSTOP/SIGCONT to its process group (`backend.freezer`).
//!
//! With a cgroup mode every sandbox gets `<own cgroup>/agent-activator/<instance>/<id>`,
//! which also lets release and leftover cleanup kill every process of the tree, including
//! grandchildren that left the process group.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::child::{group_stopped, signal_group};
use crate::config::FreezerKind;

/// Directory name below the activator's own cgroup that holds its instances.
const CGROUP_BASE: &str = "agent-activator";

/// The mechanism in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezerMode {
    CgroupV2,
    CgroupV1,
    Signal,
}

impl FreezerMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FreezerMode::CgroupV2 => "cgroup_v2",
            FreezerMode::CgroupV1 => "cgroup_v1",
            FreezerMode::Signal => "signal",
        }
    }
}

/// The freezer chosen at startup and this instance's cgroup directory (cgroup modes).
#[derive(Debug)]
pub struct Freezer {
    mode: FreezerMode,
    /// `<own cgroup>/agent-activator/<instance>`; `None` in signal mode.
    instance_dir: Option<PathBuf>,
}

/// The cgroup of one sandbox (cgroup modes only), plus its cgroups in the v1 hierarchies
/// that carry its resource limits (none when the limits live in `path` itself).
#[derive(Debug)]
pub struct SandboxCgroup {
    path: PathBuf,
    mode: FreezerMode,
    limit_dirs: Vec<PathBuf>,
}

impl Freezer {
    /// Picks the freezer for `kind` (`auto` = the first of v2, v1, signal that is writable)
    /// and creates this instance's cgroup directory. Errors explain why a forced mode is
    /// unavailable.
    pub fn detect(kind: FreezerKind, instance: &str) -> Result<Freezer, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let try_mode = |mode: FreezerMode| -> Result<Freezer, String> {
            let root = cgroup_root(&mountinfo, &own, mode)
                .ok_or_else(|| format!("no {} hierarchy is mounted", mode.as_str()))?;
            let dir = root.join(CGROUP_BASE).join(instance);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let probe = match mode {
                FreezerMode::CgroupV2 => "cgroup.freeze",
                _ => "freezer.state",
            };
            if !dir.join(probe).exists() {
                let _ = std::fs::remove_dir(&dir);
                return Err(format!("{} has no {probe}", dir.display()));
            }
            Ok(Freezer {
                mode,
                instance_dir: Some(dir),
            })
        };
        let signal = Freezer {
            mode: FreezerMode::Signal,
            instance_dir: None,
        };
        match kind {
            FreezerKind::CgroupV2 => try_mode(FreezerMode::CgroupV2),
            FreezerKind::CgroupV1 => try_mode(FreezerMode::CgroupV1),
            FreezerKind::Signal => Ok(signal),
            FreezerKind::Auto => Ok(try_mode(FreezerMode::CgroupV2)
                .or_else(|_| try_mode(FreezerMode::CgroupV1))
                .unwrap_or(signal)),
        }
    }

    pub fn mode(&self) -> FreezerMode {
        self.mode
    }

    /// Creates the cgroup for sandbox `name` (`None` in signal mode).
    pub fn create(&self, name: &str) -> std::io::Result<Option<SandboxCgroup>> {
        let Some(dir) = &self.instance_dir else {
            return Ok(None);
        };
        let path = dir.join(name);
        std::fs::create_dir_all(&path)?;
        Ok(Some(SandboxCgroup {
            path,
            mode: self.mode,
            limit_dirs: Vec::new(),
        }))
    }

    /// `<own cgroup>/agent-activator/<instance>`; `None` in signal mode.
    pub fn instance_dir(&self) -> Option<&Path> {
        self.instance_dir.as_deref()
    }

    /// Removes this instance's (by now empty) cgroup directory.
    pub fn remove_instance_dir(&self) {
        if let Some(dir) = &self.instance_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `<own cgroup>/agent-activator` in every mounted freezer hierarchy and every v1 hierarchy
/// that per-sandbox limits use, for the leftover sweep.
pub fn base_dirs() -> Vec<(PathBuf, FreezerMode)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let freezers = [FreezerMode::CgroupV2, FreezerMode::CgroupV1]
        .into_iter()
        .filter_map(|m| cgroup_root(&mountinfo, &own, m).map(|r| (r.join(CGROUP_BASE), m)));
    let limits = super::limits::V1_CONTROLLERS.iter().filter_map(|c| {
        v1_root(&mountinfo, &own, c).map(|r| (r.join(CGROUP_BASE), FreezerMode::CgroupV1))
    });
    freezers.chain(limits).collect()
}

/// Finds the directory of the activator's own cgroup in the hierarchy `mode` uses.
fn cgroup_root(mountinfo: &str, own_cgroups: &str, mode: FreezerMode) -> Option<PathBuf> {
    match mode {
        FreezerMode::CgroupV2 => hierarchy_root(mountinfo, own_cgroups, None),
        FreezerMode::CgroupV1 => hierarchy_root(mountinfo, own_cgroups, Some("freezer")),
        FreezerMode::Signal => None,
    }
}

/// The activator's own cgroup in the v1 hierarchy of `controller` (`memory`, `pids`, `cpu`).
pub fn v1_root(mountinfo: &str, own_cgroups: &str, controller: &str) -> Option<PathBuf> {
    hierarchy_root(mountinfo, own_cgroups, Some(controller))
}

/// The activator's own cgroup in the unified hierarchy (`None`) or in the v1 hierarchy that
/// carries `controller`.
fn hierarchy_root(mountinfo: &str, own_cgroups: &str, controller: Option<&str>) -> Option<PathBuf> {
    let (mount_root, mount_point) = mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let wanted = match controller {
            None => post.first() == Some(&"cgroup2"),
            Some(c) => {
                post.first() == Some(&"cgroup")
                    && post.get(2).is_some_and(|o| o.split(',').any(|o| o == c))
            }
        };
        wanted.then(|| (pre.get(3).copied(), pre.get(4).copied()))
    })?;
    let own = own_cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match controller {
            None => id == "0" && controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        hit.then_some(path)
    })?;
    let mount_root = mount_root?;
    let relative = own
        .strip_prefix(mount_root)
        .unwrap_or("")
        .trim_start_matches('/');
    Some(Path::new(mount_point?).join(relative))
}

// === impl SandboxCgroup ===

impl SandboxCgroup {
    /// Every `cgroup.procs` the child joins (its freezer cgroup first, then its v1 limit
    /// cgroups), opened for the child to move itself in before `exec`.
    pub fn procs_files(&self) -> std::io::Result<Vec<File>> {
        std::iter::once(&self.path)
            .chain(&self.limit_dirs)
            .map(|dir| {
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
            })
            .collect()
    }

    /// Records a cgroup in a v1 limit hierarchy that the child joins too.
    pub fn add_limit_dir(&mut self, dir: PathBuf) {
        self.limit_dirs.push(dir);
    }

    /// PIDs of every process in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills every process in the cgroup (frozen ones too).
    pub fn kill_all(&self) {
        kill_cgroup(&self.path, self.mode);
        for dir in &self.limit_dirs {
            kill_cgroup(dir, FreezerMode::CgroupV1);
        }
    }

    /// Removes the cgroup (and its limit cgroups) once their processes are gone, retrying
    /// until `deadline`.
    pub async fn remove(&self, deadline: Instant) {
        remove_dir_when_empty(&self.path, deadline).await;
        for dir in &self.limit_dirs {
            remove_dir_when_empty(dir, deadline).await;
        }
    }
}

/// Removes the cgroup directory `path` once its processes are gone, retrying until `deadline`.
async fn remove_dir_when_empty(path: &Path, deadline: Instant) {
    {
        let mut delay = Duration::from_millis(1);
        loop {
            match std::fs::remove_dir(path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(cgroup = %path.display(), error = %e, "cgroup not removed");
                    return;
                }
                Err(_) => {}
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }
}

/// Freezes the tree of the sandbox whose leader is `pid` and waits until it is frozen.
/// Cgroupfs writes return at once (freezing itself is asynchronous), so they run inline.
pub async fn freeze(
    cgroup: Option<&SandboxCgroup>,
    pid: u32,
    deadline: Instant,
) -> Result<(), String> {
    let mode = cgroup.map_or(FreezerMode::Signal, |c| c.mode);
    let request = || -> Result<(), String> {
        match (mode, cgroup) {
            (FreezerMode::CgroupV2, Some(c)) => write(&c.path.join("cgroup.freeze"), "1"),
            (FreezerMode::CgroupV1, Some(c)) => write(&c.path.join("freezer.state"), "FROZEN"),
            _ => {
                signal_group(pid, Signal::SIGSTOP);
                Ok(())
            }
        }
    };
    request()?;
    let mut delay = Duration::from_micros(100);
    loop {
        if is_frozen(cgroup, pid) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = thaw(cgroup, pid);
            return Err(format!("not frozen after the deadline ({})", mode.as_str()));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(10));
        if mode == FreezerMode::CgroupV1 {
            // v1 stays FREEZING after a partial attempt until FROZEN is written again.
            request()?;
        }
    }
}

/// Thaws a frozen sandbox. Takes effect at once.
pub fn thaw(cgroup: Option<&SandboxCgroup>, pid: u32) -> Result<(), String> {
    match cgroup {
        Some(c) if c.mode == FreezerMode::CgroupV2 => write(&c.path.join("cgroup.freeze"), "0"),
        Some(c) => write(&c.path.join("freezer.state"), "THAWED"),
        None => {
            signal_group(pid, Signal::SIGCONT);
            Ok(())
        }
    }
}

/// Whether the freezer reports the sandbox frozen (`cgroup.events` `frozen 1`,
/// `freezer.state` `FROZEN`, or every process of the group in state `T`).
pub fn is_frozen(cgroup: Option<&SandboxCgroup>, pid: u32) -> bool {
    match cgroup {
        Some(c) if c.mode == FreezerMode::CgroupV2 => {
            std::fs::read_to_string(c.path.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l == "frozen 1"))
        }
        Some(c) => std::fs::read_to_string(c.path.join("freezer.state"))
            .is_ok_and(|s| s.trim() == "FROZEN"),
        None => group_stopped(pid),
    }
}

/// Kills every process of the cgroup at `path` and below.
pub fn kill_cgroup(path: &Path, mode: FreezerMode) {
    if mode == FreezerMode::CgroupV2 && write(&path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // v1 (or a v2 kernel without cgroup.kill): signal each process, then thaw so that
    // frozen ones can act on the SIGKILL.
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_cgroup(&e.path(), mode);
            }
        }
    }
    for pid in std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = match mode {
        FreezerMode::CgroupV2 => write(&path.join("cgroup.freeze"), "0"),
        _ => write(&path.join("freezer.state"), "THAWED"),
    };
}

pub(super) fn write(path: &Path, value: &str) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_own_cgroup_in_both_hierarchies() {
        let own = "6:freezer:/jobs/a\n4:memory:/x\n0::/user.slice/app.service\n";
        assert_eq!(
            cgroup_root(HYBRID, own, FreezerMode::CgroupV2).unwrap(),
            Path::new("/sys/fs/cgroup/unified/user.slice/app.service")
        );
        assert_eq!(
            cgroup_root(HYBRID, own, FreezerMode::CgroupV1).unwrap(),
            Path::new("/sys/fs/cgroup/freezer/jobs/a")
        );
    }

    #[test]
    fn missing_hierarchy_is_none() {
        let only_v2 = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert!(cgroup_root(only_v2, "0::/\n", FreezerMode::CgroupV1).is_none());
        assert_eq!(
            cgroup_root(only_v2, "0::/\n", FreezerMode::CgroupV2).unwrap(),
            Path::new("/sys/fs/cgroup")
        );
    }

    #[test]
    fn namespaced_mount_root_is_stripped() {
        let info = "50 40 0:38 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let own = "0::/kubepods/pod1/ctr\n";
        assert_eq!(
            cgroup_root(info, own, FreezerMode::CgroupV2).unwrap(),
            Path::new("/sys/fs/cgroup/ctr")
        );
    }
}
