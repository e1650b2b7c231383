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
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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

/// A random 128-bit request id in 32 lowercase hex digits.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Carved out of a per-thread block shared by 128 ids: no allocation per request.
    ID_BLOCK.with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() < out.len() {
            *block = BytesMut::with_capacity(out.len() * 128);
        }
        block.extend_from_slice(&out);
        HeaderValue::from_maybe_shared(block.split_to(out.len()).freeze())
            .unwrap_or_else(|_| HeaderValue::from_static("0"))
    })
}

thread_local! {
    static ID_BLOCK: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Hop-by-hop stripping plus the `X-Forwarded-*` headers upstreams expect from a proxy, and an
/// `X-Request-Id` when asked and missing.
pub fn prepare_request_headers(h: &mut HeaderMap, peer: SocketAddr, request_id: bool) {
    prepare_headers(h, &peer_ip(peer), false, request_id);
}

/// The client's address as an `X-Forwarded-For` element; made once per client connection.
pub(crate) fn peer_ip(peer: SocketAddr) -> HeaderValue {
    HeaderValue::try_from(peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `prepare_request_headers` with the client's address already formatted.
pub(crate) fn prepare_headers(
    h: &mut HeaderMap,
    peer_ip: &HeaderValue,
    tls: bool,
    request_id: bool,
) {
    // A request with both Transfer-Encoding and Content-Length is framed by the former (RFC 9112
    // 6.3); the length must not travel on, or the upstream could frame the body differently
    // (request smuggling). The body is re-framed upstream.
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(h);
    if request_id && !h.contains_key(&X_REQUEST_ID) {
        h.insert(&X_REQUEST_ID, self::request_id());
    }
    match h.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut joined = Vec::with_capacity(prev.len() + 2 + peer_ip.len());
            joined.extend_from_slice(prev.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(peer_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
                h.insert(&X_FORWARDED_FOR, v);
            }
        }
        None => {
            h.insert(&X_FORWARDED_FOR, peer_ip.clone());
        }
    }
    // Set, never passed on: only what this hop saw counts.
    h.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    if !h.contains_key(&X_FORWARDED_HOST)
        && let Some(host) = h.get(header::HOST).cloned()
    {
        h.insert(&X_FORWARDED_HOST, host);
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
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        prepare_request_headers(&mut h, "127.0.0.1:5000".parse().unwrap(), true);
        assert_eq!(h.get("x-request-id").unwrap().len(), 32);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "example.com");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    }
}
