//! The live routing table: clusters with their endpoints' state, swapped atomically.
//!
//! The request path reads the table through `ArcSwap` (no lock). The updater task turns each
//! [`RouteTable`] snapshot from the controller into a new [`Table`], reusing the `Arc<Endpoint>`
//! of endpoints that stay (so their estimates, health and in-flight counts carry over), starting a
//! prober for each new endpoint and stopping the probers of endpoints that left. Requests in
//! flight keep their own `Arc`s and finish normally.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::Shared;
use crate::endpoint::Endpoint;
use crate::metrics::ClusterMetrics;
use crate::outlier;
use crate::probe;
use crate::retry::RetryBudget;
use crate::routes::{BalancingConfig, HealthConfig, OutlierConfig, RouteConfig, RouteTable};
use crate::rules::{Rule, Rules};

/// The clusters and the host and path rules that lead to them.
#[derive(Default)]
pub(crate) struct Table {
    pub clusters: Vec<Arc<Cluster>>,
    pub rules: Rules<Arc<Cluster>>,
    /// Clusters by name (the controller asks for one cluster per reconcile).
    pub by_name: HashMap<String, Arc<Cluster>>,
}

impl Table {
    /// The rule for `host` (normalized, see [`crate::rules::request_host`]) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Rule<Arc<Cluster>>> {
        self.rules.find(host, path)
    }
}

/// A cluster's state that carries over from one route table to the next, so requests holding
/// the old table and the new one share it.
#[derive(Default)]
pub(crate) struct Carried {
    pub retry_budget: RetryBudget,
    /// Held while an ejection is decided (see `outlier::try_eject`).
    pub ejecting: std::sync::Mutex<()>,
}

/// One route's cluster.
pub(crate) struct Cluster {
    pub name: String,
    pub prefix: String,
    /// Hosts served (normalized; empty: any host).
    pub hosts: Vec<String>,
    /// Share of a rule split with other clusters.
    pub weight: Option<u32>,
    /// Plain HTTP gets a 308 to HTTPS.
    pub https_redirect: bool,
    pub balancing: BalancingConfig,
    pub health: HealthConfig,
    pub outlier: OutlierConfig,
    pub request_timeout: Duration,
    pub body_timeout: Option<Duration>,
    pub protocol: crate::routes::Protocol,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Some endpoint is in the proxy's zone: picks prefer those (see `balance`).
    pub zone_aware: bool,
    /// Round-robin position.
    pub rr: AtomicUsize,
    /// Requests in flight at which an endpoint is full (`--endpoint-max-connections`): a
    /// request sent there waits for a slot, so a pick avoids it while another has room.
    pub full_at: u32,
    /// What outlives route-table updates: the retry budget and the ejection lock.
    pub carried: Arc<Carried>,
    pub metrics: ClusterMetrics,
}

impl Cluster {
    pub fn new(
        route: &RouteConfig,
        endpoints: Vec<Arc<Endpoint>>,
        metrics: ClusterMetrics,
        carried: Arc<Carried>,
    ) -> Self {
        Self {
            name: route.cluster.clone(),
            prefix: route.prefix.clone(),
            hosts: route
                .hosts
                .iter()
                .map(|h| crate::rules::normalize_host(h).into_owned())
                .collect(),
            weight: route.weight,
            https_redirect: route.https_redirect,
            balancing: route.balancing.clone(),
            health: route.health.clone(),
            outlier: route.outlier.clone(),
            request_timeout: route.request_timeout,
            body_timeout: route.body_timeout,
            protocol: route.protocol,
            zone_aware: endpoints.iter().any(|e| e.local),
            endpoints,
            rr: AtomicUsize::new(0),
            full_at: u32::MAX,
            carried,
            metrics,
        }
    }

    /// Requests in flight to any endpoint of this cluster.
    pub fn inflight(&self) -> u32 {
        self.endpoints.iter().map(|e| e.state.inflight()).sum()
    }

    /// Requests in flight as the autoscaler counts load (`EndpointState::load`).
    pub fn load(&self) -> u32 {
        self.endpoints.iter().map(|e| e.state.load()).sum()
    }
}

struct Probed {
    endpoint: Arc<Endpoint>,
    health: HealthConfig,
    protocol: crate::routes::Protocol,
    task: AbortHandle,
}

/// Keeps the live table in step with the controller's snapshots until the sender is dropped.
pub(crate) async fn run_updater(shared: Arc<Shared>, mut rx: watch::Receiver<RouteTable>) {
    // (cluster name, endpoint id, address) -> endpoint and its prober.
    let mut live: HashMap<(String, String, std::net::SocketAddr), Probed> = HashMap::new();
    let mut budgets: HashMap<String, Arc<Carried>> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    let snapshot = rx.borrow_and_update().clone();
    apply(&shared, &snapshot, &mut live, &mut budgets);
    loop {
        tokio::select! {
            changed = rx.changed(), if open => {
                if changed.is_ok() {
                    let snapshot = rx.borrow_and_update().clone();
                    apply(&shared, &snapshot, &mut live, &mut budgets);
                } else {
                    // The controller is gone: keep serving and probing the last table.
                    tracing::warn!("route table source closed; serving the last table");
                    open = false;
                }
            }
            _ = sweep.tick() => {
                // Departed endpoints are kept only while requests to them run (and their
                // pooled connections with them).
                shared
                    .departed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|_, e| e.state.inflight() > 0);
                let now = shared.clock.now();
                for c in &shared.table.load().clusters {
                    outlier::sweep_latency(&shared.metrics, c, now);
                    c.carried.retry_budget.tick();
                    // Idle upstream connections past their time or closed by the backend are
                    // closed here, not left in CLOSE_WAIT until the next request.
                    for ep in c.endpoints.iter() {
                        ep.pool.expire(shared.config.pool_idle_timeout);
                        ep.h2.expire(now, shared.config.pool_idle_timeout);
                    }
                }
            }
        }
    }
}

fn apply(
    shared: &Arc<Shared>,
    snapshot: &RouteTable,
    live: &mut HashMap<(String, String, std::net::SocketAddr), Probed>,
    budgets: &mut HashMap<String, Arc<Carried>>,
) {
    let now = shared.clock.now();
    let mut next: HashMap<(String, String, std::net::SocketAddr), Probed> = HashMap::new();
    let mut clusters = Vec::with_capacity(snapshot.routes.len());
    for route in &snapshot.routes {
        let mut endpoints = Vec::with_capacity(route.endpoints.len());
        for ep in &route.endpoints {
            let key = (route.cluster.clone(), ep.id.clone(), ep.addr);
            if next.contains_key(&key) {
                continue; // duplicate endpoint in one route
            }
            let probed = match live.remove(&key) {
                Some(p) if p.health == route.health && p.protocol == route.protocol => p,
                Some(p) => {
                    // Health settings changed: restart the prober, keep the state.
                    p.task.abort();
                    let task = probe::spawn(
                        shared.clone(),
                        route.cluster.clone(),
                        route.health.clone(),
                        route.protocol,
                        p.endpoint.clone(),
                    );
                    Probed {
                        endpoint: p.endpoint,
                        health: route.health.clone(),
                        protocol: route.protocol,
                        task,
                    }
                }
                None => {
                    let label = ep.addr.to_string();
                    let endpoint = Arc::new(
                        Endpoint::new(
                            ep.id.clone(),
                            ep.addr,
                            shared.metrics.endpoint(&route.cluster, &label),
                            now,
                        )
                        .in_zone(ep.zone.clone(), shared.config.zone.as_deref()),
                    );
                    let task = probe::spawn(
                        shared.clone(),
                        route.cluster.clone(),
                        route.health.clone(),
                        route.protocol,
                        endpoint.clone(),
                    );
                    tracing::info!(cluster = %route.cluster, endpoint = %ep.addr, id = %ep.id, "endpoint added");
                    Probed {
                        endpoint,
                        health: route.health.clone(),
                        protocol: route.protocol,
                        task,
                    }
                }
            };
            endpoints.push(probed.endpoint.clone());
            next.insert(key, probed);
        }
        let budget = budgets.entry(route.cluster.clone()).or_default().clone();
        let mut cluster = Cluster::new(
            route,
            endpoints,
            shared.metrics.cluster(&route.cluster),
            budget,
        );
        cluster.full_at = shared.limits.endpoint_max_connections;
        clusters.push(Arc::new(cluster));
    }
    for ((cluster, id, addr), gone) in live.drain() {
        gone.task.abort();
        if gone.endpoint.state.inflight() > 0 {
            shared
                .departed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone(), gone.endpoint.clone());
        }
        shared.metrics.forget_endpoint(&cluster, &addr.to_string());
        tracing::info!(%cluster, endpoint = %addr, %id, "endpoint removed");
    }
    *live = next;
    budgets.retain(|name, _| snapshot.routes.iter().any(|r| &r.cluster == name));
    let mut rules = Rules::default();
    for c in &clusters {
        rules.insert(&c.hosts, &c.prefix, c.clone(), c.weight);
    }
    let by_name = clusters
        .iter()
        .map(|c| (c.name.clone(), c.clone()))
        .collect();
    shared.table.store(Arc::new(Table {
        clusters,
        rules,
        by_name,
    }));
}
