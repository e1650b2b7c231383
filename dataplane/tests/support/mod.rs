//! Real HTTP upstreams on 127.0.0.1:0 whose behaviour tests change at run time, a proxy under
//! test on its own port, and a keep-alive client. Every wait polls with a deadline.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use fleetlb_dataplane::{
    Dataplane, EndpointConfig, HealthConfig, ProxyConfig, RouteConfig, RouteTable,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use fleetlb_dataplane::access_log::AccessLog;
use serde_json::Value;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `f` every 20 ms until it is true, or panics naming `what`.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let r = tokio::time::timeout(DEADLINE, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "timed out after {DEADLINE:?} waiting for: {what}"
    );
}

/// Polls `f` every 20 ms until it is true or the deadline passes; the caller then asserts,
/// with the values that tell what happened.
pub async fn settle(mut f: impl FnMut() -> bool) {
    let _ = tokio::time::timeout(DEADLINE, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// An upstream HTTP server whose latency and status can change while it runs. `/health` always
/// answers 200 at once; other paths answer after `delay_ms` with `status`, body = its name.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub delay_ms: Arc<AtomicU64>,
    pub status: Arc<AtomicU16>,
    pub hits: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self::serve(name, listener, addr)
    }

    fn serve(name: &str, listener: TcpListener, addr: SocketAddr) -> Self {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = oneshot::channel::<()>();
        let (d, s, h, n) = (
            delay_ms.clone(),
            status.clone(),
            hits.clone(),
            name.to_string(),
        );
        tokio::spawn(async move {
            // Connections live in this set: stopping the server drops them all, like a killed process.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((stream, _)) = a else { continue };
                        let (d, s, h, n) = (d.clone(), s.clone(), h.clone(), n.clone());
                        conns.spawn(async move {
                            let svc = service_fn(move |req: Request<Incoming>| {
                                let (d, s, h, n) = (d.clone(), s.clone(), h.clone(), n.clone());
                                async move { Ok::<_, Infallible>(answer(req, &d, &s, &h, &n).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        });
                    }
                    _ = &mut rx => break,
                }
            }
            conns.abort_all();
        });
        Self {
            name: name.into(),
            addr,
            delay_ms,
            status,
            hits,
            stop: Some(tx),
        }
    }

    /// A new server on the same address (a backend coming back after a crash).
    pub async fn restart(&mut self) {
        self.kill();
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let fresh = Self::serve(&self.name, listener, self.addr);
        *self = fresh;
    }

    /// Closes the listener and every open connection at once.
    pub fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub fn endpoint(&self) -> EndpointConfig {
        EndpointConfig::new(self.name.clone(), self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn answer(
    mut req: Request<Incoming>,
    delay: &AtomicU64,
    status: &AtomicU16,
    hits: &AtomicU64,
    name: &str,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/health" {
        return Response::new(Full::new(Bytes::from_static(b"ok")));
    }
    hits.fetch_add(1, Relaxed);
    if let Some(proto) = req.headers().get(http::header::UPGRADE).cloned() {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
        resp.headers_mut().insert(http::header::UPGRADE, proto);
        return resp;
    }
    let ms = delay.load(Relaxed);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let content_length = req.headers().get(http::header::CONTENT_LENGTH).cloned();
    let seen_path = req.uri().to_string();
    let xff = req.headers().get("x-forwarded-for").cloned();
    let host = req.headers().get(http::header::HOST).cloned();
    let xfh = req.headers().get("x-forwarded-host").cloned();
    let xfp = req.headers().get("x-forwarded-proto").cloned();
    let received = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let mut resp = Response::new(Full::new(Bytes::from(name.to_string())));
    resp.headers_mut()
        .insert("x-seen-body-bytes", received.into());
    if let Some(v) = content_length {
        resp.headers_mut().insert("x-seen-content-length", v);
    }
    if let Ok(v) = http::HeaderValue::from_str(&seen_path) {
        resp.headers_mut().insert("x-seen-path", v);
    }
    *resp.status_mut() = StatusCode::from_u16(status.load(Relaxed)).unwrap();
    if let Some(v) = xff {
        resp.headers_mut().insert("x-seen-forwarded-for", v);
    }
    if let Some(v) = host {
        resp.headers_mut().insert("x-seen-host", v);
    }
    if let Some(v) = xfh {
        resp.headers_mut().insert("x-seen-forwarded-host", v);
    }
    if let Some(v) = xfp {
        resp.headers_mut().insert("x-seen-forwarded-proto", v);
    }
    resp
}

/// The proxy under test with one route `/c` over `upstreams`.
pub struct Proxy {
    pub addr: SocketAddr,
    pub dataplane: Dataplane,
    pub registry: prometheus::Registry,
    pub routes: watch::Sender<RouteTable>,
    pub stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<()>,
}

pub fn fast_health() -> HealthConfig {
    HealthConfig {
        path: "/health".into(),
        grpc_service: String::new(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    }
}

pub fn route(endpoints: Vec<EndpointConfig>) -> RouteConfig {
    let mut r = RouteConfig::new("c", "/c", endpoints);
    r.health = fast_health();
    r.balancing.slow_start = Duration::ZERO;
    r
}

impl Proxy {
    pub async fn start(config: ProxyConfig, routes: Vec<RouteConfig>) -> Self {
        let registry = prometheus::Registry::new();
        let dataplane = Dataplane::new(config, &registry).unwrap();
        let (tx, rx) = watch::channel(RouteTable { routes });
        dataplane.watch_routes(rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let dp = dataplane.clone();
        let done = tokio::spawn(async move {
            dp.serve(listener, async {
                let _ = stop_rx.await;
            })
            .await
        });
        Self {
            addr,
            dataplane,
            registry,
            routes: tx,
            stop: Some(stop_tx),
            done,
        }
    }

    /// Waits until `n` endpoints of route `/c` are healthy.
    pub async fn wait_healthy(&self, n: usize) {
        let dp = self.dataplane.clone();
        eventually(&format!("{n} healthy endpoints"), || {
            dp.snapshot()
                .iter()
                .flat_map(|c| &c.endpoints)
                .filter(|e| e.state == fleetlb_dataplane::EndpointState::Healthy)
                .count()
                >= n
        })
        .await;
    }

    /// Waits until endpoint `id` is no longer healthy (found out by probes or failures).
    pub async fn wait_unhealthy(&self, id: &str) {
        let dp = self.dataplane.clone();
        eventually(&format!("{id} marked unhealthy"), || {
            dp.snapshot()
                .iter()
                .flat_map(|c| &c.endpoints)
                .any(|e| e.id == id && e.state != fleetlb_dataplane::EndpointState::Healthy)
        })
        .await;
    }

    /// The value of counter or gauge `name` whose labels include `labels` (summed), 0 if none.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.dataplane.refresh_gauges();
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
            .sum()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET through a pooled client: (status, body).
pub async fn get(c: &TestClient, url: &str) -> Result<(u16, String), String> {
    let resp = c
        .get(url.parse().unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// Requests answered 200.
pub fn ok_count(results: &[Result<(u16, String), String>]) -> usize {
    results.iter().filter(|r| matches!(r, Ok((200, _)))).count()
}

/// Every answer but a 200, and every error.
pub fn failures(results: &[Result<(u16, String), String>]) -> Vec<String> {
    results
        .iter()
        .filter_map(|r| match r {
            Ok((200, _)) => None,
            Ok((s, b)) => Some(format!("{s} {b}")),
            Err(e) => Some(e.clone()),
        })
        .collect()
}

/// `total` GETs with `concurrency` workers; returns every (status, body) or error.
pub async fn load(
    url: String,
    total: usize,
    concurrency: usize,
) -> Vec<Result<(u16, String), String>> {
    let c = client();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (c, url, next) = (c.clone(), url.clone(), next.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Relaxed) < total as u64 {
                out.push(get(&c, &url).await);
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

/// One upstream `a` behind route `/c`, healthy.
pub async fn one_healthy(cfg: ProxyConfig) -> (Upstream, Proxy) {
    let up = Upstream::start("a").await;
    let proxy = Proxy::start(cfg, vec![route(vec![up.endpoint()])]).await;
    proxy.wait_healthy(1).await;
    (up, proxy)
}

/// Reads what the proxy sends until it closes the connection, within the deadline.
pub async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, tokio::io::AsyncReadExt::read_to_end(s, &mut buf))
        .await
        .expect("the proxy closed the connection")
        .unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

/// Sends `raw` on a new connection and reads until the proxy closes it.
pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, raw)
        .await
        .unwrap();
    let mut buf = Vec::new();
    // A reset after the answer is as good as a close here.
    let _ = tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
    )
    .await
    .expect("the proxy answered or closed the connection");
    String::from_utf8_lossy(&buf).to_string()
}

/// A writer the test reads back.
#[derive(Clone, Default)]
pub struct Lines(pub Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    pub fn parsed(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Waits for `n` lines and returns them.
    pub async fn wait(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{n} access-log lines"), || {
            self.parsed().len() >= n
        })
        .await;
        self.parsed()
    }
}

pub fn logged(sample: f64) -> (Lines, ProxyConfig) {
    let lines = Lines::default();
    let log = AccessLog::to_writer(Box::new(lines.clone()), sample, 1024).unwrap();
    let cfg = ProxyConfig {
        access_log: Some(log),
        ..ProxyConfig::default()
    };
    (lines, cfg)
}
