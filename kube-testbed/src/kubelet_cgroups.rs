//! Pod cgroups laid out as the kubelet lays them out, under a test root in a real cgroup
//! hierarchy, so the real node agent finds and freezes a simulated pod's real process.
//!
//! Layout (kubernetes `00b39fcf8334` pkg/kubelet/cm/pod_container_manager_linux.go
//! `GetPodContainerName`, cgroup_manager_linux.go `escapeSystemdCgroupName`): systemd
//! driver `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, '-' -> '_'>.slice`
//! (Guaranteed pods directly under `kubepods.slice`), cgroupfs driver
//! `kubepods/<qos>/pod<uid>` (Guaranteed directly under `kubepods`); cgroup v1 puts the
//! same tree under `freezer/`. The container is one child cgroup holding the process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The kubelet's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// Where pod cgroups go: `root` is what the node agent gets as `node_agent.cgroup_root`
/// (a cgroup v2 directory, or a v1 root holding `freezer/`).
#[derive(Debug, Clone)]
pub struct PodCgroups {
    pub root: PathBuf,
    pub driver: Driver,
}

/// The pod's QoS class as the kubelet derives it (pkg/apis/core/helper/qos `GetPodQOS`,
/// simplified to cpu and memory): every container with limits equal to its requests (or
/// no requests) -> guaranteed; no requests or limits anywhere -> besteffort; else burstable.
pub fn qos_class(containers: &[Value]) -> &'static str {
    let res = |c: &Value, kind: &str, r: &str| c["resources"][kind][r].as_str().map(str::to_owned);
    let any = containers.iter().any(|c| {
        ["requests", "limits"]
            .iter()
            .any(|k| c["resources"][k].as_object().is_some_and(|m| !m.is_empty()))
    });
    if !any {
        return "besteffort";
    }
    let guaranteed = !containers.is_empty()
        && containers.iter().all(|c| {
            ["cpu", "memory"].iter().all(|r| {
                let limit = res(c, "limits", r);
                limit.is_some() && res(c, "requests", r).is_none_or(|q| Some(q) == limit)
            })
        });
    if guaranteed {
        "guaranteed"
    } else {
        "burstable"
    }
}

/// One pod's cgroup with its container cgroup; thawed and removed when dropped (after
/// the process in it was killed).
#[derive(Debug)]
pub struct PodCgroup {
    /// The pod-level cgroup the node agent freezes.
    pub pod_dir: PathBuf,
    /// The container cgroup holding the process.
    pub container_dir: PathBuf,
    v1: bool,
}

impl PodCgroups {
    fn v1(&self) -> bool {
        !self.root.join("cgroup.freeze").exists() && self.root.join("freezer").is_dir()
    }

    /// The pod cgroup directory of pod `uid` in QoS class `qos`, relative to the hierarchy.
    pub fn pod_path(&self, uid: &str, qos: &str) -> PathBuf {
        let base = if self.v1() {
            self.root.join("freezer")
        } else {
            self.root.clone()
        };
        let esc = uid.replace('-', "_");
        let rel = match (self.driver, qos) {
            (Driver::Systemd, "guaranteed") => format!("kubepods.slice/kubepods-pod{esc}.slice"),
            (Driver::Systemd, q) => {
                format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{esc}.slice")
            }
            (Driver::Cgroupfs, "guaranteed") => format!("kubepods/pod{uid}"),
            (Driver::Cgroupfs, q) => format!("kubepods/{q}/pod{uid}"),
        };
        base.join(rel)
    }

    /// Creates pod `uid`'s cgroup and its container cgroup and moves `pid` into it.
    pub fn place(&self, uid: &str, qos: &str, pid: u32) -> std::io::Result<PodCgroup> {
        let pod_dir = self.pod_path(uid, qos);
        let id: String = uid.chars().filter(char::is_ascii_hexdigit).collect();
        let container_dir = match self.driver {
            Driver::Systemd => pod_dir.join(format!("cri-containerd-{id}.scope")),
            Driver::Cgroupfs => pod_dir.join(id),
        };
        std::fs::create_dir_all(&container_dir)?;
        let cg = PodCgroup {
            pod_dir,
            container_dir,
            v1: self.v1(),
        };
        std::fs::write(cg.container_dir.join("cgroup.procs"), pid.to_string())?;
        Ok(cg)
    }
}

impl PodCgroup {
    /// Whether the kernel reports the pod frozen (`cgroup.events` `frozen 1`, v1
    /// `freezer.state` `FROZEN`).
    pub fn frozen(&self) -> bool {
        if self.v1 {
            read(&self.pod_dir.join("freezer.state")).trim() == "FROZEN"
        } else {
            read(&self.pod_dir.join("cgroup.events"))
                .lines()
                .any(|l| l == "frozen 1")
        }
    }

    /// Thaws the pod (a v1-frozen process cannot die until thawed).
    pub fn thaw(&self) {
        let _ = if self.v1 {
            std::fs::write(self.pod_dir.join("freezer.state"), "THAWED")
        } else {
            std::fs::write(self.pod_dir.join("cgroup.freeze"), "0")
        };
    }
}

impl Drop for PodCgroup {
    /// Removes the container and pod cgroups (empty once the process is reaped; the
    /// kernel may take a moment to notice) and the QoS parents the pod leaves empty.
    fn drop(&mut self) {
        for _ in 0..200 {
            if std::fs::remove_dir(&self.container_dir).is_ok() || !self.container_dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir(&self.pod_dir);
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qos_classes_follow_requests_and_limits() {
        assert_eq!(qos_class(&[json!({"name": "a"})]), "besteffort");
        let g = json!({"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}});
        assert_eq!(qos_class(&[g]), "guaranteed");
        let b = json!({"name": "a", "resources": {"requests": {"cpu": "100m"}}});
        assert_eq!(qos_class(&[b]), "burstable");
    }

    #[test]
    fn pod_paths_are_the_kubelets() {
        let uid = "0b6f-44aa";
        let sd = PodCgroups {
            root: "/nonexistent".into(),
            driver: Driver::Systemd,
        };
        assert_eq!(
            sd.pod_path(uid, "burstable"),
            Path::new(
                "/nonexistent/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b6f_44aa.slice"
            )
        );
        assert_eq!(
            sd.pod_path(uid, "guaranteed"),
            Path::new("/nonexistent/kubepods.slice/kubepods-pod0b6f_44aa.slice")
        );
        let fs = PodCgroups {
            root: "/nonexistent".into(),
            driver: Driver::Cgroupfs,
        };
        assert_eq!(
            fs.pod_path(uid, "besteffort"),
            Path::new("/nonexistent/kubepods/besteffort/pod0b6f-44aa")
        );
    }
}
