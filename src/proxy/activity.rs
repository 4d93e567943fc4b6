//! Connection activity: what a client connection is doing (waiting for its first head,
//! serving requests, idle, half-way through a later head) and the deadline that follows.
//!
//! hyper bounds none of these phases for HTTP/2 and only some for HTTP/1.1 (its header
//! timeout also starts on an idle keep-alive connection, conflating the two), so the
//! listener keeps its own clock: requests in flight are counted by a guard that lives
//! until the response body is dropped, and reads are stamped by [`Watched`], the I/O
//! wrapper every client socket is served through.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// "No timestamp" in the millisecond fields.
const NONE: u64 = u64::MAX;

/// The connection-level timeouts (`proxy.client_header_timeout`, `proxy.idle_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    pub header: Duration,
    pub idle: Duration,
}

/// Why a connection's deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No complete request head since accept (TLS, protocol sniff and head included).
    FirstHead,
    /// HTTP/1.1: a later head started arriving but did not complete in time.
    SlowHead,
    /// Nothing in flight for `proxy.idle_timeout`.
    Idle,
}

impl Expiry {
    /// The `reason` label of `activator_client_connections_closed_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Expiry::FirstHead | Expiry::SlowHead => "header_timeout",
            Expiry::Idle => "idle_timeout",
        }
    }
}

/// Shared between a connection's driver, its requests and its socket wrapper.
pub struct ConnActivity {
    accepted: Instant,
    in_flight: AtomicU32,
    served_any: AtomicBool,
    http2: AtomicBool,
    /// When the last request in flight ended (ms since accept).
    last_done_ms: AtomicU64,
    /// First byte read after `last_done_ms` while idle (ms since accept), or [`NONE`].
    read_after_done_ms: AtomicU64,
}

impl ConnActivity {
    pub fn new(accepted: Instant) -> Arc<ConnActivity> {
        Arc::new(ConnActivity {
            accepted,
            in_flight: AtomicU32::new(0),
            served_any: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            last_done_ms: AtomicU64::new(0),
            read_after_done_ms: AtomicU64::new(NONE),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.accepted + Duration::from_millis(ms)
    }

    /// A request head arrived; the returned guard must live until its response body
    /// is finished or dropped.
    pub fn begin_request(self: &Arc<Self>, http2: bool) -> RequestGuard {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served_any.store(true, Ordering::Release);
        RequestGuard {
            activity: self.clone(),
        }
    }

    /// When this connection must be closed and why; `None` while a request is in flight
    /// (those phases have their own bounds: body, request and tunnel timeouts).
    pub fn deadline(&self, t: ConnTimeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.served_any.load(Ordering::Acquire) {
            return Some((self.accepted + t.header, Expiry::FirstHead));
        }
        let idle = (
            self.at(self.last_done_ms.load(Ordering::Acquire)) + t.idle,
            Expiry::Idle,
        );
        // HTTP/2 control frames (PING, SETTINGS) do not make a connection busy; an
        // HTTP/1.1 byte after idling is the start of the next head.
        let read = self.read_after_done_ms.load(Ordering::Acquire);
        if read == NONE || self.http2.load(Ordering::Relaxed) {
            return Some(idle);
        }
        let head = (self.at(read) + t.header, Expiry::SlowHead);
        Some(if head.0 < idle.0 { head } else { idle })
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.read_after_done_ms.load(Ordering::Relaxed) == NONE
        {
            self.read_after_done_ms
                .store(self.now_ms(), Ordering::Release);
        }
    }
}

/// Counts one request in flight on its connection; dropping it stamps the end.
pub struct RequestGuard {
    activity: Arc<ConnActivity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        a.last_done_ms.store(a.now_ms(), Ordering::Release);
        a.read_after_done_ms.store(NONE, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The last moment bytes moved through a relayed (upgraded) stream, either way.
pub struct TunnelActivity {
    start: Instant,
    last_ms: AtomicU64,
}

impl TunnelActivity {
    pub fn new() -> Arc<TunnelActivity> {
        Arc::new(TunnelActivity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    /// When the stream has been silent for `idle`.
    pub fn deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Acquire)) + idle
    }
}

/// Something told about every successful non-empty read.
pub trait ReadObserver: Send + Sync + 'static {
    fn on_read(&self);
}

impl ReadObserver for ConnActivity {
    fn on_read(&self) {
        ConnActivity::on_read(self)
    }
}

impl ReadObserver for TunnelActivity {
    fn on_read(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Release);
    }
}

/// An I/O object whose reads are reported to `observer`; `hold` lives as long as the
/// socket (the connection slot counted against `proxy.max_connections`).
pub struct Watched<I, O: ?Sized, H> {
    io: I,
    observer: Arc<O>,
    _hold: H,
}

impl<I, O: ReadObserver + ?Sized, H> Watched<I, O, H> {
    pub fn new(io: I, observer: Arc<O>, hold: H) -> Self {
        Watched {
            io,
            observer,
            _hold: hold,
        }
    }
}

impl<I, O, H> AsyncRead for Watched<I, O, H>
where
    I: AsyncRead + Unpin,
    O: ReadObserver + ?Sized,
    H: Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.observer.on_read();
        }
        polled
    }
}

impl<I, O, H> AsyncWrite for Watched<I, O, H>
where
    I: AsyncWrite + Unpin,
    O: ?Sized,
    H: Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ConnTimeouts = ConnTimeouts {
        header: Duration::from_secs(5),
        idle: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_phases() {
        let start = Instant::now();
        let a = ConnActivity::new(start);
        assert_eq!(
            a.deadline(T),
            Some((start + Duration::from_secs(5), Expiry::FirstHead))
        );
        let g = a.begin_request(false);
        assert_eq!(a.deadline(T), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(g);
        let idle_at = start + Duration::from_secs(62);
        assert_eq!(a.deadline(T), Some((idle_at, Expiry::Idle)));
        // A byte of the next head: the header bound applies from it.
        tokio::time::advance(Duration::from_secs(10)).await;
        a.on_read();
        assert_eq!(
            a.deadline(T),
            Some((start + Duration::from_secs(17), Expiry::SlowHead))
        );
        // Over HTTP/2 reads while idle are control frames: idle bound only.
        let g = a.begin_request(true);
        drop(g);
        a.on_read();
        assert_eq!(a.deadline(T).unwrap().1, Expiry::Idle);
    }
}
