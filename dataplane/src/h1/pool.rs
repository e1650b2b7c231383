//! Idle keep-alive connections, per endpoint and per runtime.
//!
//! A tokio socket belongs to the runtime that opened it. Each proxy thread runs its own
//! runtime, so each has its own idle list (taken without contention: only that thread locks
//! it); every other thread (the main runtime: probes, `Dataplane::serve`) shares list 0. A
//! connection therefore never moves between runtimes.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes asked of the socket per read.
pub(crate) const READ_CHUNK: usize = 8 * 1024;
/// Most idle connections kept per endpoint and list.
pub(crate) const MAX_IDLE: usize = 256;

/// An upstream connection and its read buffer.
pub(crate) struct Conn {
    pub io: TcpStream,
    pub buf: BytesMut,
    idle_since: Instant,
}

impl Conn {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            idle_since: Instant::now(),
        }
    }

    /// Fit for another request: idle for less than `max_idle` and still open.
    fn reusable(&self, max_idle: Duration) -> bool {
        self.idle_since.elapsed() < max_idle && self.alive()
    }

    /// Reads what the socket has into the buffer (at least `READ_CHUNK` of room); 0 at EOF.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.poll_read_sized(cx, READ_CHUNK)
    }

    /// Reads at most about `want` bytes. Below `READ_CHUNK` (a slow reader's body) an empty
    /// buffer is replaced by one of that size, so the chunk that waits for the reader holds a
    /// small allocation, not a full one (the full one is freed with the chunk it was split into).
    pub fn poll_read_sized(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        let cap = self.buf.capacity();
        if want < READ_CHUNK && self.buf.is_empty() && (cap < want || cap > 2 * want) {
            self.buf = BytesMut::with_capacity(want);
        } else {
            self.buf.reserve(want);
        }
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

/// An endpoint's idle connections, one list per runtime (see the module comment).
pub(crate) struct Pool {
    lists: Box<[Mutex<Vec<Conn>>]>,
}

/// Lists per pool: one for the main runtime and one per proxy thread the machine has cores for.
pub(crate) static LISTS: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| 1 + std::thread::available_parallelism().map_or(4, |n| n.get()));

thread_local! {
    /// This thread's list: 0 unless it is a proxy thread.
    static LIST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The calling thread's list: 0 unless it is a proxy thread (may be past `LISTS` for a proxy
/// thread beyond the machine's core count).
pub(crate) fn this_list() -> usize {
    LIST.get()
}

/// Marks the calling thread as proxy thread `n` (from 0), running a runtime of its own. A
/// proxy thread beyond the machine's core count keeps no idle connections.
pub(crate) fn enter_proxy_thread(n: usize) {
    LIST.set(n.saturating_add(1));
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            lists: (0..*LISTS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }
}

impl Pool {
    fn list(&self) -> Option<&Mutex<Vec<Conn>>> {
        self.lists.get(LIST.get())
    }

    /// The most recently used live connection idle for less than `max_idle`.
    pub fn take(&self, max_idle: Duration) -> Option<Conn> {
        let mut idle = self.list()?.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.reusable(max_idle) {
                return Some(c);
            }
        }
        None
    }

    pub fn give_back(&self, mut c: Conn) {
        let Some(list) = self.list() else { return };
        c.idle_since = Instant::now();
        // A buffer grown by an outsized head is not kept for the connection's idle life.
        if c.buf.capacity() > 4 * READ_CHUNK {
            c.buf = BytesMut::with_capacity(READ_CHUNK);
        }
        let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(c);
    }

    /// Closes idle connections older than `max_idle` or closed by the peer, in every list.
    pub fn expire(&self, max_idle: Duration) {
        for list in &self.lists {
            let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| c.reusable(max_idle));
        }
    }

    /// Idle connections kept, over every list.
    pub fn idle(&self) -> usize {
        self.lists
            .iter()
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}
