//! Autoscaling in the core: the load of every proxy sampled about once a second into one
//! [`Autoscaler`] per cluster, and each reconcile of an object with `spec.autoscaling` asking
//! it for the count (the plan then launches or retires toward it). Standalone the one proxy
//! sees all of it; in Kubernetes each replica adds its peers' `/debug/load` (see
//! [`super::peers`]).

use std::collections::HashMap;
use std::time::Duration;

use fleetlb_crds::{AutoscalingStatus, BackendCluster};
use fleetlb_dataplane::ProxyLoad;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::peers::{self, Source};
use super::{Core, Event};
use crate::autoscale::{Autoscaler, Policy, Sample};
use crate::provider::ClusterKey;
use crate::reconcile::{autoscaling_bounds, desired_replicas};

/// Readings kept per cluster: the longest stable window `spec.autoscaling` allows.
const KEEP: Duration = Duration::from_secs(3600);

/// Every cluster's autoscaler and every proxy's last reading, on the core's own clock.
pub(super) struct Loads {
    origin: Instant,
    clusters: HashMap<String, Autoscaler>,
    sources: HashMap<String, Source>,
}

impl Default for Loads {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            clusters: HashMap::new(),
            sources: HashMap::new(),
        }
    }
}

impl Core {
    /// Reads each cluster's load (requests in flight, the rate answered since the previous
    /// reading) from this process's proxy and from its peers, and records the sum in the
    /// cluster's autoscaler. Drivers call this about once a second; it takes at most about
    /// 1.6 s (a lookup and a read, 800 ms each) when peers do not answer.
    pub async fn sample(&self) {
        let own = ProxyLoad {
            proxy: self.dataplane.id().to_string(),
            clusters: self.dataplane.load(),
        };
        let own_at = Instant::now();
        let reading = self.peers.read(&own.proxy).await;
        let complete = reading.missing == 0;
        let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        let origin = loads.origin;
        let since = |at: Instant| at.saturating_duration_since(origin);
        let mut readings: Vec<(Duration, ProxyLoad)> = reading
            .loads
            .into_iter()
            .map(|(at, l)| (since(at), l))
            .collect();
        let own_id = own.proxy.clone();
        readings.push((since(own_at), own));
        let now = origin.elapsed();
        // Only what this proxy serves: a peer a moment behind may still serve a deleted cluster.
        let sums = peers::sum(&mut loads.sources, readings, now, &own_id);
        self.metrics
            .autoscaler_proxies
            .set(loads.sources.len() as i64);
        self.metrics
            .autoscaler_peers_missing
            .set(reading.missing as i64);
        self.metrics
            .autoscaler_peer_failures
            .inc_by(reading.missing as u64);
        for (cluster, (inflight, rps)) in sums {
            loads.clusters.entry(cluster).or_default().record(
                Sample {
                    at: now,
                    inflight,
                    rps,
                    complete,
                },
                KEEP,
            );
        }
    }

    /// Drops a deleted cluster's readings, decisions and gauges (a new object of the same name
    /// starts afresh).
    pub(super) fn forget_load(&self, key: &ClusterKey) {
        let key = key.to_string();
        self.loads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clusters
            .remove(&key);
        let _ = self.metrics.autoscaler_desired.remove_label_values(&[&key]);
        let _ = self
            .metrics
            .autoscaler_inflight
            .remove_label_values(&[&key]);
    }

    /// The autoscaler's decision for `bc` (none without `spec.autoscaling`): the status to
    /// record (whose `desiredReplicas` the plan follows) and, when the count changes, a
    /// `Scaled` Event.
    pub(super) fn autoscale(
        &self,
        bc: &BackendCluster,
        now: Timestamp,
    ) -> Option<(AutoscalingStatus, Option<Event>)> {
        let a = bc.spec.autoscaling.as_ref()?;
        if matches!(bc.spec.provider, fleetlb_crds::ProviderSpec::Static(_)) {
            // Listed endpoints are not launched (the schema refuses the combination).
            return None;
        }
        let policy = Policy::of(a, autoscaling_bounds(bc, a));
        let current = u32::try_from(desired_replicas(bc)).unwrap_or(u32::MAX);
        let key = ClusterKey::of(bc).to_string();
        let d = {
            let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
            let at = loads.origin.elapsed();
            loads
                .clusters
                .entry(key.clone())
                .or_default()
                .decide(at, current, &policy)
        };
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let previous = bc.status.as_ref().and_then(|s| s.autoscaling.as_ref());
        let status = AutoscalingStatus {
            desired_replicas: d.desired,
            inflight_per_instance: round(d.inflight_per_instance),
            requests_per_second_per_instance: round(d.rps_per_instance),
            target_inflight_per_instance: a.target_inflight_per_instance,
            panic: d.panic,
            last_scale_time: if d.desired == current {
                previous.and_then(|p| p.last_scale_time.clone())
            } else {
                Some(Time(now))
            },
        };
        self.metrics
            .autoscaler_desired
            .with_label_values(&[key.as_str()])
            .set(i64::from(d.desired));
        self.metrics
            .autoscaler_inflight
            .with_label_values(&[key.as_str()])
            .set(status.inflight_per_instance);
        let event = (d.desired != current).then(|| {
            let note = format!(
                "scaled {current} -> {}: {:.1} in flight per instance, target {}{}",
                d.desired,
                d.inflight_per_instance,
                a.target_inflight_per_instance,
                if d.panic {
                    " (panic window: a burst)"
                } else {
                    ""
                }
            );
            tracing::info!(cluster = %key, "{note}");
            Event::normal("Scaled", note)
        });
        Some((status, event))
    }
}
