//! A short history per cluster for the status page (`/debug/history`): every 5 s, the request
//! rate and the p50/p99 of the last interval, from `fleetlb_request_duration_seconds` (the
//! buckets' increase over the interval, interpolated within a bucket as Prometheus'
//! `histogram_quantile` does). 60 points per cluster: the last 5 minutes. Kept off the request
//! path: the sampler reads the histograms the requests already fill.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::core::Collector;

use crate::metrics::Metrics;

/// Time between two points.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Points kept per cluster.
pub const POINTS: usize = 60;

/// One interval of one cluster.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Point {
    /// End of the interval, Unix seconds.
    pub t: u64,
    /// Requests answered per second.
    pub rps: f64,
    /// Median and 99th percentile of the time to the response head, ms (none without requests).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Default)]
pub(crate) struct History {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    points: HashMap<String, VecDeque<Point>>,
    /// Each cluster's cumulative bucket counts and total at the last sample.
    last: HashMap<String, (Vec<u64>, u64)>,
}

impl History {
    /// Takes one point per cluster of `clusters` (those being served) from `metrics`, `t`
    /// being now in Unix seconds and `interval` the time since the last sample.
    pub fn sample(&self, metrics: &Metrics, clusters: &[&str], t: u64, interval: Duration) {
        let families = metrics.request_duration.collect();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = Vec::new();
        for m in families.iter().flat_map(|f| f.get_metric()) {
            let Some(cluster) = m
                .get_label()
                .iter()
                .find(|l| l.name() == "cluster")
                .map(|l| l.value().to_string())
            else {
                continue;
            };
            // A cluster that left keeps its series in the registry: not in the history.
            if !clusters.contains(&cluster.as_str()) {
                continue;
            }
            let h = m.get_histogram();
            let bounds: Vec<f64> = h.get_bucket().iter().map(|b| b.upper_bound()).collect();
            let counts: Vec<u64> = h
                .get_bucket()
                .iter()
                .map(|b| b.cumulative_count())
                .collect();
            let total = h.get_sample_count();
            let (before, before_total) = inner
                .last
                .insert(cluster.clone(), (counts.clone(), total))
                .unwrap_or_else(|| (vec![0; counts.len()], 0));
            let delta: Vec<u64> = counts
                .iter()
                .zip(before.iter().chain(std::iter::repeat(&0)))
                .map(|(now, was)| now.saturating_sub(*was))
                .collect();
            let n = total.saturating_sub(before_total);
            let q = |q: f64| quantile(q, &bounds, &delta, n).map(|s| s * 1000.0);
            let point = Point {
                t,
                rps: n as f64 / interval.as_secs_f64().max(0.001),
                p50_ms: q(0.5),
                p99_ms: q(0.99),
            };
            let points = inner.points.entry(cluster.clone()).or_default();
            if points.len() == POINTS {
                points.pop_front();
            }
            points.push_back(point);
            seen.push(cluster);
        }
        // Clusters that left take their history with them.
        inner.points.retain(|c, _| seen.contains(c));
        inner.last.retain(|c, _| seen.contains(c));
    }

    /// Every cluster's points, oldest first.
    pub fn points(&self) -> HashMap<String, Vec<Point>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .points
            .iter()
            .map(|(c, p)| (c.clone(), p.iter().copied().collect()))
            .collect()
    }
}

/// The `q` quantile of `n` observations whose cumulative counts per bucket (upper bounds
/// `bounds`; a last `+Inf` bucket is implied) are `cumulative`: linear within the bucket, the
/// highest finite bound for the `+Inf` bucket.
fn quantile(q: f64, bounds: &[f64], cumulative: &[u64], n: u64) -> Option<f64> {
    if n == 0 {
        return None;
    }
    let rank = q * n as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for (bound, &count) in bounds.iter().zip(cumulative) {
        if count as f64 >= rank {
            let inside = count.saturating_sub(below);
            if inside == 0 {
                return Some(*bound);
            }
            return Some(lower + (bound - lower) * (rank - below as f64) / inside as f64);
        }
        lower = *bound;
        below = count;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let bounds = [0.01, 0.1, 1.0];
        // 50 under 10 ms, 40 between 10 and 100 ms, 10 between 0.1 and 1 s.
        let cumulative = [50, 90, 100];
        assert_eq!(quantile(0.5, &bounds, &cumulative, 100), Some(0.01));
        let p99 = quantile(0.99, &bounds, &cumulative, 100).unwrap();
        assert!((p99 - 0.91).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &bounds, &[0, 0, 0], 0), None);
        // Beyond the last bound: that bound.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0], 10), Some(1.0));
    }
}
