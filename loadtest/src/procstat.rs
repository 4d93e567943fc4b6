//! CPU time and resident memory of processes, read from `/proc/<pid>/stat` and `status`.

use std::time::Duration;

/// Kernel clock ticks per second for `/proc/<pid>/stat` times. Linux exports USER_HZ to
/// user space as 100 on every mainstream architecture (x86, arm64, riscv), independent of
/// the kernel's internal HZ.
const USER_HZ: f64 = 100.0;

/// User + system CPU time of `pid` (all its threads), or `None` if it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&text)
}

/// Sum of `cpu_time` over `pids` (missing processes count as zero).
pub fn cpu_time_sum(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| cpu_time(*p)).sum()
}

/// utime + stime from the text of `/proc/<pid>/stat`.
fn parse_stat_cpu(text: &str) -> Option<Duration> {
    // The command name (field 2) is in parentheses and may contain spaces: split after
    // the last ')'. Fields from there start at field 3 (state).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14, stime field 15 -> indexes 11 and 12 after field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / USER_HZ))
}

/// Resident set size of `pid` in bytes (`VmRSS`), or `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_stat_cpu(line), Some(Duration::from_secs(3)));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_time(me).is_some());
        assert!(rss_bytes(me).unwrap() > 0);
    }
}
