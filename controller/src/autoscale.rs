//! The autoscaling decision (issue #16), pure: from the load the proxies measured for one
//! cluster, how many instances it should have. Knative's KPA, with HPA's tolerance band:
//!
//! - **Signal**: requests in flight to the cluster's instances (and, when a rate target is set,
//!   requests per second), sampled about once a second; per-instance load divided by the target
//!   gives the instances needed (Little's law ties in-flight to rate x latency).
//! - **Stable window** (60 s): the average over it decides in steady state; within 10 % of the
//!   current count's capacity nothing changes, so noise around the target never moves it.
//! - **Panic window** (6 s): when its average asks for at least twice the current count, the
//!   autoscaler panics: it scales up to the panic value at once and never down while panicking;
//!   panic ends one stable window after the last panic-level reading.
//! - **Scale-down delay**: the count only goes down to the highest recommendation of the delay
//!   (default 60 s), so a lull shorter than that changes nothing.
//! - **Rates**: at most `maxScaleUpRate` x the current count up per decision, and at most half
//!   of it down; always within [`minReplicas`, `maxReplicas`].
//!
//! Time is whatever the caller says (`Duration` since any origin): tests need no clock.

use std::collections::VecDeque;
use std::time::Duration;

/// The settings of one cluster's autoscaler.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Fewest instances.
    pub min: u32,
    /// Most instances.
    pub max: u32,
    /// Requests in flight one instance should carry.
    pub target_inflight: f64,
    /// Requests per second one instance should carry (optional second signal: the larger need
    /// wins).
    pub target_rps: Option<f64>,
    /// The stable window (default 60 s).
    pub stable_window: Duration,
    /// The panic window (default 6 s).
    pub panic_window: Duration,
    /// Panic when the panic window asks for this many times the current count (default 2).
    pub panic_threshold: f64,
    /// The scale-down delay (default 60 s).
    pub scale_down_delay: Duration,
    /// Most growth per decision, as a factor of the current count (default 10).
    pub max_scale_up_rate: f64,
    /// Most shrinkage per decision, as a divisor of the current count (default 2).
    pub max_scale_down_rate: f64,
    /// No change while the load is within this fraction of the current capacity (default 0.1).
    pub tolerance: f64,
}

impl Policy {
    /// The policy `spec.autoscaling` asks for, within `bounds` (see
    /// [`crate::reconcile::autoscaling_bounds`]).
    pub fn of(a: &fleetlb_crds::Autoscaling, bounds: (u32, u32)) -> Self {
        let stable = Duration::from_secs(u64::from(a.stable_window_seconds.max(6)));
        Self {
            target_rps: a.target_requests_per_second_per_instance.map(f64::from),
            stable_window: stable,
            // A tenth of the stable window, but at least two readings' worth.
            panic_window: (stable / 10).max(Duration::from_secs(2)),
            scale_down_delay: Duration::from_secs(u64::from(a.scale_down_delay_seconds)),
            max_scale_up_rate: f64::from(a.max_scale_up_rate.max(1)),
            ..Self::new(
                bounds.0,
                bounds.1,
                f64::from(a.target_inflight_per_instance.max(1)),
            )
        }
    }

    /// The defaults around `min`, `max` and an in-flight target.
    pub fn new(min: u32, max: u32, target_inflight: f64) -> Self {
        Self {
            min,
            max: max.max(min),
            target_inflight,
            target_rps: None,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            scale_down_delay: Duration::from_secs(60),
            max_scale_up_rate: 10.0,
            max_scale_down_rate: 2.0,
            tolerance: 0.1,
        }
    }
}

/// One reading of a cluster's load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// When.
    pub at: Duration,
    /// Requests in flight.
    pub inflight: f64,
    /// Requests per second since the previous reading.
    pub rps: f64,
    /// Every proxy's share is in it; an incomplete reading (a peer proxy did not answer) may
    /// scale up but never down.
    pub complete: bool,
}

/// What the autoscaler decided, and from what (for status, Events, metrics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The instance count to have.
    pub desired: u32,
    /// Average requests in flight per current instance over the stable window.
    pub inflight_per_instance: f64,
    /// Average requests per second per current instance over the stable window.
    pub rps_per_instance: f64,
    /// Whether the panic window rules.
    pub panic: bool,
}

/// One cluster's autoscaler state: recent samples and recommendations.
#[derive(Debug, Default)]
pub struct Autoscaler {
    samples: VecDeque<Sample>,
    recommendations: VecDeque<(Duration, u32)>,
    panic_until: Option<Duration>,
    panic_floor: u32,
}

impl Autoscaler {
    /// Records a reading; readings older than `keep` are dropped (the longest stable window
    /// that may ask for them).
    pub fn record(&mut self, s: Sample, keep: Duration) {
        self.samples.push_back(s);
        while self
            .samples
            .front()
            .is_some_and(|f| s.at.saturating_sub(f.at) > keep)
        {
            self.samples.pop_front();
        }
    }

    /// Average (in flight, rps) over the samples within `window` of `now`, if any.
    fn average(&self, now: Duration, window: Duration) -> Option<(f64, f64)> {
        let (mut n, mut inflight, mut rps) = (0.0, 0.0, 0.0);
        for s in self
            .samples
            .iter()
            .filter(|s| now.saturating_sub(s.at) <= window)
        {
            n += 1.0;
            inflight += s.inflight;
            rps += s.rps;
        }
        (n > 0.0).then(|| (inflight / n, rps / n))
    }

    /// Instances needed for a load of (in flight, rps).
    fn needed(load: (f64, f64), policy: &Policy) -> f64 {
        let by_inflight = load.0 / policy.target_inflight.max(f64::MIN_POSITIVE);
        let by_rps = policy
            .target_rps
            .map_or(0.0, |t| load.1 / t.max(f64::MIN_POSITIVE));
        by_inflight.max(by_rps)
    }

    /// The count to have at `now`, given `current` instances (those counted toward replicas).
    pub fn decide(&mut self, now: Duration, current: u32, policy: &Policy) -> Decision {
        let current_f = f64::from(current.max(1));
        let stable = self
            .average(now, policy.stable_window)
            .unwrap_or((0.0, 0.0));
        let panic_load = self.average(now, policy.panic_window).unwrap_or(stable);
        let up_limit = (current_f * policy.max_scale_up_rate).ceil().max(1.0);
        let down_limit = (f64::from(current) / policy.max_scale_down_rate).floor();
        let clamp_rate = |n: f64| n.clamp(down_limit, up_limit);

        let need_stable = Self::needed(stable, policy);
        let need_panic = Self::needed(panic_load, policy);
        // HPA's tolerance: close enough to the current capacity is no change; so is a stable
        // window holding under a sixth of its span of readings (too few to tell noise from load;
        // the panic window still acts).
        let ratio = need_stable / current_f;
        let warm = self
            .samples
            .front()
            .is_some_and(|f| now.saturating_sub(f.at) >= policy.stable_window / 6);
        let stable_desired = if current > 0 && (!warm || (ratio - 1.0).abs() <= policy.tolerance) {
            current
        } else {
            clamp_rate(need_stable.ceil()) as u32
        };
        let panic_desired = clamp_rate(need_panic.ceil()) as u32;

        if current > 0 && need_panic / current_f >= policy.panic_threshold {
            self.panic_until = Some(now + policy.stable_window);
        }
        let panicking = self.panic_until.is_some_and(|until| now < until);
        let mut desired = if panicking {
            // Up only while panicking.
            self.panic_floor = self.panic_floor.max(panic_desired).max(current);
            self.panic_floor.max(stable_desired)
        } else {
            self.panic_until = None;
            self.panic_floor = 0;
            stable_desired
        };
        desired = desired.clamp(policy.min, policy.max);

        // A reading lacking a proxy's share understates the load: no scale-down on it.
        let incomplete = self
            .samples
            .iter()
            .any(|s| !s.complete && now.saturating_sub(s.at) <= policy.stable_window);
        if incomplete && desired < current {
            // Recorded as such: the understated count must not lower the delay's hold later.
            desired = current;
        }
        // Scale down only to the highest recommendation of the delay. A fresh autoscaler (a
        // restart, a new leader) counts the current count as recommended now: the delay runs
        // from its first decision.
        if self.recommendations.is_empty() {
            self.recommendations.push_back((now, current));
        }
        self.recommendations.push_back((now, desired));
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > policy.scale_down_delay)
        {
            self.recommendations.pop_front();
        }
        if desired < current {
            let held = self
                .recommendations
                .iter()
                .map(|(_, d)| *d)
                .max()
                .unwrap_or(desired);
            desired = held.min(current).max(desired);
        }
        Decision {
            desired: desired.clamp(policy.min, policy.max),
            inflight_per_instance: stable.0 / current_f,
            rps_per_instance: stable.1 / current_f,
            panic: panicking,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    /// Runs `secs` one-second steps of load `f(t)` (in flight) against a fleet that follows every
    /// decision at once; returns the count after each step.
    fn run(
        a: &mut Autoscaler,
        policy: &Policy,
        start: Duration,
        secs: u64,
        count: &mut u32,
        f: impl Fn(u64) -> f64,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        for t in 0..secs {
            let at = start + SEC * t as u32;
            a.record(
                Sample {
                    at,
                    inflight: f(t),
                    rps: 0.0,
                    complete: true,
                },
                policy.stable_window,
            );
            *count = a.decide(at, *count, policy).desired;
            out.push(*count);
        }
        out
    }

    #[test]
    fn steady_load_at_target_holds_the_count() {
        let p = Policy::new(2, 12, 8.0);
        let mut a = Autoscaler::default();
        let mut n = 4;
        let counts = run(&mut a, &p, Duration::ZERO, 300, &mut n, |_| 32.0);
        assert!(counts.iter().all(|c| *c == 4), "{counts:?}");
    }

    #[test]
    fn noise_of_twenty_percent_around_target_never_changes_the_count() {
        let p = Policy::new(2, 12, 8.0);
        let mut a = Autoscaler::default();
        let mut n = 4;
        let mut rng = fastrand::Rng::with_seed(16);
        let noise: Vec<f64> = (0..600).map(|_| 32.0 * (0.8 + 0.4 * rng.f64())).collect();
        let counts = run(&mut a, &p, Duration::ZERO, 600, &mut n, |t| {
            noise[t as usize]
        });
        assert!(counts.iter().all(|c| *c == 4), "{counts:?}");
    }

    #[test]
    fn a_fivefold_jump_scales_up_within_the_panic_window() {
        let p = Policy::new(2, 40, 8.0);
        let mut a = Autoscaler::default();
        let mut n = 4;
        run(&mut a, &p, Duration::ZERO, 120, &mut n, |_| 32.0);
        assert_eq!(n, 4);
        // Readings at 120 s .. 126 s: the whole 6 s panic window at the new load.
        let counts = run(&mut a, &p, SEC * 120, 7, &mut n, |_| 160.0);
        assert_eq!(
            counts.last(),
            Some(&20),
            "5x load reached 20 instances within the 6 s panic window: {counts:?}"
        );
        assert!(
            counts[1] > 4,
            "the second reading already scales up: {counts:?}"
        );
        let d = a.decide(SEC * 127, n, &p);
        assert!(d.panic);
    }

    #[test]
    fn load_gone_scales_down_only_after_the_delay_and_to_min() {
        let p = Policy::new(2, 12, 8.0);
        let mut a = Autoscaler::default();
        let mut n = 8;
        run(&mut a, &p, Duration::ZERO, 120, &mut n, |_| 64.0);
        assert_eq!(n, 8);
        let counts = run(&mut a, &p, SEC * 120, 300, &mut n, |_| 0.0);
        let first_drop = counts.iter().position(|c| *c < 8).unwrap();
        assert!(
            first_drop >= 59,
            "scaled down after {first_drop} s, before the 60 s delay: {counts:?}"
        );
        assert_eq!(n, 2, "back to minReplicas: {counts:?}");
        // Never below the floor, however long it stays idle.
        assert!(counts.iter().all(|c| *c >= 2));
    }

    #[test]
    fn a_reading_missing_a_proxy_never_scales_down_but_may_scale_up() {
        let p = Policy::new(1, 12, 8.0);
        let mut a = Autoscaler::default();
        let mut n = 8;
        run(&mut a, &p, Duration::ZERO, 120, &mut n, |_| 64.0);
        // A peer stops answering: the sum drops to this proxy's share (a quarter), and keeps
        // being incomplete; the count holds well past the delay.
        let mut counts = Vec::new();
        for t in 120..400u32 {
            let sample = Sample {
                at: SEC * t,
                inflight: if t < 300 { 16.0 } else { 200.0 },
                rps: 0.0,
                complete: false,
            };
            a.record(sample, p.stable_window);
            n = a.decide(SEC * t, n, &p).desired;
            counts.push(n);
        }
        assert!(counts[..180].iter().all(|c| *c == 8), "{counts:?}");
        // Even incomplete, a load above the fleet scales it up.
        assert_eq!(n, 12, "{counts:?}");
        // Complete again at the low load: down after the delay.
        let counts = run(&mut a, &p, SEC * 400, 400, &mut n, |_| 16.0);
        assert_eq!(n, 2, "{counts:?}");
    }

    #[test]
    fn a_fresh_autoscaler_waits_the_delay_before_scaling_down() {
        // A new leader (or a restart) has readings but has decided nothing yet.
        let p = Policy::new(1, 12, 8.0);
        let mut a = Autoscaler::default();
        for t in 0..120u32 {
            let idle = Sample {
                at: SEC * t,
                inflight: 0.0,
                rps: 0.0,
                complete: true,
            };
            a.record(idle, p.stable_window);
        }
        let mut n = 8;
        let counts = run(&mut a, &p, SEC * 120, 90, &mut n, |_| 0.0);
        let first_drop = counts.iter().position(|c| *c < 8).unwrap();
        assert!(
            first_drop >= 59,
            "scaled down after {first_drop} s: {counts:?}"
        );
    }

    #[test]
    fn panic_ends_and_the_count_comes_back_down() {
        let p = Policy::new(2, 40, 8.0);
        let mut a = Autoscaler::default();
        let mut n = 4;
        run(&mut a, &p, Duration::ZERO, 60, &mut n, |_| 32.0);
        run(&mut a, &p, SEC * 60, 10, &mut n, |_| 160.0);
        assert_eq!(n, 20);
        assert!(a.decide(SEC * 70, n, &p).panic);
        // Back at the old load: panic ends a stable window later, then the delay, then down.
        let counts = run(&mut a, &p, SEC * 71, 300, &mut n, |_| 32.0);
        assert!(!a.decide(SEC * 371, n, &p).panic);
        assert_eq!(n, 4, "{counts:?}");
    }

    #[test]
    fn min_max_and_rates_are_respected() {
        let mut p = Policy::new(3, 10, 1.0);
        p.max_scale_up_rate = 2.0;
        let mut a = Autoscaler::default();
        let mut n = 3;
        // 1000 in flight: the rate limit doubles per decision, the ceiling stops at 10.
        let counts = run(&mut a, &p, Duration::ZERO, 5, &mut n, |_| 1000.0);
        assert_eq!(counts, vec![6, 10, 10, 10, 10]);
        // Idle: down by at most half per decision (after the delay), never under 3.
        let mut p2 = p.clone();
        p2.scale_down_delay = Duration::ZERO;
        let counts = run(&mut a, &p2, SEC * 200, 200, &mut n, |_| 0.0);
        let drops: Vec<u32> = counts
            .windows(2)
            .filter(|w| w[1] < w[0])
            .map(|w| w[0] - w[1])
            .collect();
        assert!(drops.iter().all(|d| *d <= 5), "{counts:?}");
        assert_eq!(n, 3);
    }

    #[test]
    fn the_rate_target_scales_too() {
        let mut p = Policy::new(1, 20, 100.0);
        p.target_rps = Some(50.0);
        let mut a = Autoscaler::default();
        let mut n = 2;
        for t in 0..90u32 {
            let at = SEC * t;
            a.record(
                Sample {
                    at,
                    inflight: 1.0,
                    rps: 500.0,
                    complete: true,
                },
                p.stable_window,
            );
            n = a.decide(at, n, &p).desired;
        }
        assert_eq!(n, 10, "500 req/s at 50 per instance");
    }
}
