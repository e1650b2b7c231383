//! Entry points for the fuzz targets (`fuzz/`) and the tests that replay their seeds; not an
//! API.

use std::sync::{Arc, Mutex};

pub use crate::h1::{RequestFraming, frame_request, frame_response};

/// The route the rule table finds for `path` among host-less `prefixes` (the fuzz target
/// checks it against a scan over every prefix).
pub fn longest_route<'a>(prefixes: &[&'a str], path: &str) -> Option<&'a str> {
    let mut r = crate::rules::Rules::default();
    for p in prefixes {
        r.insert(&[], p, *p, None);
    }
    r.find("", path).map(|rule| rule.backends[0].0)
}

/// The head limit the differential runs at: hyper's smallest read buffer, so a head that does
/// not fit is refused by both at the same length.
pub const DIFFERENTIAL_LIMIT: usize = 8192;

/// How a server took a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Took {
    /// Served: method, target, body framing (an empty body as `None`).
    Served(String, String, RequestFraming),
    /// Refused with this status.
    Refused(u16),
    /// Not a complete head: waited for more.
    Waited,
}

/// fleetlb's own HTTP/1.1 server side on `data`.
pub fn fleetlb_takes(data: &[u8]) -> Took {
    match frame_request(data, DIFFERENTIAL_LIMIT) {
        None => Took::Waited,
        Some(Err(status)) => Took::Refused(status),
        Some(Ok((m, t, f))) => Took::Served(
            m,
            t,
            match f {
                RequestFraming::Length(0) => RequestFraming::None,
                f => f,
            },
        ),
    }
}

/// hyper's HTTP/1.1 server (as fleetlb configured it for plain connections before it had its
/// own) on `data`, followed by the client closing its side.
pub fn hyper_takes(data: &[u8]) -> Took {
    use http_body::Body as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Took::Waited;
    };
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let seen: Arc<Mutex<Option<Took>>> = Arc::default();
        let record = seen.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let b = req.body();
            let framing = if b.is_end_stream() {
                RequestFraming::None
            } else if let Some(n) = b.size_hint().exact() {
                RequestFraming::Length(n)
            } else {
                RequestFraming::Chunked
            };
            // The first request only: what follows its head may be another, pipelined.
            record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| {
                    Took::Served(req.method().to_string(), req.uri().to_string(), framing)
                });
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_buf_size(DIFFERENTIAL_LIMIT)
            .max_header_size(DIFFERENTIAL_LIMIT);
        let conn = b.serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let (mut rd, mut wr) = tokio::io::split(client);
        let talk = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(
            tokio::time::timeout(std::time::Duration::from_secs(5), conn),
            talk
        );
        if let Some(t) = seen.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return t;
        }
        // The status line is all that is read of hyper's answer.
        let mut resp = httparse::Response::new(&mut []);
        let _ = resp.parse(&out);
        resp.code.map_or(Took::Waited, Took::Refused)
    })
}

/// Where fleetlb's HTTP/1.1 server side and hyper's disagree on `data`, if they do: whether
/// it is served, and then its method, target and body framing; a refusal's status.
pub fn request_head_differential(data: &[u8]) -> Result<(), String> {
    let ours = fleetlb_takes(data);
    let theirs = hyper_takes(data);
    if ours == theirs {
        Ok(())
    } else {
        Err(format!(
            "fleetlb {ours:?}, hyper {theirs:?} on {:?}",
            String::from_utf8_lossy(data)
        ))
    }
}
