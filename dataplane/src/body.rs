//! Body types: what fleetlb sends upstream and what it sends back to clients.
//!
//! Both stream: a body is never buffered whole. The response body carries the endpoint's
//! in-flight guard, so a request counts as in flight until its last byte has been sent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::endpoint::Endpoint;
use crate::h1;

/// Counts a request in flight to an endpoint until dropped (with the response body's last byte).
pub(crate) struct InflightGuard(Arc<Endpoint>);

impl InflightGuard {
    pub fn new(ep: Arc<Endpoint>) -> Self {
        ep.state.begin();
        Self(ep)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.state.end();
    }
}

/// Response body sent to clients: an upstream body streamed through, or a short message.
pub struct ResponseBody(Kind);

enum Kind {
    /// Read by fleetlb's upstream client; the guard's endpoint takes the connection back at the
    /// end.
    Own(h1::Body, Option<InflightGuard>),
    Message(Option<Bytes>),
}

/// Error type of response bodies: the upstream connection failed mid-body. The client's
/// response is then cut short, never completed with a wrong length.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ResponseBody {
    pub(crate) fn own(body: h1::Body, guard: InflightGuard) -> Self {
        Self(Kind::Own(body, Some(guard)))
    }

    /// A complete short body.
    pub fn message(text: impl Into<Bytes>) -> Self {
        Self(Kind::Message(Some(text.into())))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Kind::Own(body, guard) => {
                let Some(g) = guard.as_ref() else {
                    return Poll::Ready(None);
                };
                let polled = body.poll_data(cx, &g.0.pool);
                match &polled {
                    Poll::Ready(Some(Ok(_))) if !body.is_end_stream() => {}
                    Poll::Pending => {}
                    _ => drop(guard.take()),
                }
                polled.map(|o| o.map(|r| r.map(Frame::data).map_err(Into::into)))
            }
            Kind::Message(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Own(b, _) => b.is_end_stream(),
            Kind::Message(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Own(b, _) => b.size_hint(),
            Kind::Message(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Message(None) => SizeHint::with_exact(0),
        }
    }
}
