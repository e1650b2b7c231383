//! The client-facing listener: accept, limit, serve HTTP/1.1 and HTTP/2, drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{Shared, proxy};

/// What the connections of one listener share: a single `Arc` clone per connection and per
/// request.
struct Listener {
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
}

const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 25\r\nconnection: close\r\n\r\nconnection limit reached\n";

/// Accepts client connections until `shutdown` completes, then stops accepting and waits up to
/// `ProxyConfig::drain_timeout` for requests in flight to finish.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let cfg = &shared.config;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    // HTTP/2 (ALPN h2 on the HTTPS listener, prior knowledge on the plain one): the same
    // header budget as HTTP/1, bounded streams, and pings so a dead peer frees its slot.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    let (first_byte, drain) = (cfg.header_read_timeout, cfg.drain_timeout);
    let this = Arc::new(Listener { shared, builder });
    let graceful = GracefulShutdown::new();
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
        let svc_this = this.clone();
        let peer_ip = crate::headers::peer_ip(peer);
        let secure = tls.is_some();
        let svc = service_fn(move |req| {
            let this = svc_this.clone();
            let peer_ip = peer_ip.clone();
            // Boxed: hyper keeps the service's future inside every connection, idle ones too;
            // one allocation per request keeps that space out of every idle connection.
            Box::pin(async move {
                Ok::<_, Infallible>(proxy::handle(&this.shared, req, &peer_ip, secure).await)
            })
        });
        let watcher = graceful.watcher();
        let this = this.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let metrics = &this.shared.metrics;
            metrics.connections_active.inc();
            // hyper's header timer starts at the first byte, and HTTP/1-or-2 detection waits for
            // it: a connection that never sends one would hold its slot forever.
            let mut probe = [0u8; 1];
            let sent = tokio::time::timeout(first_byte, stream.peek(&mut probe)).await;
            if !matches!(sent, Ok(Ok(n)) if n > 0) {
                metrics.connections_idle_closed.inc();
            } else if let Some(acceptor) = tls {
                // The handshake gets the same time a request's headers get.
                match tokio::time::timeout(first_byte, acceptor.accept(stream)).await {
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
                        run(&this, TokioIo::new(stream), svc, watcher, peer).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, %err, "TLS handshake failed");
                        metrics
                            .tls_handshakes
                            .with_label_values(&["failed", ""])
                            .inc();
                    }
                    Err(_) => {
                        metrics
                            .tls_handshakes
                            .with_label_values(&["timeout", ""])
                            .inc();
                    }
                }
            } else {
                run(&this, TokioIo::new(stream), svc, watcher, peer).await;
            }
            metrics.connections_active.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("draining client connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all client connections closed"),
        () = tokio::time::sleep(drain) => tracing::warn!(timeout = ?drain, "drain timeout reached; closing remaining connections"),
    }
}

/// Serves one client connection (plain or TLS) until it ends or the drain closes it.
async fn run<I, S>(
    this: &Listener,
    io: I,
    svc: S,
    watcher: hyper_util::server::graceful::Watcher,
    peer: std::net::SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<crate::ResponseBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = this
        .builder
        .serve_connection_with_upgrades(io, svc)
        .into_owned();
    if let Err(err) = watcher.watch(conn).await {
        tracing::debug!(%peer, ?err, "client connection ended with an error");
    }
}
