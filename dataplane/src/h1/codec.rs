//! HTTP/1.1 message heads: the request head fleetlb writes upstream and the response head it
//! reads back. Framing follows RFC 9112 section 6.3: no body for HEAD, 1xx, 204 and 304;
//! `Transfer-Encoding: chunked` (decoded here, re-framed by the server side); `Content-Length`;
//! else until close. Anything malformed is an error (a 502 to the client), never a guess.

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, StatusCode};

use super::Error;
use super::body::{Body, Framing};
use super::chunked::{Chunked, Step};

/// Most header lines in an upstream response head.
pub(crate) const MAX_HEADERS: usize = 100;
/// Largest upstream response head.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// How a request body travels upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReqFraming {
    /// No body.
    None,
    /// The client's `Content-Length`, which travels on with the body.
    Length,
    /// Chunked, for a body of unknown length (an HTTP/2 client's, or a chunked one).
    Chunked,
}

/// What is sent upstream: the request line and headers (already prepared by the proxy).
pub(crate) struct Head<'a> {
    pub method: &'a Method,
    pub path: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
    /// `Host` when the headers have none.
    pub authority: &'a str,
    pub framing: ReqFraming,
    /// The request asks to switch protocols: a `101` answer hands the connection over.
    pub upgrade: bool,
}

/// A response head from upstream.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Body,
    /// The backend's time: from the last request byte written to this head.
    pub waited: std::time::Duration,
    /// The time a new connection took to open (none on a pooled one).
    pub connected: Option<std::time::Duration>,
    /// Request body bytes sent, when the body was sent whole before this head.
    pub body_sent: Option<u64>,
}

/// Serialises a request head: request line, the headers as given, `Host` when missing.
pub(crate) fn encode(head: &Head<'_>, out: &mut BytesMut) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(head.path.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !head.headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(head.authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match head.framing {
        ReqFraming::None => {
            if matches!(*head.method, Method::POST | Method::PUT | Method::PATCH)
                && !head.headers.contains_key(header::CONTENT_LENGTH)
            {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        ReqFraming::Length => {}
        ReqFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

#[allow(clippy::large_enum_variant)] // a transient on the stack, never stored
pub(crate) enum Parsed {
    Partial,
    /// A 1xx head, consumed and skipped.
    Interim,
    /// The final head, consumed, and its body framing.
    Final(Answer),
}

/// Parses the head at the start of `buf`, consuming it when complete. The final head's header
/// values are slices of the connection buffer (no copy); its map is a recycled one when this
/// thread has one.
/// `upgrade`: the request asked to switch protocols, so a `101` is its final answer.
pub(crate) fn parse(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Parsed, Error> {
    // Where each header's name and value sit in `buf`, so the parser's borrow can end before
    // the head is split off.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, http11, count) = {
        // Left uninitialised: the parser writes the slots it uses (3 KiB not zeroed per answer).
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Complete(_)) => return Err(Error::Protocol("head too large")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Protocol("too many headers"));
            }
            Err(_) => return Err(Error::Protocol("bad head")),
        };
        let base = buf.as_ptr() as usize;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            // A head is at most a few tens of KiB (`MAX_HEAD`): offsets fit in u32.
            *span = (
                name as u32,
                h.name.len() as u32,
                value as u32,
                h.value.len() as u32,
            );
        }
        (
            len,
            resp.code.unwrap_or(0),
            resp.version == Some(1),
            resp.headers.len(),
        )
    };
    if (100..200).contains(&code) && !(code == 101 && upgrade) {
        // 101 is only valid in answer to an upgrade.
        if code == 101 {
            return Err(Error::Protocol("unasked protocol switch"));
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let status = StatusCode::from_u16(code).map_err(|_| Error::Protocol("bad status"))?;
    let raw = buf.split_to(len).freeze();
    let mut headers = spare_map(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut close = !http11;
    for &(n_at, n_len, v_at, v_len) in &spans[..count] {
        let (n_at, n_len, v_at, v_len) =
            (n_at as usize, n_len as usize, v_at as usize, v_len as usize);
        let name = HeaderName::from_bytes(&raw[n_at..n_at + n_len])
            .map_err(|_| Error::Protocol("bad name"))?;
        let bytes = &raw[v_at..v_at + v_len];
        let value = HeaderValue::from_maybe_shared(raw.slice(v_at..v_at + v_len))
            .map_err(|_| Error::Protocol("bad value"))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(bytes)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Error::Protocol("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Protocol("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            for coding in bytes.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else if !coding.is_empty() {
                    other_coding = true;
                }
            }
        } else if name == header::CONNECTION {
            close |= bytes
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        headers.append(name, value);
    }
    let framing = if code == 101 {
        close = true;
        Framing::Switched
    } else if head_request || code == 204 || code == 304 {
        Framing::Length(0)
    } else if chunked || other_coding {
        if other_coding {
            // A transfer coding fleetlb cannot undo could not be forwarded faithfully.
            return Err(Error::Protocol("unsupported transfer-encoding"));
        }
        // Transfer-Encoding wins over Content-Length (RFC 9112 6.3), which must not travel on.
        headers.remove(header::CONTENT_LENGTH);
        Framing::Chunked(Chunked::default())
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::Close
    };
    Ok(Parsed::Final(Answer {
        status,
        headers,
        body: Body::new(framing, !close),
        waited: std::time::Duration::ZERO,
        connected: None,
        body_sent: None,
    }))
}

thread_local! {
    /// Header maps of finished requests, reused for the next answers parsed on this thread.
    static SPARE_MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most header maps kept for reuse per thread.
const MAX_SPARE_MAPS: usize = 64;

/// Gives a request's header map back once it was sent and answered, so the next answer's
/// headers reuse its allocation instead of making one.
pub(crate) fn recycle(mut map: HeaderMap) {
    map.clear();
    SPARE_MAPS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX_SPARE_MAPS {
            s.push(map);
        }
    });
}

fn spare_map(n: usize) -> HeaderMap {
    match SPARE_MAPS.with(|s| s.borrow_mut().pop()) {
        Some(mut m) => {
            m.reserve(n);
            m
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// For the fuzzer (`fuzz/fuzz_targets/upstream_response.rs`): frames `data` as an upstream
/// answer the way `exchange` and `Body` do; the final status and the decoded body, or `None`
/// when the answer is rejected or incomplete.
#[doc(hidden)]
pub fn frame_response(data: &[u8], head_request: bool) -> Option<(u16, Vec<u8>)> {
    let mut buf = BytesMut::from(data);
    loop {
        match parse(&mut buf, head_request, false).ok()? {
            Parsed::Partial => return None,
            Parsed::Interim => {}
            Parsed::Final(answer) => {
                let mut out = Vec::new();
                match answer.body.framing {
                    Framing::Length(n) => {
                        let n = n.min(buf.len() as u64) as usize;
                        out.extend_from_slice(&buf[..n]);
                    }
                    Framing::Chunked(mut dec) => loop {
                        match dec.decode(&mut buf).ok()? {
                            Some(Step::Data(d)) => out.extend_from_slice(&d),
                            Some(Step::End) => break,
                            None => return None,
                        }
                    },
                    Framing::Close => out.extend_from_slice(&buf),
                    Framing::Done | Framing::Switched => {}
                }
                return Some((answer.status.as_u16(), out));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let body_of = |raw: &[u8], head: bool| match parse(&mut BytesMut::from(raw), head, false) {
            Ok(Parsed::Final(a)) => (a.body.framing, a.body.reuse, a.headers),
            _ => panic!("not a final head: {raw:?}"),
        };
        let (f, reuse, _) = body_of(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false);
        assert!(matches!(f, Framing::Length(3)) && reuse);
        let (f, _, _) = body_of(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true);
        assert!(matches!(f, Framing::Length(0)), "HEAD has no body");
        let (f, _, _) = body_of(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert!(matches!(f, Framing::Length(0)));
        let (f, _, h) = body_of(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        );
        assert!(matches!(f, Framing::Chunked(_)) && h.get("content-length").is_none());
        let (f, reuse, _) = body_of(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(f, Framing::Close) && !reuse);
        let (_, reuse, _) = body_of(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert!(!reuse);
        let (_, reuse, _) = body_of(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false);
        assert!(!reuse, "HTTP/1.0 is not kept alive");
        let mut interim = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"[..]);
        assert!(matches!(
            parse(&mut interim, false, false),
            Ok(Parsed::Interim)
        ));
        assert_eq!(
            &interim[..],
            b"HTTP/1.1 200",
            "the interim head is consumed"
        );
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(matches!(
            parse(&mut partial, false, false),
            Ok(Parsed::Partial)
        ));
        assert_eq!(partial.len(), 27, "nothing is consumed from a partial head");
        for bad in [
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"NOTHTTP\r\n\r\n",
        ] {
            assert!(
                parse(&mut BytesMut::from(bad), false, false).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn request_heads_carry_host_and_their_framing() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        let path = PathAndQuery::from_static("/p?q=1");
        let encoded = |framing| {
            let mut out = BytesMut::new();
            let head = Head {
                method: &Method::POST,
                path: &path,
                headers: &h,
                authority: "127.0.0.1:1",
                framing,
                upgrade: false,
            };
            encode(&head, &mut out);
            out
        };
        assert_eq!(
            &encoded(ReqFraming::None)[..],
            b"POST /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:1\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n",
            "an empty POST says so"
        );
        assert_eq!(
            &encoded(ReqFraming::Chunked)[..],
            b"POST /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:1\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            "a body of unknown length is chunked"
        );
    }

    #[test]
    fn a_101_is_final_only_for_an_upgrade() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\n\r\nhello";
        assert!(parse(&mut BytesMut::from(&raw[..]), false, false).is_err());
        let mut buf = BytesMut::from(&raw[..]);
        match parse(&mut buf, false, true) {
            Ok(Parsed::Final(a)) => {
                assert_eq!(a.status, StatusCode::SWITCHING_PROTOCOLS);
                assert!(matches!(a.body.framing, Framing::Switched) && !a.body.reuse);
            }
            _ => panic!("not a final head"),
        }
        assert_eq!(
            &buf[..],
            b"hello",
            "bytes after the head stay for the tunnel"
        );
    }
}
