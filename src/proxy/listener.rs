//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2 (h2c prior knowledge or ALPN)
//! on one port via hyper-util's `auto` builder, upgrades enabled, graceful drain.
//!
//! On `Draining` the listener is dropped (new connections are refused) and every
//! connection is asked to finish: HTTP/1.1 closes after its in-flight response, HTTP/2
//! sends GOAWAY. On `Closed` whatever remains is dropped.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{ClientConn, Proxy};
use crate::config::ProxyConfig;
use crate::shutdown::{Phase, Shutdown, TrackGuard};

/// Pause after an accept error (e.g. EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Per-connection context handed to every request on it.
struct ConnContext {
    proxy: Arc<Proxy>,
    conn: ClientConn,
}

/// Serves the proxy on `listener` until the shutdown reaches `Draining`, then lets
/// connections finish; returns when the listener is closed (connections drain on their
/// own tasks, counted by the shutdown tracker).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    config: &ProxyConfig,
    shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.client_header_timeout.as_duration())
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let handshake_timeout = config.client_header_timeout.as_duration();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.reached(Phase::Draining) => break,
        };
        let _ = stream.set_nodelay(true);
        let track = shutdown.tracker().track();
        let tls = tls.clone();
        let proxy = proxy.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _track: TrackGuard = track;
            match tls {
                None => {
                    let ctx = ConnContext {
                        proxy,
                        conn: ClientConn::new(peer, false),
                    };
                    drive(stream, ctx, &builder, &shutdown).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let ctx = ConnContext {
                                proxy,
                                conn: ClientConn::new(peer, true),
                            };
                            drive(tls_stream, ctx, &builder, &shutdown).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("proxy listener closed; draining connections");
}

/// Serves one connection until it ends, is drained, or the drain window closes.
async fn drive<I>(
    io: I,
    ctx: ConnContext,
    builder: &auto::Builder<TokioExecutor>,
    shutdown: &Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ctx);
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.proxy.handle(req, &ctx.conn).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            return;
        }
        _ = shutdown.reached(Phase::Draining) => conn.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.reached(Phase::Closed) => {
            tracing::info!("drain window over: closing a client connection");
        }
    }
}
