//! Per-endpoint live state: latency estimate, in-flight count, health, ejection.
//!
//! Everything here is atomics so the request path never takes a lock. Races between two updates
//! of the estimate lose at most one sample, which the estimator tolerates by design.
//!
//! The estimate is a **peak EWMA** (Finagle, tower, linkerd): a sample above the estimate replaces
//! it at once; lower samples pull it down with weight `1 - exp(-elapsed/decay)`. Unlike those
//! systems, an estimate that receives no traffic does not decay toward zero (which makes idle or
//! broken endpoints look free and herds traffic onto them): it decays toward the endpoint's last
//! **active probe RTT**, a measured floor.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};

use http::uri::Authority;

use crate::metrics::EndpointMetrics;

/// Estimate used when an endpoint has neither a probe nor a passive sample (linkerd's default).
pub const DEFAULT_RTT_NS: f64 = 30_000_000.0;

/// One upstream endpoint of one cluster, shared by the balancer, the prober and in-flight requests.
pub(crate) struct Endpoint {
    pub id: String,
    pub addr: SocketAddr,
    pub authority: Authority,
    pub state: EndpointState,
    pub metrics: EndpointMetrics,
    /// Idle keep-alive connections to this endpoint (see `h1`).
    pub pool: crate::h1::Pool,
    /// HTTP/2 connections to it (`HTTP2` and `GRPC` clusters, see `h2up`).
    pub h2: crate::h2up::Pool,
    /// Requests waiting for one of its connection slots (`--endpoint-max-connections`), and
    /// the signal that a slot freed.
    pub queued: AtomicU32,
    pub slot_freed: tokio::sync::Notify,
    /// Its availability zone, if known.
    pub zone: Option<String>,
    /// In the proxy's own zone (`ProxyConfig::zone`): preferred while healthy and not overloaded.
    pub local: bool,
}

impl Endpoint {
    pub fn new(id: String, addr: SocketAddr, metrics: EndpointMetrics, now: u64) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("127.0.0.1"));
        Self {
            id,
            addr,
            authority,
            state: EndpointState::new(now),
            metrics,
            pool: Default::default(),
            h2: Default::default(),
            queued: AtomicU32::new(0),
            slot_freed: tokio::sync::Notify::new(),
            zone: None,
            local: false,
        }
    }

    /// Places it in `zone`, local when that is `proxy_zone`.
    pub fn in_zone(mut self, zone: Option<String>, proxy_zone: Option<&str>) -> Self {
        self.local = zone.is_some() && zone.as_deref() == proxy_zone;
        self.zone = zone;
        self
    }
}

/// Atomic state of one endpoint. Times are nanoseconds on the data plane's clock.
#[derive(Debug)]
pub(crate) struct EndpointState {
    inflight: AtomicU32,
    /// Of those, streams that have lived past the route's head timeout (long-lived gRPC or
    /// HTTP/2 streams): in flight for the balancer, not load for the autoscaler.
    long_lived: AtomicU32,
    est_bits: AtomicU64,
    est_at: AtomicU64,
    probe_ns: AtomicU64,
    healthy: AtomicBool,
    ever_healthy: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    ejected_until: AtomicU64,
    eject_reason: AtomicU8,
    ejections: AtomicU32,
    failure_run: AtomicU32,
    /// Requests it failed since it joined (5xx it made, broken or refused connections).
    failures: AtomicU64,
    window_sum_bits: AtomicU64,
    window_count: AtomicU64,
    window_at: AtomicU64,
    /// When the endpoint last became healthy (for slow start).
    pub healthy_since: AtomicU64,
}

/// Why an endpoint is out of rotation although its health check passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EjectReason {
    /// `consecutive_failures` failed requests in a row.
    ConsecutiveFailures = 1,
    /// Latency estimate far above the cluster's median.
    Latency = 2,
    /// The endpoint asked for it with `Retry-After` on a 429 or 503.
    RetryAfter = 3,
    /// A gRPC call refused with `UNAVAILABLE` before any answer (trailers-only): the
    /// instance saying it takes no calls now, gRPC's 503.
    Unavailable = 4,
}

impl EjectReason {
    /// Label for metrics and `/debug/endpoints`.
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::ConsecutiveFailures => "consecutive_failures",
            EjectReason::Latency => "latency",
            EjectReason::RetryAfter => "retry_after",
            EjectReason::Unavailable => "unavailable",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::ConsecutiveFailures),
            2 => Some(Self::Latency),
            3 => Some(Self::RetryAfter),
            4 => Some(Self::Unavailable),
            _ => None,
        }
    }
}

/// What a health transition did, so callers can log and count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    BecameHealthy,
    BecameUnhealthy,
}

impl EndpointState {
    pub fn new(now: u64) -> Self {
        Self {
            inflight: AtomicU32::new(0),
            long_lived: AtomicU32::new(0),
            est_bits: AtomicU64::new(0f64.to_bits()),
            est_at: AtomicU64::new(now),
            probe_ns: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
            ever_healthy: AtomicBool::new(false),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            eject_reason: AtomicU8::new(0),
            ejections: AtomicU32::new(0),
            failure_run: AtomicU32::new(0),
            failures: AtomicU64::new(0),
            window_sum_bits: AtomicU64::new(0f64.to_bits()),
            window_count: AtomicU64::new(0),
            window_at: AtomicU64::new(now),
            healthy_since: AtomicU64::new(0),
        }
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Relaxed)
    }

    /// Requests in flight as the autoscaler counts load: without long-lived streams.
    pub fn load(&self) -> u32 {
        self.inflight()
            .saturating_sub(self.long_lived.load(Relaxed))
    }

    pub fn long_lived_began(&self) {
        self.long_lived.fetch_add(1, Relaxed);
    }

    pub fn long_lived_ended(&self) {
        self.long_lived.fetch_sub(1, Relaxed);
    }

    /// Counts one more request in flight unless `max` already are.
    pub fn try_begin(&self, max: u32) -> bool {
        if self.inflight.fetch_add(1, Relaxed) < max {
            return true;
        }
        self.inflight.fetch_sub(1, Relaxed);
        false
    }

    pub fn end(&self) {
        self.inflight.fetch_sub(1, Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn was_ever_healthy(&self) -> bool {
        self.ever_healthy.load(Relaxed)
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    /// Healthy and not ejected: may receive traffic in normal (non-panic) mode.
    pub fn is_eligible(&self, now: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }

    /// Takes the endpoint out of rotation until `until`; returns how many times it has been
    /// ejected, this time included.
    pub fn eject(&self, until: u64, reason: EjectReason) -> u32 {
        self.eject_reason.store(reason as u8, Relaxed);
        self.ejected_until.fetch_max(until, Relaxed);
        self.failure_run.store(0, Relaxed);
        self.ejections.fetch_add(1, Relaxed).saturating_add(1)
    }

    /// Times ejected so far (sets the next ejection's length).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Relaxed)
    }

    /// Why and until when the endpoint is ejected, if it is.
    pub fn ejection(&self, now: u64) -> Option<(EjectReason, u64)> {
        let until = self.ejected_until.load(Relaxed);
        if until <= now {
            return None;
        }
        EjectReason::from_u8(self.eject_reason.load(Relaxed)).map(|r| (r, until))
    }

    /// Mean of the latency samples (seconds) added to the running `sum`/`count` since the last
    /// call, when there were at least `min` of them, and the mean number of those requests
    /// in flight over the window (Little's law: their summed time over the window's length).
    /// Called by the outlier sweep only.
    pub fn window_mean(&self, sum: f64, count: u64, min: u64, now: u64) -> Option<(f64, f64)> {
        let prev_sum = f64::from_bits(self.window_sum_bits.swap(sum.to_bits(), Relaxed));
        let prev_count = self.window_count.swap(count, Relaxed);
        let since = self.window_at.swap(now, Relaxed);
        let n = count.checked_sub(prev_count)?;
        let length = now.saturating_sub(since) as f64 / 1e9;
        (n >= min && length > 0.0).then(|| {
            let busy = sum - prev_sum;
            (busy / n as f64, busy / length)
        })
    }

    /// Counts a failed request; returns the length of the current run of failures.
    pub fn request_failed(&self) -> u32 {
        self.failures.fetch_add(1, Relaxed);
        self.failure_run.fetch_add(1, Relaxed).saturating_add(1)
    }

    /// Requests it failed since it joined.
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Its last request failed (a run of failures is going on).
    pub fn failing(&self) -> bool {
        self.failure_run.load(Relaxed) != 0
    }

    /// Ends a run of failures.
    pub fn request_succeeded(&self) {
        if self.failure_run.load(Relaxed) != 0 {
            self.failure_run.store(0, Relaxed);
        }
    }

    /// Latest probe round-trip time, if a probe has passed.
    pub fn probe_rtt_ns(&self) -> Option<u64> {
        match self.probe_ns.load(Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    /// The raw passive estimate, without decay (0 when there has been no sample).
    fn raw(&self) -> (f64, u64) {
        (
            f64::from_bits(self.est_bits.load(Relaxed)),
            self.est_at.load(Relaxed),
        )
    }

    /// Current latency estimate in nanoseconds. With no traffic it relaxes toward the latest
    /// probe RTT (up or down) with time constant `decay_ns`; real samples keep it current.
    pub fn estimate_ns(&self, now: u64, decay_ns: f64) -> f64 {
        let (est, at) = self.raw();
        let floor = self.probe_ns.load(Relaxed) as f64;
        if est <= 0.0 {
            return if floor > 0.0 { floor } else { DEFAULT_RTT_NS };
        }
        if floor == 0.0 {
            return est;
        }
        let elapsed = now.saturating_sub(at) as f64;
        floor + (est - floor) * (-elapsed / decay_ns).exp()
    }

    /// Feeds one latency sample: a real response, or a penalty standing for a failure.
    pub fn observe(&self, rtt_ns: f64, now: u64, decay_ns: f64) {
        let (raw, at) = self.raw();
        let cur = self.estimate_ns(now, decay_ns);
        let next = if raw <= 0.0 || rtt_ns >= cur {
            rtt_ns
        } else {
            let w = (-(now.saturating_sub(at) as f64) / decay_ns).exp();
            cur * w + rtt_ns * (1.0 - w)
        };
        self.est_bits.store(next.to_bits(), Relaxed);
        self.est_at.store(now, Relaxed);
    }

    /// Records a probe result: a pass refreshes the RTT the estimate relaxes toward.
    pub fn record_probe(
        &self,
        ok: bool,
        rtt_ns: u64,
        now: u64,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Transition {
        if ok {
            self.probe_ns.store(rtt_ns.max(1), Relaxed);
            self.success(now, healthy_threshold)
        } else {
            self.failure(unhealthy_threshold)
        }
    }

    /// One success (probe). Returns whether the endpoint just became healthy.
    pub fn success(&self, now: u64, healthy_threshold: u32) -> Transition {
        self.fail_streak.store(0, Relaxed);
        let streak = self.ok_streak.fetch_add(1, Relaxed).saturating_add(1);
        if streak >= healthy_threshold && !self.healthy.swap(true, Relaxed) {
            self.ever_healthy.store(true, Relaxed);
            self.healthy_since.store(now, Relaxed);
            return Transition::BecameHealthy;
        }
        Transition::None
    }

    /// One failure (probe, or a connect failure of real traffic).
    pub fn failure(&self, unhealthy_threshold: u32) -> Transition {
        self.ok_streak.store(0, Relaxed);
        let streak = self.fail_streak.fetch_add(1, Relaxed).saturating_add(1);
        if streak >= unhealthy_threshold && self.healthy.swap(false, Relaxed) {
            return Transition::BecameUnhealthy;
        }
        Transition::None
    }

    /// Marks the endpoint down at once (e.g. connection refused: nothing listens there).
    pub fn mark_down(&self) -> Transition {
        self.ok_streak.store(0, Relaxed);
        if self.healthy.swap(false, Relaxed) {
            Transition::BecameUnhealthy
        } else {
            Transition::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1_000_000.0;
    const DECAY: f64 = 10_000.0 * MS;

    fn at(ms: u64) -> u64 {
        ms * 1_000_000
    }

    #[test]
    fn peak_jumps_up_at_once_and_decays_slowly() {
        let s = EndpointState::new(0);
        s.observe(5.0 * MS, at(0), DECAY);
        s.observe(100.0 * MS, at(1), DECAY);
        assert_eq!(s.estimate_ns(at(1), DECAY), 100.0 * MS);
        // A fast sample 1 ms later barely moves the peak.
        s.observe(5.0 * MS, at(2), DECAY);
        assert!(s.estimate_ns(at(2), DECAY) > 99.0 * MS);
        // Fast samples for 10 s (one decay) bring it most of the way down.
        for t in (3..10_000).step_by(10) {
            s.observe(5.0 * MS, at(t), DECAY);
        }
        let e = s.estimate_ns(at(10_000), DECAY);
        assert!(e < 45.0 * MS && e > 5.0 * MS, "estimate {e}");
    }

    #[test]
    fn idle_estimate_decays_to_probe_rtt_not_zero() {
        let s = EndpointState::new(0);
        s.record_probe(true, 3_000_000, at(0), 2, 2);
        s.observe(200.0 * MS, at(10), DECAY);
        let long_after = s.estimate_ns(at(600_000), DECAY);
        assert!(
            (long_after - 3.0 * MS).abs() < 0.01 * MS,
            "decayed to {long_after}"
        );
    }

    #[test]
    fn probe_seeds_an_endpoint_without_traffic() {
        let s = EndpointState::new(0);
        assert_eq!(s.estimate_ns(at(0), DECAY), DEFAULT_RTT_NS);
        s.record_probe(true, 7_000_000, at(2000), 2, 2);
        assert_eq!(s.estimate_ns(at(2000), DECAY), 7.0 * MS);
        // It became slow while idle: the probe says so and the estimate follows.
        s.observe(7.0 * MS, at(2000), DECAY);
        s.record_probe(true, 70_000_000, at(4000), 2, 2);
        assert!(s.estimate_ns(at(600_000), DECAY) > 69.0 * MS);
    }

    #[test]
    fn thresholds_follow_alb_semantics() {
        let s = EndpointState::new(0);
        assert!(!s.is_healthy());
        assert_eq!(s.success(0, 2), Transition::None);
        assert_eq!(s.success(0, 2), Transition::BecameHealthy);
        assert_eq!(s.failure(3), Transition::None);
        assert_eq!(
            s.success(0, 2),
            Transition::None,
            "a pass resets the failure streak"
        );
        assert_eq!(s.failure(3), Transition::None);
        assert_eq!(s.failure(3), Transition::None);
        assert_eq!(s.failure(3), Transition::BecameUnhealthy);
        assert!(s.was_ever_healthy());
    }
}
