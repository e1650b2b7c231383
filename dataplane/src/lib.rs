#![forbid(unsafe_code)]
//! fleetlb's data plane: a latency-aware HTTP reverse proxy.
//!
//! - [`Dataplane::new`] builds the proxy and registers its metrics.
//! - [`Dataplane::watch_routes`] follows the controller's [`RouteTable`] snapshots.
//! - [`Dataplane::serve`] serves clients on a listener until shutdown, then drains.
//! - [`admin::serve`] serves `/metrics`, `/healthz`, `/readyz`, `/status`, `/debug/endpoints`.
//!
//! Routing is longest path prefix; balancing is per cluster ([`Policy`]); health comes from
//! active probes and from real traffic. See docs/concepts/balancing.md for the behaviour in detail.

pub mod access_log;
pub mod admin;
mod balance;
mod body;
mod conn;
mod endpoint;
mod error;
/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
mod h1;
mod h2up;
mod headers;
mod history;
pub mod limits;
pub mod metrics;
mod outlier;
pub mod path;
mod probe;
mod proxy;
mod retry;
pub mod routes;
mod rules;
mod server;
mod table;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use body::ResponseBody;
pub use error::ProxyError;
/// The request-header rewriting applied to every forwarded request (public for the fuzz targets).
pub use headers::{prepare_request_headers, strip_hop_by_hop};
pub use ipnet::IpNet;
pub use limits::Limits;
pub use metrics::Metrics;
pub use routes::{
    BalancingConfig, EndpointConfig, HealthConfig, OutlierConfig, Policy, Protocol, RouteConfig,
    RouteTable,
};
pub use rules::normalize_host;

use table::Table;

/// Proxy settings that are not per route. Defaults suit a LAN or VPC.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Every timer and bound of client connections and upstream exchanges.
    pub limits: Limits,
    /// Latency charged to an endpoint for a failure (5xx, refused, reset, timeout) and for a
    /// 429 (which slows it down but never ejects it); default 1 s.
    pub failure_penalty: Duration,
    /// Attempts per request including retries to other endpoints (default 3).
    pub max_attempts: u32,
    /// Give requests without a usable `X-Request-Id` a random one (default true); an id of
    /// 1-128 visible ASCII characters passes.
    pub request_id: bool,
    /// `Via` header added to responses, e.g. `1.1 fleetlb` (default none).
    pub via: Option<http::HeaderValue>,
    /// Idle pooled upstream connections are closed after this long (default 4 s: below the
    /// keep-alive of common application servers, uvicorn's and Node's 5 s, so fleetlb closes
    /// an idle connection before the backend does and never sends a request into one the
    /// backend is closing).
    pub pool_idle_timeout: Duration,
    /// The HTTPS listener's port, where routes with `https_redirect` send plain HTTP requests
    /// (308); `None`: no HTTPS listener, no redirect.
    pub https_port: Option<u16>,
    /// Peers whose `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are believed (appended to);
    /// from anyone else those headers are replaced by what fleetlb saw (default: none).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// One JSON line per request (default: none). See [`access_log`].
    pub access_log: Option<access_log::AccessLog>,
    /// The availability zone this proxy runs in (`--zone`): requests prefer healthy endpoints
    /// of the same zone while they are not overloaded or clearly slower (default: none, no
    /// zone preference).
    pub zone: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            failure_penalty: Duration::from_secs(1),
            max_attempts: 3,
            zone: None,
            request_id: true,
            via: None,
            pool_idle_timeout: Duration::from_secs(4),
            https_port: None,
            trusted_proxies: Vec::new(),
            access_log: None,
        }
    }
}

/// Monotonic nanoseconds since the data plane started (tokio's clock, so tests can pause it).
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    base: tokio::time::Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The instant `ns` nanoseconds after the start.
    pub(crate) fn instant(&self, ns: u64) -> tokio::time::Instant {
        self.base + Duration::from_nanos(ns)
    }
}

pub(crate) struct Shared {
    pub table: ArcSwap<Table>,
    pub clock: Clock,
    pub metrics: Metrics,
    pub config: ProxyConfig,
    /// `config.limits`, shared with every client connection.
    pub limits: Arc<Limits>,
    /// `limits.max_connections` permits, shared by every listener of the process.
    pub connection_limit: Arc<tokio::sync::Semaphore>,
    /// Endpoints that left the table with requests still in flight, by instance id, kept until
    /// those requests end (the route updater's 1 s sweep drops them) so the controller can see
    /// when an instance has drained. Never touched on the request path.
    pub departed: std::sync::Mutex<HashMap<String, Arc<endpoint::Endpoint>>>,
    /// This proxy's id for the life of the process (see [`Dataplane::id`]).
    pub id: String,
    /// Clusters whose endpoints passed or failed their checks since the controller last looked
    /// (see [`Dataplane::health_changed`]).
    pub health_changes: HealthChanges,
    /// Each cluster's recent rate and p50/p99 (`/debug/history`).
    pub history: history::History,
}

/// The names of clusters whose endpoints' health changed, kept until taken: a set (bounded by
/// the number of clusters, however often health flaps) and a wake-up for the one taker.
#[derive(Default)]
pub(crate) struct HealthChanges {
    dirty: std::sync::Mutex<std::collections::HashSet<String>>,
    wake: tokio::sync::Notify,
}

impl HealthChanges {
    /// Called on a transition (never on the request path's fast arm: transitions are rare).
    pub fn mark(&self, cluster: &str) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if !dirty.contains(cluster) {
            dirty.insert(cluster.to_owned());
        }
        drop(dirty);
        // A permit is stored when nobody waits, so a change made between a take and the next
        // wait still wakes it.
        self.wake.notify_one();
    }

    async fn take(&self) -> Vec<String> {
        loop {
            let taken = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
            if !taken.is_empty() {
                return taken.into_iter().collect();
            }
            self.wake.notified().await;
        }
    }
}

/// Which address reuse a listener allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// `SO_REUSEADDR` only: a restart binds at once, a second live listener is refused.
    Address,
    /// `SO_REUSEPORT` too: a second process (a successor, or a proxy thread) binds the same
    /// address and takes over without the port ever refusing connections. Never with port 0
    /// in tests that run in parallel: read the port back from the first listener instead.
    Port,
}

/// Binds a listener with a deep accept queue (4096, capped by `net.core.somaxconn`), so a burst
/// of simultaneous connections is not answered with SYN retransmits a second later.
pub fn listen(addr: std::net::SocketAddr, reuse: Reuse) -> std::io::Result<TcpListener> {
    let reuse_port = reuse == Reuse::Port;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Handle to the data plane; cheap to clone.
#[derive(Clone)]
pub struct Dataplane {
    shared: Arc<Shared>,
}

impl Dataplane {
    /// Builds the proxy and registers its metrics in `registry`.
    pub fn new(config: ProxyConfig, registry: &prometheus::Registry) -> prometheus::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                table: ArcSwap::from_pointee(Table::default()),
                clock: Clock::new(),
                metrics: Metrics::new(registry)?,
                connection_limit: Arc::new(tokio::sync::Semaphore::new(
                    config.limits.max_connections as usize,
                )),
                limits: Arc::new(config.limits.clone()),
                config,
                departed: std::sync::Mutex::default(),
                id: format!("{:016x}", fastrand::u64(..)),
                health_changes: HealthChanges::default(),
                history: history::History::default(),
            }),
        })
    }

    /// Follows route-table snapshots from `rx` for as long as the task runs. When the sender is
    /// dropped the last table keeps being served and probed.
    pub fn watch_routes(&self, rx: watch::Receiver<RouteTable>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(table::run_updater(self.shared.clone(), rx))
    }

    /// Serves clients on `listener` until `shutdown` completes, then drains in-flight requests
    /// (up to `ProxyConfig::drain_timeout`) and returns.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        server::serve(self.shared.clone(), listener, None, shutdown).await
    }

    /// Serves HTTPS clients on `listener` with `certs` (chosen by SNI, reloaded as their files
    /// change) until `shutdown` completes, then drains like [`Dataplane::serve`]. Requests are
    /// routed exactly as on the plain listener, with `X-Forwarded-Proto: https`.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        certs: &tls::Certs,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tls::CertError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config()?);
        server::serve(self.shared.clone(), listener, Some(acceptor), shutdown).await;
        Ok(())
    }

    /// This data plane's metrics (for [`tls::Certs::watch`]).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Serves clients on `threads` threads (at least one), each with its own single-threaded
    /// runtime, its own `SO_REUSEPORT` listener on `listener`'s address (the first thread takes
    /// `listener` itself, so nothing queued on it is lost; the kernel spreads new connections
    /// over all of them) and its own upstream connection pool, so a request never leaves the
    /// thread that accepted it. Routes, balancer state and metrics stay shared. Each thread
    /// stops accepting when `shutdown` turns true and drains like [`Dataplane::serve`]; join
    /// the handles to wait for that.
    pub fn serve_threads(
        &self,
        listener: TcpListener,
        threads: usize,
        shutdown: &watch::Receiver<bool>,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        let addr = listener.local_addr()?;
        let mut first = Some(listener.into_std()?);
        let mut handles = Vec::with_capacity(threads.max(1));
        for n in 0..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Bound here, so a failure is reported to the caller, not lost in a thread.
            let std_listener = match first.take() {
                Some(l) => l,
                None => {
                    let _in_rt = rt.enter();
                    listen(addr, Reuse::Port)?.into_std()?
                }
            };
            let shared = self.shared.clone();
            let mut stop = shutdown.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("fleetlb-proxy-{n}"))
                    .spawn(move || {
                        rt.block_on(async move {
                            let Ok(listener) = TcpListener::from_std(std_listener) else {
                                return;
                            };
                            h1::enter_proxy_thread(n);
                            server::serve(shared, listener, None, async move {
                                let _ = stop.wait_for(|s| *s).await;
                            })
                            .await;
                        });
                    })?,
            );
        }
        Ok(handles)
    }

    /// Requests in flight per instance id of `cluster`: its endpoints in the table, and every
    /// endpoint that left the table while requests to it were still running (a retired
    /// instance draining). An id missing here has none.
    pub fn inflight_of(&self, cluster: &str) -> HashMap<String, u32> {
        let mut out: HashMap<String, u32> = HashMap::new();
        let table = self.shared.table.load();
        if let Some(c) = table.by_name.get(cluster) {
            for e in &c.endpoints {
                *out.entry(e.id.clone()).or_default() += e.state.inflight();
            }
        }
        let departed = self
            .shared
            .departed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (id, e) in departed.iter() {
            *out.entry(id.clone()).or_default() += e.state.inflight();
        }
        out
    }

    /// A random id, new with each process: a proxy that sums its peers' loads (`/debug/load`)
    /// knows itself among them and never counts a reading twice, and a restarted peer's counters
    /// are a new series rather than a counter gone backwards.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Waits until an endpoint of some cluster turns healthy or unhealthy (by its checks or a
    /// refused connection), then names every cluster that changed since the last call. For one
    /// taker: a controller that reports health in status reacts at once instead of at its next
    /// resync. Nothing is lost between calls.
    pub async fn health_changed(&self) -> Vec<String> {
        self.shared.health_changes.take().await
    }

    /// Each cluster's load as this proxy sees it (the autoscaler's signal): requests in flight
    /// now and answered so far.
    pub fn load(&self) -> Vec<ClusterLoad> {
        self.shared
            .table
            .load()
            .clusters
            .iter()
            .map(|c| ClusterLoad {
                cluster: c.name.clone(),
                inflight: u64::from(c.load()),
                answered: c.metrics.answered(),
            })
            .collect()
    }

    /// What the balancer knows right now, per cluster and endpoint.
    pub fn snapshot(&self) -> Vec<ClusterSnapshot> {
        let now = self.shared.clock.now();
        let table = self.shared.table.load();
        table
            .clusters
            .iter()
            .map(|c| cluster_snapshot(c, now))
            .collect()
    }

    /// [`Dataplane::snapshot`] of one cluster (a reconcile needs only its own).
    pub fn cluster_snapshot(&self, cluster: &str) -> Option<ClusterSnapshot> {
        let now = self.shared.clock.now();
        let table = self.shared.table.load();
        table.by_name.get(cluster).map(|c| cluster_snapshot(c, now))
    }

    /// Refreshes the per-endpoint gauges from the live table; called before each scrape.
    pub fn refresh_gauges(&self) {
        let m = &self.shared.metrics;
        m.latency.reset();
        m.inflight.reset();
        m.endpoints.reset();
        m.queued.reset();
        for c in self.snapshot() {
            let mut counts = [0i64; 3];
            for e in &c.endpoints {
                let cl = c.cluster.as_str();
                m.latency
                    .with_label_values(&[cl, &e.address, "ewma"])
                    .set(e.latency_ms / 1e3);
                if let Some(p) = e.probe_ms {
                    m.latency
                        .with_label_values(&[cl, &e.address, "probe"])
                        .set(p / 1e3);
                }
                m.inflight
                    .with_label_values(&[cl, &e.address])
                    .set(i64::from(e.inflight));
                m.queued
                    .with_label_values(&[cl, &e.address])
                    .set(i64::from(e.queued));
                counts[e.state as usize] += 1;
            }
            for (state, n) in EndpointState::ALL.iter().map(|s| s.as_str()).zip(counts) {
                m.endpoints
                    .with_label_values(&[c.cluster.as_str(), state])
                    .set(n);
            }
            if !c.panic {
                m.panic_mode.with_label_values(&[c.cluster.as_str()]).set(0);
            }
        }
    }
}

/// One proxy's load (`/debug/load`): its id and each cluster's reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProxyLoad {
    /// [`Dataplane::id`] (empty from a version that named none).
    #[serde(default)]
    pub proxy: String,
    /// Per cluster.
    pub clusters: Vec<ClusterLoad>,
}

/// One cluster's load on one proxy (`/debug/load`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ClusterLoad {
    /// Cluster name.
    pub cluster: String,
    /// Requests in flight to its endpoints now.
    pub inflight: u64,
    /// Requests answered so far (a counter: rates come from two readings).
    pub answered: u64,
}

/// What the balancer makes of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// Passes its health checks and is not ejected: gets traffic.
    Healthy = 0,
    /// Fails its health checks.
    Unhealthy = 1,
    /// Ejected by outlier detection for a while.
    Ejected = 2,
}

impl EndpointState {
    /// Every state, in gauge order.
    pub const ALL: [EndpointState; 3] = [
        EndpointState::Healthy,
        EndpointState::Unhealthy,
        EndpointState::Ejected,
    ];

    /// The state's name in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Unhealthy => "unhealthy",
            EndpointState::Ejected => "ejected",
        }
    }
}

/// What the balancer knows of `c` at `now`.
fn cluster_snapshot(c: &table::Cluster, now: u64) -> ClusterSnapshot {
    let decay = c.balancing.decay.as_nanos() as f64;
    let total: u64 = c.endpoints.iter().map(|e| e.metrics.selections.get()).sum();
    let endpoints: Vec<EndpointSnapshot> = c
        .endpoints
        .iter()
        .map(|e| {
            let s = &e.state;
            let selections = e.metrics.selections.get();
            let ejection = s.ejection(now);
            EndpointSnapshot {
                id: e.id.clone(),
                address: e.addr.to_string(),
                zone: e.zone.clone(),
                state: if s.is_ejected(now) {
                    EndpointState::Ejected
                } else if s.is_healthy() {
                    EndpointState::Healthy
                } else {
                    EndpointState::Unhealthy
                },
                healthy: s.is_healthy(),
                latency_ms: s.estimate_ns(now, decay) / 1e6,
                probe_ms: s.probe_rtt_ns().map(|n| n as f64 / 1e6),
                cost: balance::cost(c, e, now) / 1e6,
                ejected_reason: ejection.map(|(r, _)| r.as_str()),
                ejected_for_ms: ejection.map(|(_, until)| (until - now) / 1_000_000),
                ejections: s.ejections(),
                inflight: s.inflight(),
                queued: e.queued.load(std::sync::atomic::Ordering::Relaxed),
                idle_connections: e.pool.idle(),
                selections,
                failures: s.failures(),
                share: if total == 0 {
                    0.0
                } else {
                    selections as f64 / total as f64
                },
            }
        })
        .collect();
    ClusterSnapshot {
        cluster: c.name.clone(),
        prefix: c.prefix.clone(),
        hosts: c.hosts.clone(),
        weight: c.weight,
        policy: c.balancing.policy.as_str(),
        panic: !c.endpoints.is_empty()
            && endpoints.iter().all(|e| e.state != EndpointState::Healthy),
        endpoints,
    }
}

/// One cluster as `/debug/endpoints` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSnapshot {
    /// Cluster name.
    pub cluster: String,
    /// Route prefix.
    pub prefix: String,
    /// Hosts served (empty: any host).
    pub hosts: Vec<String>,
    /// Share of a rule split with other clusters (absent: not split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Balancing policy.
    pub policy: &'static str,
    /// True when no endpoint is healthy (requests fail open to known-good endpoints).
    pub panic: bool,
    /// Endpoints in the controller's order.
    pub endpoints: Vec<EndpointSnapshot>,
}

/// One endpoint as `/debug/endpoints` shows it: the answer to "why does traffic go where it goes".
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    /// Instance id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Availability zone, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `healthy`, `unhealthy` or `ejected`.
    pub state: EndpointState,
    /// Passes its health check.
    pub healthy: bool,
    /// The balancer's latency estimate (peak EWMA relaxing toward the probe RTT), ms.
    pub latency_ms: f64,
    /// Last passing health-check RTT, ms.
    pub probe_ms: Option<f64>,
    /// Peak-EWMA cost: latency x (in-flight + 1), ms. Lower wins.
    pub cost: f64,
    /// Why it is ejected, when it is (`consecutive_failures`, `latency`, `retry_after`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_reason: Option<&'static str>,
    /// Time left in the current ejection, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    /// Times ejected since it joined (each ejection lasts one base period longer).
    pub ejections: u32,
    /// Requests in flight (each on its own upstream connection).
    pub inflight: u32,
    /// Requests waiting for a connection slot (`--endpoint-max-connections`).
    pub queued: u32,
    /// Kept-alive upstream connections waiting for a request.
    pub idle_connections: usize,
    /// Requests sent to it since it joined.
    pub selections: u64,
    /// Of those, the ones it failed (a 5xx it made, a refused or broken connection).
    pub failures: u64,
    /// Its share of the cluster's selections.
    pub share: f64,
}
