//! Looking at real processes through `/proc`: liveness, CPU time, state, process groups.

use std::time::Duration;

use tokio::time::Instant;

/// The fields of `/proc/PID/stat` after the command name (index 0 = field 3, the state).
fn stat(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        s[s.rfind(')')? + 1..]
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// Running or stopped; a zombie has exited (only its reaping is pending).
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|f| f[0] != "Z" && f[0] != "X")
}

/// The one-letter scheduler state (`R`, `S`, `T`, ...).
pub fn proc_state(pid: u32) -> char {
    stat(pid).expect("process exists")[0]
        .chars()
        .next()
        .unwrap()
}

/// utime + stime in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let f = stat(pid).expect("process exists");
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The other live members of the process group led by `leader`.
pub fn group_members(leader: u32) -> Vec<u32> {
    let pgid = leader.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != leader && alive(pid))
        .filter(|&pid| stat(pid).is_some_and(|f| f.get(2) == Some(&pgid)))
        .collect()
}

/// Polls `cond` every 20 ms for up to 20 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
