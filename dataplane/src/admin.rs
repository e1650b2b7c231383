//! The admin listener, separate from the proxy listener: `/metrics`, `/healthz`, `/readyz`,
//! `/status`, `/debug/endpoints` and `/debug/load`. It exposes no secrets: status and debug output carry ids,
//! addresses, states and numbers only.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Dataplane;
use crate::body::ResponseBody;
use crate::error::plain;

/// What the admin endpoints read.
pub struct AdminState {
    /// Every metric of the process (data plane and controller).
    pub registry: prometheus::Registry,
    /// The data plane, for `/debug/endpoints` and per-endpoint gauges.
    pub dataplane: Dataplane,
    /// Pre-rendered JSON served at `/status` (the controller's view of every cluster).
    pub status: watch::Receiver<Bytes>,
    /// `/readyz` answers 200 once this is true (the first route table is published).
    pub ready: watch::Receiver<bool>,
    /// True once the process is shutting down: `/readyz` answers 503 while the proxy drains,
    /// and the rest (`/debug/load` above all: peers still count this replica's requests in
    /// flight) keeps answering until the drain ends.
    pub draining: watch::Receiver<bool>,
    /// The HTTPS listener's certificates, shown in `/status` under `tls`.
    pub tls: Option<crate::tls::Certs>,
}

/// Serves the admin endpoints until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    tokio::pin!(shutdown);
    // The status page's short history: one point per cluster every 5 s.
    let sampler = {
        let dp = state.dataplane.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::history::INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let shared = &dp.shared;
                let table = shared.table.load();
                let names: Vec<&str> = table.clusters.iter().map(|c| c.name.as_str()).collect();
                let now = tokio::time::Instant::now();
                shared
                    .history
                    .sample(&shared.metrics, &names, t, now - last);
                last = now;
            }
        })
    };
    let _sampler = AbortOnDrop(sampler);
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let state = state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(&state, req)) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `/readyz` before the first route table: why, when the controller's status document lists
/// problems (standalone: no file holds a valid BackendCluster).
fn not_ready(status: &[u8]) -> Response<ResponseBody> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        errors: Vec<String>,
    }
    let errors = serde_json::from_slice::<Doc>(status).map_or_else(|_| Vec::new(), |d| d.errors);
    let text = match errors.as_slice() {
        [] => "not ready: no route table yet\n".to_string(),
        [first, rest @ ..] => format!(
            "not ready: no valid BackendCluster; {} problem(s), the first: {first}\n",
            rest.len() + 1
        ),
    };
    let mut resp = with_type(text.into(), "text/plain; charset=utf-8");
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/metrics" => {
            state.dataplane.refresh_gauges();
            let mut buf = Vec::with_capacity(16 * 1024);
            if TextEncoder::new()
                .encode(&state.registry.gather(), &mut buf)
                .is_err()
            {
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n",
                );
            }
            with_type(buf.into(), "text/plain; version=0.0.4; charset=utf-8")
        }
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if *state.draining.borrow() {
                plain(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if *state.ready.borrow() {
                plain(StatusCode::OK, "ready\n")
            } else {
                not_ready(&state.status.borrow())
            }
        }
        "/status" => {
            let body = state.status.borrow().clone();
            match &state.tls {
                None => with_type(body, "application/json"),
                Some(certs) => {
                    // The controller's document with the certificates added (an admin
                    // request: parsing it again costs nothing that matters).
                    let mut doc: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_else(|_| serde_json::json!({}));
                    if let Some(o) = doc.as_object_mut() {
                        o.insert("tls".into(), serde_json::json!(certs.status()));
                    }
                    match serde_json::to_vec(&doc) {
                        Ok(v) => with_type(v.into(), "application/json"),
                        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
                    }
                }
            }
        }
        "/debug/history" => {
            let doc = serde_json::json!({
                "interval_seconds": crate::history::INTERVAL.as_secs(),
                "clusters": state.dataplane.shared.history.points(),
            });
            match serde_json::to_vec(&doc) {
                Ok(v) => with_type(v.into(), "application/json"),
                Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        "/" => with_type(
            Bytes::from_static(include_bytes!("status.html")),
            "text/html; charset=utf-8",
        ),
        "/debug/endpoints" => match serde_json::to_vec_pretty(&state.dataplane.snapshot()) {
            Ok(v) => with_type(v.into(), "application/json"),
            Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
        },
        "/debug/load" => {
            let load = crate::ProxyLoad {
                proxy: state.dataplane.id().to_string(),
                clusters: state.dataplane.load(),
            };
            match serde_json::to_vec(&load) {
                Ok(v) => with_type(v.into(), "application/json"),
                Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found; try /metrics /healthz /readyz /status /debug/endpoints /debug/load\n",
        ),
    }
}

fn with_type(body: Bytes, content_type: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::message(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
