//! What the data plane knows, for plans and gauges.

use std::collections::HashMap;

use crate::metrics::Metrics;
use crate::provider::{ClusterKey, Instance, InstanceState};
use crate::reconcile::Health;

/// What the prober knows, by cluster name and instance id (the [`Health`] each plan needs).
pub fn health_by_cluster(
    dataplane: &fleetlb_dataplane::Dataplane,
) -> HashMap<String, HashMap<String, Health>> {
    dataplane
        .snapshot()
        .into_iter()
        .map(|c| {
            let by_id = c
                .endpoints
                .into_iter()
                .map(|e| {
                    let h = Health {
                        healthy: e.healthy,
                        latency_ms: e.probe_ms.map(|_| e.latency_ms),
                    };
                    (e.id, h)
                })
                .collect();
            (c.cluster, by_id)
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
