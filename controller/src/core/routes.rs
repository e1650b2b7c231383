//! The data plane's route table from the objects, with one rule for conflicts in every driver:
//! of two objects claiming one route, the older keeps it (then the first by namespace/name);
//! the younger is refused with `RouteConflict`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::{
    BalancingConfig, EndpointConfig, HealthConfig, OutlierConfig, Policy, RouteConfig, RouteTable,
};
use k8s_openapi::jiff::Timestamp;

use crate::provider::ClusterKey;

/// The route table for `objects`: each live object's spec and the endpoints in its status
/// (what the last reconcile published). An object being deleted leaves the table; of two
/// objects claiming one route, the older keeps it; an object whose spec fails validation keeps
/// the route it has in `current`.
pub fn build_routes(objects: &[Arc<BackendCluster>], current: &RouteTable) -> Vec<RouteConfig> {
    let mut live: Vec<&Arc<BackendCluster>> = objects
        .iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .collect();
    // Oldest first: it keeps a contested route.
    live.sort_by_cached_key(|o| seniority(o));
    let mut claimed: HashSet<String> = HashSet::new();
    let mut out = BTreeMap::new();
    for o in live {
        let key = ClusterKey::of(o);
        let cluster = key.to_string();
        let route = if o.validate().is_ok() {
            Some(route_config(&key, o, status_endpoints(o)))
        } else {
            current
                .routes
                .iter()
                .find(|r| r.cluster == cluster)
                .cloned()
        };
        if let Some(r) = route
            && claimed.insert(r.prefix.clone())
        {
            out.insert(cluster, r);
        }
    }
    out.into_values().collect()
}

/// Publishes the route table for `objects` to the data plane, when it changed.
pub fn publish(routes: &tokio::sync::watch::Sender<RouteTable>, objects: &[Arc<BackendCluster>]) {
    // Built under the channel's read lock only (the route updater and admin read alongside),
    // never inside `send_if_modified`'s write lock.
    let next = build_routes(objects, &routes.borrow());
    routes.send_if_modified(|cur| {
        if cur.routes == next {
            false
        } else {
            cur.routes = next;
            true
        }
    });
}

/// Which of two objects claiming one route keeps it: the older, then the first by key.
fn seniority(o: &BackendCluster) -> (Option<Timestamp>, ClusterKey) {
    (
        o.metadata.creation_timestamp.as_ref().map(|t| t.0),
        ClusterKey::of(o),
    )
}

/// The object holding `bc`'s route before it, if any.
pub fn route_holder(bc: &BackendCluster, objects: &[Arc<BackendCluster>]) -> Option<ClusterKey> {
    let mine = seniority(bc);
    objects
        .iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none() && o.spec.route == bc.spec.route)
        .map(|o| seniority(o))
        .filter(|s| *s < mine)
        .min()
        .map(|(_, key)| key)
}

/// The endpoints last published in `bc`'s status (what to keep serving when the provider
/// cannot be asked, and what non-leader replicas serve).
pub fn status_endpoints(bc: &BackendCluster) -> Vec<EndpointConfig> {
    bc.status
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| {
            Some(EndpointConfig {
                id: e.id.clone(),
                addr: e.address.parse().ok()?,
            })
        })
        .collect()
}

/// The data plane's view of one BackendCluster.
pub fn route_config(
    key: &ClusterKey,
    bc: &BackendCluster,
    endpoints: Vec<EndpointConfig>,
) -> RouteConfig {
    let spec = &bc.spec;
    let hc = &spec.health_check;
    let b = &spec.balancing;
    let od = &spec.outlier_detection;
    let secs = |s: u32| Duration::from_secs(u64::from(s));
    RouteConfig {
        cluster: key.to_string(),
        prefix: spec.route.clone(),
        balancing: BalancingConfig {
            policy: match b.policy {
                fleetlb_crds::Policy::PeakEwma => Policy::PeakEwma,
                fleetlb_crds::Policy::LowestLatency => Policy::LowestLatency,
                fleetlb_crds::Policy::LeastRequest => Policy::LeastRequest,
                fleetlb_crds::Policy::RoundRobin => Policy::RoundRobin,
            },
            decay: secs(b.decay_seconds),
            slow_start: secs(b.slow_start_seconds),
            max_share: f64::from(b.max_share_percent) / 100.0,
        },
        health: HealthConfig {
            path: hc.path.clone(),
            interval: secs(hc.interval_seconds),
            timeout: secs(hc.timeout_seconds),
            healthy_threshold: hc.healthy_threshold,
            unhealthy_threshold: hc.unhealthy_threshold,
        },
        outlier: OutlierConfig {
            consecutive_failures: od.consecutive_failures,
            latency_factor: f64::from(od.latency_factor),
            base_ejection: secs(od.base_ejection_seconds),
            max_ejection_percent: od.max_ejection_percent,
        },
        request_timeout: secs(spec.timeout_seconds),
        endpoints,
    }
}
