//! `Hooks`: the pause/resume hooks (`hooks.before_pause`, `hooks.after_resume`), each one
//! bounded HTTP `POST` into the sandbox, logged, counted and published.
//!
//! A call is one fresh HTTP/1.1 connection to the sandbox's endpoint (hooks are rare; no
//! pool to keep warm or to leak into a paused sandbox), `POST {path}` with an empty body
//! and `X-Activator-Hook: <name>`. Success is a 2xx response head within `timeout`; the
//! body is not read. Connecting, sending and waiting for the head are all inside the one
//! timeout, so a hung sandbox delays a pause or a resume by at most that.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use tokio::net::TcpStream;

use crate::config::{HookConfig, HooksConfig, OnHookFailure};

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookKind {
    BeforePause,
    AfterResume,
}

impl HookKind {
    /// The `hook` label, event field and `X-Activator-Hook` value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HookKind::BeforePause => "before_pause",
            HookKind::AfterResume => "after_resume",
        }
    }
}

/// How a hook call ended (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookResult {
    /// A 2xx answer in time.
    Ok,
    /// Answered, not 2xx.
    Status(u16),
    /// No connection, or not an HTTP answer.
    Error,
    /// Nothing within `timeout`.
    Timeout,
}

impl HookResult {
    pub(crate) fn label(self) -> &'static str {
        match self {
            HookResult::Ok => "ok",
            HookResult::Status(_) => "status",
            HookResult::Error => "error",
            HookResult::Timeout => "timeout",
        }
    }
}

/// What the transition does after a hook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HookCall {
    pub result: HookResult,
    /// The call failed and its `on_failure` is `abort`.
    pub abort: bool,
    pub took: Duration,
}

struct Hook {
    path: PathAndQuery,
    timeout: Duration,
    abort: bool,
}

impl Hook {
    fn new(c: &HookConfig) -> Option<Hook> {
        Some(Hook {
            // Validated at load; a config built in code with a bad path has no hook.
            path: c.path.parse().ok()?,
            timeout: c.timeout.as_duration(),
            abort: c.on_failure == OnHookFailure::Abort,
        })
    }
}

/// A pool's hooks and their counter.
pub(crate) struct Hooks {
    before_pause: Option<Hook>,
    after_resume: Option<Hook>,
    calls: IntCounterVec,
}

impl Hooks {
    pub(crate) fn new(config: &HooksConfig, calls: IntCounterVec) -> Hooks {
        Hooks {
            before_pause: config.before_pause.as_ref().and_then(Hook::new),
            after_resume: config.after_resume.as_ref().and_then(Hook::new),
            calls,
        }
    }

    fn get(&self, kind: HookKind) -> Option<&Hook> {
        match kind {
            HookKind::BeforePause => self.before_pause.as_ref(),
            HookKind::AfterResume => self.after_resume.as_ref(),
        }
    }

    /// Calls hook `kind` on the sandbox at `endpoint`; `None` when it is not configured.
    pub(crate) async fn call(
        &self,
        kind: HookKind,
        endpoint: SocketAddr,
        session: &str,
    ) -> Option<HookCall> {
        let hook = self.get(kind)?;
        let started = tokio::time::Instant::now();
        let result = match tokio::time::timeout(hook.timeout, post(endpoint, &hook.path, kind))
            .await
        {
            Ok(Ok(status)) if (200..300).contains(&status) => HookResult::Ok,
            Ok(Ok(status)) => HookResult::Status(status),
            Ok(Err(e)) => {
                tracing::debug!(hook = kind.as_str(), %endpoint, error = %e, "hook call failed");
                HookResult::Error
            }
            Err(_) => HookResult::Timeout,
        };
        let took = started.elapsed();
        self.calls
            .with_label_values(&[kind.as_str(), result.label()])
            .inc();
        let abort = result != HookResult::Ok && hook.abort;
        if result == HookResult::Ok {
            tracing::info!(
                hook = kind.as_str(),
                session,
                ms = took.as_millis() as u64,
                "hook ok"
            );
        } else {
            tracing::warn!(hook = kind.as_str(), session, result = result.label(), status = ?result, abort, ms = took.as_millis() as u64, "hook failed");
        }
        Some(HookCall {
            result,
            abort,
            took,
        })
    }
}

/// `POST path` to `endpoint` on a new connection; the response status.
async fn post(
    endpoint: SocketAddr,
    path: &PathAndQuery,
    kind: HookKind,
) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(endpoint).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // Driven next to the request; dropped (connection closed) when the call ends.
    let driver = tokio::spawn(conn);
    let _abort = AbortOnDrop(driver);
    let req = Request::builder()
        .method(Method::POST)
        .uri(path.clone())
        .header(HOST, endpoint.to_string())
        .header("x-activator-hook", HeaderValue::from_static(kind.as_str()))
        .header(CONTENT_LENGTH, HeaderValue::from_static("0"))
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    Ok(resp.status().as_u16())
}

/// Aborts the connection task when the call ends (or is cancelled by its timeout).
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
