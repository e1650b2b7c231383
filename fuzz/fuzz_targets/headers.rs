//! Request-header rewriting on arbitrary header blocks: never panics; nothing hop-by-hop (nor
//! anything `Connection` names) reaches the upstream; Content-Length never travels together with
//! Transfer-Encoding; X-Forwarded-For ends with the peer.
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
        let forwarded = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"];
        if !forwarded.contains(&n.as_str()) {
            assert!(!h.contains_key(&n), "{n}, named in Connection, survived");
        }
    }
    if had_te {
        assert!(!h.contains_key(header::CONTENT_LENGTH));
    }
    if let Some(xff) = h.get("x-forwarded-for") {
        assert!(xff.as_bytes().ends_with(b"192.0.2.7"));
    }
});
