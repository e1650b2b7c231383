//! Hostile clients, through real sockets: malformed and smuggling-shaped requests, path tricks,
//! pipelining, huge and stalled bodies, thousands of idle connections. Each gets the right 4xx or
//! a clean close, never reaches a backend in a form it could read differently from fleetlb, and
//! leaves the proxy serving everyone else.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fleetlb_dataplane::{ProxyConfig, RouteConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn still_serves(proxy: &Proxy) {
    let r = exchange(
        proxy.addr,
        b"GET /c/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_smuggling_shaped_requests_never_reach_a_backend() {
    let (up, proxy) = one_healthy_with_d(ProxyConfig::default()).await;
    let cases: &[&[u8]] = &[
        b"GET\r\n\r\n",
        b"GET /c HTTP/9.9\r\nHost: x\r\n\r\n",
        b"G\x00T /c HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /c\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: x\r\n: empty-name\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello",
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /c HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // A coding fleetlb would strip while re-framing: 501, not gzip bytes passed as plain.
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // Two hosts: which one would the backend believe?
        b"GET /c HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    ];
    for raw in cases {
        let before = up.hits.load(Relaxed);
        let r = exchange(proxy.addr, raw).await;
        let shown = String::from_utf8_lossy(raw);
        assert!(
            r.is_empty() || r.starts_with("HTTP/1.1 4") || r.starts_with("HTTP/1.1 5"),
            "{shown:?} got {r:?}"
        );
        assert!(!r.contains("HTTP/1.1 200"), "{shown:?} was served: {r:?}");
        assert_eq!(
            up.hits.load(Relaxed),
            before,
            "{shown:?} reached the backend"
        );
    }
    still_serves(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_authority_outranks_the_host_header() {
    let (_up, proxy) = one_healthy(ProxyConfig::default()).await;
    let r = exchange(
        proxy.addr,
        b"GET http://real.example/c HTTP/1.1\r\nHost: spoofed.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(header(&r, "x-seen-host"), Some("real.example"));
    assert_eq!(header(&r, "x-seen-forwarded-host"), Some("real.example"));
    // Userinfo in the target never becomes a Host.
    let r = exchange(
        proxy.addr,
        b"GET http://user:secret@real.example:8080/c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!r.contains("secret"), "{r}");
    if r.starts_with("HTTP/1.1 200") {
        assert_eq!(header(&r, "x-seen-host"), Some("real.example:8080"));
    }
}

/// `/c` served by `a`, `/d` by `b`.
async fn one_healthy_with_d(cfg: ProxyConfig) -> (Upstream, Proxy) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut d = RouteConfig::new("d", "/d", vec![b.endpoint()]);
    d.health = fast_health();
    let proxy = Proxy::start(cfg, vec![route(vec![a.endpoint()]), d]).await;
    proxy.wait_healthy(2).await;
    std::mem::forget(b);
    (a, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_routing_and_never_escape_their_prefix() {
    let (_a, proxy) = one_healthy_with_d(ProxyConfig::default()).await;
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // (request path, backend that answers, path it sees)
    let routed = [
        ("/c/x", "a", "/c/x"),
        ("/c/../d/x", "b", "/d/x"),
        ("/c/./x", "a", "/c/x"),
        ("//c//x", "a", "/c/x"),
        ("/d/%2e%2E/c/y?q=1", "a", "/c/y?q=1"),
        ("/c/a%20b/..", "a", "/c/"),
        ("/c/..a", "a", "/c/..a"),
    ];
    for (path, backend, seen) in routed {
        let r = exchange(proxy.addr, get(path).as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        assert!(
            r.ends_with(backend),
            "{path} went to the wrong backend: {r}"
        );
        assert_eq!(header(&r, "x-seen-path"), Some(seen), "{path}: {r}");
    }
    // Escapes and encoded separators are refused before routing.
    for path in [
        "/..",
        "/c/../../d",
        "/c%2F..%2Fd",
        "/c/..%2fd",
        "/c/%5c..",
        "/c/%2e%2e/%2e%2e/x",
    ] {
        let r = exchange(proxy.addr, get(path).as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{path}: {r}");
        assert!(r.contains("bad request path"), "{path}: {r}");
    }
    // A long path and query travel intact; one past the head limit is refused.
    let long = format!("/c/{}?{}", "p".repeat(6000), "q".repeat(6000));
    let r = exchange(proxy.addr, get(&long).as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{}", &r[..r.len().min(200)]);
    assert_eq!(header(&r, "x-seen-path"), Some(long.as_str()));
    let huge = format!("/c/{}", "p".repeat(200_000));
    let r = exchange(proxy.addr, get(&huge).as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 414"),
        "{}",
        &r[..r.len().min(200)]
    );
    still_serves(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (up, proxy) = one_healthy(ProxyConfig::default()).await;
    let r = exchange(
        proxy.addr,
        b"GET /c/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /c/2 HTTP/1.1\r\nHost: x\r\n\r\nGET /c/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let paths: Vec<&str> = r
        .lines()
        .filter_map(|l| l.strip_prefix("x-seen-path: "))
        .collect();
    assert_eq!(paths, ["/c/1", "/c/2", "/c/3"], "{r}");
    assert_eq!(r.matches("HTTP/1.1 200").count(), 3);
    assert_eq!(up.hits.load(Relaxed), 3);
}

/// Requests pipelined and then the client's sending side closed (`printf ... | nc -N`): the
/// request being served when the close arrives is answered, as hyper answers it (a close seen
/// while nothing more is buffered is the client going away, hyper's rule without half-close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_then_a_half_close_are_all_answered() {
    let (_up, proxy) = one_healthy_with_d(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /c/a HTTP/1.1\r\nHost: x\r\n\r\nGET /c/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let r = read_to_close(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("x-seen-path: /c/a"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_body_behind_expect_continue_streams_through() {
    let (_up, proxy) = one_healthy(ProxyConfig::default()).await;
    const SIZE: usize = 64 << 20;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!("POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 25];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..SIZE / chunk.len() {
        s.write_all(&chunk).await.unwrap();
    }
    let r = read_to_close(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(
        header(&r, "x-seen-body-bytes"),
        Some(SIZE.to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_mid_body_is_cut_off_at_the_body_timeout() {
    let a = Upstream::start("a").await;
    let mut r = route(vec![a.endpoint()]);
    r.outlier.consecutive_failures = 1;
    let cfg = ProxyConfig {
        limits: fleetlb_dataplane::Limits {
            body_timeout: Duration::from_millis(500),
            ..Default::default()
        },
        ..ProxyConfig::default()
    };
    let proxy = Proxy::start(cfg, vec![r]).await;
    proxy.wait_healthy(1).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    // Others are served while it stalls.
    still_serves(&proxy).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("the stalled request ends");
    let r = String::from_utf8_lossy(&buf);
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    // The backend waited for the client: nothing is held against it.
    assert_eq!(
        proxy.metric(
            "fleetlb_proxy_errors_total",
            &[("reason", "client_timeout")]
        ),
        1.0
    );
    assert_eq!(proxy.metric("fleetlb_ejections_total", &[]), 0.0);
    still_serves(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_still_moving_is_never_cut_at_the_request_timeout() {
    let a = Upstream::start("a").await;
    let mut r = route(vec![a.endpoint()]);
    r.request_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(ProxyConfig::default(), vec![r]).await;
    proxy.wait_healthy(1).await;
    // 30 pieces of 16 KiB, one every 60 ms: nearly 2 s in all, never 300 ms without a byte.
    const PIECES: usize = 30;
    const PIECE: usize = 16 << 10;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            PIECES * PIECE
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let piece = vec![b'p'; PIECE];
    let mut pace = tokio::time::interval(Duration::from_millis(60));
    for _ in 0..PIECES {
        // The client's own pace, what this test is about (not a wait for the proxy).
        pace.tick().await;
        s.write_all(&piece).await.unwrap();
    }
    let r = read_to_close(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let expected = (PIECES * PIECE).to_string();
    assert_eq!(header(&r, "x-seen-body-bytes"), Some(expected.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_neither_block_service_nor_linger() {
    let cfg = ProxyConfig {
        limits: fleetlb_dataplane::Limits {
            head_timeout: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        ..ProxyConfig::default()
    };
    let (_up, proxy) = one_healthy(cfg).await;
    // A keep-alive connection idle after one request is closed too.
    let mut kept = TcpStream::connect(proxy.addr).await.unwrap();
    kept.write_all(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    still_serves(&proxy).await;
    // None of them sent a request: each is closed at the header-read timeout.
    let closes = idle.into_iter().map(|mut s| async move {
        let mut b = [0u8; 64];
        tokio::time::timeout(DEADLINE, s.read(&mut b)).await
    });
    let mut buf = Vec::new();
    let kept_closed = tokio::time::timeout(DEADLINE, kept.read_to_end(&mut buf)).await;
    assert!(
        kept_closed.is_ok(),
        "an idle keep-alive connection stays open"
    );
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    for r in futures::future::join_all(closes).await {
        let read = r.expect("idle connection closed by the proxy");
        // End of stream or a reset: closed, without a byte sent.
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    still_serves(&proxy).await;
}

/// A backend that answers health checks, but resets every other response after 10 of its
/// 100 promised body bytes.
async fn resetting_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        if head.starts_with("GET /health") {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .await;
                        } else {
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                                )
                                .await;
                            let _ = s.flush().await;
                            // Reset, not a clean close.
                            let _ = s.set_zero_linger();
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_resetting_mid_body_truncates_that_response_and_nothing_else() {
    let addr = resetting_backend().await;
    let ep = fleetlb_dataplane::EndpointConfig::new("r", addr);
    let proxy = Proxy::start(ProxyConfig::default(), vec![route(vec![ep])]).await;
    proxy.wait_healthy(1).await;
    for _ in 0..5 {
        let r = exchange(
            proxy.addr,
            b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        // The head and the bytes that arrived are relayed, then the client connection ends
        // short of the promised length: the client sees a truncated response, never a hang
        // and never a response that looks complete.
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(body.len() < 100, "a truncated body was completed: {r:?}");
    }
    // The proxy itself is unharmed: its admin view still answers and lists the endpoint.
    assert_eq!(proxy.dataplane.snapshot().len(), 1);
}

/// Each endpoint's latency estimate (ms), ejection count and state.
fn endpoint_states(proxy: &Proxy) -> Vec<(String, f64, u32, &'static str)> {
    proxy
        .dataplane
        .snapshot()
        .into_iter()
        .flat_map(|c| c.endpoints)
        .map(|e| (e.id, e.latency_ms, e.ejections, e.state.as_str()))
        .collect()
}

/// Runs `n` copies of `one` with at most `width` at a time.
async fn many<F: std::future::Future<Output = ()> + Send + 'static>(
    n: usize,
    width: usize,
    one: impl Fn() -> F,
) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        if set.len() >= width {
            set.join_next().await.unwrap().unwrap();
        }
        set.spawn(one());
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// 100 clients send `raw` and hang up once their requests have reached a backend (`hits`
/// counts them), so the proxy surely saw each one.
async fn leave_once_received(addr: std::net::SocketAddr, raw: &[u8], hits: &impl Fn() -> u64) {
    let before = hits();
    let mut batch = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        batch.push(s);
    }
    settle(|| hits() >= before + 100).await;
    assert!(
        hits() >= before + 100,
        "{} of 100 reached a backend",
        hits() - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_never_count_against_backends() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut r = route(vec![a.endpoint(), b.endpoint()]);
    // Ejection as strict as it gets: any failure blamed on a backend would show.
    r.outlier.consecutive_failures = 3;
    r.outlier.max_ejection_percent = 100;
    let proxy = Proxy::start(ProxyConfig::default(), vec![r]).await;
    proxy.wait_healthy(2).await;
    let warm = load(proxy.url("/c"), 200, 4).await;
    assert_eq!(ok_count(&warm), 200);
    let addr = proxy.addr;
    const N: usize = 1000;

    // 1. Malformed chunked bodies: the client's error, answered 400.
    let bad = Arc::new(AtomicU64::new(0));
    let counter = bad.clone();
    many(N, 50, move || {
        let counter = counter.clone();
        async move {
            let r = exchange(
                addr,
                b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
            )
            .await;
            if r.starts_with("HTTP/1.1 400") {
                counter.fetch_add(1, Relaxed);
            }
        }
    })
    .await;
    assert_eq!(
        bad.load(Relaxed),
        N as u64,
        "every malformed body gets a 400"
    );

    // 2. Uploads abandoned mid-body: 10 of 1000 promised bytes, then the client leaves (once
    // its request has reached a backend, so the proxy surely saw it).
    let hits = || a.hits.load(Relaxed) + b.hits.load(Relaxed);
    for _ in 0..N / 100 {
        leave_once_received(
            addr,
            b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
            &hits,
        )
        .await;
    }

    // 3. Clients hanging up before the answer: the backends take 200 ms; each client leaves as
    // soon as its request has reached a backend.
    a.delay_ms.store(200, Relaxed);
    b.delay_ms.store(200, Relaxed);
    for _ in 0..N / 100 {
        leave_once_received(addr, b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n", &hits).await;
    }
    a.delay_ms.store(0, Relaxed);
    b.delay_ms.store(0, Relaxed);

    let closed = || proxy.metric("fleetlb_proxy_errors_total", &[("reason", "client_closed")]);
    settle(|| closed() >= (2 * N) as f64).await;
    assert_eq!(
        closed(),
        (2 * N) as f64,
        "every abandoned request is the client's"
    );
    assert_eq!(
        proxy.metric(
            "fleetlb_proxy_errors_total",
            &[("reason", "bad_request_body")]
        ),
        N as f64
    );
    for reason in ["reset", "connect", "timeout"] {
        assert_eq!(
            proxy.metric("fleetlb_proxy_errors_total", &[("reason", reason)]),
            0.0,
            "no upstream error ({reason}) was counted"
        );
    }
    assert_eq!(proxy.metric("fleetlb_ejections_total", &[]), 0.0);
    for (id, latency_ms, ejections, state) in endpoint_states(&proxy) {
        assert_eq!((ejections, state), (0, "healthy"), "{id}");
        // A failure would have charged the 1 s penalty; the answers seen were all fast.
        assert!(latency_ms < 100.0, "{id}: estimate {latency_ms} ms");
    }
    // Both backends keep serving.
    let (a0, b0) = (a.hits.load(Relaxed), b.hits.load(Relaxed));
    let after = load(proxy.url("/c"), 200, 4).await;
    assert_eq!(ok_count(&after), 200, "{:?}", failures(&after));
    assert!(a.hits.load(Relaxed) > a0 && b.hits.load(Relaxed) > b0);
}
