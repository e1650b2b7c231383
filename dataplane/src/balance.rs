//! Endpoint choice per request.
//!
//! Eligible endpoints are healthy and not ejected. When a cluster has none, the balancer fails
//! open (ALB's and Envoy's panic mode) to the endpoints that have passed a health check at least
//! once since they were added: a fleet whose checks all fail at once more likely has a broken
//! check than no working instance. Endpoints that never passed a check get no traffic, so a
//! freshly launched fleet answers 503 until it is ready rather than 502 from closed ports.
//!
//! Two guards keep latency-aware choices from herding: **slow start** divides a new or
//! recovered endpoint's attractiveness by its ramp (10 % at first, 100 % after `slow_start`),
//! and the **share cap** skips an endpoint whose in-flight count would exceed `max_share` times
//! its fair share of the cluster's in-flight requests (at least 2).
//!
//! Each pick reads every endpoint's eligibility once, into a bit set ([`Admitted`]), and
//! chooses from that snapshot: another proxy thread changing an endpoint's health meanwhile can
//! change the choice, never make it fail. Nothing here locks, and nothing allocates for a
//! cluster of up to 256 endpoints.

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
    /// Outside the proxy's zone, although the cluster has endpoints in it.
    pub cross_zone: bool,
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

/// Fraction of full weight a new or recovered endpoint has, from 0.1 up to 1 over `slow_start`.
fn ramp(e: &Endpoint, now: u64, slow_start_ns: u64) -> f64 {
    if slow_start_ns == 0 {
        return 1.0;
    }
    let age = now.saturating_sub(e.state.healthy_since.load(Relaxed));
    if age >= slow_start_ns {
        1.0
    } else {
        (age as f64 / slow_start_ns as f64).max(0.1)
    }
}

/// Added to every latency estimate before it is weighed: differences well below it count for
/// little. Idle endpoints are estimated by their health checks' round trips, a fraction of a
/// millisecond apart from scheduling noise alone; weighed raw, a 0.2 ms endpoint looks three
/// times better than an identical 0.6 ms one and is given three times the requests in flight
/// when a burst arrives before any answer could correct it. With this, identical endpoints
/// share a burst evenly, while a 40 ms endpoint still costs six times a 2 ms one.
pub(crate) const LATENCY_RESOLUTION_NS: f64 = 5_000_000.0;

/// Cost of sending one more request to `e` under peak-EWMA: (latency + resolution) x
/// (in-flight + 1), divided by the slow-start ramp. Lower wins.
pub(crate) fn cost(c: &Cluster, e: &Endpoint, now: u64) -> f64 {
    cost_at(c, e, estimate(c, e, now), now)
}

/// `cost` with the endpoint's estimate already read (it costs an `exp`).
fn cost_at(c: &Cluster, e: &Endpoint, estimate: f64, now: u64) -> f64 {
    (estimate + LATENCY_RESOLUTION_NS) * f64::from(e.state.inflight() + 1)
        / ramp(e, now, c.balancing.slow_start.as_nanos() as u64)
}

fn estimate(c: &Cluster, e: &Endpoint, now: u64) -> f64 {
    e.state
        .estimate_ns(now, c.balancing.decay.as_nanos() as f64)
}

/// Two latency estimates this close count as the same: within `SAME_LATENCY_NS` of each
/// other, or within `SAME_LATENCY_RATIO` times. A health check that happened to answer a
/// millisecond late, or the queueing peaks of the last burst (hundreds of milliseconds,
/// differing by a fifth between identical instances), are not a reason to load one identical
/// instance more than another; a 2 ms instance against a 3 ms one, or a t2.micro against a
/// t2.large, still differ.
pub(crate) const SAME_LATENCY_NS: f64 = 2_000_000.0;
/// See [`SAME_LATENCY_NS`].
pub(crate) const SAME_LATENCY_RATIO: f64 = 1.3;

/// Of `a` and `b`, whether `a` is the better choice under peak-EWMA. Equally fast (see
/// [`SAME_LATENCY_NS`]): fewer requests in flight wins, as with nginx's least_conn, each count
/// divided by the slow-start ramp (so a new endpoint still ramps up). Otherwise the lower
/// cost. An endpoint in the middle of failing is never taken as equally fast: its estimate
/// carries the failure penalty, and its empty queue must not attract traffic.
fn ewma_prefers(c: &Cluster, a: &Endpoint, b: &Endpoint, now: u64) -> bool {
    let (ea, eb) = (estimate(c, a, now), estimate(c, b, now));
    if same_latency(ea, eb) && !a.state.failing() && !b.state.failing() {
        let slow_start = c.balancing.slow_start.as_nanos() as u64;
        let load = |e: &Endpoint| f64::from(e.state.inflight() + 1) / ramp(e, now, slow_start);
        load(a) <= load(b)
    } else {
        cost_at(c, a, ea, now) <= cost_at(c, b, eb, now)
    }
}

/// Whether two latency estimates count as the same (see [`SAME_LATENCY_NS`]).
fn same_latency(ea: f64, eb: f64) -> bool {
    (ea - eb).abs() <= SAME_LATENCY_NS || ea.max(eb) <= SAME_LATENCY_RATIO * ea.min(eb)
}

/// Whether some endpoint of `cluster` can take a request without panic mode (healthy, not
/// ejected): a cluster without one drops out of a weighted split.
pub(crate) fn admits_any(cluster: &Cluster, now: u64) -> bool {
    cluster
        .endpoints
        .iter()
        .any(|e| admitted(Mode::Normal, e, now, None))
}

/// Chooses an endpoint of `cluster` for one request, never `avoid` (the endpoint that just
/// failed this request). `None` when no endpoint can take it.
pub(crate) fn pick<'a>(
    cluster: &'a Cluster,
    now: u64,
    avoid: Option<&Endpoint>,
) -> Option<Pick<'a>> {
    let eps = &cluster.endpoints;
    let mut mode = Mode::Normal;
    let mut admitted = Admitted::read(eps, mode, now, avoid);
    if admitted.n == 0 {
        mode = Mode::Panic;
        admitted = Admitted::read(eps, mode, now, avoid);
        if admitted.n == 0 {
            return None;
        }
    }
    let n = admitted.n;
    let cap = (cluster.balancing.max_share * f64::from(cluster.inflight() + 1) / n as f64).max(2.0);
    let over = |e: &Endpoint| f64::from(e.state.inflight() + 1) > cap;
    // Of two candidates, the better unless it is over the cap and the other is not.
    let choose = |a: &'a Arc<Endpoint>, b: &'a Arc<Endpoint>, a_better: bool| {
        let (first, second) = if a_better { (a, b) } else { (b, a) };
        if over(first) && !over(second) {
            second
        } else {
            first
        }
    };
    // The policy's choice among the endpoints of `set`.
    let choose_in = |set: &Admitted| -> Option<&'a Arc<Endpoint>> {
        let n = set.n;
        let nth = |i: usize| &eps[set.nth(i)];
        Some(if n == 1 {
            nth(0)
        } else {
            match cluster.balancing.policy {
                Policy::PeakEwma => {
                    let (a, b) = two_distinct(n);
                    let (a, b) = (nth(a), nth(b));
                    choose(a, b, ewma_prefers(cluster, a, b, now))
                }
                Policy::LeastRequest => {
                    let (a, b) = two_distinct(n);
                    let (a, b) = (nth(a), nth(b));
                    choose(a, b, a.state.inflight() <= b.state.inflight())
                }
                Policy::LowestLatency => {
                    let decay = cluster.balancing.decay.as_nanos() as f64;
                    let est = |e: &Endpoint| e.state.estimate_ns(now, decay);
                    let candidates = || set.iter().map(|i| &eps[i]);
                    candidates()
                        .filter(|e| !over(e))
                        .min_by(|a, b| est(a).total_cmp(&est(b)))
                        .or_else(|| candidates().min_by(|a, b| est(a).total_cmp(&est(b))))?
                }
                Policy::RoundRobin => nth(cluster.rr.fetch_add(1, Relaxed) % n),
            }
        })
    };
    let zones = (cluster.zone_aware && matches!(mode, Mode::Normal))
        .then(|| admitted.split(eps, |e| e.local))
        .filter(|(local, remote)| local.n > 0 && remote.n > 0);
    let endpoint = if let Some((local, remote)) = zones {
        // Zone-aware (Envoy's): the choice among the healthy endpoints of the proxy's zone,
        // unless it is overloaded or clearly slower than one endpoint of
        // another zone drawn at random: not the same latency by the rules for any two
        // candidates, and more than `LATENCY_RESOLUTION_NS` apart (an idle endpoint's estimate
        // is its health check's round trip, below what a request takes anywhere).
        let home = choose_in(&local)?;
        let away = &eps[remote.nth(fastrand::usize(..remote.n))];
        let slower = cluster.balancing.policy == Policy::PeakEwma && {
            let (eh, ea) = (estimate(cluster, home, now), estimate(cluster, away, now));
            eh > ea + LATENCY_RESOLUTION_NS
                && !same_latency(eh, ea)
                && cost_at(cluster, away, ea, now) < cost_at(cluster, home, eh, now)
        };
        // Overloaded: over its share cap and more than twice as busy as the other candidate
        // (not a request counted in flight for the moment its answer takes to finish).
        let busy = || home.state.inflight() > 2 * (away.state.inflight() + 1);
        if (over(home) && !over(away) && busy()) || slower {
            away
        } else {
            home
        }
    } else {
        choose_in(&admitted)?
    };
    // A full endpoint (every slot taken) makes the request wait, or fail, while another may
    // have room: then the cheapest endpoint with room instead (a scan, on this rare path).
    let full = |e: &Endpoint| e.state.inflight() >= cluster.full_at;
    let endpoint = if full(endpoint) {
        admitted
            .iter()
            .map(|i| &eps[i])
            .filter(|e| !full(e))
            .min_by(|a, b| cost(cluster, a, now).total_cmp(&cost(cluster, b, now)))
            .unwrap_or(endpoint)
    } else {
        endpoint
    };
    Some(Pick {
        endpoint,
        panic: matches!(mode, Mode::Panic),
        cross_zone: cluster.zone_aware && !endpoint.local,
    })
}

/// Which endpoints (by index) could take a request, read once per pick.
struct Admitted {
    inline: [u64; 4],
    /// For clusters of more than 256 endpoints.
    heap: Vec<u64>,
    /// How many bits are set.
    n: usize,
}

impl Admitted {
    fn read(eps: &[Arc<Endpoint>], mode: Mode, now: u64, avoid: Option<&Endpoint>) -> Self {
        let mut this = Self::none(eps.len().div_ceil(64));
        for (i, e) in eps.iter().enumerate() {
            if admitted(mode, e, now, avoid) {
                this.insert(i);
            }
        }
        this
    }

    /// No endpoint, with room for `words` x 64.
    fn none(words: usize) -> Self {
        Self {
            inline: [0; 4],
            heap: if words > 4 {
                vec![0; words]
            } else {
                Vec::new()
            },
            n: 0,
        }
    }

    fn insert(&mut self, i: usize) {
        self.bits_mut()[i / 64] |= 1 << (i % 64);
        self.n += 1;
    }

    /// These endpoints split by `first`: (those passing it, the others). From this one read,
    /// so the two always add up to it.
    fn split(&self, eps: &[Arc<Endpoint>], first: impl Fn(&Endpoint) -> bool) -> (Self, Self) {
        let words = self.bits().len();
        let (mut yes, mut no) = (Self::none(words), Self::none(words));
        for i in self.iter() {
            if first(&eps[i]) {
                yes.insert(i);
            } else {
                no.insert(i);
            }
        }
        (yes, no)
    }

    fn bits(&self) -> &[u64] {
        if self.heap.is_empty() {
            &self.inline
        } else {
            &self.heap
        }
    }

    fn bits_mut(&mut self) -> &mut [u64] {
        if self.heap.is_empty() {
            &mut self.inline
        } else {
            &mut self.heap
        }
    }

    /// Index of the `k`-th admitted endpoint (`k < n`).
    fn nth(&self, mut k: usize) -> usize {
        for (w, &word) in self.bits().iter().enumerate() {
            let ones = word.count_ones() as usize;
            if k < ones {
                let mut word = word;
                for _ in 0..k {
                    word &= word - 1;
                }
                return w * 64 + word.trailing_zeros() as usize;
            }
            k -= ones;
        }
        0
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits().iter().enumerate().flat_map(|(w, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                (word != 0).then(|| {
                    let i = word.trailing_zeros() as usize;
                    word &= word - 1;
                    w * 64 + i
                })
            })
        })
    }
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
mod tests;
