//! Local sandbox isolation: each process sandbox runs under bubblewrap in its own PID, IPC,
//! UTS and mount namespaces, with a private `/tmp`, a read-only view of the host except its
//! own working directory and its session's volumes, no capabilities, and no way to outlive
//! its parent.
//!
//! Why bubblewrap: it is the maintained, audited tool for exactly this (Flatpak's sandbox;
//! Debian package `bubblewrap`), and it does the namespace and mount choreography in a
//! separate process, so the activator needs no `unsafe` of its own beyond the existing
//! `pre_exec`. What it does not isolate: the network (sandboxes share the host's loopback so
//! that they can listen on their port), CPU/memory (the cgroup limits do that), and the
//! kernel itself (it is not a VM; a cluster gets that with a gVisor or Kata
//! `runtimeClassName` in the SandboxTemplate).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::child::VolumeMount;
use crate::config::IsolationKind;

/// How sandbox processes are wrapped; `None` = run the command as is.
#[derive(Debug, Clone)]
pub struct Isolation {
    bwrap: PathBuf,
    /// The directory that holds every sandbox's working directory: hidden inside a sandbox
    /// (an empty tmpfs over it), except for the sandbox's own directory.
    workdir_root: PathBuf,
    /// `backend.volumes_root`: hidden like `workdir_root`, except the session's own volumes.
    volumes_root: PathBuf,
    /// The host's root directory, entry by entry: each entry is bound read-only onto
    /// bubblewrap's own (tmpfs) root, so a volume's mount path that does not exist on the
    /// host (`/workspace`) can still be created in the sandbox's root.
    root: Vec<RootEntry>,
    /// As root, bubblewrap keeps the caller's capabilities unless told to drop them.
    drop_caps: bool,
}

/// One entry of the host's `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootEntry {
    /// A directory or file, bound read-only.
    Bind(String),
    /// A symlink (`/bin -> usr/bin`), recreated as one.
    Symlink(String, String),
}

/// Entries of `/` the sandbox gets its own of (`/proc`, `/dev`, the private `/tmp`).
const OWN_ROOT_ENTRIES: &[&str] = &["proc", "dev", "tmp"];

/// Lists the host's `/` (sorted, so argv is stable).
fn read_root() -> Result<Vec<RootEntry>, String> {
    let mut entries = Vec::new();
    for e in std::fs::read_dir("/").map_err(|e| format!("cannot list /: {e}"))? {
        let e = e.map_err(|e| format!("cannot list /: {e}"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if OWN_ROOT_ENTRIES.contains(&name.as_str()) {
            continue;
        }
        let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
        match std::fs::read_link(e.path()) {
            Ok(target) if is_link => {
                entries.push(RootEntry::Symlink(target.to_string_lossy().into(), name))
            }
            _ => entries.push(RootEntry::Bind(name)),
        }
    }
    entries.sort_by(|a, b| root_name(a).cmp(root_name(b)));
    Ok(entries)
}

fn root_name(e: &RootEntry) -> &str {
    match e {
        RootEntry::Bind(n) | RootEntry::Symlink(_, n) => n,
    }
}

impl Isolation {
    /// Resolves `backend.isolation`: `namespaces` must work here (else an error naming the
    /// key), `auto` uses namespaces when a trial sandbox starts and otherwise runs sandboxes
    /// unisolated with a warning, `none` never isolates.
    pub async fn detect(
        kind: IsolationKind,
        bwrap: &Path,
        workdir_root: &Path,
        volumes_root: &Path,
    ) -> Result<Option<Isolation>, String> {
        if kind == IsolationKind::None {
            return Ok(None);
        }
        let isolation = Isolation {
            bwrap: bwrap.to_path_buf(),
            workdir_root: workdir_root.to_path_buf(),
            volumes_root: volumes_root.to_path_buf(),
            root: read_root()?,
            drop_caps: nix::unistd::geteuid().is_root(),
        };
        match isolation.trial().await {
            Ok(()) => Ok(Some(isolation)),
            Err(why) if kind == IsolationKind::Auto => {
                tracing::warn!(reason = %why, "backend.isolation: auto: sandboxes run without \
                    namespace isolation (install bubblewrap, or set isolation: none to silence)");
                Ok(None)
            }
            Err(why) => Err(format!(
                "namespaces are not available: {why} (install Debian's bubblewrap, set \
                 backend.bwrap to its path, or use isolation: none)"
            )),
        }
    }

    /// Starts one throw-away sandbox running `true`, bounded by 10 s.
    async fn trial(&self) -> Result<(), String> {
        let argv = self.wrap(&["true".to_owned()], &std::env::temp_dir(), &[]);
        let run = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(10), run).await {
            Err(_) => Err(format!("{} did not finish a trial run in 10 s", argv[0])),
            Ok(Err(e)) => Err(format!("cannot run {}: {e}", argv[0])),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "{} failed a trial run ({}): {}",
                argv[0],
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Whether a volume can be bound at `mount_path`: it exists on the host (bound over), or
    /// its first component does not (created in the sandbox's own root), or it is under
    /// the private `/tmp`. Anything else would need a directory made in a read-only view.
    pub fn can_mount_at(&self, mount_path: &str) -> bool {
        let first = mount_path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        Path::new(mount_path).is_dir()
            || first == "tmp"
            || !self.root.iter().any(|e| root_name(e) == first)
    }

    /// The argv that runs `command` isolated, with `workdir` and the session's `volumes` as
    /// the only writable host paths.
    pub fn wrap(&self, command: &[String], workdir: &Path, volumes: &[VolumeMount]) -> Vec<String> {
        let text = |p: &Path| p.to_string_lossy().into_owned();
        let (root, own) = (text(&self.workdir_root), text(workdir));
        let mut argv: Vec<String> = vec![text(&self.bwrap)];
        // The sandbox's processes die when the activator's child (bwrap) dies, which the
        // spawner's PR_SET_PDEATHSIG ties to the activator.
        let mut fixed = vec![
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "sandbox",
        ];
        if self.drop_caps {
            fixed.extend(["--cap-drop", "ALL"]);
        }
        // Not --new-session: it would move the sandbox out of the process group that the
        // signal freezer and the group kill address.
        argv.extend(fixed.into_iter().map(str::to_owned));
        for e in &self.root {
            match e {
                RootEntry::Bind(n) => {
                    argv.extend(["--ro-bind".into(), format!("/{n}"), format!("/{n}")])
                }
                RootEntry::Symlink(target, n) => {
                    argv.extend(["--symlink".into(), target.clone(), format!("/{n}")])
                }
            }
        }
        argv.extend(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"].map(str::to_owned));
        // Other sandboxes' directories disappear under an empty tmpfs; this one comes back.
        argv.extend(["--tmpfs".to_owned(), root]);
        // Files the command line names (the program, a script) stay visible, read-only, even
        // where the private /tmp would hide them (say, a build under /tmp).
        for arg in command.iter().filter(|a| a.starts_with('/')) {
            if Path::new(arg).is_file() {
                argv.extend(["--ro-bind".to_owned(), arg.clone(), arg.clone()]);
            }
        }
        argv.extend(["--bind".to_owned(), own.clone(), own.clone()]);
        if !volumes.is_empty() {
            // Other sessions' volumes disappear too; this session's appear at their paths.
            argv.extend(["--tmpfs".to_owned(), text(&self.volumes_root)]);
            for v in volumes {
                argv.extend(["--bind".to_owned(), text(&v.host), v.mount_path.clone()]);
            }
        }
        argv.extend(["--chdir".to_owned(), own, "--".to_owned()]);
        argv.extend(command.iter().cloned());
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_with_namespaces_and_only_the_workdir_writable() {
        let iso = Isolation {
            bwrap: "/usr/bin/bwrap".into(),
            workdir_root: "/var/lib/aa".into(),
            volumes_root: "/var/lib/av".into(),
            root: vec![
                RootEntry::Symlink("usr/bin".into(), "bin".into()),
                RootEntry::Bind("usr".into()),
            ],
            drop_caps: true,
        };
        let volume = VolumeMount {
            env: "ACTIVATOR_VOLUME_WORK".into(),
            host: "/var/lib/av/0123/work".into(),
            mount_path: "/workspace".into(),
        };
        let argv = iso.wrap(
            &["demo".to_owned(), "--port".to_owned(), "9".to_owned()],
            Path::new("/var/lib/aa/i1/sbx-1"),
            &[volume],
        );
        let text = argv.join(" ");
        assert_eq!(argv[0], "/usr/bin/bwrap");
        assert!(
            text.contains("--unshare-pid --unshare-ipc --unshare-uts"),
            "{text}"
        );
        assert!(text.contains("--cap-drop ALL"), "{text}");
        assert!(
            text.contains("--symlink usr/bin /bin --ro-bind /usr /usr"),
            "{text}"
        );
        assert!(!text.contains("--ro-bind / /"), "{text}");
        assert!(text.contains("--tmpfs /tmp"), "{text}");
        assert!(!text.contains("--new-session"), "{text}");
        // Hide every sandbox directory, then bind this one back: order matters.
        let hide = text.find("--tmpfs /var/lib/aa ").unwrap();
        let bind = text
            .find("--bind /var/lib/aa/i1/sbx-1 /var/lib/aa/i1/sbx-1")
            .unwrap();
        assert!(hide < bind, "{text}");
        let hide_volumes = text.find("--tmpfs /var/lib/av ").unwrap();
        let volume = text
            .find("--bind /var/lib/av/0123/work /workspace")
            .unwrap();
        assert!(bind < hide_volumes && hide_volumes < volume, "{text}");
        assert!(iso.can_mount_at("/workspace"));
        assert!(!iso.can_mount_at("/usr/local/nowhere-such-dir"));
        assert!(text.ends_with("-- demo --port 9"), "{text}");
    }
}
