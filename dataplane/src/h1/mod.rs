//! fleetlb's HTTP/1.1 upstream client: every upstream exchange goes through here (proxied
//! requests with or without a body, upgrades, health checks), so there is one behaviour for
//! stale pooled connections, idle expiry, timeouts and clocks.
//!
//! The task that serves the client writes the request and reads the answer over a keep-alive
//! connection from the endpoint's idle list for its runtime (`pool`): no cross-thread lock, no
//! channel, no extra task. A response whose body came with its head (the usual small answer)
//! gives its connection back before it is even handed to the client. A request body is written
//! as it arrives while the upstream is watched for an early answer (`body::Sender`). A
//! connection goes back to the pool only after a complete exchange on a reusable HTTP/1.1
//! connection.
//!
//! Who failed is kept apart: a client whose body is malformed or who goes away mid-body is
//! [`Error::Client`], never an upstream failure.
//!
//! - `pool`: idle connections; `codec`: heads; `chunked`: the chunked coding; `body`: bodies.

mod body;
mod chunked;
mod codec;
mod pool;
mod server;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::body::{ClientBody, ClientBodyError};

pub(crate) use body::Body;
#[doc(hidden)]
pub use codec::frame_response;
pub(crate) use codec::recycle;
pub(crate) use codec::{Answer, Head, MAX_HEADERS, ReqFraming};
pub(crate) use pool::{Conn, LISTS, Pool, READ_CHUNK, enter_proxy_thread, this_list};
pub(crate) use server::{Outcome, RequestBody, serve};
#[doc(hidden)]
pub use server::{RequestFraming, frame_request};

use body::{SendError, Sender};
use codec::{MAX_HEAD, Parsed};

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    /// The proxy itself ran out of something (descriptors, ports, buffers): no endpoint's
    /// doing.
    #[error("local resources exhausted: {0}")]
    Local(#[source] io::Error),
    #[error("upstream closed the connection before answering")]
    Closed,
    #[error("upstream i/o: {0}")]
    Io(#[source] io::Error),
    #[error("malformed upstream response: {0}")]
    Protocol(&'static str),
    /// The client's request body failed; the upstream did nothing wrong.
    #[error("client request body: {0}")]
    Client(#[source] ClientBodyError),
    /// No answer within the timeout (`client`: the exchange was waiting for the client's body).
    #[error("timed out")]
    Timeout { client: bool },
    /// A kept-alive connection closed by the upstream as the request went out, with a request
    /// that could not be sent again.
    #[error("pooled connection closed by the upstream: {0}")]
    Stale(#[source] Box<Error>),
    /// The HTTP/2 connection this request waited on failed to open; the request that opened
    /// it counted the failure.
    #[error("the connection it waited on failed: {0}")]
    Shared(#[source] std::sync::Arc<Error>),
}

/// What a client did wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// Its body broke the framing rules (e.g. a bad chunk size).
    Malformed,
    /// It went away (closed or reset) before its body was complete.
    Gone,
}

impl Error {
    /// Nothing reached the upstream: safe to try another endpoint for any request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_) | Error::ConnectTimeout)
    }

    /// The endpoint actively refused the connection (nothing listens there).
    pub fn is_refused(&self) -> bool {
        matches!(self, Error::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    /// The client's fault, if it was.
    pub fn client_fault(&self) -> Option<ClientFault> {
        match self {
            Error::Client(e) => Some(e.fault),
            _ => None,
        }
    }
}

/// Connection settings.
#[derive(Clone, Copy)]
pub(crate) struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long the upstream may take to answer once the request is sent, and how long it may
    /// leave a request body unread; `None` when the caller bounds the exchange itself.
    pub timeout: Option<Duration>,
    /// Longest gap in the client's request body, and its minimum rate (bytes/s over 10 s
    /// windows in which it kept the upstream waiting).
    pub client_gap: Duration,
    pub client_min_rate: u32,
    /// Longest gap between two reads of the upstream's response body.
    pub upstream_gap: Duration,
}

impl Settings {
    /// The time allowed for what the exchange waits on now.
    fn wait(&self, on_client: bool) -> Option<Duration> {
        if on_client {
            Some(self.client_gap)
        } else {
            self.timeout
        }
    }
}

/// The proxy's own exhaustion, as `connect` reports it (EMFILE, ENFILE, ENOBUFS, ENOMEM,
/// EADDRNOTAVAIL): a new socket or a source port could not be had.
fn is_local(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12 | 99))
}

/// Sends `head` and `body` to `addr` and reads the response head. A pooled connection the
/// upstream had closed meanwhile (the keep-alive race) is retried once on a new connection
/// when no body byte was taken from the client yet, and either nothing came back to an
/// idempotent request or the request could not even be written. `body` is taken when sent;
/// it is left in place when nothing of it was, so the caller may try another endpoint.
pub(crate) async fn send(
    pool: &Pool,
    addr: SocketAddr,
    head: &Head<'_>,
    body: &mut Option<ClientBody>,
    settings: Settings,
    idempotent: bool,
) -> Result<Answer, Error> {
    if let Some(conn) = pool.take(settings.idle_timeout) {
        match exchange(pool, conn, head, body, settings).await {
            Err(Failure::Unanswered {
                written,
                consumed: false,
                at_once: true,
                err,
            }) if idempotent || !written => {
                tracing::trace!(%addr, ?err, "pooled connection was closed; reconnecting");
            }
            // The backend closed a kept-alive connection as the request went out: a race
            // between two idle timers, not a sign of a sick backend. (A close that comes
            // later is the backend's doing, and counts.)
            Err(Failure::Unanswered {
                at_once: true, err, ..
            }) => return Err(Error::Stale(Box::new(err))),
            Err(f) => return Err(f.into()),
            Ok(a) => return Ok(a),
        }
    }
    let opening = tokio::time::Instant::now();
    let conn = connect(addr, settings.connect_timeout).await?;
    let connected = opening.elapsed();
    let mut answer = exchange(pool, conn, head, body, settings)
        .await
        .map_err(Error::from)?;
    answer.connected = Some(connected);
    Ok(answer)
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Error> {
    Ok(Conn::new(connect_tcp(addr, timeout).await?))
}

/// A TCP connection to `addr` within `timeout`, Nagle off; the proxy's own exhaustion told
/// apart from the endpoint's failure.
pub(crate) async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Error> {
    let io = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) if is_local(&e) => return Err(Error::Local(e)),
        Ok(Err(e)) => return Err(Error::Connect(e)),
        Err(_) => return Err(Error::ConnectTimeout),
    };
    io.set_nodelay(true).map_err(Error::Connect)?;
    Ok(io)
}

/// How soon after the request went out a close still counts as the keep-alive race (the
/// backend's idle timer firing as the request arrived) rather than the backend failing it.
const RACE_WINDOW: Duration = Duration::from_millis(100);

enum Failure {
    /// No response byte arrived. `written`: the whole head was written; `consumed`: part of
    /// the client's body was taken (and cannot be sent again); `at_once`: the connection
    /// failed within `RACE_WINDOW` of the head going out.
    Unanswered {
        written: bool,
        consumed: bool,
        at_once: bool,
        err: Error,
    },
    Other(Error),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Unanswered { err, .. } | Failure::Other(err) => err,
        }
    }
}

async fn exchange(
    pool: &Pool,
    mut c: Conn,
    head: &Head<'_>,
    body: &mut Option<ClientBody>,
    settings: Settings,
) -> Result<Answer, Failure> {
    let timeout = settings.timeout;
    c.buf.clear();
    codec::encode(head, &mut c.buf);
    let written = match timeout {
        Some(t) => tokio::time::timeout(t, c.io.write_all(&c.buf))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        None => c.io.write_all(&c.buf).await,
    };
    if let Err(e) = written {
        if e.kind() == io::ErrorKind::TimedOut {
            return Err(Failure::Other(Error::Timeout { client: false }));
        }
        return Err(Failure::Unanswered {
            written: false,
            consumed: false,
            at_once: true,
            err: Error::Io(e),
        });
    }
    c.buf.clear();
    let mut sender = body.take().map(|b| {
        Sender::new(
            b,
            head.framing == ReqFraming::Chunked,
            settings.client_min_rate,
        )
    });
    let sent_at = tokio::time::Instant::now();
    let first = settings.wait(false).map(|t| sent_at + t);
    let mut timer = std::pin::pin!(first.map(tokio::time::sleep_until));
    let mut state = Exchange {
        sent_at,
        heard: false,
        settings,
        deadline: first,
        sent_whole_at: sender.is_none().then_some(sent_at),
    };
    let answer = std::future::poll_fn(|cx| {
        poll_answer(cx, &mut c, head, &mut sender, timer.as_mut(), &mut state)
    })
    .await;
    match answer {
        Ok(mut answer) => {
            // The backend's time: from the last request byte written (or, for an answer that
            // came before the body was all sent, from the head) to the response head.
            let from = state.sent_whole_at.unwrap_or(state.sent_at);
            answer.waited = from.elapsed();
            answer.body_sent = sender.as_ref().filter(|s| s.is_done()).map(|s| s.total);
            // The rest of the body goes out with the answer, under the same timers (of its
            // own: only this rare case pays for the allocation).
            let sending =
                sender
                    .filter(|s| !s.is_done() && !s.broken)
                    .map(|sender| body::Sending {
                        sender,
                        timer: None,
                        settings,
                    });
            answer.body.start(c, pool, sending, settings.upstream_gap);
            Ok(answer)
        }
        Err(f) => {
            // Nothing of the body was taken: it is the caller's again.
            *body = sender.and_then(Sender::into_untouched);
            Err(f)
        }
    }
}

/// What `poll_answer` keeps between polls.
struct Exchange {
    /// When the head went out.
    sent_at: tokio::time::Instant,
    /// A response byte arrived (an interim head counts).
    heard: bool,
    settings: Settings,
    /// Where the timer is set.
    deadline: Option<tokio::time::Instant>,
    /// When the last request byte went out.
    sent_whole_at: Option<tokio::time::Instant>,
}

/// Reads the answer while writing the request body, until the final head has arrived (the
/// body goes on being sent with the answer, see `Body`). `timer` runs out the route's timeout
/// after the request was sent whole or after the upstream last took a body byte, and the
/// client's body gap after the client last sent one; a client slower than the minimum rate is
/// cut by its `Sender`.
fn poll_answer(
    cx: &mut std::task::Context<'_>,
    c: &mut Conn,
    head: &Head<'_>,
    sender: &mut Option<Sender>,
    mut timer: std::pin::Pin<&mut Option<tokio::time::Sleep>>,
    state: &mut Exchange,
) -> std::task::Poll<Result<Answer, Failure>> {
    use std::task::Poll;
    loop {
        let consumed = sender.as_ref().is_some_and(|s| s.consumed);
        let (heard, sent_at) = (state.heard, state.sent_at);
        let unanswered = |err| {
            if heard {
                // It answered (a 100 Continue) and then failed: not a stale connection.
                Failure::Other(err)
            } else {
                Failure::Unanswered {
                    written: true,
                    consumed,
                    at_once: sent_at.elapsed() < RACE_WINDOW,
                    err,
                }
            }
        };
        match c.poll_read(cx) {
            Poll::Ready(Ok(0)) if c.buf.is_empty() => {
                return Poll::Ready(Err(unanswered(Error::Closed)));
            }
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(Failure::Other(Error::Protocol(
                    "closed inside the head",
                ))));
            }
            Poll::Ready(Ok(_)) => {
                state.heard = true;
                // A buffer may hold interim (1xx) heads before the final one.
                while !c.buf.is_empty() {
                    match codec::parse(&mut c.buf, head.method == http::Method::HEAD, head.upgrade)
                        .map_err(Failure::Other)?
                    {
                        Parsed::Partial => {
                            if c.buf.len() > MAX_HEAD {
                                return Poll::Ready(Err(Failure::Other(Error::Protocol(
                                    "head too large",
                                ))));
                            }
                            break;
                        }
                        Parsed::Interim => {}
                        Parsed::Final(mut answer) => {
                            if sender.as_ref().is_some_and(|s| s.broken) {
                                answer.body.reuse = false;
                            }
                            return Poll::Ready(Ok(answer));
                        }
                    }
                }
                continue;
            }
            Poll::Ready(Err(e)) if c.buf.is_empty() => {
                return Poll::Ready(Err(unanswered(Error::Io(e))));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Other(Error::Io(e)))),
            Poll::Pending => {}
        }
        // No answer yet: feed the upstream the body.
        let mut sent_whole = false;
        if let Some(s) = sender.as_mut().filter(|s| !s.is_done() && !s.broken) {
            match s.poll_send(cx, &mut c.io) {
                Poll::Ready(Ok(())) => {
                    sent_whole = true;
                    state.sent_whole_at = Some(tokio::time::Instant::now());
                }
                Poll::Pending => {}
                Poll::Ready(Err(SendError::Client(e))) => {
                    return Poll::Ready(Err(Failure::Other(Error::Client(e))));
                }
                Poll::Ready(Err(SendError::TooSlow)) => {
                    return Poll::Ready(Err(Failure::Other(Error::Timeout { client: true })));
                }
                Poll::Ready(Err(SendError::Upstream(e))) => {
                    // It stopped reading; it may still answer (and then close). If it does
                    // not, the read above reports the failure.
                    tracing::trace!(?e, "upstream stopped taking the request body");
                    s.broken = true;
                }
            }
            let on_client = !sent_whole && s.waiting_on_client;
            if s.take_progress() || sent_whole || on_client != s.timed_on_client {
                s.timed_on_client = on_client;
                state.deadline = state
                    .settings
                    .wait(on_client)
                    .map(|t| tokio::time::Instant::now() + t);
                if let (Some(t), Some(at)) = (timer.as_mut().as_pin_mut(), state.deadline) {
                    t.reset(at);
                } else if let Some(at) = state.deadline {
                    timer.set(Some(tokio::time::sleep_until(at)));
                }
            }
        }
        if let Some(t) = timer.as_mut().as_pin_mut()
            && t.poll(cx).is_ready()
        {
            let client = sender
                .as_ref()
                .is_some_and(|s| !s.is_done() && s.waiting_on_client);
            return Poll::Ready(Err(Failure::Other(Error::Timeout { client })));
        }
        if !sent_whole {
            return Poll::Pending;
        }
    }
}
