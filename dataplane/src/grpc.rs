//! What fleetlb knows of gRPC (the HTTP/2 protocol, PROTOCOL-HTTP2.md in grpc/grpc): which
//! requests are gRPC calls, the status a call ended with, its deadline, the answers fleetlb
//! gives itself, and the two messages of the health service it probes with.
//!
//! Message bodies are never decoded on the request path: only the 5-byte prefix of each
//! length-prefixed message is read, to tell a one-message (unary) answer from a stream.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::error::ProxyError;

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// gRPC status codes fleetlb reads or sends (google.rpc.Code).
pub mod code {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const ALREADY_EXISTS: u32 = 6;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const ABORTED: u32 = 10;
    pub const OUT_OF_RANGE: u32 = 11;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const DATA_LOSS: u32 = 15;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Whose doing a call's status is, for the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The call went through, or the caller caused its status: a latency sample.
    None,
    /// The instance is unwell (`UNAVAILABLE`, or `DEADLINE_EXCEEDED` of its own making):
    /// counted like a 5xx.
    Endpoint,
    /// `RESOURCE_EXHAUSTED`: the instance shedding load, or the caller over a quota or a
    /// message-size limit (any client can make it, so it must not slow an instance down): a
    /// latency sample of the time it took, never a success, never a failure.
    Busy,
}

/// How a call's status counts against the instance that answered it: only `UNAVAILABLE`, and
/// `DEADLINE_EXCEEDED` when the caller set no deadline (the instance's own, to something
/// behind it), say the instance is unwell. Codes the caller caused (`INVALID_ARGUMENT`,
/// `NOT_FOUND`, `PERMISSION_DENIED`, ...) or chose (`CANCELLED`, its own deadline) never
/// count, nor do `INTERNAL`, `UNKNOWN` and `DATA_LOSS`, which servers also answer to a
/// malformed or undecodable request (any client could get an instance ejected with them).
pub(crate) fn blame(status: u32, caller_deadline: bool) -> Blame {
    match status {
        code::UNAVAILABLE => Blame::Endpoint,
        code::DEADLINE_EXCEEDED if !caller_deadline => Blame::Endpoint,
        code::RESOURCE_EXHAUSTED => Blame::Busy,
        _ => Blame::None,
    }
}

/// Whether `headers` belong to a gRPC call: `content-type: application/grpc` or
/// `application/grpc+<codec>` (gRPC-Web, which works over HTTP/1.1 without trailers, is not).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// Whether `req` is a gRPC call (a POST with a gRPC content type).
pub fn is_grpc_request<B>(req: &http::Request<B>) -> bool {
    req.method() == http::Method::POST && is_grpc(req.headers())
}

/// The `grpc-status` in `headers` (trailers, or the head of a trailers-only answer).
pub fn status(headers: &HeaderMap) -> Option<u32> {
    let v = headers.get(&GRPC_STATUS)?.to_str().ok()?;
    v.trim().parse().ok()
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value, in the finest unit that fits 8 digits (rounded up, so an
/// instance never gets less time than the caller has left).
pub fn format_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ns = d.as_nanos().max(1);
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let n = ns.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}"))
                .unwrap_or(HeaderValue::from_static("99999999H"));
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The gRPC status fleetlb answers with for one of its own errors (HTTP 200, as gRPC
/// clients expect: an HTTP error status reaches the application only as a vague
/// `UNKNOWN` or `UNAVAILABLE`).
pub(crate) fn code_for(err: ProxyError) -> u32 {
    match err {
        ProxyError::UpstreamTimeout | ProxyError::ClientTimeout => code::DEADLINE_EXCEEDED,
        ProxyError::ConnectionBusy | ProxyError::EndpointFull | ProxyError::LocalResources => {
            code::RESOURCE_EXHAUSTED
        }
        ProxyError::DeadlineExceeded => code::DEADLINE_EXCEEDED,
        ProxyError::NoRoute | ProxyError::NotGrpcCluster | ProxyError::NotGrpcCall => {
            code::UNIMPLEMENTED
        }
        ProxyError::BadRequestBody
        | ProxyError::BadPath
        | ProxyError::BadHost
        | ProxyError::BadFraming
        | ProxyError::UnsupportedTransferCoding
        | ProxyError::GrpcNeedsHttp2 => code::INTERNAL,
        ProxyError::ClientClosed => code::CANCELLED,
        ProxyError::NoHealthyEndpoint
        | ProxyError::ZeroWeight
        | ProxyError::UpstreamConnect
        | ProxyError::UpstreamReset
        | ProxyError::UpstreamUnavailable => code::UNAVAILABLE,
    }
}

/// A trailers-only answer: HTTP 200 whose only HEADERS frame ends the stream and carries the
/// status (percent-encoded message, as the protocol asks).
pub(crate) fn answer(status: u32, message: &str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS.clone(), HeaderValue::from(status));
    if let Ok(m) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE.clone(), m);
    }
    resp
}

/// fleetlb's own answer for `err` to a gRPC call.
pub(crate) fn reshape(err: ProxyError) -> Response<ResponseBody> {
    let mut resp = answer(code_for(err), err.to_string().as_str());
    resp.extensions_mut()
        .insert(crate::error::SelfAnswered(err.reason()));
    if err == ProxyError::ClientClosed {
        resp.extensions_mut().insert(crate::error::ClientGone);
    }
    resp
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One length-prefixed message (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// The messages in `body` (uncompressed, each whole), or `None` when it is not a sequence of
/// them.
pub fn unframe(mut body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 || body[0] != 0 {
            return None;
        }
        let n = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let rest = &body[5..];
        if rest.len() < n {
            return None;
        }
        out.push(&rest[..n]);
        body = &rest[n..];
    }
    Some(out)
}

/// Counts the length-prefixed messages in a stream of DATA frames without copying them.
#[derive(Default, Debug)]
pub(crate) struct MessageCount {
    /// Bytes of the current message (prefix included) still to come.
    left: u64,
    /// Prefix bytes seen of the next message.
    prefix: [u8; 5],
    have: usize,
    pub messages: u32,
}

impl MessageCount {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len() as u64);
                self.left -= n;
                data = &data[n as usize..];
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                self.have = 0;
                self.messages = self.messages.saturating_add(1);
                let p = self.prefix;
                self.left = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
            }
        }
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    /// `ServingStatus`: 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `HealthCheckResponse.ServingStatus.SERVING`.
pub const SERVING: i32 = 1;
/// `HealthCheckResponse.ServingStatus.NOT_SERVING`.
pub const NOT_SERVING: i32 = 2;
/// `HealthCheckResponse.ServingStatus.SERVICE_UNKNOWN`.
pub const SERVICE_UNKNOWN: i32 = 3;

/// The health service's method path.
pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_and_format_in_every_unit() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(format_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(
            format_timeout(Duration::from_secs(86_400 * 400)),
            "34560000S"
        );
        for d in [1u64, 999, 12_345_678_901, 86_400_000_000_000] {
            let d = Duration::from_nanos(d);
            let back = parse_timeout(format_timeout(d).as_bytes()).unwrap();
            assert!(back >= d, "{d:?} came back as {back:?}");
        }
    }

    #[test]
    fn grpc_content_types_are_told_from_grpc_web() {
        let h = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            is_grpc(&h)
        };
        assert!(h("application/grpc"));
        assert!(h("application/grpc+proto"));
        assert!(h("Application/GRPC;charset=utf-8"));
        assert!(!h("application/grpc-web"));
        assert!(!h("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn messages_are_counted_across_frame_boundaries() {
        let mut all = Vec::new();
        for m in [&b"abc"[..], b"", b"hello world"] {
            all.extend_from_slice(&frame(m));
        }
        for split in 0..all.len() {
            let mut c = MessageCount::default();
            c.feed(&all[..split]);
            c.feed(&all[split..]);
            assert_eq!(c.messages, 3, "split at {split}");
        }
        assert_eq!(unframe(&all).unwrap(), [&b"abc"[..], b"", b"hello world"]);
        assert!(unframe(&all[..all.len() - 1]).is_none());
    }

    #[test]
    fn caller_codes_never_count_against_the_instance() {
        for c in [
            code::OK,
            code::CANCELLED,
            code::INVALID_ARGUMENT,
            code::DEADLINE_EXCEEDED,
            code::NOT_FOUND,
            code::ALREADY_EXISTS,
            code::PERMISSION_DENIED,
            code::FAILED_PRECONDITION,
            code::ABORTED,
            code::OUT_OF_RANGE,
            code::UNIMPLEMENTED,
            code::UNAUTHENTICATED,
            code::INTERNAL,
            code::UNKNOWN,
            code::DATA_LOSS,
        ] {
            assert_eq!(blame(c, true), Blame::None, "{c}");
        }
        assert_eq!(blame(code::DEADLINE_EXCEEDED, false), Blame::Endpoint);
        assert_eq!(blame(code::UNAVAILABLE, true), Blame::Endpoint);
        assert_eq!(blame(code::RESOURCE_EXHAUSTED, false), Blame::Busy);
    }
}
