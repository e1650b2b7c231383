//! Active health checks: one task per endpoint.
//!
//! Each probe is a `GET <path>` over the shared pooled client (so it measures request RTT, not
//! connection set-up), with the check's timeout. A 2xx passes. Passing probes also refresh the
//! RTT that the endpoint's latency estimate relaxes toward when it gets no traffic. The first
//! probe goes out at once so new instances are admitted within `healthy_threshold` intervals.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep, timeout};

use crate::Shared;
use crate::body::UpstreamBody;
use crate::endpoint::{Endpoint, Transition};
use crate::routes::HealthConfig;

/// Largest health response body read (and discarded) so the connection can be reused.
const MAX_PROBE_BODY: usize = 64 * 1024;

pub(crate) fn spawn(
    shared: Arc<Shared>,
    cluster: String,
    health: HealthConfig,
    endpoint: Arc<Endpoint>,
) -> AbortHandle {
    tokio::spawn(run(shared, cluster, health, endpoint)).abort_handle()
}

async fn run(shared: Arc<Shared>, cluster: String, health: HealthConfig, ep: Arc<Endpoint>) {
    let uri = match Uri::try_from(format!("http://{}{}", ep.addr, health.path)) {
        Ok(u) => u,
        Err(err) => {
            tracing::error!(%cluster, endpoint = %ep.addr, path = %health.path, %err, "health check path is not a valid URI; endpoint stays unhealthy");
            return;
        }
    };
    loop {
        let started = Instant::now();
        let ok = probe_once(&shared, &uri, health.timeout).await;
        let rtt = started.elapsed().as_nanos() as u64;
        let now = shared.clock.now();
        let t = ep.state.record_probe(
            ok,
            rtt,
            now,
            health.healthy_threshold,
            health.unhealthy_threshold,
        );
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
        sleep(base.mul_f64(jitter)).await;
    }
}

async fn probe_once(shared: &Shared, uri: &Uri, limit: Duration) -> bool {
    let req = Request::get(uri.clone())
        .header(http::header::USER_AGENT, "fleetlb-health-check")
        .body(UpstreamBody::Empty(Empty::<Bytes>::new()));
    let Ok(req) = req else { return false };
    let attempt = async {
        let resp = shared.client.request(req).await.ok()?;
        let status = resp.status();
        Limited::new(resp.into_body(), MAX_PROBE_BODY)
            .collect()
            .await
            .ok()?;
        Some(status.is_success())
    };
    matches!(timeout(limit, attempt).await, Ok(Some(true)))
}
