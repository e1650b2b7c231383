//! HTTP/2 and gRPC to instances (`spec.protocol: HTTP2 | GRPC`): every request is a stream on
//! a pooled prior-knowledge HTTP/2 connection, chosen per request by the same balancer as
//! HTTP/1.1 (one client connection's calls spread over every instance, which a
//! connection-level balancer cannot do).
//!
//! Connections to an endpoint are opened as needed: a request takes the first connection
//! with a free stream (under the instance's `SETTINGS_MAX_CONCURRENT_STREAMS`, even 1), open
//! or still opening; when none has one, a new connection is opened. A request that joined a
//! connection being opened waits for the instance's SETTINGS (read as they arrive, `Frames`)
//! and goes round again when the instance allows fewer streams than the pool expected. A burst
//! to a new instance thus opens a connection per the streams it allows, not one per request
//! (Envoy counts a connecting connection's streams too). The endpoint's in-flight limit
//! (`--endpoint-max-connections`) counts streams. Idle connections close after
//! `--pool-idle-timeout`; HTTP/2 PINGs keep the others alive through NATs and tell a dead
//! peer from a quiet one.
//!
//! A request body streams out as it arrives while its first 64 KiB are kept (`Replay`, as
//! linkerd does): a call the instance refused before answering (`UNAVAILABLE` with no
//! response byte, or `REFUSED_STREAM`) can go to another instance, inside the retry budget.
//!
//! gRPC: `grpc-status` is read from the trailers (or from a trailers-only answer) when the call
//! ends, and counted by whose doing it is (`grpc::blame`). A unary call's latency is the time
//! from the end of its request to its trailers; a streaming call's, the time to its response
//! head. `grpc-timeout` bounds the call (with the route's head timeout) and travels on as the
//! time left.

use std::pin::Pin;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::{Instant, Sleep};

use crate::access_log::Entry;
use crate::balance;
use crate::body::{BodyError, ClientBody, InflightGuard, ResponseBody};
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::grpc::{self, Blame, GRPC_TIMEOUT, MessageCount};
use crate::h1;
use crate::outlier;
use crate::table::Cluster;
use crate::{Clock, Shared};

/// The most of a request body kept for a retry (linkerd's limit).
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// Streams a connection carries before the next one opens: the least every HTTP/2 server
/// should allow (RFC 9113 section 6.5.2). An instance that allows fewer makes the excess wait
/// for a stream of its connection.
const STREAMS_PER_CONN: u32 = 100;

/// Each stream's receive window: what one unread answer may hold in the proxy.
const STREAM_WINDOW: u32 = 256 * 1024;

/// HTTP/2 connections to one endpoint, one list per runtime as `h1`'s idle connections: a
/// connection's task runs on the runtime that opened it, so the proxy thread that sends a
/// stream also drives its connection, with no hand-off to another thread (list 0 serves the
/// main runtime, the probes, and proxy threads beyond the core count).
pub(crate) struct Pool {
    lists: Box<[Mutex<Vec<Arc<Conn>>>]>,
    /// The streams per connection the instance allowed last (`STREAMS_PER_CONN` until one of
    /// its connections says): how many requests a connection still opening takes.
    allowed: Arc<AtomicU32>,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            lists: (0..*h1::LISTS).map(|_| Mutex::new(Vec::new())).collect(),
            allowed: Arc::new(AtomicU32::new(STREAMS_PER_CONN)),
        }
    }
}

struct Conn {
    /// Set once the connection is open.
    send: OnceLock<SendRequest<Replay>>,
    /// What its opening task and its reader tell the requests waiting on it.
    shared: Arc<ConnShared>,
    streams: AtomicU32,
    /// When a stream last began or ended (the data plane's clock).
    used: AtomicU64,
}

/// What a connection's opening task, its reader (`Frames`) and the requests on it share
/// (never the connection's handle: the reader lives inside the connection).
struct ConnShared {
    /// The instance's `SETTINGS_MAX_CONCURRENT_STREAMS` (1 to `STREAMS_PER_CONN`) as its
    /// SETTINGS last said; the pool's `allowed` until the first came.
    max_streams: AtomicU32,
    state: tokio::sync::watch::Sender<Opening>,
    /// Open (`state.open` is `Ok`): nothing to wait for (read without `state`'s lock).
    ready: AtomicBool,
    /// A failed opening was taken by a request that counts it against the instance: the
    /// others hear `h1::Error::Shared`.
    claimed: AtomicBool,
}

#[derive(Clone, Default)]
struct Opening {
    /// How opening ended: open means the handshake done and the instance's SETTINGS read.
    open: Option<Result<(), Arc<h1::Error>>>,
    /// The instance's first SETTINGS was read: `max_streams` is its own.
    settled: bool,
    /// The connection ended (its reader was dropped).
    ended: bool,
}

impl ConnShared {
    fn update(&self, f: impl FnOnce(&mut Opening)) {
        self.state.send_modify(f);
        if matches!(self.state.borrow().open, Some(Ok(()))) {
            self.ready.store(true, Release);
        }
    }

    /// The error of a failed opening for one request: the first to ask counts it.
    fn failure(&self, e: &Arc<h1::Error>) -> h1::Error {
        if self.claimed.swap(true, Relaxed) {
            h1::Error::Shared(e.clone())
        } else {
            again(e)
        }
    }
}

impl Conn {
    /// Open and usable, or still opening; false once it closed or failed to open.
    fn live(&self) -> bool {
        match self.send.get() {
            Some(send) if self.shared.ready.load(Acquire) => !send.is_closed(),
            _ => self.shared.state.borrow().open.is_none(),
        }
    }

    /// Can take one more stream now (or once it is open).
    fn free(&self) -> bool {
        let ready = match self.send.get() {
            Some(send) if self.shared.ready.load(Acquire) => send.is_ready(),
            _ => self.shared.state.borrow().open.is_none(),
        };
        ready && self.streams.load(Relaxed) < self.shared.max_streams.load(Relaxed)
    }
}

/// Drops the connections that closed, failed to open, or sat idle past `idle` (their last
/// handle gone, hyper closes them with a GOAWAY).
fn keep_live(conns: &mut Vec<Arc<Conn>>, now: u64, idle: Duration) {
    let idle = idle.as_nanos() as u64;
    conns.retain(|c| {
        c.live() && (c.streams.load(Relaxed) > 0 || now.saturating_sub(c.used.load(Relaxed)) < idle)
    });
}

/// One stream's place on a pooled connection, given back when dropped.
pub(crate) struct Slot {
    conn: Arc<Conn>,
    clock: Clock,
    /// Already given back (a request that went round).
    left: bool,
}

impl Slot {
    /// Gives the place back if the connection carries more streams than the instance allows
    /// (exactly the surplus leave, however many check at once).
    fn leave_if_over(&mut self) -> bool {
        let max = self.conn.shared.max_streams.load(Relaxed);
        let left = self
            .conn
            .streams
            .fetch_update(Relaxed, Relaxed, |n| (n > max).then(|| n - 1))
            .is_ok();
        self.left = left;
        left
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.left {
            self.conn.streams.fetch_sub(1, Relaxed);
            self.conn.used.fetch_max(self.clock.now(), Relaxed);
        }
    }
}

/// Ends an opening that ended without an outcome (its task panicked or was dropped with its
/// runtime): no request waits forever, and none counts it against the instance.
struct OpenGuard(Arc<ConnShared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.state.borrow().open.is_none() {
            self.0.claimed.store(true, Relaxed);
            self.0.update(|s| {
                s.open.get_or_insert_with(|| {
                    Err(Arc::new(h1::Error::Local(std::io::Error::other(
                        "the connection's opening ended",
                    ))))
                });
            });
        }
    }
}

impl Pool {
    fn list(&self) -> &Mutex<Vec<Arc<Conn>>> {
        self.lists.get(h1::this_list()).unwrap_or(&self.lists[0])
    }

    /// Closes connections idle past `idle` (or closed by the instance) in every list.
    pub fn expire(&self, now: u64, idle: Duration) {
        for list in &self.lists {
            keep_live(
                &mut list.lock().unwrap_or_else(|e| e.into_inner()),
                now,
                idle,
            );
        }
    }

    /// A stream to `addr`: on a pooled connection with one free, else on one being opened
    /// that will have one, else on a new connection. A connection is open once the instance's
    /// SETTINGS came (as grpc-go waits for the server's preface); a request that joined it
    /// goes round again if the instance allows fewer streams than expected (Envoy counts a
    /// connecting connection's streams the same way). At most 3 connect timeouts in all.
    ///
    /// `Err(h1::Error::Shared)`: the connection this request waited on failed to open, and
    /// another request counts the failure.
    pub async fn stream(
        &self,
        addr: std::net::SocketAddr,
        connect_timeout: Duration,
        idle: Duration,
        clock: Clock,
    ) -> Result<(SendRequest<Replay>, Slot), h1::Error> {
        let deadline = Instant::now() + connect_timeout * 3;
        let mut round = 0;
        loop {
            round += 1;
            let now = clock.now();
            let (c, opener) = {
                let mut conns = self.list().lock().unwrap_or_else(|e| e.into_inner());
                keep_live(&mut conns, now, idle);
                match conns.iter().find(|c| c.free()) {
                    Some(c) => {
                        c.streams.fetch_add(1, Relaxed);
                        c.used.store(now, Relaxed);
                        (c.clone(), false)
                    }
                    None => {
                        let c = self.conn(now);
                        conns.push(c.clone());
                        (c, true)
                    }
                }
            };
            let mut slot = Slot {
                conn: c.clone(),
                clock,
                left: false,
            };
            if opener {
                self.open(addr, connect_timeout, &c);
            }
            if !c.shared.ready.load(Acquire) {
                let mut state = c.shared.state.subscribe();
                let _ =
                    tokio::time::timeout_at(deadline, state.wait_for(|s| s.open.is_some())).await;
            }
            let open = c.shared.state.borrow().open.clone();
            match (open, c.send.get()) {
                (Some(Ok(())), Some(send)) => {
                    // Joined while the limit was a guess, and over it: round again.
                    if opener || round == 4 || !slot.leave_if_over() {
                        return Ok((send.clone(), slot));
                    }
                }
                (Some(Err(e)), _) => return Err(c.shared.failure(&e)),
                _ if opener => return Err(h1::Error::ConnectTimeout),
                _ => return Err(h1::Error::Shared(Arc::new(h1::Error::ConnectTimeout))),
            }
        }
    }

    /// A connection with one stream taken, to be opened.
    fn conn(&self, now: u64) -> Arc<Conn> {
        Arc::new(Conn {
            send: OnceLock::new(),
            shared: Arc::new(ConnShared {
                max_streams: AtomicU32::new(self.allowed.load(Relaxed)),
                state: tokio::sync::watch::Sender::new(Opening::default()),
                ready: AtomicBool::new(false),
                claimed: AtomicBool::new(false),
            }),
            streams: AtomicU32::new(1),
            used: AtomicU64::new(now),
        })
    }

    /// Opens `c` to `addr` in a task of its own, so that a request given up on does not leave
    /// the others waiting on it: connect, handshake, then the instance's SETTINGS, each
    /// within the connect timeout.
    fn open(&self, addr: std::net::SocketAddr, connect_timeout: Duration, c: &Arc<Conn>) {
        let conn = c.clone();
        let allowed = self.allowed.clone();
        let guard = OpenGuard(c.shared.clone());
        tokio::spawn(async move {
            let outcome = match handshake(addr, connect_timeout, &conn.shared, allowed).await {
                Ok(send) => {
                    let _ = conn.send.set(send);
                    let mut state = conn.shared.state.subscribe();
                    let settled = tokio::time::timeout(
                        connect_timeout,
                        state.wait_for(|s| s.settled || s.ended),
                    )
                    .await;
                    match settled {
                        Ok(Ok(s)) if s.settled => Ok(()),
                        Ok(_) => Err(Arc::new(h1::Error::Connect(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "closed before its HTTP/2 SETTINGS",
                        )))),
                        Err(_) => Err(Arc::new(h1::Error::ConnectTimeout)),
                    }
                }
                Err(e) => Err(Arc::new(e)),
            };
            guard.0.update(|s| s.open = Some(outcome));
        });
    }
}

/// The same failure again, for the request that counts it (the error is shared with the
/// requests that waited on the connection).
fn again(e: &h1::Error) -> h1::Error {
    let copy = |e: &std::io::Error| std::io::Error::new(e.kind(), e.to_string());
    match e {
        h1::Error::Local(e) => h1::Error::Local(copy(e)),
        h1::Error::Connect(e) => h1::Error::Connect(copy(e)),
        h1::Error::ConnectTimeout => h1::Error::ConnectTimeout,
        other => h1::Error::Connect(std::io::Error::other(other.to_string())),
    }
}

/// Connects to `addr` and opens HTTP/2 on it, the instance's SETTINGS read into `shared` (and
/// the pool's `allowed`) as they arrive.
async fn handshake(
    addr: std::net::SocketAddr,
    connect_timeout: Duration,
    shared: &Arc<ConnShared>,
    allowed: Arc<AtomicU32>,
) -> Result<SendRequest<Replay>, h1::Error> {
    let io = h1::connect_tcp(addr, connect_timeout).await?;
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .max_header_list_size(64 * 1024)
        // Flow control per stream, never per connection: a client that stops reading one
        // answer holds at most its stream's window here, and the connection's window
        // (every stream's at once) never runs out under the streams sharing it.
        // One stream until the instance's SETTINGS say how many: a stream over its limit
        // would be refused (grpc-core answers ENHANCE_YOUR_CALM), the rest wait for them.
        .initial_max_send_streams(1)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW * STREAMS_PER_CONN);
    let io = Frames::new(io, shared.clone(), allowed);
    let (send, conn) = tokio::time::timeout(connect_timeout, builder.handshake(TokioIo::new(io)))
        .await
        .map_err(|_| h1::Error::ConnectTimeout)?
        .map_err(|e| h1::Error::Connect(std::io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(%addr, %err, "upstream HTTP/2 connection ended");
        }
    });
    Ok(send)
}

/// An instance's connection, its incoming frames followed (headers read, payloads skipped) to
/// read `SETTINGS_MAX_CONCURRENT_STREAMS` from each SETTINGS frame as it arrives: h2 keeps
/// its own copy to itself, and its initial limit (1) is one an instance may send too.
struct Frames<T> {
    io: T,
    /// The frame header being read.
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame is a SETTINGS (not an ACK) on stream 0.
    settings: bool,
    /// The SETTINGS parameter being read.
    param: [u8; 6],
    param_len: usize,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` in the current SETTINGS frame.
    max: Option<u32>,
    /// No SETTINGS read yet (the first one that lacks the limit means no limit).
    first: bool,
    shared: Arc<ConnShared>,
    allowed: Arc<AtomicU32>,
}

impl<T> Frames<T> {
    fn new(io: T, shared: Arc<ConnShared>, allowed: Arc<AtomicU32>) -> Self {
        Self {
            io,
            head: [0; 9],
            head_len: 0,
            left: 0,
            settings: false,
            param: [0; 6],
            param_len: 0,
            max: None,
            first: true,
            shared,
            allowed,
        }
    }

    fn follow(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.head_len < 9 {
                let n = (9 - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
                self.head_len += n;
                data = &data[n..];
                if self.head_len < 9 {
                    return;
                }
                let h = &self.head;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.settings = h[3] == 0x4 && h[4] & 0x1 == 0 && stream == 0;
                self.param_len = 0;
                self.max = None;
            } else {
                let n = self.left.min(data.len());
                if self.settings {
                    for &b in &data[..n] {
                        self.param[self.param_len] = b;
                        self.param_len += 1;
                        if self.param_len == 6 {
                            self.param_len = 0;
                            let p = &self.param;
                            if u16::from_be_bytes([p[0], p[1]]) == 0x3 {
                                self.max = Some(u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
                            }
                        }
                    }
                }
                self.left -= n;
                data = &data[n..];
            }
            if self.head_len == 9 && self.left == 0 {
                if self.settings {
                    self.settled();
                }
                self.head_len = 0;
            }
        }
    }

    /// A SETTINGS frame ended. A malformed one (a length not a multiple of 6) counts for
    /// nothing: h2 closes the connection for it.
    fn settled(&mut self) {
        if self.param_len != 0 {
            return;
        }
        let max = match self.max {
            Some(m) => Some(m),
            None if self.first => Some(u32::MAX),
            None => None,
        };
        if let Some(m) = max {
            // 0 (no new streams for now) is taken as 1: that stream waits inside the
            // connection until the instance allows it, or the route's head timeout ends it
            // (counted against the instance, which said 0).
            let m = m.clamp(1, STREAMS_PER_CONN);
            self.shared.max_streams.store(m, Relaxed);
            if self.first {
                // What a new connection expects: the instance's opening word, not a lower
                // limit it set later while shedding load.
                self.allowed.store(m, Relaxed);
            }
        }
        if std::mem::take(&mut self.first) {
            self.shared.update(|s| s.settled = true);
        }
    }
}

impl<T> Drop for Frames<T> {
    fn drop(&mut self) {
        // The connection ended: if it had not sent its SETTINGS, its opening failed.
        if self.first {
            self.shared.update(|s| s.ended = true);
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Frames<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.follow(&buf.filled()[before..]);
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Frames<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request body sent upstream, its first `REPLAY_LIMIT` bytes kept so that another attempt
/// can send it again (the part already read, then the rest as it comes).
pub(crate) struct Replay {
    shared: Arc<ReplayShared>,
    /// Which attempt this body belongs to; an older attempt's body stops.
    attempt: u32,
    /// Kept chunks sent so far by this attempt.
    pos: usize,
    trailers_sent: bool,
}

/// What every handle on one body shares.
struct ReplayShared {
    state: Mutex<ReplayState>,
    /// Woken when the client's body ends (the head timeout starts then).
    ended: tokio::sync::Notify,
}

struct ReplayState {
    source: Option<ClientBody>,
    kept: Vec<Bytes>,
    kept_len: usize,
    /// More than `REPLAY_LIMIT` was read: nothing is kept.
    capped: bool,
    /// The client's body ended (with these trailers, if any).
    ended: bool,
    trailers: Option<HeaderMap>,
    /// When it ended, on the data plane's clock.
    ended_at: Option<Instant>,
    /// The client's body failed, and how.
    fault: Option<h1::ClientFault>,
    /// When the client last sent a frame of its body (or the body began).
    last_read: Instant,
    attempt: u32,
}

impl Replay {
    fn new(source: Option<ClientBody>) -> Self {
        let ended = source.is_none();
        Self {
            shared: Arc::new(ReplayShared {
                state: Mutex::new(ReplayState {
                    source,
                    kept: Vec::new(),
                    kept_len: 0,
                    capped: false,
                    ended,
                    trailers: None,
                    ended_at: ended.then(Instant::now),
                    fault: None,
                    last_read: Instant::now(),
                    attempt: 0,
                }),
                ended: tokio::sync::Notify::new(),
            }),
            attempt: 0,
            pos: 0,
            trailers_sent: false,
        }
    }

    /// Another handle on the same body (its `attempt` set to `attempt`).
    fn handle(&self, attempt: u32) -> Replay {
        Replay {
            shared: self.shared.clone(),
            attempt,
            pos: 0,
            trailers_sent: attempt == u32::MAX,
        }
    }

    /// A body of `data` only (health checks).
    fn bytes(data: Bytes) -> Self {
        let b = Self::new(None);
        {
            let mut s = b.state();
            s.kept_len = data.len();
            s.kept.push(data);
        }
        b
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body for the next attempt, when the whole of what was read is still kept.
    fn again(&self) -> Option<Replay> {
        let mut s = self.state();
        if s.capped || s.fault.is_some() {
            return None;
        }
        s.attempt += 1;
        let attempt = s.attempt;
        drop(s);
        Some(self.handle(attempt))
    }

    /// Whether another attempt could send the whole body again.
    fn again_possible(&self) -> bool {
        let s = self.state();
        !s.capped && s.fault.is_none()
    }

    fn fault(&self) -> Option<h1::ClientFault> {
        self.state().fault
    }

    fn ended_at(&self) -> Option<Instant> {
        self.state().ended_at
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut s = this.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.attempt != this.attempt {
            return Poll::Ready(Some(Err("request sent again elsewhere".into())));
        }
        if !s.capped && this.pos < s.kept.len() {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.kept[this.pos - 1].clone()))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = &s.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        if polled.is_ready() {
            s.last_read = Instant::now();
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                s.ended_at = Some(Instant::now());
                this.shared.ended.notify_waiters();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.fault = Some(e.fault);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if !s.capped {
                        s.kept_len += data.len();
                        if s.kept_len > REPLAY_LIMIT {
                            s.capped = true;
                            s.kept = Vec::new();
                        } else {
                            s.kept.push(data.clone());
                            this.pos = s.kept.len();
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    s.ended = true;
                    s.ended_at = Some(Instant::now());
                    this.shared.ended.notify_waiters();
                    match frame.into_trailers() {
                        Ok(t) => {
                            s.trailers = Some(t.clone());
                            this.trailers_sent = true;
                            Poll::Ready(Some(Ok(Frame::trailers(t))))
                        }
                        Err(_) => Poll::Ready(None),
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.state();
        s.ended && (s.capped || self.pos >= s.kept.len()) && s.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.state();
        match &s.source {
            None => SizeHint::with_exact(
                s.kept[self.pos.min(s.kept.len())..]
                    .iter()
                    .map(|b| b.len() as u64)
                    .sum(),
            ),
            Some(src) if s.kept_len == 0 && !s.capped && !s.ended => src.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

/// A call's end, learned from when its answer's body ends (gRPC calls answered with a head
/// and a body).
pub(crate) struct Call {
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    sent: Instant,
    head: Duration,
    body: Replay,
    messages: MessageCount,
}

/// An HTTP/2 answer streamed to the client: its timers, and what is learned at its end.
pub(crate) struct Answer {
    body: hyper::body::Incoming,
    guard: Option<InflightGuard>,
    slot: Option<Slot>,
    /// A gRPC call: ended with trailers, and learned from then (when `call` is set).
    grpc: bool,
    call: Option<Call>,
    /// Longest gap between two frames of the answer.
    gap: Duration,
    next_gap: Instant,
    /// The caller's deadline (`grpc-timeout`).
    deadline: Option<Instant>,
    /// When the stream stops counting toward the autoscaler's load (the route's head timeout
    /// after its head), until it does.
    long_at: Option<Instant>,
    long: bool,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last poll found nothing from the instance: the gap runs. Otherwise the client was
    /// slow to come back for more, which is not the instance's silence.
    waiting: bool,
    done: bool,
}

type Polled = Poll<Option<Result<Frame<Bytes>, BodyError>>>;

impl Answer {
    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Polled {
        if self.done {
            return Poll::Ready(None);
        }
        let now = Instant::now();
        if !self.waiting {
            self.next_gap = now + self.gap;
        }
        if let Some(end) = self.expired(now) {
            return end;
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.waiting = polled.is_pending();
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(call) = self.call.as_mut() {
                    if let Some(d) = frame.data_ref() {
                        call.messages.feed(d);
                    } else if let Some(t) = frame.trailers_ref() {
                        let status = grpc::status(t).unwrap_or(grpc::code::UNKNOWN);
                        self.end_call(status);
                    }
                }
                if self.body.is_end_stream() {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                // A gRPC answer ends with trailers: one without is a broken call.
                self.end_call(grpc::code::INTERNAL);
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // The instance reset the stream or the connection broke, unless it was the
                // client's body that failed first (its reset travels upstream).
                if self.call.as_ref().is_some_and(|c| c.body.fault().is_some()) {
                    self.call = None;
                }
                self.end_call(grpc::code::UNAVAILABLE);
                self.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => loop {
                let now = Instant::now();
                if let Some(end) = self.expired(now) {
                    return end;
                }
                let mut wake = self.next_gap;
                for t in [self.deadline, self.long_at].into_iter().flatten() {
                    wake = wake.min(t);
                }
                if crate::conn::poll_deadline(&mut self.timer, wake, cx).is_pending() {
                    return Poll::Pending;
                }
            },
        }
    }

    /// What ends the answer at `now`, if anything: the caller's deadline or an idle gap. Marks
    /// the stream long-lived once its time comes.
    fn expired(&mut self, now: Instant) -> Option<Polled> {
        if let Some(at) = self.long_at
            && now >= at
        {
            self.long_at = None;
            if let Some(g) = &self.guard {
                g.endpoint().state.long_lived_began();
                self.long = true;
            }
        }
        if self.deadline.is_some_and(|d| now >= d) {
            // The caller's deadline: its choice, not the instance's doing.
            self.count_own(grpc::code::DEADLINE_EXCEEDED);
            self.call = None;
            self.finish();
            return Some(Poll::Ready(Some(Ok(Frame::trailers(status_trailers(
                grpc::code::DEADLINE_EXCEEDED,
                "deadline exceeded",
            ))))));
        }
        if now >= self.next_gap {
            if self.grpc {
                self.count_own(grpc::code::UNAVAILABLE);
            }
            self.call = None;
            self.finish();
            return Some(if self.grpc {
                Poll::Ready(Some(Ok(Frame::trailers(status_trailers(
                    grpc::code::UNAVAILABLE,
                    "the instance sent nothing for longer than the route's body timeout",
                )))))
            } else {
                Poll::Ready(Some(Err("upstream body idle past the timeout".into())))
            });
        }
        None
    }

    /// fleetlb ended the call with `status` itself.
    fn count_own(&self, status: u32) {
        if let Some(call) = &self.call {
            call.shared
                .metrics
                .grpc_status(&call.cluster.name, status, "fleetlb");
        }
    }

    /// The call ended with `status`: learned from, once.
    fn end_call(&mut self, status: u32) {
        let (Some(call), Some(g)) = (self.call.take(), &self.guard) else {
            return;
        };
        // One message back to a request that had ended: a unary call, timed from its request's
        // end to its trailers. Anything else streams: its head time stands.
        let rtt = match call.body.ended_at() {
            Some(ended) if call.messages.messages <= 1 => Instant::now() - ended.max(call.sent),
            _ => call.head,
        };
        learn_grpc(
            &call.shared,
            &call.cluster,
            g.endpoint(),
            status,
            rtt,
            self.deadline.is_some(),
        );
    }

    /// The stream is over: its slots are given back.
    fn finish(&mut self) {
        self.done = true;
        self.timer = None;
        self.release();
    }

    fn release(&mut self) {
        if self.long
            && let Some(g) = &self.guard
        {
            g.endpoint().state.long_lived_ended();
        }
        self.long = false;
        self.slot = None;
        self.guard = None;
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.release();
    }
}

/// Trailers that end a gRPC call with `status`.
fn status_trailers(status: u32, message: &'static str) -> HeaderMap {
    let mut t = HeaderMap::with_capacity(2);
    t.insert(grpc::GRPC_STATUS.clone(), HeaderValue::from(status));
    t.insert(
        grpc::GRPC_MESSAGE.clone(),
        HeaderValue::from_static(message),
    );
    t
}

/// Learns from a gRPC call's status (see `grpc::blame`).
fn learn_grpc(
    shared: &Shared,
    cluster: &Cluster,
    ep: &Endpoint,
    status: u32,
    rtt: Duration,
    caller_deadline: bool,
) {
    cluster.metrics.grpc_from_instance(status);
    let now = shared.clock.now();
    let decay = cluster.balancing.decay.as_nanos() as f64;
    let penalty = shared.config.failure_penalty.max(rtt).as_nanos() as f64;
    match grpc::blame(status, caller_deadline) {
        Blame::None => {
            ep.state.request_succeeded();
            ep.state.observe(rtt.as_nanos() as f64, now, decay);
        }
        Blame::Busy => ep.state.observe(penalty, now, decay),
        Blame::Endpoint => {
            ep.state.observe(penalty, now, decay);
            outlier::on_failure(&shared.metrics, cluster, ep, now);
        }
    }
}

/// Whether hyper's error is the instance refusing the stream before processing it
/// (`REFUSED_STREAM`, or a GOAWAY that left it unprocessed): safe to send anywhere again.
fn refused(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        src = s.source();
    }
    false
}

/// Why no response head came in time.
enum Late {
    /// The caller's deadline (`grpc-timeout`) passed.
    Caller,
    /// The client sent nothing of its unfinished body for `client_gap`.
    Client,
    /// The instance took longer than the route's head timeout after the request ended.
    Instance,
}

/// Waits for the response head. The route's head timeout runs from the end of the request, as
/// Envoy's route timeout does: while the client is still sending (a client-streaming or bidi
/// call, a slow upload) the instance may rightly wait for it, and only the client's own gaps
/// are timed.
async fn wait_head<F: Future>(
    answer: F,
    body: &Replay,
    sent: Instant,
    head: Duration,
    client_gap: Duration,
    caller: Option<Instant>,
) -> Result<F::Output, Late> {
    let mut answer = std::pin::pin!(answer);
    let deadline = || {
        let (streaming, ended_at) = {
            let s = body.state();
            ((!s.ended).then_some(s.last_read), s.ended_at)
        };
        let (at, why) = match streaming {
            Some(last) => (last + client_gap, Late::Client),
            None => (ended_at.unwrap_or(sent).max(sent) + head, Late::Instance),
        };
        match caller {
            Some(d) if d <= at => (d, Late::Caller),
            _ => (at, why),
        }
    };
    loop {
        // Armed before the body's state is read: an end after the read still wakes this.
        let ended = body.shared.ended.notified();
        let mut ended = std::pin::pin!(ended);
        ended.as_mut().enable();
        let (at, _) = deadline();
        tokio::select! {
            out = answer.as_mut() => return Ok(out),
            // The body ended: the head timeout starts from there.
            () = ended => continue,
            () = tokio::time::sleep_until(at) => {}
        }
        // Unless the body moved on meanwhile, and the deadline with it.
        let (at, why) = deadline();
        if Instant::now() >= at {
            return Err(why);
        }
    }
}

/// Sends `req` to an endpoint of `cluster` as an HTTP/2 stream (see the module's text).
pub(crate) async fn forward(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    req: Request<ClientBody>,
    grpc_call: bool,
    mut log: Option<&mut Entry>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let cfg = &shared.config;
    let limits = &*shared.limits;
    let decay = cluster.balancing.decay.as_nanos() as f64;
    let penalty = cfg.failure_penalty.as_nanos() as f64;
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let idempotent = crate::proxy::is_idempotent(&parts.method);
    let mut headers = parts.headers;
    let caller_deadline = match headers.get(&GRPC_TIMEOUT) {
        Some(v) if grpc_call => match grpc::parse_timeout(v.as_bytes()) {
            Some(d) => Some(started + d),
            None => {
                // Malformed: no deadline, and none the instance would refuse the call over
                // (its INTERNAL would be the caller's doing).
                headers.remove(&GRPC_TIMEOUT);
                None
            }
        },
        _ => None,
    };
    // The client's host travels as `:authority`, as HTTP/2 asks.
    let host = headers
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok());
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let had_body = !body.is_end_stream();
    let mut replay = Replay::new(had_body.then_some(body));
    let gap = cluster.body_timeout.unwrap_or(limits.upstream_body_timeout);
    let mut failed: Option<Arc<Endpoint>> = None;
    let mut last_err = ProxyError::NoHealthyEndpoint;
    // A retry whose budget was taken, and whose body was made, when it was decided.
    let mut paid = false;
    let mut next_body: Option<Replay> = None;
    let client_gap = cluster.body_timeout.unwrap_or(limits.body_timeout);

    for attempt in 1..=cfg.max_attempts.max(1) {
        let (pick, guard) = crate::proxy::begin_attempt(
            shared,
            cluster,
            attempt,
            failed.as_deref(),
            std::mem::take(&mut paid),
            caller_deadline,
            log.as_deref_mut(),
        )
        .await
        .map_err(|e| e.unwrap_or(last_err))?;
        let ep = pick.endpoint;
        let connecting = Instant::now();
        let opening = ep.h2.stream(
            ep.addr,
            limits.connect_timeout,
            cfg.pool_idle_timeout,
            shared.clock,
        );
        // The caller's deadline bounds the wait for a connection too (no one's fault).
        let opened = match caller_deadline {
            Some(d) => tokio::time::timeout_at(d, opening)
                .await
                .map_err(|_| ProxyError::DeadlineExceeded)?,
            None => opening.await,
        };
        let (mut send, slot) = match opened {
            Ok(s) => s,
            Err(h1::Error::Local(e)) => {
                tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, err = %e, "out of local resources for an upstream connection");
                return Err(ProxyError::LocalResources);
            }
            Err(h1::Error::Shared(e)) => {
                // The connection this request waited on failed to open: counted once, by the
                // request that opened it. Elsewhere if there is an elsewhere.
                if let h1::Error::Local(_) = *e {
                    return Err(ProxyError::LocalResources);
                }
                tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, err = %e, "the connection waited on failed to open");
                last_err = if pick.panic {
                    ProxyError::NoHealthyEndpoint
                } else {
                    ProxyError::UpstreamConnect
                };
                failed = Some(ep.clone());
                continue;
            }
            Err(err) => {
                let now = shared.clock.now();
                ep.state.observe(penalty, now, decay);
                outlier::on_failure(&shared.metrics, cluster, ep, now);
                last_err =
                    crate::proxy::connect_failed(shared, cluster, ep, err.is_refused(), pick.panic);
                failed = Some(ep.clone());
                continue;
            }
        };
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(host.clone().unwrap_or_else(|| ep.authority.clone()))
            .path_and_query(path.clone())
            .build()
            .map_err(|_| ProxyError::BadHost)?;
        let mut out_headers = headers.clone();
        if let Some(d) = caller_deadline {
            // The instance gets the time the caller has left.
            let left = d.saturating_duration_since(Instant::now());
            out_headers.insert(GRPC_TIMEOUT.clone(), grpc::format_timeout(left));
        }
        let this_body = if attempt == 1 {
            std::mem::replace(&mut replay, Replay::new(None))
        } else {
            match next_body.take().or_else(|| replay.again()) {
                Some(b) => b,
                None => return Err(last_err),
            }
        };
        if attempt == 1 {
            // `replay` keeps a handle on the shared state for later attempts.
            replay = this_body.handle(0);
        }
        let mut out = Request::new(this_body);
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = uri;
        *out.version_mut() = Version::HTTP_2;
        *out.headers_mut() = out_headers;
        let sent = Instant::now();
        let result = wait_head(
            send.try_send_request(out),
            &replay,
            sent,
            cluster.request_timeout,
            client_gap,
            caller_deadline,
        )
        .await;
        let now = shared.clock.now();
        let waited = sent.elapsed();
        match result {
            Err(Late::Caller) => {
                // The caller's deadline came first: its choice. What it says of the instance
                // is that it is at least this slow.
                if waited.as_nanos() as f64 > ep.state.estimate_ns(now, decay) {
                    ep.state.observe(waited.as_nanos() as f64, now, decay);
                }
                return Err(ProxyError::DeadlineExceeded);
            }
            Err(Late::Client) => {
                // The client stopped sending its body while the instance waited for it.
                tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, "client body stalled");
                return Err(ProxyError::ClientTimeout);
            }
            Err(Late::Instance) => {
                ep.state.observe(penalty, now, decay);
                outlier::on_failure(&shared.metrics, cluster, ep, now);
                tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, timeout = ?cluster.request_timeout, "upstream timed out");
                return Err(ProxyError::UpstreamTimeout);
            }
            Ok(Err(mut e)) => {
                if let Some(fault) = replay.fault() {
                    return Err(match fault {
                        h1::ClientFault::Malformed => ProxyError::BadRequestBody,
                        h1::ClientFault::Gone => ProxyError::ClientClosed,
                    });
                }
                let unsent = e.take_message().is_some();
                let e = e.into_error();
                if unsent || refused(&e) {
                    // Never processed (a connection closing as the stream went out, or the
                    // instance refusing a stream over its limit before its SETTINGS came):
                    // anywhere again, this instance too, and nothing learned. It cost the
                    // instance nothing: the retry budget is not spent on it.
                    tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, err = %e, "stream refused before processing");
                    last_err = ProxyError::UpstreamReset;
                    paid = true;
                    continue;
                }
                ep.state.observe(penalty, now, decay);
                outlier::on_failure(&shared.metrics, cluster, ep, now);
                tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, attempt, err = %e, "upstream stream failed");
                last_err = ProxyError::UpstreamReset;
                if !idempotent || had_body {
                    return Err(last_err);
                }
                failed = Some(ep.clone());
                continue;
            }
            Ok(Ok(resp)) => {
                ep.metrics.upstream_duration.observe(waited.as_secs_f64());
                if let Some(log) = log.as_deref_mut() {
                    log.connect = Some(sent.saturating_duration_since(connecting));
                    log.head = Some(waited);
                }
                let (mut head, body) = resp.into_parts();
                let grpc_answer = grpc_call && head.status == StatusCode::OK;
                let trailers_only = grpc_answer.then(|| grpc::status(&head.headers)).flatten();
                let mut call = None;
                match trailers_only {
                    Some(status) => {
                        learn_grpc(
                            shared,
                            cluster,
                            ep,
                            status,
                            waited,
                            caller_deadline.is_some(),
                        );
                        if status == grpc::code::UNAVAILABLE {
                            // Refused before doing anything, gRPC's 503: out of rotation for
                            // an ejection period (its health checks go on), as far as the
                            // cluster's ejection budget allows. A latency-aware balancer would
                            // otherwise just stop sending it calls, and it would show healthy.
                            outlier::try_eject(
                                &shared.metrics,
                                cluster,
                                ep,
                                now,
                                crate::endpoint::EjectReason::Unavailable,
                                None,
                            );
                        }
                        // Refused before any response byte: another instance may take it, when
                        // the whole request is still here to send, another instance can take
                        // it and the budget allows; otherwise the caller gets this answer.
                        if status == grpc::code::UNAVAILABLE
                            && attempt < cfg.max_attempts
                            && replay.again_possible()
                            && balance::pick(cluster, shared.clock.now(), Some(ep)).is_some()
                            && cluster.carried.retry_budget.withdraw()
                        {
                            match replay.again() {
                                Some(b) => {
                                    tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, "UNAVAILABLE before any answer; trying another instance");
                                    last_err = ProxyError::UpstreamUnavailable;
                                    failed = Some(ep.clone());
                                    paid = true;
                                    next_body = Some(b);
                                    drop((body, slot, guard));
                                    continue;
                                }
                                // Read past the buffer meanwhile: the answer goes back.
                                None => cluster.carried.retry_budget.deposit(),
                            }
                        }
                    }
                    None if grpc_answer => {
                        call = Some(Call {
                            shared: shared.clone(),
                            cluster: cluster.clone(),
                            sent,
                            head: waited,
                            body: replay.handle(u32::MAX),
                            messages: MessageCount::default(),
                        });
                    }
                    None => crate::proxy::learn_from_status(
                        shared,
                        cluster,
                        ep,
                        head.status,
                        &head.headers,
                        waited,
                        now,
                    ),
                }
                crate::headers::strip_hop_by_hop(&mut head.headers);
                let answer = Answer {
                    body,
                    guard: Some(guard),
                    slot: Some(slot),
                    grpc: grpc_call,
                    call,
                    gap,
                    next_gap: Instant::now() + gap,
                    deadline: caller_deadline,
                    long_at: Some(Instant::now() + cluster.request_timeout),
                    long: false,
                    timer: None,
                    waiting: false,
                    done: false,
                };
                return Ok(Response::from_parts(head, ResponseBody::h2(answer)));
            }
        }
    }
    Err(last_err)
}

/// Largest health answer body read.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// One health check of `ep` over its HTTP/2 pool: `GET path` answered 2xx, or for gRPC,
/// `grpc.health.v1.Health/Check` for `health.grpc_service` answered `SERVING`.
pub(crate) async fn probe(
    shared: &Shared,
    ep: &Endpoint,
    grpc_check: bool,
    health: &crate::routes::HealthConfig,
    path: &PathAndQuery,
) -> bool {
    let limit = health.timeout;
    let attempt = async {
        // The connect's own timeout (the probe's `limit` bounds this whole attempt): a
        // request waiting on the same connection is not held to the probe's timer.
        let (mut send, _slot) = ep
            .h2
            .stream(
                ep.addr,
                shared.limits.connect_timeout,
                shared.config.pool_idle_timeout,
                shared.clock,
            )
            .await
            .ok()?;
        let mut req = if grpc_check {
            use prost::Message;
            let msg = grpc::HealthCheckRequest {
                service: health.grpc_service.clone(),
            };
            let mut req = Request::new(Replay::bytes(grpc::frame(&msg.encode_to_vec())));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(ep.authority.clone())
                .path_and_query(grpc::HEALTH_CHECK)
                .build()
                .ok()?;
            let h = req.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(header::TE, HeaderValue::from_static("trailers"));
            req
        } else {
            let mut req = Request::new(Replay::new(None));
            *req.uri_mut() = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(ep.authority.clone())
                .path_and_query(path.clone())
                .build()
                .ok()?;
            req
        };
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("fleetlb-health-check"),
        );
        let resp = send.send_request(req).await.ok()?;
        let (head, mut body) = resp.into_parts();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.ok()?;
            if let Some(d) = frame.data_ref() {
                data.extend_from_slice(d);
                if data.len() > MAX_PROBE_BODY {
                    return None;
                }
            } else if let Ok(t) = frame.into_trailers() {
                trailers = Some(t);
            }
        }
        if !grpc_check {
            return Some(head.status.is_success());
        }
        let status = trailers
            .as_ref()
            .and_then(grpc::status)
            .or_else(|| grpc::status(&head.headers));
        if head.status != StatusCode::OK || status != Some(grpc::code::OK) {
            return Some(false);
        }
        let messages = grpc::unframe(&data)?;
        let answer =
            <grpc::HealthCheckResponse as prost::Message>::decode(*messages.first()?).ok()?;
        Some(answer.status == grpc::SERVING)
    };
    matches!(tokio::time::timeout(limit, attempt).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;

    /// An HTTP/2 server on 127.0.0.1:0 allowing `streams` per connection, counting the
    /// connections it accepted.
    async fn server(streams: u32) -> (std::net::SocketAddr, Arc<AtomicU32>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                counted.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(streams)
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    /// `n` requests at once, each on a stream the pool gave out when all `n` asked together,
    /// none on a connection beyond the instance's `limit`.
    async fn burst(pool: &Pool, addr: std::net::SocketAddr, n: usize, limit: u32) {
        let clock = Clock::new();
        let streams =
            futures::future::join_all((0..n).map(|_| {
                pool.stream(addr, Duration::from_secs(5), Duration::from_secs(60), clock)
            }))
            .await;
        for c in pool.lists[0].lock().unwrap().iter() {
            let carried = c.streams.load(SeqCst);
            assert!(carried <= limit, "{carried} streams on one connection");
        }
        let answers = streams.into_iter().map(|s| async move {
            let (mut send, _slot) = s.expect("a stream");
            std::future::poll_fn(|cx| send.poll_ready(cx))
                .await
                .unwrap();
            let req = Request::builder()
                .uri(format!("http://{addr}/"))
                .body(Replay::bytes(Bytes::new()))
                .unwrap();
            send.send_request(req).await.expect("an answer").status()
        });
        for status in futures::future::join_all(answers).await {
            assert_eq!(status, StatusCode::OK);
        }
    }

    /// A frame: length, type, flags, stream, payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn setting(id: u16, value: u32) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend(value.to_be_bytes());
        p
    }

    #[test]
    fn the_instances_stream_limit_is_read_from_its_settings_however_the_bytes_arrive() {
        let mut first = setting(0x4, 65535);
        first.extend(setting(0x3, 7));
        let mut bytes = frame(0x4, 0, 0, &first);
        bytes.extend(frame(0x4, 0x1, 0, &[])); // the ACK of ours
        bytes.extend(frame(0x0, 0, 1, &setting(0x3, 1))); // DATA that looks like a setting
        bytes.extend(frame(0x4, 0, 3, &setting(0x3, 1))); // not on stream 0
        let after_first = bytes.len();
        bytes.extend(frame(0x4, 0, 0, &setting(0x5, 16384))); // no limit: unchanged
        let after_unchanged = bytes.len();
        bytes.extend(frame(0x4, 0, 0, &setting(0x3, 0))); // lowered to 0, taken as 1
        for split in 1..bytes.len() {
            let shared = Arc::new(ConnShared {
                max_streams: AtomicU32::new(100),
                state: tokio::sync::watch::Sender::new(Opening::default()),
                ready: AtomicBool::new(false),
                claimed: AtomicBool::new(false),
            });
            let allowed = Arc::new(AtomicU32::new(100));
            let mut f = Frames::new((), shared.clone(), allowed.clone());
            for chunk in bytes[..after_first].chunks(split) {
                f.follow(chunk);
            }
            assert!(shared.state.borrow().settled, "split {split}");
            assert_eq!(shared.max_streams.load(SeqCst), 7, "split {split}");
            for chunk in bytes[after_first..after_unchanged].chunks(split) {
                f.follow(chunk);
            }
            assert_eq!(shared.max_streams.load(SeqCst), 7, "split {split}");
            for chunk in bytes[after_unchanged..].chunks(split) {
                f.follow(chunk);
            }
            assert_eq!(shared.max_streams.load(SeqCst), 1, "split {split}");
            // New connections still expect what the instance first said.
            assert_eq!(allowed.load(SeqCst), 7, "split {split}");
        }
        // A first SETTINGS without the limit: no limit (the pool's most).
        let shared = Arc::new(ConnShared {
            max_streams: AtomicU32::new(1),
            state: tokio::sync::watch::Sender::new(Opening::default()),
            ready: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
        });
        let mut f = Frames::new((), shared.clone(), Arc::new(AtomicU32::new(1)));
        f.follow(&frame(0x4, 0, 0, &setting(0x4, 65535)));
        assert_eq!(shared.max_streams.load(SeqCst), STREAMS_PER_CONN);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_to_a_new_instance_opens_a_connection_per_streams_it_allows() {
        let (addr, accepted) = server(5).await;
        let pool = Pool::default();
        // Nothing known of the instance: the 20 requests join the one connection being opened,
        // its SETTINGS say 5, and the 15 over go round: 3 more connections, not 19.
        burst(&pool, addr, 20, 5).await;
        assert_eq!(accepted.load(SeqCst), 4);
        // The same again: the 4 connections carry them.
        burst(&pool, addr, 20, 5).await;
        assert_eq!(accepted.load(SeqCst), 4);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_instance_allowing_one_stream_gets_a_connection_per_request() {
        // 1 is also h2's own limit before an instance's SETTINGS: the pool must still believe it.
        let (addr, accepted) = server(1).await;
        let pool = Pool::default();
        burst(&pool, addr, 20, 1).await;
        assert_eq!(accepted.load(SeqCst), 20);
        burst(&pool, addr, 20, 1).await;
        assert_eq!(accepted.load(SeqCst), 20);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_connect_fails_its_waiters_without_counting_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = Pool::default();
        let clock = Clock::new();
        let all =
            futures::future::join_all((0..10).map(|_| {
                pool.stream(addr, Duration::from_secs(5), Duration::from_secs(60), clock)
            }))
            .await;
        let opener = all
            .iter()
            .filter(|r| matches!(r, Err(e) if e.is_refused()))
            .count();
        let waiters = all
            .iter()
            .filter(|r| matches!(r, Err(h1::Error::Shared(e)) if e.is_refused()))
            .count();
        assert_eq!((opener, waiters), (1, 9));
        // The failed connection left the pool: the next request connects again.
        let again = pool
            .stream(addr, Duration::from_secs(5), Duration::from_secs(60), clock)
            .await;
        assert!(matches!(again, Err(e) if e.is_refused()));
    }

    /// `n` requests asking at once, and how their errors split: (counted, shared).
    async fn failures(pool: &Pool, addr: std::net::SocketAddr, n: usize) -> (usize, usize) {
        let clock = Clock::new();
        let all = futures::future::join_all((0..n).map(|_| {
            pool.stream(
                addr,
                Duration::from_millis(300),
                Duration::from_secs(60),
                clock,
            )
        }))
        .await;
        let shared = all
            .iter()
            .filter(|r| matches!(r, Err(h1::Error::Shared(_))))
            .count();
        let counted = all.iter().filter(|r| r.is_err()).count() - shared;
        (counted, shared)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_instance_that_never_sends_its_settings_fails_the_opening_once() {
        // TCP accepted (the kernel does that for a hung process), nothing ever said.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((io, _)) = listener.accept().await {
                kept.push(io);
            }
        });
        assert_eq!(failures(&Pool::default(), addr, 10).await, (1, 9));
        held.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_instance_that_closes_before_its_settings_fails_the_opening_once() {
        // Not an HTTP/2 server: an HTTP/1.1 answer, then the close.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut io, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = io.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let (counted, shared) = failures(&Pool::default(), addr, 10).await;
        assert_eq!((counted, shared), (1, 9));
    }
}
