//! API calls with a deadline: transient failures (5xx, 429, transport errors, timeouts)
//! are retried with capped exponential backoff until the caller's deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::health::ApiHealth;
use crate::backend::BackendError;

/// First retry delay; doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(800);

/// How a failed call should be treated.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying (5xx, 429, transport).
    Transient,
    /// 404.
    NotFound,
    /// 409 AlreadyExists.
    AlreadyExists,
    /// 409 Conflict (stale resourceVersion).
    Conflict,
    /// Anything else (400, 403, 422, decode errors): retrying will not help.
    Permanent,
}

/// Classifies a kube client error.
pub fn classify(e: &kube::Error) -> Failure {
    match e {
        kube::Error::Api(s) => match s.code {
            404 => Failure::NotFound,
            409 if s.reason == "AlreadyExists" => Failure::AlreadyExists,
            409 => Failure::Conflict,
            429 => Failure::Transient,
            c if c >= 500 => Failure::Transient,
            _ => Failure::Permanent,
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => Failure::Transient,
        _ => Failure::Permanent,
    }
}

/// The error a failed call becomes for the activation layer.
pub fn to_backend(what: &str, e: &kube::Error) -> BackendError {
    BackendError::ControlPlane(format!("{what}: {e}"))
}

/// Runs `op` until it succeeds, fails non-transiently, or `deadline` passes. Each attempt
/// is itself bounded by the deadline. The `Err` is the last kube error, or `None` when the
/// deadline passed with no answer at all.
pub async fn call<T, F, Fut>(deadline: Instant, mut op: F) -> Result<T, Option<kube::Error>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, op()).await {
            Err(_) => return Err(last),
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if classify(&e) == Failure::Transient => {
                tracing::debug!("kubernetes API call failed, retrying: {e}");
                last = Some(e);
            }
            Ok(Err(e)) => return Err(Some(e)),
        }
        let wake = Instant::now() + jitter(backoff);
        if wake >= deadline {
            return Err(last);
        }
        tokio::time::sleep_until(wake).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// [`call`] for a new session's claim, reporting to `health`: each attempt is also bounded
/// by the outage bound (a hanging API is a failing one), a transient failure or a silent
/// attempt counts as a failure and any answer as a success, and the retries stop as soon
/// as the API has been failing for the bound ([`ApiHealth::outage`]): the caller answers
/// `control_plane` then instead of at its deadline.
pub async fn call_reporting<T, F, Fut>(
    health: &ApiHealth,
    deadline: Instant,
    mut op: F,
) -> Result<T, Option<kube::Error>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut last = None;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + health.bound());
        let attempt_started = Instant::now();
        match tokio::time::timeout_at(attempt_deadline, op()).await {
            Err(_) => health.failed_since(attempt_started),
            Ok(Ok(v)) => {
                health.ok();
                return Ok(v);
            }
            Ok(Err(e)) if classify(&e) == Failure::Transient => {
                health.failed_since(attempt_started);
                tracing::debug!("kubernetes API call failed, retrying: {e}");
                last = Some(e);
            }
            Ok(Err(e)) => {
                health.ok();
                return Err(Some(e));
            }
        }
        if health.outage().is_some() || Instant::now() >= deadline {
            return Err(last);
        }
        let wake = Instant::now() + jitter(backoff);
        if wake >= deadline {
            return Err(last);
        }
        tokio::time::sleep_until(wake).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Maps the result of [`call`] for operations with no special-cased failures.
pub fn fail(what: &str, started: Instant, e: Option<kube::Error>) -> BackendError {
    match e {
        Some(e) => to_backend(what, &e),
        None => BackendError::ControlPlane(format!(
            "{what}: no answer from the Kubernetes API within {:?}",
            started.elapsed()
        )),
    }
}

/// 75..125 % of `d`, so replicas retrying together spread out.
fn jitter(d: Duration) -> Duration {
    let pct: u32 = 75 + rand::random::<u32>() % 51;
    d * pct / 100
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Box::new(Status {
            code,
            reason: reason.into(),
            ..Status::default()
        }))
    }

    #[test]
    fn classifies_api_errors() {
        assert_eq!(classify(&api(500, "InternalError")), Failure::Transient);
        assert_eq!(classify(&api(429, "TooManyRequests")), Failure::Transient);
        assert_eq!(classify(&api(409, "AlreadyExists")), Failure::AlreadyExists);
        assert_eq!(classify(&api(409, "Conflict")), Failure::Conflict);
        assert_eq!(classify(&api(404, "NotFound")), Failure::NotFound);
        assert_eq!(classify(&api(403, "Forbidden")), Failure::Permanent);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_until_success() {
        let mut n = 0;
        let r = call(Instant::now() + Duration::from_secs(5), || {
            n += 1;
            let attempt = n;
            async move {
                if attempt < 4 {
                    Err(api(503, "ServiceUnavailable"))
                } else {
                    Ok(attempt)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_with_the_last_error() {
        let start = Instant::now();
        let r: Result<(), _> = call(start + Duration::from_secs(2), || async {
            Err(api(500, "InternalError"))
        })
        .await;
        assert!(r.unwrap_err().unwrap().to_string().contains("500"));
        assert!(start.elapsed() <= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_permanent_errors() {
        let mut n = 0;
        let r: Result<(), _> = call(Instant::now() + Duration::from_secs(5), || {
            n += 1;
            async { Err(api(403, "Forbidden")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n, 1);
    }
}
