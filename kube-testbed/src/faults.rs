//! Error injection for tests: fail the next N matching requests, drop open watches.

use std::sync::Mutex;

use tokio::sync::watch;

/// One injected failure rule.
#[derive(Debug, Clone)]
struct Rule {
    remaining: u32,
    status: u16,
    /// Only requests with this method (e.g. `PATCH`), any when `None`.
    method: Option<String>,
    /// Only requests whose path contains this, any when `None`.
    path_contains: Option<String>,
}

/// Failures waiting to be served, and the watch-drop signal.
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    drops: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            rules: Mutex::new(Vec::new()),
            drops: watch::channel(0).0,
        }
    }
}

impl Faults {
    /// The next `n` requests (watches included) fail with `status` (500, 429, 503...).
    pub fn fail_next(&self, n: u32, status: u16) {
        self.push(Rule {
            remaining: n,
            status,
            method: None,
            path_contains: None,
        });
    }

    /// The next `n` requests with `method` whose path contains `path_contains` fail.
    pub fn fail_next_matching(&self, n: u32, status: u16, method: &str, path_contains: &str) {
        self.push(Rule {
            remaining: n,
            status,
            method: Some(method.to_ascii_uppercase()),
            path_contains: Some(path_contains.to_owned()),
        });
    }

    fn push(&self, rule: Rule) {
        self.rules.lock().expect("faults lock").push(rule);
    }

    /// Forgets every pending failure.
    pub fn clear(&self) {
        self.rules.lock().expect("faults lock").clear();
    }

    /// Ends every open watch stream now (the client sees the connection end).
    pub fn drop_watches(&self) {
        self.drops.send_modify(|n| *n += 1);
    }

    /// Requests still to be failed, summed over rules.
    pub fn pending(&self) -> u32 {
        self.rules
            .lock()
            .expect("faults lock")
            .iter()
            .map(|r| r.remaining)
            .sum()
    }

    /// If a rule matches, consumes one failure and returns its status.
    pub(crate) fn take(&self, method: &str, path: &str) -> Option<u16> {
        let mut rules = self.rules.lock().expect("faults lock");
        let i = rules.iter().position(|r| {
            r.remaining > 0
                && r.method.as_deref().is_none_or(|m| m == method)
                && r.path_contains.as_deref().is_none_or(|p| path.contains(p))
        })?;
        rules[i].remaining -= 1;
        let status = rules[i].status;
        if rules[i].remaining == 0 {
            rules.remove(i);
        }
        Some(status)
    }

    pub(crate) fn drop_signal(&self) -> watch::Receiver<u64> {
        self.drops.subscribe()
    }
}
