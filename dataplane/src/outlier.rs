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
    // Count and eject under the cluster's lock, so threads ejecting at once cannot together
    // go past the budget. Only failures get here, never a request that went well.
    let _deciding = cluster
        .carried
        .ejecting
        .lock()
        .unwrap_or_else(|p| p.into_inner());
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

/// Fewest responses in a sweep window for an endpoint's mean latency to count.
const MIN_SAMPLES: u64 = 5;

/// Ejects endpoints that are slow for what they carry. Per endpoint over the sweep window
/// (about a second): its mean response time, and that time per request it had in flight (the
/// mean divided by its mean concurrency, at least one; Little's law). An endpoint is ejected
/// when its time per request in flight is over `latency_factor` times the cluster's median
/// (and at least 5 ms above it, so sub-millisecond noise never ejects anything) and its
/// response time is at least 5 ms above the median too (so an endpoint that merely carries
/// less than its peers, and answers as fast, is never taken for slow).
///
/// Overload is not sickness: when a burst queues on the endpoints that took it, their response
/// time rises with their queue, but their time per request in flight does not, so nobody is
/// ejected while the whole cluster is busy; an endpoint ten times slower than its peers at
/// the same load is. Needs three or more endpoints with at least five responses each in the
/// window. Means of real responses are used rather than peak-EWMA estimates, which react to
/// every spike and would make the fast endpoints look slow too.
pub(crate) fn sweep_latency(metrics: &Metrics, cluster: &Cluster, now: u64) {
    let mut means: Vec<(usize, f64, f64)> = Vec::with_capacity(cluster.endpoints.len());
    for (i, e) in cluster.endpoints.iter().enumerate() {
        if let Some((mean, concurrency)) = e.state.window_mean(
            e.metrics.upstream_duration.get_sample_sum(),
            e.metrics.upstream_duration.get_sample_count(),
            MIN_SAMPLES,
            now,
        ) && e.state.is_eligible(now)
        {
            means.push((i, mean, mean / concurrency.max(1.0)));
        }
    }
    let factor = cluster.outlier.latency_factor;
    if factor <= 0.0 || means.len() < 3 {
        return;
    }
    let median = |pick: fn(&(usize, f64, f64)) -> f64| {
        let mut v: Vec<f64> = means.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let raw = median(|m| m.1) + 0.005;
    let per_request = {
        let m = median(|m| m.2);
        (m * factor).max(m + 0.005)
    };
    for &(i, mean, normalized) in &means {
        if mean > raw && normalized > per_request {
            try_eject(
                metrics,
                cluster,
                &cluster.endpoints[i],
                now,
                EjectReason::Latency,
                None,
            );
        }
    }
}
