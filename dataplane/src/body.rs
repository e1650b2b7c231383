//! Body types: what fleetlb sends upstream and what it sends back to clients.
//!
//! Both stream: a body is never buffered whole. The response body carries the endpoint's
//! in-flight guard, so a request counts as in flight until its last byte has been sent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use std::sync::atomic::Ordering::Relaxed;

use crate::conn::Active;
use crate::endpoint::Endpoint;
use crate::h1;
use crate::limits::Limits;

/// A client's request body: read by hyper (HTTP/2, and HTTP/1.1 over TLS) or by fleetlb's own
/// HTTP/1.1 server side (`h1::server`).
pub(crate) enum ClientBody {
    Hyper(hyper::body::Incoming),
    Own(h1::RequestBody),
}

/// A client's request body failed, and whose doing that was.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub(crate) struct ClientBodyError {
    pub fault: h1::ClientFault,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl ClientBodyError {
    pub fn new(
        fault: h1::ClientFault,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            fault,
            source: source.into(),
        }
    }

    /// hyper reports a body that breaks the framing rules as a parse error or as invalid data
    /// or input, and anything else (end of stream, reset, a dropped connection, an HTTP/2
    /// stream reset) as the client going away.
    fn from_hyper(e: hyper::Error) -> Self {
        let mut fault = if e.is_parse() {
            h1::ClientFault::Malformed
        } else {
            h1::ClientFault::Gone
        };
        let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        while let Some(s) = src {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                fault = match io.kind() {
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                        h1::ClientFault::Malformed
                    }
                    _ => h1::ClientFault::Gone,
                };
                break;
            }
            src = s.source();
        }
        Self::new(fault, e)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(ClientBodyError::from_hyper))),
            ClientBody::Own(b) => b.poll_data(cx).map(|f| f.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Own(b) => b.size_hint(),
        }
    }
}

/// Counts a request in flight to an endpoint, holding one of its connection slots, until
/// dropped (with the response body's last byte).
pub(crate) struct InflightGuard(Arc<Endpoint>);

/// Why no connection slot of an endpoint could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// Its queue is full.
    Queue,
    /// The wait in its queue ran out.
    Wait,
}

impl InflightGuard {
    /// A slot of `ep` (at most `limits.endpoint_max_connections` in flight): at once when one
    /// is free, else after a wait in its queue (bounded in length and time).
    pub async fn acquire(ep: &Arc<Endpoint>, limits: &Limits) -> Result<Self, Full> {
        let max = limits.endpoint_max_connections;
        if ep.state.try_begin(max) {
            return Ok(Self(ep.clone()));
        }
        if ep.queued.fetch_add(1, Relaxed) >= limits.endpoint_queue {
            ep.queued.fetch_sub(1, Relaxed);
            return Err(Full::Queue);
        }
        struct Queued<'a>(&'a Endpoint);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.queued.fetch_sub(1, Relaxed);
            }
        }
        let _queued = Queued(ep);
        let deadline = tokio::time::Instant::now() + limits.endpoint_queue_timeout;
        loop {
            let freed = ep.slot_freed.notified();
            if ep.state.try_begin(max) {
                return Ok(Self(ep.clone()));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Full::Wait);
            }
        }
    }
}

impl InflightGuard {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.state.end();
        if self.0.queued.load(Relaxed) > 0 {
            self.0.slot_freed.notify_one();
        }
    }
}

/// Response body sent to clients: an upstream body streamed through, or a short message. It
/// carries its request's place on the client connection (`conn::Active`) to its end.
pub struct ResponseBody(Kind, Option<Active>);

enum Kind {
    /// Read by fleetlb's upstream client; the guard's endpoint takes the connection back at the
    /// end.
    Own(h1::Body, Option<InflightGuard>),
    /// Read by hyper's HTTP/2 client (`h2up`), trailers and all.
    H2(Box<crate::h2up::Answer>),
    Message(Option<Bytes>),
}

/// Error type of response bodies: the upstream connection failed mid-body. The client's
/// response is then cut short, never completed with a wrong length.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ResponseBody {
    pub(crate) fn own(body: h1::Body, guard: InflightGuard) -> Self {
        Self(Kind::Own(body, Some(guard)), None)
    }

    pub(crate) fn h2(answer: crate::h2up::Answer) -> Self {
        Self(Kind::H2(Box::new(answer)), None)
    }

    /// No body at all (a gRPC trailers-only answer).
    pub fn empty() -> Self {
        Self(Kind::Message(None), None)
    }

    /// A complete short body.
    pub fn message(text: impl Into<Bytes>) -> Self {
        Self(Kind::Message(Some(text.into())), None)
    }

    /// Lets go of an upstream read buffer that holds nothing (while the client is slow to take
    /// the next chunk).
    pub(crate) fn shrink(&mut self) {
        if let Kind::Own(body, _) = &mut self.0 {
            body.shrink();
        }
    }

    /// Rides with `active` until the body ends.
    pub(crate) fn track(&mut self, active: Active) {
        self.1 = Some(active);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(active) = this.1.as_ref()
            && active.conn().hold_body(cx)
        {
            return Poll::Pending;
        }
        let hint = this
            .1
            .as_ref()
            .map_or(crate::h1::READ_CHUNK, |a| a.conn().read_hint());
        let polled = this.poll_inner(cx, hint);
        // hyper stops polling once the body says it has ended.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.is_end_stream(),
            _ => false,
        };
        if let Some(active) = this.1.as_mut() {
            if ended {
                active.finished();
            }
            // HTTP/2: whose turn it is (a client that never comes back for more is cut by
            // the connection's send timer).
            active.taken();
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    active.hand();
                    if let Some(data) = frame.data_ref() {
                        active.conn().body_handed(data.len());
                        active.sent(data.len());
                    }
                }
                Poll::Ready(_) => this.1 = None,
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Own(b, _) => b.is_end_stream(),
            Kind::H2(a) => a.is_end_stream(),
            Kind::Message(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Own(b, _) => b.size_hint(),
            Kind::H2(a) => a.size_hint(),
            Kind::Message(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Message(None) => SizeHint::with_exact(0),
        }
    }
}

impl ResponseBody {
    /// The next frame, asking the upstream for about `read` bytes.
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
        read: usize,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.0 {
            Kind::Own(body, guard) => {
                let Some(g) = guard.as_ref() else {
                    return Poll::Ready(None);
                };
                let polled = body.poll_data(cx, &g.0.pool, read);
                match &polled {
                    Poll::Ready(Some(Ok(_))) if !body.is_end_stream() => {}
                    Poll::Pending => {}
                    _ => drop(guard.take()),
                }
                polled.map(|o| o.map(|r| r.map(Frame::data).map_err(Into::into)))
            }
            Kind::H2(a) => a.poll_frame(cx),
            Kind::Message(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }
}
