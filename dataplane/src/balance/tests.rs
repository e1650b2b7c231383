use std::time::Duration;

use super::*;
use crate::metrics::Metrics;
use crate::routes::RouteConfig;

const MS: f64 = 1_000_000.0;
const SEC: u64 = 1_000_000_000;

fn endpoint(metrics: &Metrics, i: usize, probe_ms: f64, now: u64) -> Arc<Endpoint> {
    let addr = format!("127.0.0.1:{}", 9000 + i).parse().unwrap();
    let e = Endpoint::new(
        format!("i-{i}"),
        addr,
        metrics.endpoint("c", &addr.to_string()),
        0,
    );
    e.state
        .record_probe(true, (probe_ms * MS) as u64, now, 1, 2);
    Arc::new(e)
}

/// A cluster whose endpoints became healthy long ago (slow start over) with these probe RTTs.
fn cluster(policy: Policy, latencies_ms: &[f64]) -> Cluster {
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let endpoints = latencies_ms
        .iter()
        .enumerate()
        .map(|(i, l)| endpoint(&metrics, i, *l, 0))
        .collect();
    let mut route = RouteConfig::new("c", "/c", vec![]);
    route.balancing.policy = policy;
    Cluster::new(&route, endpoints, metrics.cluster("c"), Default::default())
}

const LATER: u64 = 3600 * SEC;

fn shares(c: &Cluster, picks: usize) -> Vec<usize> {
    let mut counts = vec![0; c.endpoints.len()];
    for _ in 0..picks {
        let p = pick(c, LATER, None).expect("an endpoint");
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
        c.endpoints[0].state.try_begin(u32::MAX);
    }
    let counts = shares(&c, 200);
    assert_eq!(counts[0], 0, "busy endpoint still chosen: {counts:?}");
}

#[test]
fn lowest_latency_picks_the_fastest_until_the_share_cap() {
    let c = cluster(Policy::LowestLatency, &[5.0, 1.0, 3.0]);
    assert_eq!(shares(&c, 50), vec![0, 50, 0]);
    // Pile requests onto the fastest: past 2x its fair share it stops being chosen.
    for _ in 0..6 {
        c.endpoints[1].state.try_begin(u32::MAX);
    }
    let p = pick(&c, LATER, None).unwrap();
    assert!(
        !Arc::ptr_eq(p.endpoint, &c.endpoints[1]),
        "share cap ignored"
    );
}

#[test]
fn share_cap_keeps_a_very_fast_endpoint_from_taking_everything() {
    let c = cluster(Policy::PeakEwma, &[0.1, 50.0, 50.0, 50.0]);
    // Simulate a burst: every pick stays in flight.
    let mut held = Vec::new();
    for _ in 0..40 {
        let p = pick(&c, LATER, None).unwrap();
        p.endpoint.state.try_begin(u32::MAX);
        held.push(p.endpoint.clone());
    }
    let fast = c.endpoints[0].state.inflight();
    // Fair share is 10 of 40; the cap is 2x.
    assert!(fast <= 21, "fast endpoint holds {fast} of 40 in flight");
    assert!(
        fast >= 10,
        "fast endpoint should still take the most: {fast}"
    );
}

#[test]
fn slow_start_ramps_a_new_endpoint_instead_of_flooding_it() {
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let now = LATER;
    let old: Vec<Arc<Endpoint>> = (0..3).map(|i| endpoint(&metrics, i, 5.0, 0)).collect();
    // A new endpoint whose health probe is much faster than real requests elsewhere.
    let fresh = endpoint(&metrics, 3, 0.5, now);
    let mut eps = old;
    eps.push(fresh.clone());
    let mut route = RouteConfig::new("c", "/c", vec![]);
    route.balancing.slow_start = Duration::from_secs(10);
    let c = Cluster::new(&route, eps, metrics.cluster("c"), Default::default());
    let picks_of_fresh = |t: u64| {
        (0..1000)
            .filter(|_| Arc::ptr_eq(pick(&c, t, None).unwrap().endpoint, &fresh))
            .count()
    };
    let at_join = picks_of_fresh(now);
    let after_ramp = picks_of_fresh(now + 11 * SEC);
    assert!(
        at_join < 600,
        "new endpoint flooded at join: {at_join}/1000"
    );
    assert!(
        after_ramp > at_join,
        "ramp never completed: {at_join} then {after_ramp}"
    );
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
    let p = pick(&c, LATER, None).expect("fails open");
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
    let c = Cluster::new(
        &RouteConfig::new("c", "/c", vec![]),
        vec![fresh],
        metrics.cluster("c"),
        Default::default(),
    );
    assert!(
        pick(&c, 0, None).is_none(),
        "an unproven endpoint was chosen"
    );
}

#[test]
fn a_retry_avoids_the_endpoint_that_failed() {
    let c = cluster(Policy::LowestLatency, &[1.0, 5.0]);
    let first = c.endpoints[0].clone();
    let p = pick(&c, LATER, Some(&first)).unwrap();
    assert!(Arc::ptr_eq(p.endpoint, &c.endpoints[1]));
}

#[test]
fn ejection_respects_the_budget_and_grows() {
    use crate::endpoint::EjectReason;
    use crate::outlier::try_eject;
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let c = cluster(Policy::PeakEwma, &[1.0, 1.0, 1.0, 1.0]);
    let now = LATER;
    assert!(try_eject(
        &metrics,
        &c,
        &c.endpoints[0],
        now,
        EjectReason::Latency,
        None
    ));
    assert!(try_eject(
        &metrics,
        &c,
        &c.endpoints[1],
        now,
        EjectReason::Latency,
        None
    ));
    assert!(
        !try_eject(
            &metrics,
            &c,
            &c.endpoints[2],
            now,
            EjectReason::Latency,
            None
        ),
        "more than 50 % ejected"
    );
    let (_, until) = c.endpoints[0].state.ejection(now).unwrap();
    assert_eq!(until - now, 30 * SEC);
    // After it returns, the next ejection lasts twice as long.
    let back = until + 1;
    assert!(c.endpoints[0].state.is_eligible(back));
    assert!(try_eject(
        &metrics,
        &c,
        &c.endpoints[0],
        back,
        EjectReason::ConsecutiveFailures,
        None
    ));
    let (_, until2) = c.endpoints[0].state.ejection(back).unwrap();
    assert_eq!(until2 - back, 60 * SEC);
}

#[test]
fn fast_failures_make_an_endpoint_unattractive() {
    let c = cluster(Policy::PeakEwma, &[2.0, 2.0, 2.0]);
    let decay = c.balancing.decay.as_nanos() as f64;
    // Endpoint 0 answers 500 in 0.1 ms: the proxy charges the 1 s penalty instead.
    c.endpoints[0].state.observe(1000.0 * MS, LATER, decay);
    let counts = shares(&c, 1000);
    assert!(counts[0] < 20, "fast-failing endpoint got {counts:?}");
}

#[test]
fn latency_outliers_are_ejected_on_mean_latency_not_spikes() {
    use crate::outlier::sweep_latency;
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let c = cluster(Policy::PeakEwma, &[1.0, 1.0, 1.0, 1.0]);
    for (i, e) in c.endpoints.iter().enumerate() {
        for k in 0..10 {
            // Fast endpoints have one big spike each; endpoint 3 is steadily slow.
            let secs = match (i, k) {
                (3, _) => 0.040,
                (_, 0) => 0.030,
                _ => 0.002,
            };
            e.metrics.upstream_duration.observe(secs);
        }
    }
    sweep_latency(&metrics, &c, LATER);
    let ejected: Vec<bool> = c
        .endpoints
        .iter()
        .map(|e| e.state.is_ejected(LATER))
        .collect();
    assert_eq!(ejected, vec![false, false, false, true]);
}

#[test]
fn eligibility_changing_on_other_threads_never_fails_a_pick() {
    use std::sync::atomic::AtomicBool;
    for policy in [
        Policy::PeakEwma,
        Policy::LeastRequest,
        Policy::LowestLatency,
        Policy::RoundRobin,
    ] {
        // Endpoint 0 is always eligible; the others come and go on another thread.
        let c = Arc::new(cluster(policy, &[2.0; 8]));
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    for e in &c.endpoints[1..] {
                        e.state.mark_down();
                    }
                    for e in &c.endpoints[1..] {
                        e.state.success(LATER, 1);
                    }
                }
            })
        };
        let pickers: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..200_000)
                        .filter(|_| pick(&c, LATER, None).is_none())
                        .count()
                })
            })
            .collect();
        let failed: usize = pickers.into_iter().map(|t| t.join().unwrap()).sum();
        stop.store(true, Relaxed);
        flipper.join().unwrap();
        assert_eq!(failed, 0, "{policy:?}: picks that found no endpoint");
    }
}

#[test]
fn concurrent_ejections_never_exceed_the_budget() {
    use crate::endpoint::EjectReason;
    use crate::outlier::try_eject;
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    for trial in 0..500 {
        // 8 endpoints, 50 %: at most 4 ejected, however many threads decide at once.
        let c = Arc::new(cluster(Policy::PeakEwma, &[1.0; 8]));
        let start = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (c, start, metrics) = (c.clone(), start.clone(), metrics.clone());
                std::thread::spawn(move || {
                    start.wait();
                    try_eject(
                        &metrics,
                        &c,
                        &c.endpoints[i],
                        LATER,
                        EjectReason::ConsecutiveFailures,
                        None,
                    )
                })
            })
            .collect();
        let ejected = threads
            .into_iter()
            .filter(|_| true)
            .map(|t| t.join().unwrap())
            .filter(|&e| e)
            .count();
        let actually = c
            .endpoints
            .iter()
            .filter(|e| e.state.is_ejected(LATER))
            .count();
        assert_eq!(ejected, actually);
        assert!(actually <= 4, "trial {trial}: {actually} of 8 ejected");
    }
}

#[test]
fn clusters_beyond_the_inline_snapshot_are_picked_from_whole() {
    // 300 endpoints: the eligibility snapshot spills to the heap; round robin still visits
    // every one, and only eligible ones.
    let c = cluster(Policy::RoundRobin, &[1.0; 300]);
    c.endpoints[299].state.mark_down();
    let counts = shares(&c, 299 * 2);
    assert!(counts[..299].iter().all(|&n| n == 2), "{counts:?}");
    assert_eq!(counts[299], 0);
}

#[test]
fn identical_endpoints_share_a_burst_evenly_despite_probe_noise() {
    // Four identical instances whose health checks happened to answer 0.2 to 0.6 ms apart; a
    // burst of 1000 requests arrives before any answer comes back.
    let c = cluster(Policy::PeakEwma, &[0.2, 0.3, 0.45, 0.6]);
    for _ in 0..1000 {
        let p = pick(&c, LATER, None).expect("an endpoint");
        p.endpoint.state.try_begin(u32::MAX);
    }
    let shares: Vec<f64> = c
        .endpoints
        .iter()
        .map(|e| f64::from(e.state.inflight()) / 1000.0)
        .collect();
    assert!(
        shares.iter().all(|s| (0.2..=0.3).contains(s)),
        "shares {shares:?}"
    );
}

#[test]
fn a_slow_endpoint_still_gets_little_of_a_burst() {
    let c = cluster(Policy::PeakEwma, &[2.0, 2.0, 2.0, 40.0]);
    for _ in 0..1000 {
        pick(&c, LATER, None)
            .unwrap()
            .endpoint
            .state
            .try_begin(u32::MAX);
    }
    let slow = c.endpoints[3].state.inflight();
    assert!(slow < 100, "the 40 ms endpoint holds {slow} of 1000");
}

#[test]
fn latencies_from_the_last_burst_do_not_skew_the_next() {
    // Identical instances whose estimates still carry the previous burst's queueing peaks,
    // 250 to 320 ms (within 1.5x of each other): the next burst is split by requests in
    // flight, evenly, as least_conn would.
    let c = cluster(Policy::PeakEwma, &[1.0, 1.0, 1.0, 1.0]);
    let decay = c.balancing.decay.as_nanos() as f64;
    for (e, peak) in c.endpoints.iter().zip([250.0, 320.0, 280.0, 300.0]) {
        e.state.observe(peak * MS, LATER, decay);
    }
    for _ in 0..1000 {
        pick(&c, LATER, None)
            .unwrap()
            .endpoint
            .state
            .try_begin(u32::MAX);
    }
    let held: Vec<u32> = c.endpoints.iter().map(|e| e.state.inflight()).collect();
    assert!(held.iter().all(|&n| (240..=260).contains(&n)), "{held:?}");
}

#[test]
fn an_equally_fast_new_endpoint_still_ramps_up() {
    // Three endpoints long healthy and one at half of its slow start, all equally fast: the
    // new one is given about half of what the others hold, not an equal share at once.
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let old: Vec<_> = (0..3).map(|i| endpoint(&metrics, i, 1.0, 0)).collect();
    let start = LATER - 2_500_000_000; // healthy 2.5 s before LATER, of a 5 s slow start
    let new = endpoint(&metrics, 3, 1.0, start);
    let mut route = RouteConfig::new("c", "/c", vec![]);
    route.balancing.slow_start = Duration::from_secs(5);
    let mut eps = old;
    eps.push(new);
    let c = Cluster::new(&route, eps, metrics.cluster("c"), Default::default());
    for _ in 0..1000 {
        pick(&c, LATER, None)
            .unwrap()
            .endpoint
            .state
            .try_begin(u32::MAX);
    }
    let held: Vec<u32> = c.endpoints.iter().map(|e| e.state.inflight()).collect();
    let old_mean = f64::from(held[0] + held[1] + held[2]) / 3.0;
    let ratio = f64::from(held[3]) / old_mean;
    assert!((0.35..=0.65).contains(&ratio), "{held:?}");
}

#[test]
fn an_endpoint_in_the_middle_of_failing_is_never_taken_as_equally_fast() {
    // A slow cluster (800 ms) and an endpoint that just failed (its 1 s penalty is within
    // 1.3x): its empty queue must not win it every pair, as an equal would.
    let c = cluster(Policy::PeakEwma, &[800.0, 800.0]);
    let decay = c.balancing.decay.as_nanos() as f64;
    c.endpoints[0].state.observe(1000.0 * MS, LATER, decay);
    c.endpoints[0].state.request_failed();
    let counts = shares(&c, 1000);
    assert_eq!(counts[0], 0, "{counts:?}");
}

#[test]
fn a_full_endpoint_is_passed_over_while_another_has_room() {
    // Three endpoints with every slot taken (by clients that hold their calls open), one with
    // room: every pick goes to the one with room, whatever two the draw compared.
    for policy in [Policy::PeakEwma, Policy::LeastRequest, Policy::RoundRobin] {
        let mut c = cluster(policy, &[2.0, 2.0, 2.0, 2.0]);
        c.full_at = 8;
        for e in &c.endpoints[..3] {
            for _ in 0..8 {
                e.state.try_begin(u32::MAX);
            }
        }
        for _ in 0..5 {
            c.endpoints[3].state.try_begin(u32::MAX);
        }
        assert_eq!(shares(&c, 400), [0, 0, 0, 400], "{policy:?}");
    }
}
