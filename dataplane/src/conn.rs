//! One client connection's timers and bounds (see `limits`): what the connection is waiting for,
//! since when, and who is to blame when it waits too long.
//!
//! - [`ConnState`] is shared by the connection's driver, its requests and their response bodies
//!   (and a WebSocket tunnel made from it). It holds the connection's slot of
//!   `--max-connections` and counts in `fleetlb_connections_active` until the last of them is
//!   gone, so a tunnel is a connection like any other.
//! - [`ClientIo`] wraps the socket: it notes the first byte of each request head and how long a
//!   write has been waiting for the client, and cuts a reader slower than the minimum rate.
//! - [`drive`] runs the connection beside one timer that wakes at the next deadline: head,
//!   keep-alive idle, a response the client does not take, an HTTP/2 client resetting streams
//!   faster than it completes them, the drain.
//!
//! Only a client's own doing ends its connection here; no endpoint is ever blamed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};

use crate::Shared;
use crate::limits::Limits;

/// What a listener's connections are told about its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Serving,
    /// No new requests: finish what runs, then close.
    Draining,
    /// The drain is over: close now.
    Closing,
}

/// What one listener shares with its connections and tunnels.
pub(crate) struct ListenerCtl {
    pub phase: watch::Receiver<Phase>,
    /// The phase is past `Serving` (read on every HTTP/1.1 answer, which then says
    /// `Connection: close`).
    pub draining: AtomicBool,
    /// Every connection and tunnel task, so the drain can wait for them.
    pub tasks: tokio_util::task::TaskTracker,
}

/// Length of the windows over which the minimum rates are averaged.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(10);

/// One client connection's shared state. Times are `Clock` nanoseconds; 0 means "not set".
pub(crate) struct ConnState {
    shared: Arc<Shared>,
    pub ctl: Arc<ListenerCtl>,
    _permit: OwnedSemaphorePermit,
    /// Requests whose response has not ended (their body is still being sent).
    active: AtomicU32,
    /// When `active` last fell to 0.
    idle_since: AtomicU64,
    /// First byte of a request head not yet dispatched.
    head_since: AtomicU64,
    /// The client speaks HTTP/2.
    pub h2: AtomicBool,
    /// A write of ours has waited for the client since then; when such a wait last ended.
    write_wait_since: AtomicU64,
    written_at: AtomicU64,
    /// When the waiting write, if it still waits then, puts the client below the minimum rate
    /// (0: it cannot, or nothing waits).
    rate_deadline: AtomicU64,
    /// HTTP/1: response body bytes handed to the server and not yet written to the socket
    /// (it counts every byte written, so head and framing bytes make this an underestimate,
    /// never an overestimate); and the body waiting for it to fall to 0 (see
    /// [`ConnState::hold_body`]). Only the connection's own task touches either.
    ahead: AtomicU64,
    body_waker: futures::task::AtomicWaker,
    /// HTTP/1: how many bytes to ask the upstream for next ([`ConnState::read_hint`]), and
    /// whether the chunk last handed had to wait for the client.
    read_size: AtomicU32,
    waited: AtomicBool,
    /// HTTP/2 streams whose last response chunk the client has not taken yet: (stream,
    /// since when); a client that reads some streams and starves others is still caught.
    handed: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Numbers the streams of `handed`.
    streams: AtomicU64,
    /// Streams the client reset before their answer, in all and in the current window.
    resets: AtomicU32,
    completed: AtomicU32,
    window_resets: AtomicU32,
    window_start: AtomicU64,
    /// The client broke a rule (rapid reset, a slow read): close now.
    abusive: AtomicBool,
    /// It was cut for reading too slowly: the socket is reset, not closed.
    reset: AtomicBool,
    /// Wakes the driver: the client broke a rule, or a request slot freed.
    pub wake: Notify,
    /// The connection's own loop hands the socket over for upgrades (`ClientUpgrade::Handed`),
    /// and where to.
    pub hands_upgrades: bool,
    upgrade: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Box<dyn ClientStream>>>>,
    slot_freed: Notify,
}

impl ConnState {
    pub fn new(
        shared: &Arc<Shared>,
        permit: OwnedSemaphorePermit,
        ctl: Arc<ListenerCtl>,
        hands_upgrades: bool,
    ) -> Self {
        let now = shared.clock.now().max(1);
        shared.metrics.connections_active.inc();
        Self {
            shared: shared.clone(),
            ctl,
            _permit: permit,
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(now),
            h2: AtomicBool::new(false),
            write_wait_since: AtomicU64::new(0),
            written_at: AtomicU64::new(0),
            rate_deadline: AtomicU64::new(0),
            ahead: AtomicU64::new(0),
            body_waker: futures::task::AtomicWaker::new(),
            read_size: AtomicU32::new(crate::h1::READ_CHUNK as u32),
            waited: AtomicBool::new(false),
            handed: std::sync::Mutex::default(),
            streams: AtomicU64::new(0),
            resets: AtomicU32::new(0),
            completed: AtomicU32::new(0),
            window_resets: AtomicU32::new(0),
            window_start: AtomicU64::new(now),
            abusive: AtomicBool::new(false),
            reset: AtomicBool::new(false),
            wake: Notify::new(),
            hands_upgrades,
            upgrade: std::sync::Mutex::default(),
            slot_freed: Notify::new(),
        }
    }

    /// The proxy's limits (see `limits`).
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    fn now(&self) -> u64 {
        self.shared.clock.now().max(1)
    }

    /// The first byte of the connection arrived: the head timer runs from here (through a TLS
    /// handshake).
    pub fn first_byte(&self) {
        self.head_since.store(self.now(), Relaxed);
    }

    /// When the first request's head (and the TLS handshake before it) must be complete.
    pub fn head_deadline(&self) -> tokio::time::Instant {
        self.shared
            .clock
            .instant(self.head_since.load(Relaxed) + self.limits().head_timeout.as_nanos() as u64)
    }

    /// A request's head was read: it holds one of the connection's request slots (at most
    /// `max_upstream_per_connection`; a request that finds none waits up to the endpoint queue
    /// time) until its [`Active`] guard goes. `None`: no slot freed in time.
    pub async fn begin(self: &Arc<Self>, h2: bool) -> Option<Active> {
        if h2 && !self.h2.load(Relaxed) {
            self.h2.store(true, Relaxed);
        }
        self.head_since.store(0, Relaxed);
        let cap = self.limits().max_upstream_per_connection;
        let wait = self.limits().endpoint_queue_timeout;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.slot_freed.notified();
            let n = self.active.load(Relaxed);
            if n < cap {
                if self
                    .active
                    .compare_exchange(n, n + 1, Relaxed, Relaxed)
                    .is_ok()
                {
                    return Some(Active {
                        conn: self.clone(),
                        answered: false,
                        handed: None,
                        log: None,
                    });
                }
                continue;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                self.limit_hit("max-upstream-per-connection");
                return None;
            }
        }
    }

    /// No request in progress and nothing left to write: the last answer has gone out whole
    /// (the body can end while its tail still waits for a slow reader in the socket).
    fn quiet(&self) -> bool {
        self.active.load(Relaxed) == 0 && self.write_wait_since.load(Relaxed) == 0
    }

    /// The upgrade waiting for this connection's socket, if a `101` went out.
    pub fn take_upgrade(&self) -> Option<tokio::sync::oneshot::Sender<Box<dyn ClientStream>>> {
        self.upgrade
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Counts a limit that cut a client off (`fleetlb_limit_hits_total{limit}`).
    pub fn limit_hit(&self, flag: &'static str) {
        self.shared
            .metrics
            .limit_hits
            .with_label_values(&[flag])
            .inc();
    }

    /// The client's doing is beyond what is tolerated: close the connection.
    fn abuse(&self, flag: &'static str) {
        if !self.abusive.swap(true, Relaxed) {
            self.limit_hit(flag);
            tracing::debug!(limit = flag, "closing a client connection");
        }
        self.wake.notify_one();
    }

    /// What the driver should do now, and when to look again.
    fn verdict(&self) -> Verdict {
        let l = self.limits();
        let now = self.now();
        let ns = |d: Duration| d.as_nanos() as u64;
        if self.abusive.load(Relaxed) {
            return Verdict::Abusive;
        }
        let mut next = now + ns(l.keepalive_timeout.min(l.send_timeout));
        let wait = self.write_wait_since.load(Relaxed);
        if wait != 0 {
            let end = wait + ns(l.send_timeout);
            if now >= end {
                self.reset.store(true, Relaxed);
                self.limit_hit("client-send-timeout");
                return Verdict::Close;
            }
            next = next.min(end);
            // A write that waits out the rest of the rate window takes the client below the
            // minimum rate even though it never completes (a reader that takes a few bytes at
            // a time never frees enough of the socket's buffer for the write to go on).
            let slow = self.rate_deadline.load(Relaxed);
            if slow != 0 {
                if now >= slow {
                    self.reset.store(true, Relaxed);
                    self.limit_hit("client-min-rate");
                    return Verdict::Close;
                }
                next = next.min(slow);
            }
        }
        let oldest = if self.h2.load(Relaxed) {
            let handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            handed.iter().map(|&(_, since)| since).min()
        } else {
            None
        };
        if let Some(since) = oldest {
            let end = since + ns(l.send_timeout);
            if now >= end {
                // No reset: the streams the client does read keep what was queued for them.
                self.limit_hit("client-send-timeout");
                return Verdict::Close;
            }
            next = next.min(end);
        }
        if self.quiet() {
            let head = self.head_since.load(Relaxed);
            if head != 0 {
                let end = head + ns(l.head_timeout);
                if now >= end {
                    self.limit_hit("client-head-timeout");
                    return Verdict::Close;
                }
                next = next.min(end);
            } else {
                let since = self
                    .idle_since
                    .load(Relaxed)
                    .max(self.written_at.load(Relaxed));
                let draining = self.ctl.draining.load(Relaxed);
                let keepalive = if draining {
                    l.keepalive_timeout.min(DRAIN_IDLE)
                } else {
                    l.keepalive_timeout
                };
                let end = since + ns(keepalive);
                if now >= end {
                    if !draining {
                        self.limit_hit("client-keepalive-timeout");
                    }
                    return Verdict::Idle;
                }
                next = next.min(end);
            }
        }
        Verdict::Wait(self.shared.clock.instant(next))
    }

    /// Bytes arrived: the first of a new request head starts the head timer (HTTP/1; an
    /// HTTP/2 connection's frames between requests are pings and settings, not a head).
    fn on_read(&self) {
        if self.active.load(Relaxed) == 0
            && self.head_since.load(Relaxed) == 0
            && self.write_wait_since.load(Relaxed) == 0
            && !self.h2.load(Relaxed)
        {
            self.head_since.store(self.now(), Relaxed);
            self.wake.notify_one();
        }
    }

    /// A write waits for the client; `rate_left`: the time after which, if it still waits,
    /// the client is below the minimum rate.
    fn on_write_wait(&self, rate_left: Option<Duration>) {
        if self.write_wait_since.load(Relaxed) == 0 {
            let now = self.now();
            let slow = rate_left.map_or(0, |d| now + d.as_nanos() as u64);
            self.rate_deadline.store(slow, Relaxed);
            self.write_wait_since.store(now, Relaxed);
            self.wake.notify_one();
        }
    }

    /// `n` bytes went out on the socket.
    fn on_write_progress(&self, n: usize) {
        let ahead = self.ahead.load(Relaxed);
        if ahead != 0 {
            let left = ahead.saturating_sub(n as u64);
            self.ahead.store(left, Relaxed);
            if left == 0 {
                self.body_waker.wake();
            }
        }
        if self.write_wait_since.load(Relaxed) != 0 {
            // A wait ended: the idle timers run from here, not from when the body ended.
            self.written_at.store(self.now(), Relaxed);
            self.write_wait_since.store(0, Relaxed);
            self.rate_deadline.store(0, Relaxed);
            self.wake.notify_one();
        }
    }

    /// HTTP/1: true while the last chunk of response body handed to the server is not all
    /// written yet; the body is read further (from the upstream) only once it is, and the task
    /// is woken then. What waits to be sent is thus at most one chunk, never the server's whole
    /// write buffer (64 KiB): a slow reader holds a few KiB, not tens, and a fast one is
    /// served as before (each chunk is written as it is read).
    pub fn hold_body(&self, cx: &Context<'_>) -> bool {
        if self.ahead.load(Relaxed) == 0 {
            return false;
        }
        self.body_waker.register(cx.waker());
        let held = self.ahead.load(Relaxed) != 0;
        if held {
            self.waited.store(true, Relaxed);
        }
        held
    }

    /// The response body handed `n` bytes to the server (HTTP/1).
    pub fn body_handed(&self, n: usize) {
        if !self.h2.load(Relaxed) {
            self.ahead.fetch_add(n as u64, Relaxed);
            // A client that kept the last chunk waiting gets the next one half as big (down
            // to 1 KiB), one that did not, twice (up to a full read): what waits for a slow
            // reader is a small buffer, not a full one, and a fast one reads full chunks.
            let size = self.read_size.load(Relaxed);
            let next = if self.waited.swap(false, Relaxed) {
                (size / 2).max(MIN_READ)
            } else {
                (size * 2).min(crate::h1::READ_CHUNK as u32)
            };
            self.read_size.store(next, Relaxed);
        }
    }

    /// HTTP/1: how many bytes of response body to ask the upstream for next.
    pub fn read_hint(&self) -> usize {
        self.read_size.load(Relaxed) as usize
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.shared.metrics.connections_active.dec();
    }
}

/// The smallest upstream read for a slow reader.
const MIN_READ: u32 = 1024;

enum Verdict {
    Wait(tokio::time::Instant),
    /// The client broke a rule: HTTP/2 gets a GOAWAY, then the connection closes.
    Abusive,
    /// Idle: close gracefully (HTTP/2: GOAWAY).
    Idle,
    Close,
}

/// One request of a connection, from its head until its response has ended (it rides in the
/// response body) or the client gave up on it. Counts the request slot, and for HTTP/2 the
/// resets a client makes.
pub(crate) struct Active {
    conn: Arc<ConnState>,
    /// A response was produced (the client did not reset the stream before it).
    answered: bool,
    /// HTTP/2: a chunk was handed to the client and it has not come back for more (this
    /// stream's number in `ConnState::handed`).
    handed: Option<u64>,
    /// Its access-log line, sent when the request ends (`--access-log`).
    log: Option<Box<crate::access_log::Entry>>,
}

impl Active {
    pub fn conn(&self) -> &Arc<ConnState> {
        &self.conn
    }

    /// Starts this request's access-log line (sent when the request ends).
    pub fn set_log(&mut self, entry: Box<crate::access_log::Entry>) {
        self.log = Some(entry);
    }

    /// This request's access-log line, while it is being filled in.
    pub fn log_mut(&mut self) -> Option<&mut crate::access_log::Entry> {
        self.log.as_deref_mut()
    }

    /// `n` response body bytes went to the client.
    pub fn sent(&mut self, n: usize) {
        if let Some(log) = &mut self.log {
            log.bytes_out += n as u64;
        }
    }

    /// The response was sent to its end.
    pub fn finished(&mut self) {
        if let Some(log) = &mut self.log {
            log.complete = true;
        }
    }

    /// The service produced its response; `client_gone`: because the client reset the stream
    /// (or went away) first, which counts as a reset, not a completed request.
    pub fn answered(&mut self, client_gone: bool) {
        if !client_gone {
            self.answered = true;
            self.conn.completed.fetch_add(1, Relaxed);
        }
    }

    /// The response body handed a chunk to an HTTP/2 client (it is the client's turn).
    pub fn hand(&mut self) {
        if self.handed.is_none() && self.conn.h2.load(Relaxed) {
            let id = self.conn.streams.fetch_add(1, Relaxed);
            self.handed = Some(id);
            self.conn
                .handed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, self.conn.now()));
            self.conn.wake.notify_one();
        }
    }

    /// The client came back for more.
    pub fn taken(&mut self) {
        if let Some(id) = self.handed.take() {
            self.conn
                .handed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|&(stream, _)| stream != id);
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.taken();
        let c = &self.conn;
        if let Some(mut log) = self.log.take()
            && let Some(access_log) = &c.shared.config.access_log
        {
            log.duration = log.started.elapsed();
            if !access_log.send(log) {
                c.shared.metrics.access_log_dropped.inc();
            }
        }
        if c.active.fetch_sub(1, Relaxed) == 1 {
            c.idle_since.store(c.now(), Relaxed);
            c.wake.notify_one();
        }
        c.slot_freed.notify_one();
        if self.answered || !c.h2.load(Relaxed) {
            return;
        }
        // An HTTP/2 stream the client reset before its answer.
        let now = c.now();
        let total = c.resets.fetch_add(1, Relaxed) + 1;
        let start = c.window_start.load(Relaxed);
        let in_window = if now.saturating_sub(start) > RATE_WINDOW.as_nanos() as u64 {
            c.window_start.store(now, Relaxed);
            c.window_resets.store(1, Relaxed);
            1
        } else {
            c.window_resets.fetch_add(1, Relaxed) + 1
        };
        let max = c.limits().h2_max_resets;
        if in_window > max || (total > max.min(32) && total > c.completed.load(Relaxed)) {
            c.abuse("h2-max-resets");
        }
    }
}

/// A client socket that reports reads and write waits to its [`ConnState`] and cuts a reader
/// slower than `--client-min-rate`: over 10 s spent waiting for it to take bytes (a run of
/// writes that each had to wait), it must take at least that rate. A write that goes out at
/// once ends the run: the client has caught up, and pauses of the response itself never count.
pub(crate) struct ClientIo {
    io: tokio::net::TcpStream,
    conn: Arc<ConnState>,
    /// The current run of waits: when the pending write began waiting, the time waited and
    /// the bytes taken so far.
    waiting: Option<tokio::time::Instant>,
    waited: Duration,
    taken: u64,
}

impl ClientIo {
    /// The socket, to wait on while the connection idles bare.
    pub fn socket(&self) -> &tokio::net::TcpStream {
        &self.io
    }

    pub fn new(io: tokio::net::TcpStream, conn: Arc<ConnState>) -> Self {
        Self {
            io,
            conn,
            waiting: None,
            waited: Duration::ZERO,
            taken: 0,
        }
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if self.conn.reset.load(Relaxed) {
            // Cut for reading too slowly: what is still in the socket's buffer (up to
            // megabytes) is dropped with a reset, not kept by the kernel for a reader that
            // would take it a few bytes at a time (nginx's `reset_timedout_connection`).
            let _ = self.io.set_zero_linger();
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.conn.on_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl ClientIo {
    /// Ready once the kernel takes more bytes for the client without queueing them past
    /// `TCP_NOTSENT_LOWAT`. Asked before the next response chunk is read from the upstream, so
    /// that for a client slower than its upstream the bytes wait in the kernel, not in a
    /// buffer of fleetlb's (the send timer and the minimum rate run as for a write that
    /// waits). One `poll` system call per chunk after the first.
    pub fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use rustix::event::{PollFd, PollFlags};
        let room = |io: &tokio::net::TcpStream| -> io::Result<bool> {
            let mut fds = [PollFd::new(io, PollFlags::OUT)];
            rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default()))?;
            Ok(fds[0]
                .revents()
                .intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP))
        };
        loop {
            if self.io.poll_write_ready(cx)?.is_pending() {
                // The wait counts like a write's: the same timers.
                return self.wrote(Poll::Pending).map_ok(|_| ());
            }
            if !room(&self.io)? {
                // tokio still takes the socket for writable (its last write went through):
                // clear that, then look again, so a change in between is not missed; then
                // wait.
                let _ = self.io.try_io(tokio::io::Interest::WRITABLE, || {
                    Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                });
                if !room(&self.io)? {
                    continue;
                }
            }
            self.room_again();
            return Poll::Ready(Ok(()));
        }
    }

    /// The client made room after a wait: the wait is over (what comes next may wait on the
    /// upstream, which is never the client's time). The time waited stays in the current run
    /// of waits, so a reader that frees room only now and then is still judged on its rate.
    fn room_again(&mut self) {
        if let Some(since) = self.waiting.take() {
            self.waited += since.elapsed();
            self.conn.on_write_progress(0);
        }
    }

    /// Accounts for a write's outcome; an error when the client reads slower than allowed.
    fn wrote(&mut self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Pending => {
                if self.waiting.is_none() {
                    self.waiting = Some(tokio::time::Instant::now());
                }
                // If this write waits out the rest of the window, the run's bytes fall short; if
                // they are enough already, the next window's (which it would begin with nothing).
                let min_rate = u64::from(self.conn.limits().min_rate);
                let left = RATE_WINDOW.saturating_sub(self.waited);
                let rate_left = (min_rate > 0).then(|| {
                    if self.taken < min_rate * RATE_WINDOW.as_secs() {
                        left
                    } else {
                        left + RATE_WINDOW
                    }
                });
                self.conn.on_write_wait(rate_left);
                Poll::Pending
            }
            Poll::Ready(Ok(n)) => {
                self.conn.on_write_progress(n);
                let Some(since) = self.waiting.take() else {
                    // Out at once: the client keeps up.
                    self.waited = Duration::ZERO;
                    self.taken = 0;
                    return Poll::Ready(Ok(n));
                };
                self.waited += since.elapsed();
                self.taken += n as u64;
                if self.waited >= RATE_WINDOW {
                    let floor = u64::from(self.conn.limits().min_rate) * self.waited.as_secs();
                    if self.taken < floor {
                        self.conn.reset.store(true, Relaxed);
                        self.conn.abuse("client-min-rate");
                        return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                    }
                    self.waited = Duration::ZERO;
                    self.taken = 0;
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Time an HTTP/2 connection told to go away (idle, drained, abusive) has before it is closed.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// Time an abusive HTTP/2 client has to read its GOAWAY before the connection is closed.
const ABUSE_GRACE: Duration = Duration::from_millis(100);

/// How [`drive`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The connection finished on its own.
    Done,
    /// fleetlb closed it: a limit, or the drain is over.
    Closed,
}

/// Runs `conn` until it ends, the client breaks a limit, or the listener's drain is over.
pub(crate) async fn drive<C: Future + Unpin>(
    conn: &mut C,
    graceful: impl Fn(Pin<&mut C>),
    state: &ConnState,
) -> Ended {
    let mut conn = Pin::new(conn);
    let mut phase = state.ctl.phase.clone();
    // Draining: HTTP/2 gets its GOAWAY at once. An HTTP/1.1 connection is not closed under a
    // client that may be sending its next request: each answer says `Connection: close`, and
    // one that idles [`DRAIN_IDLE`] is closed (the idle verdict).
    let mut going = false;
    if *phase.borrow_and_update() != Phase::Serving && state.h2.load(Relaxed) {
        going = true;
        graceful(conn.as_mut());
    }
    let timer = tokio::time::sleep(Duration::ZERO);
    let mut timer = std::pin::pin!(timer);
    let mut close_at: Option<tokio::time::Instant> = None;
    loop {
        // Look first, so a deadline set by a read or a reset is never missed.
        let wake = state.wake.notified();
        let now = tokio::time::Instant::now();
        let mut at = now + Duration::from_secs(3600);
        match state.verdict() {
            Verdict::Close => return Ended::Closed,
            Verdict::Abusive if !state.h2.load(Relaxed) => return Ended::Closed,
            Verdict::Abusive => {
                if !going {
                    going = true;
                    graceful(conn.as_mut());
                }
                let c = *close_at.get_or_insert(now + ABUSE_GRACE);
                if now >= c {
                    return Ended::Closed;
                }
            }
            Verdict::Idle => {
                if !going {
                    going = true;
                    graceful(conn.as_mut());
                }
                let c = *close_at.get_or_insert(now + GOAWAY_GRACE);
                if now >= c {
                    return Ended::Closed;
                }
            }
            Verdict::Wait(next) => {
                at = next;
            }
        }
        if let Some(c) = close_at {
            at = at.min(c);
        }
        timer.as_mut().reset(at);
        tokio::select! {
            _ = conn.as_mut() => return Ended::Done,
            () = wake => {}
            () = timer.as_mut() => {}
            changed = phase.changed() => {
                let now = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Closing };
                match now {
                    Phase::Closing => return Ended::Closed,
                    Phase::Draining if !going && state.h2.load(Relaxed) => {
                        going = true;
                        graceful(conn.as_mut());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Waits, holding only the socket, for the next request on an idle HTTP/1.1 connection whose
/// HTTP machinery was let go: `true` once bytes (or the client's close) arrive, `false` when a
/// timer or the drain closes it first.
pub(crate) async fn idle(state: &ConnState, socket: &tokio::net::TcpStream) -> bool {
    state.shared.metrics.connections_parked.inc();
    let arrived = readable(state, socket).await;
    state.shared.metrics.connections_parked.dec();
    if arrived {
        // The next head begins (or the client closed): its timer runs from here.
        state.first_byte();
    }
    arrived
}

/// Reads an HTTP/1 request head (to its blank line, or `limit` bytes) into what `io` gives back
/// first, before hyper's buffers (16 KiB) are made for it: a client that sends its head slowly
/// (slowloris) holds a buffer the size of what it sent, a few hundred bytes. The head timer,
/// the drain and the keep-alive rules apply as when parked. `false`: the connection is over
/// (the client closed or went silent, or the drain).
pub(crate) async fn head(state: &ConnState, io: &mut Rewind<ClientIo>, limit: usize) -> bool {
    let mut buf = Vec::from(std::mem::take(&mut io.pre));
    let socket = io.io.socket();
    while buf.len() < limit && head_partial(&buf) {
        buf.reserve_exact(HEAD_READ.min(limit - buf.len()));
        match socket.try_read_buf(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !readable(state, socket).await {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    io.pre = bytes::Bytes::from(buf);
    true
}

/// Waits, holding only the socket, until bytes (or the client's close) arrive: `false` when
/// a timer of the connection or the drain ends it first.
async fn readable(state: &ConnState, socket: &tokio::net::TcpStream) -> bool {
    let mut phase = state.ctl.phase.clone();
    let now = *phase.borrow_and_update();
    if now == Phase::Closing {
        return false;
    }
    // A future of its own rather than `select!` over three: every parked connection holds it.
    // While draining, a parked connection still takes its next request (answered with
    // `Connection: close`) until it has idled [`DRAIN_IDLE`].
    Parked {
        state,
        socket,
        phase: Box::pin(async move {
            if now == Phase::Serving {
                let _ = phase.wait_for(|p| *p != Phase::Serving).await;
            }
            let _ = phase.wait_for(|p| *p == Phase::Closing).await;
        }),
        sleep: None,
        draining: now != Phase::Serving,
    }
    .await
}

/// How long a draining HTTP/1.1 connection may idle before it is closed: enough for a client
/// that sends request after request to send its next one (and get `Connection: close`), short
/// against the drain.
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Bytes asked of the socket per read while a head is gathered.
const HEAD_READ: usize = 1024;

/// The bytes are the beginning of a request head that is not complete yet. A complete head, or
/// bytes that are no request head at all, go to hyper at once (which answers what it cannot
/// parse with a 400).
fn head_partial(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; crate::h1::MAX_HEADERS];
    matches!(
        httparse::Request::new(&mut headers).parse(buf),
        Ok(httparse::Status::Partial)
    )
}

/// See [`idle`]: the socket's readiness, the drain's signal and the connection's next
/// deadline, polled by hand.
struct Parked<'a> {
    state: &'a ConnState,
    socket: &'a tokio::net::TcpStream,
    phase: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The drain had begun when it parked (its idle deadline is the drain's).
    draining: bool,
}

impl Future for Parked<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.get_mut();
        if let Poll::Ready(r) = this.socket.poll_read_ready(cx) {
            return Poll::Ready(r.is_ok());
        }
        if this.phase.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        if !this.draining && this.state.ctl.draining.load(Relaxed) {
            // The drain began: the idle deadline just got shorter.
            this.draining = true;
            this.sleep = None;
        }
        loop {
            let at = match this.state.verdict() {
                Verdict::Wait(at) => at,
                _ => return Poll::Ready(false),
            };
            if poll_deadline(&mut this.sleep, at, cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// Polls the timer in `slot` set for `at`: made on first use, moved when `at` moved, so one
/// allocation serves a timer that is re-armed many times.
pub(crate) fn poll_deadline(
    slot: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    at: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if sleep.deadline() != at {
        sleep.as_mut().reset(at);
    }
    sleep.as_mut().poll(cx)
}

/// The client's side of a WebSocket upgrade, once its `101` has gone out.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientStream for T {}

/// Where the upgraded client connection comes from: hyper (HTTP/1.1 over TLS), or fleetlb's
/// own HTTP/1.1 loop, which hands the socket over once the `101` is written.
pub(crate) enum ClientUpgrade {
    Hyper(hyper::upgrade::OnUpgrade),
    Handed(tokio::sync::oneshot::Receiver<Box<dyn ClientStream>>),
}

impl ClientUpgrade {
    /// For `req` on `conn`: from hyper, or from the connection's own loop.
    pub fn of<B>(req: &mut http::Request<B>, conn: &ConnState) -> Self {
        if conn.hands_upgrades {
            let (tx, rx) = tokio::sync::oneshot::channel();
            *conn.upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
            ClientUpgrade::Handed(rx)
        } else {
            ClientUpgrade::Hyper(hyper::upgrade::on(req))
        }
    }

    /// The client's connection, after the `101`.
    pub async fn stream(self) -> io::Result<Box<dyn ClientStream>> {
        match self {
            ClientUpgrade::Hyper(on) => {
                let up = on.await.map_err(io::Error::other)?;
                Ok(Box::new(hyper_util::rt::TokioIo::new(up)))
            }
            ClientUpgrade::Handed(rx) => rx
                .await
                .map_err(|_| io::Error::other("the connection ended before the upgrade")),
        }
    }
}

/// Bytes already read from a socket, given back before it is read again.
pub(crate) struct Rewind<I> {
    pre: bytes::Bytes,
    pub io: I,
}

impl<I> Rewind<I> {
    pub fn new(pre: bytes::Bytes, io: I) -> Self {
        Self { pre, io }
    }

    /// Nothing read ahead is left.
    pub fn pre_is_empty(&self) -> bool {
        self.pre.is_empty()
    }

    /// What was read ahead, taken out.
    pub fn take_pre(&mut self) -> bytes::Bytes {
        std::mem::take(&mut self.pre)
    }

    /// Gives back bytes read ahead (the start of the next request).
    pub fn set_pre(&mut self, pre: bytes::Bytes) {
        self.pre = pre;
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::head_partial;

    #[test]
    fn a_head_is_gathered_until_it_is_whole_or_no_head() {
        for (bytes, partial) in [
            (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], false),
            (b"GET / HTTP/1.1\nHost: x\n\n", false),
            (b"GET / HTTP/1.1\r\nHost: x\n\r\n", false),
            (b"GET / HTTP/1.1\r\n\r\nbody bytes", false),
            (b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", false),
            (b"", true),
            (b"\r\n\r\n", true),
            (b"\r\n\r\nGET / HT", true),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", true),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r", true),
            // Not HTTP: hyper answers it at once, nothing is gathered.
            (b"\0\0\0\0", false),
            (b"GET / HTTP/1.1\r\nbad header\r\n", false),
        ] {
            assert_eq!(head_partial(bytes), partial, "{bytes:?}");
        }
    }
}
