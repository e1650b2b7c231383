//! The client-facing listener: accept, limit, serve HTTP/1.1 and HTTP/2, drain on shutdown.
//!
//! Every connection runs under `conn::drive`, which holds its timers (see `limits`); this file
//! only accepts, hands out the `--max-connections` slots and runs the drain.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::access_log::TlsInfo;
use crate::conn::{self, ClientIo, ConnState, Ended, ListenerCtl, Phase, Rewind};
use crate::{Shared, proxy};

/// What the connections of one listener share: a single `Arc` clone per connection and per
/// request.
struct Listener {
    shared: Arc<Shared>,
    /// HTTPS (ALPN decides between HTTP/1.1 and HTTP/2).
    builder: auto::Builder<TokioExecutor>,
    /// Plain HTTP/2 (prior knowledge).
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    ctl: Arc<ListenerCtl>,
}

const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 25\r\nconnection: close\r\n\r\nconnection limit reached\n";

/// Accepts client connections until `shutdown` completes, then stops accepting and waits up to
/// `--drain-timeout` for requests and tunnels in flight to finish; what is left is closed.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let limits = shared.limits.clone();
    // The head timer is fleetlb's own (`conn`): from the first byte of each head, not from the
    // end of the last response, so an idle keep-alive connection gets its own, longer, timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size((limits.max_header_bytes as usize).max(8192))
        .keep_alive(true);
    // HTTP/2 (ALPN h2 on the HTTPS listener, prior knowledge on the plain one): the same
    // header budget as HTTP/1, bounded streams, resets of streams not yet accepted bounded
    // (h2's own guard, beside fleetlb's count of resets of accepted ones), and pings so a dead
    // peer frees its slot (pings are not activity: the keep-alive timer still runs).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(limits.h2_max_streams)
        .max_pending_accept_reset_streams(Some(20))
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(limits.h2_max_streams)
        .max_pending_accept_reset_streams(Some(20))
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    let (phase_tx, phase) = watch::channel(Phase::Serving);
    let ctl = Arc::new(ListenerCtl {
        phase,
        draining: std::sync::atomic::AtomicBool::new(false),
        tasks: tokio_util::task::TaskTracker::new(),
    });
    let this = Arc::new(Listener {
        shared,
        builder,
        h2,
        ctl: ctl.clone(),
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let shared = &this.shared;
        // One limit for the process, however many listeners serve the port.
        let Ok(permit) = shared.connection_limit.clone().try_acquire_owned() else {
            // Over the limit: a short 503 and close, without reading the request. Best effort;
            // a full socket buffer just means a plain close.
            shared.metrics.connections_rejected.inc();
            if tls.is_none() {
                // Plain text only where the client speaks it; a TLS client just sees a close.
                let _ = stream.try_write(AT_CAPACITY);
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        shared.metrics.connections_total.inc();
        let state = Arc::new(ConnState::new(
            shared,
            permit,
            this.ctl.clone(),
            tls.is_none(),
        ));
        ctl.tasks
            .spawn(accepted(this.clone(), stream, peer, tls.clone(), state));
    }
    drop(listener);
    tracing::info!("draining client connections");
    ctl.draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = phase_tx.send(Phase::Draining);
    ctl.tasks.close();
    let drain = this.shared.limits.drain_timeout;
    tokio::select! {
        () = ctl.tasks.wait() => tracing::info!("all client connections closed"),
        () = tokio::time::sleep(drain) => {
            tracing::warn!(timeout = ?drain, remaining = ctl.tasks.len(), "drain timeout reached; closing remaining connections and tunnels");
            let _ = phase_tx.send(Phase::Closing);
            // They close at once; wait for that so nothing outlives the listener.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), ctl.tasks.wait()).await;
        }
    }
}

/// Serves one accepted connection: waits for its first byte, does the TLS handshake, then
/// HTTP, all under the head timer. Only what a parked HTTP/1.1 connection needs is kept in
/// this task's own future (every idle connection costs its size); the rest is boxed while it
/// runs.
async fn accepted(
    this: Arc<Listener>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<ConnState>,
) {
    let mut io = Box::pin(open(&this, stream, peer, tls, &state)).await;
    serve_h1(&this, &mut io, &peer, &state).await;
}

/// `TCP_NOTSENT_LOWAT` of client sockets (as Cloudflare and Apple set for HTTP/2).
const CLIENT_NOTSENT_LOWAT: u32 = 16 * 1024;

/// Everything but plain HTTP/1.1, served here to the end (`None`); plain HTTP/1.1 is handed
/// back once its first byte is in.
async fn open(
    this: &Arc<Listener>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<TlsAcceptor>,
    state: &Arc<ConnState>,
) -> Option<Rewind<ClientIo>> {
    let metrics = &this.shared.metrics;
    // HTTP/1-or-2 detection and the TLS handshake wait for the first byte: a connection that
    // never sends one is closed at the head timeout.
    let mut probe = [0u8; 1];
    let first = tokio::time::timeout(state.limits().head_timeout, stream.peek(&mut probe)).await;
    if !matches!(first, Ok(Ok(n)) if n > 0) {
        metrics.connections_idle_closed.inc();
        state.limit_hit("client-head-timeout");
        return None;
    }
    state.first_byte();
    // The kernel takes at most this much ahead of what the client has received, and says the
    // socket is writable again once half of it went out: a slow reader holds 16 KiB of kernel
    // memory rather than megabytes, and each write that waits on it ends after it took a few
    // KiB (which is what the minimum rate is judged on).
    let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(CLIENT_NOTSENT_LOWAT);
    let io = ClientIo::new(stream, state.clone());
    if let Some(acceptor) = tls {
        serve_tls(this, io, acceptor, peer, state.clone()).await;
        return None;
    }
    // HTTP/2 with prior knowledge opens with its preface; anything else is HTTP/1.
    let preface =
        tokio::time::timeout_at(state.head_deadline(), starts_with_preface(io.socket())).await;
    match preface {
        Ok(Ok(true)) => serve_h2(this, TokioIo::new(io), peer, state.clone()).await,
        Ok(Ok(false)) => return Some(Rewind::new(bytes::Bytes::new(), io)),
        Ok(Err(_)) => {}
        Err(_) => state.limit_hit("client-head-timeout"),
    }
    None
}

/// The TLS handshake (its time counts toward the first request's head), then HTTP as ALPN
/// agreed.
async fn serve_tls(
    this: &Arc<Listener>,
    io: ClientIo,
    acceptor: TlsAcceptor,
    peer: std::net::SocketAddr,
    state: Arc<ConnState>,
) {
    let metrics = &this.shared.metrics;
    match tokio::time::timeout_at(state.head_deadline(), acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            let session = stream.get_ref().1;
            let (label, version) = match session.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => ("TLSv1_3", "TLSv1.3"),
                Some(rustls::ProtocolVersion::TLSv1_2) => ("TLSv1_2", "TLSv1.2"),
                _ => ("", ""),
            };
            metrics
                .tls_handshakes
                .with_label_values(&["ok", label])
                .inc();
            let info = Arc::new(TlsInfo {
                version,
                sni: session.server_name().map(Box::from),
            });
            run(this, TokioIo::new(stream), peer, Some(info), state).await;
        }
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "TLS handshake failed");
            metrics
                .tls_handshakes
                .with_label_values(&["failed", ""])
                .inc();
        }
        Err(_) => {
            state.limit_hit("client-head-timeout");
            metrics
                .tls_handshakes
                .with_label_values(&["timeout", ""])
                .inc();
        }
    }
}

/// Whether the connection opens with the HTTP/2 preface (`PRI * HTTP/2.0`): peeks until
/// four bytes say so or one byte says otherwise.
async fn starts_with_preface(stream: &TcpStream) -> std::io::Result<bool> {
    const PRI: &[u8] = b"PRI ";
    let mut buf = [0u8; 4];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        if buf[..n] != PRI[..n] {
            return Ok(false);
        }
        if n == PRI.len() {
            return Ok(true);
        }
        // A partial preface: wait for more (under the head timer) without spinning.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

type Answer = hyper::Response<crate::ResponseBody>;
/// A request's handling, boxed (see `service`).
type Handling = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

/// The request handler of one connection.
fn service(
    this: &Arc<Listener>,
    peer: std::net::SocketAddr,
    tls: Option<Arc<TlsInfo>>,
    state: &Arc<ConnState>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Answer,
    Error = Infallible,
    Future = Handling,
> + Clone
+ Unpin
+ use<> {
    let peer_ip = crate::headers::Peer::new(peer, &this.shared.config.trusted_proxies);
    let this = this.clone();
    let state = state.clone();
    service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let this = this.clone();
        let peer_ip = peer_ip.clone();
        let state = state.clone();
        let tls = tls.clone();
        // Boxed: hyper keeps the service's future inside every connection, idle ones too;
        // one allocation per request keeps that space out of every idle connection.
        Box::pin(async move {
            let h2 = req.version() == http::Version::HTTP_2;
            let req = req.map(crate::body::ClientBody::Hyper);
            let mut resp =
                proxy::admit(&this.shared, &state, h2, req, &peer_ip, tls.as_ref()).await;
            if !h2
                && state
                    .ctl
                    .draining
                    .load(std::sync::atomic::Ordering::Relaxed)
            {
                // HTTP/1.1 has no GOAWAY: the answer itself tells the client to go elsewhere.
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp)
        }) as Handling
    })
}

/// Serves plain HTTP/1.1 with fleetlb's own server side (`h1::serve`), one request at a time.
/// Between requests the connection holds only its socket (and what was read of the next
/// request), as nginx frees its buffers between requests. A WebSocket upgrade hands the socket
/// to its tunnel.
async fn serve_h1(
    this: &Arc<Listener>,
    slot: &mut Option<Rewind<ClientIo>>,
    peer: &std::net::SocketAddr,
    state: &Arc<ConnState>,
) {
    // The socket lives in the caller's future: this one holds a reference, not a copy of it.
    let limit = state.limits().max_header_bytes as usize;
    loop {
        let Some(io) = slot.as_mut() else {
            return;
        };
        if !conn::head(state, io, limit).await {
            return;
        }
        let Some(io) = slot.take() else {
            return;
        };
        // Boxed, and gone once the request is over: an idle connection holds none of it.
        let Some(next) = Box::pin(exchange(this, io, *peer, state, limit)).await else {
            return;
        };
        let io = slot.insert(next);
        if !io.pre_is_empty() {
            // Part of the next head was read already: its timer runs.
            state.first_byte();
        } else if !conn::idle(state, io.io.socket()).await {
            return;
        }
    }
}

/// One request of a plain HTTP/1.1 connection, under the connection's timers: the socket back
/// when the connection goes on, `None` when it is over.
async fn exchange(
    this: &Arc<Listener>,
    io: Rewind<ClientIo>,
    peer: std::net::SocketAddr,
    state: &Arc<ConnState>,
    limit: usize,
) -> Option<Rewind<ClientIo>> {
    // Made per request rather than kept: every idle connection would hold it.
    let peer = crate::headers::Peer::new(peer, &this.shared.config.trusted_proxies);
    let serving = std::pin::pin!(crate::h1::serve(&this.shared, io, &peer, state, limit));
    let mut exchange = Kept(serving, None);
    if conn::drive(&mut exchange, |_| {}, state).await == Ended::Closed {
        return None;
    }
    match exchange.1 {
        Some(crate::h1::Outcome::Next(next)) => Some(next),
        Some(crate::h1::Outcome::Close(mut rest)) => {
            // As hyper's own end does: the write side closes, then a lingering close.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut rest).await;
            linger(&mut rest).await;
            None
        }
        _ => None,
    }
}

/// A future run under `conn::drive`, and its output once it has one.
struct Kept<'a, F: Future>(Pin<&'a mut F>, Option<F::Output>);

impl<F: Future> Future for Kept<'_, F>
where
    F::Output: Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.get_mut();
        if this.1.is_none() {
            this.1 = Some(std::task::ready!(this.0.as_mut().poll(cx)));
        }
        std::task::Poll::Ready(())
    }
}

/// Longest a closing connection is drained (nginx's `lingering_time` is 30 s, its
/// `lingering_timeout` 5 s).
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// A lingering close: once the write side is shut, what the client still sends (the rest of an
/// upload answered early, say) is read and dropped for a while, so closing with unread input
/// does not make the kernel reset the connection and throw away an answer the client has not
/// read yet.
async fn linger(io: &mut Rewind<ClientIo>) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(LINGER, async {
        let mut left: usize = 1 << 20;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Serves plain HTTP/2 (prior knowledge).
async fn serve_h2<I>(this: &Arc<Listener>, io: I, peer: std::net::SocketAddr, state: Arc<ConnState>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service(this, peer, None, &state);
    let conn = this.h2.serve_connection(io, svc);
    drive_pinned(conn, &state, |c| c.graceful_shutdown()).await;
}

/// Runs a hyper connection under `conn::drive`, boxed (it stays out of the connection task's
/// own size).
async fn drive_pinned<C: Future>(conn: C, state: &ConnState, graceful: fn(Pin<&mut C>)) {
    let mut conn = Box::pin(conn);
    conn::drive(&mut conn, |c| graceful(c.get_mut().as_mut()), state).await;
}

/// Serves HTTP on one TLS connection (ALPN: HTTP/1.1 or HTTP/2) until it ends, breaks a
/// limit, or the drain closes it.
async fn run<I>(
    this: &Arc<Listener>,
    io: I,
    peer: std::net::SocketAddr,
    tls: Option<Arc<TlsInfo>>,
    state: Arc<ConnState>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service(this, peer, tls, &state);
    let conn = this
        .builder
        .serve_connection_with_upgrades(io, svc)
        .into_owned();
    drive_pinned(conn, &state, |c| c.graceful_shutdown()).await;
}
