//! Active health checks: one task per endpoint.
//!
//! `HTTP2` clusters are probed with the same `GET` as a stream on the endpoint's HTTP/2 pool,
//! `GRPC` ones with `grpc.health.v1.Health/Check` (passing on `SERVING`), see `h2up::probe`.
//!
//! Each probe is a `GET <path>` through the proxy's upstream client (`h1`) over a kept-alive
//! connection from the endpoint's pool (so it measures request RTT, not connection set-up, and
//! costs a write and a read), with the check's timeout. A 2xx passes. Passing probes also refresh the
//! RTT that the endpoint's latency estimate relaxes toward when it gets no traffic. The first
//! probe goes out at once so new instances are admitted within `healthy_threshold` intervals.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until, timeout};

use crate::Shared;
use crate::endpoint::{Endpoint, Transition};
use crate::h1;
use crate::routes::{HealthConfig, Protocol};

/// Largest health response body read (and discarded) so the connection can be reused.
const MAX_PROBE_BODY: usize = 64 * 1024;

pub(crate) fn spawn(
    shared: Arc<Shared>,
    cluster: String,
    health: HealthConfig,
    protocol: Protocol,
    endpoint: Arc<Endpoint>,
) -> AbortHandle {
    tokio::spawn(run(shared, cluster, health, protocol, endpoint)).abort_handle()
}

async fn run(
    shared: Arc<Shared>,
    cluster: String,
    health: HealthConfig,
    protocol: Protocol,
    ep: Arc<Endpoint>,
) {
    let path = match PathAndQuery::try_from(health.path.as_str()) {
        Ok(p) if p.as_str().starts_with('/') => p,
        _ => {
            tracing::error!(%cluster, endpoint = %ep.addr, path = %health.path, "health check path is not a valid path; endpoint stays unhealthy");
            return;
        }
    };
    let mut headers = HeaderMap::with_capacity(1);
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("fleetlb-health-check"),
    );
    loop {
        let started = Instant::now();
        let ok = if protocol.is_h2() {
            let grpc = protocol == Protocol::Grpc;
            crate::h2up::probe(&shared, &ep, grpc, &health, &path).await
        } else {
            probe_once(&shared, &ep, &path, &headers, health.timeout).await
        };
        let rtt = started.elapsed().as_nanos() as u64;
        let now = shared.clock.now();
        let t = ep.state.record_probe(
            ok,
            rtt,
            now,
            health.healthy_threshold,
            health.unhealthy_threshold,
        );
        if t != Transition::None {
            shared.health_changes.mark(&cluster);
        }
        match t {
            Transition::BecameHealthy => {
                tracing::info!(%cluster, endpoint = %ep.addr, id = %ep.id, rtt_ms = rtt as f64 / 1e6, "endpoint healthy")
            }
            Transition::BecameUnhealthy => {
                shared
                    .metrics
                    .ejections
                    .with_label_values(&[cluster.as_str(), "health_check"])
                    .inc();
                tracing::warn!(%cluster, endpoint = %ep.addr, id = %ep.id, "endpoint unhealthy: health check failing")
            }
            Transition::None => {}
        }
        // An endpoint that has never passed is probed 4x as often (at least every 250 ms apart),
        // like HAProxy's `fastinter`, so new instances join within a second, not thresholds x
        // interval. +-10 % jitter keeps probes of many endpoints from marching in lockstep.
        let base = if ep.state.was_ever_healthy() {
            health.interval
        } else {
            (health.interval / 4)
                .max(Duration::from_millis(250))
                .min(health.interval)
        };
        let jitter = 0.9 + fastrand::f64() * 0.2;
        sleep_until(on_tick(Instant::now() + base.mul_f64(jitter))).await;
    }
}

/// Probes wake on a shared 100 ms tick: with many endpoints, each wake-up of the runtime then
/// sends a batch of probes and one readiness poll collects their answers, instead of one
/// wake-up per probe (on a VM a wake-up costs more than the probe). The jitter still spreads
/// endpoints over the ticks.
const PROBE_TICK: Duration = Duration::from_millis(100);

/// `t` rounded to the nearest `PROBE_TICK` boundary of the runtime's clock (never before
/// now: every probe interval is far longer than half a tick).
fn on_tick(t: Instant) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let Some(since) = t.checked_duration_since(epoch) else {
        return t;
    };
    let tick = PROBE_TICK.as_nanos();
    let rounded = (since.as_nanos() + tick / 2) / tick * tick;
    (epoch + Duration::from_nanos(rounded.min(u128::from(u64::MAX)) as u64)).max(Instant::now())
}

async fn probe_once(
    shared: &Shared,
    ep: &Endpoint,
    path: &PathAndQuery,
    headers: &HeaderMap,
    limit: Duration,
) -> bool {
    let head = h1::Head {
        method: &Method::GET,
        path,
        headers,
        authority: ep.authority.as_str(),
        framing: h1::ReqFraming::None,
        upgrade: false,
    };
    let settings = h1::Settings {
        connect_timeout: shared.limits.connect_timeout.min(limit),
        idle_timeout: shared.config.pool_idle_timeout,
        timeout: None,
        client_gap: limit,
        client_min_rate: 0,
        upstream_gap: limit,
    };
    let attempt = async {
        let mut answer = h1::send(&ep.pool, ep.addr, &head, &mut None, settings, true)
            .await
            .ok()?;
        // The body is read (and dropped) so the connection can carry the next probe.
        let mut read = 0;
        while let Some(chunk) =
            std::future::poll_fn(|cx| answer.body.poll_data(cx, &ep.pool, h1::READ_CHUNK)).await
        {
            read += chunk.ok()?.len();
            if read > MAX_PROBE_BODY {
                return None;
            }
        }
        let ok = answer.status.is_success();
        // Its header map serves the next answer parsed on this thread.
        h1::recycle(answer.headers);
        Some(ok)
    };
    matches!(timeout(limit, attempt).await, Ok(Some(true)))
}
