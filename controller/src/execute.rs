//! Executing a [`Plan`](crate::reconcile::Plan): the part of a reconcile that talks to the
//! provider, shared by the standalone and Kubernetes drivers so both launch, drain, terminate
//! and delete the same way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use fleetlb_crds::{BackendCluster, BackendClusterStatus, DeletionPolicy, LaunchIntent};
use fleetlb_dataplane::EndpointConfig;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use crate::Providers;
use crate::metrics::Metrics;
use crate::provider::{ClusterKey, Instance, InstanceState, Launch, Provider, ProviderKind};
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
            managed: inp.provider.manages_instances(),
            token_scope: inp.provider.token_scope(),
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
        && let Err(e) = record(out.status.clone()).await
    {
        tracing::warn!(cluster = %key, error = %e, "cannot record launch intents; launching nothing");
        out.launch_error = Some(("StatusWriteFailed", e));
        launches = &[];
    }
    for planned in launches {
        let mut req = planned.clone();
        // Each attempt is recorded before it is launched (a crash replays the attempt that
        // was really sent); at most one attempt per subnet, and a few for spent tokens.
        let tries = match &req.provider {
            fleetlb_crds::ProviderSpec::Aws(a) => a.subnet_ids.len().max(1) + 2,
            _ => 3,
        };
        let stop: Option<Stop> = 'attempts: {
            let mut skipped = String::new();
            for _ in 0..tries {
                let result = match inp.provider.launch(&req).await {
                    Ok(Launch::Pending) if stale(&out.status, req.slot, now) => {
                        Ok(Launch::NextAttempt(format!(
                            "the provider has held this launch token for over {}s without listing an instance for it",
                            PENDING_LIMIT.as_secs()
                        )))
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
                    Ok(Launch::NextAttempt(why)) => {
                        tracing::info!(cluster = %key, slot = req.slot, attempt = req.attempt, reason = %why, "launch moves on to the next attempt");
                        skipped = why;
                        let Some(next) = req.attempt.checked_add(1) else {
                            break 'attempts Some(Stop::Failed(format!(
                                "slot {} has used every launch attempt",
                                req.slot
                            )));
                        };
                        req.attempt = next;
                        let intent = reconcile::intent_for(&req, now);
                        match out.status.launches.iter_mut().find(|l| l.slot == req.slot) {
                            Some(l) => *l = intent,
                            None => out.status.launches.push(intent),
                        }
                        if let Err(e) = record(out.status.clone()).await {
                            break 'attempts Some(Stop::Record(e));
                        }
                    }
                    Err(e) => break 'attempts Some(Stop::Failed(e.to_string())),
                }
            }
            Some(Stop::Failed(skipped))
        };
        match stop {
            None => {}
            Some(Stop::Record(e)) => {
                tracing::warn!(cluster = %key, error = %e, "cannot record the next launch attempt; launching nothing more");
                out.launch_error = Some(("StatusWriteFailed", e));
                break;
            }
            Some(Stop::Failed(msg)) => {
                fail_launch(&mut out, &mut *inp.backoff, inp.backoff_range, &key, msg);
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

/// How long ago `t` was (`None` when it lies in the future).
fn age(t: &Time, now: Timestamp) -> Option<Duration> {
    Duration::try_from(now.duration_since(t.0)).ok()
}

/// Why the launches of one reconcile stopped early.
enum Stop {
    /// The status with the next attempt could not be written.
    Record(String),
    /// The provider refused or failed (the message).
    Failed(String),
}

/// Records a failed launch: backoff and the error for the condition. The intent stays: an
/// earlier attempt of the same token may have been accepted before this one failed, so deletion
/// still waits (boundedly) for it to be listed.
fn fail_launch(
    out: &mut Applied,
    b: &mut LaunchBackoff,
    range: (Duration, Duration),
    key: &ClusterKey,
    msg: String,
) {
    b.failures = b.failures.saturating_add(1);
    let delay = backoff(range, b.failures);
    b.until = Some(Instant::now() + delay);
    let reason = error_reason(&msg);
    b.last = Some((reason, msg.clone()));
    tracing::warn!(cluster = %key, error = %msg, retry_in = ?delay, failures = b.failures, "launch failed; backing off");
    out.launch_error = Some((reason, msg));
}

/// Whether an instance that left the endpoint set `elapsed` ago may be terminated: after the
/// shortest drain once no request is in flight to it, after the deregistration delay anyway.
fn drained(elapsed: Duration, min: Duration, delay: Duration, idle: bool) -> bool {
    elapsed >= delay || (elapsed >= min && idle)
}

/// Whether instance `id` is known to have no request in flight.
fn idle(inflight: Option<&HashMap<String, u32>>, id: &str) -> bool {
    inflight.is_some_and(|m| m.get(id).is_none_or(|n| *n == 0))
}

/// Terminates `ids`, each through the provider that lists it (after a change of
/// `spec.provider`, old instances belong to the old provider).
async fn terminate_by_kind(
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
fn by_kind(instances: &[Instance], ids: &[String]) -> BTreeMap<ProviderKind, Vec<String>> {
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

/// Where the deletion of an object stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    /// Nothing of it is left to wait for: forget the object (release the finalizer).
    Done,
    /// Still waiting (for what, in words for a condition message): instances draining or
    /// terminating, a recent launch the provider does not list yet, or a failed call.
    Waiting(String),
}

/// Deletion settings.
#[derive(Clone, Copy, Debug)]
pub struct DeleteSettings {
    /// Shortest drain before terminating (see [`Inputs::drain`]).
    pub drain: Duration,
    /// How long after a launch intent was recorded deletion waits for the provider to list its
    /// instance (EC2's DescribeInstances is eventually consistent). Past it, an intent nothing
    /// answers to is taken as never launched.
    pub launch_visibility: Duration,
}

/// The launch intents in `bc`'s status whose instance the provider does not list yet, recorded
/// within `window` before `now`.
fn unresolved_launches<'a>(
    bc: &'a BackendCluster,
    mine: &[Instance],
    now: Timestamp,
    window: Duration,
) -> Vec<&'a LaunchIntent> {
    bc.status
        .iter()
        .flat_map(|s| &s.launches)
        .filter(|l| {
            let recent = l
                .recorded_at
                .as_ref()
                .and_then(|t| age(t, now))
                .is_some_and(|age| age < window);
            let seen = mine.iter().any(|i| {
                i.client_token.as_deref() == Some(l.client_token.as_str())
                    || l.instance_id.as_deref() == Some(i.id.as_str())
            });
            recent && !seen
        })
        .collect()
}

/// One step of deleting `bc`, called until it answers [`Deletion::Done`]. First every recent
/// launch intent is resolved (its instance listed, or the visibility window over), so nothing
/// launched is forgotten. Then under `Delete`: the instances drain (until no request is in
/// flight, at most the deregistration delay, counted from the deletion) and are terminated,
/// stopped ones included, and deletion waits until the provider shows them all gone; under
/// `Orphan`: fleetlb's ownership is dropped and they keep running.
pub async fn delete(
    bc: &mut BackendCluster,
    providers: &Providers,
    mine: &[Instance],
    inflight: Option<&HashMap<String, u32>>,
    now: Timestamp,
    settings: DeleteSettings,
) -> Deletion {
    let key = ClusterKey::of(bc);
    let kind = ProviderKind::of(&bc.spec.provider);
    let manages = providers.get(kind).is_some_and(|p| p.manages_instances())
        || mine.iter().any(|i| i.provider != ProviderKind::Static);
    if !manages {
        return Deletion::Done;
    }
    // A launch that answered with its instance id is acted on by that id even before the
    // provider lists it (terminated under Delete, released under Orphan), through the provider
    // that made it (the one of the last reconcile); EC2 may still say it does not know the id
    // for a few seconds, then the intent stays pending. A handled intent is marked so (no
    // `recordedAt`): a released instance no longer carries the tag IAM requires for a second
    // DeleteTags, and deletion does not wait for it again.
    let made_by = bc
        .status
        .as_ref()
        .and_then(|s| s.provider.as_deref())
        .and_then(ProviderKind::parse)
        .unwrap_or(kind);
    let by_id: Vec<(u32, String)> = unresolved_launches(bc, mine, now, settings.launch_visibility)
        .iter()
        .filter_map(|l| Some((l.slot, l.instance_id.clone()?)))
        .collect();
    if let Some(p) = providers.get(made_by) {
        for (slot, id) in by_id {
            let ids = [id];
            let r = match bc.spec.deletion_policy {
                DeletionPolicy::Delete => p.terminate(&ids).await,
                DeletionPolicy::Orphan => p.release(&ids).await,
            };
            match r {
                Ok(()) => {
                    tracing::info!(cluster = %key, id = %ids[0], "instance of a recent launch handled by id before it is listed");
                    if let Some(l) = bc
                        .status
                        .as_mut()
                        .and_then(|s| s.launches.iter_mut().find(|l| l.slot == slot))
                    {
                        l.recorded_at = None;
                    }
                }
                Err(e) => {
                    tracing::info!(cluster = %key, id = %ids[0], %e, "instance of a recent launch not known yet; will retry")
                }
            }
        }
    }
    let pending = unresolved_launches(bc, mine, now, settings.launch_visibility);
    let present: Vec<String> = mine
        .iter()
        .filter(|i| i.state.needs_terminate())
        .map(|i| i.id.clone())
        .collect();
    if bc.spec.deletion_policy == DeletionPolicy::Orphan {
        for (kind, ids) in by_kind(mine, &present) {
            let Some(p) = providers.get(kind) else {
                continue;
            };
            if let Err(e) = p.release(&ids).await {
                tracing::warn!(cluster = %key, %e, "releasing instances failed; will retry");
                return Deletion::Waiting(format!("releasing instances failed: {e}"));
            }
            tracing::info!(cluster = %key, count = ids.len(), "instances orphaned: left running, no longer owned");
        }
        return match pending.first() {
            None => Deletion::Done,
            Some(l) => Deletion::Waiting(waiting_for_launch(l, pending.len())),
        };
    }
    if present.is_empty()
        && pending.is_empty()
        && mine.iter().all(|i| i.state == InstanceState::Terminated)
    {
        return Deletion::Done;
    }
    let since_deletion: Duration = bc
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| age(t, now))
        .unwrap_or(Duration::MAX);
    let delay = bc.spec.deregistration_delay().max(settings.drain);
    let (due, draining): (Vec<String>, Vec<String>) = present
        .into_iter()
        .partition(|id| drained(since_deletion, settings.drain, delay, idle(inflight, id)));
    if !due.is_empty() {
        match terminate_by_kind(providers, mine, &due).await {
            Ok(()) => {
                tracing::info!(cluster = %key, count = due.len(), "terminating instances of deleted BackendCluster")
            }
            Err(e) => {
                tracing::warn!(cluster = %key, %e, "terminating instances failed; will retry");
                return Deletion::Waiting(format!("terminating instances failed: {e}"));
            }
        }
    }
    if let Some(l) = pending.first() {
        return Deletion::Waiting(waiting_for_launch(l, pending.len()));
    }
    if !draining.is_empty() {
        return Deletion::Waiting(format!(
            "draining {} instance(s) with requests in flight (at most {}s)",
            draining.len(),
            delay.as_secs()
        ));
    }
    let left = mine
        .iter()
        .filter(|i| i.state != InstanceState::Terminated)
        .count();
    Deletion::Waiting(format!("waiting for {left} instance(s) to terminate"))
}

/// Sets `Ready=False, reason=Deleting` with what deletion waits for.
pub fn mark_deleting(bc: &mut BackendCluster, why: &str, now: Timestamp) {
    let generation = bc.metadata.generation;
    let status = bc.status.get_or_insert_with(Default::default);
    set_condition(
        &mut status.conditions,
        "Ready",
        false,
        "Deleting",
        why,
        generation,
        now,
    );
}

fn waiting_for_launch(l: &LaunchIntent, n: usize) -> String {
    format!(
        "waiting for the provider to list {n} recent launch(es) before releasing the object (slot {} token {}{})",
        l.slot,
        l.client_token,
        l.instance_id
            .as_deref()
            .map(|id| format!(", instance {id}"))
            .unwrap_or_default()
    )
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
