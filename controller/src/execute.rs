//! Executing a [`Plan`](crate::reconcile::Plan): the part of a reconcile that talks to the
//! provider, shared by the standalone and Kubernetes drivers so both launch, drain, terminate
//! and delete the same way.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fleetlb_crds::{BackendCluster, BackendClusterStatus, DeletionPolicy};
use fleetlb_dataplane::EndpointConfig;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::provider::{ClusterKey, Instance, InstanceState, Provider};
use crate::reconcile::{self, Health, Observed, set_condition};

/// What one reconcile of one object did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The status to publish.
    pub status: BackendClusterStatus,
    /// The ranked endpoint set.
    pub endpoints: Vec<EndpointConfig>,
    /// Something is still in motion (launching, draining, not yet running): look again soon.
    pub busy: bool,
    /// Instances launched, by (id, slot).
    pub launched: Vec<(String, u32)>,
    /// Instances that left the endpoint set this time (terminated after the drain period).
    pub retired: Vec<String>,
    /// Instances whose termination was requested this time.
    pub terminated: Vec<String>,
    /// The launch error that stopped this reconcile's launches, with its condition reason.
    pub launch_error: Option<(&'static str, String)>,
}

/// The condition reason for a provider error message (`Throttled`, `ProviderUnavailable`,
/// `InsufficientCapacity`, `LaunchFailed`).
pub fn error_reason(message: &str) -> &'static str {
    const THROTTLED: [&str; 3] = ["RequestLimitExceeded", "Throttling", "ThrottlingException"];
    const UNAVAILABLE: [&str; 6] = [
        "InternalError",
        "InternalFailure",
        "Unavailable",
        "timeout",
        "timed out",
        "dispatch failure",
    ];
    if THROTTLED.iter().any(|c| message.contains(c)) {
        "Throttled"
    } else if UNAVAILABLE.iter().any(|c| message.contains(c)) {
        "ProviderUnavailable"
    } else if message.contains("InsufficientInstanceCapacity") {
        "InsufficientCapacity"
    } else {
        "LaunchFailed"
    }
}

/// Launch retry state of one object: after a failed launch, the next one waits an exponentially
/// growing, jittered delay (objects failing together do not retry in lockstep). A new
/// `metadata.generation` (the user changed the spec) retries at once.
#[derive(Debug, Default, Clone)]
pub struct LaunchBackoff {
    failures: u32,
    until: Option<Instant>,
    generation: Option<i64>,
    last: Option<(&'static str, String)>,
}

/// The delay before retry number `n` (1-based): `first * 2^(n-1)` capped at `max`, then a
/// uniformly random factor in [0.5, 1.5) so objects failing together do not retry together.
pub fn backoff((first, max): (Duration, Duration), n: u32) -> Duration {
    let exp = first.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    exp.min(max).mul_f64(0.5 + fastrand::f64())
}

/// Inputs of [`apply`] besides the object.
pub struct Inputs<'a> {
    /// The object's provider.
    pub provider: &'a dyn Provider,
    /// This object's instances as the provider lists them.
    pub instances: &'a [Instance],
    /// What the prober knows, by instance id.
    pub health: &'a HashMap<String, Health>,
    /// Instances out of the endpoint set, by when they left; updated here.
    pub draining: &'a mut HashMap<String, Instant>,
    /// Time between leaving the endpoint set and termination.
    pub drain: Duration,
    /// Controller metrics.
    pub metrics: &'a Metrics,
    /// This object's launch retry state; updated here.
    pub backoff: &'a mut LaunchBackoff,
    /// First and longest launch retry delay.
    pub backoff_range: (Duration, Duration),
}

/// Plans and executes one reconcile of `bc`: launches what is missing, moves victims out of the
/// endpoint set, terminates those drained long enough, and records instance gauges.
///
/// `record` is given the planned status (with its launch intents) before any launch; when it
/// fails, nothing is launched this time (the Kubernetes driver writes it, so a crash between the
/// launch and the next status write repeats the same intent).
pub async fn apply(
    bc: &BackendCluster,
    inp: Inputs<'_>,
    now: Timestamp,
    record: impl AsyncFnOnce(&BackendClusterStatus) -> Result<(), String>,
) -> Applied {
    let key = ClusterKey::of(bc);
    let refs: Vec<&Instance> = inp.instances.iter().collect();
    let draining: HashSet<String> = inp.draining.keys().cloned().collect();
    let uid = bc.metadata.uid.clone().unwrap_or_default();
    let plan = reconcile::plan(
        bc,
        &uid,
        &Observed {
            instances: &refs,
            health: inp.health,
            draining: &draining,
            managed: inp.provider.manages_instances(),
        },
        now,
    );
    let mut out = Applied {
        status: plan.status,
        endpoints: plan.endpoints,
        ..Applied::default()
    };
    let cluster = key.to_string();
    for (state, n) in count_states(inp.instances) {
        inp.metrics
            .instances
            .with_label_values(&[cluster.as_str(), state])
            .set(n);
    }
    out.busy = !plan.launch.is_empty()
        || !plan.retire.is_empty()
        || !inp.draining.is_empty()
        || inp
            .instances
            .iter()
            .any(|i| i.state != InstanceState::Running);
    if inp.backoff.generation != bc.metadata.generation {
        *inp.backoff = LaunchBackoff {
            generation: bc.metadata.generation,
            ..LaunchBackoff::default()
        };
    }
    let waiting = inp.backoff.until.filter(|t| *t > Instant::now());
    let mut launches = &plan.launch[..];
    if let Some(until) = waiting
        && !launches.is_empty()
    {
        // Still backing off: plan, serve and report, but do not call the provider.
        let (reason, msg) = inp
            .backoff
            .last
            .clone()
            .unwrap_or(("LaunchFailed", String::new()));
        let secs = until
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        set_condition(
            &mut out.status.conditions,
            "Degraded",
            true,
            reason,
            &format!("{msg} (next launch attempt in {secs:.0}s)"),
            bc.metadata.generation,
            now,
        );
        launches = &[];
    } else if !launches.is_empty()
        && let Err(e) = record(&out.status).await
    {
        tracing::warn!(cluster = %key, error = %e, "cannot record launch intents; launching nothing");
        out.launch_error = Some(("StatusWriteFailed", e));
        launches = &[];
    }
    for req in launches {
        match inp.provider.launch(req).await {
            Ok(i) => {
                tracing::info!(cluster = %key, id = %i.id, slot = req.slot, instance_type = %req.instance_type, "instance launched");
                out.launched.push((i.id, req.slot));
            }
            Err(e) => {
                let msg = e.to_string();
                let b = &mut *inp.backoff;
                b.failures = b.failures.saturating_add(1);
                let delay = backoff(inp.backoff_range, b.failures);
                b.until = Some(Instant::now() + delay);
                b.last = Some((error_reason(&msg), msg.clone()));
                tracing::warn!(cluster = %key, error = %msg, retry_in = ?delay, failures = b.failures, "launch failed; backing off");
                out.launch_error = Some((error_reason(&msg), msg));
                break;
            }
        }
    }
    if !launches.is_empty() && out.launch_error.is_none() {
        inp.backoff.failures = 0;
        inp.backoff.until = None;
        inp.backoff.last = None;
    }
    inp.metrics
        .reconcile
        .with_label_values(&[if out.launch_error.is_some() {
            "error"
        } else {
            "success"
        }])
        .inc();
    if let Some((reason, e)) = &out.launch_error {
        set_condition(
            &mut out.status.conditions,
            "Degraded",
            true,
            reason,
            e,
            bc.metadata.generation,
            now,
        );
    }
    let at = Instant::now();
    for id in plan.retire {
        tracing::info!(cluster = %key, %id, "instance leaves the endpoint set; terminating after drain");
        if !inp.draining.contains_key(&id) {
            out.retired.push(id.clone());
        }
        inp.draining.entry(id).or_insert(at);
    }
    let live: HashSet<&str> = inp
        .instances
        .iter()
        .filter(|i| i.state.is_live())
        .map(|i| i.id.as_str())
        .collect();
    inp.draining.retain(|id, _| live.contains(id.as_str()));
    let due: Vec<String> = inp
        .draining
        .iter()
        .filter(|(_, since)| since.elapsed() >= inp.drain)
        .map(|(id, _)| id.clone())
        .collect();
    if !due.is_empty() {
        match inp.provider.terminate(&due).await {
            Ok(()) => {
                tracing::info!(cluster = %key, ids = ?due, "instances terminated");
                out.terminated = due;
            }
            Err(e) => tracing::warn!(cluster = %key, %e, "terminate failed; will retry"),
        }
    }
    out
}

/// Where the deletion of an object stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    /// Nothing of it is left to wait for: forget the object (release the finalizer).
    Done,
    /// Instances are still terminating (or a call failed): look again later.
    Waiting,
}

/// One step of deleting `bc`: under `Delete`, terminate every live instance and wait until the
/// provider shows them all terminated; under `Orphan`, drop ownership and finish.
pub async fn delete(bc: &BackendCluster, provider: &dyn Provider, mine: &[Instance]) -> Deletion {
    let key = ClusterKey::of(bc);
    if !provider.manages_instances() {
        return Deletion::Done;
    }
    let live: Vec<String> = mine
        .iter()
        .filter(|i| i.state.is_live())
        .map(|i| i.id.clone())
        .collect();
    if bc.spec.deletion_policy == DeletionPolicy::Orphan {
        if !live.is_empty() {
            if let Err(e) = provider.release(&live).await {
                tracing::warn!(cluster = %key, %e, "releasing instances failed; will retry");
                return Deletion::Waiting;
            }
            tracing::info!(cluster = %key, count = live.len(), "instances orphaned: left running, no longer owned");
        }
        return Deletion::Done;
    }
    if mine.iter().all(|i| i.state == InstanceState::Terminated) {
        return Deletion::Done;
    }
    if !live.is_empty() {
        match provider.terminate(&live).await {
            Ok(()) => {
                tracing::info!(cluster = %key, count = live.len(), "terminating instances of deleted BackendCluster")
            }
            Err(e) => {
                tracing::warn!(cluster = %key, %e, "terminating instances failed; will retry")
            }
        }
    }
    Deletion::Waiting
}

/// What the prober knows, by cluster name and instance id (the [`Health`] each plan needs).
pub fn health_by_cluster(
    dataplane: &fleetlb_dataplane::Dataplane,
) -> HashMap<String, HashMap<String, Health>> {
    dataplane
        .snapshot()
        .into_iter()
        .map(|c| {
            let by_id = c
                .endpoints
                .into_iter()
                .map(|e| {
                    let h = Health {
                        healthy: e.healthy,
                        latency_ms: e.probe_ms.map(|_| e.latency_ms),
                    };
                    (e.id, h)
                })
                .collect();
            (c.cluster, by_id)
        })
        .collect()
}

/// Instance counts per provider state, for the `fleetlb_controller_instances` gauge.
pub fn count_states(instances: &[Instance]) -> Vec<(&'static str, i64)> {
    use InstanceState as S;
    [
        S::Pending,
        S::Running,
        S::ShuttingDown,
        S::Stopping,
        S::Stopped,
    ]
    .iter()
    .map(|s| {
        (
            s.as_str(),
            instances.iter().filter(|i| i.state == *s).count() as i64,
        )
    })
    .collect()
}

/// Removes the instance gauges of a cluster that is gone.
pub fn forget_cluster(metrics: &Metrics, key: &ClusterKey) {
    let cluster = key.to_string();
    for (state, _) in count_states(&[]) {
        let _ = metrics
            .instances
            .remove_label_values(&[cluster.as_str(), state]);
    }
}

/// The endpoints last published in `bc`'s status (what to keep serving when the provider
/// cannot be asked, and what non-leader replicas serve).
pub fn status_endpoints(bc: &BackendCluster) -> Vec<EndpointConfig> {
    bc.status
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| {
            Some(EndpointConfig {
                id: e.id.clone(),
                addr: e.address.parse().ok()?,
            })
        })
        .collect()
}
