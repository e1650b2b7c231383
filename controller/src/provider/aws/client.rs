//! The SDK clients: one per EC2 API with its own rate limit and retry partition, call
//! timeouts, the leader gate on mutating calls, and error classification.

use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;

use crate::Error;
use crate::error::{ErrorClass, Operation};
use crate::provider::ProviderKind;

/// A client-side rate limit for one EC2 API (client-go's QPS and burst): a token bucket that
/// makes callers wait rather than send faster than EC2's own per-API buckets refill, so a burst
/// of reconciles (a controller restart with many objects) does not end in throttling.
struct RateLimit {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimit {
    fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            state: Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    /// Waits for a token.
    async fn acquire(&self) {
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (tokens, at) = &mut *st;
            let now = tokio::time::Instant::now();
            *tokens =
                (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
            *at = now;
            *tokens -= 1.0;
            if *tokens >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-*tokens / self.per_second)
        };
        tokio::time::sleep(wait).await;
    }
}

/// One SDK client and rate limit per EC2 API fleetlb calls. The SDK retries throttled and 5xx
/// calls itself (standard mode: 3 attempts, jittered exponential backoff); the drivers back off
/// per object beyond that. Separate retry partitions keep a throttled `RunInstances` from
/// draining the retry budget of the `DescribeInstances` every reconcile needs.
pub(super) struct Clients {
    pub(super) describe: Api,
    pub(super) run: Api,
    pub(super) terminate: Api,
    pub(super) tags: Api,
}

/// The client and rate limit of one EC2 API.
pub(super) struct Api {
    client: aws_sdk_ec2::Client,
    limit: RateLimit,
}

impl Api {
    /// The client, once the rate limit lets a call through.
    pub(super) async fn ready(&self) -> &aws_sdk_ec2::Client {
        self.limit.acquire().await;
        &self.client
    }
}

/// How long EC2 calls may take: a hung endpoint fails the call (and is retried) instead of
/// stalling reconciles forever.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP/TLS connect (default 3 s).
    pub connect: Duration,
    /// One attempt (default 20 s).
    pub attempt: Duration,
    /// The whole call with its retries (default 60 s).
    pub operation: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            attempt: Duration::from_secs(20),
            operation: Duration::from_secs(60),
        }
    }
}

/// Refuses every attempt (retries included) of a mutating EC2 call unless this replica leads at
/// the moment the request would be sent: the last check before the wire, so a replica that lost
/// the Lease while a call waited for the rate limit or between SDK retries sends nothing.
#[derive(Debug)]
struct LeaderGate(tokio::sync::watch::Receiver<bool>);

impl aws_sdk_ec2::config::Intercept for LeaderGate {
    fn name(&self) -> &'static str {
        "fleetlb-leader-gate"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_ec2::config::RuntimeComponents,
        _cfg: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if *self.0.borrow() {
            Ok(())
        } else {
            Err("NotLeader: this replica no longer holds the leader-election Lease".into())
        }
    }
}

impl Clients {
    pub(super) fn new(
        conf: &aws_config::SdkConfig,
        t: Timeouts,
        leader: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        // Rates well under EC2's default refill rates (non-mutating 20/s, RunInstances 2/s
        // with a large bucket, TerminateInstances 5/s), bursts of 20.
        let api = |partition: &'static str, per_second: f64, mutating: bool| {
            let mut b = aws_sdk_ec2::config::Builder::from(conf);
            if mutating && let Some(l) = &leader {
                b = b.interceptor(LeaderGate(l.clone()));
            }
            let c = b
                .timeout_config(
                    aws_sdk_ec2::config::timeout::TimeoutConfig::builder()
                        .connect_timeout(t.connect)
                        .operation_attempt_timeout(t.attempt)
                        .operation_timeout(t.operation)
                        .build(),
                )
                .retry_partition(aws_sdk_ec2::config::retry::RetryPartition::new(partition))
                .retry_config(
                    aws_sdk_ec2::config::retry::RetryConfig::standard()
                        .with_max_attempts(3)
                        .with_initial_backoff(Duration::from_millis(200))
                        .with_max_backoff(Duration::from_secs(5)),
                )
                .build();
            Api {
                client: aws_sdk_ec2::Client::from_conf(c),
                limit: RateLimit::new(per_second, 20.0),
            }
        };
        Self {
            describe: api("fleetlb-ec2-describe", 10.0, false),
            run: api("fleetlb-ec2-run", 2.0, true),
            terminate: api("fleetlb-ec2-terminate", 5.0, true),
            tags: api("fleetlb-ec2-tags", 5.0, true),
        }
    }
}

/// A failed EC2 call as a provider error, classed by EC2's error code (no code: the call timed
/// out, failed to connect or got an unreadable answer, so EC2 is unavailable).
pub(super) fn fail<E: ProvideErrorMetadata + std::error::Error>(op: Operation, e: &E) -> Error {
    Error::new(
        ProviderKind::Aws,
        op,
        ErrorClass::of_ec2_code(e.code()),
        match (e.code(), e.message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.to_string(),
            // Timeouts, connection failures: the error chain, readable.
            _ => aws_smithy_types::error::display::DisplayErrorContext(e).to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_lets_a_burst_through_then_paces_calls() {
        let limit = RateLimit::new(2.0, 3.0);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            limit.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst passes at once");
        for _ in 0..4 {
            limit.acquire().await;
        }
        // Four more at 2 per second.
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(
            start.elapsed() < Duration::from_millis(2100),
            "{:?}",
            start.elapsed()
        );
    }
}
