//! HTTP/1.1 on the wire, for the upstream leg (see [`super::h1client`]): the request head
//! as written to a sandbox, the response head as parsed (httparse, the parser hyper uses),
//! the response body's framing (RFC 9112 section 6.3) and chunked decoding (section 7.1).
//! Pure: buffers in, values out, no I/O, so every rule is unit-tested here.
//!
//! Bounds (a sandbox runs untrusted code): a response head is at most
//! [`MAX_HEAD_BYTES`] with at most [`MAX_HEADERS`] fields (hyper's default count), a
//! chunk-size line at most [`MAX_CHUNK_LINE`], trailers at most [`MAX_TRAILER_BYTES`].

use bytes::{Bytes, BytesMut};

use super::forward::has_token;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Most header fields in a response head or trailer section (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// Largest response head (status line + fields), in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Bytes from the sandbox that are not a relayable HTTP/1.1 response; the text is for
/// the log only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// How the request body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body bytes (none is written, whatever the method).
    Empty,
    /// `Content-Length: n`, then exactly n bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Appends the request head to `out`: `{method} {target} HTTP/1.1`, the fields of
/// `headers` in order (names as the map holds them, lower-case), `Host` = `host` when the
/// map has none, and the body framing (`Content-Length`/`Transfer-Encoding` are written
/// from `framing`, never copied from the map).
pub fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    host: &str,
    framing: RequestFraming,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(HOST) {
        field(out, b"host", host.as_bytes());
    }
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        RequestFraming::Empty => {
            // A client's explicit `Content-Length: 0` (e.g. an empty POST) is kept: some
            // servers want a length on every request with a body-carrying method.
            if headers.contains_key(CONTENT_LENGTH) {
                field(out, b"content-length", b"0");
            }
        }
        RequestFraming::Length(n) => {
            let digits = itoa_u64(n);
            field(out, b"content-length", digits.as_bytes());
        }
        RequestFraming::Chunked => field(out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
}

/// (name start, name end, value start, value end) of a field, as offsets into its head.
pub type Span = (usize, usize, usize, usize);

/// Runs `f` with this thread's span buffer, emptied. Kept across calls, so a parse neither
/// allocates nor zeroes a [`MAX_HEADERS`]-long array (zeroing two such arrays per head
/// cost more instructions than parsing a small head). Not reentrant: `f` must not parse.
pub fn with_spans<R>(f: impl FnOnce(&mut Vec<Span>) -> R) -> R {
    thread_local! {
        static SPANS: std::cell::RefCell<Vec<Span>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SPANS.with_borrow_mut(|spans| {
        spans.clear();
        f(spans)
    })
}

/// Appends the spans of `fields` (parsed out of the buffer starting at address `base`).
pub fn push_spans(spans: &mut Vec<Span>, base: usize, fields: &[httparse::Header<'_>]) {
    spans.extend(fields.iter().map(|h| {
        let ns = h.name.as_ptr() as usize - base;
        let vs = h.value.as_ptr() as usize - base;
        (ns, ns + h.name.len(), vs, vs + h.value.len())
    }));
}

/// Appends one `name: value` line.
pub fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A u64 in decimal without allocating.
pub struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// `n` in decimal.
pub fn itoa_u64(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

/// Appends the fields of `trailers` that `declared` (the request's `Trailer` value, a
/// comma-separated list of names) lists, one `name: value` line each.
pub fn encode_trailers(out: &mut Vec<u8>, trailers: &HeaderMap, declared: &HeaderValue) {
    let Ok(declared) = declared.to_str() else {
        return;
    };
    for (name, value) in trailers {
        if declared
            .split(',')
            .any(|d| d.trim().eq_ignore_ascii_case(name.as_str()))
        {
            field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Writes one chunk's size line (`{len:x}\r\n`) to `out`.
pub fn chunk_size_line(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD response, 204, 304.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: ... chunked`.
    Chunked,
    /// Neither: the body runs until the sandbox closes the connection.
    Close,
}

/// A parsed response head. The sandbox's HTTP version is not kept: it decides framing and
/// reuse only; the client is answered in the proxy's own version (RFC 9110 section 6.2).
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this response's body is read.
    pub keep_alive: bool,
}

/// Parses a response head from the front of `buf`. `Ok(None)`: incomplete, read more.
/// On success the head's bytes are split off `buf` (field values share them, no copy);
/// what follows (the body's first bytes) stays in `buf`. `head_request`: the request was
/// HEAD, so the response has no body whatever its fields say. `spare`: an empty map to
/// fill (a connection's last one, capacity kept), taken only when a head is complete.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    spare: &mut Option<HeaderMap>,
) -> Result<Option<ResponseHead>, Malformed> {
    with_spans(|spans| parse_response_into(buf, head_request, spare, spans))
}

fn parse_response_into(
    buf: &mut BytesMut,
    head_request: bool,
    spare: &mut Option<HeaderMap>,
    spans: &mut Vec<Span>,
) -> Result<Option<ResponseHead>, Malformed> {
    // Each field's span is taken while httparse borrows the buffer; the values are then
    // sliced out of the frozen head.
    let (len, code, minor) = {
        // Uninitialised: httparse writes the fields it finds (see `with_spans`).
        let mut raw = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            &buf[..],
            &mut raw,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(Malformed("response head too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Malformed("too many response header fields"));
            }
            Err(_) => return Err(Malformed("response head is not HTTP/1.x")),
        };
        if len > MAX_HEAD_BYTES {
            return Err(Malformed("response head too large"));
        }
        push_spans(spans, buf.as_ptr() as usize, resp.headers);
        (len, resp.code.unwrap_or(0), resp.version.unwrap_or(1))
    };
    let count = spans.len();
    let status = StatusCode::from_u16(code).map_err(|_| Malformed("invalid status code"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let head = buf.split_to(len).freeze();
    // Else room for the fields the proxy adds (activation, request ID, date, session
    // cookie) without growing the map.
    let mut headers = spare
        .take()
        .filter(HeaderMap::is_empty)
        .unwrap_or_else(|| HeaderMap::with_capacity(count + 6));
    for &(ns, ne, vs, ve) in spans.iter() {
        let name =
            HeaderName::from_bytes(&head[ns..ne]).map_err(|_| Malformed("invalid field name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| Malformed("invalid field value"))?;
        headers.append(name, value);
    }
    let (framing, mut keep_alive) = framing(&headers, status, version, head_request)?;
    if headers.contains_key(TRANSFER_ENCODING) {
        // Section 6.3, rule 3: an intermediary forwarding such a message removes the
        // received Content-Length first (relayed, it would describe the encoded length).
        headers.remove(CONTENT_LENGTH);
    }
    if version == Version::HTTP_10 || has_token(&headers, CONNECTION, "close") {
        keep_alive = false;
    }
    Ok(Some(ResponseHead {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// RFC 9112 section 6.3, in its order; returns the framing and whether the connection
/// can be reused as far as the framing goes.
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    version: Version,
    head_request: bool,
) -> Result<(Framing, bool), Malformed> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(Malformed("Transfer-Encoding in an HTTP/1.0 response"));
        }
        // Chunked must be the final coding; anything else is delimited by close. With
        // Content-Length as well the message is suspect (smuggling): Transfer-Encoding
        // wins and the connection is not reused (section 6.3, rule 3).
        let reusable = !headers.contains_key(CONTENT_LENGTH);
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => (Framing::Chunked, reusable),
            _ => (Framing::Close, false),
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let text = value
            .to_str()
            .map_err(|_| Malformed("invalid Content-Length"))?;
        // A list of identical values is one length (section 6.3, rule 5).
        for part in text.split(',') {
            let n = parse_length(part.trim()).ok_or(Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Empty, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

/// One `Content-Length` value: decimal digits only (no sign, no spaces), at most 19 of
/// them, so it fits a u64.
pub fn parse_length(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// One step of [`ChunkedDecoder::decode`].
#[derive(Debug, PartialEq)]
pub enum Chunk {
    /// Body bytes (a slice of the read buffer, no copy).
    Data(Bytes),
    /// The trailer section, then the body is over.
    Trailers(HeaderMap),
    /// The body is over (no trailers, or after them).
    Done,
    /// The buffer holds no complete next step: read more.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Decodes a chunked body from a read buffer, consuming what it decodes.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> ChunkedDecoder {
        ChunkedDecoder {
            state: ChunkState::Size,
        }
    }
}

impl ChunkedDecoder {
    /// Has the last chunk and the trailer section been read?
    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes the next step from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Chunk, Malformed> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Chunk::Done),
                ChunkState::Size => {
                    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(Malformed("chunk-size line too long"));
                        }
                        return Ok(Chunk::NeedMore);
                    };
                    if lf > MAX_CHUNK_LINE || lf == 0 || buf[lf - 1] != b'\r' {
                        return Err(Malformed("invalid chunk-size line"));
                    }
                    let size = chunk_size(&buf[..lf - 1])?;
                    let _ = buf.split_to(lf + 1);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Chunk::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Chunk::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => return self.trailers(buf),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Chunk, Malformed> {
        if buf.len() < 2 {
            return Ok(Chunk::NeedMore);
        }
        if &buf[..2] == b"\r\n" {
            let _ = buf.split_to(2);
            self.state = ChunkState::Done;
            return Ok(Chunk::Done);
        }
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > MAX_TRAILER_BYTES {
                return Err(Malformed("trailer section too large"));
            }
            return Ok(Chunk::NeedMore);
        };
        if end + 4 > MAX_TRAILER_BYTES {
            return Err(Malformed("trailer section too large"));
        }
        let section = buf.split_to(end + 4);
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let fields = match httparse::parse_headers(&section, &mut raw) {
            Ok(httparse::Status::Complete((_, fields))) => fields,
            _ => return Err(Malformed("invalid trailer section")),
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for f in fields.iter() {
            let name = HeaderName::from_bytes(f.name.as_bytes())
                .map_err(|_| Malformed("invalid trailer name"))?;
            let value =
                HeaderValue::from_bytes(f.value).map_err(|_| Malformed("invalid trailer value"))?;
            trailers.append(name, value);
        }
        self.state = ChunkState::Done;
        Ok(Chunk::Trailers(trailers))
    }
}

/// The hex size of a chunk-size line (extensions after `;` ignored, as RFC 9112 allows).
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let digits_end = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits_end..];
    let rest_ok = rest.is_empty()
        || rest
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .is_some_and(|i| rest[i] == b';');
    if digits_end == 0 || digits_end > 16 || !rest_ok {
        return Err(Malformed("invalid chunk size"));
    }
    let mut n = 0u64;
    for &b in &line[..digits_end] {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        n = n
            .checked_mul(16)
            .and_then(|n| n.checked_add(u64::from(d)))
            .ok_or(Malformed("chunk size overflows"))?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], head: bool) -> (Result<Option<ResponseHead>, Malformed>, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let r = parse_response(&mut buf, head, &mut None);
        (r, buf)
    }

    fn head(bytes: &[u8]) -> ResponseHead {
        parse(bytes, false).0.unwrap().unwrap()
    }

    #[test]
    fn encodes_a_request_head() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("app.example"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::POST,
            "/p?q=1",
            &h,
            "127.0.0.1:1",
            RequestFraming::Length(12),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: app.example\r\nx-a: 1\r\nx-a: 2\r\n\
             content-length: 12\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::GET,
            "/",
            &HeaderMap::new(),
            "127.0.0.1:9",
            RequestFraming::Empty,
        );
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: 127.0.0.1:9\r\n\r\n");
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::PUT,
            "/",
            &h,
            "x",
            RequestFraming::Chunked,
        );
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        assert!(!out.windows(14).any(|w| w == b"content-length"));
    }

    #[test]
    fn encodes_only_declared_trailers() {
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("42"));
        t.insert("x-other", HeaderValue::from_static("no"));
        let mut out = Vec::new();
        encode_trailers(&mut out, &t, &HeaderValue::from_static("X-Sum, x-more"));
        assert_eq!(out, b"x-sum: 42\r\n");
    }

    #[test]
    fn numbers_without_allocating() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            assert_eq!(itoa_u64(n).as_bytes(), n.to_string().as_bytes());
        }
        for n in [0usize, 1, 15, 16, 255, 4096, 0xdead_beef] {
            let mut out = Vec::new();
            chunk_size_line(&mut out, n);
            assert_eq!(out, format!("{n:x}\r\n").as_bytes());
        }
    }

    #[test]
    fn parses_a_head_and_leaves_the_body() {
        let (r, rest) = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Y: a b\r\n\r\nhello+next",
            false,
        );
        let h = r.unwrap().unwrap();
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.headers["x-y"], "a b");
        assert_eq!(&rest[..], b"hello+next");
    }

    #[test]
    fn incomplete_heads_ask_for_more_and_huge_ones_fail() {
        let partial = b"HTTP/1.1 200 OK\r\nContent-Len";
        let (r, rest) = parse(partial, false);
        assert!(r.unwrap().is_none());
        assert_eq!(&rest[..], partial, "nothing consumed");
        let mut big = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(
            parse(&big, false).0.unwrap_err(),
            Malformed("response head too large")
        );
        assert!(parse(b"HELLO\r\n\r\n", false).0.is_err());
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&many, false).0.unwrap_err(),
            Malformed("too many response header fields")
        );
    }

    #[test]
    fn content_length_beside_transfer_encoding_is_not_relayed() {
        let h = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.headers.contains_key(CONTENT_LENGTH));
        assert!(h.headers.contains_key(TRANSFER_ENCODING));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        // (response, HEAD request?, framing, keep-alive)
        let rows: &[(&[u8], bool, Framing, bool)] = &[
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n",
                true,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
                false,
                Framing::Chunked,
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                false,
                Framing::Close,
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n",
                false,
                Framing::Length(7),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", false, Framing::Close, false),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: Close\r\n\r\n",
                false,
                Framing::Length(2),
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n",
                false,
                Framing::Length(2),
                false,
            ),
        ];
        for (i, (bytes, head_req, framing, keep)) in rows.iter().enumerate() {
            let h = parse(bytes, *head_req).0.unwrap().unwrap();
            assert_eq!((h.framing, h.keep_alive), (*framing, *keep), "row {i}");
        }
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse(bad, false).0.is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n").headers[CONTENT_LENGTH],
            "2"
        );
    }

    fn decode_all(dec: &mut ChunkedDecoder, buf: &mut BytesMut) -> (Vec<u8>, Option<HeaderMap>) {
        let mut body = Vec::new();
        let mut trailers = None;
        loop {
            match dec.decode(buf).unwrap() {
                Chunk::Data(d) => body.extend_from_slice(&d),
                Chunk::Trailers(t) => trailers = Some(t),
                Chunk::Done => return (body, trailers),
                Chunk::NeedMore => panic!("needs more"),
            }
        }
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers() {
        let mut buf = BytesMut::from(
            &b"5;ext=1\r\nhello\r\nA \t; x\r\n0123456789\r\n0\r\nx-sum: 7\r\nx-b: 2\r\n\r\nNEXT"[..],
        );
        let mut dec = ChunkedDecoder::default();
        let (body, trailers) = decode_all(&mut dec, &mut buf);
        assert_eq!(body, b"hello0123456789");
        let t = trailers.unwrap();
        assert_eq!(t["x-sum"], "7");
        assert_eq!(t["x-b"], "2");
        assert!(dec.is_done());
        assert_eq!(&buf[..], b"NEXT");

        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\n"[..]);
        let mut dec = ChunkedDecoder::default();
        assert_eq!(decode_all(&mut dec, &mut buf), (b"abc".to_vec(), None));
        assert!(buf.is_empty());
    }

    #[test]
    fn chunked_input_may_arrive_one_byte_at_a_time() {
        let wire = b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nx: 1\r\n\r\n";
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut trailers = None;
        for &b in wire {
            buf.extend_from_slice(&[b]);
            loop {
                match dec.decode(&mut buf).unwrap() {
                    Chunk::Data(d) => body.extend_from_slice(&d),
                    Chunk::Trailers(t) => trailers = Some(t),
                    Chunk::Done | Chunk::NeedMore => break,
                }
            }
        }
        assert_eq!(body, b"wikipedia");
        assert_eq!(trailers.unwrap()["x"], "1");
        assert!(dec.is_done());
    }

    #[test]
    fn rejects_bad_chunking() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello",
            b"\r\n",
            b"11111111111111111\r\n",
            b"3\r\nabcX\r\n",
            b"3 x\r\nabc\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            let mut dec = ChunkedDecoder::default();
            let mut failed = false;
            for _ in 0..4 {
                match dec.decode(&mut buf) {
                    Err(_) => {
                        failed = true;
                        break;
                    }
                    Ok(Chunk::NeedMore | Chunk::Done) => break,
                    Ok(_) => {}
                }
            }
            assert!(failed, "{}", String::from_utf8_lossy(bad));
        }
        let mut long = BytesMut::from(&b"1;"[..]);
        long.resize(MAX_CHUNK_LINE + 2, b'a');
        assert!(ChunkedDecoder::default().decode(&mut long).is_err());
        assert_eq!(chunk_size(b"ffffffffffffffff").unwrap(), u64::MAX);
    }
}
