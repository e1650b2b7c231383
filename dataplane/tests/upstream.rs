//! What fleetlb's upstream client does with every way an HTTP/1 upstream can frame, interleave
//! or botch an answer, how it sends request bodies and how it keeps connections, seen by a
//! client through the proxy. The upstream is a raw TCP server on 127.0.0.1:0 writing exact
//! bytes, or (for bodies and the pool) the test support's hyper server.

mod support;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fleetlb_dataplane::{EndpointConfig, HealthConfig, ProxyConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw upstream. `/health` answers 200; `/c/<case>` answers the bytes of that case. Counts
/// the connections that carried at least one `/c` request.
struct Raw {
    addr: SocketAddr,
    proxied_conns: Arc<AtomicU64>,
    /// Connections open right now (the proxy's probes' and requests').
    open: Arc<AtomicI64>,
}

/// How long `/c/burst-pause` pauses after its burst.
const BURST_PAUSE: Duration = Duration::from_secs(8);

/// Size of the `/c/big` answer's body.
const BIG: usize = 8 << 20;

/// The bytes for a case and whether to close the connection after writing them.
fn answer(method: &str, path: &str) -> (Cow<'static, [u8]>, bool) {
    if path == "/c/huge-head" {
        let mut v = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        v.extend(std::iter::repeat_n(b'a', 70 * 1024));
        v.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
        return (Cow::Owned(v), false);
    }
    if path == "/c/many-headers" {
        let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..101 {
            v.extend_from_slice(format!("x-h{i}: 1\r\n").as_bytes());
        }
        v.extend_from_slice(b"content-length: 2\r\n\r\nok");
        return (Cow::Owned(v), false);
    }
    if path == "/c/big" {
        let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
        v.extend((0..BIG).map(|i| (i % 251) as u8));
        return (Cow::Owned(v), false);
    }
    let (bytes, close) = fixed(method, path);
    (Cow::Borrowed(bytes), close)
}

fn fixed(method: &str, path: &str) -> (&'static [u8], bool) {
    if path == "/health" {
        return (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false);
    }
    match (method, path.trim_start_matches("/c/")) {
        (_, "chunked") => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1;ext=x\r\n \r\n5\r\nworld\r\n0\r\ntrailer: 1\r\n\r\n",
            false,
        ),
        (_, "early-hints") => (
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            false,
        ),
        (_, "until-close") => (b"HTTP/1.1 200 OK\r\n\r\nthe body ends when the connection does", true),
        (_, "close-after") => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
        (_, "no-content") => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        (_, "garbage") => (b"NOT HTTP AT ALL\r\n\r\n", true),
        (_, "short") => (b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nonly this", true),
        // More bytes than the length: a second, unasked answer (a smuggling attempt).
        (_, "trailing") => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled",
            false,
        ),
        // Refuses the body before reading it.
        (_, "too-large") => (
            b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large",
            // Kept open (and the body read and dropped): a close with unread bytes would be a
            // reset, which can overtake the answer.
            false,
        ),
        // Closes without a word: an idle timer firing just as the request arrived.
        (_, "drop") => (b"", true),
        // Switches to a protocol the client did not ask for.
        (_, "wrong-switch") => (
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
            true,
        ),
        ("HEAD", _) => (b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n", false),
        _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
    }
}

impl Raw {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxied_conns = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicI64::new(0));
        let (conns, open2) = (proxied_conns.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let conns = conns.clone();
                let open = open2.clone();
                open.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    struct Closed(Arc<AtomicI64>);
                    impl Drop for Closed {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Relaxed);
                        }
                    }
                    let _closed = Closed(open);
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut counted = false;
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            buf.drain(..end + 4);
                            let mut line = head.split_whitespace();
                            let (method, path) =
                                (line.next().unwrap_or(""), line.next().unwrap_or(""));
                            if path.starts_with("/c") && !counted {
                                counted = true;
                                conns.fetch_add(1, Relaxed);
                            }
                            if path == "/c/burst-pause" {
                                // A burst, a pause of the backend's own, then the end.
                                // 64 KiB up to the data's end: fleetlb's 8 KiB reads end
                                // with a full one, which a client a little behind the burst
                                // has not taken when the backend falls silent.
                                let mut out =
                                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffc9\r\n"
                                        .to_vec();
                                out.extend(std::iter::repeat_n(b'b', 0xffc9));
                                out.extend_from_slice(b"\r\n");
                                if s.write_all(&out).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(BURST_PAUSE).await;
                                let _ = s.write_all(b"4\r\nDONE\r\n0\r\n\r\n").await;
                                continue;
                            }
                            if path == "/c/echo" {
                                // Streams: the body is read here, not as heads.
                                let len: usize = head
                                    .lines()
                                    .find_map(|l| {
                                        let (k, v) = l.split_once(':')?;
                                        k.eq_ignore_ascii_case("content-length")
                                            .then(|| v.trim().parse().ok())?
                                    })
                                    .unwrap_or(0);
                                if stream_body(&mut s, &mut buf, path, len).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            let (bytes, close) = answer(method, path);
                            if s.write_all(&bytes).await.is_err() || close {
                                return;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Self {
            addr,
            proxied_conns,
            open,
        }
    }
}

/// `/c/echo` answers at once and echoes the body as it arrives (a full-duplex server).
async fn stream_body(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    _path: &str,
    len: usize,
) -> std::io::Result<()> {
    s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        .await?;
    let mut left = len;
    let mut chunk = vec![0u8; 16 * 1024];
    while left > 0 {
        let piece: Vec<u8> = if buf.is_empty() {
            let n = s.read(&mut chunk[..left.min(16 * 1024)]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            chunk[..n].to_vec()
        } else {
            let n = buf.len().min(left);
            buf.drain(..n).collect()
        };
        left -= piece.len();
        s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await?;
        s.write_all(&piece).await?;
        s.write_all(b"\r\n").await?;
    }
    s.write_all(b"0\r\n\r\n").await
}

async fn behind_proxy() -> (Raw, Proxy) {
    behind_proxy_with(ProxyConfig::default(), support::fast_health()).await
}

async fn behind_proxy_with(cfg: ProxyConfig, health: HealthConfig) -> (Raw, Proxy) {
    let raw = Raw::start().await;
    let ep = EndpointConfig::new("raw", raw.addr);
    let mut r = route(vec![ep]);
    r.health = health;
    let proxy = Proxy::start(cfg, vec![r]).await;
    proxy.wait_healthy(1).await;
    (raw, proxy)
}

#[tokio::test]
async fn every_upstream_framing_reaches_the_client_whole() {
    let (_raw, proxy) = behind_proxy().await;
    let c = client();
    for (case, body) in [
        ("chunked", "hello world"),
        ("early-hints", "final"),
        ("until-close", "the body ends when the connection does"),
        ("no-content", ""),
        ("plain", "ok"),
    ] {
        let (status, got) = get(&c, &proxy.url(&format!("/c/{case}"))).await.unwrap();
        assert_eq!(
            (status, got.as_str()),
            (if case == "no-content" { 204 } else { 200 }, body),
            "{case}"
        );
    }
    // HEAD: the length is announced, no body follows, and the connection stays usable.
    let r = exchange(
        proxy.addr,
        b"HEAD /c/x HTTP/1.1\r\nHost: x\r\n\r\nGET /c/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("content-length: 1000\r\n"), "{r}");
    assert!(
        r.ends_with("\r\n\r\nok"),
        "HEAD then GET on one connection: {r:?}"
    );
    // HEAD of an answer of unknown length: no length is announced (never a false 0).
    for case in ["chunked", "until-close"] {
        let raw = format!("HEAD /c/{case} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = exchange(proxy.addr, raw.as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            !r.to_ascii_lowercase().contains("content-length"),
            "HEAD {case}: {r}"
        );
    }
}

/// A client that fell behind a burst and then caught up is never taken for a slow reader
/// while the backend itself pauses mid-answer: the pause is the backend's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_pausing_mid_answer_is_not_the_clients_slowness() {
    let mut cfg = ProxyConfig::default();
    // Shorter than the backend's pause: a wait left open over the pause would cut the client.
    cfg.limits.send_timeout = Duration::from_secs(3);
    let (_raw, proxy) = behind_proxy_with(cfg, support::fast_health()).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /c/burst-pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // About 20 KB/s, twenty times the minimum rate, but behind the burst: fleetlb waits for
    // room after each chunk, the last one too, and the backend is silent when room comes.
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let done = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the answer ends");
    let text = String::from_utf8_lossy(&got);
    assert!(done.is_ok(), "{done:?} after {} bytes", got.len());
    assert!(
        text.ends_with("4\r\nDONE\r\n0\r\n\r\n"),
        "cut short after {} bytes",
        got.len()
    );
    assert_eq!(
        proxy.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "client-send-timeout")]
        ),
        0.0
    );
}

#[tokio::test]
async fn keep_alive_reuses_one_upstream_connection() {
    let (raw, proxy) = behind_proxy().await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, &proxy.url("/c/plain")).await.unwrap().0, 200);
    }
    // One client making sequential requests needs one upstream connection, whatever the
    // number of proxy requests (and the health checks share the pool: at most one more).
    assert!(raw.proxied_conns.load(Relaxed) <= 2);
    // A chunked answer, decoded to its end, leaves its connection reusable too.
    for _ in 0..10 {
        assert_eq!(get(&c, &proxy.url("/c/chunked")).await.unwrap().0, 200);
    }
    assert!(raw.proxied_conns.load(Relaxed) <= 2);
}

#[tokio::test]
async fn an_upstream_closing_kept_alive_connections_costs_no_request() {
    let (raw, proxy) = behind_proxy().await;
    let c = client();
    // Each answer keeps the connection open by HTTP's rules and then the upstream closes it:
    // the next request must never be sent into that dead connection and fail.
    for i in 0..100 {
        let r = get(&c, &proxy.url("/c/close-after")).await;
        assert_eq!(r, Ok((200, "ok".to_string())), "request {i}");
    }
    assert!(raw.proxied_conns.load(Relaxed) >= 100);
    // And the proxy's side of those closed connections does not linger in CLOSE_WAIT.
    let port = raw.addr.port();
    eventually("no upstream connection left in CLOSE_WAIT", || {
        close_wait_to(port) == 0
    })
    .await;
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_not_used_even_for_a_request_that_cannot_be_resent() {
    let (raw, proxy) = behind_proxy().await;
    assert_eq!(
        get(&client(), &proxy.url("/c/close-after"))
            .await
            .unwrap()
            .0,
        200
    );
    // The backend's close has reached the proxy (its side of the connection waits in
    // CLOSE_WAIT, pooled): a POST, which is never resent once written, must not go there.
    let port = raw.addr.port();
    eventually("the backend's close reached the proxy", || {
        close_wait_to(port) > 0
    })
    .await;
    let r = exchange(
        proxy.addr,
        b"POST /c/plain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// Sockets in CLOSE_WAIT (the peer closed, this side did not) to 127.0.0.1:`port`.
fn close_wait_to(port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == remote && f[3] == "08"
        })
        .count()
}

#[tokio::test]
async fn a_malformed_or_cut_upstream_answer_is_a_502_or_a_cut_response() {
    let (_raw, proxy) = behind_proxy().await;
    let r = exchange(
        proxy.addr,
        b"GET /c/garbage HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    let r = exchange(
        proxy.addr,
        b"GET /c/short HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    // The bytes that came are relayed, then the connection ends short of the length.
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\nonly this"), "{r:?}");
    // Still serving.
    assert_eq!(get(&client(), &proxy.url("/c/plain")).await.unwrap().0, 200);
}

#[tokio::test]
async fn a_large_answer_streams_through_intact_and_the_connection_is_reused() {
    let (raw, proxy) = behind_proxy().await;
    let c = client();
    for _ in 0..3 {
        let resp = c.get(proxy.url("/c/big").parse().unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body.len(), BIG);
        assert!(
            body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
            "body corrupted"
        );
    }
    assert!(raw.proxied_conns.load(Relaxed) <= 2);
}

#[tokio::test]
async fn an_upstream_head_over_the_limits_is_a_502() {
    let (_raw, proxy) = behind_proxy().await;
    for case in ["huge-head", "many-headers"] {
        let r = exchange(
            proxy.addr,
            format!("GET /c/{case} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 502"), "{case}: {:.80}", r);
    }
    assert_eq!(get(&client(), &proxy.url("/c/plain")).await.unwrap().0, 200);
}

#[tokio::test]
async fn bytes_after_a_content_length_body_never_reach_another_request() {
    let (raw, proxy) = behind_proxy().await;
    let c = client();
    let before = raw.proxied_conns.load(Relaxed);
    assert_eq!(
        get(&c, &proxy.url("/c/trailing")).await.unwrap(),
        (200, "ok".to_string())
    );
    // The extra bytes could be read as the next request's answer: that connection is dropped.
    for _ in 0..5 {
        assert_eq!(
            get(&c, &proxy.url("/c/plain")).await.unwrap(),
            (200, "ok".to_string())
        );
    }
    assert!(raw.proxied_conns.load(Relaxed) > before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_expire() {
    let cfg = ProxyConfig {
        pool_idle_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    // One probe makes the endpoint healthy; the next is far off.
    let health = HealthConfig {
        interval: Duration::from_secs(600),
        healthy_threshold: 1,
        ..support::fast_health()
    };
    let (raw, proxy) = behind_proxy_with(cfg, health).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(get(&c, &proxy.url("/c/plain")).await.unwrap().0, 200);
    }
    assert!(raw.open.load(Relaxed) >= 1);
    // Nothing uses them: the proxy closes every one (the route updater's sweep, each second).
    eventually("idle upstream connections closed by the proxy", || {
        raw.open.load(Relaxed) == 0
    })
    .await;
    let idle: usize = proxy
        .dataplane
        .snapshot()
        .iter()
        .flat_map(|c| &c.endpoints)
        .map(|e| e.idle_connections)
        .sum();
    assert_eq!(idle, 0);
    // And the next request opens a fresh one.
    assert_eq!(get(&c, &proxy.url("/c/plain")).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_at_most_its_limit_of_idle_connections() {
    let cfg = ProxyConfig {
        limits: fleetlb_dataplane::Limits {
            connect_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        ..ProxyConfig::default()
    };
    let (up, proxy) = one_healthy(cfg).await;
    // 280 requests at once, each holding its connection for 500 ms: 280 connections.
    up.delay_ms.store(500, Relaxed);
    let results = load(proxy.url("/c"), 280, 280).await;
    assert_eq!(ok_count(&results), 280, "{:?}", failures(&results));
    let idle: usize = proxy
        .dataplane
        .snapshot()
        .iter()
        .flat_map(|c| &c.endpoints)
        .map(|e| e.idle_connections)
        .sum();
    assert!((2..=256).contains(&idle), "{idle} idle connections kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_reach_the_upstream_framed_for_it() {
    let (_up, proxy) = one_healthy(ProxyConfig::default()).await;
    // A chunked body is re-framed (chunked again) with every byte.
    let r = exchange(
        proxy.addr,
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("x-seen-body-bytes: 11\r\n"), "{r}");
    // A length travels on with its body.
    let r = exchange(
        proxy.addr,
        b"PUT /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
    )
    .await;
    assert!(r.contains("x-seen-body-bytes: 4\r\n"), "{r}");
    assert!(r.contains("x-seen-content-length: 4\r\n"), "{r}");
    // An HTTP/2 client's body without a length.
    type Streamed = http_body_util::StreamBody<
        futures::stream::Iter<
            std::vec::IntoIter<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>,
        >,
    >;
    let h2: hyper_util::client::legacy::Client<_, Streamed> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let frames = vec![
        Ok(http_body::Frame::data(bytes::Bytes::from_static(b"01234"))),
        Ok(http_body::Frame::data(bytes::Bytes::from_static(b"56789"))),
    ];
    let req = http::Request::post(proxy.url("/c"))
        .body(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-seen-body-bytes"], "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_a_body_early_is_answered_at_once() {
    let (_raw, proxy) = behind_proxy().await;
    // The upstream answers 413 on the head, without reading the 16 MiB body.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    const SIZE: usize = 16 << 20;
    s.write_all(
        format!("POST /c/too-large HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Keep sending while reading: the answer must come although the body never completes.
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..SIZE / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut head = vec![0u8; 12];
    tokio::time::timeout(DEADLINE, rd.read_exact(&mut head))
        .await
        .expect("answered before the body ended")
        .unwrap();
    assert_eq!(&head[..], b"HTTP/1.1 413");
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_duplex_upstream_gets_the_whole_body_while_it_answers() {
    let (_raw, proxy) = behind_proxy().await;
    const SIZE: usize = 4 << 20;
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    let s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(
            format!("POST /c/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        for piece in sent.chunks(64 << 10) {
            wr.write_all(piece).await.unwrap();
        }
        wr
    });
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, rd.read_to_end(&mut got))
        .await
        .expect("the echo ends once the whole body went through")
        .unwrap();
    let _ = writer.await;
    let text_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    // Decode the chunked echo the proxy relayed.
    let mut rest = &got[text_end..];
    let mut echoed = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
        rest = &rest[eol + 2..];
        if n == 0 {
            break;
        }
        echoed.extend_from_slice(&rest[..n]);
        rest = &rest[n + 2..];
    }
    assert_eq!(echoed.len(), SIZE);
    assert!(echoed == body, "echo differs from the body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_caught_in_the_keep_alive_race_is_not_held_against_the_backend() {
    let raw = Raw::start().await;
    let ep = EndpointConfig::new("raw", raw.addr);
    let mut r = route(vec![ep]);
    // One failure held against it would eject it.
    r.outlier.consecutive_failures = 1;
    let proxy = Proxy::start(ProxyConfig::default(), vec![r]).await;
    proxy.wait_healthy(1).await;
    // A kept-alive connection to reuse, then a POST the backend drops on it at once: not safe
    // to send again, so a 502, but the backend's idle timer, not a failing backend.
    assert_eq!(get(&client(), &proxy.url("/c/plain")).await.unwrap().0, 200);
    let r = exchange(
        proxy.addr,
        b"POST /c/drop HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert_eq!(proxy.metric("fleetlb_ejections_total", &[]), 0.0);
    let snapshot = proxy.dataplane.snapshot();
    let e = &snapshot[0].endpoints[0];
    assert_eq!(e.state, fleetlb_dataplane::EndpointState::Healthy);
    assert!(e.latency_ms < 100.0, "estimate {} ms", e.latency_ms);
}

#[tokio::test]
async fn a_switch_to_a_protocol_not_asked_for_is_a_502() {
    let (_raw, proxy) = behind_proxy().await;
    let r = exchange(
        proxy.addr,
        b"GET /c/wrong-switch HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
}
