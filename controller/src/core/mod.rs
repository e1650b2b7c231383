//! The controller core, shared by both drivers: per-object state, the provider inventory, the
//! reconcile and deletion of one object (conditions and Events included), route building with
//! one conflict rule, the orphan sweep and the `/status` view.
//!
//! A driver only says where objects come from (a directory, the API server) and where status
//! and Events go (a [`Sink`]); the same input gives the same conditions and Events in both.

pub mod delete;
mod events;
pub mod execute;
pub mod inventory;
mod observe;
mod peers;
pub mod routes;
mod scale;
pub mod sweep;
pub mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::Dataplane;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use crate::Error;
use crate::error::{ErrorClass, Reason};
use crate::metrics::Metrics;
use crate::provider::{ClusterKey, Instance, ProviderKind, Providers};
use crate::reconcile::set_condition;
use delete::{DeleteSettings, Deletion};
use events::applied_events;
pub use events::{Event, EventType, Sink};
use execute::LaunchBackoff;
use inventory::{Inventory, kinds_of};
pub use observe::{count_states, forget_cluster, health_of};

/// Settings of the core, the same meaning in both drivers (their defaults differ).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Time between an instance leaving the endpoint set and its termination, long enough for
    /// every proxy replica to see the change.
    pub drain: Duration,
    /// Unowned instances older than this are terminated (Karpenter's 30 s standalone, 60 s in
    /// Kubernetes where the cache can lag).
    pub orphan_grace: Duration,
    /// Deletion: how long to wait for the provider to list recent launches (default 2 min).
    pub launch_visibility: Duration,
    /// First and longest delay before retrying a failed launch or reconcile (default 1 s and
    /// 5 min; doubled per failure, jittered; an edit of the object retries at once).
    pub backoff: (Duration, Duration),
    /// Provider listings younger than this are shared between reconciles (default 1 s).
    pub inventory_max_age: Duration,
    /// A provider listing taking longer fails as `ProviderUnavailable` (default 90 s, beyond
    /// the EC2 client's own 60 s call timeout).
    pub list_deadline: Duration,
    /// This process is the only proxy: it sees every request, so a retired instance is
    /// terminated as soon as its last request ends. Otherwise a retired instance gets its whole
    /// deregistration delay.
    pub sole_proxy: bool,
    /// What the interruption queue said (see [`crate::interruption`]): the instances named
    /// leave the endpoint set at once and are replaced. Shared with the queue's poller.
    pub notices: Arc<crate::interruption::Notices>,
    /// Where the other proxy replicas' admin ports are (`host:port`; a name may stand for
    /// several addresses, as a headless Service does): the autoscaler sums their load with
    /// this proxy's. Empty: this proxy's load only.
    pub peers: Vec<String>,
}

impl Settings {
    /// Standalone defaults: one process, drain 2 s, orphans after 30 s.
    pub fn standalone() -> Self {
        Self {
            drain: Duration::from_secs(2),
            orphan_grace: Duration::from_secs(30),
            sole_proxy: true,
            ..Self::kubernetes()
        }
    }

    /// Kubernetes defaults: drain 5 s (every replica sees the status change), orphans after
    /// 60 s, not the sole proxy.
    pub fn kubernetes() -> Self {
        Self {
            drain: Duration::from_secs(5),
            orphan_grace: Duration::from_secs(60),
            launch_visibility: Duration::from_secs(120),
            backoff: (Duration::from_secs(1), Duration::from_secs(300)),
            inventory_max_age: Duration::from_secs(1),
            list_deadline: Duration::from_secs(90),
            sole_proxy: false,
            notices: Arc::default(),
            peers: Vec::new(),
        }
    }
}

/// Keeps [`Core::index_routes`]'s index while the pass lasts (the slice it indexes is borrowed
/// as long); dropping it forgets the index.
pub struct RouteIndexGuard<'a> {
    core: &'a Core,
    /// The slice indexed, borrowed as long as the index lives: it cannot be freed or changed
    /// meanwhile, so its address and length identify it.
    _objects: &'a [Arc<BackendCluster>],
}

impl Drop for RouteIndexGuard<'_> {
    fn drop(&mut self) {
        *self
            .core
            .route_index
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// What a reconcile ended with, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing in motion: look again at the resync period.
    Settled,
    /// Instances launching, draining or not yet running: look again soon.
    Busy,
    /// Settled, but autoscaled: the count may change with the load at any time (the
    /// Kubernetes driver looks again at the busy period; standalone passes every resync).
    Scaling,
}

/// Why a reconcile failed (retried with per-object backoff).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A provider call failed (its class decides the condition reason).
    #[error(transparent)]
    Provider(#[from] Error),
    /// The status could not be recorded.
    #[error("cannot write status: {0}")]
    Status(String),
    /// A launch failed (after its retries); launches back off.
    #[error(transparent)]
    Launch(#[from] execute::LaunchError),
}

/// Sets `Degraded=True` with the reason of a provider error.
fn degraded_by(
    status: &mut fleetlb_crds::BackendClusterStatus,
    e: &Error,
    generation: Option<i64>,
    now: Timestamp,
) {
    set_condition(
        &mut status.conditions,
        "Degraded",
        true,
        e.reason().as_str(),
        &e.to_string(),
        generation,
        now,
    );
}

/// Per-object state kept between reconciles.
#[derive(Default)]
struct ObjectState {
    /// Instances out of the endpoint set, by when they left.
    draining: HashMap<String, Instant>,
    /// Launch retry state.
    backoff: LaunchBackoff,
    /// Consecutive failed reconciles.
    failures: u32,
}

/// The core: providers, the data plane's view of health, metrics, settings, and the state of
/// every object.
pub struct Core {
    /// Instance providers.
    pub providers: Providers,
    /// The local data plane: health and latency of endpoints.
    pub dataplane: Dataplane,
    /// Controller metrics.
    pub metrics: Metrics,
    /// Settings.
    pub cfg: Settings,
    inventory: Inventory,
    objects: Mutex<HashMap<ClusterKey, ObjectState>>,
    loads: Mutex<scale::Loads>,
    peers: peers::Peers,
    /// The current pass's objects by route (see [`Core::index_routes`]).
    route_index: Mutex<Option<routes::RouteIndex>>,
    /// (instance, notice) pairs whose spot pool was marked: once per notice, since a
    /// rebalance recommendation may come hours ahead and must not keep its pool closed all
    /// along.
    pools_marked: Mutex<std::collections::HashSet<(String, crate::interruption::Kind)>>,
}

impl Core {
    /// A core over `providers`.
    pub fn new(
        providers: Providers,
        dataplane: Dataplane,
        metrics: Metrics,
        cfg: Settings,
    ) -> Self {
        Self {
            inventory: Inventory::new(cfg.inventory_max_age, cfg.list_deadline),
            peers: peers::Peers::new(cfg.peers.clone()),
            route_index: Mutex::default(),
            pools_marked: Mutex::default(),
            providers,
            dataplane,
            metrics,
            cfg,
            objects: Mutex::default(),
            loads: Mutex::default(),
        }
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<ClusterKey, ObjectState>> {
        // Every map here stays consistent between statements, also after a panic elsewhere.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets every provider listing: the next reconcile lists afresh (the standalone driver
    /// calls this once per pass, so a pass shares one listing per provider).
    pub async fn refresh(&self) {
        for kind in ProviderKind::ALL {
            self.inventory.invalidate(kind).await;
        }
    }

    /// Counts a failed reconcile of `key`; returns how many in a row.
    pub fn failed(&self, key: &ClusterKey) -> u32 {
        let mut objects = self.objects();
        let n = &mut objects.entry(key.clone()).or_default().failures;
        *n = n.saturating_add(1);
        *n
    }

    /// The delay before retrying `key` after its `n`th failure in a row.
    pub fn retry_delay(&self, n: u32) -> Duration {
        execute::backoff(self.cfg.backoff, n)
    }

    /// Requests in flight per instance of `key`, where this process is the only proxy.
    fn inflight(&self, key: &ClusterKey) -> Option<HashMap<String, u32>> {
        self.cfg
            .sole_proxy
            .then(|| self.dataplane.inflight_of(&key.to_string()))
    }

    /// Indexes a pass's `objects` by route until the guard drops: reconciles of objects in that
    /// slice check route conflicts through the index instead of scanning every object.
    pub fn index_routes<'a>(&'a self, objects: &'a [Arc<BackendCluster>]) -> RouteIndexGuard<'a> {
        *self.route_index.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(routes::RouteIndex::new(objects));
        RouteIndexGuard {
            core: self,
            _objects: objects,
        }
    }

    /// Why fleetlb will not act on `bc` (an invalid spec, a route another object holds), if so.
    pub fn refusal(
        &self,
        bc: &BackendCluster,
        objects: &[Arc<BackendCluster>],
    ) -> Option<(Reason, String)> {
        if let Err(errors) = bc.validate() {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Some((Reason::InvalidSpec, text.join("; ")));
        }
        let holder = {
            let index = self.route_index.lock().unwrap_or_else(|p| p.into_inner());
            match index.as_ref().filter(|i| i.covers(objects)) {
                Some(i) => i.holder(bc),
                None => routes::route_holder(bc, objects),
            }
        };
        holder.map(|(other, rule)| {
            let split = if bc.spec.weight.is_some() {
                format!("set spec.weight on {other} too to split it")
            } else {
                "set spec.weight on both to split it".to_string()
            };
            (
                Reason::RouteConflict,
                format!("spec.route: {rule} is already served by {other} ({split})"),
            )
        })
    }

    /// One reconcile of a live object: refuse it (invalid, route taken), or list its
    /// instances, launch, drain and terminate, write its status and Events through `sink`.
    pub async fn reconcile(
        &self,
        bc: &BackendCluster,
        objects: &[Arc<BackendCluster>],
        sink: &dyn Sink,
    ) -> Result<Next, Failure> {
        let key = ClusterKey::of(bc);
        let now = Timestamp::now();
        if let Some((reason, message)) = self.refusal(bc, objects) {
            // No provider call for a spec fleetlb will not act on.
            let mut status = bc.status.clone().unwrap_or_default();
            status.observed_generation = bc.metadata.generation;
            for type_ in ["Ready", "Degraded"] {
                set_condition(
                    &mut status.conditions,
                    type_,
                    type_ == "Degraded",
                    reason.as_str(),
                    &message,
                    bc.metadata.generation,
                    now,
                );
            }
            if bc.status.as_ref() != Some(&status) {
                sink.event(bc, Event::warning(reason, message.clone()))
                    .await;
                tracing::warn!(cluster = %key, %reason, %message, "not acting on this BackendCluster");
            }
            sink.write_status(bc, status)
                .await
                .map_err(Failure::Status)?;
            self.clear_failures(&key);
            return Ok(Next::Settled);
        }
        let kind = ProviderKind::of(&bc.spec.provider);
        let listed = match self.providers.require(kind) {
            Ok(p) => self
                .inventory
                .instances_of(bc, &self.providers, objects, None)
                .await
                .map(|l| (p, l)),
            Err(e) => Err(e),
        };
        let (provider, (mine, kinds)) = match listed {
            Ok(x) => x,
            Err(e) => {
                // Keep serving what the status lists; say why nothing else happens.
                let mut status = bc.status.clone().unwrap_or_default();
                degraded_by(&mut status, &e, bc.metadata.generation, now);
                if e.class == ErrorClass::NotConfigured {
                    set_condition(
                        &mut status.conditions,
                        "Ready",
                        false,
                        e.reason().as_str(),
                        &e.to_string(),
                        bc.metadata.generation,
                        now,
                    );
                }
                self.metrics.reconcile.with_label_values(&["error"]).inc();
                sink.write_status(bc, status)
                    .await
                    .map_err(Failure::Status)?;
                return Err(Failure::Provider(e));
            }
        };
        // With `spec.autoscaling`, the plan follows the autoscaler's count.
        let (scaled, scaled_event) = self.autoscale(bc, now).unzip();
        let autoscaled = scaled.is_some();
        // The sink compares against the object as stored: it gets `stored`, not the copy with
        // the new decision (which would look already written).
        let stored = bc;
        let effective;
        let bc = match scaled {
            Some(status) => {
                let mut b = bc.clone();
                b.status.get_or_insert_with(Default::default).autoscaling = Some(status);
                effective = b;
                &effective
            }
            None => bc,
        };
        let health = health_of(&self.dataplane, &key.to_string());
        let inflight = self.inflight(&key);
        let interrupted = if self.cfg.notices.is_empty() {
            HashMap::new()
        } else {
            self.cfg.notices.interrupted()
        };
        let mut state = self.objects().remove(&key).unwrap_or_default();
        // A spot interruption reclaims that pool, and a rebalance recommendation says it is at
        // risk: the replacement launched below goes to another (type, subnet) or market (as
        // EC2 Auto Scaling's capacity rebalancing does), not back into it.
        let first_notice = |id: &str, kind: crate::interruption::Kind| {
            let mut marked = self.pools_marked.lock().unwrap_or_else(|p| p.into_inner());
            if marked.len() > crate::interruption::MAX_NOTICES {
                marked.retain(|(id, _)| interrupted.contains_key(id));
            }
            marked.insert((id.to_string(), kind))
        };
        for i in mine.iter().filter(|i| i.state.is_live()) {
            let Some(&kind) = interrupted.get(&i.id) else {
                continue;
            };
            if matches!(
                kind,
                crate::interruption::Kind::SpotInterruption
                    | crate::interruption::Kind::RebalanceRecommendation
            ) && first_notice(&i.id, kind)
                && let Some(p) = self.providers.get(i.provider)
            {
                p.spot_interrupted(i, kind.describe());
            }
        }
        let mut applied = execute::apply(
            bc,
            execute::Inputs {
                provider: provider.as_ref(),
                providers: &self.providers,
                instances: &mine,
                health: &health,
                inflight: inflight.as_ref(),
                draining: &mut state.draining,
                interrupted: &interrupted,
                drain: self.cfg.drain,
                metrics: &self.metrics,
                backoff: &mut state.backoff,
                backoff_range: self.cfg.backoff,
                launch_visibility: self.cfg.launch_visibility,
            },
            now,
            &|status| sink.write_status(stored, status),
        )
        .await;
        self.objects().insert(key.clone(), state);
        if !applied.launched.is_empty() || !applied.terminated.is_empty() {
            for k in &kinds {
                self.inventory.invalidate(*k).await;
            }
        }
        // Status first: it takes retired instances out of every replica's endpoint set. What
        // was done is told by Events even when the write is refused (a 409 retries it).
        let written = sink
            .write_status(stored, std::mem::take(&mut applied.status))
            .await;
        if let Some(event) = scaled_event.flatten() {
            sink.event(bc, event).await;
        }
        for event in applied_events(bc, &applied, &interrupted) {
            sink.event(bc, event).await;
        }
        if let Some(e) = applied.launch_error {
            sink.event(bc, Event::warning(e.reason, e.message.clone()))
                .await;
            written.map_err(Failure::Status)?;
            return Err(Failure::Launch(e));
        }
        written.map_err(Failure::Status)?;
        self.clear_failures(&key);
        Ok(if applied.busy {
            Next::Busy
        } else if autoscaled {
            Next::Scaling
        } else {
            Next::Settled
        })
    }

    /// Whether `key`'s last reconcile failed (it is waiting out its backoff).
    pub fn failing(&self, key: &ClusterKey) -> bool {
        self.objects().get(key).is_some_and(|s| s.failures > 0)
    }

    fn clear_failures(&self, key: &ClusterKey) {
        if let Some(s) = self.objects().get_mut(key) {
            s.failures = 0;
        }
    }

    /// One step of deleting `bc` (its `metadata.deletionTimestamp` set), called until it
    /// answers [`Deletion::Done`]; then every record of the object is dropped and a `Deleted`
    /// Event published. While waiting, `Ready=False/Deleting` says for what.
    pub async fn delete(
        &self,
        bc: &BackendCluster,
        objects: &[Arc<BackendCluster>],
        sink: &dyn Sink,
    ) -> Deletion {
        let key = ClusterKey::of(bc);
        let kinds = kinds_of(bc);
        if kinds.iter().all(|k| self.providers.get(*k).is_none()) {
            // Nothing this process could clean up; do not hold the object forever.
            tracing::warn!(cluster = %key, provider = %ProviderKind::of(&bc.spec.provider), "deleting without a configured provider");
            self.forget(&key);
            return Deletion::Done;
        }
        for k in &kinds {
            self.inventory.invalidate(*k).await;
        }
        let mut deleting = bc.clone();
        let now = Timestamp::now();
        let step = match self
            .inventory
            .instances_of(bc, &self.providers, objects, Some(Duration::ZERO))
            .await
        {
            Ok((mine, _)) => {
                let uid = bc.metadata.uid.clone().unwrap_or_default();
                let mine: Vec<Instance> = mine.into_iter().filter(|i| i.belongs_to(&uid)).collect();
                let step = delete::delete(
                    &mut deleting,
                    &self.providers,
                    &mine,
                    self.inflight(&key).as_ref(),
                    now,
                    DeleteSettings {
                        drain: self.cfg.drain,
                        launch_visibility: self.cfg.launch_visibility,
                    },
                )
                .await;
                if step == Deletion::Done {
                    self.forget(&key);
                    let note = match bc.spec.deletion_policy {
                        fleetlb_crds::DeletionPolicy::Delete => {
                            "every instance terminated; deletion complete".to_string()
                        }
                        fleetlb_crds::DeletionPolicy::Orphan => format!(
                            "{} instance(s) left running and released (deletionPolicy: Orphan)",
                            mine.iter().filter(|i| i.state.needs_terminate()).count()
                        ),
                    };
                    tracing::info!(cluster = %key, "BackendCluster deleted");
                    sink.event(bc, Event::normal("Deleted", note)).await;
                }
                step
            }
            Err(e) => Deletion::Failed(e),
        };
        // Whatever was terminated or released, the next listing must show it.
        for k in &kinds {
            self.inventory.invalidate(*k).await;
        }
        match &step {
            Deletion::Done => {}
            Deletion::Waiting(why) => {
                self.clear_failures(&key);
                delete::mark_deleting(&mut deleting, why, now);
            }
            Deletion::Failed(e) => {
                delete::mark_deleting(&mut deleting, &e.to_string(), now);
                let status = deleting.status.get_or_insert_with(Default::default);
                degraded_by(status, e, bc.metadata.generation, now);
            }
        }
        if step != Deletion::Done
            && let Err(e) = sink
                .write_status(bc, deleting.status.unwrap_or_default())
                .await
        {
            tracing::warn!(cluster = %key, error = %e, "cannot write the deletion status");
        }
        step
    }

    /// Every instance the providers that launch instances list now (listings at most the
    /// inventory's age), by id; `None` when a listing fails.
    async fn listed_states(
        &self,
        objects: &[Arc<BackendCluster>],
    ) -> Option<HashMap<String, (crate::provider::InstanceState, ClusterKey)>> {
        let mut all = HashMap::new();
        for kind in ProviderKind::ALL {
            if self
                .providers
                .get(kind)
                .is_none_or(|p| !p.manages_instances())
            {
                continue;
            }
            let listing = self
                .inventory
                .get(kind, &self.providers, objects, None)
                .await
                .ok()?;
            all.extend(
                listing
                    .iter()
                    .map(|i| (i.id.clone(), (i.state, i.owner.clone()))),
            );
        }
        Some(all)
    }

    /// Ends the interruption notices whose instances are going or gone (or were never
    /// fleetlb's), so the poller deletes their messages. Drivers call it after their passes.
    pub async fn settle_notices(&self, objects: &[Arc<BackendCluster>]) {
        if self.cfg.notices.is_empty() {
            return;
        }
        if let Some(states) = self.listed_states(objects).await {
            self.cfg
                .notices
                .settle(|id| states.get(id).map(|(state, _)| *state));
        }
    }

    /// The objects owning the instances the interruption queue named since the last call.
    pub async fn interrupted_owners(&self, objects: &[Arc<BackendCluster>]) -> Vec<ClusterKey> {
        let ids = self.cfg.notices.take_fresh();
        if ids.is_empty() {
            return Vec::new();
        }
        let Some(states) = self.listed_states(objects).await else {
            // Put back, and tried again in 2 s (not in a loop against a failing listing).
            self.cfg.notices.refresh(ids);
            let notices = self.cfg.notices.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                notices.wake();
            });
            return Vec::new();
        };
        let mut owners: Vec<ClusterKey> = ids
            .iter()
            .filter_map(|id| states.get(id).map(|(_, owner)| owner.clone()))
            .collect();
        owners.sort();
        owners.dedup();
        owners
    }

    /// Drops every record of a deleted object.
    fn forget(&self, key: &ClusterKey) {
        self.objects().remove(key);
        forget_cluster(&self.metrics, key);
        self.forget_load(key);
    }
}
