//! Load generation: closed loop (`-n` requests over `-c` connections, the original experiment)
//! and open loop (`--rate` requests per second, latency measured from each request's scheduled
//! send time so a stalled server cannot hide behind waiting clients — no coordinated omission).
//!
//! Each of the `-c` workers owns one HTTP/1.1 connection (kept alive unless `keepalive` is off)
//! and takes request tickets from a shared counter, so no lock is taken per request.
//!
//! Open loop runs like wrk2: a few threads, each with its own single-threaded runtime, an equal
//! share of the connections and of the rate, and its own pacer — on Linux a periodic `timerfd`
//! in the thread's own event loop, so requests leave at their scheduled times to the
//! microsecond. tokio's timer has 1 ms slots: paced by it, requests would leave in bursts once a
//! millisecond and each would wait up to a millisecond past its scheduled time, all counted as
//! latency; a pacer thread of its own would cost a cross-thread wake-up per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use http::Uri;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::BenchConfig;
pub use crate::worker::instance_of;
use crate::worker::{Seqs, Worker};

/// How a request ended without a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The connection could not be opened (refused, unreachable).
    Connect,
    /// No complete response within the timeout (includes connect timeouts).
    Timeout,
    /// The connection broke before the response was complete.
    Reset,
}

impl ErrorKind {
    /// Name used in tables and CSV.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
        }
    }
}

/// One request's record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Order in which the request was scheduled.
    pub seq: u64,
    /// Scheduled (open loop) or actual (closed loop) send time since the run started, µs.
    pub start_us: u64,
    /// Time to the end of the response body (or the failure) from `start_us`, µs.
    pub latency_us: u64,
    /// Open loop: how long after `start_us` the request actually left, waiting for a free
    /// connection or for the generator itself (part of `latency_us`), µs; 0 in closed loop.
    pub lag_us: u64,
    /// The HTTP status, or why there was none.
    pub outcome: Result<u16, ErrorKind>,
    /// The instance that answered, from `"instance_id"` in a JSON body.
    pub instance: Option<Arc<str>>,
}

/// All records of one path plus its wall time.
pub struct PathRun {
    /// The path.
    pub path: String,
    /// Records sorted by `seq`.
    pub records: Vec<Record>,
    /// From the first send to the last completion.
    pub wall: Duration,
    /// Paced at a fixed rate (records carry `lag_us`).
    pub open_loop: bool,
}

/// Runs the load for one path.
pub async fn run_path(
    cfg: &BenchConfig,
    path: &str,
    progress: Option<&indicatif::ProgressBar>,
) -> PathRun {
    let uri: Uri = format!("{}{}", cfg.target.trim_end_matches('/'), path)
        .parse()
        .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/"));
    let total = cfg.total_requests();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let mut all: std::pin::Pin<Box<dyn Future<Output = Vec<Record>> + Send>> = match cfg.rate {
        Some(rate) => Box::pin(open_loop(cfg, &uri, rate, total, start, deadline, &done)),
        None => Box::pin(closed_loop(cfg, &uri, total, start, deadline, &done)),
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let mut ticks = 0u64;
    let mut records = loop {
        tokio::select! {
            records = &mut all => break records,
            _ = ticker.tick() => {
                ticks += 1;
                let n = done.load(Relaxed);
                match progress {
                    Some(p) => p.set_position(n),
                    // Not a terminal: a plain line a second.
                    None if ticks.is_multiple_of(5) => match total {
                        Some(t) => eprintln!("fleetlb bench: {path}: {n}/{t}"),
                        None => eprintln!("fleetlb bench: {path}: {n}"),
                    },
                    None => {}
                }
            }
        }
    };
    let wall = records
        .iter()
        .map(|r| r.start_us + r.latency_us)
        .max()
        .map(Duration::from_micros)
        .unwrap_or_default();
    records.sort_by_key(|r| r.seq);
    if let Some(p) = progress {
        p.set_position(done.load(Relaxed));
    }
    PathRun {
        path: path.to_string(),
        records,
        wall,
        open_loop: cfg.rate.is_some(),
    }
}

/// Closed loop: `concurrency` workers on the caller's runtime, each sending its next request as
/// soon as the last one is answered.
fn closed_loop(
    cfg: &BenchConfig,
    uri: &Uri,
    total: Option<u64>,
    start: Instant,
    deadline: Option<Instant>,
    done: &Arc<AtomicU64>,
) -> impl Future<Output = Vec<Record>> + use<> {
    let ticket = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..cfg.concurrency.max(1) {
        let w = Worker::new(uri, cfg.keepalive, cfg.timeout);
        let seqs = Seqs {
            ticket: ticket.clone(),
            total,
            stride: 1,
            offset: 0,
            rate: None,
        };
        workers.spawn(w.run(start, seqs, done.clone(), None, deadline));
    }
    collect(workers)
}

/// Every worker's records, as the workers finish.
async fn collect(mut workers: JoinSet<Vec<Record>>) -> Vec<Record> {
    let mut records = Vec::new();
    while let Some(r) = workers.join_next().await {
        if let Ok(mut rs) = r {
            records.append(&mut rs);
        }
    }
    records
}

/// Requests per second one open-loop thread is given before another is added.
const RATE_PER_THREAD: f64 = 25_000.0;

/// Open loop: `threads` shards (one per 25 000 req/s, at most one per core), shard `i` sending
/// requests `i, i + threads, i + 2 * threads, ...`, request `seq` scheduled at
/// `start + seq / rate`, over its share of the connections.
fn open_loop(
    cfg: &BenchConfig,
    uri: &Uri,
    rate: f64,
    total: Option<u64>,
    start: Instant,
    deadline: Option<Instant>,
    done: &Arc<AtomicU64>,
) -> impl Future<Output = Vec<Record>> + use<> {
    // The CLI's range; outside it the schedule's times would overflow.
    let rate = if rate.is_nan() {
        1.0
    } else {
        rate.clamp(0.001, 10_000_000.0)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let concurrency = cfg.concurrency.max(1);
    let threads = ((rate / RATE_PER_THREAD).ceil() as usize).clamp(1, cores.min(concurrency));
    let mut shards = Vec::with_capacity(threads);
    for i in 0..threads {
        let workers: Vec<Worker> = (0..concurrency / threads
            + usize::from(i < concurrency % threads))
            .map(|_| Worker::new(uri, cfg.keepalive, cfg.timeout))
            .collect();
        let seqs = Seqs {
            ticket: Arc::new(AtomicU64::new(0)),
            total,
            stride: threads as u64,
            offset: i as u64,
            rate: Some(rate),
        };
        let done = done.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shard = move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                eprintln!("fleetlb bench: cannot start a load thread's runtime");
                return;
            };
            let records = rt.block_on(shard(workers, seqs, start, deadline, done));
            let _ = tx.send(records);
        };
        match std::thread::Builder::new()
            .name(format!("fleetlb-bench-{i}"))
            .spawn(shard)
        {
            Ok(_) => shards.push(rx),
            Err(e) => eprintln!("fleetlb bench: cannot start a load thread: {e}"),
        }
    }
    async move {
        let mut records = Vec::new();
        for rx in shards {
            if let Ok(mut rs) = rx.await {
                records.append(&mut rs);
            }
        }
        records
    }
}

/// One open-loop thread: its pacer releases a permit at each of its requests' send times, the
/// first idle worker takes it; one more permit per worker at the end tells them to stop.
async fn shard(
    workers: Vec<Worker>,
    seqs: Seqs,
    start: Instant,
    deadline: Option<Instant>,
    done: Arc<AtomicU64>,
) -> Vec<Record> {
    let permits = Arc::new(Semaphore::new(0));
    let n = workers.len();
    let mut set = JoinSet::new();
    for w in workers {
        let seqs = seqs.clone();
        set.spawn(w.run(start, seqs, done.clone(), Some(permits.clone()), deadline));
    }
    // Send times of this shard: start + at(offset + k * stride), k = 0, 1, ...
    let first = seqs.at(seqs.offset).unwrap_or_default();
    let period = seqs.at(seqs.stride).unwrap_or_default();
    let count = seqs.count(deadline.map(|d| d.duration_since(start)));
    pace(&permits, start + first, period, count).await;
    permits.add_permits(n);
    collect(set).await
}

/// Releases `count` permits, one at `first`, then one every `period`.
async fn pace(permits: &Semaphore, first: Instant, period: Duration, count: u64) {
    #[cfg(target_os = "linux")]
    let released = match timerfd::pace(permits, first, period, count).await {
        Ok(()) => return,
        // No timerfd (a sandbox forbidding it): tokio's timer below, 1 ms slots.
        Err(released) => released,
    };
    #[cfg(not(target_os = "linux"))]
    let released = 0;
    coarse_pace(permits, first, period, count, released).await
}

/// [`pace`] on tokio's timer, from permit `released` on.
async fn coarse_pace(
    permits: &Semaphore,
    first: Instant,
    period: Duration,
    count: u64,
    mut released: u64,
) {
    while released < count {
        let next = first + period.saturating_mul(released.min(u32::MAX as u64) as u32);
        tokio::time::sleep_until(next).await;
        let due = (Instant::now().duration_since(first).as_secs_f64() / period.as_secs_f64())
            .floor() as u64
            + 1;
        let due = due.min(count).max(released + 1);
        permits.add_permits((due - released) as usize);
        released = due;
    }
}

#[cfg(target_os = "linux")]
mod timerfd {
    use std::time::Duration;

    use rustix::time::{
        ClockId, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec,
        clock_gettime, timerfd_create, timerfd_settime,
    };
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;
    use tokio::sync::Semaphore;
    use tokio::time::Instant;

    fn timespec(d: Duration) -> Timespec {
        Timespec {
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        }
    }

    /// [`super::pace`] on a periodic `timerfd`: each read says how many periods have passed,
    /// so a late wake-up releases every request that came due meanwhile. `Err(released)` when
    /// the timer cannot be used.
    pub(super) async fn pace(
        permits: &Semaphore,
        first: Instant,
        period: Duration,
        count: u64,
    ) -> Result<(), u64> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(|_| 0u64)?;
        // Anchored to the absolute clock, so the time this thread took to start is not a delay
        // added to every request: expirations already past are all counted by the first read.
        let (mono, now) = (clock_gettime(ClockId::Monotonic), Instant::now());
        let mono = Duration::new(mono.tv_sec as u64, mono.tv_nsec as u32);
        let at = match first.checked_duration_since(now) {
            Some(ahead) => mono + ahead,
            None => mono.saturating_sub(now - first),
        };
        let spec = Itimerspec {
            it_interval: timespec(period.max(Duration::from_nanos(1))),
            // Zero would disarm the timer.
            it_value: timespec(at.max(Duration::from_nanos(1))),
        };
        timerfd_settime(&fd, TimerfdTimerFlags::ABSTIME, &spec).map_err(|_| 0u64)?;
        // Deprecated because a raw descriptor could be closed under the reactor; an `OwnedFd`
        // moved in cannot be, which is the safe case (tokio#8587).
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(fd, Interest::READABLE).map_err(|_| 0u64)?;
        let mut released = 0u64;
        while released < count {
            let Ok(mut ready) = fd.readable().await else {
                return Err(released);
            };
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations)?)) {
                Ok(Ok(8)) => {
                    // One read takes every expiration so far: nothing is left to read.
                    ready.clear_ready();
                    let k = u64::from_ne_bytes(expirations).min(count - released);
                    permits.add_permits(k as usize);
                    released += k;
                }
                Ok(Err(e)) if e.kind() != std::io::ErrorKind::Interrupted => return Err(released),
                _ => {}
            }
        }
        Ok(())
    }
}
