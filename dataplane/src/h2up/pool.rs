//! The HTTP/2 connections to one instance: streams handed out per request, connections opened
//! as the instance's stream limit requires (a connection being opened shared by the burst
//! that asked for it), the instance's SETTINGS read as they arrive.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::Replay;
use crate::Clock;
use crate::h1;

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
    /// The instance sent a GOAWAY with ENHANCE_YOUR_CALM: it closed the connection over what
    /// came on it (the proxy's clients' resets, passed on), not from trouble of its own.
    calmed: AtomicBool,
    /// The connection's end was counted against the instance (once, however many streams
    /// it carried).
    end_counted: AtomicBool,
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
    /// A connection expected to allow `max_streams` until its SETTINGS say.
    fn new(max_streams: u32) -> Self {
        Self {
            max_streams: AtomicU32::new(max_streams),
            state: tokio::sync::watch::Sender::new(Opening::default()),
            ready: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            calmed: AtomicBool::new(false),
            end_counted: AtomicBool::new(false),
        }
    }

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
    /// Its handle once open (read without `state`'s lock).
    fn open(&self) -> Option<&SendRequest<Replay>> {
        self.send.get().filter(|_| self.shared.ready.load(Acquire))
    }

    fn opening(&self) -> bool {
        self.shared.state.borrow().open.is_none()
    }

    /// Open and usable, or still opening; false once it closed or failed to open.
    fn live(&self) -> bool {
        self.open()
            .map_or_else(|| self.opening(), |send| !send.is_closed())
    }

    /// Can take one more stream now (or once it is open).
    fn free(&self) -> bool {
        self.open()
            .map_or_else(|| self.opening(), |send| send.is_ready())
            && self.streams.load(Relaxed) < self.shared.max_streams.load(Relaxed)
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
    /// Whether this stream's failure counts against the instance: a stream's own error
    /// (`connection`: false) always; the connection's end once per connection, and never
    /// when the instance calmed it down (ENHANCE_YOUR_CALM).
    pub(crate) fn counts(&self, connection: bool) -> bool {
        let shared = &self.conn.shared;
        !connection || !(shared.calmed.load(Relaxed) || shared.end_counted.swap(true, Relaxed))
    }

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
            let (conn, opener) = {
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
                conn,
                clock,
                left: false,
            };
            let c = &slot.conn;
            if opener {
                self.open(addr, connect_timeout, c);
            }
            if c.open().is_none() {
                let mut state = c.shared.state.subscribe();
                let _ =
                    tokio::time::timeout_at(deadline, state.wait_for(|s| s.open.is_some())).await;
            }
            if let Some(send) = c.open().cloned() {
                // Joined while the limit was a guess, and over it: round again.
                if opener || round == 4 || !slot.leave_if_over() {
                    return Ok((send, slot));
                }
                continue;
            }
            let failed = c.shared.state.borrow().open.clone();
            return Err(match failed {
                Some(Err(e)) => c.shared.failure(&e),
                _ if opener => h1::Error::ConnectTimeout,
                _ => h1::Error::Shared(Arc::new(h1::Error::ConnectTimeout)),
            });
        }
    }

    /// A connection with one stream taken, to be opened.
    fn conn(&self, now: u64) -> Arc<Conn> {
        Arc::new(Conn {
            send: OnceLock::new(),
            shared: Arc::new(ConnShared::new(self.allowed.load(Relaxed))),
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
    let mut frames = Frames::new(shared.clone(), allowed);
    let io = tokio_util::io::InspectReader::new(io, move |read: &[u8]| frames.follow(read));
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

/// An instance's connection's incoming bytes, its frames followed (headers read, payloads
/// skipped) to read `SETTINGS_MAX_CONCURRENT_STREAMS` from each SETTINGS frame as it arrives
/// (h2 keeps its own copy to itself, and its initial limit, 1, is one an instance may send
/// too) and a GOAWAY's error code. Dropped with the connection.
struct Frames {
    /// The frame header being read.
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame is a SETTINGS (not an ACK) on stream 0.
    settings: bool,
    /// The current frame is a GOAWAY.
    goaway: bool,
    /// The SETTINGS parameter (or the GOAWAY's first 8 bytes) being read.
    param: [u8; 8],
    param_len: usize,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` in the current SETTINGS frame.
    max: Option<u32>,
    /// No SETTINGS read yet (the first one that lacks the limit means no limit).
    first: bool,
    shared: Arc<ConnShared>,
    allowed: Arc<AtomicU32>,
}

impl Frames {
    fn new(shared: Arc<ConnShared>, allowed: Arc<AtomicU32>) -> Self {
        Self {
            head: [0; 9],
            head_len: 0,
            left: 0,
            settings: false,
            goaway: false,
            param: [0; 8],
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
                self.goaway = h[3] == 0x7 && stream == 0;
                self.param_len = 0;
                self.max = None;
            } else {
                let n = self.left.min(data.len());
                if self.goaway && self.param_len < 8 {
                    // Last-Stream-ID, then the error code.
                    let take = (8 - self.param_len).min(n);
                    self.param[self.param_len..self.param_len + take]
                        .copy_from_slice(&data[..take]);
                    self.param_len += take;
                    if self.param_len == 8 {
                        let p = &self.param;
                        let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                        if code == u32::from(h2::Reason::ENHANCE_YOUR_CALM) {
                            self.shared.calmed.store(true, Relaxed);
                        }
                    }
                }
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

impl Drop for Frames {
    fn drop(&mut self) {
        // The connection ended: if it had not sent its SETTINGS, its opening failed.
        if self.first {
            self.shared.update(|s| s.ended = true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
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
            let shared = Arc::new(ConnShared::new(100));
            let allowed = Arc::new(AtomicU32::new(100));
            let mut f = Frames::new(shared.clone(), allowed.clone());
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
        let shared = Arc::new(ConnShared::new(1));
        let mut f = Frames::new(shared.clone(), Arc::new(AtomicU32::new(1)));
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
