//! Finding a pod's cgroup from its UID in the kubelet's layout, and freezing it there.
//!
//! The layout follows the kubelet (kubernetes/kubernetes `00b39fcf8334`,
//! `pkg/kubelet/cm/pod_container_manager_linux.go` `GetPodContainerName`: the pod cgroup is
//! `pod<UID>` under its QoS parent; guaranteed pods sit directly under the root `kubepods`,
//! burstable and besteffort under `burstable` / `besteffort`; `pkg/kubelet/cm/
//! cgroup_manager_linux.go` `ToSystemd` + `escapeSystemdCgroupName`: with the systemd
//! driver every component becomes a nested slice and `-` in a component becomes `_`):
//!
//! | driver   | guaranteed                                | burstable / besteffort                                                   |
//! |----------|-------------------------------------------|--------------------------------------------------------------------------|
//! | systemd  | `kubepods.slice/kubepods-pod<U_>.slice`   | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<U_>.slice` |
//! | cgroupfs | `kubepods/pod<UID>`                       | `kubepods/burstable/pod<UID>`                                            |
//!
//! On cgroup v2 these directories are below the unified mount; on v1 below the `freezer`
//! hierarchy. Cgroupfs reads and writes are in-kernel and return at once (freezing itself is
//! asynchronous and confirmed by polling), so they run inline like the process backend's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::config::CgroupDriver;

/// Which freezer interface the tree has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    /// `cgroup.freeze` + `cgroup.events`.
    V2,
    /// `freezer.state`.
    V1,
}

/// A pod cgroup's freezer state as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeState {
    Running,
    /// Freeze requested, not every task frozen yet.
    Freezing,
    Frozen,
}

impl FreezeState {
    pub fn as_str(self) -> &'static str {
        match self {
            FreezeState::Running => "running",
            FreezeState::Freezing => "freezing",
            FreezeState::Frozen => "frozen",
        }
    }
}

/// What went wrong with a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{0}")]
    NoHierarchy(String),
    #[error("pod UID {0:?} is not a UID")]
    InvalidUid(String),
    #[error("no cgroup for pod {0} on this node")]
    NotFound(String),
    #[error("pod {uid} has cgroups in several places: {paths:?}")]
    Ambiguous { uid: String, paths: Vec<PathBuf> },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} not confirmed by the kernel before the deadline")]
    Timeout(&'static str),
}

/// Where the kubelet's pod cgroups are on this node.
#[derive(Debug, Clone)]
pub struct CgroupLayout {
    /// The directory that holds `kubepods.slice` / `kubepods` in the freezer hierarchy.
    base: PathBuf,
    hierarchy: Hierarchy,
    /// v1 only: the same directory in the `memory` hierarchy, when mounted.
    memory_base: Option<PathBuf>,
    driver: CgroupDriver,
}

/// One pod's cgroup.
#[derive(Debug, Clone)]
pub struct PodCgroup {
    path: PathBuf,
    hierarchy: Hierarchy,
    memory_path: Option<PathBuf>,
}

impl CgroupLayout {
    /// Recognises `root`: a v2 directory (`cgroup.controllers`), a v1 freezer directory
    /// (`freezer.state`), or a v1 root holding `freezer/` (and maybe `memory/`).
    pub fn detect(root: &Path, driver: CgroupDriver) -> Result<CgroupLayout, CgroupError> {
        let layout = |base: PathBuf, hierarchy, memory_base| CgroupLayout {
            base,
            hierarchy,
            memory_base,
            driver,
        };
        if root.join("cgroup.controllers").exists() {
            return Ok(layout(root.to_owned(), Hierarchy::V2, None));
        }
        if root.join("freezer.state").exists() || root.join("freezer.self_freezing").exists() {
            return Ok(layout(root.to_owned(), Hierarchy::V1, None));
        }
        let freezer = root.join("freezer");
        if freezer.join("cgroup.procs").exists() {
            let memory = root.join("memory");
            let memory = memory.join("cgroup.procs").exists().then_some(memory);
            return Ok(layout(freezer, Hierarchy::V1, memory));
        }
        Err(CgroupError::NoHierarchy(format!(
            "{} is neither a cgroup v2 directory nor a cgroup v1 root with a freezer hierarchy",
            root.display()
        )))
    }

    pub fn hierarchy(&self) -> Hierarchy {
        self.hierarchy
    }

    /// The pod cgroup of `uid`: exactly one of the kubelet's candidate paths must exist.
    pub fn locate(&self, uid: &str) -> Result<PodCgroup, CgroupError> {
        validate_uid(uid)?;
        let found: Vec<PathBuf> = candidates(self.driver, uid)
            .into_iter()
            .map(|rel| self.base.join(rel))
            .filter(|p| p.is_dir())
            .collect();
        match found.len() {
            0 => Err(CgroupError::NotFound(uid.to_owned())),
            1 => {
                let path = found.into_iter().next().expect("one element");
                let memory_path = self.memory_base.as_ref().and_then(|m| {
                    let rel = path.strip_prefix(&self.base).ok()?;
                    Some(m.join(rel)).filter(|p| p.is_dir())
                });
                Ok(PodCgroup {
                    path,
                    hierarchy: self.hierarchy,
                    memory_path,
                })
            }
            _ => Err(CgroupError::Ambiguous {
                uid: uid.to_owned(),
                paths: found,
            }),
        }
    }
}

/// The kubelet's pod cgroup paths for `uid`, relative to the hierarchy root (see the module
/// table): guaranteed first, then burstable and besteffort.
pub fn candidates(driver: CgroupDriver, uid: &str) -> Vec<PathBuf> {
    let escaped = uid.replace('-', "_");
    let systemd = [
        format!("kubepods.slice/kubepods-pod{escaped}.slice"),
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice"),
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"),
    ];
    let cgroupfs = [
        format!("kubepods/pod{uid}"),
        format!("kubepods/burstable/pod{uid}"),
        format!("kubepods/besteffort/pod{uid}"),
    ];
    let list: Vec<String> = match driver {
        CgroupDriver::Systemd => systemd.into(),
        CgroupDriver::Cgroupfs => cgroupfs.into(),
        CgroupDriver::Auto => systemd.into_iter().chain(cgroupfs).collect(),
    };
    list.into_iter().map(PathBuf::from).collect()
}

/// A pod UID is a UUID; anything else (path separators, dots, `_`) never reaches a path.
pub fn validate_uid(uid: &str) -> Result<(), CgroupError> {
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !uid.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidUid(uid.to_owned()))
    }
}

// === impl PodCgroup ===

impl PodCgroup {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The freezer state of the whole pod (its container cgroups included).
    pub fn state(&self) -> Result<FreezeState, CgroupError> {
        match self.hierarchy {
            Hierarchy::V2 => {
                let requested = read(&self.path.join("cgroup.freeze"))?.trim() == "1";
                let frozen = read(&self.path.join("cgroup.events"))?
                    .lines()
                    .any(|l| l == "frozen 1");
                Ok(match (requested, frozen) {
                    (true, true) => FreezeState::Frozen,
                    (true, false) => FreezeState::Freezing,
                    (false, _) => FreezeState::Running,
                })
            }
            Hierarchy::V1 => Ok(match read(&self.path.join("freezer.state"))?.trim() {
                "FROZEN" => FreezeState::Frozen,
                "FREEZING" => FreezeState::Freezing,
                _ => FreezeState::Running,
            }),
        }
    }

    /// Freezes the pod and returns once the kernel reports it frozen. Past `deadline` the
    /// pod is thawed again (a half-frozen pod serves nobody) and `Timeout` returned.
    pub async fn freeze(&self, deadline: Instant) -> Result<(), CgroupError> {
        self.request(true)?;
        let mut delay = Duration::from_micros(50);
        loop {
            if self.state()? == FreezeState::Frozen {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.request(false);
                return Err(CgroupError::Timeout("freeze"));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(5));
            if self.hierarchy == Hierarchy::V1 {
                // v1 stays FREEZING after a partial attempt until FROZEN is written again
                // (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst).
                self.request(true)?;
            }
        }
    }

    /// Thaws the pod and returns once the kernel reports it running.
    pub async fn thaw(&self, deadline: Instant) -> Result<(), CgroupError> {
        self.request(false)?;
        let mut delay = Duration::from_micros(20);
        loop {
            let running = match self.hierarchy {
                Hierarchy::V2 => !read(&self.path.join("cgroup.events"))?
                    .lines()
                    .any(|l| l == "frozen 1"),
                Hierarchy::V1 => self.state()? == FreezeState::Running,
            };
            if running {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Timeout("thaw"));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    fn request(&self, frozen: bool) -> Result<(), CgroupError> {
        let (file, value) = match (self.hierarchy, frozen) {
            (Hierarchy::V2, true) => ("cgroup.freeze", "1"),
            (Hierarchy::V2, false) => ("cgroup.freeze", "0"),
            (Hierarchy::V1, true) => ("freezer.state", "FROZEN"),
            (Hierarchy::V1, false) => ("freezer.state", "THAWED"),
        };
        let path = self.path.join(file);
        std::fs::write(&path, value).map_err(|source| CgroupError::Io { path, source })
    }

    /// Memory charged to the pod: `memory.current` (v2), `memory.usage_in_bytes` (v1 memory
    /// hierarchy), else the summed resident set of its processes when no memory controller
    /// is enabled for the tree.
    pub fn memory_bytes(&self) -> u64 {
        let charged = match (self.hierarchy, &self.memory_path) {
            (Hierarchy::V2, _) => read_u64(&self.path.join("memory.current")),
            (Hierarchy::V1, Some(m)) => read_u64(&m.join("memory.usage_in_bytes")),
            (Hierarchy::V1, None) => None,
        };
        charged.unwrap_or_else(|| self.pids().iter().map(|&p| rss_bytes(p)).sum())
    }

    /// Every process in the pod cgroup and its descendants.
    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        collect_pids(&self.path, 0, &mut out);
        out
    }
}

/// Depth bound of the walk: pod / container / a few nested cgroups at most.
const MAX_DEPTH: usize = 8;

fn collect_pids(dir: &Path, depth: usize, out: &mut Vec<u32>) {
    if depth > MAX_DEPTH {
        return;
    }
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), depth + 1, out);
            }
        }
    }
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_candidates_escape_dashes() {
        let c = candidates(CgroupDriver::Systemd, "1a2b-3c");
        assert_eq!(
            c,
            vec![
                PathBuf::from("kubepods.slice/kubepods-pod1a2b_3c.slice"),
                PathBuf::from(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c.slice"
                ),
                PathBuf::from(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b_3c.slice"
                ),
            ]
        );
        let c = candidates(CgroupDriver::Cgroupfs, "1a2b-3c");
        assert_eq!(c[0], PathBuf::from("kubepods/pod1a2b-3c"));
        assert_eq!(c[2], PathBuf::from("kubepods/besteffort/pod1a2b-3c"));
        assert_eq!(candidates(CgroupDriver::Auto, "x").len(), 6);
    }

    #[test]
    fn uids_that_could_escape_a_path_are_refused() {
        for bad in ["", "../x", "a/b", "a_b", "-a", ".", &"a".repeat(65)] {
            assert!(validate_uid(bad).is_err(), "{bad:?}");
        }
        assert!(validate_uid("0c4f4d5e-8a43-4a8e-9a0e-6a2b9f0d1c22").is_ok());
    }
}
