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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::Shared;
use crate::access_log::Entry;
use crate::balance;
use crate::body::{BodyError, ClientBody, InflightGuard, ResponseBody};
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::grpc::{self, Blame, GRPC_TIMEOUT, MessageCount};
use crate::h1;
use crate::outlier;
use crate::table::Cluster;

mod pool;

pub(crate) use pool::{Pool, Slot};

/// The most of a request body kept for a retry (linkerd's limit).
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

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
                // client's body that failed first (its reset travels upstream), or the
                // connection's end was counted already or was a calm-down.
                let counts = self
                    .slot
                    .as_ref()
                    .is_none_or(|s| s.counts(connection_level(&e)));
                if !counts || self.call.as_ref().is_some_and(|c| c.body.fault().is_some()) {
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
        Blame::Busy => ep.state.observe(rtt.as_nanos() as f64, now, decay),
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

/// Whether hyper's error is the connection's (it closed, broke, or went away), not this
/// stream's own (a RST_STREAM the instance sent for it).
fn connection_level(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(s) = src {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return !h2.is_reset() || h2.is_go_away();
        }
        src = s.source();
    }
    true
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
                last_err = crate::proxy::connect_error(pick.panic);
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
                if slot.counts(connection_level(&e)) {
                    ep.state.observe(penalty, now, decay);
                    outlier::on_failure(&shared.metrics, cluster, ep, now);
                }
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
