//! The HTTP/1.1 fast path on the client side: a connection starts here, and while its
//! requests are plain (HTTP/1.1, origin-form target, no `Transfer-Encoding`, `Upgrade`
//! or `Expect`, a body of at most [`FAST_BODY_MAX`] bytes declared by one
//! `Content-Length`) they are parsed, proxied through [`Proxy::handle`] and answered
//! here, in the connection's task, without hyper's server state machine. The first
//! request that is anything else (HTTP/2's preface, HTTP/1.0, an upgrade, a chunked or
//! large body, a body not yet fully received, a head hyper would refuse: malformed, too
//! large, too many fields) hands
//! the connection, with every byte read so far, to hyper for the rest of its life, so
//! hyper's well-tested rules decide every case this path does not take.
//!
//! The same bounds apply as under hyper (see [`super::listener`]): the first head within
//! `proxy.client_header_timeout` of accept, later heads and idleness through the
//! connection's [`ConnActivity`] deadline, heads up to `proxy.max_header_bytes` (a body
//! still arriving is hyper's, under `proxy.body_timeout`). While a request is being proxied the socket is still
//! read, so a client that goes away cancels its request (recorded as 499), as hyper does.
//! Responses: status line, the response's fields, `date`, then `content-length` when
//! the body's length is known, else chunked; `connection: close` when the client asked
//! for it or the proxy is draining.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HOST, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body;
use prometheus::IntCounterVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::activity::{ConnActivity, ConnTimeouts};
use super::body::{ClientBody, ResponseBody};
use super::conn_local::{self, ConnLocal};
use super::forward::list_has;
use super::h1::{self, field};
use super::rules::{self, EdgeRules, EdgeViolation, FieldVerdict, Seen};
use super::{ClientConn, Proxy};
use crate::shutdown::{Phase, Shutdown};

/// Largest request body the fast path reads whole with its head; larger ones go to hyper.
pub const FAST_BODY_MAX: u64 = 64 * 1024;
/// Response bytes gathered before a write while the body has more frames ready.
const WRITE_BATCH: usize = 64 * 1024;

/// How the fast path left the connection.
pub enum Handoff {
    /// It is finished (closed by either side, expired, drained).
    Done,
    /// hyper takes over; these bytes were read and not consumed.
    ToHyper(BytesMut),
}

/// What the connection serves with.
pub struct FastPath<'a> {
    pub proxy: &'a Arc<Proxy>,
    pub conn: &'a Arc<ClientConn>,
    pub activity: &'a Arc<ConnActivity>,
    pub timeouts: ConnTimeouts,
    pub shutdown: &'a Shutdown,
    pub closed: &'a IntCounterVec,
    pub max_head: usize,
}

/// What a connection waits on besides its socket, made once per connection: the
/// deadline timer and the shutdown phases. Each ends the connection when it fires, so
/// none is polled after completing.
struct Waits<'a> {
    deadline: Pin<Box<Sleep>>,
    draining: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    closed: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
}

/// A request head the fast path takes.
struct Head {
    /// The head's bytes, to hand back to hyper if the body is not here yet.
    raw: Bytes,
    request: Request<ClientBody>,
    body_len: usize,
    keep_alive: bool,
    head_request: bool,
    trailers_ok: bool,
    /// The edge rules' verdict, reached during the same scan as the fields.
    verdict: Result<(), EdgeViolation>,
}

#[expect(
    clippy::large_enum_variant,
    reason = "returned once per request and moved into the handler at once; a Box would be one more allocation per request"
)]
enum Parsed {
    Take(Head),
    Partial,
    /// Not for this path: hyper decides.
    Other,
}

impl FastPath<'_> {
    /// Serves requests until the connection ends or a request needs hyper.
    pub async fn serve<I>(&self, io: &mut I) -> Handoff
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut rbuf = BytesMut::with_capacity(8 * 1024);
        let mut wbuf = Vec::with_capacity(8 * 1024);
        let mut local = ConnLocal::default();
        let mut waits = Waits {
            deadline: Box::pin(tokio::time::sleep_until(self.deadline())),
            draining: Box::pin(self.shutdown.reached(Phase::Draining)),
            closed: Box::pin(self.shutdown.reached(Phase::Closed)),
        };
        loop {
            let head = loop {
                if !rbuf.is_empty() {
                    match parse_request(&mut rbuf, self.max_head, &mut local, self.proxy.edge()) {
                        Parsed::Take(head) => break head,
                        Parsed::Other => return Handoff::ToHyper(rbuf),
                        Parsed::Partial => {
                            // A started head has its own, possibly earlier, deadline.
                            let at = self.deadline();
                            if at < waits.deadline.deadline() {
                                waits.deadline.as_mut().reset(at);
                            }
                        }
                    }
                }
                if !self.read_head_bytes(io, &mut rbuf, &mut waits).await {
                    return Handoff::Done;
                }
            };
            let mut head = head;
            if head.body_len > 0 {
                // Only a body that is already here is taken whole; one still on its way is
                // streamed by hyper (gap timeout, early answers, a client that leaves).
                if !body_arrived(io, &mut rbuf, head.body_len) {
                    let mut all = BytesMut::with_capacity(head.raw.len() + rbuf.len());
                    all.extend_from_slice(&head.raw);
                    all.extend_from_slice(&rbuf);
                    return Handoff::ToHyper(all);
                }
                let body = rbuf.split_to(head.body_len).freeze();
                *head.request.body_mut() = ClientBody::Buffered(Some(body));
            }
            let exchanged = self.exchange(io, &mut rbuf, &mut wbuf, head, &mut waits, &mut local);
            let keep_alive = match exchanged.await {
                Ok(keep_alive) => keep_alive,
                Err(()) => return Handoff::Done,
            };
            if !keep_alive {
                let _ = io.shutdown().await;
                return Handoff::Done;
            }
        }
    }

    /// The connection's current deadline (there is one: nothing is in flight here).
    fn deadline(&self) -> Instant {
        self.activity
            .deadline(self.timeouts)
            .map_or_else(|| Instant::now() + self.timeouts.header, |(at, _)| at)
    }

    /// Waits for more bytes of a head, within the connection's deadline; false when the
    /// connection is over (EOF, error, expired, draining while idle). The deadline timer
    /// is armed once and moved only when it fires early (the deadline moves later with
    /// every request), so a request costs no timer registration.
    async fn read_head_bytes<I>(
        &self,
        io: &mut I,
        rbuf: &mut BytesMut,
        waits: &mut Waits<'_>,
    ) -> bool
    where
        I: AsyncRead + Unpin,
    {
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(8 * 1024);
        }
        tokio::select! {
            read = io.read_buf(rbuf) => matches!(read, Ok(n) if n > 0),
            () = waits.deadline.as_mut() => {
                match self.activity.deadline(self.timeouts) {
                    Some((at, why)) if at <= Instant::now() => {
                        self.closed.with_label_values(&[why.reason()]).inc();
                        tracing::debug!(reason = why.reason(), "closing a client connection");
                        false
                    }
                    // Not yet: requests moved it; wait again until then.
                    _ => {
                        let at = self.deadline();
                        waits.deadline.as_mut().reset(at);
                        true
                    }
                }
            }
            () = waits.draining.as_mut() => false,
        }
    }

    /// Proxies one request and writes its response. `Ok(keep_alive)`; `Err` when the
    /// connection must end (client gone, write failed, body broken off).
    async fn exchange<I>(
        &self,
        io: &mut I,
        rbuf: &mut BytesMut,
        wbuf: &mut Vec<u8>,
        head: Head,
        waits: &mut Waits<'_>,
        local: &mut ConnLocal,
    ) -> Result<bool, ()>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let guard = self.activity.begin_request(false);
        // The socket is watched while the request is proxied: EOF cancels it (hyper's
        // behaviour); early bytes of a pipelined next request are kept, up to one head.
        let resp = {
            let handled =
                self.proxy
                    .handle_checked(head.request, self.conn, head.verdict, Some(&mut *local));
            tokio::pin!(handled);
            loop {
                let watch = rbuf.len() < self.max_head;
                if rbuf.capacity() - rbuf.len() < 1024 {
                    rbuf.reserve(8 * 1024);
                }
                tokio::select! {
                    biased;
                    resp = &mut handled => break resp,
                    read = io.read_buf(rbuf), if watch => match read {
                        Ok(n) if n > 0 => {}
                        _ => return Err(()),
                    },
                    () = waits.closed.as_mut() => return Err(()),
                }
            }
        };
        let resp = resp.map(|b| b.hold(guard));
        let keep_alive = head.keep_alive && !self.shutdown.is_draining();
        let written = tokio::select! {
            w = write_response(io, wbuf, resp, head.head_request, head.trailers_ok, keep_alive, &mut local.spare_response) => w,
            () = waits.closed.as_mut() => Err(io::ErrorKind::Interrupted.into()),
        };
        match written {
            Ok(()) => Ok(keep_alive),
            Err(e) => {
                tracing::debug!(error = %e, "client connection ended while writing a response");
                Err(())
            }
        }
    }
}

/// Reads what is already readable until `rbuf` holds `len` bytes; never waits.
fn body_arrived<I: AsyncRead + Unpin>(io: &mut I, rbuf: &mut BytesMut, len: usize) -> bool {
    while rbuf.len() < len {
        rbuf.reserve(len - rbuf.len());
        match futures_util::FutureExt::now_or_never(io.read_buf(rbuf)) {
            Some(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
    true
}

/// Parses a request head from the front of `rbuf`; takes it only when it is plain (see
/// the module documentation).
fn parse_request(
    rbuf: &mut BytesMut,
    max_head: usize,
    local: &mut ConnLocal,
    rules: &EdgeRules,
) -> Parsed {
    h1::with_spans(|spans| parse_request_into(rbuf, max_head, local, rules, spans))
}

fn parse_request_into(
    rbuf: &mut BytesMut,
    max_head: usize,
    local: &mut ConnLocal,
    rules: &EdgeRules,
    spans: &mut Vec<h1::Span>,
) -> Parsed {
    let (len, method, target) = {
        // Uninitialised: httparse writes the fields it finds (zeroing the array per
        // request cost more than parsing a small head).
        let mut raw = [const { std::mem::MaybeUninit::uninit() }; h1::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(&rbuf[..], &mut raw) {
            Ok(httparse::Status::Complete(len)) if len <= max_head => len,
            Ok(httparse::Status::Partial) if rbuf.len() <= max_head => return Parsed::Partial,
            _ => return Parsed::Other,
        };
        if req.version != Some(1) {
            return Parsed::Other;
        }
        let base = rbuf.as_ptr() as usize;
        let Some(path) = req.path else {
            return Parsed::Other;
        };
        if !path.starts_with('/') {
            return Parsed::Other;
        }
        let ts = path.as_ptr() as usize - base;
        h1::push_spans(spans, base, req.headers);
        let Ok(method) = Method::from_bytes(req.method.unwrap_or("").as_bytes()) else {
            return Parsed::Other;
        };
        (len, method, (ts, ts + path.len()))
    };
    if method == Method::CONNECT {
        return Parsed::Other;
    }
    let head = rbuf.split_to(len).freeze();
    match build(&head, method, target, spans, local, rules) {
        Some(parsed) => Parsed::Take(parsed),
        None => {
            // Give the bytes back, in order, for hyper.
            let rest = rbuf.split();
            rbuf.extend_from_slice(&head);
            rbuf.extend_from_slice(&rest);
            Parsed::Other
        }
    }
}

fn build(
    head: &Bytes,
    method: Method,
    target: (usize, usize),
    spans: &[h1::Span],
    local: &mut ConnLocal,
    rules: &EdgeRules,
) -> Option<Head> {
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1)).ok()?;
    // The last request's map when there is one (emptied, capacity kept); else one with
    // room for the fields the proxy adds (X-Forwarded-*, X-Request-ID, trace context).
    let mut headers = local
        .spare_request
        .take()
        .unwrap_or_else(|| HeaderMap::with_capacity(spans.len() + 8));
    let mut body_len = None;
    let mut keep_alive = true;
    let mut trailers_ok = false;
    // The edge rules ride on this scan: one call per field, no second pass.
    let mut seen = Seen::default();
    let mut host = None;
    for &(ns, ne, vs, ve) in spans {
        if rules.field(&head[ns..ne], &mut seen) == FieldVerdict::Drop {
            continue;
        }
        let name = local.name(&head[ns..ne])?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve)).ok()?;
        if name == TRANSFER_ENCODING || name == UPGRADE || name == EXPECT {
            return None;
        }
        if name == CONTENT_LENGTH {
            // One length, no list: anything else is hyper's to judge.
            let n = h1::parse_length(value.to_str().ok()?)?;
            if body_len.is_some() || n > FAST_BODY_MAX {
                return None;
            }
            body_len = Some(n as usize);
        }
        if name == CONNECTION {
            let text = value.to_str().ok()?;
            if list_has(text, "upgrade") {
                return None;
            }
            keep_alive &= !list_has(text, "close");
        }
        if name == TE {
            trailers_ok = value.to_str().is_ok_and(|v| list_has(v, "trailers"));
        }
        if name == HOST {
            host = Some((vs, ve));
        }
        headers.append(name, value);
    }
    let verdict = rules.finish(
        &method,
        Version::HTTP_11,
        None,
        host.map(|(vs, ve)| &head[vs..ve]),
        &seen,
    );
    let head_request = method == Method::HEAD;
    let mut request = Request::new(ClientBody::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(Head {
        raw: head.clone(),
        request,
        body_len: body_len.unwrap_or(0),
        keep_alive,
        head_request,
        trailers_ok,
        verdict,
    })
}

/// Writes `resp`: head, then the body (length-delimited when its size is known, else
/// chunked), batching frames that are ready into one write.
async fn write_response<I>(
    io: &mut I,
    wbuf: &mut Vec<u8>,
    resp: http::Response<ResponseBody>,
    head_request: bool,
    trailers_ok: bool,
    keep_alive: bool,
    spare: &mut Option<HeaderMap>,
) -> io::Result<()>
where
    I: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    wbuf.clear();
    wbuf.extend_from_slice(b"HTTP/1.1 ");
    wbuf.extend_from_slice(status.as_str().as_bytes());
    wbuf.push(b' ');
    wbuf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    let exact = body.size_hint().exact();
    let mut chunked = !bodiless && exact.is_none();
    // A response to HEAD keeps the length it describes; a 1xx/204/304 never has one.
    let keep_length = bodiless && rules::response_keeps_content_length(status);
    for (name, value) in &parts.headers {
        // Framing is ours to write.
        if name == TRANSFER_ENCODING
            || (name == CONTENT_LENGTH && !keep_length)
            || name == CONNECTION
        {
            continue;
        }
        field(wbuf, name.as_str().as_bytes(), value.as_bytes());
    }
    if !parts.headers.contains_key(DATE) {
        date(wbuf);
    }
    if !bodiless {
        match exact {
            Some(n) => field(wbuf, b"content-length", h1::itoa_u64(n).as_bytes()),
            None => field(wbuf, b"transfer-encoding", b"chunked"),
        }
    } else if keep_length
        && !parts.headers.contains_key(CONTENT_LENGTH)
        && let Some(n @ 1..) = exact
    {
        // A generated response to HEAD (an error) states the length GET would get, as
        // hyper's server does.
        field(wbuf, b"content-length", h1::itoa_u64(n).as_bytes());
    }
    if !keep_alive {
        field(wbuf, b"connection", b"close");
    }
    wbuf.extend_from_slice(b"\r\n");
    // The head is encoded: its map serves the connection's next response head.
    conn_local::recycle(spare, parts.headers);
    if bodiless {
        io.write_all(wbuf).await?;
        return io.flush().await;
    }
    let mut line = Vec::new();
    loop {
        // Frames already available join the pending bytes; wait only with nothing to send.
        let frame = if wbuf.is_empty() {
            body.frame().await
        } else {
            match futures_util::FutureExt::now_or_never(body.frame()) {
                Some(frame) => frame,
                None => {
                    io.write_all(wbuf).await?;
                    wbuf.clear();
                    body.frame().await
                }
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                return Err(io::Error::other(e));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        line.clear();
                        h1::chunk_size_line(&mut line, data.len());
                        wbuf.extend_from_slice(&line);
                        wbuf.extend_from_slice(&data);
                        wbuf.extend_from_slice(b"\r\n");
                    } else {
                        wbuf.extend_from_slice(&data);
                    }
                }
                Err(frame) => {
                    if let (true, true, Ok(trailers)) =
                        (chunked, trailers_ok, frame.into_trailers())
                    {
                        wbuf.extend_from_slice(b"0\r\n");
                        for (name, value) in &trailers {
                            field(wbuf, name.as_str().as_bytes(), value.as_bytes());
                        }
                        wbuf.extend_from_slice(b"\r\n");
                        chunked = false;
                    }
                }
            },
        }
        if wbuf.len() >= WRITE_BATCH {
            io.write_all(wbuf).await?;
            wbuf.clear();
        }
    }
    if chunked {
        wbuf.extend_from_slice(b"0\r\n\r\n");
    }
    if !wbuf.is_empty() {
        io.write_all(wbuf).await?;
        wbuf.clear();
    }
    io.flush().await
}

/// `date: <IMF-fixdate>`, formatted once per second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        field(out, b"date", text.as_bytes());
    });
}
