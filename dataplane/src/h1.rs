//! fleetlb's own HTTP/1.1 upstream client, for the common request: no body, no upgrade.
//!
//! Through hyper-util's pooled client every request crossed three tasks (the client
//! connection's, the upstream connection's and a pool-return task) over channels, and took a
//! pool lock keyed by a hashed URI. Here the client connection's own task writes the request
//! and reads the response over a keep-alive connection taken from the endpoint's idle list for
//! this thread: no cross-thread lock, no channel, no extra task. A response whose body came
//! with its head (the usual small answer) gives its connection back before it is even handed to
//! the client. Requests with a body, and upgrades, still go through hyper's client, which can
//! stream a body upstream while reading an early answer.
//!
//! Framing follows RFC 9112 section 6.3: no body for HEAD, 1xx, 204 and 304; `Transfer-Encoding:
//! chunked` (decoded here, re-framed by the server side); `Content-Length`; else until close. A
//! connection goes back to the pool only after a complete HTTP/1.1 response without
//! `Connection: close`. Anything malformed is an error (a 502 to the client), never a guess.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Most header lines in an upstream response head.
const MAX_HEADERS: usize = 100;
/// Largest upstream response head.
const MAX_HEAD: usize = 64 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;
/// Most idle connections kept per endpoint and thread.
const MAX_IDLE: usize = 256;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("upstream closed the connection before answering")]
    Closed,
    #[error("upstream i/o: {0}")]
    Io(#[source] io::Error),
    #[error("malformed upstream response: {0}")]
    Protocol(&'static str),
}

impl Error {
    /// Nothing reached the upstream: safe to try another endpoint for any request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_) | Error::ConnectTimeout)
    }

    /// The endpoint actively refused the connection (nothing listens there).
    pub fn is_refused(&self) -> bool {
        matches!(self, Error::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }
}

/// An idle keep-alive connection and its buffer.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
    idle_since: Instant,
}

impl Conn {
    /// Fit for another request: idle for less than `max_idle` and still open.
    fn reusable(&self, max_idle: Duration) -> bool {
        self.idle_since.elapsed() < max_idle && self.alive()
    }

    /// Reads what the socket has into the buffer (at least `READ_CHUNK` of room); 0 at EOF.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// True unless the peer closed (or wrote to) this idle connection. Costs no system call for
    /// a quiet connection: its read readiness was cleared by the short read that ended its last
    /// response, and only a new event (a FIN, a reset) sets it again.
    fn alive(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Poll::Ready(Err(_)) => false,
        }
    }
}

/// An endpoint's idle connections, one list per shard (proxy thread), so threads never wait on
/// each other; a thread only ever locks its own, uncontended, list.
pub(crate) struct Pool {
    shards: Box<[Mutex<Vec<Conn>>]>,
}

static SHARDS: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| std::thread::available_parallelism().map_or(4, |n| n.get()));
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Relaxed);
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            shards: (0..*SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }
}

impl Pool {
    fn shard(&self) -> &Mutex<Vec<Conn>> {
        &self.shards[SHARD.with(|s| *s) % self.shards.len()]
    }

    /// The most recently used live connection idle for less than `max_idle`.
    fn take(&self, max_idle: Duration) -> Option<Conn> {
        let mut idle = self.shard().lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.reusable(max_idle) {
                return Some(c);
            }
        }
        None
    }

    fn give_back(&self, mut c: Conn) {
        c.idle_since = Instant::now();
        // A buffer grown by an outsized head is not kept for the connection's idle life.
        if c.buf.capacity() > 4 * READ_CHUNK {
            c.buf = BytesMut::with_capacity(READ_CHUNK);
        }
        let mut idle = self.shard().lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(c);
    }

    /// Closes idle connections older than `max_idle` or closed by the peer, in every shard.
    pub fn expire(&self, max_idle: Duration) {
        for shard in &self.shards {
            let mut idle = shard.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| c.reusable(max_idle));
        }
    }
}

/// What is sent upstream: the request line and headers (already prepared by the proxy).
pub(crate) struct Head<'a> {
    pub method: &'a Method,
    pub path: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
    pub authority: &'a str,
}

/// Connection settings.
#[derive(Clone, Copy)]
pub(crate) struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// A response head from upstream.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Body,
}

/// Sends `head` (a request without a body) to `addr` and reads the response head. A pooled
/// connection the upstream had closed meanwhile (the keep-alive race) is retried once on a
/// new connection when nothing came back, for idempotent methods, or when the request could
/// not even be written.
pub(crate) async fn send(
    pool: &Pool,
    addr: SocketAddr,
    head: &Head<'_>,
    settings: Settings,
    idempotent: bool,
) -> Result<Answer, Error> {
    if let Some(conn) = pool.take(settings.idle_timeout) {
        match exchange(pool, conn, head).await {
            Err(Failure::Unanswered { written, err }) if idempotent || !written => {
                tracing::trace!(%addr, ?err, "pooled connection was closed; reconnecting");
            }
            Err(f) => return Err(f.into()),
            Ok(a) => return Ok(a),
        }
    }
    let conn = connect(addr, settings.connect_timeout).await?;
    exchange(pool, conn, head).await.map_err(Error::from)
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Error> {
    let io = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return Err(Error::Connect(e)),
        Err(_) => return Err(Error::ConnectTimeout),
    };
    io.set_nodelay(true).map_err(Error::Connect)?;
    Ok(Conn {
        io,
        buf: BytesMut::with_capacity(READ_CHUNK),
        idle_since: Instant::now(),
    })
}

enum Failure {
    /// No response byte arrived; `written` says whether the whole request was written.
    Unanswered {
        written: bool,
        err: Error,
    },
    Other(Error),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Unanswered { err, .. } | Failure::Other(err) => err,
        }
    }
}

/// Serialises a request head: request line, the headers as given, `Host` when missing.
fn encode(head: &Head<'_>, out: &mut BytesMut) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(head.path.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !head.headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(head.authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if matches!(*head.method, Method::POST | Method::PUT | Method::PATCH)
        && !head.headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

async fn exchange(pool: &Pool, mut c: Conn, head: &Head<'_>) -> Result<Answer, Failure> {
    c.buf.clear();
    encode(head, &mut c.buf);
    if let Err(e) = c.io.write_all(&c.buf).await {
        return Err(Failure::Unanswered {
            written: false,
            err: Error::Io(e),
        });
    }
    c.buf.clear();
    loop {
        match std::future::poll_fn(|cx| c.poll_read(cx)).await {
            Ok(0) if c.buf.is_empty() => {
                return Err(Failure::Unanswered {
                    written: true,
                    err: Error::Closed,
                });
            }
            Ok(0) => return Err(Failure::Other(Error::Protocol("closed inside the head"))),
            Ok(_) => {}
            Err(e) if c.buf.is_empty() => {
                return Err(Failure::Unanswered {
                    written: true,
                    err: Error::Io(e),
                });
            }
            Err(e) => return Err(Failure::Other(Error::Io(e))),
        }
        // A buffer may hold interim (1xx) heads before the final one.
        while !c.buf.is_empty() {
            match parse(&mut c.buf, head.method == Method::HEAD).map_err(Failure::Other)? {
                Parsed::Partial => {
                    if c.buf.len() > MAX_HEAD {
                        return Err(Failure::Other(Error::Protocol("head too large")));
                    }
                    break;
                }
                Parsed::Interim => {}
                Parsed::Final(mut answer) => {
                    answer.body.start(c, pool);
                    return Ok(answer);
                }
            }
        }
    }
}

#[allow(clippy::large_enum_variant)] // a transient on the stack, never stored
enum Parsed {
    Partial,
    /// A 1xx head, consumed and skipped.
    Interim,
    /// The final head, consumed, and its body framing.
    Final(Answer),
}

/// Parses the head at the start of `buf`, consuming it when complete. The final head's header
/// values are slices of the connection buffer (no copy); its map is a recycled one when this
/// thread has one.
fn parse(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, Error> {
    // Where each header's name and value sit in `buf`, so the parser's borrow can end before
    // the head is split off.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, http11, count) = {
        // Left uninitialised: the parser writes the slots it uses (3 KiB not zeroed per answer).
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Ok(httparse::Status::Complete(len)) => len,
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Protocol("too many headers"));
            }
            Err(_) => return Err(Error::Protocol("bad head")),
        };
        let base = buf.as_ptr() as usize;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            // A head is at most a few tens of KiB (`MAX_HEAD`): offsets fit in u32.
            *span = (
                name as u32,
                h.name.len() as u32,
                value as u32,
                h.value.len() as u32,
            );
        }
        (
            len,
            resp.code.unwrap_or(0),
            resp.version == Some(1),
            resp.headers.len(),
        )
    };
    if (100..200).contains(&code) {
        // 101 is only valid in answer to an upgrade, which never takes this path.
        if code == 101 {
            return Err(Error::Protocol("unasked protocol switch"));
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let status = StatusCode::from_u16(code).map_err(|_| Error::Protocol("bad status"))?;
    let raw = buf.split_to(len).freeze();
    let mut headers = spare_map(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut close = !http11;
    for &(n_at, n_len, v_at, v_len) in &spans[..count] {
        let (n_at, n_len, v_at, v_len) =
            (n_at as usize, n_len as usize, v_at as usize, v_len as usize);
        let name = HeaderName::from_bytes(&raw[n_at..n_at + n_len])
            .map_err(|_| Error::Protocol("bad name"))?;
        let bytes = &raw[v_at..v_at + v_len];
        let value = HeaderValue::from_maybe_shared(raw.slice(v_at..v_at + v_len))
            .map_err(|_| Error::Protocol("bad value"))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(bytes)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Error::Protocol("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Protocol("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            for coding in bytes.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else if !coding.is_empty() {
                    other_coding = true;
                }
            }
        } else if name == header::CONNECTION {
            close |= bytes
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        headers.append(name, value);
    }
    let framing = if head_request || code == 204 || code == 304 {
        Framing::Length(0)
    } else if chunked || other_coding {
        if other_coding {
            // A transfer coding fleetlb cannot undo could not be forwarded faithfully.
            return Err(Error::Protocol("unsupported transfer-encoding"));
        }
        // Transfer-Encoding wins over Content-Length (RFC 9112 6.3), which must not travel on.
        headers.remove(header::CONTENT_LENGTH);
        Framing::Chunked(Chunked::default())
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::Close
    };
    Ok(Parsed::Final(Answer {
        status,
        headers,
        body: Body {
            conn: None,
            framing,
            reuse: !close,
            failed: None,
        },
    }))
}

thread_local! {
    /// Header maps of finished requests, reused for the next answers parsed on this thread.
    static SPARE_MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most header maps kept for reuse per thread.
const MAX_SPARE_MAPS: usize = 64;

/// Gives a request's header map back once it was sent and answered, so the next answer's
/// headers reuse its allocation instead of making one.
pub(crate) fn recycle(mut map: HeaderMap) {
    map.clear();
    SPARE_MAPS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX_SPARE_MAPS {
            s.push(map);
        }
    });
}

fn spare_map(n: usize) -> HeaderMap {
    match SPARE_MAPS.with(|s| s.borrow_mut().pop()) {
        Some(mut m) => {
            m.reserve(n);
            m
        }
        None => HeaderMap::with_capacity(n),
    }
}

enum Framing {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// A response body read from the upstream connection as the client takes it. When the body
/// ends cleanly on a reusable connection, the connection returns to its pool.
pub(crate) struct Body {
    conn: Option<Conn>,
    framing: Framing,
    reuse: bool,
    /// A failure reported on the next poll, once the bytes before it have been flushed to the
    /// client (the server side only flushes when the body is pending).
    failed: Option<Error>,
}

impl Body {
    /// Attaches the connection; gives it straight back when the body is already complete.
    fn start(&mut self, conn: Conn, pool: &Pool) {
        self.conn = Some(conn);
        if let Framing::Length(0) = self.framing {
            self.finish(pool);
        }
    }

    fn finish(&mut self, pool: &Pool) {
        self.framing = Framing::Done;
        if let Some(c) = self.conn.take()
            && self.reuse
            && c.buf.is_empty()
        {
            pool.give_back(c);
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.failed.is_none() && matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(n) => http_body::SizeHint::with_exact(n),
            Framing::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }

    /// Next chunk of the body; `pool` takes the connection back at the end.
    pub fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
        pool: &Pool,
    ) -> Poll<Option<Result<Bytes, Error>>> {
        if let Some(err) = self.failed.take() {
            return Poll::Ready(Some(Err(err)));
        }
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    self.finish(pool);
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !c.buf.is_empty() {
                        let n = (*left).min(c.buf.len() as u64) as usize;
                        let data = c.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            self.finish(pool);
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Framing::Chunked(dec) => match dec.decode(&mut c.buf) {
                    Err(e) => return Poll::Ready(Some(Err(Error::Protocol(e)))),
                    Ok(Some(Step::Data(data))) => return Poll::Ready(Some(Ok(data))),
                    Ok(Some(Step::End)) => {
                        self.finish(pool);
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                },
                Framing::Close => {
                    if !c.buf.is_empty() {
                        return Poll::Ready(Some(Ok(c.buf.split().freeze())));
                    }
                }
            }
            match ready!(c.poll_read(cx)) {
                Ok(0) if matches!(self.framing, Framing::Close) => {
                    self.framing = Framing::Done;
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => self.failed = Some(Error::Protocol("body cut short")),
                Err(e) => self.failed = Some(Error::Io(e)),
                Ok(_) => continue,
            }
            self.conn = None;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }
}

/// One decoding step of a chunked body.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    Data(Bytes),
    End,
}

/// Chunked transfer-coding decoder (RFC 9112 section 7.1), strict: CRLF line ends, hex sizes
/// that fit 64 bits, bounded size lines and trailers.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Default)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Longest chunk-size line (size plus extensions).
const MAX_SIZE_LINE: usize = 4096;
/// Most trailer bytes.
const MAX_TRAILERS: usize = 16 * 1024;

impl Chunked {
    /// Consumes what it can from `buf`: `Ok(None)` means more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, &'static str> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(eol) = find_crlf(buf)? else {
                        return if buf.len() > MAX_SIZE_LINE {
                            Err("chunk size line too long")
                        } else {
                            Ok(None)
                        };
                    };
                    let line = &buf[..eol];
                    let digits = line
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    if digits == 0 || digits > 16 {
                        return Err("bad chunk size");
                    }
                    match line[digits..].first() {
                        None | Some(b';') => {}
                        Some(b' ' | b'\t') if line[digits..].trim_ascii().starts_with(b";") => {}
                        Some(_) => return Err("bad chunk size"),
                    }
                    let size = line[..digits].iter().fold(0u64, |n, &b| {
                        (n << 4) | u64::from((b as char).to_digit(16).unwrap_or(0))
                    });
                    buf.advance(eol + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = left.min(buf.len() as u64) as usize;
                    let data = buf.split_to(n).freeze();
                    self.state = if left == n as u64 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Some(Step::Data(data)));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk not followed by CRLF");
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(eol) = find_crlf(buf)? else {
                        return if self.trailer_bytes + buf.len() > MAX_TRAILERS {
                            Err("trailers too long")
                        } else {
                            Ok(None)
                        };
                    };
                    self.trailer_bytes += eol + 2;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err("trailers too long");
                    }
                    buf.advance(eol + 2);
                    if eol == 0 {
                        self.state = ChunkState::Done;
                        return Ok(Some(Step::End));
                    }
                }
                ChunkState::Done => return Ok(Some(Step::End)),
            }
        }
    }
}

/// Where the first line ends (its CR), if the line is complete; a bare LF is an error.
fn find_crlf(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    match buf.iter().position(|&b| b == b'\n') {
        None => Ok(None),
        Some(lf) if lf > 0 && buf[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err("bare LF in chunked framing"),
    }
}

/// For the fuzzer (`fuzz/fuzz_targets/upstream_response.rs`): frames `data` as an upstream
/// answer the way `exchange` and `Body` do; the final status and the decoded body, or `None`
/// when the answer is rejected or incomplete.
#[doc(hidden)]
pub fn frame_response(data: &[u8], head_request: bool) -> Option<(u16, Vec<u8>)> {
    let mut buf = BytesMut::from(data);
    loop {
        match parse(&mut buf, head_request).ok()? {
            Parsed::Partial => return None,
            Parsed::Interim => {}
            Parsed::Final(answer) => {
                let mut out = Vec::new();
                match answer.body.framing {
                    Framing::Length(n) => {
                        let n = n.min(buf.len() as u64) as usize;
                        out.extend_from_slice(&buf[..n]);
                    }
                    Framing::Chunked(mut dec) => loop {
                        match dec.decode(&mut buf).ok()? {
                            Some(Step::Data(d)) => out.extend_from_slice(&d),
                            Some(Step::End) => break,
                            None => return None,
                        }
                    },
                    Framing::Close => out.extend_from_slice(&buf),
                    Framing::Done => {}
                }
                return Some((answer.status.as_u16(), out));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(s) = dec.decode(&mut buf)? {
                match s {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::End => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..wire.len() {
            let (body, done) = decode_all(wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "read size {step}");
            assert!(done);
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"z\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\n",
        ] {
            assert!(decode_all(wire, wire.len()).is_err(), "{wire:?}");
        }
        let long = vec![b'1'; MAX_SIZE_LINE + 10];
        assert!(decode_all(&long, long.len()).is_err());
    }

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let body_of = |raw: &[u8], head: bool| match parse(&mut BytesMut::from(raw), head) {
            Ok(Parsed::Final(a)) => (a.body.framing, a.body.reuse, a.headers),
            _ => panic!("not a final head: {raw:?}"),
        };
        let (f, reuse, _) = body_of(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false);
        assert!(matches!(f, Framing::Length(3)) && reuse);
        let (f, _, _) = body_of(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true);
        assert!(matches!(f, Framing::Length(0)), "HEAD has no body");
        let (f, _, _) = body_of(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert!(matches!(f, Framing::Length(0)));
        let (f, _, h) = body_of(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        );
        assert!(matches!(f, Framing::Chunked(_)) && h.get("content-length").is_none());
        let (f, reuse, _) = body_of(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(f, Framing::Close) && !reuse);
        let (_, reuse, _) = body_of(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert!(!reuse);
        let (_, reuse, _) = body_of(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false);
        assert!(!reuse, "HTTP/1.0 is not kept alive");
        let mut interim = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"[..]);
        assert!(matches!(parse(&mut interim, false), Ok(Parsed::Interim)));
        assert_eq!(
            &interim[..],
            b"HTTP/1.1 200",
            "the interim head is consumed"
        );
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(matches!(parse(&mut partial, false), Ok(Parsed::Partial)));
        assert_eq!(partial.len(), 27, "nothing is consumed from a partial head");
        for bad in [
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"NOTHTTP\r\n\r\n",
        ] {
            assert!(parse(&mut BytesMut::from(bad), false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_heads_carry_host_and_a_length_for_empty_posts() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        let path = PathAndQuery::from_static("/p?q=1");
        let mut out = BytesMut::new();
        encode(
            &Head {
                method: &Method::POST,
                path: &path,
                headers: &h,
                authority: "127.0.0.1:1",
            },
            &mut out,
        );
        assert_eq!(
            &out[..],
            b"POST /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:1\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
