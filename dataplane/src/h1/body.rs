//! Message bodies on an upstream connection: the client's request body written out as it
//! arrives, and the upstream's response body read as the client takes it. Neither is ever
//! buffered whole.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Body as _;
use tokio::io::AsyncWrite;

use crate::body::{ClientBody, ClientBodyError};

use super::Error;
use super::chunked::{Chunked, Outgoing, Step};
use super::pool::{Conn, Pool};

/// How the upstream's response body is delimited (RFC 9112 section 6.3).
pub(crate) enum Framing {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
    /// A `101 Switching Protocols` answer to an upgrade: the connection is no longer HTTP.
    Switched,
}

/// The rest of a request body sent while the answer is read, and the timer bounding how long
/// it may go without moving.
pub(crate) struct Sending {
    pub sender: Sender,
    pub timer: Option<Pin<Box<tokio::time::Sleep>>>,
    pub settings: super::Settings,
}

/// A response body read from the upstream connection as the client takes it. When the body
/// ends cleanly on a reusable connection, the connection returns to its pool.
pub(crate) struct Body {
    pub(super) conn: Option<Conn>,
    pub(super) framing: Framing,
    pub(super) reuse: bool,
    /// The rest of the request body, when the answer began before it was all sent (boxed:
    /// rare, and kept out of every answer's size).
    sending: Option<Box<Sending>>,
    /// A failure reported on the next poll, once the bytes before it have been flushed to the
    /// client (the server side only flushes when the body is pending).
    failed: Option<Error>,
    /// Longest wait for the upstream's next body bytes, and the timer for it (made the first
    /// time a read has to wait: most bodies come whole with their head).
    gap: std::time::Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_armed: bool,
}

impl Body {
    pub(super) fn new(framing: Framing, reuse: bool) -> Self {
        Self {
            conn: None,
            framing,
            reuse,
            sending: None,
            failed: None,
            gap: std::time::Duration::from_secs(60),
            stall: None,
            stall_armed: false,
        }
    }

    /// Attaches the connection, and the request body still being sent if there is one; gives
    /// the connection straight back when both are already complete.
    pub(super) fn start(
        &mut self,
        conn: Conn,
        pool: &Pool,
        sending: Option<Sending>,
        gap: std::time::Duration,
    ) {
        self.conn = Some(conn);
        self.gap = gap;
        self.sending = sending.map(Box::new);
        if let Framing::Length(0) = self.framing {
            self.finish(pool);
        }
    }

    /// Lets go of the connection's read buffer if it holds nothing: even with no room left, it
    /// keeps the allocation the last chunk was cut from. The next read makes one of its size.
    pub fn shrink(&mut self) {
        if let Some(c) = self.conn.as_mut()
            && c.buf.is_empty()
        {
            c.buf = bytes::BytesMut::new();
        }
    }

    /// After a `101`, the upstream connection and the bytes it sent after the head.
    pub fn take_switched(&mut self) -> Option<Conn> {
        match self.framing {
            Framing::Switched => self.conn.take(),
            _ => None,
        }
    }

    /// The answer is complete. Its connection is reused only when the request went out whole
    /// too, and nothing came after the answer.
    fn finish(&mut self, pool: &Pool) {
        self.framing = Framing::Done;
        let request_sent = self.sending.take().is_none();
        if let Some(c) = self.conn.take()
            && self.reuse
            && request_sent
            && c.buf.is_empty()
        {
            pool.give_back(c);
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.failed.is_none()
            && matches!(
                self.framing,
                Framing::Done | Framing::Length(0) | Framing::Switched
            )
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(n) => http_body::SizeHint::with_exact(n),
            Framing::Done | Framing::Switched => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }

    /// Next chunk of the body; `pool` takes the connection back at the end.
    pub fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
        pool: &Pool,
        read: usize,
    ) -> Poll<Option<Result<Bytes, Error>>> {
        if let Some(err) = self.failed.take() {
            return Poll::Ready(Some(Err(err)));
        }
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(s) = self.sending.as_mut() {
                let polled = s.sender.poll_send(cx, &mut c.io);
                let on_client = s.sender.waiting_on_client;
                if s.sender.take_progress() || on_client != s.sender.timed_on_client {
                    s.sender.timed_on_client = on_client;
                    if let Some(wait) = s.settings.wait(on_client) {
                        let at = tokio::time::Instant::now() + wait;
                        match s.timer.as_mut() {
                            Some(t) => t.as_mut().reset(at),
                            None => s.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                        }
                    }
                }
                match polled {
                    Poll::Ready(Ok(())) => self.sending = None,
                    Poll::Pending => {
                        if let Some(t) = s.timer.as_mut()
                            && t.as_mut().poll(cx).is_ready()
                        {
                            // The body stopped moving: the exchange cannot complete.
                            let client = s.sender.waiting_on_client;
                            self.sending = None;
                            self.conn = None;
                            return Poll::Ready(Some(Err(Error::Timeout { client })));
                        }
                    }
                    Poll::Ready(Err(SendError::Upstream(e))) => {
                        // It stopped reading; its answer may still come whole.
                        tracing::trace!(?e, "upstream stopped taking the request body");
                        self.sending = None;
                        self.reuse = false;
                    }
                    Poll::Ready(Err(SendError::TooSlow)) => {
                        self.sending = None;
                        self.conn = None;
                        return Poll::Ready(Some(Err(Error::Timeout { client: true })));
                    }
                    Poll::Ready(Err(SendError::Client(e))) => {
                        // The client broke its own request: the exchange is void.
                        self.sending = None;
                        self.conn = None;
                        return Poll::Ready(Some(Err(Error::Client(e))));
                    }
                }
            }
            match &mut self.framing {
                Framing::Done | Framing::Switched => return Poll::Ready(None),
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
            let read = match c.poll_read_sized(cx, read) {
                Poll::Ready(r) => {
                    self.stall_armed = false;
                    r
                }
                Poll::Pending => {
                    // Waiting on the upstream (never on the client: this is only polled when
                    // the client can take more): it has `gap` to send its next bytes.
                    let at = tokio::time::Instant::now() + self.gap;
                    let t = self
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    if !self.stall_armed {
                        t.as_mut().reset(at);
                        self.stall_armed = true;
                    }
                    if t.as_mut().poll(cx).is_ready() {
                        tracing::warn!("upstream stalled mid-body; response cut short");
                        self.conn = None;
                        return Poll::Ready(Some(Err(Error::Timeout { client: false })));
                    }
                    return Poll::Pending;
                }
            };
            match read {
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

/// Why writing a request body upstream stopped.
pub(crate) enum SendError {
    /// The client's body failed: malformed, or the client went away.
    Client(ClientBodyError),
    /// The client sent its body slower than the minimum rate.
    TooSlow,
    /// The upstream stopped taking it.
    Upstream(io::Error),
}

/// Writes the client's request body upstream as it arrives: the next frame is taken from the
/// client only once the last one is written, so a client is held to the upstream's pace and
/// nothing piles up in between. It keeps going after the upstream's answer has begun (an
/// upstream may answer while it reads, as streaming servers do).
pub(crate) struct Sender {
    body: ClientBody,
    chunked: bool,
    /// What is left to write of the current frame: chunk size line, data, CRLF.
    queue: Outgoing,
    done: bool,
    /// A frame was taken from the client, so the request can no longer be sent again.
    pub consumed: bool,
    /// Bytes moved (taken from the client or written upstream) since the last look.
    progressed: bool,
    /// The last poll waits for the client, not for the upstream.
    pub waiting_on_client: bool,
    /// The upstream stopped taking the body: nothing more is sent, and the connection is not
    /// reused.
    pub broken: bool,
    /// The exchange's timer is set for a wait on the client (not on the upstream).
    pub timed_on_client: bool,
    /// Slowest the client may send, bytes/s: over 10 s spent waiting for its frames (a run of
    /// frames that each had to be waited for), it must send at least that rate. A frame that
    /// comes at once ends the run.
    min_rate: u32,
    waiting: Option<tokio::time::Instant>,
    waited: std::time::Duration,
    sent: u64,
    /// Body bytes taken from the client in all.
    pub total: u64,
}

impl Sender {
    pub fn new(body: ClientBody, chunked: bool, min_rate: u32) -> Self {
        Self {
            body,
            chunked,
            queue: Outgoing::default(),
            done: false,
            consumed: false,
            progressed: false,
            waiting_on_client: false,
            broken: false,
            timed_on_client: false,
            min_rate,
            waiting: None,
            waited: std::time::Duration::ZERO,
            sent: 0,
            total: 0,
        }
    }

    /// The client's body back, when nothing of it was taken.
    pub fn into_untouched(self) -> Option<ClientBody> {
        (!self.consumed).then_some(self.body)
    }

    pub fn is_done(&self) -> bool {
        self.done && self.queue.is_empty()
    }

    /// True once if bytes moved since the last call.
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progressed)
    }

    /// Writes until the body is complete (`Ready(Ok)`), or both the upstream and the client
    /// make it wait.
    pub fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<Result<(), SendError>> {
        loop {
            if !self.queue.is_empty() {
                self.waiting_on_client = false;
                ready!(self.queue.poll_write(cx, io)).map_err(SendError::Upstream)?;
                self.progressed = true;
                continue;
            }
            if self.done {
                self.waiting_on_client = false;
                return Poll::Ready(Ok(()));
            }
            self.waiting_on_client = true;
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    if self.waiting.is_none() {
                        self.waiting = Some(tokio::time::Instant::now());
                    }
                    return Poll::Pending;
                }
            };
            self.waiting_on_client = false;
            if let Some(Ok(f)) = frame.as_ref() {
                match self.waiting.take() {
                    None => (self.waited, self.sent) = (std::time::Duration::ZERO, 0),
                    Some(since) => {
                        self.waited += since.elapsed();
                        self.sent += f.data_ref().map_or(0, |d| d.len() as u64);
                        if self.waited >= crate::conn::RATE_WINDOW {
                            if self.sent < u64::from(self.min_rate) * self.waited.as_secs() {
                                return Poll::Ready(Err(SendError::TooSlow));
                            }
                            (self.waited, self.sent) = (std::time::Duration::ZERO, 0);
                        }
                    }
                }
            }
            match frame {
                None => {
                    self.done = true;
                    if self.chunked {
                        self.queue.push_last_chunk();
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(SendError::Client(e))),
                Some(Ok(frame)) => {
                    self.consumed = true;
                    self.progressed = true;
                    // Request trailers are dropped: they could carry fields the proxy sets
                    // itself (X-Forwarded-For, X-Request-Id) past its rewriting.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.total += data.len() as u64;
                        self.queue.push_data(data, self.chunked);
                    }
                }
            }
        }
    }
}
