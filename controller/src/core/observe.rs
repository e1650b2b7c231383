//! What the data plane knows, for plans and gauges.

use std::collections::HashMap;

use crate::metrics::Metrics;
use crate::provider::{ClusterKey, Instance, InstanceState};
use crate::reconcile::Health;

/// What the prober knows of `cluster`'s endpoints, by instance id (the [`Health`] a plan needs).
pub fn health_of(
    dataplane: &fleetlb_dataplane::Dataplane,
    cluster: &str,
) -> HashMap<String, Health> {
    dataplane
        .cluster_snapshot(cluster)
        .into_iter()
        .flat_map(|c| c.endpoints)
        .map(|e| {
            let h = Health {
                healthy: e.healthy,
                latency_ms: e.probe_ms.map(|_| e.latency_ms),
            };
            (e.id, h)
        })
        .collect()
}

/// Instance counts per provider state, for the `fleetlb_controller_instances` gauge.
pub fn count_states(instances: &[Instance]) -> Vec<(&'static str, i64)> {
    use InstanceState as S;
    [
        S::Pending,
        S::Running,
        S::ShuttingDown,
        S::Stopping,
        S::Stopped,
    ]
    .iter()
    .map(|s| {
        (
            s.as_str(),
            instances.iter().filter(|i| i.state == *s).count() as i64,
        )
    })
    .collect()
}

/// Removes the instance gauges of a cluster that is gone.
pub fn forget_cluster(metrics: &Metrics, key: &ClusterKey) {
    let cluster = key.to_string();
    for (state, _) in count_states(&[]) {
        let _ = metrics
            .instances
            .remove_label_values(&[cluster.as_str(), state]);
    }
}
