//! Per-sandbox resource limits (`backend.memory_max`, `backend.pids_max`,
//! `backend.cpu_weight`): cgroup v2 files in the sandbox's own cgroup where the unified
//! hierarchy offers the controller, else the controller's cgroup v1 hierarchy.
//!
//! Hybrid hosts (systemd's default before v247, many CI machines) mount the unified
//! hierarchy with few or no controllers next to v1 `memory`, `pids` and `cpu` hierarchies;
//! each limit goes wherever its controller actually is. A limit that no hierarchy can
//! enforce fails the start with an error naming its key, never a silent no-op.

use std::path::{Path, PathBuf};

use super::freezer::{FreezerMode, SandboxCgroup, v1_root, write};
use crate::config::{
    BackendConfig, ConfigError, DEFAULT_CPU_WEIGHT, DEFAULT_MEMORY_MAX, DEFAULT_PIDS_MAX,
};

/// The v1 hierarchies limits may use (also swept for leftovers).
pub const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where one controller's limit is written.
#[derive(Debug)]
enum Home {
    /// In the sandbox's own (v2 freezer) cgroup.
    V2,
    /// In `<this dir>/<sandbox>` of the controller's v1 hierarchy (this instance's dir).
    V1(PathBuf),
}

#[derive(Debug)]
struct Limit {
    controller: &'static str,
    /// The config key, for errors.
    key: &'static str,
    home: Home,
    /// (file, value) pairs written in order, per hierarchy version.
    files: Vec<(&'static str, String)>,
}

/// A configured limit before its hierarchy is known: the files to write in v2 and in v1.
struct Wanted {
    controller: &'static str,
    key: &'static str,
    v2: Vec<(&'static str, String)>,
    v1: Vec<(&'static str, String)>,
}

/// The limits every sandbox of one backend gets, and where each is enforced.
#[derive(Debug, Default)]
pub struct Limits {
    limits: Vec<Limit>,
}

/// cgroup v2 `cpu.weight` (1..=10000, default 100) as v1 `cpu.shares` (default 1024): the
/// kernel's own conversion, `shares = DIV_ROUND_CLOSEST(weight * 1024, 100)` (Linux
/// kernel/sched/core.c `cpu_weight_write_u64`; since v6.8 `sched_weight_from_cgroup` in
/// kernel/sched/sched.h), which systemd also uses (`cgroup_cpu_weight_to_shares`), clamped
/// to the kernel's `cpu.shares` range 2..=262144.
pub fn weight_to_shares(weight: u32) -> u64 {
    ((u64::from(weight) * 1024 + 50) / 100).clamp(2, 262_144)
}

/// The limits in force for one backend: the configured ones, or for isolated sandboxes
/// (untrusted code) the defaults where a key is unset; `0` turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    pub memory_max: Option<u64>,
    pub pids_max: Option<u32>,
    pub cpu_weight: Option<u32>,
}

impl Requested {
    pub fn of(b: &BackendConfig, isolated: bool) -> Requested {
        let pick = |set: Option<u64>, default: u64| {
            set.or(isolated.then_some(default)).filter(|v| *v != 0)
        };
        Requested {
            memory_max: pick(b.memory_max, DEFAULT_MEMORY_MAX),
            pids_max: pick(b.pids_max.map(u64::from), DEFAULT_PIDS_MAX.into()).map(|v| v as u32),
            cpu_weight: pick(b.cpu_weight.map(u64::from), DEFAULT_CPU_WEIGHT.into())
                .map(|v| v as u32),
        }
    }
}

impl Limits {
    /// Resolves where each requested limit is enforced and prepares this instance's
    /// directories. `Err` names the key whose limit no hierarchy can enforce.
    pub fn detect(
        b: &Requested,
        mode: FreezerMode,
        instance_dir: Option<&Path>,
        instance: &str,
    ) -> Result<Limits, ConfigError> {
        let mut wanted: Vec<Wanted> = Vec::new();
        if let Some(m) = b.memory_max {
            let m = m.to_string();
            // No swap either: over the limit means OOM, not a slow sandbox.
            wanted.push(Wanted {
                controller: "memory",
                key: "backend.memory_max",
                v2: vec![("memory.max", m.clone()), ("memory.swap.max", "0".into())],
                v1: vec![
                    ("memory.limit_in_bytes", m.clone()),
                    ("memory.memsw.limit_in_bytes", m),
                ],
            });
        }
        if let Some(p) = b.pids_max {
            wanted.push(Wanted {
                controller: "pids",
                key: "backend.pids_max",
                v2: vec![("pids.max", p.to_string())],
                v1: vec![("pids.max", p.to_string())],
            });
        }
        if let Some(w) = b.cpu_weight {
            wanted.push(Wanted {
                controller: "cpu",
                key: "backend.cpu_weight",
                v2: vec![("cpu.weight", w.to_string())],
                v1: vec![("cpu.shares", weight_to_shares(w).to_string())],
            });
        }
        if wanted.is_empty() {
            return Ok(Limits::default());
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut limits = Vec::new();
        for Wanted {
            controller,
            key,
            v2: v2_files,
            v1: v1_files,
        } in wanted
        {
            if mode == FreezerMode::Signal {
                return Err(ConfigError::invalid(
                    key,
                    "needs a cgroup for each sandbox, but backend.freezer resolved to signal \
                     (no writable cgroup freezer); use cgroup_v2 or cgroup_v1, or set it to 0 \
                     (no limit; isolated sandboxes get one by default)",
                ));
            }
            let v2 = match (mode, instance_dir) {
                (FreezerMode::CgroupV2, Some(dir)) => enable_v2(dir, controller),
                _ => Err("the sandbox cgroups are not in the unified hierarchy".to_owned()),
            };
            let (home, files) = match v2 {
                Ok(()) => (Home::V2, v2_files),
                Err(v2_why) => {
                    let dir = v1_root(&mountinfo, &own, controller)
                        .map(|r| r.join("agent-activator").join(instance))
                        .ok_or_else(|| {
                            ConfigError::invalid(
                                key,
                                format!(
                                    "the {controller} controller is available neither in cgroup \
                                     v2 ({v2_why}) nor as a mounted cgroup v1 hierarchy"
                                ),
                            )
                        })?;
                    std::fs::create_dir_all(&dir).map_err(|e| {
                        ConfigError::invalid(key, format!("cannot create {}: {e}", dir.display()))
                    })?;
                    (Home::V1(dir), v1_files)
                }
            };
            limits.push(Limit {
                controller,
                key,
                home,
                files,
            });
        }
        let resolved = Limits { limits };
        resolved.log();
        Ok(resolved)
    }

    fn log(&self) {
        for l in &self.limits {
            let at = match &l.home {
                Home::V2 => "cgroup v2".to_owned(),
                Home::V1(dir) => format!("cgroup v1 {}", dir.display()),
            };
            tracing::info!(key = l.key, controller = l.controller, at, "sandbox limit");
        }
    }

    /// Writes the limits for sandbox `name` into `cgroup` (v2) or into new cgroups of the
    /// v1 hierarchies, which `cgroup` records so the child joins them and teardown removes
    /// them. Optional files (`memory.swap.max`, `memory.memsw.*` without swap accounting)
    /// are skipped when the kernel does not offer them.
    pub fn apply(&self, cgroup: &mut SandboxCgroup, name: &str) -> Result<(), String> {
        for l in &self.limits {
            let dir = match &l.home {
                Home::V2 => cgroup.path().to_path_buf(),
                Home::V1(instance) => {
                    let dir = instance.join(name);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("{}: cannot create {}: {e}", l.key, dir.display()))?;
                    cgroup.add_limit_dir(dir.clone());
                    dir
                }
            };
            for (file, value) in &l.files {
                let path = dir.join(file);
                let optional = matches!(*file, "memory.swap.max" | "memory.memsw.limit_in_bytes");
                if optional && !path.exists() {
                    continue;
                }
                write(&path, value).map_err(|e| format!("{}: {e}", l.key))?;
            }
        }
        Ok(())
    }

    /// Processes the kernel OOM-killed in sandbox `name` so far: `oom_kill` of cgroup v2
    /// `memory.events` or of v1 `memory.oom_control` (Linux 4.13+; both in
    /// Documentation/admin-guide/cgroup-v{1,2}). `None` without a memory limit.
    pub fn oom_kills(&self, cgroup: &SandboxCgroup, name: &str) -> Option<u64> {
        let l = self.limits.iter().find(|l| l.controller == "memory")?;
        let file = match &l.home {
            Home::V2 => cgroup.path().join("memory.events"),
            Home::V1(instance) => instance.join(name).join("memory.oom_control"),
        };
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let (key, n) = line.split_once(' ')?;
            (key == "oom_kill").then(|| n.trim().parse().ok())?
        })
    }

    /// `backend.memory_max` in force, for messages.
    pub fn memory_max(&self) -> Option<&str> {
        let l = self.limits.iter().find(|l| l.controller == "memory")?;
        l.files.first().map(|(_, v)| v.as_str())
    }

    /// Removes this instance's (by now empty) v1 directories.
    pub fn remove_instance_dirs(&self) {
        for l in &self.limits {
            if let Home::V1(dir) = &l.home {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Makes `controller` available to the sandbox cgroups below `instance_dir` (unified
/// hierarchy): enabled in `cgroup.subtree_control` from the activator's own cgroup down to
/// the instance directory. The kernel refuses (EBUSY) to enable a controller in a non-root
/// cgroup that holds processes, which is the usual case for the activator's own cgroup;
/// the error says so and the caller falls back to v1.
fn enable_v2(instance_dir: &Path, controller: &str) -> Result<(), String> {
    let has = |file: &Path| {
        std::fs::read_to_string(file).is_ok_and(|s| s.split_whitespace().any(|c| c == controller))
    };
    let base = instance_dir.parent().ok_or("no parent")?;
    let own = base.parent().ok_or("no parent")?;
    for dir in [own, base, instance_dir] {
        if has(&dir.join("cgroup.subtree_control")) {
            continue;
        }
        if !has(&dir.join("cgroup.controllers")) {
            return Err(format!("{} does not offer it", dir.display()));
        }
        write(
            &dir.join("cgroup.subtree_control"),
            &format!("+{controller}"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_maps_to_shares_like_the_kernel() {
        assert_eq!(weight_to_shares(100), 1024, "defaults match");
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(50), 512);
        assert_eq!(weight_to_shares(10_000), 102_400);
        assert_eq!(weight_to_shares(0), 2, "clamped to the kernel minimum");
    }
}
