//! The client-facing listener: accept, limit, serve HTTP/1.1 and HTTP/2, drain on shutdown.
//!
//! Every connection runs under `conn::drive`, which holds its timers (see `limits`); this file
//! only accepts, hands out the `--max-connections` slots and runs the drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::conn::{self, ClientIo, ConnState, ListenerCtl, Phase};
use crate::{Shared, proxy};

/// What the connections of one listener share: a single `Arc` clone per connection and per
/// request.
struct Listener {
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
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
    let (phase_tx, phase) = watch::channel(Phase::Serving);
    let ctl = Arc::new(ListenerCtl {
        phase,
        tasks: tokio_util::task::TaskTracker::new(),
    });
    let this = Arc::new(Listener {
        shared,
        builder,
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
        let state = Arc::new(ConnState::new(shared, permit, this.ctl.clone()));
        let this = this.clone();
        let tls = tls.clone();
        ctl.tasks
            .spawn(async move { accepted(&this, stream, peer, tls, state).await });
    }
    drop(listener);
    tracing::info!("draining client connections");
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
/// HTTP, all under the head timer.
async fn accepted(
    this: &Arc<Listener>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<ConnState>,
) {
    let metrics = &this.shared.metrics;
    // HTTP/1-or-2 detection and the TLS handshake wait for the first byte: a connection that
    // never sends one is closed at the head timeout.
    let mut probe = [0u8; 1];
    let first = tokio::time::timeout(state.limits.head_timeout, stream.peek(&mut probe)).await;
    if !matches!(first, Ok(Ok(n)) if n > 0) {
        metrics.connections_idle_closed.inc();
        state.limit_hit("client-head-timeout");
        return;
    }
    state.first_byte();
    let io = ClientIo::new(stream, state.clone());
    let Some(acceptor) = tls else {
        return run(this, TokioIo::new(io), peer, false, state).await;
    };
    // The handshake counts toward the first request's head time.
    match tokio::time::timeout_at(state.head_deadline(), acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            let version = match stream.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1_3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1_2",
                _ => "",
            };
            metrics
                .tls_handshakes
                .with_label_values(&["ok", version])
                .inc();
            run(this, TokioIo::new(stream), peer, true, state).await;
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

/// Serves HTTP on one client connection (plain or TLS) until it ends, breaks a limit, or the
/// drain closes it.
async fn run<I>(
    this: &Arc<Listener>,
    io: I,
    peer: std::net::SocketAddr,
    secure: bool,
    state: Arc<ConnState>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer_ip = crate::headers::Peer::new(peer, &this.shared.config.trusted_proxies);
    let svc_this = this.clone();
    let svc_state = state.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let this = svc_this.clone();
        let peer_ip = peer_ip.clone();
        let state = svc_state.clone();
        // Boxed: hyper keeps the service's future inside every connection, idle ones too;
        // one allocation per request keeps that space out of every idle connection.
        Box::pin(async move {
            let h2 = req.version() == http::Version::HTTP_2;
            let Some(active) = state.begin(h2).await else {
                return Ok::<_, Infallible>(crate::error::ProxyError::ConnectionBusy.response());
            };
            Ok::<_, Infallible>(proxy::handle(&this.shared, req, &peer_ip, secure, active).await)
        })
    });
    let conn = this
        .builder
        .serve_connection_with_upgrades(io, svc)
        .into_owned();
    conn::drive(conn, |c| c.graceful_shutdown(), &state).await;
}
