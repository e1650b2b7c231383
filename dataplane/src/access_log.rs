//! The access log: one JSON line per request, written by a thread of its own.
//!
//! The request path only fills an [`Entry`] (reference-counted pieces of the request and its
//! endpoint, no formatting) and offers it to a bounded channel without waiting: when the
//! channel is full the line is dropped and counted (`fleetlb_access_log_dropped_total`), and
//! the request never notices. The writer thread formats the lines and writes them, flushing
//! whenever the channel runs dry, so a quiet proxy's lines are out at once and a busy one's
//! go in large writes.
//!
//! Sampling (`--access-log-sample`) keeps a share of the requests that went well; an answer
//! of 5xx, or one fleetlb gave itself (no route, no healthy endpoint, a client that went
//! away, ...), is always kept.

use std::borrow::Cow;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Version};

use crate::endpoint::Endpoint;
use crate::table::Cluster;

/// Where the lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    /// Appended to (created when missing). Rotate it with `copytruncate`.
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;

    /// `stdout` or `-` is standard output; anything else a file.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => Target::Stdout,
            path => Target::File(PathBuf::from(path)),
        })
    }
}

/// How long the writer rests after writing what was queued (lines reach the file at most this
/// much later than they could).
const BATCH_PAUSE: Duration = Duration::from_millis(10);

/// Lines waiting for the writer at most; a burst beyond this is dropped and counted.
pub const CAPACITY: usize = 16 * 1024;

/// The sending side of the access log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Box<Entry>>,
    /// Share of ordinary requests kept, in 1/2^32 (`u32::MAX` and above: all).
    keep: u64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("keep", &self.keep)
            .finish()
    }
}

impl AccessLog {
    /// Opens `target` and starts the writer thread. `sample` is the share (0 to 1) of
    /// requests kept that ended in neither a 5xx nor an answer of fleetlb's own.
    pub fn open(target: &Target, sample: f64) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        Self::to_writer(out, sample, CAPACITY)
    }

    /// The log on any writer, with `capacity` lines of room.
    pub fn to_writer(out: Box<dyn Write + Send>, sample: f64, capacity: usize) -> io::Result<Self> {
        let (tx, rx) = sync_channel(capacity);
        // A thread: the writes may block (a full pipe, a slow disk), which no runtime thread
        // may do.
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, out))?;
        Ok(Self {
            tx,
            keep: (sample.clamp(0.0, 1.0) * 4_294_967_296.0) as u64,
        })
    }

    /// Offers `entry` to the writer: `false` when the line was dropped (the channel is full).
    /// Sampled-out entries count as sent.
    pub(crate) fn send(&self, entry: Box<Entry>) -> bool {
        // Kept whatever the share: a 5xx, an answer of fleetlb's own, a response cut short.
        // A client that went away is sampled like a success: a client could otherwise have
        // every one of its reset streams logged and crowd the real errors out.
        let gone = entry.reason == Some("client_closed");
        let always = entry.status >= 500 || (!gone && (entry.reason.is_some() || !entry.complete));
        if !always && self.keep < 1 << 32 && u64::from(fastrand::u32(..)) >= self.keep {
            return true;
        }
        match self.tx.try_send(entry) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            // The writer is gone (its output failed for good): the line is lost, and counted.
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Writes lines until every sender is gone; a failed write (a closed pipe) ends the thread.
fn write_lines(rx: &Receiver<Box<Entry>>, out: Box<dyn Write + Send>) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(1024);
    loop {
        let entry = match rx.try_recv() {
            Ok(e) => e,
            Err(TryRecvError::Empty) => {
                if let Err(err) = out.flush()
                    && gave_up(&err)
                {
                    return;
                }
                // A pause before the next batch: under load the senders find the channel
                // non-empty and never have to wake this thread (a wake per line costs more
                // than the line); a quiet proxy's first line wakes it at once.
                std::thread::sleep(BATCH_PAUSE);
                match rx.try_recv() {
                    Ok(e) => e,
                    Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => match rx.recv() {
                        Ok(e) => e,
                        Err(_) => return,
                    },
                }
            }
            Err(TryRecvError::Disconnected) => {
                let _ = out.flush();
                return;
            }
        };
        line.clear();
        if serde_json::to_writer(&mut line, &entry.line()).is_err() {
            continue;
        }
        line.push(b'\n');
        escape_c1(&mut line);
        if let Err(err) = out.write_all(&line)
            && gave_up(&err)
        {
            return;
        }
    }
}

/// Says why a write failed; `true` when the output is gone for good (a closed pipe): then no
/// more lines are written. Other failures (a full disk) lose what was being written and the
/// writer goes on.
fn gave_up(err: &io::Error) -> bool {
    let closed = err.kind() == io::ErrorKind::BrokenPipe;
    if closed {
        tracing::warn!(%err, "access log: the output is closed; no more lines are written");
    } else {
        tracing::warn!(%err, "access log: a write failed; lines were lost");
    }
    closed
}

/// Escapes C1 control characters (U+0080-U+009F, which JSON leaves as they are) so a header
/// cannot send a terminal escape sequence to whoever reads the log on a terminal.
fn escape_c1(line: &mut Vec<u8>) {
    if !line
        .windows(2)
        .any(|w| w[0] == 0xC2 && (0x80..=0x9F).contains(&w[1]))
    {
        return;
    }
    let mut out = Vec::with_capacity(line.len() + 16);
    let mut i = 0;
    while i < line.len() {
        if line[i] == 0xC2 && line.get(i + 1).is_some_and(|b| (0x80..=0x9F).contains(b)) {
            out.extend_from_slice(format!("\\u{:04x}", line[i + 1]).as_bytes());
            i += 2;
        } else {
            out.push(line[i]);
            i += 1;
        }
    }
    *line = out;
}

/// The TLS session of a client connection, as the access log names it.
#[derive(Debug)]
pub(crate) struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The server name the client asked for.
    pub sni: Option<Box<str>>,
}

/// One request, as it went. Filled on the request path, formatted by the writer.
pub(crate) struct Entry {
    pub at: SystemTime,
    pub started: tokio::time::Instant,
    pub client: SocketAddr,
    pub tls: Option<Arc<TlsInfo>>,
    pub method: Method,
    /// Copies, cut at [`FIELD_MAX`] bytes: a queued line never keeps the request's buffers.
    pub host: Option<Bytes>,
    pub path: Bytes,
    pub version: Version,
    /// 499 until an answer is made (the client went away first).
    pub status: u16,
    /// The request body's length: as framed (`Content-Length`), or as counted when it was
    /// sent whole before the answer began.
    pub bytes_in: Option<u64>,
    /// Response body bytes handed to the client.
    pub bytes_out: u64,
    /// From the request head to the response's end.
    pub duration: Duration,
    /// A new upstream connection's connect time (none for a pooled one).
    pub connect: Option<Duration>,
    /// The backend's time to the response head (see `h1::Answer::waited`).
    pub head: Option<Duration>,
    pub cluster: Option<Arc<Cluster>>,
    pub endpoint: Option<Arc<Endpoint>>,
    pub tries: u32,
    /// Why fleetlb answered itself (`fleetlb_proxy_errors_total`'s reason).
    pub reason: Option<&'static str>,
    /// The response body was sent to its end.
    pub complete: bool,
    pub request_id: Option<Bytes>,
    pub traceparent: Option<Bytes>,
    pub user_agent: Option<Bytes>,
}

/// Longest a logged header or path is (longer ones are cut): a line's size stays bounded
/// whatever the client sent.
pub(crate) const FIELD_MAX: usize = 1024;

/// An owned copy of `b`, cut at [`FIELD_MAX`] bytes.
pub(crate) fn capped(b: &[u8]) -> Bytes {
    Bytes::copy_from_slice(&b[..b.len().min(FIELD_MAX)])
}

impl Entry {
    pub fn start<B>(
        req: &http::Request<B>,
        client: SocketAddr,
        tls: Option<Arc<TlsInfo>>,
    ) -> Box<Self> {
        let h = req.headers();
        let host = h
            .get(http::header::HOST)
            .map(|v| capped(v.as_bytes()))
            .or_else(|| req.uri().authority().map(|a| capped(a.as_str().as_bytes())));
        Box::new(Self {
            at: SystemTime::now(),
            started: tokio::time::Instant::now(),
            client,
            tls,
            method: req.method().clone(),
            host,
            path: capped(
                req.uri()
                    .path_and_query()
                    .map_or("", |p| p.as_str())
                    .as_bytes(),
            ),
            version: req.version(),
            status: 499,
            bytes_in: None,
            bytes_out: 0,
            duration: Duration::ZERO,
            connect: None,
            head: None,
            cluster: None,
            endpoint: None,
            tries: 0,
            reason: Some("client_closed"),
            complete: false,
            request_id: None,
            traceparent: None,
            user_agent: h
                .get(http::header::USER_AGENT)
                .map(|v| capped(v.as_bytes())),
        })
    }

    fn line(&self) -> Line<'_> {
        fn text(v: &Option<Bytes>) -> Option<Cow<'_, str>> {
            v.as_ref().map(|v| String::from_utf8_lossy(v))
        }
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        let time = jiff::Timestamp::try_from(self.at)
            .map(|t| format!("{t:.3}"))
            .unwrap_or_default();
        Line {
            time,
            client: self.client,
            tls_version: self.tls.as_ref().map(|t| t.version),
            sni: self.tls.as_ref().and_then(|t| t.sni.as_deref()),
            method: self.method.as_str(),
            host: text(&self.host),
            path: String::from_utf8_lossy(&self.path),
            protocol: match self.version {
                Version::HTTP_09 => "HTTP/0.9",
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_11 => "HTTP/1.1",
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_3 => "HTTP/3",
                _ => "",
            },
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration_ms: ms(self.duration),
            upstream_connect_ms: self.connect.map(ms),
            upstream_head_ms: self.head.map(ms),
            cluster: self.cluster.as_ref().map(|c| c.name.as_str()),
            endpoint: self.endpoint.as_ref().map(|e| e.addr),
            instance_id: self.endpoint.as_ref().map(|e| e.id.as_str()),
            tries: self.tries,
            reason: self.reason,
            complete: self.complete,
            request_id: text(&self.request_id),
            // A traceparent is checked or made by fleetlb: `00-<trace id>-<parent id>-<flags>`.
            trace_id: self
                .traceparent
                .as_ref()
                .and_then(|t| t.get(3..35))
                .and_then(|t| std::str::from_utf8(t).ok()),
            user_agent: text(&self.user_agent),
        }
    }
}

/// An access-log line. Fields without a value are left out.
#[derive(serde::Serialize)]
struct Line<'a> {
    time: String,
    client: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<&'a str>,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<Cow<'a, str>>,
    path: Cow<'a, str>,
    protocol: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_in: Option<u64>,
    bytes_out: u64,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_connect_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_head_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_id: Option<&'a str>,
    tries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c1_controls_are_escaped_and_the_rest_is_left_alone() {
        let mut line = serde_json::to_vec(&"a\u{9b}[2Jb\u{e9}\u{85}").unwrap();
        escape_c1(&mut line);
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            "\"a\\u009b[2Jb\u{e9}\\u0085\""
        );
        let back: String = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, "a\u{9b}[2Jb\u{e9}\u{85}");
    }

    #[test]
    fn logged_fields_are_cut_at_their_bound() {
        assert_eq!(capped(&[b'x'; 5000]).len(), FIELD_MAX);
        assert_eq!(&capped(b"short")[..], b"short");
    }
}
