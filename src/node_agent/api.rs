//! The node agent's HTTP API, its metrics listener, and the one place its errors become
//! JSON responses (`{"error":{"code","message"}}`, as the proxy's).
//!
//! - `POST /v1/pods/{namespace}/{name}/freeze` with `{"uid":"..."}`
//! - `POST /v1/pods/{namespace}/{name}/thaw` with `{"uid":"..."}`
//! - `GET /v1/pods/{namespace}/{name}?uid=...`
//!
//! each answering `{"uid","state","memory_bytes","frozen_seconds"}`; `GET /metrics` and
//! `GET /healthz` on the metrics listener.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::auth::AuthError;
use super::cgroup::CgroupError;
use super::config::is_dns_label;
use super::pods::PodError;
use super::{AgentError, NodeAgent, Operation};
use crate::error_body::error_response;

/// Largest accepted request body (`{"uid": "<36 chars>"}` needs ~50 bytes).
const MAX_BODY: usize = 4096;
/// Bound on reading a request's head and body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Api,
    Metrics,
}

/// Serves `surface` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, agent: Arc<NodeAgent>, surface: Surface) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT);
    let builder = Arc::new(builder);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "node agent accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let agent = agent.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let agent = agent.clone();
                async move {
                    Ok::<_, Infallible>(match surface {
                        Surface::Api => route(&agent, req).await,
                        Surface::Metrics => metrics_route(&agent, &req),
                    })
                }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn metrics_route(agent: &NodeAgent, req: &Request<Incoming>) -> Resp {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(agent.encode_metrics())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/healthz") => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

/// Routes one API request.
pub async fn route(agent: &NodeAgent, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (op, ns, name) = match (req.method(), segs.as_slice()) {
        (&Method::POST, ["v1", "pods", ns, name, "freeze"]) => (Operation::Freeze, *ns, *name),
        (&Method::POST, ["v1", "pods", ns, name, "thaw"]) => (Operation::Thaw, *ns, *name),
        (&Method::GET, ["v1", "pods", ns, name]) => (Operation::Status, *ns, *name),
        (_, ["v1", "pods", _, _, "freeze" | "thaw"]) | (_, ["v1", "pods", _, _]) => {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "freeze and thaw take POST, the pod status GET",
            );
        }
        _ => return error_response(StatusCode::NOT_FOUND, "not_found", "no such route"),
    };
    let (ns, name) = (ns.to_owned(), name.to_owned());
    let authorization = req.headers().get(http::header::AUTHORIZATION).cloned();
    // The UID is read before authentication only as far as parsing a bounded body; a bad
    // one is reported after the caller is known to be allowed.
    let uid = match op {
        Operation::Status => query_uid(req.uri().query()),
        _ => body_uid(req.into_body()).await,
    };
    let uid = if !is_dns_label(&ns) || !is_dns_subdomain(&name) {
        Err("namespace or pod name is not a valid Kubernetes name".to_owned())
    } else {
        uid
    };
    let result = async {
        // Authenticate before saying anything about the request itself.
        let auth = authorization.as_ref();
        match uid {
            Ok(uid) => agent.handle(op, auth, &ns, &name, &uid).await,
            Err(msg) => {
                agent.authenticate_only(auth).await?;
                Err(AgentError::BadRequest(msg))
            }
        }
    }
    .await;
    let (resp, outcome) = match result {
        Ok(status) => (json_response(&status), "ok"),
        Err(e) => {
            let (status, code, message) = present(&e);
            if status.is_server_error() {
                tracing::warn!(pod = %format!("{ns}/{name}"), op = op.as_str(), error = %e, "request failed");
            } else {
                tracing::info!(pod = %format!("{ns}/{name}"), op = op.as_str(), error = %e, "request refused");
            }
            let mut r = error_response(status, code, &message);
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            (r, code)
        }
    };
    agent
        .metrics
        .requests
        .with_label_values(&[op.as_str(), outcome])
        .inc();
    resp
}

fn json_response<T: serde::Serialize>(value: &T) -> Resp {
    let body = serde_json::to_vec(value).expect("plain struct serializes");
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn query_uid(query: Option<&str>) -> Result<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("uid="))
        .map(str::to_owned)
        .ok_or_else(|| "the query parameter uid (the pod's UID) is required".to_owned())
}

async fn body_uid(body: Incoming) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FreezeRequest {
        uid: String,
    }
    let bytes =
        match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => return Err(format!("the body must be JSON of at most {MAX_BODY} bytes")),
            Err(_) => return Err("the body was not received in time".into()),
        };
    serde_json::from_slice::<FreezeRequest>(&bytes)
        .map(|r| r.uid)
        .map_err(|_| "the body must be {\"uid\": \"<pod UID>\"}".to_owned())
}

/// A DNS-1123 subdomain, the shape of a pod name.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Status, code and client-facing message of a failure. Messages name only what the client
/// sent; cgroup paths and API-server errors stay in the log.
fn present(e: &AgentError) -> (StatusCode, &'static str, String) {
    use StatusCode as S;
    match e {
        AgentError::Auth(AuthError::Missing | AuthError::Invalid) => (
            S::UNAUTHORIZED,
            "unauthenticated",
            "a valid bearer token for the node agent's audience is required".into(),
        ),
        AgentError::Auth(AuthError::NotAllowed(_)) => (
            S::FORBIDDEN,
            "forbidden",
            "this client is not allowed to use the node agent".into(),
        ),
        AgentError::Auth(AuthError::Unavailable(_)) | AgentError::Pod(PodError::Unavailable(_)) => {
            (
                S::SERVICE_UNAVAILABLE,
                "apiserver_unavailable",
                "the API server could not be reached; retry".into(),
            )
        }
        AgentError::Pod(p) => {
            let (status, code) = match p {
                PodError::NamespaceNotAllowed(_) => (S::FORBIDDEN, "namespace_not_allowed"),
                PodError::NotFound(_) => (S::NOT_FOUND, "pod_not_found"),
                PodError::UidMismatch(_) => (S::CONFLICT, "uid_mismatch"),
                PodError::WrongNode(_) => (S::CONFLICT, "wrong_node"),
                PodError::NotSandbox(_) => (S::FORBIDDEN, "not_a_sandbox"),
                PodError::Terminating(_) => (S::CONFLICT, "pod_terminating"),
                PodError::Unavailable(_) => unreachable!("matched above"),
            };
            (status, code, p.to_string())
        }
        AgentError::Cgroup(c) => match c {
            CgroupError::InvalidUid(_) => (S::BAD_REQUEST, "bad_request", c.to_string()),
            CgroupError::NotFound(_) => (
                S::NOT_FOUND,
                "cgroup_not_found",
                "the pod has no cgroup on this node (not started yet, or already gone)".into(),
            ),
            CgroupError::Timeout(what) => (
                S::GATEWAY_TIMEOUT,
                if *what == "freeze" {
                    "freeze_timeout"
                } else {
                    "thaw_timeout"
                },
                format!("the kernel did not confirm the {what} in time"),
            ),
            CgroupError::Ambiguous { .. }
            | CgroupError::Io { .. }
            | CgroupError::NoHierarchy(_) => (
                S::INTERNAL_SERVER_ERROR,
                "cgroup_error",
                "the pod's cgroup could not be operated; see the agent's log".into(),
            ),
        },
        AgentError::BadRequest(m) => (S::BAD_REQUEST, "bad_request", m.clone()),
        AgentError::Overloaded => (
            S::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight; retry".into(),
        ),
    }
}
