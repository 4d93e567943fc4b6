//! The HTTP/1.1 upstream client, driven inline: a request is written, its response head
//! read and its body streamed by the task that serves the client connection (the handler
//! future and the response body hyper polls), with no connection task, channel or
//! oneshot in between. HTTP/2 upstreams and WebSocket handshakes keep hyper's client (see
//! [`super::upstream`]).
//!
//! Connections are pooled per sandbox: [`H1Pool`] keeps at most
//! `proxy.pool_max_idle_per_host` idle connections per sandbox, each for at most
//! `proxy.pool_idle_timeout`, last-used first. A pool entry remembers the endpoint its
//! connections were opened to: when the sandbox is next seen at another endpoint (a
//! resume onto a new address), the old ones are closed, never reused. A connection goes
//! back only after a complete response whose framing allows reuse (no `Connection:
//! close`, no close-delimited body, no leftover bytes, request body fully written).
//!
//! Before reuse a connection is checked without blocking: readable means the sandbox
//! closed it (or sent bytes nobody asked for), and it is dropped; one idle for a second
//! or more is also peeked at, which sees a close the runtime has not processed yet. A request whose
//! reused connection still fails before any response byte is retried once on a fresh
//! connection when that cannot duplicate it: the request was not fully written, or its
//! method is idempotent (RFC 9110 section 9.2.2) and it has no body (nginx's
//! `proxy_next_upstream error` makes the same choice for non-idempotent methods).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::body::{RequestBody, RequestBodyError};
use super::h1::{self, Chunk, ChunkedDecoder, Framing, Malformed, RequestFraming, ResponseHead};
use super::rules;
use crate::backend::SandboxId;

/// Boxed error of a streamed response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A pooled connection idle this long is checked with a socket peek before reuse (see
/// `Conn::still_open`).
const PEEK_AFTER: Duration = Duration::from_secs(1);

/// Read buffer growth step; a connection's buffer starts at this size.
const READ_CHUNK: usize = 16 * 1024;

/// Why a request got no response head.
#[derive(Debug)]
pub enum H1Error {
    /// The TCP connect failed or timed out.
    Connect(BoxError),
    /// The sandbox closed or reset the connection before a complete response head.
    Reset(BoxError),
    /// The sandbox's bytes are not a relayable HTTP/1.1 response.
    Protocol(Malformed),
    /// Forwarding stopped because of the client's request body.
    Body(RequestBodyError),
}

/// How an exchange on one connection failed.
#[derive(Debug)]
enum Fault {
    /// Writing the request failed before all of it was written.
    Write(io::Error),
    /// Reading the response failed or met EOF; `answered`: response bytes had arrived.
    Read {
        error: Option<io::Error>,
        answered: bool,
    },
    Malformed(Malformed),
    Body(RequestBodyError),
}

impl Fault {
    /// Could the request be sent again on a fresh connection without risking a
    /// duplicate? (Only asked for a reused connection and a request without body.)
    fn retryable(&self, method: &Method) -> bool {
        match self {
            Fault::Write(_) => true,
            Fault::Read {
                answered: false, ..
            } => is_idempotent(method),
            _ => false,
        }
    }

    fn into_error(self) -> H1Error {
        match self {
            Fault::Write(e) => H1Error::Reset(e.into()),
            Fault::Read { error: Some(e), .. } => H1Error::Reset(e.into()),
            Fault::Read {
                error: None,
                answered,
            } => H1Error::Reset(
                if answered {
                    "the connection closed in the middle of the response head"
                } else {
                    "the connection closed before a response"
                }
                .into(),
            ),
            Fault::Malformed(m) => H1Error::Protocol(m),
            Fault::Body(b) => H1Error::Body(b),
        }
    }
}

/// RFC 9110 section 9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// One HTTP/1.1 connection to a sandbox and its buffers (kept across requests, so a
/// reused connection allocates nothing to write a head). The stream is shared only with
/// a request body writer that outlives its response head (see [`Conn::exchange`]).
struct Conn {
    stream: Arc<TcpStream>,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    endpoint: SocketAddr,
}

/// What [`Conn::exchange`] returns: the head, and the request body's writer when the
/// head came first and the body is still being sent (full duplex, e.g. an echo).
type Exchanged = (ResponseHead, Option<JoinHandle<()>>);

impl Conn {
    /// Is this idle connection still usable? Never blocks. Readable means the sandbox
    /// closed it or sent bytes nobody asked for (confirmed with one non-blocking read,
    /// since readiness may be left over from the last response). Not readable is
    /// trusted for a connection idle less than [`PEEK_AFTER`]: a close the runtime has
    /// not yet taken from epoll would be missed, but sandboxes close idle connections
    /// after a keep-alive timeout of seconds, not microseconds. Idle longer, the socket
    /// itself is asked (`MSG_PEEK`), which sees a close the runtime has not processed.
    fn still_open(&mut self, idle: Duration) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending if idle < PEEK_AFTER => true,
            Poll::Pending => {
                let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                match socket2::SockRef::from(&*self.stream).peek(&mut byte) {
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                    // EOF, or bytes nobody asked for.
                    Ok(_) => false,
                }
            }
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => match self.stream.try_read_buf(&mut self.rbuf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                // EOF, an error, or bytes nobody asked for.
                _ => false,
            },
        }
    }

    /// Writes the encoded head (and the body, if any) while reading the response head.
    /// A sandbox may answer before it has read the whole body (an echo streams it back;
    /// a 413 refuses it): the rest of the body is then sent by a task of its own while
    /// the response streams, and the connection is not reused.
    async fn exchange(
        &mut self,
        body: Option<RequestBody>,
        framing: RequestFraming,
        head_request: bool,
        declared_trailers: Option<http::HeaderValue>,
        spare: &mut Option<http::HeaderMap>,
    ) -> Result<Exchanged, Fault> {
        let Some(body) = body else {
            write_all(&self.stream, &self.wbuf)
                .await
                .map_err(Fault::Write)?;
            let head = read_head(&self.stream, &mut self.rbuf, head_request, spare).await?;
            return Ok((head, None));
        };
        let wbuf = std::mem::take(&mut self.wbuf);
        let mut write = Box::pin(write_request(
            self.stream.clone(),
            wbuf,
            body,
            framing,
            declared_trailers,
        ));
        let read = read_head(&self.stream, &mut self.rbuf, head_request, spare);
        tokio::pin!(read);
        let mut written = false;
        let mut write_failed = None;
        loop {
            tokio::select! {
                biased;
                head = &mut read => {
                    let head = match head {
                        Ok(head) => head,
                        Err(fault) => return Err(write_failed.map(Fault::Write).unwrap_or(fault)),
                    };
                    if written || write_failed.is_some() {
                        return Ok((head, None));
                    }
                    let endpoint = self.endpoint;
                    let writer = tokio::spawn(async move {
                        if let Err(fault) = write.await {
                            tracing::debug!(%endpoint, ?fault, "request body stopped after the response head");
                        }
                    });
                    return Ok((head, Some(writer)));
                }
                w = &mut write, if !written && write_failed.is_none() => match w {
                    Ok(wbuf) => {
                        written = true;
                        // Reused for the next request's head.
                        self.wbuf = wbuf;
                    }
                    Err(Fault::Write(e)) => {
                        // The sandbox may still have answered (and stopped reading): wait
                        // for the head the read side may yet deliver.
                        write_failed = Some(e);
                    }
                    Err(other) => return Err(other),
                },
            }
        }
    }
}

/// `write_all` on a shared stream (readiness, then a non-blocking write).
async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes the head, then the body in `framing`; returns the head buffer for reuse.
/// Request trailers go out after the last chunk when the request declared them in
/// `Trailer` (as hyper's client does), only the declared fields.
async fn write_request(
    stream: Arc<TcpStream>,
    head: Vec<u8>,
    mut body: RequestBody,
    framing: RequestFraming,
    declared_trailers: Option<http::HeaderValue>,
) -> Result<Vec<u8>, Fault> {
    write_all(&stream, &head).await.map_err(Fault::Write)?;
    let mut line = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Fault::Body)?;
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if framing == RequestFraming::Chunked {
            line.clear();
            h1::chunk_size_line(&mut line, data.len());
            write_all(&stream, &line).await.map_err(Fault::Write)?;
            write_all(&stream, &data).await.map_err(Fault::Write)?;
            write_all(&stream, b"\r\n").await.map_err(Fault::Write)?;
        } else {
            write_all(&stream, &data).await.map_err(Fault::Write)?;
        }
    }
    if framing == RequestFraming::Chunked {
        line.clear();
        line.extend_from_slice(b"0\r\n");
        if let (Some(trailers), Some(declared)) = (trailers, declared_trailers) {
            h1::encode_trailers(&mut line, &trailers, &declared);
        }
        line.extend_from_slice(b"\r\n");
        write_all(&stream, &line).await.map_err(Fault::Write)?;
    }
    Ok(head)
}

/// Reads until a final response head is parsed; informational (1xx) responses before it
/// are read and dropped (101 is final: it ends the exchange).
async fn read_head(
    stream: &TcpStream,
    rbuf: &mut BytesMut,
    head_request: bool,
    spare: &mut Option<http::HeaderMap>,
) -> Result<ResponseHead, Fault> {
    let mut answered = false;
    loop {
        if !rbuf.is_empty() {
            match h1::parse_response(rbuf, head_request, spare) {
                Ok(Some(head))
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(m) => return Err(Fault::Malformed(m)),
            }
        }
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(READ_CHUNK);
        }
        let read = loop {
            if let Err(e) = stream.readable().await {
                break Err(e);
            }
            match read_drained(stream, rbuf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other,
            }
        };
        match read {
            Ok(0) => {
                return Err(Fault::Read {
                    error: None,
                    answered,
                });
            }
            Ok(_) => answered = true,
            Err(e) => {
                return Err(Fault::Read {
                    error: Some(e),
                    answered,
                });
            }
        }
    }
}

/// One non-blocking read into `rbuf`. A read that did not fill the buffer's free space
/// emptied the socket, so its readiness is cleared on the spot, as tokio's own
/// `poll_read` does on epoll (tokio-rs/tokio#5866): an idle pooled connection then
/// checks as open without a system call (see [`Conn::still_open`]). The clear applies
/// to the readiness event the read was made under; an event that arrives later (the
/// sandbox closing) is newer and stays.
fn read_drained(stream: &TcpStream, rbuf: &mut BytesMut) -> io::Result<usize> {
    let mut got = Ok(0);
    let cleared = stream.try_io(Interest::READABLE, || {
        let room = rbuf.capacity() - rbuf.len();
        let n = stream.try_read_buf(rbuf)?;
        got = Ok(n);
        if n > 0 && n < room {
            // Reported as WouldBlock only so `try_io` clears the readiness.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match cleared {
        Ok(()) => got,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => match got {
            Ok(0) => Err(e),
            n => n,
        },
        Err(e) => Err(e),
    }
}

/// Idle connections per sandbox.
pub struct H1Pool {
    idle: DashMap<SandboxId, Idle>,
    max_idle: usize,
    idle_timeout: Duration,
    reaper_started: AtomicBool,
}

struct Idle {
    /// Where this sandbox's pooled connections go; a new endpoint empties the entry.
    endpoint: SocketAddr,
    /// Last used at the end.
    conns: Vec<(Conn, Instant)>,
}

impl H1Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> H1Pool {
        H1Pool {
            idle: DashMap::new(),
            max_idle,
            idle_timeout,
            reaper_started: AtomicBool::new(false),
        }
    }

    /// The most recently used idle connection to `sandbox` at `endpoint` that is still
    /// open and not past the idle timeout. Closes the ones it passes over, and every one
    /// of an older endpoint.
    fn checkout(&self, sandbox: &SandboxId, endpoint: SocketAddr) -> Option<Conn> {
        let mut dropped = Vec::new();
        let found = {
            let mut entry = self.idle.get_mut(sandbox)?;
            if entry.endpoint != endpoint {
                entry.endpoint = endpoint;
                dropped = std::mem::take(&mut entry.conns);
                None
            } else {
                let mut found = None;
                while let Some((mut conn, since)) = entry.conns.pop() {
                    let idle = since.elapsed();
                    if idle < self.idle_timeout && conn.still_open(idle) {
                        found = Some(conn);
                        break;
                    }
                    dropped.push((conn, since));
                }
                found
            }
        };
        // Closed outside the map's shard lock.
        drop(dropped);
        found
    }

    /// Takes a connection back after a complete response (the caller checked it may be
    /// reused). Starts the idle reaper on first use.
    fn checkin(self: &Arc<Self>, sandbox: &SandboxId, conn: Conn) {
        if self.max_idle == 0 || self.idle_timeout.is_zero() {
            return;
        }
        // Read first: after the first check-in this is a shared load, not a write.
        if !self.reaper_started.load(Ordering::Relaxed)
            && !self.reaper_started.swap(true, Ordering::Relaxed)
        {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
        let surplus = {
            // The sandbox's entry usually exists: no key clone then.
            let mut entry = match self.idle.get_mut(sandbox) {
                Some(entry) => entry,
                None => self.idle.entry(sandbox.clone()).or_insert_with(|| Idle {
                    endpoint: conn.endpoint,
                    conns: Vec::new(),
                }),
            };
            // The sandbox moved while this response streamed, or enough are idle.
            if entry.endpoint != conn.endpoint || entry.conns.len() >= self.max_idle {
                Some(conn)
            } else {
                entry.conns.push((conn, Instant::now()));
                None
            }
        };
        // Closed outside the map's shard lock.
        drop(surplus);
    }

    /// Closes the connections idle for `proxy.pool_idle_timeout`; forgets empty entries.
    fn reap_expired(&self) {
        let timeout = self.idle_timeout;
        self.idle.retain(|_, entry| {
            entry.conns.retain(|(_, since)| since.elapsed() < timeout);
            !entry.conns.is_empty()
        });
    }
}

/// Runs [`H1Pool::reap_expired`] every half idle timeout while the pool exists.
async fn reap(pool: Weak<H1Pool>) {
    let period = match pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(p) => p.reap_expired(),
            None => return,
        }
    }
}

/// Connects and sends requests; see the module documentation.
pub struct H1Client {
    pool: Arc<H1Pool>,
    connect_timeout: Duration,
    keepalive: Option<socket2::TcpKeepalive>,
}

impl H1Client {
    pub fn new(
        pool: H1Pool,
        connect_timeout: Duration,
        keepalive: Option<socket2::TcpKeepalive>,
    ) -> H1Client {
        H1Client {
            pool: Arc::new(pool),
            connect_timeout,
            keepalive,
        }
    }

    async fn connect(&self, endpoint: SocketAddr) -> Result<Conn, BoxError> {
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint))
            .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(format!("connect timed out after {:?}", self.connect_timeout).into());
            }
        };
        let _ = stream.set_nodelay(true);
        if let Some(ka) = &self.keepalive
            && let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(ka)
        {
            tracing::debug!(%endpoint, error = %e, "cannot enable TCP keepalive upstream");
        }
        Ok(Conn {
            stream: Arc::new(stream),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(1024),
            endpoint,
        })
    }

    /// Sends `parts` + `body` (origin-form URI) to `sandbox` at `endpoint` and returns
    /// the response head and its body. `host` is written when `parts` has no `Host`.
    /// `spare`: an empty header map the response head may fill (see
    /// [`h1::parse_response`]). Unbounded in time: the caller bounds it
    /// (`proxy.request_timeout`).
    pub async fn send(
        &self,
        parts: &http::request::Parts,
        body: RequestBody,
        sandbox: &SandboxId,
        endpoint: SocketAddr,
        host: &str,
        mut spare: Option<http::HeaderMap>,
    ) -> Result<(ResponseHead, H1Body), H1Error> {
        let head_request = parts.method == Method::HEAD;
        let framing = if body.is_end_stream() {
            RequestFraming::Empty
        } else {
            match body.size_hint().exact() {
                Some(n) => RequestFraming::Length(n),
                None => RequestFraming::Chunked,
            }
        };
        let mut body = (framing != RequestFraming::Empty).then_some(body);
        let declared_trailers = parts.headers.get(http::header::TRAILER).cloned();
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut retried = false;
        loop {
            let (mut conn, reused) = match self.pool.checkout(sandbox, endpoint) {
                Some(conn) => (conn, true),
                None => (
                    self.connect(endpoint).await.map_err(H1Error::Connect)?,
                    false,
                ),
            };
            conn.wbuf.clear();
            h1::encode_request_head(
                &mut conn.wbuf,
                &parts.method,
                target,
                &parts.headers,
                host,
                framing,
            );
            let exchanged = conn
                .exchange(
                    body.take(),
                    framing,
                    head_request,
                    declared_trailers.clone(),
                    &mut spare,
                )
                .await;
            match exchanged {
                Ok((mut head, writer)) => {
                    if writer.is_some() || !rules::reusable_after(&parts.method, head.status) {
                        head.keep_alive = false;
                    }
                    let body = H1Body::new(conn, &head, writer, self.pool.clone(), sandbox.clone());
                    return Ok((head, body));
                }
                Err(fault)
                    if reused
                        && !retried
                        && framing == RequestFraming::Empty
                        && fault.retryable(&parts.method) =>
                {
                    tracing::debug!(%endpoint, ?fault, "reused upstream connection failed; retrying on a new one");
                    retried = true;
                }
                Err(fault) => return Err(fault.into_error()),
            }
        }
    }
}

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the sandbox closes the connection.
    Close,
    Done,
}

/// A response body read from its connection as hyper asks for it; the connection goes
/// back to the pool the moment the last byte is read (when reusable), or is closed.
pub struct H1Body {
    conn: Option<Conn>,
    /// The request body's writer, when it outlived the response head; stopped when this
    /// response ends (or is dropped).
    writer: Option<JoinHandle<()>>,
    state: BodyState,
    keep_alive: bool,
    pool: Arc<H1Pool>,
    sandbox: SandboxId,
}

impl H1Body {
    fn new(
        conn: Conn,
        head: &ResponseHead,
        writer: Option<JoinHandle<()>>,
        pool: Arc<H1Pool>,
        sandbox: SandboxId,
    ) -> H1Body {
        let state = match head.framing {
            Framing::Empty | Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            Framing::Close => BodyState::Close,
        };
        let mut body = H1Body {
            conn: Some(conn),
            writer,
            state,
            keep_alive: head.keep_alive,
            pool,
            sandbox,
        };
        if matches!(body.state, BodyState::Done) {
            body.release();
        }
        body
    }

    /// The body is complete: the connection goes back to the pool if it may be reused
    /// and nothing unasked-for follows the response.
    fn release(&mut self) {
        self.state = BodyState::Done;
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.rbuf.is_empty()
        {
            self.pool.checkin(&self.sandbox, conn);
        }
    }

    fn truncated() -> BoxError {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the sandbox closed the connection before the end of the response body",
        )
        .into()
    }
}

/// Reads what the socket has into the connection's buffer; `Ok(0)` is EOF.
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if conn.rbuf.capacity() - conn.rbuf.len() < 1024 {
        conn.rbuf.reserve(READ_CHUNK);
    }
    loop {
        ready!(conn.stream.poll_read_ready(cx))?;
        match read_drained(&conn.stream, &mut conn.rbuf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if !conn.rbuf.is_empty() {
                        let take = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.rbuf.len());
                        let data = conn.rbuf.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut conn.rbuf) {
                    Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Chunk::Trailers(trailers)) => {
                        this.release();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Chunk::Done) => {
                        this.release();
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::NeedMore) => {}
                    Err(m) => {
                        let endpoint = conn.endpoint;
                        this.conn = None;
                        this.state = BodyState::Done;
                        tracing::warn!(%endpoint, error = %m, "sandbox response body is not valid HTTP");
                        return Poll::Ready(Some(Err(m.into())));
                    }
                },
                BodyState::Close => {
                    if !conn.rbuf.is_empty() {
                        let data = conn.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            // Nothing buffered: read more.
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(poll_fill(conn, cx)) {
                Ok(0) => {
                    let close_delimited = matches!(this.state, BodyState::Close);
                    this.conn = None;
                    this.state = BodyState::Done;
                    return Poll::Ready(if close_delimited {
                        None
                    } else {
                        Some(Err(H1Body::truncated()))
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A close the runtime has not taken from epoll yet: readiness alone misses it (a
    /// connection idle for microseconds is trusted), the peek of a longer-idle one sees it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_idle_connection_is_peeked_and_a_close_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (peer, _) = listener.accept().unwrap();
        let mut conn = Conn {
            stream: Arc::new(stream),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::new(),
            endpoint: addr,
        };
        assert!(conn.still_open(Duration::from_secs(5)), "open and silent");
        drop(peer);
        // Let the FIN reach the socket without yielding to the runtime's I/O driver.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            conn.still_open(Duration::ZERO),
            "freshly idle: readiness is trusted (the close is not processed yet)"
        );
        assert!(
            !conn.still_open(PEEK_AFTER),
            "idle long enough: the peek sees EOF"
        );
    }
}
