//! Request-header rewriting on arbitrary header blocks: never panics; nothing hop-by-hop (nor
//! anything `Connection` names) reaches the upstream; Content-Length never travels together with
//! Transfer-Encoding; the forwarding headers name the (untrusted) peer only; cookies are joined;
//! the request id is usable.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(data, &mut raw) else {
        return;
    };
    let mut h = HeaderMap::new();
    for p in parsed {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(p.name.as_bytes()), HeaderValue::from_bytes(p.value)) {
            h.append(n, v);
        }
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let had_te = h.contains_key(header::TRANSFER_ENCODING);
    let peer = "192.0.2.7:4000".parse().unwrap();
    fleetlb_dataplane::prepare_request_headers(&mut h, peer, true);
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        assert!(!h.contains_key(&n), "{n} survived");
    }
    for n in named {
        // Set by fleetlb itself, from what it saw.
        let forwarded = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
            "forwarded",
            "x-real-ip",
        ];
        if !forwarded.contains(&n.as_str()) {
            assert!(!h.contains_key(&n), "{n}, named in Connection, survived");
        }
    }
    if had_te {
        assert!(!h.contains_key(header::CONTENT_LENGTH));
    }
    // The peer is no trusted proxy: what it said of itself is replaced by what fleetlb saw.
    assert_eq!(h.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"192.0.2.7"[..]));
    assert_eq!(h.get("x-real-ip").map(|v| v.as_bytes()), Some(&b"192.0.2.7"[..]));
    assert!(h.get("forwarded").is_some_and(|v| v.as_bytes().starts_with(b"for=192.0.2.7;proto=http")));
    assert!(h.get_all(header::COOKIE).iter().count() <= 1, "cookies not joined");
    let id = h.get("x-request-id").expect("a request id");
    assert!((1..=128).contains(&id.len()) && id.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b)));
});
