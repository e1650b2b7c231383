//! The request path: route, pick, forward, stream back, learn.
//!
//! Per request: one lock-free table load, one or two endpoint estimates read, one upstream
//! exchange over a pooled keep-alive connection through fleetlb's HTTP/1.1 client (`h1`), in
//! the client connection's task, atomic metric updates. Bodies stream both ways.
//!
//! Retries: a request whose connection attempt failed (nothing was sent), or an idempotent
//! request without a body whose connection broke before any response byte, goes to another
//! endpoint, up to `ProxyConfig::max_attempts` in all. A streamed body cannot be replayed.
//!
//! Blame: only what the endpoint did is learned from. A client whose body is malformed (400,
//! `bad_request_body`), who goes away before the answer (`client_closed`, nginx's 499) or who
//! stalls its body past the request timeout (408, `client_timeout`) never touches an
//! endpoint's estimate, failure count, health or ejection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use tokio::time::Instant;

use crate::Shared;
use crate::access_log::{self, Entry, TlsInfo};
use crate::balance;
use crate::body::{ClientBody, Full, InflightGuard, ResponseBody};
use crate::conn::{Active, ClientUpgrade, ConnState, Phase};
use crate::endpoint::{EjectReason, Endpoint, Transition};
use crate::error::ProxyError;
use crate::grpc;
use crate::h1;
use crate::headers::{Peer, prepare_headers, strip_hop_by_hop};
use crate::outlier;
use crate::routes::Protocol;
use crate::rules::Rule;
use crate::table::Cluster;

/// Takes one of `conn`'s request slots for `req` and handles it; a 503 when no slot frees in
/// time (`--max-upstream-per-connection`).
pub(crate) async fn admit(
    shared: &Arc<Shared>,
    conn: &Arc<ConnState>,
    h2: bool,
    req: Request<ClientBody>,
    peer: &Peer,
    tls: Option<&Arc<TlsInfo>>,
) -> Response<ResponseBody> {
    match conn.begin(h2).await {
        Some(active) => handle(shared, req, peer, tls, active).await,
        None if h2 && grpc::is_grpc_request(&req) => {
            let table = shared.table.load();
            let host = crate::rules::request_host(&req);
            let cluster = table
                .route(&host, req.uri().path())
                .and_then(|r| r.backends.first())
                .map_or("", |(c, _)| c.name.as_str());
            let err = ProxyError::ConnectionBusy;
            shared
                .metrics
                .grpc_status(cluster, grpc::code_for(err), "fleetlb");
            grpc::reshape(err)
        }
        None => ProxyError::ConnectionBusy.response(),
    }
}

/// Handles one client request end to end. Never fails: errors become responses.
async fn handle(
    shared: &Arc<Shared>,
    req: Request<ClientBody>,
    peer: &Peer,
    tls: Option<&Arc<TlsInfo>>,
    mut active: Active,
) -> Response<ResponseBody> {
    if shared.config.access_log.is_some() {
        active.set_log(Entry::start(&req, peer.addr(), tls.cloned()));
    }
    // gRPC is POST only: other requests skip the header lookup.
    let grpc_call = req.method() == Method::POST && grpc::is_grpc(req.headers());
    let h2_client = req.version() == Version::HTTP_2;
    let mut routed = None;
    let mut resp = if grpc_call && !h2_client {
        shared
            .metrics
            .proxy_error("", ProxyError::GrpcNeedsHttp2.reason());
        ProxyError::GrpcNeedsHttp2.response()
    } else {
        let tls = tls.is_some();
        route_and_forward(shared, req, peer, tls, grpc_call, &mut routed, &mut active).await
    };
    if grpc_call
        && h2_client
        && let Some(&err) = resp.extensions().get::<ProxyError>()
    {
        // A gRPC client reads its call's fate from grpc-status, not the HTTP status.
        resp = grpc::reshape(err);
        let cluster = routed
            .as_ref()
            .map_or("", |c: &Arc<Cluster>| c.name.as_str());
        shared
            .metrics
            .grpc_status(cluster, grpc::code_for(err), "fleetlb");
    }
    active.answered(
        resp.extensions()
            .get::<crate::error::ClientGone>()
            .is_some(),
    );
    if let Some(log) = active.log_mut() {
        log.status = resp.status().as_u16();
        log.reason = resp
            .extensions()
            .get::<crate::error::SelfAnswered>()
            .map(|a| a.0);
        // No body goes out after a 101 or to a HEAD: the head is the whole answer (a
        // WebSocket upgrade is logged when its 101 goes out).
        log.complete = resp.body().is_end_stream()
            || resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || log.method == Method::HEAD;
    }
    resp.body_mut().track(active);
    resp
}

async fn route_and_forward(
    shared: &Arc<Shared>,
    mut req: Request<ClientBody>,
    peer: &Peer,
    tls: bool,
    grpc_call: bool,
    routed: &mut Option<Arc<Cluster>>,
    active: &mut Active,
) -> Response<ResponseBody> {
    let started = Instant::now();
    match crate::path::normalize(req.uri().path()) {
        Ok(None) => {}
        Ok(Some(path)) => {
            // Route on, and forward, the normalised path (see `path`).
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = PathAndQuery::try_from(pq).ok();
            match Uri::from_parts(parts) {
                Ok(u) => *req.uri_mut() = u,
                Err(_) => return bad_path(shared),
            }
        }
        Err(_) => return bad_path(shared),
    }
    let (cluster, redirect) = {
        let table = shared.table.load();
        let host = crate::rules::request_host(&req);
        let Some(rule) = table.route(&host, req.uri().path()) else {
            shared.metrics.proxy_error("", ProxyError::NoRoute.reason());
            return ProxyError::NoRoute.response();
        };
        // Decided per rule, not per cluster drawn: a split whose clusters disagree redirects
        // every request, never a random share.
        let redirect = !tls
            && shared.config.https_port.is_some()
            && rule.backends.iter().any(|(c, _)| c.https_redirect);
        match choose(rule, shared.clock.now()) {
            Some(c) => (c.clone(), redirect),
            None => {
                shared
                    .metrics
                    .proxy_error("", ProxyError::ZeroWeight.reason());
                return ProxyError::ZeroWeight.response();
            }
        }
    };
    if let Some(log) = active.log_mut() {
        log.cluster = Some(cluster.clone());
    }
    if let Err(err) = check_framing_and_host(&mut req) {
        shared.metrics.proxy_error(&cluster.name, err.reason());
        cluster.metrics.count(err.status().as_u16());
        return err.response();
    }
    if redirect && let Some(port) = shared.config.https_port {
        let resp = to_https(&req, port);
        cluster.metrics.count(resp.status().as_u16());
        return resp;
    }
    if grpc_call {
        *routed = Some(cluster.clone());
    }
    let h2 = cluster.protocol.is_h2();
    // gRPC goes to GRPC clusters only, and they take nothing else: what an instance would
    // refuse with a reset is refused here, before it can count against the instance (ALB
    // answers such a request 464 itself).
    let mismatch = match (grpc_call, cluster.protocol) {
        (true, Protocol::Http1) => Some(ProxyError::NotGrpcCluster),
        (false, Protocol::Grpc) => Some(ProxyError::NotGrpcCall),
        _ => None,
    };
    if let Some(err) = mismatch {
        shared.metrics.proxy_error(&cluster.name, err.reason());
        cluster.metrics.count(err.status().as_u16());
        return err.response();
    }
    // A WebSocket upgrade needs HTTP/1.1 to the instance; to an HTTP/2 one the request goes
    // on as a plain request.
    let upgrade = if h2 {
        None
    } else {
        upgrade_request(&mut req, active.conn())
    };
    // `TE: trailers` (what gRPC sends) is the one TE an HTTP/2 hop carries on; a gRPC call
    // gets it whether or not its client sent it (gRPC servers refuse calls without it).
    let te_trailers = grpc_call
        || h2
            && req
                .headers()
                .get_all(header::TE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    prepare_headers(req.headers_mut(), peer, tls, shared.config.request_id);
    if te_trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(log) = active.log_mut() {
        let h = req.headers();
        let copy = |name| {
            h.get(name)
                .map(|v: &HeaderValue| access_log::capped(v.as_bytes()))
        };
        log.request_id = copy(&crate::headers::X_REQUEST_ID);
        log.traceparent = copy(&crate::headers::TRACEPARENT);
    }
    if let Some((proto, _)) = &upgrade {
        let h = req.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto.clone());
    }
    // Dropped before it is disarmed: the client went away before its answer.
    let mut abandoned = Abandoned {
        shared,
        cluster: &cluster,
        armed: true,
    };
    if req.version() == Version::HTTP_2 {
        // Let the connection read what came with this stream's HEADERS: a client that reset
        // it at once (rapid reset) has it dropped here, before any upstream work.
        tokio::task::yield_now().await;
    }
    let upgrading = upgrade.is_some();
    let upgrade = upgrade.map(|(_, on)| (on, active.conn().clone()));
    let forwarded = if h2 {
        crate::h2up::forward(shared, &cluster, req, grpc_call, active.log_mut()).await
    } else {
        forward(shared, &cluster, req, upgrade, active.log_mut()).await
    };
    let mut resp = match forwarded {
        Ok(resp) => resp,
        Err(err) => {
            shared.metrics.proxy_error(&cluster.name, err.reason());
            err.response()
        }
    };
    if upgrading && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The client meant to leave HTTP on this connection; it was refused: close it (and
        // nobody waits for its socket).
        drop(active.conn().take_upgrade());
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    abandoned.armed = false;
    if let Some(via) = &shared.config.via {
        resp.headers_mut().append(header::VIA, via.clone());
    }
    cluster.metrics.count(resp.status().as_u16());
    cluster
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// A 308 to the request's URL on HTTPS at `port` (method and body kept, RFC 9110 15.4.9); a
/// 400 when the request names no host to send it to.
fn to_https<B>(req: &Request<B>, port: u16) -> Response<ResponseBody> {
    let host = crate::rules::request_host(req);
    // Only a name, an IPv4 address or a bracketed IPv6 one goes into Location: a Host such as
    // `good.com@evil.com` must not become a redirect elsewhere.
    let plain = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    let ipv6 = |h: &str| {
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    };
    if !(plain(&host) || ipv6(&host)) {
        return ProxyError::BadHost.response();
    }
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{port}{pq}")
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return ProxyError::BadHost.response();
    };
    let mut resp = Response::new(ResponseBody::message(Bytes::from_static(
        b"moved to https\n",
    )));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    resp.extensions_mut()
        .insert(crate::error::SelfAnswered("https_redirect"));
    let h = resp.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The cluster of `rule` a request goes to: the only one, or one drawn by weight among those
/// with an endpoint that can take it (among all of them when none can, and the balancer's
/// panic mode decides); `None` when every weight is 0.
fn choose(rule: &Rule<Arc<Cluster>>, now: u64) -> Option<&Arc<Cluster>> {
    if let [(only, _)] = rule.backends.as_slice() {
        return Some(only);
    }
    let weight = |w: Option<u32>| w.unwrap_or(1);
    let draw = |eligible: &dyn Fn(&Cluster) -> bool| {
        let total: u64 = rule
            .backends
            .iter()
            .filter(|(c, _)| eligible(c))
            .map(|(_, w)| u64::from(weight(*w)))
            .sum();
        if total == 0 {
            return None;
        }
        let mut at = fastrand::u64(0..total);
        rule.backends
            .iter()
            .filter(|(c, _)| eligible(c))
            .find(|(_, w)| {
                let w = u64::from(weight(*w));
                if at < w {
                    true
                } else {
                    at -= w;
                    false
                }
            })
            .map(|(c, _)| c)
    };
    draw(&|c| crate::balance::admits_any(c, now)).or_else(|| draw(&|_| true))
}

/// Counts a request whose client went away before the answer (hyper drops the request's
/// future when the client closes mid-request), so the upstream exchange was cancelled.
struct Abandoned<'a> {
    shared: &'a Shared,
    cluster: &'a Cluster,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            let err = ProxyError::ClientClosed;
            self.shared
                .metrics
                .proxy_error(&self.cluster.name, err.reason());
            self.cluster.metrics.count(err.status().as_u16());
        }
    }
}

fn bad_path(shared: &Shared) -> Response<ResponseBody> {
    shared.metrics.proxy_error("", ProxyError::BadPath.reason());
    ProxyError::BadPath.response()
}

/// Refuses what cannot be forwarded faithfully, and settles the host the upstream sees:
/// - a transfer coding other than `chunked` (`gzip, chunked`): fleetlb re-frames bodies and
///   would pass the coded bytes on as plain ones, so 501 (RFC 9112 section 6.1);
/// - `chunked` named more than once: 400, and the connection closes;
/// - more than one `Host` line: 400;
/// - a target with an authority (HTTP/2's `:authority`, or an HTTP/1.1 absolute-form target)
///   sets `Host`, which it outranks (RFC 9112 section 3.2.2); `X-Forwarded-Host` is made
///   from it.
fn check_framing_and_host(req: &mut Request<ClientBody>) -> Result<(), ProxyError> {
    let h = req.headers();
    let mut chunked = 0;
    for te in h.get_all(header::TRANSFER_ENCODING) {
        for c in te.as_bytes().split(|&b| b == b',') {
            let c = c.trim_ascii();
            if c.eq_ignore_ascii_case(b"chunked") {
                chunked += 1;
            } else if !c.is_empty() {
                return Err(ProxyError::UnsupportedTransferCoding);
            }
        }
    }
    if chunked > 1 {
        // `chunked, chunked` or two `Transfer-Encoding: chunked` lines: servers disagree on
        // what that frames (request smuggling); nginx and HAProxy refuse it too.
        return Err(ProxyError::BadFraming);
    }
    let mut hosts = h.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(ProxyError::BadHost);
    }
    if let Some(authority) = req.uri().authority() {
        // Host and port only: userinfo (`http://user:pass@host/`) never becomes a Host.
        let host = match authority.port() {
            Some(port) => HeaderValue::from_str(&format!("{}:{port}", authority.host())),
            None => HeaderValue::from_str(authority.host()),
        }
        .map_err(|_| ProxyError::BadHost)?;
        req.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

/// For an HTTP/1.1 `Connection: upgrade` request to WebSocket, the protocol asked for and the
/// client side of the upgrade. Other upgrades (`h2c` above all, which would hand the client a
/// direct HTTP/2 line to the backend past fleetlb's routing) go on as plain requests, their
/// `Upgrade` stripped with the other hop-by-hop headers.
fn upgrade_request(
    req: &mut Request<ClientBody>,
    conn: &ConnState,
) -> Option<(HeaderValue, ClientUpgrade)> {
    let h = req.headers();
    let wants = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let proto = h.get(header::UPGRADE)?.clone();
    if !wants
        || req.version() != Version::HTTP_11
        || !proto.as_bytes().eq_ignore_ascii_case(b"websocket")
    {
        return None;
    }
    Some((proto, ClientUpgrade::of(req, conn)))
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn forward(
    shared: &Shared,
    cluster: &Arc<Cluster>,
    req: Request<ClientBody>,
    mut client_upgrade: Option<(ClientUpgrade, Arc<ConnState>)>,
    mut log: Option<&mut Entry>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let cfg = &shared.config;
    let limits = &*shared.limits;
    let decay = cluster.balancing.decay.as_nanos() as f64;
    let penalty = cfg.failure_penalty.as_nanos() as f64;
    let (mut parts, body) = req.into_parts();
    let idempotent = is_idempotent(&parts.method);
    let framing = if body.is_end_stream() {
        h1::ReqFraming::None
    } else if let Some(n) = body.size_hint().exact() {
        // One length, as hyper counted it: a repeated or listed Content-Length never travels
        // on for an upstream to read differently.
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        h1::ReqFraming::Length
    } else {
        parts.headers.remove(header::CONTENT_LENGTH);
        h1::ReqFraming::Chunked
    };
    let mut body = (framing != h1::ReqFraming::None).then_some(body);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let gap = cluster.body_timeout;
    let settings = h1::Settings {
        connect_timeout: limits.connect_timeout,
        idle_timeout: cfg.pool_idle_timeout,
        timeout: Some(cluster.request_timeout),
        client_gap: gap.unwrap_or(limits.body_timeout),
        client_min_rate: limits.min_rate,
        upstream_gap: gap.unwrap_or(limits.upstream_body_timeout),
    };
    let headers = parts.headers;
    let mut failed: Option<Arc<Endpoint>> = None;
    let mut last_err = ProxyError::NoHealthyEndpoint;

    for attempt in 1..=cfg.max_attempts.max(1) {
        let (pick, guard) = begin_attempt(
            shared,
            cluster,
            attempt,
            failed.as_deref(),
            false,
            None,
            log.as_deref_mut(),
        )
        .await
        .map_err(|e| e.unwrap_or(last_err))?;
        // Borrowed from the cluster this request holds: one reference-count bump per request
        // (the in-flight guard's), on a count every proxy thread shares.
        let ep = pick.endpoint;
        let head = h1::Head {
            method: &parts.method,
            path: &path,
            headers: &headers,
            authority: ep.authority.as_str(),
            framing,
            upgrade: client_upgrade.is_some(),
        };
        let sending = h1::send(&ep.pool, ep.addr, &head, &mut body, settings, idempotent);
        let result = sending.await;
        let now = shared.clock.now();
        match result {
            Ok(mut answer) => {
                let rtt = answer.waited;
                let switched = answer.body.take_switched();
                let agreed = answer
                    .headers
                    .get(header::UPGRADE)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                if switched.is_some() && !agreed {
                    // It switched to something not asked for: nothing to relay safely, and
                    // the endpoint's doing.
                    ep.state.observe(penalty, now, decay);
                    outlier::on_failure(&shared.metrics, cluster, ep, now);
                    tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, "upstream switched to a protocol the client did not ask for");
                    return Err(ProxyError::UpstreamReset);
                }
                ep.metrics.upstream_duration.observe(rtt.as_secs_f64());
                if let Some(log) = log.as_deref_mut() {
                    log.connect = answer.connected;
                    log.head = Some(rtt);
                    log.bytes_in = match framing {
                        h1::ReqFraming::None => Some(0),
                        _ => answer.body_sent,
                    };
                }
                learn_from_status(
                    shared,
                    cluster,
                    ep,
                    answer.status,
                    &answer.headers,
                    rtt,
                    now,
                );
                let headers_back = std::mem::take(&mut answer.headers);
                let status = answer.status;
                let (body_out, tunnel_guard) = match switched {
                    Some(_) => (ResponseBody::message(Bytes::new()), Some(guard)),
                    None => (ResponseBody::own(answer.body, guard), None),
                };
                let mut resp = Response::new(body_out);
                *resp.status_mut() = status;
                *resp.headers_mut() = headers_back;
                match (switched, client_upgrade.take()) {
                    (Some(upstream), Some((client, conn))) => {
                        // The upgrade's own headers stay: they tell the client what it got.
                        // The tunnel keeps the request in flight and the connection counted.
                        let tunnel = Tunnel {
                            cluster: cluster.name.clone(),
                            guard: tunnel_guard,
                            conn,
                        };
                        tunnel.spawn(client, upstream);
                    }
                    _ => strip_hop_by_hop(resp.headers_mut()),
                }
                h1::recycle(headers);
                return Ok(resp);
            }
            Err(err) => {
                if let Some(fault) = err.client_fault() {
                    // The client's doing: nothing is learned about the endpoint.
                    tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, ?err, "client request body failed");
                    return Err(match fault {
                        h1::ClientFault::Malformed => ProxyError::BadRequestBody,
                        h1::ClientFault::Gone => ProxyError::ClientClosed,
                    });
                }
                match err {
                    h1::Error::Timeout { client: true } => {
                        // The client stopped sending its body, or sent it too slowly; the
                        // endpoint was waiting for it.
                        tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, "client body stalled or too slow");
                        return Err(ProxyError::ClientTimeout);
                    }
                    h1::Error::Timeout { client: false } => {
                        ep.state.observe(penalty, now, decay);
                        outlier::on_failure(&shared.metrics, cluster, ep, now);
                        tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, timeout = ?cluster.request_timeout, "upstream timed out");
                        return Err(ProxyError::UpstreamTimeout);
                    }
                    h1::Error::Stale(_) => {
                        // A kept-alive connection the backend closed just as the request went
                        // out: not the backend's fault, and not safe to send again.
                        tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, ?err, "pooled connection closed under a request that cannot be resent");
                        return Err(ProxyError::UpstreamReset);
                    }
                    h1::Error::Local(e) => {
                        // The proxy's own exhaustion (descriptors, ports): never the endpoint's.
                        tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, err = %e, "out of local resources for an upstream connection");
                        return Err(ProxyError::LocalResources);
                    }
                    _ => {}
                }
                ep.state.observe(penalty, now, decay);
                outlier::on_failure(&shared.metrics, cluster, ep, now);
                let connect = err.is_connect();
                if connect {
                    last_err = connect_failed(shared, cluster, ep, err.is_refused(), pick.panic);
                } else {
                    last_err = ProxyError::UpstreamReset;
                }
                tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, attempt, ?err, "upstream request failed");
                // Nothing was sent: any request may go elsewhere (its body, if any, is still
                // here). Something was: only an idempotent one without a body.
                let body_intact = framing == h1::ReqFraming::None || body.is_some();
                let replayable = framing == h1::ReqFraming::None && idempotent;
                if !((connect && body_intact) || replayable) {
                    return Err(last_err);
                }
                failed = Some(ep.clone());
            }
        }
    }
    Err(last_err)
}

/// The start of one attempt, the same for both upstream clients: an endpoint picked (never
/// `avoid`, the one that just failed this request), the retry budget paid for a retry (unless
/// `paid` already), a slot of the endpoint taken (waiting at most until the caller's
/// `deadline`), and the choice counted and logged. `Err(None)`: no endpoint, or the budget is
/// spent (the caller answers with its last error).
pub(crate) async fn begin_attempt<'a>(
    shared: &Shared,
    cluster: &'a Cluster,
    attempt: u32,
    avoid: Option<&Endpoint>,
    paid: bool,
    deadline: Option<Instant>,
    log: Option<&mut Entry>,
) -> Result<(balance::Pick<'a>, InflightGuard), Option<ProxyError>> {
    let Some(pick) = balance::pick(cluster, shared.clock.now(), avoid) else {
        return Err(None);
    };
    if pick.panic {
        shared
            .metrics
            .panic_mode
            .with_label_values(&[cluster.name.as_str()])
            .set(1);
    }
    let ep = pick.endpoint;
    if attempt == 1 {
        cluster.carried.retry_budget.deposit();
    } else if paid || cluster.carried.retry_budget.withdraw() {
        cluster.metrics.retries.inc();
    } else {
        tracing::debug!(cluster = %cluster.name, "retry budget spent");
        return Err(None);
    }
    // A full endpoint is busy, not sick: the client gets a 503 that says so, and nothing
    // counts against the endpoint.
    let acquiring = InflightGuard::acquire(ep, &shared.limits);
    let acquired = match deadline {
        Some(d) => tokio::time::timeout_at(d, acquiring)
            .await
            .map_err(|_| Some(ProxyError::DeadlineExceeded))?,
        None => acquiring.await,
    };
    let guard = acquired.map_err(|full| {
        let flag = match full {
            Full::Queue => "endpoint-queue",
            Full::Wait => "endpoint-queue-timeout",
        };
        shared.metrics.limit_hits.with_label_values(&[flag]).inc();
        Some(ProxyError::EndpointFull)
    })?;
    ep.metrics.selections.inc();
    if pick.cross_zone {
        cluster.metrics.cross_zone.inc();
    }
    if let Some(log) = log {
        log.tries = attempt;
        log.endpoint = Some(ep.clone());
    }
    Ok((pick, guard))
}

/// A connection to `ep` failed (`refused`: nothing listens there): counted, and the endpoint
/// marked down or one failure closer to unhealthy. Returns the error the client gets: on a
/// pick that failed open (no endpoint passes its checks), "no healthy endpoint", not a bad
/// gateway.
pub(crate) fn connect_failed(
    shared: &Shared,
    cluster: &Cluster,
    ep: &Endpoint,
    refused: bool,
    panic: bool,
) -> ProxyError {
    ep.metrics.connect_errors.inc();
    let t = if refused {
        ep.state.mark_down()
    } else {
        ep.state.failure(cluster.health.unhealthy_threshold)
    };
    if t == Transition::BecameUnhealthy {
        shared.health_changes.mark(&cluster.name);
        shared
            .metrics
            .ejections
            .with_label_values(&[cluster.name.as_str(), "connect_error"])
            .inc();
        tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, "endpoint down: connection failed");
    }
    connect_error(panic)
}

/// What a caller hears when no connection to the picked endpoint could be had (`panic`: it
/// was picked with no healthy endpoint left).
pub(crate) fn connect_error(panic: bool) -> ProxyError {
    if panic {
        ProxyError::NoHealthyEndpoint
    } else {
        ProxyError::UpstreamConnect
    }
}

/// A WebSocket tunnel: a request in flight to its endpoint and a client connection (in
/// `fleetlb_connections_active`, holding its `--max-connections` slot) until it ends. It ends
/// when either side closes, after `--tunnel-idle-timeout` without a byte either way, or when
/// the listener's drain is over.
struct Tunnel {
    cluster: String,
    guard: Option<InflightGuard>,
    conn: Arc<ConnState>,
}

impl Tunnel {
    /// Joins the client's upgraded connection and the upstream's switched one (with the bytes
    /// the upstream sent after its `101`) and copies bytes both ways.
    fn spawn(self, client: ClientUpgrade, upstream: h1::Conn) {
        let ctl = self.conn.ctl.clone();
        ctl.tasks.spawn(async move {
            let cluster = &self.cluster;
            let mut client = match client.stream().await {
                Ok(c) => c,
                Err(err) => {
                    tracing::debug!(%cluster, ?err, "upgrade failed");
                    return;
                }
            };
            let h1::Conn {
                io: mut up, buf, ..
            } = upstream;
            if !buf.is_empty()
                && let Err(err) = tokio::io::AsyncWriteExt::write_all(&mut client, &buf).await
            {
                tracing::debug!(%cluster, ?err, "upgraded connection ended with an error");
                return;
            }
            let idle = self.conn.limits().tunnel_idle_timeout;
            let mut phase = self.conn.ctl.phase.clone();
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut ur, mut uw) = up.split();
            let started = Instant::now();
            let last = AtomicU64::new(0);
            let moved = || last.store(started.elapsed().as_millis() as u64, Relaxed);
            let quiet_until = || started + Duration::from_millis(last.load(Relaxed)) + idle;
            let up_way = copy_noting(&mut cr, &mut uw, &moved);
            let down_way = copy_noting(&mut ur, &mut cw, &moved);
            let watch = async {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(quiet_until()) => {
                            if Instant::now() >= quiet_until() {
                                self.conn.limit_hit("tunnel-idle-timeout");
                                return;
                            }
                        }
                        _ = phase.wait_for(|p| *p == Phase::Closing) => return,
                    }
                }
            };
            tokio::select! {
                r = futures::future::try_join(up_way, down_way) => {
                    if let Err(err) = r {
                        tracing::debug!(%cluster, ?err, "upgraded connection ended with an error");
                    }
                }
                () = watch => tracing::debug!(%cluster, "tunnel closed: idle, or the drain is over"),
            }
            drop(self.guard);
        });
    }
}

/// Copies `from` to `to` until end of file, calling `moved` on every chunk; shuts `to` down
/// at the end so the other side sees the close.
async fn copy_noting<R, W>(from: &mut R, to: &mut W, moved: &impl Fn()) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        moved();
        to.write_all(&buf[..n]).await?;
        moved();
    }
}

/// Error-aware learning, by whose doing the status is:
/// - a 5xx the endpoint generated counts as a slow response (the failure penalty, so an
///   endpoint that fails fast never looks fast) and toward ejection, except `501` and `505`,
///   which answer the client's method or HTTP version; `503` with `Retry-After` takes it out
///   of rotation for that long, at most the cluster's base ejection time;
/// - a `429` slows it down (the penalty in its estimate, so it gets fewer new requests) but
///   never counts toward ejection: any client can provoke one;
/// - anything else is a latency sample.
pub(crate) fn learn_from_status(
    shared: &Shared,
    cluster: &Cluster,
    ep: &Endpoint,
    status: StatusCode,
    headers: &HeaderMap,
    rtt: Duration,
    now: u64,
) {
    let decay = cluster.balancing.decay.as_nanos() as f64;
    let status = status.as_u16();
    let penalty = shared.config.failure_penalty.max(rtt).as_nanos() as f64;
    match status {
        429 => ep.state.observe(penalty, now, decay),
        501 | 505 => {
            ep.state.request_succeeded();
            ep.state.observe(rtt.as_nanos() as f64, now, decay);
        }
        500.. => {
            ep.state.observe(penalty, now, decay);
            outlier::on_failure(&shared.metrics, cluster, ep, now);
            let retry_after = headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if let (503, Some(secs)) = (status, retry_after) {
                let period = Duration::from_secs(secs.max(1)).min(cluster.outlier.base_ejection);
                outlier::try_eject(
                    &shared.metrics,
                    cluster,
                    ep,
                    now,
                    EjectReason::RetryAfter,
                    Some(period),
                );
            }
        }
        _ => {
            ep.state.request_succeeded();
            ep.state.observe(rtt.as_nanos() as f64, now, decay);
        }
    }
}
