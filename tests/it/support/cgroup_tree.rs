//! Kubelet-style pod cgroup trees under a test root in the real cgroup filesystem, with
//! real processes in them, for the node agent's tests.
//!
//! A machine without a writable cgroup hierarchy reports the tests that need one as ignored
//! with the reason (build.rs cfg `missing_cgroup_v2` / `missing_cgroup_v1_freezer`); under
//! `CI=true` they run and fail.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Which freezer interface the test root is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    V2,
    V1,
}

/// A directory in a real cgroup hierarchy, removed (processes killed) when dropped.
pub struct TestRoot {
    pub path: PathBuf,
    pub hierarchy: Hierarchy,
    children: Vec<Child>,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Where `hierarchy` is mounted: the `cgroup2` mount, or the v1 mount with `freezer`.
pub fn mount_point(hierarchy: Hierarchy) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let hit = match hierarchy {
            Hierarchy::V2 => post.first() == Some(&"cgroup2"),
            Hierarchy::V1 => {
                post.first() == Some(&"cgroup")
                    && post
                        .get(2)
                        .is_some_and(|o| o.split(',').any(|o| o == "freezer"))
            }
        };
        // Only a mount of the hierarchy's root lets us create cgroups where we expect.
        (hit && pre.get(3) == Some(&"/")).then(|| PathBuf::from(pre[4]))
    })
}

impl TestRoot {
    /// A fresh root in `hierarchy`, or the reason there is none.
    pub fn new(hierarchy: Hierarchy) -> Result<TestRoot, String> {
        let mount = mount_point(hierarchy).ok_or_else(|| format!("no {hierarchy:?} mount"))?;
        let path = mount.join(format!(
            "agent-activator-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let probe = match hierarchy {
            Hierarchy::V2 => "cgroup.freeze",
            Hierarchy::V1 => "freezer.state",
        };
        if !path.join(probe).exists() {
            let _ = std::fs::remove_dir(&path);
            return Err(format!("{} has no {probe}", path.display()));
        }
        Ok(TestRoot {
            path,
            hierarchy,
            children: Vec::new(),
        })
    }

    /// `TestRoot::new`, failing the test when the hierarchy is not writable. Tests that need
    /// one carry `#[cfg_attr(missing_cgroup_v2 | missing_cgroup_v1_freezer, ignore = ...)]`
    /// (build.rs probes the machine), so where the prerequisite is missing the runner
    /// reports them ignored with the reason; a test that runs must find it. (Always
    /// `Some`: the `Option` keeps the callers' shape.)
    pub fn or_skip(hierarchy: Hierarchy, test: &str) -> Option<TestRoot> {
        match TestRoot::new(hierarchy) {
            Ok(r) => Some(r),
            Err(reason) => panic!("{test}: no writable {hierarchy:?} cgroup: {reason}"),
        }
    }

    /// Creates `rel` (and its parents) below the root.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path.join(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Starts a process that spins on the CPU inside cgroup `rel` (a container cgroup).
    pub fn spawn_busy(&mut self, rel: &str) -> u32 {
        self.spawn_in(rel, &["sh", "-c", "while :; do :; done"])
    }

    /// Starts `argv` inside cgroup `rel`; returns its pid.
    pub fn spawn_in(&mut self, rel: &str, argv: &[&str]) -> u32 {
        let dir = self.mkdir(rel);
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn test process");
        let pid = child.id();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", dir.display()));
        self.children.push(child);
        pid
    }

    /// Whether the kernel reports the cgroup `rel` frozen.
    pub fn kernel_frozen(&self, rel: &str) -> bool {
        let p = self.path.join(rel);
        match self.hierarchy {
            Hierarchy::V2 => std::fs::read_to_string(p.join("cgroup.events"))
                .unwrap()
                .lines()
                .any(|l| l == "frozen 1"),
            Hierarchy::V1 => {
                std::fs::read_to_string(p.join("freezer.state"))
                    .unwrap()
                    .trim()
                    == "FROZEN"
            }
        }
    }
}

/// utime + stime of `pid`, in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process alive");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Whether `pid` gains CPU ticks over `window`.
pub fn makes_progress(pid: u32, window: std::time::Duration) -> bool {
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    cpu_ticks(pid) > before
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        thaw_all(&self.path, self.hierarchy);
        for c in &mut self.children {
            let _ = c.wait();
        }
        remove_tree(&self.path);
    }
}

fn thaw_all(dir: &Path, h: Hierarchy) {
    let _ = match h {
        Hierarchy::V2 => std::fs::write(dir.join("cgroup.freeze"), "0"),
        Hierarchy::V1 => std::fs::write(dir.join("freezer.state"), "THAWED"),
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                thaw_all(&e.path(), h);
            }
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
