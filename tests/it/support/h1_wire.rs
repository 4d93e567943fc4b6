//! Byte-exact HTTP/1.1 over raw sockets for tests: [`Wire`] reads messages (head, then body
//! by its framing) off a `TcpStream`, and [`ScriptedSandbox`] is a TCP listener that records
//! every request exactly as received and answers exactly the bytes a test scripts.
//!
//! Heads are parsed with `httparse` (the parser hyper itself uses), so a malformed head
//! from the proxy fails the test instead of being read leniently.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_activator::lock::MutexExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Most headers a head may carry here (the sandbox's and the raw client's parser).
const MAX_HEADERS: usize = 128;

// === messages ===

/// One parsed message head.
#[derive(Debug, Clone)]
pub struct Head {
    /// The head's bytes as received, through the blank line.
    pub raw: Vec<u8>,
    /// Request line or status line, without CRLF.
    pub start_line: String,
    /// Status code of a response head (0 for a request).
    pub status: u16,
    /// Header fields in received order, names lower-cased, values as sent.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `name` is present at all.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The request method (first word of the request line).
    pub fn method(&self) -> &str {
        self.start_line.split(' ').next().unwrap_or("")
    }

    fn chunked(&self) -> bool {
        let name = "transfer-encoding";
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .next_back()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length")
            .map(|v| v.trim().parse().expect("a numeric Content-Length"))
    }
}

/// How a message body is delimited on the wire (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(usize),
    Chunked,
    /// Read until the peer closes (responses only).
    Close,
}

/// The framing of a request body: chunked, a length, or none.
pub fn request_framing(head: &Head) -> Framing {
    if head.chunked() {
        Framing::Chunked
    } else {
        match head.content_length() {
            Some(n) => Framing::Length(n),
            None => Framing::Empty,
        }
    }
}

/// The framing of a response to a `method` request.
pub fn response_framing(head: &Head, method: &str) -> Framing {
    let no_body = method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304;
    if no_body {
        Framing::Empty
    } else if head.chunked() {
        Framing::Chunked
    } else {
        match head.content_length() {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    }
}

/// A body as read off the wire.
#[derive(Debug, Clone, Default)]
pub struct Body {
    /// The bytes on the wire (chunk framing included).
    pub raw: Vec<u8>,
    /// The payload (chunk framing removed).
    pub data: Vec<u8>,
    /// Trailer fields of a chunked body, names lower-cased.
    pub trailers: Vec<(String, String)>,
    /// Chunk extensions as sent (`;name=value`), one per chunk that had any.
    pub extensions: Vec<String>,
}

/// One response read by a raw client.
#[derive(Debug)]
pub struct RawResponse {
    /// Interim (1xx) heads received before the final one.
    pub interim: Vec<Head>,
    pub head: Head,
    pub framing: Framing,
    pub body: Body,
}

// === reading ===

/// A byte stream with a read buffer, read message by message.
pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> Wire {
        Wire::new(TcpStream::connect(addr).await.expect("connect"))
    }

    /// Bytes read but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads more bytes into the buffer; 0 at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let rest = self.buf.split_off(n);
        std::mem::replace(&mut self.buf, rest)
    }

    /// Reads through the next CRLF (the line, CRLF included).
    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.take(at + 2));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads one head through its blank line. `Ok(None)`: the stream ended cleanly before
    /// any byte of it.
    pub async fn read_head_bytes(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(Some(self.take(at + 4)));
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// Reads and parses a request head (`Ok(None)` at a clean end of stream).
    pub async fn read_request_head(&mut self) -> io::Result<Option<Head>> {
        let Some(raw) = self.read_head_bytes().await? else {
            return Ok(None);
        };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&raw) {
            Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
            other => {
                return Err(io::Error::other(format!(
                    "malformed request head ({other:?}): {:?}",
                    String::from_utf8_lossy(&raw)
                )));
            }
        }
        let fields = fields(req.headers);
        Ok(Some(Head {
            start_line: start_line(&raw),
            status: 0,
            headers: fields,
            raw,
        }))
    }

    /// Reads and parses a response head.
    pub async fn read_response_head(&mut self) -> io::Result<Head> {
        let raw = self
            .read_head_bytes()
            .await?
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&raw) {
            Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
            other => {
                return Err(io::Error::other(format!(
                    "malformed response head ({other:?}): {:?}",
                    String::from_utf8_lossy(&raw)
                )));
            }
        }
        let status = resp.code.expect("a complete head has a status");
        Ok(Head {
            start_line: start_line(&raw),
            status,
            headers: fields(resp.headers),
            raw,
        })
    }

    /// Reads a body of the given framing.
    pub async fn read_body(&mut self, framing: Framing) -> io::Result<Body> {
        match framing {
            Framing::Empty => Ok(Body::default()),
            Framing::Length(n) => {
                while self.buf.len() < n {
                    if self.fill().await? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("body ended after {} of {n} bytes", self.buf.len()),
                        ));
                    }
                }
                let data = self.take(n);
                Ok(Body {
                    raw: data.clone(),
                    data,
                    ..Body::default()
                })
            }
            Framing::Chunked => self.read_chunked().await,
            Framing::Close => {
                while self.fill().await? > 0 {}
                let data = std::mem::take(&mut self.buf);
                Ok(Body {
                    raw: data.clone(),
                    data,
                    ..Body::default()
                })
            }
        }
    }

    async fn read_chunked(&mut self) -> io::Result<Body> {
        let mut body = Body::default();
        loop {
            let line = self.line().await?;
            body.raw.extend_from_slice(&line);
            let size = match httparse::parse_chunk_size(&line) {
                Ok(httparse::Status::Complete((_, size))) => size as usize,
                _ => {
                    return Err(io::Error::other(format!(
                        "malformed chunk size line {:?}",
                        String::from_utf8_lossy(&line)
                    )));
                }
            };
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            if let Some(at) = text.find(';') {
                body.extensions.push(text[at..].to_owned());
            }
            if size == 0 {
                break;
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            let chunk = self.take(size + 2);
            if &chunk[size..] != b"\r\n" {
                return Err(io::Error::other("chunk data not followed by CRLF"));
            }
            body.raw.extend_from_slice(&chunk);
            body.data.extend_from_slice(&chunk[..size]);
        }
        // Trailer section: fields until an empty line.
        loop {
            let line = self.line().await?;
            body.raw.extend_from_slice(&line);
            if line == b"\r\n" {
                return Ok(body);
            }
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let (name, value) = text
                .split_once(':')
                .ok_or_else(|| io::Error::other(format!("malformed trailer {text:?}")))?;
            body.trailers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }

    /// Reads one response to a `method` request: interim 1xx heads, the final head and
    /// its body.
    pub async fn read_response(&mut self, method: &str) -> io::Result<RawResponse> {
        let mut interim = Vec::new();
        loop {
            let head = self.read_response_head().await?;
            if (100..200).contains(&head.status) && head.status != 101 {
                interim.push(head);
                continue;
            }
            let framing = response_framing(&head, method);
            let body = self.read_body(framing).await?;
            return Ok(RawResponse {
                interim,
                head,
                framing,
                body,
            });
        }
    }

    /// Reads until the peer closes; returns what came (an error such as a reset too).
    pub async fn read_until_closed(&mut self) -> io::Result<Vec<u8>> {
        while self.fill().await? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }
}

fn start_line(raw: &[u8]) -> String {
    let end = raw
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn fields(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

// === scripted sandbox ===

/// One request as the sandbox received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which accepted connection (0-based) it came on.
    pub conn: usize,
    pub head: Head,
    pub body: Body,
    /// Bytes that had already arrived after the request when it was complete (a correct
    /// client sends nothing more before the response).
    pub extra: Vec<u8>,
}

impl Received {
    /// `x-session-id` as received (empty if none).
    pub fn session(&self) -> &str {
        self.head.get("x-session-id").unwrap_or("")
    }

    /// The request target of the request line.
    pub fn target(&self) -> &str {
        self.head.start_line.split(' ').nth(1).unwrap_or("")
    }
}

/// What the sandbox does after receiving a request.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait this long.
    Pause(Duration),
    /// Wait until the test calls [`ScriptedSandbox::release`].
    AwaitRelease,
    /// Read the request body now (only for a sandbox started with
    /// [`ScriptedSandbox::start_on_head`]), recording it in the request's [`Received`].
    ReadBody,
    /// Record this mark in [`Log::marks`] (to wait for a point in the script).
    Mark(&'static str),
    /// Close the connection (after the steps before it).
    Close,
    /// Never answer: keep the connection open, recording any bytes that still arrive,
    /// until the peer closes it.
    Hang,
}

/// What the sandbox has seen so far.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Connections accepted.
    pub accepted: usize,
    /// Every request, in order of arrival.
    pub requests: Vec<Received>,
    /// Connections the peer (the proxy) closed, by index.
    pub closed_by_peer: Vec<usize>,
    /// Connections the sandbox closed ([`Step::Close`]), by index.
    pub closed_by_sandbox: Vec<usize>,
    /// Bytes that arrived on a connection after the sandbox stopped answering on it (a
    /// [`Step::Hang`]), by connection index.
    pub late: Vec<(usize, Vec<u8>)>,
    /// [`Step::Mark`]s reached, with their connection.
    pub marks: Vec<(usize, &'static str)>,
}

impl Log {
    /// Whether [`Step::Mark`] `mark` was reached.
    pub fn marked(&self, mark: &str) -> bool {
        self.marks.iter().any(|(_, m)| *m == mark)
    }

    /// Requests whose target is `target`.
    pub fn count(&self, target: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.target() == target)
            .count()
    }
}

type Script = dyn Fn(&Received, usize) -> Vec<Step> + Send + Sync;

struct Shared {
    log: Mutex<Log>,
    changed: Notify,
    release: Semaphore,
    script: Box<Script>,
    /// Run the script as soon as a head arrives (the body is read by [`Step::ReadBody`]).
    on_head: bool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Log)) {
        f(&mut self.log.lock_recovered());
        self.changed.notify_waiters();
    }
}

/// A TCP listener on 127.0.0.1 that speaks HTTP/1.1 as scripted: for each request it
/// reads (head, then body by its framing) it records a [`Received`] and runs the steps
/// `script(&request, index)` returns (`index`: 0-based over every connection).
pub struct ScriptedSandbox {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for ScriptedSandbox {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet): aborting it ends them.
        self.task.abort();
    }
}

impl ScriptedSandbox {
    pub async fn start(
        script: impl Fn(&Received, usize) -> Vec<Step> + Send + Sync + 'static,
    ) -> ScriptedSandbox {
        ScriptedSandbox::launch(Box::new(script), false).await
    }

    /// Like [`ScriptedSandbox::start`], but the script runs as soon as a request head has
    /// arrived, before its body (an early answer, or a body read later with
    /// [`Step::ReadBody`]); a script that leaves the body unread must end the connection.
    pub async fn start_on_head(
        script: impl Fn(&Received, usize) -> Vec<Step> + Send + Sync + 'static,
    ) -> ScriptedSandbox {
        ScriptedSandbox::launch(Box::new(script), true).await
    }

    async fn launch(script: Box<Script>, on_head: bool) -> ScriptedSandbox {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            log: Mutex::new(Log::default()),
            changed: Notify::new(),
            release: Semaphore::new(0),
            script,
            on_head,
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        // Every scripted write goes out at once: with Nagle a small write
                        // behind an unacknowledged one waits for the peer's next segment,
                        // and would reach the proxy after, not before, its next request.
                        let _ = stream.set_nodelay(true);
                        let mut index = 0;
                        accept_shared.update(|log| {
                            index = log.accepted;
                            log.accepted += 1;
                        });
                        conns.spawn(serve(accept_shared.clone(), index, Wire::new(stream)));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        ScriptedSandbox { addr, shared, task }
    }

    /// A copy of the log.
    pub fn log(&self) -> Log {
        self.shared.log.lock_recovered().clone()
    }

    pub fn accepted(&self) -> usize {
        self.shared.log.lock_recovered().accepted
    }

    pub fn requests(&self) -> Vec<Received> {
        self.shared.log.lock_recovered().requests.clone()
    }

    /// Lets one [`Step::AwaitRelease`] proceed (now or when it is reached).
    pub fn release(&self) {
        self.shared.release.add_permits(1);
    }

    /// Waits (at most `bound`) until `cond` holds on the log; woken by every change, no
    /// polling.
    pub async fn wait_for(&self, what: &str, bound: Duration, cond: impl Fn(&Log) -> bool) {
        let waited = tokio::time::timeout(bound, async {
            loop {
                let notified = self.shared.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if cond(&self.shared.log.lock_recovered()) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "timed out waiting for {what}; sandbox log: {:#?}",
                self.log()
            );
        }
    }
}

async fn serve(shared: Arc<Shared>, conn: usize, mut wire: Wire) {
    loop {
        let head = match wire.read_request_head().await {
            Ok(Some(head)) => head,
            Ok(None) | Err(_) => {
                shared.update(|log| log.closed_by_peer.push(conn));
                return;
            }
        };
        let body = if shared.on_head {
            Body::default()
        } else {
            let Ok(body) = wire.read_body(request_framing(&head)).await else {
                shared.update(|log| log.closed_by_peer.push(conn));
                return;
            };
            body
        };
        let received = Received {
            conn,
            head,
            body,
            extra: wire.buffered().to_vec(),
        };
        let mut index = 0;
        shared.update(|log| {
            index = log.requests.len();
            log.requests.push(received.clone());
        });
        for step in (shared.script)(&received, index) {
            match step {
                Step::ReadBody => {
                    let Ok(body) = wire.read_body(request_framing(&received.head)).await else {
                        shared.update(|log| log.closed_by_peer.push(conn));
                        return;
                    };
                    shared.update(|log| log.requests[index].body = body);
                }
                Step::Send(bytes) => {
                    if wire.write(&bytes).await.is_err() {
                        shared.update(|log| log.closed_by_peer.push(conn));
                        return;
                    }
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Mark(mark) => shared.update(|log| log.marks.push((conn, mark))),
                Step::AwaitRelease => shared
                    .release
                    .acquire()
                    .await
                    .expect("never closed")
                    .forget(),
                Step::Close => {
                    let _ = wire.stream.shutdown().await;
                    drop(wire);
                    shared.update(|log| log.closed_by_sandbox.push(conn));
                    return;
                }
                Step::Hang => {
                    let mut late = wire.buffered().to_vec();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match wire.stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => late.extend_from_slice(&chunk[..n]),
                        }
                    }
                    shared.update(|log| {
                        if !late.is_empty() {
                            log.late.push((conn, late));
                        }
                        log.closed_by_peer.push(conn);
                    });
                    return;
                }
            }
        }
    }
}

/// `HTTP/1.1 200 OK` with a `Content-Length` body.
pub fn ok(body: &[u8]) -> Vec<u8> {
    let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    v.extend_from_slice(body);
    v
}

/// `HTTP/1.1 200 OK`, chunked, one chunk per element of `chunks`.
pub fn ok_chunked(chunks: &[&[u8]]) -> Vec<u8> {
    let mut v = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for c in chunks {
        v.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        v.extend_from_slice(c);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}
