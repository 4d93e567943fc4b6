//! Local sandbox isolation: each process sandbox runs as an unprivileged host user
//! (`backend.sandbox_user`), in its own user, network (pasta: see `network`), PID, IPC,
//! UTS, cgroup and mount namespaces (bubblewrap), on a minimal read-only filesystem: the
//! host's `/usr`, `/lib*`, `/bin`, `/sbin`, a sanitised `/etc`, the command's own files and
//! `backend.ro_paths`, plus its writable working directory, its session's volumes and a
//! private `/tmp`. Nothing else of the host exists inside: not `/root`, `/home`, other
//! sandboxes' directories or volumes, nor the activator's config, key and token files.
//!
//! Why bubblewrap: it is the maintained, audited tool for exactly this (Flatpak's sandbox;
//! Debian package `bubblewrap`), and it does the namespace and mount choreography in a
//! separate process, so the activator needs no `unsafe` of its own beyond the existing
//! `pre_exec`. The chain is `pasta` (as the sandbox user: it makes the user and network
//! namespaces) -> `bwrap` (a nested user namespace in which the sandbox is uid 1000
//! `sandbox` without capabilities, so it cannot undo pasta's routes) -> the command. What
//! it does not isolate: CPU/memory (the cgroup limits do that) and the kernel itself (it
//! is not a VM; docs/security.md compares it with gVisor and Firecracker).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::child::VolumeMount;
use super::network::Network;
use super::user::SandboxUser;

/// How sandbox processes are wrapped; `None` = run the command as is.
#[derive(Debug, Clone)]
pub struct Isolation {
    bwrap: PathBuf,
    network: Network,
    /// The host user the chain runs as.
    pub user: SandboxUser,
    /// The host's system directories, each bound read-only or recreated as a symlink.
    system: Vec<RootEntry>,
    /// The sanitised `/etc`: generated files and allowed host entries.
    etc: Vec<RootEntry>,
    /// `backend.ro_paths`.
    ro_paths: Vec<PathBuf>,
    /// Paths never bound, whatever the command line names: the activator's secrets.
    denied: Vec<PathBuf>,
}

/// One entry of the sandbox's root or `/etc`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootEntry {
    /// A host path (`source`) bound read-only at `dest`.
    Bind { source: PathBuf, dest: String },
    /// A symlink (`/bin -> usr/bin`), recreated as one.
    Symlink { target: String, dest: String },
}

/// The host's system directories a command needs (those that exist are used).
const SYSTEM: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host `/etc` entries that hold no secrets and that programs need: the dynamic linker's
/// cache, TLS roots, Debian's alternatives symlinks, protocol and service tables, time zone.
const ETC_ALLOWED: &[&str] = &[
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "ssl",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "protocols",
    "services",
    "host.conf",
    "gai.conf",
    "mime.types",
    "os-release",
    "debian_version",
];

/// The sandbox's own uid and gid inside its user namespace (`sandbox` in its passwd).
pub const INNER_ID: u32 = 1000;

/// Root-level names the sandbox's root holds besides the system directories.
const OWN_ROOT_ENTRIES: &[&str] = &["etc", "proc", "dev", "tmp"];

fn entry(name: &str, dest: String) -> Option<RootEntry> {
    let host = Path::new("/").join(name);
    let meta = std::fs::symlink_metadata(&host).ok()?;
    Some(if meta.file_type().is_symlink() {
        RootEntry::Symlink {
            target: std::fs::read_link(&host).ok()?.to_string_lossy().into(),
            dest,
        }
    } else {
        RootEntry::Bind { source: host, dest }
    })
}

/// The settings [`Isolation::detect`] needs.
pub struct IsolationSettings<'a> {
    pub bwrap: &'a Path,
    pub network: Network,
    pub user: SandboxUser,
    pub ro_paths: &'a [PathBuf],
    /// The activator's secret files (HMAC keys, admin token, its config file).
    pub denied: Vec<PathBuf>,
    /// Where the generated `/etc` files are written (this backend instance's directory).
    pub instance_dir: &'a Path,
}

impl Isolation {
    /// Resolves `backend.isolation`: `namespaces` must work here (else an error naming the
    /// key), `auto` uses namespaces when a trial sandbox starts and otherwise runs sandboxes
    /// unisolated with a warning.
    pub async fn detect(
        auto: bool,
        settings: IsolationSettings<'_>,
    ) -> Result<Option<Isolation>, String> {
        let IsolationSettings {
            bwrap,
            network,
            user,
            ro_paths,
            denied,
            instance_dir,
        } = settings;
        let etc_dir = instance_dir.join("etc");
        let isolation = Isolation {
            bwrap: bwrap.to_path_buf(),
            network,
            user,
            system: SYSTEM
                .iter()
                .filter_map(|n| entry(n, format!("/{n}")))
                .collect(),
            etc: write_etc(&etc_dir)?,
            ro_paths: ro_paths.to_vec(),
            denied,
        };
        match isolation.trial(instance_dir).await {
            Ok(()) => Ok(Some(isolation)),
            Err(why) if auto => {
                tracing::warn!(reason = %why, "backend.isolation: auto: sandboxes run without \
                    namespace isolation (install bubblewrap and passt, or set isolation: none \
                    to silence)");
                Ok(None)
            }
            Err(why) => Err(format!(
                "namespaces are not available: {why} (install Debian's bubblewrap and passt, \
                 set backend.bwrap / backend.pasta to their paths, or use isolation: none)"
            )),
        }
    }

    /// Starts one throw-away sandbox running `true` as the sandbox user, bounded by 10 s.
    async fn trial(&self, dir: &Path) -> Result<(), String> {
        let argv = self.wrap(&["true".to_owned()], dir, &[], &[]);
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if self.user.switch {
            // std drops the supplementary groups (setgroups(0)) before setuid when a uid
            // is set and the caller is root.
            cmd.uid(self.user.uid).gid(self.user.gid);
        }
        match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
            Err(_) => Err(format!("{} did not finish a trial run in 10 s", argv[0])),
            Ok(Err(e)) => Err(format!("cannot run {}: {e}", argv[0])),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stderr: Vec<&str> = stderr.lines().filter(|l| !l.contains("syslog")).collect();
                let hint = if stderr.iter().any(|l| l.contains("tun")) {
                    format!(
                        " (pasta opens /dev/net/tun as uid {}: udev makes it mode 0666 on a \
                         standard host; here: chmod 0666 /dev/net/tun)",
                        self.user.uid
                    )
                } else {
                    String::new()
                };
                Err(format!(
                    "{} failed a trial run as uid {} ({}): {}{hint}",
                    argv[0],
                    self.user.uid,
                    out.status,
                    stderr.join("; ").trim()
                ))
            }
        }
    }

    /// Whether a volume can be bound at `mount_path`: it exists on the host (bound over),
    /// or its first component is none of the sandbox root's own entries (created in the
    /// sandbox's root), or it is under the private `/tmp`.
    pub fn can_mount_at(&self, mount_path: &str) -> bool {
        let first = mount_path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        let system = |n: &str| {
            self.system.iter().any(|e| match e {
                RootEntry::Bind { dest, .. } | RootEntry::Symlink { dest, .. } => {
                    dest.trim_start_matches('/') == n
                }
            })
        };
        first == "tmp"
            || (Path::new(mount_path).is_dir() && first != "etc")
            || !(system(first) || OWN_ROOT_ENTRIES.contains(&first) || first.is_empty())
    }

    /// Whether `path` is, or lies under, or contains one of the activator's secrets.
    fn denied(&self, path: &Path) -> bool {
        self.denied
            .iter()
            .any(|d| d.starts_with(path) || path.starts_with(d))
    }

    /// Host paths the command needs beyond the system directories: each absolute argument
    /// that is a file, and the program's install prefix (`/opt/py/bin/python3` ->
    /// `/opt/py`; a program elsewhere: the file itself), resolved through symlinks.
    fn command_paths(&self, command: &[String]) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        let system = |p: &Path| {
            SYSTEM.iter().any(|s| p.starts_with(Path::new("/").join(s))) || p.starts_with("/etc")
        };
        let program = command.first().and_then(|p| which(p));
        let files = command
            .iter()
            .filter(|a| a.starts_with('/'))
            .map(PathBuf::from)
            .chain(program);
        for file in files.filter(|f| f.is_file()) {
            for path in [file.clone(), std::fs::canonicalize(&file).unwrap_or(file)] {
                if system(&path) {
                    continue;
                }
                let prefix = path
                    .parent()
                    .filter(|d| d.file_name().is_some_and(|n| n == "bin"))
                    .and_then(Path::parent)
                    .filter(|p| p.parent().is_some() && !system(p));
                // The prefix if it holds no secret, else the file alone if it is none.
                let bind = prefix
                    .map(Path::to_path_buf)
                    .filter(|p| !self.denied(p))
                    .or_else(|| Some(path.clone()).filter(|p| !self.denied(p)));
                match bind {
                    Some(bind) if !out.contains(&bind) => out.push(bind),
                    Some(_) => {}
                    None => tracing::warn!(path = %path.display(), "not bound into \
                        sandboxes: it is one of the activator's secrets"),
                }
            }
        }
        out
    }

    /// The argv that runs `command` isolated, with `workdir` and the session's `volumes` as
    /// the only writable host paths and each `(host, sandbox)` port of `forwards` reachable.
    pub fn wrap(
        &self,
        command: &[String],
        workdir: &Path,
        volumes: &[VolumeMount],
        forwards: &[(u16, u16)],
    ) -> Vec<String> {
        let text = |p: &Path| p.to_string_lossy().into_owned();
        let own = text(workdir);
        let id = INNER_ID.to_string();
        let mut argv: Vec<String> = vec![text(&self.bwrap)];
        // The sandbox's processes die when their parent (pasta) dies, which the spawner's
        // PR_SET_PDEATHSIG ties to the activator.
        let fixed = [
            "--die-with-parent",
            "--unshare-user",
            "--uid",
            &id,
            "--gid",
            &id,
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--cap-drop",
            "ALL",
        ];
        // Not --new-session: it would move the sandbox out of the process group that the
        // signal freezer and the group kill address.
        argv.extend(fixed.into_iter().map(str::to_owned));
        let bind = |argv: &mut Vec<String>, e: &RootEntry| match e {
            RootEntry::Bind { source, dest } => {
                argv.extend(["--ro-bind".into(), text(source), dest.clone()])
            }
            RootEntry::Symlink { target, dest } => {
                argv.extend(["--symlink".into(), target.clone(), dest.clone()])
            }
        };
        for e in self.system.iter().chain(&self.etc) {
            bind(&mut argv, e);
        }
        argv.extend(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"].map(str::to_owned));
        // The command's own files and the operator's additions, read-only (after /tmp, so
        // a program under /tmp stays visible).
        for p in self.command_paths(command).iter().chain(&self.ro_paths) {
            argv.extend(["--ro-bind".to_owned(), text(p), text(p)]);
        }
        argv.extend(["--bind".to_owned(), own.clone(), own.clone()]);
        for v in volumes {
            argv.extend(["--bind".to_owned(), text(&v.host), v.mount_path.clone()]);
        }
        // The root itself (bubblewrap's tmpfs) becomes read-only once every mount point
        // exists: the sandbox writes only to its workdir, volumes and /tmp.
        argv.extend(["--remount-ro", "/", "--chdir"].map(str::to_owned));
        argv.extend([own, "--".to_owned()]);
        argv.extend(command.iter().cloned());
        self.network.wrap(forwards, argv)
    }
}

/// `name` as `execvp` would find it (absolute or relative paths as they are).
fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Writes the generated `/etc` files into `dir` and lists the sanitised `/etc`: those
/// files plus [`ETC_ALLOWED`] host entries. Never `shadow`, `gshadow`, the host's users,
/// or anything else of the host's `/etc` (the activator's config often lives there).
fn write_etc(dir: &Path) -> Result<Vec<RootEntry>, String> {
    use std::os::unix::fs::PermissionsExt;
    let id = INNER_ID;
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv: String = resolv
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                // A loopback resolver is the host's, which the sandbox cannot reach.
                (Some("nameserver"), Some(addr)) => !(addr.starts_with("127.") || addr == "::1"),
                (Some("search" | "domain" | "options"), _) => true,
                _ => false,
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 sandbox:x:{id}:{id}:sandbox:/tmp:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        (
            "group",
            format!("root:x:0:\nsandbox:x:{id}:\nnogroup:x:65534:\n"),
        ),
        (
            "hosts",
            "127.0.0.1 localhost\n127.0.1.1 sandbox\n::1 localhost ip6-localhost ip6-loopback\n"
                .into(),
        ),
        ("hostname", "sandbox\n".into()),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\n\
             protocols: files\nservices: files\n"
                .into(),
        ),
        ("resolv.conf", resolv),
    ];
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let mut entries = Vec::new();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::write(&path, body).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
        entries.push(RootEntry::Bind {
            source: path,
            dest: format!("/etc/{name}"),
        });
    }
    entries.extend(
        ETC_ALLOWED
            .iter()
            .filter_map(|n| entry(&format!("etc/{n}"), format!("/etc/{n}"))),
    );
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Egress;

    fn iso() -> Isolation {
        Isolation {
            bwrap: "/usr/bin/bwrap".into(),
            network: Network::new(Path::new("/usr/bin/pasta"), Egress::None).unwrap(),
            user: SandboxUser {
                uid: 65534,
                gid: 65534,
                switch: true,
            },
            system: vec![
                RootEntry::Symlink {
                    target: "usr/bin".into(),
                    dest: "/bin".into(),
                },
                RootEntry::Bind {
                    source: "/usr".into(),
                    dest: "/usr".into(),
                },
            ],
            etc: vec![RootEntry::Bind {
                source: "/var/lib/aa/etc/passwd".into(),
                dest: "/etc/passwd".into(),
            }],
            ro_paths: vec!["/opt/models".into()],
            denied: vec!["/etc/activator/hmac.key".into()],
        }
    }

    #[test]
    fn wraps_with_namespaces_a_minimal_root_and_only_the_workdir_writable() {
        let iso = iso();
        let volume = VolumeMount {
            env: "ACTIVATOR_VOLUME_WORK".into(),
            host: "/var/lib/av/0123/work".into(),
            mount_path: "/workspace".into(),
        };
        let argv = iso.wrap(
            &["demo".to_owned(), "--port".to_owned(), "9".to_owned()],
            Path::new("/var/lib/aa/i1/sbx-1"),
            &[volume],
            &[(40000, 9)],
        );
        let text = argv.join(" ");
        assert!(text.starts_with("/usr/bin/pasta "), "{text}");
        assert!(text.contains("-t 127.0.0.1/40000:9"), "{text}");
        assert!(
            text.contains("-- /usr/bin/bwrap --die-with-parent --unshare-user --uid 1000"),
            "{text}"
        );
        assert!(
            text.contains("--unshare-pid --unshare-ipc --unshare-uts"),
            "{text}"
        );
        assert!(text.contains("--cap-drop ALL"), "{text}");
        assert!(
            text.contains("--symlink usr/bin /bin --ro-bind /usr /usr"),
            "{text}"
        );
        assert!(text.contains("--ro-bind /var/lib/aa/etc/passwd /etc/passwd"));
        assert!(!text.contains("--ro-bind / /"), "{text}");
        assert!(!text.contains("/var/lib/av "), "no volumes root: {text}");
        assert!(text.contains("--tmpfs /tmp"), "{text}");
        assert!(text.contains("--ro-bind /opt/models /opt/models"), "{text}");
        assert!(!text.contains("--new-session"), "{text}");
        assert!(text.contains("--bind /var/lib/aa/i1/sbx-1 /var/lib/aa/i1/sbx-1"));
        assert!(text.contains("--bind /var/lib/av/0123/work /workspace"));
        assert!(text.contains("--remount-ro / --chdir /var/lib/aa/i1/sbx-1"));
        assert!(iso.can_mount_at("/workspace"));
        assert!(!iso.can_mount_at("/usr/local/nowhere-such-dir"));
        assert!(!iso.can_mount_at("/etc/x"));
        assert!(text.ends_with("-- demo --port 9"), "{text}");
    }

    #[test]
    fn secrets_are_never_bound_even_when_the_command_names_them() {
        let dir = std::env::temp_dir().join(format!("aa-iso-deny-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let key = dir.join("hmac.key");
        std::fs::write(&key, "k").unwrap();
        let tool = dir.join("bin/tool");
        std::fs::write(&tool, "").unwrap();
        let mut iso = iso();
        iso.denied = vec![key.clone()];
        let paths =
            iso.command_paths(&[tool.to_string_lossy().into(), key.to_string_lossy().into()]);
        // The tool's prefix would be `dir`, which holds the key: the tool alone is bound,
        // the key never.
        assert_eq!(paths, vec![tool.clone()]);
        iso.denied = vec!["/elsewhere/key".into()];
        let paths = iso.command_paths(&[tool.to_string_lossy().into()]);
        assert_eq!(paths, vec![dir.clone()], "the install prefix of bin/tool");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_generated_etc_has_no_shadow_and_the_sandbox_user() {
        let dir = std::env::temp_dir().join(format!("aa-iso-etc-{}", std::process::id()));
        let entries = write_etc(&dir).unwrap();
        let dests: Vec<String> = entries
            .iter()
            .map(|e| match e {
                RootEntry::Bind { dest, .. } | RootEntry::Symlink { dest, .. } => dest.clone(),
            })
            .collect();
        assert!(dests.contains(&"/etc/passwd".to_owned()));
        assert!(!dests.iter().any(|d| d.contains("shadow")), "{dests:?}");
        let passwd = std::fs::read_to_string(dir.join("passwd")).unwrap();
        assert!(passwd.contains("sandbox:x:1000:1000"), "{passwd}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
