//! What the demo sandbox says about itself, and the correctness checks built on it.
//!
//! `GET /state` reports the sandbox's `instance` (a random per-process ID), counter and every
//! session ID it has seen; any unrouted path (the hot-path request) answers `{method, path,
//! session, instance, ...}`. From these the harness proves a session always lands on the same
//! process, that an exclusive sandbox never saw another session, and that its counter
//! survived a freeze. The instance, not the pid, is the identity: under PID namespaces
//! (`backend.isolation: namespaces`) every sandbox reports the same small pid.

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The parts of `GET /state` the checks use.
#[derive(Debug, Clone, Deserialize)]
pub struct SandboxState {
    pub instance: String,
    pub counter: u64,
    #[serde(default)]
    pub sessions_seen: Vec<String>,
}

/// The catch-all echo of the demo sandbox (the hot-path response).
#[derive(Debug, Clone, Deserialize)]
pub struct EchoReply {
    pub instance: String,
    #[serde(default)]
    pub session: Option<String>,
}

/// `POST /counter`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct CounterReply {
    pub counter: u64,
    pub instance: String,
}

/// Parses a JSON body, naming `what` in the error.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).with_context(|| {
        format!(
            "{what}: unexpected body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(120)])
        )
    })
}

/// A correctness violation found while checking a response (counted apart from errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// The session reached a different process than before.
    Moved {
        session: String,
        was: String,
        now: String,
    },
    /// An exclusive sandbox has seen sessions other than its own.
    Shared { session: String, seen: Vec<String> },
    /// The sandbox did not see the session header we sent.
    Unseen { session: String },
    /// The counter did not continue from the last value.
    Counter {
        session: String,
        expected: u64,
        got: u64,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Moved { session, was, now } => {
                write!(
                    f,
                    "session {session} moved from sandbox {was} to sandbox {now}"
                )
            }
            Violation::Shared { session, seen } => {
                write!(f, "sandbox of {session} also saw {seen:?}")
            }
            Violation::Unseen { session } => {
                write!(f, "sandbox of {session} never saw its session header")
            }
            Violation::Counter {
                session,
                expected,
                got,
            } => write!(
                f,
                "session {session}: counter {got}, expected {expected} (state lost?)"
            ),
        }
    }
}

/// Checks `state` against what `session` expects: same instance as `pinned` (when known), the
/// session seen, and, when `exclusive`, nobody else seen.
pub fn check_state(
    session: &str,
    state: &SandboxState,
    pinned: Option<&str>,
    exclusive: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    if let Some(was) = pinned
        && was != state.instance
    {
        out.push(Violation::Moved {
            session: session.to_string(),
            was: was.to_string(),
            now: state.instance.clone(),
        });
    }
    if !state.sessions_seen.iter().any(|s| s == session) {
        out.push(Violation::Unseen {
            session: session.to_string(),
        });
    }
    if exclusive && state.sessions_seen.iter().any(|s| s != session) {
        out.push(Violation::Shared {
            session: session.to_string(),
            seen: state.sessions_seen.iter().take(5).cloned().collect(),
        });
    }
    out
}

/// Checks a counter reply: exact continuation when `exclusive`, else strictly increasing.
pub fn check_counter(session: &str, last: u64, got: u64, exclusive: bool) -> Result<(), Violation> {
    let ok = if exclusive {
        got == last + 1
    } else {
        got > last
    };
    if ok {
        Ok(())
    } else {
        Err(Violation::Counter {
            session: session.to_string(),
            expected: last + 1,
            got,
        })
    }
}

/// Checks the hot-path echo: same process as `pinned`, and our header arrived.
pub fn check_echo(session: &str, echo: &EchoReply, pinned: &str) -> Result<(), Violation> {
    if echo.instance != pinned {
        return Err(Violation::Moved {
            session: session.to_string(),
            was: pinned.to_string(),
            now: echo.instance.clone(),
        });
    }
    match &echo.session {
        Some(s) if s != session => Err(Violation::Shared {
            session: session.to_string(),
            seen: vec![s.clone()],
        }),
        _ => Ok(()),
    }
}

/// Fails unless `body` is an SSE stream of exactly `n` `data: token-i` events then `done`.
pub fn check_sse(body: &[u8], n: u64) -> Result<()> {
    let text = std::str::from_utf8(body).context("SSE body is not UTF-8")?;
    let tokens = text
        .lines()
        .filter(|l| l.starts_with("data: token-"))
        .count() as u64;
    if tokens != n || !text.contains("event: done") {
        bail!(
            "SSE stream had {tokens} tokens of {n} (done marker present: {})",
            text.contains("event: done")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(instance: &str, seen: &[&str]) -> SandboxState {
        SandboxState {
            instance: instance.into(),
            counter: 0,
            sessions_seen: seen.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn state_checks() {
        assert!(check_state("a", &state("i1", &["a"]), Some("i1"), true).is_empty());
        assert!(check_state("a", &state("i1", &["a", "b"]), Some("i1"), false).is_empty());
        let v = check_state("a", &state("i2", &["a", "b"]), Some("i1"), true);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(matches!(&v[0], Violation::Moved { was, now, .. } if was == "i1" && now == "i2"));
        assert!(matches!(v[1], Violation::Shared { .. }));
        let v = check_state("a", &state("i1", &["b"]), None, false);
        assert!(matches!(v[0], Violation::Unseen { .. }));
    }

    #[test]
    fn counter_and_echo_checks() {
        assert!(check_counter("a", 4, 5, true).is_ok());
        assert!(check_counter("a", 4, 9, true).is_err());
        assert!(check_counter("a", 4, 9, false).is_ok());
        assert!(check_counter("a", 4, 1, false).is_err());
        let echo: EchoReply = parse(
            br#"{"method":"GET","path":"/hot","session":"a","instance":"i7","pid":2}"#,
            "echo",
        )
        .unwrap();
        assert!(check_echo("a", &echo, "i7").is_ok());
        assert!(check_echo("a", &echo, "i8").is_err());
        assert!(check_echo("b", &echo, "i7").is_err());
    }

    #[test]
    fn sse_check_counts_tokens() {
        let ok = b"data: token-0\n\ndata: token-1\n\nevent: done\ndata: end\n\n";
        assert!(check_sse(ok, 2).is_ok());
        assert!(check_sse(ok, 3).is_err());
        assert!(check_sse(b"data: token-0\n\n", 1).is_err());
    }
}
