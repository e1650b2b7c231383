//! The data plane's route table from the objects, with one rule for conflicts in every driver:
//! of two objects claiming one rule (a host, or any host, and a route), the older keeps it
//! (then the first by namespace/name) and the younger is refused with `RouteConflict`, unless
//! both name a `weight`: weighted objects split the rule.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::{
    BalancingConfig, EndpointConfig, HealthConfig, OutlierConfig, Policy, Protocol, RouteConfig,
    RouteTable,
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
    let mut claims = Claims::default();
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
        let Some(r) = route else { continue };
        if claims
            .claim(&key, &r.hosts, &r.prefix, r.weight.is_some())
            .is_some()
        {
            continue;
        }
        out.insert(cluster, r);
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

/// The rules `hosts` and `route` make: one per host (normalized), or one for any host (`""`).
fn rule_keys(hosts: &[String], route: &str) -> Vec<(String, String)> {
    if hosts.is_empty() {
        return vec![(String::new(), route.to_string())];
    }
    hosts
        .iter()
        .map(|h| {
            (
                fleetlb_dataplane::normalize_host(h).into_owned(),
                route.to_string(),
            )
        })
        .collect()
}

/// The object holding one of `bc`'s rules before it, if any, and that rule (`host/route`, or
/// the route alone for any host). Weighted objects share rules and do not hold them against
/// each other. Called once per object per pass: objects on another route are passed over with
/// one string comparison, and hosts compare without allocating.
pub fn route_holder(
    bc: &BackendCluster,
    objects: &[Arc<BackendCluster>],
) -> Option<(ClusterKey, String)> {
    route_holder_among(bc, objects.iter().filter(|o| o.spec.route == bc.spec.route))
}

/// [`route_holder`] with the objects on `bc`'s route already found (see [`RouteIndex`]). The
/// claim [`build_routes`] makes, replayed: oldest first, each object takes its rules unless an
/// earlier claimant holds one of them (weighted objects share); an object refused claims
/// nothing, so it holds nothing against younger ones.
pub fn route_holder_among<'a>(
    bc: &BackendCluster,
    same_route: impl Iterator<Item = &'a Arc<BackendCluster>>,
) -> Option<(ClusterKey, String)> {
    let mut group: Vec<&Arc<BackendCluster>> = same_route
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .collect();
    group.sort_by_cached_key(|o| seniority(o));
    let me = ClusterKey::of(bc);
    let mut claims = Claims::default();
    for o in group {
        let key = ClusterKey::of(o);
        let blocked = claims.claim(&key, &o.spec.hosts, &o.spec.route, o.spec.weight.is_some());
        if key == me {
            return blocked.map(|(holder, (host, route))| {
                let rule = if host.is_empty() {
                    route
                } else {
                    format!("{host}{route}")
                };
                (holder, rule)
            });
        }
    }
    None
}

/// Rules claimed so far, oldest object first: each rule's first holder, and whether its holders
/// share it by weight. [`build_routes`] and the conflict check make the same claims.
#[derive(Default)]
struct Claims(HashMap<(String, String), (ClusterKey, bool)>);

impl Claims {
    /// `key` claims its rules (`hosts` x `route`): refused, with the holder and the rule it
    /// holds, when an earlier claimant holds one of them and they do not both split it by
    /// weight; a refused object claims nothing.
    fn claim(
        &mut self,
        key: &ClusterKey,
        hosts: &[String],
        route: &str,
        weighted: bool,
    ) -> Option<(ClusterKey, (String, String))> {
        let rules = rule_keys(hosts, route);
        let blocked = rules.iter().find_map(|r| {
            self.0
                .get(r)
                .filter(|(_, shared)| !(*shared && weighted))
                .map(|(holder, _)| (holder.clone(), r.clone()))
        });
        if blocked.is_none() {
            for r in rules {
                self.0.entry(r).or_insert((key.clone(), weighted));
            }
        }
        blocked
    }
}

/// The objects of one slice by route, so a pass over n objects checks conflicts in O(n), not
/// O(n^2) (10 000 objects: half a second per pass of string comparisons otherwise).
pub struct RouteIndex {
    /// The slice indexed (address and length): the index answers for it only.
    of: (usize, usize),
    by_route: HashMap<String, Vec<Arc<BackendCluster>>>,
}

impl RouteIndex {
    /// Indexes `objects`.
    pub fn new(objects: &[Arc<BackendCluster>]) -> Self {
        let mut by_route: HashMap<String, Vec<Arc<BackendCluster>>> = HashMap::new();
        for o in objects {
            by_route
                .entry(o.spec.route.clone())
                .or_default()
                .push(o.clone());
        }
        Self {
            of: (objects.as_ptr() as usize, objects.len()),
            by_route,
        }
    }

    /// Whether this indexes `objects` (the same slice, still borrowed by the caller).
    pub fn covers(&self, objects: &[Arc<BackendCluster>]) -> bool {
        self.of == (objects.as_ptr() as usize, objects.len())
    }

    /// [`route_holder`] through the index.
    pub fn holder(&self, bc: &BackendCluster) -> Option<(ClusterKey, String)> {
        route_holder_among(bc, self.by_route.get(&bc.spec.route).into_iter().flatten())
    }
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
                zone: e.zone.clone(),
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
        hosts: spec.hosts.clone(),
        weight: spec.weight,
        https_redirect: spec.https_redirect,
        protocol: match spec.protocol {
            fleetlb_crds::Protocol::Http1 => Protocol::Http1,
            fleetlb_crds::Protocol::Http2 => Protocol::Http2,
            fleetlb_crds::Protocol::Grpc => Protocol::Grpc,
        },
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
            grpc_service: hc.grpc_service.clone(),
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
        request_timeout: secs(spec.request_timeout_seconds()),
        body_timeout: spec
            .timeouts
            .as_ref()
            .and_then(|t| t.body_idle_seconds)
            .map(secs),
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object created `age` seconds into the day, with `hosts` and `weight`.
    fn object(name: &str, age: u32, hosts: &[&str], weight: Option<u32>) -> Arc<BackendCluster> {
        let mut spec = serde_json::json!({
            "route": "/shop", "replicas": 1, "instanceType": "t2.micro",
            "provider": {"local": {}}, "hosts": hosts,
        });
        if let Some(w) = weight {
            spec["weight"] = w.into();
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "fleetlb.dev/v1alpha1", "kind": "BackendCluster",
                "metadata": {"name": name, "namespace": "default",
                    "creationTimestamp": format!("2026-11-28T00:00:{age:02}Z")},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn routed(objects: &[Arc<BackendCluster>]) -> Vec<String> {
        build_routes(objects, &RouteTable::default())
            .into_iter()
            .map(|r| r.cluster)
            .collect()
    }

    #[test]
    fn one_route_under_different_hosts_is_no_conflict() {
        let objects = [
            object("a", 1, &["a.example.com"], None),
            object("b", 2, &["*.example.com"], None),
            object("any", 3, &[], None),
        ];
        assert_eq!(routed(&objects), ["a", "any", "b"]);
        assert!(objects.iter().all(|o| route_holder(o, &objects).is_none()));
    }

    #[test]
    fn the_older_keeps_a_shared_host_and_route_whatever_the_case_or_trailing_dot() {
        let objects = [
            object("young", 5, &["other.org", "Shop.Example.com."], None),
            object("old", 1, &["shop.example.com"], None),
        ];
        assert_eq!(routed(&objects), ["old"]);
        let (holder, rule) = route_holder(&objects[0], &objects).unwrap();
        assert_eq!(
            (holder.name.as_str(), rule.as_str()),
            ("old", "shop.example.com/shop")
        );
        assert!(route_holder(&objects[1], &objects).is_none());
    }

    #[test]
    fn the_conflict_check_and_the_route_table_agree() {
        // b loses x to a, so it claims nothing: c keeps y.
        let objects = [
            object("a", 1, &["x.example.com"], None),
            object("b", 2, &["x.example.com", "y.example.com"], None),
            object("c", 3, &["y.example.com"], None),
        ];
        assert_eq!(routed(&objects), ["a", "c"]);
        let refused: Vec<&str> = objects
            .iter()
            .filter(|o| route_holder(o, &objects).is_some())
            .map(|o| o.metadata.name.as_deref().unwrap())
            .collect();
        assert_eq!(refused, ["b"]);
        let index = RouteIndex::new(&objects);
        assert_eq!(index.holder(&objects[1]).unwrap().0.name, "a");
        assert!(index.holder(&objects[2]).is_none());
    }

    #[test]
    fn weighted_objects_split_a_rule_and_an_unweighted_one_is_refused() {
        let objects = [
            object("blue", 1, &[], Some(90)),
            object("green", 2, &[], Some(10)),
            object("plain", 3, &[], None),
        ];
        assert_eq!(routed(&objects), ["blue", "green"]);
        assert!(route_holder(&objects[1], &objects).is_none());
        let (holder, rule) = route_holder(&objects[2], &objects).unwrap();
        assert_eq!((holder.name.as_str(), rule.as_str()), ("blue", "/shop"));
        // A refused object holds nothing: the weighted younger one joins the older split.
        let objects = [
            object("a", 1, &[], Some(50)),
            object("plain", 2, &[], None),
            object("b", 3, &[], Some(50)),
        ];
        assert_eq!(routed(&objects), ["a", "b"]);
        assert!(route_holder(&objects[2], &objects).is_none());
        assert_eq!(route_holder(&objects[1], &objects).unwrap().0.name, "a");
        // The other way round: an unweighted older object keeps the rule from weighted ones.
        let objects = [
            object("plain", 1, &[], None),
            object("blue", 2, &[], Some(5)),
        ];
        assert_eq!(routed(&objects), ["plain"]);
        assert!(route_holder(&objects[1], &objects).is_some());
    }
}
