//! Passive outlier detection: ejecting endpoints that fail in a row or lag far behind the
//! cluster, for a period that grows with each ejection (base x n, at most 300 s), never more
//! than `max_ejection_percent` of the cluster at once (but always at least one endpoint of a
//! cluster of two or more may be ejected). Ejection does not stop the active prober, and an
//! ejected endpoint returns on its own when the period ends.

use std::time::Duration;

use crate::endpoint::{EjectReason, Endpoint};
use crate::metrics::Metrics;
use crate::table::Cluster;

const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Ejects `ep` for `reason` unless it already is ejected or the cluster's ejection budget is
/// spent. Returns whether it was ejected.
pub(crate) fn try_eject(
    metrics: &Metrics,
    cluster: &Cluster,
    ep: &Endpoint,
    now: u64,
    reason: EjectReason,
    period: Option<Duration>,
) -> bool {
    if ep.state.is_ejected(now) {
        return false;
    }
    let n = cluster.endpoints.len();
    let ejected = cluster
        .endpoints
        .iter()
        .filter(|e| e.state.is_ejected(now))
        .count();
    let allowed = if n < 2 {
        0
    } else {
        (n * cluster.outlier.max_ejection_percent as usize / 100).max(1)
    };
    if ejected >= allowed {
        return false;
    }
    let period = period.unwrap_or_else(|| {
        cluster
            .outlier
            .base_ejection
            .saturating_mul(ep.state.ejections().saturating_add(1))
            .min(MAX_EJECTION)
    });
    ep.state.eject(now + period.as_nanos() as u64, reason);
    metrics
        .ejections
        .with_label_values(&[cluster.name.as_str(), reason.as_str()])
        .inc();
    tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, id = %ep.id, reason = reason.as_str(), ?period, "endpoint ejected");
    true
}

/// Records a failed request and ejects the endpoint after `consecutive_failures` in a row.
pub(crate) fn on_failure(metrics: &Metrics, cluster: &Cluster, ep: &Endpoint, now: u64) {
    let run = ep.state.request_failed();
    let limit = cluster.outlier.consecutive_failures;
    if limit > 0 && run >= limit {
        try_eject(
            metrics,
            cluster,
            ep,
            now,
            EjectReason::ConsecutiveFailures,
            None,
        );
    }
}

/// Ejects endpoints whose latency estimate is over `latency_factor` times the median of the
/// cluster's eligible endpoints (and at least 5 ms above it, so sub-millisecond noise never
/// ejects anything). Needs three or more eligible endpoints.
pub(crate) fn sweep_latency(metrics: &Metrics, cluster: &Cluster, now: u64) {
    let factor = cluster.outlier.latency_factor;
    if factor <= 0.0 {
        return;
    }
    let decay = cluster.balancing.decay.as_nanos() as f64;
    let mut est: Vec<f64> = cluster
        .endpoints
        .iter()
        .filter(|e| e.state.is_eligible(now))
        .map(|e| e.state.estimate_ns(now, decay))
        .collect();
    if est.len() < 3 {
        return;
    }
    est.sort_by(f64::total_cmp);
    let median = est[est.len() / 2];
    let limit = (median * factor).max(median + 5_000_000.0);
    for e in &cluster.endpoints {
        if e.state.is_eligible(now) && e.state.estimate_ns(now, decay) > limit {
            try_eject(metrics, cluster, e, now, EjectReason::Latency, None);
        }
    }
}
