//! Retry budget: retries may add at most 20 % to a cluster's request rate, plus 10 retries per
//! second, with up to 1000 retries banked from calm periods (the shape of linkerd's and tower's
//! `TpsBudget`, Envoy's 20 %). A burst of retries when one backend dies is paid from the bank;
//! a sustained failure of everything cannot turn into a retry storm.
//!
//! One budget per cluster lives across route-table updates. Lock-free: one atomic per request.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

/// Milli-retries deposited per request (20 %).
const PER_REQUEST: i64 = 200;
/// Milli-retries one retry costs.
const PER_RETRY: i64 = 1000;
/// Milli-retries added every second regardless of traffic (10 retries/s).
const PER_SECOND: i64 = 10_000;
/// Most milli-retries banked (1000 retries).
const CAP: i64 = 1_000_000;
/// Balance of a new cluster (100 retries).
const INITIAL: i64 = 100_000;

/// A cluster's retry budget.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    milli: AtomicI64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            milli: AtomicI64::new(INITIAL),
        }
    }
}

impl RetryBudget {
    /// Credits one original request.
    pub fn deposit(&self) {
        if self.milli.load(Relaxed) < CAP {
            self.milli.fetch_add(PER_REQUEST, Relaxed);
        }
    }

    /// Adds the per-second minimum; called once a second.
    pub fn tick(&self) {
        let _ = self
            .milli
            .fetch_update(Relaxed, Relaxed, |m| Some((m + PER_SECOND).min(CAP)));
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.milli
            .fetch_update(Relaxed, Relaxed, |m| {
                (m >= PER_RETRY).then_some(m - PER_RETRY)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_the_request_rate_once_the_bank_is_spent() {
        let b = RetryBudget::default();
        let banked = (0..1000).take_while(|_| b.withdraw()).count();
        assert_eq!(banked, 100);
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!(
            (0..100).take_while(|_| b.withdraw()).count(),
            10,
            "20 % of 50 requests"
        );
        b.tick();
        assert_eq!(
            (0..100).take_while(|_| b.withdraw()).count(),
            10,
            "10 per second"
        );
    }
}
