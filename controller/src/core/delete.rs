//! Deleting an object: resolve recent launches, drain, terminate (or release under
//! `deletionPolicy: Orphan`), and only then let the object go.

use std::collections::HashMap;
use std::time::Duration;

use fleetlb_crds::{BackendCluster, DeletionPolicy, LaunchIntent};
use k8s_openapi::jiff::Timestamp;

use super::execute::{by_kind, drained, idle, terminate_by_kind};
use crate::error::Reason;
use crate::provider::{ClusterKey, Instance, InstanceState, ProviderKind, Providers};
use crate::reconcile::{age, set_condition};

/// Where the deletion of an object stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    /// Nothing of it is left to wait for: forget the object (release the finalizer).
    Done,
    /// Still waiting (for what, in words for a condition message): instances draining or
    /// terminating, a recent launch the provider does not list yet, or a failed call.
    Waiting(String),
    /// A provider call failed (listing, terminating, releasing): retry with backoff; the
    /// conditions say why.
    Failed(crate::Error),
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
                return Deletion::Failed(e);
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
                return Deletion::Failed(e);
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
        Reason::Deleting.as_str(),
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
