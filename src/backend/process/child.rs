//! One sandbox child process: argv templating, spawning (own process group, parent-death
//! signal, cgroup placement before `exec`), readiness probing, and group signals.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::backend::BackendError;
use crate::lock::MutexExt;

/// How a sandbox is launched: `backend.command`, `backend.env`, `backend.ready_path`.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// argv with `{port}` and `{self}` placeholders.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `backend.inherit_env`: off, a sandbox starts from an empty environment plus
    /// [`PASSED_ENV`] and `env`, so the activator's secrets (API tokens, database URLs)
    /// never reach untrusted code.
    pub inherit_env: bool,
    pub ready_path: String,
    /// What `{self}` stands for: the activator's own executable.
    pub self_exe: PathBuf,
    /// Namespace isolation (`backend.isolation`), when in force.
    pub isolation: Option<super::isolation::Isolation>,
    /// `backend.expose_ports` (forwarded only when isolated).
    pub expose_ports: Vec<u16>,
}

impl LaunchSpec {
    /// The argv with placeholders replaced.
    pub fn render(&self, port: u16) -> Vec<String> {
        let exe = self.self_exe.to_string_lossy();
        self.argv
            .iter()
            .map(|a| {
                a.replace("{port}", &port.to_string())
                    .replace("{self}", &exe)
            })
            .collect()
    }
}

/// What one session adds to its sandbox's launch (`customize.env`, `customize.volumes`).
#[derive(Debug, Clone, Default)]
pub struct SessionLaunch {
    /// Extra environment variables, applied after `backend.env` (an allowlisted variable
    /// of the same name wins: the operator allowlisted it).
    pub env: Vec<(String, String)>,
    pub volumes: Vec<VolumeMount>,
}

/// One per-session volume: a host directory seen by the sandbox.
#[derive(Debug, Clone)]
pub struct VolumeMount {
    /// `ACTIVATOR_VOLUME_<NAME>`: where the sandbox finds it.
    pub env: String,
    /// `backend.volumes_root/<session hash>/<name>`.
    pub host: PathBuf,
    /// `customize.volumes[].mount_path` (used when isolated: bound there).
    pub mount_path: String,
}

/// Variables of the activator's environment a sandbox gets even with `inherit_env: false`.
pub const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG"];

/// The exit of a child as text (`exit status: 1`, `signal: 9 (SIGKILL)`); `None` while it runs.
pub type ExitWatch = watch::Receiver<Option<String>>;

/// A started (not necessarily ready) child.
pub struct Launched {
    pub pid: u32,
    /// Fires once with a description of how the child ended. It fires while the leader is
    /// still a zombie (not reaped), so its PID, which is also the process group's ID, cannot
    /// be reused until [`Reap`] lets go: signals sent to the group in between reach only the
    /// sandbox's own processes.
    pub exit: ExitWatch,
    /// Held by whoever may still signal the group; dropping it reaps the leader.
    pub reap: Reap,
}

/// Permission to reap an exited leader. Teardown drops it after its last group signal
/// (the fleet entry holds it), so no `killpg` can ever hit a recycled PID.
pub struct Reap {
    _held: oneshot::Sender<()>,
}

/// Starts the child of one sandbox in `workdir`, with stdout/stderr to files there.
/// `cgroup_procs` are the sandbox cgroups' `cgroup.procs` (freezer, then v1 limit cgroups),
/// written by the child itself before `exec` so that its whole tree lives in them (and
/// under their limits) from the first instruction. `exposed` are `(host port, sandbox
/// port)` pairs forwarded besides `port` when isolated (`backend.expose_ports`).
pub async fn launch(
    spec: &LaunchSpec,
    session: Option<&SessionLaunch>,
    port: u16,
    exposed: &[(u16, u16)],
    workdir: &Path,
    cgroup_procs: Vec<File>,
) -> Result<Launched, BackendError> {
    let volumes = session.map_or(&[][..], |s| &s.volumes[..]);
    // Isolated: the sandbox listens on `port` in its own network namespace, reached from
    // the same port on host loopback; each exposed port from its own host port.
    let forwards: Vec<(u16, u16)> = std::iter::once((port, port))
        .chain(exposed.iter().copied())
        .collect();
    let argv = match &spec.isolation {
        Some(isolation) => isolation.wrap(&spec.render(port), workdir, volumes, &forwards),
        None => spec.render(port),
    };
    // Switched to before `exec` when the activator runs as root.
    let user = spec
        .isolation
        .as_ref()
        .map(|i| i.user)
        .filter(|u| u.switch)
        .map(|u| (Uid::from_raw(u.uid), Gid::from_raw(u.gid)));
    let io = |name: &str| {
        File::create(workdir.join(name)).map_err(|e| {
            BackendError::StartFailed(format!("cannot create {}: {e}", workdir.display()))
        })
    };
    let mut cmd = tokio::process::Command::new(&argv[0]);
    if !spec.inherit_env {
        cmd.env_clear();
        for name in PASSED_ENV {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
    }
    cmd.args(&argv[1..]).envs(&spec.env);
    if let Some(session) = session {
        cmd.envs(session.env.iter().map(|(k, v)| (k, v)));
        for v in &session.volumes {
            // Isolated, the volume is bound at its mount path; otherwise the sandbox
            // uses the host directory itself.
            match spec.isolation {
                Some(_) => cmd.env(&v.env, &v.mount_path),
                None => cmd.env(&v.env, &v.host),
            };
        }
    }
    if spec.isolation.is_some() {
        // The activator's HOME is not in the sandbox's view; its workdir is, and writable.
        cmd.env("HOME", workdir);
    }
    cmd.env("PORT", port.to_string())
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(io("stdout.log")?)
        .stderr(io("stderr.log")?)
        // A new process group (pgid = pid) so signals reach the whole tree.
        .process_group(0)
        // Backstop: if the task owning the child is dropped (runtime shutdown), kill it.
        .kill_on_drop(true);
    let parent = Pid::this();
    // Collected before the fork: the child only iterates it (no allocation after fork).
    let procs_fds: Vec<i32> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the forked child before `exec`, where only
    // async-signal-safe operations are allowed. It performs only raw syscalls through nix's
    // thin wrappers, none of which allocates, locks, or touches state shared with other
    // threads: write(2) on descriptors that the parent keeps open until `spawn` returns (so
    // they are valid in the child), setgroups/setresgid/setresuid with values computed
    // before the fork (nix passes the one-element slice's pointer straight to libc),
    // prctl(PR_SET_PDEATHSIG) and getppid(); iterating the already-built `procs_fds` slice
    // only reads memory. Errors are built from errno without allocating
    // (`io::Error::from_raw_os_error`).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            let errno = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
            // As root, before the user switch: cgroup.procs is root's to write.
            for &fd in &procs_fds {
                // "0" moves the writing process (this child) into the cgroup.
                nix::unistd::write(BorrowedFd::borrow_raw(fd), b"0").map_err(errno)?;
            }
            if let Some((uid, gid)) = user {
                // Groups, then gid, then uid (after setuid no other change is allowed).
                nix::unistd::setgroups(&[gid]).map_err(errno)?;
                nix::unistd::setresgid(gid, gid, gid).map_err(errno)?;
                nix::unistd::setresuid(uid, uid, uid).map_err(errno)?;
            }
            // After the user switch: changing credentials clears the parent-death signal.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(errno)?;
            // The parent may have died between fork and prctl: then no signal will come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc_esrch()));
            }
            Ok(())
        });
    }
    let handle = Handle::current();
    let mut child = on_spawner_thread(move || {
        let _runtime = handle.enter();
        cmd.spawn()
    })
    .await
    .map_err(|e| BackendError::StartFailed(format!("cannot run {:?}: {e}", argv[0])))?;
    drop(cgroup_procs);
    let pid = child
        .id()
        .ok_or_else(|| BackendError::StartFailed("child exited before its pid was read".into()))?;
    let (tx, exit) = watch::channel(None);
    let (reap, may_reap) = oneshot::channel::<()>();
    tokio::spawn(async move {
        match exited_unreaped(pid).await {
            Ok(how) => {
                let _ = tx.send(Some(how));
                // Ok or Err (the holder dropped it): either way the group is done with.
                let _ = may_reap.await;
                let _ = child.wait().await;
            }
            Err(e) => {
                // No pidfd (kernel < 5.3, or a seccomp filter): waiting reaps at once, so
                // a later group signal could reach a recycled PID; warned once per child.
                tracing::warn!(pid, error = %e, "pidfd unavailable: the sandbox leader is reaped on exit");
                let how = match child.wait().await {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                let _ = tx.send(Some(how));
            }
        }
    });
    Ok(Launched {
        pid,
        exit,
        reap: Reap { _held: reap },
    })
}

/// Waits until child `pid` has exited, without reaping it (`waitid(P_PIDFD, WEXITED |
/// WNOWAIT)` once its pidfd polls readable), and describes the exit as
/// `std::process::ExitStatus` would (`exit status: 1`, `signal: 9 (SIGKILL)`).
async fn exited_unreaped(pid: u32) -> std::io::Result<String> {
    use rustix::process::{Pid as RPid, PidfdFlags, WaitId, WaitIdOptions};
    use tokio::io::unix::AsyncFd;
    let raw = i32::try_from(pid)
        .ok()
        .and_then(RPid::from_raw)
        .ok_or_else(|| std::io::Error::other("pid out of range"))?;
    // The child is ours and not reaped yet, so `pid` still names it (a zombie at worst).
    let pidfd = rustix::process::pidfd_open(raw, PidfdFlags::NONBLOCK)?;
    // SAFETY: `register_with_interest` needs the descriptor to stay open and to be the same
    // one for the whole life of the `AsyncFd`. `pidfd` is an `OwnedFd` moved into it: only
    // its drop (when the `AsyncFd` drops) closes it, nothing else can reach it to close or
    // replace it, and `OwnedFd::as_raw_fd` always returns the descriptor it owns.
    #[allow(unsafe_code)]
    let fd = unsafe {
        AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
            .map_err(std::io::Error::from)?
    };
    loop {
        let mut ready = fd.readable().await?;
        let status = rustix::process::waitid(
            WaitId::PidFd(fd.get_ref().as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG,
        )?;
        match status {
            Some(s) if s.exited() || s.killed() || s.dumped() => return Ok(describe_exit(&s)),
            _ => ready.clear_ready(),
        }
    }
}

fn describe_exit(s: &rustix::process::WaitIdStatus) -> String {
    if let Some(code) = s.exit_status() {
        return format!("exit status: {code}");
    }
    let signo = s.terminating_signal().unwrap_or(0);
    let name = Signal::try_from(signo).map_or("?", |sig| sig.as_str());
    let core = if s.dumped() { " (core dumped)" } else { "" };
    format!("signal: {signo} ({name}){core}")
}

/// ESRCH ("no such process"): the parent is gone. A const so no lookup happens in the child.
const fn libc_esrch() -> i32 {
    nix::errno::Errno::ESRCH as i32
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// Runs `job` on the process-wide spawner thread and returns its result.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process.
/// Tokio worker and blocking-pool threads come and go (blocking threads idle out after
/// 10 s), so a child forked from one of them would be killed at a random moment. The
/// spawner thread is started once and never exits, so the signal fires exactly when the
/// activator process dies.
async fn on_spawner_thread<T: Send + 'static>(
    job: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    static SPAWNER: OnceLock<std::sync::Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("sandbox-spawner".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("start the sandbox spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = oneshot::channel();
    let wrapped: SpawnJob = Box::new(move || {
        let _ = tx.send(job());
    });
    sender
        .lock_recovered()
        .send(wrapped)
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("spawner dropped the job"))?
}

/// Polls `GET ready_path` until it answers 2xx, the child exits, or `deadline` passes.
pub async fn wait_ready(
    endpoint: SocketAddr,
    ready_path: &str,
    exit: &mut ExitWatch,
    workdir: &Path,
    deadline: Instant,
    budget: Duration,
) -> Result<(), BackendError> {
    let mut delay = Duration::from_millis(1);
    loop {
        if let Some(how) = exit.borrow().clone() {
            return Err(BackendError::StartFailed(format!(
                "exited before ready ({how}); stderr: {}",
                stderr_tail(workdir)
            )));
        }
        let attempt_end = deadline.min(Instant::now() + Duration::from_secs(1));
        if let Ok(Ok(true)) =
            tokio::time::timeout_at(attempt_end, probe(endpoint, ready_path)).await
        {
            return Ok(());
        }
        let wake = deadline.min(Instant::now() + delay);
        if Instant::now() >= deadline {
            return Err(BackendError::Timeout(budget));
        }
        // Wake early if the child exits meanwhile.
        let _ = tokio::time::timeout_at(wake, exit.changed()).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// One readiness probe: true on a 2xx answer.
async fn probe(
    endpoint: SocketAddr,
    path: &str,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::net::TcpStream::connect(endpoint).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, endpoint.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(req).await?.status().is_success())
}

/// The last ~1 KiB of the child's stderr, for error messages.
pub fn stderr_tail(workdir: &Path) -> String {
    const TAIL: u64 = 1024;
    let Ok(mut f) = File::open(workdir.join("stderr.log")) else {
        return String::from("(none)");
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).trim().to_string();
    if text.is_empty() {
        "(empty)".into()
    } else {
        text
    }
}

/// Sends `signal` to the process group led by `pid`. A group that is already gone is fine.
pub fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if let Err(e) = killpg(Pid::from_raw(raw), signal)
        && e != nix::errno::Errno::ESRCH
    {
        tracing::warn!(pid, ?signal, error = %e, "signalling sandbox process group failed");
    }
}

/// The fields of `/proc/PID/stat` after the command name, starting at field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; the state follows it.
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// `(pid, stat fields)` of the processes in the group led by `leader` (the leader
/// included). Scans `/proc`: fine for start, pause and release, which are not on the
/// request path.
fn group(leader: u32) -> Vec<(u32, Vec<String>)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pgid = leader.to_string();
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat_fields(pid)?)))
        // Field 5 (index 2 here) is the process group.
        .filter(|(_, f)| f.get(2) == Some(&pgid))
        .collect()
}

/// Scheduler states of the processes in the group led by `leader`.
fn group_states(leader: u32) -> Vec<char> {
    group(leader)
        .into_iter()
        .filter_map(|(_, f)| f.first()?.chars().next())
        .collect()
}

/// PIDs of the processes in the group led by `leader`.
pub fn group_members(leader: u32) -> Vec<u32> {
    group(leader).into_iter().map(|(pid, _)| pid).collect()
}

/// True when every process of the group led by `leader` is stopped (`T`) or exited (`Z`).
pub fn group_stopped(leader: u32) -> bool {
    group_states(leader).iter().all(|s| matches!(s, 'T' | 'Z'))
}

/// True when no process of the group led by `leader` is left (zombies are exited).
pub fn group_gone(leader: u32) -> bool {
    group_states(leader).iter().all(|&s| s == 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> LaunchSpec {
        LaunchSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            inherit_env: true,
            ready_path: "/".into(),
            self_exe: PathBuf::from("/bin/true"),
            isolation: None,
            expose_ports: Vec::new(),
        }
    }

    /// `(state, parent pid)` of `pid`, if it exists.
    fn state_and_parent(pid: u32) -> Option<(char, u32)> {
        let f = stat_fields(pid)?;
        Some((f.first()?.chars().next()?, f.get(1)?.parse().ok()?))
    }

    /// The exit is reported while the leader is still an unreaped zombie of ours (so its PID
    /// and the group's ID stay taken), and only dropping `Reap` reaps it.
    #[tokio::test]
    async fn exit_is_reported_before_the_leader_is_reaped() {
        let dir = std::env::temp_dir().join(format!("aa-child-reap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        for (script, want) in [
            ("exit 3", "exit status: 3"),
            ("kill -KILL $$", "signal: 9 (SIGKILL)"),
        ] {
            let launched = launch(&spec(script), None, 1, &[], &dir, Vec::new())
                .await
                .unwrap();
            let mut exit = launched.exit.clone();
            let how = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
                .await
                .expect("the exit is reported")
                .unwrap()
                .clone()
                .unwrap();
            assert_eq!(how, want);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                state_and_parent(launched.pid),
                Some(('Z', me)),
                "{script}: still our zombie after the exit was reported"
            );
            drop(launched.reap);
            let deadline = Instant::now() + Duration::from_secs(10);
            while state_and_parent(launched.pid).is_some_and(|(s, p)| s == 'Z' && p == me) {
                assert!(
                    Instant::now() < deadline,
                    "{script}: reaped once Reap is dropped"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
