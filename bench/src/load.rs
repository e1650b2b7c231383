//! Load generation: closed loop (`-n` requests over `-c` connections, the original experiment)
//! and open loop (`--rate` requests per second, latency measured from each request's scheduled
//! send time so a stalled server cannot hide behind waiting clients — no coordinated omission).
//!
//! Each of the `-c` workers owns one HTTP/1.1 connection (kept alive unless `keepalive` is off)
//! and takes request tickets from a shared counter, so no lock is taken per request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::BenchConfig;

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
    let ticket = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let mut workers = JoinSet::new();
    for _ in 0..cfg.concurrency.max(1) {
        let w = Worker {
            uri: uri.clone(),
            keepalive: cfg.keepalive,
            timeout: cfg.timeout,
            conn: None,
            instances: HashMap::new(),
        };
        let (ticket, done) = (ticket.clone(), done.clone());
        let rate = cfg.rate;
        workers.spawn(w.run(start, ticket, done, total, rate, deadline));
    }
    let mut records = Vec::with_capacity(total.unwrap_or(1024).min(10_000_000) as usize);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            r = workers.join_next() => match r {
                Some(Ok(mut rs)) => records.append(&mut rs),
                Some(Err(_)) => {}
                None => break,
            },
            _ = ticker.tick() => {
                if let Some(p) = progress {
                    p.set_position(done.load(Relaxed));
                }
            }
        }
    }
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
    }
}

struct Worker {
    uri: Uri,
    keepalive: bool,
    timeout: Duration,
    conn: Option<SendRequest<Empty<Bytes>>>,
    instances: HashMap<String, Arc<str>>,
}

impl Worker {
    async fn run(
        mut self,
        start: Instant,
        ticket: Arc<AtomicU64>,
        done: Arc<AtomicU64>,
        total: Option<u64>,
        rate: Option<f64>,
        deadline: Option<Instant>,
    ) -> Vec<Record> {
        let mut out = Vec::new();
        loop {
            let seq = ticket.fetch_add(1, Relaxed);
            if total.is_some_and(|t| seq >= t) {
                break;
            }
            let scheduled = match rate {
                Some(r) => start + Duration::from_secs_f64(seq as f64 / r),
                None => Instant::now(),
            };
            if deadline.is_some_and(|d| scheduled >= d) {
                break;
            }
            tokio::time::sleep_until(scheduled).await;
            let (outcome, instance) = self.one().await;
            let now = Instant::now();
            out.push(Record {
                seq,
                start_us: scheduled.duration_since(start).as_micros() as u64,
                latency_us: now.duration_since(scheduled).as_micros() as u64,
                outcome,
                instance,
            });
            done.fetch_add(1, Relaxed);
        }
        out
    }

    async fn one(&mut self) -> (Result<u16, ErrorKind>, Option<Arc<str>>) {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(Ok((status, body))) => {
                let instance = instance_of(&body).map(|id| {
                    self.instances
                        .entry(id.to_string())
                        .or_insert_with(|| Arc::from(id))
                        .clone()
                });
                if !self.keepalive {
                    self.conn = None;
                }
                (Ok(status), instance)
            }
            Ok(Err(kind)) => {
                self.conn = None;
                (Err(kind), None)
            }
            Err(_) => {
                self.conn = None;
                (Err(ErrorKind::Timeout), None)
            }
        }
    }

    async fn exchange(&mut self) -> Result<(u16, Bytes), ErrorKind> {
        let ready = match self.conn.as_mut() {
            Some(c) => c.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            self.conn = Some(self.connect().await?);
        }
        let conn = self.conn.as_mut().ok_or(ErrorKind::Connect)?;
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str())
            .unwrap_or("localhost");
        let mut req = Request::get(self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(header::HOST, authority)
            .header(header::USER_AGENT, "fleetlb-bench");
        if !self.keepalive {
            req = req.header(header::CONNECTION, "close");
        }
        let req = req.body(Empty::new()).map_err(|_| ErrorKind::Reset)?;
        let resp = conn.send_request(req).await.map_err(|_| ErrorKind::Reset)?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|_| ErrorKind::Reset)?
            .to_bytes();
        Ok((status, body))
    }

    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>, ErrorKind> {
        let host = self.uri.host().unwrap_or("127.0.0.1");
        let port = self.uri.port_u16().unwrap_or(80);
        let stream = TcpStream::connect((host, port)).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                ErrorKind::Timeout
            } else {
                ErrorKind::Connect
            }
        })?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| ErrorKind::Reset)?;
        tokio::spawn(conn);
        Ok(send)
    }
}

/// The value of `"instance_id"` in a JSON body, found without parsing the whole document.
pub fn instance_of(body: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"instance_id\":\"";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &body[at..];
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::instance_of;

    #[test]
    fn finds_the_instance_id() {
        assert_eq!(
            instance_of(br#"{"cluster":"c","instance_id":"i-0abc","x":1}"#),
            Some("i-0abc")
        );
        assert_eq!(instance_of(b"plain text"), None);
    }
}
