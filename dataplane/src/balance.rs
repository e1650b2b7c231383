//! Endpoint choice per request.
//!
//! Eligible endpoints are healthy and not ejected. When a cluster has none, the balancer fails
//! open (ALB's and Envoy's panic mode) to the endpoints that have passed a health check at least
//! once since they were added: a fleet whose checks all fail at once more likely has a broken
//! check than no working instance. Endpoints that never passed a check get no traffic, so a
//! freshly launched fleet answers 503 until it is ready rather than 502 from closed ports.
//!
//! Nothing here allocates or locks: eligibility is counted in a pass over the endpoints and the
//! chosen ones are found in a second pass.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::endpoint::Endpoint;
use crate::routes::Policy;
use crate::table::Cluster;

/// The balancer's answer.
pub(crate) struct Pick<'a> {
    pub endpoint: &'a Arc<Endpoint>,
    /// True when no endpoint was eligible and the pick fails open.
    pub panic: bool,
}

#[derive(Clone, Copy)]
enum Mode {
    Normal,
    Panic,
}

fn admitted(mode: Mode, e: &Endpoint, now: u64, avoid: Option<&Endpoint>) -> bool {
    if avoid.is_some_and(|a| std::ptr::eq(a, e)) {
        return false;
    }
    match mode {
        Mode::Normal => e.state.is_eligible(now),
        Mode::Panic => e.state.was_ever_healthy(),
    }
}

/// Cost of sending one more request to `e` under peak-EWMA: latency x (in-flight + 1).
pub(crate) fn cost(e: &Endpoint, now: u64, decay_ns: f64) -> f64 {
    e.state.estimate_ns(now, decay_ns) * f64::from(e.state.inflight() + 1)
}

/// Chooses an endpoint of `cluster` for one request, never `avoid` (the endpoint that just
/// failed this request). `None` when no endpoint can take it.
pub(crate) fn pick<'a>(
    cluster: &'a Cluster,
    now: u64,
    decay_ns: f64,
    avoid: Option<&Endpoint>,
) -> Option<Pick<'a>> {
    let eps = &cluster.endpoints;
    let mut mode = Mode::Normal;
    let mut n = eps.iter().filter(|e| admitted(mode, e, now, avoid)).count();
    if n == 0 {
        mode = Mode::Panic;
        n = eps.iter().filter(|e| admitted(mode, e, now, avoid)).count();
        if n == 0 {
            return None;
        }
    }
    let nth = |i: usize| eps.iter().filter(|e| admitted(mode, e, now, avoid)).nth(i);
    let endpoint = if n == 1 {
        nth(0)?
    } else {
        match cluster.policy {
            Policy::PeakEwma => {
                let (a, b) = two_distinct(n);
                let (a, b) = (nth(a)?, nth(b)?);
                if cost(a, now, decay_ns) <= cost(b, now, decay_ns) {
                    a
                } else {
                    b
                }
            }
            Policy::LeastRequest => {
                let (a, b) = two_distinct(n);
                let (a, b) = (nth(a)?, nth(b)?);
                if a.state.inflight() <= b.state.inflight() {
                    a
                } else {
                    b
                }
            }
            Policy::LowestLatency => eps
                .iter()
                .filter(|e| admitted(mode, e, now, avoid))
                .min_by(|a, b| {
                    a.state
                        .estimate_ns(now, decay_ns)
                        .total_cmp(&b.state.estimate_ns(now, decay_ns))
                })?,
            Policy::RoundRobin => nth(cluster.rr.fetch_add(1, Relaxed) % n)?,
        }
    };
    Some(Pick {
        endpoint,
        panic: matches!(mode, Mode::Panic),
    })
}

/// Two distinct uniformly random indices below `n` (n >= 2).
fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::routes::HealthConfig;
    use std::sync::atomic::AtomicUsize;

    const MS: f64 = 1_000_000.0;
    const DECAY: f64 = 10_000.0 * MS;

    fn cluster(policy: Policy, latencies_ms: &[f64]) -> Cluster {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let endpoints = latencies_ms
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let addr = format!("127.0.0.1:{}", 9000 + i).parse().unwrap();
                let e = Endpoint::new(
                    format!("i-{i}"),
                    addr,
                    metrics.endpoint("c", &addr.to_string()),
                    0,
                );
                e.state.record_probe(true, (*l * MS) as u64, 0, 1, 2);
                Arc::new(e)
            })
            .collect();
        Cluster {
            name: "c".into(),
            prefix: "/c".into(),
            policy,
            health: HealthConfig::default(),
            endpoints,
            rr: AtomicUsize::new(0),
            metrics: metrics.cluster("c"),
        }
    }

    fn shares(c: &Cluster, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; c.endpoints.len()];
        for _ in 0..picks {
            let p = pick(c, 0, DECAY, None).expect("an endpoint");
            let i = c
                .endpoints
                .iter()
                .position(|e| Arc::ptr_eq(e, p.endpoint))
                .unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn p2c_prefers_fast_endpoints_but_does_not_herd_onto_one() {
        let c = cluster(Policy::PeakEwma, &[2.0, 2.0, 2.0, 40.0]);
        let counts = shares(&c, 3000);
        assert!(counts[3] < 100, "slow endpoint got {counts:?}");
        assert!(
            counts[..3].iter().all(|&n| n > 700),
            "fast endpoints shared unevenly: {counts:?}"
        );
    }

    #[test]
    fn inflight_load_moves_traffic_off_a_busy_fast_endpoint() {
        let c = cluster(Policy::PeakEwma, &[2.0, 3.0]);
        for _ in 0..10 {
            c.endpoints[0].state.begin();
        }
        let counts = shares(&c, 200);
        assert_eq!(counts[0], 0, "busy endpoint still chosen: {counts:?}");
    }

    #[test]
    fn lowest_latency_always_picks_the_fastest() {
        let c = cluster(Policy::LowestLatency, &[5.0, 1.0, 3.0]);
        assert_eq!(shares(&c, 50), vec![0, 50, 0]);
    }

    #[test]
    fn round_robin_rotates() {
        let c = cluster(Policy::RoundRobin, &[5.0, 1.0, 3.0]);
        assert_eq!(shares(&c, 30), vec![10, 10, 10]);
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_and_panic_mode_fails_open() {
        let c = cluster(Policy::PeakEwma, &[1.0, 2.0]);
        c.endpoints[0].state.mark_down();
        assert_eq!(shares(&c, 20), vec![0, 20]);
        c.endpoints[1].state.mark_down();
        let p = pick(&c, 0, DECAY, None).expect("fails open");
        assert!(p.panic);
    }

    #[test]
    fn never_healthy_endpoints_get_nothing() {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let addr = "127.0.0.1:9000".parse().unwrap();
        let fresh = Arc::new(Endpoint::new(
            "i-new".into(),
            addr,
            metrics.endpoint("c", "a"),
            0,
        ));
        let c = Cluster {
            endpoints: vec![fresh],
            ..cluster(Policy::PeakEwma, &[])
        };
        assert!(
            pick(&c, 0, DECAY, None).is_none(),
            "an unproven endpoint was chosen"
        );
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed() {
        let c = cluster(Policy::LowestLatency, &[1.0, 5.0]);
        let first = c.endpoints[0].clone();
        let p = pick(&c, 0, DECAY, Some(&first)).unwrap();
        assert!(Arc::ptr_eq(p.endpoint, &c.endpoints[1]));
    }
}
