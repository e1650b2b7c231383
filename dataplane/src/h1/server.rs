//! fleetlb's HTTP/1.1 server side, for plain-text client connections (HTTP/2 and TLS stay with
//! hyper).
//!
//! It exists for memory: hyper gives every connection an 8 KiB read buffer and an 8 KiB head
//! buffer for as long as a response lasts, so 2000 clients reading an answer slowly held
//! 16 KiB each before anything of the answer itself. Here a request's head is parsed where it
//! was gathered (`conn::head`, a buffer the size of the head), its body is read only when the
//! upstream can take it, the response head is written from a buffer the size of the head and
//! freed, and the body goes out chunk by chunk as the upstream client reads it: what waits for
//! a slow reader is the chunk in flight.
//!
//! The head is parsed as hyper parses it (httparse, then the same RFC 9112 framing rules:
//! `Transfer-Encoding` whose last coding is not `chunked` is a 400, so is any in HTTP/1.0;
//! differing `Content-Length`s are a 400; `Transfer-Encoding` outranks `Content-Length`, which
//! is dropped), and the fuzz target `request_head` checks the two agree on what they accept
//! and on how the body is framed. The response is framed as hyper frames it: a known length is
//! `Content-Length`, an unknown one chunked (close-delimited for HTTP/1.0), no body after a
//! 1xx, 204 or 304 or to a HEAD, `Date` added when missing, `Connection: close` when the
//! connection ends after it.
//!
//! One request at a time: the socket is shared (a lock no one else ever waits on) between the
//! request body, which reads it when the upstream wants more, and the response, which writes
//! it. While the answer is awaited and the request body is complete, the socket is watched so
//! a client that goes away abandons its request at once (as hyper does); bytes of a next,
//! pipelined, request are kept, up to the head limit.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body as _, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::ClientFault;
use super::chunked::{Chunked, Outgoing, Step};
use super::codec::MAX_HEADERS;
use crate::Shared;
use crate::body::{ClientBody, ClientBodyError, ResponseBody};
use crate::conn::{ClientIo, ConnState, Rewind};
use crate::headers::Peer;

/// How a request's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head.
pub(crate) struct RequestHead {
    pub parts: http::request::Parts,
    pub framing: RequestFraming,
    /// The client lets the connection stay open after this exchange.
    pub keep_alive: bool,
    /// It waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// Bytes of the head.
    pub len: usize,
}

/// A head refused, and the status that says why.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused {
    pub status: StatusCode,
    pub why: &'static str,
}

const fn refused(status: StatusCode, why: &'static str) -> Refused {
    Refused { status, why }
}

const BAD: Refused = refused(StatusCode::BAD_REQUEST, "malformed request head");
const TOO_LARGE: Refused = refused(
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    "request head too large",
);
/// Longest request target (hyper's bound).
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// Parses the request head at the start of `buf` (at most `limit` bytes of head). `Ok(None)`:
/// the head is not complete yet.
pub(crate) fn parse_head(buf: &Bytes, limit: usize) -> Result<Option<RequestHead>, Refused> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limit => return Err(TOO_LARGE),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        // hyper's status for a version httparse does not take (HTTP/2.0 or a malformed one).
        Err(httparse::Error::Version) => {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                "malformed or unsupported HTTP version",
            ));
        }
        Err(_) => return Err(BAD),
    };
    if len > limit {
        return Err(TOO_LARGE);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(BAD);
    };
    if target.len() > MAX_URI_LEN {
        return Err(refused(StatusCode::URI_TOO_LONG, "request target too long"));
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| BAD)?;
    let uri = Uri::from_maybe_shared(buf.slice_ref(target.as_bytes())).map_err(|_| BAD)?;
    let http11 = minor == 1;
    let mut keep_alive = http11;
    let mut saw_close = false;
    let mut expect_continue = false;
    let mut framing = RequestFraming::None;
    let (mut is_te, mut te_chunked, mut is_cl) = (false, false, false);
    let mut length: Option<u64> = None;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| BAD)?;
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(h.value)).map_err(|_| BAD)?;
        match name {
            header::TRANSFER_ENCODING => {
                if !http11 {
                    return Err(refused(
                        StatusCode::BAD_REQUEST,
                        "Transfer-Encoding in an HTTP/1.0 request",
                    ));
                }
                is_te = true;
                if is_cl && length.take().is_some() {
                    headers.remove(header::CONTENT_LENGTH);
                }
                te_chunked = last_coding_is_chunked(&value);
                if te_chunked {
                    framing = RequestFraming::Chunked;
                }
            }
            header::CONTENT_LENGTH => {
                is_cl = true;
                if is_te {
                    continue;
                }
                let n = digits(value.as_bytes())
                    .ok_or(refused(StatusCode::BAD_REQUEST, "invalid Content-Length"))?;
                if let Some(prev) = length {
                    if prev != n {
                        return Err(refused(
                            StatusCode::BAD_REQUEST,
                            "conflicting Content-Length",
                        ));
                    }
                    continue;
                }
                length = Some(n);
                framing = RequestFraming::Length(n);
            }
            header::CONNECTION => {
                if saw_close || has_token(value.as_bytes(), b"close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(value.as_bytes(), b"keep-alive");
                }
            }
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
        headers.append(name, value);
    }
    if is_te && !te_chunked {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "Transfer-Encoding without chunked last",
        ));
    }
    if is_te && is_cl {
        keep_alive = false;
    }
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        framing,
        keep_alive,
        expect_continue,
        len,
    }))
}

/// A decimal length: digits only, no sign, no overflow (hyper's rule). The largest lengths
/// are kept out of reach of the framing's own sentinels, as hyper keeps them.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= u64::MAX - 2).then_some(n)
}

/// The last coding of a `Transfer-Encoding` value is `chunked` (a value with bytes outside
/// visible ASCII names no coding, as for hyper).
fn last_coding_is_chunked(v: &HeaderValue) -> bool {
    v.to_str().is_ok_and(|s| {
        s.rsplit(',')
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
    })
}

/// A comma-separated header value names `token` (any case).
fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// For the fuzz target: how `data`'s request head would be served, in the terms hyper's
/// server is compared in: `Err(status)` when refused, else the method, target and body
/// framing. `None`: the head is not complete.
#[doc(hidden)]
pub fn frame_request(
    data: &[u8],
    limit: usize,
) -> Option<Result<(String, String, RequestFraming), u16>> {
    let buf = Bytes::copy_from_slice(data);
    match parse_head(&buf, limit) {
        Ok(None) => None,
        Ok(Some(h)) => Some(Ok((
            h.parts.method.to_string(),
            h.parts.uri.to_string(),
            h.framing,
        ))),
        Err(r) => Some(Err(r.status.as_u16())),
    }
}

/// How the request body is read.
enum BodyIn {
    Done,
    Length(u64),
    Chunked(Chunked),
    /// The client broke it, or went away mid-body.
    Failed,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Bytes asked of the socket per read of a request body.
const BODY_READ: usize = 16 * 1024;

/// The socket, and what was read from it and not used yet, shared between the request's body
/// and the exchange that writes the response.
struct Wire {
    io: Rewind<ClientIo>,
    /// Bytes read and not used yet: the rest of the request body, then the next request's.
    buf: BytesMut,
    body: BodyIn,
    /// How much of a `100 Continue` went out, while the client waits for one.
    continue_at: Option<usize>,
    /// The response head began going out: no `100 Continue` any more.
    answering: bool,
}

fn lock(w: &Mutex<Wire>) -> MutexGuard<'_, Wire> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wire {
    /// The next piece of the request body.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ClientBodyError>>> {
        loop {
            match &mut self.body {
                BodyIn::Done => return Poll::Ready(None),
                BodyIn::Failed => {
                    return Poll::Ready(Some(Err(ClientBodyError::new(
                        ClientFault::Gone,
                        "request body already failed",
                    ))));
                }
                BodyIn::Length(left) => {
                    if !self.buf.is_empty() {
                        let n = (*left).min(self.buf.len() as u64) as usize;
                        let data = self.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            self.body = BodyIn::Done;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                BodyIn::Chunked(dec) => match dec.decode(&mut self.buf) {
                    Err(e) => {
                        self.body = BodyIn::Failed;
                        return Poll::Ready(Some(Err(ClientBodyError::new(
                            ClientFault::Malformed,
                            e,
                        ))));
                    }
                    Ok(Some(Step::Data(d))) => return Poll::Ready(Some(Ok(d))),
                    Ok(Some(Step::End)) => {
                        self.body = BodyIn::Done;
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                },
            }
            if let Err(e) = ready!(self.poll_continue(cx)) {
                self.body = BodyIn::Failed;
                return Poll::Ready(Some(Err(ClientBodyError::new(ClientFault::Gone, e))));
            }
            let want = match self.body {
                BodyIn::Length(left) => left.min(BODY_READ as u64) as usize,
                _ => BODY_READ,
            };
            match ready!(self.poll_fill(cx, want)) {
                Ok(0) => {
                    self.body = BodyIn::Failed;
                    return Poll::Ready(Some(Err(ClientBodyError::new(
                        ClientFault::Gone,
                        io::Error::from(io::ErrorKind::UnexpectedEof),
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    self.body = BodyIn::Failed;
                    return Poll::Ready(Some(Err(ClientBodyError::new(ClientFault::Gone, e))));
                }
            }
        }
    }

    /// Sends the `100 Continue` the client waits for, unless the answer has begun.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(at) = self.continue_at {
            if self.answering {
                self.continue_at = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &CONTINUE[at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.continue_at = (at + n < CONTINUE.len()).then_some(at + n);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads about `want` more bytes into `buf`. The socket's readiness comes first: a client
    /// that sends slowly holds no buffer while it is silent.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.io.io.socket().poll_read_ready(cx)?.is_pending() {
            if self.buf.is_empty() {
                // Nor the allocation the last piece was cut from (a slow upload would keep a
                // read's worth of room per connection).
                self.buf = BytesMut::new();
            }
            return Poll::Pending;
        }
        self.buf.reserve(want.max(1));
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// While the answer is awaited with the request body complete: reads what the client sends
    /// next (a pipelined request, kept up to `limit` bytes). `Ready`: the client closed or the
    /// connection failed.
    fn poll_closed(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        if !self.buf.is_empty() {
            // A pipelined request is here already: it is answered even if the client has
            // closed its sending side after it (as hyper does).
            return Poll::Pending;
        }
        while self.buf.len() < limit {
            match self.io.io.socket().poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {}
            }
            let mut chunk = [0u8; 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => self.buf.extend_from_slice(rb.filled()),
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }

    /// What was read of the next request, copied: a slice would keep the whole read buffer
    /// alive while the connection idles.
    fn leftover(&self) -> Bytes {
        if self.buf.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&self.buf)
        }
    }

    /// Skips what is left of a request body nobody read, if all of it has arrived: the
    /// connection can then serve its next request. `false`: some is still to come.
    fn skip_body(&mut self) -> bool {
        loop {
            match &mut self.body {
                BodyIn::Done => return true,
                BodyIn::Failed => return false,
                BodyIn::Length(left) => {
                    if (self.buf.len() as u64) < *left {
                        return false;
                    }
                    self.buf.advance(*left as usize);
                    self.body = BodyIn::Done;
                }
                BodyIn::Chunked(dec) => match dec.decode(&mut self.buf) {
                    Ok(Some(Step::Data(_))) => {}
                    Ok(Some(Step::End)) => self.body = BodyIn::Done,
                    Ok(None) | Err(_) => return false,
                },
            }
        }
    }
}

/// A request body read by fleetlb's HTTP/1.1 server side.
pub(crate) struct RequestBody {
    wire: Arc<Mutex<Wire>>,
    /// The declared length, for the size hint.
    declared: Option<u64>,
    done: bool,
}

impl RequestBody {
    pub fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, ClientBodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = lock(&self.wire).poll_body(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.done = true;
        }
        polled
    }

    pub fn is_end_stream(&self) -> bool {
        self.done
    }

    pub fn size_hint(&self) -> SizeHint {
        match (self.done, self.declared) {
            (true, _) => SizeHint::with_exact(0),
            (false, Some(n)) => SizeHint::with_exact(n),
            (false, None) => SizeHint::default(),
        }
    }
}

/// What the connection does after an exchange.
pub(crate) enum Outcome {
    /// Serve the next request (what was read of it is given back first).
    Next(Rewind<ClientIo>),
    /// Close it, after a lingering read.
    Close(Rewind<ClientIo>),
    /// Nothing left to do: the socket is closed, or belongs to a tunnel now.
    Done,
}

/// Serves the one request whose head `conn::head` gathered in `io`.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    mut io: Rewind<ClientIo>,
    peer: &Peer,
    state: &Arc<ConnState>,
    limit: usize,
) -> Outcome {
    let pre = io.take_pre();
    let head = match parse_head(&pre, limit) {
        Ok(Some(h)) => h,
        Ok(None) => return Outcome::Done,
        Err(r) => {
            tracing::debug!(peer = %peer.addr(), status = %r.status, why = r.why, "request head refused");
            let _ = io.write_all(&refusal(r)).await;
            return Outcome::Close(io);
        }
    };
    let version = head.parts.version;
    let method = head.parts.method.clone();
    let (body_in, declared) = match head.framing {
        RequestFraming::None | RequestFraming::Length(0) => (BodyIn::Done, None),
        RequestFraming::Length(n) => (BodyIn::Length(n), Some(n)),
        RequestFraming::Chunked => (BodyIn::Chunked(Chunked::default()), None),
    };
    let has_body = !matches!(body_in, BodyIn::Done);
    let wire = Arc::new(Mutex::new(Wire {
        io,
        buf: BytesMut::from(&pre[head.len..]),
        body: body_in,
        continue_at: (head.expect_continue && has_body && version == Version::HTTP_11).then_some(0),
        answering: false,
    }));
    let body = ClientBody::Own(RequestBody {
        wire: wire.clone(),
        declared,
        done: !has_body,
    });
    let req = Request::from_parts(head.parts, body);
    drop(pre);
    // Boxed, and gone once it has answered: a slow reader's connection holds the few bytes
    // of what writes its answer, not the handler's state (kilobytes).
    let mut handling = Box::pin(crate::proxy::admit(shared, state, false, req, peer, None));
    let resp = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = handling.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        let mut w = lock(&wire);
        if matches!(w.body, BodyIn::Done) && w.poll_closed(cx, limit).is_ready() {
            // The client went away: its request is dropped (and counted as its doing).
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    drop(handling);
    let Some(resp) = resp else {
        return Outcome::Done;
    };
    let (mut parts, body) = resp.into_parts();
    let status = parts.status;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let draining = state
        .ctl
        .draining
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut keep = head.keep_alive && !draining && !switching;
    let framing = frame(
        &mut parts.headers,
        status,
        &method,
        version,
        body.size_hint(),
        &mut keep,
    );
    parts.headers.entry(header::DATE).or_insert_with(date);
    let head_bytes = encode_head(status, version, &parts.headers);
    super::recycle(std::mem::take(&mut parts.headers));
    let sent = Writer {
        wire: &wire,
        queue: {
            let mut q = Outgoing::default();
            q.push_back(head_bytes);
            q
        },
        body,
        chunked: framing.chunked,
        left: framing.length,
        done: framing.bodiless,
        first: true,
    }
    .await;
    if sent.is_err() {
        // The client went away, or the upstream failed mid-body: the answer is cut short and
        // the connection closed (a client never takes a short body for a whole one).
        return Outcome::Done;
    }
    // Every handle on the socket is gone once the response has ended; one still held (a
    // request body kept by something) means the connection cannot be reused.
    let Ok(wire) = Arc::try_unwrap(wire) else {
        return Outcome::Done;
    };
    let mut w = wire.into_inner().unwrap_or_else(|p| p.into_inner());
    if switching {
        if let Some(up) = state.take_upgrade() {
            let next = w.leftover();
            let _ = up.send(Box::new(Rewind::new(next, w.io)));
        }
        return Outcome::Done;
    }
    // A refused upgrade: nobody waits for the socket any more.
    drop(state.take_upgrade());
    if !w.skip_body() {
        keep = false;
    }
    let next = w.leftover();
    w.io.set_pre(next);
    if keep {
        Outcome::Next(w.io)
    } else {
        Outcome::Close(w.io)
    }
}

/// How a response's body goes on the wire.
struct ResponseFraming {
    /// No body follows the head (1xx, 204, 304, an answer to HEAD or a 2xx to CONNECT).
    bodiless: bool,
    chunked: bool,
    /// The `Content-Length` sent.
    length: Option<u64>,
}

/// Sets the framing headers of a response as hyper does: a known length is `Content-Length`,
/// an unknown one chunked (close-delimited for HTTP/1.0), none after a 1xx, 204 or 304 or to a
/// HEAD; `Connection: close` when the connection ends after it (`keep` turns false when the
/// body is close-delimited or the response says `close`), `keep-alive` for an HTTP/1.0 client
/// that keeps it.
fn frame(
    h: &mut HeaderMap,
    status: StatusCode,
    method: &Method,
    version: Version,
    hint: SizeHint,
    keep: &mut bool,
) -> ResponseFraming {
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
        || (method == Method::CONNECT && status.is_success());
    let mut f = ResponseFraming {
        bodiless,
        chunked: false,
        length: None,
    };
    if switching {
        // The head says what the tunnel is; the connection is no longer HTTP.
        return f;
    }
    *keep &= !has_close(h);
    if bodiless {
        if status.is_informational() || status == StatusCode::NO_CONTENT {
            h.remove(header::CONTENT_LENGTH);
            h.remove(header::TRANSFER_ENCODING);
        } else if method == Method::HEAD
            && !h.contains_key(header::CONTENT_LENGTH)
            && !h.contains_key(header::TRANSFER_ENCODING)
            && let Some(n) = hint.exact().filter(|&n| n > 0)
        {
            // As hyper does: the length the body would have had, when it is known (0 is what
            // a HEAD answer's empty body always says, not the length).
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    } else {
        h.remove(header::TRANSFER_ENCODING);
        match hint.exact() {
            Some(n) => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                f.length = Some(n);
            }
            None if version == Version::HTTP_11 => {
                h.remove(header::CONTENT_LENGTH);
                h.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
                f.chunked = true;
            }
            None => {
                // HTTP/1.0 knows no chunks: the close ends the body.
                h.remove(header::CONTENT_LENGTH);
                *keep = false;
            }
        }
    }
    if !*keep {
        if version == Version::HTTP_11 && !has_close(h) {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    } else if version == Version::HTTP_10 {
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    f
}

/// The response head `refused` answers with (the connection closes after it).
fn refusal(r: Refused) -> Vec<u8> {
    let reason = r.status.canonical_reason().unwrap_or("");
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\ndate: {}\r\n\r\n{}\n",
        r.status.as_u16(),
        r.why.len() + 1,
        date().to_str().unwrap_or(""),
        r.why
    )
    .into_bytes()
}

/// The headers say `Connection: close`.
fn has_close(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"close"))
}

/// A response head, in a buffer of its size.
fn encode_head(status: StatusCode, version: Version, h: &HeaderMap) -> Bytes {
    let size: usize = h
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + 48;
    let mut out = Vec::with_capacity(size);
    if version == Version::HTTP_11 && status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if version == Version::HTTP_10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in h {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// Today's `Date` value, formatted once a second per thread.
fn date() -> HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, HeaderValue)> = const { RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let text = httpdate::fmt_http_date(now);
            d.1 = HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
            d.0 = secs;
        }
        d.1.clone()
    })
}

/// Writes the response head and streams its body, a chunk at a time: the next chunk is asked
/// of the body only once the last one went out.
struct Writer<'a> {
    wire: &'a Mutex<Wire>,
    /// What is to be written next (head, chunk size line, data, CRLF).
    queue: Outgoing,
    body: ResponseBody,
    chunked: bool,
    /// Body bytes still owed under a `Content-Length`.
    left: Option<u64>,
    done: bool,
    /// The head has not been written: the body's first chunk, if it is there already, goes
    /// out with it.
    first: bool,
}

impl Writer<'_> {
    /// Takes the body's next frame into the queue; `Ready(Err)` when the body failed or broke
    /// its length.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        let end = frame.is_none() || self.body.is_end_stream();
        match frame {
            None => {}
            Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            Some(Ok(frame)) => {
                // Trailers are not sent over HTTP/1.1.
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    if let Some(left) = self.left.as_mut() {
                        if data.len() as u64 > *left {
                            return Poll::Ready(Err(io::Error::other(
                                "response body longer than its length",
                            )));
                        }
                        *left -= data.len() as u64;
                    }
                    self.queue.push_data(data, self.chunked);
                }
            }
        }
        if end {
            // Known at the last chunk (most bodies come whole): not asked for again.
            self.done = true;
            if self.chunked {
                self.queue.push_last_chunk();
            }
            if self.left.is_some_and(|l| l > 0) {
                return Poll::Ready(Err(io::Error::other(
                    "response body shorter than its length",
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Future for Writer<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.first {
            this.first = false;
            let mut w = lock(this.wire);
            w.answering = true;
            // A `100 Continue` half written is finished first; one not begun is never sent.
            if let Some(at) = w.continue_at.take()
                && at > 0
            {
                this.queue.push_front(Bytes::from_static(&CONTINUE[at..]));
            }
            drop(w);
            if !this.done
                && let Poll::Ready(Err(e)) = this.poll_next(cx)
            {
                return Poll::Ready(Err(e));
            }
        }
        loop {
            if !this.queue.is_empty() {
                ready!(this.queue.poll_write(cx, &mut lock(this.wire).io))?;
                continue;
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            // The next chunk is read from the upstream only once the client has room for it:
            // for a slow reader it waits in the kernel, not here.
            let room = lock(this.wire).io.io.poll_room(cx);
            if room.is_pending() {
                this.body.shrink();
            }
            ready!(room)?;
            ready!(this.poll_next(cx))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &str) -> Result<RequestFraming, u16> {
        match frame_request(head.as_bytes(), 16 * 1024) {
            Some(Ok((_, _, f))) => Ok(f),
            Some(Err(s)) => Err(s),
            None => Err(0),
        }
    }

    #[test]
    fn request_bodies_are_framed_as_rfc_9112_says() {
        use RequestFraming::*;
        for (head, want) in [
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", Ok(None)),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                Ok(Length(5)),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ok(Length(5)),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err(400),
            ),
            ("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", Err(400)),
            ("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", Err(400)),
            (
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Err(400),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok(Chunked),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Ok(Chunked),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Err(400),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok(Chunked),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Ok(Chunked),
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(400),
            ),
            // Not visible ASCII: no coding hyper recognises, so not chunked.
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: x\u{80}, chunked\r\n\r\n",
                Err(400),
            ),
            ("GET / HTTP/1.2\r\n\r\n", Err(400)),
            ("GET / HTTP/2.0\r\n\r\n", Err(400)),
            ("G@T / HTTP/1.1\r\n\r\n", Err(400)),
            ("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", Err(400)),
            ("GET / HTTP/1.1\r\nHost: x\r\n", Err(0)),
        ] {
            assert_eq!(framing(head), want, "{head:?}");
        }
    }

    #[test]
    fn a_head_over_the_limit_is_431() {
        let head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(
            frame_request(head.as_bytes(), 64),
            Some(Err(431)),
            "complete but too long"
        );
        assert_eq!(frame_request(&head.as_bytes()[..70], 64), Some(Err(431)));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        for (head, keep) in [
            ("GET / HTTP/1.1\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                "GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
            ),
        ] {
            let h = parse_head(&Bytes::from(head), 1024)
                .ok()
                .flatten()
                .map(|h| h.keep_alive);
            assert_eq!(h, Some(keep), "{head:?}");
        }
    }

    #[test]
    fn response_heads_carry_their_status_and_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(3));
        assert_eq!(
            &encode_head(StatusCode::OK, Version::HTTP_11, &h)[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(
            &encode_head(StatusCode::NOT_FOUND, Version::HTTP_10, &HeaderMap::new())[..],
            b"HTTP/1.0 404 Not Found\r\n\r\n"
        );
    }
}
