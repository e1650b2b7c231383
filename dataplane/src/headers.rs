//! Request and response headers across the proxy: hop-by-hop headers dropped (RFC 9110 7.6.1),
//! `X-Forwarded-*` and `X-Request-Id` set.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Hop-by-hop headers other than those `Connection` names (RFC 9110 7.6.1).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
        || n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == header::PROXY_AUTHORIZATION
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those named in `Connection`. Most
/// messages carry none: one pass over the names finds that without hashing any.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    for n in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
}

/// `n` in lowercase hex, filling `out` (the low digits).
fn hex_into(out: &mut [u8], mut n: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// A random 128-bit request id in 32 lowercase hex digits.
fn request_id() -> HeaderValue {
    let mut out = [0u8; 32];
    hex_into(&mut out, fastrand::u128(..));
    shared_value(&out)
}

/// A new W3C `traceparent`: version 00, a random trace id and parent id (never all zeros),
/// not sampled (fleetlb records no trace, so it asks nobody downstream to).
fn new_traceparent() -> HeaderValue {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut out[3..35], fastrand::u128(1..));
    hex_into(&mut out[36..52], u128::from(fastrand::u64(1..)));
    shared_value(&out)
}

/// A W3C `traceparent` fleetlb passes on unchanged: `version-traceid-parentid-flags` in
/// lowercase hex, the ids not all zeros, version `ff` never; a later version may append
/// `-...` fields after the four it knows.
fn valid_traceparent(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    if b.len() < 55 || !hex(&b[0..2]) || &b[0..2] == b"ff" {
        return false;
    }
    let fields_ok = b[2] == b'-'
        && hex(&b[3..35])
        && nonzero(&b[3..35])
        && b[35] == b'-'
        && hex(&b[36..52])
        && nonzero(&b[36..52])
        && b[52] == b'-'
        && hex(&b[53..55]);
    let rest_ok = if &b[0..2] == b"00" {
        b.len() == 55
    } else {
        b.len() == 55 || b[55] == b'-'
    };
    fields_ok && rest_ok
}

/// `bytes` as a header value carved out of a per-thread block.
fn shared_value(out: &[u8]) -> HeaderValue {
    // Carved out of a per-thread block shared by 128 ids: no allocation per request.
    ID_BLOCK.with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() < out.len() {
            *block = BytesMut::with_capacity(out.len() * 128);
        }
        block.extend_from_slice(out);
        HeaderValue::from_maybe_shared(block.split_to(out.len()).freeze())
            .unwrap_or_else(|_| HeaderValue::from_static("0"))
    })
}

thread_local! {
    static ID_BLOCK: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Hop-by-hop stripping plus the forwarding headers upstreams expect from a proxy, for a client
/// at `peer` that is not a trusted proxy, and an `X-Request-Id` when asked and missing.
pub fn prepare_request_headers(h: &mut HeaderMap, peer: SocketAddr, request_id: bool) {
    prepare_headers(h, &Peer::new(peer, &[]), false, request_id);
}

static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The client as the forwarding headers name it; made once per client connection.
#[derive(Clone)]
pub(crate) struct Peer {
    /// Its address, as an `X-Forwarded-For` element.
    ip: HeaderValue,
    /// Its address as a `Forwarded` node (`192.0.2.1`, `"[2001:db8::1]"`).
    node: HeaderValue,
    /// It is a proxy in `--trusted-proxies`: its forwarding headers are appended to.
    trusted: bool,
    /// Its address and port.
    addr: SocketAddr,
}

impl Peer {
    pub fn new(peer: SocketAddr, trusted: &[ipnet::IpNet]) -> Self {
        let ip = peer.ip().to_canonical();
        let node = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        Self {
            ip: peer_ip(SocketAddr::new(ip, peer.port())),
            node: HeaderValue::try_from(node)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            trusted: trusted.iter().any(|n| n.contains(&ip)),
            addr: SocketAddr::new(ip, peer.port()),
        }
    }

    /// The client's address and port (an IPv4-mapped IPv6 address as IPv4).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The client's address as an `X-Forwarded-For` element.
pub(crate) fn peer_ip(peer: SocketAddr) -> HeaderValue {
    HeaderValue::try_from(peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A client's `X-Request-Id` is kept when it is 1-128 visible ASCII characters.
fn usable_request_id(v: &HeaderValue) -> bool {
    (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b))
}

/// `a, b` from the values of `name` and `last`.
fn appended(h: &HeaderMap, name: &HeaderName, last: &[u8]) -> Option<HeaderValue> {
    let mut joined = Vec::with_capacity(64);
    for v in h.get_all(name) {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(last);
    HeaderValue::from_maybe_shared(Bytes::from(joined)).ok()
}

/// Rewrites a request's headers for the upstream:
/// - hop-by-hop headers dropped (a `Content-Length` beside a `Transfer-Encoding` too: the body
///   is re-framed, and two framings must never travel on);
/// - several `Cookie` fields (HTTP/2 sends one per cookie) joined with `; ` (RFC 9113 8.2.3);
/// - `X-Request-Id` kept when usable, else a new one (when `request_id`);
/// - `X-Forwarded-For`/`-Proto`/`-Host`, `Forwarded` and `X-Real-IP` from what fleetlb saw. A
///   trusted proxy's own values are kept and the peer appended (ALB's `append`); anyone else's
///   are replaced, so a client cannot pass for another address, scheme or host.
pub(crate) fn prepare_headers(h: &mut HeaderMap, peer: &Peer, tls: bool, request_id: bool) {
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(h);
    let mut cookies = h.get_all(header::COOKIE).iter();
    if cookies.next().is_some() && cookies.next().is_some() {
        let mut joined = Vec::with_capacity(256);
        for (i, c) in h.get_all(header::COOKIE).iter().enumerate() {
            if i > 0 {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(c.as_bytes());
        }
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
            h.insert(header::COOKIE, v);
        }
    }
    let mut ids = h.get_all(&X_REQUEST_ID).iter();
    let usable = match (ids.next(), ids.next()) {
        (Some(v), None) => usable_request_id(v),
        _ => false,
    };
    if !usable {
        if request_id {
            h.insert(&X_REQUEST_ID, self::request_id());
        } else {
            h.remove(&X_REQUEST_ID);
        }
    }
    // W3C trace context: one valid `traceparent` travels on unchanged with its `tracestate`;
    // none, several or an invalid one is replaced by a new trace, and `tracestate` (which
    // belongs to the trace it came with) dropped.
    if request_id {
        let mut parents = h.get_all(&TRACEPARENT).iter();
        let valid = match (parents.next(), parents.next()) {
            (Some(v), None) => valid_traceparent(v),
            _ => false,
        };
        if !valid {
            h.insert(&TRACEPARENT, new_traceparent());
            h.remove(&TRACESTATE);
        }
    }
    let proto = if tls { "https" } else { "http" };
    let host = h.get(header::HOST).cloned();
    // A Forwarded element: for=...;proto=...;host="..." (the host only when it can be quoted).
    let mut element = Vec::with_capacity(48);
    element.extend_from_slice(b"for=");
    element.extend_from_slice(peer.node.as_bytes());
    element.extend_from_slice(b";proto=");
    element.extend_from_slice(proto.as_bytes());
    if let Some(host) = &host
        && host
            .as_bytes()
            .iter()
            .all(|b| (0x21..=0x7e).contains(b) && *b != b'"' && *b != b'\\')
    {
        element.extend_from_slice(b";host=\"");
        element.extend_from_slice(host.as_bytes());
        element.push(b'"');
    }
    if peer.trusted {
        if let Some(v) = appended(h, &X_FORWARDED_FOR, peer.ip.as_bytes()) {
            h.insert(&X_FORWARDED_FOR, v);
        }
        if let Some(v) = appended(h, &FORWARDED, &element) {
            h.insert(&FORWARDED, v);
        }
        if !h.contains_key(&X_FORWARDED_PROTO) {
            h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !h.contains_key(&X_FORWARDED_HOST)
            && let Some(host) = host
        {
            h.insert(&X_FORWARDED_HOST, host);
        }
        if !h.contains_key(&X_REAL_IP) {
            h.insert(&X_REAL_IP, peer.ip.clone());
        }
        return;
    }
    h.insert(&X_FORWARDED_FOR, peer.ip.clone());
    h.insert(&X_REAL_IP, peer.ip.clone());
    h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(host) => h.insert(&X_FORWARDED_HOST, host),
        None => h.remove(&X_FORWARDED_HOST),
    };
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(element)) {
        h.insert(&FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_with_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn forwarding_headers_say_what_fleetlb_saw_unless_the_peer_is_trusted() {
        let client = || {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
            h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
            h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
            h.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
            h.insert("forwarded", HeaderValue::from_static("for=10.0.0.1"));
            h.insert(header::HOST, HeaderValue::from_static("example.com"));
            h.insert(
                "x-request-id",
                HeaderValue::from_static("bad id with spaces"),
            );
            h.append(header::COOKIE, HeaderValue::from_static("a=1"));
            h.append(header::COOKIE, HeaderValue::from_static("b=2"));
            h
        };
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut h = client();
        prepare_headers(&mut h, &Peer::new(peer, &[]), false, true);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "example.com");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-real-ip").unwrap(), "127.0.0.1");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=127.0.0.1;proto=http;host=\"example.com\""
        );
        assert_eq!(h.get("x-request-id").unwrap().len(), 32);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");

        let trusted: ipnet::IpNet = "127.0.0.0/8".parse().unwrap();
        let mut h = client();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        prepare_headers(&mut h, &Peer::new(peer, &[trusted]), true, true);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "evil.example");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-real-ip").unwrap(), "10.0.0.1");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=10.0.0.1, for=127.0.0.1;proto=https;host=\"example.com\""
        );
        assert_eq!(h.get("x-request-id").unwrap(), "abc-123");
    }

    #[test]
    fn a_valid_traceparent_travels_unchanged_and_any_other_is_replaced() {
        let peer = Peer::new("127.0.0.1:5000".parse().unwrap(), &[]);
        let with = |tp: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in tp {
                h.append("traceparent", HeaderValue::from_static(v));
            }
            h.insert("tracestate", HeaderValue::from_static("vendor=opaque"));
            prepare_headers(&mut h, &peer, false, true);
            (
                h.get("traceparent").unwrap().to_str().unwrap().to_string(),
                h.get_all("traceparent").iter().count(),
                h.get("tracestate").map(|v| v.to_str().unwrap().to_string()),
            )
        };
        let kept = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            with(&[kept]),
            (kept.to_string(), 1, Some("vendor=opaque".into()))
        );
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(with(&[future]).0, future);
        for bad in [
            &[][..],
            &["00-00000000000000000000000000000000-00f067aa0ba902b7-01"][..],
            &["00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"][..],
            &["ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"][..],
            &["00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"][..],
            &["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"][..],
            &["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"][..],
            &[kept, kept][..],
        ] {
            let (tp, n, state) = with(bad);
            assert_eq!(n, 1, "{bad:?}");
            assert!(
                valid_traceparent(&HeaderValue::from_str(&tp).unwrap()),
                "{tp}"
            );
            assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
            assert!(
                !tp.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
                "{bad:?}: {tp}"
            );
            assert_eq!(state, None, "{bad:?}");
        }
        // Each new trace is another.
        assert_ne!(with(&[]).0, with(&[]).0);
    }
}
