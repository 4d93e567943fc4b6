//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2 (h2c prior knowledge or ALPN)
//! on one port via hyper-util's `auto` builder, upgrades enabled, every phase bounded.
//!
//! Bounds: at most `proxy.max_connections` open (more are closed at accept); from accept
//! to the first complete request head `proxy.client_header_timeout` (TLS handshake and
//! protocol sniff included); with nothing in flight `proxy.idle_timeout`; TCP keepalive
//! on the socket; HTTP/2 keepalive PINGs and a stream cap; `proxy.max_header_bytes`.
//!
//! On `Draining` the listener is dropped (new connections are refused) and every
//! connection is asked to finish: idle ones close at once, HTTP/1.1 closes after its
//! in-flight response, HTTP/2 sends GOAWAY. On `Closed` whatever remains is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::activity::{ConnActivity, ConnTimeouts, Expiry, Watched};
use super::h1server::{FastPath, Handoff};
use super::{ClientBody, ClientConn, Proxy};
use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::shutdown::{Phase, Shutdown, TrackGuard};

/// Pause after an accept error (e.g. EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// One counted connection: its `proxy.max_connections` permit and the open gauge.
/// Owned by the socket wrapper, so an upgraded (WebSocket) stream keeps it too.
struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The socket as hyper sees it: reads stamped on the connection's activity.
type ClientIo = Watched<TcpStream, ConnActivity, ConnSlot>;

/// Everything the accept loop hands to each connection task.
struct Listener {
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    timeouts: ConnTimeouts,
    tcp_keepalive: Option<socket2::TcpKeepalive>,
    shutdown: Shutdown,
    slots: Arc<Semaphore>,
    open: IntGauge,
    refused: IntCounter,
    closed: IntCounterVec,
    /// `proxy.max_header_bytes` (the fast path's head bound; hyper's is the same).
    max_head: usize,
    /// `proxy.http1_fast_path`: connections start on the fast path (else hyper at once).
    fast_path: bool,
}

/// Serves the proxy on `listener` until the shutdown reaches `Draining`, then lets
/// connections finish; returns when the listener is closed (connections drain on their
/// own tasks, counted by the shutdown tracker).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    config: &ProxyConfig,
    metrics: &Metrics,
    shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Later heads are bounded by `ConnActivity` (hyper's own timer would also cut
        // idle keep-alive connections at the header timeout).
        .header_read_timeout(None)
        .max_buf_size(config.max_header_bytes)
        .keep_alive(true);
    let keepalive = config.http2_keepalive_interval.as_duration();
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval((!keepalive.is_zero()).then_some(keepalive))
        .keep_alive_timeout(config.http2_keepalive_timeout.as_duration())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    let listener_state = Arc::new(Listener {
        proxy,
        tls,
        builder,
        timeouts: ConnTimeouts {
            header: config.client_header_timeout.as_duration(),
            idle: config.idle_timeout.as_duration(),
        },
        tcp_keepalive: tcp_keepalive(config.tcp_keepalive.as_duration()),
        shutdown: shutdown.clone(),
        slots: Arc::new(Semaphore::new(config.max_connections)),
        open: metrics.client_connections.clone(),
        refused: metrics.client_connections_refused_total.clone(),
        closed: metrics.client_connections_closed_total.clone(),
        max_head: config.max_header_bytes,
        fast_path: config.http1_fast_path,
    });
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
        let accepted = Instant::now();
        let Ok(permit) = listener_state.slots.clone().try_acquire_owned() else {
            // Closing at once keeps file descriptors for the connections being served;
            // a refused client sees a reset/EOF and may retry another replica.
            listener_state.refused.inc();
            tracing::debug!(%peer, "proxy.max_connections reached: connection refused");
            drop(stream);
            continue;
        };
        listener_state.open.inc();
        let slot = ConnSlot {
            _permit: permit,
            open: listener_state.open.clone(),
        };
        let track = shutdown.tracker().track();
        let state = listener_state.clone();
        tokio::spawn(async move {
            let _track: TrackGuard = track;
            state.connection(stream, peer, slot, accepted).await;
        });
    }
    drop(listener);
    tracing::info!("proxy listener closed; draining connections");
}

/// TCP keepalive probes: first after `idle`, then every third of it, 3 probes (client
/// sockets, and sandbox connections of the inline HTTP/1.1 client).
pub(super) fn tcp_keepalive(idle: Duration) -> Option<socket2::TcpKeepalive> {
    if idle.is_zero() {
        return None;
    }
    let interval = (idle / 3).max(Duration::from_secs(1));
    Some(
        socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(3),
    )
}

impl Listener {
    /// One connection from accept to close.
    async fn connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        slot: ConnSlot,
        accepted: Instant,
    ) {
        let _ = stream.set_nodelay(true);
        if let Some(ka) = &self.tcp_keepalive
            && let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(ka)
        {
            tracing::debug!(%peer, error = %e, "cannot enable TCP keepalive");
        }
        let activity = ConnActivity::new(accepted);
        let io: ClientIo = Watched::new(stream, activity.clone(), slot);
        let Some(acceptor) = &self.tls else {
            let conn = ClientConn::new(peer, false, self.proxy.is_trusted(peer.ip()));
            return self.drive(io, conn, activity).await;
        };
        // The handshake shares the first-head deadline: a silent TLS client is cut at
        // the same moment as a silent plain one.
        let deadline = accepted + self.timeouts.header;
        let handshake = tokio::select! {
            r = tokio::time::timeout_at(deadline, acceptor.accept(io)) => r,
            _ = self.shutdown.reached(Phase::Draining) => return,
        };
        match handshake {
            Ok(Ok(tls_stream)) => {
                let conn = ClientConn::new(peer, true, self.proxy.is_trusted(peer.ip()));
                self.drive(tls_stream, conn, activity).await;
            }
            Ok(Err(e)) => {
                self.closed.with_label_values(&["tls_handshake"]).inc();
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                self.closed.with_label_values(&["header_timeout"]).inc();
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        }
    }

    /// Serves one connection until it ends, expires, is drained, or the drain window
    /// closes.
    async fn drive<I>(&self, io: I, conn: ClientConn, activity: Arc<ConnActivity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = Arc::new(conn);
        // Plain HTTP/1.1 requests are served by the fast path until one is not.
        let mut io = io;
        let fast = FastPath {
            proxy: &self.proxy,
            conn: &conn,
            activity: &activity,
            timeouts: self.timeouts,
            shutdown: &self.shutdown,
            closed: &self.closed,
            max_head: self.max_head,
        };
        let handoff = if self.fast_path {
            fast.serve(&mut io).await
        } else {
            Handoff::ToHyper(bytes::BytesMut::new())
        };
        let read = match handoff {
            Handoff::Done => return,
            Handoff::ToHyper(read) => read.freeze(),
        };
        let io = Prefixed::new(read, io);
        let proxy = self.proxy.clone();
        let requests = activity.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let guard = requests.begin_request(req.version() == Version::HTTP_2);
            let proxy = proxy.clone();
            let conn = conn.clone();
            async move {
                let req = req.map(ClientBody::Hyper);
                Ok::<_, Infallible>(proxy.handle(req, &conn).await.map(|b| b.hold(guard)))
            }
        });
        let served = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(served);
        // Between requests the deadline is exact; while requests are in flight it is
        // looked at again after the shorter timeout.
        let recheck = self.timeouts.header.min(self.timeouts.idle);
        let expired = loop {
            let wake = match activity.deadline(self.timeouts) {
                Some((at, _)) => at,
                None => Instant::now() + recheck,
            };
            tokio::select! {
                result = served.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.reached(Phase::Draining) => break None,
                _ = tokio::time::sleep_until(wake) => {
                    if let Some((at, why)) = activity.deadline(self.timeouts)
                        && at <= Instant::now()
                    {
                        break Some(why);
                    }
                }
            }
        };
        if let Some(why) = expired {
            self.closed.with_label_values(&[why.reason()]).inc();
            tracing::debug!(reason = why.reason(), "closing a client connection");
            if why != Expiry::Idle {
                // No request to finish: drop the socket now.
                return;
            }
        }
        // Idle (or draining): HTTP/1.1 closes at once when nothing is in flight, HTTP/2
        // sends GOAWAY and closes when its streams are done.
        served.as_mut().graceful_shutdown();
        let grace = if expired.is_some() {
            self.timeouts.header
        } else {
            Duration::MAX
        };
        tokio::select! {
            _ = served.as_mut() => {}
            _ = tokio::time::sleep(grace) => {}
            _ = self.shutdown.reached(Phase::Closed) => {
                tracing::info!("drain window over: closing a client connection");
            }
        }
    }
}

/// An I/O that first yields bytes already read from it (the fast path's hand-off to
/// hyper), then reads from the socket; writes go straight through.
struct Prefixed<I> {
    read: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    fn new(read: Bytes, io: I) -> Prefixed<I> {
        Prefixed { read, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
