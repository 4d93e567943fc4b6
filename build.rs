//! Probes the machine for what some integration tests need, so a test whose prerequisite is
//! missing is reported by the runner as *ignored, with the reason*, never as passed.
//!
//! Each missing prerequisite sets a cfg `missing_<name>`; a test that needs it carries
//! `#[cfg_attr(missing_<name>, ignore = "<reason>")]`. Under `CI=true` nothing is marked
//! missing: every test runs, and one whose prerequisite is absent fails (`.ci/run` installs
//! them). The probes only read the machine.
//!
//! The build must depend on the code only (issue 22): cargo scans a `rerun-if-changed`
//! directory recursively, so watching `/sys/fs/cgroup` (which changes whenever a sandbox
//! starts) or `/usr/bin` (a package install) recompiled the crate on nearly every build.
//! This script watches just the files each *found* prerequisite is: replacing or removing one
//! re-probes. A prerequisite installed after the last probe is seen after `touch build.rs`
//! or with `AGENT_ACTIVATOR_REPROBE` changed (cargo re-runs a script whose watched file is
//! missing on every build, so a missing tool cannot be watched). The cgroup probes read
//! mounts, which do not change while the machine runs.

use std::path::Path;
use std::process::{Command, Stdio};

/// (cfg name, is it present?) for every prerequisite the suite knows.
fn probes() -> Vec<(&'static str, bool)> {
    vec![
        ("promtool", runs("promtool", &["--version"])),
        ("kubectl", runs("kubectl", &["version", "--client"])),
        ("chromium", runs("chromium", &["--version"])),
        // bubblewrap able to create the namespaces a process sandbox uses.
        (
            "bwrap",
            runs(
                "bwrap",
                &[
                    "--unshare-pid",
                    "--unshare-ipc",
                    "--unshare-uts",
                    "--ro-bind",
                    "/",
                    "/",
                    "--proc",
                    "/proc",
                    "true",
                ],
            ),
        ),
        // pasta (Debian passt): the network namespace of an isolated sandbox. It runs as
        // the unprivileged sandbox user and opens /dev/net/tun, so that must be mode 0666.
        ("pasta", runs("pasta", &["--version"]) && tun_usable()),
        (
            "kubernetes_validate",
            runs("python3", &["-c", "import kubernetes_validate, yaml"]),
        ),
        // The unified hierarchy, writable (root): the cgroup v2 freezer tests.
        ("cgroup_v2", cgroup_v2_writable()),
        // A mounted v1 freezer hierarchy.
        (
            "cgroup_v1_freezer",
            Path::new("/sys/fs/cgroup/freezer/cgroup.procs").exists(),
        ),
        // The memory, pids and cpu controllers for per-sandbox limits: v1 hierarchies (a
        // hybrid host) or the unified hierarchy offering all three.
        ("cgroup_limits", cgroup_limits()),
    ]
}

/// The file `program` resolves to on `PATH`, if any.
fn on_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The files whose change should re-probe: each prerequisite found, nothing for one missing.
fn watched_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = ["promtool", "kubectl", "chromium", "bwrap", "pasta"]
        .iter()
        .filter_map(|p| on_path(p))
        .collect();
    // The Python module's own file (pip reinstalls or removes it), not site-packages.
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import kubernetes_validate; print(kubernetes_validate.__file__)",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let file = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if Path::new(&file).is_file() {
            files.push(file.into());
        }
    }
    files
}

/// `/dev/net/tun` readable and writable by every user (udev's mode on a standard host).
fn tun_usable() -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata("/dev/net/tun").is_ok_and(|m| m.permissions().mode() & 0o006 == 0o006)
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// cgroup v2 with the freezer (`cgroup.freeze` exists in non-root groups from Linux 5.2) and a
/// root that may create groups: either the unified mount at /sys/fs/cgroup or a hybrid
/// host's /sys/fs/cgroup/unified.
fn cgroup_v2_writable() -> bool {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .any(|root| {
            let root = Path::new(root);
            if !root.join("cgroup.controllers").exists() {
                return false;
            }
            let probe = root.join(format!(
                "agent-activator-build-probe-{}",
                std::process::id()
            ));
            let ok = std::fs::create_dir(&probe).is_ok() && probe.join("cgroup.freeze").exists();
            let _ = std::fs::remove_dir(&probe);
            ok
        })
}

/// Where `backend.memory_max`/`pids_max`/`cpu_weight` can be enforced: each of the memory,
/// pids and cpu controllers mounted as a v1 hierarchy, or all three offered by a unified
/// hierarchy mounted at /sys/fs/cgroup.
fn cgroup_limits() -> bool {
    let v1 = ["memory", "pids", "cpu"]
        .iter()
        .all(|c| Path::new(&format!("/sys/fs/cgroup/{c}/cgroup.procs")).exists());
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").is_ok_and(|s| {
        ["memory", "pids", "cpu"]
            .iter()
            .all(|c| s.split_whitespace().any(|x| x == *c))
    });
    v1 || v2
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=AGENT_ACTIVATOR_REPROBE");
    for file in watched_files() {
        println!("cargo::rerun-if-changed={}", file.display());
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    for (name, present) in probes() {
        println!("cargo::rustc-check-cfg=cfg(missing_{name})");
        if !present && !ci {
            println!("cargo::rustc-cfg=missing_{name}");
            println!("cargo::warning=tests needing {name} are reported as ignored: not found");
        }
    }
}
