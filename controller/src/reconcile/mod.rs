//! The reconcile core, shared by every driver: from a BackendCluster, the instances its provider
//! reports and what the prober knows, decide what to launch, what to retire, which endpoints
//! the data plane gets, and what the status says.
//!
//! [`plan`] is a pure function: no I/O, no clock reads, so it is tested exhaustively without a
//! provider. Drivers execute the plan (launch, drain, terminate) and publish its results.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use fleetlb_crds::{
    BackendCluster, BackendClusterStatus, EndpointStatus, InstanceStatus, LaunchIntent,
};
use fleetlb_dataplane::EndpointConfig;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::provider::{ClusterKey, Instance, InstanceState, LaunchRequest, spec_hash, subnet_for};

/// What the prober knows of one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Health {
    /// Passes its health check.
    pub healthy: bool,
    /// The balancer's latency estimate, ms.
    pub latency_ms: Option<f64>,
}

/// Inputs of one reconcile of one object.
pub struct Observed<'a> {
    /// This object's instances (same cluster key), any owner UID, any state.
    pub instances: &'a [&'a Instance],
    /// Prober knowledge by instance id.
    pub health: &'a HashMap<String, Health>,
    /// Instances already leaving the endpoint set, waiting to be terminated.
    pub draining: &'a HashSet<String>,
    /// Instances the interruption queue says are going away, and what it said: a spot
    /// interruption warning or a state change retires and replaces them at once, as stopped
    /// ones; a rebalance recommendation or a scheduled change replaces them surge-first.
    pub interrupted: &'a HashMap<String, crate::interruption::Kind>,
    /// Whether the provider launches and terminates (false for `static`).
    pub managed: bool,
    /// The provider's launch-token scope ([`crate::provider::Provider::token_scope`]).
    pub token_scope: &'a str,
    /// How long the provider may take to list a launched instance: a launch answered longer
    /// ago than this whose instance is not listed made an instance that is gone.
    pub launch_visibility: std::time::Duration,
}

/// The decision.
#[derive(Debug, Default)]
pub struct Plan {
    /// Instances to launch now.
    pub launch: Vec<LaunchRequest>,
    /// Instances to take out of the endpoint set now and terminate once drained.
    pub retire: Vec<String>,
    /// The ranked endpoint set for the data plane (fastest first).
    pub endpoints: Vec<EndpointConfig>,
    /// The new status.
    pub status: BackendClusterStatus,
}

/// The number of instances `bc` asks for: the listed endpoints (`static`), the autoscaler's
/// count within its bounds (`spec.autoscaling`), else `replicas`.
pub fn desired_replicas(bc: &BackendCluster) -> usize {
    match (&bc.spec.provider, &bc.spec.autoscaling) {
        (fleetlb_crds::ProviderSpec::Static(s), _) => s.endpoints.len(),
        (_, Some(a)) => {
            let (floor, max) = autoscaling_bounds(bc, a);
            let wanted = bc
                .status
                .as_ref()
                .and_then(|s| s.autoscaling.as_ref())
                .map_or(floor, |s| s.desired_replicas);
            wanted.clamp(floor, max) as usize
        }
        _ => usize::try_from(bc.spec.replicas).unwrap_or(0),
    }
}

/// The autoscaler's bounds: at least `minReplicas` and `replicas` (what `kubectl scale` sets: a
/// floor), at most `maxReplicas`.
pub fn autoscaling_bounds(bc: &BackendCluster, a: &fleetlb_crds::Autoscaling) -> (u32, u32) {
    let replicas = u32::try_from(bc.spec.replicas).unwrap_or(0);
    let max = a.max_replicas.max(a.min_replicas);
    (a.min_replicas.max(replicas).min(max), max)
}

/// Decides launches, retirements, endpoints and status for one object.
///
/// Rules: instances of another object UID are not this object's: never counted, never retired
/// here (a re-created object never adopts its predecessor's instances; the orphan sweep deals
/// with instances no object owns); excess instances are retired unhealthy first, then newest;
/// instances from an older spec (drift, including a change of `spec.provider`) are replaced
/// surge-first: they keep serving until the current spec has `replicas` healthy instances, then
/// retire; dead instances are replaced; stopped ones (a console Stop, a scheduled retirement, a
/// Spot stop) serve nothing, so they are replaced and retired at once, and so are the ones the
/// interruption queue named (they are about to go).
pub fn plan(bc: &BackendCluster, uid: &str, obs: &Observed<'_>, now: Timestamp) -> Plan {
    let key = ClusterKey::of(bc);
    let hash = spec_hash(bc);
    let desired = desired_replicas(bc);
    let healthy = |i: &Instance| obs.health.get(&i.id).is_some_and(|h| h.healthy);
    // Named by the interruption queue: a spot warning or a state change means the instance
    // is going now (retired at once); a rebalance recommendation or a scheduled change means
    // it will (replaced surge-first, like drift: retired once the rollout's floor allows).
    let notice = |i: &Instance| obs.interrupted.get(&i.id).copied();
    let going = |i: &Instance| {
        matches!(
            notice(i),
            Some(
                crate::interruption::Kind::SpotInterruption
                    | crate::interruption::Kind::StateChange
            )
        )
    };

    let mut retire: Vec<String> = obs
        .instances
        .iter()
        .filter(|i| {
            i.belongs_to(uid)
                && (i.state.is_stopped() || (i.state.is_live() && going(i)))
                && !obs.draining.contains(&i.id)
        })
        .map(|i| i.id.clone())
        .collect();
    let mine: Vec<&Instance> = obs
        .instances
        .iter()
        .copied()
        .filter(|i| {
            i.belongs_to(uid) && i.state.is_live() && !obs.draining.contains(&i.id) && !going(i)
        })
        .collect();
    let (mut current, drifted): (Vec<&Instance>, Vec<&Instance>) = mine
        .iter()
        .partition(|i| i.drift(bc).is_none() && notice(i).is_none());

    let mut launch = Vec::new();
    {
        if obs.managed && current.len() > desired {
            // Keep healthy and older instances; retire unhealthy first, then newest.
            current.sort_by(|a, b| {
                healthy(b)
                    .cmp(&healthy(a))
                    .then(a.launched_at.cmp(&b.launched_at))
            });
            for victim in current.split_off(desired) {
                retire.push(victim.id.clone());
            }
        }
        // The replacement budget: at most `surge` instances beyond `desired`, and the healthy
        // ones never below `floor` because of a retirement.
        let rollout = &bc.spec.rollout;
        let surge = (desired * rollout.max_surge_percent as usize)
            .div_ceil(100)
            .max(1);
        let floor =
            desired.saturating_sub(desired * rollout.max_unavailable_percent as usize / 100);
        let ready_current = current.iter().filter(|i| healthy(i)).count();
        let mut healthy_total = ready_current + drifted.iter().filter(|i| healthy(i)).count();
        let mut drifted_left = drifted.len();
        if healthy_total >= floor {
            // Unhealthy drifted instances first (they serve nothing), then the oldest.
            let mut order = drifted.clone();
            order.sort_by(|a, b| {
                healthy(a)
                    .cmp(&healthy(b))
                    .then(a.launched_at.cmp(&b.launched_at))
            });
            for i in order {
                if healthy(i) {
                    // Only named by a rebalance recommendation or a scheduled change (hours or
                    // days ahead): it serves until a replacement is healthy, whatever
                    // maxUnavailable would allow.
                    let keep = if i.drift(bc).is_none() {
                        desired
                    } else {
                        floor
                    };
                    if healthy_total <= keep {
                        continue;
                    }
                    healthy_total -= 1;
                }
                retire.push(i.id.clone());
                drifted_left -= 1;
            }
        }
        let room = (desired + surge).saturating_sub(current.len() + drifted_left);
        // An unmanaged provider (`static`) launches nothing; its drifted predecessors (the
        // instances of a provider the cluster no longer uses) still retire surge-first above.
        let to_launch = if obs.managed {
            desired.saturating_sub(current.len()).min(room)
        } else {
            0
        };
        let used: HashSet<u32> = current.iter().map(|i| i.slot).collect();
        let mut free = (0u32..).filter(|s| !used.contains(s));
        // The next attempt of a slot follows every instance it ever had: terminated ones too,
        // and, through the intents that made them, those the provider no longer lists (EC2
        // forgets terminated instances after about an hour; repeating their token would only
        // get the terminated instance back). An intent recorded in status whose launch never
        // answered (the controller stopped mid-launch), or whose instance may not be listed
        // yet, is repeated with the same attempt, hence the same token.
        let gone = |l: &fleetlb_crds::LaunchIntent| {
            l.instance_id.is_some()
                && l.recorded_at
                    .as_ref()
                    .is_none_or(|t| age(t, now).is_some_and(|age| age > obs.launch_visibility))
        };
        let attempt_of = |slot: u32| {
            let intents = || {
                bc.status
                    .iter()
                    .flat_map(|s| &s.launches)
                    .filter(move |l| l.slot == slot)
            };
            let seen = obs
                .instances
                .iter()
                .filter(|i| i.slot == slot && i.owner_uid == uid)
                .map(|i| i.attempt.saturating_add(1))
                .chain(
                    intents()
                        .filter(|l| gone(l))
                        .map(|l| l.attempt.saturating_add(1)),
                )
                .max()
                .unwrap_or(0);
            let recorded = intents()
                .filter(|l| !gone(l))
                .map(|l| l.attempt)
                .max()
                .unwrap_or(0);
            // A new launch starts again at the preferred type and market in the slot's own
            // subnet (a multiple of types x markets x subnets: slots spread round-robin, so
            // replacing one keeps the spread over zones even); a recorded intent is repeated
            // exactly.
            let types = u32::try_from(bc.spec.instance_types.len().max(1)).unwrap_or(1);
            let subnets = match &bc.spec.provider {
                fleetlb_crds::ProviderSpec::Aws(a) => {
                    u32::try_from(a.subnet_ids.len().max(1)).unwrap_or(1)
                }
                _ => 1,
            };
            let cycle = types
                .saturating_mul(subnets)
                .saturating_mul(crate::provider::markets(bc.spec.capacity_type));
            if recorded >= seen {
                // An intent not yet seen as an instance: repeated exactly (same token).
                recorded
            } else {
                seen.div_ceil(cycle).saturating_mul(cycle)
            }
        };
        let recorded_intent = |slot: u32, attempt: u32| {
            bc.status
                .iter()
                .flat_map(|s| &s.launches)
                .any(|l| l.slot == slot && l.attempt == attempt)
        };
        for _ in 0..to_launch {
            let Some(slot) = free.next() else { break };
            let attempt = attempt_of(slot);
            launch.push(LaunchRequest {
                owner: key.clone(),
                owner_uid: uid.to_string(),
                slot,
                instance_type: crate::provider::type_for(&bc.spec.instance_types(), attempt),
                instance_types: bc.spec.instance_types.clone(),
                port: u16::try_from(bc.spec.port).unwrap_or(8000),
                grpc: bc.spec.protocol == fleetlb_crds::Protocol::Grpc,
                capacity_type: bc.spec.capacity_type,
                provider: bc.spec.provider.clone(),
                spec_hash: hash.clone(),
                attempt,
                token_scope: obs.token_scope.to_string(),
                replay: recorded_intent(slot, attempt),
            });
        }
    }

    let retiring: HashSet<&str> = retire.iter().map(String::as_str).collect();
    let serving: Vec<&Instance> = mine
        .iter()
        .copied()
        .filter(|i| !retiring.contains(i.id.as_str()))
        .collect();
    let mut ranked: Vec<(&Instance, SocketAddr)> = serving
        .iter()
        .filter(|i| i.state == InstanceState::Running)
        .filter_map(|i| i.address.map(|a| (*i, a)))
        .collect();
    let lat = |i: &Instance| {
        obs.health
            .get(&i.id)
            .and_then(|h| h.latency_ms)
            .unwrap_or(f64::MAX)
    };
    ranked.sort_by(|(a, _), (b, _)| healthy(b).cmp(&healthy(a)).then(lat(a).total_cmp(&lat(b))));
    let endpoints: Vec<EndpointConfig> = ranked
        .iter()
        .map(|(i, addr)| EndpointConfig {
            id: i.id.clone(),
            addr: *addr,
            zone: i.zone(),
        })
        .collect();

    let ready = serving.iter().filter(|i| healthy(i)).count();
    let pending = serving
        .iter()
        .filter(|i| i.state == InstanceState::Pending)
        .count();
    let failing = serving
        .iter()
        .filter(|i| i.state == InstanceState::Running && !healthy(i))
        .count();

    let mut status = BackendClusterStatus {
        observed_generation: bc.metadata.generation,
        replicas: i32::try_from(serving.len()).unwrap_or(i32::MAX),
        ready_replicas: i32::try_from(ready).unwrap_or(i32::MAX),
        selector: Some(selector(&key)),
        provider: Some(bc.spec.provider.kind().to_string()),
        capacity: capacity_summary(&serving),
        conditions: bc
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        instances: obs
            .instances
            .iter()
            .filter(|i| i.belongs_to(uid))
            .map(|i| InstanceStatus {
                id: i.id.clone(),
                address: i.address.map(|a| a.to_string()),
                state: if retiring.contains(i.id.as_str()) || obs.draining.contains(&i.id) {
                    "draining".into()
                } else {
                    i.state.as_str().into()
                },
                healthy: healthy(i),
                latency_ms: obs.health.get(&i.id).and_then(|h| h.latency_ms),
                provider: Some(i.provider.as_str().to_string()),
                instance_type: i.launched_as.as_ref().map(|_| i.instance_type.clone()),
                capacity_type: i
                    .launched_as
                    .as_ref()
                    .map(|l| crate::provider::market(l.spot).to_string()),
                zone: i.zone(),
            })
            .collect(),
        endpoints: ranked
            .iter()
            .map(|(i, a)| EndpointStatus {
                id: i.id.clone(),
                address: a.to_string(),
                latency_ms: obs.health.get(&i.id).and_then(|h| h.latency_ms),
                zone: i.zone(),
            })
            .collect(),
        launches: recorded_launches(bc, &launch, now),
        autoscaling: bc
            .spec
            .autoscaling
            .as_ref()
            .and(bc.status.as_ref())
            .and_then(|s| s.autoscaling.clone()),
    };
    status.instances.sort_by(|a, b| a.id.cmp(&b.id));

    let gen_ = bc.metadata.generation;
    let summary = format!("{ready}/{desired} replicas ready");
    let (ready_status, ready_reason) = if ready >= desired {
        (
            true,
            if desired == 0 {
                "ScaledToZero"
            } else {
                "AllReplicasReady"
            },
        )
    } else if !launch.is_empty() || pending > 0 {
        (false, "Launching")
    } else if failing > 0 {
        (false, "HealthCheckFailing")
    } else {
        (false, "WaitingForInstances")
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        ready_status,
        ready_reason,
        &summary,
        gen_,
        now,
    );

    let why = drifted
        .first()
        .and_then(|i| i.drift(bc).map(|d| format!(" ({}: {d})", i.id)))
        .unwrap_or_default();
    let (progressing, p_reason, p_msg) = if !launch.is_empty() || pending > 0 {
        (
            true,
            "Launching",
            if drifted.is_empty() {
                format!("launching {} instance(s), {pending} pending", launch.len())
            } else {
                format!(
                    "launching {} instance(s), {pending} pending, to replace {} drifted{why}",
                    launch.len(),
                    drifted.len()
                )
            },
        )
    } else if !retire.is_empty() || !obs.draining.is_empty() {
        let n = retire.len() + obs.draining.len();
        if drifted.is_empty() {
            (true, "ScalingDown", format!("retiring {n} instance(s)"))
        } else {
            (
                true,
                "Replacing",
                format!("replacing {} drifted instance(s){why}", drifted.len()),
            )
        }
    } else if !drifted.is_empty() {
        (
            true,
            "Replacing",
            format!(
                "{} drifted instance(s) wait for replacements to pass health checks{why}",
                drifted.len()
            ),
        )
    } else {
        (false, "Stable", summary.clone())
    };
    set_condition(
        &mut status.conditions,
        "Progressing",
        progressing,
        p_reason,
        &p_msg,
        gen_,
        now,
    );

    let (degraded, d_reason, d_msg) = if failing > 0 {
        (
            true,
            "HealthCheckFailing",
            format!("{failing} running instance(s) fail their health check"),
        )
    } else {
        (false, "AsExpected", summary)
    };
    set_condition(
        &mut status.conditions,
        "Degraded",
        degraded,
        d_reason,
        &d_msg,
        gen_,
        now,
    );

    Plan {
        launch,
        retire,
        endpoints,
        status,
    }
}

/// The scale subresource's label selector of a cluster (`status.selector`): instances are not
/// pods, but HPA and KEDA refuse a scale target without a non-empty selector.
pub fn selector(key: &ClusterKey) -> String {
    // A label value is at most 63 characters; object names may be longer.
    if key.name.len() <= 63 {
        format!("fleetlb.dev/backendcluster={}", key.name)
    } else {
        format!(
            "fleetlb.dev/backendcluster-hash={:016x}",
            crate::provider::fnv64(key.name.as_bytes())
        )
    }
}

/// The launch intent of `r` as status records it: its token and subnet follow from the slot
/// and attempt, so a replay is the same request.
pub fn intent_for(r: &LaunchRequest, now: Timestamp) -> LaunchIntent {
    LaunchIntent {
        slot: r.slot,
        attempt: r.attempt,
        client_token: r.token(),
        subnet_id: match &r.provider {
            fleetlb_crds::ProviderSpec::Aws(a) => {
                subnet_for(&a.subnet_ids, r.slot, r.zone_attempt()).map(String::from)
            }
            _ => None,
        },
        instance_id: None,
        recorded_at: Some(Time(now)),
    }
}

/// The latest intent per slot: the previous record with this plan's launches on top.
fn recorded_launches(
    bc: &BackendCluster,
    launch: &[LaunchRequest],
    now: Timestamp,
) -> Vec<LaunchIntent> {
    let mut by_slot: std::collections::BTreeMap<u32, LaunchIntent> = bc
        .status
        .iter()
        .flat_map(|s| &s.launches)
        .map(|l| (l.slot, l.clone()))
        .collect();
    for r in launch {
        let mut intent = intent_for(r, now);
        // A replay of the same intent keeps when it was first recorded and what it made.
        if let Some(prev) = by_slot.get(&r.slot)
            && prev.client_token == intent.client_token
        {
            intent.recorded_at = prev.recorded_at.clone().or(intent.recorded_at);
            intent.instance_id = prev.instance_id.clone();
        }
        by_slot.insert(r.slot, intent);
    }
    by_slot.into_values().collect()
}

/// How long ago `t` was (`None` when it lies in the future).
pub fn age(
    t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    now: Timestamp,
) -> Option<std::time::Duration> {
    std::time::Duration::try_from(now.duration_since(t.0)).ok()
}

/// Sets condition `type_`, keeping `lastTransitionTime` when the status did not change
/// (Kubernetes API conventions).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status_s = if status { "True" } else { "False" };
    let next = |last: Time| Condition {
        type_: type_.to_string(),
        status: status_s.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: last,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let last = if c.status == status_s {
                c.last_transition_time.clone()
            } else {
                Time(now)
            };
            *c = next(last);
        }
        None => conditions.push(next(Time(now))),
    }
}

/// The condition `type_`, if set.
pub fn condition<'a>(status: &'a BackendClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests;

/// `3 x t3.micro spot, 1 x t3.micro on-demand`: the EC2 offerings serving now, most first.
fn capacity_summary(serving: &[&Instance]) -> Option<String> {
    let mut counts: std::collections::BTreeMap<(String, &str), usize> = Default::default();
    for i in serving {
        if let Some(l) = &i.launched_as {
            let market = crate::provider::market(l.spot);
            *counts.entry((i.instance_type.clone(), market)).or_default() += 1;
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    (!v.is_empty()).then(|| {
        v.iter()
            .map(|((t, m), n)| format!("{n} x {t} {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}
