//! Executing a [`Plan`](crate::reconcile::Plan): the part of a reconcile that talks to the
//! provider, shared by the standalone and Kubernetes drivers so both launch, drain, terminate
//! and delete the same way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use fleetlb_crds::{BackendCluster, BackendClusterStatus};
use fleetlb_dataplane::EndpointConfig;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::observe::count_states;
use crate::error::{ErrorClass, Reason};
use crate::metrics::Metrics;
use crate::provider::Providers;
use crate::provider::{ClusterKey, Instance, InstanceState, Launch, Provider, ProviderKind};
use crate::reconcile::{self, Health, Observed, age, set_condition};

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
    /// Offerings (type, market, subnet) a launch moved on from for want of capacity, and why.
    pub skipped: Vec<String>,
    /// The launch error that stopped this reconcile's launches.
    pub launch_error: Option<LaunchError>,
}

/// Why the launches of one reconcile stopped, for the condition and the Warning Event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct LaunchError {
    /// The condition reason.
    pub reason: Reason,
    /// What happened, in the provider's words.
    pub message: String,
}

/// Where [`apply`] writes the planned status (with its launch intents) before each launch;
/// an error stops the launches.
pub type Record<'a> = dyn Fn(BackendClusterStatus) -> futures::future::BoxFuture<'a, Result<(), String>>
    + Send
    + Sync
    + 'a;

/// Launch retry state of one object: after a failed launch, the next one waits an exponentially
/// growing, jittered delay (objects failing together do not retry in lockstep). A new
/// `metadata.generation` (the user changed the spec) retries at once.
#[derive(Debug, Default, Clone)]
pub struct LaunchBackoff {
    failures: u32,
    until: Option<Instant>,
    generation: Option<i64>,
    last: Option<LaunchError>,
}

/// The delay before retry number `n` (1-based): `first * 2^(n-1)` capped at `max`, then a
/// uniformly random factor in [0.5, 1.5) so objects failing together do not retry together.
pub fn backoff((first, max): (Duration, Duration), n: u32) -> Duration {
    let exp = first.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    exp.min(max).mul_f64(0.5 + fastrand::f64())
}

/// Inputs of [`apply`] besides the object.
pub struct Inputs<'a> {
    /// The object's provider (`spec.provider`).
    pub provider: &'a dyn Provider,
    /// Every provider, to retire instances of a provider the object no longer uses.
    pub providers: &'a Providers,
    /// This object's instances as the providers list them (every kind, every owner UID).
    pub instances: &'a [Instance],
    /// What the prober knows, by instance id.
    pub health: &'a HashMap<String, Health>,
    /// Requests in flight, by instance id (instances that left the endpoint set included), when
    /// this process sees every request (one proxy); `None` where other replicas serve too, and
    /// a retired instance then always gets the whole deregistration delay.
    pub inflight: Option<&'a HashMap<String, u32>>,
    /// Instances out of the endpoint set, by when they left; updated here.
    pub draining: &'a mut HashMap<String, Instant>,
    /// Instances the interruption queue named, and what it said.
    pub interrupted: &'a HashMap<String, crate::interruption::Kind>,
    /// Shortest time between leaving the endpoint set and termination, long enough for every
    /// proxy replica to stop sending new requests. Termination waits longer while requests are
    /// in flight, up to `spec.deregistrationDelaySeconds`.
    pub drain: Duration,
    /// Controller metrics.
    pub metrics: &'a Metrics,
    /// This object's launch retry state; updated here.
    pub backoff: &'a mut LaunchBackoff,
    /// First and longest launch retry delay.
    pub backoff_range: (Duration, Duration),
    /// How long the provider may take to list a launched instance.
    pub launch_visibility: Duration,
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
    record: &Record<'_>,
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
            interrupted: inp.interrupted,
            managed: inp.provider.manages_instances(),
            token_scope: inp.provider.token_scope(),
            launch_visibility: inp.launch_visibility,
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
            .any(|i| !matches!(i.state, InstanceState::Running | InstanceState::Terminated));
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
        let LaunchError {
            reason,
            message: msg,
        } = inp.backoff.last.clone().unwrap_or(LaunchError {
            reason: Reason::LaunchFailed,
            message: String::new(),
        });
        let secs = until
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        set_condition(
            &mut out.status.conditions,
            "Degraded",
            true,
            reason.as_str(),
            &format!("{msg} (next launch attempt in {secs:.0}s)"),
            bc.metadata.generation,
            now,
        );
        launches = &[];
    } else if !launches.is_empty()
        && let Err(e) = record(out.status.clone()).await
    {
        tracing::warn!(cluster = %key, error = %e, "cannot record launch intents; launching nothing");
        out.launch_error = Some(LaunchError {
            reason: Reason::StatusWriteFailed,
            message: e,
        });
        launches = &[];
    }
    for planned in launches {
        let mut req = planned.clone();
        // Each attempt is recorded before it is launched (a crash replays the attempt that
        // was really sent); at most one attempt per subnet, and a few for spent tokens.
        let tries = match &req.provider {
            fleetlb_crds::ProviderSpec::Aws(a) => {
                a.subnet_ids.len().max(1) * req.per_subnet() as usize + 2
            }
            _ => 3,
        };
        let stop: Option<Stop> = 'attempts: {
            let mut skipped = LaunchError {
                reason: Reason::LaunchFailed,
                message: String::new(),
            };
            for _ in 0..tries {
                let result = match inp.provider.launch(&req).await {
                    Ok(Launch::Pending) if stale(&out.status, req.slot, now) => {
                        Ok(Launch::NextAttempt(
                            ErrorClass::Other,
                            format!(
                                "the provider has held this launch token for over {}s without listing an instance for it",
                                PENDING_LIMIT.as_secs()
                            ),
                        ))
                    }
                    other => other,
                };
                match result {
                    Ok(Launch::Made(i)) => {
                        tracing::info!(cluster = %key, id = %i.id, slot = req.slot, attempt = req.attempt, instance_type = %req.instance_type, "instance launched");
                        record_launched(&mut out.status, req.slot, &i);
                        out.launched.push((i.id.clone(), req.slot));
                        break 'attempts None;
                    }
                    Ok(Launch::Pending) => {
                        // Already launched under this intent; it shows up in a later listing.
                        tracing::info!(cluster = %key, slot = req.slot, attempt = req.attempt, "launch already made under this token; waiting for the provider to list it");
                        out.busy = true;
                        break 'attempts None;
                    }
                    Ok(Launch::NextAttempt(class, why)) => {
                        tracing::info!(cluster = %key, slot = req.slot, attempt = req.attempt, reason = %why, "launch moves on to the next attempt");
                        if class == ErrorClass::Capacity {
                            out.skipped.push(why.clone());
                        }
                        skipped = LaunchError {
                            reason: if class == ErrorClass::Capacity {
                                Reason::InsufficientCapacity
                            } else {
                                Reason::LaunchFailed
                            },
                            message: why,
                        };
                        let Some(next) = req.attempt.checked_add(1) else {
                            break 'attempts Some(Stop::Failed(LaunchError {
                                reason: Reason::LaunchFailed,
                                message: format!("slot {} has used every launch attempt", req.slot),
                            }));
                        };
                        req.set_attempt(next);
                        let intent = reconcile::intent_for(&req, now);
                        match out.status.launches.iter_mut().find(|l| l.slot == req.slot) {
                            Some(l) => *l = intent,
                            None => out.status.launches.push(intent),
                        }
                        if let Err(e) = record(out.status.clone()).await {
                            break 'attempts Some(Stop::Record(e));
                        }
                    }
                    Err(e) => {
                        break 'attempts Some(Stop::Failed(LaunchError {
                            reason: e.reason(),
                            message: e.to_string(),
                        }));
                    }
                }
            }
            // Every attempt moved on (capacity in each subnet, spent tokens).
            Some(Stop::Failed(skipped))
        };
        match stop {
            None => {}
            Some(Stop::Record(e)) => {
                tracing::warn!(cluster = %key, error = %e, "cannot record the next launch attempt; launching nothing more");
                out.launch_error = Some(LaunchError {
                    reason: Reason::StatusWriteFailed,
                    message: e,
                });
                break;
            }
            Some(Stop::Failed(err)) => {
                fail_launch(&mut out, &mut *inp.backoff, inp.backoff_range, &key, err);
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
    if let Some(e) = &out.launch_error {
        set_condition(
            &mut out.status.conditions,
            "Degraded",
            true,
            e.reason.as_str(),
            &e.message,
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
    let present: HashSet<&str> = inp
        .instances
        .iter()
        .filter(|i| i.state.needs_terminate())
        .map(|i| i.id.as_str())
        .collect();
    inp.draining.retain(|id, _| present.contains(id.as_str()));
    let delay = bc.spec.deregistration_delay().max(inp.drain);
    let due: Vec<String> = inp
        .draining
        .iter()
        .filter(|(id, since)| drained(since.elapsed(), inp.drain, delay, idle(inp.inflight, id)))
        .map(|(id, _)| id.clone())
        .collect();
    if !due.is_empty() {
        match terminate_by_kind(inp.providers, inp.instances, &due).await {
            Ok(()) => {
                tracing::info!(cluster = %key, ids = ?due, "instances terminated");
                out.terminated = due;
            }
            Err(e) => tracing::warn!(cluster = %key, %e, "terminate failed; will retry"),
        }
    }
    out
}

/// How long a launch the provider says it already has (EC2's `IdempotentParameterMismatch`)
/// may stay unlisted before the slot moves on to its next attempt: EC2 lists new instances
/// within seconds, so a token it holds without an instance for this long was spent on
/// parameters fleetlb no longer sends.
const PENDING_LIMIT: Duration = Duration::from_secs(300);

/// Whether the intent of `slot` was first recorded over [`PENDING_LIMIT`] ago.
fn stale(status: &BackendClusterStatus, slot: u32, now: Timestamp) -> bool {
    status
        .launches
        .iter()
        .find(|l| l.slot == slot)
        .and_then(|l| l.recorded_at.as_ref())
        .and_then(|t| age(t, now))
        .is_some_and(|age| age > PENDING_LIMIT)
}

/// Why the launches of one reconcile stopped early.
enum Stop {
    /// The status with the next attempt could not be written.
    Record(String),
    /// The provider refused or failed.
    Failed(LaunchError),
}

/// Records a failed launch: backoff and the error for the condition. The intent stays: an
/// earlier attempt of the same token may have been accepted before this one failed, so deletion
/// still waits (boundedly) for it to be listed.
fn fail_launch(
    out: &mut Applied,
    b: &mut LaunchBackoff,
    range: (Duration, Duration),
    key: &ClusterKey,
    err: LaunchError,
) {
    b.failures = b.failures.saturating_add(1);
    let delay = backoff(range, b.failures);
    b.until = Some(Instant::now() + delay);
    b.last = Some(err.clone());
    tracing::warn!(cluster = %key, error = %err.message, reason = %err.reason, retry_in = ?delay, failures = b.failures, "launch failed; backing off");
    out.launch_error = Some(err);
}

/// Whether an instance that left the endpoint set `elapsed` ago may be terminated: after the
/// shortest drain once no request is in flight to it, after the deregistration delay anyway.
pub(super) fn drained(elapsed: Duration, min: Duration, delay: Duration, idle: bool) -> bool {
    elapsed >= delay || (elapsed >= min && idle)
}

/// Whether instance `id` is known to have no request in flight.
pub(super) fn idle(inflight: Option<&HashMap<String, u32>>, id: &str) -> bool {
    inflight.is_some_and(|m| m.get(id).is_none_or(|n| *n == 0))
}

/// Terminates `ids`, each through the provider that lists it (after a change of
/// `spec.provider`, old instances belong to the old provider).
pub(super) async fn terminate_by_kind(
    providers: &Providers,
    instances: &[Instance],
    ids: &[String],
) -> Result<(), crate::Error> {
    for (kind, ids) in by_kind(instances, ids) {
        if let Some(p) = providers.get(kind) {
            p.terminate(&ids).await?;
        }
    }
    Ok(())
}

/// `ids` grouped by the provider kind that lists them.
pub(super) fn by_kind(
    instances: &[Instance],
    ids: &[String],
) -> BTreeMap<ProviderKind, Vec<String>> {
    let mut out: BTreeMap<ProviderKind, Vec<String>> = BTreeMap::new();
    for i in instances.iter().filter(|i| ids.contains(&i.id)) {
        out.entry(i.provider).or_default().push(i.id.clone());
    }
    out
}

/// Records in the status's launch intents what the launch of `slot` made (instance id, and the
/// attempt and subnet it ended up with after a capacity fallback).
fn record_launched(status: &mut BackendClusterStatus, slot: u32, i: &Instance) {
    if let Some(l) = status.launches.iter_mut().find(|l| l.slot == slot) {
        l.instance_id = Some(i.id.clone());
        l.attempt = i.attempt;
        if let Some(t) = &i.client_token {
            l.client_token = t.clone();
        }
        if let Some(subnet) = i.launched_as.as_ref().and_then(|a| a.subnet_id.clone()) {
            l.subnet_id = Some(subnet);
        }
    }
}
