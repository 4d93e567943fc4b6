//! Bodies: the request body as forwarded (gap timeout, size cap) and response bodies
//! (the upstream's streamed body or a small generated one), wrapped so the request's
//! [`Completion`] runs when the last frame is sent (or the body is dropped).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::activity::RequestGuard;
use super::completion::Completion;
use super::h1client::{BoxError, H1Body};
use super::rules;

/// Why forwarding a request body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// `proxy.body_timeout` passed without a byte from the client.
    #[error("the client sent no request body bytes for {0:?}")]
    Timeout(Duration),
    /// More than `proxy.max_body_bytes`.
    #[error("the request body exceeds {0} bytes")]
    TooLarge(u64),
    /// The client connection failed while sending the body.
    #[error("reading the request body: {0}")]
    Client(#[source] hyper::Error),
}

/// A request body as the client connection delivered it: hyper's stream, or the bytes the
/// HTTP/1.1 fast path ([`super::h1server`]) read whole with the head.
pub enum ClientBody {
    Hyper(Incoming),
    Buffered(Option<Bytes>),
}

impl ClientBody {
    /// No body.
    pub fn empty() -> ClientBody {
        ClientBody::Buffered(None)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Buffered(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Buffered(None) => SizeHint::with_exact(0),
            ClientBody::Buffered(Some(b)) => SizeHint::with_exact(b.len() as u64),
        }
    }
}

/// The client's request body on its way to the sandbox: every gap between frames is
/// bounded by `proxy.body_timeout` and the total by `proxy.max_body_bytes`; trailer fields
/// that may not be trailers are dropped ([`rules::forbidden_in_trailers`]). The error
/// aborts the upstream request; [`super::error`] turns it into 408 or 413.
pub struct RequestBody {
    inner: ClientBody,
    gap: Duration,
    /// Allocated only when the client makes us wait (most bodies arrive with the head).
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    limit: u64,
    read: u64,
    failed: bool,
}

impl RequestBody {
    pub fn new(inner: ClientBody, gap: Duration, limit: Option<u64>) -> RequestBody {
        RequestBody {
            inner,
            gap,
            timer: None,
            armed: false,
            limit: limit.unwrap_or(u64::MAX),
            read: 0,
            failed: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }

        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                this.armed = false;
                if let Some(trailers) = frame.trailers_mut() {
                    rules::drop_forbidden_trailers(trailers);
                }
                if let Some(data) = frame.data_ref() {
                    this.read = this.read.saturating_add(data.len() as u64);
                    if this.read > this.limit {
                        this.failed = true;
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge(this.limit))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                Poll::Ready(Some(Err(RequestBodyError::Client(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !this.armed {
                    let deadline = Instant::now() + this.gap;
                    match &mut this.timer {
                        Some(t) => t.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                let timer = this.timer.as_mut().expect("armed above");
                if timer.as_mut().poll(cx).is_ready() {
                    this.failed = true;
                    return Poll::Ready(Some(Err(RequestBodyError::Timeout(this.gap))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of a proxied response, before completion tracking.
pub enum ProxyBody {
    /// Streamed from the sandbox by the inline HTTP/1.1 client (data and trailers).
    H1(H1Body),
    /// Streamed from the sandbox by hyper's client (HTTP/2 upstreams, upgrades).
    Upstream(Incoming),
    /// Generated by the activator (errors, empty 101 responses).
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> ProxyBody {
        ProxyBody::Full((!b.is_empty()).then_some(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::H1(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::H1(b) => b.is_end_stream(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::H1(b) => b.size_hint(),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
        }
    }
}

/// What the proxy hands to hyper (or the fast path writes): a body that completes its
/// request when it ends; trailer fields that may not be trailers are dropped
/// ([`rules::forbidden_in_trailers`]).
pub struct ResponseBody {
    inner: ProxyBody,
    completion: Completion,
    /// Keeps the request counted on its client connection until the body is dropped.
    conn_guard: Option<RequestGuard>,
}

impl ResponseBody {
    pub fn new(inner: ProxyBody, completion: Completion) -> ResponseBody {
        ResponseBody {
            inner,
            completion,
            conn_guard: None,
        }
    }

    /// Holds `guard` (the connection's in-flight count) for the life of the body.
    pub fn hold(mut self, guard: RequestGuard) -> ResponseBody {
        self.conn_guard = Some(guard);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            rules::drop_forbidden_trailers(trailers);
        }
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.completion.take().finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
