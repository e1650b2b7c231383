//! One load-generating connection: a minimal HTTP/1.1 client (pre-built request bytes,
//! `httparse` for the response head, Content-Length, chunked or until-close bodies), so the
//! generator costs about as little per request as wrk and never becomes the bottleneck.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use http::Uri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::load::{ErrorKind, Record};

/// Which request numbers a worker takes: `offset + k * stride` for the k-th ticket of its
/// shard, below `total`; in open loop, request `seq` is due `seq / rate` after the start.
#[derive(Clone)]
pub(crate) struct Seqs {
    pub(crate) ticket: Arc<AtomicU64>,
    pub(crate) total: Option<u64>,
    pub(crate) stride: u64,
    pub(crate) offset: u64,
    pub(crate) rate: Option<f64>,
}

impl Seqs {
    /// The next request number, or `None` when all are taken.
    pub(crate) fn next(&self) -> Option<u64> {
        let k = self.ticket.fetch_add(1, Relaxed);
        let seq = k.checked_mul(self.stride)?.checked_add(self.offset)?;
        (self.total.is_none_or(|t| seq < t)).then_some(seq)
    }

    /// Open loop: when request `seq` is due, after the start (`None` past `Duration::MAX`).
    pub(crate) fn at(&self, seq: u64) -> Option<Duration> {
        Duration::try_from_secs_f64(seq as f64 / self.rate?).ok()
    }

    /// How many requests of this shard are scheduled before `within`, and below `total`.
    pub(crate) fn count(&self, within: Option<Duration>) -> u64 {
        let mut limit = self.total.unwrap_or(u64::MAX);
        if let (Some(d), Some(rate)) = (within, self.rate) {
            limit = limit.min((d.as_secs_f64() * rate).ceil() as u64);
        }
        limit.saturating_sub(self.offset).div_ceil(self.stride)
    }
}

/// One load-generating connection: a minimal HTTP/1.1 client (pre-built request bytes,
/// `httparse` for the response head, Content-Length, chunked or until-close bodies), so the
/// generator costs about as little per request as wrk and never becomes the bottleneck.
pub(crate) struct Worker {
    host: String,
    port: u16,
    request: Vec<u8>,
    keepalive: bool,
    timeout: Duration,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
    instances: HashMap<String, Arc<str>>,
}

impl Worker {
    pub(crate) fn new(uri: &Uri, keepalive: bool, timeout: Duration) -> Self {
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or("localhost");
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: fleetlb-bench\r\n");
        if !keepalive {
            request.push_str("Connection: close\r\n");
        }
        request.push_str("\r\n");
        Self {
            host: uri.host().unwrap_or("127.0.0.1").to_string(),
            port: uri.port_u16().unwrap_or(80),
            request: request.into_bytes(),
            keepalive,
            timeout,
            conn: None,
            buf: Vec::with_capacity(16 * 1024),
            instances: HashMap::new(),
        }
    }

    pub(crate) async fn run(
        mut self,
        start: Instant,
        seqs: Seqs,
        done: Arc<AtomicU64>,
        permits: Option<Arc<Semaphore>>,
        deadline: Option<Instant>,
    ) -> Vec<Record> {
        let mut out = Vec::new();
        loop {
            if let Some(permits) = &permits {
                match permits.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
            }
            let Some(seq) = seqs.next() else { break };
            let sent = Instant::now();
            // Open loop: due at its scheduled time; closed loop: due when sent.
            let scheduled = match seqs.rate {
                None => sent,
                Some(_) => match seqs.at(seq).and_then(|d| start.checked_add(d)) {
                    Some(due) => due,
                    None => break,
                },
            };
            if deadline.is_some_and(|d| scheduled >= d) {
                break;
            }
            let lag = sent.duration_since(scheduled);
            let (outcome, instance) = self.one().await;
            let now = Instant::now();
            out.push(Record {
                seq,
                start_us: scheduled.duration_since(start).as_micros() as u64,
                latency_us: now.duration_since(scheduled).as_micros() as u64,
                lag_us: lag.as_micros() as u64,
                outcome,
                instance,
            });
            done.fetch_add(1, Relaxed);
        }
        out
    }

    async fn one(&mut self) -> (Result<u16, ErrorKind>, Option<Arc<str>>) {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(Ok((status, body, keep))) => {
                let instance = instance_of(&self.buf[body]).map(|id| {
                    if let Some(known) = self.instances.get(id) {
                        known.clone()
                    } else {
                        let a: Arc<str> = Arc::from(id);
                        self.instances.insert(id.to_string(), a.clone());
                        a
                    }
                });
                if !(keep && self.keepalive) {
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

    /// Sends the request and reads one response into `buf`: (status, body range, keep-alive).
    async fn exchange(&mut self) -> Result<(u16, std::ops::Range<usize>, bool), ErrorKind> {
        if self.conn.is_none() {
            let stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        ErrorKind::Timeout
                    } else {
                        ErrorKind::Connect
                    }
                })?;
            let _ = stream.set_nodelay(true);
            self.conn = Some(stream);
        }
        let conn = self.conn.as_mut().ok_or(ErrorKind::Connect)?;
        conn.write_all(&self.request)
            .await
            .map_err(|_| ErrorKind::Reset)?;
        self.buf.clear();
        // Head.
        let (status, head_len, framing, keep) = loop {
            if read_more(conn, &mut self.buf).await? == 0 {
                return Err(ErrorKind::Reset);
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut framing = Framing::UntilClose;
                    let mut keep = resp.version == Some(1);
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let len = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok());
                            framing = Framing::Length(len.ok_or(ErrorKind::Reset)?);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                            && h.value.eq_ignore_ascii_case(b"chunked")
                        {
                            framing = Framing::Chunked;
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            keep = !h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    if (100..200).contains(&status) || status == 204 || status == 304 {
                        framing = Framing::Length(0);
                    }
                    break (status, n, framing, keep);
                }
                Ok(httparse::Status::Partial) => continue,
                Err(_) => return Err(ErrorKind::Reset),
            }
        };
        // Body.
        match framing {
            Framing::Length(len) => {
                while self.buf.len() < head_len + len {
                    if read_more(conn, &mut self.buf).await? == 0 {
                        return Err(ErrorKind::Reset);
                    }
                }
                Ok((status, head_len..head_len + len, keep))
            }
            Framing::Chunked => loop {
                if let Some(body_end) = dechunk(&mut self.buf, head_len) {
                    return Ok((status, head_len..body_end, keep));
                }
                if read_more(conn, &mut self.buf).await? == 0 {
                    return Err(ErrorKind::Reset);
                }
            },
            Framing::UntilClose => {
                while read_more(conn, &mut self.buf).await? != 0 {}
                Ok((status, head_len..self.buf.len(), false))
            }
        }
    }
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, ErrorKind> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    conn.read_buf(buf).await.map_err(|_| ErrorKind::Reset)
}

/// When `buf[start..]` holds a complete chunked body, rewrites it in place to the plain body and
/// returns where the body ends. `None` while more bytes are needed.
fn dechunk(buf: &mut [u8], start: usize) -> Option<usize> {
    let mut read = start;
    let mut write = start;
    loop {
        let line_end = buf[read..].windows(2).position(|w| w == b"\r\n")? + read;
        let size_text = std::str::from_utf8(&buf[read..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        let data = line_end + 2;
        if size == 0 {
            // Trailers end with an empty line.
            let rest = &buf[data..];
            if rest.starts_with(b"\r\n") || rest.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(write);
            }
            return None;
        }
        if buf.len() < data + size + 2 {
            return None;
        }
        buf.copy_within(data..data + size, write);
        write += size;
        read = data + size + 2;
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
    fn chunked_bodies_are_decoded_in_place() {
        let mut buf = b"HEAD5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec();
        let end = super::dechunk(&mut buf, 4).unwrap();
        assert_eq!(&buf[4..end], b"hello world");
        let mut partial = b"HEAD5\r\nhel".to_vec();
        assert_eq!(super::dechunk(&mut partial, 4), None);
    }

    #[test]
    fn finds_the_instance_id() {
        assert_eq!(
            instance_of(br#"{"cluster":"c","instance_id":"i-0abc","x":1}"#),
            Some("i-0abc")
        );
        assert_eq!(instance_of(b"plain text"), None);
    }
}
