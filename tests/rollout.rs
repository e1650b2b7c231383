//! A rolling update drops nothing. On SIGTERM the proxy leaves the Service's endpoints
//! (`/readyz` 503) at once, keeps accepting and serving through `--shutdown-delay`, then stops
//! accepting and drains: every HTTP/1.1 answer says `Connection: close`, HTTP/2 gets GOAWAY.
//! Clients under continuous keep-alive load see no refused connection and no failed request.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use support::{DEADLINE, Fleetlb, get, read_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend answering `ok` to every request, keep-alive.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_head(&mut s, &mut buf).await.is_some() {
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One request on `s` and its whole answer: (status, the answer said `Connection: close`).
async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, bool), String> {
    s.write_all(b"GET /c/load HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let head = read_head(s, buf)
        .await
        .ok_or("the connection ended before an answer")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no content-length: {head:?}"))?;
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err("the answer was cut".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..len);
    Ok((status, header("connection").is_some_and(|v| v == "close")))
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    /// HTTP/1.1 connections the proxy ended with `Connection: close`.
    told_to_close: AtomicU64,
    /// HTTP/2 connections that got GOAWAY.
    goaway: AtomicU64,
    /// HTTP/2 requests the GOAWAY turned away unprocessed (a client sends them again).
    unprocessed: AtomicU64,
}

/// A keep-alive HTTP/1.1 client: request after request on one connection until the proxy says
/// `Connection: close`; then a new connection, until the endpoint's removal reaches it.
async fn h1_client(proxy: SocketAddr, removed: Arc<AtomicBool>, t: Arc<Tally>) {
    while !removed.load(SeqCst) {
        let mut s = match TcpStream::connect(proxy).await {
            Ok(s) => s,
            Err(_) => {
                t.refused.fetch_add(1, SeqCst);
                return;
            }
        };
        let mut buf = Vec::new();
        loop {
            match exchange(&mut s, &mut buf).await {
                Ok((200, close)) => {
                    t.ok.fetch_add(1, SeqCst);
                    if close {
                        t.told_to_close.fetch_add(1, SeqCst);
                        break;
                    }
                }
                Ok(_) | Err(_) => {
                    t.failed.fetch_add(1, SeqCst);
                    return;
                }
            }
        }
    }
}

/// An HTTP/2 client: request after request on one connection until GOAWAY.
async fn h2_client(proxy: SocketAddr, t: Arc<Tally>) {
    let Ok(tcp) = TcpStream::connect(proxy).await else {
        t.refused.fetch_add(1, SeqCst);
        return;
    };
    let Ok((mut send, conn)) = h2::client::handshake(tcp).await else {
        t.failed.fetch_add(1, SeqCst);
        return;
    };
    let conn = tokio::spawn(conn);
    loop {
        // Refused before a request goes out: GOAWAY is the expected end, anything else fails.
        let ended = |e: h2::Error| {
            let counter = if e.is_go_away() { &t.goaway } else { &t.failed };
            counter.fetch_add(1, SeqCst);
        };
        send = match send.ready().await {
            Ok(s) => s,
            Err(e) => break ended(e),
        };
        let req = http::Request::get("http://x/c/h2").body(()).unwrap();
        let answer = match send.send_request(req, true) {
            Ok((answer, _)) => answer,
            Err(e) => break ended(e),
        };
        match answer.await {
            Ok(resp) if resp.status() == 200 => {
                let mut body = resp.into_body();
                while let Some(chunk) = body.data().await {
                    if chunk.is_err() {
                        t.failed.fetch_add(1, SeqCst);
                        return;
                    }
                }
                t.ok.fetch_add(1, SeqCst);
            }
            Ok(_) => {
                t.failed.fetch_add(1, SeqCst);
                break;
            }
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away() => {
                // Never processed: the GOAWAY's last stream id is below it.
                t.unprocessed.fetch_add(1, SeqCst);
                t.goaway.fetch_add(1, SeqCst);
                break;
            }
            Err(_) => {
                t.failed.fetch_add(1, SeqCst);
                break;
            }
        }
    }
    // The proxy closes the connection once its streams are done.
    let _ = tokio::time::timeout(DEADLINE, conn).await;
}

/// Polls until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_keep_alive_load_refuses_nothing_and_fails_nothing() {
    let b = backend().await;
    let yaml = format!(
        "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: c\nspec:\n  route: /c\n  replicas: 1\n  instanceType: t2.micro\n  provider:\n    static:\n      endpoints: [\"{b}\"]\n  healthCheck:\n    intervalSeconds: 1\n    timeoutSeconds: 1\n"
    );
    let mut f = tokio::task::spawn_blocking(move || {
        Fleetlb::standalone(&[("c.yaml", yaml)], &["--shutdown-delay", "5s"], None)
    })
    .await
    .unwrap();
    let (proxy, admin) = (f.proxy, f.admin);
    until("/c answers", || {
        get(proxy, "/c/x").is_some_and(|r| r.status == 200)
    })
    .await;

    let removed = Arc::new(AtomicBool::new(false));
    let t = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(tokio::spawn(h1_client(proxy, removed.clone(), t.clone())));
    }
    for _ in 0..2 {
        clients.push(tokio::spawn(h2_client(proxy, t.clone())));
    }
    until("load flowing", || t.ok.load(SeqCst) > 200).await;

    f.signal("-TERM");
    // Out of the endpoints at once...
    until("/readyz answers 503", || {
        get(admin, "/readyz").is_some_and(|r| r.status == 503)
    })
    .await;
    // ... while a connection opened now (a node whose endpoints are not updated yet) is
    // still accepted and served, on its own and beside the running load.
    let fresh = get(proxy, "/c/fresh").map(|r| r.status);
    assert_eq!(
        fresh,
        Some(200),
        "refused or failed during the shutdown delay"
    );
    let before = t.ok.load(SeqCst);
    until("load still served in the delay", || {
        t.ok.load(SeqCst) > before + 100
    })
    .await;
    // The removal reaches the clients: they open no new connection from now on, and keep
    // their open ones until the proxy tells them to go.
    removed.store(true, SeqCst);

    for c in clients {
        tokio::time::timeout(DEADLINE, c)
            .await
            .expect("every client was told to go (Connection: close or GOAWAY)")
            .unwrap();
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = support::eventually("fleetlb exits", || f.child.try_wait().ok().flatten());
        (s, f.log_text())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "fleetlb exited with {}", status.0);
    let (failed, refused) = (t.failed.load(SeqCst), t.refused.load(SeqCst));
    assert_eq!(
        (failed, refused),
        (0, 0),
        "failed requests, refused connections; ok: {}\nlog:\n{}",
        t.ok.load(SeqCst),
        status.1
    );
    assert_eq!(
        t.told_to_close.load(SeqCst),
        6,
        "each HTTP/1.1 client's last answer said Connection: close"
    );
    assert_eq!(t.goaway.load(SeqCst), 2, "each HTTP/2 client got GOAWAY");
}
